"""Exact brute-force k-nearest-neighbour search in numpy, used by the metrics that need neighbours *within* a set.

Kept independent of ``diffaudit.index`` on purpose (metrics are a pure functional core). Candidates are found
with a chunked float32 matrix product (||q||^2 + ||b||^2 - 2 q.b) and then re-scored exactly in float64, so exact
and near duplicates get exact (zero / tiny) distances instead of cancellation noise.
"""
from __future__ import annotations

import numpy as np

_METRICS = ("l2", "cosine")
_CHUNK_BYTES = 64 * 2**20  # size of one (queries x base) float32 block of scores


def as_vectors(x, name: str) -> np.ndarray:
    """Validate a 2-D finite float array (n, d); name the argument in errors."""
    a = np.asarray(x)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (n, dim); got shape {a.shape}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"{name} must be non-empty; got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float64)
    bad = ~np.isfinite(a).all(axis=1)
    if bad.any():
        raise ValueError(f"{name} has {int(bad.sum())} rows with NaN/inf values (first at row {int(np.argmax(bad))})")
    return a


def check_metric(metric: str) -> str:
    if metric not in _METRICS:
        raise ValueError(f"metric={metric!r} is not supported; allowed: {', '.join(_METRICS)}")
    return metric


def _normalize(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64, copy=False)
    norm = np.linalg.norm(a, axis=1, keepdims=True)
    return a / np.where(norm > 0, norm, 1.0)


def _exact(q: np.ndarray, b: np.ndarray, metric: str) -> np.ndarray:
    """Exact distances between q[i] and b[i, j] (q: (n, d), b: (n, m, d)) -> (n, m)."""
    q = q.astype(np.float64, copy=False)
    b = b.astype(np.float64, copy=False)
    if metric == "l2":
        diff = b - q[:, None, :]
        return np.sqrt(np.einsum("nmd,nmd->nm", diff, diff))
    return np.clip(1.0 - np.einsum("nmd,nd->nm", b, q), 0.0, 2.0)


def knn(queries, base, k: int, *, metric: str = "l2", exclude_self: bool = False,
        queries_name: str = "queries", base_name: str = "base") -> tuple[np.ndarray, np.ndarray]:
    """k nearest rows of ``base`` for each row of ``queries``: (distances, indices), ascending distance.

    ``metric="l2"``: Euclidean distance. ``metric="cosine"``: cosine *distance* 1 - cos (vectors are normalised here).
    ``exclude_self=True`` (queries must be base): row i never returns itself; an exact duplicate of i is still a
    neighbour (distance 0), which is what within-set statistics need.
    """
    check_metric(metric)
    q = as_vectors(queries, queries_name)
    b = q if (exclude_self and queries is base) else as_vectors(base, base_name)
    if q.shape[1] != b.shape[1]:
        raise ValueError(f"{queries_name} has dim {q.shape[1]} but {base_name} has dim {b.shape[1]}")
    if exclude_self and q.shape[0] != b.shape[0]:
        raise ValueError("exclude_self=True needs queries and base to be the same set")
    avail = b.shape[0] - (1 if exclude_self else 0)
    if not 1 <= k <= avail:
        raise ValueError(f"k={k} must be between 1 and {avail} (the number of {'other ' if exclude_self else ''}"
                         f"rows in {base_name})")
    if metric == "cosine":
        q, b = _normalize(q), _normalize(b)
    bf = b.astype(np.float32, copy=False)
    bsq = np.einsum("ij,ij->i", bf, bf)
    # candidates: a few more than needed, so exact re-scoring can fix float32 near-ties
    kc = min(avail + (1 if exclude_self else 0), k + (1 if exclude_self else 0) + 4)
    rows = max(1, min(_CHUNK_BYTES // (4 * b.shape[0]), _CHUNK_BYTES // (8 * kc * b.shape[1])))
    out_d = np.empty((q.shape[0], k))
    out_i = np.empty((q.shape[0], k), dtype=np.int64)
    for s in range(0, q.shape[0], rows):
        qc = q[s:s + rows]
        qf = qc.astype(np.float32)
        if metric == "l2":
            score = bsq[None, :] - 2.0 * (qf @ bf.T)  # + ||q||^2, constant per row
        else:
            score = -(qf @ bf.T)
        if kc < b.shape[0]:
            cand = np.argpartition(score, kc - 1, axis=1)[:, :kc]
        else:
            cand = np.broadcast_to(np.arange(b.shape[0]), (qc.shape[0], b.shape[0])).copy()
        d = _exact(qc, b[cand], metric)
        if exclude_self:
            own = np.arange(s, s + qc.shape[0])[:, None]
            d = np.where(cand == own, np.inf, d)
        order = np.lexsort((cand, d), axis=1)[:, :k]  # by distance, ties by index (deterministic)
        out_d[s:s + rows] = np.take_along_axis(d, order, axis=1)
        out_i[s:s + rows] = np.take_along_axis(cand, order, axis=1)
    return out_d, out_i
