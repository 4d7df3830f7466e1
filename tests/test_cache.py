"""EmbeddingCache: round trips, misses on changed files, atomic shards, corrupt files, concurrent writers."""
from __future__ import annotations

import hashlib
import logging
import multiprocessing as mp
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from conftest import digits_rgb  # noqa: E402

from diffaudit.cache import EmbeddingCache, default_cache_root  # noqa: E402
from diffaudit.data import ImageSet  # noqa: E402

NAME = "pixel-8x8"


def vec_for(key: str, dim: int = 16) -> np.ndarray:
    """A deterministic vector per key, independent of the cache (so any process can check any key)."""
    seed = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)
    return np.random.default_rng(seed).standard_normal(dim).astype(np.float32)


def test_round_trip_float16_and_float32(tmp_path):
    keys = [f"k{i}" for i in range(50)]
    vecs = np.stack([vec_for(k) for k in keys]) * 3
    c16 = EmbeddingCache(tmp_path / "a")
    c16.store(NAME, keys, vecs)
    found, got = EmbeddingCache(tmp_path / "a").lookup(NAME, keys)  # a fresh object reads from disk
    assert found.all() and got.dtype == np.float32 and got.shape == vecs.shape
    np.testing.assert_allclose(got, vecs, rtol=1e-3, atol=1e-3)  # float16 precision
    c32 = EmbeddingCache(tmp_path / "b", store_dtype="float32")
    c32.store(NAME, keys, vecs)
    np.testing.assert_array_equal(EmbeddingCache(tmp_path / "b").lookup(NAME, keys)[1], vecs)
    with pytest.raises(ValueError, match="store_dtype"):
        EmbeddingCache(tmp_path, store_dtype="int8")


def test_partial_lookup_order_and_misses(tmp_path):
    c = EmbeddingCache(tmp_path)
    c.store(NAME, ["a", "b", "c"], np.stack([vec_for(k) for k in "abc"]))
    c.store(NAME, ["d"], vec_for("d")[None])
    query = ["d", "x", "b", "a", "y"]
    found, got = EmbeddingCache(tmp_path).lookup(NAME, query)
    assert found.tolist() == [True, False, True, True, False]
    ref = np.stack([vec_for(k) for k, f in zip(query, found) if f])
    np.testing.assert_allclose(got, ref, atol=2e-3)
    # other embedders see nothing; empty queries are fine
    f2, g2 = c.lookup("clip-ViT-B-32", query)
    assert not f2.any() and g2.shape[0] == 0
    assert c.lookup(NAME, [])[0].shape == (0,)
    assert c.count(NAME) == 4


def test_float16_overflow_stored_as_float32(tmp_path):
    c = EmbeddingCache(tmp_path)
    v = np.array([[1e6, -2.0], [0.5, 7e4]], np.float32)
    c.store(NAME, ["big", "big2"], v)
    np.testing.assert_array_equal(EmbeddingCache(tmp_path).lookup(NAME, ["big", "big2"])[1], v)


def test_store_validates(tmp_path):
    c = EmbeddingCache(tmp_path)
    with pytest.raises(ValueError, match=r"\(2, dim\)"):
        c.store(NAME, ["a", "b"], np.zeros((3, 4)))
    with pytest.raises(ValueError, match="duplicates"):
        c.store(NAME, ["a", "a"], np.zeros((2, 4)))
    assert c.store(NAME, [], np.zeros((0, 4))) is None


def test_embedder_names_are_safe_folders(tmp_path):
    c = EmbeddingCache(tmp_path)
    for name in ["../../evil", "sscd/torchscript:ab12cd34-288", "a b", "a_b"]:
        d = c.dir_for(name)
        assert d.parent == c.root and ".." not in d.name and "/" not in d.name
    assert c.dir_for("a b") != c.dir_for("a_b")  # hashed suffix keeps similar names apart
    c.store("a b", ["k"], np.ones((1, 2)))
    assert not c.lookup("a_b", ["k"])[0].any()


def test_default_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv("DIFFAUDIT_CACHE", str(tmp_path / "env"))
    assert EmbeddingCache().root == tmp_path / "env" == default_cache_root()
    monkeypatch.delenv("DIFFAUDIT_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert default_cache_root() == Path.home() / ".cache" / "diffaudit"


def test_changed_file_is_a_miss(tmp_path):
    imgs = digits_rgb(4, 8)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, a in enumerate(imgs):
        Image.fromarray(a).save(folder / f"{i}.png")
    s = ImageSet.from_folder(folder)
    c = EmbeddingCache(tmp_path / "cache")
    # "embed": mean colour per image (independent of the cache)
    vecs = np.stack([a.reshape(-1, 3).mean(0) for _, b in s.iter_batches(2) for a in b]).astype(np.float32)
    c.store(NAME, s.item_keys(), vecs)
    assert c.lookup(NAME, ImageSet.from_folder(folder).item_keys())[0].all()
    p = folder / "2.png"
    Image.fromarray(imgs[0][::-1]).save(p)  # new content
    st = p.stat()
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 5 * 10**9))
    Image.fromarray(imgs[1][:, ::-1]).save(folder / "9.png")  # a new file with new content
    (folder / "copy.png").write_bytes((folder / "1.png").read_bytes())  # byte-identical to 1.png: same vector
    s2 = ImageSet.from_folder(folder)
    found, _ = c.lookup(NAME, s2.item_keys())
    assert dict(zip(s2.ids, found.tolist())) == {"0.png": True, "1.png": True, "2.png": False, "3.png": True,
                                                 "9.png": False, "copy.png": True}


def test_leftover_tmp_and_corrupt_shards_are_ignored(tmp_path, caplog):
    c = EmbeddingCache(tmp_path)
    good = c.store(NAME, ["a", "b"], np.stack([vec_for("a"), vec_for("b")]))
    d = good.parent
    # a killed writer: half a temp file (never renamed) -> not even looked at
    (d / ".deadbeef-1234.npz.tmp").write_bytes(good.read_bytes()[:100])
    # a corrupt file with a shard name, a truncated copy, and a shard whose content does not match its name
    (d / ("0" * 64 + ".npz")).write_bytes(b"garbage")
    (d / ("1" * 64 + ".npz")).write_bytes(good.read_bytes()[:-40])
    other = EmbeddingCache(tmp_path / "x").store(NAME, ["a"], np.full((1, 16), 9.0))
    (d / ("2" * 64 + ".npz")).write_bytes(other.read_bytes())  # valid npz, wrong name: vectors "a" = 9 rejected
    with caplog.at_level(logging.WARNING, logger="diffaudit.cache"):
        found, got = EmbeddingCache(tmp_path).lookup(NAME, ["a", "b"])
    assert found.all()
    np.testing.assert_allclose(got, np.stack([vec_for("a"), vec_for("b")]), atol=2e-3)
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "0" * 64 in warned and "1" * 64 in warned and "2" * 64 in warned and ".tmp" not in warned
    # compaction merges the good data and cleans old temp files, keeps corrupt ones out of the result
    os.utime(d / ".deadbeef-1234.npz.tmp", (0, 0))
    c.store(NAME, ["c"], vec_for("c")[None])
    assert c.compact(NAME) == 3
    assert not (d / ".deadbeef-1234.npz.tmp").exists()


def test_writer_flushes_and_keeps_work_on_error(tmp_path):
    c = EmbeddingCache(tmp_path)
    keys = [f"k{i}" for i in range(10)]
    with pytest.raises(RuntimeError):
        with c.writer(NAME, flush_every=4) as w:
            for i in range(0, 10, 2):
                w.add(keys[i : i + 2], np.stack([vec_for(k) for k in keys[i : i + 2]]))
                if i == 6:
                    raise RuntimeError("killed mid-run")
    # shards at 4 and 8 rows, and the final flush on exit: everything added is kept
    found, _ = EmbeddingCache(tmp_path).lookup(NAME, keys)
    assert found[:8].all() and not found[8:].any()
    assert len(w.shards_written) == 2
    assert c.compact(NAME) == 8 and len(c.shards(NAME)) == 1
    np.testing.assert_allclose(c.lookup(NAME, keys[:8])[1], np.stack([vec_for(k) for k in keys[:8]]), atol=2e-3)


def test_check_writable(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError, match="not writable"):
        EmbeddingCache(tmp_path / "file" / "cache").check_writable(NAME)
    assert EmbeddingCache(tmp_path / "ok").check_writable(NAME).is_dir()


def _writer_proc(root: str, start: int, n: int, compact: bool, go) -> None:
    c = EmbeddingCache(root)
    go.wait(30)  # start together
    for j in range(n):
        # overlapping ranges: both processes write keys 40..119
        keys = [f"k{start + j * 4 + t}" for t in range(4)]
        c.store(NAME, keys, np.stack([vec_for(k) for k in keys]))
        if compact and j % 3 == 2:
            c.compact(NAME)


def test_two_processes_write_concurrently(tmp_path):
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    root = str(tmp_path)
    go = ctx.Event()
    procs = [ctx.Process(target=_writer_proc, args=(root, 0, 30, False, go)),
             ctx.Process(target=_writer_proc, args=(root, 40, 30, True, go))]
    for p in procs:
        p.start()
    go.set()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    keys = [f"k{i}" for i in range(160)]
    c = EmbeddingCache(root)
    found, got = c.lookup(NAME, keys)
    assert found.all()
    np.testing.assert_allclose(got, np.stack([vec_for(k) for k in keys]), atol=2e-3)
    leftovers = [n for n in os.listdir(c.dir_for(NAME)) if n.endswith(".tmp")]
    assert leftovers == []


def test_lookup_100k_is_fast(tmp_path):
    import time

    keys = [hashlib.sha1(str(i).encode()).hexdigest() for i in range(100_000)]
    vecs = np.random.default_rng(0).standard_normal((100_000, 8)).astype(np.float32)
    c = EmbeddingCache(tmp_path)
    with c.writer(NAME, flush_every=25_000) as w:
        w.add(keys, vecs)
    query = keys[::-1] + ["missing"]
    t = time.perf_counter()
    found, got = EmbeddingCache(tmp_path).lookup(NAME, query)
    elapsed = time.perf_counter() - t
    assert found[:-1].all() and not found[-1]
    np.testing.assert_allclose(got, vecs[::-1], atol=2e-2, rtol=1e-3)
    assert elapsed < 10  # generous: one pass over the shards, a dict lookup per key


def test_embed_keeps_values_too_large_for_float16(tmp_path):
    """embed() rounds fresh vectors to the cache's float16; a batch with values beyond float16's range is kept in
    float32 (no inf), the other batches keep their float16-rounded values, and a cached re-run returns the same
    numbers."""
    from diffaudit.embedders import embed
    from diffaudit.embedders.base import Embedder

    class Scaled(Embedder):
        name = "scaled-mean"
        metric = "l2"

        def embed_batch(self, images):
            m = np.array([float(np.asarray(a, np.float64).mean()) for a in images])
            return np.stack([m / 255.0 + 1 / 3, m * 1000.0 + 1e5 * (m > 120)], axis=1).astype(np.float32)

    x = digits_rgb(12, 8)
    order = np.argsort([a.mean() for a in x])  # dark images first: the large values come in a later batch
    images = ImageSet.from_arrays(x[order])
    first = embed(images, Scaled(), cache_dir=tmp_path, batch_size=4)
    m = np.array([a.astype(np.float64).mean() for a in x[order]])
    want = np.stack([m / 255.0 + 1 / 3, m * 1000.0 + 1e5 * (m > 120)], axis=1).astype(np.float32)
    assert np.isfinite(first.vectors).all()
    big = want[:, 1] > 65504
    assert big.any() and (~big).any()
    np.testing.assert_array_equal(first.vectors[big], want[big])  # stored exactly, as float32
    np.testing.assert_allclose(first.vectors, want, rtol=1e-3)
    again = embed(images, Scaled(), cache_dir=tmp_path, batch_size=4)  # served from the cache
    np.testing.assert_array_equal(again.vectors, first.vectors)
