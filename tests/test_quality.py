"""Generalization: sample-quality metrics against closed forms and brute force, tau_gen and the stop window on
synthetic curves, and the disjoint-split test on closed-form models."""
from __future__ import annotations

import numpy as np
import pytest

from diffaudit.metrics.quality import frechet_distance, frechet_estimate, frechet_floor, knn_radii, prdc
from diffaudit.onset import recommend_in_window, tau_gen
from diffaudit.results import Estimate


# ------------------------------------------------------------------------------------------------ Frechet distance


def _fd_closed_form(m1, s1, m2, s2) -> float:
    from scipy.linalg import sqrtm

    return float(((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * sqrtm(s1 @ s2).real))


def test_fd_equals_the_closed_form_for_two_gaussians():
    """With the samples' own mean and covariance, FD is the Gaussian closed form exactly (d < n and d > n)."""
    rng = np.random.default_rng(0)
    for n, m, d in ((300, 200, 6), (40, 30, 120)):
        a = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.3 + 1.0
        b = rng.normal(size=(m, d)) * 2.0 - 0.5
        want = _fd_closed_form(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
        assert frechet_distance(a, b) == pytest.approx(want, rel=1e-6, abs=1e-8)


def test_fd_large_samples_approach_the_population_closed_form():
    """Known Gaussians N(0, I) and N(mu, 4I) in 3-d: FD = |mu|^2 + 3 (1 + 4 - 2 * 2) = |mu|^2 + 3."""
    rng = np.random.default_rng(1)
    mu = np.array([1.0, -2.0, 0.5])
    a = rng.normal(size=(200_000, 3))
    b = rng.normal(size=(200_000, 3)) * 2.0 + mu
    assert frechet_distance(a, b) == pytest.approx((mu ** 2).sum() + 3.0, rel=0.01)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


def test_fd_ci_contains_estimate_and_floor_is_the_mean_of_subsets():
    rng = np.random.default_rng(2)
    fake, real, train = rng.normal(size=(60, 5)), rng.normal(size=(80, 5)), rng.normal(0.3, 1, size=(50, 5))
    e = frechet_estimate(fake, real, n_boot=40)
    assert e.low <= e.value <= e.high and e.n == 60
    # the floor recomputed independently: the same seeded subsets, each through the closed form
    sub = np.random.default_rng(0)
    idx = [sub.choice(50, 20, replace=False) for _ in range(5)]
    want = np.mean([_fd_closed_form(train[i].mean(0), np.cov(train[i], rowvar=False), real.mean(0),
                                    np.cov(real, rowvar=False)) for i in idx])
    assert frechet_floor(train, real, 20) == pytest.approx(want, rel=1e-6)
    assert frechet_floor(train, real, 500) == pytest.approx(frechet_distance(train, real))  # n capped at the set


# ------------------------------------------------------------------------------- precision/recall/density/coverage


def _prdc_brute(real, fake, k):
    def d(x, y):
        return np.array([[np.sqrt(((u - v) ** 2).sum()) for v in y] for u in x])

    rr, ff, rf = d(real, real), d(fake, fake), d(real, fake)
    r_real = np.array([sorted(row[np.arange(len(row)) != i])[k - 1] for i, row in enumerate(rr)])
    r_fake = np.array([sorted(row[np.arange(len(row)) != i])[k - 1] for i, row in enumerate(ff)])
    precision = np.mean([any(rf[i, j] < r_real[i] for i in range(len(real))) for j in range(len(fake))])
    recall = np.mean([any(rf[i, j] < r_fake[j] for j in range(len(fake))) for i in range(len(real))])
    density = np.mean([sum(rf[i, j] < r_real[i] for i in range(len(real))) for j in range(len(fake))]) / k
    coverage = np.mean([min(rf[i]) < r_real[i] for i in range(len(real))])
    return precision, recall, density, coverage


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_prdc_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    real = rng.normal(size=(37, 4))
    fake = rng.normal(0.4 * seed, 1.0 + 0.3 * seed, size=(29, 4))
    got = prdc(real, fake, k=5)
    want = _prdc_brute(real, fake, 5)
    for e, w in zip((got.precision, got.recall, got.density, got.coverage), want):
        assert e.value == pytest.approx(w, abs=1e-12)
        assert e.low <= e.value <= e.high
    np.testing.assert_allclose(knn_radii(real, 5), [sorted(np.sqrt(((real - r) ** 2).sum(1)))[5] for r in real])


def test_prdc_of_copies_and_of_a_collapsed_generator():
    real = np.random.default_rng(3).normal(size=(50, 3))
    same = prdc(real, real.copy(), k=5)
    assert same.precision.value == 1.0 and same.recall.value == 1.0 and same.coverage.value == 1.0
    collapsed = prdc(real, np.repeat(real[:1], 20, axis=0) + 1e-9 * np.arange(20)[:, None], k=5)
    assert collapsed.coverage.value <= 0.2 and collapsed.recall.value <= 0.2  # one mode: little diversity


# ----------------------------------------------------------------------------------------- tau_gen and the window


def _fd(v, half=0.5):
    return Estimate(v, v - half, v + half, 128)


STEPS = [100, 200, 300, 400, 500, 600]


@pytest.mark.parametrize("curve, onset, want_tau, want_step, empty", [
    # quality plateaus at 300, onset at 500: window [300, 500) -> the best quality inside it (400)
    ([9.0, 5.0, 2.2, 2.0, 1.9, 1.8], 500, 300, 400, False),
    # plateau after the onset: empty window, best compromise = best quality before the onset (step 300)
    ([9.0, 8.0, 6.0, 4.0, 2.0, 1.0], 400, 600, 300, True),
    # plateau at the onset step itself: empty
    ([9.0, 8.0, 1.1, 1.0, 1.0, 1.0], 300, 300, 200, True),
    # no onset: best quality at or after the plateau, up to the last checkpoint
    ([9.0, 5.0, 2.0, 1.0, 1.2, 1.1], None, 400, 400, False),
])
def test_window_rule_on_synthetic_curves(curve, onset, want_tau, want_step, empty):
    fds = [_fd(v) for v in curve]
    assert tau_gen(STEPS, fds) == want_tau
    rec = recommend_in_window(STEPS, fds, onset, want_tau)
    assert rec.step == want_step
    assert ("window is empty" in rec.reason) == empty


def test_window_rule_onset_at_first_checkpoint_and_missing_quality():
    fds = [_fd(v) for v in (3.0, 2.0, 1.0)]
    assert recommend_in_window([1, 2, 3], fds, 1, tau_gen([1, 2, 3], fds)).step is None
    assert tau_gen([1, 2, 3], [None, None, None]) is None
    assert tau_gen([1, 2, 3], [None, _fd(2.0, 0.1), _fd(1.0, 0.1)]) == 3


# ------------------------------------------------------------------------------------------- disjoint-split test


@pytest.fixture(scope="module")
def halves():
    from diffusers import DDPMScheduler
    from sklearn.datasets import load_digits

    x = np.round(load_digits().images / 16.0 * 255.0).astype(np.uint8)[..., None]
    x = x[np.random.default_rng(0).permutation(len(x))]
    return x[:40], x[40:80], DDPMScheduler(num_train_timesteps=1000)


def _cmp(a_models, b_models, ta, tb, sched, tmp_path, n=24):
    from diffaudit.compare import compare_runs
    from diffaudit.data import ImageSet

    return compare_runs(a_models, b_models, ImageSet.from_arrays(ta), ImageSet.from_arrays(tb), scheduler=sched,
                        num_samples=n, num_inference_steps=10, cache_dir=str(tmp_path))


def test_memorizing_models_on_disjoint_halves_disagree_and_copy_their_own(halves, tmp_path):
    from diffaudit.testing import OptimalDenoiser

    ta, tb, sched = halves
    res = _cmp([(1, OptimalDenoiser(ta, sched))], [(1, OptimalDenoiser(tb, sched))], ta, tb, sched, tmp_path)
    c = res.checkpoints[0]
    assert c.agreement.value <= 0.05
    assert c.copies_a.value >= 0.9 and c.copies_b.value >= 0.9
    assert res.shared_train_images == 0


def test_one_model_passed_twice_agrees_fully(halves, tmp_path):
    from diffaudit.testing import GaussianDenoiser

    ta, tb, sched = halves
    g = GaussianDenoiser.fit(np.concatenate([ta, tb]), sched, diagonal=True)
    res = _cmp([(5, g)], [(5, g)], ta, tb, sched, tmp_path)
    assert res.checkpoints[0].agreement.value == 1.0
    assert res.checkpoints[0].median_distance_ab == pytest.approx(0.0, abs=1e-6)


def test_gaussian_models_on_disjoint_halves_agree(halves, tmp_path):
    """Two Gaussians fitted on disjoint halves (they cannot copy): the same noise gives nearly the same image."""
    from diffaudit.testing import GaussianDenoiser

    ta, tb, sched = halves
    ga = GaussianDenoiser.fit(ta, sched, diagonal=True)
    gb = GaussianDenoiser.fit(tb, sched, diagonal=True)
    res = _cmp([(1, ga)], [(1, gb)], ta, tb, sched, tmp_path, n=32)
    c = res.checkpoints[0]
    assert c.agreement.value >= 0.8
    assert c.copies_a.value <= 0.1 and c.copies_b.value <= 0.1
    assert c.median_distance_ab < c.median_distance_train
    html = res.to_html(tmp_path / "compare.html")
    assert "Disjoint-split test" in html and "<script" not in html
