"""The demo's index page: the small and the large run side by side, with links to their audit reports."""
from __future__ import annotations

import os
from typing import Optional

from ._html import render_page


def render_demo_index(path: str | os.PathLike, rows: list[dict]) -> str:
    """``rows``: per run ``label``, ``n_train``, ``last`` (the last checkpoint's onset-signal Estimate or None),
    ``onset``, ``monitor`` (flag step or None), ``keep`` (recommended step or None). Writes ``path``."""
    def step(v: Optional[int]) -> str:
        return "none" if v is None else str(v)

    view = []
    for r in rows:
        e = r.get("last")
        frac = f"{e.value:.0%} ({e.low:.0%}-{e.high:.0%})" if e is not None and e.low is not None else "-"
        view.append({"label": r["label"], "n_train": r["n_train"], "memorized": frac, "onset": step(r["onset"]),
                     "monitor": step(r["monitor"]), "keep": step(r["keep"]), "href": f"{r['label']}/audit/report.html"})
    render_page("demo_index.html.j2", title="diffaudit demo: memorization vs generalization on digits",
                subtitle="scikit-learn's 8x8 digits, one tiny UNet, two training-set sizes", path=path, rows=view)
    return str(path)
