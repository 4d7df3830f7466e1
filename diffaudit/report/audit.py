"""Render an :class:`~diffaudit.results.AuditResult` as one self-contained HTML file, and the risk table as CSV.

The page carries everything it shows: thumbnails are inlined as ``data:`` URIs, the metric curves are inline SVG
drawn here in Python, CSS and the one small script (table sorting and filtering) are inline. It loads nothing from
anywhere, and says so in a Content-Security-Policy whose ``script-src`` admits only the SHA-256 of that script, so
even a string that slipped past escaping could not run. Every user-controlled string (ids, paths, prompts,
embedder names, reasons) goes through Jinja's autoescape or :func:`~diffaudit.report._html.esc`; no user data is ever
placed in a script, a style, a URL or an event handler.

Images come from a provider ``images(kind, key) -> np.ndarray | None``: ``kind`` is ``"sample"`` (``key`` is a
:attr:`SampleMatch.sample_path`, relative to the audit's output folder) or ``"train"`` (``key`` is a training id).
Without one (or where it returns None for a sample), sample PNGs are read from the output folder (never from
outside it, never over :data:`MAX_PIXELS`); training images it cannot give are shown as placeholders.
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
from markupsafe import Markup

from .._format import finite, fmt_num, fmt_pct, fmt_short_step, fmt_step
from .._serial import atomic_write_text
from ..onset import signal_estimate, verdict
from ..results import AuditResult, CheckpointResult, Estimate, ImageRisk
from ._html import CSP, TEMPLATES, esc, page_env

_f = finite

log = logging.getLogger(__name__)

ImageProvider = Callable[[str, str], Optional[np.ndarray]]

MAX_PIXELS = 89_478_485  # PIL's decompression-bomb limit; larger sample files are not thumbnailed

# Okabe & Ito (2008) colour-blind safe palette. Vermillion and bluish green are reserved for onset / keep markers.
PALETTE = ("#0072B2", "#E69F00", "#CC79A7", "#56B4E9", "#444444", "#8C6D1F")
ONSET_COLOR = "#D55E00"
KEEP_COLOR = "#009E73"
FIT_COLOR = "#CC79A7"
REF_COLOR = "#767676"

ESTIMATE_METRICS = {
    "memorization_ratio": "memorization ratio (d1/d2 < 1/3)",
    "memorization_ratio_half": "memorization ratio (d1/d2 < 1/2)",
    "memorization_ratio_dedup": "memorization ratio, training duplicates merged (d1/d2' < 1/3)",
    "replication_rate": "replication rate",
    "extraction_fraction": "extraction rate",
}


# ----------------------------------------------------------------------------------------------------------- public


def render_audit(result: AuditResult, path: str | Path, *, images: ImageProvider | None = None,
                 title: str | None = None, base_dir: str | Path | None = None, thumb_px: int = 80,
                 max_gallery: int = 8, gallery_budget: int = 400, max_rows: int = 2000) -> str:
    """Write the audit report for ``result`` to ``path`` (one self-contained HTML file); return the path.

    ``images``: provider ``(kind, key) -> uint8 image | None`` (see module doc); ``base_dir``: the audit's output
    folder that sample paths are relative to (default: the folder of ``path``). ``thumb_px``: thumbnail box size.
    Galleries show the ``max_gallery`` most-copied samples per checkpoint and embedder; when that would exceed
    ``gallery_budget`` cards in all, checkpoints other than the first, onset, recommended and last show fewer (at
    least 2). The risk table shows the ``max_rows`` highest-risk training images (the CSV has them all).
    """
    p = Path(path)
    if p.is_dir():
        raise IsADirectoryError(f"path: {str(path)!r} is a folder; pass a file name such as 'report.html'")
    if base_dir is None:
        base_dir = p.resolve().parent
    text = render_audit_html(result, images=images, title=title, base_dir=base_dir, thumb_px=thumb_px,
                             max_gallery=max_gallery, gallery_budget=gallery_budget, max_rows=max_rows)
    atomic_write_text(p, text)
    log.info("wrote audit report %s (%.1f kB)", p, len(text.encode()) / 1e3)
    return str(p)


def render_audit_html(result: AuditResult, *, images: ImageProvider | None = None, title: str | None = None,
                      base_dir: str | Path | None = None, thumb_px: int = 80, max_gallery: int = 8,
                      gallery_budget: int = 400, max_rows: int = 2000) -> str:
    """The report as a string (same arguments as :func:`render_audit`). Deterministic: same input, same bytes."""
    if not isinstance(result, AuditResult):
        raise TypeError(f"result: expected an AuditResult, got {type(result).__name__}")
    if images is not None and not callable(images):
        raise TypeError(f"images: expected a callable (kind, key) -> np.ndarray | None, got {type(images).__name__}")
    for name, v, lo in (("thumb_px", thumb_px, 16), ("max_gallery", max_gallery, 0),
                        ("gallery_budget", gallery_budget, 0), ("max_rows", max_rows, 0)):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise ValueError(f"{name}: expected an integer >= {lo}, got {v!r}")
    folder = _folder_provider(Path(base_dir)) if base_dir else _no_images
    if images is None:
        provider = folder
    else:
        def provider(kind: str, key: str) -> np.ndarray | None:  # the caller's pictures first, then the folder's
            got = images(kind, key)
            return folder(kind, key) if got is None and kind == "sample" else got
    thumbs = _Thumbs(provider, thumb_px)
    ctx = _context(result, thumbs, title=title, max_gallery=max_gallery, gallery_budget=gallery_budget,
                   max_rows=max_rows)
    css = (TEMPLATES / "report.css").read_text(encoding="utf-8")
    js = (TEMPLATES / "report.js").read_text(encoding="utf-8")
    digest = base64.b64encode(hashlib.sha256(js.encode("utf-8")).digest()).decode("ascii")
    csp = CSP.replace("script-src 'unsafe-inline'", f"script-src 'sha256-{digest}'")
    env = _env()
    return env.get_template("audit.html.j2").render(
        csp=csp, css=Markup(css), js=Markup(js), thumb_px=int(thumb_px), **ctx)


# ------------------------------------------------------------------------------------------------------ formatting


def _jsonish(v: Any) -> str:
    if isinstance(v, str):
        return v
    try:
        return json.dumps(v, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return str(v)


# ------------------------------------------------------------------------------------------------------ thumbnails


def _no_images(kind: str, key: str) -> None:
    return None


def _folder_provider(base: Path) -> ImageProvider:
    """Sample PNGs under the output folder ``base``; nothing outside it (no absolute paths, no ``..``, no symlink
    leading out); files over :data:`MAX_PIXELS` are not decoded. Training images: None (placeholders)."""
    root = base.resolve()

    def provider(kind: str, key: str) -> np.ndarray | None:
        if kind != "sample" or not key:
            return None
        rel = Path(key)
        if rel.is_absolute() or ".." in rel.parts:
            log.warning("sample path %r is not inside the output folder; not shown", key)
            return None
        try:
            full = (root / rel).resolve()
            full.relative_to(root)
        except (ValueError, OSError):
            log.warning("sample path %r leads outside the output folder; not shown", key)
            return None
        if not full.is_file():
            return None
        from PIL import Image

        with Image.open(full) as im:
            if im.width * im.height > MAX_PIXELS:
                log.warning("sample %r has %d pixels (limit %d); not shown", key, im.width * im.height, MAX_PIXELS)
                return None
            im.draft("RGB", (512, 512))
            im.thumbnail((512, 512))
            return _as_rgb_u8(np.asarray(im.convert("RGBA") if "A" in im.getbands() else im.convert("RGB")))

    return provider


def _as_rgb_u8(arr: Any) -> np.ndarray | None:
    """uint8 HWC RGB from HW / HWC (C = 1, 3, 4) / CHW, uint8 / bool / 16-bit / float in [0, 1] or [0, 255]."""
    a = np.asarray(arr)
    if a.ndim == 3 and a.shape[2] not in (1, 3, 4) and a.shape[0] in (1, 3, 4):
        a = np.transpose(a, (1, 2, 0))
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4) or a.shape[0] == 0 or a.shape[1] == 0:
        return None
    if a.dtype == np.uint8:
        pass
    elif a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif a.dtype == np.uint16:
        a = (a >> 8).astype(np.uint8)
    elif np.issubdtype(a.dtype, np.floating):
        a = np.nan_to_num(a.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        if a.size and a.max() <= 1.0:
            a = a * 255.0
        a = np.clip(np.rint(a), 0, 255).astype(np.uint8)
    elif np.issubdtype(a.dtype, np.integer):
        a = np.clip(a, 0, 255).astype(np.uint8)
    else:
        return None
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    elif a.shape[2] == 4:  # composite on white
        alpha = a[:, :, 3:4].astype(np.float32) / 255.0
        a = np.rint(a[:, :, :3] * alpha + 255.0 * (1 - alpha)).astype(np.uint8)
    return np.ascontiguousarray(a)


@dataclass
class Thumb:
    alt: str
    ref: str | None = None  # id of the shared <image> in the page's sprite sheet; None: placeholder
    iw: int = 0  # encoded size
    ih: int = 0
    w: int = 0  # display size
    h: int = 0
    px: bool = False  # upscaled for display: draw pixelated
    label: str = ""  # placeholder text


class _Thumbs:
    """Encodes each (kind, key) once per report and stores each distinct picture once in the page (an SVG sprite
    sheet that thumbnails ``<use>``): a training image nearest to many samples costs its bytes once. A provider
    failure becomes a placeholder, never an exception."""

    def __init__(self, provider: ImageProvider, box: int):
        self.provider, self.box = provider, box
        self._cache: dict[tuple[str, str], dict | None] = {}
        self._sprites: dict[str, dict] = {}  # data URI -> {"id", "uri", "w", "h"}, in first-use order

    def get(self, kind: str, key: str | None, alt: str, label: str) -> Thumb:
        if key is None or key == "":
            return Thumb(alt=alt, label=label)
        ck = (kind, str(key))
        if ck not in self._cache:
            enc = self._encode(kind, str(key))
            if enc is None:
                self._cache[ck] = None
            else:
                uri, h, w = enc
                sp = self._sprites.get(uri)
                if sp is None:
                    sp = self._sprites[uri] = {"id": f"t{len(self._sprites)}", "uri": uri, "w": w, "h": h}
                self._cache[ck] = sp
        sp = self._cache[ck]
        if sp is None:
            return Thumb(alt=alt, label=label)
        h, w = sp["h"], sp["w"]
        scale = self.box / max(h, w)
        return Thumb(alt=alt, ref=sp["id"], iw=w, ih=h, w=max(1, round(w * scale)), h=max(1, round(h * scale)),
                     px=scale > 1.0)

    def sprites(self) -> list[dict]:
        return list(self._sprites.values())

    def _encode(self, kind: str, key: str) -> tuple[str, int, int] | None:
        try:
            arr = self.provider(kind, key)
        except Exception as e:  # a broken image must not break the report
            log.warning("image provider failed for %s %r: %s", kind, key, e)
            return None
        if arr is None:
            return None
        a = _as_rgb_u8(arr)
        if a is None:
            log.warning("image provider returned an unusable array for %s %r (shape %s, dtype %s)", kind, key,
                        getattr(np.asarray(arr), "shape", "?"), getattr(np.asarray(arr), "dtype", "?"))
            return None
        return _encode_thumb(a, self.box)


def _encode_thumb(a: np.ndarray, box: int) -> tuple[str, int, int]:
    """Downscale to fit ``box`` (never upscale: the browser does that, pixelated) and encode as the smaller of PNG
    and JPEG; returns (data URI, height, width)."""
    from PIL import Image

    im = Image.fromarray(a)
    if max(im.size) > box:
        im.thumbnail((box, box), Image.LANCZOS)
    png = io.BytesIO()
    im.save(png, format="PNG", optimize=True)
    best, mime = png.getvalue(), "image/png"
    if min(im.size) >= 24:  # photos: JPEG is usually several times smaller at this size
        jpg = io.BytesIO()
        im.save(jpg, format="JPEG", quality=82, optimize=True)
        if len(jpg.getvalue()) < 0.8 * len(best):
            best, mime = jpg.getvalue(), "image/jpeg"
    return f"data:{mime};base64," + base64.b64encode(best).decode("ascii"), im.size[1], im.size[0]


# ----------------------------------------------------------------------------------------------------------- charts


@dataclass
class Series:
    label: str
    points: list[tuple[float, float | None, float | None, float | None]]  # (step, value, low, high)
    color: str
    dash: str = ""
    band: bool = True
    marker: bool = True


@dataclass
class HLine:
    y: float
    label: str
    color: str = REF_COLOR
    dash: str = "6 4"


@dataclass
class Chart:
    key: str
    title: str
    subtitle: str
    svg: Markup
    legend: list[dict] = field(default_factory=list)


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    # ranges below ~1e-9 (e.g. a closed-form model's loss of 1e-14) would round every tick to the same value
    span = max(abs(lo), abs(hi), 1.0) * 1e-9
    if hi - lo < span:
        hi = lo + max(span, 1e-9) if hi > lo else lo + 1.0
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = mag
    for m in (1, 2, 2.5, 5, 10):
        step = m * mag
        if (hi - lo) / step <= n:
            break
    start = math.floor(lo / step + 1e-9) * step
    ticks, t = [], start
    while t <= hi + step * 1e-6 and len(ticks) < 50:
        ticks.append(round(t, 12))
        t += step
    if ticks[-1] < hi - step * 1e-6:
        ticks.append(round(ticks[-1] + step, 12))
    return ticks


def _swatch(color: str, dash: str = "", kind: str = "line") -> Markup:
    if kind == "band":
        body = f'<rect x="0" y="1" width="22" height="10" fill="{color}" fill-opacity="0.2"/>' \
               f'<line x1="0" y1="6" x2="22" y2="6" stroke="{color}" stroke-width="2"/>'
    else:
        d = f' stroke-dasharray="{dash}"' if dash else ""
        body = f'<line x1="0" y1="6" x2="22" y2="6" stroke="{color}" stroke-width="2"{d}/>'
    return Markup(f'<svg class="sw" width="22" height="12" viewBox="0 0 22 12" aria-hidden="true">{body}</svg>')


def line_chart(series: Sequence[Series], *, steps: Sequence[float], title: str, fmt: Callable[[Any], str],
               percent: bool = False, onset: float | None = None, keep: float | None = None,
               hlines: Sequence[HLine] = (), window: tuple[float, float] | None = None, width: int = 560,
               height: int = 250, fit: float | None = None) -> Markup:
    """An inline SVG line chart over training steps. Every label is escaped; colours come from the palette.
    ``window``: the stop window ``(tau_gen, end)`` drawn as a shaded band. Markers: ``onset`` (copies), ``fit``
    (the model starts fitting its training images: memorizes without copying), ``keep``."""
    L, R, T, B = 52, 14, 46, 34
    pw, ph = width - L - R, height - T - B
    xs = sorted({float(s) for s in steps})
    x0, x1 = (xs[0], xs[-1]) if xs else (0.0, 1.0)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    vals: list[float] = []
    for s in series:
        for _, v, lo, hi in s.points:
            vals += [u for u in (v, lo if s.band else None, hi if s.band else None) if _f(u) is not None]
    vals += [h.y for h in hlines if _f(h.y) is not None]
    lo_v, hi_v = (min(vals), max(vals)) if vals else (0.0, 1.0)
    if percent:
        lo_v = min(lo_v, 0.0)
        hi_v = max(hi_v, 0.05 if lo_v >= 0 else hi_v)
    if hi_v == lo_v:
        pad = abs(hi_v) * 0.1 or 1.0
        lo_v, hi_v = lo_v - pad, hi_v + pad
    yt = _nice_ticks(lo_v, hi_v)
    if percent and 0 <= lo_v and hi_v <= 1.0:
        yt = [t for t in yt if t <= 1.0 + 1e-9] or yt
    y0, y1 = yt[0], yt[-1]

    def X(s: float) -> float:
        return round(L + (s - x0) / (x1 - x0) * pw, 2)

    def Y(v: float) -> float:
        return round(T + ph - (v - y0) / (y1 - y0) * ph, 2)

    out = [f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
           f'aria-label="{esc(title)}" xmlns="http://www.w3.org/2000/svg">', f"<title>{esc(title)}</title>"]
    # grid + y ticks
    for t in yt:
        out.append(f'<line class="grid" x1="{L}" x2="{L + pw}" y1="{Y(t)}" y2="{Y(t)}"/>')
        out.append(f'<text class="tick" x="{L - 6}" y="{Y(t) + 3.5}" text-anchor="end">{esc(fmt(t))}</text>')
    # x ticks
    if len(xs) <= 1:
        xt = xs
    else:
        xt = [t for t in _nice_ticks(x0, x1, 6) if x0 - 1e-9 <= t <= x1 + 1e-9]
    for t in xt:
        out.append(f'<line class="xtick" x1="{X(t)}" x2="{X(t)}" y1="{T + ph}" y2="{T + ph + 4}"/>')
        out.append(f'<text class="tick" x="{X(t)}" y="{T + ph + 16}" text-anchor="middle">'
                   f"{esc(fmt_short_step(t))}</text>")
    out.append(f'<text class="axis-label" x="{L + pw}" y="{height - 3}" text-anchor="end">training step</text>')
    out.append(f'<line class="axis" x1="{L}" x2="{L + pw}" y1="{T + ph}" y2="{T + ph}"/>')
    if window is not None and window[1] > window[0]:
        wa, wb = X(max(x0, window[0])), X(min(x1, window[1]))
        out.append(f'<rect class="window" x="{wa}" y="{T}" width="{max(0.0, round(wb - wa, 2))}" height="{ph}" '
                   f'fill="{KEEP_COLOR}" fill-opacity="0.10"><title>stop window: quality plateau (step '
                   f'{esc(fmt_step(window[0]))}) to onset</title></rect>')
    # reference lines
    for h in hlines:
        if _f(h.y) is None:
            continue
        y = Y(h.y)
        out.append(f'<line class="hline" x1="{L}" x2="{L + pw}" y1="{y}" y2="{y}" stroke="{h.color}" '
                   f'stroke-dasharray="{h.dash}" data-y="{esc(repr(float(h.y)))}"/>')
        out.append(f'<text class="ref-label" x="{L + pw - 4}" y="{y - 4}" text-anchor="end" fill="{h.color}">'
                   f"{esc(h.label)}</text>")
    # bands, lines, points
    for s in series:
        pts = sorted(s.points, key=lambda p: p[0])
        if s.band:
            for seg in _segments([p for p in pts if _f(p[2]) is not None and _f(p[3]) is not None], pts):
                upper = " ".join(f"{X(p[0])},{Y(p[3])}" for p in seg)
                lower = " ".join(f"{X(p[0])},{Y(p[2])}" for p in reversed(seg))
                out.append(f'<polygon class="band" points="{upper} {lower}" fill="{s.color}"/>')
        for seg in _segments([p for p in pts if _f(p[1]) is not None], pts):
            d = " ".join(f"{'M' if i == 0 else 'L'}{X(p[0])},{Y(p[1])}" for i, p in enumerate(seg))
            dash = f' stroke-dasharray="{s.dash}"' if s.dash else ""
            out.append(f'<path class="line" d="{d}" stroke="{s.color}"{dash}/>')
        if s.marker:
            for st, v, lo, hi in pts:
                if _f(v) is None:
                    continue
                tip = f"{s.label} — step {fmt_step(st)}: {fmt(v)}"
                if _f(lo) is not None and _f(hi) is not None:
                    tip += f" [{fmt(lo)}–{fmt(hi)}]"
                out.append(f'<circle class="pt" cx="{X(st)}" cy="{Y(v)}" r="3" fill="{s.color}" '
                           f'data-step="{int(st)}"><title>{esc(tip)}</title></circle>')
    # onset / keep markers (labels in the top margin, one row each)
    for step, cls, color, label, row, dash in ((onset, "onset", ONSET_COLOR, "onset (copies)", 12, ""),
                                               (fit, "fit", FIT_COLOR, "fits training set", 25, "2 2"),
                                               (keep, "keep", KEEP_COLOR, "keep", 38, "4 3")):
        if step is None or not (x0 <= step <= x1):
            continue
        x = X(step)
        d = f' stroke-dasharray="{dash}"' if dash else ""
        out.append(f'<line class="marker {cls}" x1="{x}" x2="{x}" y1="{T - 4}" y2="{T + ph}" stroke="{color}"{d}/>')
        anchor = "end" if x > L + 0.75 * pw else "start"
        dx = -4 if anchor == "end" else 4
        out.append(f'<text class="marker-label" x="{x + dx}" y="{row}" text-anchor="{anchor}" fill="{color}">'
                   f"{esc(label)} · step {esc(fmt_step(step))}</text>")
    out.append("</svg>")
    return Markup("".join(out))


def _segments(points: list, all_points: list) -> list[list]:
    """Split ``points`` (a subset of ``all_points`` in step order) into runs without a missing point between them."""
    if not points:
        return []
    keep = {id(p) for p in points}
    segs, cur = [], []
    for p in all_points:
        if id(p) in keep:
            cur.append(p)
        elif cur:
            segs.append(cur)
            cur = []
    if cur:
        segs.append(cur)
    return segs


# ------------------------------------------------------------------------------------------------- view model


def _verdict(result: AuditResult, cks: list[CheckpointResult]) -> dict:
    """The report's verdict box: :func:`diffaudit.onset.verdict`, the result's own words when it has them, and
    notes on what was left out."""
    v = verdict(cks, result.onset)
    own = result.verdict.strip()
    computed = " ".join([v.text, *(f"Warning: {w}." for w in result.warnings)])
    lines = [own] if own and own not in (v.text, computed) else list(v.lines)  # other words than the computed win
    notes: list[str] = [f"Warning: {w}." for w in result.warnings]
    nonfinite = sum(int(c.num_nonfinite or 0) for c in cks)
    if nonfinite:
        notes.append(f"{nonfinite:,} generated sample{'s were' if nonfinite != 1 else ' was'} NaN/inf and left out "
                     "of every metric.")
    if result.skipped and cks:
        n = len(result.skipped)
        notes.append(f"{n:,} input{'s were' if n != 1 else ' was'} skipped (listed below with reasons).")
    return {"status": v.status, "badge": v.badge, "headline": v.headline, "lines": lines, "notes": notes,
            "rule": v.rule}


def _embedder_colors(cks: list[CheckpointResult]) -> dict[str, str]:
    names: list[str] = []
    for c in cks:
        for n in c.metrics:
            if n not in names:
                names.append(n)
    return {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(names)}


def _pts(cks, get) -> list[tuple[float, float | None, float | None, float | None]]:
    out = []
    for c in cks:
        v = get(c)
        if isinstance(v, Estimate):
            out.append((float(c.step), _f(v.value), _f(v.low), _f(v.high)))
        else:
            out.append((float(c.step), _f(v), None, None))
    return out


def _q(c: CheckpointResult, name: str, attr: str):
    q = getattr(c.metrics.get(name), "quality", None) if name in c.metrics else None
    return getattr(q, attr, None) if q is not None else None


def _has(pts) -> bool:
    return any(p[1] is not None for p in pts)


def _charts(result: AuditResult, cks: list[CheckpointResult], colors: dict[str, str]) -> list[Chart]:
    steps = [c.step for c in cks]
    on = result.onset
    onset = on.onset_step
    keep = on.recommended_step
    sig_metric = on.signal_metric or None
    thr = _f(on.threshold)
    charts: list[Chart] = []
    signal_charted = False

    def m_get(name: str, attr: str):
        return lambda c: getattr(c.metrics.get(name), attr, None) if name in c.metrics else None

    window = None
    if on.tau_gen is not None and not on.window_empty:
        end = onset if onset is not None else getattr(on, "copying_step", None)
        window = (float(on.tau_gen), float(end) if end is not None else float(max(steps)) if steps else 0.0)

    def add(key, title, subtitle, series, *, fmt, percent=False, hlines=()):
        series = [s for s in series if _has(s.points)]
        if not series:
            return False
        svg = line_chart(series, steps=steps, title=title, fmt=fmt, percent=percent, onset=onset, keep=keep,
                         hlines=hlines, window=window, fit=on.fit_step)
        legend = [{"label": s.label, "sw": _swatch(s.color, s.dash, "band" if s.band and any(
            p[2] is not None for p in s.points) else "line")} for s in series]
        legend += [{"label": h.label, "sw": _swatch(h.color, h.dash)} for h in hlines if _f(h.y) is not None]
        charts.append(Chart(key, title, subtitle, svg, legend))
        return True

    names = list(colors)

    def frac(metric: str, title: str, sub: str) -> None:
        nonlocal signal_charted
        series = []
        for n in names:
            series.append(Series(f"{n}: d1/d2 < 1/3" if metric == "memorization_ratio" else n,
                                 _pts(cks, m_get(n, metric)), colors[n]))
            if metric == "memorization_ratio":
                series.append(Series(f"{n}: d1/d2 < 1/2", _pts(cks, m_get(n, "memorization_ratio_half")),
                                     colors[n], dash="5 3", band=False))
                dd = _pts(cks, m_get(n, "memorization_ratio_dedup"))
                if any(p[1] is not None for p in dd) and dd != _pts(cks, m_get(n, "memorization_ratio")):
                    series.append(Series(f"{n}: d1/d2' < 1/3, training duplicates merged", dd, colors[n],
                                         dash="1 3", band=False))
        hl = [HLine(thr, f"onset threshold {fmt_pct(thr)}")] if sig_metric == metric and thr is not None else []
        if add(metric, title, sub, series, fmt=fmt_pct, percent=True, hlines=hl) and hl:
            signal_charted = True

    # sample quality (generalization): Frechet distance with the real-data floor, precision / recall / ...
    for n in names:
        q0 = next((c.metrics[n].quality for c in cks if n in c.metrics and c.metrics[n].quality is not None), None)
        if q0 is None:
            continue
        vs = "held-out images" if q0.reference == "heldout" else "the TRAINING images (no held-out set: copies score well)"
        floor = [HLine(q0.fd_floor, f"real-data floor: {q0.floor_n} training vs held-out images")] \
            if q0.fd_floor is not None else []
        series = [Series(f"{n}: samples", _pts(cks, lambda c, n=n: _q(c, n, "fd")), colors[n])]
        if q0.fd_floor is not None and q0.floor_n != q0.fd.n:
            series.append(Series(f"{n}: samples at n = {q0.floor_n} (comparable with the floor)",
                                 _pts(cks, lambda c, n=n: _q(c, n, "fd_at_floor_n")), colors[n], dash="5 3",
                                 band=False))
        add(f"fd-{n}", f"Sample quality: Frechet distance — {n}",
            f"Frechet distance of the samples to {vs} in {n} features (Heusel et al. 2017; lower is better; shaded: "
            "bootstrap confidence interval). Quality reaches its plateau at tau_gen (Bonnaire et al. 2025); the "
            "green band is the stop window from there to the memorization onset.", series, fmt=fmt_num,
            hlines=floor)
        add(f"prdc-{n}", f"Precision, recall, density, coverage — {n}",
            f"Against {vs}, k = 5 (Kynkaanniemi et al. 2019; Naeem et al. 2020): precision = samples on the real "
            "manifold, recall = real images on the samples' manifold, coverage = real images with a sample nearby.",
            [Series(lab, _pts(cks, lambda c, n=n, a=a: _q(c, n, a)), PALETTE[i % len(PALETTE)], band=a != "density")
             for i, (lab, a) in enumerate((("precision", "precision"), ("recall", "recall"), ("density", "density"),
                                           ("coverage", "coverage")))], fmt=fmt_num)
    frac("memorization_ratio", "Memorization ratio",
         "Share of samples whose nearest training image is over 3× closer than the second nearest "
         "(Gu et al. 2023). Shaded: confidence interval.")
    frac("replication_rate", "Replication rate",
         "Share of samples whose top-1 similarity to the training set exceeds the embedder's copy threshold "
         "(Somepalli et al. 2023). Shaded: confidence interval.")
    frac("extraction_fraction", "Extraction rate",
         "Share of samples within the calibrated tiled-L2 ratio of a training image (Carlini et al. 2023). "
         "Shaded: confidence interval.")
    # the onset signal itself when it is none of the above
    if not signal_charted and any(c.onset_signal is not None for c in cks):
        hl = [HLine(thr, f"onset threshold {fmt_pct(thr)}")] if thr is not None else []
        add("onset_signal", "Onset signal", f"{on.signal or 'The onset signal'}: the value the onset rule reads "
            "(shaded: confidence interval).", [Series(on.signal or "signal", _pts(cks, lambda c: c.onset_signal),
                                                      PALETTE[0])], fmt=fmt_pct, percent=True, hlines=hl)
    # top-1 similarity vs baselines, one chart per embedder (units differ)
    for n in names:
        em0 = next((c.metrics[n] for c in cks if n in c.metrics), None)
        cos = em0 is not None and em0.metric == "cosine"
        unit = "cosine similarity, higher = closer" if cos else "distance, lower = closer"
        pct_word = "95th percentile" if cos else "5th percentile"
        hl = []
        if cos and em0 is not None and _f(em0.threshold) is not None:
            hl.append(HLine(float(em0.threshold), f"copy threshold {fmt_num(em0.threshold)}", dash="2 3"))
        add(f"top1-{n}", f"Top-1 {'similarity' if cos else 'distance'} — {n}",
            f"Each sample's nearest training image ({unit}), beside the training set's own second-neighbour "
            "baseline and held-out real images. Samples far closer than the baseline are copies.",
            [Series("samples: mean", _pts(cks, m_get(n, "top1_mean")), colors[n], band=False),
             Series(f"samples: {pct_word}", _pts(cks, m_get(n, "top1_p95")), colors[n], dash="5 3", band=False),
             Series("train baseline: mean", _pts(cks, m_get(n, "train_baseline_top1_mean")), REF_COLOR,
                    band=False, marker=False),
             Series(f"train baseline: {pct_word}", _pts(cks, m_get(n, "train_baseline_top1_p95")), REF_COLOR,
                    dash="5 3", band=False, marker=False),
             Series("held-out real images: mean", _pts(cks, m_get(n, "heldout_top1_mean")),
                    PALETTE[1] if colors[n] != PALETTE[1] else PALETTE[2], band=False)],
            fmt=fmt_num, hlines=hl)
    add("loss_gap", "Denoising-loss gap",
        "Held-out minus training denoising loss at fixed timesteps and noise; above 0, training images fit "
        "better. Memorization can start before validation loss rises (Tirumala et al. 2022).",
        [Series("held-out − train", _pts(cks, lambda c: c.loss_gap), PALETTE[0], band=False)],
        fmt=fmt_num, hlines=[HLine(0.0, "no gap")])
    add("auc", "Membership AUC",
        "How well per-image loss tells training from held-out images: 0.5 = chance, 1 = every training "
        "image is recognisable.",
        [Series("membership AUC", _pts(cks, lambda c: c.membership_auc), PALETTE[0], band=False)],
        fmt=fmt_num, hlines=[HLine(0.5, "chance")])
    add("ct", "Held-out comparison (C_T z-score)",
        "Meehan et al. 2020: z below 0 means samples sit closer to the training set than held-out data does "
        "(copying); around 0 is healthy.",
        [Series(n, _pts(cks, m_get(n, "heldout_ct_z")), colors[n], band=False) for n in names],
        fmt=fmt_num, hlines=[HLine(0.0, "no difference")])
    add("calibrated", "Closer than 99% of held-out images",
        "A copy threshold calibrated on the data: the share of samples nearer to the training set than all but 1% "
        "of held-out real images are (about 1% when samples are as novel as real unseen images; shaded: "
        "confidence interval). Shown beside the literature's fixed thresholds, not instead of them.",
        [Series(n, _pts(cks, m_get(n, "heldout_calibrated_rate")), colors[n]) for n in names],
        fmt=fmt_pct, percent=True, hlines=[HLine(0.01, "1%: as novel as held-out images")])
    add("authenticity", "Authenticity",
        "Share of samples judged authentic, i.e. not copies (Alaa et al. 2022). Higher is better.",
        [Series(n, _pts(cks, m_get(n, "authenticity")), colors[n], band=False) for n in names],
        fmt=fmt_pct, percent=True)
    add("loss", "Denoising loss",
        "Mean denoising loss on training and held-out images at fixed timesteps and noise.",
        [Series("train", _pts(cks, lambda c: c.loss_train), PALETTE[0], band=False),
         Series("held-out", _pts(cks, lambda c: c.loss_heldout), PALETTE[1], band=False)], fmt=fmt_num)
    return charts


def _score_text(metric: str, score: Any) -> str:
    if _f(score) is None:
        return "—"
    return f"sim {fmt_num(score)}" if metric == "cosine" else f"d {fmt_num(score)}"


def _galleries(cks: list[CheckpointResult], thumbs: _Thumbs, *, onset, keep, max_gallery: int,
               gallery_budget: int) -> tuple[list[dict], bool]:
    groups_total = sum(1 for c in cks for em in c.metrics.values() if em.top_matches)
    if groups_total * max_gallery <= gallery_budget:
        small_cap = max_gallery
    else:
        small_cap = min(max_gallery, max(2, gallery_budget // max(1, groups_total)))
    key_steps = {s for s in (onset, keep) if s is not None}
    if cks:
        key_steps |= {cks[0].step, cks[-1].step}
    out, capped = [], False
    for i, c in enumerate(cks):
        cap = max_gallery if c.step in key_steps else small_cap
        groups, n_copied, n_shown = [], 0, 0
        for name, em in c.metrics.items():
            if not em.top_matches:
                continue
            shown = em.top_matches[:cap]
            capped |= len(em.top_matches) > cap and cap < max_gallery
            cards = []
            for m in shown:
                n_copied += bool(m.copied)
                s_alt = f"sample {m.sample_index} at step {c.step}"
                sample = thumbs.get("sample", m.sample_path, s_alt, "sample not kept")
                neigh = []
                for r, nid in enumerate(list(m.neighbor_ids)[:2]):
                    score = m.scores[r] if r < len(m.scores) else None
                    neigh.append({"rank": ("nearest", "2nd nearest")[r], "id": str(nid),
                                  "score": _score_text(em.metric, score),
                                  "thumb": thumbs.get("train", str(nid), f"training image {nid}", str(nid))})
                cards.append({"index": m.sample_index, "path": m.sample_path or "", "copied": bool(m.copied),
                              "prompt": m.prompt,
                              "ratio": fmt_num(m.ratio) if _f(m.ratio) is not None else None,
                              "sample": sample, "neighbors": neigh})
            n_shown += len(cards)
            groups.append({"embedder": name, "metric": em.metric, "cards": cards, "total": len(em.top_matches),
                           "unit": "cosine similarity (higher = closer)" if em.metric == "cosine"
                           else "L2 distance (lower = closer)"})
        badges = []
        if c.step == onset:
            badges.append(("onset", "onset"))
        if c.step == keep:
            badges.append(("keep", "recommended"))
        if i == len(cks) - 1:
            badges.append(("last", "last"))
        out.append({"anchor": f"ck{i}", "step": c.step, "path": c.path, "groups": groups, "badges": badges,
                    "n_shown": n_shown, "n_copied": n_copied,
                    "open": i == len(cks) - 1 or c.step == onset})
    return out, capped


def _prompt_rows(cks) -> dict | None:
    """Text-to-image audits: per prompt at the last checkpoint with prompt data, Wen et al.'s score beside the copies
    among its samples (highest score first), and how well the score predicts the copies at each checkpoint."""
    with_prompts = [c for c in cks if c.prompts]
    if not with_prompts:
        return None
    last = with_prompts[-1]
    rows = sorted(last.prompts, key=lambda p: (-(p.score if _f(p.score) is not None else -1.0), p.prompt))
    det = [(c.step, c.prompt_detection) for c in with_prompts if c.prompt_detection is not None]
    return {
        "step": last.step,
        "rows": [{"prompt": p.prompt, "score": fmt_num(p.score), "samples": p.samples, "copies": p.copies,
                  "copied": p.copies > 0} for p in rows],
        "detection": [{"step": s, "pos": d.positives, "neg": d.negatives,
                       "auc": fmt_num(d.auc) if d.auc is not None else "— (needs copying and clean prompts)",
                       "tpr": fmt_pct(d.tpr_at_1pct_fpr) if d.tpr_at_1pct_fpr is not None else "—"} for s, d in det],
    }


def _risk_table(images: list[ImageRisk], max_rows: int) -> dict:
    rows = sorted(images, key=ImageRisk.sort_key)
    shown = rows[:max_rows]
    cols = [("id", "Training image", "str"), ("copies", "Copies", "num"), ("first", "First copied (step)", "num"),
            ("dups", "Duplicates", "num"), ("outlier", "Outlier score", "num"), ("label", "Label", "str")]
    if any(_f(r.membership_score) is not None for r in images):
        cols.append(("membership", "Membership score", "num"))
    if any(_f(r.loo_score) is not None for r in images):
        cols.append(("loo", "Leave-one-out score", "num"))
    if any(r.caption for r in images):
        cols.insert(1, ("caption", "Caption", "str"))

    def cell(r: ImageRisk, k: str) -> tuple[str, str | None]:
        if k == "id":
            return str(r.id), None
        if k == "copies":
            return f"{int(r.copies or 0):,}", str(int(r.copies or 0))
        if k == "first":
            return fmt_step(r.first_step_copied), ("" if r.first_step_copied is None
                                                   else str(int(r.first_step_copied)))
        if k == "dups":
            return f"{int(r.duplicates or 0):,}", str(int(r.duplicates or 0))
        if k == "label":
            return str(r.label), None
        if k == "caption":
            return str(r.caption or ""), None
        v = {"outlier": r.outlier_score, "membership": r.membership_score, "loo": r.loo_score}[k]
        return fmt_num(v), ("" if _f(v) is None else repr(_f(v)))

    trs = []
    for r in shown:
        by_step = ", ".join(f"step {k}: {v}" for k, v in r.copies_by_step.items())
        trs.append({"id": str(r.id), "label": str(r.label), "copied": int(r.copies or 0) > 0, "by_step": by_step,
                    "cells": [dict(zip(("text", "v"), cell(r, k)), key=k) for k, _, _ in cols]})
    labels = sorted({str(r.label) for r in images})
    return {"cols": [{"key": k, "title": t, "type": ty} for k, t, ty in cols], "rows": trs, "total": len(rows),
            "shown": len(shown), "labels": labels,
            "n_copied": sum(1 for r in images if int(r.copies or 0) > 0),
            "n_outlier_copied": sum(1 for r in images if int(r.copies or 0) > 0 and str(r.label) == "outlier")}


def _provenance(result: AuditResult) -> dict | None:
    p = result.provenance
    if p is None:
        return None
    items = [("diffaudit version", p.diffaudit_version), ("created", p.created), ("run", p.run),
             ("seed", str(p.seed)), ("samples per checkpoint", f"{int(p.num_samples):,}"),
             ("training set", p.train), ("training-set fingerprint", p.train_fingerprint),
             ("held-out set", p.heldout), ("held-out fingerprint", p.heldout_fingerprint)]
    items = [(k, str(v)) for k, v in items if v not in ("", None)]
    embedders = []
    for d in p.embedders:
        if isinstance(d, dict):
            name = str(d.get("name", ""))
            embedders.append({"name": name, "items": [(str(k), _jsonish(v)) for k, v in d.items() if k != "name"]})
        else:
            embedders.append({"name": _jsonish(d), "items": []})
    return {"items": items, "files": [(str(k), str(v)) for k, v in p.checkpoint_files.items()],
            "embedders": embedders,
            "sampler": [(str(k), _jsonish(v)) for k, v in p.sampler.items()],
            "extra": [(str(k), _jsonish(v)) for k, v in p.extra.items()]}


def _checkpoint_rows(cks: list[CheckpointResult], names: list[str], onset, keep) -> dict:
    cols = []
    for n in names:
        em0 = next((c.metrics[n] for c in cks if n in c.metrics), None)
        if any(n in c.metrics and c.metrics[n].memorization_ratio is not None for c in cks):
            cols.append((n, "memorization_ratio", "memorized"))
            if any(n in c.metrics and c.metrics[n].memorization_ratio_dedup is not None
                   and c.metrics[n].memorization_ratio_dedup != c.metrics[n].memorization_ratio for c in cks):
                cols.append((n, "memorization_ratio_dedup", "memorized, dups merged"))
        if any(n in c.metrics and c.metrics[n].replication_rate is not None for c in cks):
            cols.append((n, "replication_rate", "replicated"))
        if any(n in c.metrics and c.metrics[n].extraction_fraction is not None for c in cks):
            cols.append((n, "extraction_fraction", "extracted"))
        if em0 is not None and any(n in c.metrics and _f(c.metrics[n].top1_mean) is not None for c in cks):
            cols.append((n, "top1_mean", "top-1 sim" if em0.metric == "cosine" else "top-1 dist"))
    extra = [(k, t) for k, t in (("loss_gap", "loss gap"), ("membership_auc", "membership AUC"))
             if any(_f(getattr(c, k)) is not None for c in cks)]
    rows = []
    for i, c in enumerate(cks):
        vals = []
        for n, attr, _ in cols:
            em = c.metrics.get(n)
            v = getattr(em, attr, None) if em is not None else None
            if isinstance(v, Estimate):
                lo, hi = _f(v.low), _f(v.high)
                vals.append({"main": fmt_pct(v.value),
                             "sub": f"{fmt_pct(lo)}–{fmt_pct(hi)}" if lo is not None and hi is not None else ""})
            else:
                vals.append({"main": fmt_num(v), "sub": ""})
        vals += [{"main": fmt_num(getattr(c, k)), "sub": ""} for k, _ in extra]
        tags = []
        if c.step == onset:
            tags.append(("onset", "onset"))
        if c.step == keep:
            tags.append(("keep", "recommended"))
        rows.append({"anchor": f"ck{i}", "step": c.step, "path": c.path, "samples": f"{int(c.num_samples):,}",
                     "nonfinite": int(c.num_nonfinite or 0), "vals": vals, "tags": tags,
                     "has_gallery": any(em.top_matches for em in c.metrics.values())})
    heads = [{"emb": n, "what": w} for n, _, w in cols] + [{"emb": "", "what": t} for _, t in extra]
    return {"heads": heads, "rows": rows}


def _context(result: AuditResult, thumbs: _Thumbs, *, title, max_gallery, gallery_budget, max_rows) -> dict:
    cks = sorted(result.checkpoints, key=lambda c: c.step)
    on = result.onset
    keep_ck = next((c for c in cks if c.step == on.recommended_step), None)
    colors = _embedder_colors(cks)
    verdict = _verdict(result, cks)
    last = cks[-1] if cks else None
    e_last = signal_estimate(last, on.signal_metric, on.signal_embedder or None)[0] if last is not None else None
    risk = _risk_table(list(result.images), max_rows)
    level_words = {"copies": ("copies", "a copy rule's onset is confirmed"),
                   "fits": ("memorizes, no copies yet", f"fits its training images from step {fmt_step(on.fit_step)}"
                            if on.fit_step is not None else "fits its training images"),
                   "generalizes": ("generalizes", "no copies; membership and held-out comparison quiet")}
    if on.level == "generalizes" and verdict.get("status") != "ok":
        # nothing confirmed, but the last checkpoint shows copies or fit evidence: the card must not say "quiet"
        level_words["generalizes"] = ("not confirmed", "signs at the last checkpoint, not yet over "
                                      f"{int(on.patience)} consecutive checkpoints")
    cards = [
        ("Level", *level_words.get(on.level, ("—", "not assessed"))),
        ("Onset", f"step {fmt_step(on.onset_step)}" if on.onset_step is not None else "none",
         "first checkpoint of confirmed copying"),
        ("At last checkpoint", fmt_pct(e_last.value) if e_last is not None else "—",
         f"of samples copied (step {fmt_step(last.step)})" if last is not None else ""),
        ("Quality plateau", f"step {fmt_step(on.tau_gen)}" if on.tau_gen is not None else "—",
         "tau_gen; stop window empty" if on.window_empty else "tau_gen: start of the stop window"),
        ("Keep", f"step {fmt_step(keep_ck.step)}" if keep_ck is not None else
         (f"step {fmt_step(on.recommended_step)}" if on.recommended_step is not None else "none"),
         "recommended checkpoint"),
        ("Training images copied", f"{risk['n_copied']:,}" if result.images else "—",
         f"of {len(result.images):,} ({risk['n_outlier_copied']:,} outliers)" if result.images
         else "no per-image data"),
        ("Checkpoints", f"{len(cks):,}", f"steps {fmt_step(cks[0].step)}–{fmt_step(cks[-1].step)}" if cks else ""),
    ]
    galleries, capped = _galleries(cks, thumbs, onset=on.onset_step, keep=on.recommended_step,
                                   max_gallery=max_gallery, gallery_budget=gallery_budget)
    grid = [{"step": c.step, "tags": [w for w, hit in (("onset", c.step == on.onset_step),
                                                       ("tau_gen", c.step == on.tau_gen),
                                                       ("fits", c.step == on.fit_step),
                                                       ("recommended", c.step == on.recommended_step)) if hit],
             "thumbs": [thumbs.get("sample", p, f"sample {p} at step {c.step}", "not kept") for p in c.grid]}
            for c in cks if c.grid]
    sprites = thumbs.sprites()
    skipped = list(result.skipped)
    by_where: dict[str, int] = {}
    for s in skipped:
        by_where[s.where or "input"] = by_where.get(s.where or "input", 0) + 1
    prov = result.provenance
    run = prov.run if prov is not None and prov.run else ""
    page_title = title if title else (f"Memorization audit — {run}" if run else "Memorization audit")
    return {
        "title": page_title,
        "subtitle": (f"diffaudit {prov.diffaudit_version} · {prov.created}" if prov is not None else "diffaudit"),
        "verdict": verdict,
        "cards": cards,
        "charts": _charts(result, cks, colors),
        "chart_key": ([{"label": f"onset of copying (step {fmt_step(on.onset_step)})", "sw": _swatch(ONSET_COLOR)}]
                      if on.onset_step is not None else [])
        + ([{"label": f"fits its training images, memorizes without copying (from step {fmt_step(on.fit_step)})",
             "sw": _swatch(FIT_COLOR, "2 2")}] if on.fit_step is not None else [])
        + ([{"label": f"recommended checkpoint (step {fmt_step(on.recommended_step)})",
             "sw": _swatch(KEEP_COLOR, "4 3")}] if on.recommended_step is not None else [])
        + [{"label": "confidence interval", "sw": _swatch(REF_COLOR, kind="band")}],
        "ckpt_table": _checkpoint_rows(cks, list(colors), on.onset_step, on.recommended_step),
        "galleries": galleries,
        "grid": grid,
        "sprites": sprites,
        "gallery_capped": capped,
        "max_gallery": max_gallery,
        "risk": risk,
        "prompt_table": _prompt_rows(cks),
        "skipped": skipped[:1000],
        "skipped_total": len(skipped),
        "skipped_by_where": sorted(by_where.items()),
        "prov": _provenance(result),
        "onset": on,
        "onset_threshold": fmt_pct(on.threshold),
        "onset_confidence": fmt_pct(on.confidence),
    }


def _env():
    env = page_env()
    env.filters.update(step=fmt_step, num=fmt_num, pct=fmt_pct)
    return env
