"""Curator pages: duplicate clusters (``find_duplicates``) and nearest matches (``match``) as one HTML file each.

Self-contained: thumbnails are inlined PNG data URIs, styles are inline, the page carries a restrictive
Content-Security-Policy (no network, no external resources, no script) and every user-controlled string (ids, paths,
embedder names, sources, decode errors) goes through Jinja's autoescape (templates ``duplicates.html.j2`` and
``matches.html.j2`` on the ``page.html.j2`` layout).
"""
from __future__ import annotations

import math
import os
from typing import Optional

from ..data import as_imageset
from ..results import DuplicateReport, Matches
from ._html import Figures, render_page

MAX_SKIPPED_ROWS = 1000


def _fmt(x: Optional[float], metric: str = "l2") -> str:
    if x is None or not math.isfinite(x):
        return "–"
    return f"{x:.4f}" if metric == "cosine" else f"{x:.4g}"


def _check(**values) -> None:
    for name, (v, lo) in values.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise ValueError(f"{name}: expected an integer >= {lo}, got {v!r}")


def resolve_images(given, kept, source: str, what: str):
    """The images a page shows: those given, else those kept on the result, else the folder it came from."""
    if given is not None:
        return as_imageset(given, what)
    if kept is not None:
        return kept
    if source.startswith("folder:"):
        return as_imageset(source[len("folder:"):], what)
    raise ValueError(f"to_html needs the images: pass {what}=<the ImageSet> (the report came from {source or 'JSON'!r}"
                     ", which cannot be reopened)")


def render_duplicates(report: DuplicateReport, images=None, *, path: str | os.PathLike | None = None,
                      title: str | None = None, max_clusters: int = 200, max_per_cluster: int = 24,
                      thumb: int = 96, max_pairs: int = 500) -> str:
    """HTML for a :class:`~diffaudit.results.DuplicateReport`; ``images``: the ImageSet it was made from (default:
    the one kept by :func:`~diffaudit.curate.find_duplicates`, or the folder in ``report.source``).

    Shows key figures, the threshold rule, the ``max_clusters`` largest clusters (up to ``max_per_cluster``
    thumbnails each), the ``max_pairs`` closest pairs and the skipped files. Writes ``path`` when given.
    """
    _check(max_clusters=(max_clusters, 0), max_per_cluster=(max_per_cluster, 1), thumb=(thumb, 16),
           max_pairs=(max_pairs, 0))
    th = Figures(resolve_images(images, getattr(report, "_images", None), report.source, "images"), thumb)
    metric = report.metric
    unit = {"l2": "distance", "cosine": "cosine similarity"}.get(metric, "score (its unit: see 'compared')")
    pair_score = {frozenset((p.id_a, p.id_b)): p.score for p in report.pairs}
    clusters = []
    for members in report.clusters[:max_clusters]:
        scores = [pair_score[key] for key in (frozenset((a, b)) for i, a in enumerate(members)
                                              for b in members[i + 1:]) if key in pair_score]
        rng = ""
        if scores and metric in ("l2", "cosine"):  # a union of embedders mixes units: no range
            lo, hi = min(scores), max(scores)
            rng = f"{unit} {_fmt(lo, metric)}" + (f" – {_fmt(hi, metric)}" if hi != lo else "")
        clusters.append({"size": len(members), "range": rng, "more": len(members) - max_per_cluster,
                         "figures": [th.figure(m) for m in members[:max_per_cluster]]})
    pairs = [{"a": p.id_a, "b": p.id_b, "score": _fmt(p.score, metric),
              "how": {"": "as is", "hflip": "A mirrored"}.get(p.transform, p.transform)}
             for p in report.pairs[:max_pairs]]
    return render_page(
        "duplicates.html.j2", title=title or "Duplicate images",
        subtitle=f"{report.source or 'image set'} · {report.embedder}", thumb=thumb, path=path, r=report,
        unit=unit, rule=report.threshold_rule or _fmt(report.threshold, metric), clusters=clusters, pairs=pairs,
        more_pairs=max(0, len(report.pairs) - max_pairs), skipped=report.skipped[:MAX_SKIPPED_ROWS],
        more_skipped=max(0, len(report.skipped) - MAX_SKIPPED_ROWS))


def render_matches(matches: Matches, queries=None, reference=None, *, path: str | os.PathLike | None = None,
                   title: str | None = None, max_rows: int = 200, thumb: int = 96) -> str:
    """HTML for :class:`~diffaudit.results.Matches`: each query beside its nearest reference images.

    Queries closer to a reference image than 95% of reference images are to their own nearest neighbour are
    flagged and listed first. Writes ``path`` when given.
    """
    _check(max_rows=(max_rows, 0), thumb=(thumb, 16))
    tq = Figures(resolve_images(queries, getattr(matches, "_queries", None), matches.query_source, "queries"), thumb)
    tr = Figures(resolve_images(reference, getattr(matches, "_reference", None), matches.reference_source,
                                "reference"), thumb)
    metric = matches.metric
    flagged = set(matches.closer_than_baseline())

    def closeness(i: int) -> float:
        s = matches.scores[i]
        return math.inf if not s else (s[0] if metric == "l2" else -s[0])

    order = sorted(range(len(matches.query_ids)), key=lambda i: (matches.query_ids[i] not in flagged, closeness(i), i))
    rows = []
    for i in order[:max_rows]:
        qid = matches.query_ids[i]
        flag = qid in flagged
        rows.append({"flag": flag,
                     "query": tq.figure(qid, ["query"] + (["closer than baseline"] if flag else [])),
                     "refs": [tr.figure(rid, [f"#{rank + 1}", _fmt(s, metric)]) for rank, (rid, s)
                              in enumerate(zip(matches.reference_ids[i], matches.scores[i]))]})
    b = matches.baseline
    baseline = None if b is None else {k: _fmt(getattr(b, k), metric) for k in ("mean", "p05", "p50", "p95")}
    return render_page(
        "matches.html.j2", title=title or "Nearest matches",
        subtitle=f"{matches.query_source or 'queries'} → {matches.reference_source or 'reference'} · {matches.embedder}",
        thumb=thumb, path=path, m=matches, unit="distance" if metric == "l2" else "cosine similarity",
        n_flagged=len(flagged), baseline=baseline, rows=rows, total=len(order),
        skipped=matches.skipped[:MAX_SKIPPED_ROWS], more_skipped=max(0, len(matches.skipped) - MAX_SKIPPED_ROWS))
