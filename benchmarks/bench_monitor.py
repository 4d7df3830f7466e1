"""Training monitor on the embedded demo: overhead (fraction of training time) and detection lag.

(a) Overhead. Trains the demo's small set (diffaudit.demo.train_digits_ddpm) twice with the same seed: once with no
    callback and once with the MemorizationMonitor the demo attaches (diffaudit.demo.demo_monitor, at the demo's
    default cadence). Reports (T_monitor - T_plain) / T_plain and, measured directly, the time spent inside
    ``monitor.update`` over the training time without it. Both runs write checkpoints every ``--dense-every`` steps
    (the same writes, so they cancel), and their per-step losses must agree exactly: the monitor must not perturb
    training (it restores the RNG state and the train/eval modes).

(b) Detection lag. Ground truth is measured independently of the audit code: at every dense checkpoint (default
    every 100 steps), ``--gt-samples`` DDIM samples (``--gt-steps`` steps, eta 0, per-sample noise fixed across
    checkpoints by CheckpointSampler with seed ``--gt-seed``, distinct from the monitor's) are matched by brute-force
    numpy against the training digits in [0, 1] pixel space; memorized = nearest / second-nearest distance < 1/3
    (Gu et al. 2023). Wilson 95% interval in closed form. Ground-truth onset = first dense step whose Wilson lower
    bound exceeds the monitor's threshold (0.02); also reported: first step whose point fraction exceeds it.
    Monitor: ``flag`` = the step at which ``update`` first returned True (the confirming evaluation, patience 2) and
    ``onset_step`` (the first step of the confirming run). Lag = monitor step - ground-truth step; the target is
    lag(flag) <= one evaluation interval.

``--variants`` also replays other monitor settings offline on the dense checkpoints (``monitor.evaluate`` on the
loaded weights gives what the callback would have seen at that step) and estimates their overhead from the measured
cost per evaluation: used to choose the demo's settings.

    .venv/bin/python benchmarks/bench_monitor.py            # full demo settings (2000 steps)
    .venv/bin/python benchmarks/bench_monitor.py --quick    # the --quick settings (800 steps)

Writes JSON to benchmarks/results/bench_monitor[-quick].json (or --json). Notes the load average: the machine may be
shared, and every timing here is wall-clock.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from diffaudit.demo import DEMO_MONITOR, DEMO_PATIENCE, DEMO_SETTINGS, demo_monitor, make_demo_scheduler, train_digits_ddpm  # noqa: E402

Z95 = 1.959963984540054


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval (closed form)."""
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, mid - half), min(1.0, mid + half)


def one_third_fraction(samples_u8: np.ndarray, train_u8: np.ndarray, threshold: float = 1 / 3) -> tuple[int, int]:
    """Brute force over all (sample, training image) pairs: how many samples have d1 / d2 < threshold."""
    s = samples_u8.reshape(len(samples_u8), -1).astype(np.float64) / 255.0
    t = train_u8.reshape(len(train_u8), -1).astype(np.float64) / 255.0
    d = np.sqrt(np.maximum(((s[:, None, :] - t[None, :, :]) ** 2).sum(-1), 0.0))
    d.sort(axis=1)
    ratio = d[:, 0] / np.maximum(d[:, 1], 1e-12)
    return int((ratio < threshold).sum()), len(ratio)


def load_unet(ckpt_dir: Path):
    """The weights the monitor and the audit evaluate: the EMA UNet (``unet_ema/``) when the run keeps one (the demo
    does), else the training weights (``unet/``)."""
    from diffusers import UNet2DModel

    ema = ckpt_dir / "unet_ema"
    return UNet2DModel.from_pretrained(ema if (ema / "config.json").is_file() else ckpt_dir / "unet")


def ground_truth(run, n_samples: int, ddim_steps: int, seed: int, threshold: float) -> dict:
    import torch

    from diffaudit.sampling import CheckpointSampler

    torch.set_num_threads(1)  # 8x8: a second thread gains nothing and, on a loaded machine, costs 10x

    sampler = CheckpointSampler(make_demo_scheduler(), n_samples, seed=seed, num_inference_steps=ddim_steps,
                                sampler="ddim", batch_size=128, device="cpu")
    train_gray = run.train_images[..., 0]
    rows = []
    for step, d in zip(run.checkpoint_steps, run.checkpoint_dirs):
        batch = sampler.sample(load_unet(d))
        assert batch.finite_mask.all(), f"non-finite samples at step {step}"
        k, n = one_third_fraction(batch.images[..., 0], train_gray)
        lo, hi = wilson(k, n)
        rows.append({"step": step, "k": k, "n": n, "fraction": k / n, "low": lo, "high": hi})
    first = lambda key: next((r["step"] for r in rows if r[key] > threshold), None)  # noqa: E731
    return {"rows": rows, "onset_low": first("low"), "onset_point": first("fraction")}


def train(out: Path, s: dict, steps: int, dense: int, seed: int, callback=None):
    return train_digits_ddpm(out, n_train=int(s["small"]), steps=steps, checkpoint_every=dense, seed=seed,
                             callback=callback)


def variants(run, s: dict, seed: int, specs: list[dict], t_plain: float, steps: int) -> list[dict]:
    """Replay monitor settings offline on the dense checkpoints; overhead estimated from the cost per evaluation."""
    import torch

    out = []
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # as inside train_digits_ddpm at 8x8
    try:
        for spec in specs:
            every = int(spec["every"])
            mon = demo_monitor(run.train_images, run.heldout_images, seed=seed, every_n_steps=every,
                               **_settings_from(spec))
            flag, cost = None, []
            for step, d in zip(run.checkpoint_steps, run.checkpoint_dirs):
                if step % every:
                    continue
                unet = load_unet(d)
                unet.train()
                t0 = time.perf_counter()
                stop = mon.update(step, unet)
                cost.append(time.perf_counter() - t0)
                if stop and flag is None:
                    flag = step
            n_evals = steps // every
            est = float(np.median(cost)) * n_evals / t_plain if cost else float("nan")
            out.append({**spec, "flag": flag, "onset_step": mon.onset_step, "eval_seconds_median": float(np.median(cost)),
                        "overhead_estimate": est,
                        "fractions": {c.step: round(c.onset_signal.value, 4) for c in mon.history if c.onset_signal}})
    finally:
        torch.set_num_threads(old)
    return out


def _settings_from(spec: dict) -> dict:
    from diffaudit.monitor import OnsetRule

    m = {"samples": "num_samples", "ddim": "num_inference_steps", "loss_images": "loss_max_images"}
    out = {m[k]: v for k, v in spec.items() if k in m}
    if "patience" in spec:
        out["rule"] = OnsetRule(patience=int(spec["patience"]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the demo's --quick settings")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dense-every", type=int, default=100)
    ap.add_argument("--gt-samples", type=int, default=128)
    ap.add_argument("--gt-steps", type=int, default=25)
    ap.add_argument("--gt-seed", type=int, default=1000)
    ap.add_argument("--variants", action="store_true", help="also replay other monitor settings offline")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--keep", type=Path, default=None, help="keep the training runs here (default: a temp dir)")
    a = ap.parse_args()

    import torch
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()  # "accelerate not found" on every checkpoint load
    s = dict(DEMO_SETTINGS["quick" if a.quick else "full"])
    steps = int(a.steps or s["steps"])
    every = int(DEMO_MONITOR["every_n_steps"])
    load0 = os.getloadavg()
    print(f"load average at start: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f} ({os.cpu_count()} cpus)")
    print(f"settings: {s} steps={steps}; monitor {DEMO_MONITOR} patience {DEMO_PATIENCE}; dense checkpoints every "
          f"{a.dense_every}")
    tmp = tempfile.TemporaryDirectory() if a.keep is None else None
    root = Path(tmp.name) if tmp else a.keep
    res: dict = {"settings": s, "monitor": {**DEMO_MONITOR, "patience": DEMO_PATIENCE}, "steps": steps, "dense_every": a.dense_every,
                 "load_start": load0, "torch": torch.__version__, "cpus": os.cpu_count()}
    try:
        # (a) overhead
        t0 = time.perf_counter()
        plain = train(root / "plain", s, steps, a.dense_every, a.seed)
        print(f"plain training: {plain.train_seconds:.1f} s ({time.perf_counter() - t0:.1f} s with setup)")
        monitor = demo_monitor(plain.train_images, plain.heldout_images, seed=a.seed)
        spent, flag = [0.0], [None]

        def callback(step, unet):
            t = time.perf_counter()
            stop = monitor.update(step, unet)
            spent[0] += time.perf_counter() - t
            if stop and flag[0] is None:
                flag[0] = step
            return None  # keep training: the lag needs the whole curve and the timings the same step count

        mon = train(root / "monitored", s, steps, a.dense_every, a.seed, callback=callback)
        same = bool(np.array_equal(plain.losses, mon.losses))
        ovh_wall = (mon.train_seconds - plain.train_seconds) / plain.train_seconds
        ovh_update = spent[0] / (mon.train_seconds - spent[0])
        n_eval = len(monitor.history)
        print(f"monitored training: {mon.train_seconds:.1f} s; {n_eval} evaluations, {spent[0]:.2f} s in update() "
              f"({spent[0] / max(n_eval, 1):.2f} s each)")
        print(f"OVERHEAD: update() time / training time without it = {ovh_update:.1%}; "
              f"(T_monitored - T_plain) / T_plain = {ovh_wall:.1%}; losses identical with and without monitor: {same}")
        res["overhead"] = {"train_seconds_plain": plain.train_seconds, "train_seconds_monitored": mon.train_seconds,
                           "update_seconds": spent[0], "evaluations": n_eval, "fraction_update": ovh_update,
                           "fraction_wall": ovh_wall, "losses_identical": same}
        # (b) lag
        t0 = time.perf_counter()
        gt = ground_truth(plain, a.gt_samples, a.gt_steps, a.gt_seed, monitor.rule.threshold)
        print(f"ground truth ({a.gt_samples} samples x {a.gt_steps} DDIM steps per checkpoint, "
              f"{time.perf_counter() - t0:.1f} s):")
        print(f"   step  memorized  wilson95        monitor ({monitor.num_samples}-sample fraction, CI low)")
        mh = {c.step: c for c in monitor.history}
        for r in gt["rows"]:
            c = mh.get(r["step"])
            ms = f"{c.onset_signal.value:6.1%}  low {c.onset_signal.low:6.1%}" if c is not None and c.onset_signal else ""
            print(f"  {r['step']:5d}  {r['fraction']:8.1%}  [{r['low']:5.1%}, {r['high']:5.1%}]   {ms}")
        f, o = flag[0], monitor.onset_step

        def lag(x, g):
            return None if x is None or g is None else x - g

        res["lag"] = {"interval": every, "ground_truth_onset_low": gt["onset_low"],
                      "ground_truth_onset_point": gt["onset_point"], "monitor_flag": f, "monitor_onset_step": o,
                      "lag_flag_vs_low": lag(f, gt["onset_low"]), "lag_flag_vs_point": lag(f, gt["onset_point"]),
                      "lag_onset_vs_low": lag(o, gt["onset_low"]), "lag_onset_vs_point": lag(o, gt["onset_point"]),
                      "rows": gt["rows"]}
        L = res["lag"]
        print(f"ground-truth onset: Wilson lower bound > {monitor.rule.threshold:.0%} at step {gt['onset_low']}; "
              f"point fraction > {monitor.rule.threshold:.0%} at step {gt['onset_point']}")
        print(f"monitor (every {every} steps): flag (update returned True) at step {f}; onset_step {o}")
        met = L["lag_flag_vs_low"] is not None and L["lag_flag_vs_low"] <= every
        print(f"LAG: flag - gt(low) = {L['lag_flag_vs_low']}, flag - gt(point) = {L['lag_flag_vs_point']}, "
              f"onset_step - gt(low) = {L['lag_onset_vs_low']} steps (evaluation interval {every}; "
              f"target lag(flag) <= {every}: {'met' if met else 'NOT met'})")
        if a.variants:
            specs = [{"every": e, "samples": n, "ddim": k, "loss_images": li, "patience": pa}
                     for e, n, k, li, pa in [(100, 64, 8, 32, 2), (100, 64, 8, 32, 1), (100, 128, 8, 32, 2),
                                             (100, 128, 8, 32, 1), (200, 128, 8, 32, 2), (200, 64, 8, 32, 2),
                                             (100, 96, 6, 16, 2), (100, 64, 12, 16, 2)]
                     if e % a.dense_every == 0]
            res["variants"] = variants(plain, s, a.seed, specs, plain.train_seconds, steps)
            print("variants (offline replay on the dense checkpoints):")
            for v in res["variants"]:
                print(f"  patience {v.get('patience', 2)} every {v['every']:4d} samples {v['samples']:4d} ddim {v['ddim']:3d} loss imgs "
                      f"{v['loss_images']:4d}: {v['eval_seconds_median']:.2f} s/eval, est. overhead "
                      f"{v['overhead_estimate']:.1%}, onset_step {v['onset_step']}, flag {v['flag']}, "
                      f"flag-gt(low) {lag(v['flag'], gt['onset_low'])}")
    finally:
        load1 = os.getloadavg()
        res["load_end"] = load1
        print(f"load average at end: {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
        if tmp is not None:
            tmp.cleanup()
    path = a.json or Path(__file__).parent / "results" / f"bench_monitor{'-quick' if a.quick else ''}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1, default=float))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
