"""Gate statistics: pure functions, no IO (used by engine.evaluate_gates).

A gate is judged through a confidence bound, not a raw ratio:

- Proportions (error rate, fallback rate, shadow agreement, estimated accuracy) use the
  Wilson score interval. The engine looks at every tick, so the error budget `alpha` is spent
  over sample-size epochs (epoch k covers n in [2**(k-1), 2**k), and gets alpha / (k (k + 1)),
  which sums to alpha). That is a union bound across epochs, not a strict confidence
  sequence: several looks inside one epoch share its budget, so the realised false-abort rate
  is measured by simulation (bench/bench_gates.py, bench/results/gates-simulation.txt).
- Requests on one device are not independent: its inputs make it easy or hard for any model,
  so devices' rates differ and a cohort of a few devices varies more than its request count
  says (the binomial width alone let 13% of good versions abort in bench/bench_gates.py when
  device rates differed). With per-device totals (`Clusters`) the interval is the widest of:
  the Wilson / Newcombe score interval; a random-effects width, whose between-device variance
  tau^2 is estimated by moments from every device of both sides (the cohort is a hashed
  sample of the same fleet, so a canary of two devices borrows the fleet's tau^2); and, from
  `MIN_ROBUST_CLUSTERS` cohort devices on, the cluster-robust (sandwich, CR1) width with a t
  quantile on G - 1 degrees of freedom (Welch-Satterthwaite for a difference).
- Within-device (`Change`): when every cohort device also answered on the baseline version
  before the rollout, a relative gate compares each device with itself: the cohort's change
  (each device's rate after minus its own rate before, weighted by n_after n_before /
  (n_after + n_before)) minus the same change on the devices still on the baseline (the
  fleet's drift over the same time: a difference in differences). A device's own effect
  cancels, so the between-device variance does not enter and a one-device canary can pass
  on its own evidence; the variance is binomial, each device's rate taken over both periods
  with two successes and two failures added (Agresti-Coull) so that a rare event seen 0 or
  3 times still has a width. From `MIN_ROBUST_CLUSTERS` cohort devices on, the CR1 variance
  of the device changes (which also holds when the version's effect differs across devices)
  widens it with a t quantile. What it assumes: a device's inputs stay as easy or hard
  across the two periods, up to the drift the baseline devices share. Neither comparison
  is better everywhere: within-device pays for the history's own noise (on a fleet of like
  devices its interval is wider than the fleet comparison's, whose baseline is large), and
  the fleet comparison pays for the devices' differences. So a relative gate with history
  judges both, each at half the look's alpha (Bonferroni): it fails when either shows the
  cohort worse, passes when either shows it within the margin (and neither fails), else
  waits; each error rate stays within alpha.
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

import functools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from statistics import NormalDist

_NORMAL = NormalDist()


# From this many cohort devices on, the cluster-robust (sandwich) variance counts as well.
MIN_ROBUST_CLUSTERS = 20


@dataclass(frozen=True)
class Clusters:
    """Moments of per-device (x_i, n_i) totals (successes, trials): enough for the ratio
    estimator's sandwich variance and the between-device variance, whatever the count."""

    count: int = 0  # devices with n_i > 0
    x: float = 0.0
    n: float = 0.0
    xx: float = 0.0  # sum x_i^2
    xn: float = 0.0  # sum x_i n_i
    nn: float = 0.0  # sum n_i^2
    nnn: float = 0.0  # sum n_i^3

    @classmethod
    def of(cls, pairs: Iterable[tuple[float, float]]) -> Clusters:
        g = 0
        x = n = xx = xn = nn = nnn = 0.0
        for xi, ni in pairs:
            if ni <= 0:
                continue
            g += 1
            x, n = x + xi, n + ni
            xx, xn, nn, nnn = xx + xi * xi, xn + xi * ni, nn + ni * ni, nnn + ni**3
        return cls(g, x, n, xx, xn, nn, nnn)

    def residual_ss(self) -> float:
        """sum (x_i - p n_i)^2 with p = x / n."""
        if self.n <= 0:
            return 0.0
        p = self.x / self.n
        return max(0.0, self.xx - 2 * p * self.xn + p * p * self.nn)

    def sandwich(self) -> float | None:
        """The CR1 cluster-robust variance of x / n; None under two devices."""
        if self.count < 2 or self.n <= 0:
            return None
        return self.count / (self.count - 1) * self.residual_ss() / (self.n * self.n)


AGRESTI_COULL = 2.0  # successes and failures added to a device's rate for its variance


@dataclass(frozen=True)
class Change:
    """Moments of per-device changes of one proportion between two periods (after, before),
    over the devices with samples in both: enough for the weighted mean change, its binomial
    variance and its cluster-robust variance. Device i has weight w_i = n_a n_b / (n_a +
    n_b), change d_i = x_a / n_a - x_b / n_b and pooled rate q_i (Agresti-Coull)."""

    count: int = 0  # devices with samples in both periods
    unpaired: int = 0  # devices with samples after but none before
    n_after: float = 0.0
    w: float = 0.0  # sum w_i
    wd: float = 0.0  # sum w_i d_i
    wq: float = 0.0  # sum w_i q_i (1 - q_i)
    ww: float = 0.0  # sum w_i^2
    wwd: float = 0.0  # sum w_i^2 d_i
    wwdd: float = 0.0  # sum w_i^2 d_i^2

    @classmethod
    def of(cls, pairs: Iterable[tuple[tuple[float, float], tuple[float, float]]]) -> Change:
        """From ((x_after, n_after), (x_before, n_before)) per device."""
        g = unpaired = 0
        n_after = w = wd = wq = ww = wwd = wwdd = 0.0
        for (xa, na), (xb, nb) in pairs:
            if na <= 0:
                continue
            if nb <= 0:
                unpaired += 1
                continue
            g += 1
            wi = na * nb / (na + nb)
            di = xa / na - xb / nb
            qi = (xa + xb + AGRESTI_COULL) / (na + nb + 2 * AGRESTI_COULL)
            n_after += na
            w, wd, wq = w + wi, wd + wi * di, wq + wi * qi * (1 - qi)
            ww, wwd, wwdd = ww + wi * wi, wwd + wi * wi * di, wwdd + wi * wi * di * di
        return cls(g, unpaired, n_after, w, wd, wq, ww, wwd, wwdd)

    @property
    def effect(self) -> float:
        return self.wd / self.w if self.w > 0 else 0.0

    def variance(self) -> float:
        """The binomial variance of `effect` (w_i (1/n_a + 1/n_b) = 1, so each device adds
        w_i q_i (1 - q_i) / W^2)."""
        return self.wq / (self.w * self.w) if self.w > 0 else 0.0

    def robust(self) -> float | None:
        """The CR1 variance of `effect` from the spread of the device changes; None under
        two devices."""
        if self.count < 2 or self.w <= 0:
            return None
        d = self.effect
        ss = max(0.0, self.wwdd - 2 * d * self.wwd + d * d * self.ww)
        return self.count / (self.count - 1) * ss / (self.w * self.w)


def within_device(
    alpha: float, cohort: Change, control: Change | None, higher_is_better: bool
) -> tuple[float, float, float]:
    """(degradation, low, high) of the cohort's within-device change against the control's
    (the baseline devices' drift; none at the last stage), see the module doc. The
    degradation is cohort - baseline (baseline - cohort when higher is better)."""
    drift = control.effect if control is not None and control.count else 0.0
    var_c = cohort.variance()
    var_b = control.variance() if control is not None and control.count else 0.0
    half = z_for(alpha) * math.sqrt(var_c + var_b)
    robust = cohort.robust()
    if cohort.count >= MIN_ROBUST_CLUSTERS and robust is not None:
        rb = control.robust() if control is not None else None
        half = max(half, t_for(alpha, cohort.count - 1) * math.sqrt(robust + (rb or var_b)))
    d = cohort.effect - drift
    if higher_is_better:
        d = -d
    return d, max(-1.0, d - half), min(1.0, d + half)


def between_device_variance(sides: Sequence[Clusters]) -> tuple[float, int]:
    """(tau^2, degrees of freedom): the variance of device rates around their side's rate,
    by moments under x_i ~ n_i p (1 - p) + n_i^2 tau^2, pooled over the sides."""
    num = den = 0.0
    df = 0
    for c in sides:
        if c.count < 2 or c.n <= 0:
            continue
        p = min(max(c.x / c.n, 0.0), 1.0)
        num += c.residual_ss() - p * (1 - p) * (c.n - c.nn / c.n)
        den += c.nn - 2 * c.nnn / c.n + c.nn * c.nn / (c.n * c.n)
        df += c.count - 1
    if den <= 0 or df == 0:
        return 0.0, 0
    # Rates lie in [0, 1], so their variance around a mean p is at most p (1 - p); the moment
    # estimate from a handful of devices can overshoot that and give a degradation interval
    # wider than [-1, 1] (seen on the demo's four devices).
    total_x = sum(c.x for c in sides if c.n > 0)
    total_n = sum(c.n for c in sides if c.n > 0)
    p = min(max(total_x / total_n, 0.0), 1.0)
    return min(max(0.0, num / den), p * (1 - p)), df


def random_effects_variance(c: Clusters, tau2: float) -> tuple[float, float]:
    """The variance of x / n over devices drawn from a fleet with between-device `tau2`, as
    (within-device binomial part, between-device part)."""
    p = min(max(c.x / c.n, 0.0), 1.0)
    return p * (1 - p) / c.n, tau2 * c.nn / (c.n * c.n)


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the regularized incomplete beta (Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-13:
            break
    return h


def t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with `df` degrees of freedom (t >= 0)."""
    x = df / (df + t * t)
    a, b = df / 2.0, 0.5
    lbeta = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    front = math.exp(lbeta + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        inc = front * _betacf(a, b, x) / a
    else:
        inc = 1.0 - front * _betacf(b, a, 1.0 - x) / b
    return 0.5 * inc


@functools.lru_cache(maxsize=4096)
def t_for(alpha: float, df: int) -> float:
    """The one-sided Student t quantile: P(T > t) = alpha (bisection on log t). Cached: the
    engine asks for few distinct (alpha, df) pairs (alpha per epoch, whole df)."""
    z = z_for(alpha)
    if df >= 1e4:
        return z
    lo, hi = z, z
    while t_sf(hi, df) > alpha:
        hi *= 2.0
        if hi > 1e12:
            return hi
    for _ in range(100):
        mid = math.sqrt(lo * hi)
        if t_sf(mid, df) > alpha:
            lo = mid
        else:
            hi = mid
        if hi / lo < 1 + 1e-9:
            break
    return hi


def clustered_halfwidths(
    alpha: float, cohort: Clusters, baseline: Clusters | None, relative: bool
) -> list[float]:
    """Half-widths beyond the score interval (see the module doc): the random-effects one,
    and the sandwich-t one from `MIN_ROBUST_CLUSTERS` cohort devices on."""
    if cohort.n <= 0 or (relative and (baseline is None or baseline.n <= 0)):
        return []
    sides = [cohort] + ([baseline] if baseline is not None and baseline.n > 0 else [])
    tau2, df = between_device_variance(sides)
    out = []
    if df > 0:
        within, between = random_effects_variance(cohort, tau2)
        if relative:
            assert baseline is not None
            w, b = random_effects_variance(baseline, tau2)
            within, between = within + w, between + b
        # The binomial part is known given p: the normal quantile. Only tau^2 is estimated
        # (df degrees of freedom), so only its part takes the t quantile; a t on 2 df at a
        # spent alpha near 1e-4 is about 70, and on the whole variance it made a one-device
        # canary's interval +-0.3 on 264 samples when tau^2 was about 0 (the demo's fleet).
        z = z_for(alpha)
        out.append(math.sqrt(z * z * within + t_for(alpha, df) ** 2 * between))
    vc = cohort.sandwich()
    if cohort.count >= MIN_ROBUST_CLUSTERS and vc is not None:
        if not relative:
            out.append(t_for(alpha, cohort.count - 1) * math.sqrt(vc))
        else:
            assert baseline is not None
            vb = baseline.sandwich()
            if vb is not None and vc + vb > 0:
                # Welch-Satterthwaite degrees of freedom of the sum of the two variances.
                dfs = (vc + vb) ** 2 / (
                    vc * vc / (cohort.count - 1) + vb * vb / (baseline.count - 1)
                )
                # Rounded down: fewer degrees of freedom, a wider quantile.
                out.append(t_for(alpha, max(1, int(dfs))) * math.sqrt(vc + vb))
    return out


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
    clusters: Clusters | None = None,
    base_clusters: Clusters | None = None,
    change: Change | None = None,
    base_change: Change | None = None,
) -> tuple[float | None, Verdict]:
    """Judges a proportion x/n (or, with a baseline, its difference to base_x/base_n).
    With per-device `clusters` (and the baseline's) the interval is device-clustered. A
    relative gate with the cohort's within-device `change` (and the baseline devices'
    `base_change`, their drift) also judges that, when every cohort device has samples from
    before; each comparison then gets half the alpha (see the module doc).

    Returns (value, verdict). value is the proportion, or for relative gates the degradation
    (cohort - baseline, or baseline - cohort when higher is better)."""
    relative = base_x is not None
    paired = relative and change is not None and change.count > 0 and change.unpaired == 0
    fleet = not relative or base_n > 0
    if n <= 0 or not (fleet or paired):
        what = "no cohort samples" if n <= 0 else "no baseline samples"
        return None, Verdict(None, None, None, what)
    # With both comparisons each gets half the look's alpha (Bonferroni), see the module doc.
    a = spent_alpha(alpha, n) / (2 if paired and fleet else 1)
    judged: list[tuple[float, Verdict]] = []
    if fleet:
        value, low, high, hib = fleet_interval(
            a, x, n, higher_is_better, base_x, base_n, clusters, base_clusters
        )
        judged.append(
            (value, decide(low, high, relative, hib, n, threshold, min_effect, min_samples))
        )
    if paired:
        assert change is not None
        value, low, high = within_device(a, change, base_change, higher_is_better)
        v = decide(low, high, True, False, n, threshold, min_effect, min_samples)
        judged.append((value, replace(v, reason="within-device: " + v.reason)))
    for want in (False, True):
        for value, v in judged:
            if v.passed is want:
                return value, v
    # Both wait: show the narrower interval.
    return min(judged, key=lambda j: (j[1].high or 0.0) - (j[1].low or 0.0))


def fleet_interval(
    a: float,
    x: float,
    n: int,
    higher_is_better: bool,
    base_x: float | None,
    base_n: int,
    clusters: Clusters | None,
    base_clusters: Clusters | None,
) -> tuple[float, float, float, bool]:
    """(value, low, high, higher is better) of the cohort against the fleet at spent alpha
    `a`: the score interval, widened by the device-clustered widths when `clusters` are
    known. With `base_x` the value is the degradation (lower is better)."""
    relative = base_x is not None
    z = z_for(a)
    if relative:
        assert base_x is not None
        d, lo, hi = difference(x, n, base_x, base_n, z)
        if higher_is_better:  # degradation = baseline - cohort
            d, lo, hi = -d, -hi, -lo
        value, low, high = d, lo, hi  # degradation: lower is better
        hib = False
    else:
        value = x / n
        low, high = wilson(x, n, z)
        hib = higher_is_better
    if clusters is not None:
        for half in clustered_halfwidths(a, clusters, base_clusters, relative):
            low, high = min(low, value - half), max(high, value + half)
        # A proportion lies in [0, 1], a difference of two in [-1, 1].
        low, high = (
            (max(0.0, low), min(1.0, high)) if not relative else (max(-1.0, low), min(1.0, high))
        )
    return value, low, high, hib


def decide(
    low: float,
    high: float,
    relative: bool,
    hib: bool,
    n: int,
    threshold: float,
    min_effect: float,
    min_samples: int,
) -> Verdict:
    """The verdict of an interval [low, high] (see the module doc)."""
    if relative:
        worse_bound, better_bound = low, high
    else:
        worse_bound, better_bound = (high, low) if hib else (low, high)
    if n < min_samples:
        return Verdict(None, low, high, f"{n} of {min_samples} samples")
    if hib:
        if worse_bound < threshold:
            return Verdict(False, low, high, f"upper bound {high:.3g} < {threshold:g}")
        if better_bound >= threshold - min_effect:
            bound = threshold - min_effect
            return Verdict(True, low, high, f"lower bound {low:.3g} >= {bound:.3g}")
        return Verdict(None, low, high, f"interval [{low:.3g}, {high:.3g}] straddles {threshold:g}")
    if worse_bound > threshold:
        return Verdict(False, low, high, f"lower bound {low:.3g} > {threshold:g}")
    if better_bound <= threshold + min_effect:
        bound = threshold + min_effect
        return Verdict(True, low, high, f"upper bound {high:.3g} <= {bound:.3g}")
    return Verdict(None, low, high, f"interval [{low:.3g}, {high:.3g}] straddles {threshold:g}")


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
    return _judge_ratio(
        "p95 ratio", ratio, samples, new_counts, base_counts, threshold, alpha, min_samples,
        higher_is_better=False,
    )  # fmt: skip


def judge_throughput(
    *,
    ratio: float | None,
    samples: int,
    new_counts: Sequence[int],
    base_counts: Sequence[int],
    threshold: float,
    alpha: float,
    min_samples: int,
) -> Verdict:
    """The median tokens/s ratio (cohort over baseline) against a floor, as the latency gate:
    the counts are per-generation milliseconds per token, so the cohort is slower when its
    values rank higher; it fails only when the ratio is under the threshold and Mann-Whitney
    shows the cohort slower. What it assumes: generations are independent (like requests in
    the latency gate, they are not quite, within a device)."""
    return _judge_ratio(
        "tokens/s ratio", ratio, samples, new_counts, base_counts, threshold, alpha,
        min_samples, higher_is_better=True,
    )  # fmt: skip


def _judge_ratio(
    what: str,
    ratio: float | None,
    samples: int,
    new_counts: Sequence[int],
    base_counts: Sequence[int],
    threshold: float,
    alpha: float,
    min_samples: int,
    *,
    higher_is_better: bool,
) -> Verdict:
    if ratio is None:
        return Verdict(None, None, None, f"no {what.split()[0]} data on one side")
    if samples < min_samples:
        return Verdict(None, None, None, f"{samples} of {min_samples} samples")
    test = mann_whitney(new_counts, base_counts)
    auc = test[0] if test else None
    good, bad = (">=", "<") if higher_is_better else ("<=", ">")
    if ratio >= threshold if higher_is_better else ratio <= threshold:
        return Verdict(True, auc, auc, f"{what} {ratio:.3g} {good} {threshold:g}")
    if test is None:
        return Verdict(False, None, None, f"{what} {ratio:.3g} {bad} {threshold:g}")
    z = test[1]
    crit = z_for(spent_alpha(alpha, sum(new_counts)))
    if z > crit:
        return Verdict(
            False, auc, auc, f"{what} {ratio:.3g} {bad} {threshold:g}, slower (z={z:.2f})"
        )
    return Verdict(
        None, auc, auc, f"{what} {ratio:.3g} {bad} {threshold:g} but z={z:.2f} < {crit:.2f}"
    )
