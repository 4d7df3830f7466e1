"""ImageSet: a stable, lazily decoded collection of RGB images (folders, numpy arrays, Hugging Face datasets).

Every image gets a stable string id (folder: POSIX path relative to the folder; arrays / datasets: the given id or the
zero-padded position, "000123"). Files are checked at scan time from their headers only; an image whose header
claims more than ``max_pixels`` pixels is refused without decoding (decompression bombs are never decoded). Files that
cannot be used are listed in ``ImageSet.skipped`` with a reason, never raised: zero-byte, not an image, unreadable,
symlink loops, too many pixels, and (found later, while decoding) truncated or corrupt data.

Decoded images are always ``uint8`` HWC RGB arrays, converted predictably:

* EXIF orientation is applied (``ImageOps.exif_transpose``);
* grayscale (``1``, ``L``) is replicated to three channels;
* palette images are expanded; palette / colour-key transparency and alpha (``LA``, ``RGBA``, ``PA``) are composited
  on a white background;
* 16-bit images (``I;16``, ``I``) are scaled to 8 bits (``round(v / 257)``: 65535 -> 255), not clipped;
* CMYK, YCbCr, LAB, HSV go through Pillow's conversion to RGB;
* animated GIF / WebP / PNG: the first frame.

Decoding is parallel (a thread pool; Pillow releases the GIL) and streamed: ``iter_batches`` keeps at most about one
batch of decodes in flight ahead of the batch being consumed, so a 100k-image folder is never held in memory.

Only safe formats are opened (PNG, JPEG/MPO, WebP, BMP, GIF, TIFF) whatever the file extension says, so an EPS or
other exotic file renamed to ``.png`` never reaches a plugin that runs external programs.
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import contextlib
import errno
import hashlib
import io
import logging
import os
import stat
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

log = logging.getLogger(__name__)

__all__ = ["ImageSet", "Skipped", "ImageDecodeError", "DEFAULT_EXTENSIONS", "DEFAULT_MAX_PIXELS", "as_imageset"]

#: Pillow's own default limit (about 89.5 megapixels, a 0.25 GB RGBA image)
DEFAULT_MAX_PIXELS = 89_478_485
#: images with a median size under this many pixels (80 x 80) are decoded in one thread unless num_workers is given
SERIAL_DECODE_PIXELS = 80 * 80
DEFAULT_EXTENSIONS = (".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".webp", ".bmp", ".dib", ".gif", ".tif", ".tiff",
                      ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".avif", ".qoi", ".jp2", ".j2k", ".jpf", ".jpx")
#: formats Pillow may use to open a file, whatever its extension (no EPS/PSD/... plugins on untrusted input)
SAFE_FORMATS = ("PNG", "JPEG", "MPO", "WEBP", "BMP", "DIB", "GIF", "TIFF", "PPM", "TGA", "AVIF", "QOI", "JPEG2000")
_formats_cache: tuple[str, ...] | None = None


def _safe_formats() -> tuple[str, ...]:
    """SAFE_FORMATS that this Pillow build can open (MPO is opened by the JPEG plugin in recent Pillow)."""
    global _formats_cache
    if _formats_cache is None:
        Image.init()
        _formats_cache = tuple(f for f in SAFE_FORMATS if f in Image.OPEN)
    return _formats_cache
#: a file diffaudit writes into every output folder: scans skip folders holding it, so outputs never become inputs
OUTPUT_MARKER = ".diffaudit-output"
#: bump when the decoded pixels of the same file would change (keys the embedding cache)
DECODE_VERSION = "1"


from .results import Skipped  # noqa: E402  (one Skipped type for every input)


class ImageDecodeError(ValueError):
    """An image could not be decoded. ``id`` is the ImageSet id, ``reason`` a short human explanation."""

    def __init__(self, id: str, reason: str):  # noqa: A002 - contract name
        super().__init__(f"cannot decode image {id!r}: {reason}")
        self.id = id
        self.reason = reason

    def __reduce__(self):  # picklable across processes
        return (type(self), (self.id, self.reason))


def _default_workers(num_workers: int | None) -> int:
    if num_workers is None:
        return max(1, min(4, os.cpu_count() or 1))
    if not isinstance(num_workers, (int, np.integer)) or isinstance(num_workers, bool) or num_workers < 1:
        raise ValueError(f"num_workers must be a positive int or None, got {num_workers!r}")
    return int(num_workers)


# --------------------------------------------------------------------------------------------- pixel conversion


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    rgb = rgba[..., :3].astype(np.uint16)
    a = rgba[..., 3:4].astype(np.uint16)
    out = (rgb * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)


def _scale16(arr: np.ndarray) -> np.ndarray:
    """16-bit (0..65535) -> 8-bit by round(v / 257), so 65535 -> 255 and 257*k -> k exactly."""
    a = np.clip(arr.astype(np.int64), 0, 65535)
    return ((a * 2 + 257) // 514).astype(np.uint8)


def _pil_to_rgb(im: Image.Image) -> np.ndarray:
    """Convert a Pillow image (any mode) to a uint8 HWC RGB array (see module docstring)."""
    mode = im.mode
    has_trns = "transparency" in im.info
    if mode == "RGB" and not has_trns:
        return np.asarray(im, dtype=np.uint8)
    if mode in ("1", "L") and not has_trns:
        g = np.asarray(im.convert("L"), dtype=np.uint8)
        return np.repeat(g[..., None], 3, axis=2)
    if mode.startswith("I;16") or mode == "I":
        g = _scale16(np.asarray(im))
        return np.repeat(g[..., None], 3, axis=2)
    if mode == "F":
        f = np.nan_to_num(np.asarray(im, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        if f.size and f.min() >= 0.0 and f.max() <= 1.0:
            f = f * 255.0
        g = np.clip(np.round(f), 0, 255).astype(np.uint8)
        return np.repeat(g[..., None], 3, axis=2)
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or has_trns:
        rgba = np.asarray(im.convert("RGBA"), dtype=np.uint8)
        return _composite_on_white(rgba)
    if mode == "P":
        return np.asarray(im.convert("RGB"), dtype=np.uint8)
    # CMYK, YCbCr, LAB, HSV, RGBX, ...
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def _array_to_rgb(a: np.ndarray) -> np.ndarray:
    """A validated uint8 HW / HWC (C in 1, 3, 4) array -> HWC RGB (a read-only view when already RGB)."""
    if a.ndim == 2:
        return np.repeat(a[..., None], 3, axis=2)
    c = a.shape[2]
    if c == 3:
        v = a.view()
        v.flags.writeable = False
        return v
    if c == 1:
        return np.repeat(a, 3, axis=2)
    return _composite_on_white(a)


_ORIENT_SWAP = {5, 6, 7, 8}  # EXIF orientations that transpose width and height


def _oriented_size(im: Image.Image) -> tuple[int, int]:
    """(height, width) after EXIF orientation, from the header only."""
    w, h = im.size
    orient = None
    # PNG's getexif() decodes the whole image to look for an eXIf chunk after the pixels: only use a header one
    if im.format != "PNG" or "exif" in im.info:
        try:
            orient = im.getexif().get(0x0112)
        except Exception:  # a broken EXIF block only matters at decode
            orient = None
    if orient in _ORIENT_SWAP:
        w, h = h, w
    return int(h), int(w)


# ------------------------------------------------------------------------------ Pillow's global pixel limit


_limit_lock = threading.Lock()
_limit_depth = 0
_limit_saved: Any = None


@contextlib.contextmanager
def _pil_limit_lifted(max_pixels: int):
    """Lift Pillow's own bomb limit only while we decode with a *larger* ``max_pixels`` (we check sizes ourselves).

    Reference counted and restored at exit, so Pillow's global setting is never changed permanently.
    """
    global _limit_depth, _limit_saved
    with _limit_lock:
        current = _limit_saved if _limit_depth else Image.MAX_IMAGE_PIXELS
        need = current is not None and max_pixels > current
        if need:
            if _limit_depth == 0:
                _limit_saved = Image.MAX_IMAGE_PIXELS
                Image.MAX_IMAGE_PIXELS = None
            _limit_depth += 1
    try:
        yield
    finally:
        if need:
            with _limit_lock:
                _limit_depth -= 1
                if _limit_depth == 0:
                    Image.MAX_IMAGE_PIXELS = _limit_saved
                    _limit_saved = None


def _open_file(path: str):
    """Open a file for reading (module level so tests can simulate permission errors when running as root)."""
    return open(path, "rb")


def _too_many(w: int, h: int, max_pixels: int) -> str | None:
    if w * h > max_pixels:
        return f"too many pixels: {w}x{h} = {w * h} > max_pixels={max_pixels} (refused, not decoded)"
    if w <= 0 or h <= 0:
        return f"empty image: {w}x{h}"
    return None


def _decode_pil_source(fp, id: str, max_pixels: int) -> np.ndarray:  # noqa: A002
    """Open ``fp`` (a binary file object) with the safe formats only, check the size, decode frame 0 to RGB."""
    try:
        with _pil_limit_lifted(max_pixels), Image.open(fp, formats=_safe_formats()) as im:
            reason = _too_many(im.size[0], im.size[1], max_pixels)
            if reason:
                raise ImageDecodeError(id, reason)
            if getattr(im, "n_frames", 1) > 1:
                im.seek(0)
            im.load()
            im = ImageOps.exif_transpose(im)
            arr = _pil_to_rgb(im)
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError(id, "not an image (unrecognised or unsupported format)") from None
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(id, f"decompression bomb refused: {e}") from None
    except MemoryError:
        raise ImageDecodeError(id, "out of memory while decoding") from None
    except Exception as e:  # truncated / corrupt data: OSError, SyntaxError, ValueError, EOFError, struct.error ...
        msg = str(e) or type(e).__name__
        raise ImageDecodeError(id, f"corrupt or truncated image data ({type(e).__name__}: {msg})") from None
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:  # pragma: no cover - defensive
        raise ImageDecodeError(id, f"unexpected decoded shape {arr.shape} / dtype {arr.dtype}")
    return np.ascontiguousarray(arr)


# ----------------------------------------------------------------------------------------------- backends


class _Backend:
    """How items are read. Handles are per-item opaque values kept by the ImageSet (subsets pick handles)."""

    kind = "?"

    def load(self, handle: Any, id: str) -> np.ndarray:  # noqa: A002
        raise NotImplementedError

    def size(self, handle: Any, id: str) -> tuple[int, int]:  # noqa: A002
        raise NotImplementedError

    def key(self, handle: Any, id: str) -> str:  # noqa: A002
        raise NotImplementedError

    def path(self, handle: Any) -> Path | None:
        return None

    #: whether decoding benefits from a thread pool
    threaded = True


@dataclass(frozen=True)
class _FileItem:
    path: str          # filesystem path (str; undecodable bytes kept as surrogates)
    rel_bytes: bytes   # raw relative path bytes (for the cache key)
    st_size: int
    st_mtime_ns: int
    hw: tuple[int, int]


class _FolderBackend(_Backend):
    kind = "folder"
    #: sizes come from the headers read by the scan (cheap to ask for)
    sizes_from_scan = True

    def __init__(self, root: str, max_pixels: int):
        self.root = root
        self.max_pixels = max_pixels

    def load(self, handle: _FileItem, id: str) -> np.ndarray:  # noqa: A002
        try:
            fh = _open_file(handle.path)
        except PermissionError:
            raise ImageDecodeError(id, "permission denied") from None
        except FileNotFoundError:
            raise ImageDecodeError(id, "file disappeared after the folder scan") from None
        except OSError as e:
            raise ImageDecodeError(id, f"cannot open file ({e.strerror or e})") from None
        with fh:
            return _decode_pil_source(fh, id, self.max_pixels)

    def size(self, handle: _FileItem, id: str) -> tuple[int, int]:  # noqa: A002
        return handle.hw

    @staticmethod
    def _memo(handle: _FileItem):
        try:
            st = os.stat(handle.path)
        except OSError:
            return None
        return (handle.path, st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)

    def known_key(self, handle: _FileItem) -> str | None:
        """The memoised key of a file unchanged since it was hashed (one stat), else None."""
        memo = self._memo(handle)
        return _CONTENT_KEYS.get(memo) if memo is not None else None

    def key(self, handle: _FileItem, id: str) -> str:  # noqa: A002
        """A hash of the file's bytes (and the decoder version): two different images never share a key, whatever
        their names, sizes and times; a file that cannot be read gets a key of its path (it is skipped anyway)."""
        memo = self._memo(handle)
        got = _CONTENT_KEYS.get(memo) if memo is not None else None
        if got is None:
            h = hashlib.blake2b(b"diffaudit-content-v" + DECODE_VERSION.encode(), digest_size=20)
            try:
                with open(handle.path, "rb") as fh:
                    for block in iter(lambda: fh.read(1 << 20), b""):
                        h.update(block)
            except OSError:
                h.update(b"unreadable:" + handle.rel_bytes)
            got = h.hexdigest()
            if memo is not None:
                _CONTENT_KEYS[memo] = got
        return got

    def path(self, handle: _FileItem) -> Path:
        return Path(handle.path)


#: content keys of files already hashed in this process, by (path, size, mtime, inode, device)
_CONTENT_KEYS: dict[tuple, str] = {}


def _hash_pixels(a: np.ndarray, tag: bytes = b"") -> str:
    h = hashlib.sha1(b"diffaudit-pixels-v" + DECODE_VERSION.encode() + tag)
    h.update(repr(tuple(a.shape)).encode())
    h.update(np.ascontiguousarray(a).data)
    return h.hexdigest()


class _ArrayBackend(_Backend):
    """Items are positions in a stacked array (N,H,W[,C]) or a list of validated per-image arrays."""

    kind = "arrays"
    threaded = False

    def __init__(self, data: np.ndarray | list[np.ndarray]):
        self.data = data

    def _raw(self, handle: int) -> np.ndarray:
        return self.data[handle]

    def load(self, handle: int, id: str) -> np.ndarray:  # noqa: A002
        return _array_to_rgb(self._raw(handle))

    def size(self, handle: int, id: str) -> tuple[int, int]:  # noqa: A002
        a = self._raw(handle)
        return int(a.shape[0]), int(a.shape[1])

    def key(self, handle: int, id: str) -> str:  # noqa: A002
        return _hash_pixels(self._raw(handle))


_ALLOWED_ARRAYS = (
    "uint8 arrays: one (N, H, W) or (N, H, W, C) array with C in (1, 3, 4), or a sequence of (H, W) / (H, W, C) arrays"
)


def _check_one_array(a: Any, where: str) -> np.ndarray:
    if isinstance(a, Image.Image):
        a = _pil_to_rgb(ImageOps.exif_transpose(a))
    a = np.asarray(a)
    if a.dtype != np.uint8:
        hint = ""
        if np.issubdtype(a.dtype, np.floating):
            hint = " (floats in [0, 1]? convert with (x * 255).round().astype(np.uint8))"
        elif a.dtype == np.uint16:
            hint = " (16-bit? convert with (x / 257).round().astype(np.uint8))"
        elif a.dtype == np.bool_:
            hint = " (masks? convert with x.astype(np.uint8) * 255)"
        raise ValueError(f"{where}: dtype {a.dtype} is not allowed; expected {_ALLOWED_ARRAYS}{hint}")
    if a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (1, 3, 4)):
        if a.shape[0] == 0 or a.shape[1] == 0:
            raise ValueError(f"{where}: shape {a.shape} has an empty side; expected {_ALLOWED_ARRAYS}")
        return a
    raise ValueError(f"{where}: shape {a.shape} is not allowed; expected (H, W) or (H, W, C) with C in (1, 3, 4)")


def _coerce_cell(cell: Any) -> Any:
    """Arrow / the numpy formatter hand back integer pixels as int64: accept them when all are valid 8-bit levels."""
    if isinstance(cell, Image.Image) or cell is None:
        return cell
    a = np.asarray(cell)
    if np.issubdtype(a.dtype, np.integer) and a.dtype != np.uint8 and a.size and a.min() >= 0 and a.max() <= 255:
        return a.astype(np.uint8)
    return a


class _HFBackend(_Backend):
    """Rows of a ``datasets.Dataset``; Image-feature columns are read as encoded bytes and decoded by us."""

    kind = "hf"

    def __init__(self, ds: Any, column: str, encoded: bool, max_pixels: int):
        self.ds = ds
        self.column = column
        self.encoded = encoded
        self.max_pixels = max_pixels
        self._lock = threading.Lock()
        self._sizes: dict[int, tuple[int, int]] = {}

    def _cell(self, row: int) -> Any:
        with self._lock:  # Arrow reads are cheap; keep them serial, decode in parallel
            return self.ds[int(row)][self.column]

    def _encoded_fp(self, cell: Any, id: str):  # noqa: A002
        if cell is None:
            raise ImageDecodeError(id, "missing image (null cell)")
        if isinstance(cell, dict):
            if cell.get("bytes"):
                return io.BytesIO(cell["bytes"])
            if cell.get("path"):
                try:
                    return _open_file(cell["path"])
                except OSError as e:
                    raise ImageDecodeError(id, f"cannot open {cell['path']!r} ({e.strerror or e})") from None
            raise ImageDecodeError(id, "empty image cell (no bytes, no path)")
        if isinstance(cell, (bytes, bytearray)):
            return io.BytesIO(cell)
        raise ImageDecodeError(id, f"unexpected image cell type {type(cell).__name__}")

    def load(self, handle: int, id: str) -> np.ndarray:  # noqa: A002
        cell = self._cell(handle)
        if self.encoded:
            fp = self._encoded_fp(cell, id)
            with fp:
                return _decode_pil_source(fp, id, self.max_pixels)
        try:
            a = _check_one_array(_coerce_cell(cell), f"dataset column {self.column!r} row {handle}")
        except ValueError as e:
            raise ImageDecodeError(id, str(e)) from None
        h, w = a.shape[:2]
        reason = _too_many(w, h, self.max_pixels)
        if reason:
            raise ImageDecodeError(id, reason)
        return np.ascontiguousarray(_array_to_rgb(a))

    def size(self, handle: int, id: str) -> tuple[int, int]:  # noqa: A002
        if handle in self._sizes:
            return self._sizes[handle]
        cell = self._cell(handle)
        hw = (0, 0)
        try:
            if self.encoded:
                with self._encoded_fp(cell, id) as fp, _pil_limit_lifted(self.max_pixels):
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                        with Image.open(fp, formats=_safe_formats()) as im:
                            hw = _oriented_size(im)
            else:
                a = np.asarray(cell) if not isinstance(cell, Image.Image) else None
                hw = (cell.size[1], cell.size[0]) if a is None else (int(a.shape[0]), int(a.shape[1]))
        except Exception as e:  # sizes() is informational; a broken row is reported when it is loaded
            log.debug("size of %s unknown: %s", id, e)
        self._sizes[handle] = hw
        return hw

    def key(self, handle: int, id: str) -> str:  # noqa: A002
        cell = self._cell(handle)
        if self.encoded and isinstance(cell, dict):
            if cell.get("bytes"):
                return hashlib.sha1(b"diffaudit-encoded-v" + DECODE_VERSION.encode() + cell["bytes"]).hexdigest()
            if cell.get("path"):
                p = cell["path"]
                try:
                    st = os.stat(p)
                    return hashlib.sha1(f"diffaudit-file-v{DECODE_VERSION}:{p}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()
                except OSError:
                    pass
            return hashlib.sha1(f"diffaudit-missing:{handle}:{id}".encode()).hexdigest()
        try:
            return _hash_pixels(_check_one_array(_coerce_cell(cell), "row"))
        except ValueError:
            return hashlib.sha1(f"diffaudit-invalid:{handle}:{id}".encode()).hexdigest()


# -------------------------------------------------------------------------------------------- folder scan


def _display_rel(rel: str) -> tuple[str, bool]:
    """An id for a relative path; undecodable bytes (surrogates) become visible ``\\xNN`` escapes."""
    try:
        rel.encode("utf-8")
        return rel, False
    except UnicodeEncodeError:
        return rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace"), True


def _norm_exts(extensions: Iterable[str] | None) -> tuple[str, ...]:
    if extensions is None:
        return DEFAULT_EXTENSIONS
    if isinstance(extensions, str):
        extensions = [extensions]
    out = []
    for e in extensions:
        if not isinstance(e, str) or not e.strip("."):
            raise ValueError(f"extensions: {e!r} is not a file extension like '.png'")
        e = e.lower()
        out.append(e if e.startswith(".") else "." + e)
    return tuple(out)


def _walk(root: str, recursive: bool, exts: tuple[str, ...]):
    """Yield (relpath, fullpath) for candidate files; plus skipped list and ignored count.

    Directory symlinks are followed, but every directory (by device + inode) is visited once, so symlink loops end.
    Real directories are walked before symlinked ones, so a tree reachable both ways keeps its real paths.
    """
    files: list[tuple[str, str]] = []
    skipped: list[Skipped] = []
    ignored: list[str] = []
    st = os.stat(root)
    visited = {(st.st_dev, st.st_ino)}
    real_queue: collections.deque[tuple[str, str]] = collections.deque([(root, "")])
    link_queue: collections.deque[tuple[str, str]] = collections.deque()
    while real_queue or link_queue:
        if not real_queue:
            # symlinked directories, once the real tree is done: each target once (loops and duplicates end here)
            path, rel_l = link_queue.popleft()
            try:
                dst = os.stat(path)
            except OSError as e:
                skipped.append(Skipped(_display_rel(rel_l)[0], f"cannot follow directory ({e.strerror or e})"))
                continue
            key = (dst.st_dev, dst.st_ino)
            if key in visited:
                log.debug("not following %s: directory already visited (symlink loop or duplicate)", path)
                continue
            visited.add(key)
            real_queue.append((path, rel_l))
        d, rel = real_queue.popleft()
        try:
            with os.scandir(d) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            skipped.append(Skipped(_display_rel(rel)[0] or ".", f"cannot list directory ({e.strerror or e})"))
            continue
        for ent in entries:
            name = ent.name
            if name.startswith("."):
                continue
            rel_e = f"{rel}/{name}" if rel else name
            try:
                is_link = ent.is_symlink()
                is_dir = ent.is_dir(follow_symlinks=True)
            except OSError:
                is_link, is_dir = True, False
            if is_dir:
                if not recursive:
                    continue
                if is_link:
                    link_queue.append((ent.path, rel_e))
                    continue
                try:
                    dst = ent.stat(follow_symlinks=False)
                except OSError as e:
                    skipped.append(Skipped(_display_rel(rel_e)[0], f"cannot read directory ({e.strerror or e})"))
                    continue
                key = (dst.st_dev, dst.st_ino)
                if os.path.exists(os.path.join(ent.path, OUTPUT_MARKER)):
                    skipped.append(Skipped(_display_rel(rel_e)[0], "a diffaudit output folder (samples, reports): "
                                                                   "outputs are never read as inputs"))
                    continue
                if key not in visited:
                    visited.add(key)
                    real_queue.append((ent.path, rel_e))
                continue
            if not name.lower().endswith(exts):
                ignored.append(_display_rel(rel_e)[0])
                continue
            files.append((rel_e, ent.path))
    return files, skipped, ignored


def _scan_file(rel: str, path: str, max_pixels: int) -> tuple[_FileItem | None, str | None]:
    """Header-only check of one file -> (item, None) or (None, reason)."""
    try:
        st = os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return None, "symlink loop"
        if e.errno == errno.ENOENT:
            return None, "broken symlink" if os.path.islink(path) else "file disappeared during the scan"
        if e.errno in (errno.EACCES, errno.EPERM):
            return None, "permission denied"
        return None, f"cannot stat file ({e.strerror or e})"
    if not stat.S_ISREG(st.st_mode):
        return None, "not a regular file (device, FIFO or socket)"
    if st.st_size == 0:
        return None, "zero-byte file"
    try:
        fh = _open_file(path)
    except PermissionError:
        return None, "permission denied"
    except OSError as e:
        return None, f"cannot open file ({e.strerror or e})"
    try:
        with fh, _pil_limit_lifted(max_pixels):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(fh, formats=_safe_formats()) as im:
                    w, h = im.size
                    reason = _too_many(w, h, max_pixels)
                    if reason:
                        return None, reason
                    hw = _oriented_size(im)
    except UnidentifiedImageError:
        return None, "not an image (unrecognised or unsupported format)"
    except Image.DecompressionBombError as e:
        return None, f"decompression bomb refused, not decoded: {e}"
    except PermissionError:
        return None, "permission denied"
    except Exception as e:
        return None, f"unreadable image header ({type(e).__name__}: {e})"
    rel_bytes = os.fsencode(rel)
    return _FileItem(path, rel_bytes, int(st.st_size), int(st.st_mtime_ns), hw), None


# ------------------------------------------------------------------------------------------------ ImageSet


class ImageSet:
    """A stable, lazily decoded set of RGB images. Build with ``from_folder``, ``from_arrays`` or ``from_hf``.

    Attributes:
        ids: stable string ids, one per usable image (sorted relative POSIX paths for folders).
        skipped: items refused at scan time and items that failed to decode later (appended when discovered).
        source: a human description of where the images come from.
    """

    def __init__(
        self,
        ids: list[str],
        handles: list[Any],
        backend: _Backend,
        *,
        skipped: list[Skipped] | None = None,
        source: str = "",
    ):
        if len(ids) != len(handles):  # pragma: no cover - internal
            raise ValueError("ids and handles differ in length")
        self.ids: list[str] = list(ids)
        self.skipped: list[Skipped] = list(skipped or [])
        #: files a folder scan left out because their extension is not an image format (relative paths)
        self.ignored: list[str] = []
        self.source = source
        self._handles = list(handles)
        self._backend = backend
        self._pos: dict[str, int] | None = None
        self._skipped_ids = {s.id for s in self.skipped}
        self._skip_lock = threading.Lock()
        #: statistics of the last iter_batches call (decodes in flight), for tests and benchmarks
        self.last_iter_stats: dict[str, int] = {}
        self._num_workers: int | None = None  # from_folder's num_workers, the default for iter_batches
        self._small: bool | None = None  # _small_files(), once

    # ---------------------------------------------------------------- constructors

    @classmethod
    def from_folder(
        cls,
        path: str | os.PathLike,
        *,
        recursive: bool = True,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        num_workers: int | None = None,
        extensions: Iterable[str] | None = None,
    ) -> "ImageSet":
        """All images under ``path`` (recursive by default), ids = sorted POSIX paths relative to ``path``.

        Hidden files and folders (names starting with ".") and files with other extensions are ignored (listed in ``ImageSet.ignored``). Only image
        headers are read here; see ``ImageSet.skipped`` for refused files. ``num_workers``: decode threads (default:
        up to 4); given explicitly, the header scan runs in that many threads too (worth it on network filesystems;
        on a local disk one thread is faster).
        """
        if not isinstance(max_pixels, (int, np.integer)) or isinstance(max_pixels, bool) or max_pixels < 1:
            raise ValueError(f"max_pixels must be a positive int, got {max_pixels!r}")
        max_pixels = int(max_pixels)
        workers = _default_workers(num_workers)
        exts = _norm_exts(extensions)
        root = os.path.abspath(os.fspath(path))
        if isinstance(root, bytes):
            root = os.fsdecode(root)
        if not os.path.exists(root):
            raise FileNotFoundError(f"from_folder: path {os.fspath(path)!r} does not exist")
        if not os.path.isdir(root):
            raise NotADirectoryError(f"from_folder: path {os.fspath(path)!r} is not a folder (pass a folder of images)")
        candidates, skipped, ignored = _walk(root, recursive, exts)

        if num_workers is not None and workers > 1 and len(candidates) > 8:
            # only when asked (network filesystems, where threads hide latency): on a local disk one thread is 2-3x
            # faster, as PIL's header parsing holds the GIL. Chunks of files per task: a thread pool has no
            # chunksize, and one future per header costs more than reading the header
            step = max(8, min(256, len(candidates) // (4 * workers) or 1))
            chunks = [candidates[i:i + step] for i in range(0, len(candidates), step)]
            with cf.ThreadPoolExecutor(workers, thread_name_prefix="diffaudit-scan") as ex:
                results = [r for part in ex.map(lambda ch: [_scan_file(rel, p, max_pixels) for rel, p in ch], chunks)
                           for r in part]
        else:
            results = [_scan_file(rel, p, max_pixels) for rel, p in candidates]

        items: dict[str, _FileItem] = {}
        n_escaped = 0
        for (rel, _), (item, reason) in zip(candidates, results):
            rid, escaped = _display_rel(rel)
            n_escaped += escaped
            if item is None:
                skipped.append(Skipped(rid, reason or "unknown"))
            elif rid in items:
                skipped.append(Skipped(rid, "id collides with another file's id (undecodable file name)"))
            else:
                items[rid] = item
        if n_escaped:
            log.warning(
                "%d file name(s) under %s are not valid UTF-8; their ids show the raw bytes as \\xNN escapes",
                n_escaped, root,
            )
        if not items:
            msg = f"from_folder: no usable images in {root!r}"
            details = [f"{len(skipped)} file(s) skipped"]
            if skipped:
                details[0] += " (e.g. " + "; ".join(f"{s.id}: {s.reason}" for s in skipped[:3]) + ")"
            details.append(f"{len(ignored)} file(s) with other extensions ignored; allowed: {', '.join(exts)}")
            raise ValueError(msg + ": " + ", ".join(details))
        ids = sorted(items)
        skipped.sort(key=lambda s: s.id)
        if skipped:
            log.info("%s: %d image(s), %d skipped", root, len(ids), len(skipped))
        s = cls(ids, [items[i] for i in ids], _FolderBackend(root, max_pixels), skipped=skipped,
                source=f"folder:{root}")
        s._num_workers = num_workers  # None: the default, which may decode tiny images in one thread
        s.ignored = ignored
        if ignored:
            log.info("%s: %d file(s) with other extensions ignored (not images), e.g. %s", root, len(ignored),
                     ", ".join(ignored[:3]))
        return s

    @classmethod
    def from_arrays(
        cls,
        arrays: np.ndarray | Sequence[np.ndarray],
        ids: Sequence[str] | None = None,
    ) -> "ImageSet":
        """uint8 images: one (N, H, W) or (N, H, W, C) array (C in 1, 3, 4), or a sequence of (H, W[, C]) arrays.

        The array is referenced, not copied. ``ids`` default to zero-padded positions ("000000", "000001", ...).
        Alpha (C=4) is composited on white; one channel is replicated to RGB.
        """
        if isinstance(arrays, np.ndarray) or (hasattr(arrays, "__array__") and not isinstance(arrays, (list, tuple))):
            data = np.asarray(arrays)
            if data.dtype != np.uint8:
                hint = ""
                if np.issubdtype(data.dtype, np.floating):
                    hint = "; floats in [0, 1]? convert with (x * 255).round().astype(np.uint8)"
                elif data.dtype == np.uint16:
                    hint = "; 16-bit? convert with (x / 257).round().astype(np.uint8)"
                raise ValueError(
                    f"from_arrays: arrays has dtype {data.dtype} (shape {data.shape}); expected {_ALLOWED_ARRAYS}{hint}"
                )
            ok = data.ndim == 3 or (data.ndim == 4 and data.shape[3] in (1, 3, 4))
            if not ok:
                raise ValueError(
                    f"from_arrays: arrays has shape {data.shape}; expected (N, H, W) or (N, H, W, C) with C in "
                    f"(1, 3, 4) (channels last; for NCHW use x.transpose(0, 2, 3, 1))"
                )
            if data.shape[0] == 0:
                raise ValueError(f"from_arrays: arrays is empty (shape {data.shape}); need at least one image")
            if data.shape[1] == 0 or data.shape[2] == 0:
                raise ValueError(f"from_arrays: arrays has shape {data.shape} with an empty side")
            n = data.shape[0]
            backend = _ArrayBackend(data)
        else:
            if isinstance(arrays, (str, bytes, os.PathLike)):
                raise ValueError(
                    f"from_arrays: got a path {arrays!r}; use ImageSet.from_folder for folders of image files"
                )
            try:
                seq = list(arrays)
            except TypeError:
                raise ValueError(f"from_arrays: arrays of type {type(arrays).__name__} is not allowed; "
                                 f"expected {_ALLOWED_ARRAYS}") from None
            if not seq:
                raise ValueError("from_arrays: arrays is an empty sequence; need at least one image")
            checked = [_check_one_array(a, f"from_arrays: arrays[{i}]") for i, a in enumerate(seq)]
            n = len(checked)
            backend = _ArrayBackend(checked)
        id_list = _make_ids(ids, n, "from_arrays")
        return cls(id_list, list(range(n)), backend, source=f"arrays(n={n})")

    @classmethod
    def from_hf(
        cls,
        dataset_or_path: Any,
        image_column: str = "image",
        id_column: str | None = None,
        *,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> "ImageSet":
        """A Hugging Face ``datasets.Dataset`` (or a folder written by ``Dataset.save_to_disk``).

        The image column may hold ``datasets.Image`` values (decoded here, with the same checks as files) or arrays
        / PIL images. ids come from ``id_column`` or are the zero-padded row index.
        """
        try:
            import datasets  # noqa: F401
        except ModuleNotFoundError as e:
            raise ModuleNotFoundError(
                'ImageSet.from_hf needs the Hugging Face `datasets` package: pip install "diffaudit[hf]"'
            ) from e
        ds = dataset_or_path
        src = getattr(ds, "info", None)
        if isinstance(ds, (str, os.PathLike)):
            p = os.fspath(ds)
            if not os.path.exists(p):
                raise FileNotFoundError(f"from_hf: path {p!r} does not exist (expected a folder from save_to_disk)")
            try:
                ds = datasets.load_from_disk(p)
            except Exception as e:
                raise ValueError(f"from_hf: cannot load a dataset saved with save_to_disk from {p!r}: {e}") from e
            src = f"hf:{os.path.abspath(p)}"
        if isinstance(ds, datasets.DatasetDict):
            raise ValueError(
                f"from_hf: got a DatasetDict with splits {list(ds.keys())}; pass one split, e.g. dataset['train']"
            )
        if isinstance(ds, datasets.IterableDataset) or not isinstance(ds, datasets.Dataset):
            raise ValueError(
                f"from_hf: dataset_or_path must be a datasets.Dataset or a save_to_disk folder, got {type(ds).__name__}"
            )
        if image_column not in ds.column_names:
            raise ValueError(f"from_hf: image_column {image_column!r} not in the dataset; columns: {ds.column_names}")
        n = len(ds)
        if n == 0:
            raise ValueError("from_hf: the dataset has no rows")
        if id_column is not None:
            if id_column not in ds.column_names:
                raise ValueError(f"from_hf: id_column {id_column!r} not in the dataset; columns: {ds.column_names}")
            ids = _make_ids([str(v) for v in ds[id_column]], n, "from_hf")
        else:
            ids = _make_ids(None, n, "from_hf")
        feat = ds.features[image_column]
        encoded = isinstance(feat, datasets.Image)
        view = ds.select_columns([image_column])
        if encoded:
            view = view.cast_column(image_column, datasets.Image(decode=False))
        else:
            view = view.with_format("numpy")
        if not isinstance(src, str):
            fp = getattr(ds, "_fingerprint", None) or "?"
            src = f"hf:dataset(n={n}, fingerprint={fp})"
        return cls(ids, list(range(n)), _HFBackend(view, image_column, encoded, int(max_pixels)), source=src)

    # -------------------------------------------------------------------- access

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"<ImageSet {self.source} n={len(self)} skipped={len(self.skipped)}>"

    def index(self, id: str) -> int:  # noqa: A002
        """Position of ``id``; KeyError naming it when absent."""
        if self._pos is None:
            self._pos = {k: i for i, k in enumerate(self.ids)}
        try:
            return self._pos[id]
        except KeyError:
            raise KeyError(f"id {id!r} is not in this ImageSet ({len(self)} images, source {self.source})") from None

    def _position(self, i_or_id: int | str) -> int:
        if isinstance(i_or_id, str):
            return self.index(i_or_id)
        if isinstance(i_or_id, (int, np.integer)) and not isinstance(i_or_id, bool):
            i = int(i_or_id)
            if -len(self) <= i < len(self):
                return i % len(self)
            raise IndexError(f"index {i} out of range for an ImageSet of {len(self)} images")
        raise TypeError(f"expected an int position or a str id, got {type(i_or_id).__name__}")

    def path(self, i_or_id: int | str) -> Path | None:
        """The file behind an item (folder sets), else None."""
        i = self._position(i_or_id)
        return self._backend.path(self._handles[i])

    def sizes(self) -> list[tuple[int, int]]:
        """(height, width) per id after EXIF orientation, from headers (no full decode)."""
        return [self._backend.size(h, i) for h, i in zip(self._handles, self.ids)]

    def load(self, i_or_id: int | str) -> np.ndarray:
        """Decode one image -> uint8 (H, W, 3) RGB. Raises ImageDecodeError(id, reason)."""
        i = self._position(i_or_id)
        return self._backend.load(self._handles[i], self.ids[i])

    def record_skip(self, id: str, reason: str) -> None:  # noqa: A002
        with self._skip_lock:
            if id not in self._skipped_ids:
                self._skipped_ids.add(id)
                self.skipped.append(Skipped(id, reason))
                log.warning("skipping %s: %s", id, reason)

    def _safe_load(self, pos: int) -> np.ndarray | ImageDecodeError:
        iid = self.ids[pos]
        try:
            return self._backend.load(self._handles[pos], iid)
        except ImageDecodeError as e:
            return e
        except Exception as e:  # never let one bad item end a long run
            return ImageDecodeError(iid, f"{type(e).__name__}: {e}")

    def iter_batches(
        self,
        batch_size: int = 64,
        *,
        indices: Sequence[int] | None = None,
        num_workers: int | None = None,
    ) -> Iterator[tuple[list[str], list[np.ndarray]]]:
        """Yield ``(ids, images)`` batches in order; images are uint8 HWC RGB arrays.

        Decoding runs in a thread pool with at most ``max(batch_size, 2 * num_workers)`` decodes in flight, so at most
        about three batches of decoded images exist at once (the one the caller holds, the one being filled, the
        prefetched decodes). Items that fail to decode are appended to ``self.skipped`` and left out; batches are
        refilled, so every batch but the last has ``batch_size`` images.
        """
        if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        batch_size = int(batch_size)
        if indices is None:
            order: Sequence[int] = range(len(self))
        else:
            order = [self._position(int(i)) for i in indices]
        asked = num_workers if num_workers is not None else self._num_workers
        workers = _default_workers(asked)
        if asked is None and workers > 1 and self._small_files():
            workers = 1  # tiny images: a thread pool costs more than the decode (PIL holds the GIL for them)
        return self._iter(order, batch_size, workers)

    def _small_files(self) -> bool:
        """Whether the images are so small (median under :data:`SERIAL_DECODE_PIXELS`, from the headers a folder
        scan has read) that decoding them in one thread is faster than a pool: 2,997 PNGs of 64x64 decode in
        0.31-0.33 s in one thread and 0.58-0.74 s in a pool of 2; 96 px photos and larger gain from the pool."""
        if self._small is None:
            self._small = False
            if getattr(self._backend, "sizes_from_scan", False) and len(self):
                px = sorted(h * w for h, w in self.sizes())
                self._small = px[len(px) // 2] < SERIAL_DECODE_PIXELS
        return self._small

    def _iter(self, order: Sequence[int], batch_size: int, workers: int):
        stats = {"max_in_flight": 0, "window": 0, "decoded": 0, "failed": 0}
        self.last_iter_stats = stats
        ids: list[str] = []
        imgs: list[np.ndarray] = []

        def take(pos: int, res: np.ndarray | ImageDecodeError):
            if isinstance(res, ImageDecodeError):
                stats["failed"] += 1
                self.record_skip(res.id, res.reason)
            else:
                stats["decoded"] += 1
                ids.append(self.ids[pos])
                imgs.append(res)

        if not self._backend.threaded or workers == 1:
            stats["window"] = 1
            for pos in order:
                stats["max_in_flight"] = 1
                take(pos, self._safe_load(pos))
                if len(ids) == batch_size:
                    yield ids, imgs
                    ids, imgs = [], []
            if ids:
                yield ids, imgs
            return

        window = max(batch_size, 2 * workers)
        stats["window"] = window
        it = iter(order)
        pending: collections.deque[tuple[int, cf.Future]] = collections.deque()
        ex = cf.ThreadPoolExecutor(workers, thread_name_prefix="diffaudit-decode")
        try:
            def refill():
                while len(pending) < window:
                    pos = next(it, None)
                    if pos is None:
                        return
                    pending.append((pos, ex.submit(self._safe_load, pos)))
                stats["max_in_flight"] = max(stats["max_in_flight"], len(pending))

            refill()
            stats["max_in_flight"] = max(stats["max_in_flight"], len(pending))
            while pending:
                pos, fut = pending.popleft()
                res = fut.result()
                del fut
                refill()
                take(pos, res)
                del res
                if len(ids) == batch_size:
                    out = (ids, imgs)
                    ids, imgs = [], []
                    yield out
                    del out
            if ids:
                yield ids, imgs
        finally:
            for _, f in pending:
                f.cancel()
            pending.clear()
            ex.shutdown(wait=True, cancel_futures=True)

    # -------------------------------------------------------------- keys, subsets

    def item_keys(self) -> list[str]:
        """Per-item cache keys, computed from the content at every call: files -> a hash of their bytes (memoised
        per path, size, mtime and inode), arrays / datasets -> a hash of the pixels (an array changed in place gets
        new keys). Two different images never share a key."""
        known = getattr(self._backend, "known_key", None)
        keys = [known(h) for h in self._handles] if known is not None else [None] * len(self._handles)
        todo = [j for j, k in enumerate(keys) if k is None]
        if self._backend.threaded and len(todo) > 64:  # hashing reads files: overlap the reads
            with cf.ThreadPoolExecutor(_default_workers(None)) as ex:
                got = list(ex.map(self._backend.key, [self._handles[j] for j in todo], [self.ids[j] for j in todo]))
        else:
            got = [self._backend.key(self._handles[j], self.ids[j]) for j in todo]
        for j, k in zip(todo, got):
            keys[j] = k
        return keys

    def remote_parts(self) -> tuple[list[str], list, Any, str]:
        """``(ids, per-item handles, decoding backend, source)``: the picklable parts another process (a Ray actor)
        rebuilds this set from, with ``ImageSet(ids, handles, backend, source=source)``."""
        return list(self.ids), list(self._handles), self._backend, str(getattr(self, "source", ""))

    def fingerprint(self) -> str:
        """sha256 over ids and item keys: equal fingerprints mean the same images under the same ids."""
        h = hashlib.sha256(b"diffaudit-imageset-v1\0")
        for i, k in zip(self.ids, self.item_keys()):
            h.update(i.encode("utf-8", "surrogatepass"))
            h.update(b"\0")
            h.update(k.encode())
            h.update(b"\n")
        return h.hexdigest()

    def subset(self, indices: Iterable[int] | Iterable[str]) -> "ImageSet":
        """A new ImageSet with the given positions (or ids), in the given order. Shares the decoded source."""
        pos = [self._position(i if isinstance(i, str) else int(i)) for i in indices]
        if len(set(pos)) != len(pos):
            raise ValueError("subset: indices contain duplicates; each image may appear once")
        ids = [self.ids[p] for p in pos]
        keep = set(ids)
        sub = type(self)(
            ids,
            [self._handles[p] for p in pos],
            self._backend,
            skipped=[s for s in self.skipped if s.id in keep],
            source=f"{self.source}[subset n={len(ids)}]",
        )
        sub._num_workers = self._num_workers
        return sub


def _make_ids(ids: Sequence[Any] | None, n: int, where: str) -> list[str]:
    if ids is None:
        width = max(6, len(str(n - 1)))
        return [str(i).zfill(width) for i in range(n)]
    if isinstance(ids, (str, bytes)):
        raise ValueError(f"{where}: ids must be a sequence of strings, got a single {type(ids).__name__}")
    out = [str(i) for i in ids]
    if len(out) != n:
        raise ValueError(f"{where}: got {len(out)} ids for {n} images; pass one id per image or ids=None")
    seen: set[str] = set()
    for i in out:
        if i in seen:
            raise ValueError(f"{where}: duplicate id {i!r}; ids must be unique")
        seen.add(i)
    return out


def as_imageset(images: Any, name: str = "images") -> "ImageSet":
    """An :class:`ImageSet` from an ImageSet (as is), a folder (``ImageSet.from_folder``) or uint8 arrays
    (``ImageSet.from_arrays``); errors name the argument ``name``."""
    if isinstance(images, ImageSet):
        return images
    if isinstance(images, (str, os.PathLike)):
        if not Path(images).exists():
            raise FileNotFoundError(f"{name}={str(images)!r}: no such folder")
        try:
            return ImageSet.from_folder(images)
        except (FileNotFoundError, NotADirectoryError, ValueError) as e:
            raise type(e)(f"{name}={str(images)!r}: {e}") from None
    if isinstance(images, np.ndarray) or (isinstance(images, (list, tuple)) and images
                                          and all(isinstance(a, np.ndarray) for a in images)):
        return ImageSet.from_arrays(images)
    raise TypeError(f"{name}={type(images).__name__}: expected an ImageSet, a folder path or uint8 image arrays "
                    f"(N, H, W[, C]); got {type(images).__name__}")
