"""Curator API: duplicates inside an image set, and nearest reference images for a set of queries.

``find_duplicates(images)`` embeds the set, finds each image's ``k`` nearest other images with an exact
:class:`~diffaudit.index.EmbeddingIndex` (IVF above 200k images, candidates re-scored exactly), keeps the pairs within
the duplicate threshold and groups them into clusters (connected components). ``match(queries, reference)`` returns
each query's ``k`` nearest reference images, beside the reference set's own nearest-neighbour baseline (how close
distinct reference images are to each other), so a score can be read against what "close" means in that set.

Default duplicate thresholds (override with ``threshold=`` in the embedder's score units):

* **cosine embedders** use their literature threshold. SSCD: **0.75** -- Pizzi et al. 2022 ("A Self-Supervised
  Descriptor for Image Copy Detection", CVPR) report that a cosine similarity of 0.75 gives about 90% precision for
  copy detection. Somepalli et al. 2023 use 0.5 to count *replication* by a generator (a lenient, recall-oriented
  rule for samples); curators deleting or merging training images need precision, so duplicates use 0.75.
  CLIP: the embedder's near-duplicate threshold (0.95). Other cosine embedders without a default need ``threshold=``.
* **pixel / tiled (L2)**: there is no literature threshold for pixel L2 duplicates, so the default combines an
  absolute and a relative bound and takes the stricter::

      t_abs = RMS difference of 10**(-30/20) = 0.0316 (pixels in [0, 1]), i.e. PSNR >= 30 dB
              pixel: t_abs * sqrt(dim) in L2 units; tiled: 0.0316 on the max-over-tiles RMS (Carlini et al.)
      t_rel = (1/3) * median over images of r_a, where r_a is the distance from image a to its nearest
              neighbour that is NOT within t_abs (its nearest *distinct* image)
      threshold = min(t_abs, t_rel)

  PSNR 30 dB is the lower end of what lossy compression of 8-bit images is held to (typical PSNR 30..50 dB), so two
  images are called duplicates when they differ no more than a lossy re-encoding does. The relative bound is Gu et
  al.'s 1/3 ratio ("On Memorization in Diffusion Models", 2023) applied to the set's typical distance between
  distinct neighbours; it only binds for sets whose distinct images are unusually alike (e.g. near-uniform scans),
  where a fixed PSNR would merge distinct images. Exact copies (distance 0) are always duplicates. Other L2 embedders
  use ``t_rel`` alone (r_a = nearest neighbour at distance > 0). The chosen value and rule are in the report.

  *Structure guard* (pixel, default rule only): a pair also needs a distance of at most 1/3 of each image's own
  contrast (its L2 distance to its own mean grey level). Smooth look-alikes -- patches of sky, flat backgrounds --
  differ by less than a JPEG re-encoding does in absolute terms, yet by as much as their whole structure; they are
  not duplicates. Identical images (distance 0) always are.

Pixel duplicates are compared the way a curator means "the same image" (``invariances``, default for the pixel
embedder ``("brightness", "hflip")``):

* ``"brightness"``: each image's mean grey level (the mean over all pixels and channels) is subtracted from its
  vector first, so a uniform brightness shift costs nothing; distances, the threshold rule and the reported scores
  are all on these mean-centred vectors. Two blank images of different brightness are then duplicates.
* ``"hflip"``: each image is also compared mirrored left-right; a pair's score is the smaller of the two distances
  (``DuplicatePair.transform == "hflip"`` when the mirrored one is smaller). The threshold rule uses the direct
  (unmirrored) distances only.

``invariances=()`` compares raw pixels. Crops and shifts still need SSCD (or CLIP). The audit's pixel metrics (Gu et
al.'s ratio and friends) never use these invariances: they are defined on raw pixels.

Ratio rule (``ratio=``, e.g. 0.5; the configuration for photographs): instead of one threshold for the whole set,
each image's own neighbours decide. b is a duplicate of a when b comes before the first gap in a's neighbour
distances (``d_j <= ratio * d_(j+1)``) and within a loose cap (pixel: PSNR >= 20 dB; cosine: >= 0.5; or the given
``threshold``). A copy stands out from an image's other neighbours; look-alikes (patches of one texture, smooth
regions) are all about as close as the next and give no pair. Measured on photographs with six kinds of planted
copies in ``benchmarks/bench_photos.py``.

Verified rule (``verify=True`` or a correlation in (0, 1]; the configuration for photographs, with SSCD): the
embedder only proposes candidates -- each image's ``VERIFY_NEIGHBOURS`` nearest other images, and further neighbours
in order for as long as they verify (so clusters of copies are listed whole) -- and a candidate is a duplicate when
the two images' pixels agree once aligned: :func:`diffaudit.metrics.alignment.aligned_similarities` (band-passed
normalized cross-correlation, searched over crops of 50-100%, rescaling and a mirror) >= ``ALIGN_THRESHOLD`` (0.96).
A descriptor says that two images look alike, which distinct patches of one texture or one smooth region do too; the
alignment asks whether one is the other after a crop, resize, brightness change or mirror. Lossy re-encodings lower
the correlation of some (JPEG at quality 30 of a small patch: 0.55-0.99) and a crop resized back to full size scores
0.94-0.96 (resampled twice): both are under the cut. The measured configuration for photographs is the union of
the verified rule on two embedders' candidates, pixel (re-encodings, brightness, mirrors) and SSCD (crops)
(``diffaudit dedup --preset photos``: ``-e pixel -e sscd:distilled --rule verify``, each pair aligned once for
both); figures in
``benchmarks/bench_photos.py`` and the README. Byte-identical files and images with equal pixels are
always duplicates. Flat images (no detail left after the band-pass) are never verified.

Search (pixel embedder): coarse to fine, exact. Candidates come from vectors average-pooled to about
``COARSE_SIDE`` pixels on a side (p x p blocks); pooling shrinks every L2 distance at least p-fold
(Cauchy-Schwarz: each pooled difference is the mean of p*p differences), so all pairs within ``t`` at full
resolution are among the pooled pairs within ``t / p``; those are re-scored exactly at full resolution. The
nearest-distinct distance of the threshold rule is certified the same way (a candidate closer than p times the
pooled distance of the last candidate is the true nearest; uncertain rows are searched again with 4x more
candidates). The result equals a brute-force comparison of all pairs; above 200k images the pooled search is IVF
(approximate, candidates re-scored exactly).
"""
from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import numpy as np

from .data import as_imageset
from .results import DuplicatePair, DuplicateReport, Matches, ScoreSummary, Skipped

__all__ = ["DuplicatePair", "DuplicateReport", "Matches", "ScoreSummary", "duplicate_pairs", "duplicate_threshold",
           "find_duplicates", "match", "ratio_pairs", "verified_pairs", "combine_duplicates"]

log = logging.getLogger(__name__)

#: PSNR (dB) above which two images count as pixel duplicates (absolute bound of the L2 default)
DUPLICATE_PSNR_DB = 30.0
#: Gu et al. 2023's ratio, used as the relative bound of the L2 default
RELATIVE_RATIO = 1.0 / 3.0
#: duplicate thresholds of embedder families without their own ``duplicate_threshold`` (cosine, score units)
FAMILY_DUPLICATE_THRESHOLDS = {"sscd": (0.75, "SSCD, Pizzi et al. 2022: ~90% copy-detection precision")}
#: comparisons the pixel duplicate finder can make invariant (module docstring)
INVARIANCES = ("brightness", "hflip")
#: the pixel embedder's default invariances
PIXEL_INVARIANCES = ("brightness", "hflip")
#: structure guard of the default pixel rule: a pair's distance must also be at most this fraction of each image's
#: own contrast (its distance to its own mean grey level), so smooth look-alikes are not duplicates of each other
STRUCTURE_RATIO = 1.0 / 3.0
#: candidates each image always has verified (``verify=``); further neighbours are tried while they verify
VERIFY_NEIGHBOURS = 3
#: the coarse search of pixel duplicates runs on vectors average-pooled to about this many pixels on a side
COARSE_SIDE = 8


# ---------------------------------------------------------------------------------------------------- helpers
def _skipped(emb, where: str) -> list[Skipped]:
    return [Skipped(str(i), str(r), where) for i, r in emb.skipped]


def _is_tiled(emb) -> bool:
    """Carlini's tiled layout: the L2 threshold is on the max-over-tiles RMS distance."""
    return getattr(emb, "kind", None) == "tiled"


def _is_pixel(emb) -> bool:
    """The plain pixel embedder (HWC vectors at ``emb.size``), not the tiled one."""
    return getattr(emb, "kind", None) == "pixel"


def duplicate_threshold(embedder, scores, *, dim: int | None = None) -> float:
    """The default duplicate threshold (module docstring) for ``embedder`` given the set's neighbour scores.

    ``scores``: (n,) nearest-other-image scores, or (n, k) scores of each image's k nearest other images, ascending
    distances (l2) / descending similarities (cosine), as :func:`diffaudit.index.self_neighbors` returns them (tiled:
    re-scored with tiled L2). More columns let the relative bound skip past near-duplicates to the nearest distinct
    image. ``dim``: vector dimension (default: ``embedder.dim``). Used by ``find_duplicates`` and the audit.
    """
    from .embedders import get_embedder

    emb = get_embedder(embedder)
    S = np.asarray(scores, dtype=np.float64)
    if S.ndim == 1:
        S = S[:, None]
    d = dim if dim is not None else getattr(emb, "dim", None)
    return _duplicate_threshold(emb, emb.metric, int(d or 0), S)[0]


def _duplicate_threshold(emb, metric: str, dim: int, S: np.ndarray) -> tuple[float, str]:
    """Default threshold and its rule text (see module docstring) from the embedder and neighbour scores (n, k)."""
    if metric == "cosine":
        name = str(getattr(emb, "name", ""))
        if getattr(emb, "duplicate_threshold", None) is not None:
            t = float(emb.duplicate_threshold)
            why = getattr(emb, "duplicate_threshold_source", "") or "embedder's duplicate_threshold"
            return t, f"cosine >= {t:g} ({why})"
        family = FAMILY_DUPLICATE_THRESHOLDS.get(getattr(emb, "family", ""))
        if family is not None:
            return family[0], f"cosine >= {family[0]:g} ({family[1]})"
        if getattr(emb, "default_threshold", None) is not None:
            t = float(emb.default_threshold)
            return t, f"cosine >= {t:g} (embedder's default threshold)"
        raise ValueError(f"embedder {name!r} has no default duplicate threshold; pass threshold=<cosine similarity>")
    if getattr(emb, "default_threshold", None) is not None:
        t = float(emb.default_threshold)
        return t, f"distance <= {t:g} (embedder's default threshold)"
    rms = 10 ** (-DUPLICATE_PSNR_DB / 20)
    t_abs = None
    if _is_tiled(emb):
        t_abs, unit = rms, "max-over-tiles RMS"
    elif _is_pixel(emb) and dim > 0:
        t_abs, unit = rms * math.sqrt(dim), "L2"
    floor = t_abs if t_abs is not None else 0.0
    finite = np.isfinite(S)
    beyond = finite & (S > floor)
    has = beyond.any(axis=1)
    t_rel = None
    if has.any():
        first = S[has, np.argmax(beyond[has], axis=1)]
        t_rel = RELATIVE_RATIO * float(np.median(first))
    parts = []
    if t_abs is not None:
        parts.append(f"PSNR >= {DUPLICATE_PSNR_DB:g} dB ({unit} {t_abs:.4g})")
    if t_rel is not None:
        parts.append(f"1/3 x median distance to the nearest distinct image ({t_rel:.4g})")
    cands = [t for t in (t_abs, t_rel) if t is not None]
    if not cands:
        return 0.0, "exact copies only (no distinct neighbours to calibrate on)"
    t = min(cands)
    return t, "distance <= min(" + ", ".join(parts) + f") = {t:.4g}"


# ---------------------------------------------------------------------------------------------------- API
def find_duplicates(images, embedder: Any = "pixel", threshold: float | None = None, *, k: int = 10,
                    cache_dir=None, progress: bool = False, backend: str = "local",
                    invariances: Sequence[str] | None = None, ratio: float | None = None,
                    verify: bool | float | None = None) -> DuplicateReport:
    """Duplicate pairs and clusters in an image set.

    Args:
        images: an ImageSet (or a folder path, or uint8 image arrays).
        embedder: an Embedder or spec (``"pixel"``, ``"tiled"``, ``"sscd"``, ``"clip:<arch>"``, ...), or a list of
            them: the union of the pairs each finds with the same rule (:func:`combine_duplicates`); with
            ``verify=`` the images are loaded and each pair is aligned once for all of them.
        threshold: in score units (L2 distance: pairs with distance <= threshold; cosine: similarity >= threshold).
            None: the default of the module docstring (SSCD 0.75; pixel: PSNR >= 30 dB capped by 1/3 of the typical
            distance between distinct neighbours).
        k: candidates examined per image per round. Rows whose candidates could all be duplicates (or, for the
            pixel threshold rule, whose nearest distinct image is not certain yet) are searched again with 4x more,
            so clusters larger than ``k`` are listed completely. The pixel search is exact whatever ``k`` is.
        cache_dir: embedding cache root (default ``$DIFFAUDIT_CACHE`` or ``~/.cache/diffaudit``).
        progress: show a progress bar while embedding.
        backend: ``"local"``, or another embedding backend that :func:`diffaudit.embedders.embed` accepts.
        invariances: pixel embedder only: any of ``"brightness"`` and ``"hflip"`` (module docstring); default
            both. ``()`` compares raw pixels.
        ratio: the ratio rule instead of a fixed threshold (module docstring, "Ratio rule"; e.g. 0.5): b is a
            duplicate of a when b comes before the first gap in a's neighbour distances (``d_j <= ratio *
            d_{j+1}``) and within a loose cap (``threshold`` when given). Robust to sets of look-alike images
            (textures, smooth regions of photographs), where no fixed threshold separates copies from neighbours.
        verify: the verified rule (module docstring) instead of a threshold: ``True`` (aligned correlation >=
            ``ALIGN_THRESHOLD``, 0.96) or a correlation in (0, 1]. Needs the images (not precomputed Embeddings).
    """
    if isinstance(embedder, (list, tuple)):
        if not embedder:
            raise ValueError("embedder: give an embedder, a spec, or a non-empty list of them")
        if threshold is not None and len(embedder) > 1:
            raise ValueError("threshold= is in one embedder's units: give it with a single embedder")
        if len(embedder) > 1 and not isinstance(images, (str, bytes)) and hasattr(images, "embedder"):
            raise ValueError("embedder: a list needs the images, not one embedder's precomputed Embeddings")
        from .embedders import get_embedder

        images = images if hasattr(images, "embedder") else as_imageset(images, "images")
        min_ncc = _check_verify(verify)  # before any decoding or embedding, as are the embedders (weights, ...)
        embs = [get_embedder(e) for e in embedder]
        shared = _Verifier(images) if min_ncc is not None else None
        return combine_duplicates([_find_one(images, e, threshold, k, cache_dir, progress, backend, invariances,
                                             ratio, verify, shared) for e in embs])
    return _find_one(images, embedder, threshold, k, cache_dir, progress, backend, invariances, ratio, verify, None)


def _find_one(images, embedder, threshold, k, cache_dir, progress, backend, invariances, ratio, verify, shared):
    """find_duplicates for one embedder; ``shared``: a :class:`_Verifier` of the images, reused across embedders."""
    from .embedders import Embeddings, get_embedder
    from .index import duplicate_groups

    embed = _embed_fn(backend)
    _check_search_args(k, threshold)
    if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float))
                              or not 0.0 < float(ratio) < 1.0):
        raise ValueError(f"ratio={ratio!r} must be a number in (0, 1) (e.g. 0.5), or None for a fixed threshold")
    if ratio is not None and verify not in (None, False):
        raise ValueError("ratio= and verify= are two different rules; give one (combine reports with "
                         "combine_duplicates)")
    min_ncc = _check_verify(verify)
    pre = images if isinstance(images, Embeddings) else None
    if pre is not None and min_ncc is not None:
        raise ValueError("verify= compares the images' pixels: pass the images (an ImageSet or folder), not "
                         "precomputed Embeddings")
    images = None if pre is not None else as_imageset(images, "images")
    emb = _embedder_of(pre, embedder) if pre is not None else get_embedder(embedder)
    inv = _check_invariances(invariances, _is_pixel(emb), emb)
    _check_threshold(threshold, emb.metric)
    same_file: list[str] = []
    if pre is not None:
        E = pre
    else:
        E, same_file = _embed_distinct_files(images, emb, embed, cache_dir, progress)
    n = len(E)
    metric = E.metric
    skipped = _skipped(E, "images")
    source = images.source if images is not None else f"Embeddings({E.embedder}, n={n})"
    if n < 2:
        return _attach(DuplicateReport([], [], None if threshold is None else float(threshold), E.embedder, metric,
                                       n, skipped, "fewer than two images", int(k), source, list(inv)),
                       _images=images)
    if min_ncc is not None:  # a progress bar of its own (the longest part)
        pair_scores, t, rule = verified_pairs(E, emb, images, min_ncc, k=int(k), cap=threshold, invariances=inv,
                                              same_file=same_file, progress=progress, _verifier=shared)
    else:
        with _status(progress, f"searching {n:,} images for duplicates"):
            if ratio is not None:
                pair_scores, t, rule = ratio_pairs(E, emb, ratio, k=int(k), cap=threshold, invariances=inv)
            else:
                pair_scores, t, rule = duplicate_pairs(E, emb, k=int(k), threshold=threshold, invariances=inv)
    if same_file:  # byte-identical files: embedded once, and named as such
        n_same = 0
        for (a, b), (score, _) in list(pair_scores.items()):
            if same_file[a] == same_file[b]:
                pair_scores[(a, b)] = (score, "identical file")
                n_same += 1
        rule += f"; byte-identical files embedded once ({n_same} pair(s) of identical files)"
    ab = np.asarray(list(pair_scores), dtype=np.int64).reshape(-1, 2)
    labels = duplicate_groups(n, ab[:, 0], ab[:, 1])
    groups: dict[int, list[int]] = {}
    for x in sorted({x for pair in pair_scores for x in pair}):
        groups.setdefault(int(labels[x]), []).append(x)
    clusters = sorted(groups.values(), key=lambda g: (-len(g), g[0]))
    ids = E.ids
    sign = 1.0 if metric == "l2" else -1.0
    pairs = [DuplicatePair(ids[a], ids[b], s, tr) for (a, b), (s, tr) in
             sorted(pair_scores.items(), key=lambda kv: (sign * kv[1][0], kv[0]))]
    report = DuplicateReport(pairs, [[ids[i] for i in g] for g in clusters], t, E.embedder, metric, n, skipped,
                             rule, int(k), source, list(inv))
    log.info("find_duplicates: %d images, %d pairs, %d clusters (%s)", n, len(pairs), len(clusters), rule)
    return _attach(report, _images=images)


def combine_duplicates(reports: Sequence[DuplicateReport]) -> DuplicateReport:
    """One report from several ``find_duplicates`` runs over the same images (e.g. pixel for re-encodings, SSCD for
    crops): the union of their pairs, clusters recomputed as connected components. A pair keeps the score of the
    first report that found it (scores of different embedders are in different units: ``transform`` names the
    embedder and its score); ``threshold_rule`` joins the rules. The ImageSet of the first report is kept for
    ``to_html``."""
    from .index import duplicate_groups

    reports = list(reports)
    if not reports:
        raise ValueError("reports: give at least one DuplicateReport")
    if len(reports) == 1:
        return reports[0]
    n = reports[0].num_images
    if any(r.num_images != n for r in reports):
        raise ValueError(f"reports: made from different image sets ({[r.num_images for r in reports]} images)")
    images = getattr(reports[0], "_images", None)
    order: dict[str, int] = {}
    if images is not None:
        order = {i: k for k, i in enumerate(images.ids)}
    found: dict[tuple[str, str], DuplicatePair] = {}
    for r in reports:
        for p in r.pairs:
            key = (p.id_a, p.id_b) if p.id_a <= p.id_b else (p.id_b, p.id_a)
            if key not in found:
                unit = "L2" if r.metric == "l2" else "cosine"
                tr = f"{r.embedder} {unit} {p.score:.4g}" + (f", {p.transform}" if p.transform else "")
                found[key] = DuplicatePair(p.id_a, p.id_b, p.score, tr)
    ids = sorted({i for k in found for i in k}, key=lambda i: (order.get(i, len(order)), i))
    pos = {i: k for k, i in enumerate(ids)}
    ab = np.asarray([(pos[a], pos[b]) for a, b in found], dtype=np.int64).reshape(-1, 2)
    labels = duplicate_groups(len(ids), ab[:, 0], ab[:, 1]) if len(ids) else np.zeros(0, np.int64)
    groups: dict[int, list[str]] = {}
    for i in ids:
        groups.setdefault(int(labels[pos[i]]), []).append(i)
    clusters = sorted(groups.values(), key=lambda g: (-len(g), order.get(g[0], 0), g[0]))
    skipped = list(reports[0].skipped)
    rule = " | ".join(f"{r.embedder}: {r.threshold_rule}" for r in reports)
    out = DuplicateReport(list(found.values()), clusters, None, "+".join(r.embedder for r in reports), "mixed", n,
                          skipped, f"union of {len(reports)} rules: " + rule, reports[0].k, reports[0].source,
                          sorted({x for r in reports for x in r.invariances}))
    return _attach(out, _images=images)


def _embedder_of(E, embedder):
    """The embedder precomputed Embeddings were made with: ``embedder`` when it names the same embedder (its
    ``name`` equals ``E.embedder``); a ``pixel-HxW`` name is rebuilt from the name itself."""
    from .embedders import get_embedder

    def same(emb) -> bool:  # names of data-sized embedders end in "-auto" until they have seen images
        n = str(emb.name)
        return n == E.embedder or (n.endswith("-auto") and str(E.embedder).startswith(n[: -len("auto")]))

    if embedder is not None and not (isinstance(embedder, str) and embedder == "pixel"):
        emb = get_embedder(embedder)
        if not same(emb):
            raise ValueError(f"embedder={getattr(emb, 'name', embedder)!r} does not match the precomputed "
                             f"embeddings, made by {E.embedder!r}")
        return emb
    import re

    m = re.fullmatch(r"pixel-(\d+)x(\d+)(?:-.*)?", str(E.embedder))
    if m:
        emb = get_embedder(f"pixel:{m.group(1)}x{m.group(2)}" if m.group(1) != m.group(2) else f"pixel:{m.group(1)}")
        if emb.name == E.embedder:
            return emb
    emb = get_embedder(embedder or "pixel")
    if not same(emb):
        raise ValueError(f"precomputed embeddings made by {E.embedder!r}: pass embedder= the same embedder "
                         "(object or spec) so its duplicate rule applies")
    return emb


def _embed_distinct_files(images, emb, embed, cache_dir, progress):
    """Exact-bytes pre-pass: byte-identical files (the same content hash, :meth:`ImageSet.item_keys`) are decoded and
    embedded once; every copy gets its representative's vector (or its skip reason). Returns (Embeddings of the whole
    set, content key per row -- [] when no two files share their bytes)."""
    from .embedders import Embeddings
    from .results import Skipped

    keys = images.item_keys()
    first: dict[str, int] = {}
    for i, key in enumerate(keys):
        first.setdefault(key, i)
    if len(first) == len(keys):
        return embed(images, emb, cache_dir=cache_dir, progress=progress), []
    ids = list(images.ids)
    reps = sorted(first.values())
    R = embed(images.subset(reps), emb, cache_dir=cache_dir, progress=progress)
    row_of = {id_: r for r, id_ in enumerate(R.ids)}
    why = {s.id: s.reason for s in R.skipped}
    listed = set(ids)
    rows, out_ids, out_keys = [], [], []
    skipped = [x for x in getattr(images, "skipped", []) if x.id not in listed]  # left out by the scan itself
    for i, key in enumerate(keys):
        rep = ids[first[key]]
        if rep in row_of:
            rows.append(row_of[rep])
            out_ids.append(ids[i])
            out_keys.append(key)
        else:
            reason = why.get(rep, "not embedded")
            skipped.append(Skipped(ids[i], reason if i == first[key] else f"{reason} (same bytes as {rep})"))
    vectors = np.asarray(R.vectors)[np.asarray(rows, dtype=np.int64)] if rows else np.zeros((0, R.dim), np.float32)
    return Embeddings(out_ids, vectors, R.embedder, R.metric, skipped), out_keys


def _check_verify(verify) -> float | None:
    """verify= -> the correlation cut (None: no verification)."""
    if verify is None or verify is False:
        return None
    from .metrics.alignment import ALIGN_THRESHOLD
    if verify is True:
        return ALIGN_THRESHOLD
    if isinstance(verify, (int, float)) and not isinstance(verify, bool) and 0.0 < float(verify) <= 1.0:
        return float(verify)
    raise ValueError(f"verify={verify!r}: give True (aligned correlation >= {ALIGN_THRESHOLD:g}) or a correlation "
                     "in (0, 1]")


def _neighbour_lists(E, emb, kk: int, inv: tuple[str, ...]):
    """Each row's kk nearest other rows in the embedder's space, nearest first: (D distances (n, kk), I (n, kk),
    transform names or None); missing neighbours are -1."""
    if _is_pixel(emb):
        return _pixel_knn(E.vectors, tuple(emb.size), kk, inv)
    from .index import EmbeddingIndex, rescore, self_neighbors

    index = EmbeddingIndex.from_embeddings(E, kind="auto")
    if getattr(emb, "rescores", False):
        S, I = self_neighbors(index, min(len(E) - 1, max(4 * kk, kk + 8)))
        S, I = rescore(index, emb.distance, E.vectors, I, kk)
    else:
        S, I = self_neighbors(index, min(len(E) - 1, kk))
    return (S if E.metric == "l2" else 1.0 - S), I, None


def verified_pairs(E, embedder, images, min_ncc: float, *, k: int = 10, cap: float | None = None,
                   invariances: Sequence[str] | None = None, same_file: Sequence[str] = (), progress: bool = False,
                   _verifier: "_Verifier | None" = None):
    """The verified rule (module docstring) on embeddings ``E`` of ``images`` (the same rows, in order):
    ``({(a, b): (score, transform)}, cap, rule)``. Candidates are each row's ``VERIFY_NEIGHBOURS`` nearest
    neighbours, then its next ones (up to ``k``) while they verify; ``cap`` (score units) bounds the candidates."""
    from .embedders import get_embedder
    from .metrics.alignment import ALIGN_COVERAGES, ALIGN_MIN_SIDE

    emb = get_embedder(embedder)
    _check_search_args(k, cap)
    inv = _check_invariances(invariances, _is_pixel(emb), emb)
    n = len(E)
    if n < 2:
        return {}, cap, "fewer than two images"
    ver = _verifier if _verifier is not None else _Verifier(images, E.ids)
    kk = min(max(int(k), VERIFY_NEIGHBOURS), n - 1)
    D, I, tr = _neighbour_lists(E, emb, kk, inv)
    D = np.asarray(D, np.float64)
    metric = E.metric
    cap_d = math.inf if cap is None else (cap if metric == "l2" else 1.0 - cap)
    pos = ver.positions(E.ids)  # row of E -> position in the verifier's image list
    digests = [ver.digests[p] for p in pos]
    key = lambda a, b: (a, b) if a < b else (b, a)  # noqa: E731

    def usable(a: int, j: int) -> bool:
        return I[a, j] >= 0 and D[a, j] <= cap_d

    first = sorted({key(a, int(I[a, j])) for a in range(n) for j in range(min(VERIFY_NEIGHBOURS, kk))
                    if usable(a, j) and digests[a] != digests[int(I[a, j])]})
    from ._progress import task_bar

    with task_bar(progress, "verifying candidate pairs", len(first)) as advance:
        asked: set[tuple[int, int]] = set()

        def check(pairs: list[tuple[int, int]]) -> None:
            asked.update(pairs)
            ver.check([(pos[a], pos[b]) for a, b in pairs], advance)

        check(first)
        alive = np.ones(n, bool)  # rows still walking their neighbour list
        pair_scores: dict[tuple[int, int], tuple[float, str]] = {}
        for j in range(kk):
            rows = [a for a in np.nonzero(alive)[0].tolist() if usable(a, j)]
            if not rows:
                break
            cand = [key(a, int(I[a, j])) for a in rows]
            check([c for c in cand if digests[c[0]] != digests[c[1]]])
            ok = np.zeros(n, bool)
            for a, c in zip(rows, cand):
                identical = digests[c[0]] == digests[c[1]]
                v = 1.0 if identical else ver.score(pos[c[0]], pos[c[1]])
                if v < min_ncc:
                    continue
                ok[a] = True
                if c not in pair_scores:
                    s = float(D[a, j]) if metric == "l2" else float(1.0 - D[a, j])
                    t_name = (("identical file" if same_file and same_file[c[0]] == same_file[c[1]] else
                               "equal pixels") if identical else f"aligned {v:.3f}")
                    if tr is not None and tr[a, j]:
                        t_name += f", {tr[a, j]}"
                    pair_scores[c] = (s, t_name)
            if j + 1 >= VERIFY_NEIGHBOURS:
                alive &= ok
    lo = int(round(100 * min(ALIGN_COVERAGES)))
    rule = (f"verified: each image's {VERIFY_NEIGHBOURS} nearest neighbours (and the next ones while they verify, up "
            f"to {kk}) are duplicates when their aligned pixels correlate >= {min_ncc:g} (band-passed NCC over crops "
            f"of {lo}-100%, rescaling and a mirror; {len(asked)} pair(s) compared)")
    blind = sum(1 for a, b in asked if ver.score(pos[a], pos[b]) <= -1.0)
    if blind:
        rule += (f"; {blind} candidate pair(s) had nothing to align (flat images, or smaller than "
                 f"{ALIGN_MIN_SIDE} px) and count only when their pixels are equal")
    if cap is not None:
        rule += f"; candidates within {cap:g} (given)"
    if inv:
        rule += "; " + "; ".join(_INV_TEXT[x] for x in inv)
    return pair_scores, cap, rule


class _Verifier:
    """The images' grey working copies (uint8, longer side at most 2 x ALIGN_SIDE), a digest of each image's decoded
    pixels (equal digests: equal images) and the aligned similarities computed so far: one per image set, shared by
    the verified rule of several embedders. An image that does not decode is a flat view (never verified)."""

    def __init__(self, images, ids: Sequence[str] | None = None):
        import hashlib

        from .metrics.alignment import Aligner, align_view

        self.ids = list(images.ids if ids is None else ids)
        self._pos = {i: p for p, i in enumerate(self.ids)}
        at = {i: p for p, i in enumerate(images.ids)}
        views: dict[str, tuple[np.ndarray, bytes]] = {}
        for bids, imgs in images.iter_batches(256, indices=sorted(at[i] for i in self.ids)):
            for i, a in zip(bids, imgs):
                a = np.ascontiguousarray(a)
                views[i] = (align_view(a), hashlib.blake2b(a.tobytes() + repr(a.shape).encode(),
                                                           digest_size=16).digest())
        flat = np.zeros((1, 1), np.uint8)
        got = [views.get(i, (flat, f"missing:{i}".encode())) for i in self.ids]
        self.digests = [g[1] for g in got]
        self._aligner = Aligner([g[0] for g in got])
        self._done: dict[tuple[int, int], float] = {}

    def positions(self, ids: Sequence[str]) -> list[int]:
        return [self._pos[i] for i in ids]

    def check(self, pairs, advance=lambda n: None) -> None:
        """Align the pairs (positions) not aligned yet, 256 at a time."""
        todo = sorted({(a, b) if a < b else (b, a) for a, b in pairs} - self._done.keys())
        for s0 in range(0, len(todo), 256):
            chunk = todo[s0:s0 + 256]
            for p, v in zip(chunk, self._aligner.scores(chunk)):
                self._done[p] = float(v)
            advance(len(chunk))

    def score(self, a: int, b: int) -> float:
        return self._done[(a, b) if a < b else (b, a)]


def _check_search_args(k, threshold) -> None:
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer; got {k!r}")
    if threshold is not None and not (isinstance(threshold, (int, float)) and math.isfinite(threshold)):
        raise ValueError(f"threshold must be a finite number or None; got {threshold!r}")


def _check_threshold(threshold, metric: str) -> None:
    if threshold is None:
        return
    if metric == "l2" and threshold < 0:
        raise ValueError(f"threshold={threshold!r}: an L2 distance threshold must be >= 0 (0 = exact copies only)")
    if metric == "cosine" and not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold={threshold!r}: a cosine-similarity threshold must be in [-1, 1]")


def duplicate_pairs(E, embedder, *, k: int = 10, threshold: float | None = None,
                    invariances: Sequence[str] | None = None):
    """The duplicate search of :func:`find_duplicates` on embeddings ``E`` made by ``embedder``: returns
    ``({(a, b): (score, transform)}, threshold, rule)`` with row numbers ``a < b`` of ``E``. The audit's duplicate
    counts use it on the training set, so they are the clusters ``find_duplicates`` reports."""
    from .embedders import get_embedder

    emb = get_embedder(embedder)
    _check_search_args(k, threshold)
    inv = _check_invariances(invariances, _is_pixel(emb), emb)
    if len(E) < 2:
        return {}, (None if threshold is None else float(threshold)), "fewer than two images"
    if _is_pixel(emb):
        return _pixel_duplicates(E.vectors, tuple(emb.size), int(k), threshold, inv, emb)
    return _indexed_duplicates(E, emb, int(k), threshold)


#: loose caps of the ratio rule when no threshold is given: pixel L2 at PSNR 20 dB (heavy lossy compression),
#: cosine at Somepalli et al.'s replication threshold 0.5
RATIO_CAP_PSNR_DB = 20.0
RATIO_CAP_COSINE = 0.5


def ratio_pairs(E, embedder, ratio: float, *, k: int = 10, cap: float | None = None,
                invariances: Sequence[str] | None = None):
    """The ratio rule (module docstring) on embeddings ``E``: ``({(a, b): (score, transform)}, cap, rule)``.

    For each image a with neighbour distances d_1 <= d_2 <= ... (the embedder's distance; pixel: mean-centred and
    mirrored as ``invariances`` say; cosine: 1 - similarity), its duplicates are b_1..b_J for the last J <= k with
    ``d_J <= ratio * d_{J+1}`` and d_J within the cap. Like Gu et al.'s d1/d2 < 1/3 rule for copies (and Lowe's
    ratio test for matches), it asks the match to stand out from the image's other neighbours, so a cluster of
    look-alikes, where every neighbour is about as close as the next, yields no pairs.
    """
    from .embedders import get_embedder

    emb = get_embedder(embedder)
    _check_search_args(k, cap)
    inv = _check_invariances(invariances, _is_pixel(emb), emb)
    n = len(E)
    metric = E.metric
    if n < 2:
        return {}, cap, "fewer than two images"
    kk = min(int(k), n - 1)
    if _is_pixel(emb):
        D, I, tr = _pixel_knn(E.vectors, tuple(emb.size), kk + 1, inv)
        cap_d = cap if cap is not None else 10 ** (-RATIO_CAP_PSNR_DB / 20) * math.sqrt(E.dim)
        cap_text = f"distance <= {cap_d:.4g}" + (" (given)" if cap is not None else
                                                 f" (PSNR >= {RATIO_CAP_PSNR_DB:g} dB)")
    else:
        from .index import EmbeddingIndex, rescore, self_neighbors

        index = EmbeddingIndex.from_embeddings(E, kind="auto")
        if getattr(emb, "rescores", False):
            S, I = self_neighbors(index, min(n - 1, max(4 * (kk + 1), kk + 9)))
            S, I = rescore(index, emb.distance, E.vectors, I, kk + 1)
        else:
            S, I = self_neighbors(index, min(n - 1, kk + 1))
        D = S if metric == "l2" else 1.0 - S
        tr = None
        if metric == "cosine":
            c = cap if cap is not None else RATIO_CAP_COSINE
            cap_d, cap_text = 1.0 - c, f"cosine >= {c:g}" + (" (given)" if cap is not None else " (Somepalli et al.)")
        else:
            cap_d = cap if cap is not None else math.inf
            cap_text = f"distance <= {cap_d:g} (given)" if cap is not None else "no cap"
    D = np.asarray(D, np.float64)
    if D.shape[1] < kk + 1:  # fewer neighbours than asked: the last one has no successor
        D = np.concatenate([D, np.full((n, kk + 1 - D.shape[1]), np.inf)], axis=1)
        I = np.concatenate([I, np.full((n, kk + 1 - I.shape[1]), -1)], axis=1)
    nxt = D[:, 1:kk + 1]
    cur = D[:, :kk]
    ok = (I[:, :kk] >= 0) & (cur <= cap_d) & ((cur <= ratio * nxt) | ~np.isfinite(nxt))
    J = np.where(ok.any(axis=1), kk - 1 - np.argmax(ok[:, ::-1], axis=1), -1)  # last gap position per row
    pair_scores: dict[tuple[int, int], tuple[float, str]] = {}
    for a in np.nonzero(J >= 0)[0].tolist():
        for j in range(J[a] + 1):
            b = int(I[a, j])
            if b < 0 or D[a, j] > cap_d:
                continue
            key = (a, b) if a < b else (b, a)
            score = float(D[a, j]) if metric == "l2" else float(1.0 - D[a, j])
            t_name = tr[a, j] if tr is not None else ""
            if key not in pair_scores:
                pair_scores[key] = (score, t_name)
    rule = (f"ratio rule: a neighbour before the first gap d_j <= {ratio:g} x d_(j+1) among each image's "
            f"{kk} nearest, and {cap_text}")
    if inv:
        rule += "; " + "; ".join(_INV_TEXT[x] for x in inv)
    return pair_scores, (cap_d if metric == "l2" else 1.0 - cap_d), rule


def _pixel_knn(vectors: np.ndarray, size: tuple[int, int], kk: int, inv: tuple[str, ...]):
    """Each image's kk nearest other images by exact pixel L2 (mean-centred with "brightness"; the smaller of the
    direct and mirrored distance with "hflip"), by blocked matrix products: (D (n, kk), I (n, kk), transform
    names (n, kk))."""
    h, w = int(size[0]), int(size[1])
    X = np.array(vectors, dtype=np.float32)
    n = len(X)
    if "brightness" in inv:
        X -= X.mean(axis=1, keepdims=True, dtype=np.float64).astype(np.float32)
    rows = np.arange(n)
    D = np.empty((n, kk), np.float64)
    I = np.empty((n, kk), np.int64)
    T = np.full((n, kk), "", dtype=object)
    blocks = _exact_blocks(X, h, w, rows, False)
    mblocks = _exact_blocks(X, h, w, rows, True) if "hflip" in inv else None
    for s, blk, D2, _ in blocks:
        mir = None
        if mblocks is not None:
            _, _, M2, _ = next(mblocks)
            mir = M2 < D2
            D2 = np.minimum(D2, M2)
        part = np.argpartition(D2, kk - 1, axis=1)[:, :kk] if kk < n else np.argsort(D2, axis=1)[:, :kk]
        dv = np.take_along_axis(D2, part, axis=1)
        o = np.argsort(dv, axis=1, kind="stable")
        J = np.take_along_axis(part, o, axis=1)
        D[s:s + len(blk)] = np.sqrt(np.maximum(np.take_along_axis(dv, o, axis=1), 0.0))
        I[s:s + len(blk)] = J
        if mir is not None:
            T[s:s + len(blk)] = np.where(np.take_along_axis(mir, J, axis=1), "hflip", "")
    D[~np.isfinite(D)] = np.inf
    return D, I, T


def _status(enabled: bool, text: str):
    """A rich spinner on stderr while the search runs (``progress=True``), else nothing."""
    import contextlib

    if not enabled:
        return contextlib.nullcontext()
    from rich.console import Console

    return Console(stderr=True).status(text)


def _check_invariances(invariances, pixel: bool, emb) -> tuple[str, ...]:
    if invariances is None:
        return PIXEL_INVARIANCES if pixel else ()
    if isinstance(invariances, str):
        invariances = [x for x in invariances.replace(" ", "").split(",") if x and x != "none"]
    inv = tuple(dict.fromkeys(str(x) for x in invariances))
    bad = [x for x in inv if x not in INVARIANCES]
    if bad:
        raise ValueError(f"invariances={bad}: allowed values are {list(INVARIANCES)} (or none)")
    if inv and not pixel:
        raise ValueError(f"invariances={list(inv)} apply to the pixel embedder only; {getattr(emb, 'name', emb)!r} "
                         "compares images as they are (SSCD and CLIP are trained to ignore such edits)")
    return inv


def _indexed_duplicates(E, emb, k: int, threshold: float | None):
    """Duplicates of any embedder by k-nearest-neighbour search in an EmbeddingIndex (tiled: re-scored with tiled
    L2). Returns ({(a, b): (score, "")}, threshold, rule)."""
    from .index import EmbeddingIndex, rescore, self_neighbors

    n = len(E)
    metric = E.metric
    index = EmbeddingIndex.from_embeddings(E, kind="auto")
    vectors = E.vectors

    def neighbours(kk: int, rows=None):
        if not getattr(emb, "rescores", False):
            return self_neighbors(index, kk, rows=rows)
        c = min(n - 1, max(kk * 4, kk + 8))  # plain-L2 candidates, re-scored by the embedder's distance
        S, I = self_neighbors(index, c, rows=rows)
        q = vectors if rows is None else vectors[np.asarray(rows)]
        return rescore(index, emb.distance, q, I, kk)

    kk = min(int(k), n - 1)
    S, I = neighbours(kk)
    if threshold is None:
        t, rule = _duplicate_threshold(emb, metric, E.dim, S)
    else:
        t = float(threshold)
        rule = f"{'distance <=' if metric == 'l2' else 'cosine >='} {t:g} (given)"

    def passes(x):
        return (x <= t) if metric == "l2" else (x >= t)

    pair_scores: dict[tuple[int, int], tuple[float, str]] = {}

    def collect(rows: np.ndarray, S: np.ndarray, I: np.ndarray) -> None:
        ok = passes(S) & (I >= 0)
        for r, c in zip(*np.nonzero(ok)):
            a, b = int(rows[r]), int(I[r, c])
            key = (a, b) if a < b else (b, a)
            pair_scores.setdefault(key, (float(S[r, c]), ""))

    rows = np.arange(n)
    collect(rows, S, I)
    # images whose k neighbours are all duplicates: search them again with a larger k (complete big clusters)
    sat = rows[passes(S[:, -1]) & (I[:, -1] >= 0)]
    while len(sat) and kk < n - 1:
        kk = min(n - 1, kk * 4)
        S2, I2 = neighbours(kk, rows=sat)
        collect(sat, S2, I2)
        sat = sat[passes(S2[:, -1]) & (I2[:, -1] >= 0)]
    return pair_scores, t, rule


# ------------------------------------------------------------------------------------------- pixel duplicates
def _pool(X: np.ndarray, h: int, w: int, p: int, mirror: bool = False, block: int = 2048) -> np.ndarray:
    """Average-pool HWC vectors (n, h*w*3) over p x p blocks (the bottom/right remainder is left out) -> float32
    (n, (h//p)*(w//p)*3); ``mirror``: of the left-right mirrored images."""
    n = len(X)
    hp, wp = h // p, w // p
    out = np.empty((n, hp * wp * 3), np.float32)
    for s in range(0, n, block):
        A = X[s:s + block].reshape(-1, h, w, 3)
        if mirror:
            A = A[:, :, ::-1]
        A = A[:, : hp * p, : wp * p]
        m = len(A)
        A = np.ascontiguousarray(A).reshape(m, hp, p, wp * p * 3).sum(axis=2, dtype=np.float32)
        A = A.reshape(m, hp, wp, p, 3).sum(axis=3, dtype=np.float32)
        out[s:s + m] = A.reshape(m, -1) / np.float32(p * p)
    return out


def _pair_distances(X: np.ndarray, h: int, w: int, a: np.ndarray, b: np.ndarray, mirror: bool) -> np.ndarray:
    """Exact L2 distances between rows ``a[i]`` (mirrored left-right when ``mirror``) and ``b[i]`` of X, computed
    as direct differences in float32, in blocks of ~16 MB."""
    out = np.empty(len(a), np.float32)
    dim = X.shape[1]
    step = max(1, (1 << 22) // max(1, dim))
    for s in range(0, len(a), step):
        A = X[a[s:s + step]]
        if mirror:
            A = A.reshape(-1, h, w, 3)[:, :, ::-1].reshape(len(A), dim)
        A -= X[b[s:s + step]]
        out[s:s + step] = np.sqrt(np.einsum("ij,ij->i", A, A))
    return out


def _pixel_duplicates(vectors: np.ndarray, size: tuple[int, int], k: int, threshold: float | None,
                      inv: tuple[str, ...], emb):
    """Pixel duplicates by the exact coarse-to-fine search of the module docstring.

    Returns ({(a, b): (score, transform)}, threshold, rule). ``vectors`` (n, h*w*3), HWC; centred in place when
    ``"brightness"`` is asked for (a copy is made when they are read-only).
    """
    h, w = int(size[0]), int(size[1])
    X = vectors if vectors.flags.writeable else np.array(vectors, dtype=np.float32)
    n = len(X)
    contrast = np.empty(n, np.float64)  # each image's distance to its own mean grey level (structure guard)
    for s in range(0, n, 4096):
        B = X[s:s + 4096]
        mu = B.mean(axis=1, keepdims=True, dtype=np.float64)
        contrast[s:s + 4096] = np.sqrt(np.maximum(np.einsum("ij,ij->i", B, B, dtype=np.float64)
                                                  - B.shape[1] * mu[:, 0] ** 2, 0.0))
        if "brightness" in inv:
            B -= mu.astype(np.float32)
    pair_scores, t, rule = _pixel_groups(X, h, w, k, threshold, inv, emb, n)
    if threshold is None and pair_scores:  # the default rule's structure guard
        ab = np.asarray(list(pair_scores), dtype=np.int64)
        sc = np.asarray([v[0] for v in pair_scores.values()], dtype=np.float64)
        ok = (sc <= 0.0) | (sc <= STRUCTURE_RATIO * np.minimum(contrast[ab[:, 0]], contrast[ab[:, 1]]))
        dropped = int((~ok).sum())
        if dropped:
            keys = list(pair_scores)
            for j in np.nonzero(~ok)[0].tolist():
                del pair_scores[keys[j]]
        rule += (f"; and <= 1/3 of each image's own contrast (its distance to its mean grey level: smooth "
                 f"look-alikes are not duplicates; {dropped} pair(s) left out)")
    return pair_scores, t, rule


def _identical_rows(X: np.ndarray):
    """Groups of byte-identical rows of X, like ``np.unique(rows, return_index, return_inverse, return_counts)``
    but without sorting whole rows: rows are bucketed by a random projection (one dot product each) and only rows
    sharing a bucket are compared exactly. Returns (first row of each group, group of each row, group sizes);
    groups are numbered by the order of their first row's projection."""
    n = len(X)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    r = np.random.default_rng(0).standard_normal(X.shape[1]).astype(np.float32)
    proj = X @ r
    order = np.argsort(proj, kind="stable")
    sp = proj[order]
    starts = np.flatnonzero(np.r_[True, sp[1:] != sp[:-1]])
    ends = np.r_[starts[1:], n]
    group = np.empty(n, np.int64)
    first: list[int] = []
    for a, b in zip(starts.tolist(), ends.tolist()):
        rows = order[a:b]
        if b - a == 1:
            group[rows[0]] = len(first)
            first.append(int(rows[0]))
            continue
        rows = np.sort(rows)
        reps: list[int] = []  # exact comparison inside a bucket (equal projections are almost always equal rows)
        for i in rows.tolist():
            for g, rep in reps:
                if np.array_equal(X[i], X[rep]):
                    group[i] = g
                    break
            else:
                reps.append((len(first), i))
                group[i] = len(first)
                first.append(i)
    first_arr = np.asarray(first, np.int64)
    return first_arr, group, np.bincount(group, minlength=len(first_arr))


def _pixel_groups(X: np.ndarray, h: int, w: int, k: int, threshold, inv, emb, n: int):
    """:func:`_pixel_search` on the distinct rows of (centred) X, expanded back to all rows."""
    # identical vectors (exact copies; with "brightness", flat images of any grey level) are searched once
    X = np.ascontiguousarray(X)
    first, inverse, counts = _identical_rows(X)
    if len(first) == n:
        return _pixel_search(X, h, w, k, threshold, inv, emb, None)
    order = np.argsort(first)  # unique rows in image-set order
    first, counts = first[order], counts[order]
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    group = rank[inverse.reshape(-1)]
    members = [[] for _ in range(len(first))]
    for i, g in enumerate(group.tolist()):
        members[g].append(i)
    found, t, rule = _pixel_search(np.ascontiguousarray(X[first]), h, w, k, threshold, inv, emb, counts)
    pair_scores: dict[tuple[int, int], tuple[float, str]] = {}
    starred = 0
    for m in members:
        if len(m) <= GROUP_LIST_LIMIT:
            pair_scores.update({(a, b): (0.0, "") for j, a in enumerate(m) for b in m[j + 1:]})
        else:
            starred += 1
            pair_scores.update({(m[0], b): (0.0, "") for b in m[1:]})
    for (u, v), val in found.items():
        mu, mv = members[u], members[v]
        if len(mu) * len(mv) > GROUP_LIST_LIMIT ** 2:
            mu, mv = mu[:1], mv[:1]
        for a in mu:
            for b in mv:
                pair_scores[(a, b) if a < b else (b, a)] = val
    if starred:
        rule += (f"; {starred} group(s) of more than {GROUP_LIST_LIMIT} identical images listed as stars (each "
                 "member paired with the group's first; clusters complete)")
    return pair_scores, t, rule


#: groups of identical images up to this size have all their pairs listed; larger ones are listed as stars
GROUP_LIST_LIMIT = 64


def _pixel_search(X: np.ndarray, h: int, w: int, k: int, threshold: float | None, inv: tuple[str, ...], emb,
                  counts: np.ndarray | None):
    """The coarse-to-fine search on distinct (centred) vectors X; ``counts``: how many images each row stands
    for (the threshold rule's median is over images), None = one each."""
    from .index import EmbeddingIndex

    n, dim = X.shape
    if n < 2:  # one distinct vector: no distinct neighbours to search or to calibrate on
        if threshold is not None:
            return {}, float(threshold), f"distance <= {float(threshold):g} (given)"
        return ({},) + _duplicate_threshold(emb, "l2", dim, np.full((int(counts.sum()) if counts is not None else 1,
                                                                     1), np.inf))
    p = max(1, min(h, w) // COARSE_SIDE)
    low = _pool(X, h, w, p) if p > 1 else X
    index = EmbeddingIndex(low.shape[1], "l2", kind="auto")
    index.add(low)
    lowm = None
    if "hflip" in inv:  # pooled vectors of the mirrored images (= the mirrored pooled grid when p divides w)
        src, ph, pw = (low, h // p, w // p) if w % p == 0 else (None, h, w)
        lowm = (_pool(X, h, w, p, mirror=True) if src is None else
                np.ascontiguousarray(src.reshape(n, ph, pw, 3)[:, :, ::-1].reshape(n, -1)))

    def candidates(Q: np.ndarray, rows: np.ndarray, kk: int):
        """The kk nearest pooled vectors to Q (queries of ``rows``), each row's own vector left out."""
        D, I = index.search(Q, min(kk + 1, n), refine=True)
        order = np.argsort(I == rows[:, None], axis=1, kind="stable")[:, :kk]
        return np.take_along_axis(D, order, axis=1), np.take_along_axis(I, order, axis=1)

    k0 = min(k, n - 1)
    first = candidates(low, np.arange(n), k0)
    if threshold is None:
        t, rule = _pixel_threshold(X, h, w, p, first, k0, candidates, low, emb, counts)
    else:
        t = float(threshold)
        rule = f"distance <= {t:g} (given)"
    if inv:
        rule += "; " + "; ".join(_INV_TEXT[x] for x in inv)
    radius = t / p * (1 + 1e-4) + 1e-6  # every pair within t at full resolution is within t/p pooled
    pair_scores: dict[tuple[int, int], tuple[float, str]] = {}
    for mirror in (False, True) if lowm is not None else (False,):
        Q = lowm if mirror else low
        rows, kk = np.arange(n), k0
        D, I = first if not mirror else candidates(Q, rows, kk)
        while True:
            near = (I >= 0) & (D <= radius)
            r, c = np.nonzero(near)
            a, b = rows[r], I[r, c]
            F = _pair_distances(X, h, w, a, b, mirror)
            tr = "hflip" if mirror else ""  # a mirror is its own inverse: the transform is symmetric
            _keep_closest(pair_scores, a[F <= t], b[F <= t], F[F <= t], tr)
            sat = near[:, -1] if kk < n - 1 else np.zeros(len(rows), bool)
            if not sat.any():
                break
            searched, rows, kk = len(rows), rows[sat], min(n - 1, kk * 4)  # all may be duplicates: look further
            if _exact_is_cheaper(kk, n, len(rows), searched):  # pooled vectors do not separate them: all pairs
                _keep_closest(pair_scores, *_exact_within(X, h, w, rows, t, mirror), tr)
                break
            D, I = candidates(Q[rows], rows, kk)
    return pair_scores, t, rule


def _keep_closest(pair_scores: dict, a: np.ndarray, b: np.ndarray, F: np.ndarray, tr: str) -> None:
    """Record pairs (a[i], b[i]) at distance F[i] under transform ``tr``, keeping each pair's smaller distance."""
    for ai, bi, f in zip(a.tolist(), b.tolist(), F.tolist()):
        key = (ai, bi) if ai < bi else (bi, ai)
        if key not in pair_scores or f < pair_scores[key][0]:
            pair_scores[key] = (f, tr)


#: re-scoring one candidate pair by direct differences (a gather, a subtraction, a dot product: memory-bound) costs
#: about this many times what one pair costs inside the blocked matrix product of a plain exact search (measured on
#: 2 cores, 32 x 32 RGB: ~3.6 us against ~0.05 us)
EXACT_SWITCH_FACTOR = 64


def _exact_is_cheaper(kk: int, n: int, unsure: int = 0, searched: int = 0) -> bool:
    """Whether the rows still uncertain should be compared with all n images (a blocked matrix product) rather
    than get another candidate round with kk candidates each: when that round would cost more, or when the last
    round left more than half its rows uncertain (pooled vectors do not separate these images -- noise, for one --
    so more rounds would not converge). Rounds then shrink the rows at least 2x while kk grows 4x, and the whole
    search stays within a small constant of one plain exact k-NN search, whatever the images."""
    return kk * EXACT_SWITCH_FACTOR >= n or (searched > 0 and 2 * unsure > searched)


def _exact_blocks(X: np.ndarray, h: int, w: int, rows: np.ndarray, mirror: bool):
    """Yield (start, row block, squared L2 distances (len(block), n), their rounding bound) of ``rows`` (mirrored
    left-right when ``mirror``) against all rows of X, by blocked float32 matrix products of ~64 MB; each row's
    distance to itself is set to inf."""
    n, dim = X.shape
    sq = np.einsum("ij,ij->i", X, X, dtype=np.float64).astype(np.float32)
    step = max(1, (1 << 24) // max(1, n))
    for s in range(0, len(rows), step):
        blk = rows[s:s + step]
        A = X[blk]
        if mirror:
            A = np.ascontiguousarray(A.reshape(-1, h, w, 3)[:, :, ::-1].reshape(len(blk), dim))
        D2 = A @ X.T
        D2 *= -2.0
        D2 += sq[None, :]
        D2 += sq[blk][:, None]
        # float32 rounding of |a|^2 + |b|^2 - 2 a.b is far below 1e-5 (|a|^2 + |b|^2): a generous margin
        err = sq[blk][:, None] + sq[None, :]
        err *= 1e-5
        err += 1e-9
        D2[np.arange(len(blk)), blk] = np.inf
        yield s, blk, D2, err


def _exact_within(X: np.ndarray, h: int, w: int, rows: np.ndarray, t: float, mirror: bool):
    """All pairs (a in rows, b != a) within exact L2 distance t: candidates from a blocked matrix product (with a
    margin for its rounding), confirmed by direct differences. Returns (a, b, distance) arrays."""
    out_a, out_b = [], []
    for _, blk, D2, err in _exact_blocks(X, h, w, rows, mirror):
        r, c = np.nonzero(D2 <= t * t + err)
        out_a.append(blk[r])
        out_b.append(c)
    a = np.concatenate(out_a) if out_a else np.zeros(0, np.int64)
    b = np.concatenate(out_b) if out_b else np.zeros(0, np.int64)
    F = _pair_distances(X, h, w, a, b, mirror)
    ok = F <= t
    return a[ok], b[ok], F[ok]


def _exact_nearest_beyond(X: np.ndarray, h: int, w: int, rows: np.ndarray, floor: float) -> np.ndarray:
    """Each row's exact L2 distance to its nearest other image farther than ``floor`` (inf when none): the
    matrix-product distances past the floor (less the rounding margin) that are within the margin of the row's
    smallest are re-scored directly."""
    out = np.full(len(rows), np.inf)
    for s, blk, D2, err in _exact_blocks(X, h, w, rows, False):
        D2[D2 <= floor * floor - err] = np.inf
        lo = D2.min(axis=1)
        r, c = np.nonzero(np.isfinite(lo)[:, None] & (D2 <= lo[:, None] + 2 * err))
        if not len(r):
            continue
        F = _pair_distances(X, h, w, blk[r], c, False).astype(np.float64)
        F[F <= floor] = np.inf
        best = np.full(len(blk), np.inf)
        np.minimum.at(best, r, F)
        out[s:s + len(blk)] = best
    return out


def _pixel_threshold(X, h, w, p, first, k0, candidates, low, emb, counts=None):
    """The default threshold rule on (centred) pixel vectors, with each image's nearest *distinct* image certified
    exactly: a candidate at full-resolution distance r is the nearest when r <= p x the pooled distance of the last
    candidate (no other image can be closer); other rows are searched again with 4x more candidates."""
    n, dim = X.shape
    t_abs = 10 ** (-DUPLICATE_PSNR_DB / 20) * math.sqrt(dim)
    nearest = np.full(n, np.inf)
    rows, kk = np.arange(n), k0
    D, I = first
    while len(rows):
        best = np.full(len(rows), np.inf)
        bound = p * D.astype(np.float64)  # no image beyond candidate j is closer than bound[:, j]
        for j in range(I.shape[1]):  # re-score a candidate only where it could still beat the best so far
            need = (I[:, j] >= 0) & ~(best <= bound[:, j])
            if not need.any():
                break
            f = _pair_distances(X, h, w, rows[need], I[need, j], False).astype(np.float64)
            best[need] = np.minimum(best[need], np.where(f > t_abs, f, np.inf))
        nearest[rows] = best
        if kk >= n - 1:
            break
        unsure = ~(best <= bound[:, -1])
        searched, rows, kk = len(rows), rows[unsure], min(n - 1, kk * 4)
        if len(rows) and _exact_is_cheaper(kk, n, len(rows), searched):  # pooled vectors do not separate these rows
            nearest[rows] = _exact_nearest_beyond(X, h, w, rows, t_abs)
            break
        if len(rows):
            D, I = candidates(low[rows], rows, kk)
    if counts is not None:
        nearest = np.repeat(nearest, counts)
    return _duplicate_threshold(emb, "l2", dim, nearest[:, None])


_INV_TEXT = {"brightness": "each image's mean grey level removed",
             "hflip": "mirrored images compared too (score: the smaller distance)"}


def _embed_fn(backend: str):
    """``embed`` bound to an embedding backend; "local" is the in-process default."""
    import functools
    import inspect

    from .embedders import embed

    if backend == "local":
        return embed
    if "backend" not in inspect.signature(embed).parameters:
        raise ValueError(f"backend={backend!r}: this installation embeds locally only; use backend='local'")
    return functools.partial(embed, backend=backend)


def _attach(obj, **refs):
    """Keep the ImageSets on the result for to_html (plain attributes: not dataclass fields, not serialised)."""
    for k, v in refs.items():
        object.__setattr__(obj, k, v)
    return obj


def match(queries, reference, embedder: Any = "pixel", k: int = 5, *, cache_dir=None, progress: bool = False,
          baseline: bool = True, backend: str = "local") -> Matches:
    """Each query's ``k`` nearest reference images, plus the reference set's nearest-neighbour baseline.

    The embedder is prepared on ``reference`` first (the pixel embedder takes the reference's native size), then
    queries are embedded in the same space. Scores: L2 distance (ascending) or cosine similarity (descending); the
    tiled embedder reports Carlini et al.'s tiled L2. ``baseline``: summary (mean, p05, p50, p95) of each reference
    image's score to its nearest other reference image.
    """
    from .embedders import get_embedder
    from .index import EmbeddingIndex, rescore, self_neighbors

    embed = _embed_fn(backend)
    _check_search_args(k, None)
    k = int(k)
    reference = as_imageset(reference, "reference")
    queries = as_imageset(queries, "queries")
    emb = get_embedder(embedder)
    R = embed(reference, emb, cache_dir=cache_dir, progress=progress)
    Q = embed(queries, emb, cache_dir=cache_dir, progress=progress)
    if R.dim != Q.dim and len(R) and len(Q):
        raise ValueError(f"queries embed to dimension {Q.dim}, reference to {R.dim}; use one embedder instance")
    skipped = _skipped(Q, "queries") + _skipped(R, "reference")
    if len(R) == 0:
        raise ValueError(f"reference {reference.source!r} has no decodable images")
    index = EmbeddingIndex.from_embeddings(R, kind="auto")
    own = getattr(emb, "rescores", False)
    n = len(R)
    if k > n:  # a request for more neighbours than there are reference images gets all of them (bounded memory)
        log.info("match: k=%d capped at the %d reference images", k, n)
        k = n
    if len(Q) == 0:  # no decodable query
        S, I = np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    elif not own:
        S, I = index.search(Q.vectors, k, refine=True)
    else:
        S, I = index.search(Q.vectors, min(n, max(4 * k, k + 8)), refine=True)
        S, I = rescore(index, emb.distance, Q.vectors, I, k)
    ref_ids, scores = [], []
    for srow, irow in zip(S, I):
        keep = irow >= 0
        ref_ids.append([R.ids[j] for j in irow[keep]])
        scores.append([float(x) for x in srow[keep]])
    base = None
    if baseline and n >= 2:
        if not own:
            bs, _ = self_neighbors(index, 1)
        else:
            _, bI = self_neighbors(index, min(n - 1, 16))
            bs, _ = rescore(index, emb.distance, R.vectors, bI, 1)
        base = ScoreSummary.of(bs[:, 0])
    m = Matches(list(Q.ids), ref_ids, scores, R.embedder, R.metric, k, base, n, skipped, queries.source,
                reference.source)
    return _attach(m, _queries=queries, _reference=reference)
