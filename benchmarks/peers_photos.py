"""Immaculate (PyPI ``immaculate``; methods pdq, phash, sscd, sscd_distilled) on the photo set of
``bench_photos.py``, scored the same way. Runs in a Python >= 3.12 environment (Immaculate's requirement):

    PYENV_VERSION=3.12.1 python3 -m venv /tmp/v312 && /tmp/v312/bin/pip install "immaculate[sscd]"
    .venv/bin/python benchmarks/bench_photos.py --keep /tmp/photoset --sscd-weights ...   # diffaudit, same folder
    /tmp/v312/bin/python benchmarks/peers_photos.py /tmp/photoset

Immaculate reports sets (exact and near); every pair inside a set counts as a reported pair. Time: the
``find_duplicates`` call, imports excluded. Peak memory: the process's ``ru_maxrss`` after each method (a high-water
mark, so it only grows).
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time
from itertools import combinations
from pathlib import Path

KINDS = ("exact", "jpeg", "crop", "resize", "bright", "hflip")


def score(pairs, truth, blank=frozenset()) -> dict:
    """Precision over all pairs, and over the pairs that do not join two *blank* patches (standard deviation under
    2 grey levels: e.g. the black border of the retina photograph -- identical once their mean is removed, which a
    curator would call duplicates although they are distinct crops)."""
    found = {frozenset(p) for p in pairs}
    tp = found & set(truth)
    nonblank = {p for p in found if not p <= blank}
    out = {"pairs": len(found), "precision": round(len(tp) / len(found), 3) if found else None,
           "blank_pairs": len(found) - len(nonblank),
           "precision_nonblank": round(len(tp & nonblank) / len(nonblank), 3) if nonblank else None,
           "recall": round(len(tp) / len(truth), 3)}
    for kind in KINDS:
        want = {k for k, v in truth.items() if v == kind}
        out[f"recall_{kind}"] = round(len(want & found) / len(want), 3)
    return out


def main() -> None:
    import immaculate

    root = Path(sys.argv[1])
    t = json.loads((root / "truth.json").read_text())
    truth = {frozenset(p[:2]): p[2] for p in t["pairs"]}
    blank = frozenset(t["blank"])
    folder = root / "photos"
    print(f"immaculate {immaculate.__version__}; load average {os.getloadavg()[0]:.2f} (cores: {os.cpu_count()})")
    rows = {}
    for method in ("pdq", "phash", "sscd", "sscd_distilled"):
        t0 = time.perf_counter()
        d = immaculate.find_duplicates(folder, method)
        secs = time.perf_counter() - t0
        pairs = [(a.name, b.name) for group in list(d.exact) + list(d.near) for a, b in combinations(group, 2)]
        rows[method] = {"find_s": round(secs, 2), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                        // 1024, **score(pairs, truth, blank)}
        r = rows[method]
        print(f"{method:<15} {r['pairs']:>6} {str(r['precision']):>6} {str(r['precision_nonblank']):>6} "
              f"{r['recall']:>6} " + " ".join(f"{r['recall_' + k]:>6}" for k in KINDS) + f"  {secs:.2f} s")
    if len(sys.argv) > 2:
        Path(sys.argv[2]).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
