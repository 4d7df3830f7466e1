"""Embedding pipeline throughput: folder of image files -> vectors, vs the model's forward pass alone.

    .venv/bin/python benchmarks/bench_embed.py [--n 2000] [--side 64] [--size 128] [--batch-size 64] [--rounds 1]

Writes N upscaled scikit-learn digits as PNG files (side x side) to a temporary folder, builds a realistic CNN
embedder -- a torchvision ResNet-18 with random weights, fc removed (512-d), exported to TorchScript and loaded as a
fake SSCD model (``SSCDEmbedder(resize="square", size=--size)``) -- and times:

* pipeline: ``embed(ImageSet.from_folder(folder), emb, cache=False)`` (scan + parallel decode + vectorised
  preprocessing + forward + L2 normalisation), the path users run;
* forward only: the same model and batch size on pre-decoded, pre-preprocessed, pre-stacked tensors.

Prints both throughputs and ``pipeline_throughput / forward_only_throughput`` (target >= 0.8 on 2 cores). The two
are timed alternately (``--rounds``) so machine noise hits both alike; reported: the ratio of the best rounds, and
the median of the per-round ratios (each round's two runs are adjacent in time: robust on a busy machine, where
``--n 256 --rounds 8`` gives steadier figures than one long round).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def write_digits(folder: Path, n: int, side: int) -> None:
    from PIL import Image
    from sklearn.datasets import load_digits

    x = load_digits().images  # (1797, 8, 8) in 0..16
    x = (x / 16.0 * 255.0).round().astype(np.uint8)
    rep = max(1, side // 8)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        a = x[i % len(x)].repeat(rep, 0).repeat(rep, 1)
        rgb = np.stack([a, np.roll(a, i % 7, axis=1), 255 - a], axis=2)  # distinct channels, distinct files
        rgb = np.clip(rgb.astype(np.int16) + rng.integers(-8, 9, rgb.shape), 0, 255).astype(np.uint8)
        Image.fromarray(rgb).save(folder / f"img_{i:06d}.png")


def make_model(path: Path) -> None:
    import torch
    import torchvision

    torch.manual_seed(0)
    m = torchvision.models.resnet18(weights=None)
    m.fc = torch.nn.Identity()
    m.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(m).save(str(path))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="number of image files")
    ap.add_argument("--side", type=int, default=64, help="side of the PNG files")
    ap.add_argument("--size", type=int, default=128, help="model input side (square resize)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=1, help="alternating timing rounds; best of each reported")
    ap.add_argument("--json", type=str, default=None, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)

    import torch

    from diffaudit.data import ImageSet
    from diffaudit.embedders import embed
    from diffaudit.embedders.sscd import SSCDEmbedder

    with tempfile.TemporaryDirectory(prefix="diffaudit-bench-embed-") as tmp:
        tmp = Path(tmp)
        folder = tmp / "images"
        t0 = time.perf_counter()
        write_digits(folder, args.n, args.side)
        weights = tmp / "resnet18_fake_sscd.torchscript.pt"
        make_model(weights)
        print(f"setup: {args.n} PNG files {args.side}px + ResNet-18 TorchScript in {time.perf_counter() - t0:.1f} s")

        emb = SSCDEmbedder(weights, resize="square", size=args.size, batch_size=args.batch_size, device="cpu")
        bs = args.batch_size
        print(f"embedder {emb.name}; torch {torch.__version__}, {torch.get_num_threads()} intra-op threads; "
              f"batch {bs}; input {args.size}x{args.size}")

        # pre-decoded, pre-stacked model inputs for the forward-only baseline (same preprocessing, done up front)
        images = ImageSet.from_folder(folder)
        decoded = [images.load(i) for i in range(len(images))]
        batches = []
        for s in range(0, len(decoded), bs):
            (idx, x), = emb.preprocess(decoded[s : s + bs])
            batches.append(x.contiguous())
        del decoded

        with torch.inference_mode():  # warm-up (allocator, oneDNN primitives)
            emb._forward(batches[0])
            emb._forward(batches[-1])

        def forward_only() -> float:
            t = time.perf_counter()
            with torch.inference_mode():
                for x in batches:
                    emb._forward(x)
            return time.perf_counter() - t

        in_forward = [0.0]  # wall time the pipeline spends inside the model's forward pass
        real_forward = emb._forward

        def timed_forward(x):
            t = time.perf_counter()
            try:
                return real_forward(x)
            finally:
                in_forward[0] += time.perf_counter() - t

        def pipeline() -> float:
            in_forward[0] = 0.0
            emb._forward = timed_forward
            try:
                t = time.perf_counter()
                out = embed(ImageSet.from_folder(folder), emb, cache=False, batch_size=bs)
                dt = time.perf_counter() - t
            finally:
                emb._forward = real_forward
            assert len(out) == args.n and out.vectors.shape[1] == 512
            share.append(in_forward[0] / dt)
            return dt

        share: list[float] = []

        t_fwd, t_pipe = [], []
        for r in range(args.rounds):
            t_fwd.append(forward_only())
            t_pipe.append(pipeline())
            print(f"round {r + 1}: forward-only {t_fwd[-1]:.2f} s, pipeline {t_pipe[-1]:.2f} s "
                  f"({100 * share[-1]:.1f}% of it inside the forward pass)")

    fwd_tp = args.n / min(t_fwd)
    pipe_tp = args.n / min(t_pipe)
    ratio = pipe_tp / fwd_tp
    paired = sorted(f / p for f, p in zip(t_fwd, t_pipe))  # each round's two runs are adjacent in time
    median_paired = float(np.median(paired))
    print(f"forward only : {fwd_tp:8.1f} images/s (best round)")
    print(f"pipeline     : {pipe_tp:8.1f} images/s (best round; folder scan + decode + preprocess + forward)")
    print(f"ratio pipeline_throughput / forward_only_throughput = {ratio:.3f} best-of, "
          f"{median_paired:.3f} median of per-round ratios  (target >= 0.8)")
    print(f"share of pipeline wall time spent in the forward pass: median {100 * float(np.median(share)):.1f}% "
          "(the rest: scan, decode not hidden behind the model, preprocessing, output handling)")
    try:
        load = os.getloadavg()[0]
        print(f"load average during the run: {load:.1f} on {os.cpu_count()} cores" +
              ("  (busy machine: figures are noisy; use more --rounds)" if load > (os.cpu_count() or 1) else ""))
    except OSError:  # pragma: no cover
        load = None
    if args.json:
        Path(args.json).write_text(json.dumps({
            "n": args.n, "side": args.side, "size": args.size, "batch_size": bs, "rounds": args.rounds,
            "forward_only_images_per_s": fwd_tp, "pipeline_images_per_s": pipe_tp, "ratio": ratio,
            "paired_ratios": paired, "median_paired_ratio": median_paired,
            "forward_share_of_pipeline": float(np.median(share)),
            "torch_threads": torch.get_num_threads(), "load_average": load,
        }, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
