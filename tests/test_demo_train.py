"""Training half of the embedded demo (diffaudit/demo.py): layout, determinism, data split, loss, callback."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffaudit.demo import digits_split, train_digits_ddpm

STEPS, EVERY = 60, 20


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train_digits_ddpm(tmp_path_factory.mktemp("demo"), n_train=16, steps=STEPS, checkpoint_every=EVERY,
                             n_heldout=64, seed=0, device="cpu")


def _weights(path, sub="unet"):
    from safetensors.numpy import load_file

    return load_file(str(path / sub / "diffusion_pytorch_model.safetensors"))


def _same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_diffusers_layout_loads(run):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    assert run.checkpoint_steps == [20, 40, 60]
    names = sorted(p.name for p in run.run_dir.iterdir() if p.name.startswith("checkpoint-"))
    assert names == ["checkpoint-20", "checkpoint-40", "checkpoint-60"]
    for d in run.checkpoint_dirs:
        for sub in ("unet", "unet_ema"):  # train_unconditional.py --use_ema writes both
            assert (d / sub / "config.json").is_file()
            assert (d / sub / "diffusion_pytorch_model.safetensors").is_file()
            unet = UNet2DModel.from_pretrained(d / sub)
            assert unet.config.sample_size == 8 and unet.config.in_channels == 1
        assert json.loads((d / "unet_ema" / "config.json").read_text())["optimization_step"] == int(d.name[11:])
    assert (run.run_dir / "model_index.json").is_file()
    pipe = DDPMPipeline.from_pretrained(run.run_dir)
    assert isinstance(pipe.scheduler, DDPMScheduler) and pipe.scheduler.config.num_train_timesteps == 1000
    # the root pipeline holds the final EMA weights (as the diffusers script saves it), which differ from the raw ones
    root = _weights(run.run_dir)
    assert _same(_weights(run.run_dir / "checkpoint-60", "unet_ema"), root)
    assert not _same(_weights(run.run_dir / "checkpoint-60"), root)
    # a forward pass of the loaded pipeline's UNet works on the demo's shape
    with torch.no_grad():
        out = pipe.unet(torch.zeros(2, 1, 8, 8), torch.tensor([10, 500])).sample
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()
    log = json.loads((run.out_dir / "train_log.json").read_text())
    assert log["final_step"] == STEPS and len(log["losses"]) == STEPS


def test_images_match_sklearn_digits_and_split_is_disjoint(run):
    from PIL import Image
    from sklearn.datasets import load_digits

    ref = load_digits().images
    assert run.train_images.shape == (16, 8, 8, 1) and run.train_images.dtype == np.uint8
    assert run.heldout_images.shape == (64, 8, 8, 1)
    assert not set(run.train_ids) & set(run.heldout_ids)
    for ids, imgs, folder in ((run.train_ids, run.train_images, run.train_dir),
                              (run.heldout_ids, run.heldout_images, run.heldout_dir)):
        assert sorted(p.name for p in folder.glob("*.png")) == sorted(ids)
        for name, img in zip(ids, imgs):
            expected = np.round(ref[int(name[:-4])] / 16 * 255).astype(np.uint8)  # id = index into load_digits
            assert np.array_equal(img[..., 0], expected)
            assert np.array_equal(np.asarray(Image.open(folder / name)), expected)


def test_split_nesting_and_upsampling():
    tr16, ho, i16, h16 = digits_split(16, 100, seed=3)
    tr64, ho2, i64, h64 = digits_split(64, 100, seed=3)
    assert np.array_equal(h16, h64) and np.array_equal(ho, ho2)  # same held-out set for every size
    assert set(i16) <= set(i64) and not set(i64) & set(h64)
    big, _, ib, _ = digits_split(16, 100, seed=3, image_size=16)
    assert big.shape == (16, 16, 16, 1) and np.array_equal(big[:, ::2, ::2], tr16)
    with pytest.raises(ValueError, match="n_train"):
        digits_split(1797, 256)
    with pytest.raises(ValueError, match="image_size"):
        digits_split(16, 10, image_size=12)


def test_deterministic_and_seed_sensitive(tmp_path, run):
    kw = dict(n_train=16, steps=EVERY, checkpoint_every=EVERY, n_heldout=64, device="cpu")
    rng_before = torch.get_rng_state()
    a = train_digits_ddpm(tmp_path / "a", seed=0, **kw)
    assert torch.equal(torch.get_rng_state(), rng_before)  # global RNG untouched
    for sub in ("unet", "unet_ema"):  # vs the module run: same seed, longer
        assert _same(_weights(a.run_dir / f"checkpoint-{EVERY}", sub), _weights(run.run_dir / f"checkpoint-{EVERY}", sub))
    wa = _weights(a.run_dir / f"checkpoint-{EVERY}")
    np.testing.assert_array_equal(a.losses, run.losses[:EVERY])
    c = train_digits_ddpm(tmp_path / "c", seed=1, **kw)
    wc = _weights(c.run_dir / f"checkpoint-{EVERY}")
    assert any(not np.array_equal(wa[k], wc[k]) for k in wa)


def test_ema_matches_closed_form(tmp_path):
    """EMA with diffusers' warm-up: decay(k) = 1 - k^-3/4 after k >= 1 updates (0 at the first), from raw weights."""
    r = train_digits_ddpm(tmp_path, n_train=8, steps=3, checkpoint_every=1, n_heldout=8, device="cpu")
    raw = [_weights(d) for d in r.checkpoint_dirs]
    ema = [_weights(d, "unet_ema") for d in r.checkpoint_dirs]
    ref = {k: v.astype(np.float64) for k, v in raw[0].items()}  # decay 0: a copy (up to s - (s - p) rounding)
    for i in (0, 1, 2):
        if i:
            d = 1 - (1 + i) ** -0.75
            ref = {k: d * ref[k] + (1 - d) * raw[i][k] for k in ref}
        assert ema[i].keys() == ref.keys()
        for k in ref:
            np.testing.assert_allclose(ema[i][k], ref[k], rtol=1e-5, atol=1e-6)


def test_without_ema(tmp_path):
    r = train_digits_ddpm(tmp_path, n_train=8, steps=4, checkpoint_every=2, n_heldout=8, device="cpu", use_ema=False)
    assert not r.ema and not (r.checkpoint_dirs[-1] / "unet_ema").exists()
    assert _same(_weights(r.checkpoint_dirs[-1]), _weights(r.run_dir))


def test_loss_decreases(run):
    assert np.isfinite(run.losses).all() and run.losses.shape == (STEPS,)
    assert run.losses[-20:].mean() < 0.6 * run.losses[:10].mean()


def test_callback_every_step_and_early_stop(tmp_path):
    seen, models = [], []

    def cb(step, unet):
        seen.append((step, (tmp_path / "ddpm" / f"checkpoint-{step}").exists()))
        if step == 5:  # the callback gets the EMA model, i.e. what checkpoint-N/unet_ema holds
            models.append({k: v.detach().numpy().copy() for k, v in unet.state_dict().items()})
        return step == 7

    r = train_digits_ddpm(tmp_path, n_train=8, steps=30, checkpoint_every=5, n_heldout=8, device="cpu", callback=cb)
    assert [s for s, _ in seen] == list(range(1, 8))
    assert [s for s, exists in seen if exists] == [5]  # a step's checkpoint is on disk when its callback runs
    assert r.stopped_early and r.final_step == 7 and r.checkpoint_steps == [5, 7]
    assert (r.run_dir / "checkpoint-7" / "unet" / "config.json").is_file()
    assert (r.run_dir / "model_index.json").is_file() and len(r.losses) == 7
    assert _same(models[0], _weights(r.run_dir / "checkpoint-5", "unet_ema"))


@pytest.mark.parametrize("kw, name", [({"steps": 0}, "steps"), ({"lr": -1.0}, "lr"),
                                      ({"checkpoint_every": 0}, "checkpoint_every"),
                                      ({"beta_schedule": "cosine"}, "beta_schedule"), ({"n_train": 1}, "n_train"),
                                      ({"ema_max_decay": 1.0}, "ema_max_decay")])
def test_bad_arguments_name_themselves(tmp_path, kw, name):
    with pytest.raises(ValueError, match=name):
        train_digits_ddpm(tmp_path, **kw)
