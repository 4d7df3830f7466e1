"""Scale benchmark of EmbeddingIndex: build time, query throughput, peak memory and recall at 10k, 100k and 1M vectors.

    .venv/bin/python benchmarks/bench_scale.py [--sizes 10000,100000,1000000] [--nq 10000] [--k 10]
                                               [--exact-nq 1000] [--workdir /tmp/diffaudit-scale] [--out benchmarks/results]

Data: synthetic 512-d vectors from a mixture of 1024 Gaussians (uneven cluster sizes; each cluster has a random rank-16
covariance plus isotropic noise, so that the data has the low intrinsic dimension of real image embeddings), stored
**float16 on disk** in one ``.npy`` file (1M x 512 x 2 B = 1 GB) read through a memory map. 1% of the vectors are
planted near-duplicates: a copy of an earlier vector plus small Gaussian noise (about 1/50 of the typical
nearest-neighbour distance). Every size is a prefix of the same file (sources of planted copies always lie in the
prefix). Queries: 10k fresh draws from the same mixture.

Per size, in a fresh subprocess (so that ``ru_maxrss`` is that size's own peak):

1. ``EmbeddingIndex(kind="auto", store_dtype="float16")`` built from the memory-mapped vectors (exact below 200k
   vectors, IVF with exact re-scoring above): build time, then ``search(queries, k)`` throughput, peak RSS;
2. the index saved and re-loaded with ``load(..., mmap=True)`` (the re-scoring vectors stay float16 on disk): save /
   load time, and a check that the re-loaded index returns the same neighbours;
3. planted-duplicate recall: for each planted copy, is its source its nearest other vector
   (:func:`diffaudit.index.self_neighbors`, the search ``find_duplicates`` runs)?
4. the exact index (``kind="exact"``) on the same vectors as the reference: recall@1 (the auto index's top-1 has the
   exact top-1 distance) and recall@k, on all queries up to 100k vectors and on ``--exact-nq`` queries above.

Prints a table, writes ``scale.json`` and ``scale.png`` (search cost per query against N, log-log) to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DIM = 512
CLUSTERS = 1024
RANK = 16
CHUNK = 10_000  # generation unit; sizes must be multiples
DUP_PER_CHUNK = 100  # 1% planted near-duplicates
DUP_SIGMA = 0.004  # per-coordinate noise of a planted copy (L2 ~ 0.09 vs ~4.5 to a distinct nearest neighbour)


# ----------------------------------------------------------------------------------------------------- data
class Mixture:
    def __init__(self, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.centers = rng.standard_normal((CLUSTERS, DIM), dtype=np.float32)
        self.bases = (rng.standard_normal((CLUSTERS, DIM, RANK), dtype=np.float32) / np.sqrt(DIM)).astype(np.float32)
        self.scale = rng.uniform(0.5, 1.5, CLUSTERS).astype(np.float32)
        w = rng.pareto(1.5, CLUSTERS) + 0.1  # uneven cluster sizes
        self.weights = w / w.sum()

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        c = rng.choice(CLUSTERS, size=n, p=self.weights)
        z = rng.standard_normal((n, RANK), dtype=np.float32)
        x = 0.05 * rng.standard_normal((n, DIM), dtype=np.float32)
        order = np.argsort(c, kind="stable")
        bounds = np.searchsorted(c[order], np.arange(CLUSTERS + 1))
        for j in range(CLUSTERS):  # per cluster: centre + its rank-16 subspace (grouped: one matmul per cluster)
            rows = order[bounds[j]:bounds[j + 1]]
            if len(rows):
                x[rows] += self.centers[j] + (2.0 * self.scale[j]) * (z[rows] @ self.bases[j].T)
        return x


def generate(workdir: Path, n_max: int, nq: int, seed: int = 0) -> dict:
    """Write vectors.npy (float16, n_max x DIM), queries.npy (float32), dups.npy ((dup_row, source_row) pairs)."""
    workdir.mkdir(parents=True, exist_ok=True)
    meta_path = workdir / "data.json"
    want = {"n": n_max, "nq": nq, "seed": seed, "dim": DIM, "clusters": CLUSTERS, "rank": RANK,
            "dup_per_chunk": DUP_PER_CHUNK, "dup_sigma": DUP_SIGMA, "chunk": CHUNK, "version": 2}
    if meta_path.exists() and json.loads(meta_path.read_text()) == want:
        return want
    t0 = time.perf_counter()
    mix = Mixture(seed)
    vec = np.lib.format.open_memmap(workdir / "vectors.npy.tmp", mode="w+", dtype=np.float16, shape=(n_max, DIM))
    dups = []
    for ci, s in enumerate(range(0, n_max, CHUNK)):
        rng = np.random.default_rng([seed, 1, ci])
        x = mix.sample(CHUNK, rng)
        src = rng.choice(CHUNK // 2, DUP_PER_CHUNK, replace=False)
        dst = CHUNK // 2 + rng.choice(CHUNK // 2, DUP_PER_CHUNK, replace=False)
        x[dst] = x[src] + DUP_SIGMA * rng.standard_normal((DUP_PER_CHUNK, DIM), dtype=np.float32)
        vec[s:s + CHUNK] = x
        dups.append(np.stack([dst + s, src + s], axis=1))
    vec.flush()
    del vec
    os.replace(workdir / "vectors.npy.tmp", workdir / "vectors.npy")
    np.save(workdir / "dups.npy", np.concatenate(dups).astype(np.int64))
    np.save(workdir / "queries.npy", mix.sample(nq, np.random.default_rng([seed, 2])))
    meta_path.write_text(json.dumps(want))
    print(f"generated {n_max} x {DIM} float16 vectors in {time.perf_counter() - t0:.1f} s -> {workdir}", flush=True)
    return want


# ----------------------------------------------------------------------------------------------------- one size
def _rss_mb() -> float:
    """Peak resident memory of this process so far (MB): VmHWM, which starts afresh at exec (ru_maxrss would carry
    the parent's peak over a fork)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:  # pragma: no cover - not Linux
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_size(workdir: Path, n: int, nq: int, k: int, exact_nq: int, nprobe: int | None, repeats: int = 1) -> dict:
    import faiss

    from diffaudit.index import EmbeddingIndex, self_neighbors

    res: dict = {"n": n, "threads": faiss.omp_get_max_threads()}
    allv = np.load(workdir / "vectors.npy", mmap_mode="r")
    vec = allv[:n]
    queries = np.load(workdir / "queries.npy")[:nq]
    dups = np.load(workdir / "dups.npy")
    dups = dups[dups[:, 0] < n]
    rss0 = _rss_mb()

    # 1. auto index from the memory-mapped float16 vectors (added in blocks: never a full float32 copy)
    t0, c0 = time.perf_counter(), time.process_time()
    index = EmbeddingIndex(DIM, "l2", kind="auto", store_dtype="float16", use_gpu=False, nprobe=nprobe)
    for s in range(0, n, 65536):
        index.add(vec[s:s + 65536])
    index.build()
    res["build_s"] = time.perf_counter() - t0
    res["kind"] = index.built_kind
    res["nlist"] = index.nlist if index.built_kind == "ivf" else None
    res["nprobe"] = index.nprobe if index.built_kind == "ivf" else None
    res["build_cpu_s"] = time.process_time() - c0
    times, cpus = [], []
    for _ in range(repeats):  # machine shared with other jobs: the fastest of a few runs
        t0, c1 = time.perf_counter(), time.process_time()
        D, I = index.search(queries, k)
        times.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c1)
    res["search_s"] = min(times)
    res["search_cpu_s"] = min(cpus)
    res["search_runs_s"] = times
    res["qps"] = nq / res["search_s"]
    res["ms_per_query"] = 1000 * res["search_s"] / nq
    res["peak_rss_mb"] = _rss_mb()
    res["rss_before_mb"] = rss0

    # 2. save + load(mmap=True): same neighbours from the re-loaded index
    m = min(nq, 1000)
    Dm, Im = index.search(queries[:m], k)  # same batch as after re-loading (BLAS blocking changes the last bits)
    path = workdir / f"index-{n}"
    t0 = time.perf_counter()
    index.save(path)
    res["save_s"] = time.perf_counter() - t0
    res["disk_mb"] = sum(f.stat().st_size for f in path.iterdir()) / 2**20
    del index
    t0 = time.perf_counter()
    index = EmbeddingIndex.load(path, mmap=True, use_gpu=False)
    res["load_s"] = time.perf_counter() - t0
    D2, I2 = index.search(queries[:m], k)
    res["reload_same"] = bool(np.array_equal(I2, Im) and np.array_equal(D2, Dm))

    # 3. planted near-duplicates: the source is the copy's nearest other vector
    t0 = time.perf_counter()
    S1, I1 = self_neighbors(index, 1, rows=dups[:, 0])
    res["dup_search_s"] = time.perf_counter() - t0
    res["dup_pairs"] = int(len(dups))
    res["dup_recall"] = float(np.mean(I1[:, 0] == dups[:, 1])) if len(dups) else float("nan")
    res["dup_max_dist"] = float(S1[:, 0].max()) if len(dups) else float("nan")
    del index
    import shutil

    shutil.rmtree(path, ignore_errors=True)  # up to 3 GB at 1M

    # 4. exact reference (float32 copy of the same float16 values) on a query subsample
    ne = nq if n <= 100_000 else min(nq, exact_nq)
    t0 = time.perf_counter()
    exact = EmbeddingIndex(DIM, "l2", kind="exact", use_gpu=False)
    for s in range(0, n, 65536):
        exact.add(vec[s:s + 65536])
    exact.build()
    res["exact_build_s"] = time.perf_counter() - t0
    t0, c1 = time.perf_counter(), time.process_time()
    De, Ie = exact.search(queries[:ne], k, refine=True)
    res["exact_search_s"] = time.perf_counter() - t0
    res["exact_search_cpu_s"] = time.process_time() - c1
    res["exact_nq"] = ne
    res["exact_ms_per_query"] = 1000 * res["exact_search_s"] / ne
    d1, e1 = D[:ne, 0], De[:, 0]
    tol = 1e-5 * np.maximum(1.0, e1)
    res["recall_at_1"] = float(np.mean((I[:ne, 0] == Ie[:, 0]) | (np.abs(d1 - e1) <= tol)))
    res["recall_at_k"] = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(I[:ne], Ie)]))
    res["exact_peak_rss_mb"] = _rss_mb()
    return res


# ----------------------------------------------------------------------------------------------------- report
def plot(results: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [r["n"] for r in results]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    ax.plot(ns, [r["exact_ms_per_query"] for r in results], "o-", label="exact (IndexFlatL2)")
    ax.plot(ns, [r["ms_per_query"] for r in results], "s-",
            label="auto (exact < 200k, IVF + exact re-scoring above)")
    for r in results:
        ax.annotate(f"{r['kind']}\nR@1={r['recall_at_1']:.3f}", (r["n"], r["ms_per_query"]),
                    textcoords="offset points", xytext=(-10, 10), fontsize=7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("vectors in the index (N, 512-d)")
    ax.set_ylabel("search cost per query, k=10 (ms)")
    ax.set_title(f"EmbeddingIndex search cost vs N ({results[0]['threads']} CPU threads)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "scale.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def table(results: list[dict]) -> str:
    head = ("| N | index | build s (CPU s) | queries/s (k=10) | ms/query | exact ms/query | peak RSS (MB) | recall@1 vs exact "
            "| recall@10 | planted-dup recall | save / load-mmap (s) |")
    rows = [head, "|" + "---|" * 11]
    for r in results:
        kind = r["kind"] + (f" nlist={r['nlist']} nprobe={r['nprobe']}" if r["kind"] == "ivf" else "")
        rows.append(
            f"| {r['n']:,} | {kind} | {r['build_s']:.1f} ({r['build_cpu_s']:.0f}) | {r['qps']:,.0f} | "
            f"{r['ms_per_query']:.3f} | "
            f"{r['exact_ms_per_query']:.3f} | {r['peak_rss_mb']:,.0f} | {r['recall_at_1']:.4f} (n={r['exact_nq']}) | "
            f"{r['recall_at_k']:.4f} | {r['dup_recall']:.4f} ({r['dup_pairs']} pairs) | "
            f"{r['save_s']:.1f} / {r['load_s']:.1f} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--nq", type=int, default=10_000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--exact-nq", type=int, default=1000, help="queries checked against exact above 100k vectors")
    ap.add_argument("--nprobe", type=int, default=None, help="override the IVF nprobe default")
    ap.add_argument("--repeats", type=int, default=3, help="search timings per size below 1M (fastest reported)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/diffaudit-scale"))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--replot", action="store_true", help="only re-draw the table and plot from OUT/scale.json")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.replot:
        results = json.loads((args.out / "scale.json").read_text())
        print(table(results))
        print(f"\nplot: {plot(results, args.out)}")
        return 0

    if args.child is not None:
        res = run_size(args.workdir, args.child, args.nq, args.k, args.exact_nq, args.nprobe,
                       args.repeats if args.child < 1_000_000 else 1)
        print("RESULT " + json.dumps(res), flush=True)
        return 0

    sizes = [int(s) for s in args.sizes.split(",")]
    if any(s % CHUNK for s in sizes):
        raise SystemExit(f"--sizes must be multiples of {CHUNK}; got {sizes}")
    generate(args.workdir, max(sizes), args.nq)
    results = []
    for n in sizes:
        cmd = [sys.executable, __file__, "--child", str(n), "--nq", str(args.nq), "--k", str(args.k),
               "--exact-nq", str(args.exact_nq), "--workdir", str(args.workdir), "--repeats", str(args.repeats)]
        if args.nprobe:
            cmd += ["--nprobe", str(args.nprobe)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stdout, proc.stderr, file=sys.stderr)
            raise SystemExit(f"size {n} failed with exit code {proc.returncode}")
        line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
        r = json.loads(line[len("RESULT "):])
        r["wall_s"] = time.perf_counter() - t0
        results.append(r)
        print(f"N={n:,}: {r['kind']} build {r['build_s']:.1f} s, {r['qps']:,.0f} q/s, peak {r['peak_rss_mb']:,.0f} MB, "
              f"recall@1 {r['recall_at_1']:.4f}, dup recall {r['dup_recall']:.4f}, reload same {r['reload_same']} "
              f"({r['wall_s']:.0f} s)", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scale.json").write_text(json.dumps(results, indent=2))
    print()
    print(table(results))
    print(f"\nplot: {plot(results, args.out)}")
    ok = all(r["recall_at_1"] >= 0.99 and r["dup_recall"] >= 0.99 and r["reload_same"] for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
