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
    im.save(buf, format="PNG", compress_level=1)  # fast: a report of a large set has thousands of thumbnails
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# ------------------------------------------------------------------------------------------------ Jinja pages
TEMPLATES = __import__("pathlib").Path(__file__).with_name("templates")

PAGE_CSS = """
.clusters { display: grid; gap: 12px; }
.cluster { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 10px 14px 12px; }
.cluster h3 { font-size: .92rem; margin: 0 0 8px; font-weight: 600; }
.cluster h3 .meta { font-weight: 400; color: var(--muted); }
.thumbs { display: flex; flex-wrap: wrap; gap: 10px; }
.th { margin: 0; width: calc(var(--thumb) + 4px); }
.th img, .th .ph { display: block; width: var(--thumb); height: var(--thumb); object-fit: contain; background: #eef0f3;
                   border-radius: 4px; }
.th figcaption { font-family: var(--mono); font-size: .68rem; color: var(--muted); overflow-wrap: anywhere;
                 line-height: 1.25; margin-top: 3px; }
.th figcaption b { font-family: var(--sans); color: var(--fg); font-weight: 600; }
.th figcaption .cap, .th figcaption .idl { display: block; }
.th figcaption .cap { font-family: var(--sans); font-size: .74rem; }
.th.query img { outline: 2px solid var(--blue); outline-offset: -2px; }
.row { display: flex; gap: 14px; align-items: flex-start; background: var(--card); border: 1px solid var(--line);
       border-radius: 8px; padding: 10px 14px; margin: 0 0 8px; }
.row.flag { border-color: #e9b38f; background: #fffaf6; }
.row .sep { align-self: stretch; border-left: 1px dashed var(--line); }
table.plain { border-collapse: collapse; font-size: .84rem; background: var(--card); }
table.plain th, table.plain td { border: 1px solid var(--line); padding: 3px 8px; text-align: left; }
table.plain td.id { font-family: var(--mono); font-size: .78rem; overflow-wrap: anywhere; }
table.plain td.num { font-variant-numeric: tabular-nums; text-align: right; }
.summary { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 10px 14px; }
.lab { display: inline-block; padding: 1px 7px; border-radius: 9px; color: #fff; font-size: 12px; white-space: nowrap; }
img.t { image-rendering: pixelated; display: block; background: #eee; }
.legend span { margin-right: 14px; white-space: nowrap; }
.sw { display: inline-block; width: 10px; height: 10px; border-radius: 5px; margin-right: 4px; }
svg.loo text { font: 11px system-ui, sans-serif; fill: #444; }
"""


def page_env():
    """The Jinja environment of diffaudit's pages: package templates, autoescape on, undefined names are errors."""
    import jinja2

    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=True,
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                              keep_trailing_newline=True)


def render_page(template: str, *, title: str, subtitle: str, thumb: int = 96, path=None, **ctx) -> str:
    """Render one of the secondary pages (``page.html.j2`` layout, no script: ``script-src 'none'``); write it to
    ``path`` atomically when given. Returns the HTML."""
    from markupsafe import Markup

    from .._serial import atomic_write_text

    css = (TEMPLATES / "report.css").read_text(encoding="utf-8") + PAGE_CSS
    html_text = page_env().get_template(template).render(
        csp=Markup(esc(CSP.replace("script-src 'unsafe-inline'", "script-src 'none'"))), css=Markup(css), title=title,
        subtitle=subtitle, thumb=int(thumb), **ctx)
    if path is not None:
        atomic_write_text(path, html_text)
    return html_text


class Figures:
    """Thumbnail view models per image id (data URI or the reason it could not be shown), decoded once.

    ``images``: anything with ``load(id) -> uint8 image`` (an ImageSet), a callable ``id -> image | None``, or None."""

    def __init__(self, images, thumb: int) -> None:
        self.images = images
        self.thumb = int(thumb)
        self._cache: dict[str, dict] = {}

    def uri(self, id_: str):
        return self.figure(id_)["uri"]

    def figure(self, id_: str, caption=()) -> dict:
        if id_ not in self._cache:
            try:
                if self.images is None:
                    raise ValueError("images not available")
                load = self.images.load if hasattr(self.images, "load") else self.images
                arr = load(id_)
                if arr is None:
                    raise ValueError("no image")
                self._cache[id_] = {"uri": png_data_uri(arr, self.thumb), "px": max(arr.shape[:2]) < self.thumb}
            except Exception as exc:  # a file that vanished or no longer decodes: show why, keep the page
                reason = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
                self._cache[id_] = {"uri": None, "px": False, "reason": reason}
        return {"id": id_, "caption": list(caption), "reason": "", **self._cache[id_]}
