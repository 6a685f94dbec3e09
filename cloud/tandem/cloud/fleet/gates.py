"""Gate statistics: pure functions, no IO (used by engine.evaluate_gates).

A gate is judged through a confidence bound, not a raw ratio:

- Proportions (error rate, fallback rate, shadow agreement, estimated accuracy) use the
  Wilson score interval. The engine looks at every tick, so the error budget `alpha` is spent
  over sample-size epochs (epoch k covers n in [2**(k-1), 2**k), and gets alpha / (k (k + 1)),
  which sums to alpha). That is a union bound across epochs, not a strict confidence
  sequence: several looks inside one epoch share its budget, so the realised false-abort rate
  still has to be measured by simulation (not written yet; issue 12).
- "fail" only when the bound shows the cohort is worse than the threshold; "pass" only when it
  shows the cohort is within threshold + `min_effect` (the smallest degradation the gate is
  meant to catch); otherwise "wait".
- Relative gates bound the difference cohort - baseline with Newcombe's method, so the
  baseline's own uncertainty counts.
- Latency compares the merged local-latency histograms with a Mann-Whitney U test on the
  bucket counts (as Kayenta does): it fails only when the p95 ratio is over the threshold and
  the cohort is significantly slower.
- `estimated_accuracy`: label-free, CBPE-style. With calibrated confidences the expected
  accuracy is sum(count_i * mid_i) / total over the confidence buckets (linear over [0, 1],
  as the SDK fills them: bucket i holds confidences in [i/B, (i+1)/B)).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

_NORMAL = NormalDist()


@dataclass(frozen=True)
class Verdict:
    passed: bool | None  # None: not enough evidence either way
    low: float | None
    high: float | None
    reason: str


def spent_alpha(alpha: float, n: int) -> float:
    """The part of `alpha` spent on a look at `n` samples (epoch k = bit_length(n))."""
    k = max(1, int(n).bit_length())
    return alpha / (k * (k + 1))


def z_for(alpha: float) -> float:
    return _NORMAL.inv_cdf(1.0 - max(min(alpha, 0.5), 1e-300))


def wilson(successes: float, n: int, z: float) -> tuple[float, float]:
    """The Wilson score interval of a proportion (one-sided z on each side)."""
    if n <= 0:
        return 0.0, 1.0
    p = min(max(successes / n, 0.0), 1.0)
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def difference(x1: float, n1: int, x2: float, n2: int, z: float) -> tuple[float, float, float]:
    """(p1 - p2, low, high) by Newcombe's hybrid score method."""
    p1, p2 = x1 / n1, x2 / n2
    l1, u1 = wilson(x1, n1, z)
    l2, u2 = wilson(x2, n2, z)
    d = p1 - p2
    low = d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    high = d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return d, low, high


def judge_proportion(
    *,
    x: float,
    n: int,
    threshold: float,
    higher_is_better: bool,
    alpha: float,
    min_effect: float,
    min_samples: int,
    base_x: float | None = None,
    base_n: int = 0,
) -> tuple[float | None, Verdict]:
    """Judges a proportion x/n (or, with a baseline, its difference to base_x/base_n).

    Returns (value, verdict). value is the proportion, or for relative gates the degradation
    (cohort - baseline, or baseline - cohort when higher is better)."""
    relative = base_x is not None
    if n <= 0 or (relative and base_n <= 0):
        what = "no cohort samples" if n <= 0 else "no baseline samples"
        return None, Verdict(None, None, None, what)
    z = z_for(spent_alpha(alpha, n))
    if relative:
        assert base_x is not None
        d, lo, hi = difference(x, n, base_x, base_n, z)
        if higher_is_better:  # degradation = baseline - cohort
            d, lo, hi = -d, -hi, -lo
        value, low, high = d, lo, hi
        worse_bound, better_bound = low, high  # degradation: lower is better
        hib = False
    else:
        value = x / n
        low, high = wilson(x, n, z)
        hib = higher_is_better
        worse_bound, better_bound = (high, low) if hib else (low, high)
    if n < min_samples:
        return value, Verdict(None, low, high, f"{n} of {min_samples} samples")
    if hib:
        if worse_bound < threshold:
            return value, Verdict(False, low, high, f"upper bound {high:.3g} < {threshold:g}")
        if better_bound >= threshold - min_effect:
            bound = threshold - min_effect
            return value, Verdict(True, low, high, f"lower bound {low:.3g} >= {bound:.3g}")
        return value, Verdict(
            None, low, high, f"interval [{low:.3g}, {high:.3g}] straddles {threshold:g}"
        )
    if worse_bound > threshold:
        return value, Verdict(False, low, high, f"lower bound {low:.3g} > {threshold:g}")
    if better_bound <= threshold + min_effect:
        bound = threshold + min_effect
        return value, Verdict(True, low, high, f"upper bound {high:.3g} <= {bound:.3g}")
    return value, Verdict(
        None, low, high, f"interval [{low:.3g}, {high:.3g}] straddles {threshold:g}"
    )


def estimated_accuracy(
    confidence_buckets: Sequence[int], confidence_sum: float = 0.0
) -> tuple[float, int] | None:
    """(expected accuracy, answers) from linear confidence buckets over [0, 1]; None if empty.

    With calibrated confidences the expected accuracy is their mean: exact from
    `confidence_sum` when the devices sent it; otherwise each bucket i of B (confidences in
    [i/B, (i+1)/B), the last one including 1.0) counts at its midpoint (i + 0.5) / B, which
    is off by up to half a bucket (2.5 points at 20 buckets for a model that is nearly
    always sure)."""
    total = sum(confidence_buckets)
    if total <= 0:
        return None
    if confidence_sum > 0:
        return min(confidence_sum / total, 1.0), total
    b = len(confidence_buckets)
    mass = sum(c * (i + 0.5) / b for i, c in enumerate(confidence_buckets))
    return mass / total, total


def mann_whitney(new: Sequence[int], base: Sequence[int]) -> tuple[float, float] | None:
    """(P(new > base) + P(tie) / 2, one-sided z that new is larger) over bucketed counts of
    the same layout; ties within a bucket get mid-ranks. None without data on both sides."""
    size = max(len(new), len(base))
    a = list(new) + [0] * (size - len(new))
    b = list(base) + [0] * (size - len(base))
    n1, n2 = sum(a), sum(b)
    if n1 == 0 or n2 == 0:
        return None
    below_b = 0
    u = 0.0
    tie_term = 0.0
    for ca, cb in zip(a, b, strict=True):
        u += ca * (below_b + cb / 2.0)
        below_b += cb
        t = ca + cb
        tie_term += t**3 - t
    auc = u / (n1 * n2)
    n = n1 + n2
    var = n1 * n2 / 12.0 * ((n + 1) - tie_term / (n * (n - 1))) if n > 1 else 0.0
    if var <= 0:
        return auc, 0.0
    return auc, (u - n1 * n2 / 2.0) / math.sqrt(var)


def judge_latency(
    *,
    ratio: float | None,
    samples: int,
    new_counts: Sequence[int],
    base_counts: Sequence[int],
    threshold: float,
    alpha: float,
    min_samples: int,
) -> Verdict:
    """The p95 ratio against the threshold, with evidence. With both histograms (same bucket
    layout) it fails only when the ratio is over the threshold and Mann-Whitney shows the
    cohort slower; without them the ratio judges once `min_samples` requests are in."""
    if ratio is None:
        return Verdict(None, None, None, "no latency data on one side")
    if samples < min_samples:
        return Verdict(None, None, None, f"{samples} of {min_samples} samples")
    test = mann_whitney(new_counts, base_counts)
    auc = test[0] if test else None
    if ratio <= threshold:
        return Verdict(True, auc, auc, f"p95 ratio {ratio:.3g} <= {threshold:g}")
    if test is None:
        return Verdict(False, None, None, f"p95 ratio {ratio:.3g} > {threshold:g}")
    z = test[1]
    crit = z_for(spent_alpha(alpha, sum(new_counts)))
    if z > crit:
        return Verdict(
            False, auc, auc, f"p95 ratio {ratio:.3g} > {threshold:g}, slower (z={z:.2f})"
        )
    return Verdict(
        None, auc, auc, f"p95 ratio {ratio:.3g} > {threshold:g} but z={z:.2f} < {crit:.2f}"
    )
