"""The training-time path as a user meets it: the monitor's cost budget and final decision, monitor and audit
agreeing on the same checkpoints, progress lines when stderr is not a terminal, `watch` refreshing its report after
every checkpoint, quiet FAISS loading, defaults in --help."""
from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from diffusers import DDPMScheduler

from conftest import digits_rgb
from diffaudit.data import ImageSet
from diffaudit.testing import GaussianDenoiser, OptimalDenoiser

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1",
       "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


@pytest.fixture(scope="module")
def data():
    x = digits_rgb(48, 8, seed=0)
    return {"train": x[:24], "held": x[24:], "sched": DDPMScheduler(num_train_timesteps=1000)}


# ------------------------------------------------------------------------------------------------ cost budget


def test_monitor_keeps_its_cost_within_the_budget(tmp_path, data, caplog):
    """Training steps of 50 ms, evaluations of a few hundred: the monitor lowers its sample count once, then spaces
    evaluations out, says so, and its measured share of the wall time comes down towards the budget."""
    from diffaudit.monitor import MemorizationMonitor

    model = GaussianDenoiser.fit(data["train"], data["sched"], diagonal=True)
    mon = MemorizationMonitor(ImageSet.from_arrays(data["train"]), every_n_steps=2, num_samples=128,
                              num_inference_steps=10, scheduler=data["sched"], cache_dir=str(tmp_path / "c"),
                              min_samples=16, time_budget=0.10)
    with caplog.at_level(logging.WARNING, logger="diffaudit"):
        for step in range(1, 121):
            time.sleep(0.05)  # one "training step"
            mon.update(step, model)
    assert mon.adaptations, "the budget was exceeded but nothing changed"
    first = mon.adaptations[0]  # sized from a timing probe before the first evaluation
    assert first["step"] is None and first["num_samples"] < 128 and first["probe_seconds_per_sample"] > 0
    assert all(h.num_samples == first["num_samples"] for h in mon.history)  # every evaluation comparable
    gaps = {b - a for a, b in zip(mon.evaluated_steps, mon.evaluated_steps[1:])}
    assert max(gaps) > 2  # evaluations spaced out
    assert "of the wall time since the last one" in caplog.text and "budget 10%" in caplog.text and "from now on" in caplog.text
    d = mon.decision()
    assert d["adaptations"] == mon.adaptations and d["every_n_steps"] > 2
    # every 2 steps without a budget: 60 evaluations; how many fewer depends on this machine's timing (30-32 seen)
    assert len(mon.evaluated_steps) < 40
    assert d["cost_fraction"] < 0.6  # the probe and the first evaluations alone were far above the budget


def test_no_budget_means_no_adaptation(tmp_path, data):
    from diffaudit.monitor import MemorizationMonitor

    model = GaussianDenoiser.fit(data["train"], data["sched"], diagonal=True)
    mon = MemorizationMonitor(ImageSet.from_arrays(data["train"]), every_n_steps=2, num_samples=32,
                              num_inference_steps=4, scheduler=data["sched"], cache_dir=str(tmp_path / "c"),
                              time_budget=None)
    for step in range(1, 9):
        mon.update(step, model)
    assert mon.evaluated_steps == [2, 4, 6, 8] and not mon.adaptations
    with pytest.raises(ValueError, match="time_budget"):
        MemorizationMonitor(ImageSet.from_arrays(data["train"]), time_budget=1.5, lazy=True)


# ------------------------------------------------------------------------------------------------ final decision


def test_finish_logs_and_writes_the_decision(tmp_path, data):
    from diffaudit.monitor import MemorizationMonitor

    mem = OptimalDenoiser(data["train"], data["sched"])
    mon = MemorizationMonitor(ImageSet.from_arrays(data["train"]), every_n_steps=1, num_samples=16,
                              num_inference_steps=8, scheduler=data["sched"], cache_dir=str(tmp_path / "c"),
                              time_budget=None)
    gau = GaussianDenoiser.fit(data["train"], data["sched"], diagonal=True)
    for step, model in ((1, gau), (2, gau), (3, mem), (4, mem)):
        mon.update(step, model)
    (tmp_path / "checkpoint-2" / "unet_ema").mkdir(parents=True)
    lines = []
    d = mon.finish(tmp_path, step=4, log=lines.append)
    assert d["stopped"] and d["onset_step"] == 3 and d["keep_step"] == 2 and d["level"] == "copies"
    assert d["keep_weights"] == str(tmp_path / "checkpoint-2" / "unet_ema")
    assert json.loads((tmp_path / "diffaudit-monitor.json").read_text())["keep_step"] == 2
    assert len(lines) == 1 and "stopped at memorization onset (copying from step 3)" in lines[0]
    assert "training ended at step 4" in lines[0] and "keep step 2" in lines[0]


# ------------------------------------------------------------------------------------------------ one rule


def test_monitor_and_audit_agree_on_the_same_checkpoints(tmp_path, data):
    """Without a held-out set and with one: same checkpoints, same settings -> the same onset, checkpoint to keep
    and level, by construction (both decide with diffaudit.onset)."""
    from diffaudit.audit import audit
    from diffaudit.monitor import MemorizationMonitor

    sched = data["sched"]
    gau = GaussianDenoiser.fit(data["train"], sched, diagonal=True)
    mem = OptimalDenoiser(data["train"], sched)
    models = [(10, gau), (20, gau), (30, mem), (40, mem)]
    for held in (None, data["held"]):
        heldout = ImageSet.from_arrays(held) if held is not None else None
        r = audit(models, scheduler=sched, train=ImageSet.from_arrays(data["train"]), heldout=heldout,
                  num_samples=24, num_inference_steps=8, cache_dir=str(tmp_path / "c"), device="cpu")
        mon = MemorizationMonitor(ImageSet.from_arrays(data["train"]), heldout=heldout, every_n_steps=10,
                                  num_samples=24, num_inference_steps=8, scheduler=sched, device="cpu",
                                  cache_dir=str(tmp_path / "c"), time_budget=None)
        for step, model in models:
            mon.update(step, model)
        d = mon.decision()
        assert (d["onset_step"], d["keep_step"], d["level"]) == (
            r.onset.onset_step, r.onset.recommended_step, r.onset.level), held is not None
        assert d["onset_step"] == 30 and d["keep_step"] in (10, 20)


# ------------------------------------------------------------------------------------------------ CLI output


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from PIL import Image

    from diffaudit.testing import write_tiny_run

    root = tmp_path_factory.mktemp("tiny")
    imgs = digits_rgb(8, 8, seed=1)
    write_tiny_run(root / "run", imgs, steps=(2, 4))
    train = root / "train"
    train.mkdir()
    for i, im in enumerate(imgs):
        Image.fromarray(im).save(train / f"{i}.png")
    return root / "run", train


def test_progress_lines_when_stderr_is_not_a_terminal(tmp_path, tiny_run):
    run, train = tiny_run
    r = subprocess.run([sys.executable, "-m", "diffaudit", "audit", str(run), "--train", str(train), "--samples", "4",
                        "--inference-steps", "2", "--out", str(tmp_path / "o"), "--cache", str(tmp_path / "c")],
                       capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    err = r.stderr
    assert "━" not in err  # no bar drawn into a file
    assert "auditing checkpoints: started" in err
    assert "auditing checkpoints: 1/" in err and "auditing checkpoints: 2/2 (100%)" in err  # one line per checkpoint
    assert "embedding " in err


def test_line_progress_prints_at_an_interval(monkeypatch):
    import diffaudit._progress as P

    now = [0.0]
    monkeypatch.setattr(P.time, "monotonic", lambda: now[0])
    buf = io.StringIO()
    p = P.progress(stream=buf)
    assert isinstance(p, P.LineProgress)
    t = p.add_task("[bold]embedding[/] run\\[x]", total=10_000)
    for _ in range(100):
        now[0] += 1.0  # 100 s in 100 updates of 100 items
        p.advance(t, 100)
    p.stop()
    lines = buf.getvalue().splitlines()
    assert lines[0] == "embedding run[x]: started (10,000 items)"
    assert len(lines) == 1 + 3 + 1  # start, every 30 s (30, 60, 90), the end
    assert lines[-1].startswith("embedding run[x]: 10,000/10,000 (100%)")


def test_watch_refreshes_its_report_after_every_checkpoint(tmp_path, tiny_run, monkeypatch):
    from typer.testing import CliRunner

    import diffaudit.cli as cli
    import diffaudit.watch as W

    run, train = tiny_run
    out = tmp_path / "w"
    seen = []
    real = W.watch

    def spy(*a, on_checkpoint=None, **k):
        def wrapped(m):
            on_checkpoint(m)
            d = json.loads((out / "audit.json").read_text())
            seen.append(([c["step"] for c in d["checkpoints"]], (out / "report.html").is_file()))
        return real(*a, on_checkpoint=wrapped, **k)

    monkeypatch.setattr(W, "watch", spy)
    res = CliRunner().invoke(cli.app, ["watch", str(run), "--train", str(train), "--samples", "4",
                                       "--inference-steps", "2", "--timeout", "0", "--settle", "0", "--out", str(out),
                                       "--cache", str(tmp_path / "c")])
    assert res.exit_code in (0, 3), res.output
    assert seen == [([2], True), ([2, 4], True)]


def test_faiss_loader_messages_are_not_logged():
    code = ("import logging; logging.basicConfig(level=logging.INFO); "
            "from diffaudit.index import _faiss; _faiss(); "
            "print(logging.getLogger('faiss.loader').level)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 0 and "faiss" not in r.stderr.lower(), r.stderr
    assert r.stdout.strip() == "0"  # the logger's own level is left as it was


def test_help_shows_the_defaults():
    r = subprocess.run([sys.executable, "-m", "diffaudit", "audit", "--help"], capture_output=True, text=True, env=ENV,
                       timeout=120)
    assert "(default: 256" in r.stdout and "(default: 50" in r.stdout and "(default: ddim)" in r.stdout
