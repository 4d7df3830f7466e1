"""Find, order and safely load the checkpoints of a diffusion training run.

What ``discover_checkpoints`` understands (all local; the Hugging Face hub is never contacted):

* **A diffusers training run folder** as the example scripts (``train_unconditional.py``,
  ``train_text_to_image.py``, ``train_text_to_image_lora.py``) write it with ``accelerator.save_state``:
  ``checkpoint-N/unet/`` (``config.json`` + ``diffusion_pytorch_model.safetensors``) and, when EMA was used,
  ``checkpoint-N/unet_ema/`` (written by ``EMAModel.save_pretrained``; its config carries extra EMA keys such as
  ``decay`` that are ignored). LoRA runs write ``checkpoint-N/pytorch_lora_weights.safetensors`` instead.
  The other files accelerate writes there (``optimizer.bin``, ``scheduler.bin``, ``random_states_0.pkl``) are
  pickles and are never opened.
* **The run root as a pipeline**: those scripts also save the final model at the root (``model_index.json``,
  ``unet/``, ``scheduler/``), or the final LoRA as ``pytorch_lora_weights.safetensors``. The final model's
  training step is not recorded anywhere, so it is named ``"final"``, flagged ``final=True`` and given
  ``step = last checkpoint step + 1`` (``0`` when the run has no ``checkpoint-N`` folders): it is ordered after
  every checkpoint. When its weights are byte-identical to the last checkpoint's (training ended on a
  checkpoint step) it is dropped as a duplicate. Pass ``include_final=False`` to leave it out.
* **A saved pipeline folder** (``model_index.json``) or a **UNet folder** (``config.json`` + weights) on its own.
* **An explicit list** of any of the above folders or of weight files. Steps come from ``checkpoint-N`` names, or
  the last group of digits in the folder/file name (``step_1500``, ``unet-000300.safetensors``); when a name has no
  digits or two names give the same step, the list order is used instead (steps 0, 1, 2, ...).
* **UNet weight files** (``*.safetensors``, or tensor-only ``*.bin``/``*.pt``) in a folder, with a UNet config given
  as ``unet_config=`` (a ``config.json`` path, a folder holding one, or a dict) or found as ``config.json`` next
  to them. The step is the last group of digits in the file name.
* **Text-to-image fine-tunes**: ``base_pipeline=`` a local Stable-Diffusion-style pipeline folder (text encoder,
  tokenizer, VAE) plus per-checkpoint UNets (``unet/``, ``unet_ema/``) or LoRA weights. When the run root is itself
  a full text-to-image pipeline it serves as the base.

Steps sort numerically (``checkpoint-1000`` comes after ``checkpoint-500``).

The noise scheduler (checkpoint folders carry none) is resolved in this order: the ``scheduler=`` argument (a
``SchedulerMixin``, a folder or ``scheduler_config.json`` path, a config dict, or a name: ``"ddpm"``,
``"ddim"``, ``"ddpm-cosine"``, ``"ddim-cosine"`` with diffusers' default 1000-step schedules), the run root's
``scheduler/scheduler_config.json`` (or a root ``scheduler_config.json``), the parent run of a lone
``checkpoint-N`` folder, a pipeline among the checkpoints, then ``base_pipeline``'s scheduler. Otherwise a
``CheckpointError`` explains how to pass one.

Weights load only from safetensors or with ``torch.load(weights_only=True)``: a pickle carrying anything but
tensors is refused (:class:`UnsafeCheckpointError`) before any of its code can run. Tensors whose names, shapes or
dtypes do not fit the model's config are reported by name.
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping, Optional, Sequence, Union

from ._serial import JsonMixin
from ._util import default_device, file_sha256
from .results import Skipped

log = logging.getLogger(__name__)

Kind = Literal["unet-folder", "pipeline", "safetensors", "lora"]
EmaChoice = Literal["prefer", "only", "never"]

PathLike = Union[str, os.PathLike]

#: file names diffusers' LoRA training scripts write (``save_lora_weights``)
LORA_WEIGHT_NAMES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
#: a checkpoint folder of the diffusers / accelerate training scripts: checkpoint-<step> (or checkpoint_<step>)
CHECKPOINT_DIR_RE = re.compile(r"^checkpoint[-_](\d+)$")
_DIGITS_RE = re.compile(r"(\d+)")
_SCHEDULER_NAMES = {
    "ddpm": ("DDPMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "ddpm-cosine": ("DDPMScheduler", {"beta_schedule": "squaredcos_cap_v2"}),
    "ddim-cosine": ("DDIMScheduler", {"beta_schedule": "squaredcos_cap_v2"}),
}


class CheckpointError(ValueError):
    """A checkpoint (or a run folder) cannot be discovered or loaded; the message says why and what to do."""


class MissingBasePipelineError(CheckpointError):
    """A text-conditional checkpoint (UNet2DConditionModel or LoRA) without a base pipeline to load it into."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle weight file holds Python objects other than tensors; it was refused without running any of it."""


# ----------------------------------------------------------------------------------------------------------------
# data classes


@dataclass
class Checkpoint(JsonMixin):
    """One model state of a run.

    ``path`` is what the user sees (the ``checkpoint-N`` folder, the pipeline folder, the weight file);
    ``unet_path`` is what gets loaded: a UNet folder (``config.json`` + weights) or, for ``kind="safetensors"``, a
    weight file whose config is ``config_path``; for ``kind="lora"`` it is the LoRA weight file.
    ``weights`` lists the weight files hashed for provenance.
    """

    step: int
    path: str
    kind: str  # "unet-folder" | "pipeline" | "safetensors" | "lora"
    unet_path: str
    ema: bool = False
    name: str = ""
    config_path: Optional[str] = None
    weights: list[str] = field(default_factory=list)
    final: bool = False
    conditional: bool = False  # text-conditional (UNet2DConditionModel / LoRA): needs a base pipeline

    def __post_init__(self) -> None:
        if not self.name:
            self.name = Path(self.path).name


@dataclass
class CheckpointRun:
    """The ordered checkpoints of a run plus what is needed to sample from them.

    ``scheduler`` is a fresh diffusers scheduler object (the run's training noise schedule); ``scheduler_source``
    says where it came from (a path, ``"name:ddpm"``, ``"object:DDPMScheduler"``). ``base_pipeline`` is the
    local pipeline folder text-conditional checkpoints are loaded into. ``skipped`` lists folders that looked like
    checkpoints but were left out, with the reason.
    """

    root: str
    checkpoints: list[Checkpoint]
    scheduler: Any = None
    scheduler_source: str = ""
    base_pipeline: Optional[str] = None
    skipped: list[Skipped] = field(default_factory=list)
    _pipe: Any = field(default=None, repr=False, compare=False)
    _pipe_key: Any = field(default=None, repr=False, compare=False)
    _base_unet: Any = field(default=None, repr=False, compare=False)
    _lora_loaded: bool = field(default=False, repr=False, compare=False)
    _base_hash: Optional[str] = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.checkpoints)

    def __iter__(self) -> Iterator[Checkpoint]:
        return iter(self.checkpoints)

    def __getitem__(self, i: int) -> Checkpoint:
        return self.checkpoints[i]

    @property
    def steps(self) -> list[int]:
        return [c.step for c in self.checkpoints]

    @property
    def conditional(self) -> bool:
        return any(c.conditional for c in self.checkpoints)

    def new_scheduler(self):
        """A fresh copy of the run's scheduler (samplers mutate scheduler state)."""
        if self.scheduler is None:
            return None
        return type(self.scheduler).from_config(self.scheduler.config)

    def base_pipeline_hash(self) -> Optional[str]:
        """:func:`pipeline_hash` of ``base_pipeline`` (None without one); computed once per run object."""
        if self.base_pipeline is None:
            return None
        if self._base_hash is None:
            self._base_hash = pipeline_hash(self.base_pipeline)
        return self._base_hash

    def checkpoint_files(self) -> dict[str, str]:
        """``{weight file path: sha256}`` over every checkpoint, for ``Provenance.checkpoint_files``."""
        out: dict[str, str] = {}
        for c in self.checkpoints:
            out.update(checkpoint_files(c))
        return out

    def load(self, checkpoint: Checkpoint, device=None, dtype=None):
        """The model to sample from: a UNet for unconditional checkpoints, a pipeline for text-conditional ones.

        Text-conditional checkpoints reuse one base pipeline (loaded once, cached on this object): a UNet checkpoint
        replaces its ``unet``; a LoRA checkpoint is loaded with ``pipe.load_lora_weights`` onto the base UNet
        (the previous LoRA is unloaded first).
        """
        import torch

        if not checkpoint.conditional:
            return load_unet(checkpoint, device=device, dtype=dtype)
        if self.base_pipeline is None:
            raise CheckpointError(
                f"checkpoint '{checkpoint.path}' is text-conditional; pass base_pipeline= a local pipeline folder "
                "(with text_encoder, tokenizer, vae) to discover_checkpoints"
            )
        device = device or default_device()
        dtype = dtype or torch.float32
        key = (str(device), dtype)
        if self._pipe is None or self._pipe_key != key:
            self._pipe = load_pipeline(self.base_pipeline, device=device, dtype=dtype)
            self._pipe_key = key
            self._base_unet = self._pipe.unet
            self._lora_loaded = False
        pipe = self._pipe
        if self._lora_loaded:
            pipe.unload_lora_weights()
            self._lora_loaded = False
        if checkpoint.kind == "lora":
            pipe.unet = self._base_unet
            lora = Path(checkpoint.unet_path)
            if lora.suffix != ".safetensors":
                _torch_load_tensors(lora)  # refuses code payloads before diffusers opens the file
            try:
                with quiet_loading():
                    pipe.load_lora_weights(str(lora.parent), weight_name=lora.name, local_files_only=True)
            except (ImportError, ModuleNotFoundError) as e:  # pragma: no cover - depends on peft
                raise ModuleNotFoundError(f"loading LoRA checkpoint '{lora}' needs peft: pip install peft ({e})") from e
            self._lora_loaded = True
        else:
            pipe.unet = load_unet(checkpoint, device=device, dtype=dtype)
        return pipe


# ----------------------------------------------------------------------------------------------------------------
# hashing


def checkpoint_files(ckpt: Checkpoint) -> dict[str, str]:
    """``{weight file: sha256}`` of one checkpoint."""
    return {w: file_sha256(w) for w in ckpt.weights}


def checkpoint_hash(ckpt: Checkpoint) -> str:
    """sha256 identifying a checkpoint's weights: the file's sha256 when it has one weight file, else the sha256
    of the sorted ``"<file name> <sha256>"`` lines of its shards."""
    files = checkpoint_files(ckpt)
    if len(files) == 1:
        return next(iter(files.values()))
    lines = "".join(f"{Path(p).name} {h}\n" for p, h in sorted(files.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# small helpers



def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read JSON file '{path}': {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"'{path}' must hold a JSON object, got {type(data).__name__}")
    return data


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t.lower() for t in _DIGITS_RE.split(name)]


def parse_step(name: str) -> Optional[int]:
    """Training step from a folder or file name: ``checkpoint-N`` -> N, else the last group of digits, else None."""
    stem = name
    for suf in _WEIGHT_SUFFIXES:
        if stem.endswith(suf):
            stem = stem[: -len(suf)]
    m = CHECKPOINT_DIR_RE.match(stem)
    if m:
        return int(m.group(1))
    digits = _DIGITS_RE.findall(stem)
    return int(digits[-1]) if digits else None


def unet_weight_files(folder: PathLike) -> list[str]:
    """The weight files of a diffusers model folder, in diffusers' order of preference: single safetensors,
    sharded safetensors (index), variant safetensors (e.g. fp16), then the same for ``.bin``; [] when none."""
    folder = Path(folder)
    base = "diffusion_pytorch_model"
    for ext in (".safetensors", ".bin"):
        single = folder / f"{base}{ext}"
        if single.is_file():
            return [str(single)]
        index = folder / f"{base}{ext}.index.json"
        if index.is_file():
            wm = _read_json(index).get("weight_map", {})
            if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
                raise CheckpointError(f"sharded weights in '{folder}': {index.name} must have a 'weight_map' object "
                                      f"mapping tensor names to shard file names (got {type(wm).__name__})")
            shards = sorted(set(wm.values()))
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise CheckpointError(f"sharded weights in '{folder}': shard files {missing} listed in {index.name} are missing")
            return [str(folder / s) for s in shards]
        variants = sorted(folder.glob(f"{base}.*{ext}"))
        variants = [v for v in variants if v.name.count(".") == 2]  # diffusion_pytorch_model.fp16.safetensors
        if variants:
            return [str(variants[0])]
    others = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix == ".safetensors")
    if len(others) == 1:
        return [str(others[0])]
    others = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".bin", ".pt", ".pth"))
    if len(others) == 1:
        return [str(others[0])]
    return []


def _is_unet_folder(folder: Path) -> bool:
    return (folder / "config.json").is_file() and bool(unet_weight_files(folder))


def _is_pipeline(folder: Path) -> bool:
    return (folder / "model_index.json").is_file()


def _model_class_name(config_path: Path) -> str:
    return str(_read_json(config_path).get("_class_name", "UNet2DModel"))


#: denoiser model classes a checkpoint may hold -> whether they are text-conditional
DENOISER_CLASSES = {"UNet2DModel": False, "UNet2DConditionModel": True}


def _is_conditional_class(name: str, where: str = "checkpoint") -> bool:
    if name not in DENOISER_CLASSES:
        raise CheckpointError(f"{where}: _class_name {name!r} is not a denoiser this tool samples (expected "
                              f"{' or '.join(DENOISER_CLASSES)}); point at the UNet's folder, not the {name}'s")
    return DENOISER_CLASSES[name]


def _pipeline_is_text(folder: Path) -> bool:
    idx = _read_json(folder / "model_index.json")
    return "text_encoder" in idx or "tokenizer" in idx


# ----------------------------------------------------------------------------------------------------------------
# scheduler resolution


def load_scheduler(spec: Any):
    """See :func:`load_scheduler_with_source`; returns only the scheduler."""
    return load_scheduler_with_source(spec)[0]


def load_scheduler_with_source(spec: Any):
    """(scheduler, source) from a ``SchedulerMixin`` (copied), a folder holding ``scheduler_config.json`` (or a
    ``scheduler/`` subfolder), a ``scheduler_config.json`` path, a config dict with ``_class_name``, or a name:
    ``"ddpm"``, ``"ddim"``, ``"ddpm-cosine"``, ``"ddim-cosine"`` (diffusers defaults: 1000 training steps; linear
    betas 1e-4..0.02, or the cosine schedule). ``source`` is the config file read, ``"name:ddpm"``, ``"dict"`` or
    ``"object:<class>"``. Never touches the hub."""
    import diffusers
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

    if isinstance(spec, SchedulerMixin):
        return type(spec).from_config(spec.config), f"object:{type(spec).__name__}"
    if isinstance(spec, Mapping):
        cfg = dict(spec)
        cls_name = cfg.get("_class_name", "DDPMScheduler")
        return _scheduler_class(cls_name, "scheduler config dict").from_config(cfg), "dict"
    if isinstance(spec, (str, os.PathLike)):
        s = str(spec)
        if s.lower() in _SCHEDULER_NAMES:
            cls_name, kw = _SCHEDULER_NAMES[s.lower()]
            return getattr(diffusers, cls_name)(**kw), f"name:{s.lower()}"
        p = Path(s)
        for cand in (p, p / "scheduler_config.json", p / "scheduler" / "scheduler_config.json"):
            if cand.is_file():
                cfg = _read_json(cand)
                cls = _scheduler_class(cfg.get("_class_name", "DDPMScheduler"), str(cand))
                return cls.from_config(cfg), str(cand)
        raise CheckpointError(
            f"scheduler={s!r}: not a scheduler name ({', '.join(sorted(_SCHEDULER_NAMES))}) and no "
            "scheduler_config.json found there (looked at the path, <path>/scheduler_config.json and "
            "<path>/scheduler/scheduler_config.json)"
        )
    raise CheckpointError(
        f"scheduler={spec!r}: expected a diffusers scheduler object, a path, a config dict or a name "
        f"({', '.join(sorted(_SCHEDULER_NAMES))})"
    )


def _scheduler_class(name: str, where: str):
    import diffusers
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

    cls = getattr(diffusers, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise CheckpointError(f"{where}: _class_name {name!r} is not a diffusers scheduler class")
    return cls


def _find_scheduler_config(folder: Path) -> Optional[Path]:
    for cand in (folder / "scheduler" / "scheduler_config.json", folder / "scheduler_config.json"):
        if cand.is_file():
            return cand
    return None


# ----------------------------------------------------------------------------------------------------------------
# discovery


def _resolve_unet_config(unet_config: Any, near: Optional[Path]) -> Optional[str]:
    """Where the UNet config of weight-file checkpoints comes from: a config.json path, or (for a dict given as
    ``unet_config=``) the dict itself serialised as ``"json:{...}"`` so a Checkpoint stays JSON-serialisable."""
    if unet_config is None:
        if near is not None and (near / "config.json").is_file():
            return str(near / "config.json")
        return None
    if isinstance(unet_config, Mapping):
        return "json:" + json.dumps(dict(unet_config))
    p = Path(unet_config)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise CheckpointError(f"unet_config={str(unet_config)!r}: no such config.json (give a file, a folder with config.json, or a dict)")
    return str(p)


def _load_config(config_path: str) -> dict:
    if config_path.startswith("json:"):
        return json.loads(config_path[5:])
    return _read_json(Path(config_path))


def _checkpoint_from_folder(
    folder: Path, ema: str, step: Optional[int], skipped: list[Skipped]
) -> Optional[Checkpoint]:
    """Resolve one checkpoint folder (checkpoint-N, a pipeline, a UNet folder, a LoRA folder)."""
    name = folder.name
    if _is_pipeline(folder):
        unet = folder / "unet"
        if not _is_unet_folder(unet):
            skipped.append(Skipped(str(folder), "pipeline folder without unet/ weights", "checkpoints"))
            return None
        return Checkpoint(
            step=step if step is not None else 0, path=str(folder), kind="pipeline", unet_path=str(unet),
            ema=False, name=name, weights=unet_weight_files(unet),
            conditional=_is_conditional_class(_model_class_name(unet / "config.json"), str(unet / "config.json")),
        )
    cands = []
    if ema != "never" and _is_unet_folder(folder / "unet_ema"):
        cands.append((folder / "unet_ema", True))
    if ema != "only" and _is_unet_folder(folder / "unet"):
        cands.append((folder / "unet", False))
    if ema == "only" and not cands:
        reason = "no unet_ema/ (ema='only')" if _is_unet_folder(folder / "unet") else "no unet_ema/ weights"
        skipped.append(Skipped(str(folder), reason, "checkpoints"))
        return None
    if cands:
        unet, is_ema = cands[0]
        return Checkpoint(
            step=step if step is not None else 0, path=str(folder), kind="unet-folder", unet_path=str(unet),
            ema=is_ema, name=name, weights=unet_weight_files(unet),
            conditional=_is_conditional_class(_model_class_name(unet / "config.json"), str(unet / "config.json")),
        )
    lora = lora_file(folder, skipped)
    if lora is not None:
        if ema == "only":
            skipped.append(Skipped(str(folder), "LoRA weights have no EMA copy (ema='only')", "checkpoints"))
            return None
        return Checkpoint(
            step=step if step is not None else 0, path=str(folder), kind="lora", unet_path=str(lora),
            name=name, weights=[str(lora)], conditional=True,
        )
    if _is_unet_folder(folder):
        if ema == "only":
            skipped.append(Skipped(str(folder), "plain UNet folder, not an EMA copy (ema='only')", "checkpoints"))
            return None
        return Checkpoint(
            step=step if step is not None else 0, path=str(folder), kind="unet-folder", unet_path=str(folder),
            name=name, weights=unet_weight_files(folder),
            conditional=_is_conditional_class(_model_class_name(folder / "config.json"),
                                             str(folder / "config.json")),
        )
    skipped.append(Skipped(str(folder), "no unet/, unet_ema/, LoRA weights, pipeline or UNet config+weights inside", "checkpoints"))
    return None


def is_lora_file(path: PathLike) -> bool:
    """A LoRA weight file: one of the names diffusers writes, or a ``.safetensors`` file whose tensor names hold
    ``lora`` (``save_lora_weights(weight_name=...)``, kohya-style files); only the header is read."""
    path = Path(path)
    if path.name in LORA_WEIGHT_NAMES:
        return True
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            keys = list(fh.keys())
    except Exception:  # not a readable safetensors file: not a LoRA (the loader reports it if it is used)
        return False
    return bool(keys) and any("lora" in k.lower() for k in keys)


def lora_file(folder: Path, skipped: Optional[list] = None) -> Optional[Path]:
    """The LoRA weight file of ``folder`` (diffusers' names first, else the one ``.safetensors`` file holding LoRA
    tensors); None when there is none, or (listed in ``skipped``) when several files qualify."""
    for lname in LORA_WEIGHT_NAMES:
        if (folder / lname).is_file():
            return folder / lname
    try:
        found = sorted(p for p in folder.iterdir() if p.suffix == ".safetensors" and is_lora_file(p))
    except OSError:
        return None
    if len(found) > 1:
        if skipped is not None:
            skipped.append(Skipped(str(folder), f"{len(found)} LoRA weight files ({', '.join(p.name for p in found[:4])}); "
                                   "pass the one to audit as RUN", "checkpoints"))
        return None
    return found[0] if found else None


def _checkpoint_from_file(path: Path, config: Optional[str], step: Optional[int]) -> Checkpoint:
    if is_lora_file(path):
        return Checkpoint(
            step=step if step is not None else 0, path=str(path), kind="lora", unet_path=str(path),
            name=path.name, weights=[str(path)], conditional=True,
        )
    if config is None:
        raise CheckpointError(
            f"weight file '{path}' needs its UNet config: pass unet_config= a config.json (or a folder with one, or "
            "a dict), or put config.json next to the weight files"
        )
    cls_name = str(_load_config(config).get("_class_name", "UNet2DModel"))
    return Checkpoint(
        step=step if step is not None else 0, path=str(path), kind="safetensors", unet_path=str(path),
        name=path.name, config_path=config, weights=[str(path)], conditional=_is_conditional_class(cls_name, f"unet_config for '{path}'"),
    )


def _assign_list_steps(items: list[tuple[Path, Optional[int]]], what: str) -> list[int]:
    steps = [s for _, s in items]
    if all(s is not None for s in steps) and len(set(steps)) == len(steps):
        return steps  # type: ignore[return-value]
    log.warning("%s: steps not readable from every name (or repeated); using the given order as steps 0..%d",
                what, len(items) - 1)
    return list(range(len(items)))


def discover_checkpoints(
    run: Union[PathLike, Sequence[PathLike]],
    *,
    ema: EmaChoice = "prefer",
    scheduler: Any = None,
    base_pipeline: Optional[PathLike] = None,
    unet_config: Any = None,
    include_final: bool = True,
    require_scheduler: bool = True,
) -> CheckpointRun:
    """Find the checkpoints of ``run`` and order them by training step (see the module docstring for layouts).

    ``ema``: ``"prefer"`` loads ``unet_ema/`` when a checkpoint has one, else ``unet/``; ``"only"`` keeps only
    checkpoints with ``unet_ema/`` (and drops the final root model, whose EMA status is unknown, unless it is all
    there is); ``"never"`` always loads ``unet/``.
    """
    if ema not in ("prefer", "only", "never"):
        raise CheckpointError(f"ema={ema!r}: allowed values are 'prefer', 'only', 'never'")
    skipped: list[Skipped] = []
    cks: list[Checkpoint] = []
    sched_dirs: list[Path] = []  # where to look for a scheduler, in order
    auto_base: Optional[Path] = None

    if isinstance(run, (str, os.PathLike)):
        root = Path(run)
        if not root.exists():
            raise CheckpointError(f"run={str(run)!r}: no such file or folder")
        root_str = str(root)
        if root.is_file():
            cfg = _resolve_unet_config(unet_config, root.parent)
            cks.append(_checkpoint_from_file(root, cfg, parse_step(root.name)))
            sched_dirs += [root.parent]
        else:
            sched_dirs.append(root)
            m = CHECKPOINT_DIR_RE.match(root.name)
            ck_dirs = sorted(
                (int(CHECKPOINT_DIR_RE.match(d.name).group(1)), d)  # type: ignore[union-attr]
                for d in root.iterdir() if d.is_dir() and CHECKPOINT_DIR_RE.match(d.name)
            )
            if m:  # a lone checkpoint-N folder of a run
                ck = _checkpoint_from_folder(root, ema, int(m.group(1)), skipped)
                if ck:
                    cks.append(ck)
                sched_dirs.append(root.parent)
                if _is_pipeline(root.parent) and _pipeline_is_text(root.parent):
                    auto_base = root.parent
            elif ck_dirs:
                for step, d in ck_dirs:
                    ck = _checkpoint_from_folder(d, ema, step, skipped)
                    if ck:
                        cks.append(ck)
                if include_final:
                    fin = _final_checkpoint(root, cks, ema, skipped)
                    if fin is not None:
                        cks.append(fin)
                if _is_pipeline(root) and _pipeline_is_text(root):
                    auto_base = root
            elif (_is_pipeline(root) or _is_unet_folder(root) or _has_lora(root)
                  or _is_unet_folder(root / "unet_ema") or _is_unet_folder(root / "unet")):
                # a lone model: its step is unknown (names like "ddpm-64" hold no step), so it is step 0
                ck = _checkpoint_from_folder(root, ema, None, skipped)
                if ck:
                    ck.step = 0
                    cks.append(ck)
                if _is_pipeline(root) and _pipeline_is_text(root):
                    auto_base = root
            else:
                files = sorted(
                    (p for p in root.iterdir() if p.is_file() and p.suffix in _WEIGHT_SUFFIXES),
                    key=lambda p: _natural_key(p.name),
                )
                if not files:
                    raise CheckpointError(
                        f"run={root_str!r}: found no checkpoints: expected checkpoint-N/ folders (diffusers "
                        "training scripts), a pipeline folder (model_index.json), a UNet folder (config.json + "
                        "diffusion_pytorch_model.safetensors), or UNet .safetensors files with unet_config="
                    )
                cfg = _resolve_unet_config(unet_config, root)
                items = [(p, parse_step(p.name)) for p in files]
                steps = _assign_list_steps(items, f"weight files in {root_str}")
                cks += [_checkpoint_from_file(p, cfg, s) for (p, _), s in zip(items, steps)]
    else:
        paths = [Path(p) for p in run]
        if not paths:
            raise CheckpointError("run=[]: the list of checkpoints is empty")
        root_str = os.path.commonpath([str(p.resolve()) for p in paths]) if len(paths) > 1 else str(paths[0])
        items = [(p, parse_step(p.name)) for p in paths]
        steps = _assign_list_steps(items, "checkpoint list")
        for (p, _), s in zip(items, steps):
            if not p.exists():
                raise CheckpointError(f"run list item {str(p)!r}: no such file or folder")
            if p.is_file():
                cks.append(_checkpoint_from_file(p, _resolve_unet_config(unet_config, p.parent), s))
                sched_dirs.append(p.parent)
            else:
                ck = _checkpoint_from_folder(p, ema, s, skipped)
                if ck:
                    cks.append(ck)
                sched_dirs += [p, p.parent]
                if _is_pipeline(p) and _pipeline_is_text(p) and auto_base is None:
                    auto_base = p

    if not cks:
        why = "; ".join(f"{s.path}: {s.reason}" for s in skipped[:5])
        raise CheckpointError(f"run={str(run)!r}: no loadable checkpoints found" + (f" ({why})" if why else ""))
    cks.sort(key=lambda c: c.step)
    for s in skipped:
        log.warning("skipped %s: %s", s.path, s.reason)

    base: Optional[str] = None
    if base_pipeline is not None:
        bp = Path(base_pipeline)
        if not _is_pipeline(bp):
            raise CheckpointError(
                f"base_pipeline={str(base_pipeline)!r}: not a local pipeline folder (no model_index.json); hub ids "
                "are not downloaded - download the pipeline first and pass its folder"
            )
        base = str(bp)
    elif auto_base is not None:
        base = str(auto_base)
    if base is None:
        needy = [c for c in cks if c.conditional]
        if needy:
            raise MissingBasePipelineError(
                f"checkpoint '{needy[0].path}' is text-conditional ({'LoRA weights' if needy[0].kind == 'lora' else 'UNet2DConditionModel'}); "
                "pass --base-pipeline DIR (base_pipeline=): the local Stable-Diffusion-style pipeline folder it was "
                "fine-tuned from (with text_encoder, tokenizer, vae)"
            )
    if base is not None:
        sched_dirs.append(Path(base))

    sched_obj, sched_src = None, ""
    if scheduler is not None:
        sched_obj, sched_src = load_scheduler_with_source(scheduler)
    else:
        for d in sched_dirs + [Path(c.path) for c in cks if c.kind == "pipeline"]:
            cfgp = _find_scheduler_config(d)
            if cfgp is not None:
                sched_obj, sched_src = load_scheduler(cfgp), str(cfgp)
                break
    if sched_obj is None and require_scheduler:
        raise CheckpointError(
            f"run={str(run)!r}: no noise scheduler found (checkpoint-N folders do not contain one; looked for "
            "scheduler/scheduler_config.json in the run folder, its parent and any pipeline). Pass scheduler= the "
            "training run's output folder or its scheduler/scheduler_config.json, or a name: 'ddpm' or 'ddim' "
            "(diffusers defaults: 1000 steps, linear betas 1e-4..0.02), 'ddpm-cosine' (CLI: --scheduler)"
        )
    log.info("discovered %d checkpoints in %s (scheduler: %s)", len(cks), root_str, sched_src or "none")
    return CheckpointRun(root=root_str, checkpoints=cks, scheduler=sched_obj, scheduler_source=sched_src,
                         base_pipeline=base, skipped=skipped)


def _has_lora(folder: Path) -> bool:
    return lora_file(folder) is not None


def _final_checkpoint(root: Path, cks: list[Checkpoint], ema: str, skipped: list[Skipped]) -> Optional[Checkpoint]:
    """The run root's own final model (pipeline, UNet folder or LoRA), ordered after every checkpoint."""
    if not (_is_pipeline(root) or _has_lora(root) or _is_unet_folder(root)):
        return None
    if ema == "only" and cks:
        skipped.append(Skipped(str(root), "final model at the run root: EMA status unknown (ema='only')", "checkpoints"))
        return None
    if ema == "never" and any(_is_unet_folder(Path(c.path) / "unet_ema") for c in cks):
        # the diffusers scripts save the EMA UNet as the final model when training keeps one: it does not belong on
        # a curve of the raw (non-EMA) weights
        skipped.append(Skipped(str(root), "final model at the run root holds the EMA weights (the checkpoints have "
                               "unet_ema/); left out with ema='never'", "checkpoints"))
        return None
    sub: list[Skipped] = []
    fin = _checkpoint_from_folder(root, "never" if ema == "only" else ema, None, sub)
    if fin is None:
        return None
    fin.final = True
    fin.name = "final"
    fin.step = (max(c.step for c in cks) + 1) if cks else 0
    if cks:
        last = max(cks, key=lambda c: c.step)
        try:
            same_size = [os.path.getsize(w) for w in last.weights] == [os.path.getsize(w) for w in fin.weights]
            if same_size and checkpoint_hash(last) == checkpoint_hash(fin):
                log.info("final model in %s is identical to %s; not listed twice", root, last.name)
                return None
        except OSError:
            pass
    return fin


# ----------------------------------------------------------------------------------------------------------------
# loading


def _torch_load_tensors(path: Path, unwrap: Sequence[str] = ()) -> dict:
    """``torch.load(weights_only=True)``; a pickle carrying anything but tensors/containers is refused unexecuted.
    ``unwrap``: keys of a training checkpoint (``{"epoch": 3, "state_dict": {...}}``) whose mapping is the state
    dict; the rest of such a checkpoint is ignored."""
    import torch

    import warnings

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*pickle protocol.*")
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()
        detail = next((ln for ln in first if "GLOBAL" in ln or "Unsupported" in ln), first[0] if first else "")
        raise UnsafeCheckpointError(
            f"refused to load '{path}': the pickle holds Python objects other than tensors ({detail.strip()}), which "
            "could run arbitrary code when unpickled. Nothing in it was executed. diffaudit only loads safetensors "
            "or tensor-only state dicts; if you trust the file, convert it to safetensors yourself."
        ) from None
    except RuntimeError as e:
        if "weights_only" in str(e) or "Weights only" in str(e):
            raise UnsafeCheckpointError(
                f"refused to load '{path}': not a tensor-only state dict (torch.load(weights_only=True) failed: "
                f"{str(e).splitlines()[0]}). Nothing in it was executed."
            ) from None
        raise CheckpointError(f"cannot read weight file '{path}': {e}") from e
    if isinstance(obj, Mapping) and set(obj) == {"state_dict"} and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if isinstance(obj, Mapping):
        obj = next((obj[k] for k in unwrap if isinstance(obj.get(k), Mapping)), obj)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"weight file '{path}' holds a {type(obj).__name__}, expected a dict of tensors")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"weight file '{path}': entry '{bad[0]}' is not a tensor ({type(obj[bad[0]]).__name__})")
    return dict(obj)


def load_state_dict_file(path: PathLike, *, unwrap: Sequence[str] = ()) -> dict:
    """Tensors of one weight file: safetensors, or a tensor-only pickle via ``torch.load(weights_only=True)``."""
    p = Path(path)
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(p), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"cannot read safetensors file '{p}': {e}") from e
    if p.suffix in _PICKLE_SUFFIXES:
        return _torch_load_tensors(p, unwrap)
    raise CheckpointError(f"weight file '{p}': unknown format (allowed: .safetensors, .bin, .pt, .pth, .ckpt)")


def _model_class(cfg: dict, where: str):
    import diffusers
    from diffusers.models.modeling_utils import ModelMixin

    name = str(cfg.get("_class_name", "UNet2DModel"))
    cls = getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, ModelMixin)):
        raise CheckpointError(f"{where}: _class_name {name!r} is not a diffusers model class")
    return cls


def _init_config(cls, cfg: dict) -> dict:
    """Only the keys the model's __init__ takes (EMAModel adds decay, optimization_step, ... to its config)."""
    params = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in cfg.items() if k in params}


def _validate_state_dict(sd: dict, expected: Mapping[str, Any], where: str) -> None:
    import torch

    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensors the config expects are missing (e.g. '{missing[0]}')")
        if unexpected:
            parts.append(f"{len(unexpected)} tensors are not in the model (e.g. '{unexpected[0]}')")
        raise CheckpointError(f"{where}: weights do not match the model config: " + "; ".join(parts))
    for k, ref in expected.items():
        t = sd[k]
        if tuple(t.shape) != tuple(ref.shape):
            raise CheckpointError(
                f"{where}: tensor '{k}' has shape {tuple(t.shape)} but the model config expects {tuple(ref.shape)}"
            )
        if ref.is_floating_point() and not t.is_floating_point():
            raise CheckpointError(f"{where}: tensor '{k}' has dtype {t.dtype}, expected a floating-point tensor")
        if t.is_floating_point() and not torch.isfinite(t).all():
            log.warning("%s: tensor '%s' contains NaN/inf values", where, k)


def load_unet(checkpoint: Union[Checkpoint, PathLike], device=None, dtype=None):
    """Build the checkpoint's model (``UNet2DModel``, ``UNet2DConditionModel``, any diffusers ``ModelMixin``)
    from its config and load its weights safely. Returns the model in eval mode on ``device`` (default: CUDA if
    available) in ``dtype`` (default float32). Accepts a :class:`Checkpoint` or a UNet folder path."""
    import torch

    if not isinstance(checkpoint, Checkpoint):
        p = Path(checkpoint)
        if not _is_unet_folder(p):
            raise CheckpointError(f"checkpoint={str(p)!r}: not a UNet folder (config.json + weights)")
        checkpoint = Checkpoint(step=0, path=str(p), kind="unet-folder", unet_path=str(p), weights=unet_weight_files(p))
    if checkpoint.kind == "lora":
        raise CheckpointError(f"checkpoint '{checkpoint.path}' holds LoRA weights; load it with CheckpointRun.load")
    where = f"checkpoint '{checkpoint.unet_path}'"
    if checkpoint.kind == "safetensors":
        if not checkpoint.config_path:
            raise CheckpointError(f"{where}: no UNet config; pass unet_config= to discover_checkpoints")
        cfg = _load_config(checkpoint.config_path)
        files = [checkpoint.unet_path]
    else:
        folder = Path(checkpoint.unet_path)
        cfg = _read_json(folder / "config.json")
        files = unet_weight_files(folder)
        if not files:
            raise CheckpointError(f"{where}: no weight files (diffusion_pytorch_model.safetensors) in the folder")
    cls = _model_class(cfg, where)
    init_cfg = _init_config(cls, cfg)
    sd: dict = {}
    for f in files:
        sd.update(load_state_dict_file(f))

    model = None
    try:
        with torch.device("meta"):
            model = cls.from_config(init_cfg)
    except Exception:  # pragma: no cover - some models cannot be built on meta
        model = None
    if model is None:
        try:
            model = cls.from_config(init_cfg)
        except Exception as e:  # a config diffusers cannot build (norm_num_groups: 0, mismatched lists, ...)
            raise CheckpointError(f"{where}: its config does not build a {cls.__name__}: {type(e).__name__}: "
                                  f"{e}") from e
    if hasattr(model, "_fix_state_dict_keys_on_load"):
        sd = model._fix_state_dict_keys_on_load(sd) or sd  # old attention key names (query/key/value -> to_q/...)
    _validate_state_dict(sd, model.state_dict(), where)
    is_meta = any(t.is_meta for t in model.parameters())
    model.load_state_dict(sd, strict=True, assign=is_meta)
    if any(t.is_meta for t in list(model.parameters()) + list(model.buffers())):  # pragma: no cover
        model = cls.from_config(init_cfg)
        model.load_state_dict(sd, strict=True)
    target = dtype or torch.float32
    if any(t.dtype != target for t in model.parameters() if t.is_floating_point()):
        model = model.to(dtype=target)
    model = model.to(device=device or default_device())
    model.eval()
    model.requires_grad_(False)
    return model


def pipeline_components(folder: PathLike) -> list[str]:
    """The component sub-folders ``model_index.json`` names (``"unet": ["diffusers", "UNet2DConditionModel"]``,
    ...), skipping null entries (``"safety_checker": [null, null]``). Only these are part of the pipeline: a training
    run's root also holds ``checkpoint-N/`` folders with optimizer states that are not."""
    folder = Path(folder)
    idx = _read_json(folder / "model_index.json")
    out = []
    for name, val in idx.items():
        if name.startswith("_") or not isinstance(val, (list, tuple)) or len(val) != 2 or val[0] is None:
            continue
        if (folder / name).is_dir():
            out.append(name)
    return sorted(out)


def pipeline_files(folder: PathLike) -> list[Path]:
    """``model_index.json`` and every file inside the components it names (weights, configs, tokenizer files)."""
    folder = Path(folder)
    files = [folder / "model_index.json"]
    for name in pipeline_components(folder):
        files += sorted(p for p in (folder / name).rglob("*") if p.is_file())
    return files


def pipeline_hash(folder: PathLike) -> str:
    """sha256 identifying a local pipeline: over the sorted ``"<relative path> <sha256>"`` lines of
    :func:`pipeline_files` (file hashes are cached per path, size and mtime)."""
    folder = Path(folder)
    lines = "".join(f"{p.relative_to(folder).as_posix()} {file_sha256(p)}\n" for p in pipeline_files(folder))
    return hashlib.sha256(lines.encode()).hexdigest()


@contextlib.contextmanager
def quiet_loading():
    """Silence what diffusers / transformers print while loading local weights: their tqdm bars ("Loading pipeline
    components", "Loading weights"), the ``torch_dtype`` deprecation warning, and the note that a UNet-only LoRA has
    no text-encoder keys (expected for every LoRA trained by ``train_text_to_image_lora.py``). Restores the previous
    settings afterwards."""
    import warnings

    libs = []
    for name in ("diffusers.utils.logging", "transformers.utils.logging"):
        try:
            mod = __import__(name, fromlist=["is_progress_bar_enabled"])
        except ImportError:
            continue
        libs.append((mod, mod.is_progress_bar_enabled()))
        mod.disable_progress_bar()
    loggers = [logging.getLogger(n) for n in ("diffusers.loaders.lora_base", "diffusers.loaders.lora_pipeline",
                                             "diffusers.loaders.peft")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            yield
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)
        for mod, was in libs:
            if was:
                mod.enable_progress_bar()


def load_pipeline(folder: PathLike, device=None, dtype=None):
    """A local diffusers pipeline (``DiffusionPipeline.from_pretrained(local_files_only=True)``) with the safety
    checker off (an audit needs the raw samples)."""
    import torch
    from diffusers import DiffusionPipeline

    folder = Path(folder)
    if not _is_pipeline(folder):
        raise CheckpointError(f"base_pipeline={str(folder)!r}: no model_index.json in that folder")
    idx = _read_json(folder / "model_index.json")
    kw: dict = {}
    if "safety_checker" in idx:
        kw["safety_checker"] = None
        kw["requires_safety_checker"] = False
    weights = [p for p in pipeline_files(folder) if p.suffix in _WEIGHT_SUFFIXES]
    if weights and all(p.suffix == ".safetensors" for p in weights):
        kw["use_safetensors"] = True
    else:
        for p in weights:  # refuse code-carrying pickles before any library opens them
            if p.suffix in _PICKLE_SUFFIXES:
                _torch_load_tensors(p)
    with quiet_loading():
        pipe = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True, torch_dtype=dtype or torch.float32,
                                                 **kw)
    pipe = pipe.to(device or default_device())
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    return pipe
