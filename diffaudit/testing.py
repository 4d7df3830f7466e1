"""Reference models for tests and sanity checks (public API).

* :class:`OptimalDenoiser` - the closed-form optimal denoiser of the *empirical* training distribution. It
  memorizes by construction: deterministic DDIM sampling through it lands on training images. Use it to check that
  an audit flags a model that copies.
* :class:`GaussianDenoiser` - the optimal denoiser of a Gaussian fitted to the data. Its samples are new Gaussian
  draws, so it cannot copy: an audit must report (near) zero memorization.
* :func:`tiny_unet` - a tiny ``UNet2DModel`` that trains for a few steps on CPU in seconds.
* :func:`write_tiny_run` - a few optimizer steps of the tiny UNet, saved in exactly the layout diffusers'
  ``train_unconditional.py`` writes (``checkpoint-N/unet/``, ``checkpoint-N/unet_ema/``, root pipeline).

Both denoisers follow the ``UNet2DModel`` calling convention: ``model(sample, timestep).sample`` is the
prediction of the scheduler's ``prediction_type`` (``"epsilon"``, ``"v_prediction"`` or ``"sample"``), and
``model.config.sample_size`` / ``model.config.in_channels`` describe the images. Images live in model space
[-1, 1]; training images are given as uint8 NHWC arrays (NHW for grayscale).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Optional, Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)

__all__ = ["OptimalDenoiser", "GaussianDenoiser", "DenoiserOutput", "tiny_unet", "write_tiny_run", "to_model_space"]


def to_model_space(images: np.ndarray, dtype=np.float32) -> np.ndarray:
    """uint8 NHWC (or NHW) images -> NCHW in [-1, 1] (``x / 127.5 - 1``)."""
    x = np.asarray(images)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.dtype != np.uint8:
        raise ValueError(f"images: expected uint8 NHWC or NHW, got dtype {x.dtype} shape {x.shape}")
    return (x.astype(dtype) / 127.5 - 1.0).transpose(0, 3, 1, 2)


@dataclass
class DenoiserOutput:
    """Like diffusers' ``UNet2DOutput``: the prediction is ``.sample``."""

    sample: torch.Tensor


def _as_timesteps(timestep, batch: int, num_train_timesteps: int) -> torch.Tensor:
    t = torch.as_tensor(timestep).reshape(-1).long().cpu()
    if t.numel() == 1:
        t = t.expand(batch)
    if t.numel() != batch:
        raise ValueError(f"timestep: expected a scalar or {batch} values, got {t.numel()}")
    if (t < 0).any() or (t >= num_train_timesteps).any():
        raise ValueError(f"timestep: values must lie in [0, {num_train_timesteps}), got {t.tolist()}")
    return t


class _ClosedFormDenoiser(torch.nn.Module):
    """Shared plumbing: alphas from the scheduler, prediction-type conversion, UNet2DModel-like calls."""

    def __init__(self, scheduler, sample_size, channels: int) -> None:
        super().__init__()
        ac = torch.as_tensor(np.asarray(scheduler.alphas_cumprod, dtype=np.float64))
        self.register_buffer("alphas_cumprod", ac, persistent=False)
        self.prediction_type = getattr(scheduler.config, "prediction_type", "epsilon")
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(
                f"scheduler prediction_type={self.prediction_type!r}: allowed 'epsilon', 'v_prediction', 'sample'"
            )
        self.config = SimpleNamespace(
            sample_size=sample_size, in_channels=channels, out_channels=channels, num_train_timesteps=len(ac),
            _class_name=type(self).__name__,
        )

    def x0_hat(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Posterior mean E[x0 | x_t] for flat float64 ``x`` (B, D) and alphas_cumprod ``a`` (B,)."""
        raise NotImplementedError

    def forward(self, sample: torch.Tensor, timestep, *args, return_dict: bool = True, **kwargs):
        b = sample.shape[0]
        t = _as_timesteps(timestep, b, len(self.alphas_cumprod))
        a = self.alphas_cumprod[t.to(self.alphas_cumprod.device)].to(sample.device)  # (B,) float64
        x = sample.reshape(b, -1).to(torch.float64)
        x0 = self.x0_hat(x, a)
        sa, s1a = a.sqrt()[:, None], (1 - a).sqrt()[:, None]
        eps = (x - sa * x0) / s1a
        if self.prediction_type == "epsilon":
            out = eps
        elif self.prediction_type == "sample":
            out = x0
        else:  # v = sqrt(a) eps - sqrt(1 - a) x0
            out = sa * eps - s1a * x0
        out = out.reshape(sample.shape).to(sample.dtype)
        return DenoiserOutput(sample=out) if return_dict else (out,)


def _geometry(x_nchw: np.ndarray):
    _, c, h, w = x_nchw.shape
    return (h if h == w else (h, w)), c


class OptimalDenoiser(_ClosedFormDenoiser):
    """The optimal (posterior-mean) denoiser of the empirical distribution of ``train_images``.

    For ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps`` with ``x0`` uniform over the training images ``y_i`` (in
    [-1, 1]), ``E[x0 | x_t] = sum_i softmax_i(-||x_t - sqrt(a_t) y_i||^2 / (2 (1 - a_t))) y_i``, computed in
    float64 with a max-subtracted (logsumexp) softmax. ``forward`` returns the scheduler's prediction type
    (epsilon: ``(x_t - sqrt(a_t) x0_hat) / sqrt(1 - a_t)``). Deterministic samplers driven by it converge onto
    training images: it memorizes by construction.
    """

    def __init__(self, train_images: np.ndarray, scheduler) -> None:
        y = to_model_space(train_images, np.float64)
        if len(y) == 0:
            raise ValueError("train_images: need at least one image")
        super().__init__(scheduler, *_geometry(y))
        train = torch.as_tensor(y.reshape(len(y), -1), dtype=torch.float64)
        self.register_buffer("train_flat", train, persistent=False)
        self.register_buffer("train_sq", (train ** 2).sum(1), persistent=False)

    def x0_hat(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        train, train_sq = self.train_flat.to(x.device), self.train_sq.to(x.device)
        sa = a.sqrt()[:, None]
        # ||x - sqrt(a) y||^2 = ||x||^2 - 2 sqrt(a) x.y + a ||y||^2
        d2 = (x ** 2).sum(1, keepdim=True) - 2 * sa * (x @ train.T) + a[:, None] * train_sq[None]
        logits = -d2.clamp_min(0) / (2 * (1 - a))[:, None]
        w = torch.softmax(logits, dim=1)  # = exp(logits - logsumexp(logits))
        return w @ train


class GaussianDenoiser(_ClosedFormDenoiser):
    """The optimal denoiser of the Gaussian ``N(mean, cov)`` (or diagonal ``var``), in model space [-1, 1].

    ``E[x0 | x_t] = mean + sqrt(a) C (a C + (1 - a) I)^-1 (x_t - sqrt(a) mean)``, evaluated in the eigenbasis of
    ``C``. ``mean`` is a (C, H, W) array (or flat, with ``sample_size=`` and ``channels=``). Its samples are fresh
    Gaussian draws: it cannot copy training images. :meth:`fit` fits one to uint8 images.
    """

    def __init__(self, mean, cov=None, *, var=None, scheduler, sample_size=None, channels=None) -> None:
        mean = np.asarray(mean, dtype=np.float64)
        if mean.ndim == 3:
            c, h, w = mean.shape
            size = h if h == w else (h, w)
        else:
            if sample_size is None or channels is None:
                raise ValueError("GaussianDenoiser: a flat mean needs sample_size= and channels=")
            c, size = int(channels), sample_size
        super().__init__(scheduler, size, c)
        mu = mean.reshape(-1)
        d = mu.size
        if (cov is None) == (var is None):
            raise ValueError("GaussianDenoiser: give exactly one of cov= (D x D) or var= (D,)")
        if cov is not None:
            cov = np.asarray(cov, dtype=np.float64)
            if cov.shape != (d, d):
                raise ValueError(f"cov: expected shape {(d, d)}, got {cov.shape}")
            lam, u = np.linalg.eigh((cov + cov.T) / 2)
            lam = np.clip(lam, 0, None)
        else:
            lam = np.asarray(var, dtype=np.float64).reshape(-1)
            if lam.size != d or (lam < 0).any():
                raise ValueError(f"var: expected {d} non-negative values, got shape {np.shape(var)}")
            u = np.zeros((0,))
        self.register_buffer("mu", torch.as_tensor(mu), persistent=False)
        self.register_buffer("lam", torch.as_tensor(lam), persistent=False)
        self.register_buffer("u", torch.as_tensor(u, dtype=torch.float64), persistent=False)

    @classmethod
    def fit(cls, train_images: np.ndarray, scheduler, *, diagonal: bool = False, ridge: float = 1e-4):
        """Gaussian with the mean and covariance (or per-pixel variance) of uint8 ``train_images``."""
        y = to_model_space(train_images, np.float64)
        flat = y.reshape(len(y), -1)
        mean = flat.mean(0).reshape(y.shape[1:])
        if diagonal:
            return cls(mean, var=flat.var(0) + ridge, scheduler=scheduler)
        d = flat.shape[1]
        cov = np.cov(flat, rowvar=False).reshape(d, d) if len(flat) > 1 else np.zeros((d, d))
        return cls(mean, cov + ridge * np.eye(d), scheduler=scheduler)

    def x0_hat(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        mu, lam = self.mu.to(x.device), self.lam.to(x.device)
        sa = a.sqrt()[:, None]
        r = x - sa * mu[None]
        gain = sa * lam[None] / (a[:, None] * lam[None] + (1 - a)[:, None])
        if self.u.ndim == 2:
            u = self.u.to(x.device)
            return mu[None] + ((r @ u) * gain) @ u.T
        return mu[None] + r * gain


def tiny_unet(sample_size: int = 16, channels: int = 3, *, seed: Optional[int] = 0):
    """A tiny ``UNet2DModel`` (block_out_channels=(32, 64), one layer per block, no attention); ~0.5M parameters.

    ``seed`` makes the initial weights reproducible without touching the global RNG (None: global RNG)."""
    from diffusers import UNet2DModel

    def build():
        return UNet2DModel(
            sample_size=sample_size, in_channels=channels, out_channels=channels,
            block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        )

    if seed is None:
        return build()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _default_images(n: int, side: int) -> np.ndarray:
    from sklearn.datasets import load_digits

    x = load_digits().images[:n]
    x = (x / 16.0 * 255.0).round().astype(np.uint8)
    rep = max(1, side // 8)
    x = x.repeat(rep, axis=1).repeat(rep, axis=2)
    if x.shape[1] != side:
        from PIL import Image

        x = np.stack([np.asarray(Image.fromarray(im).resize((side, side), Image.BILINEAR)) for im in x])
    return np.repeat(x[..., None], 3, axis=3)


def write_tiny_run(
    folder,
    images: Optional[np.ndarray] = None,
    steps: Sequence[int] = (2, 4),
    *,
    ema: bool = True,
    final_pipeline: bool = True,
    sample_size: Optional[int] = None,
    batch_size: int = 8,
    lr: float = 1e-3,
    seed: int = 0,
    scheduler=None,
    accelerate_state: bool = True,
) -> Path:
    """Train :func:`tiny_unet` for ``max(steps)`` optimizer steps on ``images`` and save it the way diffusers'
    ``train_unconditional.py`` does.

    Writes ``folder/checkpoint-N/unet/`` for each N in ``steps`` (``UNet2DModel.save_pretrained``), plus
    ``checkpoint-N/unet_ema/`` when ``ema`` (``EMAModel.save_pretrained``, whose config carries the EMA keys), plus
    the accelerate state files the real script leaves there (``optimizer.bin``, ``random_states_0.pkl``; pickles
    that discovery must never open) when ``accelerate_state``, and, when ``final_pipeline``, the root
    ``DDPMPipeline.save_pretrained`` (``model_index.json``, ``unet/``, ``scheduler/``) holding the EMA weights if
    ``ema`` else the trained ones. ``images``: uint8 NHWC (default: 16 scikit-learn digits, 16x16 RGB).
    Returns the folder.
    """
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
    from diffusers.training_utils import EMAModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if images is None:
        images = _default_images(16, sample_size or 16)
    x_all = torch.as_tensor(to_model_space(images))
    size = sample_size or int(x_all.shape[-1])
    if x_all.shape[-1] != size or x_all.shape[-2] != size:
        raise ValueError(f"images: expected {size}x{size} images for sample_size={size}, got {tuple(x_all.shape[-2:])}")
    steps = sorted(int(s) for s in steps)
    if not steps or steps[0] < 1:
        raise ValueError(f"steps={steps}: need positive step numbers")
    noise_scheduler = scheduler or DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    model = tiny_unet(size, int(x_all.shape[1]), seed=seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    ema_model = (EMAModel(model.parameters(), decay=0.999, use_ema_warmup=True, inv_gamma=1.0, power=0.75,
                          model_cls=UNet2DModel, model_config=model.config) if ema else None)
    gen = torch.Generator().manual_seed(seed)
    n = len(x_all)
    for step in range(1, steps[-1] + 1):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=gen)
        clean = x_all[idx]
        noise = torch.randn(clean.shape, generator=gen)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(idx),), generator=gen).long()
        noisy = noise_scheduler.add_noise(clean, noise, t)
        loss = torch.nn.functional.mse_loss(model(noisy, t).sample, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema_model is not None:
            ema_model.step(model.parameters())
        if step in steps:
            ck = folder / f"checkpoint-{step}"
            if ema_model is not None:
                ema_model.save_pretrained(str(ck / "unet_ema"))
            model.save_pretrained(str(ck / "unet"))
            if accelerate_state:
                torch.save(opt.state_dict(), ck / "optimizer.bin")
                torch.save({"torch": torch.get_rng_state()}, ck / "random_states_0.pkl")
    if final_pipeline:
        final = model
        if ema_model is not None:
            final = UNet2DModel.from_config(model.config)
            ema_model.copy_to(final.parameters())
        DDPMPipeline(unet=final, scheduler=noise_scheduler).save_pretrained(str(folder))
    (folder / "diffaudit_tiny_run.json").write_text(json.dumps({"steps": steps, "ema": ema, "seed": seed}))
    return folder
