"""The embedder registry: spec strings -> :class:`~diffaudit.embedders.base.Embedder` (see ``diffaudit.embedders``)."""
from __future__ import annotations

from typing import Callable

from .base import Embedder

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
        elif arg == "distilled":
            kw.setdefault("variant", "distilled")
        else:
            raise ValueError(f"embedder='sscd:{arg}': expected 'sscd', 'sscd:<size>', 'sscd:square' or "
                             "'sscd:distilled'")
    return SSCDEmbedder(**kw)


register_embedder("pixel", _pixel)
register_embedder("tiled", _tiled)
register_embedder("clip", _clip)
register_embedder("sscd", _sscd)
