"""`diffaudit watch`: checkpoint folders appear (copied by a background thread, file by file) while it polls.

* tiny UNets trained a few steps cannot copy: every checkpoint is evaluated once, in order, then the watch gives
  up after --timeout and exits 0 with audit.json / report.html written;
* the STOP path: the checkpoint loader is swapped for the closed-form memorizing denoiser (a checkpoint folder
  cannot hold it), so the watch must exit 3 at onset and write RUN_DIR/STOP with the onset step.
"""
from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest
from conftest import digits_rgb
from PIL import Image
from typer.testing import CliRunner

from diffaudit.cli import EXIT_ONSET, app
from diffaudit.watch import complete_checkpoints

SIDE, N_TRAIN = 16, 16  # write_tiny_run's default training set: the first 16 digits at 16x16


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from diffaudit.testing import write_tiny_run

    return write_tiny_run(tmp_path_factory.mktemp("src"), steps=(1, 2, 3), final_pipeline=False)


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("train")
    for i, im in enumerate(digits_rgb(N_TRAIN, side=SIDE)):
        Image.fromarray(im).save(d / f"{i:03d}.png")
    return d


def copy_slowly(src: Path, dst_root: Path, names, start_delay=0.3, gap=0.6):
    """Copy checkpoint folders one file at a time (as accelerate writes them), weights last, with pauses."""

    def work():
        time.sleep(start_delay)
        for name in names:
            files = sorted((p for p in (src / name).rglob("*") if p.is_file()),
                           key=lambda p: p.name.endswith(".safetensors"))
            for f in files:
                target = dst_root / name / f.relative_to(src / name)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, target)
                time.sleep(0.05)
            time.sleep(gap)

    t = threading.Thread(target=work, daemon=True)
    t.start()
    return t


def base_args(run_dir, train_dir, out_dir, tmp_path):
    return [
        "watch", str(run_dir), "--train", str(train_dir), "--samples", "16", "--inference-steps", "3",
        "--interval", "0.2", "--settle", "0.4", "--out", str(out_dir), "--cache", str(tmp_path / "cache"),
        "--scheduler", "ddpm", "--device", "cpu",
    ]


def test_complete_checkpoints_waits_for_weights_and_quiet(tmp_path, tiny_run):
    run = tmp_path / "run"
    ck = run / "checkpoint-5" / "unet"
    ck.mkdir(parents=True)
    shutil.copyfile(tiny_run / "checkpoint-1" / "unet" / "config.json", ck / "config.json")
    (run / "checkpoint-x").mkdir()
    (run / "logs").mkdir()
    assert complete_checkpoints(run, settle=0) == []  # config only: weights not there yet
    shutil.copyfile(tiny_run / "checkpoint-1" / "unet" / "diffusion_pytorch_model.safetensors",
                    ck / "diffusion_pytorch_model.safetensors")
    now = time.time()
    assert complete_checkpoints(run, settle=30, now=now) == []  # just written: not settled
    assert complete_checkpoints(run, settle=30, now=now + 31) == [(5, run / "checkpoint-5")]
    shutil.copytree(tiny_run / "checkpoint-2", run / "checkpoint-12")  # unet_ema/ + unet/
    assert [s for s, _ in complete_checkpoints(run, settle=0)] == [5, 12]  # numeric order
    assert complete_checkpoints(tmp_path / "missing") == []


def test_watch_evaluates_each_new_checkpoint_then_times_out(tmp_path, tiny_run, train_dir):
    run_dir, out_dir = tmp_path / "run", tmp_path / "out"
    run_dir.mkdir()
    copier = copy_slowly(tiny_run, run_dir, ["checkpoint-1", "checkpoint-2", "checkpoint-3"])
    t0 = time.monotonic()
    res = CliRunner().invoke(app, base_args(run_dir, train_dir, out_dir, tmp_path) + ["--timeout", "3"])
    copier.join()
    assert res.exit_code == 0, res.output
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("step ")]
    assert [ln.split(":")[0] for ln in lines] == ["step 1", "step 2", "step 3"]  # each once, in order
    assert all("no onset" in ln for ln in lines), lines
    assert not (run_dir / "STOP").exists()
    audit = json.loads((out_dir / "audit.json").read_text())
    assert [c["step"] for c in audit["checkpoints"]] == [1, 2, 3]
    assert audit["onset"]["onset_step"] is None
    assert all(c["path"].endswith(f"checkpoint-{c['step']}") for c in audit["checkpoints"])
    assert (out_dir / "report.html").stat().st_size > 1000
    assert time.monotonic() - t0 < 60


def test_watch_writes_stop_and_exits_3_at_onset(tmp_path, tiny_run, train_dir, monkeypatch):
    import diffaudit.watch as watch_mod
    from diffaudit.checkpoints import load_scheduler
    from diffaudit.testing import OptimalDenoiser

    sched = load_scheduler("ddpm")
    memorizer = OptimalDenoiser(digits_rgb(N_TRAIN, side=SIDE), sched)
    loaded = []

    def load_memorizer(folder, **kw):
        loaded.append(Path(folder).name)
        return memorizer, kw.get("scheduler")

    monkeypatch.setattr(watch_mod, "load_checkpoint_model", load_memorizer)
    run_dir, out_dir = tmp_path / "run", tmp_path / "out"
    run_dir.mkdir()
    copier = copy_slowly(tiny_run, run_dir, ["checkpoint-1", "checkpoint-2", "checkpoint-3"], gap=1.5)
    res = CliRunner().invoke(app, base_args(run_dir, train_dir, out_dir, tmp_path) + ["--timeout", "20"])
    assert res.exit_code == EXIT_ONSET, res.output
    # onset at the first checkpoint, confirmed by the second (patience 2): the third is never needed
    assert loaded == ["checkpoint-1", "checkpoint-2"]
    stop = json.loads((run_dir / "STOP").read_text())
    assert stop["onset_step"] == 1 and stop["step"] == 2
    assert stop["signal"].startswith("memorization_ratio[pixel")
    assert stop["low"] > 0.5 and stop["recommended_step"] is None
    audit = json.loads((out_dir / "audit.json").read_text())
    assert audit["onset"]["onset_step"] == 1
    assert sum(r["copies"] for r in audit["images"]) > 0  # per-image copies recorded for the risk table
    copier.join()

    # a restarted watch resumes its state from --out and says STOP again without evaluating anything
    (run_dir / "STOP").unlink()
    res2 = CliRunner().invoke(app, base_args(run_dir, train_dir, out_dir, tmp_path) + ["--timeout", "1"])
    assert res2.exit_code == EXIT_ONSET, res2.output
    assert loaded == ["checkpoint-1", "checkpoint-2"]
    assert json.loads((run_dir / "STOP").read_text())["onset_step"] == 1


def test_watch_bad_arguments(tmp_path, train_dir):
    f = tmp_path / "file"
    f.write_text("x")
    res = CliRunner().invoke(app, ["watch", str(f), "--train", str(train_dir), "--timeout", "0",
                                   "--out", str(tmp_path / "o"), "--cache", str(tmp_path / "c")])
    assert res.exit_code == 2 and "not a folder" in res.output
    res = CliRunner().invoke(app, ["watch", str(tmp_path), "--train", str(train_dir), "--threshold", "1.5"])
    assert res.exit_code == 2 and "--threshold" in res.output
