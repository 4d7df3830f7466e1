"""Exact search overhead: EmbeddingIndex.search vs raw FAISS IndexFlatL2.search, same data, same run.

    .venv/bin/python benchmarks/bench_index.py [--n 100000] [--dim 512] [--nq 10000] [--k 10] [--repeats 3]

Prints the best-of-repeats wall time of each and the ratio raw_time / our_time (target >= 0.95), and checks the
neighbours are identical and the distances equal sqrt(raw squared distances). The two are timed alternately so that
machine noise hits both alike.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--nq", type=int, default=10_000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    import faiss

    from diffaudit.index import EmbeddingIndex

    rng = np.random.default_rng(0)
    xb = rng.standard_normal((args.n, args.dim), dtype=np.float32)
    xq = rng.standard_normal((args.nq, args.dim), dtype=np.float32)
    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads; "
          f"N={args.n} dim={args.dim} queries={args.nq} k={args.k}")

    raw = faiss.IndexFlatL2(args.dim)
    raw.add(xb)
    ours = EmbeddingIndex(args.dim, "l2", kind="exact", use_gpu=False)
    ours.add(xb)
    ours.build()  # build outside the timing (raw.add is outside too)

    t_raw, t_ours = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        d_raw, i_raw = raw.search(xq, args.k)
        t_raw.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        d_ours, i_ours = ours.search(xq, args.k)
        t_ours.append(time.perf_counter() - t0)

    same_idx = np.array_equal(i_raw, i_ours)
    max_diff = float(np.abs(np.sqrt(np.maximum(d_raw, 0)) - d_ours).max())
    best_raw, best_ours = min(t_raw), min(t_ours)
    print(f"raw faiss IndexFlatL2.search : best {best_raw:.3f} s  (runs {', '.join(f'{t:.3f}' for t in t_raw)})")
    print(f"EmbeddingIndex.search        : best {best_ours:.3f} s  (runs {', '.join(f'{t:.3f}' for t in t_ours)})")
    print(f"ratio raw_time / our_time    : {best_raw / best_ours:.3f}  (target >= 0.95)")
    print(f"identical neighbours: {same_idx}; max |sqrt(raw) - ours| = {max_diff:.2e}")
    return 0 if same_idx and max_diff <= 1e-5 * max(1.0, float(d_ours.max())) else 1


if __name__ == "__main__":
    raise SystemExit(main())
