"""Pixel duplicate search at growing N: time, peak memory, and recall/precision on planted copies.

    .venv/bin/python benchmarks/bench_dedup_scale.py [--sizes 10000,30000,100000] [--side 32]

Data (in memory, ``ImageSet.from_arrays``): N distinct random smooth images (4x4 RGB noise upscaled to ``--side``,
bilinear), 1% of them replaced by planted copies of earlier images: a third exact, a third mirrored, a third
brightened by +8 grey levels. Each size runs ``find_duplicates(images)`` with the defaults (brightness + hflip
invariances, exact coarse-to-fine search) in a fresh process, after a cold ``embed`` into a temporary cache;
reported: embedding time, search time (``find_duplicates`` reading the cached vectors), peak RSS (``VmHWM``), pairs,
precision (a pair is true when both images are the same source or its copies -- two copies of one source are
duplicates too; the random images themselves are far apart) and recall of the planted (source, copy) pairs.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make(n: int, side: int, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(n, 4, 4, 3), dtype=np.uint8)
    x = np.stack([np.asarray(Image.fromarray(b).resize((side, side), Image.BILINEAR)) for b in base])
    n_copy = n // 100
    copies = rng.choice(np.arange(n // 2, n), size=n_copy, replace=False)
    truth = []
    for j, c in enumerate(copies.tolist()):
        src = int(rng.integers(0, n // 2))
        kind = ("exact", "hflip", "bright")[j % 3]
        x[c] = x[src] if kind == "exact" else x[src][:, ::-1] if kind == "hflip" else np.clip(
            x[src].astype(np.int16) + 8, 0, 255).astype(np.uint8)
        truth.append((src, c, kind))
    return x, truth


def child(n: int, side: int, compare: bool = False) -> dict:
    from diffaudit.curate import find_duplicates
    from diffaudit.data import ImageSet
    from diffaudit.embedders import embed, get_embedder

    x, truth = make(n, side)
    images = ImageSet.from_arrays(x)
    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        embed(images, get_embedder("pixel"), cache_dir=cache)  # cold: decoding + cache writes
        t1 = time.perf_counter()
        rep = find_duplicates(images, cache_dir=cache)  # the embeddings now come from the cache
        t2 = time.perf_counter()
        ref = {}
        if compare:  # raw pixels: the coarse-to-fine search vs the plain exact k-NN search it replaced
            from diffaudit.curate import _indexed_duplicates

            t3 = time.perf_counter()
            raw = find_duplicates(images, cache_dir=cache, invariances=())
            t4 = time.perf_counter()
            E = embed(images, get_embedder("pixel"), cache_dir=cache)
            emb = get_embedder("pixel")
            emb.prepare(images)
            t5 = time.perf_counter()
            old_pairs, old_t, _ = _indexed_duplicates(E, emb, 10, None)
            t6 = time.perf_counter()
            pos0 = {i: k for k, i in enumerate(images.ids)}
            same = {frozenset((pos0[p.id_a], pos0[p.id_b])) for p in raw.pairs} == {frozenset(k) for k in old_pairs}
            ref = {"raw_coarse_to_fine_s": t4 - t3, "raw_plain_knn_s": t6 - t5, "raw_same_pairs": same,
                   "raw_thresholds": [raw.threshold, old_t]}
    pos = {i: k for k, i in enumerate(images.ids)}
    got = {frozenset((pos[p.id_a], pos[p.id_b])) for p in rep.pairs}
    want = {frozenset((a, b)) for a, b, _ in truth}
    family = np.arange(n)  # a copy belongs to its source's family; copies of one source are duplicates too
    for a, b, _ in truth:
        family[b] = a
    true_pairs = [g for g in got if len({int(family[i]) for i in g}) == 1]
    by_kind = {k: sum(frozenset((a, b)) in got for a, b, kk in truth if kk == k) / max(1, sum(kk == k for *_, kk in truth))
               for k in ("exact", "hflip", "bright")}
    hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
    return {"n": n, "side": side, "embed_s": t1 - t0, "find_duplicates_s": t2 - t1, "peak_rss_mb": hwm / 1024,
            "pairs": len(got), "precision": len(true_pairs) / len(got) if got else float("nan"),
            "recall": len(got & want) / len(want),
            "recall_by_kind": by_kind, "threshold_rule": rep.threshold_rule, **ref}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10000,30000,100000")
    ap.add_argument("--side", type=int, default=32)
    ap.add_argument("--compare", action="store_true", help="also time raw pixels: coarse-to-fine vs plain exact k-NN")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "dedup_scale.json")
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.side, a.compare)))
        return 0
    rows = []
    for n in (int(s) for s in a.sizes.split(",")):
        r = subprocess.run([sys.executable, __file__, "--child", str(n), "--side", str(a.side)]
                           + (["--compare"] if a.compare else []), capture_output=True, text=True, check=True)
        row = json.loads(r.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"N={n:>7,}: embed {row['embed_s']:.1f} s, find_duplicates {row['find_duplicates_s']:.1f} s, peak RSS "
              f"{row['peak_rss_mb']:,.0f} MB, {row['pairs']} pairs, precision {row['precision']:.3f}, recall "
              f"{row['recall']:.3f} {row['recall_by_kind']}", flush=True)
        if "raw_plain_knn_s" in row:
            print(f"    raw pixels: coarse-to-fine {row['raw_coarse_to_fine_s']:.1f} s vs plain exact k-NN "
                  f"{row['raw_plain_knn_s']:.1f} s (ratio {row['raw_plain_knn_s'] / row['raw_coarse_to_fine_s']:.2f}x), "
                  f"same pairs: {row['raw_same_pairs']}, thresholds {row['raw_thresholds']}", flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
