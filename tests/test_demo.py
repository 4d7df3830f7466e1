"""`diffaudit demo` end to end (a short run via --steps): reports, JSON, and the memorization contrast.

The contrast is checked twice: in the audit's own audit.json, and independently of the audit's metrics - DDIM samples
of the last checkpoints (another seed) matched by brute-force numpy against the training PNGs (Gu et al.'s 1/3 rule).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from diffaudit.cli import app

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # ~90 s on 2 quiet cores; a loaded machine is slower

STEPS = 800  # 4 checkpoints (every 200); the small set copies from ~500 steps on (benchmarks/demo_curve.py: 0.48 at 800)


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    t0 = time.perf_counter()
    res = CliRunner().invoke(app, ["demo", "--steps", str(STEPS), "--samples", "64", "--out", str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return out, res.output, time.perf_counter() - t0


def _fractions(audit_json: Path) -> list[tuple[int, float]]:
    d = json.loads(audit_json.read_text())
    return [(c["step"], c["onset_signal"]["value"]) for c in d["checkpoints"]]


def _one_third(samples: np.ndarray, train: np.ndarray) -> float:
    s = samples.reshape(len(samples), -1).astype(np.float64) / 255.0
    t = train.reshape(len(train), -1).astype(np.float64) / 255.0
    d = np.sqrt(((s[:, None, :] - t[None, :, :]) ** 2).sum(-1))
    d.sort(axis=1)
    return float((d[:, 0] / np.maximum(d[:, 1], 1e-12) < 1 / 3).mean())


def _samples(ckpt: Path, n: int, seed: int) -> np.ndarray:
    """n DDIM samples (25 steps, eta 0) of a checkpoint, uint8 grayscale (N, 8, 8)."""
    from diffusers import UNet2DModel

    from diffaudit.demo import make_demo_scheduler
    from diffaudit.sampling import CheckpointSampler

    sampler = CheckpointSampler(make_demo_scheduler(), n, seed=seed, num_inference_steps=25, device="cpu")
    return sampler.sample(UNet2DModel.from_pretrained(ckpt / "unet")).images[..., 0]


def _train_pngs(folder: Path) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.open(p).convert("L")) for p in sorted(folder.glob("*.png"))])


def test_reports_and_json_exist(demo_out):
    out, output, _ = demo_out
    index = (out / "index.html").read_text()
    for label in ("small", "large"):
        assert (out / label / "audit" / "report.html").stat().st_size > 1000
        assert f'href="{label}/audit/report.html"' in index
        d = json.loads((out / label / "audit" / "audit.json").read_text())
        steps = [c["step"] for c in d["checkpoints"]]
        assert steps == sorted(steps) and steps[-1] == STEPS and len(steps) >= 4
        assert (out / label / "ddpm" / f"checkpoint-{STEPS}" / "unet" / "config.json").is_file()
    assert "monitor" in output and "index.html" in output


def test_small_set_memorization_rises(demo_out):
    out = demo_out[0]
    small, large = _fractions(out / "small/audit/audit.json"), _fractions(out / "large/audit/audit.json")
    assert small[-1][1] > small[0][1]
    assert small[-1][1] > large[-1][1]
    assert small[-1][1] >= 0.05 and large[-1][1] <= 0.02
    # independent: own DDIM sampler + brute-force 1/3 rule on the last checkpoints
    ck = f"ddpm/checkpoint-{STEPS}"
    f_small = _one_third(_samples(out / "small" / ck, 96, 7), _train_pngs(out / "small" / "train"))
    f_large = _one_third(_samples(out / "large" / ck, 96, 7), _train_pngs(out / "large" / "train"))
    assert f_small >= 0.03 and f_large <= 0.02 and f_small > f_large
