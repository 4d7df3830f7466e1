"""Small HTML helpers shared by every report page: escaping and inlined PNG thumbnails (no external resources)."""
from __future__ import annotations

import base64
import html
import io

import numpy as np

# Restrictive CSP for every report: no network, no external scripts; inline styles/scripts only (the page is one file).
CSP = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
    "base-uri 'none'; form-action 'none'"
)


def esc(value: object) -> str:
    """HTML-escape any value (quotes included). Every user-controlled string must pass through here or Jinja autoescape."""
    return html.escape(str(value), quote=True)


def png_data_uri(image: np.ndarray, max_side: int = 96) -> str:
    """uint8 HWC/HW image -> ``data:image/png;base64,...`` thumbnail, upscaled with nearest neighbour if tiny."""
    from PIL import Image

    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    im = Image.fromarray(arr)
    h, w = arr.shape[:2]
    scale = max_side / max(h, w)
    if scale != 1:
        resample = Image.NEAREST if scale > 1 else Image.BILINEAR
        im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), resample)
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
