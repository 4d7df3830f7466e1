"""The disjoint-split test: do two models trained on disjoint halves of a data set generate the same images?

Kadkhodaie, Guth, Simoncelli & Mallat (ICLR 2024, "Generalization in diffusion models arises from geometry-adaptive
harmonic representations") train two diffusion models on non-overlapping training sets and sample both from the same
noise. Once the models generalize, the two samples of a seed are nearly the same image, far from either training
set; while they memorize, each model reproduces an image of its own training set, so the two samples differ.

:func:`compare_runs` samples run A and run B at every step both runs have, with the same per-sample noise
(:class:`~diffaudit.sampling.CheckpointSampler`, one seed), embeds the samples and both training sets (pixel L2 by
default), and reports per checkpoint:

* **agreement**: the share of seeds whose two samples are closer to each other than either is to any training image
  (of A or of B): ``d(a_i, b_i) < min(d(a_i, T), d(b_i, T))`` with ``T = train_A U train_B``;
* **copies of A / of B**: the share of each run's samples that copy an image of its own training set by Gu et al.'s
  rule (nearest / second-nearest < 1/3 in that set, :class:`~diffaudit.metrics.rules.GuRatioRule`);

each a proportion with a Wilson interval. Agreement rising as copies fall is generalization.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Optional

import numpy as np

from .data import as_imageset
from .metrics.memorization import GU_THRESHOLD, nn_ratio
from .metrics.stats import proportion_estimate
from .results import CompareCheckpoint, CompareResult

log = logging.getLogger(__name__)

__all__ = ["compare_runs"]


def _run(checkpoints, name: str, scheduler, ema: str):
    from .audit import is_model_list, memory_run
    from .checkpoints import CheckpointRun, discover_checkpoints

    if isinstance(checkpoints, CheckpointRun):
        return checkpoints
    if is_model_list(checkpoints):
        return memory_run(checkpoints, scheduler=scheduler)
    if not isinstance(checkpoints, (str, os.PathLike)):
        raise TypeError(f"{name}: expected a run folder, a CheckpointRun or [(step, model), ...]; "
                        f"got {type(checkpoints).__name__}")
    run = discover_checkpoints(checkpoints, ema=ema, scheduler=scheduler)
    if not run.checkpoints:
        raise ValueError(f"{name}={str(checkpoints)!r}: no checkpoints found")
    return run


def compare_runs(run_a: Any, run_b: Any, train_a: Any, train_b: Any, *, num_samples: int = 128, seed: int = 0,
                 num_inference_steps: int = 50, sampler: str = "ddim", embedder: Any = "pixel",
                 scheduler=None, ema: str = "prefer", batch_size: int = 64, device=None, confidence: float = 0.95,
                 cache_dir=None, progress: bool = False) -> CompareResult:
    """The disjoint-split test (module docstring) at every step both runs have.

    ``run_a`` / ``run_b``: run folders (as ``audit``), CheckpointRuns or in-memory ``[(step, model), ...]`` (then
    ``scheduler=`` is the training noise scheduler). ``train_a`` / ``train_b``: the two training sets (ImageSets or
    folders). The embedder is prepared on ``train_a`` (pixel: its native size)."""
    from .embedders import embed, get_embedder
    from .index import EmbeddingIndex
    from .sampling import CheckpointSampler

    for name, v, lo in (("num_samples", num_samples, 2), ("num_inference_steps", num_inference_steps, 1),
                        ("batch_size", batch_size, 1), ("seed", seed, 0)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
            raise ValueError(f"{name}={v!r} is not allowed: expected an integer >= {lo}")
    ra, rb = _run(run_a, "run_a", scheduler, ema), _run(run_b, "run_b", scheduler, ema)
    ta, tb = as_imageset(train_a, "train_a"), as_imageset(train_b, "train_b")
    steps = sorted(set(ra.steps) & set(rb.steps))
    if not steps:
        raise ValueError(f"run_a and run_b share no checkpoint step (A: {ra.steps}, B: {rb.steps}); compare "
                         "runs checkpointed at the same steps")
    emb = get_embedder(embedder)
    emb.prepare(ta)
    if emb.metric != "l2":
        raise ValueError(f"embedder={emb.name!r}: the disjoint-split test compares L2 distances; use an l2 embedder "
                         "such as 'pixel'")
    ea, eb = embed(ta, emb, cache_dir=cache_dir, progress=progress), embed(tb, emb, cache_dir=cache_dir, progress=progress)
    if len(ea) < 2 or len(eb) < 2:
        raise ValueError("train_a and train_b need at least 2 decodable images each (Gu et al.'s ratio)")
    overlap = set(map(_digest, ea.vectors)) & set(map(_digest, eb.vectors))
    if overlap:
        log.warning("train_a and train_b share %d identical images: the split is not disjoint", len(overlap))
    idx_a, idx_b = EmbeddingIndex.from_embeddings(ea), EmbeddingIndex.from_embeddings(eb)
    sampler_a = CheckpointSampler(ra.new_scheduler(), int(num_samples), seed=int(seed),
                                  num_inference_steps=int(num_inference_steps), sampler=sampler,
                                  batch_size=int(batch_size), device=device)
    sampler_b = CheckpointSampler(rb.new_scheduler(), int(num_samples), seed=int(seed),
                                  num_inference_steps=int(num_inference_steps), sampler=sampler,
                                  batch_size=int(batch_size), device=device)
    by_a = {c.step: c for c in ra.checkpoints}
    by_b = {c.step: c for c in rb.checkpoints}
    rows = []
    for step in steps:
        sa = sampler_a.sample(ra.load(by_a[step], device=device))
        sb = sampler_b.sample(rb.load(by_b[step], device=device))
        both = np.asarray(sa.finite_mask, bool) & np.asarray(sb.finite_mask, bool)
        if not both.any():
            log.warning("step %s: no seed gave finite samples in both runs; skipped", step)
            continue
        va = embed(sa.images[both], emb, cache=False).vectors
        vb = embed(sb.images[both], emb, cache=False).vectors
        rows.append(_compare_step(step, va, vb, idx_a, idx_b, int((~both).sum()), confidence))
    return CompareResult(checkpoints=rows, embedder=emb.name, num_samples=int(num_samples), seed=int(seed),
                         run_a=str(ra.root), run_b=str(rb.root), train_a=str(ta.source), train_b=str(tb.source),
                         num_train_a=len(ea), num_train_b=len(eb), shared_train_images=len(overlap))


def _digest(v: np.ndarray) -> bytes:
    import hashlib

    return hashlib.sha1(np.ascontiguousarray(v).tobytes()).digest()


def _compare_step(step: int, va: np.ndarray, vb: np.ndarray, idx_a, idx_b, nonfinite: int,
                  confidence: float) -> CompareCheckpoint:
    d_ab = np.sqrt(((va.astype(np.float64) - vb) ** 2).sum(axis=1))
    da_own, _ = idx_a.search(va, k=2)  # each run's samples against its own training set
    db_own, _ = idx_b.search(vb, k=2)
    da_other, _ = idx_b.search(va, k=1)
    db_other, _ = idx_a.search(vb, k=1)
    near_a = np.minimum(da_own[:, 0], da_other[:, 0])  # nearest image of train_A U train_B
    near_b = np.minimum(db_own[:, 0], db_other[:, 0])
    agree = d_ab < np.minimum(near_a, near_b)
    copy_a = nn_ratio(da_own[:, 0], da_own[:, 1]) < GU_THRESHOLD
    copy_b = nn_ratio(db_own[:, 0], db_own[:, 1]) < GU_THRESHOLD
    return CompareCheckpoint(
        step=int(step), num_samples=len(va), num_nonfinite=nonfinite,
        agreement=proportion_estimate(agree, confidence=confidence),
        copies_a=proportion_estimate(copy_a, confidence=confidence),
        copies_b=proportion_estimate(copy_b, confidence=confidence),
        median_distance_ab=float(np.median(d_ab)), median_distance_train=float(np.median(np.minimum(near_a, near_b))))


def agreement_summary(result: CompareResult) -> Optional[str]:
    """One line on the last checkpoint (None without checkpoints)."""
    if not result.checkpoints:
        return None
    c = result.checkpoints[-1]
    return (f"step {c.step}: {c.agreement.value:.0%} of seeds agree across the two runs; run A copies its own set in "
            f"{c.copies_a.value:.0%} of samples, run B in {c.copies_b.value:.0%}")
