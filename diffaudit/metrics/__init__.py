"""Metrics: pure functions on numpy arrays (and a torch model for the denoising loss), one file per family.

Each function cites its source. Fractions come as :class:`diffaudit.results.Estimate` with a Wilson CI; other
statistics use the percentile bootstrap (:mod:`diffaudit.metrics.stats`).
"""
from __future__ import annotations

from ._knn import knn as nearest_neighbors
from .alignment import ALIGN_THRESHOLD, Aligner, align_view, aligned_similarities, aligned_similarity
from .detection import detection_auc, tpr_at_fpr
from .extraction import (
    CARLINI_ALPHA,
    CARLINI_N,
    CARLINI_THRESHOLD,
    calibrated_ratio,
    extraction_fraction,
    sample_knn_mean,
    train_knn_mean,
)
from .heldout import (
    HELDOUT_QUANTILE,
    assign_cells,
    authenticity,
    ct_statistic,
    data_copying_test,
    heldout_calibrated_rate,
    heldout_quantile_threshold,
    kmeans_cells,
    mann_whitney_z,
)
from .loss import denoising_losses, loss_gap, membership_auc, membership_percentile
from .memorization import (
    GU_THRESHOLD,
    dedup_second_distance,
    memorization_fraction,
    nn_ratio,
    nn_ratio_from_knn,
)
from .per_image import CopyCount, copies_per_image, outlier_labels, outlier_scores
from .rules import RULES, CopyRule, copy_rule
from .replication import SOMEPALLI_THRESHOLD, replication_rate, top1_summary
from .stats import bootstrap_ci, proportion_estimate, wilson_interval

__all__ = [
    "ALIGN_THRESHOLD",
    "Aligner",
    "align_view",
    "aligned_similarities",
    "aligned_similarity",
    "detection_auc",
    "tpr_at_fpr",
    "HELDOUT_QUANTILE",
    "heldout_calibrated_rate",
    "heldout_quantile_threshold",
    "CARLINI_ALPHA",
    "CARLINI_N",
    "CARLINI_THRESHOLD",
    "GU_THRESHOLD",
    "SOMEPALLI_THRESHOLD",
    "CopyCount",
    "CopyRule",
    "RULES",
    "copy_rule",
    "assign_cells",
    "authenticity",
    "bootstrap_ci",
    "calibrated_ratio",
    "copies_per_image",
    "ct_statistic",
    "data_copying_test",
    "dedup_second_distance",
    "denoising_losses",
    "extraction_fraction",
    "kmeans_cells",
    "loss_gap",
    "mann_whitney_z",
    "membership_auc",
    "membership_percentile",
    "memorization_fraction",
    "nearest_neighbors",
    "nn_ratio",
    "nn_ratio_from_knn",
    "outlier_labels",
    "outlier_scores",
    "proportion_estimate",
    "replication_rate",
    "sample_knn_mean",
    "top1_summary",
    "train_knn_mean",
    "wilson_interval",
]
