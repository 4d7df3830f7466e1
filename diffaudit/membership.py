"""White-box membership scores per training image: the denoising loss at fixed timesteps and fixed noise.

A model that memorized an image denoises it better than images it never saw. For every training image we compute
the denoising loss (:func:`diffaudit.metrics.denoising_losses`: MSE of the model's prediction, averaged over
``timesteps`` x ``noise_draws`` noise draws) and compare it with the same loss on held-out images of the same
distribution:

* **calibrated score** of a training image = the fraction of held-out losses greater than its loss (ties count 1/2),
  i.e. its percentile in the held-out loss distribution. 1.0: lower loss than every held-out image; about 0.5: the
  model treats it like an unseen image. The score is relative to the held-out reference, so it is comparable across
  checkpoints and models whose raw losses differ in scale.
* **AUC** per checkpoint of the attack "lower loss = member" (train vs held-out, Mann-Whitney): 0.5 = no
  separation, 1.0 = every training image has lower loss than every held-out image. The mean calibrated score over
  the training images equals this AUC.

Carlini et al. 2023 ("Extracting Training Data from Diffusion Models") found the loss at timesteps around t = 100
(of 1000) the most informative for membership inference; the default is ``timesteps=(100,)`` with 4 noise draws.
The noise of an image depends only on ``(seed, its id)``: an image keeps its noise at every checkpoint, in every
run and in any subset, and held-out images draw from ``seed + 1`` so that a held-out file named like a training file
does not share its noise.

Limits: the score needs a held-out set from the training distribution (the AUC of a model against held-out data
from another distribution measures the shift, not memorization), and the loss is only defined for unconditional
pixel-space UNets here (text-conditional or latent models need captions / the VAE; they are refused with a clear
error).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Sequence, Union

import numpy as np

from .data import as_imageset
from .metrics.loss import noise_index
from .reference import image_losses, stack_images
from .results import MembershipCheckpoint, MembershipImage, MembershipResult, Skipped

log = logging.getLogger(__name__)

__all__ = [
    "MembershipCheckpoint",
    "MembershipImage",
    "MembershipResult",
    "membership_scores",
    "noise_index",
    "resolve_models",
    "as_image_set",
    "check_loss_args",
    "skipped_of",
    "stack_for_model",
]

#: the former name of :func:`diffaudit.data.as_imageset`
as_image_set = as_imageset

#: Carlini et al. 2023: t around 100 of 1000 is the most informative timestep for membership inference.
DEFAULT_TIMESTEPS = (100,)


# ----------------------------------------------------------------------------------------------------- helpers


def stack_for_model(images, model) -> tuple[list[str], np.ndarray]:
    """Decode every image of an ImageSet at the model's ``config.sample_size`` and ``config.in_channels``
    (grayscale models get the channel mean), as the audit's loss pass does. Returns (ids, uint8 NHWC); images that
    fail to decode are left out (and recorded in ``images.skipped``)."""
    conf = getattr(model, "config", None)
    size = getattr(conf, "sample_size", None)
    if isinstance(size, (list, tuple)):
        size = tuple(int(s) for s in size)
    return stack_images(images, range(len(images)), size, getattr(conf, "in_channels", None))


@dataclass
class _ModelRef:
    """One model state to score: its step, a label and a zero-argument loader."""

    step: int
    path: str
    load: Any


def _looks_like_model(obj: Any) -> bool:
    return callable(obj) and hasattr(obj, "config") and not isinstance(obj, (str, os.PathLike))


def resolve_models(model_or_run: Any, *, scheduler=None, checkpoint: Union[None, str, int] = None, device=None,
                   name: str = "model_or_run") -> tuple[list[_ModelRef], Any, str]:
    """Turn a model, pipeline object, CheckpointRun or folder into ``(model refs, scheduler, description)``.

    ``checkpoint``: ``None`` = the last (final) checkpoint, ``"all"`` = every checkpoint, an int = that step.
    """
    from .checkpoints import CheckpointRun, discover_checkpoints

    if checkpoint is not None and checkpoint != "all" and (isinstance(checkpoint, bool)
                                                           or not isinstance(checkpoint, (int, np.integer))):
        raise ValueError(f"checkpoint={checkpoint!r} is not allowed: expected None (the last checkpoint), "
                         "'all', or an integer training step")
    obj = model_or_run
    # a diffusers pipeline object: DDPMPipeline(unet, scheduler)
    if not isinstance(obj, (str, os.PathLike, CheckpointRun)) and hasattr(obj, "unet") and hasattr(obj, "scheduler"):
        if getattr(obj, "text_encoder", None) is not None:
            raise ValueError(f"{name}: text-conditional pipelines are not supported by the denoising-loss scores "
                             "(they need captions); pass an unconditional UNet, pipeline or run")
        scheduler = scheduler if scheduler is not None else obj.scheduler
        obj = obj.unet
    if _looks_like_model(obj):
        if checkpoint not in (None, "all"):
            raise ValueError(f"checkpoint={checkpoint!r}: {name} is a single model, which has no checkpoint steps; "
                             "leave checkpoint=None")
        if scheduler is None:
            raise ValueError(f"scheduler=None: {name} is a model ({type(obj).__name__}); pass scheduler= the noise "
                             "scheduler it was trained with (e.g. diffusers.DDPMScheduler())")
        if getattr(getattr(obj, "config", None), "cross_attention_dim", None):
            raise ValueError(f"{name}: text-conditional UNets (cross_attention_dim set) are not supported by the "
                             "denoising-loss scores (they need text embeddings)")
        model = obj
        return [_ModelRef(0, type(obj).__name__, lambda: model)], scheduler, f"model:{type(obj).__name__}"
    if isinstance(obj, CheckpointRun):
        run = obj
    elif isinstance(obj, (str, os.PathLike)):
        run = discover_checkpoints(obj, scheduler=scheduler)
    else:
        raise TypeError(f"{name}: expected a UNet-like model (with .config), a pipeline, a CheckpointRun or a run / "
                        f"pipeline folder; got {type(obj).__name__}")
    if run.conditional:
        raise ValueError(f"{name}={str(run.root)!r}: text-conditional checkpoints are not supported by the "
                         "denoising-loss scores (they need captions)")
    if not run.checkpoints:
        raise ValueError(f"{name}={str(run.root)!r}: no checkpoints found")
    sched = scheduler if (scheduler is not None and not isinstance(scheduler, (str, os.PathLike, dict))) \
        else run.new_scheduler()
    if sched is None:
        raise ValueError(f"{name}={str(run.root)!r}: the run has no noise scheduler; pass scheduler=")
    cks = list(run.checkpoints)
    if checkpoint is None:
        cks = cks[-1:]
    elif checkpoint != "all":
        cks = [c for c in cks if c.step == int(checkpoint)]
        if not cks:
            raise ValueError(f"checkpoint={checkpoint!r}: no such step in {str(run.root)!r}; steps: {run.steps}")
    refs = [_ModelRef(c.step, c.path, (lambda c=c: run.load(c, device=device))) for c in cks]
    return refs, sched, f"run:{run.root}"


def check_loss_args(timesteps, noise_draws, batch_size) -> list[int]:
    ts = [int(t) for t in np.atleast_1d(np.asarray(timesteps))]
    if not ts:
        raise ValueError(f"timesteps={timesteps!r}: give at least one timestep (default (100,))")
    if isinstance(noise_draws, bool) or not isinstance(noise_draws, (int, np.integer)) or noise_draws < 1:
        raise ValueError(f"noise_draws={noise_draws!r} is not allowed: expected an integer >= 1")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is not allowed: expected an integer >= 1")
    return ts


def skipped_of(images, where: str) -> list[Skipped]:
    """The ImageSet's skipped items, placed in ``where``."""
    return [s.at(where) for s in getattr(images, "skipped", [])]


# ------------------------------------------------------------------------------------------------------ results


# --------------------------------------------------------------------------------------------------------- API


def membership_scores(
    model_or_run: Any,
    train: Any,
    heldout: Any,
    *,
    timesteps: Sequence[int] = DEFAULT_TIMESTEPS,
    noise_draws: int = 4,
    seed: int = 0,
    batch_size: int = 64,
    device=None,
    scheduler=None,
    checkpoint: Union[None, str, int] = None,
    progress: bool = False,
) -> MembershipResult:
    """Membership scores of every training image and the train-vs-held-out AUC (see the module docstring).

    ``model_or_run``: a UNet-like model (``model(x_t, t).sample``; give ``scheduler=``), a diffusers pipeline object,
    a :class:`~diffaudit.checkpoints.CheckpointRun`, or a run / pipeline / UNet folder (its own scheduler is used
    unless ``scheduler=`` is given). ``train`` / ``heldout``: ImageSets, folders or uint8 arrays; images are brought
    to the model's size and channel count. ``checkpoint``: ``None`` = the last checkpoint, ``"all"`` = every
    checkpoint (one AUC each; the per-image table keeps each step's loss and score), or a step.
    """
    ts = check_loss_args(timesteps, noise_draws, batch_size)
    refs, sched, desc = resolve_models(model_or_run, scheduler=scheduler, checkpoint=checkpoint, device=device)
    train_set = as_imageset(train, "train")
    held_set = as_imageset(heldout, "heldout")
    if len(held_set) < 20:
        log.warning("heldout has only %d images: the calibrated scores have a resolution of 1/%d",
                    len(held_set), len(held_set))
    kw = dict(timesteps=ts, noise_draws=int(noise_draws), batch_size=int(batch_size), device=device)
    stacked = None
    cps: list[MembershipCheckpoint] = []
    per_step: list[tuple[str, np.ndarray, np.ndarray]] = []
    h_last = None
    prog = None
    if progress and len(refs) > 1:
        from ._progress import progress

        prog = progress(transient=True)
        prog.start()
        task = prog.add_task("membership scores", total=len(refs))
    try:
        for ref in refs:
            model = ref.load()
            if stacked is None:  # decode once, at the model's size / channels
                t_ids, t_x = stack_for_model(train_set, model)
                h_ids, h_x = stack_for_model(held_set, model)
                stacked = (t_ids, t_x, h_ids, h_x)
            t_ids, t_x, h_ids, h_x = stacked
            from .metrics import membership_auc, membership_percentile

            tl = image_losses(model, sched, t_ids, t_x, seed=int(seed), **kw)
            hl = image_losses(model, sched, h_ids, h_x, seed=int(seed) + 1, **kw)
            pct = membership_percentile(tl, hl)
            cps.append(MembershipCheckpoint(
                step=int(ref.step), path=str(ref.path), auc=float(membership_auc(tl, hl)),
                loss_train=float(tl.mean()), loss_heldout=float(hl.mean()), loss_gap=float(hl.mean() - tl.mean()),
            ))
            per_step.append((str(ref.step), tl, pct))
            h_last = hl
            log.info("membership step %s: AUC %.3f (train loss %.4f, held-out %.4f)", ref.step, cps[-1].auc,
                     cps[-1].loss_train, cps[-1].loss_heldout)
            del model
            if prog is not None:
                prog.advance(task)
    finally:
        if prog is not None:
            prog.stop()
    t_ids, _, h_ids, _ = stacked
    _, tl_last, pct_last = per_step[-1]
    multi = len(per_step) > 1
    images = [
        MembershipImage(
            id=tid, loss=float(tl_last[i]), score=float(pct_last[i]),
            loss_by_step={s: float(tl[i]) for s, tl, _ in per_step} if multi else {},
            score_by_step={s: float(p[i]) for s, _, p in per_step} if multi else {},
        )
        for i, tid in enumerate(t_ids)
    ]
    return MembershipResult(
        checkpoints=cps, images=images, heldout_ids=list(h_ids), heldout_losses=[float(v) for v in h_last],
        timesteps=ts, noise_draws=int(noise_draws), seed=int(seed), model=desc,
        train=str(getattr(train_set, "source", "")), heldout=str(getattr(held_set, "source", "")),
        skipped=skipped_of(train_set, "train") + skipped_of(held_set, "heldout"),
    )
