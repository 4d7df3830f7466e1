"""MemorizationMonitor: onset on a model that copies, none on one that cannot, free updates between evaluations,
train/eval mode + RNG restored, state_dict round trip (through JSON), sampling cadence, TensorBoard scalars.

References are independent of the code under test: the closed-form memorizing denoiser (OptimalDenoiser) switched
on at a known step, and the copied fraction recomputed by brute force in numpy on samples drawn separately.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import digits_rgb
from diffusers import DDPMScheduler

from diffaudit.monitor import MemorizationMonitor
from diffaudit.sampling import CheckpointSampler
from diffaudit.testing import GaussianDenoiser, OptimalDenoiser

N_SAMPLES, STEPS, EVERY = 40, 8, 10


@pytest.fixture(scope="module")
def sched():
    return DDPMScheduler(num_train_timesteps=1000)


@pytest.fixture(scope="module")
def train():
    return digits_rgb(24, side=8, seed=0)


@pytest.fixture(scope="module")
def heldout():
    return digits_rgb(400, side=8, seed=0)[-24:]  # other digits than the 24 training ones


class Switch(torch.nn.Module):
    """A "training run": cannot copy (Gaussian) before ``onset``, copies (empirical optimal denoiser) from then on.
    ``step`` is set by the test before each update; ``calls`` counts forward passes."""

    def __init__(self, train, sched, onset: int):
        super().__init__()
        self.before = GaussianDenoiser.fit(train, sched)
        self.after = OptimalDenoiser(train, sched)
        self.config = self.after.config
        self.onset = onset
        self.step = 0
        self.calls = 0
        self.w = torch.nn.Parameter(torch.zeros(()))  # so the model has a device and a train/eval mode to restore
        self.drop = torch.nn.Dropout(0.5)
        self.seen: list[tuple[bool, bool]] = []  # (training, grad enabled) at each forward

    def forward(self, x, t, *a, **kw):
        self.calls += 1
        self.seen.append((self.training, torch.is_grad_enabled()))
        inner = self.after if self.step >= self.onset else self.before
        return inner(x, t)


def make(train, tmp_path, **kw):
    kw.setdefault("every_n_steps", EVERY)
    kw.setdefault("num_samples", N_SAMPLES)
    kw.setdefault("num_inference_steps", STEPS)
    kw.setdefault("time_budget", None)  # instant fake training steps: tests/test_training_path.py covers the budget
    return MemorizationMonitor(train, cache_dir=str(tmp_path / "cache"), **kw)


def run(monitor, model, steps, **kw):
    """Call update at every step like a training loop; returns the steps at which update returned True."""
    hits = []
    for s in steps:
        model.step = s
        if monitor.update(s, model, **kw):
            hits.append(s)
    return hits


def brute_force_copied_fraction(images_u8: np.ndarray, train_u8: np.ndarray) -> float:
    """Gu et al.'s rule by hand: d(nearest) / d(second nearest) < 1/3 in pixel space."""
    a = images_u8.reshape(len(images_u8), -1).astype(np.float64) / 255
    b = train_u8.reshape(len(train_u8), -1).astype(np.float64) / 255
    d = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    d.sort(axis=1)
    return float(np.mean(d[:, 0] < d[:, 1] / 3))


def test_onset_flagged_at_the_step_the_model_starts_copying(train, sched, tmp_path):
    model = Switch(train, sched, onset=30)
    mon = make(train, tmp_path, scheduler=sched)
    hits = run(mon, model, range(0, 61))
    assert mon.evaluated_steps == [0, 10, 20, 30, 40, 50, 60]
    # patience 2: onset at step 30 is confirmed by the evaluation at 40; update says "stop" from then on
    assert mon.onset_step == 30
    assert hits[0] == 40 and mon.stopped
    assert mon.best_step == 20  # latest checkpoint before onset (no held-out loss given)
    # the copied fraction equals a brute-force recomputation on samples drawn independently with the same noise
    smp = CheckpointSampler(sched, N_SAMPLES, seed=0, num_inference_steps=STEPS, sampler="ddim")
    for s, inner in ((20, model.before), (40, model.after)):
        expect = brute_force_copied_fraction(smp.sample(inner).images, train)
        got = next(c for c in mon.history if c.step == s).onset_signal.value
        assert got == pytest.approx(expect, abs=1e-9)
    assert next(c for c in mon.history if c.step == 40).onset_signal.value > 0.9
    assert mon.metrics["diffaudit/onset"] == 1.0
    assert mon.metrics["diffaudit/memorization_low"] > 0.8


def test_no_onset_on_a_model_that_cannot_copy(train, heldout, sched, tmp_path):
    model = GaussianDenoiser.fit(train, sched)
    mon = make(train, tmp_path, heldout=heldout, scheduler=sched)
    for s in range(0, 31):
        assert mon.update(s, model) is False
    assert mon.onset_step is None and not mon.stopped
    assert len(mon.history) == 4
    assert all(c.onset_signal.low <= 0.02 for c in mon.history)
    assert all(c.loss_gap is not None for c in mon.history)  # the cheap signal, with the held-out set
    assert mon.best_step in mon.evaluated_steps
    assert "no onset" in mon.summary_line()


def test_update_between_evaluations_costs_nothing(train, sched, tmp_path, monkeypatch):
    import diffaudit.index as index_mod

    built = []
    orig = index_mod.EmbeddingIndex.from_embeddings.__func__

    def counting(cls, *a, **kw):
        built.append(1)
        return orig(cls, *a, **kw)

    monkeypatch.setattr(index_mod.EmbeddingIndex, "from_embeddings", classmethod(counting))
    mon = make(train, tmp_path, scheduler=sched)
    assert len(built) == 1  # the training index, built once at construction
    sample_calls = []
    real_sample = mon._sampler.sample
    monkeypatch.setattr(mon._sampler, "sample", lambda m: sample_calls.append(1) or real_sample(m))
    model = Switch(train, sched, onset=10**9)
    for s in range(1, 10):  # no multiple of 10: no work at all
        assert mon.update(s, model) is False
    assert model.calls == 0 and sample_calls == [] and mon.history == []
    mon.update(10, model)
    calls_after_eval = model.calls
    assert sample_calls == [1] and calls_after_eval > 0
    for _ in range(3):  # the same global step again (gradient accumulation): no second evaluation
        mon.update(10, model)
    for s in range(11, 20):
        mon.update(s, model)
    mon.update(20, model)
    assert model.calls == 2 * calls_after_eval and sample_calls == [1, 1]
    assert len(built) == 1  # index not rebuilt per evaluation


def test_eval_mode_no_grad_and_rng_are_restored(train, sched, tmp_path):
    model = Switch(train, sched, onset=0)
    model.train()
    model.drop.eval()  # a submodule the user froze in eval mode must stay so
    mon = make(train, tmp_path, scheduler=sched)
    torch.manual_seed(123)
    mon.update(0, model)
    after = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(after, torch.rand(3))  # training's random stream is untouched
    assert model.seen and all(not training and not grad for training, grad in model.seen)
    assert model.training is True and model.drop.training is False
    assert model.w.requires_grad


def test_state_dict_round_trip_resumes_the_history(train, heldout, sched, tmp_path):
    def fresh():
        return make(train, tmp_path, heldout=heldout, scheduler=sched)

    full = fresh()
    run(full, Switch(train, sched, onset=20), range(0, 41))

    first = fresh()
    run(first, Switch(train, sched, onset=20), range(0, 21))
    state = json.loads(json.dumps(first.state_dict()))  # must be plain JSON
    resumed = fresh()
    resumed.load_state_dict(state)
    assert [c.to_dict() for c in resumed.history] == [c.to_dict() for c in first.history]
    hits = run(resumed, Switch(train, sched, onset=20), range(21, 41))
    assert hits[0] == 30
    assert [c.to_dict() for c in resumed.history] == [c.to_dict() for c in full.history]
    assert (resumed.onset_step, resumed.best_step, resumed.stopped) == (full.onset_step, full.best_step, True)
    assert resumed.metrics == full.metrics
    assert resumed.onset_step == 20
    with pytest.raises(ValueError, match="MemorizationMonitor state"):
        resumed.load_state_dict({"history": []})


def test_sampling_cadence_and_loss_at_every_evaluation(train, heldout, sched, tmp_path):
    mon = make(train, tmp_path, heldout=heldout, scheduler=sched, sample_every=2)
    hits = run(mon, Switch(train, sched, onset=0), range(0, 41))
    sampled = [c.step for c in mon.history if c.onset_signal is not None]
    assert sampled == [0, 20, 40]
    assert all(c.num_samples == 0 and not c.metrics for c in mon.history if c.step in (10, 30))
    assert all(c.loss_gap is not None for c in mon.history)
    # the onset rule looks at the sampled evaluations only: confirmed by the second sampled one (step 20)
    assert mon.onset_step == 0 and hits[0] == 20
    # between sampled evaluations the latest sample-based scalars are carried forward
    assert "diffaudit/memorization_ratio" in mon.metrics


def test_tensorboard_scalars(train, heldout, sched, tmp_path):
    class Writer:
        def __init__(self):
            self.rows = []

        def add_scalar(self, tag, value, global_step=None):
            self.rows.append((tag, value, global_step))

    w = Writer()
    mon = make(train, tmp_path, heldout=heldout, scheduler=sched, tensorboard_dir=w)
    run(mon, Switch(train, sched, onset=0), range(0, 11))
    tags = {(t, s) for t, _, s in w.rows}
    for tag in ("diffaudit/memorization_ratio", "diffaudit/memorization_low", "diffaudit/loss_gap"):
        assert (tag, 0) in tags and (tag, 10) in tags
    # a folder: a real SummaryWriter writes an event file there
    pytest.importorskip("tensorboard")
    mon2 = make(train, tmp_path, scheduler=sched, tensorboard_dir=str(tmp_path / "tb"))
    mon2.update(0, Switch(train, sched, onset=0))
    mon2.close()
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_pipeline_and_scheduler_errors(train, sched, tmp_path):
    from diffusers import DDPMPipeline

    from diffaudit.testing import tiny_unet

    unet = tiny_unet(8, 3, seed=0)
    mon = make(train, tmp_path, num_samples=8, num_inference_steps=2)
    with pytest.raises(ValueError, match="scheduler"):
        mon.update(0, unet)  # a bare UNet needs the training noise scheduler
    pipe = DDPMPipeline(unet=unet, scheduler=sched)
    assert mon.update(0, pipe) is False  # a pipeline brings its own
    assert mon.history[-1].loss_train is not None and mon.history[-1].num_samples == 8
    assert mon.update(10, unet, scheduler="ddpm") is False  # a scheduler name at update time
    with pytest.raises(ValueError, match="every_n_steps"):
        make(train, tmp_path, every_n_steps=0)
    with pytest.raises(ValueError, match="sampler"):
        make(train, tmp_path, sampler="euler")
