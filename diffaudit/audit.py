"""audit(): sample every checkpoint -> embed -> search the training set -> metrics -> onset -> AuditResult.

A short loop: the training data is prepared once (:class:`diffaudit.reference.ReferenceSet`), every checkpoint goes
through the one per-checkpoint step (:func:`diffaudit.reference.evaluate_checkpoint`, which the training monitor uses
too), and the decision comes from :mod:`diffaudit.onset`.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import sys
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from .onset import ONSET_RULE_TEXT, OnsetRule, onset_info, verdict
from .reference import (  # noqa: F401  (ReferenceSet, evaluate_samples: re-exported for users of diffaudit.audit)
    LossSettings,
    ReferenceSet,
    evaluate_checkpoint,
    evaluate_samples,
    provenance,
    risk_table,
)
from .results import AuditResult, CheckpointResult

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------------
# configuration


#: sampling precisions an audit accepts (``--dtype``)
DTYPES = ("float32", "float16", "bfloat16")


def torch_dtype(name: Optional[str], device: Any = None):
    """The torch dtype for ``--dtype`` (None: None, the model's own); half precision only on CUDA (CPU kernels for
    float16 convolutions are missing or slow, and a silent fallback would change the samples)."""
    if name is None:
        return None
    import torch

    if name not in DTYPES:
        raise ValueError(f"dtype={name!r}: allowed values are {', '.join(DTYPES)}")
    if name != "float32":
        from ._util import default_device

        dev = str(device or default_device())
        if not dev.startswith("cuda"):
            raise ValueError(f"dtype={name!r} needs a CUDA device (device is {dev!r}); use float32 on CPU")
    return getattr(torch, name)


@dataclass
class AuditConfig:
    """Everything an audit needs; YAML presets in ``configs/`` set these keys (unknown keys are errors)."""

    run: Optional[list[str]] = None  # run folder, pipeline folder(s) or .safetensors files
    train: Optional[str] = None
    heldout: Optional[str] = None
    embedders: list[str] = field(default_factory=lambda: ["pixel"])
    weights: dict[str, str] = field(default_factory=dict)  # embedder spec -> local weights file
    num_samples: int = 256
    seed: int = 0
    num_inference_steps: int = 50
    sampler: str = "ddim"  # ddim | ddpm | run
    eta: float = 0.0
    scheduler: Optional[str] = None
    ema: str = "prefer"  # prefer | only | never
    unet_config: Optional[str] = None
    base_pipeline: Optional[str] = None
    prompts: Optional[Union[str, list[str]]] = None  # a prompts file (.txt/.jsonl/.json/.csv) or the prompts themselves
    caption_column: Optional[str] = None  # column of a prompts file / metadata.jsonl / saved dataset (default: text)
    seeds_per_prompt: int = 1
    guidance_scale: float = 7.5
    resolution: Optional[int] = None  # text-to-image sample size in pixels (default: the UNet's sample_size x VAE factor)
    prompt_score_generations: int = 1  # Wen et al.'s prompt score: seeds per prompt (0: off); text-to-image only
    prompt_score_steps: int = 1  # ... and first sampling steps averaged
    dtype: Optional[str] = None  # float32 | float16 | bfloat16 (default float32; half precision needs a GPU)
    batch_size: int = 64
    loss_timesteps: list[int] = field(default_factory=lambda: [100])
    loss_noise_draws: int = 2
    loss_max_images: int = 512
    onset_threshold: float = 0.02
    onset_patience: int = 2
    confidence: float = 0.95
    keep_samples: bool = True
    cache_dir: Optional[str] = None
    device: Optional[str] = None
    gallery_size: int = 8
    outlier_k: int = 5
    outlier_quantile: float = 0.95

    def __post_init__(self) -> None:
        if isinstance(self.run, (str, os.PathLike)):
            self.run = [str(self.run)]
        if isinstance(self.embedders, str):
            self.embedders = [self.embedders]
        checks = [
            ("num_samples", self.num_samples >= 2, "an integer >= 2"),
            ("num_inference_steps", self.num_inference_steps >= 1, "an integer >= 1"),
            ("batch_size", self.batch_size >= 1, "an integer >= 1"),
            ("sampler", self.sampler in ("ddim", "ddpm", "run"), "'ddim', 'ddpm' or 'run'"),
            ("ema", self.ema in ("prefer", "only", "never"), "'prefer', 'only' or 'never'"),
            ("onset_patience", self.onset_patience >= 1, "an integer >= 1"),
            ("onset_threshold", 0 <= self.onset_threshold < 1, "a fraction in [0, 1)"),
            ("confidence", 0 < self.confidence < 1, "a number in (0, 1)"),
            ("seed", isinstance(self.seed, int) and not isinstance(self.seed, bool) and self.seed >= 0,
             "a non-negative integer"),
            ("guidance_scale", math.isfinite(self.guidance_scale), "a finite number"),
            ("eta", math.isfinite(self.eta) and 0 <= self.eta <= 1, "a number in [0, 1]"),
            ("loss_max_images", self.loss_max_images >= 1, "an integer >= 1"),
            ("loss_noise_draws", self.loss_noise_draws >= 1, "an integer >= 1"),
            ("seeds_per_prompt", self.seeds_per_prompt >= 1, "an integer >= 1"),
            ("gallery_size", self.gallery_size >= 0, "an integer >= 0"),
            ("embedders", len(self.embedders) >= 1, "at least one embedder spec"),
            ("resolution", self.resolution is None or (isinstance(self.resolution, int) and self.resolution >= 8),
             "an integer >= 8 (pixels) or unset"),
            ("dtype", self.dtype in (None, *DTYPES), f"one of {', '.join(DTYPES)} or unset"),
            ("prompt_score_generations", self.prompt_score_generations >= 0, "an integer >= 0 (0: off)"),
            ("prompt_score_steps", 1 <= self.prompt_score_steps <= self.num_inference_steps,
             "an integer from 1 to num_inference_steps"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"AuditConfig: {name}={getattr(self, name)!r} is not allowed; expected {allowed}")

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "AuditConfig":
        """Load a preset with ``yaml.safe_load`` (no object construction); unknown keys are errors."""
        import yaml

        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config={str(p)!r}: no such file")
        _UniqueKeyLoader = _unique_key_loader()
        try:
            data = yaml.load(p.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
        except yaml.YAMLError as e:  # one line: the problem and where (PyYAML's own text spans several lines)
            mark = getattr(e, "problem_mark", None)
            what = getattr(e, "problem", None) or " ".join(str(e).split())
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            hint = ("; configs are read with yaml.safe_load, which never constructs Python objects"
                    if isinstance(e, yaml.constructor.ConstructorError) else "")
            raise ValueError(f"config={str(p)!r}: not valid YAML ({what}{at}){hint}") from None
        if not isinstance(data, dict):
            raise ValueError(f"config={str(p)!r}: expected a mapping of keys, got {type(data).__name__}")
        return cls.from_dict(data, where=str(p))

    @classmethod
    def from_dict(cls, data: dict, where: str = "config") -> "AuditConfig":
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown}; allowed keys: {sorted(names)}")
        for k, v in data.items():
            _check_type(k, v, names[k].type, where)
        return cls(**data)

    def replace(self, **kw) -> "AuditConfig":
        return self.from_dict({**dataclasses.asdict(self), **kw})


def _unique_key_loader():
    import yaml

    class Loader(yaml.SafeLoader):
        """``yaml.SafeLoader`` that refuses a key given twice (PyYAML would keep the last one silently)."""

        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"key {key!r} given twice", key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return Loader


_SIMPLE_TYPES = {"int": int, "float": (int, float), "str": str, "bool": bool}


def _check_type(key: str, value: Any, tp: str, where: str) -> None:
    """Light type check of config values (the dataclass annotations are strings under __future__ annotations)."""
    if value is None:
        if "Optional" in tp:
            return
        raise ValueError(f"{where}: {key} must not be empty")
    base = tp.replace("Optional[", "").rstrip("]")
    if base.startswith("list"):
        ok = isinstance(value, list) or (key == "run" and isinstance(value, str))
    elif base.startswith("dict"):
        ok = isinstance(value, dict)
    else:
        want = _SIMPLE_TYPES.get(base)
        ok = want is None or (isinstance(value, want) and not (base != "bool" and isinstance(value, bool)))
    if not ok:
        raise ValueError(f"{where}: {key}={value!r} has the wrong type; expected {tp}")


def ensure_writable(path: str | os.PathLike, min_free_mb: int = 50) -> Path:
    """Create the output folder and prove it is writable with enough free space -- before hours of work."""
    from .data import OUTPUT_MARKER

    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".diffaudit-write-test-", dir=p)
        os.close(fd)
        os.unlink(probe)
        (p / OUTPUT_MARKER).touch()  # later scans of a folder above this one leave it out
    except OSError as e:
        raise PermissionError(f"output folder {str(p)!r} is not writable: {e.strerror or e}") from None
    free_mb = shutil.disk_usage(p).free / 2**20
    if free_mb < min_free_mb:
        raise OSError(f"output folder {str(p)!r} has only {free_mb:.0f} MB free; need at least {min_free_mb} MB")
    return p


def _folder_of(images) -> Optional[Path]:
    if isinstance(images, (str, os.PathLike)):
        return Path(images)
    src = str(getattr(images, "source", ""))
    return Path(src[len("folder:"):]) if src.startswith("folder:") else None


def check_outside_inputs(out_dir, **inputs) -> None:
    """Refuse an output folder inside (or equal to) an input folder: its samples would be read as training or
    held-out images by the next audit. One line naming both."""
    out = Path(out_dir).resolve()
    for name, images in inputs.items():
        folder = _folder_of(images)
        if folder is None:
            continue
        f = folder.resolve()
        if out == f or f in out.parents:
            raise ValueError(f"out_dir={str(out_dir)!r} is inside {name}={str(folder)!r}: diffaudit's outputs must "
                             f"never become its inputs; choose an output folder outside the {name} folder")


def check_split(train, heldout) -> None:
    """Refuse a held-out folder that is the training folder or inside it (or the other way round)."""
    a, b = _folder_of(train), _folder_of(heldout)
    if a is None or b is None:
        return
    ra, rb = a.resolve(), b.resolve()
    if ra == rb or ra in rb.parents or rb in ra.parents:
        raise ValueError(f"heldout={str(b)!r} and train={str(a)!r} overlap as folders: held-out images must be images "
                         "the model never trained on (the loss gap, C_T test and membership AUC compare the two)")


def _progress(enabled: bool):
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    from ._progress import progress

    return progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())


def audit(
    checkpoints=None,
    train=None,
    heldout=None,
    embedders: Optional[Sequence[Any]] = None,
    num_samples: Optional[int] = None,
    seed: Optional[int] = None,
    *,
    config: Optional[AuditConfig] = None,
    out_dir: Optional[str | os.PathLike] = None,
    progress: bool = False,
    **kwargs,
) -> AuditResult:
    """Audit every checkpoint of a run for memorization of ``train``.

    ``checkpoints``: a run folder (``checkpoint-N/unet[_ema]/``), a pipeline folder, a list of folders / files, or an
    already discovered :class:`diffaudit.checkpoints.CheckpointRun`, or in-memory models ``[(step, model), ...]`` with
    ``scheduler=`` the training noise scheduler (see :func:`memory_run`). ``train`` / ``heldout``: :class:`ImageSet` or
    folders. ``embedders``: specs or :class:`Embedder` objects (default ``["pixel"]``). Other
    :class:`AuditConfig` fields may be passed as keyword arguments. With ``out_dir`` the generated samples are kept
    there (``samples/step-N/``) and reused by a rerun (resume); the report is written by the CLI or ``to_html``.
    """
    from . import __version__
    from .checkpoints import CheckpointRun, discover_checkpoints
    from .sampling import CheckpointSampler

    cfg = config or AuditConfig()
    # a scheduler object (not a name/path) cannot live in the YAML-able config: keep it aside
    sched_obj = None
    if kwargs.get("scheduler") is not None and not isinstance(kwargs["scheduler"], (str, os.PathLike)):
        sched_obj = kwargs.pop("scheduler")
    if is_model_list(checkpoints):
        checkpoints = memory_run(checkpoints, scheduler=sched_obj or kwargs.get("scheduler") or cfg.scheduler)
    over = {"train": train, "heldout": heldout, "num_samples": num_samples, "seed": seed}
    over = {k: v for k, v in over.items() if v is not None and isinstance(v, (str, int, os.PathLike))}
    if checkpoints is not None and not isinstance(checkpoints, CheckpointRun):
        over["run"] = [str(c) for c in checkpoints] if isinstance(checkpoints, (list, tuple)) else [str(checkpoints)]
    if embedders is not None and all(isinstance(e, str) for e in embedders):
        over["embedders"] = list(embedders)
    over = {k: (str(v) if isinstance(v, os.PathLike) else v) for k, v in over.items()}
    cfg = cfg.replace(**over, **kwargs) if (over or kwargs) else cfg
    emb_specs = list(embedders) if embedders is not None else cfg.embedders
    train_set = train if (train is not None and not isinstance(train, (str, os.PathLike))) else cfg.train
    heldout_set = heldout if (heldout is not None and not isinstance(heldout, (str, os.PathLike))) else cfg.heldout
    if train_set is None:
        raise ValueError("audit: train= is required (an ImageSet or a folder of training images)")

    if out_dir is not None:
        check_outside_inputs(out_dir, train=train_set, heldout=heldout_set)
    check_split(train_set, heldout_set)
    out_path = ensure_writable(out_dir) if out_dir is not None else None
    if isinstance(checkpoints, CheckpointRun):
        run = checkpoints
    else:
        if not cfg.run:
            raise ValueError("audit: checkpoints= is required (a run folder, pipeline folder or list of checkpoints)")
        run_arg = cfg.run[0] if len(cfg.run) == 1 else cfg.run
        run = discover_checkpoints(run_arg, ema=cfg.ema, scheduler=sched_obj or cfg.scheduler, base_pipeline=cfg.base_pipeline,
                                   unet_config=cfg.unet_config)
    if not run.checkpoints:
        raise ValueError(f"checkpoints={cfg.run!r}: no checkpoints found")
    notes: list[str] = []
    if getattr(run, "conditional", False) and not cfg.prompts:
        from .sampling import caption_metadata

        meta = caption_metadata(train_set) if isinstance(train_set, (str, os.PathLike)) else None
        if meta is None:
            raise ValueError(f"prompts: {str(run.root)!r} is a text-to-image run; pass prompts= (--prompts FILE or a "
                             "captioned image folder: the captions to sample), or give a train folder with a "
                             "metadata.jsonl -- checked before any embedding or sampling")
        cfg = cfg.replace(prompts=str(meta))  # recorded in the provenance
        log.info("text-to-image run without prompts: sampling the training captions of %s", meta)
    dtype = torch_dtype(cfg.dtype, cfg.device)
    if getattr(run, "conditional", False):
        _check_sd_extra(run)

    captions = heldout_captions = None
    if getattr(run, "conditional", False) or cfg.prompts:  # the text-conditional loss needs each image's caption
        captions, heldout_captions = _folder_captions(train_set, cfg), _folder_captions(heldout_set, cfg)
        if captions is None:
            notes.append("no captions for the training images (metadata.jsonl in the train folder): the "
                         "text-conditional loss, loss gap and membership AUC were not measured")
    ref = ReferenceSet(train_set, heldout_set, emb_specs, weights=cfg.weights, cache_dir=cfg.cache_dir,
                       outlier_k=cfg.outlier_k, outlier_quantile=cfg.outlier_quantile, progress=progress,
                       captions=captions, heldout_captions=heldout_captions)
    prompts = None
    if cfg.prompts:
        from .sampling import read_prompts

        if isinstance(cfg.prompts, (list, tuple)):  # the prompts themselves
            prompts = [str(p) for p in cfg.prompts]
            if not prompts or not all(p.strip() for p in prompts):
                raise ValueError("prompts: the list is empty or holds an empty prompt")
        else:
            prompts = read_prompts(cfg.prompts, cfg.caption_column)
            if not prompts:
                raise ValueError(f"prompts={cfg.prompts!r}: the file holds no prompt")
    if cfg.resolution is not None and prompts is None:
        raise ValueError("resolution: only text-to-image runs take a sampling resolution (an unconditional UNet "
                         "samples at its own config.sample_size)")
    sampler = CheckpointSampler(
        run.new_scheduler(), cfg.num_samples, seed=cfg.seed, num_inference_steps=cfg.num_inference_steps,
        sampler=cfg.sampler, batch_size=cfg.batch_size, eta=cfg.eta, device=cfg.device, prompts=prompts,
        seeds_per_prompt=cfg.seeds_per_prompt, guidance_scale=cfg.guidance_scale, image_size=cfg.resolution,
        dtype=dtype,
    )
    if prompts is not None:
        used = sampler.prompts_used()
        if used < len(prompts):
            notes.append(f"{used} of {len(prompts)} prompts sampled (num_samples {cfg.num_samples} / seeds_per_prompt "
                         f"{cfg.seeds_per_prompt}); pass --samples {len(prompts) * cfg.seeds_per_prompt} to cover all")

    results: list[CheckpointResult] = []
    skipped = list(ref.skipped) + [s.at("checkpoints") for s in run.skipped]
    copies: list[tuple[int, list[str]]] = []
    membership: dict[str, float] = {}
    loss = LossSettings(timesteps=tuple(cfg.loss_timesteps), noise_draws=cfg.loss_noise_draws,
                        max_images=cfg.loss_max_images, seed=cfg.seed, batch_size=cfg.batch_size,
                        resolution=cfg.resolution)
    keep = out_path is not None and cfg.keep_samples
    prog = _progress(progress)
    with prog or nullcontext():
        task = prog.add_task("auditing checkpoints", total=len(run.checkpoints)) if prog else None
        for ckpt in run.checkpoints:
            loaded: dict[str, Any] = {}

            def load_model(ckpt=ckpt, loaded=loaded):
                if "model" not in loaded:
                    loaded["model"] = run.load(ckpt, device=cfg.device, dtype=dtype)
                return loaded["model"]

            def sample(ckpt=ckpt, load_model=load_model):
                if keep:
                    batch = sampler.sample_or_load(load_model, out_path / "samples", ckpt.step,
                                                   checkpoint_id=_checkpoint_id(run, ckpt))
                else:
                    batch = sampler.sample(load_model())
                if prompts is not None and not getattr(batch, "prompts", None):
                    batch.prompts = [sampler.prompt_for(int(i)) for i in batch.indices]
                return batch

            ev = evaluate_checkpoint(
                ref, ckpt.step, ckpt.path, sample=sample, model=load_model, scheduler=run.new_scheduler(),
                loss=loss, confidence=cfg.confidence, gallery_size=cfg.gallery_size, device=cfg.device,
                sample_path=(lambda i, s=ckpt.step: f"samples/step-{s}/sample_{i:05d}.png") if keep else None)
            ev.result.final = bool(getattr(ckpt, "final", False))
            if prompts is not None and not ev.result.failed:
                _score_prompts(ev, load_model(), prompts[:sampler.prompts_used()], cfg)
            skipped += ev.skipped
            copies.append((ckpt.step, ev.copied_train_ids))
            if ev.heldout_losses is not None:
                from .metrics import membership_percentile

                membership = {i: float(v) for i, v in
                              zip(ev.train_loss_ids, membership_percentile(ev.train_losses, ev.heldout_losses))}
            loaded.clear()
            results.append(ev.result)
            if prog:
                prog.advance(task)

    rule = OnsetRule(threshold=cfg.onset_threshold, patience=cfg.onset_patience, confidence=cfg.confidence)
    primary = ref.primary
    onset = onset_info(rule, results, copy_rule=primary.rule.name, signal_metric=primary.rule.signal,
                       signal_embedder=primary.name)
    prov = provenance(
        ref, version=__version__, run=str(run.root), checkpoint_files=run.checkpoint_files(), seed=cfg.seed,
        num_samples=cfg.num_samples,
        sampler={**sampler.describe(), "scheduler": run.scheduler_source, "batch_size": cfg.batch_size,
                 "prompts": cfg.prompts or "",
                 **({"base_pipeline": str(run.base_pipeline), "base_pipeline_sha256": run.base_pipeline_hash()}
                    if getattr(run, "base_pipeline", None) else {})},
        extra={"onset_rule": ONSET_RULE_TEXT})
    result = AuditResult(checkpoints=results, onset=onset, images=risk_table(ref, copies, membership),
                         skipped=skipped, provenance=prov, warnings=list(ref.warnings) + notes)
    result.verdict = " ".join([verdict(results, onset).text, *(f"Warning: {w}." for w in result.warnings)])
    if out_path is not None:
        write_outputs(result, out_path, ref=ref)
    return result


def _folder_captions(images, cfg: AuditConfig) -> Optional[dict[str, str]]:
    """``{id: caption}`` from a folder's metadata.jsonl / .csv (None: not a folder, or no caption file)."""
    from .sampling import caption_metadata, read_captions

    if not isinstance(images, (str, os.PathLike)) or caption_metadata(images) is None:
        return None
    return read_captions(images, cfg.caption_column)


def _score_prompts(ev, pipe, prompts: Sequence[str], cfg: AuditConfig) -> None:
    """Per prompt: Wen et al.'s score (unless ``prompt_score_generations`` is 0) beside the copies among its samples,
    and how well the score predicts them."""
    from .prompts import prompt_detection, prompt_scores, prompt_table

    prompts = list(dict.fromkeys(prompts))  # a caption repeated in the metadata is scored once
    scores = None
    if cfg.prompt_score_generations > 0 and hasattr(pipe, "encode_prompt") and hasattr(pipe, "unet"):
        scores = prompt_scores(pipe, prompts, generations=cfg.prompt_score_generations, steps=cfg.prompt_score_steps,
                               num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
                               seed=cfg.seed, batch_size=cfg.batch_size, resolution=cfg.resolution, device=cfg.device)
    copied = ev.sample_copied if ev.sample_copied is not None else np.zeros(len(ev.sample_prompts), bool)
    table = prompt_table(prompts, scores, ev.sample_prompts, copied)
    ev.result.prompts = table
    ev.result.prompt_detection = prompt_detection(table) if scores is not None else None


def _check_sd_extra(run) -> None:
    """Text-to-image sampling needs transformers (text encoder, tokenizer) and, for LoRA checkpoints, peft: say so
    before any work (diffusers' placeholder classes would fail after the embedding)."""
    import importlib.util

    need = ["transformers"] + (["peft"] if any(c.kind == "lora" for c in run.checkpoints) else [])
    missing = [m for m in need if importlib.util.find_spec(m) is None]
    if missing:
        raise ModuleNotFoundError(f"{str(run.root)!r} is a text-to-image run; sampling it needs {', '.join(missing)}: "
                                  'pip install "diffaudit[sd]"')


def _checkpoint_id(run, ckpt) -> str:
    """What saved samples must match besides the sampler settings (resume): the weights (sha256 of the files; for
    in-memory models of the tensors), the run's noise-schedule config and, for text-conditional checkpoints, the
    base pipeline they are loaded into (its files' hash). The sampler settings (prompts, guidance, seeds per prompt,
    image size, dtype, device) are in :meth:`CheckpointSampler.fingerprint`."""
    import hashlib
    import json

    from .checkpoints import checkpoint_hash

    ident = run.identity(ckpt) if hasattr(run, "identity") else (checkpoint_hash(ckpt) if ckpt.weights else ckpt.path)
    sched = dict(run.scheduler.config) if getattr(run, "scheduler", None) is not None else None
    if sched is not None:  # diffusers fills this list from a set: its order changes with PYTHONHASHSEED (no resume)
        sched.pop("_use_default_values", None)
    base = run.base_pipeline_hash() if ckpt.conditional and hasattr(run, "base_pipeline_hash") else None
    blob = json.dumps({"scheduler": sched, "checkpoint": ident, **({"base_pipeline": base} if base else {})},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _module_hash(model) -> str:
    """sha256 over the names and bytes of a module's parameters and buffers (a pipeline: its UNet)."""
    import hashlib

    import torch

    m = getattr(model, "unet", model)
    if not isinstance(m, torch.nn.Module):
        return f"object:{type(model).__name__}:{id(model)}"
    h = hashlib.sha256()
    for name, t in sorted([*m.named_parameters(), *m.named_buffers()], key=lambda p: p[0]):
        a = t.detach().cpu().contiguous()
        h.update(f"{name}:{a.dtype}:{tuple(a.shape)}".encode())
        if a.numel():
            h.update(a.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def is_model_list(checkpoints) -> bool:
    """True for in-memory checkpoints: a non-empty list of ``(step, model)`` pairs or a ``{step: model}`` dict."""
    if isinstance(checkpoints, dict):
        return bool(checkpoints) and all(isinstance(k, (int, np.integer)) for k in checkpoints)
    if not isinstance(checkpoints, (list, tuple)) or not checkpoints:
        return False
    return all(isinstance(c, tuple) and len(c) == 2 and isinstance(c[0], (int, np.integer))
               and not isinstance(c[1], (str, os.PathLike)) for c in checkpoints)


def memory_run(checkpoints, scheduler=None):
    """A :class:`~diffaudit.checkpoints.CheckpointRun` over models already in memory (tests, the training monitor).

    ``checkpoints``: ``[(step, model), ...]`` or ``{step: model}``; a model is anything
    :meth:`CheckpointSampler.sample` takes (a ``UNet2DModel``-like module, an unconditional pipeline) or a
    zero-argument callable returning one (loaded only when its samples are not on disk). ``scheduler``: the training
    noise scheduler (a diffusers scheduler, a path or a name such as ``"ddpm"``); default: the first model's
    ``.scheduler`` (pipelines). ``audit(checkpoints=[(step, model), ...], scheduler=...)`` calls this.
    """
    from .checkpoints import Checkpoint, CheckpointError, CheckpointRun, load_scheduler_with_source

    items = sorted((checkpoints.items() if isinstance(checkpoints, dict) else checkpoints), key=lambda p: int(p[0]))
    steps = [int(s) for s, _ in items]
    if len(set(steps)) != len(steps):
        raise ValueError(f"checkpoints: steps must be unique; got {steps}")
    if scheduler is None:
        scheduler = next((getattr(m, "scheduler", None) for _, m in items if getattr(m, "scheduler", None) is not None), None)
    if scheduler is None:
        raise CheckpointError("checkpoints=[(step, model), ...]: in-memory models need scheduler= (the training noise "
                              "scheduler: a diffusers scheduler object, a scheduler folder, or a name such as 'ddpm')")
    sched, src = load_scheduler_with_source(scheduler)
    models = {int(s): m for s, m in items}

    class _MemoryRun(CheckpointRun):
        def load(self, checkpoint, device=None, dtype=None):
            m = models[checkpoint.step]
            if not hasattr(m, "parameters") and not hasattr(m, "unet") and callable(m):
                try:
                    import inspect

                    if not inspect.signature(m).parameters:
                        m = m()
                except (TypeError, ValueError):
                    pass
            return m

        def checkpoint_files(self) -> dict[str, str]:
            return {}

        def identity(self, checkpoint) -> str:
            m = models[checkpoint.step]
            return _module_hash(m) if (hasattr(m, "parameters") or hasattr(m, "unet")) else f"loader:{checkpoint.step}"

    cks = [Checkpoint(step=s, path=f"memory:step-{s}", kind="memory", unet_path="", name=f"step-{s}") for s in steps]
    return _MemoryRun(root="memory", checkpoints=cks, scheduler=sched, scheduler_source=src)


def write_outputs(result: AuditResult, out_dir: str | os.PathLike, ref: Optional[ReferenceSet] = None) -> None:
    """audit.json, images.csv and the self-contained report.html in ``out_dir``."""
    out = Path(out_dir)
    result.to_json(out / "audit.json")
    result.to_csv(str(out / "images.csv"))
    provider = None
    if ref is not None:
        train = ref.train

        def provider(kind: str, key: str):
            # training thumbnails from the ImageSet; samples (kind "sample") are read by the report itself,
            # which confines them to the output folder and applies the pixel limit
            if kind != "train":
                return None
            try:
                return train.load(key)
            except Exception:  # a missing thumbnail must not break the report
                return None

    result.to_html(str(out / "report.html"), images=provider)


class _CallableModule(type(sys.modules[__name__])):
    """``diffaudit.audit`` is both this module and the :func:`audit` function the package exports: once the module
    is imported, Python binds the package attribute ``diffaudit.audit`` to the module, so the module calls
    :func:`audit` too (``import diffaudit as da; da.audit(...)`` works whatever was imported before)."""

    def __call__(self, *args, **kwargs):
        return audit(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
