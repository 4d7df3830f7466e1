"""Pixel duplicate search on adversarial image sets: its cost against one plain exact k-NN search, same run.

    .venv/bin/python benchmarks/bench_dedup_adversarial.py [--sizes 1000,4000,16000] [--side 32] [--json out.json]

The pixel duplicate finder searches coarse to fine (pooled vectors first, exact re-scoring after). Pooling cannot
separate images whose differences are fine-grained (noise averages out), and there the certification of each image's
nearest distinct neighbour used to degenerate towards all pairs. This script measures, per set and size:

* ``search``: ``duplicate_pairs`` (the search ``find_duplicates`` and the audit run, default threshold rule and
  default invariances), on vectors embedded beforehand (embedding time is not part of either figure);
* ``exact``: the plain exact k-NN search of the same vectors (FAISS ``IndexFlatL2``, k = 10, all images as queries),
  the cheapest exact search of the data there is;
* ``ratio`` = search / exact, the pairs found against the true ones, and whether the clusters (connected
  components of the pairs) equal the brute-force clusters (groups of more than 64 identical images are listed as a
  star, so their pair count is smaller than all pairs while the clusters stay complete).

Sets (``--side`` px RGB, uint8):

* ``noise``: uniformly random images, all distinct;
* ``noise-dup10``: n/10 random images, each present 10 times (45 true pairs per cluster);
* ``flat``: flat images of random grey levels (true pairs by brute force over the grey levels; the structure guard
  keeps only identical ones), raw pixels (``invariances=()``; with the default brightness invariance
  every flat image is a duplicate of every other, by definition, and the output alone is n^2/2 pairs);
* ``blank``: the same flat images with the default invariances: one group of identical (mean-centred) images,
  listed as a star of n - 1 pairs (groups of more than 64 identical images are);
* ``texture``: random smooth textures (sums of 6 random sinusoid gratings), all distinct but alike.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def make(kind: str, n: int, side: int, seed: int = 0):
    """(uint8 images (n, side, side, 3), number of true duplicate pairs)."""
    rng = np.random.default_rng(seed)
    if kind == "noise":
        return rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8), 0
    if kind == "noise-dup10":
        base = rng.integers(0, 256, (n // 10, side, side, 3), dtype=np.uint8)
        x = np.repeat(base, 10, axis=0)
        return x[rng.permutation(len(x))], (n // 10) * 45
    if kind == "blank":
        x, _ = make("flat", n, side, seed)
        return x, n - 1
    if kind == "flat":  # the true pairs depend on the threshold: see flat_truth
        g = rng.integers(0, 256, n).astype(np.uint8)
        return np.broadcast_to(g[:, None, None, None], (n, side, side, 3)).copy(), None
    if kind == "texture":
        yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
        out = np.empty((n, side, side, 3), np.uint8)
        for i in range(n):
            img = np.zeros((side, side, 3), np.float32)
            for _ in range(6):
                fx, fy = rng.uniform(-6, 6, 2)
                ph = rng.uniform(0, 2 * np.pi)
                col = rng.uniform(0.2, 1.0, 3)
                img += np.sin(2 * np.pi * (fx * xx + fy * yy) + ph)[..., None] * col
            out[i] = np.clip(128 + 20 * img, 0, 255).astype(np.uint8)
        return out, 0
    raise ValueError(kind)


def flat_truth(x: np.ndarray, V: np.ndarray, t: float) -> tuple[int, list[list[int]]]:
    """Pairs of flat images within L2 distance t, and their clusters, by brute force over the grey levels present
    (distances between the embedded vectors of one image per level, float64; ties within 1e-6 count)."""
    g = x[:, 0, 0, 0].astype(np.int64)
    levels, first = np.unique(g, return_index=True)
    R = V[first].astype(np.float64)
    D = np.sqrt(((R[:, None, :] - R[None, :, :]) ** 2).sum(-1))
    # the default rule's structure guard: within 1/3 of each image's own contrast -- flat images have none, so only
    # identical ones remain duplicates
    near = (D <= t * (1 + 1e-6)) & (D <= 0)
    counts = np.bincount(g, minlength=256)[levels]
    pairs = int((counts * (counts - 1) // 2).sum()) + int((np.triu(near, 1) * np.outer(counts, counts)).sum())
    from scipy.sparse.csgraph import connected_components

    _, lab = connected_components(near, directed=False)
    groups: dict[int, list[int]] = {}
    for i, li in enumerate(np.searchsorted(levels, g)):
        groups.setdefault(int(lab[li]), []).append(i)
    return pairs, [m for m in groups.values() if len(m) > 1]


def clusters_of(n: int, pairs) -> list[list[int]]:
    """Connected components (size > 1) of the found pairs."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    ab = np.asarray(list(pairs), dtype=np.int64).reshape(-1, 2)
    _, lab = connected_components(coo_matrix((np.ones(len(ab)), (ab[:, 0], ab[:, 1])), shape=(n, n)),
                                  directed=False)
    groups: dict[int, list[int]] = {}
    for i, li in enumerate(lab.tolist()):
        groups.setdefault(li, []).append(i)
    return [m for m in groups.values() if len(m) > 1]


def canon(groups) -> list[tuple[int, ...]]:
    return sorted(tuple(sorted(m)) for m in groups)


def run(kind: str, n: int, side: int) -> dict:
    import faiss

    from diffaudit.curate import duplicate_pairs
    from diffaudit.data import ImageSet
    from diffaudit.embedders import embed, get_embedder

    x, true_pairs = make(kind, n, side)
    emb = get_embedder("pixel")
    E = embed(ImageSet.from_arrays(x), emb, cache_dir=None)
    inv = () if kind == "flat" else None
    V = np.ascontiguousarray(E.vectors, dtype=np.float32)
    t0 = time.perf_counter()
    index = faiss.IndexFlatL2(V.shape[1])
    index.add(V)
    index.search(V, min(11, n))
    t_exact = time.perf_counter() - t0
    t0 = time.perf_counter()
    pairs, t, rule = duplicate_pairs(E, emb, invariances=inv)
    t_search = time.perf_counter() - t0
    if kind == "flat":
        true_pairs, true_groups = flat_truth(x, V, float(t))
    elif kind == "noise-dup10":
        true_groups = []  # make() lists no groups: recover them from the images themselves (exact copies)
        _, inv_ = np.unique(x.reshape(n, -1), axis=0, return_inverse=True)
        for gi in np.unique(inv_):
            true_groups.append(np.nonzero(inv_.reshape(-1) == gi)[0].tolist())
    elif kind == "blank":
        true_groups = [list(range(n))]
    else:
        true_groups = []
    ok = canon(clusters_of(n, pairs)) == canon(true_groups)
    return {"set": kind, "n": n, "side": side, "search_s": round(t_search, 3), "exact_s": round(t_exact, 3),
            "ratio": round(t_search / t_exact, 2), "pairs": len(pairs), "true_pairs": true_pairs,
            "clusters_equal_brute_force": bool(ok),
            "threshold": round(float(t), 4), "rule": rule}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1000,4000,16000")
    ap.add_argument("--sets", default="noise,noise-dup10,flat,blank,texture")
    ap.add_argument("--side", type=int, default=32)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    print(f"load average: {os.getloadavg()[0]:.2f} (cores: {os.cpu_count()})")
    print(f"{'set':<12} {'n':>6} {'search s':>9} {'exact s':>8} {'ratio':>6} {'pairs':>8} {'true':>8} {'clusters ok':>11}")
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        for kind in args.sets.split(","):
            r = run(kind, n, args.side)
            rows.append(r)
            print(f"{kind:<12} {n:>6} {r['search_s']:>9.2f} {r['exact_s']:>8.2f} {r['ratio']:>6.2f} "
                  f"{r['pairs']:>8} {r['true_pairs']:>8} {str(r['clusters_equal_brute_force']):>11}", flush=True)
    print(f"worst ratio: {max(r['ratio'] for r in rows):.2f}; load average now {os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
