#!/usr/bin/env python3
"""Cost of the sample-quality metrics (FD with its bootstrap CI and floor, precision/recall/density/coverage) as a
fraction of one audit, measured in the same run: the audit's wall time, and the time spent inside
``EmbedderReference.quality`` (wrapped with a timer).

    python benchmarks/bench_quality_cost.py RUN_DIR --train DIR --heldout DIR [--samples 128] [--inference-steps 25]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffaudit import reference  # noqa: E402
from diffaudit.audit import audit  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run")
    ap.add_argument("--train", required=True)
    ap.add_argument("--heldout", required=True)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--inference-steps", type=int, default=25)
    ap.add_argument("--embedder", nargs="+", default=["pixel"])
    args = ap.parse_args()
    spent = [0.0, 0]
    real = reference.EmbedderReference.quality

    def timed(self, *a, **k):
        t = time.perf_counter()
        try:
            return real(self, *a, **k)
        finally:
            spent[0] += time.perf_counter() - t
            spent[1] += 1

    reference.EmbedderReference.quality = timed
    t0 = time.perf_counter()
    res = audit(checkpoints=args.run, train=args.train, heldout=args.heldout, embedders=args.embedder,
                num_samples=args.samples, num_inference_steps=args.inference_steps, seed=0)
    total = time.perf_counter() - t0
    out = {"checkpoints": len(res.checkpoints), "samples": args.samples, "audit_s": round(total, 2),
           "quality_s": round(spent[0], 3), "quality_calls": spent[1], "fraction": round(spent[0] / total, 4),
           "load": os.getloadavg()}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
