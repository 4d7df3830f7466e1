"""The embedded demo: a tiny UNet DDPM trained on CPU on scikit-learn's 8x8 digits (no downloads).

This module holds the *training* half: :func:`train_digits_ddpm` trains an unconditional ``UNet2DModel`` with a
``DDPMScheduler`` on a small or a large subset of ``sklearn.datasets.load_digits`` and writes its checkpoints in the
layout of diffusers' ``examples/unconditional_image_generation/train_unconditional.py``::

    out_dir/
      train/0123.png ...         the training digits (uint8 grayscale PNG, image_size x image_size)
      heldout/0456.png ...       a disjoint held-out set of digits (same for every n_train at a given seed)
      train_log.json             hyper-parameters, per-step loss, timings
      ddpm/                      run_dir
        checkpoint-250/unet/     config.json + diffusion_pytorch_model.safetensors (unet.save_pretrained)
        checkpoint-250/unet_ema/ the EMA weights (EMAModel.save_pretrained), as the script with --use_ema
        checkpoint-500/... 
        model_index.json         at the end: DDPMPipeline(unet with the EMA weights, scheduler).save_pretrained
        unet/  scheduler/

(``accelerator.save_state`` in the diffusers script also writes optimizer/RNG state; the demo does not need them.)
EMA (diffusers' ``EMAModel`` with the script's defaults: max decay 0.9999, warm-up ``1 - (1 + step)^-3/4``) is on by
default because the raw weights under a constant learning rate of 1e-3 swing between copying and not copying from
one checkpoint to the next (linear schedule: memorized fraction 0.47, 0.18, 0.09, 0.48 at steps 1250-2000) while
the EMA weights rise steadily (0.58, 0.70, 0.77, 0.84), and earlier. The cosine noise schedule memorizes ~1.6x
faster per step than the linear one (see :func:`make_demo_scheduler`). Curves: benchmarks/demo_curve.py and
:data:`DEMO_SETTINGS`.

Why this demo shows memorization: a diffusion model that fits its training set exactly has the empirical optimal
denoiser, whose samples are copies of training images (Gu et al. 2023, "On Memorization in Diffusion Models"); with
a training set small next to the model's capacity it gets there within a few thousand steps, while a large training
set does not in the same budget (Favero et al. 2025, "Bigger Isn't Always Memorizing"). Measured numbers:
``benchmarks/demo_curve.py``.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np


logger = logging.getLogger(__name__)

__all__ = [
    "DemoRun",
    "DEMO_SETTINGS",
    "digits_split",
    "make_demo_unet",
    "make_demo_scheduler",
    "train_digits_ddpm",
]

from ._util import check_int  # noqa: E402
from .training import (  # noqa: E402  (re-exported: the demo's public names)
    DemoRun,
    digits_split,
    make_demo_scheduler,
    make_demo_unet,
    train_digits_ddpm,
)

#: Settings measured with benchmarks/demo_curve.py (2-core CPU, 1 torch thread, ~33 ms/step incl. EMA; EMA weights,
#: 128 DDIM-50 samples, Gu et al.'s 1/3 rule). "full": the demo - 16 digits: 0.00 (step 400), 0.23 (600), 0.48 (800),
#: 0.64 (1000), 0.88 (2000); 1024 digits: 0.00 at every checkpoint; ~65-72 s CPU per run. "quick": ``--quick`` /
#: tests - the same run cut at step 800 (~27 s per run), where the small set's fraction has risen from 0 to ~0.5.
DEMO_SETTINGS: dict[str, dict[str, Any]] = {
    "full": {"small": 16, "large": 1024, "steps": 2000, "checkpoint_every": 200},
    "quick": {"small": 16, "large": 1024, "steps": 800, "checkpoint_every": 100},
}

@dataclass
class DemoResult:
    """What :func:`run_demo` produced: per training-set size, the monitor's flag and the audit."""

    out_dir: Path
    runs: dict[str, DemoRun]
    audits: dict[str, Any]  # label -> AuditResult
    monitor_onset: dict[str, Optional[int]]  # label -> step at which the training monitor confirmed onset
    monitor_seconds: dict[str, float]  # label -> time spent inside the monitor during training
    index_html: Path


#: The monitor the demo attaches, chosen with benchmarks/bench_monitor.py --variants (targets: overhead <= 10% of
#: training, flag at most one evaluation interval after the onset measured densely on the EMA weights with 128
#: samples of 25 DDIM steps). It evaluates every 100 steps (more often than the checkpoints the audit reads) with a
#: cheap evaluation: 64 samples of 8 DDIM steps and the denoising loss on <= 32 images per set. 8 DDIM steps count
#: fewer copies than 25 (13% vs 31% at step 600), so the demo stops at the *first* evaluation whose Wilson 95% lower
#: bound exceeds 2% (DEMO_PATIENCE = 1; the audit keeps patience 2): that needs >= 4 of 64 samples copied, and the
#: 1024-digit control never has one. Measured (EMA weights, 2000 steps): onset 400 (dense truth), flag 500; with
#: patience 2 the flag comes at 600, two intervals late; 128 samples or 200-step intervals cost more or flag later.
DEMO_MONITOR: dict[str, Any] = {"every_n_steps": 100, "num_samples": 64, "num_inference_steps": 8,
                                "loss_max_images": 32}
DEMO_PATIENCE = 1


def demo_monitor(train_images: np.ndarray, heldout_images: np.ndarray, *, seed: int = 0,
                 train_ids: Optional[list[str]] = None, heldout_ids: Optional[list[str]] = None, **overrides):
    """The :class:`~diffaudit.monitor.MemorizationMonitor` the demo attaches to training (pixel embedder, the
    demo's noise scheduler, :data:`DEMO_MONITOR` settings; ``overrides`` replace them)."""
    from .data import ImageSet
    from .monitor import MemorizationMonitor, OnsetRule

    kw = {"rule": OnsetRule(patience=DEMO_PATIENCE), **DEMO_MONITOR, **overrides}
    return MemorizationMonitor(
        train=ImageSet.from_arrays(train_images, ids=train_ids),
        heldout=ImageSet.from_arrays(heldout_images, ids=heldout_ids),
        embedder="pixel", scheduler=make_demo_scheduler(), seed=seed, **kw,
    )


def run_demo(
    out_dir: str | os.PathLike = "demo-out",
    *,
    quick: bool = False,
    steps: Optional[int] = None,
    seed: int = 0,
    num_samples: int = 128,
    monitor_samples: Optional[int] = None,
    progress: bool = False,
    log: Callable[[str], None] = logger.info,
) -> DemoResult:
    """The embedded default: train the tiny DDPM on a small (memorizing) and a large (control) set of digits with
    the training monitor attached, audit every checkpoint of both runs, and write the reports.

    Layout: ``out_dir/{small,large}/`` (training data, ``ddpm/`` run) and ``out_dir/{small,large}/audit/``
    (``report.html``, ``audit.json``, ``images.csv``), plus ``out_dir/index.html`` linking both. The monitor does
    not stop training here, so the audit can show the whole curve; it records the step it would have stopped at.

    ``steps`` overrides the number of training steps of the chosen settings (``quick``: the shorter ones); runs of
    fewer steps than 5 checkpoint intervals checkpoint every ``steps // 5``. The monitor evaluates every
    ``DEMO_MONITOR["every_n_steps"]`` steps (or at every checkpoint when those are more frequent).
    ``num_samples``: samples per checkpoint in the audit; ``monitor_samples``: per monitor evaluation (default
    :data:`DEMO_MONITOR`).
    """
    from .audit import audit, ensure_writable
    from .data import ImageSet

    out = ensure_writable(out_dir)
    s = dict(DEMO_SETTINGS["quick" if quick else "full"])
    if steps is not None:
        s["steps"] = check_int("steps", steps, 10)
        s["checkpoint_every"] = min(int(s["checkpoint_every"]), max(1, s["steps"] // 5))
    num_samples = check_int("num_samples", num_samples, 2)
    every = min(int(DEMO_MONITOR["every_n_steps"]), int(s["checkpoint_every"]))
    mon_kw = {} if monitor_samples is None else {"num_samples": check_int("monitor_samples", monitor_samples, 2)}
    runs: dict[str, DemoRun] = {}
    audits: dict[str, Any] = {}
    onset: dict[str, Optional[int]] = {}
    mon_time: dict[str, float] = {}
    for label in ("small", "large"):
        n_train = int(s[label])
        train_np, held_np, train_idx, held_idx = digits_split(n_train, seed=seed)
        monitor = demo_monitor(train_np, held_np, seed=seed, every_n_steps=every,
                               train_ids=[f"{int(i):04d}.png" for i in train_idx],
                               heldout_ids=[f"{int(i):04d}.png" for i in held_idx], **mon_kw)
        spent = [0.0]

        def callback(step, unet, monitor=monitor, spent=spent):
            t0 = time.perf_counter()
            monitor.update(step, unet)
            spent[0] += time.perf_counter() - t0
            return None  # record the onset, keep training: the audit shows the whole curve

        log(f"[{label}] training on {n_train} digits for {s['steps']} steps "
            f"(checkpoint every {s['checkpoint_every']}, monitor every {every})")
        run = train_digits_ddpm(out / label, n_train=n_train, steps=int(s["steps"]),
                                checkpoint_every=int(s["checkpoint_every"]), seed=seed, progress=progress,
                                callback=callback)
        runs[label], onset[label], mon_time[label] = run, monitor.onset_step, spent[0]
        log(f"[{label}] monitor: {monitor.summary_line()}")
        log(f"[{label}] auditing {len(run.checkpoint_steps)} checkpoints")
        audits[label] = audit(
            checkpoints=str(run.run_dir), train=ImageSet.from_folder(run.train_dir),
            heldout=ImageSet.from_folder(run.heldout_dir), embedders=["pixel"], num_samples=num_samples,
            num_inference_steps=25, seed=seed, out_dir=out / label / "audit", progress=progress,
        )
        log(f"[{label}] {audits[label].verdict}")
    index = _write_index(out, runs, audits, onset)
    return DemoResult(out, runs, audits, onset, mon_time, index)


def _write_index(out: Path, runs: dict, audits: dict, onset: dict) -> Path:
    """A small self-contained page comparing the two demo runs and linking their reports."""
    from .report.demo import render_demo_index

    rows = [{"label": label, "n_train": len(runs[label].train_ids),
             "last": res.checkpoints[-1].onset_signal if res.checkpoints else None, "onset": res.onset_step,
             "monitor": onset[label], "keep": res.onset.recommended_step} for label, res in audits.items()]
    path = out / "index.html"
    render_demo_index(path, rows)
    return path
