"""Every result type of diffaudit: dataclasses with ``to_json`` / ``from_json``, never bare dicts.

The engines fill these (``audit``, ``MemorizationMonitor``, ``find_duplicates``, ``match``, ``membership_scores``,
``loo_scores``); ``report/`` renders them. This module is the foundation layer: it imports nothing else of diffaudit
except its serialisation helpers; ``to_html`` methods are thin calls into ``report/`` (imported when called).
Score conventions: for an ``l2`` embedder scores are Euclidean distances (smaller = closer); for a ``cosine``
embedder they are cosine similarities (larger = closer).
"""
from __future__ import annotations

from dataclasses import dataclass, field
import os
from typing import Any, Optional

import numpy as np

from ._serial import JsonMixin, write_csv

#: labels of the leave-one-out table (``LooImage.label``)
LOO_LABELS = ("memorized inlier", "memorized outlier", "hard outlier", "typical", "unscored")


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
    prompt: Optional[str] = None  # the caption a text-to-image sample was generated from


@dataclass
class EmbedderQuality(JsonMixin):
    """Sample quality of one checkpoint under one embedder, against real images (``diffaudit.metrics.quality``).

    ``reference``: "heldout" (the held-out set) or "train" (no held-out set: quality against the training set, where
    copies score well). ``fd``: Frechet distance of the samples with a bootstrap CI. ``fd_floor``: FD of ``floor_n``
    training images against the held-out set (what real data reaches), beside ``fd_at_floor_n``, the samples' FD at
    the same n (FD is biased by n). Precision / recall (Kynkaanniemi et al. 2019), density / coverage (Naeem et
    al. 2020), k = 5."""

    reference: str
    num_real: int
    fd: Optional[Estimate] = None
    fd_floor: Optional[float] = None
    floor_n: int = 0
    fd_at_floor_n: Optional[float] = None
    precision: Optional[Estimate] = None
    recall: Optional[Estimate] = None
    density: Optional[Estimate] = None
    coverage: Optional[Estimate] = None


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
    # a copy threshold calibrated on the data (diffaudit.metrics.heldout_quantile_threshold): the score only 1% of
    # held-out real images reach, its order-statistic CI, and the fraction of samples beyond it (~1% if novel);
    # reported beside the literature's fixed thresholds, never replacing them
    heldout_calibrated_threshold: Optional[float] = None
    heldout_calibrated_threshold_ci: Optional[list[Optional[float]]] = None
    heldout_calibrated_rate: Optional[Estimate] = None
    # Carlini et al. 2023 (tiled embedder): fraction of samples with calibrated ratio below its threshold
    extraction_fraction: Optional[Estimate] = None
    calibrated_ratio_median: Optional[float] = None
    top_matches: list[SampleMatch] = field(default_factory=list)  # most-copied samples first
    quality: Optional[EmbedderQuality] = None  # sample quality against real images (generalization)


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
    membership_auc: Optional[float] = None  # train vs held-out separation by per-image loss
    onset_signal: Optional[Estimate] = None  # the value the onset rule looked at
    failed: str = ""  # why the checkpoint could not be evaluated (e.g. every sample NaN/inf); "" = evaluated
    grid: list[str] = field(default_factory=list)  # kept PNGs of the first samples (same seeds at every checkpoint)
    final: bool = False  # the run root's final model: saved after the last checkpoint, at a step the run does not record
    prompts: list[PromptScore] = field(default_factory=list)  # text-to-image runs: per prompt score and copies
    prompt_detection: Optional[PromptDetection] = None


@dataclass
class PromptScore(JsonMixin):
    """One prompt at one checkpoint: Wen et al.'s (ICLR 2024) memorization score -- the magnitude of the
    text-conditional noise prediction ``||eps(x_t, prompt) - eps(x_t, "")||`` over the first sampling steps, mean over
    generations -- beside the copies the audit found among that prompt's samples."""

    prompt: str
    score: Optional[float] = None  # mean over generations (None: not computed)
    generations: list[float] = field(default_factory=list)  # the score of each generation (seed)
    samples: int = 0  # this prompt's finite samples in the audit
    copies: int = 0  # of them, copies under the primary embedder's rule


@dataclass
class PromptDetection(JsonMixin):
    """How well the prompt score separates prompts whose samples copy (positives) from the others, at one
    checkpoint: ROC AUC and the true-positive rate at 1% false positives (Wen et al.'s figures)."""

    positives: int
    negatives: int
    auc: Optional[float] = None  # None when either class is empty
    tpr_at_1pct_fpr: Optional[float] = None


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
    loo_score: Optional[float] = None  # leave-one-out / counterfactual score
    caption: Optional[str] = None  # its training caption (text-to-image: metadata.jsonl)

    @staticmethod
    def sort_key(r: "ImageRisk"):
        """The one risk order (audit.json, report, CSV): most copied first, then copied earliest, then most
        member-like, then most outlying, then id."""
        first = r.first_step_copied if r.first_step_copied is not None else float("inf")
        mem = r.membership_score if r.membership_score is not None and r.membership_score == r.membership_score else 0.0
        out = r.outlier_score if r.outlier_score is not None and r.outlier_score == r.outlier_score else 0.0
        return (-int(r.copies or 0), first, -float(mem), -float(out), str(r.id))


@dataclass
class Skipped(JsonMixin):
    """An input left out, and why: ``id`` (image id, file, or what was skipped), ``reason``, and ``where`` it
    belongs ("train", "heldout", "samples@<step>", "loss@<step>", "checkpoints", "images", ...; "" when the
    container says it). Unpacks as ``(id, reason)``."""

    id: str
    reason: str
    where: str = ""

    def __iter__(self):
        return iter((self.id, self.reason))

    def __getitem__(self, i):
        return (self.id, self.reason)[i]

    @property
    def path(self) -> str:
        """The id, for items that are files (checkpoint folders)."""
        return self.id

    @staticmethod
    def unique(items, where: Optional[str] = None) -> list["Skipped"]:
        """``items`` (Skipped, or ``(id, reason)`` pairs) once per ``(id, where)``, in order; ``where`` replaces
        each item's place when given."""
        out: dict = {}
        for s in items or []:
            sk = s if isinstance(s, Skipped) else Skipped(str(s[0]), str(s[1]))
            sk = sk.at(where) if where is not None else sk
            out.setdefault((sk.id, sk.where), sk)
        return list(out.values())

    def at(self, where: str) -> "Skipped":
        """The same item, placed in ``where``."""
        return Skipped(self.id, self.reason, where)


#: the former name of :class:`Skipped` (JSON files are unchanged)
SkippedItem = Skipped


@dataclass
class OnsetInfo(JsonMixin):
    """The onset rule's parameters and what it decided (:mod:`diffaudit.onset`).

    ``signal`` is display text (e.g. ``"memorization_ratio[pixel-32x32]"``); what it is made of is in
    ``copy_rule`` (the :class:`~diffaudit.metrics.rules.CopyRule` name), ``signal_metric`` (the EmbedderMetrics field)
    and ``signal_embedder`` (the embedder name)."""

    signal: str
    threshold: float
    patience: int
    confidence: float
    onset_step: Optional[int] = None
    recommended_step: Optional[int] = None
    recommended_reason: str = ""
    copy_rule: str = ""
    signal_metric: str = ""
    signal_embedder: str = ""
    tau_gen: Optional[int] = None  # when sample quality reached its plateau (diffaudit.onset.tau_gen)
    window_empty: bool = False  # memorization started before quality plateaued: no step in [tau_gen, onset)
    copying_step: Optional[int] = None  # first checkpoint showing copies (CI low > threshold), confirmed or not
    # the level of memorization the evidence shows (diffaudit.onset.memorization_level): "copies" (a copy rule's
    # onset is confirmed), "fits" (memorizes without copying yet: membership / held-out comparison say the model
    # fits its training images far more tightly than held-out ones), "generalizes" (neither); "" = not assessed
    level: str = ""
    fit_step: Optional[int] = None  # first checkpoint of the confirmed "fits" level (same patience as the onset)
    fit_signals: list[str] = field(default_factory=list)  # what says so, with the numbers, at the last checkpoint

    def __post_init__(self) -> None:
        # results written before the structured fields existed: read them off the display text "metric[embedder]"
        if not self.signal_metric and self.signal:
            head, sep, rest = self.signal.partition("[")
            if head.strip().isidentifier():
                self.signal_metric = head.strip()
                self.signal_embedder = rest[:-1] if sep and rest.endswith("]") else ""


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
    skipped: list[Skipped] = field(default_factory=list)
    provenance: Optional[Provenance] = None
    verdict: str = ""
    warnings: list[str] = field(default_factory=list)  # what makes the numbers less trustworthy (a leaky split, ...)

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
        """The per-training-image risk table, all rows, in :meth:`ImageRisk.sort_key` order."""
        write_risk_csv(self.images, path)


def write_risk_csv(images, path: str | os.PathLike) -> str:
    """Write the per-training-image risk table to ``path`` as CSV (all rows, highest risk first); return the path.
    Text cells that a spreadsheet would read as a formula get a leading ``'``; numbers are written as numbers."""
    rows = list(images)
    for r in rows:
        if not isinstance(r, ImageRisk):
            raise TypeError(f"images: expected ImageRisk rows, got {type(r).__name__}")
    rows.sort(key=ImageRisk.sort_key)
    write_csv(path, ["id", "copies", "first_step_copied", "duplicates", "outlier_score", "label", "membership_score",
                     "loo_score", "copies_by_step", "caption"],
              [[r.id, r.copies, r.first_step_copied, r.duplicates, r.outlier_score, r.label, r.membership_score,
                r.loo_score, " ".join(f"{k}:{v}" for k, v in r.copies_by_step.items()), r.caption or ""]
               for r in rows])
    return str(path)


# ------------------------------------------------------------------------------------------------ curator API


@dataclass
class DuplicatePair(JsonMixin):
    """Two images within the duplicate threshold; ``score`` in the embedder's units (L2 distance or cosine).

    ``transform``: ``""`` when the images were compared as they are, ``"hflip"`` when ``id_a`` mirrored left-right
    is what matched ``id_b`` (the pixel embedder's ``hflip`` invariance), ``"identical file"`` when the two files
    have the same bytes (found by the exact-bytes pre-pass, embedded once)."""

    id_a: str
    id_b: str
    score: float
    transform: str = ""


@dataclass
class DuplicateReport(JsonMixin):
    """Duplicates found in one image set.

    ``pairs`` are sorted closest first; ``clusters`` are the connected components of the pairs (largest first,
    members in image-set order). ``threshold`` is in score units (L2 distance: pairs <= threshold; cosine: pairs >=
    threshold), ``threshold_rule`` says how it was chosen. ``skipped`` lists images that could not be decoded.
    ``invariances``: what the comparison ignored (pixel embedder: ``"brightness"``, ``"hflip"``; module docstring).
    """

    pairs: list[DuplicatePair]
    clusters: list[list[str]]
    threshold: Optional[float]
    embedder: str
    metric: str
    num_images: int
    skipped: list[Skipped] = field(default_factory=list)
    threshold_rule: str = ""
    k: int = 10
    source: str = ""
    invariances: list[str] = field(default_factory=list)

    @property
    def num_duplicates(self) -> int:
        """Images that could be removed keeping one per cluster."""
        return sum(len(c) - 1 for c in self.clusters)

    def cluster_of(self) -> dict[str, int]:
        """id -> cluster number, for ids in a cluster."""
        return {i: c for c, members in enumerate(self.clusters) for i in members}

    def to_csv(self, path: str | os.PathLike | None = None) -> str:
        """One row per pair: ``id_a,id_b,score,cluster,transform``. Cells that a spreadsheet would run as a formula are
        prefixed with ``'`` (OWASP CSV injection)."""
        cl = self.cluster_of()
        return write_csv(path, ["id_a", "id_b", "score", "cluster", "transform"],
                         [[p.id_a, p.id_b, p.score, cl.get(p.id_a), p.transform] for p in self.pairs])

    def to_html(self, path: str | os.PathLike | None = None, images=None, *, max_clusters: int = 200,
                max_per_cluster: int = 24, thumb: int = 96) -> str:
        """Self-contained HTML gallery of the clusters (thumbnails inlined). ``images``: the ImageSet the report
        was made from (default: the one given to :func:`find_duplicates`, or the folder in ``source``)."""
        from .report.gallery import render_duplicates

        return render_duplicates(self, images, path=path, max_clusters=max_clusters, max_per_cluster=max_per_cluster,
                                 thumb=thumb)


@dataclass
class ScoreSummary(JsonMixin):
    """Distribution of a score: mean and 5th/50th/95th percentiles over ``n`` values."""

    mean: float
    p05: float
    p50: float
    p95: float
    n: int

    @classmethod
    def of(cls, values) -> "ScoreSummary | None":
        v = np.asarray(values, dtype=np.float64)
        v = v[np.isfinite(v)]
        if len(v) == 0:
            return None
        p05, p50, p95 = np.percentile(v, [5, 50, 95])
        return cls(float(v.mean()), float(p05), float(p50), float(p95), int(len(v)))


@dataclass
class Matches(JsonMixin):
    """For each query, its nearest reference images (closest first) and their scores.

    ``reference_ids[i]`` / ``scores[i]`` belong to ``query_ids[i]`` (shorter than ``k`` only when the reference set
    is smaller). ``baseline`` summarises the reference set's own nearest-neighbour scores (each reference image to
    its nearest *other* reference image: the "second neighbour" of a reference image searched against its own set),
    i.e. how close distinct reference images already are to each other.
    """

    query_ids: list[str]
    reference_ids: list[list[str]]
    scores: list[list[float]]
    embedder: str
    metric: str
    k: int
    baseline: Optional[ScoreSummary] = None
    num_reference: int = 0
    skipped: list[Skipped] = field(default_factory=list)
    query_source: str = ""
    reference_source: str = ""

    def top1(self) -> list[tuple[str, str | None, float | None]]:
        """(query id, nearest reference id, score) per query."""
        return [(q, r[0] if r else None, s[0] if s else None)
                for q, r, s in zip(self.query_ids, self.reference_ids, self.scores)]

    def closer_than_baseline(self) -> list[str]:
        """Queries whose nearest reference image is closer than 95% of reference images are to their own nearest
        neighbour (l2: top-1 distance < baseline p05; cosine: top-1 similarity > baseline p95)."""
        if self.baseline is None:
            return []
        out = []
        for q, s in zip(self.query_ids, self.scores):
            if not s:
                continue
            if (self.metric == "l2" and s[0] < self.baseline.p05) or (
                    self.metric == "cosine" and s[0] > self.baseline.p95):
                out.append(q)
        return out

    def to_csv(self, path: str | os.PathLike | None = None) -> str:
        """One row per (query, rank): ``query_id,rank,reference_id,score`` (rank 1 = nearest)."""
        rows = [[q, r + 1, ref, s] for q, refs, sc in zip(self.query_ids, self.reference_ids, self.scores)
                for r, (ref, s) in enumerate(zip(refs, sc))]
        return write_csv(path, ["query_id", "rank", "reference_id", "score"], rows)

    def to_html(self, path: str | os.PathLike | None = None, queries=None, reference=None, *, max_rows: int = 200,
                thumb: int = 96) -> str:
        """Self-contained HTML: each query beside its nearest reference images (thumbnails inlined)."""
        from .report.gallery import render_matches

        return render_matches(self, queries, reference, path=path, max_rows=max_rows, thumb=thumb)


# ------------------------------------------------------------------------------------------ membership scores


@dataclass
class MembershipCheckpoint(JsonMixin):
    """Train vs held-out separation at one checkpoint."""

    step: int
    path: str
    auc: float  # Mann-Whitney AUC of "lower loss = member" (0.5 = none, 1 = perfect)
    loss_train: float  # mean denoising loss of the training images
    loss_heldout: float
    loss_gap: float  # heldout - train (> 0: training images are fit better)


@dataclass
class MembershipImage(JsonMixin):
    """One training image: its loss and calibrated score at the last scored checkpoint."""

    id: str
    loss: float
    score: float  # fraction of held-out losses greater than this image's loss (ties 1/2); 1.0 = most member-like
    loss_by_step: dict[str, float] = field(default_factory=dict)  # when several checkpoints were scored
    score_by_step: dict[str, float] = field(default_factory=dict)


@dataclass
class MembershipResult(JsonMixin):
    """Output of :func:`membership_scores`: per-checkpoint AUC and per-training-image scores."""

    checkpoints: list[MembershipCheckpoint]
    images: list[MembershipImage]  # training images in the order of the training set
    heldout_ids: list[str] = field(default_factory=list)
    heldout_losses: list[float] = field(default_factory=list)  # at the last scored checkpoint
    timesteps: list[int] = field(default_factory=lambda: [100])
    noise_draws: int = 4
    seed: int = 0
    model: str = ""
    train: str = ""
    heldout: str = ""
    skipped: list[Skipped] = field(default_factory=list)

    @property
    def auc(self) -> Optional[float]:
        """AUC at the last scored checkpoint."""
        return self.checkpoints[-1].auc if self.checkpoints else None

    @property
    def scores(self) -> dict[str, float]:
        """``{training id: calibrated score}`` at the last scored checkpoint."""
        return {im.id: im.score for im in self.images}

    def to_csv(self, path: str | os.PathLike) -> str:
        """Per training image, most member-like first: id, loss, score, then loss/score per step when several
        checkpoints were scored. Formula-like text cells get a leading ``'`` (CSV injection)."""
        steps = [str(c.step) for c in self.checkpoints] if len(self.checkpoints) > 1 else []
        rows = [[im.id, im.loss, im.score] + [im.loss_by_step.get(s) for s in steps]
                + [im.score_by_step.get(s) for s in steps]
                for im in sorted(self.images, key=lambda r: (-r.score, r.loss, r.id))]
        write_csv(path, ["id", "loss", "score"] + [f"loss@{s}" for s in steps] + [f"score@{s}" for s in steps], rows)
        return str(path)


# ------------------------------------------------------------------------------------------------ leave-one-out


@dataclass
class LooRun(JsonMixin):
    name: str  # manifest key
    model: str  # what was loaded (run root, model class)
    checkpoint: str  # checkpoint path used
    step: int
    n_seen: int  # training images (present in the training set) this run saw
    loss_seen: Optional[float] = None  # mean loss of the images it saw
    loss_unseen: Optional[float] = None


@dataclass
class LooImage(JsonMixin):
    id: str
    loo_score: Optional[float]  # loss_out - loss_in (None when unscored)
    n_in: int  # runs that saw the image
    n_out: int
    loss_in: Optional[float]
    loss_out: Optional[float]
    loss_ratio: Optional[float]  # loss_out / loss_in (capped at 1e12)
    memorized: bool
    outlier_score: float  # mean pixel L2 distance to the outlier_k nearest other training images
    outlier: bool
    label: str  # one of LOO_LABELS
    copies: Optional[int] = None  # samples copying it (from an audit), when given


@dataclass
class LooResult(JsonMixin):
    images: list[LooImage]  # highest loo_score first, unscored last
    runs: list[LooRun]
    rule: str  # how "memorized" was decided
    threshold: Optional[float]  # loo_score threshold (rules "mad" / absolute), or None (ratio rule)
    min_ratio: Optional[float]  # loss_out / loss_in threshold (ratio rule), or None
    outlier_cut: float  # outlier_score above this -> outlier
    outlier_k: int = 5
    outlier_quantile: float = 0.95
    timesteps: list[int] = field(default_factory=lambda: [100])
    noise_draws: int = 4
    seed: int = 0
    n_seen_by_all: int = 0  # unscored: every run saw them
    n_seen_by_none: int = 0  # unscored: no run saw them
    unknown_ids: list[str] = field(default_factory=list)  # manifest ids not in the training set (strict=False)
    manifest: str = ""
    train: str = ""
    train_fingerprint: str = ""
    skipped: list[Skipped] = field(default_factory=list)
    losses: list[list[float]] = field(default_factory=list)  # [image][run] loss, images in training-set order
    loss_ids: list[str] = field(default_factory=list)  # row ids of `losses`
    seconds: float = 0.0

    @property
    def scores(self) -> dict[str, Optional[float]]:
        """``{training id: loo_score}`` (None when unscored) - e.g. for ``ImageRisk.loo_score``."""
        return {im.id: im.loo_score for im in self.images}

    def counts(self) -> dict[str, int]:
        out = {lab: 0 for lab in LOO_LABELS}
        for im in self.images:
            out[im.label] = out.get(im.label, 0) + 1
        return out

    def summary(self) -> str:
        c = self.counts()
        scored = len(self.images) - c["unscored"]
        parts = [f"{c[lab]} {lab}" for lab in LOO_LABELS if c[lab]]
        return (f"{scored} of {len(self.images)} training images scored over {len(self.runs)} runs: "
                + ", ".join(parts) + f" (memorized: {self.rule})")

    def to_csv(self, path: str | os.PathLike) -> str:
        write_csv(path, ["id", "label", "loo_score", "loss_ratio", "n_in", "n_out", "loss_in", "loss_out",
                         "outlier_score", "outlier", "memorized", "copies"],
                  [[im.id, im.label, im.loo_score, im.loss_ratio, im.n_in, im.n_out, im.loss_in, im.loss_out,
                    im.outlier_score, int(im.outlier), int(im.memorized), im.copies] for im in self.images])
        return str(path)

    def to_html(self, path: str | os.PathLike, images: Any = None, **kw) -> str:
        from .report.loo import render_loo

        return render_loo(self, path, images=images, **kw)


# ------------------------------------------------------------------------------------------ disjoint-split test


@dataclass
class CompareCheckpoint(JsonMixin):
    """One matched step of the disjoint-split test (:func:`diffaudit.compare.compare_runs`)."""

    step: int
    num_samples: int  # seeds with finite samples in both runs
    agreement: Estimate  # share of seeds whose two samples are closer to each other than to any training image
    copies_a: Estimate  # share of A's samples copying an image of A's training set (Gu et al.'s 1/3 rule)
    copies_b: Estimate
    median_distance_ab: Optional[float] = None
    median_distance_train: Optional[float] = None  # median distance to the nearest training image of either set
    num_nonfinite: int = 0


@dataclass
class CompareResult(JsonMixin):
    """The disjoint-split test over the steps both runs have (Kadkhodaie et al. 2024)."""

    checkpoints: list[CompareCheckpoint]
    embedder: str
    num_samples: int
    seed: int
    run_a: str = ""
    run_b: str = ""
    train_a: str = ""
    train_b: str = ""
    num_train_a: int = 0
    num_train_b: int = 0
    shared_train_images: int = 0  # identical images in both training sets (0 for a disjoint split)

    def to_html(self, path: str | os.PathLike | None = None) -> str:
        from .report.compare import render_compare

        return render_compare(self, path=path)
