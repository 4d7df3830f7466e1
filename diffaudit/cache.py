"""On-disk embedding cache: item key -> vector, per embedder, in content-addressed shard files.

Layout::

    <root>/<safe embedder name>-<sha256(name)[:8]>/<sha256 of the shard content>.npz

Each shard is an ``.npz`` with ``keys`` (str), ``vectors`` (float16 by default, or float32) and ``embedder`` (the full
name, checked on load). Shards are written to a unique temporary file in the same folder, fsync'ed, then renamed with
``os.replace``: a shard name only ever appears for a complete file, so a killed run leaves at most an ignored
``.tmp`` file and never a half shard that a later run trusts. Names are the hash of the content, so two processes
writing to one cache at once never collide (equal content -> equal name -> an idempotent rename). On load, every
shard's content is re-hashed; a corrupt one is ignored with a warning.

Item keys come from ``ImageSet.item_keys()`` (folder: path + size + mtime; arrays: pixel hash), so a changed or added
file gets a new key and is re-embedded, never served stale. The embedder's ``name`` includes its preprocessing.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["EmbeddingCache", "CacheWriter", "default_cache_root"]

_FORMAT = b"diffaudit-cache-v1"


def default_cache_root() -> Path:
    """$DIFFAUDIT_CACHE, else $XDG_CACHE_HOME/diffaudit, else ~/.cache/diffaudit."""
    env = os.environ.get("DIFFAUDIT_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "diffaudit"


def _content_hash(name: str, keys: np.ndarray, vectors: np.ndarray) -> str:
    h = hashlib.sha256(_FORMAT)
    h.update(b"\0" + name.encode("utf-8", "surrogatepass") + b"\0")
    h.update(f"{vectors.dtype.str}:{vectors.shape}".encode())
    h.update(json.dumps([str(k) for k in keys.tolist()]).encode("utf-8", "surrogatepass"))
    h.update(np.ascontiguousarray(vectors).data)
    return h.hexdigest()


class EmbeddingCache:
    """Cache of embedding vectors keyed by (embedder name, item key).

    Args:
        root: cache folder; default ``$DIFFAUDIT_CACHE`` or ``~/.cache/diffaudit``.
        store_dtype: "float16" (default, half the disk) or "float32". Vectors with values beyond float16's range are
            stored as float32 whatever this says.
    """

    def __init__(self, root: str | os.PathLike | None = None, *, store_dtype: str = "float16"):
        self.root = Path(root).expanduser() if root is not None else default_cache_root()
        if str(np.dtype(store_dtype)) not in ("float16", "float32"):
            raise ValueError(f"store_dtype must be 'float16' or 'float32', got {store_dtype!r}")
        self.store_dtype = np.dtype(store_dtype)
        # per embedder: {shard file name: (keys, vectors)} of shards already read by this object
        self._loaded: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}

    def __repr__(self) -> str:
        return f"<EmbeddingCache {self.root} store_dtype={self.store_dtype}>"

    # ------------------------------------------------------------------ paths

    @staticmethod
    def safe_name(embedder_name: str) -> str:
        """Folder name for an embedder: readable part + hash of the full name (no collisions, no path tricks)."""
        if not isinstance(embedder_name, str) or not embedder_name:
            raise ValueError(f"embedder_name must be a non-empty string, got {embedder_name!r}")
        readable = re.sub(r"[^A-Za-z0-9._+-]+", "_", embedder_name).strip("._")[:80] or "embedder"
        digest = hashlib.sha256(embedder_name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
        return f"{readable}-{digest}"

    def dir_for(self, embedder_name: str) -> Path:
        return self.root / self.safe_name(embedder_name)

    def check_writable(self, embedder_name: str | None = None) -> Path:
        """Create the cache folder and write + remove a probe file; a clear OSError now beats one hours later."""
        d = self.dir_for(embedder_name) if embedder_name else self.root
        try:
            d.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".probe-", suffix=".tmp", dir=d)
            os.close(fd)
            os.unlink(tmp)
        except OSError as e:
            raise type(e)(
                e.errno, f"embedding cache folder {str(d)!r} is not writable ({e.strerror or e}); pass another "
                f"cache_dir or set DIFFAUDIT_CACHE"
            ) from e
        return d

    def shards(self, embedder_name: str) -> list[Path]:
        """Complete shard files of an embedder (temporary files excluded), sorted by name."""
        d = self.dir_for(embedder_name)
        try:
            names = os.listdir(d)
        except (FileNotFoundError, NotADirectoryError):  # no cache yet (check_writable reports unusable paths)
            return []
        return sorted(d / n for n in names if n.endswith(".npz") and not n.startswith("."))

    # ------------------------------------------------------------------ write

    def store(self, embedder_name: str, keys: Sequence[str], vectors: np.ndarray) -> Path | None:
        """Write one shard atomically; returns its path (None when ``keys`` is empty)."""
        keys_arr = np.asarray([str(k) for k in keys], dtype=str)
        vec = np.asarray(vectors)
        if vec.ndim != 2 or vec.shape[0] != len(keys_arr):
            raise ValueError(
                f"store: vectors must have shape (len(keys), dim) = ({len(keys_arr)}, dim), got {vec.shape}"
            )
        if len(keys_arr) == 0:
            return None
        if not np.issubdtype(vec.dtype, np.floating) and not np.issubdtype(vec.dtype, np.integer):
            raise ValueError(f"store: vectors must be numeric, got dtype {vec.dtype}")
        if len(set(keys_arr.tolist())) != len(keys_arr):
            raise ValueError("store: keys contain duplicates")
        dtype = self.store_dtype
        if vec.dtype == dtype:
            out = np.ascontiguousarray(vec)
        else:
            vec32 = vec.astype(np.float32, copy=False)
            with np.errstate(over="ignore"):  # overflow is detected just below
                out = np.ascontiguousarray(vec32.astype(dtype))
            if dtype == np.float16 and np.isinf(out).any() and np.any(np.isinf(out) & np.isfinite(vec32)):
                out = np.ascontiguousarray(vec32)  # float16 would turn these into inf: keep this shard float32
        digest = _content_hash(embedder_name, keys_arr, out)
        d = self.dir_for(embedder_name)
        d.mkdir(parents=True, exist_ok=True)
        final = d / f"{digest}.npz"
        if final.exists():
            return final
        fd, tmp = tempfile.mkstemp(prefix=f".{digest[:16]}-", suffix=".npz.tmp", dir=d)
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, keys=keys_arr, vectors=out, embedder=np.asarray(embedder_name))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, final)
        except BaseException as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if isinstance(e, OSError):
                raise type(e)(e.errno, f"cannot write embedding cache shard in {str(d)!r}: {e.strerror or e}") from e
            raise
        with contextlib.suppress(OSError):  # make the rename durable too
            dfd = os.open(d, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        self._loaded.setdefault(embedder_name, {})[final.name] = (keys_arr, out)
        return final

    def writer(self, embedder_name: str, *, flush_every: int = 4096) -> "CacheWriter":
        """A buffered writer: ``add(keys, vectors)``; a shard is written every ``flush_every`` rows and at close."""
        return CacheWriter(self, embedder_name, flush_every=flush_every)

    # ------------------------------------------------------------------ read

    def _read_shard(self, embedder_name: str, path: Path) -> tuple[np.ndarray, np.ndarray] | None:
        try:
            with np.load(path, allow_pickle=False) as z:
                keys = z["keys"]
                vec = z["vectors"]
                name = str(z["embedder"][()])
        except FileNotFoundError:
            raise
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            log.warning("ignoring unreadable embedding cache shard %s: %s", path, e)
            return None
        expect = path.name[: -len(".npz")]
        if (
            name != embedder_name
            or keys.ndim != 1
            or vec.ndim != 2
            or vec.shape[0] != keys.shape[0]
            or vec.dtype not in (np.float16, np.float32)
            or _content_hash(name, keys, vec) != expect
        ):
            log.warning("ignoring corrupt embedding cache shard %s (content does not match its name)", path)
            return None
        return keys, vec

    def _refresh(self, embedder_name: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        loaded = self._loaded.setdefault(embedder_name, {})
        for _attempt in range(3):
            present = {p.name: p for p in self.shards(embedder_name)}
            for gone in set(loaded) - set(present):
                del loaded[gone]
            vanished = False
            for name, p in present.items():
                if name in loaded:
                    continue
                try:
                    got = self._read_shard(embedder_name, p)
                except FileNotFoundError:  # compacted away meanwhile: list again
                    vanished = True
                    continue
                if got is not None:
                    loaded[name] = got
            if not vanished:
                break
        return loaded

    def lookup(
        self, embedder_name: str, keys: Sequence[str], dim: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Cached vectors for ``keys``.

        Returns ``(found, vectors)``: a bool mask of len(keys) and float32 vectors of shape (found.sum(), dim), in the
        order of the found keys. Shards whose dim differs from ``dim`` (or from the majority) are ignored.
        """
        keys = [str(k) for k in keys]
        found = np.zeros(len(keys), dtype=bool)
        shards = self._refresh(embedder_name)
        if not shards or not keys:
            return found, np.zeros((0, dim or 0), dtype=np.float32)
        if dim is None:
            counts: dict[int, int] = {}
            for k, v in shards.values():
                counts[v.shape[1]] = counts.get(v.shape[1], 0) + len(k)
            dim = max(counts, key=lambda d: (counts[d], d))
            if len(counts) > 1:
                log.warning("embedding cache for %r holds vectors of dims %s; using dim %d",
                            embedder_name, sorted(counts), dim)
        wanted: dict[str, list[int]] = {}  # a key may stand at several positions (byte-identical files)
        for i, k in enumerate(keys):
            wanted.setdefault(k, []).append(i)
        src: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (shard vectors, shard rows, output positions)
        for skeys, svec in shards.values():
            if svec.shape[1] != dim:
                continue
            rows, outs = [], []
            for r, k in enumerate(skeys.tolist()):
                for j in wanted.get(k, ()):
                    if not found[j]:
                        found[j] = True
                        rows.append(r)
                        outs.append(j)
            if rows:
                src.append((svec, np.asarray(rows), np.asarray(outs)))
        pos = np.cumsum(found) - 1  # key position -> row among the found keys
        full = np.empty((int(found.sum()), dim), dtype=np.float32)
        for svec, rows, outs in src:
            full[pos[outs]] = svec[rows]
        return found, full

    def count(self, embedder_name: str) -> int:
        """Number of distinct cached keys for an embedder."""
        keys: set[str] = set()
        for k, _ in self._refresh(embedder_name).values():
            keys.update(k.tolist())
        return len(keys)

    # ------------------------------------------------------------------ maintenance

    def compact(self, embedder_name: str, *, tmp_age_s: float = 3600.0) -> int:
        """Merge all shards of an embedder into one (written atomically before the old ones are removed).

        Also removes temporary files older than ``tmp_age_s`` (left by killed writers). Returns the number of keys.
        Safe alongside readers and writers: only shards that were read and merged are deleted.
        """
        d = self.dir_for(embedder_name)
        now = time.time()
        with contextlib.suppress(FileNotFoundError):
            for n in os.listdir(d):
                if n.startswith(".") and n.endswith(".tmp"):
                    with contextlib.suppress(OSError):
                        if now - os.stat(d / n).st_mtime > tmp_age_s:
                            os.unlink(d / n)
        shards = dict(self._refresh(embedder_name))
        if len(shards) <= 1:
            return sum(len(k) for k, _ in shards.values())
        by_dim: dict[int, list[str]] = {}
        for name, (_, v) in shards.items():
            by_dim.setdefault(v.shape[1], []).append(name)
        total = 0
        for names in by_dim.values():
            if len(names) < 2:
                total += len(shards[names[0]][0])
                continue
            seen: dict[str, tuple[str, int]] = {}
            for name in sorted(names):
                for r, k in enumerate(shards[name][0].tolist()):
                    seen.setdefault(k, (name, r))
            keys = sorted(seen)
            any32 = any(shards[n][1].dtype == np.float32 for n in names)
            vec = np.stack([shards[seen[k][0]][1][seen[k][1]] for k in keys]).astype(
                np.float32 if any32 else np.float16
            )
            saved, self.store_dtype = self.store_dtype, vec.dtype
            try:
                merged = self.store(embedder_name, keys, vec)
            finally:
                self.store_dtype = saved
            for name in names:
                if merged is not None and name != merged.name:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(d / name)
                    self._loaded.get(embedder_name, {}).pop(name, None)
            total += len(keys)
        return total

    def clear(self, embedder_name: str) -> None:
        """Remove every shard of an embedder."""
        for p in self.shards(embedder_name):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        self._loaded.pop(embedder_name, None)


class CacheWriter:
    """Buffered shard writer (use as a context manager). Finished work survives a killed run up to the last flush."""

    def __init__(self, cache: EmbeddingCache, embedder_name: str, *, flush_every: int = 4096):
        if flush_every < 1:
            raise ValueError(f"flush_every must be >= 1, got {flush_every!r}")
        self.cache = cache
        self.embedder_name = embedder_name
        self.flush_every = int(flush_every)
        self._keys: list[str] = []
        self._vecs: list[np.ndarray] = []
        self.shards_written: list[Path] = []

    def add(self, keys: Sequence[str], vectors: np.ndarray) -> None:
        vec = np.asarray(vectors)
        if vec.ndim != 2 or vec.shape[0] != len(keys):
            raise ValueError(f"add: vectors must have shape (len(keys), dim) = ({len(keys)}, dim), got {vec.shape}")
        if len(keys) == 0:
            return
        self._keys.extend(str(k) for k in keys)
        self._vecs.append(vec.astype(np.float32, copy=True))
        if len(self._keys) >= self.flush_every:
            self.flush()

    def flush(self) -> Path | None:
        if not self._keys:
            return None
        keys, vecs = self._keys, np.concatenate(self._vecs)
        # later duplicates win within one buffer
        uniq: dict[str, int] = {}
        for i, k in enumerate(keys):
            uniq[k] = i
        if len(uniq) != len(keys):
            idx = sorted(uniq.values())
            keys, vecs = [keys[i] for i in idx], vecs[idx]
        p = self.cache.store(self.embedder_name, keys, vecs)
        self._keys, self._vecs = [], []
        if p is not None:
            self.shards_written.append(p)
        return p

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # keep finished work even when the run fails (KeyboardInterrupt included)
        self.flush()

