"""Per training image: how often and from when it is copied, and how much of an outlier it is.

Flagged images get an inlier/outlier label so that memorization is not confused with high leverage: an isolated
image far from the rest of the data is easy to "copy" by chance and scores high on leave-one-out style measures
(van den Burg & Williams 2021 and the debate around it). The outlier score is the mean distance to the k nearest
other training images; the label is "outlier" above the training set's 95th percentile of that score.
"""
from __future__ import annotations

from typing import Hashable, NamedTuple, Optional, Sequence

import numpy as np

from ._knn import knn
from .stats import as_1d


class CopyCount(NamedTuple):
    copies: int  # samples (all checkpoints) whose nearest training image is this one and that pass the copy rule
    first_step: Optional[int]  # smallest checkpoint step with a copy
    copies_by_step: dict[str, int]  # step (as str, JSON key) -> copies at that step


def copies_per_image(nn_ids: Sequence[Hashable], copied_mask, steps) -> dict[Hashable, CopyCount]:
    """Count copies per training id.

    ``nn_ids[j]``: nearest training id of sample j; ``copied_mask[j]``: sample j passes the copy rule; ``steps[j]``:
    checkpoint step of sample j. Only ids with at least one copy appear; ``copies_by_step`` is ordered by step.
    """
    ids = list(nn_ids)
    mask = np.asarray(copied_mask)
    st = np.asarray(steps)
    if mask.shape != (len(ids),) or st.shape != (len(ids),):
        raise ValueError(f"nn_ids, copied_mask and steps must have the same length; got {len(ids)}, "
                         f"{mask.shape}, {st.shape}")
    if mask.dtype != bool:
        if len(ids) and not np.isin(mask, (0, 1)).all():
            raise ValueError("copied_mask must be boolean")
        mask = mask.astype(bool)
    acc: dict[Hashable, dict[int, int]] = {}
    for j in np.flatnonzero(mask):
        by = acc.setdefault(ids[j], {})
        s = int(st[j])
        by[s] = by.get(s, 0) + 1
    return {i: CopyCount(sum(by.values()), min(by), {str(s): by[s] for s in sorted(by)}) for i, by in acc.items()}


def outlier_scores(train_vectors, k: int = 5, *, metric: str = "l2") -> np.ndarray:
    """Mean distance of each training vector to its ``k`` nearest *other* training vectors (exact, brute force).

    Exact duplicates count as neighbours (distance 0). ``metric="cosine"`` uses 1 - cosine similarity.
    ``k`` is reduced to ``n - 1`` for tiny sets.
    """
    t = np.asarray(train_vectors)
    if t.ndim != 2 or t.shape[0] < 2:
        raise ValueError(f"train_vectors must be (n >= 2, dim); got shape {t.shape}")
    if int(k) < 1:
        raise ValueError(f"k={k!r} must be >= 1")
    d, _ = knn(t, t, min(int(k), t.shape[0] - 1), metric=metric, exclude_self=True,
               queries_name="train_vectors", base_name="train_vectors")
    return d.mean(axis=1)


def outlier_labels(scores, quantile: float = 0.95) -> np.ndarray:
    """``"outlier"`` where the score is strictly above the ``quantile`` of all scores, else ``"inlier"``."""
    s = as_1d(scores, "scores")
    if not 0.0 < float(quantile) < 1.0:
        raise ValueError(f"quantile={quantile!r} must be strictly between 0 and 1 (default 0.95)")
    return np.where(s > np.quantile(s, quantile), "outlier", "inlier")
