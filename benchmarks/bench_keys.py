#!/usr/bin/env python3
"""What content-hash cache keys cost on a 100k-file folder, against stat-based keys and against decoding.

    .venv/bin/python benchmarks/bench_keys.py [--n 100000] [--side 32] [--folder DIR]

The embedding cache keys each file by a hash of its bytes (blake2b), so two different images can never share an
entry whatever their names, sizes and times. This script measures, on the folder of ``bench_memory.py`` (written
by it when missing), in a fresh child process (the key memo empty):

* ``stat``: the former key's cost -- one ``os.stat`` per file and a key string from path, size and mtime;
* ``hash cold``: ``ImageSet.item_keys()`` the first time (reads and hashes every file);
* ``hash warm``: the second call (memoised per path, size, mtime and inode: a stat per file);
* ``decode``: decoding every image (``ImageSet.iter_batches``), the least any first embedding costs.

The files were just written or read, so they sit in the page cache: the cold figure is hashing, not disk reads.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def child(folder: str) -> dict:
    from diffaudit.data import ImageSet

    images = ImageSet.from_folder(folder)
    paths = [str(images.path(i)) for i in range(len(images))]
    t0 = time.perf_counter()
    keys = []
    for p in paths:
        st = os.stat(p)
        keys.append(f"{p}:{st.st_size}:{st.st_mtime_ns}")
    t_stat = time.perf_counter() - t0
    t0 = time.perf_counter()
    images.item_keys()
    t_cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    images.item_keys()
    t_warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in images.iter_batches(512):
        pass
    t_decode = time.perf_counter() - t0
    return {"n": len(images), "stat_s": t_stat, "hash_cold_s": t_cold, "hash_warm_s": t_warm, "decode_s": t_decode}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--side", type=int, default=32)
    ap.add_argument("--folder", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child)))
        return 0
    from bench_memory import ensure_images

    folder = Path(args.folder or f"/tmp/diffaudit-bench-{args.n}x{args.side}")
    ensure_images(folder, args.n, args.side, os.cpu_count() or 1)
    load = os.getloadavg()[0]
    out = subprocess.run([sys.executable, __file__, "--child", str(folder)], capture_output=True, text=True,
                         check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"load average {load:.2f} (cores: {os.cpu_count()}); {r['n']:,} files in {folder}")
    print(f"stat keys (old)      {r['stat_s']:7.2f} s")
    print(f"content keys, cold   {r['hash_cold_s']:7.2f} s  ({r['hash_cold_s'] / r['stat_s']:.1f}x stat keys; "
          f"{r['hash_cold_s'] / r['decode_s']:.0%} of decoding)")
    print(f"content keys, warm   {r['hash_warm_s']:7.2f} s  ({r['hash_warm_s'] / r['stat_s']:.1f}x stat keys)")
    print(f"decoding all images  {r['decode_s']:7.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
