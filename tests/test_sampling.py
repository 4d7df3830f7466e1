"""CheckpointSampler: fixed per-sample noise, closed-form reference models, NaN handling, text pipelines, resume."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import digits_rgb
from diffusers import DDPMScheduler

from diffaudit.sampling import (
    CheckpointSampler,
    load_saved_samples,
    read_prompts,
    sample_seed,
    samples_dir,
    save_samples,
    to_uint8,
)
from diffaudit.testing import GaussianDenoiser, OptimalDenoiser


@pytest.fixture(scope="module")
def train8():
    return digits_rgb(8, side=8)  # 8 distinct digits, 8x8 RGB


@pytest.fixture(scope="module")
def sched():
    return DDPMScheduler(num_train_timesteps=1000)


def ref_noise(seed: int, i: int, shape) -> torch.Tensor:
    """The documented noise contract, recomputed by hand."""
    return torch.randn((1, *shape), generator=torch.Generator().manual_seed(sample_seed(seed, i)))[0]


class Recorder(torch.nn.Module):
    """Wraps a denoiser and records the inputs of its first call per batch (the starting noise)."""

    def __init__(self, inner, nan_if_first_pixel_positive: bool = False):
        super().__init__()
        self.inner = inner
        self.config = inner.config
        self.first_inputs: list[torch.Tensor] = []
        self._t0 = None
        self.nan = nan_if_first_pixel_positive
        self.bad = None

    def forward(self, x, t):
        t = int(torch.as_tensor(t).reshape(-1)[0])
        if self._t0 is None or t >= self._t0:  # first (largest) timestep of a batch
            self._t0 = t
            self.first_inputs.append(x.detach().clone())
            if self.nan:
                self.bad = x[:, 0, 0, 0] > 0
        out = self.inner(x, t).sample
        if self.nan:
            out = out.clone()
            out[self.bad] = float("nan")
        return SimpleNamespace(sample=out)


def nearest_l2(samples: np.ndarray, train: np.ndarray) -> np.ndarray:
    """Brute force: (n_samples, n_train) Euclidean distances in uint8 pixel space."""
    a = samples.reshape(len(samples), -1).astype(np.float64)
    b = train.reshape(len(train), -1).astype(np.float64)
    return np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1))


def test_sample_seed_is_stable():
    assert sample_seed(0, 0) == sample_seed(0, 0) and sample_seed(0, 1) != sample_seed(0, 0)
    assert sample_seed(1, 0) != sample_seed(0, 0) and 0 <= sample_seed(7, 99) < 2**63


def test_same_noise_per_index_across_batch_sizes_and_models(train8, sched):
    runs = {}
    for name, model, bs in [("opt3", OptimalDenoiser(train8, sched), 3), ("opt8", OptimalDenoiser(train8, sched), 8),
                            ("gauss5", GaussianDenoiser.fit(train8, sched), 5)]:
        rec = Recorder(model)
        batch = CheckpointSampler(sched, 8, seed=11, num_inference_steps=10, batch_size=bs, device="cpu").sample(rec)
        runs[name] = (torch.cat(rec.first_inputs), batch)
    expected = torch.stack([ref_noise(11, i, (3, 8, 8)) for i in range(8)])
    for name, (noise, batch) in runs.items():
        assert torch.equal(noise, expected), name
        assert batch.indices.tolist() == list(range(8))
        assert batch.images.dtype == np.uint8 and batch.images.shape == (8, 8, 8, 3)
    assert np.array_equal(runs["opt3"][1].images, runs["opt8"][1].images)
    # a subset of indices gets exactly those samples' noise
    rec = Recorder(OptimalDenoiser(train8, sched))
    CheckpointSampler(sched, 8, seed=11, num_inference_steps=10, device="cpu").sample(rec, indices=[5, 2])
    assert torch.equal(rec.first_inputs[0], expected[[5, 2]])


def test_ddpm_step_noise_independent_of_batch_size(train8, sched):
    g = GaussianDenoiser.fit(train8, sched)
    a = CheckpointSampler(sched, 6, seed=3, sampler="ddpm", num_inference_steps=20, batch_size=2, device="cpu").sample(g)
    b = CheckpointSampler(sched, 6, seed=3, sampler="ddpm", num_inference_steps=20, batch_size=6, device="cpu").sample(g)
    c = CheckpointSampler(sched, 6, seed=4, sampler="ddpm", num_inference_steps=20, batch_size=6, device="cpu").sample(g)
    assert np.abs(a.images.astype(int) - b.images.astype(int)).max() <= 1
    assert not np.array_equal(b.images, c.images)
    # eta > 0 DDIM draws step noise too, still per sample
    d = CheckpointSampler(sched, 6, seed=3, eta=1.0, num_inference_steps=20, batch_size=4, device="cpu").sample(g)
    e = CheckpointSampler(sched, 6, seed=3, eta=1.0, num_inference_steps=20, batch_size=1, device="cpu").sample(g)
    assert np.abs(d.images.astype(int) - e.images.astype(int)).max() <= 1


def test_optimal_denoiser_ddim_samples_are_training_images(train8, sched):
    batch = CheckpointSampler(sched, 24, seed=0, num_inference_steps=50, batch_size=16, device="cpu").sample(
        OptimalDenoiser(train8, sched))
    assert batch.finite_mask.all()
    d = nearest_l2(batch.images, train8)
    nn = d.argmin(1)
    # every sample is (up to rounding) a training image ...
    assert d.min(1).max() <= 2.0, d.min(1)
    # ... and far from every other training image
    d_sorted = np.sort(d, 1)
    assert (d_sorted[:, 1] > 500).all()
    assert len(set(nn.tolist())) >= 4  # not collapsed onto one image


def test_gaussian_denoiser_samples_are_not_copies(train8, sched):
    batch = CheckpointSampler(sched, 24, seed=0, num_inference_steps=50, device="cpu").sample(
        GaussianDenoiser.fit(train8, sched))
    d = nearest_l2(batch.images, train8)
    t = nearest_l2(train8, train8)
    np.fill_diagonal(t, np.inf)
    typical = np.median(t.min(1))  # distance between distinct training images
    assert (d.min(1) > 0.2 * typical).all(), (d.min(1), typical)
    # Gu et al.'s rule (nearest / second nearest < 1/3) flags none of them
    ds = np.sort(d, 1)
    assert (ds[:, 0] / ds[:, 1] >= 1 / 3).all()


def test_gaussian_denoiser_matches_closed_form(sched):
    """Posterior mean of a diagonal Gaussian, checked against the scalar formula."""
    mean = np.full((1, 2, 2), 0.3)
    var = np.array([0.5, 0.1, 2.0, 0.0])
    g = GaussianDenoiser(mean, var=var, scheduler=DDPMScheduler(prediction_type="sample"))
    x = torch.tensor([[[[0.2, -1.0], [1.5, 0.7]]]], dtype=torch.float64)
    t = 400
    a = float(g.alphas_cumprod[t])
    expect = 0.3 + np.sqrt(a) * var / (a * var + 1 - a) * (x.numpy().reshape(-1) - np.sqrt(a) * 0.3)
    got = g(x, torch.tensor(t)).sample.numpy().reshape(-1)
    np.testing.assert_allclose(got, expect, rtol=1e-10)


def test_optimal_denoiser_matches_brute_force(train8, sched):
    """E[x0|x_t] against a direct float64 numpy computation (softmax of -||x - sqrt(a) y||^2 / 2(1-a))."""
    m = OptimalDenoiser(train8, DDPMScheduler(prediction_type="sample"))
    y = (train8.astype(np.float64) / 127.5 - 1).transpose(0, 3, 1, 2).reshape(8, -1)
    rng = np.random.default_rng(0)
    for t in (10, 300, 999):
        a = float(m.alphas_cumprod[t])
        x = np.sqrt(a) * y[3] + np.sqrt(1 - a) * rng.standard_normal(y.shape[1])
        logits = -((x[None] - np.sqrt(a) * y) ** 2).sum(1) / (2 * (1 - a))
        w = np.exp(logits - logits.max())
        w /= w.sum()
        got = m(torch.tensor(x.reshape(1, 3, 8, 8)), t).sample.numpy().reshape(-1)
        np.testing.assert_allclose(got, w @ y, atol=1e-9)


def test_nan_samples_detected_counted_zero_filled(train8, sched):
    rec = Recorder(OptimalDenoiser(train8, sched), nan_if_first_pixel_positive=True)
    batch = CheckpointSampler(sched, 10, seed=5, num_inference_steps=5, batch_size=4, device="cpu").sample(rec)
    expected_bad = np.array([float(ref_noise(5, i, (3, 8, 8))[0, 0, 0]) > 0 for i in range(10)])
    assert 0 < expected_bad.sum() < 10
    assert np.array_equal(~batch.finite_mask, expected_bad)
    assert batch.num_nonfinite == int(expected_bad.sum())
    assert (batch.images[~batch.finite_mask] == 0).all()
    ids, imgs = batch.finite_images()
    assert len(ids) == len(imgs) == 10 - expected_bad.sum()


def test_grayscale_model_gives_rgb(sched):
    gray = digits_rgb(4, side=8)[..., :1]
    batch = CheckpointSampler(sched, 3, num_inference_steps=5, device="cpu").sample(OptimalDenoiser(gray, sched))
    assert batch.images.shape == (3, 8, 8, 3)
    assert (batch.images[..., 0] == batch.images[..., 1]).all() and (batch.images[..., 1] == batch.images[..., 2]).all()


def test_unconditional_pipeline_uses_its_unet_and_scheduler():
    """A DDPMPipeline (real diffusers class, tiny UNet) samples exactly like its bare UNet with its scheduler."""
    from diffusers import DDPMPipeline

    from diffaudit.testing import tiny_unet

    unet, ddpm = tiny_unet(8, 3, seed=0), DDPMScheduler()
    pipe = DDPMPipeline(unet=unet, scheduler=ddpm)
    a = CheckpointSampler(None, 3, num_inference_steps=3, device="cpu", progress=True).sample(pipe)
    b = CheckpointSampler(ddpm, 3, num_inference_steps=3, device="cpu").sample(unet)
    assert a.images.shape == (3, 8, 8, 3) and a.finite_mask.all()
    assert np.array_equal(a.images, b.images)


def test_plain_callable_needs_geometry(sched):
    def model(x, t):  # a bare function returning a tensor
        return torch.zeros_like(x)

    with pytest.raises(ValueError, match="image_size= and channels="):
        CheckpointSampler(sched, 2, num_inference_steps=2, device="cpu").sample(model)
    b = CheckpointSampler(sched, 2, num_inference_steps=2, device="cpu", image_size=4, channels=3).sample(model)
    assert b.images.shape == (2, 4, 4, 3)


def test_to_uint8_against_formula():
    x = np.array([-1.5, -1.0, 0.0, 0.5, 1.0, 2.0], dtype=np.float32).reshape(1, 1, 1, 6)  # NCHW, 1 channel
    u8, ok = to_uint8(x)
    expect = np.rint((np.clip(x.reshape(-1), -1, 1) + 1) * 127.5).astype(np.uint8)
    assert ok.tolist() == [True]
    assert u8.shape == (1, 1, 6, 3) and (u8[0, 0, :, 0] == expect).all()


def test_argument_errors(sched):
    with pytest.raises(ValueError, match="sampler='euler'"):
        CheckpointSampler(sched, 4, sampler="euler")
    with pytest.raises(ValueError, match="num_samples=0"):
        CheckpointSampler(sched, 0)
    with pytest.raises(ValueError, match="needs the run's noise scheduler"):
        CheckpointSampler(None, 2, device="cpu").sample(OptimalDenoiser(digits_rgb(2, 8), sched))


# ------------------------------------------------------------------------------------------------ text pipelines


class FakeTextPipe:
    """StableDiffusionPipeline-shaped stand-in: records the latents, prompts and scheduler it is called with."""

    vae_scale_factor = 2

    def __init__(self, scale: float):
        self.unet = torch.nn.Conv2d(4, 4, 1)
        self.unet.config = SimpleNamespace(sample_size=4, in_channels=4)
        self.scheduler = DDPMScheduler()
        self.text_encoder = object()
        self.tokenizer = object()
        self.scale = scale
        self.calls: list[dict] = []

    def __call__(self, prompt=None, height=None, width=None, num_inference_steps=50, guidance_scale=7.5,
                 generator=None, latents=None, output_type="pil", eta=0.0):
        self.calls.append(dict(prompt=list(prompt), latents=latents.clone(), scheduler=type(self.scheduler).__name__,
                               n_gen=len(generator), hw=(height, width), steps=num_inference_steps))
        img = torch.sigmoid(self.scale * latents[:, :3]).repeat_interleave(2, 2).repeat_interleave(2, 3)
        img = img.permute(0, 2, 3, 1).numpy()
        if "nan" in prompt[0]:
            img[0] = np.nan
        return SimpleNamespace(images=img)


def test_text_pipeline_latents_reused_across_checkpoints():
    prompts = ["a cat", "a dog", "a nan-bird"]
    s = CheckpointSampler(None, None, seed=9, prompts=prompts, seeds_per_prompt=2, batch_size=4,
                          num_inference_steps=7, device="cpu")
    assert s.num_samples == 6
    p1, p2 = FakeTextPipe(1.0), FakeTextPipe(3.0)
    b1, b2 = s.sample(p1), s.sample(p2)
    lat1 = torch.cat([c["latents"] for c in p1.calls])
    lat2 = torch.cat([c["latents"] for c in p2.calls])
    expected = torch.stack([ref_noise(9, i, (4, 4, 4)) for i in range(6)])
    assert torch.equal(lat1, expected) and torch.equal(lat2, expected)
    assert b1.prompts == ["a cat", "a cat", "a dog", "a dog", "a nan-bird", "a nan-bird"]
    assert [c["prompt"] for c in p1.calls] == [b1.prompts[:4], b1.prompts[4:]]
    assert all(c["scheduler"] == "DDIMScheduler" and c["steps"] == 7 and c["hw"] == (8, 8) for c in p1.calls)
    assert [c["n_gen"] for c in p1.calls] == [4, 2]
    assert type(p1.scheduler).__name__ == "DDPMScheduler"  # restored after sampling
    assert b1.images.shape == (6, 8, 8, 3) and not np.array_equal(b1.images, b2.images)
    assert b1.finite_mask.tolist() == [True, True, True, True, False, True]
    # batch size does not change the latents
    p3 = FakeTextPipe(1.0)
    CheckpointSampler(None, None, seed=9, prompts=prompts, seeds_per_prompt=2, batch_size=1, device="cpu").sample(p3)
    assert torch.equal(torch.cat([c["latents"] for c in p3.calls]), expected)
    with pytest.raises(ValueError, match="prompts=None"):
        CheckpointSampler(None, 2, device="cpu").sample(FakeTextPipe(1.0))


def test_read_prompts(tmp_path):
    (tmp_path / "p.txt").write_text("# header\na cat\n\n a dog \n")
    assert read_prompts(tmp_path / "p.txt") == ["a cat", "a dog"]
    (tmp_path / "p.jsonl").write_text(json.dumps({"caption": "x"}) + "\n" + json.dumps({"prompt": "y"}) + "\n")
    assert read_prompts(tmp_path / "p.jsonl") == ["x", "y"]
    (tmp_path / "p.csv").write_text("id,text\n1,hello\n2,world\n")
    assert read_prompts(tmp_path / "p.csv") == ["hello", "world"]
    with pytest.raises(FileNotFoundError):
        read_prompts(tmp_path / "missing.txt")


# ------------------------------------------------------------------------------------------------ save / resume


def test_save_load_and_resume(tmp_path, train8, sched):
    rec = Recorder(OptimalDenoiser(train8, sched), nan_if_first_pixel_positive=True)
    s = CheckpointSampler(sched, 6, seed=5, num_inference_steps=5, device="cpu")
    batch = s.sample(rec)
    d = save_samples(batch, tmp_path, step=500)
    assert d == samples_dir(tmp_path, 500)
    pngs = sorted(p.name for p in d.glob("*.png"))
    assert pngs == [f"sample_{i:05d}.png" for i in range(6) if batch.finite_mask[i]]
    got = load_saved_samples(tmp_path, 500, fingerprint=s.fingerprint(), num_samples=6)
    assert got is not None
    assert np.array_equal(got.images, batch.images) and np.array_equal(got.finite_mask, batch.finite_mask)
    assert np.array_equal(got.indices, batch.indices) and np.array_equal(got.seeds, batch.seeds)
    other = CheckpointSampler(sched, 6, seed=6, num_inference_steps=5, device="cpu")
    assert load_saved_samples(tmp_path, 500, fingerprint=other.fingerprint()) is None
    assert load_saved_samples(tmp_path, 500, num_samples=7) is None
    assert load_saved_samples(tmp_path, 1000) is None

    calls = []

    def loader():
        calls.append(1)
        return OptimalDenoiser(train8, sched)

    s2 = CheckpointSampler(sched, 4, seed=1, num_inference_steps=5, device="cpu")
    first = s2.sample_or_load(loader, tmp_path, 7)
    again = s2.sample_or_load(loader, tmp_path, 7)
    assert calls == [1] and np.array_equal(first.images, again.images)
    s2.sample_or_load(loader, tmp_path, 7, checkpoint_id="sha-of-other-weights")  # other weights: resampled
    assert calls == [1, 1]
    (samples_dir(tmp_path, 7) / "samples.json").unlink()  # an interrupted save is not complete
    assert load_saved_samples(tmp_path, 7) is None


def test_prompts_not_all_sampled_are_announced(caplog):
    import logging

    from diffusers import DDPMScheduler

    from diffaudit.sampling import CheckpointSampler

    sched = DDPMScheduler(num_train_timesteps=100)
    prompts = [f"caption {i}" for i in range(8)]
    with caplog.at_level(logging.WARNING, logger="diffaudit"):
        s = CheckpointSampler(sched, 4, prompts=prompts, seeds_per_prompt=1)
    assert "sampling 4 of 8 prompts" in caplog.text and "num_samples=8" in caplog.text
    assert [s.prompt_for(i) for i in range(4)] == prompts[:4]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="diffaudit"):
        CheckpointSampler(sched, 16, prompts=prompts, seeds_per_prompt=2)
    assert "sampling" not in caplog.text  # every prompt covered: nothing to say


def test_audit_takes_the_prompts_themselves(tmp_path):
    from diffaudit.audit import audit
    from diffaudit.data import ImageSet

    train = ImageSet.from_arrays(np.random.default_rng(0).integers(0, 255, (6, 8, 8, 3), dtype=np.uint8))
    pipe = FakeTextPipe(1.0)
    r = audit([(1, pipe)], train=train, prompts=["a cat", "a dog"], seeds_per_prompt=2, num_samples=4,
              num_inference_steps=2, cache_dir=str(tmp_path), device="cpu")
    assert [c["prompt"] for c in pipe.calls][0] == ["a cat", "a cat", "a dog", "a dog"]
    assert r.provenance.sampler["num_prompts"] == 2 and r.checkpoints[0].num_samples == 4
