"""Are generated samples closer to the training set than held-out real data is?

* **C_T data-copying test** (Meehan, Chaudhuri & Dasgupta 2020, "A Non-Parametric Test to Detect Data-Copying in
  Generative Models"; reference code casey-meehan/data-copying). Per cell of a partition of the space, the
  distances to the nearest training image of generated samples, L(Q_m), and of held-out test images, L(P_n), are
  compared with a Mann-Whitney U test, z-scored under H0:

      U = #{(q, p): L(q) > L(p)} + 0.5 #{ties},  Z_U = (U - (m n / 2 - 0.5)) / sqrt(m n (n + m + 1) / 12)

  (the reference's -0.5 continuity correction, no tie correction). C_T is the average of the cell z-scores
  weighted by each cell's share of held-out samples P_n(pi), over the cells holding enough generated samples
  (Q_m(pi) > tau; here: at least ``min_cell_samples``). Cells are k-means clusters of the *training* set; each point
  belongs to the cell of its nearest centroid. ``C_T << 0`` means data copying (samples closer to train than fresh
  data), ``>> 0`` under-fitting; |C_T| of a few units is noise. One cell = the global Z_U.
* **Authenticity** (Alaa et al. 2022, "How Faithful is your Synthetic Data?"): a sample is *inauthentic* when it
  is closer to its nearest training image x than x is to its own nearest other training image. Returned as the
  fraction of authentic samples and the per-sample mask. (The widely copied public code evaluates this from the
  real side with indices of the synthetic set; this is the paper's sample-level definition.)
"""
from __future__ import annotations

import logging

import numpy as np

from ..results import Estimate
from ._knn import knn
from .stats import as_1d, proportion_estimate

logger = logging.getLogger(__name__)

MEEHAN_MIN_CELL_SAMPLES = 20  # tau = 20 / m


def mann_whitney_z(sample_d, heldout_d) -> float:
    """Meehan et al.'s Z_U for one cell: negative when samples are closer to the training set than held-out data."""
    from scipy.stats import rankdata

    q = as_1d(sample_d, "sample_d")
    p = as_1d(heldout_d, "heldout_d")
    m, n = q.size, p.size
    ranks = rankdata(np.concatenate([q, p]))  # average ranks for ties
    u = ranks[:m].sum() - m * (m + 1) / 2.0
    mean = m * n / 2.0 - 0.5
    std = np.sqrt(m * n * (n + m + 1) / 12.0)
    return float((u - mean) / std)


def ct_statistic(sample_d, heldout_d, sample_cells=None, heldout_cells=None, *,
                 min_cell_samples: int = MEEHAN_MIN_CELL_SAMPLES) -> float:
    """Meehan et al. 2020 C_T from nearest-training distances (and optional cell labels).

    ``sample_d`` / ``heldout_d``: distance of each generated sample / held-out image to its nearest training image.
    ``sample_cells`` / ``heldout_cells``: integer cell label per point (e.g. :func:`assign_cells`); ``None`` = one
    cell. Cells with fewer than ``min_cell_samples`` generated samples or no held-out sample are dropped; if no cell
    is left, the global (single-cell) z is returned with a warning.
    """
    q = as_1d(sample_d, "sample_d")
    p = as_1d(heldout_d, "heldout_d")
    if (sample_cells is None) != (heldout_cells is None):
        raise ValueError("give both sample_cells and heldout_cells, or neither (one cell)")
    if sample_cells is None:
        return mann_whitney_z(q, p)
    qc = np.asarray(sample_cells)
    pc = np.asarray(heldout_cells)
    if qc.shape != q.shape or pc.shape != p.shape:
        raise ValueError(f"sample_cells/heldout_cells must match sample_d/heldout_d in length; got {qc.shape} vs "
                         f"{q.shape} and {pc.shape} vs {p.shape}")
    zs, ws = [], []
    for c in np.unique(np.concatenate([qc, pc])):
        qi, pi = q[qc == c], p[pc == c]
        if qi.size < max(1, int(min_cell_samples)) or pi.size == 0:
            continue
        zs.append(mann_whitney_z(qi, pi))
        ws.append(pi.size / p.size)  # P_n(pi)
    if not zs:
        logger.warning("ct_statistic: no cell has >= %d generated samples and a held-out sample; "
                       "returning the single-cell z", min_cell_samples)
        return mann_whitney_z(q, p)
    w = np.asarray(ws)
    return float(np.dot(w, zs) / w.sum())


def kmeans_cells(train_vectors, num_cells: int, *, seed: int = 0) -> np.ndarray:
    """Centroids of a k-means partition of the training set (the cells of the C_T test), shape (num_cells, dim)."""
    from sklearn.cluster import KMeans

    t = np.asarray(train_vectors, dtype=np.float64)
    if t.ndim != 2 or not 1 <= int(num_cells) <= t.shape[0]:
        raise ValueError(f"num_cells={num_cells!r} must be between 1 and the number of training vectors "
                         f"({t.shape[0] if t.ndim == 2 else '?'})")
    if int(num_cells) == 1:
        return t.mean(axis=0, keepdims=True)
    km = KMeans(n_clusters=int(num_cells), n_init=3, random_state=seed).fit(t)
    return km.cluster_centers_


def assign_cells(vectors, centroids) -> np.ndarray:
    """Cell label (index of the nearest centroid, L2) of every vector."""
    _, idx = knn(vectors, centroids, 1, queries_name="vectors", base_name="centroids")
    return idx[:, 0]


def data_copying_test(train_vectors, heldout_vectors, sample_vectors, *, num_cells: int = 1,
                      metric: str = "l2", min_cell_samples: int = MEEHAN_MIN_CELL_SAMPLES, seed: int = 0) -> float:
    """C_T end to end from vectors: nearest-training distances (exact), k-means cells on the training set."""
    qd, _ = knn(sample_vectors, train_vectors, 1, metric=metric, queries_name="sample_vectors",
                base_name="train_vectors")
    pd_, _ = knn(heldout_vectors, train_vectors, 1, metric=metric, queries_name="heldout_vectors",
                 base_name="train_vectors")
    if int(num_cells) == 1:
        return ct_statistic(qd[:, 0], pd_[:, 0])
    cents = kmeans_cells(train_vectors, num_cells, seed=seed)
    return ct_statistic(qd[:, 0], pd_[:, 0], assign_cells(sample_vectors, cents),
                        assign_cells(heldout_vectors, cents), min_cell_samples=min_cell_samples)


def authenticity(sample_nn_dist, sample_nn_idx, train_nn_dist, *,
                 confidence: float = 0.95) -> tuple[Estimate, np.ndarray]:
    """Alaa et al. 2022 authenticity: ``(fraction authentic with Wilson CI, per-sample authentic mask)``.

    ``sample_nn_dist[j]``, ``sample_nn_idx[j]``: distance and index of sample j's nearest training image i*.
    ``train_nn_dist[i]``: distance of training image i to its nearest *other* training image. Sample j is authentic
    iff ``sample_nn_dist[j] > train_nn_dist[i*]`` (a tie, e.g. an exact copy of a duplicated image, is inauthentic).
    Any distance works (smaller = closer; for cosine embedders pass 1 - similarity).
    """
    d = as_1d(sample_nn_dist, "sample_nn_dist")
    idx = np.asarray(sample_nn_idx)
    t = as_1d(train_nn_dist, "train_nn_dist")
    if idx.shape != d.shape or not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"sample_nn_idx must be integer indices, one per sample; got dtype {idx.dtype}, "
                         f"shape {idx.shape} for {d.size} samples")
    if idx.min() < 0 or idx.max() >= t.size:
        raise ValueError(f"sample_nn_idx must index train_nn_dist (0..{t.size - 1}); got {idx.min()}..{idx.max()}")
    mask = d > t[idx]
    return proportion_estimate(mask, confidence=confidence), mask


# ---------------------------------------------------------------------------------------------------------------
# a copy threshold calibrated on the data: what real unseen images reach

#: held-out calibration: a sample is a copy when it is closer to the training set than all but this fraction of
#: held-out real images are (the 1st percentile of held-out top-1 distances = the 99th of similarities)
HELDOUT_QUANTILE = 0.01


def heldout_quantile_threshold(heldout_d, q: float = HELDOUT_QUANTILE, confidence: float = 0.95):
    """The ``q``-quantile of held-out images' distances to their nearest training image, with a distribution-free
    confidence interval (order statistics: the quantile's rank among m held-out images is Binomial(m, q)).

    Returns ``(threshold, low, high)`` in distance units (``low``/``high``: the order statistics bracketing the
    quantile at ``confidence``; ``-inf`` / ``+inf`` when m is too small for the bound to exist). A sample whose
    top-1 distance is below the threshold is closer to the training set than a fraction ``q`` of real unseen
    images are: under the null that samples are as novel as held-out images, about ``q`` of them fall below it.
    """
    from scipy.stats import binom

    d = np.sort(as_1d(heldout_d, "heldout_d").astype(np.float64))
    m = len(d)
    if not 0.0 < q < 1.0:
        raise ValueError(f"q={q!r} must be in (0, 1)")
    t = float(np.quantile(d, q, method="lower"))
    a = (1.0 - float(confidence)) / 2.0
    lo_rank = int(binom.ppf(a, m, q))  # 0-based order statistics d[lo_rank - 1] <= quantile <= d[hi_rank]
    hi_rank = int(binom.ppf(1.0 - a, m, q))
    low = float(d[lo_rank - 1]) if lo_rank >= 1 else float("-inf")
    high = float(d[hi_rank]) if hi_rank < m else float("inf")
    return t, low, high


def heldout_calibrated_rate(sample_d, heldout_d, *, q: float = HELDOUT_QUANTILE, confidence: float = 0.95):
    """Fraction of samples whose top-1 distance to the training set is below the held-out ``q``-quantile
    (:func:`heldout_quantile_threshold`), as an Estimate (Wilson interval), and the threshold ``(t, low, high)``.
    About ``q`` when samples are as novel as real unseen images; well above it when the model copies."""
    t, low, high = heldout_quantile_threshold(heldout_d, q, confidence)
    s = as_1d(sample_d, "sample_d")
    return proportion_estimate(s < t, confidence=confidence), (t, low, high)
