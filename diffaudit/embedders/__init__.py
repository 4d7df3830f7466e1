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

Keyword arguments are passed to the embedder's constructor. :func:`register_embedder` adds a prefix.
"""
from __future__ import annotations

import logging
from typing import Callable

import numpy as np

from .base import Embedder, Embeddings, Metric, default_device

log = logging.getLogger(__name__)

__all__ = [
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

#: images embedded between two cache writes (a killed run keeps everything up to the last write)
CACHE_FLUSH_EVERY = 2048

Factory = Callable[..., Embedder]
_REGISTRY: dict[str, Factory] = {}


def register_embedder(prefix: str, factory: Factory, *, overwrite: bool = False) -> None:
    """Register ``factory(arg, **kw) -> Embedder`` for specs ``"prefix"`` (arg None) and ``"prefix:arg"``."""
    if not isinstance(prefix, str) or not prefix or ":" in prefix:
        raise ValueError(f"prefix={prefix!r}: expected a non-empty string without ':'")
    if not callable(factory):
        raise TypeError(f"factory={factory!r}: expected a callable factory(arg, **kw) -> Embedder")
    key = prefix.lower()
    if key in _REGISTRY and not overwrite:
        raise ValueError(f"prefix={prefix!r}: already registered (pass overwrite=True to replace it)")
    _REGISTRY[key] = factory


def registered_embedders() -> list[str]:
    return sorted(_REGISTRY)


def get_embedder(spec: str | Embedder = "pixel", **kw) -> Embedder:
    """An :class:`Embedder` from a spec string (see module docstring) or an Embedder instance (returned as is)."""
    if isinstance(spec, Embedder):
        if kw:
            raise ValueError(f"get_embedder: keyword arguments {sorted(kw)} given with an Embedder instance {spec!r}")
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise TypeError(
            f"embedder={spec!r}: expected a spec string ({', '.join(registered_embedders())}) or an Embedder instance"
        )
    prefix, _, arg = spec.strip().partition(":")
    factory = _REGISTRY.get(prefix.lower())
    if factory is None:
        raise ValueError(
            f"embedder={spec!r}: unknown embedder; known prefixes: {', '.join(registered_embedders())} "
            "(e.g. 'pixel', 'pixel:32', 'tiled', 'clip:ViT-B-32', 'sscd')"
        )
    return factory(arg or None, **kw)


# -- built-in factories (lazy imports keep `import diffaudit.embedders` cheap) ---------------------------------------
def _pixel(arg, **kw):
    from .pixel import PixelEmbedder

    if arg is not None:
        if "size" in kw:
            raise ValueError(f"pixel:{arg} and size={kw['size']!r}: give the size once")
        kw["size"] = arg
    return PixelEmbedder(**kw)


def _tiled(arg, **kw):
    from .tiled import TiledEmbedder

    if arg is not None:
        if "grid" in kw:
            raise ValueError(f"tiled:{arg} and grid={kw['grid']!r}: give the grid once")
        try:
            kw["grid"] = int(arg)
        except ValueError:
            raise ValueError(f"embedder='tiled:{arg}': expected 'tiled:<grid>' with an int grid, e.g. 'tiled:4'") from None
    return TiledEmbedder(**kw)


def _clip(arg, **kw):
    from .clip import CLIPEmbedder

    if arg is None:
        arg = kw.pop("arch", None)
    if not arg:
        raise ValueError("embedder='clip': name the open_clip architecture, e.g. 'clip:ViT-B-32' (with weights=<file>)")
    return CLIPEmbedder(arg, **kw)


def _sscd(arg, **kw):
    from .sscd import SSCDEmbedder

    if arg is not None:
        if arg.isdigit():
            kw.setdefault("size", int(arg))
        elif arg in ("small_edge", "square"):
            kw.setdefault("resize", arg)
        else:
            raise ValueError(f"embedder='sscd:{arg}': expected 'sscd', 'sscd:<size>' or 'sscd:square'")
    return SSCDEmbedder(**kw)


register_embedder("pixel", _pixel)
register_embedder("tiled", _tiled)
register_embedder("clip", _clip)
register_embedder("sscd", _sscd)


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


# -- embed ------------------------------------------------------------------------------------------------------------
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
    if len(missing) and backend == "ray":
        from ..distributed import embed_missing_ray

        out = embed_missing_ray(images, emb, embedder, ids, missing, out, done, store, keys, name, bs, progress,
                                backend_options, flush_every=CACHE_FLUSH_EVERY)
    elif len(missing):
        out = _embed_missing(images, emb, ids, missing, out, done, store, keys, name, bs, progress)

    keep = np.flatnonzero(done)
    skipped = _skipped_pairs(images)
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
    return vecs.astype(dt).astype(np.float32)


def _overflows(vecs: np.ndarray, dt) -> bool:
    """Whether finite values of ``vecs`` become inf in dtype ``dt``."""
    if np.dtype(vecs.dtype).itemsize <= np.dtype(dt).itemsize or vecs.size == 0:
        return False
    if max(float(vecs.max()), -float(vecs.min())) <= float(np.finfo(dt).max):  # fast path (NaN falls through)
        return False
    with np.errstate(over="ignore"):
        low = vecs.astype(dt)
    return bool(np.isinf(low).any() and np.any(np.isinf(low) & np.isfinite(vecs)))


def _skipped_pairs(images) -> list[tuple[str, str]]:
    seen: set[str] = set()
    pairs = []
    for s in getattr(images, "skipped", []) or []:
        sid, reason = (s.id, s.reason) if hasattr(s, "id") else (s[0], s[1])
        if sid not in seen:
            seen.add(sid)
            pairs.append((str(sid), str(reason)))
    return pairs


def _embed_missing(images, emb, ids, missing, out, done, store, keys, name, bs, progress):
    index_of = {s: i for i, s in enumerate(ids)}
    pend_rows: list[int] = []

    def flush() -> None:
        if store is None or not pend_rows:
            return
        rows = np.asarray(pend_rows)
        rows = rows[np.sort(np.unique([keys[i] for i in rows], return_index=True)[1])]  # identical images share a key
        store.store(name, [keys[i] for i in rows], out[rows])
        pend_rows.clear()

    bar = None
    if progress:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(
            TextColumn("[bold]embedding[/] {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            transient=False,
        )
        bar.start()
        task = bar.add_task(name, total=len(missing))
    try:
        n_seen = 0
        for batch_ids, arrays in images.iter_batches(bs, indices=[int(i) for i in missing]):
            rows = [index_of[b] for b in batch_ids]
            if rows:
                vecs = np.asarray(emb.embed_batch(arrays), dtype=np.float32)
                if vecs.ndim != 2 or vecs.shape[0] != len(rows):
                    raise RuntimeError(
                        f"{name}: embed_batch returned shape {vecs.shape} for {len(rows)} images"
                    )
                if store is not None:
                    vecs = _at_cache_precision(vecs, store)
                if out is None:
                    out = np.zeros((len(ids), vecs.shape[1]), np.float32)
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
                bar.update(task, completed=min(n_seen, len(missing)))
        flush()
    except BaseException:
        try:  # interrupted (Ctrl-C, an error in a later batch): keep the vectors already computed
            flush()
        except Exception as e:  # pragma: no cover - the original error matters more
            log.warning("could not write the last embeddings to the cache: %s", e)
        raise
    finally:
        if bar is not None:
            bar.update(task, completed=len(missing))
            bar.stop()
    return out
