"""Leave-one-out memorization: closed-form fold runs with planted memorization, brute force, manifest validation,
outputs (JSON / CSV / HTML), the CLI and the demo fold trainer."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from diffaudit.loo import FoldManifest, LooResult, loo_scores, train_fold_runs
from diffaudit.report.loo import render_loo
from diffaudit.membership import noise_index
from diffaudit.metrics import denoising_losses
from diffaudit.testing import OptimalDenoiser, _ClosedFormDenoiser, to_model_space

N, K = 40, 6
DUP, OUT, WHITE = 0, 1, 2  # positions: the duplicated digit, the inverted digit, an all-white image


class DupMemorizer(_ClosedFormDenoiser):
    """Optimal denoiser of the prior ``p * uniform(points) + (1 - p) * N(mean, diag var)`` fitted to ``fold``:
    it reproduces ``points`` (the images it saw many times) and generalizes (a diagonal Gaussian) for the rest."""

    def __init__(self, points, fold, scheduler, p=0.5, ridge=1e-2):
        f = to_model_space(fold, np.float64)
        super().__init__(scheduler, f.shape[-1], f.shape[1])
        flat = f.reshape(len(f), -1)
        self.mu = torch.as_tensor(flat.mean(0))
        self.v = torch.as_tensor(flat.var(0) + ridge)
        self.pts = torch.as_tensor(to_model_space(points, np.float64).reshape(len(points), -1)) if len(points) else None
        self.p = p

    def x0_hat(self, x, a):
        a = a[:, None]
        sa = a.sqrt()
        vt = a * self.v + (1 - a)
        r = x - sa * self.mu
        g_mean = self.mu + sa * self.v / vt * r
        if self.pts is None:
            return g_mean
        lg = -0.5 * ((r ** 2) / vt + torch.log(2 * np.pi * vt)).sum(1, keepdim=True) + np.log(1 - self.p)
        d2 = ((x[:, None, :] - sa[:, None] * self.pts[None]) ** 2).sum(-1)
        lp = -0.5 * d2 / (1 - a) - 0.5 * x.shape[1] * torch.log(2 * np.pi * (1 - a)) + np.log(self.p / len(self.pts))
        w = torch.softmax(torch.cat([lp, lg], 1), 1)
        return w[:, :-1] @ self.pts + w[:, -1:] * g_mean


@pytest.fixture(scope="module")
def sched():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000)


def _setup(seed: int, white: bool = True):
    """40 digits (8x8 grey): 0 = a typical digit, 1 = an inverted digit (isolated outlier), 2 = all white (unless
    ``white=False``); a balanced random design: every image seen by exactly K/2 of K runs."""
    from sklearn.datasets import load_digits

    rng = np.random.default_rng(seed)
    x = np.round(load_digits().images / 16.0 * 255.0).astype(np.uint8)
    x = x[rng.permutation(len(x))][:N].copy()
    x[OUT] = 255 - x[OUT]
    if white:
        x[WHITE] = 255
    x = x[..., None]
    ids = [f"img{i:03d}.png" for i in range(N)]
    seen = np.zeros((N, K), dtype=bool)
    for i in range(N):
        seen[i, rng.choice(K, K // 2, replace=False)] = True
    manifest = {"version": 1, "runs": {f"fold-{k}": [ids[i] for i in np.flatnonzero(seen[:, k])] for k in range(K)}}
    return x, ids, seen, manifest


def _dup_runs(x, seen, sched):
    """Run k: memorizes the duplicated digit when it saw it, generalizes the rest of its fold; the inverted digit
    is absent from every run's model (no run fits it) although the manifest says half of them saw it."""
    runs = {}
    for k in range(K):
        fold = [i for i in np.flatnonzero(seen[:, k]) if i != OUT]
        runs[f"fold-{k}"] = DupMemorizer(x[[DUP]] if seen[DUP, k] else x[:0], x[fold], sched)
    return runs


def _opt_runs(x, seen, sched, copies_of_dup=20):
    """Run k: the optimal denoiser of its fold (memorizes everything it saw; the duplicated digit 20 times),
    except the inverted digit, which no run fits."""
    runs = {}
    for k in range(K):
        fold = [i for i in np.flatnonzero(seen[:, k]) if i != OUT]
        extra = [x[[DUP] * (copies_of_dup - 1)]] if seen[DUP, k] else []
        runs[f"fold-{k}"] = OptimalDenoiser(np.concatenate([x[fold]] + extra), sched)
    return runs


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_duplicated_image_scores_highest_and_outlier_is_not_memorized(seed, sched):
    from diffaudit.data import ImageSet

    x, ids, seen, manifest = _setup(seed, white=False)
    res = loo_scores(_dup_runs(x, seen, sched), manifest, ImageSet.from_arrays(x, ids=ids), scheduler=sched,
                     noise_draws=2)
    by = {im.id: im for im in res.images}
    assert res.images[0].id == ids[DUP]  # sorted by score: the duplicated digit is first
    assert by[ids[DUP]].label == "memorized inlier"
    assert by[ids[OUT]].outlier and not by[ids[OUT]].memorized and by[ids[OUT]].label == "hard outlier"
    # only the planted memorization passes the default rule (a generalizing fit does not halve any loss)
    assert [im.id for im in res.images if im.memorized] == [ids[DUP]]
    assert all(im.n_in == K // 2 and im.n_out == K - K // 2 for im in res.images)


def test_high_leverage_outlier_is_told_apart_from_a_memorized_inlier(sched):
    """The leverage objection: the all-white image shifts the generalizing (Gaussian) fit of every run that saw
    it so much that its raw LOO score beats the truly copied digit. The outlier score keeps the two apart:
    "memorized outlier" vs "memorized inlier"; the loss ratio still ranks the copied digit first."""
    from diffaudit.data import ImageSet

    x, ids, seen, manifest = _setup(0, white=True)
    res = loo_scores(_dup_runs(x, seen, sched), manifest, ImageSet.from_arrays(x, ids=ids), scheduler=sched,
                     noise_draws=2)
    by = {im.id: im for im in res.images}
    assert res.images[0].id == ids[WHITE] and by[ids[WHITE]].label == "memorized outlier"
    assert by[ids[DUP]].label == "memorized inlier"
    assert max(res.images, key=lambda im: im.loss_ratio).id == ids[DUP]
    assert by[ids[OUT]].label == "hard outlier"


def test_scores_match_brute_force(sched):
    """Every number recomputed image by image, run by run with denoising_losses (fixed noise per image id)."""
    from diffaudit.data import ImageSet

    x, ids, seen, manifest = _setup(0)
    runs = _dup_runs(x, seen, sched)
    res = loo_scores(runs, manifest, ImageSet.from_arrays(x, ids=ids), scheduler=sched, timesteps=(50, 200),
                     noise_draws=2, seed=5)
    names = list(manifest["runs"])
    by = {im.id: im for im in res.images}
    for i in range(N):
        losses_in, losses_out = [], []
        for name in names:
            loss = denoising_losses(runs[name], sched, x[i:i + 1], timesteps=(50, 200), noise_draws=2, seed=5,
                                    indices=[noise_index(ids[i])])[0]
            (losses_in if ids[i] in manifest["runs"][name] else losses_out).append(loss)
        im = by[ids[i]]
        assert im.loss_in == pytest.approx(sum(losses_in) / len(losses_in), rel=1e-9)
        assert im.loss_out == pytest.approx(sum(losses_out) / len(losses_out), rel=1e-9)
        assert im.loo_score == pytest.approx(im.loss_out - im.loss_in, rel=1e-9, abs=1e-12)
        assert im.loss_ratio == pytest.approx(im.loss_out / im.loss_in, rel=1e-9)
    # outlier scores: brute-force mean distance to the 5 nearest other images, in [0, 1] pixel space
    v = x.reshape(N, -1).astype(np.float64) / 255.0
    d = np.sqrt(((v[:, None] - v[None]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    ref = np.sort(d, axis=1)[:, :5].mean(1)
    np.testing.assert_allclose([by[i].outlier_score for i in ids], ref, rtol=1e-9)
    assert {i for i in ids if by[i].outlier} == {ids[j] for j in np.flatnonzero(ref > np.quantile(ref, 0.95))}


def test_model_that_memorizes_everything(sched):
    """Optimal denoisers memorize every image they saw: every scored image is memorized - the white image as a
    memorized *outlier* - except the inverted digit no run fits (a hard outlier). A threshold relative to the score
    distribution (median + 3 MAD) would flag almost nothing here; the loss-ratio rule is scale-free."""
    from diffaudit.data import ImageSet

    x, ids, seen, manifest = _setup(0)
    train = ImageSet.from_arrays(x, ids=ids)
    res = loo_scores(_opt_runs(x, seen, sched), manifest, train, scheduler=sched, noise_draws=2)
    by = {im.id: im for im in res.images}
    assert by[ids[OUT]].label == "hard outlier"
    assert by[ids[WHITE]].label == "memorized outlier"
    assert all(im.memorized for im in res.images if im.id != ids[OUT])
    assert res.counts()["memorized inlier"] == N - 2
    mad = loo_scores(_opt_runs(x, seen, sched), manifest, train, scheduler=sched, noise_draws=2, threshold="mad")
    assert sum(im.memorized for im in mad.images) <= 3 and "MAD" in mad.rule
    absolute = loo_scores(_opt_runs(x, seen, sched), manifest, train, scheduler=sched, noise_draws=2, threshold=1e9)
    assert not any(im.memorized for im in absolute.images) and absolute.threshold == 1e9


def test_seen_by_all_or_none_are_counted_not_scored(sched):
    from diffaudit.data import ImageSet

    x, ids, seen, manifest = _setup(0)
    runs = manifest["runs"]
    for name in runs:  # ids[3] seen by every run, ids[4] by none
        runs[name] = [i for i in runs[name] if i != ids[4]]
        if ids[3] not in runs[name]:
            runs[name].append(ids[3])
    res = loo_scores(_dup_runs(x, seen, sched), manifest, ImageSet.from_arrays(x, ids=ids), scheduler=sched,
                     noise_draws=1)
    by = {im.id: im for im in res.images}
    assert res.n_seen_by_all == 1 and res.n_seen_by_none == 1
    assert by[ids[3]].label == by[ids[4]].label == "unscored"
    assert by[ids[3]].loo_score is None and by[ids[3]].n_out == 0 and by[ids[4]].n_in == 0
    assert res.images[-2:] and {im.id for im in res.images[-2:]} == {ids[3], ids[4]}  # unscored last
    assert res.counts()["unscored"] == 2


def test_manifest_validation_errors(tmp_path, sched):
    from diffaudit.data import ImageSet

    x, ids, seen, manifest = _setup(0)
    train = ImageSet.from_arrays(x, ids=ids)
    runs = _dup_runs(x, seen, sched)

    def run(m, r=runs, **kw):
        return loo_scores(r, m, train, scheduler=sched, noise_draws=1, **kw)

    bad = json.loads(json.dumps(manifest))
    bad["runs"]["fold-0"] += ["nope.png", "other/missing.png"]
    with pytest.raises(ValueError, match=r"2 image ids are not in train.*nope\.png"):
        run(bad)
    lenient = run(bad, strict=False)
    assert lenient.unknown_ids == ["nope.png", "other/missing.png"]
    with pytest.raises(ValueError, match=r"run\(s\) that were not given: \['fold-5'\]"):
        run(manifest, r={k: v for k, v in runs.items() if k != "fold-5"})
    with pytest.raises(ValueError, match=r"'fold-9' is not in manifest"):
        run(manifest, r={**runs, "fold-9": runs["fold-0"]})
    cases = [
        ({"folds": [{"run": "a", "train_ids": ["x"]}]}, r"unknown keys \['folds'\]"),
        ({"runs": {"a": ids[:3]}}, "at least 2"),
        ({"runs": {"a": ids[:3], "b": []}}, r"runs\['b'\] must be a non-empty list"),
        ({"runs": {"a": ids[:3], "b": [ids[0], ids[0]]}}, r"more than once \(first: 'img000.png'\)"),
        ({"runs": {"a": ids[:3], "b": [1, 2]}}, "not non-empty strings"),
        ({"version": 2, "runs": {"a": ids[:3], "b": ids[3:5]}}, "version=2"),
        ({"runs": ["a", "b"]}, "'runs' must be a non-empty object"),
        ([1, 2], "expected a JSON object"),
    ]
    for data, msg in cases:
        with pytest.raises(ValueError, match=msg):
            FoldManifest.from_dict(data)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        run(tmp_path / "broken.json")
    with pytest.raises(FileNotFoundError, match="manifest="):
        run(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="min_ratio"):
        run(manifest, min_ratio=0.5)
    with pytest.raises(ValueError, match="threshold="):
        run(manifest, threshold="median")


def test_json_csv_html_outputs(tmp_path, sched):
    from diffaudit.data import ImageSet

    x, ids, seen, manifest = _setup(1, white=False)
    evil = '<script>alert("x")</script>.png'
    ids2 = [evil if i == ids[DUP] else i for i in ids]
    manifest = {"runs": {k: [evil if i == ids[DUP] else i for i in v] for k, v in manifest["runs"].items()}}
    train = ImageSet.from_arrays(x, ids=ids2)
    res = loo_scores(_dup_runs(x, seen, sched), manifest, train, scheduler=sched, noise_draws=1,
                     copies={evil: 7, ids2[5]: 1})
    assert LooResult.from_json(res.to_json()) == res
    by = {im.id: im for im in res.images}
    assert by[evil].copies == 7 and by[ids2[5]].copies == 1 and by[ids2[6]].copies == 0
    res.to_csv(tmp_path / "loo.csv")
    rows = list(csv.DictReader((tmp_path / "loo.csv").open(newline="")))
    assert len(rows) == N and rows[0]["id"] == evil and rows[0]["label"] == "memorized inlier"
    html = (tmp_path / "loo.html")
    render_loo(res, html, images=train)
    text = html.read_text()
    assert "<script" not in text and "&lt;script&gt;" in text
    import html as _html

    csp = _html.unescape(text.split('http-equiv="Content-Security-Policy" content="', 1)[1].split('"', 1)[0])
    assert "script-src 'none'" in csp and "default-src 'none'" in csp
    assert "<svg" in text and text.count("<circle") == N and "data:image/png;base64," in text
    assert "hard outlier" in text and "memorized inlier" in text
    assert "http://" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "")


@pytest.fixture(scope="module")
def fold_runs(tmp_path_factory):
    """Two real fold runs of the demo UNet (1 optimizer step each) with their manifest."""
    return train_fold_runs(tmp_path_factory.mktemp("folds"), 2, n_train=8, steps=1, n_heldout=4, device="cpu",
                           num_threads=1)


def test_train_fold_runs_writes_a_valid_manifest(fold_runs, tmp_path):
    from diffaudit.checkpoints import discover_checkpoints
    from diffaudit.loo import _fold_assignment

    fr = fold_runs
    man = FoldManifest.load(fr.manifest)
    assert sorted(man.runs) == ["runs/fold-0", "runs/fold-1"] and man.meta["scheme"] == "half"
    # scheme "half" with k=2: complementary halves, every image in exactly one run
    a, b = (set(man.runs[k]) for k in sorted(man.runs))
    assert not a & b and a | b == set(fr.train_ids) and len(fr.train_ids) == 8
    assert sorted(p.name for p in fr.train_dir.iterdir()) == sorted(fr.train_ids)
    for d in fr.run_dirs:
        run = discover_checkpoints(d)
        assert run.steps[0] == 1 and run.scheduler is not None
    rng = np.random.default_rng(0)
    half = _fold_assignment(10, 6, "half", rng)
    assert (half.sum(1) == 3).all() and (half.sum(0) == 5).all()  # each image in k // 2 runs, each run sees n / 2
    assert all((half[:, 2 * p] ^ half[:, 2 * p + 1]).all() for p in range(3))  # complementary pairs
    odd = _fold_assignment(9, 5, "half", rng)
    assert set(odd.sum(1)) <= {2, 3} and (odd[:, 4].sum() == 4)
    kfold = _fold_assignment(9, 3, "kfold", rng)
    assert (kfold.sum(1) == 2).all() and sorted(kfold.sum(0)) == [6, 6, 6]  # left out of exactly one run
    with pytest.raises(ValueError, match="scheme"):
        train_fold_runs(tmp_path / "x", 2, scheme="random")
    with pytest.raises(ValueError, match="k=1"):
        train_fold_runs(tmp_path / "x", 1)


def test_cli_and_run_folders(fold_runs, tmp_path):
    """Real run folders found by the manifest's paths, by folder name, and through `diffaudit loo`."""
    from typer.testing import CliRunner

    from diffaudit.cli import app

    fr = fold_runs
    by_manifest = loo_scores(None, fr.manifest, fr.train_dir, noise_draws=1, device="cpu")
    assert len(by_manifest.images) == 8 and all(im.n_in == 1 and im.n_out == 1 for im in by_manifest.images)
    b, a = fr.run_dirs[1], fr.run_dirs[0]
    by_name = loo_scores([b, a], fr.manifest, fr.train_dir, noise_draws=1, device="cpu")
    assert [r.name for r in by_name.runs] == ["runs/fold-0", "runs/fold-1"]
    assert [im.loo_score for im in by_name.images] == [im.loo_score for im in by_manifest.images]

    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["loo", "--runs", str(a), "--runs", str(b), "--manifest", str(fr.manifest),
                                   "--train", str(fr.train_dir), "--out", str(out), "--noise-draws", "1",
                                   "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert {p.name for p in out.iterdir()} >= {"loo.json", "loo.csv", "loo.html"}
    assert LooResult.from_json(out / "loo.json").images[0].loo_score == by_manifest.images[0].loo_score
    res = CliRunner().invoke(app, ["loo", "--runs", str(a), "--manifest", str(fr.manifest), "--train",
                                   str(fr.train_dir), "--out", str(out)])
    assert res.exit_code == 2 and "not given" in res.output and "Traceback" not in res.output
