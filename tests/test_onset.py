"""Onset rule (diffaudit.monitor): table-driven cases, incremental use, checkpoint recommendation."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diffaudit.metrics import proportion_estimate
from diffaudit.monitor import OnsetRule, Recommendation, detect_onset, recommend_checkpoint

STEPS = [500, 1000, 1500, 2000, 2500, 3000]

CASES = [
    # (lows, threshold, patience, expected onset, why)
    ([0, 0, 0, 0, 0, 0], 0.02, 2, None, "never above"),
    ([0, 0.05, 0.06, 0.07, 0.08, 0.09], 0.02, 2, 1000, "sustained from 1000"),
    ([0, 0.05, 0, 0.05, 0, 0.05], 0.02, 2, None, "single-checkpoint blips are ignored"),
    ([0, 0.05, 0, 0.05, 0.06, 0], 0.02, 2, 2000, "first run of length >= patience"),
    ([0, 0.05, 0.06, 0, 0.07, 0.08], 0.02, 3, None, "runs of 2 do not satisfy patience 3"),
    ([0, 0.05, 0.06, 0.07, 0, 0], 0.02, 3, 1000, "a confirmed run stays confirmed when it later drops"),
    ([0, 0, 0, 0, 0, 0.5], 0.02, 2, None, "last step alone: not yet confirmed"),
    ([0, 0, 0, 0, 0, 0.5], 0.02, 1, 3000, "patience 1 confirms at once"),
    ([0.02, 0.02, 0.02, 0.02, 0.02, 0.02], 0.02, 2, None, "lower bound must exceed, not equal"),
    ([0.3, 0.3, 0, 0, 0, 0], 0.02, 2, 500, "onset at the first checkpoint"),
    ([0, 0.05, None, 0.05, 0.06, 0], 0.02, 2, 2000, "a missing value breaks a run"),
    ([0, 0.05, math.nan, 0.05, 0.06, 0], 0.02, 2, 2000, "NaN breaks a run"),
    ([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], 0.25, 2, 1500, "threshold is respected"),
]


@pytest.mark.parametrize("lows,threshold,patience,expected,why", CASES, ids=[c[-1] for c in CASES])
def test_detect_onset_table(lows, threshold, patience, expected, why):
    assert detect_onset(STEPS, lows, threshold, patience) == expected, why
    assert OnsetRule(threshold, patience).detect(STEPS, lows) == expected


def test_detect_onset_unsorted_steps_and_empty():
    lows = [0, 0.05, 0.06, 0, 0, 0]
    order = [3, 0, 5, 1, 4, 2]
    assert detect_onset([STEPS[i] for i in order], [lows[i] for i in order]) == 1000
    assert detect_onset([], []) is None


@pytest.mark.parametrize("kwargs,match", [
    (dict(steps=[1, 2], lows=[0.1]), "same length"),
    (dict(steps=[1, 1], lows=[0.1, 0.1]), "unique"),
    (dict(steps=[1], lows=[0.1], patience=0), "patience"),
    (dict(steps=[1], lows=[0.1], threshold=math.nan), "threshold"),
])
def test_detect_onset_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        detect_onset(**kwargs)


def test_onset_rule_validation_and_defaults():
    r = OnsetRule()
    assert (r.threshold, r.patience, r.confidence) == (0.02, 2, 0.95)
    with pytest.raises(ValueError, match="confidence"):
        OnsetRule(confidence=1.0)


def reference_onset(lows, threshold, patience):
    """Independent reference: scan every candidate start and look ahead."""
    n = len(lows)
    for s in range(n):
        window = lows[s:s + patience]
        if len(window) == patience and all(x is not None and x > threshold for x in window):
            return s
    return None


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.none(), st.floats(0, 0.1)), max_size=12), st.integers(1, 4),
       st.sampled_from([0.0, 0.02, 0.05]))
def test_detect_onset_matches_lookahead_reference_and_incremental(lows, patience, threshold):
    steps = [100 * (i + 1) for i in range(len(lows))]
    ref = reference_onset(lows, threshold, patience)
    got = detect_onset(steps, lows, threshold, patience)
    assert got == (None if ref is None else steps[ref])
    # incremental use (the monitor): the first prefix at which onset is confirmed gives the same step,
    # and once confirmed it never changes
    seen = None
    for i in range(1, len(lows) + 1):
        now = detect_onset(steps[:i], lows[:i], threshold, patience)
        if seen is not None:
            assert now == seen
        seen = now if now is not None else seen
    assert seen == got


def test_noisy_signal_with_real_intervals():
    """Fractions whose true value sits at 0 with rare chance copies: the Wilson lower bound stays below 2%."""
    rng = np.random.default_rng(0)
    lows = []
    for i, p in enumerate([0.0, 0.005, 0.0, 0.01, 0.005, 0.0]):
        lows.append(proportion_estimate(rng.random(256) < p).low)
    assert detect_onset(STEPS, lows) is None
    lows_mem = [proportion_estimate(rng.random(256) < p).low for p in [0.0, 0.0, 0.1, 0.15, 0.2, 0.3]]
    assert detect_onset(STEPS, lows_mem) == 1500


# ---------------------------------------------------------------- recommendation

def test_recommend_lowest_heldout_loss_before_onset():
    losses = [0.30, 0.25, 0.20, 0.10, 0.05, 0.04]
    rec = recommend_checkpoint(STEPS, 2000, heldout_losses=losses)
    assert isinstance(rec, Recommendation) and rec.step == 1500
    assert "held-out" in rec.reason and "2000" in rec.reason
    # U-shaped validation loss: the minimum before onset, not the latest
    rec = recommend_checkpoint(STEPS, 3000, heldout_losses=[0.3, 0.2, 0.1, 0.15, 0.2, 0.25])
    assert rec.step == 1500


def test_recommend_without_losses_and_without_onset():
    assert recommend_checkpoint(STEPS, 2000).step == 1500
    assert "latest checkpoint before onset" in recommend_checkpoint(STEPS, 2000).reason
    rec = recommend_checkpoint(STEPS, None)
    assert rec.step == 3000 and "no memorization onset" in rec.reason
    assert recommend_checkpoint(STEPS, None, heldout_losses=[0.3, 0.2, 0.1, 0.15, 0.2, 0.25]).step == 1500


def test_recommend_edge_cases():
    rec = recommend_checkpoint(STEPS, 500, heldout_losses=[0.1] * 6)
    assert rec.step is None and "no earlier checkpoint" in rec.reason
    # missing losses are skipped; all missing -> latest before onset
    assert recommend_checkpoint(STEPS, 3000, heldout_losses=[None, 0.2, None, 0.3, math.nan, 0.1]).step == 1000
    assert recommend_checkpoint(STEPS, 3000, heldout_losses=[None] * 6).step == 2500
    # equal losses: lower signal wins, then the later step
    assert recommend_checkpoint(STEPS, None, [0.1] * 6, signal_values=[0.5, 0.0, 0.0, 0.3, 0.3, 0.3]).step == 1500
    assert recommend_checkpoint(STEPS, None, [0.1] * 6).step == 3000
    assert recommend_checkpoint([], None).step is None
    with pytest.raises(ValueError, match="heldout_losses"):
        recommend_checkpoint(STEPS, None, heldout_losses=[0.1])


# ---------------------------------------------------------------------------------------------------------------
# levels of memorization and near-copies in the verdict


def _ck(step, third, half, auc=None, z=None):
    from diffaudit.results import CheckpointResult, EmbedderMetrics, Estimate

    m = EmbedderMetrics("pixel-8x8", "l2", None, 100,
                        memorization_ratio=Estimate(third, max(0.0, third - 0.03), third + 0.03, 100),
                        memorization_ratio_half=Estimate(half, half, half, 100), heldout_ct_z=z)
    return CheckpointResult(step, f"s{step}", 100, metrics={"pixel-8x8": m}, membership_auc=auc,
                            onset_signal=m.memorization_ratio)


def _info(cks):
    from diffaudit.onset import onset_info

    return onset_info(OnsetRule(), cks, copy_rule="gu", signal_metric="memorization_ratio",
                      signal_embedder="pixel-8x8")


def test_fit_level_needs_patience_and_is_named_with_its_numbers():
    from diffaudit.onset import verdict

    cks = [_ck(100, 0.0, 0.0, 0.6, 1.0), _ck(200, 0.0, 0.13, 0.95, -7.5), _ck(300, 0.0, 0.13, 1.0, -7.5)]
    info = _info(cks)
    assert (info.level, info.fit_step, info.onset_step) == ("fits", 200, None)
    v = verdict(cks, info)
    assert v.badge == "Memorizes without copying yet" and "from step 200" in v.headline
    assert "membership AUC 1.00" in v.text and "C_T z = -7.5" in v.text
    assert "13.0% more of the samples are near-copies" in v.text or "13% more of the samples" in v.text
    # one checkpoint of fit evidence is not a level (patience 2), as for the copy onset
    info2 = _info(cks[:2])
    assert info2.level == "generalizes" and info2.fit_step is None


def test_recommended_checkpoint_after_the_fit_level_is_called_out():
    from diffaudit.onset import verdict

    cks = [_ck(100, 0.0, 0.0, 0.5, 0.5), _ck(200, 0.0, 0.0, 0.9, -4.0), _ck(300, 0.0, 0.0, 0.95, -5.0)]
    info = _info(cks)
    assert info.fit_step == 200 and info.recommended_step >= 200  # no held-out loss: the latest checkpoint
    assert "comes after the model starts fitting its training images (step 200)" in verdict(cks, info).text
    assert "the last checkpoint before that is step 100" in verdict(cks, info).text


def test_without_heldout_the_fit_level_is_not_measured():
    from diffaudit.onset import verdict

    cks = [_ck(100, 0.0, 0.0), _ck(200, 0.0, 0.0)]
    info = _info(cks)
    assert info.level == "generalizes"
    assert "Without a held-out set" in verdict(cks, info).text


def test_a_checkpoint_seen_copying_is_never_recommended_even_unconfirmed():
    """Copies at the last checkpoint only (not yet `patience` checkpoints): no onset, but the stop window ends there,
    the recommendation is an earlier checkpoint, and the verdict says why."""
    from diffaudit.onset import verdict

    cks = [_ck(100, 0.0, 0.0), _ck(200, 0.0, 0.0), _ck(300, 0.5, 0.5)]
    info = _info(cks)
    assert info.onset_step is None and info.copying_step == 300
    assert info.recommended_step in (100, 200)
    assert "first checkpoint with copies (step 300" in verdict(cks, info).text
    clean = _info(cks[:2])
    assert clean.copying_step is None and clean.recommended_step == 200
