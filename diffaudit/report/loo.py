"""The leave-one-out page (:class:`~diffaudit.results.LooResult`): summary, LOO score against outlier score, runs, and
a table per training image. Template ``loo.html.j2`` on the ``page.html.j2`` layout: self-contained, no script,
every string from the data autoescaped."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..data import as_imageset
from ..results import LOO_LABELS, LooResult
from ._html import Figures, render_page

LABEL_COLORS = {  # Okabe & Ito palette (as the audit report)
    "memorized inlier": "#D55E00",
    "memorized outlier": "#CC79A7",
    "hard outlier": "#0072B2",
    "typical": "#999999",
    "unscored": "#E69F00",
}


def _fmt(v: Optional[float], digits: int = 4) -> str:
    if v is None or not math.isfinite(v):
        return "-"
    return f"{v:.{digits}g}"


def _scatter(result: LooResult, width: int = 640, height: int = 400) -> Optional[dict]:
    """Coordinates of the LOO-vs-outlier scatter plot (None when no image was scored)."""
    pts = [(im.outlier_score, im.loo_score, im) for im in result.images if im.loo_score is not None]
    if not pts:
        return None
    ml, mr, mt, mb = 64, 16, 14, 44
    xs = [p[0] for p in pts] + [result.outlier_cut]
    ys = [p[1] for p in pts] + [0.0] + ([result.threshold] if result.threshold is not None else [])
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    if x1 - x0 <= 0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 - y0 <= 0:
        y0, y1 = y0 - 1, y1 + 1
    padx, pady = 0.04 * (x1 - x0), 0.06 * (y1 - y0)
    x0, x1, y0, y1 = x0 - padx, x1 + padx, y0 - pady, y1 + pady

    def sx(v):
        return round(ml + (v - x0) / (x1 - x0) * (width - ml - mr), 1)

    def sy(v):
        return round(height - mb - (v - y0) / (y1 - y0) * (height - mt - mb), 1)

    fr = (0.0, 0.25, 0.5, 0.75, 1.0)
    return {
        "w": width, "h": height, "ml": ml, "mr": mr, "mt": mt, "mb": mb, "pw": width - ml - mr,
        "ph": height - mt - mb, "y0": sy(0), "xcut": sx(result.outlier_cut),
        "ythr": sy(result.threshold) if result.threshold is not None else None,
        "xmid": round((ml + width - mr) / 2), "ymid": round((mt + height - mb) / 2),
        "xticks": [{"x": sx(x0 + f * (x1 - x0)), "label": _fmt(x0 + f * (x1 - x0), 3)} for f in fr],
        "yticks": [{"y": round(sy(y0 + f * (y1 - y0)) + 4, 1), "label": _fmt(y0 + f * (y1 - y0), 3)} for f in fr],
        "points": [{"x": sx(xv), "y": sy(yv), "color": LABEL_COLORS.get(im.label, "#444"),
                    "title": f"{im.id}: LOO {_fmt(im.loo_score)}, outlier {_fmt(im.outlier_score)}, {im.label}"}
                   for xv, yv, im in pts],
    }


def render_loo(result: LooResult, path: str | os.PathLike, *, images: Any = None, thumb_px: int = 48,
               max_rows: int = 2000, title: Optional[str] = None) -> str:
    """Write a self-contained HTML page for ``result``: summary, a scatter plot (inline SVG) of LOO score against
    outlier score coloured by label, and a table per image (thumbnail, LOO score, loss ratio, outlier score, copy
    count, label). ``images``: the training ImageSet / folder (or a callable ``id -> uint8 image | None``) for the
    thumbnails. Returns the path."""
    if not isinstance(result, LooResult):
        raise TypeError(f"result: expected a LooResult, got {type(result).__name__}")
    p = Path(path)
    if p.is_dir():
        raise IsADirectoryError(f"path: {str(path)!r} is a folder; pass a file name such as 'loo.html'")
    if isinstance(images, (str, os.PathLike, np.ndarray)):
        images = as_imageset(images, "images")
    th = Figures(images, thumb_px) if images is not None else None
    counts = result.counts()
    has_copies = any(im.copies is not None for im in result.images)
    rows = [{"uri": th.uri(im.id) if th is not None else None, "id": im.id, "label": im.label,
             "color": LABEL_COLORS.get(im.label, "#444"), "loo_score": _fmt(im.loo_score),
             "loss_ratio": _fmt(im.loss_ratio, 3), "loss_in": _fmt(im.loss_in), "loss_out": _fmt(im.loss_out),
             "runs": f"{im.n_in}/{im.n_in + im.n_out}", "outlier_score": _fmt(im.outlier_score, 3),
             "copies": "-" if im.copies is None else im.copies} for im in result.images[:max_rows]]
    runs = [{"name": r.name, "checkpoint": r.checkpoint, "n_seen": r.n_seen, "loss_seen": _fmt(r.loss_seen),
             "loss_unseen": _fmt(r.loss_unseen)} for r in result.runs]
    render_page("loo.html.j2", title=title or "Leave-one-out memorization", subtitle=result.train or "training set",
                thumb=thumb_px, path=p, r=result, summary=result.summary(), plot=_scatter(result),
                legend=[{"name": lab, "color": LABEL_COLORS[lab], "count": counts.get(lab, 0)} for lab in LOO_LABELS],
                rows=rows, runs=runs, has_copies=has_copies, more=len(result.images) > max_rows)
    return str(p)
