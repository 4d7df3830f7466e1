"""EmbeddingIndex: nearest-neighbour search over embeddings with FAISS.

* ``kind="exact"`` (default): ``IndexFlatL2`` for the ``"l2"`` metric (scores are Euclidean distances, the square
  root of FAISS's squared distances, negatives from round-off clipped to 0) and ``IndexFlatIP`` on L2-normalised
  float32 vectors for ``"cosine"`` (scores are cosine similarities; queries are normalised too). Same neighbours as
  brute force.
* ``kind="ivf"``: ``IndexIVFFlat`` for large sets. ``k * rerank`` candidates are fetched and re-scored *exactly*
  against the stored vectors, so approximation can only lose a neighbour that is not among the candidates at all
  (a near-duplicate sits in the query's own cell or a probed neighbour cell, so it is not lost in practice).
  ``nlist`` follows autofaiss's ``get_optimal_nb_clusters`` rule for fewer than 1M vectors -- the power of two
  nearest to ``4 * sqrt(N)`` (FAISS wiki "Guidelines to choose an index": between 4*sqrt(N) and 16*sqrt(N)) -- and
  is used above 1M too (16384+ lists cost hours of k-means on a CPU); it is capped at ``N // 39`` so every centroid
  gets the 39 training points FAISS asks for. k-means is trained on a random sample of
  ``min(N, 64 * nlist)`` vectors (autofaiss trains on 30..256 points per centroid; FAISS itself subsamples above
  256). ``nprobe`` defaults to ``nlist // 8`` lists, at least 16 and at most ``MAX_DEFAULT_NPROBE`` (128) and
  ``nlist``: on 1M clustered 512-d vectors (nlist 4096, ``benchmarks/bench_scale.py``) 64 lists already give top-1
  recall 0.996-0.999 against the exact index and 128 give 1.000, while 512 (``nlist // 8``) cost 5x the search time.
* ``kind="auto"``: exact below ``AUTO_IVF_MIN`` (200k) vectors, IVF above. Decided when the index is built.

Vectors are buffered by :meth:`EmbeddingIndex.add`; the FAISS index is built on the first search (or an explicit
:meth:`EmbeddingIndex.build`), later adds go straight into it. The exact CPU index keeps its vectors only inside
FAISS (no second copy); IVF and GPU indexes keep a numpy copy for exact re-scoring, which may be float16
(``store_dtype="float16"``; a read-only memmap after ``load(..., mmap=True)``) and is upcast per batch.

GPU: with ``use_gpu=None`` the index goes to GPU 0 when ``faiss.get_num_gpus() > 0`` (a GPU build of FAISS, extra
``diffaudit[gpu]``); if the move fails, a warning is issued and the CPU index is used.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from diffaudit.embedders.base import Embeddings

log = logging.getLogger(__name__)

#: kind="auto" switches from the exact index to IVF at this many vectors
AUTO_IVF_MIN = 200_000
#: k-means training points per IVF list (autofaiss: 30..256; FAISS subsamples above 256)
TRAIN_POINTS_PER_LIST = 64
#: FAISS warns below 39 training points per centroid
MIN_POINTS_PER_LIST = 39
#: cap of the default nprobe (see the module docstring for the measurement behind it)
MAX_DEFAULT_NPROBE = 128
#: GPU FAISS limits k and nprobe to this
GPU_MAX_K = 2048

_FORMAT = "diffaudit-index"
_FORMAT_VERSION = 1
_KINDS = ("exact", "ivf", "auto")
_METRICS = ("l2", "cosine")


def _faiss():
    """faiss (a core dependency, imported lazily to keep ``import diffaudit`` fast). Its loader logs each CPU build
    it tries and cannot load (``ModuleNotFoundError(... 'faiss.swigfaiss_avx512_spr')``) at INFO before falling back
    to one that works; those harmless lines are held back to WARNING while it loads."""
    import sys

    if "faiss" not in sys.modules:
        loader = logging.getLogger("faiss.loader")
        before = loader.level
        if before < logging.WARNING:
            loader.setLevel(logging.WARNING)
        try:
            import faiss
        finally:
            loader.setLevel(before)
        return faiss
    import faiss

    return faiss


def optimal_nlist(n: int) -> int:
    """Number of IVF lists for ``n`` vectors: the power of two nearest to ``4*sqrt(n)`` (autofaiss's first choice for
    n < 1M), capped at ``n // 39`` (FAISS wants >= 39 training points per list); at least 1."""
    if n <= 0:
        return 1
    x = 4.0 * math.sqrt(n)
    nlist = 2 ** round(math.log2(x))
    return int(max(1, min(nlist, n // MIN_POINTS_PER_LIST)))


def default_nprobe(nlist: int) -> int:
    """Lists probed per query: ``nlist // 8``, at least 16, at most ``MAX_DEFAULT_NPROBE`` (128) and ``nlist``."""
    return int(min(nlist, MAX_DEFAULT_NPROBE, max(16, nlist // 8)))


def _as_matrix(x, dim: int | None, what: str) -> np.ndarray:
    """float32 C-contiguous (n, dim) array (no copy when already so); 1-D input is one row."""
    arr = np.asarray(x)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise ValueError(f"{what} must be a 2-D array (n, dim); got shape {arr.shape}")
    if dim is not None and arr.shape[1] != dim:
        raise ValueError(f"{what} have dimension {arr.shape[1]} but the index holds dimension {dim} vectors")
    if arr.dtype != np.float32 or not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr, dtype=np.float32)
    return arr


def _check_finite(arr: np.ndarray, what: str, offset: int = 0) -> None:
    if not np.isfinite(arr).all():
        bad = np.flatnonzero(~np.isfinite(arr).all(axis=1))
        rows = (bad[:5] + offset).tolist()
        raise ValueError(f"{what} contain NaN or infinite values (rows {rows}{'...' if len(bad) > 5 else ''}); "
                         "only finite vectors can be searched")


def _normalize(arr: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation into a new float32 array; all-zero rows stay zero."""
    norms = np.sqrt(np.einsum("ij,ij->i", arr, arr, dtype=np.float64))
    norms[norms == 0] = 1.0
    return (arr / norms[:, None]).astype(np.float32, copy=False)


class EmbeddingIndex:
    """Nearest-neighbour index over float vectors (see the module docstring for the kinds).

    Parameters
    ----------
    dim: vector dimension.
    metric: ``"l2"`` (scores = Euclidean distance, ascending) or ``"cosine"`` (scores = cosine similarity,
        descending).
    kind: ``"exact"`` (default), ``"ivf"`` or ``"auto"`` (exact below 200k vectors).
    nlist, nprobe: IVF lists and lists probed per query (None: :func:`optimal_nlist`, :func:`default_nprobe`).
    rerank: IVF fetches ``k * rerank`` candidates and re-scores them exactly.
    use_gpu: None = GPU when FAISS sees one; True = require one; False = CPU.
    store_dtype: dtype of the vector copy used for IVF / GPU re-scoring (``"float32"`` or ``"float16"``).
    train_size: IVF k-means sample size (None: ``min(N, 64 * nlist)``, at least ``39 * nlist``).
    seed: seed of the training sample and of FAISS's k-means.
    """

    def __init__(
        self,
        dim: int,
        metric: str = "l2",
        *,
        kind: str = "exact",
        nlist: int | None = None,
        nprobe: int | None = None,
        rerank: int = 4,
        use_gpu: bool | None = None,
        store_dtype: str = "float32",
        train_size: int | None = None,
        seed: int = 0,
    ) -> None:
        if not isinstance(dim, (int, np.integer)) or dim < 1:
            raise ValueError(f"dim must be a positive integer; got {dim!r}")
        if metric not in _METRICS:
            raise ValueError(f"metric must be one of {_METRICS}; got {metric!r}")
        if kind not in _KINDS:
            raise ValueError(f"kind must be one of {_KINDS}; got {kind!r}")
        if nlist is not None and (int(nlist) != nlist or nlist < 1):
            raise ValueError(f"nlist must be a positive integer or None; got {nlist!r}")
        if nprobe is not None and (int(nprobe) != nprobe or nprobe < 1):
            raise ValueError(f"nprobe must be a positive integer or None; got {nprobe!r}")
        if int(rerank) != rerank or rerank < 1:
            raise ValueError(f"rerank must be an integer >= 1; got {rerank!r}")
        if store_dtype not in ("float32", "float16"):
            raise ValueError(f"store_dtype must be 'float32' or 'float16'; got {store_dtype!r}")
        if train_size is not None and (int(train_size) != train_size or train_size < 1):
            raise ValueError(f"train_size must be a positive integer or None; got {train_size!r}")
        self.dim = int(dim)
        self.metric = metric
        self.kind = kind
        self.nlist = None if nlist is None else int(nlist)
        self.nprobe = None if nprobe is None else int(nprobe)
        self.rerank = int(rerank)
        self.store_dtype = store_dtype
        self.train_size = None if train_size is None else int(train_size)
        self.seed = int(seed)
        self.ids: list[str] = []
        self.use_gpu = self._resolve_gpu(use_gpu)
        self._gpu_res = None  # faiss.StandardGpuResources; must outlive the GPU index
        self._index = None  # the FAISS index once built
        self.built_kind: str | None = None  # "exact" or "ivf" once built
        self._chunks: list[np.ndarray] = []  # vectors (normalised for cosine) not held by a CPU flat index
        self._ntotal = 0

    # ------------------------------------------------------------------ construction
    @staticmethod
    def _resolve_gpu(use_gpu: bool | None) -> bool:
        faiss = _faiss()
        ngpu = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
        if use_gpu is None:
            return ngpu > 0
        if use_gpu:
            if not hasattr(faiss, "StandardGpuResources"):
                raise ModuleNotFoundError(
                    'use_gpu=True needs a GPU build of FAISS: pip install "diffaudit[gpu]" (faiss-gpu-cu12)')
            if ngpu == 0:
                raise ValueError("use_gpu=True but FAISS sees no GPU (faiss.get_num_gpus() == 0); "
                                 "use use_gpu=None (automatic) or False")
        return bool(use_gpu)

    @classmethod
    def from_embeddings(cls, emb: "Embeddings", **kw) -> "EmbeddingIndex":
        """Index for an :class:`~diffaudit.embedders.base.Embeddings`: its metric, dimension and ids."""
        kw.setdefault("metric", emb.metric)
        index = cls(emb.dim, **kw)
        index.add(emb.vectors, ids=list(emb.ids))
        return index

    @classmethod
    def from_shards(cls, paths: Sequence[str | os.PathLike], **kw) -> "EmbeddingIndex":
        """One index over several shards, in the given order (row ``i`` of the result = the i-th vector overall).

        A shard is a folder written by :meth:`save`, an ``.npy`` file of vectors (ids and metric from a ``.json``
        beside it when there is one, as :func:`diffaudit.distributed.embed_ray` writes), or an ``.npz`` file with a
        ``vectors`` array and optionally ``ids`` (or ``keys``). The dimension and (for saved indexes) the metric come
        from the first shard unless given in ``kw``.
        """
        paths = [Path(p) for p in paths]
        if not paths:
            raise ValueError("from_shards: paths is empty; give at least one shard")
        index: EmbeddingIndex | None = None
        for p in paths:
            vectors, ids, metric = _read_shard(p)
            if index is None:
                kw.setdefault("metric", metric or "l2")
                index = cls(vectors.shape[1], **kw)
            if vectors.shape[1] != index.dim:
                raise ValueError(f"from_shards: shard {str(p)!r} has dimension {vectors.shape[1]}, "
                                 f"the first shard has dimension {index.dim}")
            if metric is not None and metric != index.metric:
                raise ValueError(f"from_shards: shard {str(p)!r} has metric {metric!r}, expected {index.metric!r}")
            for s in range(0, len(vectors), 65536):
                part = vectors[s:s + 65536]
                index.add(part, ids=None if ids is None else ids[s:s + 65536])
        assert index is not None
        return index

    @property
    def ntotal(self) -> int:
        return self._ntotal

    def __len__(self) -> int:
        return self._ntotal

    def __repr__(self) -> str:
        return (f"<EmbeddingIndex dim={self.dim} metric={self.metric} kind={self.built_kind or self.kind} "
                f"ntotal={self._ntotal}{' gpu' if self.use_gpu else ''}>")

    def add(self, vectors, ids: Sequence[str] | None = None) -> None:
        """Append vectors (n, dim); ``ids`` default to the row numbers as strings."""
        src = np.asarray(vectors)
        arr = _as_matrix(src, self.dim, "vectors")
        _check_finite(arr, "vectors", offset=self._ntotal)
        n = arr.shape[0]
        if ids is None:
            new_ids = [str(self._ntotal + i) for i in range(n)]
        else:
            new_ids = [str(i) for i in ids]
            if len(new_ids) != n:
                raise ValueError(f"ids has {len(new_ids)} entries for {n} vectors; give one id per vector")
        if n == 0:
            return
        if self.metric == "cosine":
            arr = _normalize(arr)
        # keep our own copy of the caller's data, but do not copy twice when conversion already made a new array
        self._add_prepared(arr, copy=np.may_share_memory(arr, src))
        self.ids.extend(new_ids)

    def _add_prepared(self, arr: np.ndarray, copy: bool = True) -> None:
        """Add rows already in stored form (normalised for cosine)."""
        if self._index is None or self._keeps_store():
            self._chunks.append(np.array(arr, dtype=self.store_dtype) if copy else
                                np.asarray(arr, dtype=self.store_dtype))
        if self._index is not None:
            self._index.add(np.ascontiguousarray(arr, dtype=np.float32))
        self._ntotal += arr.shape[0]

    def _keeps_store(self) -> bool:
        # the exact CPU index holds its float32 vectors itself; IVF and GPU indexes need a copy for re-scoring
        return not (self.built_kind == "exact" and not self.use_gpu)

    def _stored(self) -> np.ndarray:
        """All stored vectors (ntotal, dim), float32 or float16 (normalised for cosine). May be a view into FAISS."""
        if self._index is not None and not self._keeps_store():
            if self._ntotal == 0:
                return np.zeros((0, self.dim), np.float32)
            faiss = _faiss()
            return faiss.rev_swig_ptr(self._index.get_xb(), self._ntotal * self.dim).reshape(self._ntotal, self.dim)
        if not self._chunks:
            return np.zeros((0, self.dim), np.dtype(self.store_dtype))
        if len(self._chunks) > 1:
            self._chunks = [np.concatenate(self._chunks, axis=0)]
        return self._chunks[0]

    def get_vectors(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows ``start:stop`` of the stored vectors as a new float32 array (cosine: the normalised vectors)."""
        return np.array(self._stored()[start:stop], dtype=np.float32, copy=True)

    def take(self, rows) -> np.ndarray:
        """The stored vectors at row numbers ``rows`` (any shape of ints) as float32, shape ``rows.shape + (dim,)``."""
        r = np.asarray(rows, dtype=np.int64)
        if r.size and (r.min() < 0 or r.max() >= self.ntotal):
            raise IndexError(f"rows must be in 0..{self.ntotal - 1}; got {int(r.min())}..{int(r.max())}")
        return np.asarray(self._stored()[r.ravel()], dtype=np.float32).reshape(r.shape + (self.dim,))

    def _to_gpu(self, cpu_index):
        """Move a CPU index to GPU 0; on failure warn and keep the CPU index. (Small branch: no GPU in CI.)"""
        if not self.use_gpu:
            return cpu_index
        faiss = _faiss()
        try:
            if self._gpu_res is None:
                self._gpu_res = faiss.StandardGpuResources()  # kept on self: the GPU index uses it
            return faiss.index_cpu_to_gpu(self._gpu_res, 0, cpu_index)
        except Exception as exc:  # out of GPU memory, unsupported index, driver trouble
            warnings.warn(f"EmbeddingIndex: moving the FAISS index to GPU failed ({exc}); using the CPU",
                          RuntimeWarning, stacklevel=3)
            self.use_gpu = False
            self._gpu_res = None
            return cpu_index

    def _cpu_index(self):
        """The FAISS index on CPU (a copy when it lives on GPU)."""
        if self.use_gpu:
            return _faiss().index_gpu_to_cpu(self._index)
        return self._index

    def build(self) -> "EmbeddingIndex":
        """Build the FAISS index from the buffered vectors (idempotent; search calls it)."""
        if self._index is not None:
            return self
        kind = self.kind
        if kind == "auto":
            kind = "ivf" if self._ntotal >= AUTO_IVF_MIN else "exact"
        return self._build(kind)

    def _build(self, kind: str) -> "EmbeddingIndex":
        faiss = _faiss()
        n = self._ntotal
        stored = self._stored()
        if kind == "exact":
            cpu = faiss.IndexFlatL2(self.dim) if self.metric == "l2" else faiss.IndexFlatIP(self.dim)
            self.built_kind = "exact"
            index = self._to_gpu(cpu)
            self._index = index
            for s in range(0, n, 65536):
                index.add(np.ascontiguousarray(stored[s:s + 65536], dtype=np.float32))
            if not self._keeps_store():
                self._chunks = []  # FAISS holds the only copy now
            return self
        # ---- IVF
        nlist = self.nlist if self.nlist is not None else optimal_nlist(n)
        if nlist > n:
            raise ValueError(f"nlist={nlist} needs at least that many vectors to train; the index holds {n}")
        ts = self.train_size if self.train_size is not None else max(
            MIN_POINTS_PER_LIST * nlist, TRAIN_POINTS_PER_LIST * nlist)
        ts = min(n, ts)
        rng = np.random.default_rng(self.seed)
        sample = np.sort(rng.choice(n, size=ts, replace=False)) if ts < n else np.arange(n)
        train = np.ascontiguousarray(stored[sample], dtype=np.float32)
        if self.metric == "l2":
            quantizer, mt = faiss.IndexFlatL2(self.dim), faiss.METRIC_L2
        else:
            quantizer, mt = faiss.IndexFlatIP(self.dim), faiss.METRIC_INNER_PRODUCT
        cpu = faiss.IndexIVFFlat(quantizer, self.dim, nlist, mt)  # FAISS's Python wrapper keeps quantizer alive
        cpu.cp.seed = self.seed
        if self.metric == "cosine":
            cpu.cp.spherical = True  # centroids on the unit sphere
        self.built_kind = "ivf"
        self.nlist = nlist
        index = self._to_gpu(cpu)
        log.debug("training IVF: nlist=%d on %d of %d vectors", nlist, ts, n)
        index.train(train)
        del train
        for s in range(0, n, 65536):
            index.add(np.ascontiguousarray(stored[s:s + 65536], dtype=np.float32))
        self._index = index
        self._set_nprobe()
        return self

    def _set_nprobe(self) -> None:
        nprobe = self.nprobe if self.nprobe is not None else default_nprobe(self.nlist or 1)
        nprobe = min(nprobe, self.nlist or nprobe)
        if self.use_gpu:
            nprobe = min(nprobe, GPU_MAX_K)
        self.nprobe = int(nprobe)
        self._index.nprobe = self.nprobe

    # ------------------------------------------------------------------ search
    def _prep_queries(self, queries, offset: int = 0) -> np.ndarray:
        q = _as_matrix(queries, self.dim, "queries")
        _check_finite(q, "queries", offset)
        if self.metric == "cosine":
            q = _normalize(q)
        return q

    def search(self, queries, k: int = 5, *, batch_size: int = 16384, refine: bool | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest stored vectors of each query.

        Returns ``(scores, indices)``, both ``(nq, k)``: l2 -> Euclidean distances ascending, cosine -> similarities
        descending; ``indices`` are row numbers of the added vectors (``self.ids[i]`` is the id). When fewer than
        ``k`` vectors are found the remaining indices are -1 and scores ``inf`` (l2) or ``-inf`` (cosine).
        Queries are searched ``batch_size`` at a time. ``refine`` (default: on for IVF, off for exact) re-computes
        the scores of the returned candidates exactly (direct differences in float32 instead of FAISS's
        ``|x|^2 + |y|^2 - 2<x,y>``, so exact copies score exactly 0) and re-sorts them.
        """
        if int(k) != k or k < 1:
            raise ValueError(f"k must be a positive integer; got {k!r}")
        if int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
        k = int(k)
        q_all = np.asarray(queries)
        if q_all.ndim == 1:
            q_all = q_all[None, :]
        if q_all.ndim != 2:
            raise ValueError(f"queries must be a 2-D array (n, dim); got shape {q_all.shape}")
        if q_all.shape[1] != self.dim:
            raise ValueError(f"queries have dimension {q_all.shape[1]} but the index holds dimension {self.dim} "
                             "vectors")
        nq = q_all.shape[0]
        self.build()
        scores = np.empty((nq, k), np.float32)
        indices = np.empty((nq, k), np.int64)
        for s in range(0, nq, batch_size):
            qb = self._prep_queries(q_all[s:s + batch_size], offset=s)
            scores[s:s + len(qb)], indices[s:s + len(qb)] = self._search_prepared(qb, k, refine)
        return scores, indices

    def _search_prepared(self, q: np.ndarray, k: int, refine: bool | None, extra: int = 0
                         ) -> tuple[np.ndarray, np.ndarray]:
        """Search prepared queries (float32, normalised for cosine) for k results (plus ``extra`` candidates)."""
        nq = q.shape[0]
        worst = np.float32(np.inf if self.metric == "l2" else -np.inf)
        n = self._ntotal
        kk = min(k, n)
        if kk == 0 or nq == 0:
            return np.full((nq, k), worst, np.float32), np.full((nq, k), -1, np.int64)
        ivf = self.built_kind == "ivf"
        if refine is None:
            refine = ivf
        kc = min(n, (kk + extra) * self.rerank) if ivf else min(n, kk + extra)
        if self.use_gpu:
            kc = min(kc, GPU_MAX_K)
        D, I = self._index.search(q, kc)
        if refine:
            D = self._exact_scores(q, I)
            order = np.argsort(D if self.metric == "l2" else -D, axis=1, kind="stable")
            D = np.take_along_axis(D, order, axis=1)
            I = np.take_along_axis(I, order, axis=1)
        elif self.metric == "l2":
            np.maximum(D, 0, out=D)
            np.sqrt(D, out=D)
        if kc > kk or kk < k:
            D, I = D[:, :kk], I[:, :kk]
        missing = I < 0
        if missing.any():
            D = np.where(missing, worst, D)
        if kk < k:
            D = np.concatenate([D, np.full((nq, k - kk), worst, np.float32)], axis=1)
            I = np.concatenate([I, np.full((nq, k - kk), -1, np.int64)], axis=1)
        return D.astype(np.float32, copy=False), I.astype(np.int64, copy=False)

    def _exact_scores(self, q: np.ndarray, cand: np.ndarray) -> np.ndarray:
        """Exact scores of candidate rows ``cand`` (nq, c; -1 = none) for queries ``q``; -1 gets the worst score."""
        stored = self._stored()
        nq, c = cand.shape
        out = np.empty((nq, c), np.float32)
        valid = cand >= 0
        safe = np.where(valid, cand, 0)
        step = max(1, (1 << 22) // max(1, c * self.dim))  # bound the gathered block to ~16 MB of float32
        for s in range(0, nq, step):
            block = np.asarray(stored[safe[s:s + step]], dtype=np.float32)  # (b, c, dim), upcast per batch
            if self.metric == "l2":
                block -= q[s:s + step, None, :]
                out[s:s + step] = np.sqrt(np.einsum("bcd,bcd->bc", block, block))
            else:
                out[s:s + step] = np.einsum("bcd,bd->bc", block, q[s:s + step])
        out[~valid] = np.inf if self.metric == "l2" else -np.inf
        return out

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> Path:
        """Write the index to folder ``path`` (atomically: a temp folder renamed into place).

        Files: ``meta.json`` (parameters), ``ids.json``, ``vectors.npy`` (stored vectors; normalised for cosine) and,
        for IVF, ``index.faiss`` (trained lists). The exact index needs no FAISS file: its vectors are the index.
        An existing folder is replaced only if it holds a saved index.
        """
        faiss = _faiss()
        path = Path(path)
        if path.exists():
            meta_old = path / "meta.json"
            if not path.is_dir() or (any(path.iterdir()) and not meta_old.is_file()):
                raise ValueError(f"save: {str(path)!r} exists and is not a saved EmbeddingIndex folder; "
                                 "give a new or empty folder")
        self.build()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            stored = self._stored()
            np.save(tmp / "vectors.npy", np.asarray(stored, dtype=self.store_dtype if self._keeps_store()
                                                    else np.float32))
            if self.built_kind == "ivf":
                faiss.write_index(self._cpu_index(), str(tmp / "index.faiss"))
            (tmp / "ids.json").write_text(json.dumps(self.ids), encoding="utf-8")
            meta = {
                "format": _FORMAT, "version": _FORMAT_VERSION, "dim": self.dim, "metric": self.metric,
                "kind": self.kind, "built_kind": self.built_kind, "ntotal": self._ntotal, "nlist": self.nlist,
                "nprobe": self.nprobe, "rerank": self.rerank, "store_dtype": self.store_dtype,
                "train_size": self.train_size, "seed": self.seed, "faiss_version": getattr(faiss, "__version__", None),
            }
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
            old = None
            if path.exists():
                old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
                os.rename(path, old)
            os.rename(tmp, path)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, *, use_gpu: bool | None = None, mmap: bool = False,
             nprobe: int | None = None) -> "EmbeddingIndex":
        """Read a folder written by :meth:`save`; searches return the same results as before saving.

        ``mmap=True`` keeps the IVF re-scoring vectors memory-mapped on disk instead of in RAM.
        """
        faiss = _faiss()
        path = Path(path)
        meta = _read_meta(path)
        ids = json.loads((path / "ids.json").read_text(encoding="utf-8"))
        index = cls(meta["dim"], meta["metric"], kind=meta["kind"], nlist=meta["nlist"],
                    nprobe=nprobe if nprobe is not None else meta["nprobe"], rerank=meta["rerank"], use_gpu=use_gpu,
                    store_dtype=meta["store_dtype"], train_size=meta["train_size"], seed=meta["seed"])
        vectors = np.load(path / "vectors.npy", mmap_mode="r" if mmap else None)
        if vectors.shape != (meta["ntotal"], meta["dim"]) or len(ids) != meta["ntotal"]:
            raise ValueError(f"load: {str(path)!r} is inconsistent: vectors {vectors.shape}, {len(ids)} ids, "
                             f"meta ntotal={meta['ntotal']} dim={meta['dim']}")
        index.ids = [str(i) for i in ids]
        index._ntotal = int(meta["ntotal"])
        if meta["built_kind"] == "ivf":
            cpu = faiss.read_index(str(path / "index.faiss"))
            if cpu.ntotal != index._ntotal:
                raise ValueError(f"load: {str(path)!r}: index.faiss has {cpu.ntotal} vectors, meta says "
                                 f"{index._ntotal}")
            index.built_kind = "ivf"
            index._chunks = [vectors if mmap else np.asarray(vectors)]
            index._index = index._to_gpu(cpu)
            index._set_nprobe()
        else:
            index._chunks = [np.asarray(vectors, dtype=np.float32)]
            index._build("exact")  # rebuild the flat index from the saved (already normalised) vectors
        return index


def _read_meta(path: Path) -> dict:
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{str(path)!r} is not a saved EmbeddingIndex folder (no meta.json)")
    meta = json.loads(meta_file.read_text(encoding="utf-8"))
    if meta.get("format") != _FORMAT or meta.get("version") != _FORMAT_VERSION:
        raise ValueError(f"{str(path)!r}: unsupported index format {meta.get('format')!r} "
                         f"version {meta.get('version')!r}; expected {_FORMAT!r} version {_FORMAT_VERSION}")
    return meta


def _read_shard(p: Path) -> tuple[np.ndarray, list[str] | None, str | None]:
    """(vectors, ids or None, metric or None) of one shard (see EmbeddingIndex.from_shards)."""
    if p.is_dir():
        meta = _read_meta(p)
        ids = json.loads((p / "ids.json").read_text(encoding="utf-8"))
        return np.load(p / "vectors.npy", mmap_mode="r"), [str(i) for i in ids], meta["metric"]
    if not p.is_file():
        raise FileNotFoundError(f"from_shards: no such shard: {str(p)!r}")
    if p.suffix == ".npy":
        side = p.with_suffix(".json")  # a diffaudit.distributed shard: ids + metric beside the vectors
        if side.is_file():
            meta = json.loads(side.read_text(encoding="utf-8"))
            if isinstance(meta, dict) and isinstance(meta.get("ids"), list):
                vec = np.load(p, mmap_mode="r")
                if len(meta["ids"]) != len(vec):
                    raise ValueError(f"from_shards: {str(side)!r} lists {len(meta['ids'])} ids for {len(vec)} "
                                     f"vectors in {str(p)!r}")
                return vec, [str(i) for i in meta["ids"]], meta.get("metric")
        return np.load(p, mmap_mode="r"), None, None
    if p.suffix == ".npz":
        with np.load(p, allow_pickle=False) as z:
            if "vectors" not in z:
                raise ValueError(f"from_shards: {str(p)!r} has no 'vectors' array (has {sorted(z.files)})")
            vec = np.asarray(z["vectors"])
            key = "ids" if "ids" in z else ("keys" if "keys" in z else None)
            ids = [str(i) for i in z[key].tolist()] if key else None
            metric = str(z["metric"]) if "metric" in z else None
        return vec, ids, metric
    raise ValueError(f"from_shards: {str(p)!r} is not a saved index folder, .npy or .npz file")


def merge_topk(results: Iterable[tuple[np.ndarray, np.ndarray]], offsets: Sequence[int], k: int, metric: str
               ) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard ``(scores, indices)`` (each (nq, k_i)) into the global top ``k``.

    Shard-local indices are shifted by ``offsets[i]`` (the shard's first global row); -1 stays -1.
    """
    s_list, i_list = [], []
    for (s, i), off in zip(results, offsets):
        s_list.append(np.asarray(s, np.float32))
        i_list.append(np.where(np.asarray(i) >= 0, np.asarray(i, np.int64) + int(off), -1))
    if not s_list:
        raise ValueError("merge_topk: no results to merge")
    S, I = np.concatenate(s_list, axis=1), np.concatenate(i_list, axis=1)
    order = np.argsort(S if metric == "l2" else -S, axis=1, kind="stable")[:, :k]
    S, I = np.take_along_axis(S, order, axis=1), np.take_along_axis(I, order, axis=1)
    if S.shape[1] < k:
        worst = np.inf if metric == "l2" else -np.inf
        pad = k - S.shape[1]
        S = np.concatenate([S, np.full((S.shape[0], pad), worst, np.float32)], axis=1)
        I = np.concatenate([I, np.full((I.shape[0], pad), -1, np.int64)], axis=1)
    return S, I


def search_shards(indexes: Sequence[EmbeddingIndex], queries, k: int = 5, **kw) -> tuple[np.ndarray, np.ndarray]:
    """Search several indexes (shards of one collection, same metric/dim) and merge their top-``k``.

    Global row numbers follow the shard order: shard ``j`` starts at ``sum(len(indexes[:j]))``.
    """
    if not indexes:
        raise ValueError("search_shards: indexes is empty")
    metric = indexes[0].metric
    if any(ix.metric != metric or ix.dim != indexes[0].dim for ix in indexes):
        raise ValueError("search_shards: all shards must share metric and dim; got "
                         f"{[(ix.metric, ix.dim) for ix in indexes]}")
    offsets = np.cumsum([0] + [len(ix) for ix in indexes[:-1]]).tolist()
    return merge_topk((ix.search(queries, k, **kw) for ix in indexes), offsets, k, metric)


def self_neighbors(index_or_vectors, k: int = 1, *, metric: str = "l2", batch_size: int = 16384,
                   refine: bool = True, rows: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each stored row's ``k`` nearest OTHER rows: ``(scores, indices)``, both (N, k).

    A row is excluded by its index, not by distance 0, so exact duplicates of a row are still reported as its
    neighbours. Used for the train-vs-train second-neighbour baseline, duplicate detection and outlier scores.
    Accepts an :class:`EmbeddingIndex` or an (N, dim) array (indexed exactly with ``metric``). ``refine`` re-computes
    the scores exactly (exact copies score exactly 0 / 1). Missing neighbours (N <= k) are -1 with score inf/-inf.
    ``rows`` restricts the result to those stored rows (in that order); default all rows.
    """
    if isinstance(index_or_vectors, EmbeddingIndex):
        index = index_or_vectors
    else:
        arr = _as_matrix(index_or_vectors, None, "vectors")
        index = EmbeddingIndex(arr.shape[1], metric, kind="auto")
        index.add(arr)
    if int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer; got {k!r}")
    k = int(k)
    index.build()
    n = index.ntotal
    row_ids = np.arange(n) if rows is None else np.asarray(rows, dtype=np.int64).reshape(-1)
    if len(row_ids) and (row_ids.min() < 0 or row_ids.max() >= n):
        raise ValueError(f"rows must be row numbers in [0, {n}); got values from {row_ids.min()} to {row_ids.max()}")
    stored = index._stored()
    m = len(row_ids)
    scores = np.empty((m, k), np.float32)
    indices = np.empty((m, k), np.int64)
    for s in range(0, m, batch_size):
        r = row_ids[s:s + batch_size]
        q = index.get_vectors(s, s + batch_size) if rows is None else np.asarray(stored[r], dtype=np.float32)
        D, I = index._search_prepared(q, k + 1, refine)
        own = I == r[:, None]
        # drop the row itself wherever it is; rows whose own index is absent (many exact copies) drop the last
        order = np.argsort(own, axis=1, kind="stable")[:, :k]
        scores[s:s + len(q)] = np.take_along_axis(D, order, axis=1)
        indices[s:s + len(q)] = np.take_along_axis(I, order, axis=1)
    return scores, indices


def duplicate_groups(n: int, a, b) -> np.ndarray:
    """Group label (0.., in order of each group's first member) of each of ``n`` items, given duplicate pairs
    ``a[i] ~ b[i]`` (connected components: duplicates of duplicates are one group; a singleton is its own group).
    The one grouping of duplicates: ``find_duplicates`` clusters and the audit's duplicate counts both come from it."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    a = np.asarray(a, dtype=np.int64).reshape(-1)
    b = np.asarray(b, dtype=np.int64).reshape(-1)
    keep = (b >= 0) & (a != b)
    g = coo_matrix((np.ones(int(keep.sum()), np.int8), (a[keep], b[keep])), shape=(n, n))
    labels = connected_components(g, directed=False)[1].astype(np.int64)
    _, first = np.unique(labels, return_index=True)  # relabel by first member: stable, order-preserving
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rank[labels]


def rescore(index: EmbeddingIndex, distance, queries, cand: np.ndarray, keep: int | None = None,
            chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Re-score candidate rows ``cand`` (n, c) of each query with ``distance(a, b, pairwise=False)`` (an embedder's
    own distance, e.g. Carlini's tiled L2) and re-sort ascending; keep the first ``keep`` columns (default all).
    Missing candidates (-1) score inf."""
    q = np.asarray(queries, np.float32)
    n, c = cand.shape
    out = np.full((n, c), np.inf, np.float32)
    valid = cand >= 0
    for s in range(0, n, chunk):
        cc = np.where(valid[s:s + chunk], cand[s:s + chunk], 0)
        a = np.repeat(q[s:s + chunk], c, axis=0)
        d = np.asarray(distance(a, index.take(cc).reshape(-1, index.dim), pairwise=False), np.float32)
        out[s:s + chunk] = np.where(valid[s:s + chunk], d.reshape(cc.shape), np.inf)
    order = np.argsort(out, axis=1, kind="stable")[:, :keep]
    return np.take_along_axis(out, order, 1), np.take_along_axis(cand, order, 1)
