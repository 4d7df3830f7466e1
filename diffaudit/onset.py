"""The decision rules shared by ``audit()`` and the training-time monitor: memorization onset, the checkpoint to
keep, and the verdict text (pure functions of per-checkpoint results; no framework import).

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

Levels of memorization
----------------------
Copying a training image and fitting the training set are different things (van den Burg & Williams 2021, "On
Memorization in Probabilistic Deep Generative Models"; Carlini et al. 2023, "Extracting Training Data from
Diffusion Models"). The verdict names the worst level the evidence confirms:

* **copies** -- the copy rule's onset is confirmed (above);
* **fits** (memorizes without copying yet) -- no copy onset, but at ``patience`` consecutive checkpoints the model
  tells its training images from held-out ones: membership AUC >= ``FIT_MEMBERSHIP_AUC`` (per-image denoising loss)
  or Meehan et al.'s held-out comparison C_T z <= ``FIT_CT_Z`` (samples closer to training images than unseen
  images are). Needs a held-out set; without one the verdict says it was not measured;
* **generalizes** -- neither.

Near-copies no copy rule counts (Gu et al.'s looser d1/d2 < 1/2) are reported beside the level, never counted as
copies. When the checkpoint to keep lies at or after the start of the "fits" level the verdict says so and names
the last checkpoint before it.
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




# ---------------------------------------------------------------------------------------------------------------
# the verdict: the one place where the decision is put into words (audit.json, the report, the monitor's log)


@dataclass(frozen=True)
class Verdict:
    """The decision in words: ``status`` ("alert" | "warn" | "ok" | "none"), ``badge``, ``headline``, ``lines`` and
    ``rule`` (the report's verdict box); ``text`` = headline and lines, stored as ``AuditResult.verdict`` and
    printed by the CLI."""

    status: str
    badge: str
    headline: str
    lines: tuple[str, ...]
    rule: str
    text: str


def signal_estimate(ck, metric: Optional[str], embedder: Optional[str]):
    """How much copying at checkpoint ``ck``: ``(Estimate, metric, embedder)`` of the onset signal (``metric`` under
    ``embedder``), else the checkpoint's ``onset_signal``, else the first copy-rule estimate it has."""
    from ._format import finite

    def est(m, emb):
        if not m:
            return None, None
        if emb:
            em = ck.metrics.get(emb)
            e = getattr(em, m, None) if em is not None else None
            return (e, emb) if e is not None and hasattr(e, "value") else (None, None)
        for name, em in ck.metrics.items():
            e = getattr(em, m, None)
            if e is not None and hasattr(e, "value") and finite(e.value) is not None:
                return e, name
        return None, None

    e, name = est(metric, embedder)
    if e is not None and finite(e.value) is not None:
        return e, metric, name
    if ck.onset_signal is not None and finite(ck.onset_signal.value) is not None:
        return ck.onset_signal, metric or "signal", embedder
    for m in ("memorization_ratio", "replication_rate", "extraction_fraction"):
        e, name = est(m, None)
        if e is not None:
            return e, m, name
    return None, "", None


def _copy_words(metric: str, embedder: Optional[str], ck) -> str:
    from ._format import finite, fmt_num

    em = ck.metrics.get(embedder) if embedder else None
    by = f" under {embedder}" if embedder else ""
    if metric == "memorization_ratio":
        return f"are memorized copies (nearest training image over 3× closer than the second nearest{by})"
    if metric == "memorization_ratio_half":
        return f"are near-copies (nearest training image over 2× closer than the second nearest{by})"
    if metric == "replication_rate":
        thr = f" above {fmt_num(em.threshold)}" if em is not None and finite(em.threshold) is not None else ""
        return f"replicate a training image (top-1 similarity{thr}{by})"
    if metric == "extraction_fraction":
        return f"are extracted training images (calibrated tiled-L2 ratio{by})"
    return f"pass the onset signal{by}"


# ---------------------------------------------------------------------------------------------------------------
# levels of memorization: copying training images vs fitting them (van den Burg & Williams 2021; Carlini et al. 2023)

#: membership AUC (training vs held-out images told apart by their per-image denoising loss; 0.5 = no difference)
#: at or above which the model fits its training images far more tightly than unseen ones
FIT_MEMBERSHIP_AUC = 0.8
#: Meehan et al. 2020's C_T z-score (samples' distances to the training set against held-out images' distances) at
#: or below which samples sit closer to the training images than unseen real images do (one-sided p ~ 0.001)
FIT_CT_Z = -3.0
#: the level names, from worst
LEVELS = ("copies", "fits", "generalizes")


def fit_evidence(ck, embedder: Optional[str] = None) -> tuple[Optional[bool], list[str]]:
    """Whether checkpoint ``ck`` fits its training images far more tightly than held-out ones, and the signals that
    say so (with their numbers). None when neither signal was measured (no held-out set)."""
    em = ck.metrics.get(embedder) if embedder else None
    auc = getattr(ck, "membership_auc", None)
    z = getattr(em, "heldout_ct_z", None) if em is not None else None
    measured = _valid(auc) or _valid(z)
    out: list[str] = []
    if _valid(auc) and float(auc) >= FIT_MEMBERSHIP_AUC:
        out.append(f"membership AUC {float(auc):.2f} (per-image denoising loss tells training images from held-out "
                   f"ones; 0.5 = no difference, alert at {FIT_MEMBERSHIP_AUC:g})")
    if _valid(z) and float(z) <= FIT_CT_Z:
        out.append(f"held-out comparison C_T z = {float(z):.1f} (samples sit closer to the training images than "
                   f"held-out images do; Meehan et al. 2020, alert at {FIT_CT_Z:g})")
    if not measured:
        return None, []
    return bool(out), out


def fit_onset(rule: OnsetRule, checkpoints: Sequence, embedder: Optional[str] = None) -> Optional[int]:
    """First checkpoint of the "fits" level: fit evidence (:func:`fit_evidence`) at ``rule.patience`` consecutive
    checkpoints where it was measured (the patience of the copy onset)."""
    hist = [(c.step, fit_evidence(c, embedder)[0]) for c in checkpoints if not getattr(c, "failed", "")]
    hist = [(st, f) for st, f in hist if f is not None]
    return detect_onset([st for st, _ in hist], [1.0 if f else 0.0 for _, f in hist], 0.5, rule.patience)


def memorization_level(onset_step: Optional[int], fit_step: Optional[int]) -> str:
    """``"copies"`` when the copy onset is confirmed, else ``"fits"`` when the fit level is, else ``"generalizes"``."""
    if onset_step is not None:
        return "copies"
    return "fits" if fit_step is not None else "generalizes"


def _other_embedder_words(ck, embedder: Optional[str], threshold) -> Optional[str]:
    """When another embedder's copy rule flags many more samples than the one the verdict follows: say which one drives
    the verdict and why, so a high number elsewhere in the report is not read as the verdict's."""
    from ._format import fmt_pct

    if not embedder or embedder not in ck.metrics:
        return None
    thr = float(threshold) if threshold is not None and _valid(threshold) else 0.02
    for name, em in ck.metrics.items():
        if name == embedder:
            continue
        for field in ("replication_rate", "memorization_ratio", "extraction_fraction"):
            est = getattr(em, field, None)
            low = getattr(est, "low", None) if est is not None else None
            if est is not None and _valid(low) and float(low) > thr:
                return (f"{name} flags {fmt_pct(est.value)} of the samples, but the verdict follows {embedder}: the "
                        "copy rules are ranked pixel (Gu et al.), then copy-detection descriptors (Somepalli et al.), "
                        "then tiled L2 (Carlini et al.), and the first embedder present decides; a descriptor with "
                        "untrained or unsuitable weights flags nearly everything -- check it on known copies before "
                        "trusting it, or audit with that embedder alone")
    return None


def _near_copy_words(ck, embedder: Optional[str], signal_metric: str) -> Optional[str]:
    """The share of samples under Gu et al.'s looser ratio d1/d2 < 1/2 when it is well above the copy rule's count:
    noisy or partial reproductions that no copy rule catches."""
    from ._format import fmt_pct

    em = ck.metrics.get(embedder) if embedder else None
    half = getattr(em, "memorization_ratio_half", None) if em is not None else None
    third = getattr(em, signal_metric, None) if em is not None and signal_metric else None
    if half is None or not _valid(half.value) or float(half.value) <= 0:
        return None
    base = float(third.value) if third is not None and _valid(getattr(third, "value", None)) else 0.0
    extra = float(half.value) - base  # under 1/2 but not under the copy rule's 1/3
    if extra < 0.05:
        return None
    return (f"{fmt_pct(extra)} more of the samples are near-copies that the copy rule does not count (nearest "
            f"training image 2-3x closer than the second nearest, 1/3 <= d1/d2 < 1/2: noisy or partial "
            f"reproductions)")


def _ck_words(ck, cks) -> str:
    """``step N``, or for the run root's final model (its step is not recorded; it is ordered after every checkpoint)
    ``the final model, saved after step M``."""
    from ._format import fmt_step

    if not getattr(ck, "final", False):
        return f"step {fmt_step(ck.step)}"
    before = [c.step for c in cks if c.step < ck.step]
    return "the final model" + (f", saved after step {fmt_step(max(before))}" if before else "")


def verdict(checkpoints: Sequence, onset) -> Verdict:
    """The verdict on ``checkpoints`` (CheckpointResult, in step order) given the rule's decision ``onset``
    (an :class:`~diffaudit.results.OnsetInfo`)."""
    from ._format import ci_sentence, finite, fmt_pct, fmt_step
    from .metrics.rules import RULES

    cks = list(checkpoints)
    if not cks:
        return Verdict("none", "No data", "No checkpoints were audited.", (), "", "No checkpoints were audited.")
    first, last = cks[0], cks[-1]
    e, metric, emb = signal_estimate(last, onset.signal_metric, onset.signal_embedder or None)
    rule_of = RULES.get(onset.copy_rule)
    em = last.metrics.get(onset.signal_embedder) if onset.signal_embedder else None
    label = (rule_of.label(onset.signal_embedder, getattr(em, "threshold", None)) if rule_of is not None
             else onset.signal or "the onset signal")
    thr = finite(onset.threshold)
    fit_step = getattr(onset, "fit_step", None)
    fit_sig = list(getattr(onset, "fit_signals", []) or [])
    if onset.onset_step is not None:
        status, badge = "alert", "Copies training images"
        headline = f"Memorization starts at step {fmt_step(onset.onset_step)}: samples copy training images."
    elif fit_step is not None:
        status, badge = "warn", "Memorizes without copying yet"
        headline = (f"No sample passes a copy rule, but from step {fmt_step(fit_step)} the model fits its training "
                    f"images far more tightly than held-out ones: it memorizes without copying yet.")
    else:
        low = None if e is None else (finite(e.low) if finite(e.low) is not None else finite(e.value))
        if low is not None and thr is not None and low > thr:
            status, badge = "warn", "Not yet confirmed"
            headline = (f"Signs of memorization at the last checkpoint ({_ck_words(last, cks)}), "
                        f"not yet confirmed by {int(onset.patience)} consecutive checkpoints.")
        else:
            status, badge = "ok", "Generalizes: no memorization detected"
            span = (f"step {fmt_step(first.step)}" if len(cks) == 1
                    else f"steps {fmt_step(first.step)}–{fmt_step(last.step)}")
            headline = f"No memorization onset across {len(cks)} checkpoint{'s' * (len(cks) != 1)} ({span})."
    lines: list[str] = []
    if e is not None:
        lines.append(f"At the last checkpoint ({_ck_words(last, cks)}), {fmt_pct(e.value)} of generated samples"
                     f"{ci_sentence(e)} {_copy_words(metric, emb, last)}.")
    near = _near_copy_words(last, emb, metric)
    if near:
        lines.append(near[0].upper() + near[1:] + ".")
    other = _other_embedder_words(last, emb, onset.threshold) if onset.onset_step is None else None
    if other:
        lines.append("Note: " + other + ".")
    if fit_sig:
        lines.append(("The model fits its training images far more tightly than held-out ones"
                      + (f" from step {fmt_step(fit_step)}" if fit_step is not None else " at the last checkpoint")
                      + ": " + "; ".join(fit_sig) + "."))
    elif fit_step is None and not any(fit_evidence(c, emb)[0] is not None for c in cks):
        lines.append("Without a held-out set, whether the model fits its training images more tightly than unseen "
                     "ones (membership, held-out comparison) was not measured; only copies were looked for.")
    failed = [c.step for c in cks if getattr(c, "failed", "")]
    if failed:
        lines.append(f"{len(failed)} checkpoint{'s' * (len(failed) != 1)} FAILED and could not be evaluated (step"
                     f"{'s' * (len(failed) != 1)} {', '.join(fmt_step(s) for s in failed)}: every sample NaN/inf); "
                     "they count neither as copying nor as clean.")
    if onset.tau_gen is not None:
        copying = getattr(onset, "copying_step", None)
        end = (f"the onset at step {fmt_step(onset.onset_step)}" if onset.onset_step is not None else
               f"the first checkpoint with copies (step {fmt_step(copying)})" if copying is not None else
               "the last checkpoint")
        lines.append(f"Sample quality reaches its plateau at step {fmt_step(onset.tau_gen)} (tau_gen)"
                     + (", no earlier than memorization starts: there is no checkpoint that generalizes well and "
                        "does not copy yet." if onset.window_empty else
                        f"; the stop window runs from there to {end}."))
    keep_ck = next((c for c in cks if c.step == onset.recommended_step), None)
    reason = (onset.recommended_reason or "").strip().rstrip(".")
    keep_after_fit = (fit_step is not None and onset.recommended_step is not None
                      and int(onset.recommended_step) >= int(fit_step))
    if keep_ck is not None:
        lines.append((f"Keep the final model ({keep_ck.path}; {_ck_words(keep_ck, cks)})" if getattr(keep_ck, "final", False)
                      else f"Keep the checkpoint at step {fmt_step(keep_ck.step)} ({keep_ck.path})")
                     + (f": {reason}." if reason else "."))
    elif onset.recommended_step is not None:
        lines.append(f"Keep the checkpoint at step {fmt_step(onset.recommended_step)}.")
    else:
        lines.append("No checkpoint is recommended" + (f": {reason}." if reason else "."))
    if keep_after_fit:
        before = [c.step for c in cks if c.step < int(fit_step) and not getattr(c, "failed", "")]
        lines.append(f"Note: that checkpoint comes after the model starts fitting its training images (step "
                     f"{fmt_step(fit_step)})" + (f"; the last checkpoint before that is step {fmt_step(before[-1])}."
                                                 if before else "; no checkpoint before that was evaluated."))
    rule = ""
    if thr is not None:
        conf = fmt_pct(onset.confidence) if finite(onset.confidence) else "95%"
        rule = (f"Onset rule: the lower bound of the {conf} confidence interval of {label} exceeds "
                f"{fmt_pct(thr)} at a checkpoint and stays above it for {int(onset.patience)} consecutive "
                f"checkpoint{'s' * (int(onset.patience) != 1)}.")
    text = " ".join([headline, *lines])
    return Verdict(status, badge, headline, tuple(lines), rule, text)


# ---------------------------------------------------------------------------------------------------------------
# the decision over a run's checkpoint results (shared by audit() and MemorizationMonitor)


def onset_of(rule: OnsetRule, checkpoints: Sequence) -> Optional[int]:
    """The onset step of ``rule`` over checkpoint results: the evaluations that measured the onset signal (a
    loss-only evaluation of the monitor, or a checkpoint whose samples were all NaN, neither confirms nor breaks a
    run)."""
    sampled = [c for c in checkpoints if c.onset_signal is not None]
    return rule.detect([c.step for c in sampled], [c.onset_signal.low for c in sampled])


def quality_of(ck, embedder: Optional[str] = None):
    """The sample-quality Estimate the stop window reads at checkpoint ``ck``: the Frechet distance under
    ``embedder`` (default: the first embedder that has one); None when not measured."""
    names = [embedder] if embedder else list(ck.metrics)
    for name in names:
        em = ck.metrics.get(name)
        q = getattr(em, "quality", None) if em is not None else None
        if q is not None and q.fd is not None and _valid(q.fd.value):
            return q.fd
    return None


def tau_gen(steps: Sequence[int], fds: Sequence) -> Optional[int]:
    """When sample quality reaches its plateau (Bonnaire, Urfin, Biroli & Mezard 2025, tau_gen): the first evaluated
    step whose quality is within its confidence interval of the best quality the run reaches, i.e. whose Frechet
    distance CI lower bound is at or below the lowest FD of any checkpoint. None without quality measurements.
    ``fds``: per step an Estimate (value, low, high) or None."""
    hist = [(s, e) for s, e in _sorted_history(steps, fds, "fds") if e is not None and _valid(e.value)]
    if not hist:
        return None
    best = min(float(e.value) for _, e in hist)
    for s, e in hist:
        low = float(e.low) if _valid(e.low) else float(e.value)
        if low <= best:
            return s
    return None  # pragma: no cover - the best checkpoint itself qualifies


def recommend_in_window(steps: Sequence[int], fds: Sequence, onset_step: Optional[int],
                        tau_gen_step: Optional[int]) -> Recommendation:
    """The checkpoint to keep by the stop window [tau_gen, tau_mem) (Bonnaire et al. 2025; Favero et al. 2025):
    the best-quality (lowest FD) checkpoint at or after ``tau_gen_step`` and strictly before ``onset_step`` (the
    memorization onset, tau_mem; no onset: up to the last checkpoint). When the window is empty -- memorization
    starts before quality plateaus -- the best-quality checkpoint before the onset, and the reason says so; None
    when the onset is at the first checkpoint."""
    hist = [(s, e) for s, e in _sorted_history(steps, fds, "fds") if e is not None and _valid(e.value)]
    before = [(s, e) for s, e in hist if onset_step is None or s < int(onset_step)]
    end = "the last checkpoint" if onset_step is None else f"the memorization onset at step {int(onset_step)}"
    window = [(s, e) for s, e in before if tau_gen_step is not None and s >= int(tau_gen_step)]
    if window:
        s, e = min(window, key=lambda p: (float(p[1].value), -p[0]))
        return Recommendation(s, f"best sample quality (Frechet distance {float(e.value):.4g}) in the stop window "
                                 f"from quality's plateau at step {int(tau_gen_step)} to {end}")
    if onset_step is None:  # no plateau found (no quality CI at all): the best quality of the run
        s, e = min(before, key=lambda p: (float(p[1].value), -p[0]))
        return Recommendation(s, f"best sample quality of the run (Frechet distance {float(e.value):.4g})")
    if not before:
        return Recommendation(None, f"{end} comes before any checkpoint with measured quality; evaluate earlier "
                                    "checkpoints or retrain with fewer steps / more data")
    s, e = min(before, key=lambda p: (float(p[1].value), -p[0]))
    return Recommendation(s, f"the stop window is empty: memorization starts (step {int(onset_step)}) no later than "
                             f"sample quality reaches its plateau (step {tau_gen_step}); best compromise: the best "
                             f"quality before the onset (Frechet distance {float(e.value):.4g})")


def recommendation_for(checkpoints: Sequence, onset_step: Optional[int], quality_embedder: Optional[str] = None,
                       threshold: Optional[float] = None) -> Recommendation:
    """The checkpoint to keep: by the stop window when sample quality was measured (:func:`recommend_in_window`),
    else by held-out denoising loss before the onset (:func:`recommend_checkpoint`)."""
    return _decide(checkpoints, onset_step, quality_embedder, threshold)[0]


def first_copying_step(checkpoints: Sequence, threshold: Optional[float]) -> Optional[int]:
    """The first checkpoint whose onset signal's CI lower bound exceeds ``threshold`` (copies shown there, confirmed
    or not by the later checkpoints)."""
    if threshold is None:
        return None
    for c in sorted(checkpoints, key=lambda c: c.step):
        sig = getattr(c, "onset_signal", None)
        low = getattr(sig, "low", None) if sig is not None else None
        if not getattr(c, "failed", "") and _valid(low) and float(low) > float(threshold):
            return int(c.step)
    return None


def _decide(checkpoints: Sequence, onset_step: Optional[int], quality_embedder: Optional[str],
            threshold: Optional[float] = None) -> tuple[Recommendation, Optional[int]]:
    """(the checkpoint to keep, tau_gen) over checkpoint results. Without a confirmed onset, a checkpoint that
    already shows copies (CI lower bound over ``threshold``, not yet for ``patience`` checkpoints) still ends the
    candidates: the tool never recommends a checkpoint it has seen copy."""
    steps = [c.step for c in checkpoints]
    fds = [quality_of(c, quality_embedder) for c in checkpoints]
    tg = tau_gen(steps, fds)
    end = onset_step if onset_step is not None else first_copying_step(checkpoints, threshold)
    if any(f is not None for f in fds):
        rec = recommend_in_window(steps, fds, end, tg)
    else:
        rec = recommend_checkpoint(
            steps, end, heldout_losses=[c.loss_heldout for c in checkpoints],
            signal_values=[c.onset_signal.value if c.onset_signal is not None else None for c in checkpoints])
    if onset_step is None and end is not None:  # say that the end is unconfirmed copying, not the onset
        rec = Recommendation(rec.step, rec.reason.replace(f"memorization onset at step {int(end)}",
                                                          f"first checkpoint with copies (step {int(end)}, not yet "
                                                          "confirmed)").replace(
            f"memorization starts (step {int(end)})", f"copies appear (step {int(end)})").replace(
            "the best quality before the onset", "the best quality before them"))
    return rec, tg


def onset_info(rule: OnsetRule, checkpoints: Sequence, *, copy_rule: str, signal_metric: str, signal_embedder: str,
               onset_step: Optional[int] = None, decided: bool = False):
    """The :class:`~diffaudit.results.OnsetInfo` of a run: the rule's parameters, its onset step (computed unless
    ``decided``) and the checkpoint to keep."""
    from .results import OnsetInfo

    if not decided:
        onset_step = onset_of(rule, checkpoints)
    rec, tg = _decide(checkpoints, onset_step, signal_embedder, rule.threshold)
    copying = first_copying_step(checkpoints, rule.threshold)
    end = onset_step if onset_step is not None else copying  # the stop window ends at the first copies seen
    fit_step = fit_onset(rule, checkpoints, signal_embedder)
    measured = [c for c in checkpoints if fit_evidence(c, signal_embedder)[0] is not None]
    fit_signals = fit_evidence(measured[-1], signal_embedder)[1] if measured else []
    return OnsetInfo(level=memorization_level(onset_step, fit_step), fit_step=fit_step, fit_signals=fit_signals,
                     signal=f"{signal_metric}[{signal_embedder}]", threshold=rule.threshold, patience=rule.patience,
                     confidence=rule.confidence, onset_step=onset_step, recommended_step=rec.step,
                     recommended_reason=rec.reason, copy_rule=copy_rule, signal_metric=signal_metric,
                     signal_embedder=signal_embedder, tau_gen=tg,
                     window_empty=tg is not None and end is not None and int(end) <= tg, copying_step=copying)


#: how the onset rule reads in provenance records
ONSET_RULE_TEXT = "CI lower bound > threshold at `patience` consecutive checkpoints (diffaudit.onset)"
