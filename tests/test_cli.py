"""`diffaudit audit` end to end on a diffusers-layout run written by a tiny training loop, `diffaudit report`, and
the error paths (one readable line, exit status 2)."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import digits_rgb
from PIL import Image
from typer.testing import CliRunner

from diffaudit.cli import app
from diffaudit.results import AuditResult
from diffaudit.testing import write_tiny_run

ROOT = Path(__file__).resolve().parents[1]
N_TRAIN, N_HELD, SIDE = 16, 8, 8


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """Every test here runs with one torch thread (conftest.one_torch_thread)."""


def _save_folder(folder: Path, images: np.ndarray) -> Path:
    folder.mkdir(parents=True)
    for i, a in enumerate(images):
        Image.fromarray(a).save(folder / f"img_{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 3-checkpoint run (checkpoint-N/unet + unet_ema + accelerate pickles + root pipeline), train/held-out folders."""
    root = tmp_path_factory.mktemp("cli")
    x = digits_rgb(N_TRAIN + N_HELD, SIDE, seed=3)
    # checkpoint folders named so that a string sort would misorder them (10 < 2)
    run = write_tiny_run(root / "run", images=x[:N_TRAIN], steps=(2, 3, 10), batch_size=4)
    return {
        "root": root, "run": run,
        "train": _save_folder(root / "train", x[:N_TRAIN]),
        "held": _save_folder(root / "held", x[N_TRAIN:]),
        "cache": root / "cache",
    }


def _invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def audited(tiny):
    out = tiny["root"] / "out"
    res = _invoke("audit", tiny["run"], "--train", tiny["train"], "--heldout", tiny["held"], "--samples", 8,
                  "--inference-steps", 4, "--out", out, "--cache", tiny["cache"])
    return res, out


def test_audit_end_to_end(tiny, audited):
    res, out = audited
    assert res.exit_code == 0, res.output
    for name in ("report.html", "audit.json", "images.csv"):
        assert (out / name).is_file()
    r = AuditResult.from_json(out / "audit.json")
    steps = [c.step for c in r.checkpoints]
    # discovered and ordered numerically; the root pipeline (final model) comes last, after step 10
    assert steps[:3] == [2, 3, 10] and steps == sorted(steps) and len(steps) in (3, 4)
    assert [Path(c.path).name for c in r.checkpoints[:3]] == ["checkpoint-2", "checkpoint-3", "checkpoint-10"]
    # EMA weights preferred; the accelerate pickles were never hashed/opened as weights
    files = list(r.provenance.checkpoint_files)
    assert any("unet_ema" in f for f in files)
    assert not any(f.endswith((".pkl", "optimizer.bin")) for f in files)
    for c in r.checkpoints:
        assert c.num_samples == 8 and c.metrics["pixel-8x8"].memorization_ratio.n == 8
        assert c.loss_train is not None and c.loss_heldout is not None
        assert len(list((out / "samples" / f"step-{c.step}").glob("sample_*.png"))) == 8
    # per-image table: one row per training image
    with open(out / "images.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == N_TRAIN
    assert {row["id"] for row in rows} == {f"img_{i:03d}.png" for i in range(N_TRAIN)}
    # the verdict is printed on one line, then where the report is
    lines = [ln for ln in res.stdout.splitlines() if ln.strip() and "━" not in ln]
    assert r.verdict in lines
    assert lines[-1] == f"report: {out / 'report.html'}"
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "data:image/png;base64," in html and "checkpoint-10" in html


def test_report_rerenders(audited, tmp_path):
    _, out = audited
    before = (out / "report.html").read_text(encoding="utf-8")
    target = tmp_path / "again.html"
    res = _invoke("report", out / "audit.json", "--out", target)
    assert res.exit_code == 0, res.output
    again = target.read_text(encoding="utf-8")
    r = AuditResult.from_json(out / "audit.json")
    from html import escape

    assert escape(r.verdict, quote=False)[:60] in again or r.verdict[:40] in again
    assert "<html" in again.lower() and len(again) > 1000
    # the default target is report.html beside the JSON
    copy = tmp_path / "audit.json"
    copy.write_text((out / "audit.json").read_text())
    res = _invoke("report", copy)
    assert res.exit_code == 0 and (tmp_path / "report.html").is_file()
    assert len(before) > 1000


def _one_error_line(res, *needles):
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip() and "━" not in ln]
    assert len(lines) == 1, res.output
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in res.output
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def test_error_paths(tiny, tmp_path):
    run, train = tiny["run"], tiny["train"]
    common = ["--samples", 4, "--inference-steps", 2, "--cache", tiny["cache"]]
    out = ["--out", tmp_path / "o"]
    (tmp_path / "empty").mkdir()
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("num_samples: 8\nnum_sampels: 9\n")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [
        (["audit", run, "--train", tmp_path / "nope", *common, *out], ["train=", "nope"]),
        (["audit", run, "--train", tmp_path / "empty", *common, *out], ["train=", "no usable images"]),
        (["audit", run, "--train", train, "-e", "pixle", *common, *out], ["pixle", "unknown embedder"]),
        (["audit", run, "--train", train, "--config", bad_yaml, *common, *out], ["num_sampels", "allowed keys"]),
        (["audit", run, "--train", train, *common, "--out", a_file / "sub"], ["not writable", "a_file"]),
        (["audit", tmp_path / "no_run", "--train", train, *common, *out], ["no_run"]),
        (["audit", tmp_path / "empty", "--train", train, *common, *out], ["found no checkpoints"]),
        (["audit", run, "--train", train, "--weights", "sscd", *common, *out], ["NAME=PATH"]),
        (["audit", run, "--train", train, "--samples", 1, *out], ["num_samples"]),
        (["audit", run, *common, *out], ["--train"]),
        (["report", tmp_path / "missing.json"], ["missing.json"]),
        (["report", bad_yaml], []),
    ]
    for args, needles in cases:
        _one_error_line(_invoke(*args), *needles)


def test_error_line_from_a_real_process(tiny, tmp_path):
    """`python -m diffaudit`: exit status 2 and one line on stderr, nothing on stdout."""
    p = subprocess.run(
        [sys.executable, "-m", "diffaudit", "audit", str(tmp_path / "missing_run"), "--train", str(tiny["train"]),
         "--out", str(tmp_path / "o")],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "60"},
    )
    assert p.returncode == 2
    err = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and "missing_run" in err[0], p.stderr
    assert p.stdout.strip() == ""


def test_config_file_drives_the_audit(tiny, tmp_path):
    """A YAML preset sets the keys; flags override it."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"num_samples": 3, "num_inference_steps": 2, "embedders": ["pixel"],
                               "loss_timesteps": [50], "train": str(tiny["train"]), "run": [str(tiny["run"])]}))
    res = _invoke("audit", "--config", cfg, "--samples", 4, "--out", tmp_path / "o", "--cache", tiny["cache"])
    assert res.exit_code == 0, res.output
    r = AuditResult.from_json(tmp_path / "o" / "audit.json")
    assert all(c.num_samples == 4 for c in r.checkpoints)
    assert r.provenance.sampler["num_inference_steps"] == 2
