"""membership_scores: per-image denoising loss vs held-out, checked against closed-form models and brute force."""
from __future__ import annotations

import csv

import numpy as np
import pytest

from diffaudit.membership import MembershipResult, membership_scores, noise_index
from diffaudit.metrics import denoising_losses
from diffaudit.testing import GaussianDenoiser, OptimalDenoiser


def _digits(n_train: int, n_heldout: int, seed: int = 0):
    """8x8 grayscale digits, uint8 (n, 8, 8, 1); disjoint train / held-out."""
    from sklearn.datasets import load_digits

    x = np.round(load_digits().images / 16.0 * 255.0).astype(np.uint8)
    x = x[np.random.default_rng(seed).permutation(len(x))][..., None]
    return x[:n_train], x[n_train:n_train + n_heldout]


@pytest.fixture(scope="module")
def sched():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000)


def _brute_auc(t, h):
    """P(train loss < held-out loss) + 1/2 P(tie), by all pairs."""
    t, h = np.asarray(t)[:, None], np.asarray(h)[None, :]
    return float(((t < h) + 0.5 * (t == h)).mean())


def test_memorizing_model_separates_train_from_heldout(sched):
    train, held = _digits(40, 40)
    res = membership_scores(OptimalDenoiser(train, sched), train, held, scheduler=sched, noise_draws=2)
    assert res.auc > 0.95
    scores = np.array([im.score for im in res.images])
    assert np.median(scores) > 0.95  # a training image has lower loss than (nearly) every held-out image
    # brute force: each image alone through denoising_losses with its id's noise; held-out draws from seed + 1
    model = OptimalDenoiser(train, sched)
    ids = [f"{i:06d}" for i in range(len(train))]
    tl = np.array([denoising_losses(model, sched, train[i:i + 1], timesteps=(100,), noise_draws=2, seed=0,
                                    indices=[noise_index(ids[i])])[0] for i in range(len(train))])
    hl = np.array([denoising_losses(model, sched, held[i:i + 1], timesteps=(100,), noise_draws=2, seed=1,
                                    indices=[noise_index(ids[i])])[0] for i in range(len(held))])
    np.testing.assert_allclose([im.loss for im in res.images], tl, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(res.heldout_losses, hl, rtol=1e-6, atol=1e-12)
    assert res.auc == pytest.approx(_brute_auc(tl, hl), abs=1e-9)
    pct = [((hl > v).sum() + 0.5 * (hl == v).sum()) / len(hl) for v in tl]
    np.testing.assert_allclose(scores, pct, atol=1e-12)
    assert res.checkpoints[0].loss_gap == pytest.approx(hl.mean() - tl.mean())


def test_model_that_cannot_copy_has_auc_near_half(sched):
    train, held = _digits(120, 120, seed=1)
    model = GaussianDenoiser.fit(np.concatenate([train, held]), sched, diagonal=True)
    res = membership_scores(model, train, held, scheduler=sched, noise_draws=2)
    assert abs(res.auc - 0.5) < 0.15
    assert 0.3 < np.mean([im.score for im in res.images]) < 0.7


def test_noise_follows_the_image_id_not_its_position(sched):
    from diffaudit.data import ImageSet

    train, held = _digits(20, 20)
    ids = [f"img_{i}" for i in range(20)]
    model = OptimalDenoiser(train, sched)
    full = membership_scores(model, ImageSet.from_arrays(train, ids=ids), held, scheduler=sched, noise_draws=1)
    sub = ImageSet.from_arrays(train, ids=ids).subset([7, 3, 15])
    part = membership_scores(model, sub, held, scheduler=sched, noise_draws=1)
    by_id = {im.id: im.loss for im in full.images}
    assert [im.id for im in part.images] == ["img_7", "img_3", "img_15"]
    for im in part.images:
        assert im.loss == by_id[im.id]


def test_run_folder_all_checkpoints_and_pipeline(tmp_path, sched):
    """A diffusers-layout run: every checkpoint scored with the run's scheduler; losses equal a direct computation
    on an independently loaded UNet; a pipeline object works too; 8x8 grey images are brought to 16x16 RGB."""
    from diffusers import DDPMPipeline

    from diffaudit.checkpoints import discover_checkpoints, load_unet
    from diffaudit.testing import write_tiny_run

    train, held = _digits(12, 12)
    rgb16 = lambda a: np.repeat(a.repeat(2, 1).repeat(2, 2), 3, axis=3)  # noqa: E731
    run = write_tiny_run(tmp_path / "run", images=rgb16(train), steps=(1, 2), ema=False)
    res = membership_scores(run, rgb16(train), rgb16(held), checkpoint="all", noise_draws=1, device="cpu")
    assert [c.step for c in res.checkpoints] == [1, 2]
    assert all(0.0 <= c.auc <= 1.0 for c in res.checkpoints)
    assert set(res.images[0].loss_by_step) == {"1", "2"}
    unet = load_unet(run / "checkpoint-2" / "unet", device="cpu")
    sch = discover_checkpoints(run).new_scheduler()
    direct = denoising_losses(unet, sch, rgb16(train), timesteps=(100,), noise_draws=1, seed=0,
                              indices=[noise_index(f"{i:06d}") for i in range(12)])
    np.testing.assert_allclose([im.loss_by_step["2"] for im in res.images], direct, rtol=1e-5)
    # the pipeline object (root = final weights = checkpoint-2); grey 8x8 input is resized, not refused
    pipe = DDPMPipeline.from_pretrained(run)
    viaobj = membership_scores(pipe, rgb16(train), rgb16(held), noise_draws=1)
    np.testing.assert_allclose([im.loss for im in viaobj.images], direct, rtol=1e-5)
    small = membership_scores(pipe, train, held, noise_draws=1)
    assert len(small.images) == 12 and 0.0 <= small.auc <= 1.0


def test_errors_name_the_argument(tmp_path, sched):
    from diffaudit.testing import write_tiny_run

    train, held = _digits(10, 10)
    model = OptimalDenoiser(train, sched)
    with pytest.raises(ValueError, match="scheduler="):
        membership_scores(model, train, held)
    with pytest.raises(ValueError, match="noise_draws"):
        membership_scores(model, train, held, scheduler=sched, noise_draws=0)
    with pytest.raises(ValueError, match="checkpoint"):
        membership_scores(model, train, held, scheduler=sched, checkpoint=5)
    with pytest.raises(ValueError, match="checkpoint"):
        membership_scores(model, train, held, scheduler=sched, checkpoint="last")
    with pytest.raises(TypeError, match="model_or_run"):
        membership_scores(42, train, held)
    with pytest.raises(FileNotFoundError, match="heldout"):
        membership_scores(model, train, tmp_path / "nope", scheduler=sched)
    run = write_tiny_run(tmp_path / "run", steps=(1,), ema=False, final_pipeline=False)
    with pytest.raises(ValueError, match=r"steps: \[1\]"):
        membership_scores(run, train, held, checkpoint=7, device="cpu", scheduler="ddpm")


def test_json_roundtrip_and_csv(tmp_path, sched):
    from diffaudit.data import ImageSet

    train, held = _digits(10, 12)
    ids = ["=HYPERLINK(\"x\")"] + [f"t{i}" for i in range(1, 10)]
    res = membership_scores(OptimalDenoiser(train, sched), ImageSet.from_arrays(train, ids=ids), held,
                            scheduler=sched, noise_draws=1)
    back = MembershipResult.from_json(res.to_json())
    assert back == res
    res.to_csv(tmp_path / "m.csv")
    rows = list(csv.reader((tmp_path / "m.csv").open(newline="")))
    assert rows[0][:3] == ["id", "loss", "score"] and len(rows) == 11
    scores = [float(r[2]) for r in rows[1:]]
    assert scores == sorted(scores, reverse=True)
    assert "'=HYPERLINK(\"x\")" in [r[0] for r in rows]  # formula-like ids are neutralised


def test_audit_membership_auc_equals_membership_scores(sched, tmp_path):
    """One noise contract: the audit's per-checkpoint membership AUC, train and held-out losses and per-image
    membership scores are exactly those of membership_scores on the same model, images and settings."""
    from diffaudit.audit import audit
    from diffaudit.data import ImageSet

    train, held = _digits(24, 20, seed=3)
    t_set = ImageSet.from_arrays(train, ids=[f"t{i:03d}.png" for i in range(len(train))])
    h_set = ImageSet.from_arrays(held, ids=[f"h{i:03d}.png" for i in range(len(held))])
    model = OptimalDenoiser(train, sched)
    res = audit(checkpoints=[(10, model)], scheduler=sched, train=t_set, heldout=h_set, num_samples=4,
                num_inference_steps=2, loss_noise_draws=2, loss_timesteps=[100], cache_dir=str(tmp_path))
    ref = membership_scores(model, t_set, h_set, scheduler=sched, noise_draws=2, timesteps=(100,), seed=0)
    ck = res.checkpoints[0]
    assert ck.membership_auc == pytest.approx(ref.auc, abs=1e-12)
    assert ck.loss_train == pytest.approx(ref.checkpoints[0].loss_train, rel=1e-12)
    assert ck.loss_heldout == pytest.approx(ref.checkpoints[0].loss_heldout, rel=1e-12)
    got = {r.id: r.membership_score for r in res.images}
    assert got == pytest.approx(ref.scores, abs=1e-12)
