#!/usr/bin/env python3
"""Peak memory when embedding a 100k-image folder: decoded images must be streamed, not all held at once.

    .venv/bin/python benchmarks/bench_memory.py [--n 100000] [--side 32] [--embedder pixel:8] [--folder DIR]
                                                [--json out.json]

1. Writes ``--n`` synthetic ``side x side`` RGB PNGs (a per-image colour gradient plus a random 4x4 pattern, so no two
   are alike) into ``--folder`` (default ``/tmp/diffaudit-bench-<n>x<side>``) in 1000-file subfolders, in parallel
   (one process per core). Reused when a previous run completed it.
2. Runs ``ImageSet.from_folder(folder)`` + ``embed(images, embedder, cache_dir=<fresh>)`` -- the path ``diffaudit
   dedup`` / ``audit`` take -- in a child process under ``/usr/bin/time -v`` (``apt-get install time``; falls back to
   the child's ``resource.getrusage``). The child also records its own peak RSS (``ru_maxrss``, a high-water mark)
   after the imports, after the folder scan, after a 512-image warm-up embed (lazy imports, allocator, thread pools:
   a fixed cost) and after embedding everything, so one run gives the baseline and the increments.
3. Prints the peak RSS against what would have to be in memory: the output vectors (``n x dim`` float32, returned to
   the caller), the embedding cache's in-memory copy (float16), and -- for comparison -- all decoded images at once
   (``n x side x side x 3`` bytes), which a non-streaming implementation would hold.

The default embedder ``pixel:8`` (192-d vectors, 77 MB for 100k) keeps the output well below the decoded images
(307 MB for 100k 32x32), so the two can be told apart; ``--embedder pixel`` (native 32x32 -> 3072-d, 1.2 GB output)
shows the case where the output vectors dominate.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PER_DIR = 1000
MARKER = "COMPLETE.json"


def _write_chunk(args) -> int:
    folder, start, stop, side = args
    import numpy as np
    from PIL import Image

    d = Path(folder) / f"{start // PER_DIR:04d}"
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(start)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / max(side - 1, 1)
    for i in range(start, stop):
        a, b, c = rng.uniform(0, 255, 3)
        base = np.stack([a * xx + (255 - a) * yy, b * yy + c * (1 - xx), (a + b + c) / 3 * (xx * yy)], axis=2)
        pat = rng.integers(0, 64, (4, 4, 3)).repeat(side // 4 or 1, 0).repeat(side // 4 or 1, 1)[:side, :side]
        img = np.clip(base[: pat.shape[0], : pat.shape[1]] + pat, 0, 255).astype(np.uint8)
        Image.fromarray(img).save(d / f"img_{i:06d}.png", format="PNG", compress_level=1)
    return stop - start


def ensure_images(folder: Path, n: int, side: int, workers: int) -> dict:
    marker = folder / MARKER
    want = {"n": n, "side": side}
    if marker.is_file():
        try:
            if {k: v for k, v in json.loads(marker.read_text()).items() if k in want} == want:
                return {"generated": False, "seconds": 0.0}
        except (OSError, json.JSONDecodeError):
            pass
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    t0 = time.perf_counter()
    chunks = [(str(folder), s, min(s + PER_DIR, n), side) for s in range(0, n, PER_DIR)]
    with ProcessPoolExecutor(max_workers=workers) as ex:
        done = sum(ex.map(_write_chunk, chunks, chunksize=4))
    secs = time.perf_counter() - t0
    assert done == n
    marker.write_text(json.dumps({**want, "seconds": round(secs, 1)}))
    return {"generated": True, "seconds": secs}


def _rss_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kilobytes


def _rss_now_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(folder: str, embedder: str, cache: str, baseline: bool = False) -> None:
    """The measured process: imports, scan, embed; prints one JSON line. ``baseline``: the imports only."""
    out = {"rss_start_mb": _rss_peak_mb()}
    t0 = time.perf_counter()
    import numpy as np  # noqa: F401
    import torch

    from diffaudit.data import ImageSet
    from diffaudit.embedders import embed, get_embedder

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    out["peak_after_import_mb"] = _rss_peak_mb()
    if baseline:
        print("RESULT " + json.dumps(out), flush=True)
        return
    t1 = time.perf_counter()
    images = ImageSet.from_folder(folder)
    out["scan_s"] = time.perf_counter() - t1
    out["peak_after_scan_mb"] = _rss_peak_mb()
    out["rss_after_scan_mb"] = _rss_now_mb()
    # warm-up: the first batches load lazy modules and size torch's allocator and thread pools (a fixed cost)
    embed(images.subset(range(min(512, len(images)))), get_embedder(embedder), cache=False, batch_size=256)
    out["peak_after_warmup_mb"] = _rss_peak_mb()
    t2 = time.perf_counter()
    emb = embed(images, get_embedder(embedder), cache_dir=cache)
    out["embed_s"] = time.perf_counter() - t2
    out["peak_after_embed_mb"] = _rss_peak_mb()
    out["rss_after_embed_mb"] = _rss_now_mb()
    out.update(n=len(emb.ids), dim=int(emb.vectors.shape[1]), vectors_mb=emb.vectors.nbytes / 2**20,
               skipped=len(emb.skipped), embedder=emb.embedder, total_s=time.perf_counter() - t0)
    print("RESULT " + json.dumps(out), flush=True)


def run_child(folder: Path, embedder: str, baseline: bool = False) -> dict:
    cache = tempfile.mkdtemp(prefix="diffaudit-bench-mem-cache-")
    cmd = [sys.executable, __file__, "--child", "--folder", str(folder), "--embedder", embedder, "--cache", cache]
    if baseline:
        cmd.append("--baseline")
    gnu_time = shutil.which("time") if os.path.exists("/usr/bin/time") else None
    if gnu_time:
        cmd = ["/usr/bin/time", "-v", *cmd]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    shutil.rmtree(cache, ignore_errors=True)
    if p.returncode != 0:
        raise SystemExit(f"child failed ({p.returncode}):\n{p.stderr[-4000:]}")
    res = next(json.loads(ln[7:]) for ln in p.stdout.splitlines() if ln.startswith("RESULT "))
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
    if m:
        res["peak_rss_mb"] = int(m.group(1)) / 1024.0
        res["measured_by"] = "/usr/bin/time -v"
    else:
        after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        res["peak_rss_mb"] = max(after, before) / 1024.0
        res["measured_by"] = "getrusage(RUSAGE_CHILDREN)"
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--side", type=int, default=32)
    ap.add_argument("--embedder", default="pixel:8")
    ap.add_argument("--folder", type=Path, default=None)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--cache", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--baseline", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        child(str(a.folder), a.embedder, a.cache, baseline=a.baseline)
        return 0
    folder = a.folder or Path(tempfile.gettempdir()) / f"diffaudit-bench-{a.n}x{a.side}"
    gen = ensure_images(folder, a.n, a.side, a.workers)
    print(f"images: {a.n:,} PNGs {a.side}x{a.side} in {folder} "
          + (f"(generated in {gen['seconds']:.0f} s with {a.workers} processes)" if gen["generated"] else "(reused)"))
    base = run_child(folder, a.embedder, baseline=True)
    r = run_child(folder, a.embedder)
    decoded_all_mb = a.n * a.side * a.side * 3 / 2**20
    cache_copy_mb = r["n"] * r["dim"] * 2 / 2**20  # float16 shards kept in memory by the cache object
    above_scan = r["peak_after_embed_mb"] - r["peak_after_warmup_mb"]
    rows = [
        ("peak RSS, whole embedding run", r["peak_rss_mb"], r["measured_by"]),
        ("peak RSS, baseline run: imports only, then exit", base["peak_rss_mb"], r["measured_by"]),
        ("  difference", r["peak_rss_mb"] - base["peak_rss_mb"], f"what the {a.n:,} images cost"),
        ("high-water marks inside the embedding run:", float("nan"), "ru_maxrss"),
        ("  after imports (python + numpy + torch + diffaudit)", r["peak_after_import_mb"], ""),
        ("  after scanning the folder (ids, sizes, keys)", r["peak_after_scan_mb"], ""),
        ("  after a 512-image warm-up embed (lazy imports, allocator, threads)", r["peak_after_warmup_mb"], ""),
        (f"  after embedding all {r['n']:,}", r["peak_after_embed_mb"], ""),
        ("  increase while embedding", above_scan, "after embedding - after warm-up"),
        (f"output vectors ({r['n']:,} x {r['dim']} float32)", r["vectors_mb"], "returned to the caller"),
        ("cache's in-memory copy (float16)", cache_copy_mb, ""),
        (f"all decoded images at once ({a.n:,} x {a.side}x{a.side}x3 uint8)", decoded_all_mb, "NOT held (streamed)"),
    ]
    for label, mb, note in rows:
        print(f"{label:<70} " + (f"{mb:9.1f} MB  " if mb == mb else " " * 14) + note)
    print(f"scan {r['scan_s']:.1f} s, embed {r['embed_s']:.1f} s ({r['n'] / max(r['embed_s'], 1e-9):,.0f} images/s), "
          f"{r['skipped']} skipped, embedder {r['embedder']}")
    verdict = above_scan < r["vectors_mb"] + cache_copy_mb + 0.5 * decoded_all_mb
    print("streamed: the increase while embedding stays below output + cache copy + half of all decoded images"
          if verdict else "WARNING: the increase while embedding is as large as holding the decoded images")
    if a.json:
        a.json.write_text(json.dumps({"n": a.n, "side": a.side, "generation": gen, "decoded_all_mb": decoded_all_mb,
                                      "baseline_peak_rss_mb": base["peak_rss_mb"],
                                      "cache_copy_mb": cache_copy_mb, "increase_while_embedding_mb": above_scan,
                                      "streamed": verdict, **r}, indent=1))
    return 0 if verdict else 1


if __name__ == "__main__":
    sys.exit(main())
