"""What counts as a copy: one :class:`CopyRule` per embedder family, as the literature defines it.

An embedder declares its family by name (``Embedder.copy_rule``: ``"gu_ratio"``, ``"replication"`` or
``"extraction"``); :func:`copy_rule` turns that into the rule object. Every place that needs to know "is this sample a
copy, and which number is the onset signal" asks the rule, never the embedder's type:

* :class:`GuRatioRule` -- Gu et al. 2023, "On Memorization in Diffusion Models": a sample is memorized when the
  distance to its nearest training image is under 1/3 of the distance to the second nearest (raw-pixel L2). The
  looser 1/2 ratio and the duplicate-merged ratio (:func:`~diffaudit.metrics.memorization.dedup_second_distance`) are
  reported beside it.
* :class:`ReplicationRule` -- Somepalli et al. 2023, "Diffusion Art or Digital Forgery?": top-1 cosine similarity of
  a copy-detection descriptor (SSCD) above a threshold (the embedder's, else the paper's 0.5).
* :class:`ExtractionRule` -- Carlini et al. 2023, "Extracting Training Data from Diffusion Models": Carlini's
  calibrated tiled-L2 ratio below 1.

A new family is a new subclass registered in :data:`RULES` (see ``docs/architecture.md``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from .extraction import CARLINI_N, CARLINI_THRESHOLD, calibrated_ratio, extraction_fraction
from .memorization import GU_THRESHOLD, HALF_THRESHOLD, dedup_second_distance, memorization_fraction, nn_ratio_from_knn
from .replication import SOMEPALLI_THRESHOLD, replication_rate

#: most training neighbours searched per sample for the duplicate-merged Gu ratio (a larger duplicate group is cut
#: there; the ratio is then over-estimated, never flagged wrongly)
MAX_DEDUP_K = 256


@dataclass
class RuleOutcome:
    """Per-sample result of a copy rule: the estimates to store, who is a copy, and the gallery order."""

    estimates: dict[str, Any]  # EmbedderMetrics field name -> Estimate (or float)
    copied: np.ndarray  # (n,) bool
    rank: np.ndarray  # (n,) smaller = more copy-like
    ratio: np.ndarray  # (n,) d1/d2 (NaN where undefined)


class CopyRule:
    """Base class: ``name`` (JSON / report key), ``signal`` (the EmbedderMetrics field the onset rule reads)."""

    name: str = ""
    signal: str = ""
    #: order in which ``ReferenceSet.primary`` prefers a family (lower first)
    priority: int = 99

    def label(self, embedder_name: str, threshold: Optional[float] = None) -> str:
        raise NotImplementedError

    def neighbours_needed(self, largest_group: int, ntotal: int) -> int:
        """How many nearest training images per sample :meth:`apply` needs."""
        return 2

    def apply(self, d: np.ndarray, scores: np.ndarray, nn: np.ndarray, *, confidence: float,
              threshold: Optional[float] = None, groups: Optional[np.ndarray] = None,
              knn_mean: Optional[np.ndarray] = None) -> RuleOutcome:
        """``d``/``scores``/``nn``: (n, k) distances, raw scores and training rows of each sample's neighbours."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<CopyRule {self.name}>"


class GuRatioRule(CopyRule):
    name, signal, priority = "gu_ratio", "memorization_ratio", 0

    def label(self, embedder_name: str, threshold: Optional[float] = None) -> str:
        return f"Gu et al.'s nearest/second-nearest < 1/3 rule ({embedder_name})"

    def neighbours_needed(self, largest_group: int, ntotal: int) -> int:
        # the duplicate-merged ratio needs neighbours past the nearest image's whole duplicate group
        return int(min(ntotal, max(2, largest_group + 1), MAX_DEDUP_K))

    def apply(self, d, scores, nn, *, confidence, threshold=None, groups=None, knn_mean=None) -> RuleOutcome:
        ratio = nn_ratio_from_knn(d[:, :2])
        est = {
            "memorization_ratio": memorization_fraction(d[:, 0], d[:, 1], GU_THRESHOLD, confidence=confidence),
            "memorization_ratio_half": memorization_fraction(d[:, 0], d[:, 1], HALF_THRESHOLD, confidence=confidence),
        }
        if groups is not None:
            d2 = dedup_second_distance(d, nn, groups)
            est["memorization_ratio_dedup"] = memorization_fraction(d[:, 0], d2, GU_THRESHOLD, confidence=confidence)
        return RuleOutcome(est, ratio < GU_THRESHOLD, ratio, ratio)


class ReplicationRule(CopyRule):
    name, signal, priority = "replication", "replication_rate", 1

    @staticmethod
    def threshold(threshold: Optional[float]) -> float:
        return float(threshold) if threshold is not None else SOMEPALLI_THRESHOLD

    def label(self, embedder_name: str, threshold: Optional[float] = None) -> str:
        return f"top-1 cosine > {self.threshold(threshold):g} ({embedder_name}, Somepalli et al.)"

    def apply(self, d, scores, nn, *, confidence, threshold=None, groups=None, knn_mean=None) -> RuleOutcome:
        thr = self.threshold(threshold)
        top1 = scores[:, 0]
        est = {"replication_rate": replication_rate(top1, thr, confidence=confidence)}
        return RuleOutcome(est, top1 > thr, -top1, nn_ratio_from_knn(d[:, :2]))


class ExtractionRule(CopyRule):
    name, signal, priority = "extraction", "extraction_fraction", 2
    #: Carlini et al.'s neighbourhood size for the calibration mean
    knn_n = CARLINI_N

    def label(self, embedder_name: str, threshold: Optional[float] = None) -> str:
        return f"Carlini et al.'s calibrated tiled L2 < 1 ({embedder_name})"

    def apply(self, d, scores, nn, *, confidence, threshold=None, groups=None, knn_mean=None) -> RuleOutcome:
        if knn_mean is None:
            raise ValueError("the extraction rule needs each training image's mean distance to its nearest neighbours")
        cr = calibrated_ratio(d[:, 0], knn_mean[nn[:, 0]])
        est = {"extraction_fraction": extraction_fraction(cr, CARLINI_THRESHOLD, confidence=confidence),
               "calibrated_ratio_median": float(np.median(cr))}
        return RuleOutcome(est, cr < CARLINI_THRESHOLD, cr, nn_ratio_from_knn(d[:, :2]))


RULES: dict[str, CopyRule] = {r.name: r for r in (GuRatioRule(), ReplicationRule(), ExtractionRule())}


def copy_rule(embedder_or_name: Any) -> CopyRule:
    """The :class:`CopyRule` an embedder declares (``embedder.copy_rule``), or the rule of that name."""
    name = embedder_or_name if isinstance(embedder_or_name, str) else getattr(embedder_or_name, "copy_rule", None)
    if name is None:  # an embedder object outside the Embedder base class: decide by its metric
        name = "gu_ratio" if getattr(embedder_or_name, "metric", "l2") == "l2" else "replication"
    try:
        return RULES[str(name)]
    except KeyError:
        raise ValueError(f"copy_rule={name!r}: unknown copy rule; known rules: {sorted(RULES)}") from None


def rule_by_signal(signal: str) -> Optional[CopyRule]:
    """The rule whose onset signal is the EmbedderMetrics field ``signal`` (None: none)."""
    return next((r for r in RULES.values() if r.signal == signal), None)
