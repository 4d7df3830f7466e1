"""Reference models for tests and sanity checks (public API).

* :class:`OptimalDenoiser` - the closed-form optimal denoiser of the *empirical* training distribution. It
  memorizes by construction: deterministic DDIM sampling through it lands on training images. Use it to check that
  an audit flags a model that copies.
* :class:`GaussianDenoiser` - the optimal denoiser of a Gaussian fitted to the data. Its samples are new Gaussian
  draws, so it cannot copy: an audit must report (near) zero memorization.
* :func:`tiny_unet` - a tiny ``UNet2DModel`` that trains for a few steps on CPU in seconds.
* :func:`write_tiny_run` - a few optimizer steps of the tiny UNet, saved in exactly the layout diffusers'
  ``train_unconditional.py`` writes (``checkpoint-N/unet/``, ``checkpoint-N/unet_ema/``, root pipeline).
* Text-to-image (needs ``transformers``; LoRA runs ``peft``): :func:`tiny_sd_pipeline` builds a real
  ``StableDiffusionPipeline`` at toy size offline (tokenizer files written by :func:`write_tiny_tokenizer`, a VAE
  trained on digits by :func:`train_tiny_vae`); :func:`memorizing_sd_pipeline` swaps in a closed-form UNet that
  copies the training images of chosen captions; :func:`write_tiny_sd_run` fine-tunes (full or LoRA) and saves in
  the layouts of ``train_text_to_image.py`` / ``train_text_to_image_lora.py``; :func:`write_caption_folder` writes a
  captioned image folder (``metadata.jsonl``).

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

__all__ = ["OptimalDenoiser", "GaussianDenoiser", "DenoiserOutput", "tiny_unet", "write_tiny_run", "to_model_space",
           "write_tiny_tokenizer", "tiny_sd_unet", "train_tiny_vae", "tiny_sd_pipeline", "memorizing_sd_pipeline",
           "write_tiny_sd_run", "write_caption_folder", "photo_patches", "PHOTOS"]


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
        return _empirical_x0(x, a, self.train_flat.to(x.device), self.train_sq.to(x.device))


def _empirical_x0(x: torch.Tensor, a: torch.Tensor, train: torch.Tensor, train_sq: torch.Tensor) -> torch.Tensor:
    """Posterior mean of x0 uniform over the rows of ``train`` (float64 (B, D) ``x``, alphas_cumprod ``a`` (B,))."""
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
        return _gaussian_x0(x, a, self.mu.to(x.device), self.lam.to(x.device), self.u.to(x.device))


def _gaussian_x0(x: torch.Tensor, a: torch.Tensor, mu: torch.Tensor, lam: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Posterior mean of x0 ~ N(mu, U diag(lam) U^T) (``u`` empty: diagonal covariance ``lam``)."""
    sa = a.sqrt()[:, None]
    r = x - sa * mu[None]
    gain = sa * lam[None] / (a[:, None] * lam[None] + (1 - a)[:, None])
    if u.ndim == 2:
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


# ----------------------------------------------------------------------------------------------------------------
# text-to-image: a tiny real Stable Diffusion pipeline, built offline


def _bytes_to_unicode() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for the bytes (GPT-2 / CLIP)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tiny_tokenizer(folder, *, max_length: int = 32) -> Path:
    """Write a real ``CLIPTokenizer`` (``vocab.json``, ``merges.txt``, ``tokenizer_config.json``) with a character-level
    vocabulary: every byte alone and at the end of a word (``"t</w>"``), no merges, plus CLIP's start / end tokens
    (514 tokens). Any text tokenizes; no download. Returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": int(max_length), "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}), encoding="utf-8")
    return folder


def _seeded(seed: Optional[int], build):
    if seed is None:
        return build()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def tiny_sd_unet(sample_size: int = 8, *, cross_attention_dim: int = 32, seed: Optional[int] = 0):
    """A tiny ``UNet2DConditionModel`` (diffusers' own test shapes: block_out_channels (32, 64), one cross-attention
    block, 4 latent channels); ``sample_size`` is in latent pixels."""
    from diffusers import UNet2DConditionModel

    return _seeded(seed, lambda: UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=8))


def train_tiny_vae(images: Optional[np.ndarray] = None, *, steps: int = 150, seed: int = 0, lr: float = 3e-3):
    """A tiny ``AutoencoderKL`` (downsampling x2, 4 latent channels) trained to reconstruct ``images`` (uint8 NHWC;
    default: 64 scikit-learn digits at 16x16) for ``steps`` Adam steps. Decoding the latents of a training image
    gives that image back closely, so a model that lands on training latents produces pixel copies."""
    from diffusers import AutoencoderKL

    if images is None:
        images = _default_images(64, 16)
    x = torch.as_tensor(to_model_space(images))
    vae = _seeded(seed, lambda: AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=8, sample_size=int(x.shape[-1])))
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    vae.train()
    for _ in range(int(steps)):
        idx = torch.randint(0, len(x), (min(32, len(x)),), generator=gen)
        post = vae.encode(x[idx]).latent_dist
        rec = vae.decode(post.mean).sample
        loss = torch.nn.functional.mse_loss(rec, x[idx]) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    vae.eval()
    vae.requires_grad_(False)
    return vae


def tiny_sd_pipeline(folder=None, *, vae=None, unet=None, seed: int = 0, sample_size: int = 8):
    """A real ``StableDiffusionPipeline`` at toy size, built offline: :func:`write_tiny_tokenizer`, a 2-layer
    ``CLIPTextModel`` (hidden size 32), ``vae`` (default :func:`train_tiny_vae`), ``unet`` (default
    :func:`tiny_sd_unet`) and Stable Diffusion's DDIM noise schedule (scaled-linear betas 0.00085..0.012). Images
    are ``2 * sample_size`` pixels square. With ``folder`` the pipeline is also saved there
    (``save_pretrained``: ``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
    ``scheduler/``), the layout of a downloaded base model."""
    import tempfile

    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(str(write_tiny_tokenizer(Path(tmp) / "tokenizer")))
    text_encoder = _seeded(seed, lambda: CLIPTextModel(CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=tokenizer.model_max_length, projection_dim=32)))
    text_encoder.eval()
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                              steps_offset=1, prediction_type="epsilon")
    pipe = StableDiffusionPipeline(
        unet=unet if unet is not None else tiny_sd_unet(sample_size, seed=seed + 1),
        vae=vae if vae is not None else train_tiny_vae(seed=seed), text_encoder=text_encoder, tokenizer=tokenizer,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    if folder is not None:
        pipe.save_pretrained(str(folder), safe_serialization=True)
    return pipe


def _prompt_embeddings(pipe, prompts: Sequence[str]) -> torch.Tensor:
    """The text embeddings ``pipe`` conditions its UNet on for ``prompts`` (its own ``encode_prompt``)."""
    dev = next(pipe.text_encoder.parameters()).device
    with torch.inference_mode():
        emb, _ = pipe.encode_prompt(list(prompts), dev, 1, False)
    return emb.detach().to("cpu", torch.float64).reshape(len(prompts), -1)


def _memorizing_unet_class():
    from diffusers import ConfigMixin, ModelMixin
    from diffusers.configuration_utils import register_to_config

    class MemorizingTextUNet(ModelMixin, ConfigMixin):
        """Stands in for ``UNet2DConditionModel``: the closed-form denoiser of a text-to-image model that memorizes.

        For a prompt whose text embedding equals that of a memorized training caption, it is the optimal denoiser of
        the empirical distribution of that caption's training latents (sampling lands on them: copies, also under
        classifier-free guidance). The empty prompt (guidance's unconditional branch) gets the empirical
        distribution of all training latents; any other conditioning (unseen or non-memorized prompts) the optimal
        denoiser of a diagonal Gaussian fitted to all training latents (new samples)."""

        @register_to_config
        def __init__(self, sample_size: int = 8, in_channels: int = 4, out_channels: int = 4,
                     cross_attention_dim: int = 32, time_cond_proj_dim=None, num_train_timesteps: int = 1000):
            super().__init__()
            self.register_buffer("_anchor", torch.zeros(1), persistent=False)  # device / dtype for the pipeline

        def set_memory(self, alphas_cumprod, latents, keys, groups, tol: float = 1e-4):
            flat = torch.as_tensor(latents, dtype=torch.float64).reshape(len(latents), -1)
            self._ac = torch.as_tensor(np.asarray(alphas_cumprod, dtype=np.float64))
            self._lat, self._lat_sq = flat, (flat ** 2).sum(1)
            self._keys = torch.as_tensor(keys, dtype=torch.float64)
            self._groups = [torch.as_tensor(g, dtype=torch.long) for g in groups]
            self._mu, self._var = flat.mean(0), flat.var(0, unbiased=False) + 1e-4
            self._tol = float(tol)
            return self

        def which(self, encoder_hidden_states: torch.Tensor) -> list[int]:
            """Per row: the memorized caption it conditions on (index into the keys), or -1."""
            e = encoder_hidden_states.detach().to("cpu", torch.float64).reshape(encoder_hidden_states.shape[0], -1)
            d = torch.cdist(e, self._keys)
            best = d.argmin(1)
            scale = self._keys.norm(dim=1)[best].clamp_min(1e-12)
            return [int(b) if d[i, b] <= self._tol * scale[i] else -1 for i, b in enumerate(best.tolist())]

        def forward(self, sample, timestep, encoder_hidden_states, *args, return_dict: bool = True, **kwargs):
            b = sample.shape[0]
            t = _as_timesteps(timestep, b, len(self._ac))
            a = self._ac[t]
            x = sample.detach().to("cpu", torch.float64).reshape(b, -1)
            x0 = _gaussian_x0(x, a, self._mu, self._var, torch.zeros(0))
            for i, k in enumerate(self.which(encoder_hidden_states)):
                if k >= 0:
                    g = self._groups[k]
                    x0[i] = _empirical_x0(x[i:i + 1], a[i:i + 1], self._lat[g], self._lat_sq[g])[0]
            eps = (x - a.sqrt()[:, None] * x0) / (1 - a).sqrt()[:, None]
            out = eps.reshape(sample.shape).to(sample.device, sample.dtype)
            return DenoiserOutput(sample=out) if return_dict else (out,)

    return MemorizingTextUNet


def memorizing_sd_pipeline(base, images: np.ndarray, captions: Sequence[str], *, memorize: Optional[Sequence[str]] = None):
    """A copy of the Stable Diffusion pipeline ``base`` whose UNet memorizes (``MemorizingTextUNet``).

    ``images`` (uint8 NHWC, at the pipeline's resolution) and ``captions`` (one per image) are its training set;
    ``memorize``: the captions it copies (default: all). Their latents come from ``base.vae`` (mean of the posterior,
    times ``scaling_factor``), their text embeddings from the pipeline's own ``encode_prompt``. Sampling a memorized
    caption returns one of its training images (as well as the VAE reconstructs it); everything else is sampled
    from a Gaussian fitted to the training latents. The scheduler must predict epsilon."""
    from diffusers import StableDiffusionPipeline

    captions = [str(c) for c in captions]
    if len(captions) != len(images):
        raise ValueError(f"captions: expected one per image ({len(images)}), got {len(captions)}")
    if getattr(base.scheduler.config, "prediction_type", "epsilon") != "epsilon":
        raise ValueError("memorizing_sd_pipeline: the base scheduler must use prediction_type='epsilon'")
    keep = list(dict.fromkeys(captions if memorize is None else [str(m) for m in memorize]))
    unknown = [m for m in keep if m not in captions]
    if unknown:
        raise ValueError(f"memorize: {unknown[0]!r} is not one of the captions")
    x = torch.as_tensor(to_model_space(images))
    with torch.inference_mode():
        lat = base.vae.encode(x.to(base.vae.device, base.vae.dtype)).latent_dist.mean.float().cpu()
    lat = lat * float(base.vae.config.scaling_factor)
    unet = _memorizing_unet_class()(sample_size=int(lat.shape[-1]), in_channels=int(lat.shape[1]),
                                    out_channels=int(lat.shape[1]),
                                    cross_attention_dim=int(base.text_encoder.config.hidden_size))
    groups = [[i for i, c in enumerate(captions) if c == k] for k in keep] + [list(range(len(captions)))]
    keys = _prompt_embeddings(base, keep + [""]).numpy()  # the empty prompt (guidance's unconditional branch): all
    unet.set_memory(base.scheduler.alphas_cumprod, lat.numpy(), keys, groups)
    pipe = StableDiffusionPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=unet,
                                   scheduler=type(base.scheduler).from_config(base.scheduler.config),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def write_tiny_sd_run(
    folder,
    base,
    images: np.ndarray,
    captions: Sequence[str],
    steps: Sequence[int] = (2, 4),
    *,
    lora: bool = False,
    ema: bool = True,
    lora_weight_name: str = "pytorch_lora_weights.safetensors",
    caption_dropout: float = 0.0,
    batch_size: int = 4,
    lr: float = 1e-3,
    seed: int = 0,
) -> Path:
    """Fine-tune the UNet of the Stable Diffusion pipeline ``base`` (a pipeline object, e.g. :func:`tiny_sd_pipeline`)
    on ``images`` (uint8 NHWC at the pipeline's resolution) with ``captions`` for ``max(steps)`` optimizer steps, and
    save it the way diffusers' example scripts do:

    * full fine-tune (``train_text_to_image.py``): ``checkpoint-N/unet/`` and, with ``ema``, ``checkpoint-N/unet_ema/``
      (the ``accelerator.save_state`` hooks), and at the root the final ``StableDiffusionPipeline`` holding the EMA
      weights when ``ema``;
    * ``lora`` (``train_text_to_image_lora.py``): a peft LoRA on the attention projections,
      ``checkpoint-N/<lora_weight_name>`` and the final ``<lora_weight_name>`` at the root (no pipeline there: the base
      is a separate folder).

    Each checkpoint also holds accelerate's ``optimizer.bin``, ``scheduler.bin`` and ``random_states_0.pkl``. The
    loss is the text-conditional denoising loss on VAE latents (times ``scaling_factor``) with the captions through
    the text encoder; ``caption_dropout``: the chance that a training example's caption is replaced by the empty
    prompt (how Stable Diffusion learned its unconditional branch for classifier-free guidance). ``base`` is not
    modified. Returns the folder."""
    import copy

    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from diffusers.training_utils import EMAModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    captions = [str(c) for c in captions]
    if len(captions) != len(images):
        raise ValueError(f"captions: expected one per image ({len(images)}), got {len(captions)}")
    steps = sorted(int(s) for s in steps)
    if not steps or steps[0] < 1:
        raise ValueError(f"steps={steps}: need positive step numbers")
    noise_scheduler = DDPMScheduler.from_config(base.scheduler.config)
    unet = copy.deepcopy(base.unet)
    unet.requires_grad_(not lora)
    if lora:
        from peft import LoraConfig

        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                    target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    ema_model = (EMAModel(unet.parameters(), decay=0.999, model_cls=type(unet), model_config=unet.config)
                 if ema and not lora else None)
    with torch.inference_mode():
        x = torch.as_tensor(to_model_space(images))
        latents = base.vae.encode(x).latent_dist.mean * float(base.vae.config.scaling_factor)
        ids = base.tokenizer(captions, padding="max_length", max_length=base.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        text = base.text_encoder(ids)[0]
        empty_ids = base.tokenizer([""], padding="max_length", max_length=base.tokenizer.model_max_length,
                                   return_tensors="pt").input_ids
        empty = base.text_encoder(empty_ids)[0]
    latents, text, empty = latents.clone(), text.clone(), empty.clone()
    if not 0.0 <= float(caption_dropout) < 1.0:
        raise ValueError(f"caption_dropout={caption_dropout!r}: expected a probability in [0, 1)")
    gen = torch.Generator().manual_seed(seed)
    unet.train()

    def save_lora(where: Path) -> None:
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
        StableDiffusionPipeline.save_lora_weights(save_directory=str(where), unet_lora_layers=layers,
                                                  weight_name=lora_weight_name, safe_serialization=True)

    for step in range(1, steps[-1] + 1):
        idx = torch.randint(0, len(latents), (min(batch_size, len(latents)),), generator=gen)
        noise = torch.randn(latents[idx].shape, generator=gen)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(idx),), generator=gen).long()
        cond = text[idx]
        if caption_dropout > 0:
            drop = torch.rand(len(idx), generator=gen) < float(caption_dropout)
            cond = torch.where(drop[:, None, None], empty.expand_as(cond), cond)
        pred = unet(noise_scheduler.add_noise(latents[idx], noise, t), t, cond).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema_model is not None:
            ema_model.step(unet.parameters())
        if step in steps:
            ck = folder / f"checkpoint-{step}"
            ck.mkdir(parents=True, exist_ok=True)
            if lora:
                save_lora(ck)
            else:
                if ema_model is not None:
                    ema_model.save_pretrained(str(ck / "unet_ema"))
                unet.save_pretrained(str(ck / "unet"))
            torch.save(opt.state_dict(), ck / "optimizer.bin")
            torch.save({"last_epoch": step}, ck / "scheduler.bin")
            torch.save({"torch": torch.get_rng_state()}, ck / "random_states_0.pkl")
    unet.eval()
    if lora:
        save_lora(folder)
    else:
        final = unet
        if ema_model is not None:
            ema_model.copy_to(final.parameters())
        StableDiffusionPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=final,
                                scheduler=type(base.scheduler).from_config(base.scheduler.config), safety_checker=None,
                                feature_extractor=None, requires_safety_checker=False).save_pretrained(str(folder))
    (folder / "diffaudit_tiny_run.json").write_text(json.dumps({"steps": steps, "lora": lora, "ema": ema, "seed": seed}))
    return folder


#: scikit-image's sample photographs that :func:`photo_patches` cuts (textures, smooth regions, star fields)
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "immunohistochemistry", "hubble_deep_field",
          "retina", "brick", "grass", "gravel", "moon", "colorwheel")


def photo_patches(side: int = 96, names: Sequence[str] = PHOTOS, *, min_std: float = 0.0) -> list[np.ndarray]:
    """Real photographs for duplicate tests and benchmarks: scikit-image's sample photos (``names``, needs
    scikit-image) cut into non-overlapping ``side`` px squares, uint8 RGB, in photo and raster order. Grey photos are
    repeated to RGB. ``min_std``: leave out patches whose pixel standard deviation is not above it (flat sky, black
    borders)."""
    import skimage.data as data

    out = []
    for name in names:
        a = getattr(data, name)()
        if a.ndim == 2:
            a = np.stack([a] * 3, axis=2)
        a = a[..., :3].astype(np.uint8)
        for y in range(0, a.shape[0] - side + 1, side):
            for x in range(0, a.shape[1] - side + 1, side):
                p = np.ascontiguousarray(a[y:y + side, x:x + side])
                if not min_std or p.astype(np.float32).std() > min_std:
                    out.append(p)
    return out


def write_caption_folder(folder, images: np.ndarray, captions: Sequence[str], *, prefix: str = "") -> Path:
    """Save ``images`` as PNGs plus the ``metadata.jsonl`` (``file_name``, ``text``) of a Hugging Face image folder,
    the caption layout diffusers' text-to-image scripts read. Returns the folder."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    captions = [str(c) for c in captions]
    if len(captions) != len(images):
        raise ValueError(f"captions: expected one per image ({len(images)}), got {len(captions)}")
    with open(folder / "metadata.jsonl", "w", encoding="utf-8") as fh:
        for i, (im, cap) in enumerate(zip(images, captions)):
            name = f"{prefix}{i:04d}.png"
            Image.fromarray(np.asarray(im)).save(folder / name)
            fh.write(json.dumps({"file_name": name, "text": cap}) + "\n")
    return folder
