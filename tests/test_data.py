"""ImageSet: folders (every format, conversion and hostile file), arrays, HF datasets, streaming, keys."""
from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from _badfiles import composite_white, crafted_bomb_png, encode, write_corpus  # noqa: E402
from conftest import digits_rgb  # noqa: E402

import diffaudit.data as data  # noqa: E402
from diffaudit.data import ImageDecodeError, ImageSet, Skipped  # noqa: E402


def write_pngs(folder: Path, images: np.ndarray, prefix: str = "img") -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, a in enumerate(images):
        name = f"{prefix}{i:04d}.png"
        Image.fromarray(a).save(folder / name)
        names.append(name)
    return names


# ------------------------------------------------------------------------------------------------ the corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    ok, skip, notes = write_corpus(root)
    return root, ok, skip, notes


def test_corpus_scan_loads_good_and_skips_bad(corpus):
    root, ok, skip, notes = corpus
    s = ImageSet.from_folder(root, max_pixels=10_000)
    # every good file and the two truncated ones (header fine) pass the scan; ids are sorted POSIX paths
    assert s.ids == sorted(list(ok) + notes["decode_fail"])
    assert all("\\" not in i or i == "caf\\xe9.png" for i in s.ids)
    reasons = {k.id: k.reason for k in s.skipped}
    assert set(reasons) == set(skip), (reasons, skip)
    for rid, word in skip.items():
        assert word in reasons[rid], (rid, reasons[rid])
    for ign in notes["ignored"]:
        assert ign not in s.ids and ign not in reasons
    assert s.source == f"folder:{os.path.abspath(root)}"


def test_corpus_pixels_match_independent_references(corpus):
    root, ok, _, _ = corpus
    s = ImageSet.from_folder(root, max_pixels=10_000)
    for rid, (ref, tol) in ok.items():
        a = s.load(rid)
        assert a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3, rid
        assert a.shape == ref.shape, (rid, a.shape, ref.shape)
        err = np.abs(a.astype(int) - ref.astype(int))
        if tol == 0:
            assert err.max() == 0, rid
        else:
            assert err.mean() <= tol / 4 and err.max() <= tol * 4, (rid, err.mean(), err.max())


def test_exif_rotation_applied(corpus):
    root, ok, _, _ = corpus
    s = ImageSet.from_folder(root, max_pixels=10_000)
    ref, _ = ok["exif/rot6.jpg"]
    a = s.load("exif/rot6.jpg").astype(int)
    assert a.shape == (32, 48, 3)  # stored 48 x 32 (h x w); displayed transposed
    assert s.sizes()[s.index("exif/rot6.jpg")] == (32, 48)
    stored = np.rot90(ref, k=1)  # undo
    right = np.abs(a - ref).mean()
    wrong = np.abs(a - np.rot90(stored, k=1)[: a.shape[0], : a.shape[1]]).mean()  # counter-clockwise: wrong way
    assert right < 3 and wrong > 5 * right


def test_16bit_is_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 4).astype(np.uint16).reshape(16, 16)
    Image.fromarray(ramp).save(tmp_path / "r.png")
    a = ImageSet.from_folder(tmp_path).load(0)
    ref = np.round(ramp.astype(np.float64) / 257.0).astype(np.uint8)
    assert np.abs(a[..., 0].astype(int) - ref).max() <= 1
    assert a.max() == 255 and a.min() == 0
    assert np.all(a[..., 0] == a[..., 1])


def test_truncated_discovered_at_decode_is_recorded_and_run_continues(corpus):
    root, ok, _, notes = corpus
    s = ImageSet.from_folder(root, max_pixels=10_000, num_workers=2)
    n_before = len(s.skipped)
    got_ids = []
    for ids, imgs in s.iter_batches(3):
        assert len(ids) == len(imgs)
        got_ids += ids
    assert got_ids == sorted(ok)  # everything else, in order
    new = {k.id: k.reason for k in s.skipped[n_before:]}
    assert set(new) == set(notes["decode_fail"])
    assert all("truncated" in r or "corrupt" in r for r in new.values())
    with pytest.raises(ImageDecodeError) as ei:
        s.load("bad/trunc.png")
    assert ei.value.id == "bad/trunc.png" and ei.value.reason
    # a second pass records nothing twice
    list(s.iter_batches(5))
    assert len(s.skipped) == n_before + 2


def test_batches_are_full_except_last(corpus):
    root, ok, _, _ = corpus
    s = ImageSet.from_folder(root, max_pixels=10_000)
    sizes = [len(ids) for ids, _ in s.iter_batches(4, num_workers=3)]
    assert sum(sizes) == len(ok)
    assert all(n == 4 for n in sizes[:-1]) and 1 <= sizes[-1] <= 4


def test_decompression_bomb_never_decoded(tmp_path, monkeypatch):
    (tmp_path / "bomb.png").write_bytes(crafted_bomb_png(60_000, 60_000))
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "big.png")
    Image.fromarray(digits_rgb(1, 8)[0]).save(tmp_path / "ok.png")
    decoded = []
    real_load = Image.Image.load

    def spy(self):
        decoded.append(self.size)
        return real_load(self)

    Image.init()  # plugin imports build small prototype images; not ours
    data._safe_formats()
    monkeypatch.setattr(Image.Image, "load", spy)
    before = Image.MAX_IMAGE_PIXELS
    # a max_pixels above Pillow's own limit: Pillow's check is lifted, ours must still hold
    s = ImageSet.from_folder(tmp_path, max_pixels=1000)
    s2 = ImageSet.from_folder(tmp_path, max_pixels=10**12)
    assert Image.MAX_IMAGE_PIXELS == before  # global state restored
    assert decoded == []  # scanning reads headers only
    assert s.ids == ["ok.png"]
    assert {k.id for k in s.skipped} == {"bomb.png", "big.png"}
    assert "big.png" in s2.ids and "bomb.png" in s2.ids  # allowed by the caller, header-only so far
    list(s.iter_batches(2))
    assert decoded and all(w * h <= 1000 for (w, h) in decoded), decoded
    # the bomb admitted by a silly limit fails cleanly at decode (truncated data) instead of crashing the run
    monkeypatch.setattr(Image.Image, "load", real_load)
    with pytest.raises(ImageDecodeError):
        s2.load("bomb.png")


def test_permission_denied_is_skipped(tmp_path, monkeypatch):
    write_pngs(tmp_path, digits_rgb(3, 8))
    target = str(tmp_path / "img0001.png")
    if os.geteuid() != 0:
        os.chmod(target, 0)
    else:  # root reads anything: simulate the OS refusing this one file
        real = data._open_file

        def deny(path):
            if os.fspath(path) == target:
                raise PermissionError(13, "Permission denied", path)
            return real(path)

        monkeypatch.setattr(data, "_open_file", deny)
    try:
        s = ImageSet.from_folder(tmp_path)
        assert s.ids == ["img0000.png", "img0002.png"]
        assert s.skipped == [Skipped("img0001.png", "permission denied")]
    finally:
        os.chmod(target, 0o644)


def test_permission_lost_after_scan_is_recorded(tmp_path, monkeypatch):
    write_pngs(tmp_path, digits_rgb(3, 8))
    s = ImageSet.from_folder(tmp_path)
    real = data._open_file
    monkeypatch.setattr(
        data, "_open_file",
        lambda p: (_ for _ in ()).throw(PermissionError(13, "denied")) if p.endswith("0000.png") else real(p),
    )
    ids = [i for b, _ in s.iter_batches(2) for i in b]
    assert ids == ["img0001.png", "img0002.png"]
    assert s.skipped == [Skipped("img0000.png", "permission denied")]


def test_symlinked_dir_followed_once(tmp_path):
    write_pngs(tmp_path / "real", digits_rgb(2, 8))
    os.symlink(tmp_path / "real", tmp_path / "alias")  # same files twice: kept once, under the real path
    os.symlink(tmp_path, tmp_path / "real" / "up")  # loop
    ext = tmp_path.parent / (tmp_path.name + "_ext")
    write_pngs(ext, digits_rgb(1, 8), prefix="e")
    os.symlink(ext, tmp_path / "linked")  # a symlinked folder outside the root is followed
    s = ImageSet.from_folder(tmp_path)
    assert s.ids == ["linked/e0000.png", "real/img0000.png", "real/img0001.png"]


def test_non_recursive_and_extensions(tmp_path):
    write_pngs(tmp_path, digits_rgb(2, 8))
    write_pngs(tmp_path / "sub", digits_rgb(1, 8))
    Image.fromarray(digits_rgb(1, 8)[0]).save(tmp_path / "x.bmp")
    assert ImageSet.from_folder(tmp_path, recursive=False).ids == ["img0000.png", "img0001.png", "x.bmp"]
    assert ImageSet.from_folder(tmp_path, extensions=["BMP"]).ids == ["x.bmp"]
    with pytest.raises(ValueError, match="extensions"):
        ImageSet.from_folder(tmp_path, extensions=[""])


def test_empty_and_missing_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageSet.from_folder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no usable images") as ei:
        ImageSet.from_folder(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(ei.value)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"")
    (bad / "b.jpg").write_bytes(b"not a jpeg")
    (bad / "c.txt").write_text("x")
    with pytest.raises(ValueError, match="2 file\\(s\\) skipped") as ei:
        ImageSet.from_folder(bad)
    assert "zero-byte" in str(ei.value) and "1 file(s) with other extensions ignored" in str(ei.value)
    (bad / "c.txt").unlink()
    with pytest.raises(NotADirectoryError):
        ImageSet.from_folder(bad / "a.png")


def test_argument_errors(tmp_path):
    write_pngs(tmp_path, digits_rgb(1, 8))
    with pytest.raises(ValueError, match="max_pixels"):
        ImageSet.from_folder(tmp_path, max_pixels=0)
    with pytest.raises(ValueError, match="num_workers"):
        ImageSet.from_folder(tmp_path, num_workers=0)
    s = ImageSet.from_folder(tmp_path)
    with pytest.raises(ValueError, match="batch_size"):
        s.iter_batches(0)
    with pytest.raises(KeyError, match="nope"):
        s.load("nope")
    with pytest.raises(IndexError):
        s.load(5)


# ------------------------------------------------------------------------------------------- streaming


def test_iter_batches_equals_arrays_and_bounded_prefetch(tmp_path):
    imgs = digits_rgb(37, 16)
    write_pngs(tmp_path, imgs)
    s = ImageSet.from_folder(tmp_path, num_workers=3)
    assert len(s) == 37 and s.sizes() == [(16, 16)] * 37

    # count decoded arrays that exist but were not yet handed to the caller
    state = {"decoded": 0, "handed": 0, "max_ahead": 0}
    real = s._backend.load

    def counting(handle, id):  # noqa: A002
        out = real(handle, id)
        state["decoded"] += 1
        return out

    s._backend.load = counting
    got_ids, got = [], []
    for ids, batch in s.iter_batches(5):
        state["handed"] += len(batch)
        state["max_ahead"] = max(state["max_ahead"], state["decoded"] - state["handed"])
        got_ids += ids
        got += batch
    window = s.last_iter_stats["window"]
    assert window == max(5, 2 * 3)
    assert s.last_iter_stats["max_in_flight"] <= window
    assert state["max_ahead"] <= window + 5  # prefetched decodes + the batch being filled
    assert got_ids == [f"img{i:04d}.png" for i in range(37)]
    np.testing.assert_array_equal(np.stack(got), imgs)

    # indices: order kept, subset of positions
    idx = [30, 2, 7]
    out = [(i, a) for ids, b in s.iter_batches(2, indices=idx) for i, a in zip(ids, b)]
    assert [i for i, _ in out] == [s.ids[k] for k in idx]
    for (_, a), k in zip(out, idx):
        np.testing.assert_array_equal(a, imgs[k])


def test_iter_batches_early_stop_releases_pool(tmp_path):
    write_pngs(tmp_path, digits_rgb(40, 8))
    s = ImageSet.from_folder(tmp_path, num_workers=2)
    it = s.iter_batches(4)
    ids, _ = next(it)
    assert len(ids) == 4
    it.close()  # cancels pending decodes, joins the pool
    import threading

    assert not [t for t in threading.enumerate() if t.name.startswith("diffaudit-decode")]


def test_batch_size_does_not_change_content(tmp_path):
    imgs = digits_rgb(11, 8, seed=3)
    write_pngs(tmp_path, imgs)
    s = ImageSet.from_folder(tmp_path)
    for bs, nw in [(1, 1), (3, 2), (64, 4)]:
        got = [a for _, b in s.iter_batches(bs, num_workers=nw) for a in b]
        np.testing.assert_array_equal(np.stack(got), imgs)


# --------------------------------------------------------------------------------------------- keys


def test_item_keys_and_fingerprint_track_changes(tmp_path):
    imgs = digits_rgb(3, 8)
    write_pngs(tmp_path, imgs)
    a = ImageSet.from_folder(tmp_path)
    b = ImageSet.from_folder(tmp_path)
    assert a.item_keys() == b.item_keys() and a.fingerprint() == b.fingerprint()
    assert len(set(a.item_keys())) == 3
    ka, fa = a.item_keys(), a.fingerprint()
    # change one file (new content, later mtime): only its key changes
    p = tmp_path / "img0001.png"
    Image.fromarray(imgs[2][::-1]).save(p)
    st = p.stat()
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    c = ImageSet.from_folder(tmp_path)
    kc = c.item_keys()
    assert ka[0] == kc[0] and ka[2] == kc[2] and ka[1] != kc[1]
    assert fa != c.fingerprint()
    assert a.item_keys() == kc  # keys follow the content at every call: an older set never serves stale vectors
    # an added file changes the fingerprint, not the other keys
    Image.fromarray(imgs[0]).save(tmp_path / "new.png")
    d = ImageSet.from_folder(tmp_path)
    assert d.item_keys()[:3] == kc and d.fingerprint() != c.fingerprint()


def test_array_keys_are_content_hashes():
    x = digits_rgb(4, 8)
    a = ImageSet.from_arrays(x)
    b = ImageSet.from_arrays(list(x), ids=["w", "x", "y", "z"])
    assert a.item_keys() == b.item_keys()  # same pixels, same keys
    assert a.fingerprint() != b.fingerprint()  # different ids
    y = x.copy()
    y[2, 0, 0, 0] ^= 1
    assert ImageSet.from_arrays(y).item_keys()[2] != a.item_keys()[2]
    assert ImageSet.from_arrays(y).item_keys()[:2] == a.item_keys()[:2]
    # the same pixels in another shape are a different item
    assert ImageSet.from_arrays(x.reshape(4, 16, 4, 3)).item_keys()[0] != a.item_keys()[0]


def test_subset(tmp_path):
    imgs = digits_rgb(6, 8)
    write_pngs(tmp_path, imgs)
    s = ImageSet.from_folder(tmp_path)
    sub = s.subset([4, 1])
    assert sub.ids == ["img0004.png", "img0001.png"]
    assert sub.item_keys() == [s.item_keys()[4], s.item_keys()[1]]
    np.testing.assert_array_equal(sub.load(0), imgs[4])
    assert sub.subset(["img0001.png"]).ids == ["img0001.png"]
    with pytest.raises(ValueError, match="duplicates"):
        s.subset([1, 1])


# -------------------------------------------------------------------------------------------- arrays


def _ref_rgb(a: np.ndarray) -> np.ndarray:
    if a.ndim == 2:
        a = a[..., None]
    if a.shape[2] == 1:
        return np.repeat(a, 3, axis=2)
    if a.shape[2] == 4:
        return composite_white(a)
    return a


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 4),
    h=st.integers(1, 9),
    w=st.integers(1, 9),
    c=st.sampled_from([None, 1, 3, 4]),
    seed=st.integers(0, 2**16),
    as_list=st.booleans(),
)
def test_from_arrays_property(n, h, w, c, seed, as_list):
    rng = np.random.default_rng(seed)
    shape = (n, h, w) if c is None else (n, h, w, c)
    x = rng.integers(0, 256, shape, dtype=np.uint8)
    s = ImageSet.from_arrays(list(x) if as_list else x)
    assert len(s) == n and s.ids == [f"{i:06d}" for i in range(n)]
    assert s.sizes() == [(h, w)] * n
    got = [a for _, b in s.iter_batches(3) for a in b]
    assert len(got) == n
    for a, ref in zip(got, x):
        assert a.shape == (h, w, 3) and a.dtype == np.uint8
        np.testing.assert_array_equal(a, _ref_rgb(ref))


@settings(max_examples=20, deadline=None)
@given(
    shape=st.lists(st.integers(0, 6), min_size=1, max_size=5),
    dtype=st.sampled_from(["uint8", "float32", "float64", "uint16", "int64", "bool"]),
)
def test_from_arrays_rejects_bad_shapes_and_dtypes(shape, dtype):
    x = np.zeros(shape, dtype=dtype)
    valid = (
        dtype == "uint8"
        and (len(shape) == 3 or (len(shape) == 4 and shape[3] in (1, 3, 4)))
        and all(v > 0 for v in shape[:3])
    )
    if valid:
        assert len(ImageSet.from_arrays(x)) == shape[0]
        return
    with pytest.raises(ValueError) as ei:
        ImageSet.from_arrays(x)
    msg = str(ei.value)
    assert "from_arrays" in msg
    assert str(tuple(shape)) in msg or dtype in msg or "empty" in msg


def test_from_arrays_messages_and_ids():
    with pytest.raises(ValueError, match=r"\(x \* 255\)\.round\(\)\.astype\(np\.uint8\)"):
        ImageSet.from_arrays(np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(2, 3, 4, 5\).*channels last"):
        ImageSet.from_arrays(np.zeros((2, 3, 4, 5), np.uint8))
    with pytest.raises(ValueError, match=r"arrays\[1\].*\(4, 4, 2\)"):
        ImageSet.from_arrays([np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4, 2), np.uint8)])
    with pytest.raises(ValueError, match="2 ids for 3 images"):
        ImageSet.from_arrays(np.zeros((3, 4, 4), np.uint8), ids=["a", "b"])
    with pytest.raises(ValueError, match="duplicate id 'a'"):
        ImageSet.from_arrays(np.zeros((3, 4, 4), np.uint8), ids=["a", "b", "a"])
    with pytest.raises(ValueError, match="empty"):
        ImageSet.from_arrays([])


def test_from_arrays_mixed_sizes_no_copy():
    x = digits_rgb(3, 16)
    s = ImageSet.from_arrays(x, ids=["p", "q", "r"])
    v = s.load("q")
    assert np.shares_memory(v, x) and not v.flags.writeable  # a read-only view, not a copy
    mixed = [digits_rgb(1, 8)[0], digits_rgb(1, 16)[0][..., :1], np.zeros((5, 7), np.uint8)]
    m = ImageSet.from_arrays(mixed)
    assert m.sizes() == [(8, 8), (16, 16), (5, 7)]
    assert [a.shape for _, b in m.iter_batches(2) for a in b] == [(8, 8, 3), (16, 16, 3), (5, 7, 3)]


# --------------------------------------------------------------------------------------------------- HF


def _hf_dataset(imgs):
    datasets = pytest.importorskip("datasets")
    pil = [Image.fromarray(a) for a in imgs]
    pil[1] = pil[1].convert("L")
    features = datasets.Features({"image": datasets.Image(), "name": datasets.Value("string")})
    return datasets.Dataset.from_dict({"image": pil, "name": [f"n{i}" for i in range(len(imgs))]}, features=features)


def test_from_hf_dataset_and_saved_folder(tmp_path):
    imgs = digits_rgb(5, 8)
    ds = _hf_dataset(imgs)
    s = ImageSet.from_hf(ds)
    assert s.ids == [f"{i:06d}" for i in range(5)] and s.source.startswith("hf:")
    got = [a for _, b in s.iter_batches(2) for a in b]
    np.testing.assert_array_equal(np.stack(got), imgs)
    assert s.sizes() == [(8, 8)] * 5
    ds.save_to_disk(str(tmp_path / "saved"))
    t = ImageSet.from_hf(tmp_path / "saved", id_column="name")
    assert t.ids == [f"n{i}" for i in range(5)]
    np.testing.assert_array_equal(t.load("n3"), imgs[3])
    assert t.item_keys() == s.item_keys()
    with pytest.raises(ValueError, match="image_column 'img'.*columns"):
        ImageSet.from_hf(ds, image_column="img")
    with pytest.raises(FileNotFoundError):
        ImageSet.from_hf(tmp_path / "missing")


def test_from_hf_array_column_and_bad_rows():
    datasets = pytest.importorskip("datasets")
    imgs = digits_rgb(3, 8)
    ds = datasets.Dataset.from_dict({"pixels": [a for a in imgs]})
    s = ImageSet.from_hf(ds, image_column="pixels")
    np.testing.assert_array_equal(np.stack([s.load(i) for i in range(3)]), imgs)
    typed = datasets.Dataset.from_dict(
        {"pixels": [a for a in imgs]},
        features=datasets.Features({"pixels": datasets.Array3D(shape=(8, 8, 3), dtype="uint8")}),
    )
    t = ImageSet.from_hf(typed, image_column="pixels")
    np.testing.assert_array_equal(np.stack([a for _, b in t.iter_batches(2) for a in b]), imgs)
    assert t.item_keys() == ImageSet.from_arrays(imgs).item_keys()
    floats = datasets.Dataset.from_dict({"pixels": [a / 255.0 for a in imgs]})
    f = ImageSet.from_hf(floats, image_column="pixels")
    assert [i for b, _ in f.iter_batches(2) for i in b] == []
    assert len(f.skipped) == 3 and "float" in f.skipped[0].reason
    # an encoded column with a corrupt row: skipped at decode, the rest processed
    good = encode(Image.fromarray(imgs[0]), "PNG")
    ds2 = datasets.Dataset.from_dict(
        {"image": [{"bytes": good, "path": None}, {"bytes": b"garbage", "path": None}]},
        features=datasets.Features({"image": datasets.Image()}),
    )
    s2 = ImageSet.from_hf(ds2)
    ids = [i for b, _ in s2.iter_batches(4) for i in b]
    assert ids == ["000000"] and [k.id for k in s2.skipped] == ["000001"]
    with pytest.raises(ValueError, match="DatasetDict"):
        ImageSet.from_hf(datasets.DatasetDict({"train": ds}))


def test_from_hf_missing_datasets_names_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ModuleNotFoundError, match=r'pip install "diffaudit\[hf\]"'):
        ImageSet.from_hf(object())


def test_decode_error_pickles():
    import pickle

    e = pickle.loads(pickle.dumps(ImageDecodeError("a.png", "truncated")))
    assert (e.id, e.reason) == ("a.png", "truncated") and isinstance(e, ValueError)


def test_pil_modes_direct():
    # CMYK -> RGB follows Pillow's documented formula; I;16 -> /257; P without transparency -> palette colours
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 0, 0))
    np.testing.assert_array_equal(data._pil_to_rgb(cmyk)[0, 0], [255, 0, 255])
    i16 = Image.fromarray(np.array([[0, 257, 65535, 32896]], np.uint16))
    np.testing.assert_array_equal(data._pil_to_rgb(i16)[0, :, 0], [0, 1, 255, 128])
    p = Image.new("P", (1, 1), 1)
    p.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    np.testing.assert_array_equal(data._pil_to_rgb(p)[0, 0], [10, 20, 30])
    rgb_key = Image.new("RGB", (1, 2), (5, 5, 5))
    rgb_key.putpixel((0, 1), (9, 9, 9))
    rgb_key.info["transparency"] = (5, 5, 5)
    np.testing.assert_array_equal(data._pil_to_rgb(rgb_key)[:, 0], [[255, 255, 255], [9, 9, 9]])
    b = io.BytesIO()
    Image.new("1", (3, 1), 1).save(b, "PNG")
    np.testing.assert_array_equal(data._pil_to_rgb(Image.open(b))[0], [[255] * 3] * 3)


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core: every decode is serial")
def test_tiny_images_decode_in_one_thread_unless_workers_are_asked_for(tmp_path):
    """Below SERIAL_DECODE_PIXELS (median, from the headers) a pool costs more than the decode: the default decodes
    serially; num_workers= (from_folder or iter_batches) still gets a pool; larger images get one by default. The
    images are the same either way."""
    from diffaudit.data import SERIAL_DECODE_PIXELS

    tiny, big = tmp_path / "tiny", tmp_path / "big"
    t_imgs, b_imgs = digits_rgb(20, 16), digits_rgb(20, 96)
    assert 16 * 16 < SERIAL_DECODE_PIXELS <= 96 * 96
    write_pngs(tiny, t_imgs)
    write_pngs(big, b_imgs)
    for folder, imgs, kw, serial in ((tiny, t_imgs, {}, True), (big, b_imgs, {}, False),
                                     (tiny, t_imgs, {"num_workers": 2}, False)):
        s = ImageSet.from_folder(folder, **kw)
        got = [a for _, b in s.iter_batches(8) for a in b]
        assert (s.last_iter_stats["window"] == 1) == serial, (folder.name, kw, s.last_iter_stats)
        np.testing.assert_array_equal(np.stack(got), imgs)
    s = ImageSet.from_folder(tiny)
    list(s.iter_batches(8, num_workers=2))
    assert s.last_iter_stats["window"] > 1
