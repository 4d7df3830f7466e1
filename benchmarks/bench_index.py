"""Exact search overhead: EmbeddingIndex.search vs raw FAISS IndexFlatL2.search, same data, same run.

    .venv/bin/python benchmarks/bench_index.py [--n 100000] [--dim 512] [--nq 10000] [--k 10] [--repeats 3]

Prints the best-of-repeats wall time of each and the ratio raw_time / our_time (target >= 0.95; best-of and median),
and checks the neighbours are identical and the distances equal sqrt(raw squared distances). The two are timed in
ABBA order so that drifting machine load hits both alike.
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
    ap.add_argument("--threads", type=int, default=None, help="FAISS/OpenMP threads (default: all cores)")
    args = ap.parse_args(argv)

    import faiss

    from diffaudit.index import EmbeddingIndex

    if args.threads:
        faiss.omp_set_num_threads(args.threads)

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

    t_raw, t_ours, c_raw, c_ours = [], [], [], []
    for r in range(args.repeats):
        # alternate which goes first (ABBA order) so slow drift of machine load hits both alike
        for which in (("raw", "ours") if r % 2 == 0 else ("ours", "raw")):
            t0, c0 = time.perf_counter(), time.process_time()
            if which == "raw":
                d_raw, i_raw = raw.search(xq, args.k)
                t_raw.append(time.perf_counter() - t0)
                c_raw.append(time.process_time() - c0)
            else:
                d_ours, i_ours = ours.search(xq, args.k)
                t_ours.append(time.perf_counter() - t0)
                c_ours.append(time.process_time() - c0)

    same_idx = np.array_equal(i_raw, i_ours)
    max_diff = float(np.abs(np.sqrt(np.maximum(d_raw, 0)) - d_ours).max())
    best_raw, best_ours = min(t_raw), min(t_ours)
    print(f"raw faiss IndexFlatL2.search : best {best_raw:.3f} s  (runs {', '.join(f'{t:.3f}' for t in t_raw)})")
    print(f"EmbeddingIndex.search        : best {best_ours:.3f} s  (runs {', '.join(f'{t:.3f}' for t in t_ours)})")
    print(f"ratio raw_time / our_time    : {best_raw / best_ours:.3f} best-of-{args.repeats}, "
          f"{float(np.median(t_raw)) / float(np.median(t_ours)):.3f} median  (target >= 0.95)")
    print(f"CPU-time ratio (process_time): {min(c_raw) / min(c_ours):.3f} best-of, "
          f"{float(np.median(c_raw)) / float(np.median(c_ours)):.3f} median  (less sensitive to other load)")
    print(f"identical neighbours: {same_idx}; max |sqrt(raw) - ours| = {max_diff:.2e}")
    return 0 if same_idx and max_diff <= 1e-5 * max(1.0, float(d_ours.max())) else 1


if __name__ == "__main__":
    raise SystemExit(main())
