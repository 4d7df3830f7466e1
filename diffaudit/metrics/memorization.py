"""Nearest-neighbour distance ratio (Gu et al. 2023, "On Memorization in Diffusion Models").

A generated sample is *memorized* when its distance to the nearest training image is less than 1/3 of its distance
to the second nearest one, ``d1 / d2 < 1/3``, in pixel L2 (reference code: sail-sg/DiffMemorize ``mem_ratio.py``,
``(knn_distance[:, 0] / knn_distance[:, 1]) < 1/3``; diffaudit also reports the looser ``< 1/2``).

Edge cases and the known limitation (duplicates)
------------------------------------------------
* ``d2 == 0`` implies ``d1 == 0``: the sample sits exactly on two identical training images. ``0/0`` is defined as
  ratio ``1.0`` (not flagged). ``d1 > 0 == d2`` cannot happen for sorted neighbours; it is treated as ``inf``.
* **Duplicated training images defeat the ratio rule**: a perfect copy of an image that appears twice in the
  training set has ``d1 == d2`` (ratio 1) and is *not* flagged -- even though duplicated images are exactly the
  ones diffusion models copy most (Carlini et al. 2023; Somepalli et al. 2023). Use :func:`nn_ratio_from_knn` with
  ``dedup_aware=True`` and duplicate-group labels (e.g. from ``find_duplicates``): the second neighbour is then the
  nearest training image that is *not a duplicate of the first* one. The audit reports both: ``memorization_ratio``
  (Gu et al.'s literal rule, the onset signal) and ``memorization_ratio_dedup`` (duplicate groups = connected
  components of the training pairs within the duplicate threshold of :mod:`diffaudit.curate`). The audit's absolute
  measures (replication rate, authenticity, extraction) do not have this blind spot.
"""
from __future__ import annotations

import logging

import numpy as np

from ..results import Estimate
from .stats import as_1d, proportion_estimate

logger = logging.getLogger(__name__)

GU_THRESHOLD = 1.0 / 3.0  # Gu et al. 2023
HALF_THRESHOLD = 0.5


def _check_distances(d, name: str) -> np.ndarray:
    a = as_1d(d, name)
    if (a < 0).any():
        raise ValueError(f"{name} has negative distances (min {a.min():g}); distances must be >= 0")
    return a


def nn_ratio(d1, d2) -> np.ndarray:
    """Per-sample ratio ``d1 / d2`` of nearest to second-nearest training distance (``0/0 -> 1``, ``x/0 -> inf``)."""
    a = _check_distances(d1, "d1")
    b = _check_distances(d2, "d2")
    if a.shape != b.shape:
        raise ValueError(f"d1 and d2 must have the same length; got {a.size} and {b.size}")
    if (a > b * (1 + 1e-6) + 1e-12).any():
        i = int(np.argmax(a > b * (1 + 1e-6) + 1e-12))
        raise ValueError(f"d1 must not exceed d2 (nearest <= second nearest); at index {i}: d1={a[i]:g} > d2={b[i]:g}")
    out = np.empty_like(a)
    pos = b > 0
    out[pos] = a[pos] / b[pos]
    out[~pos] = np.where(a[~pos] > 0, np.inf, 1.0)
    return np.minimum(out, 1.0, where=np.isfinite(out), out=out)


def dedup_second_distance(knn_dists, knn_ids, groups) -> np.ndarray:
    """Second-neighbour distance that skips duplicates of the first neighbour.

    ``knn_dists``/``knn_ids``: (n, k) ascending neighbours of each sample in the training set. ``groups``: duplicate
    group label per training index (images in the same group are duplicates of each other; a singleton has its own
    label). Returns, per sample, the distance to the first neighbour whose group differs from the nearest one's. When
    all k neighbours are duplicates of the nearest, returns the k-th distance -- a lower bound of the true value,
    so the ratio is over-estimated and the sample is at worst *not* flagged (conservative); log at debug level.
    """
    d = np.asarray(knn_dists, dtype=np.float64)
    ids = np.asarray(knn_ids)
    g = np.asarray(groups)
    if d.ndim != 2 or d.shape[1] < 2 or ids.shape != d.shape:
        raise ValueError(f"knn_dists and knn_ids must both be (n, k>=2); got {d.shape} and {ids.shape}")
    if g.ndim != 1:
        raise ValueError(f"groups must be 1-D (one label per training image); got shape {g.shape}")
    if ids.min() < 0 or ids.max() >= g.size:
        raise ValueError(f"knn_ids must index into groups (0..{g.size - 1}); got range {ids.min()}..{ids.max()}")
    lab = g[ids]
    other = lab != lab[:, :1]
    has = other.any(axis=1)
    first = np.argmax(other, axis=1)
    out = np.where(has, d[np.arange(d.shape[0]), first], d[:, -1])
    if (~has).any():
        logger.debug("%d samples: all %d neighbours are duplicates of the nearest; using the k-th distance",
                     int((~has).sum()), d.shape[1])
    return out


def nn_ratio_from_knn(knn_dists, knn_ids=None, *, dedup_aware: bool = False, groups=None) -> np.ndarray:
    """Ratio from (n, k>=2) neighbour distances; ``dedup_aware=True`` needs ``knn_ids`` and ``groups``."""
    d = np.asarray(knn_dists, dtype=np.float64)
    if d.ndim != 2 or d.shape[1] < 2:
        raise ValueError(f"knn_dists must be (n, k>=2); got shape {d.shape}")
    if not dedup_aware:
        return nn_ratio(d[:, 0], d[:, 1])
    if knn_ids is None or groups is None:
        raise ValueError("dedup_aware=True needs knn_ids and groups (duplicate-group label per training image)")
    return nn_ratio(d[:, 0], dedup_second_distance(d, knn_ids, groups))


def memorization_fraction(d1, d2, threshold: float = GU_THRESHOLD, *, confidence: float = 0.95,
                          method: str = "wilson", n_boot: int = 2000, seed: int = 0) -> Estimate:
    """Fraction of samples with ``d1 / d2 < threshold`` (Gu et al. 2023: 1/3), with a CI (Wilson by default).

    See the module docstring for ``d2 == 0`` and the duplicate limitation.
    """
    if not 0.0 < float(threshold) <= 1.0:
        raise ValueError(f"threshold={threshold!r} must be in (0, 1] (Gu et al. use 1/3)")
    return proportion_estimate(nn_ratio(d1, d2) < threshold, confidence=confidence, method=method,
                               n_boot=n_boot, seed=seed)
