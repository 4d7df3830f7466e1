"""The peer duplicate finders on the photo set of ``bench_photos.py``, scored the same way:

* Immaculate (PyPI ``immaculate``; methods pdq, phash, sscd, sscd_distilled) -- needs Python >= 3.12:

      PYENV_VERSION=3.12.1 python3 -m venv /tmp/v312 && /tmp/v312/bin/pip install "immaculate[sscd]"
      /tmp/v312/bin/python benchmarks/peers_photos.py /tmp/photoset [out.json]

* imagededup (phash, dhash, whash, ahash; default max_distance_threshold 10) and cleanvision (exact + near duplicate
  sets) -- in the peers venv of ``setup_peers.sh``:

      /work/peers-venv/bin/python benchmarks/peers_photos.py /tmp/photoset [out.json]

  (``.venv/bin/python benchmarks/bench_photos.py --keep /tmp/photoset ...`` writes the folder and scores diffaudit.)

* diffaudit's ``dedup --preset photos`` (when diffaudit is importable; the packaged SSCD needs Python >= 3.12, so
  the Immaculate venv with diffaudit installed runs both): whole processes, alternating with Immaculate's sscd run
  the same way, median of 3 each, and the time ratio of the two.

Every tool importable in the running interpreter is run; the others are listed as not installed. A tool reporting
sets (Immaculate, cleanvision) counts every pair inside a set. Time: the duplicate search call, imports excluded.
Peak memory: the process's ``ru_maxrss`` after each method (a high-water mark, so it only grows).
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


def score(pairs, truth, blank=frozenset(), identical=()) -> dict:
    """Precision over all pairs, and over the pairs that do not join two *blank* patches (standard deviation under
    2 grey levels: e.g. the black border of the retina photograph -- identical once their mean is removed, which a
    curator would call duplicates although they are distinct crops). ``identical``: groups of files with equal
    pixels; ``precision_identical`` / ``recall_identical`` count the pairs inside a group as duplicates too (the
    digits benchmark's ground truth)."""
    found = {frozenset(p) for p in pairs}
    tp = found & set(truth)
    nonblank = {p for p in found if not p <= blank}
    same = {frozenset((a, b)) for g in identical for a, b in combinations(sorted(g), 2)}
    truth_i = set(truth) | same
    out = {"pairs": len(found), "precision": round(len(tp) / len(found), 3) if found else None,
           "blank_pairs": len(found) - len(nonblank),
           "precision_nonblank": round(len(tp & nonblank) / len(nonblank), 3) if nonblank else None,
           "recall": round(len(tp) / len(truth), 3)}
    if same:
        out["precision_identical"] = round(len(found & truth_i) / len(found), 3) if found else None
        out["recall_identical"] = round(len(found & truth_i) / len(truth_i), 3)
    for kind in KINDS:
        want = {k for k, v in truth.items() if v == kind}
        out[f"recall_{kind}"] = round(len(want & found) / len(want), 3)
    return out


def _immaculate(folder: Path):
    import immaculate

    for method in ("pdq", "phash", "sscd", "sscd_distilled"):
        t0 = time.perf_counter()
        d = immaculate.find_duplicates(folder, method)
        secs = time.perf_counter() - t0
        yield (f"immaculate-{method}", secs,
               [(a.name, b.name) for group in list(d.exact) + list(d.near) for a, b in combinations(group, 2)])


def _imagededup(folder: Path):
    from imagededup import methods

    for name, cls in (("phash", methods.PHash), ("dhash", methods.DHash), ("whash", methods.WHash),
                      ("ahash", methods.AHash)):
        t0 = time.perf_counter()
        dups = cls(verbose=False).find_duplicates(image_dir=str(folder))
        secs = time.perf_counter() - t0
        yield f"imagededup-{name}", secs, sorted({tuple(sorted((a, b))) for a, bs in dups.items() for b in bs})


def _cleanvision(folder: Path):
    from cleanvision import Imagelab

    t0 = time.perf_counter()
    lab = Imagelab(data_path=str(folder), verbose=False)
    lab.find_issues({"exact_duplicates": {}, "near_duplicates": {}}, verbose=False)
    secs = time.perf_counter() - t0
    groups = [[Path(p).name for p in st] for it in ("exact_duplicates", "near_duplicates") for st in lab.info[it]["sets"]]
    yield "cleanvision", secs, [(a, b) for g in groups for a, b in combinations(g, 2)]


def _diffaudit_preset(folder: Path, repeats: int = 3):
    """``diffaudit dedup --preset photos`` as a user runs it: a fresh process, a cold cache, HTML + JSON + CSV written;
    the time is the whole process (imports, embedding, verification, outputs), the median of ``repeats`` runs. When
    Immaculate is importable its sscd method runs the same way (a whole process each), alternating with diffaudit,
    so that the two medians share the machine's state."""
    import statistics
    import subprocess
    import tempfile

    import diffaudit  # noqa: F401  (ImportError: not installed in this interpreter)

    try:
        import immaculate  # noqa: F401
        peer = True
    except ImportError:
        peer = False
    ours, theirs, doc = [], [], None
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            res = subprocess.run([sys.executable, "-m", "diffaudit", "dedup", str(folder), "--preset", "photos", "-o",
                                  f"{tmp}/out", "--cache", f"{tmp}/cache"], capture_output=True, text=True)
            ours.append(time.perf_counter() - t0)
            if res.returncode:
                raise RuntimeError((res.stdout + res.stderr).strip().splitlines()[-1])
            doc = json.loads(Path(f"{tmp}/out/duplicates.json").read_text())
        if peer:
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", f"import immaculate; immaculate.find_duplicates({str(folder)!r}, "
                            "'sscd')"], check=True, capture_output=True)
            theirs.append(time.perf_counter() - t0)
    if theirs:
        med_o, med_t = statistics.median(ours), statistics.median(theirs)
        print(f"whole processes, alternating, median of {repeats}: diffaudit --preset photos {med_o:.2f} s, "
              f"Immaculate sscd {med_t:.2f} s: ratio {med_o / med_t:.2f}x (runs: "
              f"{', '.join(f'{v:.1f}' for v in ours)} vs {', '.join(f'{v:.1f}' for v in theirs)})", flush=True)
        _diffaudit_preset.whole = {"diffaudit_s": ours, "immaculate_sscd_s": theirs, "ratio": round(med_o / med_t, 3)}
    yield "diffaudit-preset-photos", statistics.median(ours), [(p["id_a"], p["id_b"]) for p in doc["pairs"]]


def main() -> None:
    root = Path(sys.argv[1])
    t = json.loads((root / "truth.json").read_text())
    truth = {frozenset(p[:2]): p[2] for p in t["pairs"]}
    blank = frozenset(t["blank"])
    identical = t.get("identical", [])
    folder = root / "photos"
    print(f"python {sys.version.split()[0]}; load average {os.getloadavg()[0]:.2f} (cores: {os.cpu_count()})")
    print(f"{'tool':<22} {'pairs':>6} {'prec':>6} {'p-nb':>6} {'recall':>6} " + " ".join(f"{k:>6}" for k in KINDS))
    rows = {}
    for tool, run in (("immaculate", _immaculate), ("imagededup", _imagededup), ("cleanvision", _cleanvision),
                      ("diffaudit", _diffaudit_preset)):
        try:
            for name, secs, pairs in run(folder):
                rows[name] = {"find_s": round(secs, 2),
                              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
                              **score(pairs, truth, blank, identical)}
                r = rows[name]
                print(f"{name:<22} {r['pairs']:>6} {str(r['precision']):>6} {str(r['precision_nonblank']):>6} "
                      f"{r['recall']:>6} " + " ".join(f"{r['recall_' + k]:>6}" for k in KINDS) + f"  {secs:.2f} s",
                      flush=True)
        except ImportError as e:
            rows[tool] = {"not_installed": str(e)}
            print(f"{tool:<22} not installed in this interpreter ({e})")
        except RuntimeError as e:
            rows[tool] = {"error": str(e)}
            print(f"{tool:<22} not run: {e}")
    whole = getattr(_diffaudit_preset, "whole", None)
    if whole:
        rows["whole_process_diffaudit_vs_immaculate_sscd"] = whole
    if len(sys.argv) > 2:
        Path(sys.argv[2]).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
