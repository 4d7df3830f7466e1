"""Embedders behind one registry, and :func:`embed` (ImageSet -> cached Embeddings).

Specs understood by :func:`get_embedder`:

=====================  =====================================================================================
``"pixel"``            :class:`PixelEmbedder`, native size when all images share it, else 64x64 (L2)
``"pixel:32"``         pixel at 32x32 (``"pixel:32x48"`` for height x width; or ``size=``)
``"tiled"``            :class:`TiledEmbedder`, Carlini et al.'s tiled L2, 4x4 grid (``"tiled:8"`` for 8x8)
``"clip:<arch>"``      :class:`CLIPEmbedder` through open_clip with ``weights=<local file>`` or ``pretrained=<tag>``
``"sscd"``             :class:`SSCDEmbedder` with ``weights=<.torchscript.pt | .onnx>`` (``"sscd:320"``: size,
                       ``"sscd:square"``: square resize)
=====================  =====================================================================================

Keyword arguments are passed to the embedder's constructor. :func:`register_embedder` adds a prefix
(:mod:`diffaudit.embedders.registry`).

:func:`embed` (ImageSet -> Embeddings) is the one owner of the embedding cache: backends only produce
``(rows, vectors)`` batches -- this process, or Ray actors (:func:`diffaudit.distributed.ray_batches`) -- and
``embed`` writes them to the result and to the cache.
"""
from __future__ import annotations

import logging

import numpy as np

from ..results import Skipped
from .base import Embedder, Embeddings, Metric, default_device
from .registry import get_embedder, register_embedder, registered_embedders

log = logging.getLogger(__name__)

__all__ = [
    "CACHE_FLUSH_EVERY",
    "Embedder",
    "Embeddings",
    "Metric",
    "default_device",
    "get_embedder",
    "register_embedder",
    "registered_embedders",
    "embed",
    "PixelEmbedder",
    "TiledEmbedder",
    "CLIPEmbedder",
    "SSCDEmbedder",
    "tiled_l2",
]


def __getattr__(name: str):  # lazy re-exports of the concrete classes
    if name == "PixelEmbedder":
        from .pixel import PixelEmbedder

        return PixelEmbedder
    if name in ("TiledEmbedder", "tiled_l2"):
        from . import tiled

        return getattr(tiled, name)
    if name == "CLIPEmbedder":
        from .clip import CLIPEmbedder

        return CLIPEmbedder
    if name == "SSCDEmbedder":
        from .sscd import SSCDEmbedder

        return SSCDEmbedder
    raise AttributeError(f"module 'diffaudit.embedders' has no attribute {name!r}")


#: images embedded between two cache writes (a killed run keeps everything up to the last write)
CACHE_FLUSH_EVERY = 2048


def embed(
    images,
    embedder: str | Embedder = "pixel",
    *,
    cache_dir=None,
    cache: bool = True,
    progress: bool = False,
    batch_size: int | None = None,
    backend: str = "local",
    backend_options: dict | None = None,
) -> Embeddings:
    """Embed every image of an ImageSet, reusing cached vectors.

    Steps: ``embedder.prepare(images)`` (header data only); look up every item key (``images.item_keys()``) in the
    :class:`~diffaudit.cache.EmbeddingCache` under ``embedder.name``; embed only the missing images, streamed in
    batches from ``images.iter_batches(indices=missing)`` (parallel decoding with prefetch, so decoding overlaps
    the forward pass); write new vectors to the cache every ~2048 images and at the end, so a killed run keeps its
    finished work. A changed file has a new item key and is re-embedded.

    Args:
        images: an ImageSet (a uint8 NHWC / NHW array is wrapped with ``ImageSet.from_arrays``).
        embedder: an Embedder or a spec string for :func:`get_embedder`.
        cache_dir: cache root (default: ``$DIFFAUDIT_CACHE`` or ``~/.cache/diffaudit``), or an EmbeddingCache.
        cache: False -> neither read nor write the cache (vectors stay exact float32). With the cache on, vectors
            are returned at the cache's storage precision (float16 by default) whether just computed or read back,
            so a re-run gives identical numbers.
        progress: show a rich progress bar.
        batch_size: images per batch (default: the embedder's ``batch_size``).
        backend: ``"local"`` (this process) or ``"ray"`` (Ray Data actors, extra ``diffaudit[ray]``; see
            :mod:`diffaudit.distributed`: vectors come back float16-rounded, and are cached like local ones).
        backend_options: Ray options (``address``, ``num_workers``, ``num_gpus_per_worker``, ...; see
            :func:`diffaudit.distributed.embed_missing_ray`).

    Returns:
        Embeddings in ImageSet order; images that failed to decode are absent from ``ids`` and listed in
        ``skipped`` (with the files refused when the set was scanned).
    """
    if isinstance(images, np.ndarray):
        from ..data import ImageSet

        images = ImageSet.from_arrays(images)
    if not hasattr(images, "iter_batches") or not hasattr(images, "ids"):
        raise TypeError(f"images={type(images).__name__}: expected an ImageSet (or a uint8 NHWC / NHW array)")
    if backend not in ("local", "ray"):
        raise ValueError(f"backend={backend!r}: allowed values are 'local' and 'ray'")
    if backend_options and backend == "local":
        raise ValueError(f"backend_options={sorted(backend_options)} need backend='ray'")
    emb = get_embedder(embedder)
    bs = int(batch_size or getattr(emb, "batch_size", 64) or 64)
    if bs < 1:
        raise ValueError(f"batch_size={batch_size!r}: must be >= 1")
    emb.prepare(images)
    name = emb.name
    ids = list(images.ids)
    n = len(ids)

    out: np.ndarray | None = None
    done = np.zeros(n, dtype=bool)

    store = None
    keys: list[str] | None = None
    if cache and n:
        from ..cache import EmbeddingCache

        if hasattr(cache_dir, "lookup") and hasattr(cache_dir, "store"):
            store = cache_dir  # an EmbeddingCache instance
        else:
            store = EmbeddingCache(cache_dir) if cache_dir is not None else EmbeddingCache()
        keys = list(images.item_keys())
        found, vecs = store.lookup(name, keys)
        found = np.asarray(found, dtype=bool)
        if found.any():
            vecs = np.asarray(vecs)  # (found.sum(), dim) as stored (float16), in the order of the found keys
            out = np.zeros((n, vecs.shape[1]), np.float32)
            out[np.flatnonzero(found)] = vecs  # upcast while scattering: no float32 copy of the cached vectors
            del vecs
            done |= found
            log.info("%s: %d/%d vectors from the cache", name, int(found.sum()), n)

    missing = np.flatnonzero(~done)
    if len(missing) and store is not None and hasattr(store, "check_writable"):
        store.check_writable(name)  # an unwritable cache fails now, with its path, not after the first shard's work
    if len(missing):
        if backend == "ray":
            from ..distributed import ray_batches

            batches = ray_batches(images, emb, embedder, missing, bs, progress, backend_options)
        else:
            batches = _local_batches(images, emb, ids, missing, bs)
        out = _fill(batches, out, done, store, keys, name, len(ids), len(missing), progress and backend == "local")

    keep = np.flatnonzero(done)
    skipped = Skipped.unique(getattr(images, "skipped", []), "")
    if out is None:  # nothing could be embedded (every image failed to decode)
        out = np.zeros((n, getattr(emb, "dim", None) or 0), np.float32)
    vectors = out if len(keep) == n else out[keep]
    return Embeddings(
        ids=[ids[i] for i in keep],
        vectors=np.ascontiguousarray(vectors, dtype=np.float32),
        embedder=name,
        metric=emb.metric,
        skipped=skipped,
    )


def _at_cache_precision(vecs: np.ndarray, store) -> np.ndarray:
    """Round fresh vectors to the cache's storage dtype (float16 by default) so that a re-run served from the cache
    returns exactly the same numbers as the run that computed them; a batch with values too large for float16 is
    kept as is (the cache stores such shards in float32)."""
    dt = np.dtype(getattr(store, "store_dtype", np.float32))
    if dt == np.float32 or _overflows(vecs, dt):
        return vecs
    return vecs.astype(dt)  # the caller widens it (assignment into a float32 array): the same numbers


def _overflows(vecs: np.ndarray, dt) -> bool:
    """Whether finite values of ``vecs`` become inf in dtype ``dt``."""
    if np.dtype(vecs.dtype).itemsize <= np.dtype(dt).itemsize or vecs.size == 0:
        return False
    if max(float(vecs.max()), -float(vecs.min())) <= float(np.finfo(dt).max):  # fast path (NaN falls through)
        return False
    with np.errstate(over="ignore"):
        low = vecs.astype(dt)
    return bool(np.isinf(low).any() and np.any(np.isinf(low) & np.isfinite(vecs)))


def _local_batches(images, emb, ids, missing, bs):
    """``(rows, vectors)`` of the ``missing`` positions, embedded in this process in batches of ``bs`` (decode
    failures are left out: the ImageSet records them)."""
    index_of = {s: i for i, s in enumerate(ids)}
    for batch_ids, arrays in images.iter_batches(bs, indices=[int(i) for i in missing]):
        rows = [index_of[b] for b in batch_ids]
        if rows:
            vecs = np.asarray(emb.embed_batch(arrays), dtype=np.float32)
            if vecs.ndim != 2 or vecs.shape[0] != len(rows):
                raise RuntimeError(f"{emb.name}: embed_batch returned shape {vecs.shape} for {len(rows)} images")
            yield rows, vecs


def _fill(batches, out, done, store, keys, name, n, total, progress):
    """Write the ``(rows, vectors)`` batches of a backend into ``out`` / ``done``, and into the cache ``store``
    every :data:`CACHE_FLUSH_EVERY` images, at the end, and when interrupted (a killed run keeps its work)."""
    pend_rows: list[int] = []
    pend_vecs: list[np.ndarray] = []  # the same vectors at the cache's precision, written as they are (no re-gather)

    def flush() -> None:
        if store is None or not pend_rows:
            return
        rows = np.asarray(pend_rows)
        low = np.concatenate(pend_vecs)  # a float32 batch (too large for float16) promotes the whole shard
        first = np.sort(np.unique([keys[i] for i in rows], return_index=True)[1])  # identical images share a key
        store.store(name, [keys[i] for i in rows[first]], low[first] if len(first) < len(rows) else low)
        pend_rows.clear()
        pend_vecs.clear()

    bar = None
    if progress:
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

        from .._progress import progress

        bar = progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                       transient=False)
        bar.start()
        from rich.markup import escape

        task = bar.add_task(escape(f"embedding {name}"), total=total)
    try:
        n_seen = 0
        for rows, vecs in batches:
            if store is not None:
                vecs = _at_cache_precision(vecs, store)  # float16 by default: assigned into `out` as float32
                pend_vecs.append(vecs)
            if out is None:
                out = np.zeros((n, vecs.shape[1]), np.float32)
            elif out.shape[1] != vecs.shape[1]:
                raise RuntimeError(
                    f"{name}: the cache holds vectors of dim {out.shape[1]} but the embedder returns dim "
                    f"{vecs.shape[1]}; two different models share the name {name!r}. Clear "
                    f"{getattr(store, 'root', 'the cache')} or pass cache=False"
                )
            out[rows] = vecs
            done[rows] = True
            pend_rows.extend(rows)
            if len(pend_rows) >= CACHE_FLUSH_EVERY:
                flush()
            if bar is not None:
                n_seen += len(rows)  # decode failures are not counted; the bar is completed at the end
                bar.update(task, completed=min(n_seen, total))
        flush()
    except BaseException:
        try:  # interrupted (Ctrl-C, an error in a later batch): keep the vectors already computed
            flush()
        except Exception as e:  # pragma: no cover - the original error matters more
            log.warning("could not write the last embeddings to the cache: %s", e)
        raise
    finally:
        if bar is not None:
            bar.update(task, completed=total)
            bar.stop()
    return out
