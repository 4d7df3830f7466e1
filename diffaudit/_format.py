"""Number formatting shared by the verdict text and the reports (foundation layer: imports nothing of diffaudit)."""
from __future__ import annotations

import math
from typing import Any


def finite(x: Any) -> float | None:
    """A finite float, or None (None, NaN, inf and non-numbers are all 'missing')."""
    if x is None or isinstance(x, bool):
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def fmt_pct(x: Any) -> str:
    v = finite(x)
    if v is None:
        return "—"
    p = v * 100
    if p != 0 and abs(p) < 0.1:
        return f"{p:.2g}%"
    s = f"{p:.1f}"
    return (s[:-2] if s.endswith(".0") else s) + "%"


def fmt_num(x: Any) -> str:
    v = finite(x)
    if v is None:
        return "—"
    if v == int(v) and abs(v) < 1e6:
        return f"{int(v):,}"
    return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"


def fmt_step(x: Any) -> str:
    v = finite(x)
    return "—" if v is None else f"{int(v):,}"


def fmt_short_step(v: float) -> str:
    a = abs(v)
    for div, suf in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if a >= div:
            s = f"{v / div:.3g}"
            return s + suf
    return f"{int(round(v))}"


def ci_sentence(e: Any) -> str:
    lo, hi = finite(e.low), finite(e.high)
    bits = []
    if lo is not None and hi is not None:
        conf = finite(e.confidence)
        bits.append(f"{fmt_pct(conf) if conf else '95%'} CI {fmt_pct(lo)}–{fmt_pct(hi)}")
    if e.n:
        bits.append(f"n = {int(e.n):,}")
    return f" ({', '.join(bits)})" if bits else ""


def safe_text(value: Any) -> str:
    """``value`` as one terminal-safe line: control characters (ESC, CR, newlines, C1 codes, DEL, ...) written as
    escapes (``\\x1b``, ``\\n``), so a file name cannot move the cursor, clear the screen or forge a new line."""
    s = str(value)
    if all(" " <= ch < "\x7f" or ch > "\x9f" for ch in s):
        return s
    return "".join(ch if (" " <= ch < "\x7f" or ch > "\x9f") else ch.encode("unicode_escape").decode("ascii")
                   for ch in s)
