"""Memorization curve of the embedded demo (diffaudit/demo.py), measured independently of the audit code.

Trains the demo DDPM at two training-set sizes, then at every checkpoint draws ``--num-samples`` DDIM samples
(``--ddim-steps`` steps, eta 0, the same initial noise at every checkpoint) from the EMA weights (``unet_ema/``, what
the audit reads by default) and from the raw weights (``unet/``), and computes by brute-force numpy the
fraction passing Gu et al.'s (2023) 1/3 rule: d(nearest training image) / d(second nearest) < 1/3, pixel L2 on the
uint8-quantised images scaled to [0, 1].

    .venv/bin/python benchmarks/demo_curve.py                 # full demo settings
    .venv/bin/python benchmarks/demo_curve.py --quick         # the --quick settings
    .venv/bin/python benchmarks/demo_curve.py --steps 2000 --lr 2e-3 --sizes 16 1024

Writes JSON to benchmarks/results/demo_curve[-quick].json (or --json) and prints one table per size.
"""
from __future__ import annotations

import argparse
import inspect
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from diffaudit.demo import DEMO_SETTINGS, train_digits_ddpm  # noqa: E402


def ddim_samples(unet, train_scheduler_config, noise: torch.Tensor, ddim_steps: int) -> np.ndarray:
    """DDIM (eta=0) from fixed initial noise -> uint8 NHW."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(train_scheduler_config)
    sched.set_timesteps(ddim_steps)
    x = noise.clone()
    unet.eval()
    with torch.no_grad():
        for t in sched.timesteps:
            eps = unet(x, t).sample
            x = sched.step(eps, t, x, eta=0.0).prev_sample
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x[:, 0].numpy()


def one_third_rule(samples_u8: np.ndarray, train_u8: np.ndarray, threshold: float = 1 / 3) -> dict:
    """Brute force: all pairwise L2 distances in [0,1] pixel space; ratio of nearest to second nearest."""
    s = samples_u8.reshape(len(samples_u8), -1).astype(np.float64) / 255.0
    t = train_u8.reshape(len(train_u8), -1).astype(np.float64) / 255.0
    d = np.sqrt(np.maximum(((s[:, None, :] - t[None, :, :]) ** 2).sum(-1), 0.0))
    d.sort(axis=1)
    ratio = d[:, 0] / np.maximum(d[:, 1], 1e-12)
    return {
        "fraction": float((ratio < threshold).mean()),
        "fraction_half": float((ratio < 0.5).mean()),
        "median_ratio": float(np.median(ratio)),
        "median_d1": float(np.median(d[:, 0])),
    }


def run_size(n_train: int, args, root: Path) -> dict:
    out = root / f"n{n_train}"
    t0, c0 = time.perf_counter(), time.process_time()
    run = train_digits_ddpm(
        out, n_train=n_train, steps=args.steps, checkpoint_every=args.every, batch_size=args.batch_size, lr=args.lr,
        seed=args.seed, image_size=args.image_size, num_train_timesteps=args.timesteps,
        beta_schedule=args.beta_schedule, device="cpu", num_threads=args.threads, progress=args.progress,
    )
    train_total = time.perf_counter() - t0
    train_cpu = time.process_time() - c0  # = wall time on an idle machine with 1 thread; robust to other load
    from diffusers import DDPMScheduler, UNet2DModel

    cfg = DDPMScheduler.from_pretrained(run.run_dir / "scheduler").config
    torch.set_num_threads(args.threads or 1)  # one thread: as fast at 8x8, and robust on a busy machine
    g = torch.Generator().manual_seed(12345)
    noise = torch.randn(args.num_samples, 1, args.image_size, args.image_size, generator=g)
    rows = []
    t_sample = 0.0
    for step, ckpt in zip(run.checkpoint_steps, run.checkpoint_dirs):
        subs = ["unet_ema", "unet"] if (ckpt / "unet_ema").is_dir() else ["unet"]
        res = {}
        for sub in subs:
            unet = UNet2DModel.from_pretrained(ckpt / sub)
            ts = time.perf_counter()
            samples = ddim_samples(unet, cfg, noise, args.ddim_steps)
            t_sample += time.perf_counter() - ts
            res[sub] = one_third_rule(samples, run.train_images[..., 0])
        r = dict(res[subs[0]])  # the weights the audit reads
        r["weights"] = subs[0]
        r["raw_fraction"] = res["unet"]["fraction"]
        r["step"] = step
        r["loss"] = float(run.losses[max(0, step - 100) : step].mean())
        rows.append(r)
        print(f"  n={n_train:5d} step {step:5d}  frac1/3 {r['fraction']:.3f}  frac1/2 {r['fraction_half']:.3f}  "
              f"med ratio {r['median_ratio']:.3f}  med d1 {r['median_d1']:.3f}  loss {r['loss']:.4f}  "
              f"(raw weights: frac1/3 {r['raw_fraction']:.3f})", flush=True)
    return {
        "n_train": n_train,
        "train_seconds": run.train_seconds,
        "train_total_seconds": train_total,
        "train_cpu_seconds": train_cpu,
        "sample_seconds_per_checkpoint": t_sample / sum(2 if c["weights"] == "unet_ema" else 1 for c in rows),
        "curve": rows,
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="use DEMO_SETTINGS['quick'] for sizes/steps/every")
    p.add_argument("--sizes", type=int, nargs="+", default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--every", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=8)
    p.add_argument("--timesteps", type=int, default=1000)
    p.add_argument("--beta-schedule", default=inspect.signature(train_digits_ddpm).parameters["beta_schedule"].default)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--num-samples", type=int, default=128)
    p.add_argument("--ddim-steps", type=int, default=50)
    p.add_argument("--progress", action="store_true")
    p.add_argument("--out", default=None, help="training output folder (default: a temporary folder)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    preset = DEMO_SETTINGS["quick" if args.quick else "full"]
    args.sizes = args.sizes or [preset["small"], preset["large"]]
    args.steps = args.steps or preset["steps"]
    args.every = args.every or preset["checkpoint_every"]

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out) if args.out else Path(tmp)
        results = [run_size(n, args, root) for n in args.sizes]
    settings = {k: v for k, v in vars(args).items() if k not in ("json", "out", "progress")}
    report = {"settings": settings, "torch_threads": torch.get_num_threads(), "runs": results}
    for r in results:
        print(f"n={r['n_train']}: training {r['train_seconds']:.1f} s wall ({r['train_total_seconds']:.1f} s incl. setup, "
              f"{r['train_cpu_seconds']:.1f} s CPU), "
              f"sampling {r['sample_seconds_per_checkpoint']:.2f} s/checkpoint; fraction by step: "
              + " ".join(f"{c['step']}:{c['fraction']:.2f}" for c in r["curve"])
              + " | raw weights: " + " ".join(f"{c['raw_fraction']:.2f}" for c in r["curve"]))
    path = Path(args.json) if args.json else (
        Path(__file__).parent / "results" / ("demo_curve-quick.json" if args.quick else "demo_curve.json"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    print("wrote", path)


if __name__ == "__main__":
    main()
