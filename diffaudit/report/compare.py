"""The disjoint-split page (:class:`~diffaudit.results.CompareResult`): agreement of the two runs and each run's
copies of its own training set per checkpoint, as a chart and a table (template ``compare.html.j2``)."""
from __future__ import annotations

import os

from .._format import fmt_pct, fmt_step
from ..results import CompareResult
from ._html import render_page
from .audit import PALETTE, Series, line_chart


def render_compare(result: CompareResult, path: str | os.PathLike | None = None) -> str:
    """HTML for ``result``; written to ``path`` when given. Returns the HTML."""
    if not isinstance(result, CompareResult):
        raise TypeError(f"result: expected a CompareResult, got {type(result).__name__}")
    cks = result.checkpoints

    def pts(get):
        return [(float(c.step), get(c).value, get(c).low, get(c).high) for c in cks]

    chart = line_chart([Series("agreement of A and B", pts(lambda c: c.agreement), PALETTE[0]),
                        Series("A copies its own set", pts(lambda c: c.copies_a), PALETTE[1]),
                        Series("B copies its own set", pts(lambda c: c.copies_b), PALETTE[2])],
                       steps=[c.step for c in cks], title="Disjoint-split test", fmt=fmt_pct, percent=True) \
        if cks else None
    rows = [{"step": fmt_step(c.step), "n": c.num_samples, "agree": _ci(c.agreement), "a": _ci(c.copies_a),
             "b": _ci(c.copies_b), "dab": f"{c.median_distance_ab:.4g}", "dtrain": f"{c.median_distance_train:.4g}"}
            for c in cks]
    return render_page("compare.html.j2", title="Disjoint-split test", subtitle=f"{result.run_a} vs {result.run_b}",
                       path=path, r=result, chart=chart, rows=rows)


def _ci(e) -> str:
    return f"{fmt_pct(e.value)} ({fmt_pct(e.low)}–{fmt_pct(e.high)})"
