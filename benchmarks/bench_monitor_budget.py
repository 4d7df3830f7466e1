"""The monitor's cost at its defaults, as a fraction of training time, on the demo and on a 32-px run.

    .venv/bin/python benchmarks/bench_monitor_budget.py [--steps 2000] [--steps32 600] [--json out.json]

Each run trains twice with the same seed (``diffaudit.training.train_digits_ddpm``, the demo's recipe): once with
no callback (the baseline wall time) and once with a ``MemorizationMonitor`` at its **defaults** (256 samples,
25 DDIM steps, ``time_budget=0.10``, ``min_samples=64``) evaluating every ``--every`` steps. Printed: the baseline
and monitored wall times, their ratio - 1 (the monitor's real overhead), the time inside ``update`` over the
monitored run's training time, the evaluations made and what the budget changed, and the same with
``time_budget=None`` (the monitor without a budget) for comparison.

* demo: 16 digits at 8 px, the demo's tiny UNet, 2000 steps;
* 32 px: 16 digits upscaled to 32 px, the same UNet family at 32 px (more pixels per sample and per step).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time


def run(image_size: int, steps: int, every: int, budget, seed: int = 0) -> dict:
    from diffaudit.data import ImageSet
    from diffaudit.demo import make_demo_scheduler
    from diffaudit.monitor import MemorizationMonitor
    from diffaudit.training import train_digits_ddpm

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        base = train_digits_ddpm(os.path.join(tmp, "plain"), steps=steps, checkpoint_every=steps, seed=seed,
                                 image_size=image_size, num_threads=2)
        t_plain = time.perf_counter() - t0
        mon = MemorizationMonitor(ImageSet.from_arrays(base.train_images), every_n_steps=every,
                                  scheduler=make_demo_scheduler(), cache_dir=os.path.join(tmp, "cache"),
                                  time_budget=budget)
        spent = [0.0]

        def cb(step, unet):
            t = time.perf_counter()
            stop = mon.update(step, unet)
            spent[0] += time.perf_counter() - t
            return False  # train to the end either way: the same work as the baseline

        t0 = time.perf_counter()
        train_digits_ddpm(os.path.join(tmp, "mon"), steps=steps, checkpoint_every=steps, seed=seed,
                          image_size=image_size, num_threads=2, callback=cb)
        t_mon = time.perf_counter() - t0
    return {"image_size": image_size, "steps": steps, "every": every, "time_budget": budget,
            "plain_s": round(t_plain, 1), "monitored_s": round(t_mon, 1),
            "overhead": round(t_mon / t_plain - 1, 4), "in_update_fraction": round(spent[0] / (t_mon - spent[0]), 4),
            "evaluations": mon.evaluated_steps, "adaptations": mon.adaptations, "onset_step": mon.onset_step}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--steps32", type=int, default=600)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f} (cores: {os.cpu_count()})")
    rows = []
    for size, steps in ((8, args.steps), (32, args.steps32)):
        for budget in (0.10, None):
            r = run(size, steps, args.every, budget)
            rows.append(r)
            print(f"{size:>2} px {steps:>5} steps budget {str(budget):>5}: plain {r['plain_s']:7.1f} s, monitored "
                  f"{r['monitored_s']:7.1f} s, overhead {r['overhead']:+.1%}, in update {r['in_update_fraction']:.1%}"
                  f", {len(r['evaluations'])} evaluations, onset {r['onset_step']}; adaptations {r['adaptations']}",
                  flush=True)
    print(f"load average now {os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
