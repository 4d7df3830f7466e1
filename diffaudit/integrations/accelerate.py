"""accelerate loops (the diffusers example training scripts): stop at memorization onset, on every process.

Call :func:`check_after_save` on **every** process right after the block that runs
``accelerator.save_state(save_path)`` (in ``train_unconditional.py`` that block sits inside
``if accelerator.is_main_process:``; put the call after it, at the same indentation as that ``if``)::

    check_after_save(accelerator, monitor, global_step, model, ema_model=ema_model if args.use_ema else None)

then leave the batch loop and the epoch loop with ``if monitor.stopped: break`` (the README shows the exact lines
and places), and call :func:`finish_training` once after the epoch loop: it logs the decision and writes
``output_dir/diffaudit-monitor.json``.

The main process evaluates the model (its EMA weights when ``ema_model`` is given) with the monitor; the processes
then agree through ``accelerator.set_trigger()`` / ``accelerator.check_trigger()`` (a collective: every process
must reach it, which is why the call must not sit inside ``if accelerator.is_main_process:``). accelerate itself
is never imported here: any object with ``is_main_process``, ``set_trigger``, ``check_trigger`` and
``unwrap_model`` works.
"""
from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["check_after_save", "finish_training"]


def check_after_save(accelerator: Any, monitor, step: int, model: Any, scheduler: Any = None, *,
                     ema_model: Any = None) -> bool:
    """Evaluate ``model`` at ``step`` on the main process and return, on every process, whether training must stop
    (memorization onset confirmed).

    Steps that are not a multiple of ``monitor.every_n_steps`` return ``monitor.stopped`` at once, with no
    communication (every process applies the same test, so they all skip or all synchronise). Build the monitor
    with ``every_n_steps=args.checkpointing_steps`` (or a multiple) so each saved checkpoint is the one evaluated.
    ``model``: the (possibly DDP-wrapped) UNet, unwrapped with ``accelerator.unwrap_model``, or a pipeline.
    ``scheduler``: the training noise scheduler (needed for a bare UNet unless the monitor has one).
    ``ema_model``: a diffusers ``EMAModel``; its weights are swapped in for the evaluation (``store`` /
    ``copy_to`` / ``restore``), i.e. the weights saved as ``checkpoint-N/unet_ema`` are the ones evaluated.
    """
    for name in ("is_main_process", "set_trigger", "check_trigger"):
        if not hasattr(accelerator, name):
            raise TypeError(f"check_after_save: accelerator={type(accelerator).__name__} has no {name!r}; "
                            "pass the accelerate.Accelerator of the training loop")
    step = int(step)
    if step % monitor.every_n_steps:
        return bool(monitor.stopped)
    if accelerator.is_main_process and monitor.due(step):
        net = accelerator.unwrap_model(model) if hasattr(accelerator, "unwrap_model") else model
        if ema_model is not None:
            params = list(net.parameters())
            ema_model.store(params)
            ema_model.copy_to(params)
            try:
                stop = monitor.update(step, net, scheduler=scheduler)
            finally:
                ema_model.restore(params)
        else:
            stop = monitor.update(step, net, scheduler=scheduler)
        if stop:
            accelerator.set_trigger()
    elif accelerator.is_main_process and monitor.stopped:
        accelerator.set_trigger()  # e.g. resumed after onset: keep telling the other processes
    if bool(accelerator.check_trigger()):
        if not monitor.stopped:
            monitor.stopped = True  # non-main processes learn the decision here
        if accelerator.is_main_process:
            log.warning("diffaudit: memorization onset confirmed (step %s); stopping training at step %d",
                        monitor.onset_step, step)
        return True
    return False


def finish_training(accelerator: Any, monitor, output_dir: Any = None, step: Any = None) -> dict | None:
    """Once, after the training loop, on every process: the main process logs the monitor's final decision (stopped
    at, the step to keep and why, the level of memorization, the monitor's cost) through accelerate's logger and
    writes it to ``output_dir/diffaudit-monitor.json`` (with a pointer to ``checkpoint-<keep>``). Returns the
    decision on the main process, None elsewhere."""
    if not getattr(accelerator, "is_main_process", True):
        return None
    try:
        from accelerate.logging import get_logger

        alog = get_logger("diffaudit")

        def emit(line: str) -> None:
            alog.warning(line, main_process_only=True)
    except Exception:  # pragma: no cover - an accelerate-like object without accelerate installed
        def emit(line: str) -> None:
            log.warning("%s", line)
    return monitor.finish(output_dir, step=None if step is None else int(step), log=emit)
