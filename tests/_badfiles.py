"""Generators for good and hostile image files (no binaries shipped). Used by tests/test_data.py and others.

``write_corpus(root)`` writes a folder mixing every supported format and conversion with bad inputs and returns
``(expected_ok, expected_skip, notes)``:

* expected_ok: id -> (reference uint8 HWC RGB array computed independently of diffaudit, max abs tolerance)
* expected_skip: id -> a word the skip reason must contain (scan-time skips)
* notes: extra facts (``decode_fail``: ids that pass the header scan but must fail at decode time)
"""
from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from conftest import digits_rgb


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def crafted_bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose (valid, CRC-correct) header claims width x height RGB pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    b = io.BytesIO()
    im.save(b, fmt, **kw)
    return b.getvalue()


def composite_white(rgba: np.ndarray) -> np.ndarray:
    """Reference alpha compositing on white in float64, rounded."""
    rgb = rgba[..., :3].astype(np.float64)
    a = rgba[..., 3:4].astype(np.float64) / 255.0
    return np.round(rgb * a + 255.0 * (1.0 - a)).astype(np.uint8)


def exif_orientation(value: int) -> bytes:
    ex = Image.Exif()
    ex[0x0112] = value
    return ex.tobytes()


def write_corpus(root: Path, *, bomb_side: int = 200) -> tuple[dict, dict, dict]:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    d = digits_rgb(12, 32)  # (12, 32, 32, 3) uint8, gray digits
    rng = np.random.default_rng(0)
    ok: dict[str, tuple[np.ndarray, int]] = {}
    skip: dict[str, str] = {}

    def put(rel: str, data: bytes) -> Path:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        return p

    # colour image: digits with a colour ramp, so channel mix-ups show
    col = d[0].copy()
    col[..., 1] = (col[..., 1].astype(int) // 2).astype(np.uint8)
    col[..., 2] = np.linspace(0, 255, 32, dtype=np.uint8)[None, :]
    put("a.png", encode(Image.fromarray(col), "PNG"))
    ok["a.png"] = (col, 0)
    put("b.jpg", encode(Image.fromarray(d[1]), "JPEG", quality=95))
    ok["b.jpg"] = (d[1], 24)
    put("c.webp", encode(Image.fromarray(col), "WEBP", lossless=True))
    ok["c.webp"] = (col, 0)
    put("d.bmp", encode(Image.fromarray(d[2]), "BMP"))
    ok["d.bmp"] = (d[2], 0)
    put("e.TIF", encode(Image.fromarray(col), "TIFF"))
    ok["e.TIF"] = (col, 0)
    # animated GIF: first frame is d[3]
    frames = [Image.fromarray(d[3][..., 0], "L"), Image.fromarray(d[4][..., 0], "L")]
    b = io.BytesIO()
    frames[0].save(b, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    put("anim.gif", b.getvalue())
    ok["anim.gif"] = (d[3], 0)
    # RGBA with varying alpha
    rgba = np.concatenate([col, rng.integers(0, 256, (32, 32, 1), dtype=np.uint8)], axis=2)
    put("modes/rgba.png", encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    ok["modes/rgba.png"] = (composite_white(rgba), 1)
    # LA
    la = np.stack([d[5][..., 0], np.full((32, 32), 128, np.uint8)], axis=2)
    put("modes/la.png", encode(Image.fromarray(la, "LA"), "PNG"))
    ok["modes/la.png"] = (composite_white(np.concatenate([np.repeat(la[..., :1], 3, 2), la[..., 1:]], 2)), 1)
    # palette with a transparent index
    idx = (d[6][..., 0] > 127).astype(np.uint8)  # 0 = background, 1 = stroke
    pal = Image.fromarray(idx, "P")
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * (254 * 3))
    put("modes/palette_trns.png", encode(pal, "PNG", transparency=0))
    ref = np.where(idx[..., None] == 1, np.array([0, 0, 255], np.uint8), np.array([255, 255, 255], np.uint8))
    ok["modes/palette_trns.png"] = (ref.astype(np.uint8), 0)
    # plain grayscale
    put("modes/gray.png", encode(Image.fromarray(d[7][..., 0], "L"), "PNG"))
    ok["modes/gray.png"] = (d[7], 0)
    # 16-bit grayscale: v * 257 must come back as v exactly (scaled, not clipped to 255)
    g16 = d[8][..., 0].astype(np.uint16) * 257
    put("modes/gray16.png", encode(Image.fromarray(g16), "PNG"))
    ok["modes/gray16.png"] = (d[8], 0)
    # CMYK JPEG
    put("modes/cmyk.jpg", encode(Image.fromarray(col).convert("CMYK"), "JPEG", quality=98))
    ok["modes/cmyk.jpg"] = (col, 40)
    # EXIF orientation 6: stored pixels rotated; displayed = stored rotated 90 degrees clockwise
    stored = np.concatenate([d[9], d[10][:16]], axis=0)  # 48 x 32, asymmetric
    put("exif/rot6.jpg", encode(Image.fromarray(stored), "JPEG", quality=95, exif=exif_orientation(6)))
    ok["exif/rot6.jpg"] = (np.ascontiguousarray(np.rot90(stored, k=-1)), 24)
    # nested
    put("nested/deeper/k.png", encode(Image.fromarray(d[11]), "PNG"))
    ok["nested/deeper/k.png"] = (d[11], 0)

    # ---- bad inputs
    put("bad/zero.png", b"")
    skip["bad/zero.png"] = "zero-byte"
    put("bad/random.png", rng.integers(0, 256, 2048, dtype=np.uint8).tobytes())
    skip["bad/random.png"] = "not an image"
    put("bad/script.jpg", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n(owned) print\n")
    skip["bad/script.jpg"] = "not an image"
    put("bad/crafted_bomb.png", crafted_bomb_png())
    skip["bad/crafted_bomb.png"] = "bomb"
    # a genuine moderately large image, refused because the test uses a small max_pixels
    put("bad/big.png", encode(Image.fromarray(np.zeros((bomb_side, bomb_side, 3), np.uint8)), "PNG"))
    skip["bad/big.png"] = "too many pixels"
    # truncated files: header fine, data cut -> fail at decode time
    full = encode(Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)), "PNG")
    put("bad/trunc.png", full[: len(full) // 2])
    jfull = encode(Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)), "JPEG", quality=90)
    put("bad/trunc.jpg", jfull[: len(jfull) // 2])
    # ignored: other extensions, hidden files / folders
    put("notes.txt", b"hello")
    put(".hidden.png", encode(Image.fromarray(d[0]), "PNG"))
    put(".git/x.png", encode(Image.fromarray(d[0]), "PNG"))
    notes = {"decode_fail": ["bad/trunc.png", "bad/trunc.jpg"], "ignored": ["notes.txt", ".hidden.png", ".git/x.png"]}

    # symlinks: a directory loop (nested/loop -> root) and a file loop
    try:
        os.symlink(root, root / "nested" / "loop", target_is_directory=True)
        os.symlink("selfloop.png", root / "bad" / "selfloop.png")
        skip["bad/selfloop.png"] = "symlink loop"
        os.symlink("nowhere.png", root / "bad" / "broken.png")
        skip["bad/broken.png"] = "broken symlink"
        notes["symlinks"] = True
    except (OSError, NotImplementedError):
        notes["symlinks"] = False
    # FIFO with an image extension (opening it would block forever)
    if hasattr(os, "mkfifo"):
        os.mkfifo(root / "bad" / "fifo.png")
        skip["bad/fifo.png"] = "not a regular file"
    # non-UTF-8 file name: loads, id shows the byte as an escape
    try:
        raw = os.fsencode(str(root)) + b"/caf\xe9.png"
        with open(raw, "wb") as fh:
            fh.write(encode(Image.fromarray(d[4]), "PNG"))
        ok["caf\\xe9.png"] = (d[4], 0)
        notes["non_utf8"] = True
    except (OSError, UnicodeError):
        notes["non_utf8"] = False
    return ok, skip, notes
