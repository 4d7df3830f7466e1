"""Audit overhead: the whole ``audit()`` vs the sum of its parts, each run alone with plain libraries.

    .venv/bin/python benchmarks/bench_audit.py [--samples 64] [--steps 20] [--checkpoints 3] [--repeats 5]
                                               [--threads 1] [--profile] [--json out.json]

Builds a tiny diffusers-layout run with :func:`diffaudit.testing.write_tiny_run` (16x16 digits, ``--checkpoints``
checkpoint-N folders with unet/ + unet_ema/ + the root pipeline), a training folder (the run's 32 images) and a
held-out folder (16 other digits), then times, alternately so machine noise hits both alike:

* **audit**: ``audit(run, train=folder, heldout=folder, num_samples, num_inference_steps, cache_dir=<fresh>)`` --
  discovery, UNet loading, sampling, training/held-out decoding + embedding (cold cache), FAISS index, train-vs-train
  neighbours, per-checkpoint search + metrics, the denoising-loss pass, provenance hashes. No ``out_dir``: PNGs and
  the HTML report are timed separately (``audit+out``) since no "part" below writes files.
* **parts**, each alone, plain libraries only:
  load: ``UNet2DModel.from_pretrained`` of each checkpoint's UNet;
  sample: a hand-written ``DDIMScheduler`` loop over the UNet for the same number of samples and steps;
  embed: PIL-decode the training and held-out folders, ``PixelEmbedder.embed_batch`` on them and on every
  checkpoint's samples;
  search: ``faiss.IndexFlatL2`` on the training vectors: samples k=2, held-out k=1, train-vs-train k=min(n, 51);
  loss: MSE of the UNet's epsilon at t=100 for the training and held-out images with 2 fixed noise draws.

Prints the best (minimum) time of each over ``--repeats`` and ``overhead = audit / sum(parts) - 1`` (target <= 10%).
``--profile`` prints a cProfile of one audit run (cumulative, top 30).
"""
from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

N_TRAIN, N_HELD, SIDE = 32, 16, 16


def digits(n: int, side: int, offset: int = 0) -> np.ndarray:
    from sklearn.datasets import load_digits

    x = load_digits().images[offset:offset + n]
    x = (x / 16.0 * 255.0).round().astype(np.uint8).repeat(side // 8, 1).repeat(side // 8, 2)
    return np.repeat(x[..., None], 3, axis=3)


def setup(root: Path, n_ckpt: int) -> dict:
    from PIL import Image

    from diffaudit.testing import write_tiny_run

    train, held = digits(N_TRAIN, SIDE), digits(N_HELD, SIDE, offset=N_TRAIN)
    for name, arr in (("train", train), ("held", held)):
        (root / name).mkdir(parents=True)
        for i, a in enumerate(arr):
            Image.fromarray(a).save(root / name / f"{i:03d}.png")
    run = write_tiny_run(root / "run", images=train, steps=tuple(range(1, n_ckpt + 1)), batch_size=8)
    return {"run": run, "train": root / "train", "held": root / "held"}


# ---------------------------------------------------------------------------------------------------- the audit


def run_audit(paths: dict, args, cache: Path, out_dir=None):
    from diffaudit.audit import audit

    shutil.rmtree(cache, ignore_errors=True)
    if out_dir is not None:
        shutil.rmtree(out_dir, ignore_errors=True)
    t, c = time.perf_counter(), time.process_time()
    r = audit(str(paths["run"]), train=str(paths["train"]), heldout=str(paths["held"]), num_samples=args.samples,
              num_inference_steps=args.steps, batch_size=args.samples, cache_dir=str(cache), device="cpu",
              out_dir=out_dir)
    return (time.perf_counter() - t, time.process_time() - c), r


# ---------------------------------------------------------------------------------------------------- the parts


def part_load(ckpts):
    from diffusers import UNet2DModel

    return [UNet2DModel.from_pretrained(c.unet_path).eval() for c in ckpts]


def part_sample(unets, sched_config, n: int, steps: int) -> list[np.ndarray]:
    import torch
    from diffusers import DDIMScheduler

    out = []
    for unet in unets:
        sched = DDIMScheduler.from_config(sched_config)
        g = torch.Generator().manual_seed(0)
        c, s = unet.config.in_channels, unet.config.sample_size
        with torch.inference_mode():
            x = torch.randn((n, c, s, s), generator=g)
            sched.set_timesteps(steps)
            for t in sched.timesteps:
                x = sched.step(unet(x, t).sample, t, x, eta=0.0).prev_sample
        out.append(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return out


def load_folder(folder: Path) -> list[np.ndarray]:
    from PIL import Image

    return [np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.iterdir())]


def part_embed(train_dir: Path, held_dir: Path, samples: list[np.ndarray]):
    from diffaudit.embedders.pixel import PixelEmbedder

    emb = PixelEmbedder(SIDE, device="cpu")
    tv = emb.embed_batch(load_folder(train_dir))
    hv = emb.embed_batch(load_folder(held_dir))
    sv = [emb.embed_batch(list(s)) for s in samples]
    return tv, hv, sv


def part_search(tv, hv, sv):
    import faiss

    index = faiss.IndexFlatL2(tv.shape[1])
    index.add(np.ascontiguousarray(tv, dtype=np.float32))
    index.search(np.ascontiguousarray(tv), min(len(tv), 51))
    index.search(np.ascontiguousarray(hv), 1)
    for s in sv:
        index.search(np.ascontiguousarray(s), 2)


def part_loss(unets, sched_config, train_dir: Path, held_dir: Path):
    import torch
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_config(sched_config)
    sets = [np.stack(load_folder(d)) for d in (train_dir, held_dir)]
    xs = [torch.from_numpy(a).permute(0, 3, 1, 2).float() / 127.5 - 1 for a in sets]
    g = torch.Generator().manual_seed(0)
    noises = [torch.randn((2, *x.shape), generator=g) for x in xs]
    with torch.inference_mode():
        for unet in unets:
            for x, nz in zip(xs, noises):
                t = torch.full((len(x),), 100, dtype=torch.long)
                for d in range(2):
                    xt = sched.add_noise(x, nz[d], t)
                    ((unet(xt, t).sample - nz[d]) ** 2).flatten(1).mean(1)


def run_parts(paths: dict, args) -> dict:
    from diffaudit.checkpoints import discover_checkpoints

    run = discover_checkpoints(str(paths["run"]))  # not timed: only tells the parts which folders to load
    cfg = run.scheduler.config
    t: dict = {"n_checkpoints": len(run.checkpoints)}

    def timed(name, fn, *a):
        s, c = time.perf_counter(), time.process_time()
        out = fn(*a)
        t[name] = (time.perf_counter() - s, time.process_time() - c)
        return out

    unets = timed("load", part_load, run.checkpoints)
    samples = timed("sample", part_sample, unets, cfg, args.samples, args.steps)
    tv, hv, sv = timed("embed", part_embed, paths["train"], paths["held"], samples)
    timed("search", part_search, tv, hv, sv)
    timed("loss", part_loss, unets, cfg, paths["train"], paths["held"])
    return t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--checkpoints", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: leave torch's default)")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench_audit_"))
    try:
        paths = setup(tmp, args.checkpoints)
        cache, out_dir = tmp / "cache", tmp / "out"
        run_audit(paths, args, cache)  # warm-up: imports, first-call costs
        run_parts(paths, args)
        audits, audits_out, parts = [], [], []
        for _ in range(args.repeats):
            audits.append(run_audit(paths, args, cache)[0])
            parts.append(run_parts(paths, args))
            audits_out.append(run_audit(paths, args, cache, out_dir=out_dir)[0])
        keys = ["load", "sample", "embed", "search", "loss"]
        n_ck = parts[0]["n_checkpoints"]
        print(f"tiny run: {n_ck} checkpoints, {args.samples} samples x {args.steps} DDIM steps, "
              f"{N_TRAIN} train / {N_HELD} held-out {SIDE}x{SIDE} images, torch threads {torch.get_num_threads()}, "
              f"best of {args.repeats}; wall ms / CPU ms (CPU time is the steadier figure on a shared machine)")
        summary = {}
        for j, clock in enumerate(("wall", "cpu")):
            best = {k: min(p[k][j] for p in parts) for k in keys}
            sum_parts = min(sum(p[k][j] for k in keys) for p in parts)
            a, ao = min(x[j] for x in audits), min(x[j] for x in audits_out)
            summary[clock] = {"parts_best": best, "sum_parts": sum_parts, "audit": a, "audit_out": ao,
                              "overhead": a / sum_parts - 1, "overhead_out": ao / sum_parts - 1}
        w, c = summary["wall"], summary["cpu"]
        for k in keys:
            print(f"  part {k:<7}  {w['parts_best'][k] * 1e3:9.1f} / {c['parts_best'][k] * 1e3:9.1f}")
        print(f"  sum of parts  {w['sum_parts'] * 1e3:9.1f} / {c['sum_parts'] * 1e3:9.1f}   (best repeat)")
        print(f"  audit()       {w['audit'] * 1e3:9.1f} / {c['audit'] * 1e3:9.1f}")
        print(f"  audit(out)    {w['audit_out'] * 1e3:9.1f} / {c['audit_out'] * 1e3:9.1f}   "
              "(+ sample PNGs, audit.json, images.csv, report.html)")
        print(f"overhead = audit / sum(parts) - 1: wall {w['overhead']:+.1%}, CPU {c['overhead']:+.1%} "
              f"(target <= 10%); with outputs: wall {w['overhead_out']:+.1%}, CPU {c['overhead_out']:+.1%}")
        if args.json:
            args.json.write_text(json.dumps({"summary": summary, "audits": audits, "audits_out": audits_out,
                                             "parts": parts, "args": vars(args) | {"json": str(args.json)}},
                                            indent=1))
        if args.profile:
            pr = cProfile.Profile()
            pr.enable()
            run_audit(paths, args, cache)
            pr.disable()
            pstats.Stats(pr).sort_stats("cumulative").print_stats(30)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
