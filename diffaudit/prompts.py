"""Prompt-level memorization detection without training data (Wen, Liu, Chen & Lyu, ICLR 2024, "Detecting,
Explaining, and Mitigating Memorization in Diffusion Models"; reference code: YuxinWenRick/diffusion_memorization).

A memorized prompt pulls the sampler towards one image from the first step on, so the text-conditional part of the
noise prediction is large: the score of a prompt is ``||eps(x_t, prompt) - eps(x_t, "")||_2`` (over all latent
values), averaged over the first ``steps`` sampling steps of a classifier-free-guided DDIM trajectory from pure noise
and over ``generations`` seeds. The paper reports AUC about 0.96 already from the first step with one generation on
Stable Diffusion v1 (500 memorized prompts). No training image is needed: :func:`prompt_scores` scores any prompts
for any text-to-image pipeline; the audit places the score beside the copies it finds among each prompt's samples
(:func:`prompt_table`) and reports how well the score predicts them (:func:`prompt_detection`).

The noise of generation ``g`` of prompt ``i`` is the audit's sample noise for index ``i * generations + g``
(:func:`diffaudit.sampling.initial_noise`): the same at every checkpoint.
"""
from __future__ import annotations

import logging
from typing import Optional, Sequence

import numpy as np

from .results import PromptDetection, PromptScore

log = logging.getLogger(__name__)

#: Wen et al.'s cheapest setting, which already gives their AUC 0.96: the first step, one generation
DEFAULT_STEPS = 1
DEFAULT_GENERATIONS = 1


def prompt_scores(pipe, prompts: Sequence[str], *, generations: int = DEFAULT_GENERATIONS, steps: int = DEFAULT_STEPS,
                  num_inference_steps: int = 50, guidance_scale: float = 7.5, seed: int = 0, batch_size: int = 16,
                  resolution: Optional[int] = None, device=None, progress: bool = False) -> np.ndarray:
    """Wen et al.'s score of each prompt under the text-to-image pipeline ``pipe`` (``StableDiffusionPipeline``-like:
    ``unet``, ``scheduler``, ``encode_prompt``): a float64 array ``(len(prompts), generations)``.

    ``steps``: how many of the first sampling steps the norm is averaged over (1 = pure noise only);
    ``num_inference_steps`` sets the DDIM timesteps those steps are taken from; ``guidance_scale`` drives the
    trajectory between them. ``resolution``: image size in pixels (default: the UNet's ``sample_size`` times the VAE
    factor)."""
    import torch

    from .sampling import initial_noise, sample_generators

    prompts = [str(p) for p in prompts]
    if not prompts:
        raise ValueError("prompts: give at least one prompt")
    for name, v, lo in (("generations", generations, 1), ("steps", steps, 1), ("batch_size", batch_size, 1),
                        ("num_inference_steps", num_inference_steps, 1)):
        if isinstance(v, bool) or int(v) != v or int(v) < lo:
            raise ValueError(f"{name}={v!r}: expected an integer >= {lo}")
    if int(steps) > int(num_inference_steps):
        raise ValueError(f"steps={steps}: at most num_inference_steps={num_inference_steps}")
    unet = pipe.unet
    if not hasattr(pipe, "encode_prompt"):
        raise TypeError(f"pipe: {type(pipe).__name__} is not a text-to-image pipeline (no encode_prompt)")
    cfg = unet.config
    c = int(cfg.in_channels)
    vsf = int(getattr(pipe, "vae_scale_factor", 8) or 8)
    if resolution is not None:
        if isinstance(resolution, bool) or int(resolution) != resolution or int(resolution) < vsf:
            raise ValueError(f"resolution={resolution!r}: expected an image size in pixels >= {vsf} (the VAE factor)")
        lh = lw = int(resolution) // vsf
    else:
        s = cfg.sample_size
        lh, lw = (s, s) if isinstance(s, int) else tuple(s)
    params = next(iter(unet.parameters()), None)
    dev = torch.device(device) if device is not None else (params.device if params is not None else torch.device("cpu"))
    dtype = params.dtype if params is not None else torch.float32
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(pipe.scheduler.config)  # the audit's sampler, on the run's noise schedule
    g_n = int(generations)
    out = np.zeros((len(prompts), g_n), dtype=np.float64)
    rows = [(i, g) for i in range(len(prompts)) for g in range(g_n)]
    from ._progress import task_bar

    with task_bar(progress, "prompt scores", len(rows)) as advance, torch.inference_mode():
        for s0 in range(0, len(rows), int(batch_size)):
            chunk = rows[s0:s0 + int(batch_size)]
            idx = [i * g_n + g for i, g in chunk]
            cond, uncond = pipe.encode_prompt([prompts[i] for i, _ in chunk], dev, 1, True)
            emb = torch.cat([uncond, cond])
            x = initial_noise(seed, idx, (c, lh, lw), generators=sample_generators(seed, idx)).to(dev, dtype)
            sched.set_timesteps(int(num_inference_steps), device=dev)
            x = x * sched.init_noise_sigma
            acc = torch.zeros(len(chunk), dtype=torch.float64)
            for t in sched.timesteps[:int(steps)]:
                xin = sched.scale_model_input(torch.cat([x, x]), t)
                pred = unet(xin, t, encoder_hidden_states=emb, return_dict=False)[0]
                e_u, e_c = pred.chunk(2)
                acc += (e_c - e_u).float().flatten(1).norm(dim=1).double().cpu()
                x = sched.step(e_u + float(guidance_scale) * (e_c - e_u), t, x).prev_sample
            for j, (i, g) in enumerate(chunk):
                out[i, g] = float(acc[j]) / int(steps)
            advance(len(chunk))
    if not np.isfinite(out).all():
        raise FloatingPointError(f"{int((~np.isfinite(out)).sum())} prompt scores are NaN/inf (model output NaN?)")
    return out


def prompt_table(prompts: Sequence[str], scores: Optional[np.ndarray], sample_prompts: Sequence[Optional[str]],
                 copied: Sequence[bool]) -> list[PromptScore]:
    """One :class:`PromptScore` per distinct prompt (first-seen order): its score (mean over generations, from
    ``scores`` as :func:`prompt_scores` returns them; None: not computed) and its samples / copies, from the prompt
    of each finite sample and whether it passed the primary copy rule."""
    uniq = list(dict.fromkeys(str(p) for p in prompts))
    pos = {p: i for i, p in enumerate(uniq)}
    first = {}
    for i, p in enumerate(prompts):
        first.setdefault(str(p), i)
    table = []
    for p in uniq:
        row = None if scores is None else np.asarray(scores[first[p]], dtype=np.float64)
        table.append(PromptScore(prompt=p, score=None if row is None else float(row.mean()),
                                 generations=[] if row is None else [float(v) for v in row]))
    if len(sample_prompts) != len(copied):
        raise ValueError(f"sample_prompts ({len(sample_prompts)}) and copied ({len(copied)}) must have the same length")
    for p, c in zip(sample_prompts, copied):
        if p is None or str(p) not in pos:
            continue
        r = table[pos[str(p)]]
        r.samples += 1
        r.copies += int(bool(c))
    return table


def prompt_detection(table: Sequence[PromptScore], fpr: float = 0.01) -> Optional[PromptDetection]:
    """AUC and TPR at ``fpr`` of the prompt score against the audit's own labels: a prompt is positive when at
    least one of its samples is a copy. None when no prompt has both a score and samples."""
    from .metrics import detection_auc, tpr_at_fpr

    rows = [r for r in table if r.score is not None and r.samples > 0]
    if not rows:
        return None
    pos = np.asarray([r.score for r in rows if r.copies > 0], dtype=np.float64)
    neg = np.asarray([r.score for r in rows if r.copies == 0], dtype=np.float64)
    return PromptDetection(positives=int(pos.size), negatives=int(neg.size), auc=detection_auc(pos, neg),
                           tpr_at_1pct_fpr=tpr_at_fpr(pos, neg, fpr))


def rank_prompts(run, prompts: Sequence[str], *, base_pipeline=None, ema: str = "prefer",
                 generations: int = DEFAULT_GENERATIONS, steps: int = DEFAULT_STEPS, num_inference_steps: int = 50,
                 guidance_scale: float = 7.5, seed: int = 0, batch_size: int = 16, resolution: Optional[int] = None,
                 device=None, dtype=None, progress: bool = False) -> list[dict]:
    """Wen et al.'s score of ``prompts`` at every checkpoint of a text-to-image ``run`` (a run folder, a pipeline
    folder, a LoRA file, or a discovered :class:`~diffaudit.checkpoints.CheckpointRun`); no training images needed.
    Returns one ``{"step", "path", "final", "prompts": [PromptScore, ...]}`` per checkpoint, prompts by descending
    score."""
    from .checkpoints import CheckpointRun, discover_checkpoints

    prompts = list(dict.fromkeys(str(p) for p in prompts))  # each distinct prompt once, first-seen order (as the audit)
    if not prompts or not all(p.strip() for p in prompts):
        raise ValueError("prompts: give at least one non-empty prompt")
    if not isinstance(run, CheckpointRun):
        run = discover_checkpoints(run, ema=ema, base_pipeline=base_pipeline, require_scheduler=False)
    if not run.conditional:
        raise ValueError(f"run={str(run.root)!r}: not a text-to-image run (the prompt score needs a text encoder)")
    out = []
    for ck in run.checkpoints:
        pipe = run.load(ck, device=device, dtype=dtype)
        s = prompt_scores(pipe, prompts, generations=generations, steps=steps, num_inference_steps=num_inference_steps,
                          guidance_scale=guidance_scale, seed=seed, batch_size=batch_size, resolution=resolution,
                          device=device, progress=progress)
        table = prompt_table(prompts, s, [], [])
        table.sort(key=lambda r: (-(r.score or 0.0), r.prompt))
        out.append({"step": int(ck.step), "path": str(ck.path), "final": bool(ck.final), "prompts": table})
        log.info("prompt scores at step %s: top %.4g", ck.step, table[0].score if table else float("nan"))
    return out
