"""Training helpers for the tiny digits DDPM: data split, model, scheduler, one training step, the training loop.

The demo (``diffaudit demo``), the leave-one-out fold runs (:func:`diffaudit.loo.train_fold_runs`) and the
benchmarks train the same model with the same recipe, from here.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from ._serial import atomic_write_text
from ._util import check_int

logger = logging.getLogger(__name__)

__all__ = ["DemoRun", "EpochBatches", "N_DIGITS", "ddpm_loss", "digits_split", "make_adamw", "make_demo_scheduler",
           "make_demo_unet", "train_digits_ddpm", "write_pngs"]

N_DIGITS = 1797  # len(sklearn.datasets.load_digits().images)


@dataclass
class DemoRun:
    """What :func:`train_digits_ddpm` produced. Images are uint8 NHWC with C=1 at ``image_size``."""

    out_dir: Path
    run_dir: Path  # diffusers layout: checkpoint-N/unet/ + root pipeline
    train_dir: Path  # PNG folder of the training digits (point the CLI's --train here)
    heldout_dir: Path  # PNG folder of the held-out digits
    train_images: np.ndarray
    heldout_images: np.ndarray
    train_ids: list[str]  # file names inside train_dir (= ImageSet.from_folder ids)
    heldout_ids: list[str]
    checkpoint_steps: list[int]
    checkpoint_dirs: list[Path]  # run_dir/checkpoint-{step}
    losses: np.ndarray  # float32, mean batch loss of every optimisation step (len = final_step)
    final_step: int
    stopped_early: bool  # the callback returned True before ``steps``
    train_seconds: float  # wall time of the optimisation loop (incl. checkpoint writes and callback time)
    config: dict[str, Any] = field(default_factory=dict)
    ema: bool = True  # checkpoints hold unet_ema/ and the root pipeline the EMA weights


# ----------------------------------------------------------------------------------------------------------- data


def digits_split(
    n_train: int = 16, n_heldout: int = 256, *, seed: int = 0, image_size: int = 8
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A fixed, seeded split of scikit-learn's digits: ``(train, heldout, train_idx, heldout_idx)``.

    Images are uint8 ``(n, image_size, image_size, 1)``; the 0..16 grey levels map to ``round(v / 16 * 255)``, and
    ``image_size`` (a multiple of 8) upsamples by pixel repetition. The held-out set is the first ``n_heldout``
    digits of a seeded permutation and the training set the next ``n_train`` - so the held-out set is the same for
    every ``n_train`` at a given seed, disjoint from every training set, and smaller training sets are subsets of
    larger ones. ``*_idx`` index ``load_digits().images``.
    """
    n_heldout = check_int("n_heldout", n_heldout, 0)
    n_train = check_int("n_train", n_train, 2, N_DIGITS - n_heldout)
    image_size = check_int("image_size", image_size, 8)
    if image_size % 8:
        raise ValueError(f"image_size={image_size!r} is not allowed: expected a multiple of 8 (8, 16, 32, ...)")
    from sklearn.datasets import load_digits

    images = load_digits().images  # (1797, 8, 8) float64 in 0..16
    perm = np.random.default_rng(seed).permutation(len(images))
    heldout_idx = np.sort(perm[:n_heldout])
    train_idx = np.sort(perm[n_heldout : n_heldout + n_train])
    u8 = np.round(images / 16.0 * 255.0).astype(np.uint8)
    rep = image_size // 8
    if rep > 1:
        u8 = u8.repeat(rep, axis=1).repeat(rep, axis=2)
    u8 = u8[..., None]
    return u8[train_idx], u8[heldout_idx], train_idx, heldout_idx


#: lists, in the parent folder, the folders of digits :func:`write_pngs` wrote (only those are ever rewritten)
DIGITS_MARKER = ".diffaudit-digits"


def write_pngs(folder: Path, images: np.ndarray, indices: np.ndarray) -> list[str]:
    """Write the digits as ``<index>.png`` into ``folder``: a new or empty folder, or one this function wrote
    before (its PNGs of another split are replaced); any other non-empty folder is refused, never cleared."""
    from PIL import Image

    folder = Path(folder)
    marker = folder.parent / DIGITS_MARKER  # beside the folder, which then holds the PNGs only
    ours = set(marker.read_text(encoding="utf-8").split("\n")) if marker.is_file() else set()
    if folder.is_dir() and any(folder.iterdir()) and folder.name not in ours:
        raise ValueError(f"{str(folder)!r} holds files diffaudit did not write; pass an empty or new output folder "
                         "(diffaudit never deletes or overwrites files it did not write)")
    folder.mkdir(parents=True, exist_ok=True)
    if folder.name not in ours:
        atomic_write_text(marker, "\n".join(sorted(ours - {""} | {folder.name})) + "\n")
    ids = [f"{int(i):04d}.png" for i in indices]
    wanted = set(ids)
    for stale in folder.glob("*.png"):  # a re-run with another split must not leave old digits behind
        if stale.name not in wanted:
            stale.unlink()
    for name, img in zip(ids, images):
        Image.fromarray(img[..., 0], mode="L").save(folder / name)
    return ids


# ---------------------------------------------------------------------------------------------------------- model


def make_demo_unet(image_size: int = 8):
    """The demo's UNet: 2 levels (32, 64 channels), one ResNet layer per block, no attention anywhere.

    ``add_attention=False`` also drops the mid-block self-attention that ``UNet2DModel`` adds by default.
    """
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=image_size,
        in_channels=1,
        out_channels=1,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        add_attention=False,
    )


def make_demo_scheduler(num_train_timesteps: int = 1000, beta_schedule: str = "squaredcos_cap_v2"):
    """The demo's ``DDPMScheduler``: 1000 steps, cosine schedule (Nichol & Dhariwal 2021; ``"squaredcos_cap_v2"``),
    epsilon prediction, clip_sample - otherwise diffusers' defaults (train_unconditional.py: ``--ddpm_beta_schedule``).

    Cosine rather than the default linear betas: on the 16-digit set the EMA model's memorized fraction reaches 0.43
    at step 750 and 0.64 at step 1000 (linear: 0.11 and 0.30), so the demo needs fewer steps
    (benchmarks/demo_curve.py).
    """
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule)


# ------------------------------------------------------------------------------------------------------- training


def train_digits_ddpm(
    out_dir: str | os.PathLike,
    *,
    n_train: int = 16,
    steps: int = 2000,
    checkpoint_every: int = 200,
    batch_size: int = 16,
    lr: float = 1e-3,
    seed: int = 0,
    image_size: int = 8,
    n_heldout: int = 256,
    num_train_timesteps: int = 1000,
    beta_schedule: str = "squaredcos_cap_v2",
    use_ema: bool = True,
    ema_max_decay: float = 0.9999,
    device: Optional[str] = None,
    num_threads: Optional[int] = None,
    progress: bool = False,
    callback: Optional[Callable[[int, Any], Optional[bool]]] = None,
    checkpoint_at: Optional[Sequence[int]] = None,
) -> DemoRun:
    """Train the demo DDPM on ``n_train`` digits and write diffusers-layout checkpoints under ``out_dir/ddpm``.

    Standard epsilon-prediction DDPM training (Ho et al. 2020) as in diffusers' ``train_unconditional.py``:
    uniform timesteps, ``scheduler.add_noise``, MSE to the noise, AdamW (``lr``, constant). Batches are drawn
    epoch by epoch from a seeded shuffle (``n_train <= batch_size``: every batch is the whole training set).

    ``use_ema`` (default): keep an EMA of the weights as train_unconditional.py does with ``--use_ema``
    (``EMAModel(decay=ema_max_decay, use_ema_warmup=True, inv_gamma=1.0, power=3/4)``), write it to
    ``checkpoint-N/unet_ema/`` beside ``unet/`` and save the final pipeline with the EMA weights.

    ``callback(step, unet)`` runs after every optimisation step (1-based ``step``), after the checkpoint of that
    step was written, with the model the checkpoints' audit reads: the EMA UNet when ``use_ema``, else the training
    UNet (no dropout in this UNet, so train/eval modes agree; do not modify its weights). Returning ``True``
    stops training (a final checkpoint is written if that step had none). The loop adds nothing else per step, so a
    callback that returns early is the whole cost.

    Reproducible: weights, batches, noise and timesteps follow ``seed`` alone (same device, same torch build); the
    global torch RNG state is restored afterwards. ``num_threads`` (default: 1 at 8x8, where a second thread saves
    at most ~20% and oversubscribes a busy machine; else ``min(torch.get_num_threads(), 4)``) is set for the run and
    restored afterwards.
    ``device`` defaults to CUDA when available, else CPU. ``checkpoint_at``: explicit checkpoint steps (e.g.
    log-spaced) instead of every ``checkpoint_every`` steps.
    """
    import torch

    from ._util import default_device

    steps = check_int("steps", steps, 1)
    checkpoint_every = check_int("checkpoint_every", checkpoint_every, 1)
    save_at = None if checkpoint_at is None else {check_int("checkpoint_at", int(s), 1) for s in checkpoint_at}
    batch_size = check_int("batch_size", batch_size, 1)
    num_train_timesteps = check_int("num_train_timesteps", num_train_timesteps, 2)
    if not (isinstance(lr, (int, float)) and np.isfinite(lr) and lr > 0):
        raise ValueError(f"lr={lr!r} is not allowed: expected a positive finite float")
    if beta_schedule not in ("linear", "scaled_linear", "squaredcos_cap_v2"):
        raise ValueError(
            f"beta_schedule={beta_schedule!r} is not allowed: expected 'linear', 'scaled_linear' or 'squaredcos_cap_v2'"
        )
    if not (isinstance(ema_max_decay, (int, float)) and 0.0 <= ema_max_decay < 1.0):
        raise ValueError(f"ema_max_decay={ema_max_decay!r} is not allowed: expected a float in [0, 1)")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback={callback!r} is not allowed: expected a callable (step, unet) -> bool | None")
    device = device or default_device()

    out = Path(out_dir)
    run_dir = out / "ddpm"
    train_u8, heldout_u8, train_idx, heldout_idx = digits_split(
        n_train, n_heldout, seed=seed, image_size=image_size
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    train_ids = write_pngs(out / "train", train_u8, train_idx)
    heldout_ids = write_pngs(out / "heldout", heldout_u8, heldout_idx)

    config = dict(
        n_train=n_train, n_heldout=n_heldout, steps=steps, checkpoint_every=checkpoint_every, batch_size=batch_size,
        lr=float(lr), seed=seed, image_size=image_size, num_train_timesteps=num_train_timesteps,
        beta_schedule=beta_schedule, use_ema=bool(use_ema), ema_max_decay=float(ema_max_decay), device=str(device),
    )
    logger.info("training demo DDPM: %s -> %s", config, run_dir)

    old_threads = torch.get_num_threads()
    # 8x8: a second thread saves <= ~20% on an idle machine but slows training several-fold when other processes
    # compete for the cores (OpenMP oversubscription, measured on 2 cores), so one thread is the robust default
    threads = num_threads if num_threads is not None else (1 if image_size <= 8 else min(old_threads, 4))
    threads = check_int("num_threads", threads, 1)
    torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # UNet initialisation draws from the global RNG
            unet = make_demo_unet(image_size).to(device)
            scheduler = make_demo_scheduler(num_train_timesteps, beta_schedule)
            gen = torch.Generator().manual_seed(seed + 1)  # batches, noise, timesteps: CPU generator, any device
            data = torch.from_numpy(train_u8).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).to(device)
            ema = _make_ema(unet, float(ema_max_decay)) if use_ema else None
            result = _train_loop(
                unet, scheduler, data, gen, steps=steps, checkpoint_every=checkpoint_every, save_at=save_at,
                batch_size=batch_size,
                lr=float(lr), run_dir=run_dir, progress=progress, callback=callback, torch=torch, ema=ema,
            )
    finally:
        torch.set_num_threads(old_threads)

    losses, ckpt_steps, final_step, stopped, seconds = result
    from diffusers import DDPMPipeline

    final = ema[1] if ema is not None else unet  # the script copies the EMA weights into the UNet it saves
    final.eval()
    DDPMPipeline(unet=final, scheduler=scheduler).save_pretrained(run_dir)
    log = dict(config=config, final_step=final_step, stopped_early=stopped, train_seconds=seconds,
               checkpoint_steps=ckpt_steps, train_ids=train_ids, heldout_ids=heldout_ids,
               losses=[round(float(v), 6) for v in losses])
    atomic_write_text(out / "train_log.json", json.dumps(log))
    logger.info("trained %d steps in %.1f s (final loss %.4f)", final_step, seconds, float(losses[-50:].mean()))
    return DemoRun(
        out_dir=out, run_dir=run_dir, train_dir=out / "train", heldout_dir=out / "heldout",
        train_images=train_u8, heldout_images=heldout_u8, train_ids=train_ids, heldout_ids=heldout_ids,
        checkpoint_steps=ckpt_steps, checkpoint_dirs=[run_dir / f"checkpoint-{s}" for s in ckpt_steps],
        losses=losses, final_step=final_step, stopped_early=stopped, train_seconds=seconds, config=config,
        ema=bool(use_ema),
    )


def _make_ema(unet, max_decay: float):
    """``(EMAModel, ema_unet)``: diffusers' EMAModel with train_unconditional.py's settings, whose shadow
    parameters *are* the parameters of ``ema_unet`` (updated in place by ``EMAModel.step``), so the callback gets
    an ordinary module and ``EMAModel.save_pretrained`` writes the script's ``unet_ema/`` (config with EMA keys)."""
    import copy

    from diffusers import UNet2DModel
    from diffusers.training_utils import EMAModel

    ema_unet = copy.deepcopy(unet).eval().requires_grad_(False)
    ema = EMAModel(unet.parameters(), decay=max_decay, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4,
                   foreach=True, model_cls=UNet2DModel, model_config=unet.config)
    ema.shadow_params = [p.data for p in ema_unet.parameters()]
    return ema, ema_unet


def make_adamw(params, lr: float):
    """AdamW as the demo trains with: fused (one kernel for all parameters, 4x cheaper than the per-tensor loop on CPU
    for this model) when torch supports it."""
    import torch

    try:
        return torch.optim.AdamW(params, lr=float(lr), fused=True)
    except (RuntimeError, TypeError):  # pragma: no cover - very old torch / unsupported device
        return torch.optim.AdamW(params, lr=float(lr))


class EpochBatches:
    """Index batches of ``n`` items in a random order drawn from ``gen``, reshuffled when an epoch is used up (a
    shuffled DataLoader without drop_last). The first order is drawn on construction."""

    def __init__(self, n: int, batch_size: int, gen) -> None:
        import torch

        self.n, self.batch_size, self.gen, self._torch = int(n), int(batch_size), gen, torch
        self.order, self.pos = torch.randperm(self.n, generator=gen), 0

    def next(self):
        if self.pos >= self.n:
            self.order, self.pos = self._torch.randperm(self.n, generator=self.gen), 0
        idx = self.order[self.pos : self.pos + self.batch_size]
        self.pos += len(idx)
        return idx


def ddpm_loss(unet, scheduler, x0, gen):
    """The DDPM training loss (noise-prediction MSE at uniform random timesteps), noise and timesteps from ``gen``."""
    import torch
    import torch.nn.functional as F

    device = x0.device
    noise = torch.randn(x0.shape, generator=gen).to(device)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), generator=gen).to(device)
    return F.mse_loss(unet(scheduler.add_noise(x0, noise, t), t).sample, noise)


def _train_loop(unet, scheduler, data, gen, *, steps, checkpoint_every, save_at=None, batch_size, lr, run_dir, progress,
                callback,
                torch, ema=None):
    device = data.device
    n = data.shape[0]
    opt = make_adamw(unet.parameters(), lr)
    losses = torch.zeros(steps, dtype=torch.float32)
    ckpt_steps: list[int] = []
    batches = EpochBatches(n, batch_size, gen)
    bar = _progress_bar(progress, steps, f"training DDPM on {n} digits")
    unet.train()
    t0 = time.perf_counter()
    step, stopped = 0, False
    try:
        while step < steps:
            loss = ddpm_loss(unet, scheduler, data[batches.next().to(device)], gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if ema is not None:
                ema[0].step(unet.parameters())
            losses[step] = loss.detach()
            step += 1
            if (step in save_at) if save_at is not None else (step % checkpoint_every == 0):
                _save_checkpoint(unet, run_dir, step, ema)
                ckpt_steps.append(step)
            if callback is not None and callback(step, unet if ema is None else ema[1]):
                stopped = step < steps
                break
            if bar is not None:
                bar[0].update(bar[1], advance=1)
    finally:
        if bar is not None:
            bar[0].stop()
    if not ckpt_steps or ckpt_steps[-1] != step:
        _save_checkpoint(unet, run_dir, step, ema)
        ckpt_steps.append(step)
    seconds = time.perf_counter() - t0
    if stopped:
        logger.info("callback stopped training at step %d", step)
    return losses[:step].numpy(), ckpt_steps, step, stopped, seconds


def _save_checkpoint(unet, run_dir: Path, step: int, ema=None) -> None:
    # train_unconditional.py: accelerator.save_state(output_dir/checkpoint-{global_step}) whose save_model_hook
    # calls ema_model.save_pretrained(output_dir/"unet_ema") (with --use_ema) and model.save_pretrained(output_dir/"unet")
    folder = run_dir / f"checkpoint-{step}"
    if ema is not None:
        ema[0].save_pretrained(folder / "unet_ema")
    unet.save_pretrained(folder / "unet")


def _progress_bar(enabled: bool, total: int, description: str):
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    from ._progress import progress

    p = progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    task = p.add_task(description, total=total)
    p.start()
    return p, task


# ------------------------------------------------------------------------------------------------------- the demo


