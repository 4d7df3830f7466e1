"""EmbeddingIndex against brute-force numpy (independent reference), IVF recall, persistence, GPU branch (faked)."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from diffaudit.index import (
    EmbeddingIndex,
    default_nprobe,
    optimal_nlist,
    search_shards,
    self_neighbors,
)


def brute(q: np.ndarray, x: np.ndarray, metric: str) -> np.ndarray:
    """Full score matrix in float64: Euclidean distance or cosine similarity."""
    q = q.astype(np.float64)
    x = x.astype(np.float64)
    if metric == "l2":  # direct differences, in row blocks to bound memory
        step = max(1, 2_000_000 // x.size)
        return np.concatenate([np.sqrt(((q[s:s + step, None, :] - x[None]) ** 2).sum(-1))
                               for s in range(0, len(q), step)]) if len(q) else np.zeros((0, len(x)))
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    return qn @ xn.T


def check_against_brute(scores, indices, full, metric, k, atol=1e-4):
    """Scores equal the sorted brute-force scores, and each returned index really has its returned score.

    (Together these prove exactness even when exact duplicates make the neighbour order ambiguous.)
    """
    n = full.shape[1]
    kk = min(k, n)
    ref = np.sort(full, axis=1)[:, :kk] if metric == "l2" else -np.sort(-full, axis=1)[:, :kk]
    np.testing.assert_allclose(scores[:, :kk], ref, atol=atol)
    np.testing.assert_allclose(np.take_along_axis(full, indices[:, :kk], axis=1), scores[:, :kk], atol=atol)
    for row in indices[:, :kk]:
        assert len(set(row.tolist())) == kk  # no row returned twice
    assert (indices[:, kk:] == -1).all()
    assert np.all(scores[:, kk:] == (np.inf if metric == "l2" else -np.inf))


def data_with_duplicates(n=300, d=24, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    x[5] = x[17]
    x[40] = x[17]  # a triple of exact copies
    x[100] = x[200]
    q = rng.normal(size=(40, d)).astype(np.float32)
    q[:3] = x[[17, 100, 7]]  # queries that are exact copies of stored rows
    return x, q


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("k", [1, 5, 400])  # 400 > ntotal
def test_exact_equals_brute_force(metric, k):
    x, q = data_with_duplicates()
    index = EmbeddingIndex(x.shape[1], metric)
    index.add(x)
    scores, indices = index.search(q, k)
    assert scores.shape == indices.shape == (len(q), k)
    check_against_brute(scores, indices, brute(q, x, metric), metric, k)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_refined_scores_exact_for_copies(metric):
    x, q = data_with_duplicates()
    index = EmbeddingIndex(x.shape[1], metric)
    index.add(x)
    scores, indices = index.search(q[:3], 3, refine=True)
    full = brute(q, x, metric)
    check_against_brute(scores, indices, full[:3], metric, 3, atol=1e-5)
    if metric == "l2":
        assert scores[0, 0] == 0.0 and scores[0, 2] == 0.0  # the triple, exactly 0
        assert set(indices[0].tolist()) == {5, 17, 40}


def test_many_adds_equal_one_add_and_ids():
    x, q = data_with_duplicates()
    a = EmbeddingIndex(x.shape[1])
    a.add(x)
    b = EmbeddingIndex(x.shape[1])
    b.add(x[:100], ids=[f"a{i}" for i in range(100)])
    b.search(q, 2)  # build in between: later adds go into the built index
    b.add(x[100:250])
    b.add(x[250:])
    assert b.ntotal == len(x) == len(b.ids)
    assert b.ids[0] == "a0" and b.ids[100] == "100"
    sa, ia = a.search(q, 4)
    sb, ib = b.search(q, 4)
    np.testing.assert_allclose(sa, sb, atol=1e-5)
    check_against_brute(sb, ib, brute(q, x, "l2"), "l2", 4)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_batch_size_invariance(metric):
    x, q = data_with_duplicates()
    index = EmbeddingIndex(x.shape[1], metric)
    index.add(x)
    s1, i1 = index.search(q[3:], 6, batch_size=4096)
    s2, i2 = index.search(q[3:], 6, batch_size=7)
    np.testing.assert_array_equal(i1, i2)  # random queries: no ties
    np.testing.assert_allclose(s1, s2, atol=1e-5)


def test_errors_name_the_problem():
    index = EmbeddingIndex(8)
    with pytest.raises(ValueError, match="dimension 5.*dimension 8"):
        index.add(np.zeros((3, 5), np.float32))
    index.add(np.random.default_rng(0).normal(size=(10, 8)))
    with pytest.raises(ValueError, match="dimension 6.*dimension 8"):
        index.search(np.zeros((2, 6), np.float32))
    q = np.zeros((4, 8), np.float32)
    q[2, 3] = np.nan
    with pytest.raises(ValueError, match=r"NaN.*rows \[2\]"):
        index.search(q)
    bad = np.ones((2, 8))
    bad[1, 0] = np.inf
    with pytest.raises(ValueError, match="NaN or infinite"):
        index.add(bad)
    with pytest.raises(ValueError, match="metric"):
        EmbeddingIndex(8, "hamming")
    with pytest.raises(ValueError, match="kind"):
        EmbeddingIndex(8, kind="hnsw")
    with pytest.raises(ValueError, match="k must"):
        index.search(np.zeros((1, 8)), k=0)
    with pytest.raises(ValueError, match="ids has 1 entries for 2"):
        index.add(np.zeros((2, 8)), ids=["x"])


def test_empty_index_and_empty_queries():
    index = EmbeddingIndex(4, "cosine")
    s, i = index.search(np.ones((2, 4)), 3)
    assert (i == -1).all() and np.all(s == -np.inf)
    index.add(np.eye(4))
    s, i = index.search(np.zeros((0, 4)), 3)
    assert s.shape == (0, 3)


def clustered_with_planted(n=20000, d=32, n_centers=64, n_planted=200, seed=0):
    """Gaussian clusters + planted near-duplicates: rows n..n+n_planted are copies of random rows plus tiny noise."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=4.0, size=(n_centers, d))
    base = centers[rng.integers(n_centers, size=n)] + rng.normal(size=(n, d))
    src = rng.choice(n, size=n_planted, replace=False)
    planted = base[src] + rng.normal(scale=0.01, size=(n_planted, d))
    return np.concatenate([base, planted]).astype(np.float32), src, planted.astype(np.float32)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_ivf_finds_planted_duplicates_and_rescoring_is_exact(metric):
    x, src, planted = clustered_with_planted()
    n = len(x) - len(planted)
    ivf = EmbeddingIndex(x.shape[1], metric, kind="ivf")
    ivf.add(x)
    ivf.build()
    assert ivf.built_kind == "ivf"
    assert ivf.nlist == optimal_nlist(len(x)) == 512  # 4*sqrt(20200)=568 -> 512 (nearest power of two)
    assert ivf.nprobe == default_nprobe(512) == 64
    # query with fresh noisy copies of the sources: the source and its planted twin are the 2 nearest
    rng = np.random.default_rng(1)
    q = x[src] + rng.normal(scale=0.01, size=(len(src), x.shape[1])).astype(np.float32)
    scores, indices = ivf.search(q, 2)
    for j, s in enumerate(src):
        assert set(indices[j].tolist()) == {s, n + j}
    # scores of IVF results are exact (re-scored), not approximations
    full = brute(q, x, metric)
    np.testing.assert_allclose(np.take_along_axis(full, indices, axis=1), scores, atol=1e-4)
    # planted pairs are found among stored rows too (self-neighbours on the IVF index)
    sn, ni = self_neighbors(ivf, 1)
    np.testing.assert_array_equal(ni[n:, 0], src)
    np.testing.assert_array_equal(ni[src, 0], n + np.arange(len(src)))
    # top-1 recall vs exact on random in-distribution queries
    qr = x[rng.choice(n, 300, replace=False)] + rng.normal(scale=0.5, size=(300, x.shape[1])).astype(np.float32)
    exact = np.argsort(-brute(qr, x, metric) if metric == "cosine" else brute(qr, x, metric), axis=1)[:, 0]
    _, top = ivf.search(qr, 1)
    assert (top[:, 0] == exact).mean() >= 0.99


def test_ivf_small_and_auto():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(100, 8)).astype(np.float32)
    auto = EmbeddingIndex(8, kind="auto")
    auto.add(x)
    auto.build()
    assert auto.built_kind == "exact"
    ivf = EmbeddingIndex(8, kind="ivf", nprobe=1000)
    ivf.add(x)
    s, i = ivf.search(x[:10], 150)  # k > ntotal on IVF: all probed, padded
    check_against_brute(s, i, brute(x[:10], x, "l2"), "l2", 150)
    with pytest.raises(ValueError, match="nlist=500"):
        bad = EmbeddingIndex(8, kind="ivf", nlist=500)
        bad.add(x)
        bad.build()
    assert optimal_nlist(1_000_000) == 4096 and optimal_nlist(10) == 1


@pytest.mark.parametrize("kind,metric,store", [("exact", "l2", "float32"), ("exact", "cosine", "float32"),
                                               ("ivf", "l2", "float16"), ("ivf", "cosine", "float32")])
def test_save_load_round_trip(tmp_path, kind, metric, store):
    x, src, planted = clustered_with_planted(n=3000, n_planted=20)
    q = np.random.default_rng(3).normal(scale=4.0, size=(50, x.shape[1])).astype(np.float32)
    index = EmbeddingIndex(x.shape[1], metric, kind=kind, store_dtype=store)
    index.add(x, ids=[f"img/{i}.png" for i in range(len(x))])
    before = index.search(q, 7)
    out = index.save(tmp_path / "idx")
    meta = json.loads((out / "meta.json").read_text())
    assert meta["ntotal"] == len(x) and meta["metric"] == metric
    assert (out / "index.faiss").exists() == (kind == "ivf")
    for mmap in (False, True):
        loaded = EmbeddingIndex.load(out, mmap=mmap)
        after = loaded.search(q, 7)
        np.testing.assert_array_equal(before[0], after[0])
        np.testing.assert_array_equal(before[1], after[1])
        assert loaded.ids == index.ids and loaded.metric == metric and loaded.built_kind == index.built_kind
    # saving again over the same folder replaces it atomically; no temp folders are left behind
    index.save(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "data.txt").write_text("x")
    with pytest.raises(ValueError, match="not a saved EmbeddingIndex"):
        index.save(tmp_path / "precious")


def test_self_neighbors_excludes_by_index_not_distance():
    x, _ = data_with_duplicates(n=220)
    for metric in ("l2", "cosine"):
        s, i = self_neighbors(x, 3, metric=metric)
        full = brute(x, x, metric)
        np.fill_diagonal(full, np.inf if metric == "l2" else -np.inf)  # exclude self by index
        check_against_brute(s, i, full, metric, 3, atol=1e-5)
        assert not (i == np.arange(len(x))[:, None]).any()
    s, i = self_neighbors(x, 2)
    assert set(i[17].tolist()) == {5, 40} and s[17].tolist() == [0.0, 0.0]
    s, i = self_neighbors(x[:3], 5)  # fewer rows than k
    assert (i[:, 2:] == -1).all() and np.isinf(s[:, 2:]).all()


def test_self_neighbors_many_identical_rows():
    x = np.zeros((10, 4), np.float32)  # 10 identical rows: own index may be absent from the k+1 candidates
    s, i = self_neighbors(x, 3)
    assert not (i == np.arange(10)[:, None]).any()
    assert (s == 0).all() and (i >= 0).all()


def test_shards_merge(tmp_path):
    x, q = data_with_duplicates()
    parts = [x[:100], x[100:130], x[130:]]
    shards = []
    for j, p in enumerate(parts):
        ix = EmbeddingIndex(x.shape[1])
        ix.add(p)
        shards.append(ix)
    s, i = search_shards(shards, q, 6)
    check_against_brute(s, i, brute(q, x, "l2"), "l2", 6)
    shards[0].save(tmp_path / "s0")
    np.save(tmp_path / "s1.npy", parts[1])
    np.savez(tmp_path / "s2.npz", vectors=parts[2], ids=np.array([f"z{j}" for j in range(len(parts[2]))]))
    merged = EmbeddingIndex.from_shards([tmp_path / "s0", tmp_path / "s1.npy", tmp_path / "s2.npz"])
    assert merged.ntotal == len(x) and merged.ids[130] == "z0"
    s2, i2 = merged.search(q, 6)
    check_against_brute(s2, i2, brute(q, x, "l2"), "l2", 6)


def test_use_gpu_true_without_gpu_is_a_clear_error():
    import faiss

    if faiss.get_num_gpus() > 0:
        pytest.skip("machine has a GPU")
    with pytest.raises((ValueError, ModuleNotFoundError), match="use_gpu=True"):
        EmbeddingIndex(4, use_gpu=True)


class _FakeRes:
    pass


def test_gpu_branch_fallback_and_fake_gpu(monkeypatch, tmp_path):
    """No GPU in CI: fake FAISS's GPU functions to exercise the branch (move failure -> warning + CPU)."""
    import faiss

    x, q = data_with_duplicates()
    cpu = EmbeddingIndex(x.shape[1])
    cpu.add(x)
    ref = cpu.search(q, 4)

    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(faiss, "StandardGpuResources", _FakeRes, raising=False)

    def fail(res, dev, index):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(faiss, "index_cpu_to_gpu", fail, raising=False)
    index = EmbeddingIndex(x.shape[1])
    assert index.use_gpu
    index.add(x)
    with pytest.warns(RuntimeWarning, match="GPU failed.*out of memory"):
        got = index.search(q, 4)
    assert not index.use_gpu
    np.testing.assert_array_equal(got[1], ref[1])

    # a "GPU" index that is really the CPU one: the GPU code path (kept store, gpu->cpu for saving) works
    moved = []
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", lambda res, dev, ix: moved.append(res) or ix, raising=False)
    monkeypatch.setattr(faiss, "index_gpu_to_cpu", lambda ix: ix, raising=False)
    for kind in ("exact", "ivf"):
        g = EmbeddingIndex(x.shape[1], kind=kind, nlist=4, nprobe=4)
        g.add(x)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            s, i = g.search(q, 4)
        assert g.use_gpu and isinstance(moved[-1], _FakeRes) and g._gpu_res is moved[-1]
        check_against_brute(s, i, brute(q, x, "l2"), "l2", 4)
        g.save(tmp_path / kind)
        loaded = EmbeddingIndex.load(tmp_path / kind, use_gpu=False)
        np.testing.assert_array_equal(loaded.search(q, 4)[1], i)


@pytest.mark.parametrize("kind", ["exact", "ivf"])
def test_add_copies_caller_data(kind):
    x, q = data_with_duplicates()
    index = EmbeddingIndex(x.shape[1], kind=kind, nlist=4, nprobe=4)
    mine = x.copy()
    index.add(mine)  # float32 C-contiguous: must be copied, not aliased
    mine[:] = 0
    s, i = index.search(q, 3)
    check_against_brute(s, i, brute(q, x, "l2"), "l2", 3)
