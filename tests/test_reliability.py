"""Issue 5, reliability: a corpus of bad inputs through the whole pipeline (CLI `dedup` and `audit`), property tests
for the decoders and the audit metrics, determinism, and errors before work (unwritable output, full disk)."""
from __future__ import annotations

import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from _badfiles import encode, write_corpus  # noqa: E402
from _reltools import error_lines, html_text, invoke, json_without_created, save_pngs  # noqa: E402
from conftest import digits_rgb  # noqa: E402

import diffaudit.data as data  # noqa: E402
from diffaudit.data import ImageDecodeError, ImageSet  # noqa: E402
from diffaudit.testing import write_tiny_run  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """Every test here runs with one torch thread (conftest.one_torch_thread)."""


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Two checkpoints of the tiny UNet (16x16 RGB), no root pipeline: the scheduler is given as 'ddpm'."""
    return write_tiny_run(tmp_path_factory.mktemp("run") / "run", steps=(1, 2), batch_size=4, ema=False,
                          final_pipeline=False, accelerate_state=False)


# ------------------------------------------------------------------------------------------ the bad-input corpus
#
# Every case, with what must happen to it. "ok": decoded and audited (a row in audit.json's per-image table);
# "skip": listed in skipped with a reason containing the word (JSON and HTML report); "ignored": not an image
# candidate (other extension, hidden); "not-an-id": a folder symlink loop, followed once, never duplicated.

def _extra_cases(root: Path) -> dict[str, tuple[str, str]]:
    """Cases beyond tests/_badfiles.write_corpus: mixed sizes / channel counts, odd modes, more broken files."""
    rng = np.random.default_rng(5)
    img = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)

    def put(rel: str, b: bytes) -> None:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b)

    put("mixed/bilevel.png", encode(Image.fromarray(img).convert("1"), "PNG"))  # 1-bit
    put("mixed/one_pixel.png", encode(Image.fromarray(img[:1, :1]), "PNG"))
    put("mixed/wide_3x304.png", encode(Image.fromarray(np.repeat(img, 19, axis=1)[:3]), "PNG"))
    put("mixed/jpeg_bytes.png", encode(Image.fromarray(img), "JPEG"))  # wrong extension, valid image
    put("mixed/int32.tif", encode(Image.fromarray(img[..., 0].astype(np.int32) * 1000, "I"), "TIFF"))
    put("mixed/float32.tif", encode(Image.fromarray(img[..., 0].astype(np.float32) / 255, "F"), "TIFF"))
    png = encode(Image.fromarray(img), "PNG")
    corrupt = bytearray(png)
    corrupt[png.index(b"IDAT") + 10] ^= 0xFF  # compressed stream broken
    put("bad/corrupt_idat.png", bytes(corrupt))
    put("bad/header_only.png", png[:33])  # signature + IHDR, nothing else
    frames = [Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8), "L") for _ in range(3)]
    b = io.BytesIO()
    frames[0].save(b, "GIF", save_all=True, append_images=frames[1:])
    put("bad/trunc.gif", b.getvalue()[: len(b.getvalue()) // 3])
    put("bad/unreadable.png", png)  # the OS refuses it (simulated: root reads everything)
    return {
        "mixed/bilevel.png": ("ok", "1-bit PNG"),
        "mixed/one_pixel.png": ("ok", "1x1 image"),
        "mixed/wide_3x304.png": ("ok", "3x304 image"),
        "mixed/jpeg_bytes.png": ("ok", "JPEG bytes behind a .png name"),
        "mixed/int32.tif": ("ok", "32-bit integer TIFF"),
        "mixed/float32.tif": ("ok", "32-bit float TIFF"),
        "bad/corrupt_idat.png": ("skip", "corrupt"),
        "bad/header_only.png": ("skip", "not an image"),
        "bad/trunc.gif": ("skip", "truncated"),
        "bad/unreadable.png": ("skip", "permission denied"),
    }


def build_corpus(root: Path) -> dict[str, tuple[str, str]]:
    """Write the corpus; returns id -> (expected outcome, word / description)."""
    ok, skip, notes = write_corpus(root)
    assert notes["symlinks"] and notes["non_utf8"], "this platform cannot make symlinks / non-UTF-8 names"
    cases: dict[str, tuple[str, str]] = {k: ("ok", "decoded") for k in ok}
    skip.pop("bad/big.png")  # 200x200: refused in test_data only because it passes a tiny max_pixels
    cases["bad/big.png"] = ("ok", "200x200, under the default pixel limit")
    cases.update({k: ("skip", w) for k, w in skip.items()})
    cases.update({k: ("skip", "truncated") for k in notes["decode_fail"]})
    cases.update({k: ("ignored", "") for k in notes["ignored"]})
    cases["nested/loop"] = ("not-an-id", "folder symlink loop")
    cases.update(_extra_cases(root))
    return cases


@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory, tiny_run):
    """`diffaudit dedup` and `diffaudit audit` over the corpus, in-process (so the unreadable file can be faked)."""
    base = tmp_path_factory.mktemp("corpus")
    root = base / "train"
    cases = build_corpus(root)
    target = os.fspath(root / "bad" / "unreadable.png")
    real = data._open_file

    def deny(path):
        if os.fspath(path) == target:
            raise PermissionError(13, "Permission denied", path)
        return real(path)

    mp = pytest.MonkeyPatch()
    mp.setattr(data, "_open_file", deny)
    try:
        dd = invoke("dedup", root, "--out", base / "dedup", "--cache", base / "cache")
        au = invoke("audit", tiny_run, "--train", root, "--scheduler", "ddpm", "--samples", 4, "--inference-steps",
                    2, "--out", base / "audit", "--cache", base / "cache")
    finally:
        mp.undo()
    return {"base": base, "cases": cases, "dedup": dd, "audit": au}


def test_bad_input_corpus_through_dedup_and_audit_cli(corpus_run):
    base, cases = corpus_run["base"], corpus_run["cases"]
    for key in ("dedup", "audit"):
        res = corpus_run[key]
        assert res.exit_code == 0, res.output
    n_by = {k: sum(1 for o, _ in cases.values() if o == k) for k in ("ok", "skip", "ignored", "not-an-id")}
    # the numbers quoted in the README's Reliability section
    assert n_by == {"ok": 22, "skip": 13, "ignored": 3, "not-an-id": 1}, n_by

    audit_json = json.loads((base / "audit" / "audit.json").read_text(encoding="utf-8"))
    dedup_json = json.loads((base / "dedup" / "duplicates.json").read_text(encoding="utf-8"))
    audit_html = html_text(base / "audit" / "report.html")
    dedup_html = html_text(base / "dedup" / "duplicates.html")
    audited_ids = {row["id"] for row in audit_json["images"]}
    for doc, html, where in ((audit_json, audit_html, "train"), (dedup_json, dedup_html, "images")):
        skipped = {s["id"]: s for s in doc["skipped"]}
        assert all(s["where"] == where for s in skipped.values())
        want_skipped = {k for k, (o, _) in cases.items() if o == "skip"}
        assert set(skipped) == want_skipped, (set(skipped) ^ want_skipped)
        for cid, (outcome, word) in cases.items():
            if outcome == "skip":
                reason = skipped[cid]["reason"]
                assert word in reason, (cid, reason)
                # the reason is shown, as text, in the HTML report, next to the id
                assert cid in html and reason in html, (cid, reason)
    # every decodable case was audited: one row each in the per-image table, nothing else
    want_ok = {k for k, (o, _) in cases.items() if o == "ok"}
    assert audited_ids == want_ok, audited_ids ^ want_ok
    assert not any(i.startswith("nested/loop") for i in audited_ids)
    assert "caf\\xe9.png" in audit_html  # the non-UTF-8 name, shown with its byte escaped
    # the dedup run embedded the same set (all decodable images, nothing twice)
    assert dedup_json["num_images"] == len(want_ok)
    # the audit ran to the end over every checkpoint
    assert [c["step"] for c in audit_json["checkpoints"]] == [1, 2]
    assert all(c["num_samples"] == 4 for c in audit_json["checkpoints"])


def test_empty_and_all_bad_folders_give_one_line_and_exit_2(tmp_path, tiny_run):
    (tmp_path / "empty").mkdir()
    only_bad = tmp_path / "only_bad"
    only_bad.mkdir()
    (only_bad / "zero.png").write_bytes(b"")
    (only_bad / "noise.jpg").write_bytes(os.urandom(300))
    for folder, words in ((tmp_path / "empty", ["no usable images", "empty"]),
                          (only_bad, ["no usable images", "2 file(s) skipped", "zero-byte"])):
        for args in (["dedup", folder, "--out", tmp_path / "o1"],
                     ["audit", tiny_run, "--train", folder, "--scheduler", "ddpm", "--out", tmp_path / "o2"]):
            t0 = time.perf_counter()
            res = invoke(*args)
            lines = error_lines(res.output)
            assert res.exit_code == 2 and len(lines) == 1, res.output
            assert lines[0].startswith("error: ") and "Traceback" not in res.output
            assert all(w in lines[0] for w in words), lines[0]
            assert time.perf_counter() - t0 < 30
    assert not (tmp_path / "o2" / "samples").exists()  # nothing was sampled


# --------------------------------------------------------------------------------------- property: the decoders

_FORMATS = ["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"]


@st.composite
def hostile_bytes(draw):
    """Random bytes, or a valid small image in some format with random truncations / byte flips / insertions."""
    if draw(st.booleans()):
        return draw(st.binary(min_size=0, max_size=600)), draw(st.sampled_from(["png", "jpg", "gif", "webp", "tif"]))
    fmt = draw(st.sampled_from(_FORMATS))
    h, w = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    mode = draw(st.sampled_from(["RGB", "L", "RGBA", "P"]))
    seed = draw(st.integers(0, 2**16))
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    im = Image.fromarray(arr).convert(mode)
    if fmt == "JPEG" and mode in ("RGBA", "P"):
        im = im.convert("RGB")
    b = bytearray(encode(im, fmt))
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["cut", "flip", "insert"]))
        pos = draw(st.integers(0, max(0, len(b) - 1)))
        if op == "cut":
            del b[pos:]
        elif op == "flip" and b:
            b[pos] ^= draw(st.integers(1, 255))
        else:
            b[pos:pos] = draw(st.binary(min_size=1, max_size=8))
    return bytes(b), {"PNG": "png", "JPEG": "jpg", "GIF": "gif", "BMP": "bmp", "TIFF": "tif", "WEBP": "webp"}[fmt]


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's warnings about the corrupt TIFF tags we feed it
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=hostile_bytes(), batch=st.integers(1, 3))
def test_random_and_mutated_bytes_never_crash_the_decoders(case, batch):
    payload, ext = case
    good = digits_rgb(1, 8)[0]
    with tempfile.TemporaryDirectory() as d:
        Image.fromarray(good).save(Path(d) / "good.png")
        Path(d, f"fuzz.{ext}").write_bytes(payload)
        s = ImageSet.from_folder(d, max_pixels=1_000_000, num_workers=2)
        got = {i: a for ids, arrs in s.iter_batches(batch) for i, a in zip(ids, arrs)}
        reasons = {k.id: k.reason for k in s.skipped}
        assert set(s.ids) | set(reasons) == {"good.png", f"fuzz.{ext}"}
        np.testing.assert_array_equal(got["good.png"], good)  # the run continues past the bad file
        name = f"fuzz.{ext}"
        assert (name in got) != (name in reasons), (name, reasons)  # decoded, or skipped -- never both, never lost
        if name in got:
            a = got[name]
            assert a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3 and a.shape[0] * a.shape[1] <= 1_000_000
        else:
            assert isinstance(reasons[name], str) and reasons[name].strip()
            if name in s.ids:  # passed the header scan, failed at decode: load() raises the typed error only
                with pytest.raises(ImageDecodeError):
                    s.load(name)


# -------------------------------------------------------------------------------------- property: audit metrics


@pytest.fixture(scope="module")
def f32_cache(tmp_path_factory):
    from diffaudit.cache import EmbeddingCache

    return EmbeddingCache(tmp_path_factory.mktemp("f32cache"), store_dtype="float32")


@st.composite
def audit_sets(draw):
    """Small train / held-out / sample image sets with planted duplicates, exact copies and constant images."""
    seed = draw(st.integers(0, 2**20))
    rng = np.random.default_rng(seed)
    n_train = draw(st.integers(3, 10))
    train = rng.integers(0, 256, (n_train, 4, 4, 3), dtype=np.uint8)
    if draw(st.booleans()):
        train[1] = train[0]  # a duplicated training image
    if draw(st.booleans()):
        train[2] = 0  # a constant image
    n_s = draw(st.integers(1, 9))
    samples = rng.integers(0, 256, (n_s, 4, 4, 3), dtype=np.uint8)
    n_copies = draw(st.integers(0, n_s))
    src = rng.integers(0, n_train, n_copies)
    samples[:n_copies] = train[src]  # exact copies (distance 0)
    if n_s > 1 and draw(st.booleans()):
        samples[-1] = samples[0]  # identical samples
    held = rng.integers(0, 256, (draw(st.integers(1, 6)), 4, 4, 3), dtype=np.uint8)
    return train, held, samples, int(rng.integers(0, 2**31))


def _metrics_of(train, held, samples, cache, perm=None, sperm=None):
    from diffaudit.audit import ReferenceSet, evaluate_samples

    ids = [f"t{i:02d}" for i in range(len(train))]
    if perm is not None:
        train, ids = train[perm], [ids[p] for p in perm]
    ref = ReferenceSet(ImageSet.from_arrays(train, ids=ids), ImageSet.from_arrays(held), ["pixel"], cache_dir=cache)
    s = samples if sperm is None else samples[sperm]
    ev = evaluate_samples(ref, s)
    (m,) = ev.metrics.values()
    return m, ev


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(sets=audit_sets())
def test_audit_metrics_no_nan_and_invariant_to_training_and_sample_order(sets, f32_cache):
    train, held, samples, pseed = sets
    rng = np.random.default_rng(pseed)
    m, ev = _metrics_of(train, held, samples, f32_cache)
    scalars = {"top1_mean": m.top1_mean, "top1_p95": m.top1_p95, "train_baseline_top1_mean": m.train_baseline_top1_mean,
               "authenticity": m.authenticity, "heldout_top1_mean": m.heldout_top1_mean,
               "memorization_ratio": m.memorization_ratio.value, "ratio_low": m.memorization_ratio.low,
               "ratio_high": m.memorization_ratio.high, "ratio_half": m.memorization_ratio_half.value}
    for k, v in scalars.items():
        assert v is not None and np.isfinite(v), (k, v)
    assert m.heldout_ct_z is None or not np.isnan(m.heldout_ct_z)
    assert 0 <= m.memorization_ratio.low <= m.memorization_ratio.value <= m.memorization_ratio.high <= 1
    for t in m.top_matches:
        assert all(np.isfinite(s) for s in t.scores) and (t.ratio is None or 0 <= t.ratio <= 1 + 1e-6)
    # the training set in another order (ids moved with their images): the same numbers
    m2, ev2 = _metrics_of(train, held, samples, f32_cache, perm=rng.permutation(len(train)))
    # the samples in another order: the same fractions and summaries
    m3, _ = _metrics_of(train, held, samples, f32_cache, sperm=rng.permutation(len(samples)))
    for other in (m2, m3):
        for name in ("top1_mean", "top1_p95", "train_baseline_top1_mean", "authenticity", "heldout_top1_mean"):
            assert getattr(other, name) == pytest.approx(getattr(m, name), rel=1e-5, abs=1e-6), name
        for name in ("memorization_ratio", "memorization_ratio_half"):
            a, b = getattr(m, name), getattr(other, name)
            assert (a.value, a.low, a.high, a.n) == pytest.approx((b.value, b.low, b.high, b.n)), name
        if m.heldout_ct_z is not None:
            assert other.heldout_ct_z == pytest.approx(m.heldout_ct_z, rel=1e-6, abs=1e-9)
    # which training images were copied is a property of the images, not of their positions: compare the pixels
    t_by_id = {f"t{i:02d}": train[i].tobytes() for i in range(len(train))}
    assert sorted(t_by_id[i] for i in ev.copied_train_ids) == sorted(t_by_id[i] for i in ev2.copied_train_ids)


# ----------------------------------------------------------------------------------------------- determinism


@pytest.fixture(scope="module")
def det_train(tmp_path_factory):
    return save_pngs(tmp_path_factory.mktemp("det") / "train", digits_rgb(20, 16, seed=11))


def _audit_to(tiny_run, train, out, cache, *, batch_size, embed_batch, **kw):
    from diffaudit.audit import audit
    from diffaudit.embedders.pixel import PixelEmbedder

    return audit(tiny_run, train=str(train), embedders=[PixelEmbedder(batch_size=embed_batch)], num_samples=12,
                 num_inference_steps=3, seed=7, scheduler="ddpm", batch_size=batch_size, loss_noise_draws=2,
                 cache_dir=str(cache), out_dir=out, **kw)


def test_same_inputs_and_seed_give_byte_identical_audit_json(tiny_run, det_train, tmp_path):
    _audit_to(tiny_run, det_train, tmp_path / "a", tmp_path / "cache_a", batch_size=4, embed_batch=4)
    _audit_to(tiny_run, det_train, tmp_path / "b", tmp_path / "cache_b", batch_size=4, embed_batch=4)
    a, b = json_without_created(tmp_path / "a" / "audit.json"), json_without_created(tmp_path / "b" / "audit.json")
    assert a == b
    # ... and the samples themselves are byte-identical PNGs
    for p in sorted((tmp_path / "a" / "samples").rglob("*.png")):
        assert p.read_bytes() == (tmp_path / "b" / p.relative_to(tmp_path / "a")).read_bytes(), p


def _numbers(obj, path=""):
    """Flatten a JSON value to {path: leaf}."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(_numbers(v, f"{path}.{k}"))
        return out
    if isinstance(obj, list):
        out = {}
        for i, v in enumerate(obj):
            out.update(_numbers(v, f"{path}[{i}]"))
        return out
    return {path: obj}


def test_batch_size_does_not_change_the_metrics(tiny_run, det_train, tmp_path):
    """Sampling batch size (and the denoising-loss batch) 4 vs 16, embedding batch size 4 vs 16."""
    r4 = _audit_to(tiny_run, det_train, tmp_path / "b4", tmp_path / "c4", batch_size=4, embed_batch=4)
    r16 = _audit_to(tiny_run, det_train, tmp_path / "b16", tmp_path / "c16", batch_size=16, embed_batch=16)
    a = _numbers({"c": [c.to_dict() for c in r4.checkpoints], "i": [i.to_dict() for i in r4.images],
                  "o": r4.onset.to_dict()})
    b = _numbers({"c": [c.to_dict() for c in r16.checkpoints], "i": [i.to_dict() for i in r16.images],
                  "o": r16.onset.to_dict()})
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], float) and isinstance(b[k], float):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), k
        else:
            assert a[k] == b[k], k
    # the sample images agree to within one grey level (float kernels may round differently by batch shape)
    for p in sorted((tmp_path / "b4" / "samples").rglob("*.png")):
        x = np.asarray(Image.open(p), dtype=int)
        y = np.asarray(Image.open(tmp_path / "b16" / p.relative_to(tmp_path / "b4")), dtype=int)
        assert np.abs(x - y).max() <= 1, p


# ------------------------------------------------------------------------------------- errors before the work


@pytest.fixture
def work_counter(monkeypatch):
    """Counts embedding and sampling calls (the expensive work that must not start before a clear error)."""
    from diffaudit.embedders.pixel import PixelEmbedder
    from diffaudit.sampling import CheckpointSampler

    calls = {"embed": 0, "sample": 0}
    real_e, real_s = PixelEmbedder.embed_batch, CheckpointSampler.sample

    def e(self, *a, **kw):
        calls["embed"] += 1
        return real_e(self, *a, **kw)

    def s(self, *a, **kw):
        calls["sample"] += 1
        return real_s(self, *a, **kw)

    monkeypatch.setattr(PixelEmbedder, "embed_batch", e)
    monkeypatch.setattr(CheckpointSampler, "sample", s)
    return calls


def _audit_args(tiny_run, train, out, cache):
    return ["audit", tiny_run, "--train", train, "--scheduler", "ddpm", "--samples", 4, "--inference-steps", 2,
            "--out", out, "--cache", cache]


def test_unwritable_output_folder_fails_before_any_work(tiny_run, det_train, tmp_path, work_counter):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cache = tmp_path / "cache"
    for out, words in ((a_file / "out", ["not writable", "a_file"]), (Path("/dev/null/out"), ["not writable"])):
        for args in (_audit_args(tiny_run, det_train, out, cache), ["dedup", det_train, "--out", out, "--cache", cache]):
            t0 = time.perf_counter()
            res = invoke(*args)
            lines = error_lines(res.output)
            assert res.exit_code == 2 and len(lines) == 1 and all(w in lines[0] for w in words), res.output
            assert time.perf_counter() - t0 < 5
    assert work_counter == {"embed": 0, "sample": 0}
    assert not cache.exists()


def test_full_disk_fails_before_any_work(tiny_run, det_train, tmp_path, work_counter, monkeypatch):
    import shutil

    real = shutil.disk_usage

    def full(path):
        u = real(path)
        return type(u)(u.total, u.total, 0)

    monkeypatch.setattr(shutil, "disk_usage", full)
    res = invoke(*_audit_args(tiny_run, det_train, tmp_path / "out", tmp_path / "cache"))
    lines = error_lines(res.output)
    assert res.exit_code == 2 and len(lines) == 1 and "0 MB free" in lines[0] and "need at least" in lines[0], res.output
    assert work_counter == {"embed": 0, "sample": 0}
    assert not (tmp_path / "out" / "samples").exists() and not (tmp_path / "cache").exists()


def test_unwritable_cache_folder_fails_before_any_work(tiny_run, det_train, tmp_path, work_counter):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for args in (_audit_args(tiny_run, det_train, tmp_path / "out", a_file / "cache"),
                 ["dedup", det_train, "--out", tmp_path / "out2", "--cache", a_file / "cache"]):
        res = invoke(*args)
        lines = error_lines(res.output)
        assert res.exit_code == 2 and len(lines) == 1, res.output
        assert "cache" in lines[0] and "not writable" in lines[0], lines[0]
    assert work_counter == {"embed": 0, "sample": 0}
