"""``diffaudit watch``: a sidecar that audits each new ``checkpoint-N`` of a training run as it appears.

The training script is left untouched: it keeps writing ``checkpoint-N/unet[_ema]/`` folders (diffusers' example
scripts with ``--checkpointing_steps``); :func:`watch` polls the run folder, evaluates each new *complete*
checkpoint with a :class:`~diffaudit.monitor.MemorizationMonitor` (reference data built once, the same sampling
noise at every checkpoint, the audit's onset rule), reports the running verdict, and at onset writes a ``STOP``
marker file (JSON: onset step, signal, recommended checkpoint) in the run folder -- a training loop, a job
scheduler or a person can act on it.

A checkpoint folder is *complete* when ``unet_ema/`` or ``unet/`` holds ``config.json`` and the weights file, and
nothing in the folder was modified for ``settle`` seconds (accelerate writes the files one by one).
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

log = logging.getLogger(__name__)

STOP_FILE = "STOP"
STATE_FILE = "watch_state.json"
_MAX_LOAD_FAILURES = 3


@dataclass
class WatchOutcome:
    """How :func:`watch` ended: ``reason`` is ``"onset"`` (STOP written) or ``"timeout"``."""

    reason: str
    onset_step: Optional[int] = None
    evaluated: list[int] = field(default_factory=list)
    stop_file: Optional[str] = None
    failed: dict[int, str] = field(default_factory=dict)  # step -> why its checkpoint could not be evaluated


def _newest_mtime(folder: Path) -> float:
    newest = 0.0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            try:
                newest = max(newest, os.stat(os.path.join(root, name)).st_mtime)
            except FileNotFoundError:  # removed while we look (checkpoints_total_limit)
                continue
    return newest


def complete_checkpoints(run_dir, settle: float = 2.0, now: Optional[float] = None) -> list[tuple[int, Path]]:
    """``(step, folder)`` of the complete ``checkpoint-N`` folders in ``run_dir``, by step."""
    from .checkpoints import CHECKPOINT_DIR_RE, lora_file, unet_weight_files

    run_dir = Path(run_dir)
    now = time.time() if now is None else now
    found = []
    try:
        entries = list(run_dir.iterdir())
    except FileNotFoundError:
        return []
    for d in entries:
        m = CHECKPOINT_DIR_RE.match(d.name)
        if not m or not d.is_dir():
            continue
        try:
            ok = any((d / sub / "config.json").is_file() and unet_weight_files(d / sub)
                     for sub in ("unet_ema", "unet") if (d / sub).is_dir()) or lora_file(d) is not None
        except (OSError, ValueError):  # half-written shard index, folder vanishing
            ok = False
        if ok and now - _newest_mtime(d) >= settle:
            found.append((int(m.group(1)), d))
    return sorted(found)


def load_checkpoint_model(folder, *, ema: str = "prefer", scheduler: Any = None, device: Any = None,
                          base_pipeline: Any = None):
    """``(model, scheduler or None)`` of one ``checkpoint-N`` folder (UNet or LoRA weights only; accelerate's pickles
    are never opened). A text-to-image checkpoint comes back as a pipeline: ``base_pipeline`` (default: the run folder
    when it holds a Stable Diffusion pipeline) with the checkpoint's UNet or LoRA. The scheduler is ``scheduler=`` if
    given, else the run folder's or the base pipeline's (``scheduler/``), else None."""
    from .checkpoints import discover_checkpoints

    run = discover_checkpoints(folder, ema=ema, scheduler=scheduler, require_scheduler=False, include_final=False,
                               base_pipeline=base_pipeline)
    if not run.checkpoints:
        raise ValueError(f"{folder}: no loadable UNet weights")
    return run.load(run.checkpoints[0], device=device), run.scheduler


def write_stop_file(run_dir, monitor, checkpoint: Optional[str] = None) -> Path:
    """Write the ``STOP`` marker (JSON) in ``run_dir`` atomically; returns its path."""
    from ._serial import atomic_write_text

    rec = monitor.recommendation
    last = monitor.history[-1] if monitor.history else None
    sig = last.onset_signal if last is not None else None
    payload = {
        "onset_step": monitor.onset_step,
        "signal": monitor.signal_name,
        "threshold": monitor.rule.threshold,
        "patience": monitor.rule.patience,
        "confidence": monitor.rule.confidence,
        "step": last.step if last is not None else None,
        "value": sig.value if sig is not None else None,
        "low": sig.low if sig is not None else None,
        "recommended_step": rec.step,
        "recommended_reason": rec.reason,
        "checkpoint": checkpoint,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "by": "diffaudit watch",
    }
    path = Path(run_dir) / STOP_FILE
    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")
    return path


def watch(
    run_dir,
    monitor,
    *,
    interval: float = 30.0,
    timeout: Optional[float] = None,
    settle: float = 2.0,
    ema: str = "prefer",
    scheduler: Any = None,
    device: Any = None,
    base_pipeline: Any = None,
    on_checkpoint: Optional[Callable[[Any], None]] = None,
    state_path=None,
    write_stop: bool = True,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> WatchOutcome:
    """Poll ``run_dir`` every ``interval`` seconds; evaluate each new complete checkpoint (in step order) with
    ``monitor.evaluate``; return at onset (after writing ``run_dir/STOP`` when ``write_stop``) or once no new
    checkpoint has appeared for ``timeout`` seconds (None: never). ``on_checkpoint(monitor)`` is called after each
    evaluation. ``scheduler``: the training noise scheduler (object, folder, config or name) when the run folder
    has no ``scheduler/`` yet; default the run's, else diffusers' default DDPM schedule (with a warning).
    ``base_pipeline``: the local Stable Diffusion folder a text-to-image run fine-tunes (LoRA runs need it; full
    fine-tunes default to the run folder once it holds the pipeline); the monitor then needs ``prompts=``.
    ``state_path``: a JSON file holding the monitor's state, loaded at start and rewritten after each
    evaluation, so a restarted watch does not evaluate a checkpoint twice."""
    from ._serial import atomic_write_text
    from .checkpoints import MissingBasePipelineError, load_scheduler

    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise NotADirectoryError(f"run_dir={str(run_dir)!r} is not a folder (the training run's output_dir)")
    if not run_dir.exists():
        log.info("%s does not exist yet; waiting for the training run to create it", run_dir)
    import math

    if not (isinstance(interval, (int, float)) and math.isfinite(interval) and interval > 0):
        raise ValueError(f"interval={interval!r} must be a finite number of seconds > 0")
    if not (isinstance(settle, (int, float)) and math.isfinite(settle) and settle >= 0):
        raise ValueError(f"settle={settle!r} must be a finite number of seconds >= 0")
    if timeout is not None and not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout >= 0):
        raise ValueError(f"timeout={timeout!r} must be a finite number >= 0 seconds (or None: wait forever)")
    if settle < 0:
        raise ValueError(f"settle={settle!r} must be >= 0 seconds")
    if base_pipeline is not None and not (Path(base_pipeline) / "model_index.json").is_file():
        raise ValueError(f"base_pipeline={str(base_pipeline)!r}: not a local pipeline folder (no model_index.json)")
    if (run_dir / STOP_FILE).exists():
        log.warning("%s already exists (from an earlier watch?); it will be overwritten at onset", run_dir / STOP_FILE)
    if state_path is not None and Path(state_path).is_file():
        try:
            monitor.load_state_dict(json.loads(Path(state_path).read_text(encoding="utf-8")))
            log.info("resumed from %s: steps %s already evaluated", state_path, monitor.evaluated_steps)
        except (ValueError, json.JSONDecodeError) as e:
            log.warning("ignoring %s (%s); starting afresh", state_path, e)
    monitor.prepare()
    outcome = WatchOutcome(reason="timeout", evaluated=[])
    if monitor.stopped:  # resumed after onset: say it again
        outcome.reason, outcome.onset_step = "onset", monitor.onset_step
        if write_stop:
            last = monitor.history[-1].path if monitor.history else None
            outcome.stop_file = str(write_stop_file(run_dir, monitor, checkpoint=last))
        return outcome
    sched_obj = load_scheduler(scheduler) if scheduler is not None else None
    warned_default = False
    failures: dict[int, list[str]] = {}
    last_new = clock()
    while True:
        for step, folder in complete_checkpoints(run_dir, settle):
            if step in monitor.evaluated_steps or len(failures.get(step, [])) >= _MAX_LOAD_FAILURES:
                continue
            try:
                model, run_sched = load_checkpoint_model(folder, ema=ema, scheduler=sched_obj, device=device,
                                                         base_pipeline=base_pipeline)
            except MissingBasePipelineError:
                raise  # permanent: retrying cannot help (the run root holds the pipeline only after training)
            except (OSError, ValueError, RuntimeError) as e:
                failures.setdefault(step, []).append(f"{type(e).__name__}: {e}")
                n = len(failures[step])
                log.warning("%s: could not load (%s)%s", folder, e,
                            "; giving up on it" if n >= _MAX_LOAD_FAILURES else "; will retry")
                if n >= _MAX_LOAD_FAILURES:
                    outcome.failed[step] = failures[step][-1]
                continue
            if hasattr(model, "text_encoder") and getattr(monitor, "prompts", None) is None:
                raise ValueError(f"{folder} is a text-to-image checkpoint; give the captions to sample: --prompts FILE "
                                 "(MemorizationMonitor(prompts=[...]))")
            if run_sched is None:
                if not warned_default:
                    log.warning("no noise scheduler in %s (checkpoint-N folders carry none); using diffusers' default "
                                "DDPM schedule (1000 steps, linear betas). Pass --scheduler if training used another",
                                run_dir)
                    warned_default = True
                run_sched = load_scheduler("ddpm")
            stop = monitor.evaluate(step, model, scheduler=run_sched, path=str(folder))
            del model
            outcome.evaluated.append(step)
            last_new = clock()
            if state_path is not None:
                atomic_write_text(state_path, json.dumps(monitor.state_dict()) + "\n")
            if on_checkpoint is not None:
                on_checkpoint(monitor)
            if stop:
                outcome.reason = "onset"
                outcome.onset_step = monitor.onset_step
                if write_stop:
                    outcome.stop_file = str(write_stop_file(run_dir, monitor, checkpoint=str(folder)))
                return outcome
        if timeout is not None and clock() - last_new >= timeout:
            return outcome
        wait = interval if timeout is None else max(0.0, min(interval, timeout - (clock() - last_new)))
        sleep(wait)
