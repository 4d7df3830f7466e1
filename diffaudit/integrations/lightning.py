"""Lightning: stop training at memorization onset, the way ``EarlyStopping`` stops it on a stalled metric.

::

    from diffaudit import MemorizationMonitor
    from diffaudit.integrations.lightning import MemorizationCallback

    monitor = MemorizationMonitor(train="data/train", heldout="data/val", every_n_steps=500)
    trainer = L.Trainer(callbacks=[MemorizationCallback(monitor)])   # model.unet, model.noise_scheduler

Conventions followed from ``lightning.pytorch.callbacks.EarlyStopping``: the callback sets
``trainer.should_stop`` (every rank stops: the decision is broadcast from rank 0, the only rank that evaluates), has
``state_dict`` / ``load_state_dict`` (saved in Lightning checkpoints, so a resumed run keeps the monitor's history)
and logs its ``diffaudit/...`` scalars with ``pl_module.log`` at each evaluation, on every rank with the same
values, so a stock ``EarlyStopping(monitor="diffaudit/memorization_low", mode="max", stopping_threshold=0.02,
strict=False)`` or a ``ModelCheckpoint`` can use them too (``strict=False``: the metric exists only after the
first evaluation).
"""
from __future__ import annotations

import logging
from typing import Any, Optional

try:
    import lightning.pytorch as _pl
except ModuleNotFoundError as _e:  # pragma: no cover - exercised in a subprocess test
    if _e.name is not None and _e.name.split(".")[0] != "lightning":
        raise
    raise ModuleNotFoundError(
        'diffaudit.integrations.lightning needs Lightning: pip install "diffaudit[lightning]"', name="lightning"
    ) from None

from ..monitor import MemorizationMonitor

log = logging.getLogger(__name__)

__all__ = ["MemorizationCallback"]


class MemorizationCallback(_pl.Callback):
    """Runs ``monitor.update(trainer.global_step, ...)`` after each training batch and stops at onset.

    ``model_attr``: the attribute of the LightningModule holding the denoiser to evaluate (``"unet"``; an EMA copy
    such as ``"ema_unet"`` works too; ``None``: the LightningModule itself). ``scheduler_attr``: the attribute
    holding the training noise scheduler (``"noise_scheduler"``); when the module has none, the monitor's own
    ``scheduler=`` is used. Only global rank 0 evaluates; the stop decision and the scalars are broadcast so all
    ranks stop at the same step and log the same values.
    """

    def __init__(self, monitor: MemorizationMonitor, model_attr: Optional[str] = "unet",
                 scheduler_attr: Optional[str] = "noise_scheduler", log_metrics: bool = True) -> None:
        super().__init__()
        if not isinstance(monitor, MemorizationMonitor):
            raise TypeError(f"MemorizationCallback: monitor must be a MemorizationMonitor, got {type(monitor).__name__}")
        self.monitor = monitor
        self.model_attr = model_attr
        self.scheduler_attr = scheduler_attr
        self.log_metrics = bool(log_metrics)
        self._last_step: Optional[int] = None
        self.stopped_step: Optional[int] = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.monitor.every_n_steps, model_attr=self.model_attr)

    # -- helpers --------------------------------------------------------------------------------------------------
    def _model(self, pl_module) -> Any:
        if self.model_attr is None:
            return pl_module
        model = getattr(pl_module, self.model_attr, None)
        if model is None:
            raise AttributeError(
                f"MemorizationCallback: model_attr={self.model_attr!r}: the LightningModule "
                f"{type(pl_module).__name__} has no such attribute (pass the attribute holding the UNet, or None "
                "for the module itself)"
            )
        return model

    def _scheduler(self, pl_module) -> Any:
        if self.scheduler_attr is None:
            return None
        return getattr(pl_module, self.scheduler_attr, None)

    @staticmethod
    def _skip(trainer) -> bool:
        try:
            from lightning.pytorch.trainer.states import TrainerFn

            return trainer.state.fn != TrainerFn.FITTING or bool(getattr(trainer, "sanity_checking", False))
        except AttributeError:  # a minimal trainer stand-in
            return False

    # -- hooks ------------------------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._skip(trainer):
            return
        step = int(trainer.global_step)
        # the same global step repeats over accumulated batches; every rank applies the same cadence test, so the
        # collective broadcast below happens on all ranks or on none
        if step == self._last_step or step % self.monitor.every_n_steps:
            return
        self._last_step = step
        stop, metrics = False, {}
        if trainer.is_global_zero:
            if self.monitor.due(step):
                self.monitor.update(step, self._model(pl_module), scheduler=self._scheduler(pl_module))
            stop, metrics = bool(self.monitor.stopped), self.monitor.metrics
        stop, metrics = trainer.strategy.broadcast((stop, metrics), src=0)
        if self.log_metrics and metrics:
            to_logger = bool(getattr(trainer, "loggers", None))
            for key, value in metrics.items():
                pl_module.log(key, float(value), on_step=True, on_epoch=False, prog_bar=False, logger=to_logger,
                              batch_size=1, sync_dist=False)
        if stop:
            self.monitor.stopped = True  # other ranks learn it from the broadcast
            if not trainer.should_stop:
                self.stopped_step = step
                onset = self.monitor.onset_step
                log.info("diffaudit: memorization onset confirmed%s; signalling Trainer to stop at step %d",
                         f" at step {onset}" if onset is not None else "", step)
            trainer.should_stop = True

    def on_fit_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            self.monitor.close()
            if self.monitor.history:  # the final decision: logged, and written beside the run's checkpoints
                from lightning.pytorch.utilities import rank_zero_info

                out = self.monitor.output_dir or getattr(trainer, "default_root_dir", None)
                self.monitor.finish(out, step=int(trainer.global_step), log=rank_zero_info)

    # -- checkpointing ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"monitor": self.monitor.state_dict(), "stopped_step": self.stopped_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.monitor.load_state_dict(state_dict["monitor"])
        self.stopped_step = state_dict.get("stopped_step")
