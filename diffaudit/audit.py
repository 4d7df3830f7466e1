"""audit(): sample every checkpoint -> embed -> search the training set -> metrics -> onset -> AuditResult.

The work that depends only on the training (and held-out) data -- embeddings, FAISS index, train-vs-train
neighbours, outlier scores, duplicate counts -- is done once by :class:`ReferenceSet`; each checkpoint is then
evaluated by :func:`evaluate_samples` (and the denoising-loss pass). :class:`diffaudit.monitor.MemorizationMonitor`
uses the same two pieces during training, and the same onset rule (:func:`diffaudit.monitor.detect_onset`).
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import os
import shutil
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from .results import (
    AuditResult,
    CheckpointResult,
    EmbedderMetrics,
    Estimate,
    ImageRisk,
    OnsetInfo,
    Provenance,
    SampleMatch,
    SkippedItem,
)

log = logging.getLogger(__name__)

# Literature constants (DESIGN.md)
GU_RATIO = 1.0 / 3.0  # Gu et al. 2023
HALF_RATIO = 0.5
CARLINI_N = 50  # Carlini et al. 2023: n nearest neighbours in the calibrated ratio
#: most training neighbours searched per sample for the duplicate-merged Gu ratio (a larger duplicate group is cut
#: there; dedup_second_distance then uses the last distance: the ratio is over-estimated, never flagged wrongly)
MAX_DEDUP_K = 256


# ---------------------------------------------------------------------------------------------------------------
# configuration


@dataclass
class AuditConfig:
    """Everything an audit needs; YAML presets in ``configs/`` set these keys (unknown keys are errors)."""

    run: Optional[list[str]] = None  # run folder, pipeline folder(s) or .safetensors files
    train: Optional[str] = None
    heldout: Optional[str] = None
    embedders: list[str] = field(default_factory=lambda: ["pixel"])
    weights: dict[str, str] = field(default_factory=dict)  # embedder spec -> local weights file
    num_samples: int = 256
    seed: int = 0
    num_inference_steps: int = 50
    sampler: str = "ddim"  # ddim | ddpm | run
    eta: float = 0.0
    scheduler: Optional[str] = None
    ema: str = "prefer"  # prefer | only | never
    unet_config: Optional[str] = None
    base_pipeline: Optional[str] = None
    prompts: Optional[str] = None  # text file, one prompt per line
    seeds_per_prompt: int = 1
    guidance_scale: float = 7.5
    batch_size: int = 64
    loss_timesteps: list[int] = field(default_factory=lambda: [100])
    loss_noise_draws: int = 2
    loss_max_images: int = 512
    onset_threshold: float = 0.02
    onset_patience: int = 2
    confidence: float = 0.95
    keep_samples: bool = True
    cache_dir: Optional[str] = None
    device: Optional[str] = None
    gallery_size: int = 8
    outlier_k: int = 5
    outlier_quantile: float = 0.95

    def __post_init__(self) -> None:
        if isinstance(self.run, (str, os.PathLike)):
            self.run = [str(self.run)]
        if isinstance(self.embedders, str):
            self.embedders = [self.embedders]
        checks = [
            ("num_samples", self.num_samples >= 2, "an integer >= 2"),
            ("num_inference_steps", self.num_inference_steps >= 1, "an integer >= 1"),
            ("batch_size", self.batch_size >= 1, "an integer >= 1"),
            ("sampler", self.sampler in ("ddim", "ddpm", "run"), "'ddim', 'ddpm' or 'run'"),
            ("ema", self.ema in ("prefer", "only", "never"), "'prefer', 'only' or 'never'"),
            ("onset_patience", self.onset_patience >= 1, "an integer >= 1"),
            ("onset_threshold", 0 <= self.onset_threshold < 1, "a fraction in [0, 1)"),
            ("confidence", 0 < self.confidence < 1, "a number in (0, 1)"),
            ("embedders", len(self.embedders) >= 1, "at least one embedder spec"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"AuditConfig: {name}={getattr(self, name)!r} is not allowed; expected {allowed}")

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "AuditConfig":
        """Load a preset with ``yaml.safe_load`` (no object construction); unknown keys are errors."""
        import yaml

        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config={str(p)!r}: no such file")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:  # one line: the problem and where (PyYAML's own text spans several lines)
            mark = getattr(e, "problem_mark", None)
            what = getattr(e, "problem", None) or " ".join(str(e).split())
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            hint = ("; configs are read with yaml.safe_load, which never constructs Python objects"
                    if isinstance(e, yaml.constructor.ConstructorError) else "")
            raise ValueError(f"config={str(p)!r}: not valid YAML ({what}{at}){hint}") from None
        if not isinstance(data, dict):
            raise ValueError(f"config={str(p)!r}: expected a mapping of keys, got {type(data).__name__}")
        return cls.from_dict(data, where=str(p))

    @classmethod
    def from_dict(cls, data: dict, where: str = "config") -> "AuditConfig":
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown}; allowed keys: {sorted(names)}")
        for k, v in data.items():
            _check_type(k, v, names[k].type, where)
        return cls(**data)

    def replace(self, **kw) -> "AuditConfig":
        return self.from_dict({**dataclasses.asdict(self), **kw})


_SIMPLE_TYPES = {"int": int, "float": (int, float), "str": str, "bool": bool}


def _check_type(key: str, value: Any, tp: str, where: str) -> None:
    """Light type check of config values (the dataclass annotations are strings under __future__ annotations)."""
    if value is None:
        if "Optional" in tp:
            return
        raise ValueError(f"{where}: {key} must not be empty")
    base = tp.replace("Optional[", "").rstrip("]")
    if base.startswith("list"):
        ok = isinstance(value, list) or (key == "run" and isinstance(value, str))
    elif base.startswith("dict"):
        ok = isinstance(value, dict)
    else:
        want = _SIMPLE_TYPES.get(base)
        ok = want is None or (isinstance(value, want) and not (base != "bool" and isinstance(value, bool)))
    if not ok:
        raise ValueError(f"{where}: {key}={value!r} has the wrong type; expected {tp}")


def ensure_writable(path: str | os.PathLike, min_free_mb: int = 50) -> Path:
    """Create the output folder and prove it is writable with enough free space -- before hours of work."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".diffaudit-write-test-", dir=p)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise PermissionError(f"output folder {str(p)!r} is not writable: {e.strerror or e}") from None
    free_mb = shutil.disk_usage(p).free / 2**20
    if free_mb < min_free_mb:
        raise OSError(f"output folder {str(p)!r} has only {free_mb:.0f} MB free; need at least {min_free_mb} MB")
    return p


# ---------------------------------------------------------------------------------------------------------------
# per-embedder reference data (computed once)


@dataclass
class EmbedderReference:
    """Training-set side of one embedder: index, train-vs-train neighbours and derived per-image statistics."""

    embedder: Any
    train_ids: list[str]
    index: Any
    self_scores: np.ndarray  # (n, k) scores of each training image's nearest OTHER training images
    self_indices: np.ndarray
    duplicates: np.ndarray  # (n,) other training images within the duplicate threshold
    outlier: np.ndarray  # (n,) mean distance to outlier_k nearest other training images
    knn_mean: Optional[np.ndarray]  # (n,) Carlini's mean distance to n nearest (tiled embedder)
    heldout_top1: Optional[np.ndarray]  # (m,) held-out images' top-1 score to train
    heldout_nn: Optional[np.ndarray] = None
    groups: Optional[np.ndarray] = None  # (n,) duplicate-group label (connected components of duplicate pairs)

    @property
    def largest_group(self) -> int:
        return int(np.bincount(self.groups).max()) if self.groups is not None and len(self.groups) else 1

    @property
    def metric(self) -> str:
        return self.embedder.metric

    @property
    def name(self) -> str:
        return self.embedder.name

    @property
    def is_tiled(self) -> bool:
        return hasattr(self.embedder, "tiles") and hasattr(self.embedder, "distance")

    def as_distance(self, scores: np.ndarray) -> np.ndarray:
        """Scores -> distances (smaller = closer): identity for l2, 1 - similarity for cosine (clipped to [0, 2]:
        float32 similarities of exact copies can exceed 1 by an ulp, and a negative distance is refused downstream)."""
        return scores if self.metric == "l2" else np.clip(1.0 - scores, 0.0, 2.0)


def _components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Connected-component label (0..) of each of ``n`` nodes for the edges ``a[i] - b[i]``."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    keep = (b >= 0) & (a != b)
    g = coo_matrix((np.ones(int(keep.sum()), np.int8), (a[keep], b[keep])), shape=(n, n))
    return connected_components(g, directed=False)[1].astype(np.int64)


def _as_imageset(images, what: str):
    """An ImageSet as is, or a folder scanned with ``ImageSet.from_folder``; folder errors name the argument."""
    from .data import ImageSet

    if isinstance(images, ImageSet):
        return images
    try:
        return ImageSet.from_folder(images)
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:
        try:
            err = type(e)(f"{what}={str(images)!r}: {e}")
        except Exception:  # an exception class with another constructor: keep it as is
            raise e from None
        raise err from None


def _progress(enabled: bool):
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())


class ReferenceSet:
    """The training (and held-out) data prepared once for any number of checkpoint evaluations.

    Builds, per embedder: the training embeddings (cached on disk), an exact FAISS index, each training image's
    nearest other training images (for the train-vs-train baseline, duplicate counts and outlier scores), and the
    held-out images' nearest-training scores (for the C_T test and authenticity).
    """

    def __init__(
        self,
        train,
        heldout=None,
        embedders: Sequence[Any] = ("pixel",),
        *,
        weights: Optional[dict[str, str]] = None,
        cache_dir=None,
        outlier_k: int = 5,
        outlier_quantile: float = 0.95,
        progress: bool = False,
    ) -> None:
        from .curate import duplicate_threshold
        from .embedders import embed, get_embedder
        from .index import EmbeddingIndex, self_neighbors

        self.train = _as_imageset(train, "train")
        self.heldout = None
        if heldout is not None:
            self.heldout = _as_imageset(heldout, "heldout")
        if len(self.train) < 3:
            raise ValueError(f"train: the nearest/second-nearest rule needs at least 3 training images; got {len(self.train)}")
        weights = weights or {}
        self.cache_dir = cache_dir
        self.outlier_quantile = outlier_quantile
        self.refs: list[EmbedderReference] = []
        self.skipped: list[SkippedItem] = []
        names_seen = set()
        resolved = []
        for spec in embedders:  # resolve every spec first: a typo in the 2nd one fails before the 1st one embeds
            kw = {}
            if isinstance(spec, str):
                w = weights.get(spec) or weights.get(spec.split(":")[0])
                if w:
                    kw["weights"] = w
            resolved.append(get_embedder(spec, **kw))
        for emb in resolved:
            emb.prepare(self.train)
            e_train = embed(self.train, emb, cache_dir=cache_dir, progress=progress)
            if emb.name in names_seen:
                raise ValueError(f"embedders: {emb.name!r} given twice")
            names_seen.add(emb.name)
            index = EmbeddingIndex.from_embeddings(e_train)
            n = len(e_train)
            k = int(min(n - 1, max(CARLINI_N, outlier_k, 2)))
            s_scores, s_idx = self_neighbors(index, k=k)
            ref_dist = s_scores if emb.metric == "l2" else 1.0 - s_scores
            if getattr(emb, "distance", None) is not None and hasattr(emb, "tiles"):
                # tiled L2: re-score the plain-L2 neighbours with the max-over-tiles distance, re-sort
                tiled = self._rescore(index, emb, index.get_vectors(0, n), s_idx)
                order = np.argsort(tiled, axis=1, kind="stable")
                s_scores = np.take_along_axis(tiled, order, 1).astype(np.float32)
                s_idx = np.take_along_axis(s_idx, order, 1)
                ref_dist = s_scores
            thr = duplicate_threshold(emb, s_scores[:, 0])
            within = (s_scores <= thr) if emb.metric == "l2" else (s_scores >= thr)
            dup = within.sum(axis=1)
            groups = _components(n, np.repeat(np.arange(n), k)[within.reshape(-1)], s_idx[within])
            outlier = ref_dist[:, : min(outlier_k, k)].mean(axis=1)
            knn_mean = ref_dist[:, : min(CARLINI_N, k)].mean(axis=1) if emb.metric == "l2" else None
            h_top1 = h_nn = None
            if self.heldout is not None:
                e_h = embed(self.heldout, emb, cache_dir=cache_dir, progress=progress)
                self.skipped += [SkippedItem(i, r, "heldout") for i, r in e_h.skipped]
                hs, hi = self._search(index, emb, e_h.vectors, 1)
                h_top1, h_nn = hs[:, 0], hi[:, 0]
            self.skipped += [SkippedItem(i, r, "train") for i, r in e_train.skipped]
            self.refs.append(
                EmbedderReference(
                    embedder=emb, train_ids=list(e_train.ids), index=index, self_scores=s_scores,
                    self_indices=s_idx, duplicates=dup.astype(int), outlier=outlier, knn_mean=knn_mean,
                    heldout_top1=h_top1, heldout_nn=h_nn, groups=groups,
                )
            )
        # de-duplicate skipped entries (each embedder reports the same decode failures)
        seen, uniq = set(), []
        for s in self.skipped:
            if (s.id, s.where) not in seen:
                seen.add((s.id, s.where))
                uniq.append(s)
        self.skipped = uniq

    @property
    def primary(self) -> EmbedderReference:
        """The embedder whose copy rule drives onset and per-image copies: the first plain l2 (pixel) embedder
        (Gu et al.'s 1/3 rule), else the first cosine one (Somepalli's replication), else the first one."""
        for r in self.refs:
            if r.metric == "l2" and not r.is_tiled:
                return r
        for r in self.refs:
            if r.metric == "cosine":
                return r
        return self.refs[0]

    @staticmethod
    def _search(index, emb, vectors: np.ndarray, k: int, rescore: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Search; for the tiled embedder re-score ``rescore`` plain-L2 candidates with the max-over-tiles distance."""
        if not (hasattr(emb, "tiles") and hasattr(emb, "distance")):
            return index.search(vectors, k=k)
        kk = min(max(k, rescore), index.ntotal)
        _, cand = index.search(vectors, k=kk)
        scores = ReferenceSet._rescore(index, emb, vectors, cand)
        order = np.argsort(scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, order, 1), np.take_along_axis(cand, order, 1)

    @staticmethod
    def _rescore(index, emb, queries: np.ndarray, cand: np.ndarray, chunk: int = 1024) -> np.ndarray:
        """Tiled-L2 distance of each query row to its candidate rows ``cand`` (n, kk) -> (n, kk) float32."""
        n, kk = cand.shape
        out = np.empty((n, kk), np.float32)
        for s in range(0, n, chunk):
            c = cand[s : s + chunk]
            a = np.repeat(np.asarray(queries[s : s + chunk], np.float32), kk, axis=0)
            out[s : s + chunk] = emb.distance(a, index.take(c).reshape(-1, index.dim), pairwise=False).reshape(c.shape)
        return out


# ---------------------------------------------------------------------------------------------------------------
# per-checkpoint evaluation


@dataclass
class SampleEvaluation:
    """Per-sample outcome under the primary embedder: which training image each copied sample copies."""

    metrics: dict[str, EmbedderMetrics]
    copied_train_ids: list[str]  # one entry per copying sample (primary embedder)
    signal: Optional[Estimate]


def evaluate_samples(
    ref: ReferenceSet,
    images: np.ndarray,
    *,
    sample_paths: Optional[Sequence[Optional[str]]] = None,
    sample_indices: Optional[Sequence[int]] = None,
    confidence: float = 0.95,
    gallery_size: int = 8,
) -> SampleEvaluation:
    """Metrics of one checkpoint's (finite) samples, uint8 NHWC, against the reference set, per embedder."""
    from .data import ImageSet
    from .embedders import embed
    from .metrics import (
        authenticity,
        calibrated_ratio,
        ct_statistic,
        dedup_second_distance,
        extraction_fraction,
        memorization_fraction,
        nn_ratio,
        replication_rate,
        top1_summary,
    )

    n = len(images)
    idx_list = list(sample_indices) if sample_indices is not None else list(range(n))
    paths = list(sample_paths) if sample_paths is not None else [None] * n
    out: dict[str, EmbedderMetrics] = {}
    copied_ids: list[str] = []
    signal: Optional[Estimate] = None
    if n == 0:
        return SampleEvaluation({}, [], None)
    samples = ImageSet.from_arrays(images, ids=[f"sample_{i:05d}" for i in idx_list])
    for r in ref.refs:
        emb = r.embedder
        e = embed(samples, emb, cache_dir=None, cache=False)
        gu = r.metric == "l2" and not r.is_tiled
        # Gu's rule with training duplicates merged needs neighbours past the nearest image's whole duplicate group
        k = min(r.index.ntotal, max(2, r.largest_group + 1), MAX_DEDUP_K) if gu and r.groups is not None else 2
        scores_k, nn_k = ReferenceSet._search(r.index, emb, e.vectors, k)
        scores, nn = scores_k[:, :2], nn_k[:, :2]
        d = r.as_distance(scores)
        base_mean, base_p95 = top1_summary(r.self_scores[:, 0], r.metric)
        top_mean, top_p95 = top1_summary(scores[:, 0], r.metric)
        m = EmbedderMetrics(
            embedder=r.name, metric=r.metric, threshold=emb.default_threshold, num_samples=n,
            top1_mean=top_mean, top1_p95=top_p95, train_baseline_top1_mean=base_mean,
            train_baseline_top1_p95=base_p95,
        )
        ratio = nn_ratio(d[:, 0], d[:, 1])
        if gu:
            m.memorization_ratio = memorization_fraction(d[:, 0], d[:, 1], GU_RATIO, confidence=confidence)
            m.memorization_ratio_half = memorization_fraction(d[:, 0], d[:, 1], HALF_RATIO, confidence=confidence)
            if r.groups is not None:
                d2 = dedup_second_distance(r.as_distance(scores_k), nn_k, r.groups)
                m.memorization_ratio_dedup = memorization_fraction(d[:, 0], d2, GU_RATIO, confidence=confidence)
            copied = ratio < GU_RATIO
            rank = ratio
        elif r.metric == "cosine":
            thr = emb.default_threshold if emb.default_threshold is not None else 0.5
            m.replication_rate = replication_rate(scores[:, 0], thr, confidence=confidence)
            copied = scores[:, 0] > thr
            rank = -scores[:, 0]
        else:  # tiled: Carlini et al.'s calibrated ratio
            cr = calibrated_ratio(d[:, 0], r.knn_mean[nn[:, 0]])
            m.extraction_fraction = extraction_fraction(cr, confidence=confidence)
            m.calibrated_ratio_median = float(np.median(cr))
            copied = cr < 1.0
            rank = cr
        if r.heldout_top1 is not None:
            m.heldout_top1_mean = float(np.mean(r.heldout_top1))
            m.heldout_ct_z = ct_statistic(d[:, 0], r.as_distance(r.heldout_top1))
        auth, _ = authenticity(d[:, 0], nn[:, 0].astype(np.int64), r.as_distance(r.self_scores[:, 0]), confidence=confidence)
        m.authenticity = auth.value
        order = np.argsort(rank, kind="stable")[:gallery_size]
        m.top_matches = [
            SampleMatch(
                sample_index=int(idx_list[j]), sample_path=paths[j],
                neighbor_ids=[r.train_ids[int(t)] for t in nn[j] if t >= 0],
                scores=[float(s) for s in scores[j]], ratio=float(ratio[j]) if np.isfinite(ratio[j]) else None,
                copied=bool(copied[j]),
            )
            for j in order
        ]
        out[r.name] = m
        if r is ref.primary:
            copied_ids = [r.train_ids[int(t)] for t in nn[copied, 0]]
            signal = m.memorization_ratio or m.replication_rate or m.extraction_fraction
    return SampleEvaluation(out, copied_ids, signal)


def loss_pass(model, scheduler, ref: ReferenceSet, cfg: AuditConfig, device=None):
    """Denoising losses of (a fixed subset of) train and held-out images at fixed timesteps and noise.

    Returns ``(train_ids, train_losses, heldout_losses)`` or ``None`` for models the pass does not apply to
    (text-conditional pipelines: their loss needs captions and the VAE; models without a scheduler).
    Images are brought to the model's resolution and channel count (grayscale models get the channel mean).
    """
    from .metrics import denoising_losses

    if scheduler is None or not callable(model) or hasattr(model, "text_encoder"):
        return None
    conf = getattr(model, "config", None)
    size = getattr(conf, "sample_size", None)
    channels = getattr(conf, "in_channels", None)
    if getattr(conf, "cross_attention_dim", None):
        return None  # UNet2DConditionModel: needs text embeddings
    rng = np.random.default_rng(cfg.seed)

    def subset(images, n_max):
        n = len(images)
        return np.sort(rng.permutation(n)[:n_max]) if n > n_max else np.arange(n)

    def losses(images, pos, seed):
        ids, x = _stack_images(images, pos, size, channels)
        keep = {i: p for i, p in zip((images.ids[int(p)] for p in pos), pos)}
        idx = [int(keep[i]) for i in ids]  # decode failures drop out; each image keeps its own noise
        return ids, denoising_losses(model, scheduler, x, timesteps=tuple(cfg.loss_timesteps),
                                     noise_draws=cfg.loss_noise_draws, seed=seed, batch_size=cfg.batch_size,
                                     device=device, indices=idx)

    train_ids, tl = losses(ref.train, subset(ref.train, cfg.loss_max_images), cfg.seed)
    hl = None
    if ref.heldout is not None:
        # a different noise seed: held-out image i must not share noise with training image i
        _, hl = losses(ref.heldout, subset(ref.heldout, cfg.loss_max_images), cfg.seed + 1)
    return train_ids, tl, hl


def set_loss_metrics(cr: CheckpointResult, train_losses, heldout_losses=None) -> None:
    """Fill a checkpoint's loss fields from per-image losses: means, gap (held-out - train), membership AUC."""
    from .metrics import membership_auc

    cr.loss_train = float(np.mean(train_losses))
    if heldout_losses is not None:
        cr.loss_heldout = float(np.mean(heldout_losses))
        cr.loss_gap = cr.loss_heldout - cr.loss_train
        cr.membership_auc = float(membership_auc(train_losses, heldout_losses))


def _stack_images(images, positions, size=None, channels=None) -> np.ndarray:
    """Decode ``positions`` of an ImageSet into one uint8 NHWC array at the model's size and channel count."""
    from PIL import Image

    if isinstance(size, int):
        size = (size, size)
    arrs, got = [], []
    for ids, batch in images.iter_batches(256, indices=[int(p) for p in positions]):
        got.extend(ids)
        for a in batch:
            if size is not None and tuple(a.shape[:2]) != tuple(size):
                a = np.asarray(Image.fromarray(a).resize((size[1], size[0]), Image.BILINEAR))
            arrs.append(a)
    if not arrs:
        raise ValueError(f"no decodable image among the {len(positions)} chosen for the denoising loss")
    shapes = {a.shape for a in arrs}
    if len(shapes) != 1:
        raise ValueError(f"denoising loss needs images of one size (or a model with config.sample_size); found {sorted(shapes)[:4]}")
    x = np.stack(arrs)
    if channels == 1:
        x = x.mean(axis=3, keepdims=True).round().astype(np.uint8)
    return got, x


# ---------------------------------------------------------------------------------------------------------------
# the audit


def _verdict(result_cps: list[CheckpointResult], onset: OnsetInfo, signal_label: str) -> str:
    if not result_cps:
        return "No checkpoint was evaluated."
    last = result_cps[-1]
    sig = last.onset_signal
    how_much = (
        f"{sig.value:.0%} of samples (95% CI {sig.low:.0%}-{sig.high:.0%})" if sig is not None and sig.low is not None
        else "an unknown fraction of samples"
    )
    keep = (
        f"Keep the checkpoint at step {onset.recommended_step} ({onset.recommended_reason})."
        if onset.recommended_step is not None
        else "No checkpoint precedes the onset: every evaluated checkpoint already copies."
    )
    if onset.onset_step is not None:
        return (
            f"Memorization starts at step {onset.onset_step}: at the last checkpoint (step {last.step}) {how_much} "
            f"are copies of training images by {signal_label}. {keep}"
        )
    return (
        f"No memorization onset across {len(result_cps)} checkpoints (steps {result_cps[0].step}-{last.step}): "
        f"at the last checkpoint {how_much} are copies by {signal_label}, below the onset rule. {keep}"
    )


def _signal_label(ref: EmbedderReference) -> str:
    if ref.metric == "l2" and not ref.is_tiled:
        return f"Gu et al.'s nearest/second-nearest < 1/3 rule ({ref.name})"
    if ref.metric == "cosine":
        return f"top-1 cosine > {ref.embedder.default_threshold} ({ref.name}, Somepalli et al.)"
    return f"Carlini et al.'s calibrated tiled L2 < 1 ({ref.name})"


def audit(
    checkpoints=None,
    train=None,
    heldout=None,
    embedders: Optional[Sequence[Any]] = None,
    num_samples: Optional[int] = None,
    seed: Optional[int] = None,
    *,
    config: Optional[AuditConfig] = None,
    out_dir: Optional[str | os.PathLike] = None,
    progress: bool = False,
    **kwargs,
) -> AuditResult:
    """Audit every checkpoint of a run for memorization of ``train``.

    ``checkpoints``: a run folder (``checkpoint-N/unet[_ema]/``), a pipeline folder, a list of folders / files, or an
    already discovered :class:`diffaudit.checkpoints.CheckpointRun`, or in-memory models ``[(step, model), ...]`` with
    ``scheduler=`` the training noise scheduler (see :func:`memory_run`). ``train`` / ``heldout``: :class:`ImageSet` or
    folders. ``embedders``: specs or :class:`Embedder` objects (default ``["pixel"]``). Other
    :class:`AuditConfig` fields may be passed as keyword arguments. With ``out_dir`` the generated samples are kept
    there (``samples/step-N/``) and reused by a rerun (resume); the report is written by the CLI or ``to_html``.
    """
    from . import __version__
    from .checkpoints import CheckpointRun, discover_checkpoints
    from .monitor import OnsetRule, recommend_checkpoint
    from .sampling import CheckpointSampler

    cfg = config or AuditConfig()
    # a scheduler object (not a name/path) cannot live in the YAML-able config: keep it aside
    sched_obj = None
    if kwargs.get("scheduler") is not None and not isinstance(kwargs["scheduler"], (str, os.PathLike)):
        sched_obj = kwargs.pop("scheduler")
    if _is_model_list(checkpoints):
        checkpoints = memory_run(checkpoints, scheduler=sched_obj or kwargs.get("scheduler") or cfg.scheduler)
    over = {"train": train, "heldout": heldout, "num_samples": num_samples, "seed": seed}
    over = {k: v for k, v in over.items() if v is not None and isinstance(v, (str, int, os.PathLike))}
    if checkpoints is not None and not isinstance(checkpoints, CheckpointRun):
        over["run"] = [str(c) for c in checkpoints] if isinstance(checkpoints, (list, tuple)) else [str(checkpoints)]
    if embedders is not None and all(isinstance(e, str) for e in embedders):
        over["embedders"] = list(embedders)
    over = {k: (str(v) if isinstance(v, os.PathLike) else v) for k, v in over.items()}
    cfg = cfg.replace(**over, **kwargs) if (over or kwargs) else cfg
    emb_specs = list(embedders) if embedders is not None else cfg.embedders
    train_set = train if (train is not None and not isinstance(train, (str, os.PathLike))) else cfg.train
    heldout_set = heldout if (heldout is not None and not isinstance(heldout, (str, os.PathLike))) else cfg.heldout
    if train_set is None:
        raise ValueError("audit: train= is required (an ImageSet or a folder of training images)")

    out_path = ensure_writable(out_dir) if out_dir is not None else None
    if isinstance(checkpoints, CheckpointRun):
        run = checkpoints
    else:
        if not cfg.run:
            raise ValueError("audit: checkpoints= is required (a run folder, pipeline folder or list of checkpoints)")
        run_arg = cfg.run[0] if len(cfg.run) == 1 else cfg.run
        run = discover_checkpoints(run_arg, ema=cfg.ema, scheduler=sched_obj or cfg.scheduler, base_pipeline=cfg.base_pipeline,
                                   unet_config=cfg.unet_config)
    if not run.checkpoints:
        raise ValueError(f"checkpoints={cfg.run!r}: no checkpoints found")

    ref = ReferenceSet(train_set, heldout_set, emb_specs, weights=cfg.weights, cache_dir=cfg.cache_dir,
                       outlier_k=cfg.outlier_k, outlier_quantile=cfg.outlier_quantile, progress=progress)
    prompts = None
    if cfg.prompts:
        from .sampling import read_prompts

        prompts = read_prompts(cfg.prompts)
        if not prompts:
            raise ValueError(f"prompts={cfg.prompts!r}: the file holds no prompt")
    sampler = CheckpointSampler(
        run.new_scheduler(), cfg.num_samples, seed=cfg.seed, num_inference_steps=cfg.num_inference_steps,
        sampler=cfg.sampler, batch_size=cfg.batch_size, eta=cfg.eta, device=cfg.device, prompts=prompts,
        seeds_per_prompt=cfg.seeds_per_prompt, guidance_scale=cfg.guidance_scale,
    )

    results: list[CheckpointResult] = []
    skipped = list(ref.skipped) + [SkippedItem(s.path, s.reason, "checkpoints") for s in run.skipped]
    copies: dict[str, dict[int, int]] = {}
    membership: dict[str, float] = {}
    prog = _progress(progress)
    with prog or nullcontext():
        task = prog.add_task("auditing checkpoints", total=len(run.checkpoints)) if prog else None
        for ckpt in run.checkpoints:
            loaded: dict[str, Any] = {}

            def load_model(ckpt=ckpt, loaded=loaded):
                if "model" not in loaded:
                    loaded["model"] = run.load(ckpt, device=cfg.device)
                return loaded["model"]

            keep = out_path is not None and cfg.keep_samples
            if keep:
                batch = sampler.sample_or_load(load_model, out_path / "samples", ckpt.step,
                                               checkpoint_id=_checkpoint_id(run, ckpt))
            else:
                batch = sampler.sample(load_model())
            finite = np.asarray(batch.finite_mask, bool)
            idx = np.asarray(batch.indices)[finite]
            rel = [f"samples/step-{ckpt.step}/sample_{i:05d}.png" if keep else None for i in idx]
            ev = evaluate_samples(ref, batch.images[finite], sample_paths=rel, sample_indices=idx,
                                  confidence=cfg.confidence, gallery_size=cfg.gallery_size)
            cr = CheckpointResult(step=ckpt.step, path=ckpt.path, num_samples=int(finite.size),
                                  num_nonfinite=int((~finite).sum()), metrics=ev.metrics, onset_signal=ev.signal)
            if cr.num_nonfinite:
                skipped.append(SkippedItem(f"{cr.num_nonfinite} samples", "NaN/inf in the generated image",
                                           f"samples@{ckpt.step}"))
            for tid in ev.copied_train_ids:
                copies.setdefault(tid, {}).setdefault(ckpt.step, 0)
                copies[tid][ckpt.step] += 1
            try:
                lp = loss_pass(load_model(), run.new_scheduler(), ref, cfg, device=cfg.device)
            except FloatingPointError as e:  # NaN/inf model outputs: no loss for this checkpoint; samples still count
                log.warning("step %s: denoising loss skipped: %s", ckpt.step, e)
                skipped.append(SkippedItem("denoising loss", str(e), f"loss@{ckpt.step}"))
                lp = None
            if lp is not None:
                from .metrics import membership_percentile

                tids, tl, hl = lp
                set_loss_metrics(cr, tl, hl)
                if hl is not None:
                    membership = {i: float(v) for i, v in zip(tids, membership_percentile(tl, hl))}
            loaded.clear()
            results.append(cr)
            if prog:
                prog.advance(task)

    rule = OnsetRule(threshold=cfg.onset_threshold, patience=cfg.onset_patience, confidence=cfg.confidence)
    steps = [c.step for c in results]
    lows = [c.onset_signal.low if c.onset_signal is not None else None for c in results]
    onset_step = rule.detect(steps, lows)
    rec_step, reason = recommend_checkpoint(
        steps, onset_step, heldout_losses=[c.loss_heldout for c in results],
        signal_values=[c.onset_signal.value if c.onset_signal else None for c in results],
    )
    primary = ref.primary
    onset = OnsetInfo(signal=f"{'memorization_ratio' if primary.metric == 'l2' and not primary.is_tiled else 'replication_rate' if primary.metric == 'cosine' else 'extraction_fraction'}[{primary.name}]",
                      threshold=rule.threshold, patience=rule.patience, confidence=rule.confidence,
                      onset_step=onset_step, recommended_step=rec_step, recommended_reason=reason)

    images = _risk_table(ref, copies, membership)
    prov = Provenance(
        diffaudit_version=__version__,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        run=str(run.root),
        checkpoint_files=run.checkpoint_files(),
        train=str(getattr(ref.train, "source", "")),
        train_fingerprint=ref.train.fingerprint(),
        heldout=str(getattr(ref.heldout, "source", "")) if ref.heldout is not None else "",
        heldout_fingerprint=ref.heldout.fingerprint() if ref.heldout is not None else "",
        embedders=[r.embedder.describe() for r in ref.refs],
        seed=cfg.seed,
        num_samples=cfg.num_samples,
        sampler={"sampler": cfg.sampler, "num_inference_steps": cfg.num_inference_steps, "eta": cfg.eta,
                 "scheduler": run.scheduler_source, "batch_size": cfg.batch_size, "prompts": cfg.prompts or ""},
        extra={"onset_rule": "CI lower bound > threshold at `patience` consecutive checkpoints (diffaudit.monitor)"},
    )
    result = AuditResult(checkpoints=results, onset=onset, images=images, skipped=skipped, provenance=prov)
    result.verdict = _verdict(results, onset, _signal_label(primary))
    if out_path is not None:
        write_outputs(result, out_path, ref=ref)
    return result


def _checkpoint_id(run, ckpt) -> str:
    """What saved samples must match besides the sampler settings (resume): the weights (sha256 of the files; for
    in-memory models of the tensors) and the run's noise-schedule config."""
    import hashlib
    import json

    from .checkpoints import checkpoint_hash

    ident = run.identity(ckpt) if hasattr(run, "identity") else (checkpoint_hash(ckpt) if ckpt.weights else ckpt.path)
    sched = dict(run.scheduler.config) if getattr(run, "scheduler", None) is not None else None
    if sched is not None:  # diffusers fills this list from a set: its order changes with PYTHONHASHSEED (no resume)
        sched.pop("_use_default_values", None)
    blob = json.dumps({"scheduler": sched, "checkpoint": ident}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _module_hash(model) -> str:
    """sha256 over the names and bytes of a module's parameters and buffers (a pipeline: its UNet)."""
    import hashlib

    import torch

    m = getattr(model, "unet", model)
    if not isinstance(m, torch.nn.Module):
        return f"object:{type(model).__name__}:{id(model)}"
    h = hashlib.sha256()
    for name, t in sorted([*m.named_parameters(), *m.named_buffers()], key=lambda p: p[0]):
        a = t.detach().cpu().contiguous()
        h.update(f"{name}:{a.dtype}:{tuple(a.shape)}".encode())
        if a.numel():
            h.update(a.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _is_model_list(checkpoints) -> bool:
    """True for in-memory checkpoints: a non-empty list of ``(step, model)`` pairs or a ``{step: model}`` dict."""
    if isinstance(checkpoints, dict):
        return bool(checkpoints) and all(isinstance(k, (int, np.integer)) for k in checkpoints)
    if not isinstance(checkpoints, (list, tuple)) or not checkpoints:
        return False
    return all(isinstance(c, tuple) and len(c) == 2 and isinstance(c[0], (int, np.integer))
               and not isinstance(c[1], (str, os.PathLike)) for c in checkpoints)


def memory_run(checkpoints, scheduler=None):
    """A :class:`~diffaudit.checkpoints.CheckpointRun` over models already in memory (tests, the training monitor).

    ``checkpoints``: ``[(step, model), ...]`` or ``{step: model}``; a model is anything
    :meth:`CheckpointSampler.sample` takes (a ``UNet2DModel``-like module, an unconditional pipeline) or a
    zero-argument callable returning one (loaded only when its samples are not on disk). ``scheduler``: the training
    noise scheduler (a diffusers scheduler, a path or a name such as ``"ddpm"``); default: the first model's
    ``.scheduler`` (pipelines). ``audit(checkpoints=[(step, model), ...], scheduler=...)`` calls this.
    """
    from .checkpoints import Checkpoint, CheckpointError, CheckpointRun, load_scheduler_with_source

    items = sorted((checkpoints.items() if isinstance(checkpoints, dict) else checkpoints), key=lambda p: int(p[0]))
    steps = [int(s) for s, _ in items]
    if len(set(steps)) != len(steps):
        raise ValueError(f"checkpoints: steps must be unique; got {steps}")
    if scheduler is None:
        scheduler = next((getattr(m, "scheduler", None) for _, m in items if getattr(m, "scheduler", None) is not None), None)
    if scheduler is None:
        raise CheckpointError("checkpoints=[(step, model), ...]: in-memory models need scheduler= (the training noise "
                              "scheduler: a diffusers scheduler object, a scheduler folder, or a name such as 'ddpm')")
    sched, src = load_scheduler_with_source(scheduler)
    models = {int(s): m for s, m in items}

    class _MemoryRun(CheckpointRun):
        def load(self, checkpoint, device=None, dtype=None):
            m = models[checkpoint.step]
            if not hasattr(m, "parameters") and not hasattr(m, "unet") and callable(m):
                try:
                    import inspect

                    if not inspect.signature(m).parameters:
                        m = m()
                except (TypeError, ValueError):
                    pass
            return m

        def checkpoint_files(self) -> dict[str, str]:
            return {}

        def identity(self, checkpoint) -> str:
            m = models[checkpoint.step]
            return _module_hash(m) if (hasattr(m, "parameters") or hasattr(m, "unet")) else f"loader:{checkpoint.step}"

    cks = [Checkpoint(step=s, path=f"memory:step-{s}", kind="memory", unet_path="", name=f"step-{s}") for s in steps]
    return _MemoryRun(root="memory", checkpoints=cks, scheduler=sched, scheduler_source=src)


def _risk_table(ref: ReferenceSet, copies: dict[str, dict[int, int]], membership: dict[str, float]) -> list[ImageRisk]:
    from .metrics import outlier_labels

    p = ref.primary
    labels = outlier_labels(p.outlier, quantile=ref.outlier_quantile)
    rows = []
    for i, tid in enumerate(p.train_ids):
        by = copies.get(tid, {})
        rows.append(
            ImageRisk(
                id=tid, copies=int(sum(by.values())), first_step_copied=min(by) if by else None,
                copies_by_step={str(s): int(c) for s, c in sorted(by.items())}, duplicates=int(p.duplicates[i]),
                outlier_score=float(p.outlier[i]), label=str(labels[i]), membership_score=membership.get(tid),
            )
        )
    rows.sort(key=lambda r: (-r.copies, -(r.membership_score or 0.0), r.id))
    return rows


def write_outputs(result: AuditResult, out_dir: str | os.PathLike, ref: Optional[ReferenceSet] = None) -> None:
    """audit.json, images.csv and the self-contained report.html in ``out_dir``."""
    out = Path(out_dir)
    result.to_json(out / "audit.json")
    result.to_csv(str(out / "images.csv"))
    provider = None
    if ref is not None:
        train = ref.train

        def provider(kind: str, key: str):
            # training thumbnails from the ImageSet; samples (kind "sample") are read by the report itself,
            # which confines them to the output folder and applies the pixel limit
            if kind != "train":
                return None
            try:
                return train.load(key)
            except Exception:  # a missing thumbnail must not break the report
                return None

    result.to_html(str(out / "report.html"), images=provider)
