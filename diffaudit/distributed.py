"""Distributed embedding on Ray Data (extra ``diffaudit[ray]``).

:func:`embed_ray` embeds an :class:`~diffaudit.data.ImageSet` on a Ray cluster and writes **sharded embeddings**:
``shard-000000000.npy`` (float16 vectors, ImageSet order) + ``shard-000000000.json`` (ids, embedder, metric, decode
failures) per block of ``shard_size`` images, each written atomically (temporary file + ``os.replace``; the ``.json``
is written last and marks a complete shard), plus ``manifest.json``. :func:`load_shards` returns them as one
:class:`~diffaudit.embedders.base.Embeddings` in ImageSet order, and ``EmbeddingIndex.from_shards(paths)`` indexes
them as one (ids included); :func:`diffaudit.index.search_shards` merges the top-k of per-shard indexes.

How it runs (Ray Data): a dataset of ImageSet positions (``ray.data.from_numpy``, split in blocks) goes through
``map_batches`` with a **stateful callable class** on a fixed-size actor pool (one actor per worker, each building its
embedder -- the model -- once, requesting ``num_gpus_per_worker`` GPUs when the cluster has GPUs). Actors decode the
images themselves: the ImageSet travels as its picklable parts (ids, per-item handles such as file paths, the
decoding backend), put once in the object store, so a folder must be readable at the same path on every node (a shared
file system) -- or use an array / Hugging Face ImageSet. Actors return float16 vectors (as bytes) and per-image decode
failures; the driver streams the results and writes the shards, so no shared file system is needed for the output.
A finished shard is kept: re-running with the same ``out_dir`` only embeds the shards that are missing (or whose images
changed).

``diffaudit.embedders.embed(images, embedder, backend="ray")`` uses the same machinery (:func:`embed_missing_ray`) and
stores the vectors in the embedding cache like the local backend, so ``find_duplicates(..., backend="ray")``,
``match(..., backend="ray")`` and ``diffaudit dedup --backend ray`` run on Ray unchanged.

Cluster: ``address`` argument, else the ``RAY_ADDRESS`` environment variable (``ray://host:10001`` for Ray Client,
``auto`` / ``host:6379`` on a cluster node), else a local Ray instance with ``num_cpus`` CPUs (default: all cores). If
Ray is already initialised in this process, that connection is used as is.

Embedders reach the actors as a recipe: a spec string (``"pixel"``, ``"sscd"`` + ``embedder_kwargs`` such as
``weights=`` -- a path that must exist on every node) is rebuilt in each actor (on its GPU when it has one), a
zero-argument factory is called in each actor, and an :class:`~diffaudit.embedders.base.Embedder` instance is pickled
(SSCD instances, whose TorchScript model cannot be pickled, are rebuilt from their weights path). The data-dependent
choice made by ``prepare`` on the driver (the pixel / tiled size) is copied to the actors, and every actor checks that
its embedder has the driver's ``name`` (same preprocessing, same weights) before it embeds anything.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from .results import Skipped

log = logging.getLogger(__name__)

__all__ = ["embed_ray", "load_shards", "shard_paths", "ray_batches", "init_ray"]

_SHARD_FORMAT = "diffaudit-shard"
_SHARD_VERSION = 1
_INSTALL_HINT = 'the Ray backend needs Ray Data: pip install "diffaudit[ray]"'
#: default images per shard file
DEFAULT_SHARD_SIZE = 8192


# ---------------------------------------------------------------------------------------------------- Ray session
def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(_INSTALL_HINT) from e
    return ray


def init_ray(address: str | None = None, *, num_cpus: int | None = None, runtime_env: dict | None = None) -> bool:
    """Connect to Ray unless already connected. Returns True when this call started the connection.

    ``address``: a Ray address (``"auto"``, ``"host:6379"``, ``"ray://host:10001"``); default ``$RAY_ADDRESS``; when
    neither is set, a local instance with ``num_cpus`` CPUs (default: all cores) is started.
    """
    ray = _import_ray()
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    kw: dict[str, Any] = {"include_dashboard": False, "configure_logging": False, "log_to_driver": False}
    if runtime_env:
        kw["runtime_env"] = runtime_env
    if address:
        log.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address, **kw)
    else:
        n = int(num_cpus) if num_cpus else (os.cpu_count() or 1)
        log.info("starting a local Ray instance with %d CPUs", n)
        ray.init(num_cpus=n, **kw)
    return True


def _cluster_resources() -> dict:
    ray = _import_ray()
    try:
        return dict(ray.cluster_resources())
    except Exception:  # pragma: no cover - a cluster that cannot report its resources
        return {}


def _quiet_data_context(progress: bool):
    import ray.data

    ctx = ray.data.DataContext.get_current()
    for attr, val in (("enable_progress_bars", bool(progress)), ("print_on_execution_start", False),
                      ("enable_auto_log_stats", False)):
        if hasattr(ctx, attr):
            setattr(ctx, attr, val)
    return ctx


# ---------------------------------------------------------------------------------------------------- picklable parts
class _RemoteImages:
    """The picklable parts of an ImageSet (ids, per-item handles, decoding backend); rebuilt as an ImageSet in actors."""

    def __init__(self, images):
        if not hasattr(images, "remote_parts"):
            raise TypeError(f"images={type(images).__name__}: expected a diffaudit ImageSet")
        self.ids, self.handles, self.backend, self.source = images.remote_parts()

    def imageset(self):
        from .data import ImageSet

        return ImageSet(self.ids, self.handles, self.backend, source=self.source)


def _prepared_state(emb) -> dict:
    """Attributes that ``prepare`` decided on the driver and actors must reuse (the pixel / tiled size)."""
    if getattr(emb, "kind", None) in ("pixel", "tiled") and getattr(emb, "size", None) is not None:
        return {"size": tuple(emb.size)}
    return {}


def _recipe(embedder, emb_prepared, embedder_kwargs: dict | None) -> tuple:
    """How actors get their embedder: ("spec", spec, kwargs) | ("factory", fn) | ("pickle", bytes)."""
    from .embedders.base import Embedder

    kwargs = dict(embedder_kwargs or {})
    if isinstance(embedder, str):
        return ("spec", embedder, kwargs)
    if kwargs:
        raise ValueError(f"embedder_kwargs={sorted(kwargs)} can only be given with an embedder spec string; got "
                         f"embedder={embedder!r}")
    if isinstance(embedder, Embedder):
        from ray import cloudpickle

        try:
            return ("pickle", cloudpickle.dumps(embedder))
        except Exception as e:
            if getattr(embedder, "kind", None) == "sscd":  # TorchScript modules do not pickle: rebuild from weights
                return ("spec", "sscd", {"weights": str(embedder.weights), "resize": embedder.resize,
                                         "size": embedder.size, "batch_size": embedder.batch_size})
            raise TypeError(
                f"embedder={embedder!r} cannot be sent to Ray workers ({type(e).__name__}: {e}); pass a spec string "
                "with embedder_kwargs (e.g. embedder='clip:ViT-B-32', embedder_kwargs={'weights': '/shared/w.pt'}) "
                "or a zero-argument factory that builds the embedder") from None
    if callable(embedder):
        return ("factory", embedder)
    raise TypeError(f"embedder={embedder!r}: expected a spec string, an Embedder instance or a zero-argument factory")


def _build_from_recipe(recipe: tuple):
    from .embedders.registry import get_embedder
    from .embedders.base import Embedder

    kind = recipe[0]
    if kind == "spec":
        return get_embedder(recipe[1], **recipe[2])
    if kind == "factory":
        emb = recipe[1]()
        if not isinstance(emb, Embedder):
            raise TypeError(f"the embedder factory returned {type(emb).__name__}, not an Embedder")
        return emb
    from ray import cloudpickle

    return cloudpickle.loads(recipe[1])


def _driver_embedder(embedder, embedder_kwargs: dict | None):
    """The embedder on the driver (prepared there): the spec built locally, the factory called once, or the instance."""
    from .embedders.registry import get_embedder
    from .embedders.base import Embedder

    if isinstance(embedder, str):
        return get_embedder(embedder, **dict(embedder_kwargs or {}))
    if isinstance(embedder, Embedder):
        return embedder
    if callable(embedder):
        return _build_from_recipe(("factory", embedder))
    raise TypeError(f"embedder={embedder!r}: expected a spec string, an Embedder instance or a zero-argument factory")


class _EmbedActor:
    """Ray Data callable class: one embedder (model) per actor, built once; embeds batches of ImageSet positions."""

    def __init__(self, images_ref, recipe, expected_name: str, state: dict, batch_size: int,
                 decode_workers: int | None):
        import ray

        self.images = ray.get(images_ref[0]).imageset()
        self.emb = _build_from_recipe(recipe)
        for k, v in state.items():
            setattr(self.emb, k, v)
        self.emb.prepare(self.images)
        if self.emb.name != expected_name:
            raise RuntimeError(f"the Ray worker built embedder {self.emb.name!r} but the driver has {expected_name!r}; "
                               "the weights file or the preprocessing differ between the machines")
        self.batch_size = int(batch_size)
        self.decode_workers = decode_workers

    def __call__(self, batch: dict) -> dict:
        pos = np.asarray(batch["data"], dtype=np.int64).reshape(-1)
        id_pos = {self.images.ids[p]: int(p) for p in pos}
        n_before = len(self.images.skipped)
        vec_by_pos: dict[int, bytes] = {}
        for ids, arrays in self.images.iter_batches(self.batch_size, indices=pos.tolist(),
                                                    num_workers=self.decode_workers):
            if not ids:
                continue
            v = np.asarray(self.emb.embed_batch(arrays), dtype=np.float32)
            if v.ndim != 2 or v.shape[0] != len(ids):
                raise RuntimeError(f"{self.emb.name}: embed_batch returned shape {v.shape} for {len(ids)} images")
            v16 = v.astype(np.float16)
            if not np.isfinite(v16[np.isfinite(v)]).all():
                raise RuntimeError(f"{self.emb.name}: vectors exceed float16's range; the Ray backend stores float16")
            for i, row in zip(ids, v16):
                vec_by_pos[id_pos[i]] = row.tobytes()
        fails = {id_pos[s.id]: s.reason for s in self.images.skipped[n_before:] if s.id in id_pos}
        ok = np.array([int(p) in vec_by_pos for p in pos], dtype=bool)
        return {
            "pos": pos,
            "ok": ok,
            "vec": np.array([vec_by_pos.get(int(p), b"") for p in pos], dtype=object),
            "reason": np.array([fails.get(int(p), "" if int(p) in vec_by_pos else "not decoded") for p in pos],
                               dtype=object),
        }


def _blocks(positions: np.ndarray, batch_size: int, workers: int) -> list[np.ndarray]:
    """Split positions into dataset blocks: a few batches per block, at least ~4 blocks per worker when possible."""
    n = len(positions)
    per = batch_size * max(1, min(16, math.ceil(n / max(1, batch_size * workers * 4))))
    return [positions[s:s + per] for s in range(0, n, per)]


def _run(images, recipe, expected_name: str, state: dict, positions: np.ndarray, *, num_workers: int | None,
         batch_size: int, num_gpus_per_worker: float | None, num_cpus_per_worker: float, decode_workers: int | None,
         progress: bool) -> Iterator[tuple[np.ndarray, np.ndarray, list[bytes], list[str]]]:
    """Run the Ray Data pipeline over ``positions``; yield (positions, ok, vector bytes, reasons) as results arrive."""
    ray = _import_ray()
    import ray.data

    res = _cluster_resources()
    gpus = float(res.get("GPU", 0) or 0)
    if num_gpus_per_worker is None:
        num_gpus_per_worker = 1.0 if gpus > 0 else 0.0
    if num_gpus_per_worker < 0:
        raise ValueError(f"num_gpus_per_worker={num_gpus_per_worker!r}: must be >= 0 (or None: 1 when the cluster "
                         "has GPUs)")
    if num_workers is None:
        if num_gpus_per_worker > 0:
            num_workers = max(1, int(gpus // num_gpus_per_worker))
        else:
            num_workers = max(1, int(float(res.get("CPU", 1) or 1) // max(num_cpus_per_worker, 1e-9)))
    if int(num_workers) != num_workers or num_workers < 1:
        raise ValueError(f"num_workers={num_workers!r}: must be a positive integer or None")
    num_workers = int(min(num_workers, max(1, math.ceil(len(positions) / batch_size))))
    _quiet_data_context(progress)
    ref = ray.put(_RemoteImages(images))
    ds = ray.data.from_numpy(_blocks(positions, batch_size, num_workers))
    kw: dict[str, Any] = {}
    if hasattr(ray.data, "ActorPoolStrategy"):
        kw["compute"] = ray.data.ActorPoolStrategy(size=num_workers)
    else:  # pragma: no cover - older Ray
        kw["concurrency"] = num_workers
    if num_gpus_per_worker:
        kw["num_gpus"] = num_gpus_per_worker
    log.info("Ray: %d workers (%s CPU, %s GPU each), %d images in batches of %d", num_workers, num_cpus_per_worker,
             num_gpus_per_worker, len(positions), batch_size)
    out = ds.map_batches(
        _EmbedActor, batch_size=batch_size, batch_format="numpy", num_cpus=num_cpus_per_worker,
        fn_constructor_args=([ref], recipe, expected_name, state, batch_size, decode_workers), **kw)
    for b in out.iter_batches(batch_size=None, batch_format="numpy"):
        yield (np.asarray(b["pos"], dtype=np.int64), np.asarray(b["ok"], dtype=bool), list(b["vec"]),
               [str(r) for r in b["reason"]])


def _start(address, num_cpus, runtime_env, shutdown):
    started = init_ray(address, num_cpus=num_cpus, runtime_env=runtime_env)
    return started if shutdown is None else bool(shutdown)


# ---------------------------------------------------------------------------------------------------- shards
def _atomic_save_npy(path: Path, arr: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, arr)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _atomic_write_json(path: Path, obj) -> None:
    from ._serial import atomic_write_text

    atomic_write_text(path, json.dumps(obj))


def _keys_sha(keys: Sequence[str]) -> str:
    h = hashlib.sha256(b"diffaudit-shard-keys\0")
    for k in keys:
        h.update(str(k).encode() + b"\n")
    return h.hexdigest()


def _shard_stem(start: int) -> str:
    return f"shard-{start:09d}"


def _shard_done(out_dir: Path, start: int, name: str, ids: list[str], keys_sha: str) -> bool:
    meta_p = out_dir / f"{_shard_stem(start)}.json"
    npy_p = out_dir / f"{_shard_stem(start)}.npy"
    if not (meta_p.is_file() and npy_p.is_file()):
        return False
    try:
        meta = json.loads(meta_p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (meta.get("format") == _SHARD_FORMAT and meta.get("embedder") == name and meta.get("keys_sha") == keys_sha
            and meta.get("all_ids") == ids)


def embed_ray(
    images,
    embedder: Any = "pixel",
    *,
    out_dir: str | os.PathLike,
    embedder_kwargs: dict | None = None,
    address: str | None = None,
    num_workers: int | None = None,
    batch_size: int = 64,
    num_gpus_per_worker: float | None = None,
    num_cpus_per_worker: float = 1.0,
    shard_size: int = DEFAULT_SHARD_SIZE,
    decode_workers: int | None = None,
    num_cpus: int | None = None,
    runtime_env: dict | None = None,
    shutdown: bool | None = None,
    progress: bool = False,
) -> list[Path]:
    """Embed ``images`` on Ray; write float16 shards to ``out_dir``; return the shard ``.npy`` paths in ImageSet order.

    Args:
        images: an ImageSet (folder sets: the folder must be visible at the same path on every Ray node).
        embedder: a spec string (rebuilt in every actor, with ``embedder_kwargs``), a zero-argument factory, or an
            Embedder instance (pickled to the actors).
        out_dir: folder for ``shard-*.npy`` / ``shard-*.json`` / ``manifest.json``. Shards already there for the same
            embedder and unchanged images are kept, not recomputed.
        address: Ray address (default ``$RAY_ADDRESS``; neither: a local instance with ``num_cpus`` CPUs).
        num_workers: actors (default: one per GPU when the cluster has GPUs, else one per ``num_cpus_per_worker``
            CPUs of the cluster).
        batch_size: images per forward pass.
        num_gpus_per_worker: GPUs per actor (None: 1 when the cluster has GPUs, else 0).
        shard_size: images per shard file.
        decode_workers: decoding threads per actor (default: ImageSet's default).
        shutdown: disconnect from Ray at the end (default: only when this call connected).
        progress: Ray Data's progress bars.

    Images that fail to decode are left out of the shards and recorded in the shard files, ``manifest.json`` and
    ``images.skipped``. Use :func:`load_shards` or ``EmbeddingIndex.from_shards(paths)`` to read the result.
    """
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: must be a positive integer")
    if int(shard_size) != shard_size or shard_size < 1:
        raise ValueError(f"shard_size={shard_size!r}: must be a positive integer")
    if not (num_cpus_per_worker > 0):
        raise ValueError(f"num_cpus_per_worker={num_cpus_per_worker!r}: must be > 0")
    _import_ray()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    emb = _driver_embedder(embedder, embedder_kwargs)
    emb.prepare(images)
    name, metric = emb.name, emb.metric
    recipe = _recipe(embedder, emb, embedder_kwargs)
    n = len(images)
    ids = list(images.ids)
    keys = list(images.item_keys())
    starts = list(range(0, n, int(shard_size)))
    todo: list[int] = []
    for s in starts:
        e = min(n, s + shard_size)
        if not _shard_done(out, s, name, ids[s:e], _keys_sha(keys[s:e])):
            todo.append(s)
    if len(todo) < len(starts):
        log.info("embed_ray: %d of %d shards already in %s", len(starts) - len(todo), len(starts), out)

    dim: int | None = None
    for s in starts:
        if s not in todo:
            dim = dim or int(np.load(out / f"{_shard_stem(s)}.npy", mmap_mode="r").shape[1]) or None
    if todo:
        positions = np.concatenate([np.arange(s, min(n, s + shard_size)) for s in todo]).astype(np.int64)
        should_shutdown = _start(address, num_cpus, runtime_env, shutdown)
        try:
            pending: dict[int, dict] = {}  # shard start -> {"vec": {pos: bytes}, "fail": {pos: reason}}
            empty: list[int] = []
            for pos, ok, vecs, reasons in _run(images, recipe, name, _prepared_state(emb), positions,
                                               num_workers=num_workers, batch_size=int(batch_size),
                                               num_gpus_per_worker=num_gpus_per_worker,
                                               num_cpus_per_worker=num_cpus_per_worker,
                                               decode_workers=decode_workers, progress=progress):
                for p, good, vb, why in zip(pos.tolist(), ok.tolist(), vecs, reasons):
                    s = (p // shard_size) * shard_size
                    slot = pending.setdefault(s, {"vec": {}, "fail": {}})
                    if good:
                        slot["vec"][p] = vb
                    else:
                        slot["fail"][p] = why
                        images.record_skip(ids[p], why)
                    e = min(n, s + shard_size)
                    if len(slot["vec"]) + len(slot["fail"]) == e - s:
                        got = _write_shard(out, s, e, pending.pop(s), ids, keys, name, metric, dim)
                        if got is None:
                            empty.append(s)
                        else:
                            dim = got
            if pending:  # pragma: no cover - every position comes back once
                raise RuntimeError(f"embed_ray: Ray returned incomplete shards {sorted(pending)}")
            for s in empty:  # every image of the shard failed: write it once the dimension is known
                _write_shard(out, s, min(n, s + shard_size), {"vec": {}, "fail": _read_fails(out, s)}, ids, keys,
                             name, metric, dim or 0, force=True)
        finally:
            if should_shutdown:
                _import_ray().shutdown()
    paths = [out / f"{_shard_stem(s)}.npy" for s in starts]
    for s in starts:  # decode failures of shards kept from an earlier run count as skipped too
        if s not in todo:
            for sid, why in json.loads((out / f"{_shard_stem(s)}.json").read_text(encoding="utf-8"))["skipped"]:
                images.record_skip(sid, why)
    skipped = [[s.id, s.reason] for s in Skipped.unique(getattr(images, "skipped", []), "")]
    _atomic_write_json(out / "manifest.json", {
        "format": "diffaudit-shards", "version": _SHARD_VERSION, "embedder": name, "metric": metric, "dim": dim,
        "num_images": n, "source": str(getattr(images, "source", "")), "shards": [p.name for p in paths],
        "skipped": skipped})
    return paths


def _read_fails(out: Path, s: int) -> dict:
    p = out / f".{_shard_stem(s)}.fails.json"
    if not p.is_file():
        return {}
    d = json.loads(p.read_text(encoding="utf-8"))
    p.unlink()
    return {int(k): v for k, v in d.items()}


def _write_shard(out: Path, s: int, e: int, slot: dict, ids, keys, name, metric, dim, force: bool = False):
    """Write shard [s, e) (vectors in ImageSet order); returns its dim, or None when it has no vector and no dim yet."""
    rows = sorted(slot["vec"])
    if rows:
        mat = np.stack([np.frombuffer(slot["vec"][p], dtype=np.float16) for p in rows])
    elif dim or force:
        mat = np.zeros((0, int(dim or 0)), np.float16)
    else:  # all failed and the dimension is unknown yet: remember the failures, write later
        _atomic_write_json(out / f".{_shard_stem(s)}.fails.json", {str(k): v for k, v in slot["fail"].items()})
        return None
    _atomic_save_npy(out / f"{_shard_stem(s)}.npy", mat)
    _atomic_write_json(out / f"{_shard_stem(s)}.json", {
        "format": _SHARD_FORMAT, "version": _SHARD_VERSION, "embedder": name, "metric": metric, "dim": int(mat.shape[1]),
        "start": s, "stop": e, "ids": [ids[p] for p in rows], "all_ids": list(ids[s:e]),
        "keys_sha": _keys_sha(keys[s:e]), "skipped": [[ids[p], slot["fail"][p]] for p in sorted(slot["fail"])],
        "written": time.time()})
    return int(mat.shape[1])


def shard_paths(out_dir: str | os.PathLike) -> list[Path]:
    """The shard ``.npy`` files of ``out_dir`` in ImageSet order (from ``manifest.json`` when present)."""
    out = Path(out_dir)
    man = out / "manifest.json"
    if man.is_file():
        return [out / s for s in json.loads(man.read_text(encoding="utf-8"))["shards"]]
    paths = sorted(p for p in out.glob("shard-*.npy") if (p.with_suffix(".json")).is_file())
    if not paths:
        raise FileNotFoundError(f"out_dir={str(out)!r}: no embedding shards (shard-*.npy + .json) found")
    return paths


def load_shards(paths_or_dir, *, dtype=np.float32):
    """Read shards written by :func:`embed_ray` as one :class:`Embeddings` in ImageSet order.

    ``paths_or_dir``: the folder (``out_dir``) or the list of shard ``.npy`` paths :func:`embed_ray` returned.
    Vectors come back as ``dtype`` (float32 by default; float16 halves the memory). ``skipped`` lists the images that
    failed to decode (and, when reading a folder, those refused when the ImageSet was scanned).
    """
    from .embedders.base import Embeddings

    skipped: list[tuple[str, str]] = []
    if isinstance(paths_or_dir, (str, os.PathLike)) and Path(paths_or_dir).is_dir():
        out = Path(paths_or_dir)
        paths = shard_paths(out)
        man = out / "manifest.json"
        if man.is_file():
            skipped = [tuple(x) for x in json.loads(man.read_text(encoding="utf-8")).get("skipped", [])]
    else:
        paths = [Path(p) for p in paths_or_dir]
    if not paths:
        raise ValueError("load_shards: no shard paths given")
    metas = []
    for p in paths:
        mp = p.with_suffix(".json")
        if not mp.is_file():
            raise FileNotFoundError(f"load_shards: {str(p)!r} has no {mp.name} (an incomplete shard?)")
        m = json.loads(mp.read_text(encoding="utf-8"))
        if m.get("format") != _SHARD_FORMAT:
            raise ValueError(f"load_shards: {str(mp)!r} is not a diffaudit shard (format {m.get('format')!r})")
        metas.append((m, p))
    metas.sort(key=lambda mp: mp[0]["start"])
    names = {m["embedder"] for m, _ in metas}
    if len(names) != 1:
        raise ValueError(f"load_shards: shards come from different embedders {sorted(names)}")
    dims = {m["dim"] for m, _ in metas if len(m["ids"])}
    if len(dims) > 1:
        raise ValueError(f"load_shards: shards have different dimensions {sorted(dims)}")
    dim = dims.pop() if dims else 0
    total = sum(len(m["ids"]) for m, _ in metas)
    vectors = np.empty((total, dim), dtype=dtype)
    ids: list[str] = []
    r = 0
    seen = {s for s, _ in skipped}
    for m, p in metas:
        v = np.load(p, mmap_mode="r")
        if v.shape != (len(m["ids"]), dim) and len(m["ids"]):
            raise ValueError(f"load_shards: {str(p)!r} has shape {v.shape}, its .json lists {len(m['ids'])} ids")
        vectors[r:r + len(v)] = v
        r += len(v)
        ids.extend(m["ids"])
        for sid, why in m.get("skipped", []):
            if sid not in seen:
                seen.add(sid)
                skipped.append((sid, why))
    first = metas[0][0]
    return Embeddings(ids=ids, vectors=vectors, embedder=first["embedder"], metric=first["metric"],
                      skipped=[Skipped(str(a), str(b)) for a, b in skipped])


# ---------------------------------------------------------------------------------------------------- embed() backend
def ray_batches(images, emb, embedder_arg, missing: np.ndarray, bs: int, progress: bool, options: dict | None = None):
    """The Ray backend of :func:`diffaudit.embedders.embed` (``backend="ray"``): yields ``(rows, vectors)`` for the
    ``missing`` positions as Ray actors finish them (float16-rounded vectors, upcast); decode failures are recorded
    on the ImageSet. ``embed`` writes the vectors to the result and to the cache.

    ``options`` (``embed(..., backend_options=...)``): ``address``, ``num_workers``, ``num_gpus_per_worker``,
    ``num_cpus_per_worker``, ``decode_workers``, ``num_cpus``, ``runtime_env``, ``shutdown``, ``embedder_kwargs``.
    """
    opts = dict(options or {})
    allowed = {"address", "num_workers", "num_gpus_per_worker", "num_cpus_per_worker", "decode_workers", "num_cpus",
               "runtime_env", "shutdown", "embedder_kwargs"}
    bad = sorted(set(opts) - allowed)
    if bad:
        raise ValueError(f"backend_options: unknown keys {bad}; allowed: {sorted(allowed)}")
    _import_ray()
    ids = list(images.ids)
    ek = opts.pop("embedder_kwargs", None)
    recipe = _recipe(embedder_arg if isinstance(embedder_arg, str) or ek else emb, emb, ek)
    should_shutdown = _start(opts.pop("address", None), opts.pop("num_cpus", None), opts.pop("runtime_env", None),
                             opts.pop("shutdown", None))
    try:
        for pos, ok, vecs, reasons in _run(images, recipe, emb.name, _prepared_state(emb),
                                           np.asarray(missing, np.int64), num_workers=opts.get("num_workers"),
                                           batch_size=bs, num_gpus_per_worker=opts.get("num_gpus_per_worker"),
                                           num_cpus_per_worker=float(opts.get("num_cpus_per_worker", 1.0)),
                                           decode_workers=opts.get("decode_workers"), progress=progress):
            rows, got = [], []
            for p, good, vb, why in zip(pos.tolist(), ok.tolist(), vecs, reasons):
                if good:
                    rows.append(p)
                    got.append(np.frombuffer(vb, dtype=np.float16).astype(np.float32))
                else:
                    images.record_skip(ids[p], why)
            if rows:
                yield rows, np.stack(got)
    finally:
        if should_shutdown:
            _import_ray().shutdown()
