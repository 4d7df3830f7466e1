"""Typed results of an audit (DESIGN.md: results are dataclasses with to_json/from_json, never bare dicts).

``audit.py`` fills these; ``report/`` renders them; ``monitor.py`` reuses ``CheckpointResult``.
Score conventions: for an ``l2`` embedder scores are Euclidean distances (smaller = closer); for a ``cosine``
embedder they are cosine similarities (larger = closer).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ._serial import JsonMixin


@dataclass
class Estimate(JsonMixin):
    """A fraction or mean with a (bootstrap) confidence interval ``[low, high]`` at ``confidence``."""

    value: float
    low: Optional[float] = None
    high: Optional[float] = None
    n: int = 0
    confidence: float = 0.95


@dataclass
class SampleMatch(JsonMixin):
    """One generated sample and its nearest training images (for the report's galleries)."""

    sample_index: int
    sample_path: Optional[str]  # PNG path relative to the audit's output folder, when samples were kept
    neighbor_ids: list[str]  # nearest, second nearest, ... training ids
    scores: list[float]  # matching scores in the embedder's units
    ratio: Optional[float] = None  # d1/d2 (l2 embedders)
    copied: bool = False  # passes this embedder's copy rule


@dataclass
class EmbedderMetrics(JsonMixin):
    """Metrics of one checkpoint's samples under one embedder. None = not applicable / not computed."""

    embedder: str
    metric: str  # "l2" | "cosine"
    threshold: Optional[float]  # copy threshold in score units (cosine) or None
    num_samples: int
    # Gu et al. 2023: fraction of samples with d1/d2 < 1/3 (and < 1/2), l2 embedders
    memorization_ratio: Optional[Estimate] = None
    memorization_ratio_half: Optional[Estimate] = None
    # the same 1/3 rule with d2 = nearest training image that is not a duplicate of the nearest one (training
    # duplicates merged, see diffaudit.metrics.memorization); equals memorization_ratio when train has no duplicates
    memorization_ratio_dedup: Optional[Estimate] = None
    # Somepalli et al. 2023: fraction with top-1 cosine > threshold, cosine embedders
    replication_rate: Optional[Estimate] = None
    top1_mean: Optional[float] = None
    top1_p95: Optional[float] = None  # 95th percentile of similarity (cosine) or 5th percentile of distance (l2)
    train_baseline_top1_mean: Optional[float] = None  # train-vs-train second neighbour (first non-self)
    train_baseline_top1_p95: Optional[float] = None
    # Meehan et al. 2020 C_T (z < 0: samples closer to train than held-out is -> copying); Alaa et al. 2022
    heldout_ct_z: Optional[float] = None
    authenticity: Optional[float] = None  # fraction of samples judged authentic (not copies)
    heldout_top1_mean: Optional[float] = None  # held-out real images' top-1 score to train, same units
    # Carlini et al. 2023 (tiled embedder): fraction of samples with calibrated ratio below its threshold
    extraction_fraction: Optional[Estimate] = None
    calibrated_ratio_median: Optional[float] = None
    top_matches: list[SampleMatch] = field(default_factory=list)  # most-copied samples first


@dataclass
class CheckpointResult(JsonMixin):
    step: int
    path: str
    num_samples: int
    num_nonfinite: int = 0  # NaN/inf samples, detected, counted, not embedded
    metrics: dict[str, EmbedderMetrics] = field(default_factory=dict)  # by embedder name
    loss_train: Optional[float] = None  # denoising loss at fixed timesteps + noise
    loss_heldout: Optional[float] = None
    loss_gap: Optional[float] = None  # heldout - train (> 0: train images fit better)
    membership_auc: Optional[float] = None  # train vs held-out separation by per-image loss (issue 7)
    onset_signal: Optional[Estimate] = None  # the value the onset rule looked at


@dataclass
class ImageRisk(JsonMixin):
    """Per training image, for curators."""

    id: str
    copies: int = 0  # samples (all checkpoints) whose nearest training image is this one and that pass the copy rule
    first_step_copied: Optional[int] = None
    copies_by_step: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0  # other training images within the duplicate threshold
    outlier_score: Optional[float] = None  # mean distance to k nearest training neighbours
    label: str = "inlier"  # "inlier" | "outlier" (outlier_score above the training set's 95th percentile)
    membership_score: Optional[float] = None  # percentile of its loss within held-out losses, lower loss -> higher
    loo_score: Optional[float] = None  # leave-one-out / counterfactual score (issue 7)


@dataclass
class SkippedItem(JsonMixin):
    id: str
    reason: str
    where: str = ""  # "train" | "heldout" | "samples@step" ...


@dataclass
class OnsetInfo(JsonMixin):
    """The onset rule's parameters and what it decided (see diffaudit.monitor.detect_onset)."""

    signal: str  # e.g. "memorization_ratio[pixel-32x32]"
    threshold: float
    patience: int
    confidence: float
    onset_step: Optional[int] = None
    recommended_step: Optional[int] = None
    recommended_reason: str = ""


@dataclass
class Provenance(JsonMixin):
    diffaudit_version: str
    created: str  # ISO time (ignored when comparing runs)
    run: str = ""
    checkpoint_files: dict[str, str] = field(default_factory=dict)  # path -> sha256 of weights
    train: str = ""
    train_fingerprint: str = ""
    heldout: str = ""
    heldout_fingerprint: str = ""
    embedders: list[dict] = field(default_factory=list)
    seed: int = 0
    num_samples: int = 0
    sampler: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)


@dataclass
class AuditResult(JsonMixin):
    checkpoints: list[CheckpointResult]
    onset: OnsetInfo
    images: list[ImageRisk] = field(default_factory=list)
    skipped: list[SkippedItem] = field(default_factory=list)
    provenance: Optional[Provenance] = None
    verdict: str = ""

    @property
    def onset_step(self) -> Optional[int]:
        return self.onset.onset_step

    @property
    def recommended_checkpoint(self) -> Optional[str]:
        for c in self.checkpoints:
            if c.step == self.onset.recommended_step:
                return c.path
        return None

    def to_html(self, path: str, **kw) -> str:
        from .report import render_audit

        return render_audit(self, path, **kw)

    def to_csv(self, path: str) -> None:
        from .report import write_risk_csv

        write_risk_csv(self.images, path)
