"""The engine's core: training data prepared once, and the one per-checkpoint step shared by audit and monitor.

* :class:`ReferenceSet` -- the work that depends only on the training (and held-out) data: embeddings, FAISS index,
  train-vs-train neighbours, outlier scores, duplicate groups, held-out neighbours, the denoising-loss images.
* :func:`evaluate_samples` -- one checkpoint's samples against it, per embedder, with each embedder's
  :class:`~diffaudit.metrics.rules.CopyRule`.
* :func:`loss_pass` -- denoising losses of train and held-out images with the one noise contract (image ``id`` ->
  noise, :func:`~diffaudit.metrics.loss.noise_index`) that ``membership_scores`` and ``loo_scores`` use too.
* :func:`evaluate_checkpoint` -- sample -> finite mask -> evaluate -> :class:`CheckpointResult` -> copies -> loss:
  what ``audit()`` does per checkpoint and what ``MemorizationMonitor`` does per evaluation.
* :func:`risk_table`, :func:`provenance` -- the per-training-image table and the provenance record of a result.
"""
from __future__ import annotations

import datetime as _dt
import functools
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np

from .data import as_imageset
from .metrics.extraction import CARLINI_N
from .metrics.rules import CopyRule, copy_rule
from .results import CheckpointResult, EmbedderMetrics, Estimate, ImageRisk, Provenance, SampleMatch, Skipped

log = logging.getLogger(__name__)

#: byte budget for keeping the denoising-loss images decoded in memory between checkpoints
LOSS_CACHE_BYTES = 256 * 2**20
#: samples per checkpoint in the report's grid of the same seeds across checkpoints
GRID_SAMPLES = 16
#: most real images the quality metrics compare samples with (a seeded random subset of larger sets)
QUALITY_MAX_REAL = 2048


# ---------------------------------------------------------------------------------------------------------------
# per-embedder reference data (computed once)


@dataclass
class EmbedderReference:
    """Training-set side of one embedder: index, train-vs-train neighbours and derived per-image statistics."""

    embedder: Any
    rule: CopyRule
    train_ids: list[str]
    index: Any
    self_scores: np.ndarray  # (n, k) scores of each training image's nearest OTHER training images
    self_indices: np.ndarray
    duplicates: np.ndarray  # (n,) other training images in the same duplicate group
    outlier: np.ndarray  # (n,) mean distance to outlier_k nearest other training images
    knn_mean: Optional[np.ndarray]  # (n,) Carlini's mean distance to n nearest (l2 embedders)
    heldout_top1: Optional[np.ndarray]  # (m,) held-out images' top-1 score to train
    heldout_nn: Optional[np.ndarray] = None
    groups: Optional[np.ndarray] = None  # (n,) duplicate-group label
    quality_real: Optional[np.ndarray] = None  # the real vectors sample quality is measured against
    quality_reference: str = ""  # "heldout" | "train"
    quality_radii: Optional[np.ndarray] = None  # their k-NN radii (precision / density / coverage)
    _quality_cache: dict = field(default_factory=dict, repr=False)  # FD reference, floors per n

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
    def signal_name(self) -> str:
        """The onset signal under this embedder, e.g. ``memorization_ratio[pixel-8x8]`` (display text)."""
        return f"{self.rule.signal}[{self.name}]"

    def as_distance(self, scores: np.ndarray) -> np.ndarray:
        """Scores -> distances (smaller = closer): identity for l2, 1 - similarity for cosine (clipped to [0, 2]:
        float32 similarities of exact copies can exceed 1 by an ulp, and a negative distance is refused downstream)."""
        return scores if self.metric == "l2" else np.clip(1.0 - scores, 0.0, 2.0)

    def as_score(self, distance: float) -> float:
        """A distance back in the embedder's score units (the inverse of :meth:`as_distance`)."""
        return float(distance) if self.metric == "l2" else float(1.0 - distance)

    def quality(self, fake: np.ndarray, confidence: float = 0.95):
        """:class:`~diffaudit.results.EmbedderQuality` of sample vectors ``fake`` (None with fewer than k + 1 of them
        or of the real images)."""
        from .metrics.quality import PRDC_K, FrechetReference, frechet_estimate, frechet_floor, prdc
        from .results import EmbedderQuality

        real = self.quality_real
        if real is None or len(fake) <= PRDC_K or len(real) <= PRDC_K:
            return None
        fake = np.asarray(fake, np.float64)
        if "fd" not in self._quality_cache:  # the real side of the Frechet distance, factored once
            self._quality_cache["fd"] = FrechetReference(real)
        fref = self._quality_cache["fd"]
        q = EmbedderQuality(reference=self.quality_reference, num_real=len(real),
                            fd=frechet_estimate(fake, fref, confidence=confidence))
        p = prdc(real, fake, confidence=confidence, real_radii=self.quality_radii)
        q.precision, q.recall, q.density, q.coverage = p.precision, p.recall, p.density, p.coverage
        if self.quality_reference == "heldout":
            n = int(min(len(fake), self.index.ntotal))
            if n not in self._quality_cache:  # training images against the held-out set, at the samples' n
                self._quality_cache[n] = frechet_floor(self.index.get_vectors(0, self.index.ntotal), fref, n)
            q.fd_floor, q.floor_n = self._quality_cache[n], n
            q.fd_at_floor_n = q.fd.value if n == len(fake) else frechet_floor(fake, fref, n)
        return q

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest training images of each vector, in the embedder's own distance (:func:`search`)."""
        return search(self.index, self.embedder, vectors, k)


def search(index, emb, vectors: np.ndarray, k: int, candidates: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """``index.search`` in the embedder's own distance: embedders that re-score (tiled L2) get ``candidates``
    plain-L2 candidates re-scored with :meth:`~diffaudit.embedders.base.Embedder.distance`."""
    from .index import rescore

    if not getattr(emb, "rescores", False):
        return index.search(vectors, k=k)
    _, cand = index.search(vectors, k=min(max(k, candidates), index.ntotal))
    return rescore(index, emb.distance, vectors, cand, k)


class ReferenceSet:
    """The training (and held-out) data prepared once for any number of checkpoint evaluations.

    Builds, per embedder: the training embeddings (cached on disk), an exact FAISS index, each training image's
    nearest other training images (for the train-vs-train baseline, duplicate groups and outlier scores), and the
    held-out images' nearest-training scores (for the C_T test and authenticity). Duplicate groups are the clusters that
    :func:`diffaudit.curate.find_duplicates` reports for the training set under the same embedder (one search, one
    threshold rule, :func:`diffaudit.index.duplicate_groups`).
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
        captions: Optional[dict[str, str]] = None,
        heldout_captions: Optional[dict[str, str]] = None,
    ) -> None:
        from .curate import duplicate_pairs
        from .embedders import embed, get_embedder
        from .index import EmbeddingIndex, duplicate_groups, rescore, self_neighbors

        self.train = as_imageset(train, "train")
        self.heldout = as_imageset(heldout, "heldout") if heldout is not None else None
        #: ``{image id: caption}`` of the training / held-out images (text-to-image runs: the conditional loss)
        self.captions = dict(captions) if captions else None
        self.heldout_captions = dict(heldout_captions) if heldout_captions else None
        if len(self.train) < 3:
            raise ValueError(f"train: the nearest/second-nearest rule needs at least 3 training images; got {len(self.train)}")
        weights = weights or {}
        self.cache_dir = cache_dir
        self.outlier_quantile = outlier_quantile
        self.refs: list[EmbedderReference] = []
        skipped: list[Skipped] = []
        self._loss_cache: dict[tuple, Any] = {}
        self.warnings: list[str] = []
        names_seen = set()
        resolved = []
        for spec in embedders:  # resolve every spec first: a typo in the 2nd one fails before the 1st one embeds
            kw = {}
            if isinstance(spec, str):
                w = weights.get(spec) or weights.get(spec.split(":")[0])
                if w:
                    kw["weights"] = w
            resolved.append(get_embedder(spec, **kw))
        self._identical_leaks = self._check_identical_leaks() if self.heldout is not None else 0
        for emb in resolved:
            rule = copy_rule(emb)
            emb.prepare(self.train)
            e_train = embed(self.train, emb, cache_dir=cache_dir, progress=progress)
            if emb.name in names_seen:
                raise ValueError(f"embedders: {emb.name!r} given twice")
            names_seen.add(emb.name)
            index = EmbeddingIndex.from_embeddings(e_train)
            n = len(e_train)
            k = int(min(n - 1, max(CARLINI_N, outlier_k, 2)))
            s_scores, s_idx = self_neighbors(index, k=k)
            if getattr(emb, "rescores", False):
                # the embedder's own distance (tiled L2): re-score the plain-L2 neighbours, re-sort
                s_scores, s_idx = rescore(index, emb.distance, index.get_vectors(0, n), s_idx)
            ref_dist = s_scores if emb.metric == "l2" else 1.0 - s_scores
            # the duplicates find_duplicates reports for this set and embedder (same search, threshold, groups)
            pairs = np.asarray(list(duplicate_pairs(e_train, emb)[0]), dtype=np.int64).reshape(-1, 2)
            groups = duplicate_groups(n, pairs[:, 0], pairs[:, 1])
            dup = np.bincount(groups)[groups] - 1
            outlier = ref_dist[:, : min(outlier_k, k)].mean(axis=1)
            knn_mean = ref_dist[:, : min(CARLINI_N, k)].mean(axis=1) if emb.metric == "l2" else None
            h_top1 = h_nn = None
            real, real_name = e_train.vectors, "train"
            if self.heldout is not None:
                e_h = embed(self.heldout, emb, cache_dir=cache_dir, progress=progress)
                skipped += [Skipped(i, r, "heldout") for i, r in e_h.skipped]
                hs, hi = search(index, emb, e_h.vectors, 1)
                h_top1, h_nn = hs[:, 0], hi[:, 0]
                real, real_name = e_h.vectors, "heldout"
            real, radii = _quality_reference(real)
            if self.heldout is not None:
                self._check_near_leaks(emb, e_h, s_scores, h_top1)
            skipped += [Skipped(i, r, "train") for i, r in e_train.skipped]
            self.refs.append(
                EmbedderReference(
                    embedder=emb, rule=rule, train_ids=list(e_train.ids), index=index, self_scores=s_scores,
                    self_indices=s_idx, duplicates=dup.astype(int), outlier=outlier, knn_mean=knn_mean,
                    heldout_top1=h_top1, heldout_nn=h_nn, groups=groups, quality_real=real,
                    quality_reference=real_name, quality_radii=radii,
                )
            )
        self.skipped = Skipped.unique(skipped)  # each embedder reports the same decode failures: keep one each

    def _warn(self, text: str) -> None:
        self.warnings.append(text)
        log.warning("%s", text)

    def _check_identical_leaks(self) -> int:
        """A leaky split (FiftyOne's term), first kind: held-out images byte-identical to training images (the
        content keys the embedding cache uses). Returns how many."""
        t_keys = set(self.train.item_keys())
        same = [i for i, k in zip(self.heldout.ids, self.heldout.item_keys()) if k in t_keys]
        if same:
            self._warn(f"leaky split: {len(same)} of {len(self.heldout)} held-out images are byte-identical to "
                       f"training images (e.g. {same[0]!r}); the loss gap, C_T and membership AUC then measure "
                       "nothing for them")
        return len(same)

    def _check_near_leaks(self, emb, e_held, self_scores, h_top1) -> None:
        """Second kind, per embedder: held-out images within the duplicate threshold of find_duplicates of a
        training image (beyond the byte-identical ones already reported)."""
        from .curate import duplicate_threshold

        thr = duplicate_threshold(emb, self_scores)
        near = int(((h_top1 <= thr) if emb.metric == "l2" else (h_top1 >= thr)).sum())
        if near > self._identical_leaks:
            self._warn(f"leaky split: {near} of {len(e_held)} held-out images are exact or near duplicates of "
                       f"training images under {emb.name} (within the duplicate threshold {thr:.4g}); use a "
                       "held-out set the model never saw")

    @property
    def primary(self) -> EmbedderReference:
        """The embedder whose copy rule drives onset and per-image copies: the first one of the most preferred family
        (Gu et al.'s ratio on pixels, then replication, then extraction; :attr:`CopyRule.priority`)."""
        return min(self.refs, key=lambda r: r.rule.priority)  # min() keeps the first of equal priority

    def loss_images(self, which: str, max_images: int, seed: int, size=None, channels=None):
        """``(ids, uint8 NHWC)`` of the fixed subset of the train / held-out images the loss pass scores, at the
        model's size and channel count; decoded once and kept while under :data:`LOSS_CACHE_BYTES`."""
        images = self.train if which == "train" else self.heldout
        key = (which, int(max_images), int(seed), size if not isinstance(size, list) else tuple(size), channels)
        got = self._loss_cache.get(key)
        if got is None:
            got = stack_images(images, loss_subset(len(images), max_images, seed), size, channels)
            if got[1].nbytes + sum(v[1].nbytes for v in self._loss_cache.values()) <= LOSS_CACHE_BYTES:
                self._loss_cache[key] = got
        return got


def _quality_reference(vectors: np.ndarray):
    """(real vectors, their k-NN radii) for the quality metrics: at most QUALITY_MAX_REAL, a seeded subset."""
    from .metrics.quality import PRDC_K, knn_radii

    v = np.asarray(vectors, np.float64)
    if len(v) > QUALITY_MAX_REAL:
        v = v[np.sort(np.random.default_rng(0).choice(len(v), QUALITY_MAX_REAL, replace=False))]
    if len(v) <= PRDC_K:
        return None, None
    return v, knn_radii(v)


# ---------------------------------------------------------------------------------------------------------------
# per-checkpoint evaluation


@dataclass
class SampleEvaluation:
    """Per-sample outcome under the primary embedder: which training image each copied sample copies."""

    metrics: dict[str, EmbedderMetrics]
    copied_train_ids: list[str]  # one entry per copying sample (primary embedder)
    signal: Optional[Estimate]
    copied: Optional[np.ndarray] = None  # (n,) bool: each sample passes the primary embedder's copy rule


def evaluate_samples(
    ref: ReferenceSet,
    images: np.ndarray,
    *,
    sample_paths: Optional[Sequence[Optional[str]]] = None,
    sample_indices: Optional[Sequence[int]] = None,
    sample_prompts: Optional[Sequence[Optional[str]]] = None,
    confidence: float = 0.95,
    gallery_size: int = 8,
) -> SampleEvaluation:
    """Metrics of one checkpoint's (finite) samples, uint8 NHWC, against the reference set, per embedder."""
    from .data import ImageSet
    from .embedders import embed
    from .metrics import authenticity, ct_statistic, heldout_calibrated_rate, top1_summary

    n = len(images)
    idx_list = list(sample_indices) if sample_indices is not None else list(range(n))
    paths = list(sample_paths) if sample_paths is not None else [None] * n
    texts = list(sample_prompts) if sample_prompts is not None else [None] * n
    out: dict[str, EmbedderMetrics] = {}
    copied_mask: Optional[np.ndarray] = None
    copied_ids: list[str] = []
    signal: Optional[Estimate] = None
    if n == 0:
        return SampleEvaluation({}, [], None)
    samples = ImageSet.from_arrays(images, ids=[f"sample_{i:05d}" for i in idx_list])
    primary = ref.primary
    for r in ref.refs:
        emb = r.embedder
        e = embed(samples, emb, cache_dir=None, cache=False)
        k = r.rule.neighbours_needed(r.largest_group if r.groups is not None else 1, r.index.ntotal)
        scores_k, nn_k = r.search(e.vectors, k)
        scores, nn = scores_k[:, :2], nn_k[:, :2]
        base_mean, base_p95 = top1_summary(r.self_scores[:, 0], r.metric)
        top_mean, top_p95 = top1_summary(scores[:, 0], r.metric)
        m = EmbedderMetrics(
            embedder=r.name, metric=r.metric, threshold=emb.default_threshold, num_samples=n,
            top1_mean=top_mean, top1_p95=top_p95, train_baseline_top1_mean=base_mean,
            train_baseline_top1_p95=base_p95,
        )
        got = r.rule.apply(r.as_distance(scores_k), scores_k, nn_k, confidence=confidence,
                           threshold=emb.default_threshold, groups=r.groups, knn_mean=r.knn_mean)
        for name, value in got.estimates.items():
            setattr(m, name, value)
        d = r.as_distance(scores)
        if r.heldout_top1 is not None:
            m.heldout_top1_mean = float(np.mean(r.heldout_top1))
            m.heldout_ct_z = ct_statistic(d[:, 0], r.as_distance(r.heldout_top1))
            rate, (t, lo, hi) = heldout_calibrated_rate(d[:, 0], r.as_distance(r.heldout_top1),
                                                        confidence=confidence)
            m.heldout_calibrated_rate = rate
            m.heldout_calibrated_threshold = r.as_score(t)
            ci = [r.as_score(v) if np.isfinite(v) else None for v in (lo, hi)]
            m.heldout_calibrated_threshold_ci = ci if r.metric == "l2" else ci[::-1]
        auth, _ = authenticity(d[:, 0], nn[:, 0].astype(np.int64), r.as_distance(r.self_scores[:, 0]), confidence=confidence)
        m.authenticity = auth.value
        m.quality = r.quality(e.vectors, confidence)
        order = np.argsort(got.rank, kind="stable")[:gallery_size]
        ratio = got.ratio
        m.top_matches = [
            SampleMatch(
                sample_index=int(idx_list[j]), sample_path=paths[j],
                neighbor_ids=[r.train_ids[int(t)] for t in nn[j] if t >= 0],
                scores=[float(s) for s in scores[j]], ratio=float(ratio[j]) if np.isfinite(ratio[j]) else None,
                copied=bool(got.copied[j]), prompt=texts[j],
            )
            for j in order
        ]
        out[r.name] = m
        if r is primary:
            copied_ids = [r.train_ids[int(t)] for t in nn[got.copied, 0]]
            copied_mask = np.asarray(got.copied, bool)
            signal = getattr(m, r.rule.signal)
    return SampleEvaluation(out, copied_ids, signal, copied_mask)


# ---------------------------------------------------------------------------------------------------------------
# denoising loss: one noise contract


@dataclass
class LossSettings:
    """How the denoising-loss pass scores a checkpoint (shared by audit, monitor, membership and LOO)."""

    timesteps: Sequence[int] = (100,)
    noise_draws: int = 2
    max_images: int = 512
    seed: int = 0
    batch_size: int = 64
    resolution: Optional[int] = None  # text-to-image: image size in pixels (default: the UNet's sample_size x VAE)


def loss_subset(n: int, n_max: int, seed: int) -> np.ndarray:
    """Positions of the fixed subset of ``n`` images the loss pass scores (all of them when ``n <= n_max``)."""
    return np.sort(np.random.default_rng(seed).permutation(n)[:n_max]) if n > n_max else np.arange(n)


def image_losses(model, scheduler, ids: Sequence[str], x: np.ndarray, *, timesteps, noise_draws: int, seed: int,
                 batch_size: int = 64, device=None) -> np.ndarray:
    """Per-image denoising losses under the noise contract: image ``ids[i]`` gets the noise of
    ``(seed, noise_index(ids[i]))`` -- the same in every run, at every checkpoint and in any subset."""
    from .metrics.loss import denoising_losses, noise_index

    return denoising_losses(model, scheduler, x, timesteps=tuple(int(t) for t in timesteps),
                            noise_draws=int(noise_draws), seed=int(seed), batch_size=int(batch_size), device=device,
                            indices=[noise_index(i) for i in ids])


def loss_pass(model, scheduler, ref: ReferenceSet, settings: LossSettings, device=None):
    """Denoising losses of (a fixed subset of) train and held-out images at fixed timesteps and noise.

    Returns ``(train_ids, train_losses, heldout_losses)`` or ``None`` for models the pass does not apply to
    (text-conditional pipelines: their loss needs captions and the VAE; models without a scheduler). Training images
    use noise seed ``settings.seed``, held-out ones ``seed + 1`` (held-out image ``x`` never shares noise with a
    training image of the same id). Images are brought to the model's resolution and channel count.
    """
    if scheduler is None or not callable(model):
        return None
    if hasattr(model, "text_encoder"):
        return text_loss_pass(model, scheduler, ref, settings, device=device)
    conf = getattr(model, "config", None)
    if getattr(conf, "cross_attention_dim", None):
        return None  # UNet2DConditionModel: needs text embeddings
    size = getattr(conf, "sample_size", None)
    size = tuple(int(s) for s in size) if isinstance(size, (list, tuple)) else size
    channels = getattr(conf, "in_channels", None)
    kw = dict(timesteps=settings.timesteps, noise_draws=settings.noise_draws, batch_size=settings.batch_size,
              device=device)
    t_ids, t_x = ref.loss_images("train", settings.max_images, settings.seed, size, channels)
    tl = image_losses(model, scheduler, t_ids, t_x, seed=settings.seed, **kw)
    hl = None
    if ref.heldout is not None:
        h_ids, h_x = ref.loss_images("heldout", settings.max_images, settings.seed + 1, size, channels)
        hl = image_losses(model, scheduler, h_ids, h_x, seed=settings.seed + 1, **kw)
    return t_ids, tl, hl


def text_loss_pass(pipe, scheduler, ref: ReferenceSet, settings: LossSettings, device=None):
    """The text-conditional denoising loss of a Stable-Diffusion-style pipeline: each image through the VAE (mean of
    the posterior times ``scaling_factor``, as the fine-tuning scripts train on), its caption through the text
    encoder (the pipeline's ``encode_prompt``), the UNet's prediction error at fixed timesteps and noise (the same
    noise contract as :func:`loss_pass`). Images without a caption are left out. Returns ``(train_ids,
    train_losses, heldout_losses or None)``, or None without training captions."""
    if ref.captions is None or not all(hasattr(pipe, a) for a in ("unet", "vae", "encode_prompt")):
        return None
    import torch

    unet, vae = pipe.unet, pipe.vae
    vsf = int(getattr(pipe, "vae_scale_factor", 8) or 8)
    s = getattr(unet.config, "sample_size", None)
    px = (int(s) * vsf) if isinstance(s, int) else (None if s is None else tuple(int(v) * vsf for v in s))
    if settings.resolution is not None:  # fine-tuned at another --resolution: score at the size it samples
        px = int(settings.resolution)
    params = next(iter(unet.parameters()), None)
    dev = torch.device(device) if device is not None else (params.device if params is not None else
                                                           torch.device(getattr(unet, "device", "cpu")))

    def losses(which: str, captions: dict[str, str], seed: int):
        ids, x = ref.loss_images(which, settings.max_images, seed, px, 3)
        keep = [i for i, k in enumerate(ids) if k in captions]
        if not keep:
            return [], np.zeros(0)
        ids = [ids[i] for i in keep]
        x = x[keep]
        out = np.empty(len(ids), dtype=np.float64)
        with torch.inference_mode():
            for s0 in range(0, len(ids), settings.batch_size):
                sl = slice(s0, s0 + settings.batch_size)
                xb = torch.from_numpy(np.ascontiguousarray(x[sl].transpose(0, 3, 1, 2))).float() / 127.5 - 1.0
                lat = vae.encode(xb.to(dev, vae.dtype)).latent_dist.mean.float().cpu() * float(vae.config.scaling_factor)
                emb, _ = pipe.encode_prompt([captions[k] for k in ids[sl]], dev, 1, False)
                for j in range(lat.shape[0]):
                    out[s0 + j] = image_losses(_text_conditioned(unet, emb[j:j + 1]), scheduler, [ids[s0 + j]],
                                               lat[j:j + 1].numpy(), timesteps=settings.timesteps,
                                               noise_draws=settings.noise_draws, seed=seed,
                                               batch_size=settings.batch_size, device=dev)[0]
        return ids, out

    t_ids, tl = losses("train", ref.captions, settings.seed)
    if not t_ids:
        log.warning("text-to-image loss: none of the training images the loss scores has a caption; skipped")
        return None
    hl = None
    if ref.heldout is not None and ref.heldout_captions:
        h_ids, hl = losses("heldout", ref.heldout_captions, settings.seed + 1)
        hl = hl if len(h_ids) else None
    return t_ids, tl, hl


@functools.lru_cache(maxsize=1)
def _text_conditioned_class():
    import torch

    class TextConditioned(torch.nn.Module):
        """``unet(x, t, encoder_hidden_states=emb)`` for one caption embedding, broadcast over the batch."""

        def __init__(self, unet, emb) -> None:
            super().__init__()
            self.unet = unet
            self.emb = emb

        def forward(self, x, t):
            e = self.emb.to(x.device, x.dtype).expand(x.shape[0], *self.emb.shape[1:])
            return self.unet(x, t, encoder_hidden_states=e).sample

    return TextConditioned


def _text_conditioned(unet, emb):
    return _text_conditioned_class()(unet, emb)


def set_loss_metrics(cr: CheckpointResult, train_losses, heldout_losses=None) -> None:
    """Fill a checkpoint's loss fields from per-image losses: means, gap (held-out - train), membership AUC."""
    from .metrics import loss_gap, membership_auc

    cr.loss_train = float(np.mean(train_losses))
    if heldout_losses is not None:
        cr.loss_heldout = float(np.mean(heldout_losses))
        cr.loss_gap = loss_gap(train_losses, heldout_losses)
        cr.membership_auc = float(membership_auc(train_losses, heldout_losses))


def stack_images(images, positions, size=None, channels=None) -> tuple[list[str], np.ndarray]:
    """Decode ``positions`` of an ImageSet into one uint8 NHWC array at the model's size and channel count
    (grayscale models get the channel mean). Returns ``(ids, images)``; decode failures are left out."""
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
# the one per-checkpoint step


@dataclass
class CheckpointEvaluation:
    """What one checkpoint evaluation produced, beyond its :class:`CheckpointResult`."""

    result: CheckpointResult
    copied_train_ids: list[str] = field(default_factory=list)
    train_loss_ids: list[str] = field(default_factory=list)
    train_losses: Optional[np.ndarray] = None
    heldout_losses: Optional[np.ndarray] = None
    skipped: list[Skipped] = field(default_factory=list)
    sample_prompts: list[Optional[str]] = field(default_factory=list)  # of the finite samples (text-to-image)
    sample_copied: Optional[np.ndarray] = None  # (finite samples,) bool under the primary embedder


def evaluate_checkpoint(
    ref: ReferenceSet,
    step: int,
    path: str,
    *,
    sample: Optional[Callable[[], Any]],
    model: Callable[[], Any],
    scheduler,
    loss: Optional[LossSettings],
    confidence: float = 0.95,
    gallery_size: int = 8,
    sample_path: Optional[Callable[[int], str]] = None,
    device=None,
) -> CheckpointEvaluation:
    """Sample -> finite mask -> evaluate -> :class:`CheckpointResult` -> copies -> denoising loss, for one checkpoint.

    ``sample``: zero-argument callable returning a :class:`~diffaudit.sampling.SampleBatch` (None: this evaluation
    does not sample, the loss only). ``model``: zero-argument callable returning the denoiser (loaded lazily, e.g.
    only when the samples are not on disk). ``sample_path(i)``: the report path of sample ``i`` (kept samples).
    ``loss``: :class:`LossSettings` (None: no loss pass). Non-finite samples are counted and left out; a non-finite
    loss is skipped with a warning (the samples still count).
    """
    cr = CheckpointResult(step=int(step), path=str(path), num_samples=0)
    ev = CheckpointEvaluation(cr)
    if sample is not None:
        batch = sample()
        finite = np.asarray(batch.finite_mask, bool)
        idx = np.asarray(batch.indices)[finite]
        paths = [sample_path(int(i)) for i in idx] if sample_path is not None else None
        bp = getattr(batch, "prompts", None)
        texts = [p for p, ok in zip(bp, finite) if ok] if bp else None
        se = evaluate_samples(ref, batch.images[finite], sample_paths=paths, sample_indices=idx,
                              sample_prompts=texts, confidence=confidence, gallery_size=gallery_size)
        ev.sample_prompts = list(texts) if texts else []
        ev.sample_copied = se.copied
        if sample_path is not None:  # the same seeds at every checkpoint: the report's sample grid
            cr.grid = [sample_path(int(i)) for i in np.sort(idx)[:GRID_SAMPLES]]
        cr.num_samples = int(finite.size)
        cr.num_nonfinite = int((~finite).sum())
        cr.metrics = se.metrics
        cr.onset_signal = se.signal
        ev.copied_train_ids = se.copied_train_ids
        if cr.num_nonfinite and cr.num_nonfinite == cr.num_samples:
            cr.failed = "every sample is NaN/inf (broken or diverged weights): not evaluated, not counted as 'no copies'"
            log.warning("step %s: FAILED checkpoint: %s", step, cr.failed)
        elif cr.num_nonfinite:
            log.warning("step %s: %d of %d samples contain NaN/inf (left out)", step, cr.num_nonfinite, cr.num_samples)
            ev.skipped.append(Skipped(f"{cr.num_nonfinite} samples", "NaN/inf in the generated image",
                                      f"samples@{step}"))
    if loss is not None:
        try:
            lp = loss_pass(model(), scheduler, ref, loss, device=device)
        except FloatingPointError as e:  # NaN/inf model outputs: no loss for this checkpoint; samples still count
            log.warning("step %s: denoising loss skipped: %s", step, e)
            ev.skipped.append(Skipped("denoising loss", str(e), f"loss@{step}"))
            lp = None
        if lp is not None:
            ev.train_loss_ids, ev.train_losses, ev.heldout_losses = list(lp[0]), lp[1], lp[2]
            set_loss_metrics(cr, lp[1], lp[2])
    return ev


# ---------------------------------------------------------------------------------------------------------------
# result assembly


def risk_table(ref: ReferenceSet, copies: Sequence[tuple[int, Sequence[str]]],
               membership: Optional[dict[str, float]] = None) -> list[ImageRisk]:
    """Per training image (primary embedder): copies per checkpoint, duplicates, outlier score and label, and the
    membership score; ``copies`` = ``[(step, copied training ids), ...]``. Rows in :meth:`ImageRisk.sort_key` order."""
    from .metrics import copies_per_image, outlier_labels

    membership = membership or {}
    p = ref.primary
    nn_ids = [tid for _, ids in copies for tid in ids]
    steps = [int(s) for s, ids in copies for _ in ids]
    counts = copies_per_image(nn_ids, np.ones(len(nn_ids), bool), np.asarray(steps, dtype=np.int64))
    labels = outlier_labels(p.outlier, quantile=ref.outlier_quantile)
    rows = []
    for i, tid in enumerate(p.train_ids):
        c = counts.get(tid)
        rows.append(
            ImageRisk(
                id=tid, copies=c.copies if c else 0, first_step_copied=c.first_step if c else None,
                copies_by_step=dict(c.copies_by_step) if c else {}, duplicates=int(p.duplicates[i]),
                outlier_score=float(p.outlier[i]), label=str(labels[i]), membership_score=membership.get(tid),
                caption=(ref.captions or {}).get(tid),
            )
        )
    rows.sort(key=ImageRisk.sort_key)
    return rows


def provenance(ref: ReferenceSet, *, version: str, run: str = "", checkpoint_files: Optional[dict] = None,
               seed: int = 0, num_samples: int = 0, sampler: Optional[dict] = None,
               extra: Optional[dict] = None) -> Provenance:
    """The provenance record of a result over ``ref`` (what was audited, with which settings, when)."""
    return Provenance(
        diffaudit_version=version,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        run=str(run),
        checkpoint_files=dict(checkpoint_files or {}),
        train=str(getattr(ref.train, "source", "")),
        train_fingerprint=ref.train.fingerprint(),
        heldout=str(getattr(ref.heldout, "source", "")) if ref.heldout is not None else "",
        heldout_fingerprint=ref.heldout.fingerprint() if ref.heldout is not None else "",
        embedders=[r.embedder.describe() for r in ref.refs],
        seed=int(seed),
        num_samples=int(num_samples),
        sampler=dict(sampler or {}),
        extra=dict(extra or {}),
    )
