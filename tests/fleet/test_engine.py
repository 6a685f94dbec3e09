"""The rollout engine as pure logic: no broker, no database, a fake clock by value."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

import pytest

from tandem.cloud.fleet.engine import (
    Command,
    DeviceState,
    DeviceView,
    Gate,
    GateAction,
    GateMetric,
    Observation,
    RolloutPlan,
    RolloutState,
    RolloutStatus,
    Stage,
    VersionStats,
    cohort_key,
    cohort_size,
    command,
    on_report,
    ordered,
    step,
)
from tandem.cloud.fleet.errors import ConflictError
from tandem.errors import ConfigError

DEVICES = [f"dev-{i:03d}" for i in range(100)]


def plan(**kw: object) -> RolloutPlan:
    base: dict[str, object] = {
        "model": "digits",
        "version": 2,
        "stages": (Stage(1, 5), Stage(10, 5), Stage(50, 5), Stage(100, 5)),
        "device_timeout_s": 60,
    }
    base.update(kw)
    return RolloutPlan(**base)  # type: ignore[arg-type]


class Fleet:
    """A tiny simulation of device views around the engine."""

    def __init__(self, p: RolloutPlan, ids: Iterable[str] = DEVICES) -> None:
        self.plan = p
        self.views = {d: DeviceView(d) for d in ids}
        self.state = RolloutState.initial(0.0)
        self.events: list[str] = []
        self.ever_assigned: set[str] = set()

    def run(self, now: float, healthy: bool = True, **obs: VersionStats) -> None:
        d = step(self.plan, self.state, Observation(now, list(self.views.values()), **obs))
        self.apply(d, now)
        if healthy:
            for dev in d.assign:
                self.views[dev] = replace(self.views[dev], state=DeviceState.SUCCEEDED)

    def apply(self, d: object, now: float) -> None:
        from tandem.cloud.fleet.engine import Decision

        assert isinstance(d, Decision)
        self.state = d.state
        for dev in d.assign:
            self.ever_assigned.add(dev)
            self.views[dev] = DeviceView(dev, DeviceState.ASSIGNED, now, now)
        for dev, _ in d.fail:
            self.views[dev] = replace(self.views[dev], state=DeviceState.FAILED)
        for dev in d.rollback:
            self.views[dev] = replace(self.views[dev], state=DeviceState.ROLLED_BACK)
        self.events.extend(e.kind for e in d.events)

    def count(self, state: DeviceState) -> int:
        return sum(1 for v in self.views.values() if v.state is state)


def test_cohort_key_depends_on_model_and_device_only() -> None:
    assert cohort_key("digits", "a") == cohort_key("digits", "a")
    assert cohort_key("digits", "a") != cohort_key("minilm", "a")
    assert cohort_size(1, 1000) == 10
    assert cohort_size(10, 1000) == 100
    assert cohort_size(1, 5) == 1
    assert cohort_size(100, 7) == 7
    assert cohort_size(50, 0) == 0


def test_first_cohort_is_stable_across_rollouts_of_the_model() -> None:
    views = [DeviceView(d) for d in DEVICES]
    first_v2 = {v.device_id for v in ordered(plan(version=2), views)[:10]}
    first_v3 = {v.device_id for v in ordered(plan(version=3), views)[:10]}
    assert first_v2 == first_v3
    reversed_views = list(reversed(views))
    assert {v.device_id for v in ordered(plan(), reversed_views)[:10]} == first_v2


def test_rollout_walks_all_stages_with_soaks() -> None:
    f = Fleet(plan())
    f.run(0.0)
    assert f.count(DeviceState.SUCCEEDED) == 1
    f.run(1.0)  # settled at 1.0
    assert f.state.stage_index == 0 and f.state.stage_settled_at == 1.0
    f.run(5.9)
    assert f.state.stage_index == 0, "advanced before the soak ended"
    f.run(6.0)
    assert f.state.stage_index == 1
    t = 6.0
    while f.state.status is RolloutStatus.RUNNING and t < 100:
        t += 1.0
        f.run(t)
    assert f.state.status is RolloutStatus.COMPLETED
    assert f.count(DeviceState.SUCCEEDED) == 100
    assert f.events.count("stage_advanced") == 3
    assert f.events[-1] == "completed"


def test_stage_waits_for_in_flight_devices() -> None:
    f = Fleet(plan(stages=(Stage(10, 0), Stage(100, 0))))
    f.run(0.0, healthy=False)
    assert f.count(DeviceState.ASSIGNED) == 10
    for t in (1.0, 2.0, 30.0):
        f.run(t, healthy=False)
        assert f.state.stage_index == 0
    assert f.count(DeviceState.ASSIGNED) == 10, "no devices outside the cohort"


def test_silent_device_times_out_and_counts_as_failed() -> None:
    gate = Gate(GateMetric.FAILED_DEVICE_PCT, threshold=20.0)
    f = Fleet(plan(stages=(Stage(10, 0, (gate,)), Stage(100, 0)), device_timeout_s=10))
    f.run(0.0, healthy=False)
    cohort = [d for d, v in f.views.items() if v.state is DeviceState.ASSIGNED]
    for dev in cohort[1:]:
        f.views[dev] = replace(f.views[dev], state=DeviceState.SUCCEEDED)
    f.run(9.0, healthy=False)
    assert f.state.stage_index == 0
    d = step(f.plan, f.state, Observation(10.0, list(f.views.values())))
    assert d.fail == ((cohort[0], "timeout"),)
    assert any(e.actor == "timeout" and e.device_id == cohort[0] for e in d.events)
    f.apply(d, 10.0)
    f.run(11.0)  # 1 of 10 failed = 10% <= 20%: advances
    assert f.state.stage_index == 1


def test_failed_device_gate_aborts_and_rolls_back_touched_devices() -> None:
    gate = Gate(GateMetric.FAILED_DEVICE_PCT, threshold=10.0)
    f = Fleet(plan(stages=(Stage(10, 5, (gate,)), Stage(100, 0))))
    f.run(0.0, healthy=False)
    cohort = sorted(d for d, v in f.views.items() if v.state is DeviceState.ASSIGNED)
    for i, dev in enumerate(cohort):
        bad = i < 3
        f.views[dev] = replace(
            f.views[dev], state=DeviceState.FAILED if bad else DeviceState.SUCCEEDED
        )
    d = step(f.plan, f.state, Observation(1.0, list(f.views.values())))
    assert d.state.status is RolloutStatus.ABORTED
    # The failed ones went back when they failed (and stay "failed"); the rest go back now.
    assert set(d.rollback) == set(cohort[3:]), "every other touched device goes back"
    failed_events = [e for e in d.events if e.kind == "gate_failed"]
    assert failed_events and failed_events[0].actor == "gate:failed_device_pct"
    f.apply(d, 1.0)
    assert f.count(DeviceState.FAILED) == 3 and f.count(DeviceState.ROLLED_BACK) == 7
    assert f.ever_assigned == set(cohort), "nobody outside the first cohort got the version"
    assert step(f.plan, f.state, Observation(2.0, list(f.views.values()))).assign == ()


def test_telemetry_gates_compare_with_baseline() -> None:
    gates = (
        Gate(GateMetric.ERROR_RATE, 0.05, min_samples=100),
        Gate(GateMetric.P95_LATENCY_RATIO, 1.5, min_samples=100),
        Gate(GateMetric.FALLBACK_RATE, 0.10, relative=True, min_samples=100),
        Gate(GateMetric.SHADOW_AGREEMENT, 0.9, min_samples=50),
    )
    p = plan(stages=(Stage(10, 5, gates), Stage(100, 0)))
    base = VersionStats(
        requests=1000,
        errors=10,
        fallbacks=100,
        p95_latency_ms=10.0,
        shadow_sampled=100,
        shadow_agreed=98,
    )
    # Enough data that the confidence bounds, not just the raw ratios, clear the thresholds.
    good = VersionStats(
        requests=5000,
        errors=50,
        fallbacks=600,
        p95_latency_ms=12.0,
        shadow_sampled=600,
        shadow_agreed=580,
    )
    f = Fleet(p)
    f.run(0.0, cohort=good, baseline=base)
    f.run(1.0, cohort=good, baseline=base)
    assert f.state.stage_index == 0
    f.run(6.0, cohort=good, baseline=base)
    assert f.state.stage_index == 1

    for bad, metric in (
        (replace(good, errors=1000), "error_rate"),
        (replace(good, p95_latency_ms=40.0), "p95_latency_ratio"),
        (replace(good, fallbacks=3000), "fallback_rate"),
        (replace(good, shadow_agreed=300), "shadow_agreement"),
    ):
        f = Fleet(p)
        f.run(0.0, cohort=bad, baseline=base)
        d = step(p, f.state, Observation(1.0, list(f.views.values()), bad, base))
        assert d.state.status is RolloutStatus.ABORTED, metric
        assert d.events[-2].actor == f"gate:{metric}"
        failing = [g for g in d.gates if g.passed is False]
        assert [g.metric.value for g in failing] == [metric]


def test_gate_without_enough_data_holds_the_stage() -> None:
    gate = Gate(GateMetric.ERROR_RATE, 0.05, min_samples=100)
    p = plan(stages=(Stage(10, 1, (gate,)), Stage(100, 0)))
    f = Fleet(p)
    few = VersionStats(requests=20)
    f.run(0.0, cohort=few)
    for t in (1.0, 5.0, 50.0):
        f.run(t, cohort=few)
    assert f.state.stage_index == 0 and f.state.status is RolloutStatus.RUNNING
    assert f.events.count("waiting_for_telemetry") == 1
    f.run(51.0, cohort=VersionStats(requests=1000, errors=5))
    assert f.state.stage_index == 1


def test_gate_failure_can_pause_instead_and_resume_takes_a_fresh_look() -> None:
    gate = Gate(GateMetric.ERROR_RATE, 0.05)
    p = plan(stages=(Stage(10, 2, (gate,)), Stage(100, 0)), on_gate_failure=GateAction.PAUSE)
    f = Fleet(p)
    bad = VersionStats(requests=100, errors=50)
    f.run(0.0, cohort=bad)
    f.run(1.0, cohort=bad)
    assert f.state.status is RolloutStatus.PAUSED
    assert "error_rate" in f.state.paused_reason
    f.run(50.0, cohort=bad)
    assert f.state.status is RolloutStatus.PAUSED, "paused rollouts do not move"
    d = command(p, f.state, Command.RESUME, "alice", 60.0)
    assert d.events[0].actor == "alice" and d.state.gate_window_start == 60.0
    f.apply(d, 60.0)
    fine = VersionStats(requests=1000, errors=0)
    f.run(61.0, cohort=fine)
    f.run(62.0, cohort=fine)
    assert f.state.stage_index == 0, "soaks afresh after resume"
    f.run(63.0, cohort=fine)
    assert f.state.stage_index == 1


def test_manual_commands_and_their_conflicts() -> None:
    p = plan()
    f = Fleet(p)
    f.run(0.0)
    d = command(p, f.state, "pause", "bob", 1.0)
    assert d.state.status is RolloutStatus.PAUSED
    with pytest.raises(ConflictError):
        command(p, d.state, "pause", "bob", 1.0)
    f.apply(d, 1.0)
    d = command(p, f.state, "promote", "bob", 2.0)
    assert d.state.stage_index == 1 and d.state.status is RolloutStatus.RUNNING
    assert d.events[0].kind == "stage_advanced" and d.events[0].actor == "bob"
    f.apply(d, 2.0)
    f.run(3.0)
    assert f.count(DeviceState.SUCCEEDED) == 10
    d = command(p, f.state, Command.ABORT, "carol", 4.0, list(f.views.values()))
    assert d.state.status is RolloutStatus.ABORTED and len(d.rollback) == 10
    assert d.events[0].actor == "carol"
    f.apply(d, 4.0)
    for cmd in Command:
        with pytest.raises(ConflictError):
            command(p, f.state, cmd, "bob", 5.0)
    with pytest.raises(ConflictError):
        command(p, RolloutState.initial(0), "resume", "bob", 0)


def test_promote_on_last_stage_completes() -> None:
    p = plan(stages=(Stage(100, 1000),))
    d = command(p, RolloutState.initial(0.0), "promote", "dana", 1.0)
    assert d.state.status is RolloutStatus.COMPLETED


def test_rate_limit_spreads_assignments() -> None:
    p = plan(stages=(Stage(100, 0),), max_assignments_per_s=10)
    f = Fleet(p)
    f.run(0.0)
    assert f.count(DeviceState.SUCCEEDED) == 0
    f.run(1.0)
    assert f.count(DeviceState.SUCCEEDED) == 10
    f.run(1.5)
    assert f.count(DeviceState.SUCCEEDED) == 15
    t = 1.5
    while f.state.status is RolloutStatus.RUNNING:
        t += 1.0
        f.run(t)
    assert 10.0 <= t <= 12.0


def test_restart_from_persisted_state_neither_repeats_nor_skips() -> None:
    p = plan()
    f = Fleet(p)
    t = 0.0
    while f.state.stage_index < 2:
        t += 1.0
        f.run(t)
    saved = f.state  # what the store persisted
    advanced_before = f.events.count("stage_advanced")
    # A "new process" with the same state and views continues at stage 2.
    g = Fleet(p)
    g.views, g.state = dict(f.views), saved
    d = step(p, g.state, Observation(t + 0.5, list(g.views.values())))
    assert d.state.stage_index == 2
    assert all(g.views[x].state is None for x in d.assign), "re-assigned a device"
    while g.state.status is RolloutStatus.RUNNING:
        t += 1.0
        g.run(t)
    assert advanced_before + g.events.count("stage_advanced") == 3


def test_reports_map_to_device_states() -> None:
    assert on_report(DeviceState.ASSIGNED, "PROGRESS", 2, 2) is DeviceState.INSTALLING
    assert on_report(DeviceState.INSTALLING, "ACTIVATED", 2, 2) is None
    assert on_report(DeviceState.INSTALLING, "HEALTHY", 2, 2) is DeviceState.SUCCEEDED
    assert on_report(DeviceState.ASSIGNED, "HEALTHY", 1, 2) is None, "other version"
    assert on_report(DeviceState.INSTALLING, "REFUSED", 2, 2) is DeviceState.FAILED
    assert on_report(DeviceState.INSTALLING, "ROLLED_BACK", 2, 2) is DeviceState.FAILED
    assert on_report(None, "HEALTHY", 2, 2) is None
    assert on_report(DeviceState.SUCCEEDED, "FAILED", 2, 2) is None


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"stages": ()}, "plan.stages"),
        ({"stages": (Stage(50), Stage(10))}, "plan.stages"),
        ({"version": 0}, "plan.version"),
        ({"on_gate_failure": "explode"}, "plan.on_gate_failure"),
        ({"device_timeout_s": 0}, "plan.device_timeout_s"),
    ],
)
def test_plan_validation_names_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        plan(**kwargs)
    assert info.value.field == field


def test_stage_and_gate_validation() -> None:
    with pytest.raises(ConfigError, match=r"stage\.percent"):
        Stage(0)
    with pytest.raises(ConfigError, match=r"gate\.metric"):
        Gate.from_json({"metric": "vibes", "threshold": 1})
    with pytest.raises(ConfigError, match=r"gate\.relative"):
        Gate(GateMetric.FAILED_DEVICE_PCT, 1, relative=True)
    g = Gate.from_json({"metric": "shadow_agreement", "threshold": 0.9})
    assert Gate.from_json(g.to_json()) == g
    s = Stage(10, 5, (g,))
    assert Stage.from_json(s.to_json()) == s
