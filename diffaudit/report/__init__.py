"""HTML reports (one self-contained file each) and CSV tables.

- :func:`render_audit` / :func:`render_audit_html`: an :class:`~diffaudit.results.AuditResult` as a report.
- :func:`write_risk_csv`: the per-training-image risk table as CSV (formula-injection safe).
- :func:`render_duplicates`, :func:`render_matches`: curator pages for ``find_duplicates`` / ``match`` results,
  from :mod:`diffaudit.report.gallery`, imported on first use.
"""
from __future__ import annotations

from typing import Any

from .audit import ImageProvider, render_audit, render_audit_html, write_risk_csv

__all__ = ["render_audit", "render_audit_html", "write_risk_csv", "render_duplicates", "render_matches",
           "ImageProvider"]

_GALLERY = ("render_duplicates", "render_matches")


def __getattr__(name: str) -> Any:  # PEP 562: the gallery module loads lazily, and only when asked for
    if name in _GALLERY:
        try:
            from . import gallery
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.gallery":
                raise
            raise ImportError(f"diffaudit.report.{name} is not available: diffaudit/report/gallery.py is missing "
                              "from this installation") from e
        fn = getattr(gallery, name)
        globals()[name] = fn
        return fn
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
