"""Sample every checkpoint from the same noise, so sample i at step 500 and at step 3000 are comparable.

**Noise contract.** Sample index ``i`` owns a ``torch.Generator`` (CPU) seeded with :func:`sample_seed`
``(seed, i)`` (the first 8 bytes of ``sha256("diffaudit:<seed>:<i>")``, masked to 63 bits). Its starting noise is
the first draw from that generator, shape ``(C, H, W)``; stochastic samplers (DDPM, DDIM with ``eta > 0``, any
scheduler whose ``step`` takes ``generator=``) draw each step's noise for sample ``i`` from the same generator, in
order. So the noise of sample ``i`` is the same at every checkpoint, on every device and for every batch size.

**Models.** ``CheckpointSampler.sample`` accepts

* an unconditional denoiser: a diffusers ``UNet2DModel`` or any module called as ``model(x, t)`` returning an object
  with ``.sample``, a tuple, or a tensor (e.g. :class:`diffaudit.testing.OptimalDenoiser`); it is run through our
  own loop around the scheduler's ``set_timesteps`` / ``scale_model_input`` / ``step``;
* an unconditional pipeline (``DDPMPipeline``-like: ``.unet`` + ``.scheduler``, no text encoder): its UNet, same loop;
* a text-conditional pipeline (``StableDiffusionPipeline``-like): called as
  ``pipe(prompt=[...], latents=..., generator=[...], num_inference_steps=..., guidance_scale=..., output_type="np")``
  with latents drawn from the per-sample generators; the pipeline's scheduler is swapped for DDIM / DDPM (built
  from its config) unless ``sampler="run"``.

``sampler``: ``"ddim"`` (default; deterministic when ``eta=0``), ``"ddpm"`` (ancestral; ``num_inference_steps=None``
runs the full training schedule), or ``"run"`` (the given scheduler's own class and config, as trained).

**Output.** Model space [-1, 1] is clipped and mapped to uint8 (``round((x + 1) * 127.5)``); one channel becomes RGB by
repetition. Samples containing NaN/inf are flagged in ``finite_mask``, counted, zero-filled and must be left out of
embedding (``SampleBatch.finite_images``).
"""
from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

log = logging.getLogger(__name__)

SAMPLERS = ("ddim", "ddpm", "run")
MANIFEST = "samples.json"


def sample_seed(seed: int, index: int) -> int:
    """The torch seed of sample ``index`` under run seed ``seed`` (stable across processes and platforms)."""
    digest = hashlib.sha256(f"diffaudit:{int(seed)}:{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def sample_generators(seed: int, indices: Sequence[int]):
    """One freshly seeded CPU ``torch.Generator`` per sample index."""
    import torch

    return [torch.Generator(device="cpu").manual_seed(sample_seed(seed, int(i))) for i in indices]


def initial_noise(seed: int, indices: Sequence[int], shape: Sequence[int], generators=None):
    """Starting noise (len(indices), *shape) float32 on CPU: the first draw of each sample's generator."""
    import torch

    gens = generators if generators is not None else sample_generators(seed, indices)
    if not len(gens):
        return torch.zeros((0, *shape))
    return torch.cat([torch.randn((1, *shape), generator=g, dtype=torch.float32) for g in gens], dim=0)


def to_uint8(
    x: np.ndarray, *, layout: str = "NCHW", value_range: tuple[float, float] = (-1.0, 1.0)
) -> tuple[np.ndarray, np.ndarray]:
    """Float images in ``value_range`` (``layout`` "NCHW" or "NHWC") -> (uint8 NHWC RGB, finite mask).

    ``round(clip((x - lo) / (hi - lo), 0, 1) * 255)``; one channel is repeated to RGB, a 4th (alpha) dropped.
    Samples with any NaN/inf are flagged False in the mask and zero-filled."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 4:
        raise ValueError(f"images: expected a 4-D batch, got shape {x.shape}")
    if layout not in ("NCHW", "NHWC"):
        raise ValueError(f"layout={layout!r}: allowed 'NCHW', 'NHWC'")
    if layout == "NCHW":
        x = x.transpose(0, 2, 3, 1)
    finite = np.isfinite(x).reshape(len(x), -1).all(axis=1)
    lo, hi = value_range
    y = np.where(np.isfinite(x), x, lo)
    y = np.clip((y - lo) / (hi - lo), 0.0, 1.0)
    out = np.rint(y * 255.0).astype(np.uint8)
    c = out.shape[-1]
    if c == 1:
        out = np.repeat(out, 3, axis=-1)
    elif c == 4:
        out = out[..., :3]
    elif c != 3:
        raise ValueError(f"images: {c} channels; only 1 (grayscale), 3 (RGB) or 4 (RGBA, alpha dropped) convert to RGB")
    out[~finite] = 0
    return np.ascontiguousarray(out), finite


@dataclass
class SampleBatch:
    """Generated samples of one checkpoint.

    ``images``: uint8 (N, H, W, 3) RGB; ``finite_mask[k]`` is False when sample ``indices[k]`` contained NaN/inf
    (its image is all zeros and must not be embedded); ``prompts[k]`` the prompt (text-conditional) else None;
    ``seeds[k]`` = :func:`sample_seed` of ``indices[k]``.
    """

    images: np.ndarray
    finite_mask: np.ndarray
    indices: np.ndarray
    prompts: Optional[list[str]] = None
    seeds: Optional[np.ndarray] = None
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def num_nonfinite(self) -> int:
        return int((~self.finite_mask).sum())

    @property
    def ids(self) -> list[str]:
        """Stable ids ``sample_00012`` (same as the PNG names)."""
        return [f"sample_{int(i):05d}" for i in self.indices]

    def finite_images(self) -> tuple[list[str], np.ndarray]:
        """(ids, images) of the finite samples only: what gets embedded."""
        m = self.finite_mask
        return [i for i, ok in zip(self.ids, m) if ok], self.images[m]

    def to_imageset(self):
        """The finite samples as a ``diffaudit.data.ImageSet`` (ids ``sample_00012``)."""
        from .data import ImageSet

        ids, imgs = self.finite_images()
        return ImageSet.from_arrays(imgs, ids=ids)


def _config_get(obj: Any, key: str, default=None):
    cfg = getattr(obj, "config", None)
    if cfg is not None:
        if isinstance(cfg, dict) and key in cfg:
            return cfg[key]
        if hasattr(cfg, key):
            return getattr(cfg, key)
    return getattr(obj, key, default)


def _is_pipeline(obj: Any) -> bool:
    import torch

    return (not isinstance(obj, torch.nn.Module)) and hasattr(obj, "unet") and callable(obj)


def _is_text_pipeline(obj: Any) -> bool:
    return _is_pipeline(obj) and (getattr(obj, "text_encoder", None) is not None or getattr(obj, "tokenizer", None) is not None)


def _is_loader(obj: Any) -> bool:
    """A zero-argument callable that returns the model (not a module, not a pipeline, not ``f(x, t)``)."""
    import torch

    if isinstance(obj, torch.nn.Module) or _is_pipeline(obj) or not callable(obj):
        return False
    try:
        params = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):
        return False
    return not any(p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)


def _model_output(out: Any):
    import torch

    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)):
        return out[0]
    if isinstance(out, torch.Tensor):
        return out
    raise TypeError(f"model output: expected a tensor, a tuple or an object with .sample, got {type(out).__name__}")


def _accepts(fn: Callable, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind == p.VAR_KEYWORD for p in params.values())


#: caption fields looked for when no column is named (diffusers' scripts default to ``text``)
CAPTION_KEYS = ("prompt", "text", "caption")


def caption_metadata(folder: Union[str, os.PathLike]) -> Optional[Path]:
    """The caption file of a Hugging Face image folder (``metadata.jsonl`` or ``metadata.csv``), or None."""
    for name in ("metadata.jsonl", "metadata.csv"):
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    return None


def read_captions(folder: Union[str, os.PathLike], column: Optional[str] = None) -> dict[str, str]:
    """``{image id: caption}`` of an image folder with a ``metadata.jsonl`` / ``metadata.csv`` (``file_name`` plus a
    caption column: ``column``, else the first of ``prompt``, ``text``, ``caption``), the layout diffusers'
    text-to-image scripts train from. Ids are the POSIX paths relative to the folder, as in ``ImageSet``."""
    meta = caption_metadata(folder)
    if meta is None:
        raise FileNotFoundError(f"{str(folder)!r}: no metadata.jsonl or metadata.csv with captions in that folder")
    rows = _metadata_rows(meta)
    out: dict[str, str] = {}
    for n, row in enumerate(rows):
        name = row.get("file_name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{meta}: row {n + 1} has no file_name")
        out[Path(name).as_posix()] = _pick_caption(row, column, f"{meta}: row {n + 1}")
    return out


def _metadata_rows(path: Path) -> list[dict]:
    if path.suffix == ".csv":
        import csv

        with open(path, newline="", encoding="utf-8") as fh:
            return list(csv.DictReader(fh))
    rows = []
    for n, ln in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if ln.strip():
            try:
                obj = json.loads(ln)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n + 1}: not JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{n + 1}: expected a JSON object per line")
            rows.append(obj)
    return rows


def _pick_caption(obj: Any, column: Optional[str], where: str) -> str:
    keys = [column] if column else list(CAPTION_KEYS)
    if isinstance(obj, str) and not column:
        return obj
    if isinstance(obj, dict):
        for k in keys:
            if k in obj and isinstance(obj[k], str):
                return obj[k]
        if column:
            raise ValueError(f"{where}: no caption column {column!r} (columns: {', '.join(map(str, obj))[:200]})")
    raise ValueError(f"{where}: no prompt field (looked for {keys})")


def read_prompts(path: Union[str, os.PathLike], column: Optional[str] = None) -> list[str]:
    """Prompts from a file: ``.txt`` (one per line; blank lines and ``#`` comments skipped), ``.jsonl`` / ``.json``
    (objects with a ``prompt``, ``text`` or ``caption`` field -- or ``column`` --, or plain strings) or ``.csv`` (that
    column); or from a folder: an image folder's ``metadata.jsonl`` / ``metadata.csv`` (its captions, in file order),
    or a Hugging Face dataset saved with ``save_to_disk`` (its ``column``, default ``text``)."""
    p = Path(path)
    if p.is_dir():
        meta = caption_metadata(p)
        if meta is not None:
            return read_prompts(meta, column)
        if (p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file():
            return _dataset_prompts(p, column or "text")
        raise FileNotFoundError(f"prompts={str(p)!r}: a folder without metadata.jsonl / metadata.csv and not a "
                                "saved Hugging Face dataset")
    if not p.is_file():
        raise FileNotFoundError(f"prompts file {str(p)!r} does not exist")

    def pick(obj: Any, where: str) -> str:
        return _pick_caption(obj, column, where)

    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        lines = [ln for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
        out = [pick(json.loads(ln), f"{p}:{n + 1}") for n, ln in enumerate(lines)]
    elif suffix == ".json":
        data = json.loads(p.read_text(encoding="utf-8"))
        if not isinstance(data, list):
            raise ValueError(f"prompts file {str(p)!r}: expected a JSON list")
        out = [pick(o, f"{p}[{n}]") for n, o in enumerate(data)]
    elif suffix == ".csv":
        import csv

        with open(p, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        out = [pick(r, f"{p}:{n + 2}") for n, r in enumerate(rows)]
    else:
        out = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines()]
        out = [ln for ln in out if ln and not ln.startswith("#")]
    if not out:
        raise ValueError(f"prompts file {str(p)!r} holds no prompts")
    return out


def _dataset_prompts(folder: Path, column: str) -> list[str]:
    try:
        import datasets
    except ImportError:  # pragma: no cover - optional extra
        raise ModuleNotFoundError(f"prompts={str(folder)!r} is a saved Hugging Face dataset; reading it needs "
                                  'datasets: pip install "diffaudit[hf]"') from None
    ds = datasets.load_from_disk(str(folder))
    if isinstance(ds, datasets.DatasetDict):
        split = "train" if "train" in ds else next(iter(ds))
        ds = ds[split]
    if column not in ds.column_names:
        raise ValueError(f"prompts={str(folder)!r}: no caption column {column!r} (columns: {', '.join(ds.column_names)}); "
                         "pass --caption-column")
    out = [str(v) for v in ds[column]]
    if not out:
        raise ValueError(f"prompts={str(folder)!r}: the dataset holds no rows")
    return out


def _prompts_used(num_prompts: int, num_samples: int, seeds_per_prompt: int) -> int:
    return min(num_prompts, -(-num_samples // seeds_per_prompt))


class CheckpointSampler:
    """Draws ``num_samples`` samples from a checkpoint with per-sample noise fixed across checkpoints.

    ``scheduler``: the run's noise scheduler (a diffusers scheduler, or anything
    ``diffaudit.checkpoints.load_scheduler`` takes: a path, a config dict, a name such as ``"ddpm"``, or a
    ``CheckpointRun``); may be None for pipelines (their own scheduler is used). ``num_samples``: total samples; for
    text-conditional sampling None means ``len(prompts) * seeds_per_prompt``. Sample ``i`` uses prompt
    ``prompts[(i // seeds_per_prompt) % len(prompts)]``. ``image_size`` / ``channels`` override the model's
    ``config.sample_size`` / ``config.in_channels`` (needed for models without a config); for pipelines
    ``image_size`` is in pixels. ``device`` defaults to CUDA when available; the model is moved there.
    """

    def __init__(
        self,
        scheduler: Any,
        num_samples: Optional[int],
        *,
        seed: int = 0,
        num_inference_steps: Optional[int] = 50,
        sampler: str = "ddim",
        batch_size: int = 64,
        eta: float = 0.0,
        device: Any = None,
        image_size: Optional[Union[int, tuple[int, int]]] = None,
        channels: Optional[int] = None,
        prompts: Optional[Sequence[str]] = None,
        seeds_per_prompt: int = 1,
        guidance_scale: float = 7.5,
        negative_prompt: Optional[str] = None,
        dtype: Any = None,
        progress: bool = False,
    ) -> None:
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler={sampler!r}: allowed values are {', '.join(map(repr, SAMPLERS))}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size={batch_size}: must be >= 1")
        if num_inference_steps is not None and int(num_inference_steps) < 1:
            raise ValueError(f"num_inference_steps={num_inference_steps}: must be >= 1 (or None: full schedule)")
        if eta < 0:
            raise ValueError(f"eta={eta}: must be >= 0")
        if int(seeds_per_prompt) < 1:
            raise ValueError(f"seeds_per_prompt={seeds_per_prompt}: must be >= 1")
        if prompts is not None:
            if isinstance(prompts, str):
                raise ValueError("prompts: expected a list of strings (use read_prompts(path) for a file)")
            prompts = [str(p) for p in prompts]
            if not prompts:
                raise ValueError("prompts=[]: give at least one prompt, or None for unconditional sampling")
            if num_samples is None:
                num_samples = len(prompts) * int(seeds_per_prompt)
        if num_samples is None or int(num_samples) < 1:
            raise ValueError(f"num_samples={num_samples}: must be >= 1")
        if prompts is not None:
            used = _prompts_used(len(prompts), int(num_samples), int(seeds_per_prompt))
            if used < len(prompts):  # never silently: say how many captions are sampled
                log.warning("sampling %d of %d prompts (num_samples=%d / seeds_per_prompt=%d); the first %d are used "
                            "-- pass num_samples=%d to cover every prompt", used, len(prompts), int(num_samples),
                            int(seeds_per_prompt), used, len(prompts) * int(seeds_per_prompt))
        if hasattr(scheduler, "checkpoints") and hasattr(scheduler, "scheduler"):  # a CheckpointRun
            scheduler = scheduler.scheduler
        if scheduler is not None:
            from diffusers.schedulers.scheduling_utils import SchedulerMixin

            if not isinstance(scheduler, SchedulerMixin):
                from .checkpoints import load_scheduler

                scheduler = load_scheduler(scheduler)
        self.scheduler = scheduler
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.num_inference_steps = None if num_inference_steps is None else int(num_inference_steps)
        self.sampler = sampler
        self.batch_size = int(batch_size)
        self.eta = float(eta)
        self.device = device
        self.image_size = image_size
        self.channels = channels
        self.prompts = prompts
        self.seeds_per_prompt = int(seeds_per_prompt)
        self.guidance_scale = float(guidance_scale)
        self.negative_prompt = negative_prompt
        self.dtype = dtype
        self.progress = progress

    # ------------------------------------------------------------------------------------------------------------
    def describe(self) -> dict:
        """Sampler settings for provenance (``Provenance.sampler``) and for the resume fingerprint."""
        d = {
            "sampler": self.sampler,
            "num_samples": self.num_samples,
            "seed": self.seed,
            "num_inference_steps": self.num_inference_steps,
            "eta": self.eta,
            "noise": "per-sample torch.Generator(sha256('diffaudit:<seed>:<i>'))",
            "scheduler": type(self.scheduler).__name__ if self.scheduler is not None else None,
            "image_size": self.image_size,
            "channels": self.channels,
            "dtype": None if self.dtype is None else str(self.dtype).replace("torch.", ""),
            "device": self._device().type,
        }
        if self.prompts is not None:
            d.update(
                prompts_sha256=hashlib.sha256("\n".join(self.prompts).encode()).hexdigest(),
                num_prompts=len(self.prompts), seeds_per_prompt=self.seeds_per_prompt,
                guidance_scale=self.guidance_scale, negative_prompt=self.negative_prompt,
            )
        return d

    def fingerprint(self) -> str:
        """sha256 of :meth:`describe`: saved samples are reused only under the same settings."""
        return hashlib.sha256(json.dumps(self.describe(), sort_keys=True, default=str).encode()).hexdigest()

    def prompts_used(self) -> int:
        """How many distinct prompts the ``num_samples`` samples cover (0 without prompts)."""
        return 0 if self.prompts is None else _prompts_used(len(self.prompts), self.num_samples, self.seeds_per_prompt)

    def prompt_for(self, index: int) -> Optional[str]:
        if self.prompts is None:
            return None
        return self.prompts[(int(index) // self.seeds_per_prompt) % len(self.prompts)]

    def _device(self):
        import torch

        if self.device is not None:
            return torch.device(self.device)
        from ._util import default_device

        return torch.device(default_device())

    def _make_scheduler(self, base):
        from diffusers import DDIMScheduler, DDPMScheduler

        if base is None:
            raise ValueError(
                "scheduler=None: an unconditional model needs the run's noise scheduler (a diffusers scheduler, a "
                "path to scheduler_config.json, or a name such as 'ddpm')"
            )
        if self.sampler == "ddim":
            return DDIMScheduler.from_config(base.config)
        if self.sampler == "ddpm":
            return DDPMScheduler.from_config(base.config)
        return type(base).from_config(base.config)

    def _progress(self, total: int, label: str):
        if not self.progress:
            return nullcontext(None)
        from ._progress import progress

        class _P:
            def __enter__(s):
                s.p = progress(transient=True)
                s.p.__enter__()
                s.task = s.p.add_task(label, total=total)
                return s

            def __exit__(s, *exc):
                return s.p.__exit__(*exc)

            def advance(s, n):
                s.p.advance(s.task, n)

        return _P()

    # ------------------------------------------------------------------------------------------------------------
    def sample(self, model_or_pipeline: Any, indices: Optional[Sequence[int]] = None) -> SampleBatch:
        """Generate samples ``indices`` (default ``range(num_samples)``) with ``model_or_pipeline``."""
        idx = np.arange(self.num_samples) if indices is None else np.asarray(list(indices), dtype=np.int64)
        if _is_text_pipeline(model_or_pipeline) or (self.prompts is not None and _is_pipeline(model_or_pipeline)):
            if self.prompts is None:
                raise ValueError("prompts=None: a text-conditional pipeline needs prompts (read_prompts(path) reads a file)")
            return self._sample_text(model_or_pipeline, idx)
        if self.prompts is not None:
            raise ValueError(
                f"prompts given but the model ({type(model_or_pipeline).__name__}) is not a text-conditional pipeline"
            )
        model, sched_base = model_or_pipeline, self.scheduler
        if _is_pipeline(model_or_pipeline):
            model = model_or_pipeline.unet
            sched_base = self.scheduler or getattr(model_or_pipeline, "scheduler", None)
        return self._sample_unconditional(model, sched_base, idx)

    def _geometry(self, model) -> tuple[int, int, int]:
        size = self.image_size if self.image_size is not None else _config_get(model, "sample_size")
        c = self.channels if self.channels is not None else _config_get(model, "in_channels")
        if size is None or c is None:
            raise ValueError(
                f"model {type(model).__name__} has no config.sample_size / config.in_channels; pass image_size= and channels="
            )
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return int(c), int(h), int(w)

    def _sample_unconditional(self, model, sched_base, idx: np.ndarray) -> SampleBatch:
        import torch

        device = self._device()
        c, h, w = self._geometry(model)
        params = None
        if isinstance(model, torch.nn.Module):
            params = next(iter(model.parameters()), None)
            if self.dtype is not None and params is not None and params.dtype != self.dtype:
                model = model.to(dtype=self.dtype)
            model = model.to(device)
            model.eval()
        dtype = self.dtype or (params.dtype if params is not None else torch.float32)
        sched = self._make_scheduler(sched_base)
        steps = self.num_inference_steps or int(sched.config.num_train_timesteps)
        step_kw_names = set(inspect.signature(sched.step).parameters)
        images, finite = [], []
        with self._progress(len(idx), "sampling") as bar, torch.inference_mode():
            for start in range(0, len(idx), self.batch_size):
                bidx = idx[start : start + self.batch_size]
                gens = sample_generators(self.seed, bidx)
                x = initial_noise(self.seed, bidx, (c, h, w), generators=gens).to(device=device, dtype=dtype)
                sched.set_timesteps(steps, device=device)
                x = x * sched.init_noise_sigma
                for t in sched.timesteps:
                    xin = sched.scale_model_input(x, t)
                    out = _model_output(model(xin, t))
                    if out.shape[1] == 2 * x.shape[1] and getattr(sched.config, "variance_type", None) not in (
                        "learned", "learned_range"):
                        out = out[:, : x.shape[1]]  # learned-variance UNet sampled with a fixed-variance sampler
                    kw: dict = {}
                    if "eta" in step_kw_names:
                        kw["eta"] = self.eta
                    if "generator" in step_kw_names:
                        kw["generator"] = gens
                    x = sched.step(out, t, x, **kw).prev_sample
                u8, ok = to_uint8(x.float().cpu().numpy())
                images.append(u8)
                finite.append(ok)
                if bar is not None:
                    bar.advance(len(bidx))
        return self._batch(idx, images, finite, (h, w))

    def _sample_text(self, pipe, idx: np.ndarray) -> SampleBatch:
        import torch

        device = self._device()
        unet = pipe.unet
        c = self.channels or _config_get(unet, "in_channels")
        vsf = int(getattr(pipe, "vae_scale_factor", 8) or 8)
        if self.image_size is not None:
            ph, pw = (self.image_size, self.image_size) if isinstance(self.image_size, int) else self.image_size
            lh, lw = int(ph) // vsf, int(pw) // vsf
        else:
            s = _config_get(unet, "sample_size")
            lh, lw = (s, s) if isinstance(s, int) else tuple(s)
        if c is None or lh is None:
            raise ValueError("pipeline.unet has no config.in_channels / sample_size; pass channels= and image_size=")
        params = next(iter(unet.parameters()), None) if isinstance(unet, torch.nn.Module) else None
        dtype = self.dtype or (params.dtype if params is not None else torch.float32)
        if hasattr(pipe, "to") and isinstance(getattr(pipe, "unet", None), torch.nn.Module):
            pipe = pipe.to(device)
        old_sched = getattr(pipe, "scheduler", None)
        if self.sampler != "run" or self.scheduler is not None:
            pipe.scheduler = self._make_scheduler(self.scheduler or old_sched)
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=True)
        call = pipe.__call__
        images, finite = [], []
        prompts_out: list[str] = []
        try:
            with self._progress(len(idx), "sampling") as bar, torch.inference_mode():
                for start in range(0, len(idx), self.batch_size):
                    bidx = idx[start : start + self.batch_size]
                    gens = sample_generators(self.seed, bidx)
                    latents = initial_noise(self.seed, bidx, (int(c), int(lh), int(lw)), generators=gens)
                    prompts = [self.prompt_for(i) for i in bidx]
                    kw: dict = dict(prompt=prompts, latents=latents.to(device=device, dtype=dtype),
                                    num_inference_steps=self.num_inference_steps or 50, output_type="np")
                    for k, v in (("generator", gens), ("guidance_scale", self.guidance_scale), ("eta", self.eta),
                                 ("height", int(lh) * vsf), ("width", int(lw) * vsf)):
                        if _accepts(call, k):
                            kw[k] = v
                    if self.negative_prompt is not None and _accepts(call, "negative_prompt"):
                        kw["negative_prompt"] = [self.negative_prompt] * len(bidx)
                    out = pipe(**kw)
                    imgs = out.images if hasattr(out, "images") else out[0]
                    if isinstance(imgs, torch.Tensor):
                        imgs = imgs.float().cpu().numpy()
                    if isinstance(imgs, list):
                        imgs = np.stack([np.asarray(im, dtype=np.float32) / (255.0 if np.asarray(im).dtype == np.uint8 else 1.0)
                                         for im in imgs])
                    u8, ok = to_uint8(np.asarray(imgs, dtype=np.float32), layout="NHWC", value_range=(0.0, 1.0))
                    if len(u8) != len(bidx):
                        raise RuntimeError(f"pipeline returned {len(u8)} images for {len(bidx)} prompts")
                    images.append(u8)
                    finite.append(ok)
                    prompts_out += prompts
                    if bar is not None:
                        bar.advance(len(bidx))
        finally:
            if old_sched is not None:
                pipe.scheduler = old_sched
        batch = self._batch(idx, images, finite, None)
        batch.prompts = prompts_out
        return batch

    def _batch(self, idx, images, finite, hw) -> SampleBatch:
        if images:
            imgs, ok = np.concatenate(images), np.concatenate(finite)
        else:
            h, w = hw or (0, 0)
            imgs, ok = np.zeros((0, h, w, 3), np.uint8), np.zeros((0,), bool)
        n_bad = int((~ok).sum())
        if n_bad:
            log.warning("%d of %d samples contain NaN/inf; they are zero-filled and excluded", n_bad, len(ok))
        return SampleBatch(
            images=imgs, finite_mask=ok, indices=np.asarray(idx, dtype=np.int64),
            seeds=np.asarray([sample_seed(self.seed, int(i)) for i in idx], dtype=np.int64),
            meta={"fingerprint": self.fingerprint(), **self.describe()},
        )

    # ------------------------------------------------------------------------------------------------------------
    def sample_or_load(
        self, model_or_loader: Any, folder: Union[str, os.PathLike], step: int, *, checkpoint_id: Optional[str] = None
    ) -> SampleBatch:
        """Reuse samples saved for ``step`` under ``folder`` when complete and made with the same settings (and the
        same ``checkpoint_id``, e.g. ``diffaudit.checkpoints.checkpoint_hash(ckpt)``, when given), else sample and
        save them. ``model_or_loader`` may be a zero-argument callable returning the model, so the checkpoint is only
        loaded when needed."""
        fp = self.fingerprint()
        if checkpoint_id is not None:
            fp = hashlib.sha256(f"{fp}:{checkpoint_id}".encode()).hexdigest()
        got = load_saved_samples(folder, step, fingerprint=fp, num_samples=self.num_samples)
        if got is not None:
            log.info("step %s: reusing %d saved samples in %s", step, len(got), samples_dir(folder, step))
            return got
        model = model_or_loader() if _is_loader(model_or_loader) else model_or_loader
        batch = self.sample(model)
        batch.meta["fingerprint"] = fp
        if checkpoint_id is not None:
            batch.meta["checkpoint_id"] = checkpoint_id
        save_samples(batch, folder, step)
        return batch


# ----------------------------------------------------------------------------------------------------------------
# saving / resuming


def samples_dir(folder: Union[str, os.PathLike], step: int) -> Path:
    """Where :func:`save_samples` puts the samples of ``step``: ``folder/step-<step>/``."""
    return Path(folder) / f"step-{int(step)}"


def save_samples(batch: SampleBatch, folder: Union[str, os.PathLike], step: int) -> Path:
    """Write finite samples as ``step-<step>/sample_{i:05d}.png`` plus ``samples.json`` (written last, atomically:
    its presence marks the folder complete). Non-finite samples get no PNG; the manifest records them."""
    from PIL import Image

    from ._serial import atomic_write_text

    d = samples_dir(folder, step)
    d.mkdir(parents=True, exist_ok=True)
    man = d / MANIFEST
    if man.exists():
        man.unlink()  # the folder is being rewritten: not complete until the new manifest lands
    for name, img, ok in zip(batch.ids, batch.images, batch.finite_mask):
        if ok:
            tmp = d / f".{name}.png.tmp"
            Image.fromarray(img).save(tmp, format="PNG", compress_level=1)
            os.replace(tmp, d / f"{name}.png")
    manifest = {
        "step": int(step),
        "indices": [int(i) for i in batch.indices],
        "finite": [bool(b) for b in batch.finite_mask],
        "prompts": batch.prompts,
        "seeds": None if batch.seeds is None else [int(s) for s in batch.seeds],
        "shape": list(batch.images.shape),
        "fingerprint": batch.meta.get("fingerprint"),
        "meta": batch.meta,
    }
    atomic_write_text(man, json.dumps(manifest, default=str))
    return d


def load_saved_samples(
    folder: Union[str, os.PathLike], step: int, *, fingerprint: Optional[str] = None, num_samples: Optional[int] = None
) -> Optional[SampleBatch]:
    """The samples :func:`save_samples` wrote for ``step``, or None when missing, incomplete, or made with other
    settings (``fingerprint`` differs) or another sample count."""
    from PIL import Image

    d = samples_dir(folder, step)
    man = d / MANIFEST
    if not man.is_file():
        return None
    try:
        m = json.loads(man.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        log.warning("ignoring unreadable %s: %s", man, e)
        return None
    if fingerprint is not None and m.get("fingerprint") != fingerprint:
        log.info("saved samples in %s were made with other settings; resampling", d)
        return None
    idx = np.asarray(m["indices"], dtype=np.int64)
    if num_samples is not None and len(idx) != int(num_samples):
        return None
    ok = np.asarray(m["finite"], dtype=bool)
    n, h, w, _ = m["shape"]
    imgs = np.zeros((n, h, w, 3), np.uint8)
    for k, (i, good) in enumerate(zip(idx, ok)):
        if not good:
            continue
        p = d / f"sample_{int(i):05d}.png"
        try:
            with Image.open(p) as im:
                arr = np.asarray(im.convert("RGB"))
        except OSError as e:
            log.warning("saved sample %s unreadable (%s); resampling step %s", p, e, step)
            return None
        if arr.shape != (h, w, 3):
            return None
        imgs[k] = arr
    seeds = None if m.get("seeds") is None else np.asarray(m["seeds"], dtype=np.int64)
    return SampleBatch(images=imgs, finite_mask=ok, indices=idx, prompts=m.get("prompts"), seeds=seeds,
                       meta=m.get("meta") or {})
