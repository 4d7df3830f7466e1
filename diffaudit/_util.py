"""Small helpers with no home of their own (foundation layer: imports nothing from diffaudit)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Optional


def default_device() -> str:
    """CUDA when available, else CPU."""
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except Exception:  # pragma: no cover - torch is a core dependency
        return "cpu"


_HASH_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike, chunk_size: int = 1 << 22) -> str:
    """sha256 hex digest of a file, streamed in chunks; cached per (path, size, mtime)."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASH_CACHE:
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(chunk_size), b""):
                h.update(block)
        _HASH_CACHE[key] = h.hexdigest()
    return _HASH_CACHE[key]


def check_int(name: str, value: Any, low: int, high: Optional[int] = None) -> int:
    """``value`` as an int in ``[low, high]``, else a ValueError naming ``name``."""
    import numpy as np

    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low or (
        high is not None and value > high
    ):
        allowed = f"an integer >= {low}" + (f" and <= {high}" if high is not None else "")
        raise ValueError(f"{name}={value!r} is not allowed: expected {allowed}")
    return int(value)
