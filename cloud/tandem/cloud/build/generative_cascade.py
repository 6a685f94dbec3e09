"""Build-time calibration of the SDK's generation `cascade` policy (issue 14).

The SDK's cascade (`tandem.sdk.generation.session.Run._local`) generates on the device and
hands the rest of the sequence to the cloud after the first token at which the mean
confidence (max softmax probability) of the last `cascade_window` tokens is below
`cascade_threshold`; the token that trips the gate is still the device's, and the last token
of a sequence never trips it (nothing is left to hand over).

Here that rule is replayed on what the build measured: for each held-out prompt, the device
variant's own greedy tokens with their confidences, and for each token whether the full model
picks the same token after the same prefix. The threshold chosen is the one that keeps the
most tokens on the device while the tokens kept on the device agree with the full model at
least `cascade_target` of the time; when no threshold reaches the target, the one whose
local tokens agree best (the report says the target was not met). The decision is pure (no
model, no IO) so that a test can check it on the recorded data.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from tandem.errors import ConfigError
from tandem.sdk.generation.session import DEFAULT_CASCADE_THRESHOLD, DEFAULT_CASCADE_WINDOW

log = logging.getLogger(__name__)

DEFAULT_CASCADE_TARGET = 0.9  # agreement with the full model of the tokens kept local
DEFAULT_MIN_PROMPTS = 4  # fewer held-out prompts than this: the default threshold is written


@dataclass(frozen=True)
class CascadeOptions:
    window: int = DEFAULT_CASCADE_WINDOW  # tokens the running confidence is taken over
    target: float = DEFAULT_CASCADE_TARGET  # in (0, 1]: agreement of the local tokens
    min_prompts: int = DEFAULT_MIN_PROMPTS  # prompts needed to calibrate at all

    @classmethod
    def from_options(cls, options: Mapping[str, Any], steps: int) -> CascadeOptions:
        """From the build's `ctx.options` (cascade_window, cascade_target,
        cascade_min_prompts); `steps` is the tokens generated per prompt."""
        window = options.get("cascade_window", DEFAULT_CASCADE_WINDOW)
        target = options.get("cascade_target", DEFAULT_CASCADE_TARGET)
        min_prompts = options.get("cascade_min_prompts", DEFAULT_MIN_PROMPTS)
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ConfigError("cascade_window", f"must be an integer >= 1, got {window!r}")
        if "cascade_window" in options and window >= steps:  # the default: not calibrated
            raise ConfigError(
                "cascade_window",
                f"{window} must be below steps ({steps}), the tokens generated per held-out "
                "prompt: a window must fill before the last token for the gate to act",
            )
        if (
            isinstance(target, bool)
            or not isinstance(target, int | float)
            or not 0.0 < float(target) <= 1.0
        ):
            raise ConfigError("cascade_target", f"must be a number in (0, 1], got {target!r}")
        if isinstance(min_prompts, bool) or not isinstance(min_prompts, int) or min_prompts < 1:
            raise ConfigError(
                "cascade_min_prompts", f"must be an integer >= 1, got {min_prompts!r}"
            )
        return cls(window=window, target=float(target), min_prompts=min_prompts)


@dataclass(frozen=True)
class Record:
    """One held-out prompt as the device generated it."""

    confidences: tuple[float, ...]  # per device token, max softmax probability
    agrees: tuple[bool, ...]  # per device token: the full model's pick after the same prefix


@dataclass(frozen=True)
class Outcome:
    """The cascade rule at one threshold, replayed on the records."""

    threshold: float
    local_tokens: int
    local_hits: int
    escalated_tokens: int
    escalated_hits: int  # device tokens after the hand-off that would have agreed
    escalations: int  # sequences handed to the cloud

    @property
    def local_agreement(self) -> float:
        return self.local_hits / self.local_tokens if self.local_tokens else 0.0

    @property
    def escalated_agreement(self) -> float | None:
        return self.escalated_hits / self.escalated_tokens if self.escalated_tokens else None


@dataclass(frozen=True)
class Calibration:
    threshold: float
    window: int
    target: float
    calibrated: bool  # False: too few prompts, the SDK default was written
    target_met: bool
    outcome: Outcome
    candidates: int  # thresholds that behave differently on the records
    reason: str

    def generation_config(self) -> dict[str, Any]:
        """The keys the SDK reads from the variant's generation.json."""
        return {
            "cascade_threshold": self.threshold,
            "cascade_window": self.window,
            "cascade_target": self.target,
        }

    def report(self) -> dict[str, Any]:
        o = self.outcome
        total = o.local_tokens + o.escalated_tokens
        escalated = o.escalated_agreement
        return {
            "cascade_threshold": round(self.threshold, 6),
            "cascade_window": self.window,
            "cascade_target": self.target,
            "cascade_calibrated": self.calibrated,
            "cascade_target_met": self.target_met,
            "cascade_local_share": round(o.local_tokens / total, 4) if total else None,
            "cascade_local_agreement": round(o.local_agreement, 4),
            "cascade_escalated_agreement": None if escalated is None else round(escalated, 4),
            "cascade_escalated_sequences": o.escalations,
            "cascade_tokens": total,
        }


def hand_off(confidences: Sequence[float], threshold: float, window: int) -> int:
    """Tokens the SDK's cascade keeps local before handing over (len: never hands over)."""
    for i in range(window - 1, len(confidences) - 1):
        recent = confidences[i - window + 1 : i + 1]
        if sum(recent) / len(recent) < threshold:  # as the SDK computes it
            return i + 1
    return len(confidences)


def replay(records: Sequence[Record], threshold: float, window: int) -> Outcome:
    local = hits = escalated = escalated_hits = escalations = 0
    for record in records:
        kept = hand_off(record.confidences, threshold, window)
        local += kept
        hits += sum(record.agrees[:kept])
        escalated += len(record.agrees) - kept
        escalated_hits += sum(record.agrees[kept:])
        escalations += kept < len(record.agrees)
    return Outcome(threshold, local, hits, escalated, escalated_hits, escalations)


def candidate_thresholds(records: Sequence[Record], window: int) -> list[float]:
    """0 (never hand over), the midpoints between the distinct running means that can trip
    the gate, and one above them all (capped at 1): every distinct behaviour, once."""
    means = sorted(
        {
            sum(r.confidences[i - window + 1 : i + 1]) / window
            for r in records
            for i in range(window - 1, len(r.confidences) - 1)
        }
    )
    if not means:
        return [0.0]
    mids = [(a + b) / 2 for a, b in itertools.pairwise(means)]
    return [0.0, *mids, min(1.0, (means[-1] + 1.0) / 2)]


def calibrate(records: Sequence[Record], options: CascadeOptions) -> Calibration:
    """The threshold that keeps the most tokens local with local agreement >= target."""
    window, target = options.window, options.target
    candidates = candidate_thresholds(records, window)
    usable = len(records) >= options.min_prompts and len(candidates) > 1
    if not usable:
        outcome = replay(records, DEFAULT_CASCADE_THRESHOLD, window)
        windows = sum(max(0, len(r.confidences) - window) for r in records)
        reason = (
            f"not calibrated: {len(records)} held-out prompts, {windows} windows "
            f"(needs >= {options.min_prompts} prompts with a full window); the SDK default "
            f"{DEFAULT_CASCADE_THRESHOLD} is written"
        )
        log.warning("cascade %s", reason)
        return Calibration(
            DEFAULT_CASCADE_THRESHOLD,
            window,
            target,
            False,
            outcome.local_agreement >= target,
            outcome,
            len(candidates),
            reason,
        )
    outcomes = [replay(records, t, window) for t in candidates]
    feasible = [o for o in outcomes if o.local_agreement >= target]
    if feasible:
        # most tokens local; then the better local agreement; then the lower threshold
        best = max(feasible, key=lambda o: (o.local_tokens, o.local_agreement, -o.threshold))
        reason = (
            f"threshold {best.threshold:.4f} keeps {best.local_tokens} of "
            f"{best.local_tokens + best.escalated_tokens} tokens local at "
            f"{best.local_agreement:.2%} agreement (target {target:.0%})"
        )
        return Calibration(best.threshold, window, target, True, True, best, len(outcomes), reason)
    # No threshold meets the target (the first `window` tokens are always the device's, and
    # handing over early can even lower the local agreement): the one closest to it.
    best = max(outcomes, key=lambda o: (o.local_agreement, o.local_tokens, -o.threshold))
    reason = (
        f"target {target:.0%} not reachable: the best local agreement any threshold gives is "
        f"{best.local_agreement:.2%}, at threshold {best.threshold:.4f}, which is written"
    )
    log.warning("cascade %s", reason)
    return Calibration(best.threshold, window, target, True, False, best, len(outcomes), reason)


def by_target(
    records: Sequence[Record], options: CascadeOptions, targets: Sequence[float]
) -> list[dict[str, Any]]:
    """What other targets would choose on the same records (for the report: how much
    agreement each share of local tokens costs)."""
    rows = []
    for target in targets:
        result = calibrate(records, replace(options, target=target))
        figures = result.report()
        rows.append(
            {
                "target": target,
                "threshold": figures["cascade_threshold"],
                "target_met": result.target_met,
                "local_share": figures["cascade_local_share"],
                "local_agreement": figures["cascade_local_agreement"],
            }
        )
    return rows
