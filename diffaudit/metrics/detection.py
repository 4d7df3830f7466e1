"""Scoring a detector: ROC AUC and the true-positive rate at a fixed false-positive rate.

Wen, Liu, Chen & Lyu (ICLR 2024), "Detecting, Explaining, and Mitigating Memorization in Diffusion Models", report
both for their prompt score (memorized vs. non-memorized prompts): AUC and TPR at 1% FPR. Higher score = more
likely positive.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from .stats import as_1d


def detection_auc(positive_scores, negative_scores) -> Optional[float]:
    """P(score of a random positive > score of a random negative), ties counting 1/2 (the Mann-Whitney U / (m n)).
    None when either set is empty."""
    from scipy.stats import rankdata

    pos = as_1d(positive_scores, "positive_scores", allow_empty=True)
    neg = as_1d(negative_scores, "negative_scores", allow_empty=True)
    if pos.size == 0 or neg.size == 0:
        return None
    r = rankdata(np.concatenate([pos, neg]))
    return float((r[:pos.size].sum() - pos.size * (pos.size + 1) / 2.0) / (pos.size * neg.size))


def tpr_at_fpr(positive_scores, negative_scores, fpr: float = 0.01) -> Optional[float]:
    """Fraction of positives scoring above the threshold at which at most ``fpr`` of the negatives do.

    The threshold is the ``floor(fpr * n)``-th largest negative score (0-based), so with fewer than ``1 / fpr``
    negatives it is the largest negative: a positive counts only when it beats every negative. None when either set
    is empty."""
    if not 0 <= float(fpr) < 1:
        raise ValueError(f"fpr={fpr!r} must be a fraction in [0, 1)")
    pos = as_1d(positive_scores, "positive_scores", allow_empty=True)
    neg = as_1d(negative_scores, "negative_scores", allow_empty=True)
    if pos.size == 0 or neg.size == 0:
        return None
    desc = np.sort(neg)[::-1]
    thr = desc[min(int(np.floor(float(fpr) * neg.size)), neg.size - 1)]
    return float(np.mean(pos > thr))
