"""Memorization onset: the one rule shared by ``audit()`` and the training-time monitor (no framework import).

Onset rule
----------
At each evaluated checkpoint the audit computes an onset *signal* -- a fraction of copied samples with a
confidence interval (``Estimate``; Wilson score interval, see ``diffaudit.metrics.stats``). Memorization onset is
the first evaluated step ``s`` such that the CI **lower bound** exceeds ``threshold`` at ``s`` and at the next
``patience - 1`` evaluated steps:

* the lower bound makes one checkpoint's evidence count only when the fraction is *significantly* above the
  threshold at the chosen confidence (a handful of chance near-copies among a few hundred samples is not enough);
* ``patience`` consecutive confirmations ignore isolated blips (sampling noise, a bad checkpoint);
* the onset is reported at the *first* step of the confirming run, so it does not lag by ``patience - 1`` steps.

While fewer than ``patience`` evaluations exist after a candidate step, onset is *not yet confirmed* and the result
is ``None``; the monitor calls :func:`detect_onset` on the whole history after each evaluation and stops training
the first time it returns a step. Missing lower bounds (``None``/NaN: not computed) break a run.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

DEFAULT_THRESHOLD = 0.02
DEFAULT_PATIENCE = 2
DEFAULT_CONFIDENCE = 0.95


def _check_rule(threshold: float, patience: int) -> None:
    if not math.isfinite(float(threshold)):
        raise ValueError(f"threshold={threshold!r} must be a finite number (e.g. 0.02 = 2% of samples)")
    if int(patience) != patience or patience < 1:
        raise ValueError(f"patience={patience!r} must be an integer >= 1")


def _sorted_history(steps: Sequence[int], values: Sequence, name: str) -> list[tuple[int, object]]:
    steps = [int(s) for s in steps]
    values = list(values)
    if len(steps) != len(values):
        raise ValueError(f"steps and {name} must have the same length; got {len(steps)} and {len(values)}")
    if len(set(steps)) != len(steps):
        dup = sorted({s for s in steps if steps.count(s) > 1})
        raise ValueError(f"steps must be unique; repeated: {dup}")
    return sorted(zip(steps, values), key=lambda p: p[0])


def _valid(x) -> bool:
    return x is not None and math.isfinite(float(x))


def detect_onset(steps: Sequence[int], lows: Sequence[Optional[float]], threshold: float = DEFAULT_THRESHOLD,
                 patience: int = DEFAULT_PATIENCE) -> Optional[int]:
    """First evaluated step whose CI lower bound, and those of the next ``patience - 1`` evaluated steps, are all
    ``> threshold``; ``None`` when no such run is (yet) complete. Steps need not be given in order."""
    _check_rule(threshold, patience)
    hist = _sorted_history(steps, lows, "lows")
    run_start, run_len = None, 0
    for step, low in hist:
        if _valid(low) and float(low) > threshold:
            if run_len == 0:
                run_start = step
            run_len += 1
            if run_len >= patience:
                return run_start
        else:
            run_start, run_len = None, 0
    return None


@dataclass(frozen=True)
class OnsetRule:
    """Parameters of the onset rule; ``confidence`` is the CI level the signal's lower bound is computed at."""

    threshold: float = DEFAULT_THRESHOLD
    patience: int = DEFAULT_PATIENCE
    confidence: float = DEFAULT_CONFIDENCE

    def __post_init__(self) -> None:
        _check_rule(self.threshold, self.patience)
        if not 0.0 < float(self.confidence) < 1.0:
            raise ValueError(f"confidence={self.confidence!r} must be strictly between 0 and 1")

    def detect(self, steps: Sequence[int], lows: Sequence[Optional[float]]) -> Optional[int]:
        return detect_onset(steps, lows, self.threshold, self.patience)


class Recommendation(NamedTuple):
    step: Optional[int]
    reason: str


def recommend_checkpoint(steps: Sequence[int], onset_step: Optional[int],
                         heldout_losses: Optional[Sequence[Optional[float]]] = None,
                         signal_values: Optional[Sequence[Optional[float]]] = None) -> Recommendation:
    """The checkpoint to keep: ``(step, reason)``.

    Candidates are the checkpoints strictly before ``onset_step`` (all of them when there is no onset). Among them,
    the one with the lowest held-out denoising loss (the generalization criterion: early stopping on validation
    loss) when losses are given; ties go to the lower onset signal, then to the later step. Without held-out losses,
    the latest candidate (most trained before memorization). ``step`` is ``None`` when onset is at the first
    evaluated checkpoint (no clean checkpoint was evaluated).
    """
    steps = [int(s) for s in steps]
    base = _sorted_history(steps, [None] * len(steps), "steps")
    all_steps = [s for s, _ in base]
    if not all_steps:
        return Recommendation(None, "no checkpoints were evaluated")
    losses = dict(_sorted_history(steps, heldout_losses, "heldout_losses")) if heldout_losses is not None else {}
    signal = dict(_sorted_history(steps, signal_values, "signal_values")) if signal_values is not None else {}
    cand = all_steps if onset_step is None else [s for s in all_steps if s < int(onset_step)]
    where = "no memorization onset was detected" if onset_step is None else \
        f"memorization onset at step {int(onset_step)}"
    if not cand:
        return Recommendation(None, f"{where} and no earlier checkpoint was evaluated; evaluate earlier "
                                    "checkpoints or retrain with fewer steps / more data")
    with_loss = [s for s in cand if _valid(losses.get(s))]
    if with_loss:
        def key(s: int):
            sig = signal.get(s)
            return (float(losses[s]), float(sig) if _valid(sig) else math.inf, -s)

        best = min(with_loss, key=key)
        scope = "all checkpoints" if onset_step is None else f"checkpoints before step {int(onset_step)}"
        return Recommendation(best, f"{where}; lowest held-out denoising loss ({float(losses[best]):.6g}) among "
                                    f"{scope} with a held-out loss ({len(with_loss)})")
    best = max(cand)
    if onset_step is None:
        return Recommendation(best, f"{where}; latest checkpoint (no held-out loss to compare checkpoints)")
    return Recommendation(best, f"{where}; latest checkpoint before onset (no held-out loss to compare checkpoints)")


# ---------------------------------------------------------------------------------------------------------------
# MemorizationMonitor: the training-time monitor (framework-free; Lightning / accelerate glue in integrations/)

_log = logging.getLogger(__name__)

#: ``state_dict()`` format tag (bumped when the layout changes)
STATE_FORMAT = "diffaudit.MemorizationMonitor/1"

#: byte budget for keeping the denoising-loss images decoded in memory between evaluations
_LOSS_CACHE_BYTES = 256 * 2**20


def _env_rank() -> Optional[int]:
    """This process's rank from the launcher's environment (torchrun, accelerate, Lightning), None when unset."""
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        v = os.environ.get(key)
        if v is not None and v.strip().lstrip("-").isdigit():
            return int(v)
    return None


def _fmt_pct(x: Optional[float]) -> str:
    return "n/a" if x is None or not math.isfinite(float(x)) else f"{float(x):.1%}"


class MemorizationMonitor:
    """Watches a diffusion model *during training* and says when it starts copying its training images.

    Built once with the training set (and an optional held-out set) and an embedder; the training-set embeddings
    and nearest-neighbour index (:class:`diffaudit.audit.ReferenceSet`) are built once, never per evaluation. Call
    :meth:`update` after every optimizer step::

        monitor = MemorizationMonitor(train="data/train", heldout="data/val", every_n_steps=500,
                                      scheduler=noise_scheduler)
        for step in range(1, max_steps + 1):
            ...  # one optimizer step
            if monitor.update(step, unet):      # True = memorization onset confirmed: stop
                break

    Every ``every_n_steps`` steps the monitor evaluates the model: the denoising-loss gap (train vs held-out loss at
    fixed timesteps and noise; cheap) at every evaluation, and, at every ``sample_every``-th evaluation,
    ``num_samples`` samples drawn from the *same* per-sample noise each time (:class:`CheckpointSampler`, seed
    ``seed``) and matched against the training set with the audit's metrics (:func:`diffaudit.audit.evaluate_samples`).
    Onset is decided by the audit's rule (:class:`OnsetRule` on the CI lower bounds of the onset signal of the
    evaluations that sampled): ``update`` returns True from the evaluation that confirms it on. Between evaluations
    ``update`` does no work at all.

    ``model_or_pipeline``: a UNet (``UNet2DModel`` or any ``model(x, t)`` denoiser) -- then the training noise
    scheduler is needed, given here as ``scheduler=`` or to :meth:`update` -- or an unconditional pipeline
    (``DDPMPipeline``: its ``unet`` and ``scheduler`` are used). During an evaluation the model is put in eval mode
    (each submodule's train/eval mode is restored afterwards), gradients are off, and the global torch RNG state is
    saved and restored, so training continues exactly as it would have without the monitor. Sampling runs on the
    model's own device unless ``device=`` says otherwise (the model is moved there and back).

    State: :attr:`history` (one :class:`CheckpointResult` per evaluation), :attr:`onset_step`, :attr:`best_step`
    (the checkpoint to keep: :func:`recommend_checkpoint`), :attr:`stopped`, :attr:`metrics` (latest scalars,
    ``diffaudit/...`` names). :meth:`state_dict` / :meth:`load_state_dict` (plain JSON values) let a resumed run keep
    its history. Logs through :mod:`logging`; ``tensorboard_dir=`` (a folder, or a ``SummaryWriter``) also writes
    the scalars to TensorBoard at the training step.

    ``lazy``: build the reference data at the first evaluation instead of now. Default (None): now, except in a
    non-zero rank of a distributed launch (``RANK``/``LOCAL_RANK`` set and > 0), which never evaluates.
    """

    def __init__(
        self,
        train,
        heldout=None,
        embedder="pixel",
        every_n_steps: int = 500,
        num_samples: int = 256,
        sample_every: int = 1,
        seed: int = 0,
        num_inference_steps: int = 25,
        sampler: str = "ddim",
        scheduler=None,
        rule: Optional[OnsetRule] = None,
        batch_size: int = 64,
        device=None,
        loss_timesteps: Sequence[int] = (100,),
        cache_dir=None,
        tensorboard_dir=None,
        progress: bool = False,
        *,
        weights: Optional[dict] = None,
        loss_noise_draws: int = 2,
        loss_max_images: int = 256,
        gallery_size: int = 4,
        lazy: Optional[bool] = None,
    ) -> None:
        from .sampling import SAMPLERS

        def _int(name, value, lo):
            if isinstance(value, bool) or int(value) != value or int(value) < lo:
                raise ValueError(f"MemorizationMonitor: {name}={value!r} is not allowed; expected an integer >= {lo}")
            return int(value)

        self.every_n_steps = _int("every_n_steps", every_n_steps, 1)
        self.num_samples = _int("num_samples", num_samples, 2)
        self.sample_every = _int("sample_every", sample_every, 1)
        self.seed = _int("seed", seed, 0)
        self.num_inference_steps = _int("num_inference_steps", num_inference_steps, 1)
        self.batch_size = _int("batch_size", batch_size, 1)
        self.loss_noise_draws = _int("loss_noise_draws", loss_noise_draws, 1)
        self.loss_max_images = _int("loss_max_images", loss_max_images, 1)
        self.gallery_size = _int("gallery_size", gallery_size, 0)
        if sampler not in SAMPLERS:
            raise ValueError(f"MemorizationMonitor: sampler={sampler!r} is not allowed; expected one of {list(SAMPLERS)}")
        self.sampler_name = sampler
        rule = OnsetRule() if rule is None else rule
        if not isinstance(rule, OnsetRule):
            raise TypeError(f"MemorizationMonitor: rule={rule!r} must be an OnsetRule(threshold=, patience=, confidence=)")
        self.rule = rule
        ts = [loss_timesteps] if isinstance(loss_timesteps, int) else list(loss_timesteps)
        if not ts or any(isinstance(t, bool) or int(t) != t or int(t) < 0 for t in ts):
            raise ValueError(f"MemorizationMonitor: loss_timesteps={loss_timesteps!r} must be non-empty integers >= 0")
        self.loss_timesteps = tuple(int(t) for t in ts)
        specs = list(embedder) if isinstance(embedder, (list, tuple)) else [embedder]
        if not specs:
            raise ValueError("MemorizationMonitor: embedder=[] is not allowed; give a spec such as 'pixel'")
        self.embedders = specs
        self.weights = dict(weights or {})
        self.cache_dir = cache_dir
        self.device = device
        self.progress = bool(progress)
        self.scheduler = self._as_scheduler(scheduler, "scheduler")
        self._train_arg = self._as_imageset(train, "train")
        self._heldout_arg = self._as_imageset(heldout, "heldout") if heldout is not None else None
        self._tb_arg = tensorboard_dir
        self._tb = None
        self._tb_owned = False

        self.history: list = []  # CheckpointResult, in evaluation order
        self._steps: set[int] = set()
        self.stopped = False
        self._onset_step: Optional[int] = None
        self._num_evaluations = 0
        self._copies: dict[str, dict[int, int]] = {}
        self._metrics: dict[str, float] = {}
        self._ref = None
        self._loss_ref = None
        self._sampler = None
        if lazy is None:
            lazy = (_env_rank() or 0) > 0
        if not lazy:
            self.prepare()

    # -- construction helpers ----------------------------------------------------------------------------------
    @staticmethod
    def _as_imageset(images, name: str):
        import numpy as np

        from .data import ImageSet

        if isinstance(images, ImageSet):
            return images
        if isinstance(images, np.ndarray):
            return ImageSet.from_arrays(images)
        if isinstance(images, (str, os.PathLike)):
            from pathlib import Path

            if not Path(images).is_dir():
                raise FileNotFoundError(f"MemorizationMonitor: {name}={str(images)!r} is not a folder of images")
            return images  # ReferenceSet scans it (once)
        raise TypeError(f"MemorizationMonitor: {name} must be an ImageSet, a folder or a uint8 array; got "
                        f"{type(images).__name__}")

    @staticmethod
    def _as_scheduler(spec, name: str):
        if spec is None:
            return None
        from diffusers.schedulers.scheduling_utils import SchedulerMixin

        if isinstance(spec, SchedulerMixin):
            return spec
        from .checkpoints import load_scheduler

        try:
            return load_scheduler(spec)
        except ValueError as e:
            raise ValueError(f"MemorizationMonitor: {name}={spec!r}: {e}") from None

    def prepare(self) -> "MemorizationMonitor":
        """Build the reference data (training embeddings, index, held-out neighbours) now; idempotent."""
        if self._ref is None:
            import time

            from .audit import ReferenceSet
            from .sampling import CheckpointSampler

            t0 = time.perf_counter()
            self._ref = ReferenceSet(self._train_arg, self._heldout_arg, self.embedders, weights=self.weights,
                                     cache_dir=self.cache_dir, progress=self.progress)
            self._sampler = CheckpointSampler(
                None, self.num_samples, seed=self.seed, num_inference_steps=self.num_inference_steps,
                sampler=self.sampler_name, batch_size=self.batch_size, progress=self.progress,
            )
            _log.info("monitor: reference data for %d training images (%s) built in %.1fs",
                      len(self._ref.train), ", ".join(r.name for r in self._ref.refs), time.perf_counter() - t0)
        return self

    @property
    def reference(self):
        """The :class:`diffaudit.audit.ReferenceSet` (built on first use)."""
        return self.prepare()._ref

    # -- state ---------------------------------------------------------------------------------------------------
    @property
    def onset_step(self) -> Optional[int]:
        """First step of the confirmed memorization onset (None: not confirmed)."""
        return self._onset_step

    @property
    def evaluated_steps(self) -> list[int]:
        return [c.step for c in self.history]

    @property
    def best_step(self) -> Optional[int]:
        """The checkpoint to keep (:func:`recommend_checkpoint`): lowest held-out loss before onset, else the latest
        evaluated step before onset; None before any evaluation or when onset is at the first one."""
        return self.recommendation.step

    @property
    def recommendation(self) -> Recommendation:
        steps = [c.step for c in self.history]
        return recommend_checkpoint(
            steps, self._onset_step, heldout_losses=[c.loss_heldout for c in self.history],
            signal_values=[c.onset_signal.value if c.onset_signal is not None else None for c in self.history],
        )

    @property
    def metrics(self) -> dict[str, float]:
        """Scalars of the latest evaluation (``diffaudit/...``). The sample-based ones
        (``memorization_ratio``/``_low``/``_high``, ``ct_z``, ``authenticity``) come from the latest evaluation that
        sampled; ``diffaudit/onset`` is 1.0 once onset is confirmed."""
        return dict(self._metrics)

    @property
    def signal_name(self) -> str:
        """What the onset signal measures, e.g. ``memorization_ratio[pixel-8x8]``."""
        if self._ref is None:
            return "memorization_ratio"
        p = self._ref.primary
        kind = ("memorization_ratio" if p.metric == "l2" and not p.is_tiled
                else "replication_rate" if p.metric == "cosine" else "extraction_fraction")
        return f"{kind}[{p.name}]"

    def _settings(self) -> dict:
        return {
            "every_n_steps": self.every_n_steps, "num_samples": self.num_samples, "sample_every": self.sample_every,
            "seed": self.seed, "num_inference_steps": self.num_inference_steps, "sampler": self.sampler_name,
            "embedders": [e if isinstance(e, str) else getattr(e, "name", type(e).__name__) for e in self.embedders],
            "loss_timesteps": list(self.loss_timesteps), "loss_noise_draws": self.loss_noise_draws,
            "rule": {"threshold": self.rule.threshold, "patience": self.rule.patience,
                     "confidence": self.rule.confidence},
        }

    def state_dict(self) -> dict:
        """Everything a resumed run needs, as plain JSON values (``json.dumps`` works on it)."""
        return {
            "format": STATE_FORMAT,
            "settings": self._settings(),
            "history": [c.to_dict() for c in self.history],
            "num_evaluations": self._num_evaluations,
            "stopped": bool(self.stopped),
            "onset_step": self._onset_step,
            "copies": {tid: {str(s): int(n) for s, n in by.items()} for tid, by in self._copies.items()},
            "metrics": {k: float(v) for k, v in self._metrics.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` output (after ``json.loads`` too). Settings that change the meaning of the
        history (samples, seed, sampler, embedders) are compared and a difference is logged as a warning."""
        from .results import CheckpointResult

        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            got = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"load_state_dict: expected a MemorizationMonitor state ({STATE_FORMAT!r}); got {got!r}")
        old = state.get("settings") or {}
        new = self._settings()
        diff = sorted(k for k in ("num_samples", "seed", "sampler", "num_inference_steps", "embedders")
                      if k in old and old[k] != new[k])
        if diff:
            _log.warning("monitor state was saved with other settings (%s); its history is not comparable with "
                         "new evaluations", ", ".join(f"{k}: {old[k]!r} -> {new[k]!r}" for k in diff))
        self.history = [CheckpointResult.from_dict(c) for c in state.get("history", [])]
        self._steps = {c.step for c in self.history}
        self._num_evaluations = int(state.get("num_evaluations", len(self.history)))
        self._copies = {tid: {int(s): int(n) for s, n in by.items()} for tid, by in (state.get("copies") or {}).items()}
        self._metrics = {k: float(v) for k, v in (state.get("metrics") or {}).items()}
        self._onset_step = self._detect()
        saved_onset = state.get("onset_step")
        if saved_onset is not None and self._onset_step is None:
            self._onset_step = int(saved_onset)  # confirmed under the rule in force then
        self.stopped = bool(state.get("stopped")) or self._onset_step is not None

    # -- the cadence -----------------------------------------------------------------------------------------------
    def due(self, step: int) -> bool:
        """Whether :meth:`update` would evaluate at ``step`` (a multiple of ``every_n_steps`` not yet evaluated)."""
        step = int(step)
        return step % self.every_n_steps == 0 and step not in self._steps

    def update(self, step: int, model_or_pipeline, scheduler=None) -> bool:
        """Call after each optimizer step. Evaluates when ``step`` is a multiple of ``every_n_steps`` (once per
        step); returns True when memorization onset is confirmed (stop training), and keeps returning
        :attr:`stopped` between evaluations, at no cost."""
        step = int(step)
        if step % self.every_n_steps or step in self._steps:
            return self.stopped
        return self.evaluate(step, model_or_pipeline, scheduler=scheduler)

    # -- one evaluation -----------------------------------------------------------------------------------------
    def evaluate(self, step: int, model_or_pipeline, scheduler=None, *, path: Optional[str] = None) -> bool:
        """Evaluate ``model_or_pipeline`` as the checkpoint of ``step`` now, whatever the cadence (``diffaudit
        watch`` uses this for each new checkpoint folder). Returns :attr:`stopped`."""
        import time

        import numpy as np
        import torch

        from .audit import evaluate_samples
        from .results import CheckpointResult

        step = int(step)
        if step in self._steps:
            raise ValueError(f"evaluate: step={step} was already evaluated (steps so far: {self.evaluated_steps})")
        ref = self.reference
        t0 = time.perf_counter()
        net, pipe_sched = _split_model(model_or_pipeline)
        sched = self._as_scheduler(scheduler, "scheduler") if scheduler is not None else None
        sched = sched or self.scheduler or pipe_sched
        if sched is None:
            raise ValueError(
                "MemorizationMonitor: no noise scheduler: pass the training noise scheduler (e.g. the DDPMScheduler the "
                "loop adds noise with) as scheduler= to MemorizationMonitor(...) or to update(), or pass a pipeline"
            )
        sampled = self._num_evaluations % self.sample_every == 0
        modes = _train_modes(model_or_pipeline)
        home = _model_device(net)
        target = torch.device(self.device) if self.device is not None else home
        cr = CheckpointResult(step=step, path=path or f"step-{step}", num_samples=0)
        rng_devices = [target.index or 0] if target.type == "cuda" else []
        copied: list[str] = []
        try:
            with torch.random.fork_rng(devices=rng_devices), torch.no_grad():
                if sampled:
                    smp = self._sampler
                    smp.scheduler = sched
                    smp.device = target
                    batch = smp.sample(model_or_pipeline)
                    finite = np.asarray(batch.finite_mask, bool)
                    idx = np.asarray(batch.indices)[finite]
                    ev = evaluate_samples(ref, batch.images[finite], sample_indices=idx,
                                          confidence=self.rule.confidence, gallery_size=self.gallery_size)
                    cr.num_samples = int(finite.size)
                    cr.num_nonfinite = int((~finite).sum())
                    cr.metrics = ev.metrics
                    cr.onset_signal = ev.signal
                    copied = ev.copied_train_ids
                    if cr.num_nonfinite:
                        _log.warning("step %d: %d of %d samples contain NaN/inf (left out)", step, cr.num_nonfinite,
                                     cr.num_samples)
                self._loss(net, sched, cr, target)
        finally:
            if home is not None and target != home and isinstance(net, torch.nn.Module):
                net.to(home)
            for mod, was_training in modes:
                mod.training = was_training
        for tid in copied:
            by = self._copies.setdefault(tid, {})
            by[step] = by.get(step, 0) + 1
        self.history.append(cr)
        self._steps.add(step)
        self._num_evaluations += 1
        self._onset_step = self._detect()
        newly = self._onset_step is not None and not self.stopped
        self.stopped = self.stopped or self._onset_step is not None
        scalars = self._scalars(cr)
        self._metrics = {**{k: v for k, v in self._metrics.items() if k in _SAMPLE_KEYS and not sampled}, **scalars}
        self._metrics["diffaudit/onset"] = 1.0 if self.stopped else 0.0
        self._write_tensorboard(step, {**scalars, "diffaudit/onset": self._metrics["diffaudit/onset"],
                                       "diffaudit/eval_seconds": time.perf_counter() - t0})
        _log.info("%s (%.1fs)", self.summary_line(), time.perf_counter() - t0)
        if newly:
            rec = self.recommendation
            _log.warning("memorization onset confirmed at step %d (%s); %s", self._onset_step, self.signal_name,
                         f"keep step {rec.step}" if rec.step is not None else rec.reason)
        return self.stopped

    def _loss(self, net, sched, cr, device) -> None:
        from .audit import AuditConfig, loss_pass, set_loss_metrics

        cfg = AuditConfig(seed=self.seed, loss_timesteps=list(self.loss_timesteps),
                          loss_noise_draws=self.loss_noise_draws, loss_max_images=self.loss_max_images,
                          batch_size=self.batch_size)
        num_t = getattr(getattr(sched, "config", None), "num_train_timesteps", None)
        if num_t is not None and any(t >= int(num_t) for t in self.loss_timesteps):
            raise ValueError(f"MemorizationMonitor: loss_timesteps={list(self.loss_timesteps)} must be < the "
                             f"scheduler's num_train_timesteps={num_t}")
        try:
            lp = loss_pass(net, sched, self._loss_data(), cfg, device=device)
        except FloatingPointError as e:  # NaN/inf model outputs: no loss this evaluation; sampling still counts
            _log.warning("step %s: denoising loss not computed (%s)", cr.step, e)
            return
        if lp is not None:
            set_loss_metrics(cr, lp[1], lp[2])

    def _loss_data(self):
        """The training / held-out images the loss pass scores: a fixed subset (``loss_max_images``), decoded once
        and kept in memory when small enough."""
        if self._loss_ref is None:
            from types import SimpleNamespace

            ref = self.reference
            self._loss_ref = SimpleNamespace(
                train=_loss_subset(ref.train, self.loss_max_images, self.seed),
                heldout=_loss_subset(ref.heldout, self.loss_max_images, self.seed + 1) if ref.heldout is not None else None,
            )
        return self._loss_ref

    def _detect(self) -> Optional[int]:
        sampled = [c for c in self.history if c.onset_signal is not None]
        return self.rule.detect([c.step for c in sampled], [c.onset_signal.low for c in sampled])

    def _scalars(self, cr) -> dict[str, float]:
        out: dict[str, float] = {}

        def put(key, value):
            if value is not None and math.isfinite(float(value)):
                out[f"diffaudit/{key}"] = float(value)

        sig = cr.onset_signal
        if sig is not None:
            put("memorization_ratio", sig.value)
            put("memorization_low", sig.low)
            put("memorization_high", sig.high)
            if self._ref is not None and self._ref.primary.name in cr.metrics:
                m = cr.metrics[self._ref.primary.name]
                put("ct_z", m.heldout_ct_z)
                put("authenticity", m.authenticity)
                put("top1_mean", m.top1_mean)
        put("loss_train", cr.loss_train)
        put("loss_heldout", cr.loss_heldout)
        put("loss_gap", cr.loss_gap)
        put("membership_auc", cr.membership_auc)
        return out

    # -- reporting --------------------------------------------------------------------------------------------------
    def summary_line(self) -> str:
        """One line on the latest evaluation and the running verdict."""
        if not self.history:
            return "no evaluation yet"
        c = self.history[-1]
        parts = [f"step {c.step}:"]
        sig = c.onset_signal
        if sig is not None:
            parts.append(f"{self.signal_name} {_fmt_pct(sig.value)} (CI {_fmt_pct(sig.low)}-{_fmt_pct(sig.high)})")
        else:
            parts.append("loss only (no sampling at this evaluation)")
        if c.loss_gap is not None:
            parts.append(f"loss gap {c.loss_gap:+.4g}")
        elif c.loss_train is not None:
            parts.append(f"train loss {c.loss_train:.4g}")
        if self.stopped:
            rec = self.recommendation
            keep = f"keep step {rec.step}" if rec.step is not None else "no earlier clean checkpoint"
            verdict = f"ONSET at step {self._onset_step}: stop ({keep})"
        else:
            run = 0
            for h in reversed([h for h in self.history if h.onset_signal is not None]):
                low = h.onset_signal.low
                if low is not None and math.isfinite(low) and low > self.rule.threshold:
                    run += 1
                else:
                    break
            verdict = (f"no onset ({run}/{self.rule.patience} consecutive evaluations with the CI lower bound above "
                       f"{self.rule.threshold:.1%})")
        return " ".join(parts) + " -> " + verdict

    def to_result(self, run: str = ""):
        """The history as an :class:`diffaudit.results.AuditResult` (report, JSON) -- what ``diffaudit watch``
        writes at the end."""
        import datetime as _dt

        from . import __version__
        from .audit import _risk_table, _signal_label, _verdict
        from .results import AuditResult, OnsetInfo, Provenance

        ref = self.reference
        rec = self.recommendation
        onset = OnsetInfo(signal=self.signal_name, threshold=self.rule.threshold, patience=self.rule.patience,
                          confidence=self.rule.confidence, onset_step=self._onset_step, recommended_step=rec.step,
                          recommended_reason=rec.reason)
        prov = Provenance(
            diffaudit_version=__version__,
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            run=str(run), train=str(getattr(ref.train, "source", "")), train_fingerprint=ref.train.fingerprint(),
            heldout=str(getattr(ref.heldout, "source", "")) if ref.heldout is not None else "",
            heldout_fingerprint=ref.heldout.fingerprint() if ref.heldout is not None else "",
            embedders=[r.embedder.describe() for r in ref.refs], seed=self.seed, num_samples=self.num_samples,
            sampler={"sampler": self.sampler_name, "num_inference_steps": self.num_inference_steps,
                     "batch_size": self.batch_size},
            extra={"source": "MemorizationMonitor", "every_n_steps": self.every_n_steps,
                   "sample_every": self.sample_every,
                   "onset_rule": "CI lower bound > threshold at `patience` consecutive sampled evaluations"},
        )
        cps = list(self.history)
        result = AuditResult(checkpoints=cps, onset=onset, images=_risk_table(ref, self._copies, {}),
                             skipped=list(ref.skipped), provenance=prov)
        result.verdict = _verdict(cps, onset, _signal_label(ref.primary))
        return result

    # -- TensorBoard ----------------------------------------------------------------------------------------------
    def _writer(self):
        if self._tb is None and self._tb_arg is not None:
            if hasattr(self._tb_arg, "add_scalar"):
                self._tb = self._tb_arg
            else:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError as e:
                    raise ModuleNotFoundError(
                        f"tensorboard_dir={str(self._tb_arg)!r} needs tensorboard: pip install \"diffaudit[tensorboard]\""
                        f" ({e})") from None
                self._tb = SummaryWriter(log_dir=str(self._tb_arg))
                self._tb_owned = True
        return self._tb

    def _write_tensorboard(self, step: int, scalars: dict[str, float]) -> None:
        w = self._writer()
        if w is None:
            return
        for k, v in scalars.items():
            w.add_scalar(k, v, global_step=step)
        if hasattr(w, "flush"):
            w.flush()

    def close(self) -> None:
        """Close the TensorBoard writer the monitor opened (a writer passed in is left to its owner)."""
        if self._tb is not None and self._tb_owned:
            self._tb.close()
        self._tb = None


_SAMPLE_KEYS = {f"diffaudit/{k}" for k in ("memorization_ratio", "memorization_low", "memorization_high", "ct_z",
                                          "authenticity", "top1_mean")}


def _split_model(obj):
    """(denoiser, scheduler or None): a pipeline gives its ``unet`` and ``scheduler``; anything else is the model."""
    import torch

    if not isinstance(obj, torch.nn.Module) and hasattr(obj, "unet"):
        return obj.unet, getattr(obj, "scheduler", None)
    if not callable(obj):
        raise TypeError(f"model_or_pipeline: expected a UNet / denoiser module or a pipeline, got {type(obj).__name__}")
    return obj, None


def _train_modes(obj) -> list:
    """(module, training flag) for every submodule of the model (or the pipeline's modules), to restore later."""
    import torch

    roots = []
    if isinstance(obj, torch.nn.Module):
        roots = [obj]
    else:
        comps = getattr(obj, "components", None)
        cands = list(comps.values()) if isinstance(comps, dict) else [getattr(obj, "unet", None)]
        roots = [c for c in cands if isinstance(c, torch.nn.Module)]
    seen, out = set(), []
    for r in roots:
        for m in r.modules():
            if id(m) not in seen:
                seen.add(id(m))
                out.append((m, m.training))
    return out


def _model_device(net):
    import torch

    if isinstance(net, torch.nn.Module):
        for p in net.parameters():
            return p.device
        for b in net.buffers():
            return b.device
    return torch.device("cpu")


def _loss_subset(images, n_max: int, seed: int):
    """A fixed subset of ``images`` for the loss pass, decoded once into memory when it fits the byte budget."""
    import numpy as np

    from .data import ImageSet

    n = len(images)
    rng = np.random.default_rng(seed)
    pos = np.sort(rng.permutation(n)[:n_max]) if n > n_max else np.arange(n)
    sub = images.subset([int(p) for p in pos])
    ids, arrs = [], []
    total = 0
    for bids, batch in sub.iter_batches(256):
        for i, a in zip(bids, batch):
            total += a.nbytes
            if total > _LOSS_CACHE_BYTES:
                return sub
            ids.append(i)
            arrs.append(a)
    if not arrs or len({a.shape for a in arrs}) != 1:
        return sub
    return ImageSet.from_arrays(np.stack(arrs), ids=ids)
