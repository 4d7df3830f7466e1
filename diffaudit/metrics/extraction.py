"""Calibrated distance for extraction (Carlini et al. 2023, "Extracting Training Data from Diffusion Models", Sec. 5.1).

A generated sample x̂ whose nearest training image is x is *extracted* when

    l(x̂, x; S) = l2(x̂, x) / (alpha * mean_{y in S} l2(·, y))  <  threshold,      alpha = 0.5, n = |S| = 50,

i.e. x̂ is more than twice as close to x as the typical distance between neighbouring images in that part of the
dataset (the ratio adapts the cut-off to dense and sparse regions). ``threshold = 1`` is the natural cut-off of
this normalisation (it is the default of the LeakPro re-implementation of the attack); it is a parameter.

The neighbourhood S -- two variants, the ratio function takes either denominator:

* **paper** (``sample_knn_mean``): S = the n training images closest to the *generated* sample x̂ (Sec. 5.1
  defines S_x̂ this way). Needs the n nearest training distances of each sample (search with k >= 50).
* **train-side** (``train_knn_mean(train)[nn_index]``): S = the n nearest training neighbours of the matched
  training image x, excluding x itself. Computed once per training set and reused at every checkpoint; for a real
  copy (x̂ ≈ x) the two agree up to x itself being in the paper's S.

Distances are in the embedder's L2 (Carlini use plain or tiled L2 on pixels; the ratio is scale-free).
"""
from __future__ import annotations

import logging

import numpy as np

from ..results import Estimate
from ._knn import knn
from .stats import as_1d, proportion_estimate

logger = logging.getLogger(__name__)

CARLINI_ALPHA = 0.5
CARLINI_N = 50
CARLINI_THRESHOLD = 1.0


def calibrated_ratio(d_sample_nn, train_knn_mean, alpha: float = CARLINI_ALPHA) -> np.ndarray:
    """Per-sample ``d_sample_nn / (alpha * train_knn_mean)``.

    ``d_sample_nn``: distance of each sample to its nearest training image. ``train_knn_mean``: per sample, the mean
    distance over its neighbourhood S (paper: :func:`sample_knn_mean`; train-side: ``train_knn_mean(train)[nn]``).
    A zero denominator (S made only of exact copies) gives ``inf`` (never flagged), or ``1.0`` when the sample
    distance is zero too (not flagged, like the ratio rule's ``0/0``).
    """
    d = as_1d(d_sample_nn, "d_sample_nn")
    m = as_1d(train_knn_mean, "train_knn_mean")
    if d.shape != m.shape:
        raise ValueError(f"d_sample_nn and train_knn_mean must have the same length; got {d.size} and {m.size}")
    if (d < 0).any() or (m < 0).any():
        raise ValueError("d_sample_nn and train_knn_mean must be non-negative distances")
    if not float(alpha) > 0:
        raise ValueError(f"alpha={alpha!r} must be > 0 (Carlini et al.: 0.5)")
    den = float(alpha) * m
    out = np.empty_like(d)
    pos = den > 0
    out[pos] = d[pos] / den[pos]
    out[~pos] = np.where(d[~pos] > 0, np.inf, 1.0)
    return out


def extraction_fraction(ratio, threshold: float = CARLINI_THRESHOLD, *, confidence: float = 0.95,
                        method: str = "wilson", n_boot: int = 2000, seed: int = 0) -> Estimate:
    """Fraction of samples with calibrated ratio ``< threshold`` (default 1), with a CI (Wilson by default)."""
    r = np.asarray(ratio, dtype=np.float64)
    if r.ndim != 1 or r.size == 0:
        raise ValueError(f"ratio must be a non-empty 1-D array; got shape {r.shape}")
    if np.isnan(r).any() or (r < 0).any():
        raise ValueError("ratio must be non-negative and not NaN (inf is allowed: never extracted)")
    if not float(threshold) > 0:
        raise ValueError(f"threshold={threshold!r} must be > 0")
    return proportion_estimate(r < threshold, confidence=confidence, method=method, n_boot=n_boot, seed=seed)


def sample_knn_mean(knn_dists, n: int = CARLINI_N) -> np.ndarray:
    """Paper variant of the denominator: mean of each sample's ``n`` nearest training distances ((m, k>=n) input)."""
    d = np.asarray(knn_dists, dtype=np.float64)
    if d.ndim != 2 or d.shape[1] < 1:
        raise ValueError(f"knn_dists must be (num_samples, k); got shape {d.shape}")
    if not np.isfinite(d).all() or (d < 0).any():
        raise ValueError("knn_dists must be finite non-negative distances")
    if d.shape[1] < n:
        logger.warning("sample_knn_mean: only %d neighbours given, n=%d asked; using %d", d.shape[1], n, d.shape[1])
    return d[:, :n].mean(axis=1)


def train_knn_mean(train_vectors, n: int = CARLINI_N, *, metric: str = "l2") -> np.ndarray:
    """Train-side denominator: mean distance of every training image to its ``n`` nearest *other* training images.

    Exact duplicates count as neighbours at distance 0. With fewer than ``n + 1`` training images, all other images
    are used (logged as a warning).
    """
    t = np.asarray(train_vectors)
    if t.ndim != 2 or t.shape[0] < 2:
        raise ValueError(f"train_vectors must be (num_train >= 2, dim); got shape {t.shape}")
    if int(n) < 1:
        raise ValueError(f"n={n!r} must be >= 1 (Carlini et al.: 50)")
    k = min(int(n), t.shape[0] - 1)
    if k < n:
        logger.warning("train_knn_mean: training set has %d images, fewer than n+1=%d; using n=%d",
                       t.shape[0], n + 1, k)
    d, _ = knn(t, t, k, metric=metric, exclude_self=True, queries_name="train_vectors", base_name="train_vectors")
    return d.mean(axis=1)
