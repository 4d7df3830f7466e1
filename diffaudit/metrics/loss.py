"""Per-image denoising loss at fixed timesteps and fixed noise; train-vs-held-out gap and membership scores.

The loss of image i is the mean squared error of the model's prediction (epsilon, v or x0, following
``scheduler.config.prediction_type``) averaged over the given timesteps and ``noise_draws`` noise draws. The noise
of image i depends only on ``(seed, index of i)``; diffaudit's engines pass ``index = noise_index(id)``, so the same
image gets the same noise at every checkpoint and in any subset, train and held-out images are treated alike, and
results do not depend on the batch size. Carlini et al. 2023 found
timesteps around t = 100 (of 1000) the most informative for membership inference; the default is ``(100,)``.
"""
from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import numpy as np

from .stats import as_1d

logger = logging.getLogger(__name__)


def noise_index(image_id: str) -> int:
    """A stable non-negative integer (< 2**56) for an image id: the per-image noise index of every loss pass
    (audit, monitor, membership, leave-one-out). The same id gets the same noise in every run, at every checkpoint
    and in any subset of the images."""
    import hashlib

    digest = hashlib.sha256(str(image_id).encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:7], "big")


def _image_noise(seed: int, index: int, count: int, shape: tuple[int, ...]):
    import torch

    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(index)]).generate_state(2, dtype=np.uint32)
    g = torch.Generator(device="cpu").manual_seed(int(state[0]) << 32 | int(state[1]))
    return torch.randn((count, *shape), generator=g, dtype=torch.float32)


def _to_model_space(images) -> np.ndarray:
    """uint8 (N,H,W,C) or (N,H,W) -> float32 NCHW in [-1, 1]; float input is taken as NCHW in model space."""
    a = np.asarray(images)
    if a.dtype == np.uint8:
        if a.ndim == 3:
            a = a[..., None]
        if a.ndim != 4:
            raise ValueError(f"images (uint8) must be (N, H, W, C) or (N, H, W); got shape {a.shape}")
        return np.ascontiguousarray(a.transpose(0, 3, 1, 2), dtype=np.float32) / 127.5 - 1.0
    if np.issubdtype(a.dtype, np.floating):
        if a.ndim != 4:
            raise ValueError(f"images (float) must be (N, C, H, W) already in model space; got shape {a.shape}")
        if not np.isfinite(a).all():
            raise ValueError("images contain NaN/inf values")
        return a.astype(np.float32, copy=False)
    raise ValueError(f"images must be uint8 (N, H, W, C) or float (N, C, H, W); got dtype {a.dtype}")


def _model_device(model, device):
    import torch

    if device is not None:
        return torch.device(device)
    params = getattr(model, "parameters", None)
    if callable(params):
        for p in params():
            return p.device
    return torch.device("cpu")


def _model_dtype(model):
    import torch

    params = getattr(model, "parameters", None)
    if callable(params):
        for p in params():
            return p.dtype
    return torch.float32


def _prediction(out):
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


def denoising_losses(model, scheduler, images, *, timesteps: Sequence[int] = (100,), noise_draws: int = 2,
                     seed: int = 0, batch_size: int = 64, device=None, indices: Optional[Sequence[int]] = None,
                     model_kwargs: Optional[dict[str, Any]] = None, progress: bool = False) -> np.ndarray:
    """Per-image denoising loss (float64 array of length N), mean over ``timesteps`` x ``noise_draws``.

    ``model``: UNet2DModel-like, called as ``model(x_t, t, **model_kwargs)`` returning ``.sample`` (or a tuple /
    tensor). ``scheduler``: diffusers-like with ``add_noise``, ``config.num_train_timesteps``,
    ``config.prediction_type`` ("epsilon", "v_prediction" or "sample"; ``get_velocity`` for v). ``images``: uint8
    (N, H, W, C) -- scaled to [-1, 1] -- or float (N, C, H, W) already in model space (e.g. VAE latents).
    ``indices``: global index of each image for the noise (default ``0..N-1``): pass them when scoring a subset so
    each image keeps its noise. Deterministic and batch-size invariant.
    """
    import torch

    x_all = _to_model_space(images)
    n = x_all.shape[0]
    if n == 0:
        raise ValueError("images is empty")
    ts = [int(t) for t in np.atleast_1d(np.asarray(timesteps))]
    num_t = int(getattr(scheduler.config, "num_train_timesteps", 1000))
    if not ts or any(not 0 <= t < num_t for t in ts):
        raise ValueError(f"timesteps={list(timesteps)!r} must be non-empty integers in [0, {num_t})")
    if int(noise_draws) < 1:
        raise ValueError(f"noise_draws={noise_draws!r} must be >= 1")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size={batch_size!r} must be >= 1")
    idx = np.arange(n) if indices is None else np.asarray(indices, dtype=np.int64)
    if idx.shape != (n,):
        raise ValueError(f"indices must have one entry per image ({n}); got shape {idx.shape}")
    in_ch = getattr(getattr(model, "config", None), "in_channels", None)
    if in_ch is not None and int(in_ch) != x_all.shape[1]:
        raise ValueError(f"images have {x_all.shape[1]} channels but the model expects in_channels={in_ch}")
    ptype = str(getattr(scheduler.config, "prediction_type", "epsilon"))
    if ptype not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(f"scheduler prediction_type={ptype!r} is not supported (epsilon, v_prediction, sample)")
    dev = _model_device(model, device)
    dtype = _model_dtype(model)
    kw = dict(model_kwargs or {})
    reps = len(ts) * int(noise_draws)
    t_rep = torch.tensor(ts * int(noise_draws), dtype=torch.long)  # draw-major: (d0,t0),(d0,t1),...
    was_training = bool(getattr(model, "training", False))
    if hasattr(model, "eval"):
        model.eval()
    out = np.empty(n, dtype=np.float64)
    bs = int(batch_size)
    prog = None
    if progress:
        from .._progress import progress

        prog = progress(transient=True)
        prog.start()
        task = prog.add_task("denoising loss", total=n)
    try:
        with torch.inference_mode():
            # each model call sees at most `bs` noisy images; one image's repetitions stay together
            per_call = max(1, bs // reps) if reps <= bs else 1
            for s in range(0, n, per_call):
                x0 = torch.from_numpy(x_all[s:s + per_call])
                b = x0.shape[0]
                noise = torch.cat([_image_noise(seed, int(idx[s + j]), reps, tuple(x0.shape[1:])) for j in range(b)])
                x0r = x0.repeat_interleave(reps, dim=0)
                tr = t_rep.repeat(b)
                losses = torch.empty(b * reps, dtype=torch.float64)
                for c in range(0, b * reps, bs):
                    sl = slice(c, c + bs)
                    xt = scheduler.add_noise(x0r[sl], noise[sl], tr[sl])
                    if ptype == "epsilon":
                        target = noise[sl]
                    elif ptype == "sample":
                        target = x0r[sl]
                    else:
                        target = scheduler.get_velocity(x0r[sl], noise[sl], tr[sl])
                    pred = _prediction(model(xt.to(dev, dtype), tr[sl].to(dev), **kw)).float().cpu()
                    if pred.shape != target.shape:
                        raise ValueError(f"model output shape {tuple(pred.shape)} != target {tuple(target.shape)}")
                    losses[c:c + pred.shape[0]] = ((pred - target.float()) ** 2).flatten(1).mean(1).double()
                out[s:s + b] = losses.view(b, reps).mean(1).numpy()
                if prog is not None:
                    prog.update(task, advance=b)
    finally:
        if prog is not None:
            prog.stop()
        if was_training and hasattr(model, "train"):
            model.train()
    if not np.isfinite(out).all():
        raise FloatingPointError(f"{int((~np.isfinite(out)).sum())} images got a non-finite loss (model output NaN?)")
    return out


def loss_gap(train_losses, heldout_losses) -> float:
    """``mean(heldout) - mean(train)``: > 0 when training images are fit better than unseen ones."""
    return float(as_1d(heldout_losses, "heldout_losses").mean() - as_1d(train_losses, "train_losses").mean())


def membership_percentile(train_losses, heldout_losses) -> np.ndarray:
    """Per training image: fraction of held-out losses greater than its loss (ties count 1/2). High = member-like.

    Its mean over training images equals :func:`membership_auc`.
    """
    t = as_1d(train_losses, "train_losses")
    h = np.sort(as_1d(heldout_losses, "heldout_losses"))
    greater = h.size - np.searchsorted(h, t, side="right")
    ties = np.searchsorted(h, t, side="right") - np.searchsorted(h, t, side="left")
    return (greater + 0.5 * ties) / h.size


def membership_auc(train_losses, heldout_losses) -> float:
    """AUC of the attack "lower loss = member" (Mann-Whitney rank statistic; 0.5 = no separation, 1 = perfect)."""
    from scipy.stats import rankdata

    t = as_1d(train_losses, "train_losses")
    h = as_1d(heldout_losses, "heldout_losses")
    r = rankdata(-np.concatenate([t, h]))  # score = -loss, average ranks for ties
    return float((r[:t.size].sum() - t.size * (t.size + 1) / 2.0) / (t.size * h.size))
