"""diffaudit.metrics against independent references: brute-force loops, planted copies, closed forms, scipy/sklearn."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from diffaudit import metrics as M
from diffaudit.results import Estimate

sys.path.insert(0, str(Path(__file__).parent))
from conftest import digits_rgb  # noqa: E402

FAST = settings(max_examples=25, deadline=None)


def brute_dists(q, b):
    """All pairwise Euclidean distances by an explicit loop over queries (float64)."""
    q, b = np.asarray(q, float), np.asarray(b, float)
    return np.array([[math.sqrt(((qi - bj) ** 2).sum()) for bj in b] for qi in q])


def digits_vectors(n, seed=None):
    return digits_rgb(n, 8, seed=seed).reshape(n, -1).astype(np.float64) / 255.0


# ---------------------------------------------------------------- nearest neighbours (used by several metrics)

@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_knn_matches_brute_force(metric):
    rng = np.random.default_rng(0)
    base = rng.normal(size=(80, 12))
    base[5] = base[3]  # an exact duplicate
    q = rng.normal(size=(30, 12))
    d, i = M.nearest_neighbors(q, base, 4, metric=metric)
    if metric == "l2":
        full = brute_dists(q, base)
    else:
        nq = q / np.linalg.norm(q, axis=1, keepdims=True)
        nb = base / np.linalg.norm(base, axis=1, keepdims=True)
        full = 1.0 - nq @ nb.T
    np.testing.assert_allclose(d, np.sort(full, axis=1)[:, :4], atol=1e-9)
    np.testing.assert_allclose(np.take_along_axis(full, i, 1), d, atol=1e-9)


def test_knn_exclude_self_keeps_duplicates():
    rng = np.random.default_rng(1)
    t = rng.normal(size=(40, 6))
    t[7] = t[2]
    d, i = M.nearest_neighbors(t, t, 3, exclude_self=True)
    assert not (i == np.arange(40)[:, None]).any()
    assert i[2, 0] == 7 and i[7, 0] == 2 and d[2, 0] == 0.0 and d[7, 0] == 0.0
    full = brute_dists(t, t)
    np.fill_diagonal(full, np.inf)
    np.testing.assert_allclose(d, np.sort(full, axis=1)[:, :3], atol=1e-9)


# ---------------------------------------------------------------- stats

def wilson_by_roots(k, n, z):
    """Reference: the Wilson interval is {p : (p_hat - p)^2 = z^2 p (1 - p) / n}; solve the quadratic."""
    ph = k / n
    a = 1 + z * z / n
    b = -(2 * ph + z * z / n)
    c = ph * ph
    r = np.sort(np.roots([a, b, c]).real)
    return max(0.0, r[0]), min(1.0, r[1])


@pytest.mark.parametrize("k,n", [(0, 50), (1, 50), (5, 100), (37, 40), (40, 40), (123, 512)])
def test_wilson_matches_quadratic_roots(k, n):
    low, high = M.wilson_interval(k, n, 0.95)
    ref = wilson_by_roots(k, n, 1.959963984540054)
    assert low == pytest.approx(ref[0], abs=1e-9) and high == pytest.approx(ref[1], abs=1e-9)


def test_ci_coverage_binomial():
    """Coarse: both intervals cover the true p in about 95% of simulated binomial experiments."""
    rng = np.random.default_rng(123)
    p, n, trials = 0.15, 120, 300
    cov_w = cov_b = 0
    for t in range(trials):
        x = rng.random(n) < p
        w = M.proportion_estimate(x)
        b = M.bootstrap_ci(x, n_boot=400, seed=t)
        cov_w += w.low <= p <= w.high
        cov_b += b.low <= p <= b.high
    assert 0.90 <= cov_w / trials <= 0.99
    assert 0.88 <= cov_b / trials <= 0.99


def test_bootstrap_deterministic_and_vectorised_equals_loop():
    x = np.random.default_rng(0).exponential(size=57)
    a = M.bootstrap_ci(x, np.median, n_boot=300, seed=4)
    b = M.bootstrap_ci(x, np.median, n_boot=300, seed=4)
    c = M.bootstrap_ci(x, lambda v: float(np.median(v)), n_boot=300, seed=4)  # no axis= -> loop path
    assert a == b
    assert (a.low, a.high) == pytest.approx((c.low, c.high))
    assert a.value == pytest.approx(np.median(x)) and a.low <= a.value <= a.high and a.n == 57


@pytest.mark.parametrize("bad,match", [([], "empty"), ([1.0, np.nan], "NaN"), ([[1.0]], "1-D")])
def test_bootstrap_rejects_bad_values(bad, match):
    with pytest.raises(ValueError, match=match):
        M.bootstrap_ci(bad)


def test_wilson_errors_name_argument():
    with pytest.raises(ValueError, match="n=0"):
        M.wilson_interval(0, 0)
    with pytest.raises(ValueError, match="k=5"):
        M.wilson_interval(5, 3)
    with pytest.raises(ValueError, match="confidence"):
        M.wilson_interval(1, 3, 1.5)


# ---------------------------------------------------------------- Gu et al. ratio

def test_memorization_fraction_hand_made():
    d1 = np.array([0.0, 1.0, 0.3, 2.0, 0.0, 0.4])
    d2 = np.array([3.0, 2.0, 1.0, 6.1, 0.0, 1.0])
    # ratios: 0, .5, .3, .328, 0/0 -> 1, .4
    np.testing.assert_allclose(M.nn_ratio(d1, d2), [0, 0.5, 0.3, 2 / 6.1, 1.0, 0.4])
    e = M.memorization_fraction(d1, d2)
    assert isinstance(e, Estimate) and e.value == pytest.approx(3 / 6) and e.n == 6
    assert (e.low, e.high) == pytest.approx(M.wilson_interval(3, 6))
    assert M.memorization_fraction(d1, d2, threshold=0.5).value == pytest.approx(4 / 6)


def test_memorization_fraction_planted_copies_vs_brute_force():
    train = digits_vectors(150, seed=0)
    held = digits_vectors(300, seed=0)[150:180]  # other digits, not in train
    samples = np.concatenate([train[:10] + 0.001, held])
    full = brute_dists(samples, train)
    srt = np.sort(full, axis=1)
    ref = np.mean(srt[:, 0] / srt[:, 1] < 1 / 3)
    d, _ = M.nearest_neighbors(samples, train, 2)
    e = M.memorization_fraction(d[:, 0], d[:, 1])
    assert e.value == pytest.approx(ref)
    assert e.value >= 10 / 40  # the planted copies are flagged


def test_duplicate_limitation_and_dedup_aware_ratio():
    rng = np.random.default_rng(2)
    train = rng.normal(size=(30, 8))
    train[1] = train[0]  # image 0 duplicated
    samples = np.stack([train[0], train[5] + 1e-3])
    d, i = M.nearest_neighbors(samples, train, 4)
    plain = M.nn_ratio_from_knn(d)
    assert plain[0] == 1.0 and plain[1] < 1 / 3  # the copy of a duplicated image is missed by the plain rule
    groups = np.arange(30)
    groups[1] = 0
    dedup = M.nn_ratio_from_knn(d, i, dedup_aware=True, groups=groups)
    full = brute_dists(samples[:1], train)[0]
    assert dedup[0] == pytest.approx(0.0) and dedup[1] == pytest.approx(plain[1])
    assert M.dedup_second_distance(d, i, groups)[0] == pytest.approx(np.sort(full)[2])


def test_nn_ratio_errors():
    with pytest.raises(ValueError, match="d1"):
        M.nn_ratio([np.nan], [1.0])
    with pytest.raises(ValueError, match="d1 must not exceed d2"):
        M.nn_ratio([2.0], [1.0])
    with pytest.raises(ValueError, match="threshold"):
        M.memorization_fraction([0.1], [1.0], threshold=0)


@st.composite
def nn_pairs(draw):
    n = draw(st.integers(1, 40))
    a = draw(hnp.arrays(float, n, elements=st.floats(0, 1e6, allow_nan=False)))
    b = draw(hnp.arrays(float, n, elements=st.floats(0, 1e6, allow_nan=False)))
    return np.minimum(a, b), np.maximum(a, b)


@FAST
@given(nn_pairs(), st.randoms(use_true_random=False))
def test_memorization_fraction_no_nan_and_order_invariant(pair, rnd):
    d1, d2 = pair
    r = M.nn_ratio(d1, d2)
    assert np.isfinite(r).all() and (r >= 0).all() and (r <= 1).all()
    e = M.memorization_fraction(d1, d2)
    assert all(math.isfinite(v) for v in (e.value, e.low, e.high)) and e.low <= e.value <= e.high
    perm = list(range(len(d1)))
    rnd.shuffle(perm)
    assert M.memorization_fraction(d1[perm], d2[perm]) == e


# ---------------------------------------------------------------- Somepalli replication

def test_replication_rate_and_top1_summary():
    sims = np.array([0.2, 0.51, 0.5, 0.9, -0.1, 0.7, 0.3, 0.1, 0.0, 0.45])
    e = M.replication_rate(sims)
    assert e.value == pytest.approx(3 / 10)  # strictly greater than 0.5
    mean, p95 = M.top1_summary(sims, "cosine")
    assert mean == pytest.approx(sims.mean()) and p95 == pytest.approx(np.percentile(sims, 95))
    dists = np.arange(1.0, 21.0)
    assert M.top1_summary(dists, "l2")[1] == pytest.approx(np.percentile(dists, 5))
    with pytest.raises(ValueError, match="top1_sim"):
        M.replication_rate([1.5])
    with pytest.raises(ValueError, match="metric"):
        M.top1_summary(sims, "dot")


def test_train_baseline_top1_vs_brute_force():
    """The train-vs-train baseline the audit reports (each training image's first non-self neighbour, from
    diffaudit.index.self_neighbors, float32 FAISS) against a float64 brute force."""
    from diffaudit.index import self_neighbors

    t = np.random.default_rng(3).normal(size=(50, 10))
    full = brute_dists(t, t)
    np.fill_diagonal(full, np.inf)
    np.testing.assert_allclose(self_neighbors(t.astype(np.float32), 1, metric="l2")[0][:, 0], full.min(1), rtol=1e-5)
    n = t / np.linalg.norm(t, axis=1, keepdims=True)
    sim = n @ n.T
    np.fill_diagonal(sim, -np.inf)
    np.testing.assert_allclose(self_neighbors(t.astype(np.float32), 1, metric="cosine")[0][:, 0], sim.max(1),
                               atol=1e-5)


# ---------------------------------------------------------------- Carlini calibrated ratio

def test_calibrated_ratio_vs_brute_force_loop():
    rng = np.random.default_rng(4)
    train = rng.normal(size=(120, 16))
    samples = np.concatenate([train[:6] + 0.01 * rng.normal(size=(6, 16)), rng.normal(size=(14, 16))])
    alpha, n = 0.5, 50
    ref_train, ref_paper = [], []
    for s in samples:
        ds = [math.dist(s, x) for x in train]
        j = int(np.argmin(ds))
        others = sorted(math.dist(train[j], y) for k, y in enumerate(train) if k != j)[:n]
        ref_train.append(ds[j] / (alpha * np.mean(others)))
        ref_paper.append(ds[j] / (alpha * np.mean(sorted(ds)[:n])))
    d, i = M.nearest_neighbors(samples, train, n)
    got_train = M.calibrated_ratio(d[:, 0], M.train_knn_mean(train, n)[i[:, 0]], alpha)
    got_paper = M.calibrated_ratio(d[:, 0], M.sample_knn_mean(d, n), alpha)
    np.testing.assert_allclose(got_train, ref_train, rtol=1e-9)
    np.testing.assert_allclose(got_paper, ref_paper, rtol=1e-9)
    e = M.extraction_fraction(got_train)
    assert e.value == pytest.approx(np.mean(np.array(ref_train) < 1.0)) and e.value >= 6 / 20


def test_calibrated_ratio_zero_denominator_and_errors():
    np.testing.assert_allclose(M.calibrated_ratio([0.0, 1.0, 1.0], [0.0, 0.0, 4.0]), [1.0, np.inf, 0.5])
    assert M.extraction_fraction([1.0, np.inf, 0.5]).value == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="alpha"):
        M.calibrated_ratio([1.0], [1.0], alpha=0)
    with pytest.raises(ValueError, match="same length"):
        M.calibrated_ratio([1.0], [1.0, 2.0])


@FAST
@given(st.integers(0, 10_000))
def test_train_knn_mean_equivariant_to_training_order(seed):
    rng = np.random.default_rng(seed)
    t = rng.normal(size=(int(rng.integers(3, 40)), 5))
    if len(t) > 4:
        t[3] = t[0]
    perm = rng.permutation(len(t))
    a = M.train_knn_mean(t, 7)
    np.testing.assert_allclose(M.train_knn_mean(t[perm], 7), a[perm], atol=1e-9)
    assert np.isfinite(a).all()


# ---------------------------------------------------------------- Meehan C_T and Alaa authenticity

def test_mann_whitney_z_matches_scipy_u():
    from scipy.stats import mannwhitneyu

    rng = np.random.default_rng(5)
    q, p = rng.exponential(size=37), np.round(rng.exponential(size=51), 1)  # with ties
    u = mannwhitneyu(q, p).statistic  # U of the first sample
    m, n = len(q), len(p)
    ref = (u - (m * n / 2 - 0.5)) / math.sqrt(m * n * (n + m + 1) / 12)
    assert M.mann_whitney_z(q, p) == pytest.approx(ref)


def test_ct_statistic_cell_weighting_by_hand():
    rng = np.random.default_rng(6)
    q, p = rng.random(90), rng.random(60)
    qc = np.repeat([0, 1, 2], 30)
    pc = np.repeat([0, 1, 2], [10, 20, 30])
    qc[:25] = 3  # cell 0 keeps 5 samples (< 20: dropped); cell 3 has no held-out sample (dropped)
    zs = [M.mann_whitney_z(q[qc == c], p[pc == c]) for c in (1, 2)]
    ref = (20 * zs[0] + 30 * zs[1]) / 50
    assert M.ct_statistic(q, p, qc, pc) == pytest.approx(ref)


@pytest.mark.parametrize("num_cells", [1, 4])
def test_ct_copies_negative_fresh_samples_small(num_cells):
    rng = np.random.default_rng(7)
    train = rng.normal(size=(400, 6))
    held = rng.normal(size=(200, 6))
    copies = train[rng.integers(0, 400, 200)] + 1e-3 * rng.normal(size=(200, 6))
    fresh = rng.normal(size=(200, 6))
    z_copy = M.data_copying_test(train, held, copies, num_cells=num_cells)
    z_fresh = M.data_copying_test(train, held, fresh, num_cells=num_cells)
    assert z_copy < -8
    assert abs(z_fresh) < 3


def test_authenticity_constructed_copies_and_brute_force():
    rng = np.random.default_rng(8)
    train = rng.normal(size=(60, 5))
    train[1] = train[0]  # duplicated image: its own NN distance is 0
    samples = np.concatenate([train[[0, 4, 9]], train[[10, 11]] + 1e-4, rng.normal(size=(20, 5))])
    d, i = M.nearest_neighbors(samples, train, 1)
    tn, _ = M.nearest_neighbors(train, train, 1, exclude_self=True)
    est, mask = M.authenticity(d[:, 0], i[:, 0], tn[:, 0])
    full = brute_dists(samples, train)
    own = brute_dists(train, train)
    np.fill_diagonal(own, np.inf)
    ref = np.array([full[j].min() > own[int(np.argmin(full[j]))].min() for j in range(len(samples))])
    np.testing.assert_array_equal(mask, ref)
    assert not mask[:5].any()  # all planted copies (incl. the copy of a duplicated image) are inauthentic
    assert est.value == pytest.approx(mask.mean()) and est.n == len(samples)


def test_authenticity_errors():
    with pytest.raises(ValueError, match="sample_nn_idx"):
        M.authenticity([0.1], [5], [0.1, 0.2])


# ---------------------------------------------------------------- denoising loss and membership

def _tiny_unet():
    import torch
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       layers_per_block=1, norm_num_groups=8)


class OptimalDenoiser:
    """Closed-form optimal denoiser for a finite training set: E[x0 | x_t] is a softmax-weighted training average."""

    def __init__(self, train_uint8, scheduler, prediction_type="epsilon"):
        import torch

        self.x0 = torch.from_numpy(train_uint8.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0).double()
        self.ab = scheduler.alphas_cumprod.double()
        self.ptype = prediction_type

    def __call__(self, x, t):
        import torch

        x = x.double()
        ab = self.ab[t].view(-1, 1, 1, 1)
        d2 = ((x[:, None] - ab.sqrt()[:, None] * self.x0[None]) ** 2).flatten(2).sum(-1)
        w = torch.softmax(-d2 / (2 * (1 - ab.view(-1, 1))), dim=1)
        x0hat = torch.einsum("bn,nchw->bchw", w, self.x0)
        eps = (x - ab.sqrt() * x0hat) / (1 - ab).sqrt()
        if self.ptype == "v_prediction":
            return (ab.sqrt() * eps - (1 - ab).sqrt() * x0hat).float()
        return eps.float()


@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction"])
def test_denoising_loss_closed_form_optimal_denoiser(ptype):
    from diffusers import DDPMScheduler

    sch = DDPMScheduler(num_train_timesteps=1000, prediction_type=ptype)
    imgs = digits_rgb(96, 16, seed=1)
    train, held = imgs[:48], imgs[48:]
    model = OptimalDenoiser(train, sch, ptype)
    lt = M.denoising_losses(model, sch, train, timesteps=(50, 100), noise_draws=2)
    lh = M.denoising_losses(model, sch, held, timesteps=(50, 100), noise_draws=2)
    assert np.median(lt) < 1e-6  # it predicts the true noise exactly for training images
    assert np.median(lh) > 1e-2
    assert M.membership_auc(lt, lh) > 0.99 and M.loss_gap(lt, lh) > 0
    single = np.repeat(train[:1], 4, axis=0)  # one training image: the exact noise for every draw
    assert M.denoising_losses(OptimalDenoiser(train[:1], sch, ptype), sch, single).max() < 1e-8


def test_denoising_losses_deterministic_batch_invariant_and_indexed():
    from diffusers import DDPMScheduler

    sch = DDPMScheduler(num_train_timesteps=1000)
    model = _tiny_unet()
    imgs = digits_rgb(6, 16, seed=2)
    kw = dict(timesteps=(100, 400), noise_draws=2)
    a = M.denoising_losses(model, sch, imgs, batch_size=64, seed=3, **kw)
    b = M.denoising_losses(model, sch, imgs, batch_size=3, seed=3, **kw)
    c = M.denoising_losses(model, sch, imgs, batch_size=64, seed=3, **kw)
    sub = M.denoising_losses(model, sch, imgs[[5, 2]], seed=3, indices=[5, 2], **kw)
    other = M.denoising_losses(model, sch, imgs, seed=4, **kw)
    np.testing.assert_array_equal(a, c)
    np.testing.assert_allclose(a, b, rtol=1e-5)
    np.testing.assert_allclose(sub, a[[5, 2]], rtol=1e-5)
    assert not np.allclose(a, other) and np.isfinite(a).all() and (a > 0).all()
    model.train()
    M.denoising_losses(model, sch, imgs[:1])
    assert model.training  # the model's mode is restored


def test_denoising_losses_errors():
    from diffusers import DDPMScheduler

    sch = DDPMScheduler(num_train_timesteps=1000)
    model = _tiny_unet()
    with pytest.raises(ValueError, match="timesteps"):
        M.denoising_losses(model, sch, digits_rgb(2, 16), timesteps=(1000,))
    with pytest.raises(ValueError, match="in_channels"):
        M.denoising_losses(model, sch, digits_rgb(2, 16)[..., :1])
    with pytest.raises(ValueError, match="images"):
        M.denoising_losses(model, sch, np.zeros((2, 16, 16), dtype=np.int32))


@FAST
@given(st.lists(st.floats(0, 10, allow_nan=False), min_size=1, max_size=30),
       st.lists(st.floats(0, 10, allow_nan=False), min_size=1, max_size=30), st.booleans())
def test_membership_auc_equals_sklearn(train, held, quantize):
    from sklearn.metrics import roc_auc_score

    t, h = np.array(train), np.array(held)
    if quantize:  # many ties
        t, h = np.round(t), np.round(h)
    labels = np.r_[np.ones(t.size), np.zeros(h.size)]
    ref = roc_auc_score(labels, -np.r_[t, h])
    assert M.membership_auc(t, h) == pytest.approx(ref)
    pct = M.membership_percentile(t, h)
    assert pct.shape == t.shape and ((pct >= 0) & (pct <= 1)).all()
    assert pct.mean() == pytest.approx(ref)
    ref_pct = [(np.sum(h > x) + 0.5 * np.sum(h == x)) / h.size for x in t]
    np.testing.assert_allclose(pct, ref_pct)


# ---------------------------------------------------------------- per image

def test_copies_per_image_hand_made():
    ids = ["a", "b", "a", "c", "a", "b", "a"]
    mask = [True, False, True, True, False, True, True]
    steps = [500, 500, 1000, 1000, 1000, 1500, 1500]
    out = M.copies_per_image(ids, mask, steps)
    assert set(out) == {"a", "b", "c"}
    assert out["a"] == (3, 500, {"500": 1, "1000": 1, "1500": 1})
    assert out["b"].copies == 1 and out["b"].first_step == 1500
    assert out["c"] == M.CopyCount(1, 1000, {"1000": 1})
    with pytest.raises(ValueError, match="same length"):
        M.copies_per_image(ids, mask[:2], steps)


def test_outlier_scores_vs_brute_force_and_labels():
    rng = np.random.default_rng(9)
    t = rng.normal(size=(60, 4))
    t[59] += 25.0  # a clear outlier
    full = brute_dists(t, t)
    np.fill_diagonal(full, np.inf)
    ref = np.sort(full, axis=1)[:, :5].mean(1)
    s = M.outlier_scores(t, k=5)
    np.testing.assert_allclose(s, ref, atol=1e-9)
    lab = M.outlier_labels(s)
    assert lab[59] == "outlier" and (lab == "outlier").sum() == np.sum(s > np.quantile(s, 0.95))
    assert set(lab) <= {"inlier", "outlier"}


@FAST
@given(st.integers(0, 10_000), st.integers(1, 6))
def test_outlier_scores_invariant_to_training_order(seed, k):
    rng = np.random.default_rng(seed)
    t = rng.integers(0, 3, size=(int(rng.integers(2, 30)), 3)).astype(float)  # many exact duplicates
    perm = rng.permutation(len(t))
    s = M.outlier_scores(t, k)
    assert np.isfinite(s).all()
    np.testing.assert_allclose(M.outlier_scores(t[perm], k), s[perm], atol=1e-12)


@settings(max_examples=3, deadline=None)
@given(st.integers(1, 9), st.integers(0, 100))
def test_denoising_losses_batch_size_property(bs, seed):
    from diffusers import DDPMScheduler

    sch = DDPMScheduler(num_train_timesteps=1000)
    model = _tiny_unet()
    imgs = digits_rgb(5, 16, seed=seed)
    ref = M.denoising_losses(model, sch, imgs, timesteps=(100,), noise_draws=1, batch_size=64, seed=seed)
    got = M.denoising_losses(model, sch, imgs, timesteps=(100,), noise_draws=1, batch_size=bs, seed=seed)
    np.testing.assert_allclose(got, ref, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# a copy threshold calibrated on held-out images


def test_heldout_quantile_threshold_known_answer_and_coverage():
    from diffaudit.metrics import heldout_quantile_threshold

    rng = np.random.default_rng(0)
    t, lo, hi = heldout_quantile_threshold(rng.exponential(1.0, 20000), 0.01)
    true = -np.log(0.99)  # the exponential's 1% quantile, closed form
    assert lo <= true <= hi and abs(t - true) < 0.0015
    hits = 0
    for _ in range(300):  # distribution-free order-statistic interval: coverage at least the nominal 95%
        _, lo, hi = heldout_quantile_threshold(rng.exponential(1.0, 400), 0.01)
        hits += lo <= true <= hi
    assert hits / 300 >= 0.93
    _, lo, hi = heldout_quantile_threshold(rng.exponential(1.0, 20), 0.01)  # too few for a lower bound
    assert lo == -np.inf and np.isfinite(hi)


def test_heldout_calibrated_rate_separates_novel_from_copied():
    from diffaudit.metrics import heldout_calibrated_rate

    rng = np.random.default_rng(1)
    held = rng.exponential(1.0, 2000)
    novel, _ = heldout_calibrated_rate(rng.exponential(1.0, 4000), held)  # samples as novel as held-out images
    assert novel.low <= 0.01 <= novel.high + 0.005 and novel.value < 0.02
    copied = np.concatenate([np.zeros(400), rng.exponential(1.0, 600)])  # 40% exact copies
    rate, (t, lo, hi) = heldout_calibrated_rate(copied, held)
    assert 0.39 <= rate.value <= 0.43 and rate.low > 0.3 and lo <= t <= hi
