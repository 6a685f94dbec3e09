"""The statistical gates (cloud/tandem/cloud/fleet/gates.py) and the no-stall rule."""

from __future__ import annotations

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
