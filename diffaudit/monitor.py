"""Memorization onset: the one rule shared by ``audit()`` and the training-time monitor (no framework import).

Onset rule
----------
At each evaluated checkpoint the audit computes an onset *signal* -- a fraction of copied samples with a
confidence interval (``Estimate``; Wilson score interval, see ``diffaudit.metrics.stats``). Memorization onset is
the first evaluated step ``s`` such that the CI **lower bound** exceeds ``threshold`` at ``s`` and at the next
``patience - 1`` evaluated steps:

* the lower bound makes one checkpoint's evidence count only when the fraction is *significantly* above the
  threshold at the chosen confidence (a handful of chance near-copies among a few hundred samples is not enough);
* ``patience`` consecutive confirmations ignore isolated blips (sampling noise, a bad checkpoint);
* the onset is reported at the *first* step of the confirming run, so it does not lag by ``patience - 1`` steps.

While fewer than ``patience`` evaluations exist after a candidate step, onset is *not yet confirmed* and the result
is ``None``; the monitor calls :func:`detect_onset` on the whole history after each evaluation and stops training
the first time it returns a step. Missing lower bounds (``None``/NaN: not computed) break a run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

DEFAULT_THRESHOLD = 0.02
DEFAULT_PATIENCE = 2
DEFAULT_CONFIDENCE = 0.95


def _check_rule(threshold: float, patience: int) -> None:
    if not math.isfinite(float(threshold)):
        raise ValueError(f"threshold={threshold!r} must be a finite number (e.g. 0.02 = 2% of samples)")
    if int(patience) != patience or patience < 1:
        raise ValueError(f"patience={patience!r} must be an integer >= 1")


def _sorted_history(steps: Sequence[int], values: Sequence, name: str) -> list[tuple[int, object]]:
    steps = [int(s) for s in steps]
    values = list(values)
    if len(steps) != len(values):
        raise ValueError(f"steps and {name} must have the same length; got {len(steps)} and {len(values)}")
    if len(set(steps)) != len(steps):
        dup = sorted({s for s in steps if steps.count(s) > 1})
        raise ValueError(f"steps must be unique; repeated: {dup}")
    return sorted(zip(steps, values), key=lambda p: p[0])


def _valid(x) -> bool:
    return x is not None and math.isfinite(float(x))


def detect_onset(steps: Sequence[int], lows: Sequence[Optional[float]], threshold: float = DEFAULT_THRESHOLD,
                 patience: int = DEFAULT_PATIENCE) -> Optional[int]:
    """First evaluated step whose CI lower bound, and those of the next ``patience - 1`` evaluated steps, are all
    ``> threshold``; ``None`` when no such run is (yet) complete. Steps need not be given in order."""
    _check_rule(threshold, patience)
    hist = _sorted_history(steps, lows, "lows")
    run_start, run_len = None, 0
    for step, low in hist:
        if _valid(low) and float(low) > threshold:
            if run_len == 0:
                run_start = step
            run_len += 1
            if run_len >= patience:
                return run_start
        else:
            run_start, run_len = None, 0
    return None


@dataclass(frozen=True)
class OnsetRule:
    """Parameters of the onset rule; ``confidence`` is the CI level the signal's lower bound is computed at."""

    threshold: float = DEFAULT_THRESHOLD
    patience: int = DEFAULT_PATIENCE
    confidence: float = DEFAULT_CONFIDENCE

    def __post_init__(self) -> None:
        _check_rule(self.threshold, self.patience)
        if not 0.0 < float(self.confidence) < 1.0:
            raise ValueError(f"confidence={self.confidence!r} must be strictly between 0 and 1")

    def detect(self, steps: Sequence[int], lows: Sequence[Optional[float]]) -> Optional[int]:
        return detect_onset(steps, lows, self.threshold, self.patience)


class Recommendation(NamedTuple):
    step: Optional[int]
    reason: str


def recommend_checkpoint(steps: Sequence[int], onset_step: Optional[int],
                         heldout_losses: Optional[Sequence[Optional[float]]] = None,
                         signal_values: Optional[Sequence[Optional[float]]] = None) -> Recommendation:
    """The checkpoint to keep: ``(step, reason)``.

    Candidates are the checkpoints strictly before ``onset_step`` (all of them when there is no onset). Among them,
    the one with the lowest held-out denoising loss (the generalization criterion: early stopping on validation
    loss) when losses are given; ties go to the lower onset signal, then to the later step. Without held-out losses,
    the latest candidate (most trained before memorization). ``step`` is ``None`` when onset is at the first
    evaluated checkpoint (no clean checkpoint was evaluated).
    """
    steps = [int(s) for s in steps]
    base = _sorted_history(steps, [None] * len(steps), "steps")
    all_steps = [s for s, _ in base]
    if not all_steps:
        return Recommendation(None, "no checkpoints were evaluated")
    losses = dict(_sorted_history(steps, heldout_losses, "heldout_losses")) if heldout_losses is not None else {}
    signal = dict(_sorted_history(steps, signal_values, "signal_values")) if signal_values is not None else {}
    cand = all_steps if onset_step is None else [s for s in all_steps if s < int(onset_step)]
    where = "no memorization onset was detected" if onset_step is None else \
        f"memorization onset at step {int(onset_step)}"
    if not cand:
        return Recommendation(None, f"{where} and no earlier checkpoint was evaluated; evaluate earlier "
                                    "checkpoints or retrain with fewer steps / more data")
    with_loss = [s for s in cand if _valid(losses.get(s))]
    if with_loss:
        def key(s: int):
            sig = signal.get(s)
            return (float(losses[s]), float(sig) if _valid(sig) else math.inf, -s)

        best = min(with_loss, key=key)
        scope = "all checkpoints" if onset_step is None else f"checkpoints before step {int(onset_step)}"
        return Recommendation(best, f"{where}; lowest held-out denoising loss ({float(losses[best]):.6g}) among "
                                    f"{scope} with a held-out loss ({len(with_loss)})")
    best = max(cand)
    if onset_step is None:
        return Recommendation(best, f"{where}; latest checkpoint (no held-out loss to compare checkpoints)")
    return Recommendation(best, f"{where}; latest checkpoint before onset (no held-out loss to compare checkpoints)")
