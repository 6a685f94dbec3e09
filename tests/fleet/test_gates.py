"""The statistical gates (cloud/tandem/cloud/fleet/gates.py) and the no-stall rule."""

from __future__ import annotations

from dataclasses import replace

import pytest

from tandem.cloud.fleet import engine as eng
from tandem.cloud.fleet import gates as stats
from tandem.cloud.fleet.engine import Gate, GateMetric, VersionStats, evaluate_gates


def test_estimated_accuracy_uses_bucket_midpoints() -> None:
    buckets = [0] * 20
    buckets[19] = 90  # [0.95, 1.0] -> 0.975
    buckets[9] = 10  # [0.45, 0.5) -> 0.475
    est = stats.estimated_accuracy(buckets)
    assert est is not None
    assert abs(est[0] - (90 * 0.975 + 10 * 0.475) / 100) < 1e-12 and est[1] == 100
    assert stats.estimated_accuracy([0, 0]) is None


def test_small_noisy_sample_waits_instead_of_aborting() -> None:
    # The issue: 11 of 13 agreeing (0.846) against 0.9 is noise, not evidence.
    gate = Gate(GateMetric.SHADOW_AGREEMENT, 0.9, min_samples=10)
    (r,) = evaluate_gates(
        [gate], VersionStats(shadow_sampled=13, shadow_agreed=11), VersionStats(), 0, 1
    )
    assert r.passed is None and r.low is not None and r.low < 0.9 < (r.high or 0)
    assert r.reason


def test_almost_all_fallbacks_fail_fast_without_shadow_samples() -> None:
    gates = [
        Gate(GateMetric.FALLBACK_RATE, 0.2, min_samples=20),
        Gate(GateMetric.SHADOW_AGREEMENT, 0.9),
    ]
    cohort = VersionStats(requests=60, fallbacks=58)
    fb, agree = evaluate_gates(gates, cohort, VersionStats(), 0, 1)
    assert fb.passed is False and agree.passed is None


def test_stage_without_evidence_pauses_after_max_wait_naming_the_gate() -> None:
    from tandem.cloud.fleet.engine import RolloutStatus, Stage
    from tests.fleet.test_engine import Fleet, plan

    gate = Gate(GateMetric.SHADOW_AGREEMENT, 0.9, min_samples=50)
    f = Fleet(plan(stages=(Stage(10, 5, (gate,), max_wait_s=30), Stage(100, 0))))
    few = VersionStats(requests=100, shadow_sampled=3, shadow_agreed=3)
    for t in (0.0, 1.0, 10.0, 30.0):
        f.run(t, cohort=few)
    assert f.state.status is RolloutStatus.RUNNING and f.state.stage_index == 0
    f.run(37.0, cohort=few)
    assert f.state.status is RolloutStatus.PAUSED and f.state.stage_index == 0
    assert "shadow_agreement" in f.state.paused_reason
    assert "gate_evidence_timeout" in f.events


def test_the_false_abort_budget_is_shared_only_by_gates_that_sample() -> None:
    """A stage without gates and a counted gate (failed devices) spend no false-abort budget,
    so they take no share of it: the sampled gates get all of it."""
    err = eng.Gate(eng.GateMetric.ERROR_RATE, 0.05)
    agree = eng.Gate(eng.GateMetric.SHADOW_AGREEMENT, 0.9)
    failed = eng.Gate(eng.GateMetric.FAILED_DEVICE_PCT, 5)
    plan = eng.RolloutPlan(
        "m",
        2,
        (eng.Stage(1, gates=(err, agree, failed)), eng.Stage(10, gates=(err,)), eng.Stage(100)),
        false_abort_rate=0.01,
    )
    assert plan.gate_alpha(0) == pytest.approx(0.01 / (2 * 2))
    assert plan.gate_alpha(1) == pytest.approx(0.01 / (2 * 1))


# --- device-clustered intervals -----------------------------------------------------------


def _width(v: stats.Verdict) -> float:
    assert v.low is not None and v.high is not None
    return v.high - v.low


def _judge(x: float, n: int, clusters: stats.Clusters | None, **kw: object) -> stats.Verdict:
    args: dict[str, object] = dict(
        x=x, n=n, threshold=0.005, higher_is_better=False, alpha=0.01, min_effect=0.02,
        min_samples=0, clusters=clusters,
    )  # fmt: skip
    args.update(kw)
    return stats.judge_proportion(**args)[1]  # type: ignore[arg-type]


def test_t_quantile_matches_the_tables() -> None:
    assert abs(stats.t_for(0.025, 1) - 12.7062) < 1e-3
    assert abs(stats.t_for(0.025, 10) - 2.2281) < 1e-3
    assert abs(stats.t_for(0.005, 30) - 2.7500) < 1e-3
    assert abs(stats.t_for(1e-6, 100000) - stats.z_for(1e-6)) < 1e-9


def test_identical_devices_give_about_the_binomial_width() -> None:
    devices = [(100, 1000)] * 200  # every device exactly at 10%
    c = stats.Clusters.of(devices)
    assert c.count == 200 and c.x == 20_000 and c.n == 200_000
    assert stats.between_device_variance([c]) == (0.0, 199)
    plain, clustered = _judge(c.x, 200_000, None), _judge(c.x, 200_000, c)
    assert 1.0 <= _width(clustered) / _width(plain) < 1.1


def test_heterogeneous_devices_widen_the_interval() -> None:
    # Same totals as above, but half the devices at 5% and half at 15%.
    c = stats.Clusters.of([(50, 1000), (150, 1000)] * 100)
    tau2, _ = stats.between_device_variance([c])
    assert abs(tau2 - 0.05**2) < 2e-4  # the spread of the device rates, not of requests
    plain, clustered = _judge(c.x, 200_000, None), _judge(c.x, 200_000, c)
    assert _width(clustered) > 5 * _width(plain)
    # A cohort of two devices borrows the fleet's between-device variance from the baseline.
    cohort = stats.Clusters.of([(50, 1000), (150, 1000)])
    base = _judge(200, 2000, None, base_x=c.x, base_n=200_000)
    borrowed = _judge(200, 2000, cohort, base_x=c.x, base_n=200_000, base_clusters=c)
    assert _width(borrowed) > 2 * _width(base)
    assert borrowed.passed is None


def test_between_device_variance_never_exceeds_what_rates_in_0_1_allow() -> None:
    # Two devices at opposite extremes with little traffic each: the moment estimate
    # overshoots; rates in [0, 1] around a mean p vary by at most p (1 - p).
    c = stats.Clusters.of([(0, 3), (40, 40)])
    tau2, df = stats.between_device_variance([c])
    p = 40 / 43
    assert df == 1
    assert tau2 == pytest.approx(p * (1 - p))
    verdict = _judge(40, 43, c, base_x=40, base_n=43, base_clusters=c)
    assert verdict.low is not None and verdict.high is not None
    assert verdict.low >= -1.0 and verdict.high <= 1.0


def test_a_one_device_canary_in_a_like_fleet_gets_about_the_score_interval() -> None:
    # The demo's first stage: one cohort device, 264 shadow samples at 0.99 agreement, against
    # three baseline devices at about 0.999 (tau^2 about 0, 2 df). The t quantile of 2 df
    # applies to the between-device part only; on the whole variance it gave +-0.3.
    cohort = stats.Clusters.of([(261, 264)])
    base = stats.Clusters.of([(999, 1000), (998, 1000), (1000, 1000)])
    kw = dict(higher_is_better=True, threshold=0.15, base_x=base.x, base_n=3000)
    plain = _judge(261, 264, None, **kw)
    clustered = _judge(261, 264, cohort, base_clusters=base, **kw)
    assert _width(clustered) < 1.5 * _width(plain)
    assert clustered.passed is True


def test_few_devices_fall_back_to_the_score_interval() -> None:
    # One device: no between-device variance to estimate; the Wilson interval judges.
    one = stats.Clusters.of([(10, 1000)])
    assert _judge(10, 1000, one) == _judge(10, 1000, None)
    # Two identical cohort devices against a homogeneous fleet: about Newcombe's width.
    fleet = stats.Clusters.of([(100, 1000)] * 100)
    cohort = stats.Clusters.of([(100, 1000)] * 2)
    plain = _judge(200, 2000, None, base_x=fleet.x, base_n=100_000)
    clustered = _judge(200, 2000, cohort, base_x=fleet.x, base_n=100_000, base_clusters=fleet)
    assert 1.0 <= _width(clustered) / _width(plain) < 1.1


def test_engine_judges_the_clustered_interval() -> None:
    # 1.5% against a 1% baseline: a clear failure per request, noise across devices.
    gate = Gate(GateMetric.ERROR_RATE, 0.0, 0, relative=True, min_effect=0.001)
    cohort = VersionStats(requests=40_000, errors=600)
    baseline = VersionStats(requests=400_000, errors=4_000)
    (naive,) = evaluate_gates([gate], cohort, baseline, 0, 40)
    assert naive.passed is False
    spread = [(5, 1000), (25, 1000)] * 20  # device rates 0.5% and 2.5%
    fleet = [(1, 1000), (19, 1000)] * 200
    cohort = replace(cohort, error_clusters=stats.Clusters.of(spread))
    baseline = replace(baseline, error_clusters=stats.Clusters.of(fleet))
    (clustered,) = evaluate_gates([gate], cohort, baseline, 0, 40)
    assert clustered.passed is None, clustered.reason


def test_device_totals_come_from_the_same_rows() -> None:
    from tandem.cloud.fleet.observe import version_stats
    from tandem.cloud.fleet.telemetry import Aggregate, combine

    rows = [
        Aggregate("a", "m", 1, 0, requests=100, errors=2, shadow_sampled=10, shadow_agreed=9),
        Aggregate("a", "m", 1, 60_000, requests=50, errors=1),
        Aggregate("b", "m", 1, 0, requests=30, fallbacks=3, confidence=[0, 10]),
    ]
    s = combine("m", 1, rows, 120.0)
    assert [(d.device_id, d.requests, d.errors, d.answers) for d in s.per_device] == [
        ("a", 150, 3, 0),
        ("b", 30, 0, 10),
    ]
    assert s.per_device[1].confidence_mass == 10 * 0.75
    v = version_stats(s)
    assert v.error_clusters == stats.Clusters.of([(3, 150), (0, 30)])
    assert v.agreement_clusters is not None and v.agreement_clusters.count == 1


# --- within-device comparisons (gates.Change) ------------------------------------------------

# The demo's fallback gate when CI failed: the canary (one device) against three baseline
# devices of other runtimes whose rare fallbacks (1, 0 and 3) make tau^2 > 0 on 2 df, and a t
# quantile of about 67 at the spent alpha: the good version could never pass and paused.
CANARY_AFTER, CANARY_BEFORE = (0, 444), (0, 80)
FLEET_AFTER = [(1, 292), (0, 292), (3, 237)]
FLEET_BEFORE = [(0, 80), (0, 80), (1, 70)]
DEMO_GATE = dict(threshold=0.25, min_effect=0.05, min_samples=30)


def _paired(after: list[tuple[int, int]], before: list[tuple[int, int]]) -> stats.Change:
    return stats.Change.of(zip(after, before, strict=True))


def _demo_judge(canary_after: tuple[int, int], within: bool) -> stats.Verdict:
    x, n = canary_after
    base_x = sum(f[0] for f in FLEET_AFTER)
    base_n = sum(f[1] for f in FLEET_AFTER)
    extra = (
        dict(
            change=_paired([canary_after], [CANARY_BEFORE]),
            base_change=_paired(FLEET_AFTER, FLEET_BEFORE),
        )
        if within
        else {}
    )
    return _judge(
        x, n, stats.Clusters.of([canary_after]), base_x=base_x, base_n=base_n,
        base_clusters=stats.Clusters.of(FLEET_AFTER), **DEMO_GATE, **extra,
    )  # fmt: skip


def test_the_demos_canary_passes_within_device_where_the_fleet_comparison_cannot() -> None:
    unpaired = _demo_judge(CANARY_AFTER, within=False)
    assert unpaired.passed is None and (unpaired.high or 0) > 0.3  # waits, then pauses
    paired = _demo_judge(CANARY_AFTER, within=True)
    assert paired.passed is True, paired.reason
    assert paired.reason.startswith("within-device: ")
    assert paired.high is not None and paired.high < 0.1


def test_within_device_still_stops_a_bad_version_at_once() -> None:
    # v3 in the demo: 37 of 38 requests fell back to the cloud.
    bad = _demo_judge((37, 38), within=True)
    assert bad.passed is False and bad.low is not None and bad.low > 0.25


def test_a_device_is_compared_with_itself_not_with_the_fleet() -> None:
    # The canary's inputs are hard: it falls back on 10% of requests under either version;
    # the fleet's devices on 1% or 10%. Against a fleet that spread no canary of one device
    # can show a 2-point margin; against itself it can.
    gate = Gate(GateMetric.FALLBACK_RATE, 0.02, 0, relative=True, min_effect=0.02)
    canary_after, canary_before = (400, 4000), (800, 8000)
    fleet_after = [(40, 4000), (400, 4000)] * 5
    fleet_before = [(80, 8000), (800, 8000)] * 5
    cohort = VersionStats(
        requests=4000,
        fallbacks=400,
        fallback_clusters=stats.Clusters.of([canary_after]),
        fallback_change=_paired([canary_after], [canary_before]),
    )
    baseline = VersionStats(
        requests=40_000,
        fallbacks=2200,
        fallback_clusters=stats.Clusters.of(fleet_after),
        fallback_change=_paired(fleet_after, fleet_before),
    )
    (paired,) = evaluate_gates([gate], cohort, baseline, 0, 1)
    assert paired.passed is True and paired.value == pytest.approx(0.0), paired.reason
    assert paired.reason.startswith("within-device: ")
    (unpaired,) = evaluate_gates([gate], replace(cohort, fallback_change=None), baseline, 0, 1)
    assert unpaired.passed is None, unpaired.reason


def test_a_fleet_of_like_devices_is_judged_by_the_fleet_comparison_too() -> None:
    # Little history (800 requests a device) makes the within-device interval wide; the
    # fleet of like devices gives the narrow one, and it alone passes the gate.
    gate = Gate(GateMetric.FALLBACK_RATE, 0.0, 0, relative=True, min_effect=0.02)
    after, before = [(400, 4000)] * 2, [(80, 800)] * 2
    fleet = [(100, 1000)] * 100
    cohort = VersionStats(
        requests=8000,
        fallbacks=800,
        fallback_clusters=stats.Clusters.of(after),
        fallback_change=_paired(after, before),
    )
    baseline = VersionStats(
        requests=100_000,
        fallbacks=10_000,
        fallback_clusters=stats.Clusters.of(fleet),
        fallback_change=_paired(fleet, [(80, 800)] * 100),
    )
    (both,) = evaluate_gates([gate], cohort, baseline, 0, 2)
    assert both.passed is True and not both.reason.startswith("within-device"), both.reason
    only_within = stats.within_device(
        stats.spent_alpha(0.01, 8000) / 2, _paired(after, before), None, False
    )
    assert only_within[2] > 0.02  # alone it would have waited


def test_the_baseline_devices_drift_is_subtracted() -> None:
    # Everyone's fallbacks rose from 1% to 6% during the canary (say, a lighting change at the
    # sites): the version did nothing; without the baseline's drift the cohort's change fails.
    after, before = [(60, 1000)] * 2, [(20, 2000)] * 2
    fleet_after, fleet_before = [(60, 1000)] * 20, [(20, 2000)] * 20
    kw = dict(threshold=0.02, min_effect=0.02, base_x=1200, base_n=20_000)
    alone = _judge(120, 2000, None, change=_paired(after, before), **kw)
    assert alone.passed is False
    drift = _judge(
        120, 2000, None, change=_paired(after, before),
        base_change=_paired(fleet_after, fleet_before), **kw,
    )  # fmt: skip
    assert drift.passed is True, drift.reason


def test_a_cohort_device_without_history_is_judged_against_the_fleet() -> None:
    change = stats.Change.of([((0, 444), (0, 80)), ((2, 300), (0, 0))])
    assert change.count == 1 and change.unpaired == 1
    kw: dict[str, object] = dict(base_x=4, base_n=821, **DEMO_GATE)
    assert _judge(2, 744, None, change=change, **kw) == _judge(2, 744, None, **kw)


def test_rare_events_keep_a_width_and_many_devices_add_the_robust_one() -> None:
    zero = stats.Change.of([((0, 500), (0, 500))])
    assert zero.effect == 0 and zero.variance() > 0  # Agresti-Coull: never a zero width
    # Twenty cohort devices whose changes spread (the version helps some, hurts others):
    # the CR1 variance of the changes is wider than the binomial one.
    spread = stats.Change.of([((150, 1000), (100, 1000)), ((50, 1000), (100, 1000))] * 10)
    assert abs(spread.effect) < 1e-12
    robust = spread.robust()
    assert robust is not None and robust > spread.variance()
    _, low, high = stats.within_device(1e-4, spread, None, higher_is_better=False)
    assert high - low > 2 * stats.z_for(1e-4) * spread.variance() ** 0.5
