"""HTML reports (one self-contained file each, Jinja templates in ``templates/``) and the risk CSV.

- :func:`render_audit` / :func:`render_audit_html`: an :class:`~diffaudit.results.AuditResult` as a report.
- :func:`render_duplicates`, :func:`render_matches`: curator pages for ``find_duplicates`` / ``match`` results.
- :func:`render_loo`: the leave-one-out page; :func:`write_risk_csv`: the per-training-image risk table as CSV.
"""
from __future__ import annotations

from ..results import write_risk_csv
from .audit import ImageProvider, render_audit, render_audit_html
from .gallery import render_duplicates, render_matches
from .loo import render_loo

__all__ = ["render_audit", "render_audit_html", "write_risk_csv", "render_duplicates", "render_matches",
           "render_loo", "ImageProvider"]
