"""MemorizationMonitor: the training-time monitor (framework-free; Lightning / accelerate glue in integrations/).

It keeps only the cadence, the state and the logging: each evaluation is :func:`diffaudit.reference.evaluate_checkpoint`
(the same per-checkpoint step as ``audit()``), and every decision comes from :mod:`diffaudit.onset`.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Optional, Sequence

from .data import as_imageset
from .onset import (ONSET_RULE_TEXT, OnsetRule, Recommendation, detect_onset, onset_info, onset_of, quality_of,
                    recommend_checkpoint, recommendation_for, tau_gen, verdict)

__all__ = ["MemorizationMonitor", "OnsetRule", "Recommendation", "detect_onset", "recommend_checkpoint"]
# ---------------------------------------------------------------------------------------------------------------
# MemorizationMonitor: the training-time monitor (framework-free; Lightning / accelerate glue in integrations/)

_log = logging.getLogger(__name__)

#: ``state_dict()`` format tag (bumped when the layout changes)
STATE_FORMAT = "diffaudit.MemorizationMonitor/1"



#: the monitor's default cost budget: a fraction of training wall time (``DIFFAUDIT_TIME_BUDGET`` overrides it:
#: a fraction, or ``none`` for no budget)
DEFAULT_TIME_BUDGET = 0.10


def _default_budget() -> Optional[float]:
    v = os.environ.get("DIFFAUDIT_TIME_BUDGET", "").strip().lower()
    if not v:
        return DEFAULT_TIME_BUDGET
    if v in ("none", "off", "0"):
        return None
    try:
        f = float(v)
    except ValueError:
        raise ValueError(f"DIFFAUDIT_TIME_BUDGET={v!r}: expected a fraction in (0, 1) or 'none'") from None
    if not 0.0 < f < 1.0:
        raise ValueError(f"DIFFAUDIT_TIME_BUDGET={v!r}: expected a fraction in (0, 1) or 'none'")
    return f


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
    (the checkpoint to keep, by the audit's rule: :attr:`recommendation`), :attr:`tau_gen`, :attr:`stopped`, :attr:`metrics` (latest scalars,
    ``diffaudit/...`` names). :meth:`state_dict` / :meth:`load_state_dict` (plain JSON values) let a resumed run keep
    its history. Logs through :mod:`logging`; ``tensorboard_dir=`` (a folder, or a ``SummaryWriter``) also writes
    the scalars to TensorBoard at the training step.

    ``lazy``: build the reference data at the first evaluation instead of now. Default (None): now, except in a
    non-zero rank of a distributed launch (``RANK``/``LOCAL_RANK`` set and > 0), which never evaluates.

    Cost budget: ``time_budget`` (default 0.10, or ``$DIFFAUDIT_TIME_BUDGET``; None = no budget) is the share of
    the training wall time evaluations may take, measured as training runs. Before the first evaluation a timing
    probe of a few samples sizes the sample count (no fewer than ``min_samples``; the first n of the same seeds, so
    every evaluation uses the same samples); after each evaluation, when it took more than the budget of its
    checkpoint interval, only every 2nd, 4th, ... checkpoint is evaluated (closer again once well within it). Each
    change is logged and kept in :attr:`adaptations`. ``output_dir``: where :meth:`finish` writes the decision.
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
        time_budget: Optional[float] | str = "default",
        min_samples: int = 64,
        output_dir=None,
        prompts: Optional[Sequence[str]] = None,
        seeds_per_prompt: int = 1,
        guidance_scale: float = 7.5,
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
        self.min_samples = min(_int("min_samples", min_samples, 2), self.num_samples)
        if isinstance(time_budget, str) and time_budget == "default":
            time_budget = _default_budget()
        if time_budget is not None and not (isinstance(time_budget, (int, float)) and not isinstance(time_budget, bool)
                                            and 0.0 < float(time_budget) < 1.0):
            raise ValueError(f"MemorizationMonitor: time_budget={time_budget!r} must be a fraction in (0, 1) of the "
                             "training time, or None for no budget")
        self.time_budget = None if time_budget is None else float(time_budget)
        self.output_dir = output_dir
        if sampler not in SAMPLERS:
            raise ValueError(f"MemorizationMonitor: sampler={sampler!r} is not allowed; expected one of {list(SAMPLERS)}")
        self.sampler_name = sampler
        if prompts is not None:
            if isinstance(prompts, str) or not all(isinstance(p, str) and p.strip() for p in prompts) or not prompts:
                raise ValueError("MemorizationMonitor: prompts= must be a non-empty list of non-empty strings (the "
                                 "captions to sample a text-to-image model with; read_prompts(path) reads a file)")
            prompts = list(prompts)
        self.prompts = prompts
        self.seeds_per_prompt = _int("seeds_per_prompt", seeds_per_prompt, 1)
        if not math.isfinite(float(guidance_scale)):
            raise ValueError(f"MemorizationMonitor: guidance_scale={guidance_scale!r} must be a finite number")
        self.guidance_scale = float(guidance_scale)
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
        self._sampler = None
        # cost budget (see the class docstring): wall clock since the reference data was ready, evaluation seconds
        self._clock_start: Optional[float] = None
        self._eval_seconds = 0.0
        self._last_eval_end: Optional[float] = None
        self._stride = 1  # evaluate every stride-th checkpoint the cadence offers
        self._samples_now = self.num_samples
        self.adaptations: list[dict] = []  # what the budget changed, when and why
        self.finished = False
        if lazy is None:
            lazy = (_env_rank() or 0) > 0
        if not lazy:
            self.prepare()

    # -- construction helpers ----------------------------------------------------------------------------------
    @staticmethod
    def _as_imageset(images, name: str):
        if isinstance(images, (str, os.PathLike)):
            from pathlib import Path

            if not Path(images).is_dir():
                raise FileNotFoundError(f"MemorizationMonitor: {name}={str(images)!r} is not a folder of images")
            return images  # the ReferenceSet scans it (once, when built: not at all on a lazy non-zero rank)
        return as_imageset(images, f"MemorizationMonitor: {name}")

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

            from .reference import ReferenceSet
            from .sampling import CheckpointSampler

            t0 = time.perf_counter()
            self._ref = ReferenceSet(self._train_arg, self._heldout_arg, self.embedders, weights=self.weights,
                                     cache_dir=self.cache_dir, progress=self.progress)
            self._sampler = CheckpointSampler(
                None, self._samples_now, seed=self.seed, num_inference_steps=self.num_inference_steps,
                sampler=self.sampler_name, batch_size=self.batch_size, progress=self.progress, prompts=self.prompts,
                seeds_per_prompt=self.seeds_per_prompt, guidance_scale=self.guidance_scale,
            )
            _log.info("monitor: reference data for %d training images (%s) built in %.1fs",
                      len(self._ref.train), ", ".join(r.name for r in self._ref.refs), time.perf_counter() - t0)
            self._clock_start = time.perf_counter()
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
        """The checkpoint to keep (:attr:`recommendation`): the best sample quality in the stop window
        [tau_gen, onset); without quality measurements the lowest held-out loss before onset, else the latest
        evaluated step before onset; None before any evaluation or when onset is at the first one."""
        return self.recommendation.step

    @property
    def recommendation(self) -> Recommendation:
        """The checkpoint to keep, by the audit's rule (:func:`diffaudit.onset.recommendation_for`: the best sample
        quality in the stop window [tau_gen, onset) when quality was measured, else held-out loss)."""
        return recommendation_for(self.history, self._onset_step, self._primary_name(), self.rule.threshold)

    @property
    def tau_gen(self) -> Optional[int]:
        """When sample quality reached its plateau (:func:`diffaudit.onset.tau_gen`); None before it is seen."""
        name = self._primary_name()
        return tau_gen([c.step for c in self.history], [quality_of(c, name) for c in self.history])

    def _primary_name(self) -> Optional[str]:
        return self._ref.primary.name if self._ref is not None else None

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
        return self._ref.primary.signal_name

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
            "budget": {"stride": self._stride, "num_samples_now": self._samples_now,
                       "eval_seconds": self._eval_seconds, "adaptations": list(self.adaptations)},
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
        self._onset_step = onset_of(self.rule, self.history)
        saved_onset = state.get("onset_step")
        if saved_onset is not None and self._onset_step is None:
            self._onset_step = int(saved_onset)  # confirmed under the rule in force then
        self.stopped = bool(state.get("stopped")) or self._onset_step is not None
        budget = state.get("budget") or {}
        self._stride = max(1, int(budget.get("stride", 1)))
        self._samples_now = min(self.num_samples, max(2, int(budget.get("num_samples_now", self.num_samples))))
        if self._sampler is not None:
            self._sampler.num_samples = self._samples_now
        self.adaptations = list(budget.get("adaptations") or [])

    # -- the cadence -----------------------------------------------------------------------------------------------
    def due(self, step: int) -> bool:
        """Whether :meth:`update` would evaluate at ``step``: a multiple of ``every_n_steps`` (times the budget's
        stride, :attr:`adaptations`) not yet evaluated."""
        step = int(step)
        return step % (self.every_n_steps * self._stride) == 0 and step not in self._steps

    def update(self, step: int, model_or_pipeline, scheduler=None) -> bool:
        """Call after each optimizer step. Evaluates when :meth:`due` (once per step); returns True when
        memorization onset is confirmed (stop training), and keeps returning :attr:`stopped` between evaluations,
        at no cost."""
        step = int(step)
        if self._steps and step < max(self._steps):
            raise ValueError(f"update: step={step} is lower than the last evaluated step {max(self._steps)}; "
                             "training steps must increase (a resumed run: load_state_dict first, then continue)")
        if not self.due(step):
            return self.stopped
        return self.evaluate(step, model_or_pipeline, scheduler=scheduler)

    # -- cost budget ----------------------------------------------------------------------------------------------
    @property
    def cost_fraction(self) -> Optional[float]:
        """Evaluation time as a fraction of the wall time since the reference data was ready (None before)."""
        import time

        if self._clock_start is None:
            return None
        wall = time.perf_counter() - self._clock_start
        return self._eval_seconds / wall if wall > 0 else None

    #: samples drawn to time sampling before the first evaluation (the cost budget sizes that evaluation from it)
    PROBE_SAMPLES = 8

    def _size_first_evaluation(self, smp, model, t0: float) -> None:
        """Before the first evaluation: time ``PROBE_SAMPLES`` samples and pick the sample count that keeps one
        evaluation within the budget of the training time seen so far (no fewer than ``min_samples``), so every
        evaluation, the first included, uses the same samples (the first n of the same seeds)."""
        import time

        if self._samples_now <= self.min_samples or self._clock_start is None:
            return
        train_seconds = t0 - self._clock_start
        b = self.time_budget
        allowed = b / (1.0 - b) * max(train_seconds, 1e-9)
        probe_n = min(self.PROBE_SAMPLES, self._samples_now)
        full = smp.num_samples
        smp.num_samples = probe_n
        t = time.perf_counter()
        try:
            smp.sample(model)
        finally:
            smp.num_samples = full
        per_sample = (time.perf_counter() - t) / probe_n
        want = int(allowed / max(per_sample, 1e-9))
        n = max(self.min_samples, min(self._samples_now, want))
        if n < self._samples_now:
            self._samples_now = n
            smp.num_samples = n
            self.adaptations.append({"step": None, "probe_seconds_per_sample": round(per_sample, 4),
                                     "num_samples": n, "every_n_steps": self.every_n_steps * self._stride})
            _log.warning("monitor: sampling takes %.2fs per sample and training took %.0fs to the first "
                         "evaluation; within the %.0f%% budget: %d samples per evaluation (the first %d of the same "
                         "seeds)", per_sample, train_seconds, 100 * b, n, n)

    def _keep_budget(self, step: int, seconds: float, train_seconds: float) -> None:
        """After an evaluation that took ``seconds`` following ``train_seconds`` of training since the previous one:
        keep evaluations within ``time_budget`` of the wall time, judged on this interval (the cost of an
        evaluation against the training time of one checkpoint interval): when it is exceeded, only every 2nd,
        4th, ... checkpoint is evaluated, and the spacing comes back down when evaluations get cheaper. The sample
        count is not changed here (:meth:`_size_first_evaluation` sized it once), so every evaluation uses the same
        samples. Each change is logged and recorded in :attr:`adaptations`."""
        b = self.time_budget
        if b is None or self._clock_start is None:
            return
        per_interval = max(train_seconds / self._stride, 1e-9)  # training seconds per every_n_steps steps
        allowed = b / (1.0 - b) * per_interval  # evaluation seconds per interval within the budget
        what = []  # the sample count was sized before the first evaluation and stays: evaluations stay comparable
        def pow2(x: float) -> int:
            need = max(1, math.ceil(x - 1e-9))
            return 1 << max(0, math.ceil(math.log2(need))) if need > 1 else 1

        up, down = pow2(seconds / max(allowed, 1e-9)), pow2(seconds / max(0.7 * allowed, 1e-9))
        # hysteresis: space evaluations out as soon as they exceed the budget, bring them closer only when they
        # would stay well within it (30% margin), so the spacing does not flip between two values
        stride = up if up > self._stride else (down if down < self._stride else self._stride)
        if stride != self._stride:
            self._stride = stride
            what.append(f"every {stride} checkpoint{'s' * (stride != 1)} (every {self.every_n_steps * stride} "
                        "steps)")
        if what:
            was = seconds / (seconds + max(train_seconds, 1e-9))
            expect = seconds / (seconds + per_interval * self._stride)
            self.adaptations.append({"step": int(step), "measured_cost_fraction": round(was, 4),
                                     "expected_cost_fraction": round(expect, 4), "num_samples": self._samples_now,
                                     "every_n_steps": self.every_n_steps * stride})
            _log.warning("monitor: the evaluation at step %d took %.0f%% of the wall time since the last one (budget "
                         "%.0f%%); from now on: %s (about %.0f%%)", step, 100 * was, 100 * b, "; ".join(what),
                         100 * expect)

    # -- one evaluation -----------------------------------------------------------------------------------------
    def evaluate(self, step: int, model_or_pipeline, scheduler=None, *, path: Optional[str] = None) -> bool:
        """Evaluate ``model_or_pipeline`` as the checkpoint of ``step`` now, whatever the cadence (``diffaudit
        watch`` uses this for each new checkpoint folder). Returns :attr:`stopped`."""
        import time

        import torch

        from .reference import LossSettings, evaluate_checkpoint

        step = int(step)
        if step in self._steps:
            raise ValueError(f"evaluate: step={step} was already evaluated (steps so far: {self.evaluated_steps})")
        if self._steps and step < max(self._steps):
            raise ValueError(f"evaluate: step={step} is lower than the last evaluated step {max(self._steps)}; "
                             "training steps must increase (a resumed run: load_state_dict first, then continue)")
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
        num_t = getattr(getattr(sched, "config", None), "num_train_timesteps", None)
        if num_t is not None and any(t >= int(num_t) for t in self.loss_timesteps):
            raise ValueError(f"MemorizationMonitor: loss_timesteps={list(self.loss_timesteps)} must be < the "
                             f"scheduler's num_train_timesteps={num_t}")
        loss = LossSettings(timesteps=self.loss_timesteps, noise_draws=self.loss_noise_draws,
                            max_images=self.loss_max_images, seed=self.seed, batch_size=self.batch_size)

        def sample():
            smp = self._sampler
            smp.scheduler = sched
            smp.device = target
            if not self.history and self.time_budget is not None:
                self._size_first_evaluation(smp, model_or_pipeline, t0)
            return smp.sample(model_or_pipeline)

        rng_devices = [target.index or 0] if target.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=rng_devices), torch.no_grad():
                ev = evaluate_checkpoint(ref, step, path or f"step-{step}", sample=sample if sampled else None,
                                         model=lambda: net, scheduler=sched, loss=loss,
                                         confidence=self.rule.confidence, gallery_size=self.gallery_size,
                                         device=target)
        finally:
            if home is not None and target != home and isinstance(net, torch.nn.Module):
                net.to(home)
            for mod, was_training in modes:
                mod.training = was_training
        cr = ev.result
        for tid in ev.copied_train_ids:
            by = self._copies.setdefault(tid, {})
            by[step] = by.get(step, 0) + 1
        self.history.append(cr)
        self._steps.add(step)
        self._num_evaluations += 1
        self._onset_step = onset_of(self.rule, self.history)
        newly = self._onset_step is not None and not self.stopped
        self.stopped = self.stopped or self._onset_step is not None
        scalars = self._scalars(cr)
        self._metrics = {**{k: v for k, v in self._metrics.items() if k in _SAMPLE_KEYS and not sampled}, **scalars}
        self._metrics["diffaudit/onset"] = 1.0 if self.stopped else 0.0
        self._write_tensorboard(step, {**scalars, "diffaudit/onset": self._metrics["diffaudit/onset"],
                                       "diffaudit/eval_seconds": time.perf_counter() - t0})
        seconds = time.perf_counter() - t0
        self._eval_seconds += seconds
        if self._clock_start is None:
            self._clock_start = t0
        train_seconds = t0 - (self._last_eval_end if self._last_eval_end is not None else self._clock_start)
        self._last_eval_end = time.perf_counter()
        _log.info("%s (%.1fs)", self.summary_line(), seconds)
        if newly:
            rec = self.recommendation
            _log.warning("memorization onset confirmed at step %d (%s); %s", self._onset_step, self.signal_name,
                         f"keep step {rec.step}" if rec.step is not None else rec.reason)
        if not self.stopped:
            self._keep_budget(step, seconds, max(train_seconds, 0.0))
        return self.stopped

    # -- the final decision ---------------------------------------------------------------------------------------
    def decision(self) -> dict:
        """The monitor's decision as plain JSON values: stopped or not, onset of copying, the level of memorization,
        the checkpoint to keep and why, what the budget changed, and the verdict text."""
        info = self._onset_info() if self.history else None
        last = max(self._steps) if self._steps else None
        out = {
            "stopped": bool(self.stopped), "onset_step": self._onset_step, "level": info.level if info else "",
            "fit_step": info.fit_step if info else None, "keep_step": self.best_step,
            "keep_reason": self.recommendation.reason if self.history else "no evaluation yet",
            "tau_gen": self.tau_gen, "evaluated_steps": self.evaluated_steps, "last_evaluated_step": last,
            "cost_fraction": None if self.cost_fraction is None else round(self.cost_fraction, 4),
            "num_samples": self._samples_now, "every_n_steps": self.every_n_steps * self._stride,
            "adaptations": list(self.adaptations),
            "verdict": verdict(self.history, info).text if info is not None else "no evaluation yet",
        }
        return out

    def _onset_info(self):
        """The shared rule's decision (:func:`diffaudit.onset.onset_info`) over the history so far."""
        p = self._ref.primary if self._ref is not None else None
        return onset_info(self.rule, self.history, copy_rule=p.rule.name if p else "",
                          signal_metric=p.rule.signal if p else "", signal_embedder=p.name if p else "",
                          onset_step=self._onset_step, decided=True)

    def finish(self, output_dir=None, *, step: Optional[int] = None, log=None) -> dict:
        """At the end of training: log the final decision (stopped at, keep step, why) and write it to
        ``output_dir/diffaudit-monitor.json`` (default: the monitor's ``output_dir``), with a pointer to the kept
        checkpoint's folder when ``output_dir/checkpoint-<keep>`` exists. ``step``: the step training ended at.
        ``log``: a callable taking one line (a framework's logger; default this module's logger at WARNING, so it
        shows by default). Returns :meth:`decision`."""
        import json
        from pathlib import Path

        from ._format import safe_text
        from ._serial import atomic_write_text

        d = self.decision()
        if step is not None:
            d["ended_at_step"] = int(step)
        out = output_dir if output_dir is not None else self.output_dir
        keep = d["keep_step"]
        if out is not None and keep is not None:
            ck = Path(out) / f"checkpoint-{keep}"
            if ck.is_dir():
                d["keep_checkpoint"] = str(ck)
                for sub in ("unet_ema", "unet"):
                    if (ck / sub).is_dir():
                        d["keep_weights"] = str(ck / sub)
                        break
            else:
                d["keep_checkpoint"] = None
                d["keep_note"] = (f"{ck} does not exist (removed by a checkpoint limit, or never saved): the kept "
                                  "step's weights are not on disk")
        ended = f"training ended at step {d['ended_at_step']}; " if "ended_at_step" in d else ""
        if d["stopped"]:
            head = f"diffaudit: stopped at memorization onset (copying from step {d['onset_step']}); {ended}"
        else:
            head = f"diffaudit: no memorization onset; {ended}"
        keep_txt = (f"keep step {keep}" + (f" ({d['keep_checkpoint']})" if d.get("keep_checkpoint") else "")
                    + f": {d['keep_reason']}") if keep is not None else f"no checkpoint to keep: {d['keep_reason']}"
        level = {"copies": "samples copy training images", "fits": "the model memorizes without copying yet (from "
                 f"step {d['fit_step']})", "generalizes": "it generalizes"}.get(d["level"], "")
        line = head + keep_txt + (f"; {level}" if level else "")
        if d["cost_fraction"] is not None:
            line += f"; monitor cost {d['cost_fraction']:.1%} of training time"
        (log or (lambda m: _log.warning("%s", m)))(safe_text(line))
        if out is not None:
            target = Path(out) / "diffaudit-monitor.json"
            atomic_write_text(target, json.dumps(d, indent=2, default=str) + "\n")
            d["written_to"] = str(target)
        self.finished = True
        return d

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
        fd = quality_of(c, self._primary_name())
        if fd is not None:
            tg = self.tau_gen
            parts.append(f"FD {fd.value:.4g}" + (f" (quality plateau since step {tg})" if tg is not None else ""))
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
        from . import __version__
        from .reference import provenance, risk_table
        from .results import AuditResult

        ref = self.reference
        onset = self._onset_info()
        prov = provenance(
            ref, version=__version__, run=str(run), seed=self.seed, num_samples=self.num_samples,
            sampler={"sampler": self.sampler_name, "num_inference_steps": self.num_inference_steps,
                     "batch_size": self.batch_size},
            extra={"source": "MemorizationMonitor", "every_n_steps": self.every_n_steps,
                   "sample_every": self.sample_every, "onset_rule": ONSET_RULE_TEXT})
        cps = list(self.history)
        copies = [(s, [tid] * n) for tid, by in self._copies.items() for s, n in by.items()]
        result = AuditResult(checkpoints=cps, onset=onset, images=risk_table(ref, copies), skipped=list(ref.skipped),
                             provenance=prov)
        result.verdict = verdict(cps, onset).text
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
