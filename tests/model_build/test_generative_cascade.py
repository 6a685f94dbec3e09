"""The cascade calibration's decision (tandem.cloud.build.generative_cascade), on records
made by hand: which threshold it picks, its fallbacks, and its option errors."""

from __future__ import annotations

import pytest

from tandem.cloud.build.generative_cascade import (
    CascadeOptions,
    Record,
    calibrate,
    hand_off,
    replay,
)
from tandem.errors import ConfigError
from tandem.sdk.generation.session import DEFAULT_CASCADE_THRESHOLD


def _record(confidences: list[float], agrees: list[bool]) -> Record:
    return Record(tuple(confidences), tuple(agrees))


# Confident and right, then unsure and wrong: the gate should trip where confidence drops.
SURE = _record([0.9, 0.9, 0.9, 0.9, 0.9, 0.9], [True] * 6)
FADES = _record([0.9, 0.9, 0.8, 0.3, 0.2, 0.2, 0.2], [True, True, True, False, False, True, False])
LATE = _record([0.9, 0.8, 0.8, 0.7, 0.4, 0.3], [True, True, True, True, False, False])
RECORDS = [SURE, FADES, LATE, SURE]


def test_hand_off_follows_the_sdk_rule() -> None:
    # Window 2 over FADES: means 0.9, 0.85, 0.55, 0.25 (at its 5th token, which stays local).
    assert hand_off(FADES.confidences, 0.5, 2) == 5
    assert hand_off(FADES.confidences, 0.0, 2) == 7
    # The last token never trips the gate: nothing is left to hand over.
    assert hand_off([0.9, 0.1], 1.0, 2) == 2
    assert hand_off([0.9, 0.9, 0.1], 1.0, 2) == 2


def test_picks_the_threshold_keeping_most_tokens_local_at_the_target() -> None:
    options = CascadeOptions(window=2, target=1.0, min_prompts=4)
    result = calibrate(RECORDS, options)
    assert result.calibrated and result.target_met
    chosen = replay(RECORDS, result.threshold, 2)
    assert chosen.local_agreement == 1.0
    # Exhaustive over a fine grid: nothing keeps more tokens local while meeting the target.
    for step in range(1001):
        other = replay(RECORDS, step / 1000, 2)
        assert not (other.local_tokens > chosen.local_tokens and other.local_agreement >= 1.0)
    # By hand: a threshold in (0.85, 0.9) hands FADES over after its 3 right tokens (its
    # running mean falls to 0.85) and LATE after 2 (0.85 at once); SURE stays local (0.9).
    assert 0.85 < result.threshold < 0.9
    assert (chosen.local_tokens, chosen.escalations) == (6 + 3 + 2 + 6, 2)
    assert result.generation_config() == {
        "cascade_threshold": result.threshold,
        "cascade_window": 2,
        "cascade_target": 1.0,
    }
    figures = result.report()
    assert figures["cascade_local_share"] == pytest.approx(
        chosen.local_tokens / sum(len(r.agrees) for r in RECORDS), abs=1e-4
    )
    assert figures["cascade_escalated_agreement"] < figures["cascade_local_agreement"]


def test_a_lower_target_keeps_more_local() -> None:
    # 0.9: FADES keeps its first wrong token, LATE hands over at its 0.55 (21 tokens, 19 right).
    result = calibrate(RECORDS, CascadeOptions(window=2, target=0.9, min_prompts=4))
    assert 0.55 < result.threshold < 0.75
    assert (result.outcome.local_tokens, result.outcome.local_hits) == (21, 19)
    # Met by all the tokens: nothing is handed over.
    result = calibrate(RECORDS, CascadeOptions(window=2, target=0.5, min_prompts=4))
    assert result.threshold == 0.0 and result.outcome.escalations == 0


def test_an_unreachable_target_writes_the_threshold_closest_to_it() -> None:
    # Wrong first: handing over early keeps the miss and drops the right tokens after it.
    wrong_early = _record([0.9, 0.9, 0.5, 0.5], [False, True, True, True])
    records = [wrong_early] * 4
    result = calibrate(records, CascadeOptions(window=2, target=1.0, min_prompts=4))
    assert result.calibrated and not result.target_met
    assert result.threshold == 0.0 and result.outcome.local_agreement == 0.75
    assert "not reachable" in result.reason
    # The first full window holds a miss, so 100% is out of reach; handing over after the
    # third token (running mean 0.55) keeps 2 of 3 right, better than any other split.
    wrong_late = _record([0.9, 0.9, 0.2, 0.2, 0.2], [True, False, True, False, False])
    result = calibrate([wrong_late] * 4, CascadeOptions(window=2, target=1.0, min_prompts=4))
    assert not result.target_met and 0.55 < result.threshold < 0.9
    assert result.outcome.local_tokens == 3 * 4 and result.outcome.local_hits == 2 * 4


def test_too_few_prompts_fall_back_to_the_sdk_default() -> None:
    result = calibrate(RECORDS[:2], CascadeOptions(window=2, target=0.95, min_prompts=4))
    assert not result.calibrated
    assert result.threshold == DEFAULT_CASCADE_THRESHOLD
    assert "not calibrated: 2 held-out prompts" in result.reason
    # Continuations too short for the window: no window, the default again.
    short = calibrate([_record([0.9, 0.1], [True, False])] * 5, CascadeOptions(2, 0.9, 4))
    assert not short.calibrated and short.threshold == DEFAULT_CASCADE_THRESHOLD


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"cascade_window": 0}, "cascade_window"),
        ({"cascade_window": 2.5}, "cascade_window"),
        ({"cascade_window": 32}, "cascade_window"),  # not below steps
        ({"cascade_target": 0.0}, "cascade_target"),
        ({"cascade_target": 1.5}, "cascade_target"),
        ({"cascade_target": "high"}, "cascade_target"),
        ({"cascade_min_prompts": 0}, "cascade_min_prompts"),
    ],
)
def test_bad_options_name_the_field(options: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        CascadeOptions.from_options(options, steps=32)
    assert caught.value.field == field


def test_options_default_and_a_short_run_is_not_an_error() -> None:
    assert CascadeOptions.from_options({}, steps=32) == CascadeOptions(8, 0.9, 4)
    assert CascadeOptions.from_options({}, steps=8).window == 8  # too short: falls back
