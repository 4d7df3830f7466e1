"""find_duplicates / match on real images (scikit-learn digits written as files) with planted copies.

References are independent of the code under test: planted ground truth (which file copies which), brute-force
numpy distances over all pairs, and the documented threshold rule re-computed here from the brute-force matrix.
"""
from __future__ import annotations

import csv
import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import digits_rgb
from diffaudit.curate import (
    DUPLICATE_PSNR_DB,
    DuplicateReport,
    Matches,
    duplicate_threshold,
    find_duplicates,
    match,
)
from diffaudit.data import ImageSet
from diffaudit.embedders import embed, get_embedder
from diffaudit.embedders.base import Embedder

N_DIGITS = 400
XSS = "<script>alert(1)</script>"


def _save(arr: np.ndarray, path: Path, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, **kw)


def _jpeg(arr: np.ndarray, q: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=q)
    return np.asarray(Image.open(buf).convert("RGB"))


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Folder: 400 distinct digits (32 px PNG) + planted copies. Returns (root, truth) with truth[copy_id] = source_id."""
    root = tmp_path_factory.mktemp("planted")
    x = digits_rgb(N_DIGITS, 32)
    from sklearn.datasets import load_digits

    raw = load_digits().images[:N_DIGITS].reshape(N_DIGITS, -1)
    d_raw = np.sqrt(((raw[:, None] - raw[None]) ** 2).sum(-1))
    np.fill_diagonal(d_raw, np.inf)
    assert d_raw.min() > 0, "sklearn digits subset contains exact duplicates: choose another subset"
    for i in range(N_DIGITS):
        _save(x[i], root / "digits" / f"d{i:04d}.png")
    truth: dict[str, tuple[str, str]] = {}  # copy id -> (source id, kind)

    def src(i):
        return f"digits/d{i:04d}.png"

    for i in range(0, 10):  # exact copies
        _save(x[i], root / "copies" / f"exact_{i:04d}.png")
        truth[f"copies/exact_{i:04d}.png"] = (src(i), "exact")
    for i in range(10, 20):  # resized 32 -> 48 px (bilinear)
        _save(np.asarray(Image.fromarray(x[i]).resize((48, 48), Image.BILINEAR)), root / "copies" / f"resized_{i:04d}.png")
        truth[f"copies/resized_{i:04d}.png"] = (src(i), "resized")
    for i in range(20, 30):  # JPEG re-encoded, quality 90
        _save(x[i], root / "copies" / f"jpeg_{i:04d}.jpg", quality=90)
        truth[f"copies/jpeg_{i:04d}.jpg"] = (src(i), "jpeg")
    for i in range(30, 33):  # shifted by 3 px, and a crop re-sized to 32
        _save(np.roll(x[i], 3, axis=1), root / "copies" / f"shift_{i:04d}.png")
        truth[f"copies/shift_{i:04d}.png"] = (src(i), "shift")
    _save(np.asarray(Image.fromarray(x[33][3:29, 3:29]).resize((32, 32), Image.BILINEAR)), root / "copies" / "crop_0033.png")
    truth["copies/crop_0033.png"] = (src(33), "crop")
    for i in range(60, 64):  # uniformly brighter (+12 grey levels, clipped at 255) or darker (-12)
        shifted = np.clip(x[i].astype(np.int16) + (12 if i % 2 else -12), 0, 255).astype(np.uint8)
        _save(shifted, root / "copies" / f"bright_{i:04d}.png")
        truth[f"copies/bright_{i:04d}.png"] = (src(i), "bright")
    for i in range(64, 68):  # mirrored left-right
        _save(x[i][:, ::-1].copy(), root / "copies" / f"hflip_{i:04d}.png")
        truth[f"copies/hflip_{i:04d}.png"] = (src(i), "hflip")
    # a bigger cluster: digit 40 with two exact copies and a resized one
    _save(x[40], root / "copies" / "multi_a.png")
    _save(x[40], root / "copies" / "multi_b.png")
    _save(np.asarray(Image.fromarray(x[40]).resize((48, 48), Image.BILINEAR)), root / "copies" / "multi_c.png")
    truth.update({f"copies/multi_{s}.png": (src(40), "exact" if s != "c" else "resized") for s in "abc"})
    # a hostile file name: folder "<script>alert(1)<" + file "script>.png" -> id "<script>alert(1)</script>.png"
    _save(x[50], root / "<script>alert(1)<" / "script>.png")
    truth[XSS + ".png"] = (src(50), "exact")
    return root, truth


def _brute_l2(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    sa, sb = (a * a).sum(1), (b * b).sum(1)
    return np.sqrt(np.maximum(sa[:, None] + sb[None] - 2 * a @ b.T, 0))


def _rule(d_direct: np.ndarray, dim: int) -> float:
    """The documented threshold rule, from a brute-force distance matrix (diagonal inf): min(PSNR 30 dB in L2 units,
    1/3 x median over images of the distance to the nearest image farther than that PSNR bound)."""
    t_abs = 10 ** (-DUPLICATE_PSNR_DB / 20) * math.sqrt(dim)
    beyond = (d_direct > t_abs) & np.isfinite(d_direct)  # the diagonal (inf) is no neighbour
    firsts = [row[m].min() for row, m in zip(d_direct, beyond) if m.any()]
    return min(t_abs, np.median(firsts) / 3)


@pytest.fixture(scope="module")
def pixel_run(planted, tmp_path_factory):
    """find_duplicates with the pixel defaults, and brute-force references on the same (cached) vectors: centred
    vectors (each image's mean subtracted), direct and mirrored distance matrices over all pairs."""
    root, truth = planted
    cache = tmp_path_factory.mktemp("cache")
    images = ImageSet.from_folder(root)
    report = find_duplicates(images, "pixel", cache_dir=cache)
    emb = get_embedder("pixel")
    E = embed(images, emb, cache_dir=cache)  # same vectors, for the brute-force reference
    v = E.vectors.astype(np.float64)
    vc = v - v.mean(axis=1, keepdims=True)
    h, w = emb.size
    mirrored = vc.reshape(len(vc), h, w, 3)[:, :, ::-1].reshape(len(vc), -1)
    d_direct, d_mirror = _brute_l2(vc, vc), _brute_l2(mirrored, vc)
    np.fill_diagonal(d_direct, np.inf)
    np.fill_diagonal(d_mirror, np.inf)
    return images, report, E, (d_direct, d_mirror), cache


def test_pixel_finds_exact_resized_brightened_and_mirrored_copies_and_no_distinct_pairs(planted, pixel_run):
    root, truth = planted
    images, report, E, _, _ = pixel_run
    assert report.num_images == len(images) == N_DIGITS + len(truth)
    assert report.metric == "l2" and report.embedder == "pixel-64x64"  # mixed sizes -> 64x64
    assert report.invariances == ["brightness", "hflip"]
    pairs = {frozenset((p.id_a, p.id_b)): p for p in report.pairs}
    for copy, (source, kind) in truth.items():
        if kind in ("exact", "resized", "jpeg", "bright", "hflip"):
            assert frozenset((copy, source)) in pairs, (copy, kind)
            want = {"hflip": ("hflip",), "exact": ("", "identical file")}.get(kind, ("",))
            assert pairs[frozenset((copy, source))].transform in want, (copy, kind)
    # no pair, and no cluster, joins two distinct digits
    originals = {f"digits/d{i:04d}.png" for i in range(N_DIGITS)}
    for p in report.pairs:
        assert not (p.id_a in originals and p.id_b in originals), p
    for c in report.clusters:
        assert len(originals.intersection(c)) == 1, c
    # the multi-copy digit forms one cluster of 4
    multi = next(c for c in report.clusters if "digits/d0040.png" in c)
    assert sorted(multi) == sorted(["copies/multi_a.png", "copies/multi_b.png", "copies/multi_c.png",
                                    "digits/d0040.png"])
    # exact copies score exactly 0
    assert pairs[frozenset(("copies/exact_0000.png", "digits/d0000.png"))].score == 0.0


def test_pixel_threshold_follows_documented_rule_and_pairs_equal_brute_force(pixel_run):
    images, report, E, (d_direct, d_mirror), _ = pixel_run
    assert report.threshold == pytest.approx(_rule(d_direct, E.dim), rel=1e-4)
    assert "PSNR" in report.threshold_rule and "mirrored" in report.threshold_rule
    # every pair within the threshold, direct or mirrored (brute force over all pairs), is reported, nothing else
    d = np.minimum(d_direct, d_mirror)
    ii, jj = np.nonzero(np.triu(d <= report.threshold, 1))
    expected = {frozenset((E.ids[i], E.ids[j])) for i, j in zip(ii, jj)}
    assert {frozenset((p.id_a, p.id_b)) for p in report.pairs} == expected
    for p in report.pairs:
        a, b = E.ids.index(p.id_a), E.ids.index(p.id_b)
        assert p.score == pytest.approx(d[a, b], abs=1e-3)
        if abs(d_mirror[a, b] - d_direct[a, b]) > 1e-3:  # not a near tie: the transform names the smaller one
            assert p.transform in (("hflip",) if d_mirror[a, b] < d_direct[a, b] else ("", "identical file"))
    # margin: the closest distinct digits are well outside, mirrored or not
    orig = [i for i, s in enumerate(E.ids) if s.startswith("digits/")]
    assert d[np.ix_(orig, orig)].min() > 1.1 * report.threshold
    assert len(E.ids) == len(images)


def test_pixel_without_invariances_equals_raw_brute_force(planted, pixel_run):
    root, truth = planted
    images, _, E, _, cache = pixel_run
    report = find_duplicates(images, "pixel", cache_dir=cache, invariances=(), k=3)
    assert report.invariances == []
    v = E.vectors.astype(np.float64)
    d = _brute_l2(v, v)
    np.fill_diagonal(d, np.inf)
    assert report.threshold == pytest.approx(_rule(d, E.dim), rel=1e-4)
    ii, jj = np.nonzero(np.triu(d <= report.threshold, 1))
    assert {frozenset((p.id_a, p.id_b)) for p in report.pairs} == {frozenset((E.ids[i], E.ids[j]))
                                                                   for i, j in zip(ii, jj)}
    assert all(p.transform in ("", "identical file") for p in report.pairs)
    found = {frozenset((p.id_a, p.id_b)) for p in report.pairs}
    for copy, (source, kind) in truth.items():  # raw pixels: a mirror image is not a duplicate
        if kind == "hflip":
            assert frozenset((copy, source)) not in found
    with pytest.raises(ValueError, match="allowed values"):
        find_duplicates(images, "pixel", cache_dir=cache, invariances=("rotate",))
    with pytest.raises(ValueError, match="pixel embedder only"):
        find_duplicates(images, "tiled", cache_dir=cache, invariances=("hflip",))


def test_json_csv_round_trip(pixel_run, tmp_path):
    _, report, *_ = pixel_run
    path = tmp_path / "dups.json"
    report.to_json(path)
    back = DuplicateReport.from_json(path)
    assert back == report
    text = report.to_csv(tmp_path / "dups.csv")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == len(report.pairs)
    assert rows[0]["id_a"] == report.pairs[0].id_a and float(rows[0]["score"]) == report.pairs[0].score
    assert (tmp_path / "dups.csv").read_text() == text


def _check_self_contained(html: str) -> None:
    assert '<meta http-equiv="Content-Security-Policy"' in html
    assert "default-src &#x27;none&#x27;" in html or "default-src 'none'" in html
    for m in re.finditer(r'(?:src|href)="([^"]*)"', html):
        assert m.group(1).startswith("data:image/png;base64,"), m.group(1)[:60]
    assert "<script" not in html.lower()  # no scripts at all, and user strings escaped
    assert "@import" not in html and "url(http" not in html


def test_duplicates_html_escapes_and_inlines(pixel_run, tmp_path):
    images, report, *_ = pixel_run
    html = report.to_html(tmp_path / "dups.html")
    assert (tmp_path / "dups.html").read_text(encoding="utf-8") == html
    _check_self_contained(html)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;.png" in html
    shown = sum(min(len(c), 24) for c in report.clusters)
    assert html.count("<img ") == shown
    # from JSON: images must be given again (or the folder in source is reopened)
    back = DuplicateReport.from_json(report.to_json())
    assert back.to_html(images=images).count("<img ") == shown


def test_match_finds_sources_and_baseline_is_brute_force(planted, tmp_path):
    root, truth = planted
    everything = ImageSet.from_folder(root)
    ref = ImageSet.from_folder(root / "digits")
    queries = everything.subset([i for i in everything.ids if not i.startswith("digits/")])
    m = match(queries, ref, "pixel:64", k=3, cache_dir=tmp_path / "cache")
    assert m.num_reference == N_DIGITS and m.k == 3 and m.metric == "l2"
    assert len(m.query_ids) == len(queries)
    for q, refs, scores in zip(m.query_ids, m.reference_ids, m.scores):
        source, kind = truth[q]
        assert len(refs) == 3 and scores == sorted(scores)
        if kind in ("exact", "resized", "jpeg"):
            assert refs[0] == source[len("digits/"):], (q, refs)  # reference ids are relative to digits/
        if kind == "exact":
            assert scores[0] == 0.0
    # baseline: each reference image to its nearest other reference image (brute force)
    v = embed(ref, get_embedder("pixel:64"), cache=False).vectors.astype(np.float64)
    sq = (v * v).sum(1)
    d = np.sqrt(np.maximum(sq[:, None] + sq[None] - 2 * v @ v.T, 0))
    np.fill_diagonal(d, np.inf)
    nn = d.min(1)
    b = m.baseline
    assert b.n == N_DIGITS
    assert b.mean == pytest.approx(nn.mean(), rel=1e-3)
    for got, q in ((b.p05, 5), (b.p50, 50), (b.p95, 95)):
        assert got == pytest.approx(np.percentile(nn, q), rel=1e-3)
    # copies are closer than 95% of reference images are to each other
    flagged = set(m.closer_than_baseline())
    assert {q for q, (_, kind) in truth.items() if kind in ("exact", "jpeg", "resized")} <= flagged
    # serialisation
    assert Matches.from_json(m.to_json()) == m
    rows = list(csv.DictReader(io.StringIO(m.to_csv())))
    assert len(rows) == 3 * len(queries) and rows[0]["rank"] == "1"
    html = m.to_html(tmp_path / "m.html")
    _check_self_contained(html)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;.png" in html
    assert html.count("<img ") == len(queries) * 4


def test_tiled_pairs_equal_brute_force_tiled_l2(planted, tmp_path):
    from diffaudit.embedders.tiled import tiled_l2

    root, truth = planted
    images = ImageSet.from_folder(root)
    report = find_duplicates(images, "tiled", cache_dir=tmp_path / "c")
    E = embed(images, get_embedder("tiled"), cache_dir=tmp_path / "c")
    d = tiled_l2(E.vectors, E.vectors, 16).astype(np.float64)
    np.fill_diagonal(d, np.inf)
    ii, jj = np.nonzero(np.triu(d <= report.threshold, 1))
    expected = {frozenset((E.ids[i], E.ids[j])) for i, j in zip(ii, jj)}
    assert {frozenset((p.id_a, p.id_b)) for p in report.pairs} == expected
    pairs = {frozenset((p.id_a, p.id_b)) for p in report.pairs}
    for copy, (source, kind) in truth.items():
        if kind == "exact":
            assert frozenset((copy, source)) in pairs
    originals = {s for s in E.ids if s.startswith("digits/")}
    assert not any(p.id_a in originals and p.id_b in originals for p in report.pairs)


def test_big_cluster_listed_completely_with_small_k(tmp_path):
    x = digits_rgb(30, 16)
    arr = np.concatenate([x, np.repeat(x[:1], 6, axis=0)])  # digit 0 + 6 exact copies = cluster of 7
    names = [f"img{i:02d}" for i in range(len(arr))]
    names[-1] = "=HYPERLINK(evil)"
    for a, name in zip(arr, names):
        _save(a, tmp_path / "imgs" / f"{name}.png")
    report = find_duplicates(ImageSet.from_folder(tmp_path / "imgs"), "pixel", k=2, cache_dir=tmp_path / "c")
    big = [c for c in report.clusters if len(c) == 7]
    assert len(big) == 1 and "img00.png" in big[0]
    assert len([p for p in report.pairs if p.score == 0.0]) == 7 * 6 // 2
    text = report.to_csv()
    assert "'=HYPERLINK(evil)" in text and "\n=HYPERLINK" not in text and ",=HYPERLINK" not in text


class _ToyCosine(Embedder):
    """Mean colour + a constant, L2-normalised: a cosine embedder without a literature threshold."""

    name = "toy-cosine"
    metric = "cosine"
    default_threshold = None

    def embed_batch(self, images):
        v = np.stack([np.r_[np.asarray(a, np.float32).mean((0, 1)) / 255.0, 0.05] for a in images])
        return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def test_cosine_thresholds(tmp_path):
    x = digits_rgb(20, 16, seed=1)
    near = x[:2].copy()
    near[:, 0, 0, 0] ^= 1  # near-copies (one pixel differs by 1)
    images = ImageSet.from_arrays(np.concatenate([x, near]), ids=[XSS + str(i) for i in range(22)])
    with pytest.raises(ValueError, match="threshold="):
        find_duplicates(images, _ToyCosine(), cache_dir=tmp_path)
    report = find_duplicates(images, _ToyCosine(), threshold=0.999999, cache_dir=tmp_path)
    assert report.metric == "cosine"
    pairs = {frozenset((p.id_a, p.id_b)) for p in report.pairs}
    assert frozenset((XSS + "0", XSS + "20")) in pairs and frozenset((XSS + "1", XSS + "21")) in pairs
    assert all(p.score >= 0.999999 for p in report.pairs)
    html = report.to_html()
    _check_self_contained(html)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;0" in html

    class FakeSSCD(_ToyCosine):
        name = "sscd-torchscript-deadbeef-288"
        default_threshold = 0.5

    assert duplicate_threshold(FakeSSCD(), np.array([0.9, 0.8])) == 0.75  # Pizzi et al.: 0.75 ~ 90% precision
    assert find_duplicates(images, FakeSSCD(), cache_dir=tmp_path).threshold == 0.75


def test_errors(tmp_path):
    images = ImageSet.from_arrays(digits_rgb(5, 16))
    with pytest.raises(ValueError, match="k must"):
        find_duplicates(images, k=0, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="threshold"):
        find_duplicates(images, threshold=float("nan"), cache_dir=tmp_path)
    with pytest.raises(TypeError, match="images="):
        find_duplicates(42)
    with pytest.raises(ValueError, match="backend='ray'|backend="):
        find_duplicates(images, backend="dask", cache_dir=tmp_path)
    one = find_duplicates(ImageSet.from_arrays(digits_rgb(1, 16)), cache_dir=tmp_path)
    assert one.pairs == [] and one.clusters == [] and one.num_images == 1
    r = find_duplicates(images, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="images="):
        DuplicateReport.from_json(r.to_json()).to_html()
    json.loads(r.to_json())


def test_cli_dedup_invariances(tmp_path):
    """`diffaudit dedup` finds a mirrored and a brightened copy by default, neither with --invariances none, and
    refuses an unknown invariance with one line (exit 2)."""
    from typer.testing import CliRunner

    from diffaudit.cli import app

    x = digits_rgb(40, 32)
    for i, a in enumerate(x):
        _save(a, tmp_path / "imgs" / f"d{i:02d}.png")
    _save(x[3][:, ::-1].copy(), tmp_path / "imgs" / "mirror_of_3.png")
    _save(np.clip(x[5].astype(np.int16) - 15, 0, 255).astype(np.uint8), tmp_path / "imgs" / "darker_5.png")
    runner = CliRunner()
    common = [str(tmp_path / "imgs"), "--cache", str(tmp_path / "cache")]
    r = runner.invoke(app, ["dedup", *common, "--out", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    got = json.loads((tmp_path / "out" / "duplicates.json").read_text())
    pairs = {frozenset((p["id_a"], p["id_b"])): p["transform"] for p in got["pairs"]}
    assert pairs == {frozenset(("d03.png", "mirror_of_3.png")): "hflip", frozenset(("d05.png", "darker_5.png")): ""}
    assert got["invariances"] == ["brightness", "hflip"]
    assert "transform" in (tmp_path / "out" / "duplicates.csv").read_text().splitlines()[0]
    r = runner.invoke(app, ["dedup", *common, "--out", str(tmp_path / "raw"), "--invariances", "none"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "raw" / "duplicates.json").read_text())["pairs"] == []
    r = runner.invoke(app, ["dedup", *common, "--out", str(tmp_path / "bad"), "--invariances", "brightness,rotate"])
    assert r.exit_code == 2 and "allowed values" in r.output and "Traceback" not in r.output


@pytest.mark.parametrize("hw", [(35, 53), (64, 48), (12, 20)])
def test_pixel_search_equals_brute_force_on_odd_sizes(hw, tmp_path):
    """Coarse-to-fine search == brute force over all pairs (direct and mirrored, centred), for sizes the pooling
    does not divide (35x53: p=4 leaves rows and a column out), a mirrored pooled grid (64x48: p=6) and no pooling
    (12x20: p=1) -- with COARSE_SIDE = 8."""
    h, w = hw
    rng = np.random.default_rng(h * w)
    base = rng.integers(0, 256, size=(40, 4, 5, 3), dtype=np.uint8)
    imgs = np.stack([np.asarray(Image.fromarray(b).resize((w, h), Image.BILINEAR)) for b in base])
    copies = [imgs[0], imgs[1][:, ::-1], np.clip(imgs[2].astype(np.int16) + 9, 0, 255).astype(np.uint8),
              imgs[3][:, ::-1], imgs[3]]  # imgs[3] appears mirrored and exact: a cluster of three
    x = np.concatenate([imgs, np.stack(copies)])
    images = ImageSet.from_arrays(x)
    v = embed(images, get_embedder("pixel"), cache=False).vectors.astype(np.float64)
    vc = v - v.mean(axis=1, keepdims=True)
    m = vc.reshape(len(vc), h, w, 3)[:, :, ::-1].reshape(len(vc), -1)
    d_direct, d = _brute_l2(vc, vc), np.minimum(_brute_l2(vc, vc), _brute_l2(m, vc))
    np.fill_diagonal(d_direct, np.inf)
    np.fill_diagonal(d, np.inf)
    srt = np.sort(d[np.triu_indices(len(d), 1)])
    for thr in (None, float(srt[29] + srt[30]) / 2):  # the rule, and a threshold between the 30th and 31st pair
        rep = find_duplicates(images, "pixel", threshold=thr, cache_dir=tmp_path, k=2)
        t = rep.threshold
        if thr is None:
            assert t == pytest.approx(_rule(d_direct, v.shape[1]), rel=1e-4)
        ii, jj = np.nonzero(np.triu(d <= t, 1))
        got = {frozenset((p.id_a, p.id_b)) for p in rep.pairs}
        assert got == {frozenset((images.ids[i], images.ids[j])) for i, j in zip(ii, jj)}
    names = images.ids
    assert {frozenset((names[0], names[40])), frozenset((names[1], names[41])), frozenset((names[2], names[42])),
            frozenset((names[3], names[43])), frozenset((names[3], names[44]))} <= got


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(2, 24), h=st.integers(4, 40), w=st.integers(4, 40), seed=st.integers(0, 2**31 - 1),
       raw=st.booleans(), k=st.integers(1, 4), noise=st.sampled_from([0, 40]))
def test_pixel_search_equals_brute_force_property(n, h, w, seed, raw, k, noise, tmp_path):
    """Any set size, image size, k and invariances: the pairs and the threshold equal a brute-force comparison of all
    pairs; planted mirrored / brightened / exact copies make duplicates likely. ``noise``: per-pixel noise that
    pooling averages away, so the pooled neighbour order differs from the full-resolution one (the certification
    must search further)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(n, 3, 3, 3), dtype=np.uint8)
    x = np.stack([np.asarray(Image.fromarray(b).resize((w, h), Image.BILINEAR)) for b in base])
    if noise:
        x = np.clip(x.astype(np.int16) + rng.integers(-noise, noise + 1, size=x.shape), 0, 255).astype(np.uint8)
    for i in range(1, n):  # some images are edited copies of image i - 1
        kind = rng.integers(0, 4)
        if kind == 1:
            x[i] = x[i - 1][:, ::-1]
        elif kind == 2:
            x[i] = np.clip(x[i - 1].astype(np.int16) + 7, 0, 255).astype(np.uint8)
        elif kind == 3:
            x[i] = x[i - 1]
    images = ImageSet.from_arrays(x)
    inv = () if raw else ("brightness", "hflip")
    rep = find_duplicates(images, "pixel", cache_dir=tmp_path / "c", k=k, invariances=inv)
    v = embed(images, get_embedder("pixel"), cache_dir=tmp_path / "c").vectors.astype(np.float64)
    if not raw:
        v = v - v.mean(axis=1, keepdims=True)
    d_direct = _brute_l2(v, v)
    d = d_direct if raw else np.minimum(d_direct, _brute_l2(v.reshape(n, h, w, 3)[:, :, ::-1].reshape(n, -1), v))
    np.fill_diagonal(d_direct, np.inf)
    np.fill_diagonal(d, np.inf)
    t_abs = 10 ** (-DUPLICATE_PSNR_DB / 20) * math.sqrt(v.shape[1])
    if ((d_direct > t_abs) & np.isfinite(d_direct)).any():
        assert rep.threshold == pytest.approx(_rule(d_direct, v.shape[1]), rel=1e-4)
    else:
        assert rep.threshold == pytest.approx(t_abs, rel=1e-6)
    margin = np.abs(d - rep.threshold) > 1e-4 * max(1.0, rep.threshold)  # float32 vs float64 at the boundary
    got = {(images.ids.index(p.id_a), images.ids.index(p.id_b)) for p in rep.pairs}
    got = {(min(a, b), max(a, b)) for a, b in got}
    for i in range(n):
        for j in range(i + 1, n):
            if margin[i, j]:
                assert ((i, j) in got) == (d[i, j] <= rep.threshold), (i, j, d[i, j], rep.threshold)


# ---------------------------------------------------------------------------------------------------------------
# exact-bytes pre-pass and precomputed embeddings


def _folder_with_copies(root):
    import shutil

    from PIL import Image

    root.mkdir()
    imgs = digits_rgb(30, 16, seed=11)
    for i, im in enumerate(imgs):
        Image.fromarray(im).save(root / f"{i:02d}.png")
    for j, src in enumerate((3, 3, 7, 12)):  # byte-identical copies, one of them twice
        shutil.copy(root / f"{src:02d}.png", root / f"copy{j}.png")
    Image.fromarray(imgs[20]).save(root / "reencoded.bmp")  # same pixels, other bytes
    (root / "broken.png").write_bytes(b"not a png")
    shutil.copy(root / "broken.png", root / "broken-copy.png")
    return root


def test_identical_files_are_embedded_once_and_the_result_is_unchanged(tmp_path, monkeypatch):
    from diffaudit.curate import find_duplicates
    from diffaudit.data import ImageSet
    from diffaudit.embedders import embed, get_embedder
    from diffaudit.embedders.pixel import PixelEmbedder

    folder = _folder_with_copies(tmp_path / "imgs")
    seen = []
    real = PixelEmbedder.embed_batch
    monkeypatch.setattr(PixelEmbedder, "embed_batch", lambda self, ims: (seen.append(len(ims)), real(self, ims))[1])
    rep = find_duplicates(str(folder), cache_dir=str(tmp_path / "cache"))
    assert sum(seen) == 31  # 30 distinct images + the re-encoded one; copies and the broken copy not decoded twice
    # the reference: every file embedded, the same search (precomputed Embeddings, no pre-pass)
    monkeypatch.setattr(PixelEmbedder, "embed_batch", real)
    images = ImageSet.from_folder(str(folder))
    E = embed(images, get_embedder("pixel"), cache_dir=str(tmp_path / "cache2"))
    ref = find_duplicates(E)
    got = {(p.id_a, p.id_b): round(p.score, 5) for p in rep.pairs}
    want = {(p.id_a, p.id_b): round(p.score, 5) for p in ref.pairs}
    assert got == want and rep.clusters == ref.clusters and rep.threshold == pytest.approx(ref.threshold)
    same = {(p.id_a, p.id_b) for p in rep.pairs if p.transform == "identical file"}
    assert same == {("03.png", "copy0.png"), ("03.png", "copy1.png"), ("copy0.png", "copy1.png"),
                    ("07.png", "copy2.png"), ("12.png", "copy3.png")}
    assert ("20.png", "reencoded.bmp") in got and ("20.png", "reencoded.bmp") not in same
    assert {s.id for s in rep.skipped} == {"broken.png", "broken-copy.png"}
    assert "byte-identical files embedded once" in rep.threshold_rule


def test_find_duplicates_on_precomputed_embeddings(tmp_path):
    from diffaudit.curate import find_duplicates
    from diffaudit.data import ImageSet
    from diffaudit.embedders import embed, get_embedder

    images = ImageSet.from_arrays(digits_rgb(20, 16, seed=2))
    E = embed(images, get_embedder("tiled"), cache_dir=None)
    a = find_duplicates(images, "tiled", cache_dir=None)
    b = find_duplicates(E, "tiled")  # encode once, search many times
    assert [(p.id_a, p.id_b) for p in a.pairs] == [(p.id_a, p.id_b) for p in b.pairs] and a.threshold == b.threshold
    c = find_duplicates(E, "tiled", threshold=0.5)
    assert len(c.pairs) >= len(b.pairs)
    with pytest.raises(ValueError, match="does not match the precomputed"):
        find_duplicates(E, "pixel:8")


# ---------------------------------------------------------------------------------------------------------------
# the ratio rule


def _ratio_brute(D, ratio, k, cap):
    """The documented rule by brute force over a full distance matrix (diagonal inf)."""
    out = set()
    for a in range(len(D)):
        order = np.argsort(D[a], kind="stable")[: k + 1]
        d = D[a, order]
        ok = [j for j in range(min(k, len(d) - 1)) if d[j] <= cap and d[j] <= ratio * d[j + 1]]
        if ok:
            out |= {frozenset((a, int(order[j]))) for j in range(max(ok) + 1) if d[j] <= cap}
    return out


def test_ratio_rule_pairs_copies_not_look_alikes():
    """A tight cluster of 40 look-alikes (all about equally close: no gap) and 10 distinct images, each with one
    planted near copy: the ratio rule finds exactly the copies; a fixed threshold either misses copies or swallows
    the cluster."""
    from diffaudit.curate import ratio_pairs
    from diffaudit.embedders import Embeddings

    rng = np.random.default_rng(0)
    center = rng.normal(size=64)
    look = center + 0.05 * rng.normal(size=(40, 64))      # pairwise distances ~0.4
    distinct = 3.0 * rng.normal(size=(10, 64))
    copies = distinct + 0.1 * rng.normal(size=(10, 64))  # distance ~0.8 to their source, beyond the look-alikes
    V = np.concatenate([look, distinct, copies]).astype(np.float32)
    E = Embeddings([f"i{j}" for j in range(len(V))], V, "vec-64", "l2")
    pairs, cap, rule = ratio_pairs(E, "pixel:8", 0.5, k=10, cap=10.0)  # l2 embedder stand-in: only the metric
    got = {frozenset(p) for p in pairs}
    assert got == {frozenset((40 + j, 50 + j)) for j in range(10)}
    D = np.sqrt(((V[:, None].astype(np.float64) - V[None]) ** 2).sum(-1))
    np.fill_diagonal(D, np.inf)
    assert got == _ratio_brute(D, 0.5, 10, 10.0)
    assert "ratio rule" in rule
    # no fixed threshold does both: the copies' distance exceeds the closest look-alike pairs
    assert D[:40, :40].min() < max(D[40 + j, 50 + j] for j in range(10))


@pytest.mark.parametrize("inv", [(), ("brightness", "hflip")])
def test_ratio_rule_on_pixels_equals_brute_force(tmp_path, inv):
    from diffaudit.curate import find_duplicates
    from diffaudit.data import ImageSet
    from diffaudit.embedders import embed, get_embedder

    x = digits_rgb(60, 16, seed=9)
    x = np.concatenate([x, x[:5, :, ::-1], np.clip(x[5:10].astype(np.int16) + 9, 0, 255).astype(np.uint8)])
    images = ImageSet.from_arrays(x)
    rep = find_duplicates(images, "pixel:16", ratio=0.5, invariances=inv, cache_dir=str(tmp_path))
    E = embed(images, get_embedder("pixel:16"), cache_dir=str(tmp_path))
    V = np.asarray(E.vectors, np.float64)
    if "brightness" in inv:
        V = V - V.mean(1, keepdims=True)
    D = np.sqrt(((V[:, None] - V[None]) ** 2).sum(-1))
    if "hflip" in inv:
        M = V.reshape(-1, 16, 16, 3)[:, :, ::-1].reshape(len(V), -1)
        D = np.minimum(D, np.sqrt(((M[:, None] - V[None]) ** 2).sum(-1)))
    np.fill_diagonal(D, np.inf)
    cap = 10 ** (-20 / 20) * np.sqrt(V.shape[1])
    ids = list(E.ids)
    want = {frozenset((ids[a], ids[b])) for a, b in map(tuple, _ratio_brute(D, 0.5, 10, cap))}
    assert {frozenset((p.id_a, p.id_b)) for p in rep.pairs} == want
    if inv:  # the mirrored and brightened copies are found
        assert all(frozenset((ids[j], ids[60 + j])) in want for j in range(5))
        assert all(frozenset((ids[5 + j], ids[65 + j])) in want for j in range(5))
    with pytest.raises(ValueError, match="ratio="):
        find_duplicates(images, ratio=1.5, cache_dir=str(tmp_path))


def test_dedup_union_of_embedders(tmp_path):
    """-e A -e B reports the union of what each finds alone; clusters are the connected components of that union
    (checked by a union-find here); mixed units are named per pair."""
    import json as _json

    from _reltools import error_lines, invoke

    rng = np.random.default_rng(3)
    folder = tmp_path / "imgs"
    folder.mkdir()
    base = rng.integers(0, 256, size=(30, 4, 4, 3), dtype=np.uint8)
    imgs = [np.asarray(Image.fromarray(b).resize((32, 32), Image.BILINEAR)) for b in base]
    imgs += [imgs[0][:, ::-1], np.clip(imgs[1].astype(int) + 9, 0, 255).astype(np.uint8), imgs[2], imgs[2]]
    for i, im in enumerate(imgs):
        Image.fromarray(im).save(folder / f"im{i:02d}.png")
    singles = []
    for spec, r in (("pixel", "0.5"), ("pixel:8", "0.4")):
        out = tmp_path / spec.replace(":", "_")
        res = invoke("dedup", folder, "-e", spec, "--ratio", r, "-o", out, "--cache", tmp_path / "c")
        assert res.exit_code == 0, res.output
        singles.append({frozenset((p["id_a"], p["id_b"])) for p in _json.loads((out / "duplicates.json").read_text())["pairs"]})
    res = invoke("dedup", folder, "-e", "pixel", "-e", "pixel:8", "--ratio", "0.5", "--ratio", "0.4", "-o",
                 tmp_path / "u", "--cache", tmp_path / "c")
    assert res.exit_code == 0, res.output
    doc = _json.loads((tmp_path / "u" / "duplicates.json").read_text())
    got = {frozenset((p["id_a"], p["id_b"])) for p in doc["pairs"]}
    assert got == singles[0] | singles[1] and got
    parent: dict = {}

    def find(a):
        parent.setdefault(a, a)
        while parent[a] != a:
            a = parent[a]
        return a

    for a, b in (tuple(p) for p in got):
        parent[find(a)] = find(b)
    comps: dict = {}
    for x in {x for p in got for x in p}:
        comps.setdefault(find(x), set()).add(x)
    assert sorted(map(sorted, comps.values())) == sorted(map(sorted, doc["clusters"]))
    assert all(p["transform"].startswith(("pixel-32x32 L2", "pixel-8x8 L2")) for p in doc["pairs"])
    assert "union of 2 rules" in doc["threshold_rule"]
    bad = invoke("dedup", folder, "-e", "pixel", "-e", "pixel:8", "--ratio", "0.5", "--ratio", "0.4", "--ratio", "0.3",
                 "-o", tmp_path / "bad")
    assert bad.exit_code != 0 and len(error_lines(bad.output)) == 1 and "--ratio" in bad.output


def test_dedup_counts_every_skipped_file_also_with_byte_identical_files(tmp_path):
    """Byte-identical files make the search embed a subset of the set; a file that fails to decode there is still
    counted in the summary line, the same as in duplicates.json."""
    from _reltools import invoke

    folder = tmp_path / "imgs"
    folder.mkdir()
    x = digits_rgb(12, 32, seed=4)
    for i, a in enumerate(x):
        _save(a, folder / f"d{i:02d}.png")
    (folder / "copy.png").write_bytes((folder / "d03.png").read_bytes())
    (folder / "trunc.png").write_bytes((folder / "d05.png").read_bytes()[:120])
    (folder / "empty.png").write_bytes(b"")
    for rule in ("default", "verify"):
        out = tmp_path / f"o-{rule}"
        res = invoke("dedup", folder, "--rule", rule, "-o", out, "--cache", tmp_path / "c")
        assert res.exit_code == 0, res.output
        doc = json.loads((out / "duplicates.json").read_text())
        assert sorted(s["id"] for s in doc["skipped"]) == ["empty.png", "trunc.png"]
        assert "(2 files skipped)" in res.output
        assert any({p["id_a"], p["id_b"]} == {"copy.png", "d03.png"} for p in doc["pairs"])
