"""Replication rate (Somepalli et al. 2023, "Diffusion Art or Digital Forgery?").

A generated sample *replicates* a training image when its top-1 SSCD cosine similarity to the training set exceeds
0.5 (the paper's threshold; SSCD's own paper reports cosine > 0.75 at about 90% precision for copy detection).
Reported with the mean and the "close tail" of the top-1 score, beside the train-vs-train baseline (each training
image's first non-self neighbour, :func:`diffaudit.index.self_neighbors`).
"""
from __future__ import annotations

import numpy as np

from ..results import Estimate
from ._knn import check_metric
from .stats import as_1d, proportion_estimate

SOMEPALLI_THRESHOLD = 0.5


def replication_rate(top1_sim, threshold: float = SOMEPALLI_THRESHOLD, *, confidence: float = 0.95,
                     method: str = "wilson", n_boot: int = 2000, seed: int = 0) -> Estimate:
    """Fraction of samples whose top-1 cosine similarity to the training set is ``> threshold``, with a CI."""
    s = as_1d(top1_sim, "top1_sim")
    if (s < -1 - 1e-6).any() or (s > 1 + 1e-6).any():
        raise ValueError(f"top1_sim must be cosine similarities in [-1, 1]; got range {s.min():g}..{s.max():g}")
    if not -1.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold={threshold!r} must be a cosine similarity in [-1, 1] (Somepalli et al.: 0.5)")
    return proportion_estimate(s > threshold, confidence=confidence, method=method, n_boot=n_boot, seed=seed)


def top1_summary(scores, metric: str = "cosine") -> tuple[float, float]:
    """``(mean, close_tail)`` of top-1 scores.

    ``close_tail`` is the 95th percentile of similarity for ``metric="cosine"`` and the 5th percentile of distance
    for ``metric="l2"``: in both cases the value that only the closest 5% of samples beat.
    """
    s = as_1d(scores, "scores")
    check_metric(metric)
    q = 95.0 if metric == "cosine" else 5.0
    return float(s.mean()), float(np.percentile(s, q))
