#!/usr/bin/env python3
"""Reproduce the two time scales of diffusion training with diffaudit itself (CPU, digits, the demo's UNet).

Bonnaire, Urfin, Biroli & Mezard (NeurIPS 2025) and Favero, Sclocchi & Wyart (2025): sample quality reaches its plateau
at tau_gen, independent of the training-set size n, and memorization starts at tau_mem, proportional to n.

For each n the demo UNet is trained on n digits (EMA weights, log-spaced checkpoints) and audited by ``audit()``
(pixel embedder, held-out digits); tau_mem is the audit's onset step and tau_gen its quality plateau
(:func:`diffaudit.onset.tau_gen`). The exponent a of tau_mem ~ n^a is fitted by least squares in log-log with a 95%
bootstrap CI over the n's that memorized within the step budget; n* is the smallest n that did not. With
``--compare`` a second run per n is trained on a disjoint set of n digits and ``compare_runs`` measures at the last
common checkpoint how often the two runs' samples agree (Kadkhodaie et al. 2024).

    python benchmarks/bench_laws.py --out /tmp/laws [--ns 16 32 64 128] [--budget 6000] [--compare 16 64]

Writes ``laws.json`` and ``laws.png`` (matplotlib) in ``--out`` and prints a table.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffaudit.audit import audit  # noqa: E402
from diffaudit.compare import compare_runs  # noqa: E402
from diffaudit.training import train_digits_ddpm  # noqa: E402


def log_steps(lo: int, hi: int, per_octave: int = 2) -> list[int]:
    k = int(math.floor(math.log2(hi / lo) * per_octave))
    return sorted({int(round(lo * 2 ** (i / per_octave), -1)) for i in range(k + 1)} | {hi})


def fit_exponent(ns, taus, seed=0):
    x, y = np.log(np.asarray(ns, float)), np.log(np.asarray(taus, float))
    a = float(np.polyfit(x, y, 1)[0])
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(2000):
        i = rng.integers(0, len(x), len(x))
        if len(set(i.tolist())) >= 2:
            boots.append(np.polyfit(x[i], y[i], 1)[0])
    lo, hi = np.quantile(boots, [0.025, 0.975]) if boots else (float("nan"), float("nan"))
    return a, float(lo), float(hi)


def train_or_reuse(folder: Path, **kw):
    """Train a run, or reuse the one a previous invocation wrote there with the same settings (train_log.json)."""
    from types import SimpleNamespace

    log = folder / "train_log.json"
    if log.is_file():
        cfg = json.loads(log.read_text())["config"]
        if all(cfg.get(k) == v for k, v in kw.items() if k in cfg):
            return SimpleNamespace(run_dir=folder / "ddpm", train_dir=folder / "train", heldout_dir=folder / "heldout")
    return train_digits_ddpm(folder, **kw)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--ns", type=int, nargs="+", default=[16, 32, 64, 128])
    ap.add_argument("--budget", type=int, default=6000, help="training steps of every run")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--inference-steps", type=int, default=25)
    ap.add_argument("--compare", type=int, nargs="*", default=None, metavar="N",
                    help="also run the disjoint-split test for these n (no value: every n)")
    args = ap.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    budget = args.budget
    steps_at = log_steps(100, budget)
    rows = []
    t_all = time.perf_counter()
    for n in args.ns:
        t0 = time.perf_counter()
        run = train_or_reuse(out / f"n{n}", n_train=n, steps=budget, checkpoint_at=steps_at, seed=0)
        t_train = time.perf_counter() - t0  # ~0 when the run was reused
        t1 = time.perf_counter()
        res = audit(checkpoints=str(run.run_dir), train=str(run.train_dir), heldout=str(run.heldout_dir),
                    num_samples=args.samples, num_inference_steps=args.inference_steps, seed=0,
                    out_dir=out / f"n{n}" / "audit", cache_dir=str(out / "cache"))
        row = {"n": n, "tau_mem": res.onset.onset_step, "tau_gen": res.onset.tau_gen,
               "recommended": res.onset.recommended_step, "window_empty": res.onset.window_empty,
               "train_s": round(t_train, 1), "audit_s": round(time.perf_counter() - t1, 1),
               "curve": [{"step": c.step, "mem": c.onset_signal.value if c.onset_signal else None,
                          "fd": next(iter(c.metrics.values())).quality.fd.value} for c in res.checkpoints]}
        if args.compare is not None and (not args.compare or n in args.compare):
            # the same seeded permutation (seed 0): A = digits 256..256+n, B = the next n -- disjoint by construction
            other = train_or_reuse(out / f"n{n}b", n_train=n, n_heldout=256 + n, steps=budget,
                                   checkpoint_at=steps_at, seed=0)
            cmp = compare_runs(str(run.run_dir), str(other.run_dir), str(run.train_dir), str(other.train_dir),
                               num_samples=args.samples, num_inference_steps=args.inference_steps,
                               cache_dir=str(out / "cache"))
            row["agreement"] = [{"step": c.step, "agreement": c.agreement.value, "copies_a": c.copies_a.value,
                                 "copies_b": c.copies_b.value} for c in cmp.checkpoints]
        rows.append(row)
        print(f"n={n:4d}: tau_gen {row['tau_gen']}, tau_mem {row['tau_mem']}, keep {row['recommended']} "
              f"(train {row['train_s']} s, audit {row['audit_s']} s)", flush=True)
    mem = [(r["n"], r["tau_mem"]) for r in rows if r["tau_mem"] is not None]
    fit = fit_exponent(*zip(*mem)) if len(mem) >= 2 else None
    n_star = next((r["n"] for r in rows if r["tau_mem"] is None), None)
    summary = {"budget_steps": budget, "checkpoints": steps_at, "rows": rows, "n_star": n_star,
               "exponent": None if fit is None else {"a": fit[0], "ci95": [fit[1], fit[2]]},
               "seconds": round(time.perf_counter() - t_all, 1), "cpus": os.cpu_count(),
               "load": os.getloadavg()}
    (out / "laws.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: summary[k] for k in ("n_star", "exponent", "seconds", "load")}))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        for r in rows:
            st = [p["step"] for p in r["curve"]]
            ax1.plot(st, [p["mem"] for p in r["curve"]], marker="o", label=f"n={r['n']}")
            ax2.plot(st, [p["fd"] for p in r["curve"]], marker="o", label=f"n={r['n']}")
        for ax, t in ((ax1, "memorized fraction (d1/d2 < 1/3)"), (ax2, "Frechet distance to held-out (pixels)")):
            ax.set_xscale("log"), ax.set_xlabel("training step"), ax.set_title(t), ax.legend(fontsize=8)
        ax2.set_yscale("log")
        fig.tight_layout()
        fig.savefig(out / "laws.png", dpi=110)
    except ImportError:  # pragma: no cover
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
