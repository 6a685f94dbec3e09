"""The rollout engine: pure logic, no IO (python-tuf style).

The service calls `step(plan, state, observation)` on a timer and `command(...)` for manual
actions; each returns a `Decision`: the next `RolloutState` (persisted by the caller), the
devices to move to the new version, the devices to move back to their baseline, and the
events to record (each with its actor: a user name, ``gate:<metric>``, ``timeout`` or
``engine``). Device reports go through `on_report`. Nothing here reads a clock, a database or
a broker, so every rule is tested directly (tests/fleet/test_engine.py). The values it works
on (plan, state, observation, decision) are defined in `plan` and re-exported here.

Rules:

- Targeted devices are ordered by `cohort_key(model, device_id)`: a hash of the model name and
  the device id, not of the rollout, so a device keeps its place in the order across retries
  and across later rollouts of the same model. Stage *i* covers the first
  ``ceil(percent_i% * N)`` devices of that order (at least one).
- New assignments are rate limited by a token bucket (`RolloutPlan.max_assignments_per_s`).
- A device succeeds only when it reports HEALTHY for the new version; FAILED, REFUSED and
  ROLLED_BACK for it, or silence for `device_timeout_s` after assignment, fail it (and move it
  back to its baseline).
- A stage *settles* when every device in its cohort has succeeded or failed. It then soaks
  for `min_soak_s`; the gates are evaluated at every step once settled (so a bad version is
  stopped as soon as the numbers show it) and must pass at the end of the soak to advance. A
  gate with too little data holds the stage (never passes by default).
- A failing gate pauses or aborts, per `RolloutPlan.on_gate_failure`; abort moves every touched
  device back to its baseline.
- Manual pause, resume, promote (skip to the next stage now) and abort.
- The state is a value: a restarted service that loads it carries on at the same stage, with
  the same settle time, so it neither repeats nor skips a stage.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from . import gates as stats
from .errors import ConflictError
from .plan import (
    HIGHER_IS_BETTER,
    IN_FLIGHT,
    SETTLED,
    TELEMETRY_METRICS,
    TERMINAL_STATUSES,
    Command,
    Decision,
    DeviceState,
    DeviceView,
    Event,
    EventKind,
    Gate,
    GateAction,
    GateMetric,
    GateResult,
    Observation,
    ReportKind,
    RolloutPlan,
    RolloutState,
    RolloutStatus,
    Stage,
    VersionStats,
    report_event_kind,
)

# The values live in `plan`; they are re-exported, so `eng.X` names every engine name.
__all__ = [
    "Command",
    "Decision",
    "DeviceState",
    "DeviceView",
    "Event",
    "EventKind",
    "Gate",
    "GateAction",
    "GateMetric",
    "GateResult",
    "HIGHER_IS_BETTER",
    "IN_FLIGHT",
    "Observation",
    "ReportKind",
    "RolloutPlan",
    "RolloutState",
    "RolloutStatus",
    "SETTLED",
    "Stage",
    "TELEMETRY_METRICS",
    "TERMINAL_STATUSES",
    "VersionStats",
    "cohort_key",
    "cohort_size",
    "command",
    "evaluate_gates",
    "on_report",
    "ordered",
    "report_event_kind",
    "step",
]


# --- the rules ----------------------------------------------------------------------------


def cohort_key(model: str, device_id: str) -> int:
    """A device's place in the rollout order of a model: stable across rollouts and retries."""
    digest = hashlib.sha256(f"{model}\x00{device_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def ordered(plan: RolloutPlan, devices: Sequence[DeviceView]) -> list[DeviceView]:
    return sorted(devices, key=lambda d: (cohort_key(plan.model, d.device_id), d.device_id))


def cohort_size(percent: float, targeted: int) -> int:
    if targeted == 0:
        return 0
    # A tiny rounding error must not add a device: 10% of 1000 is 100, not 101.
    return max(1, min(targeted, math.ceil(round(percent * targeted / 100.0, 9))))


def evaluate_gates(
    gates: Sequence[Gate],
    cohort: VersionStats,
    baseline: VersionStats,
    failed_pct: float,
    cohort_devices: int,
    alpha: float = 0.01,
) -> tuple[GateResult, ...]:
    """Judges each gate through a confidence bound (see gates.py); `alpha` is one gate's
    false-abort budget."""
    results = []
    for gate in gates:
        m = gate.metric
        if m is GateMetric.FAILED_DEVICE_PCT:
            # Counted, not sampled: the settled cohort is the whole population.
            if not cohort_devices or cohort_devices < gate.min_samples:
                why = f"{cohort_devices} of {max(1, gate.min_samples)} devices"
                results.append(GateResult(m, None, gate.threshold, None, cohort_devices, None))
                results[-1] = replace(results[-1], reason=why)
                continue
            ok = failed_pct <= gate.threshold
            why = f"{failed_pct:.3g}% {'<=' if ok else '>'} {gate.threshold:g}%"
            results.append(
                GateResult(
                    m, failed_pct, gate.threshold, ok, cohort_devices, None,
                    failed_pct, failed_pct, why,
                )
            )  # fmt: skip
            continue
        if m is GateMetric.P95_LATENCY_RATIO:
            base = baseline.p95_latency_ms
            value = (
                cohort.p95_latency_ms / base if cohort.p95_latency_ms is not None and base else None
            )
            same = (
                cohort.latency_layout is not None
                and cohort.latency_layout == baseline.latency_layout
            )
            v = stats.judge_latency(
                ratio=value,
                samples=cohort.requests,
                new_counts=cohort.latency_counts if same else (),
                base_counts=baseline.latency_counts if same else (),
                threshold=gate.threshold,
                alpha=alpha,
                min_samples=gate.min_samples,
            )
            results.append(
                GateResult(
                    m, value, gate.threshold, v.passed, cohort.requests, base,
                    v.low, v.high, v.reason,
                )
            )  # fmt: skip
            continue
        if m is GateMetric.TOKENS_PER_S_RATIO:
            # Medians of per-generation ms/token: tokens/s ratio = baseline's / cohort's.
            mine, base = cohort.p50_ms_per_token, baseline.p50_ms_per_token
            value = base / mine if mine and base else None
            same = (
                cohort.token_time_layout is not None
                and cohort.token_time_layout == baseline.token_time_layout
            )
            v = stats.judge_throughput(
                ratio=value,
                samples=cohort.generations,
                new_counts=cohort.token_time_counts if same else (),
                base_counts=baseline.token_time_counts if same else (),
                threshold=gate.threshold,
                alpha=alpha,
                min_samples=gate.min_samples,
            )
            base_rate = 1000.0 / base if base else None
            results.append(
                GateResult(
                    m, value, gate.threshold, v.passed, cohort.generations, base_rate,
                    v.low, v.high, v.reason,
                )
            )  # fmt: skip
            continue
        if m is GateMetric.ESTIMATED_ACCURACY:
            est = stats.estimated_accuracy(cohort.confidence_buckets, cohort.confidence_sum)
            best = stats.estimated_accuracy(baseline.confidence_buckets, baseline.confidence_sum)
            x, n = (est[0] * est[1], est[1]) if est else (0.0, 0)
            bx, bn = (best[0] * best[1], best[1]) if best else (0.0, 0)
            base_value = best[0] if best else None
            clusters = cohort.accuracy_clusters, baseline.accuracy_clusters
            changes = cohort.accuracy_change, baseline.accuracy_change
        else:
            x, n, bx, bn = {
                GateMetric.ERROR_RATE: (
                    cohort.errors, cohort.requests, baseline.errors, baseline.requests
                ),
                GateMetric.FALLBACK_RATE: (
                    cohort.fallbacks, cohort.requests, baseline.fallbacks, baseline.requests
                ),
                GateMetric.SHADOW_AGREEMENT: (
                    cohort.shadow_agreed, cohort.shadow_sampled,
                    baseline.shadow_agreed, baseline.shadow_sampled,
                ),
                GateMetric.ACCEPTANCE_RATE: (
                    cohort.accepted, cohort.drafted, baseline.accepted, baseline.drafted
                ),
                GateMetric.ESCALATION_RATE: (
                    cohort.escalations, cohort.generations,
                    baseline.escalations, baseline.generations,
                ),
            }[m]  # fmt: skip
            base_value = bx / bn if bn else None
            clusters = {
                GateMetric.ERROR_RATE: (cohort.error_clusters, baseline.error_clusters),
                GateMetric.FALLBACK_RATE: (cohort.fallback_clusters, baseline.fallback_clusters),
                GateMetric.SHADOW_AGREEMENT: (
                    cohort.agreement_clusters, baseline.agreement_clusters
                ),
                GateMetric.ACCEPTANCE_RATE: (
                    cohort.acceptance_clusters, baseline.acceptance_clusters
                ),
                GateMetric.ESCALATION_RATE: (
                    cohort.escalation_clusters, baseline.escalation_clusters
                ),
            }[m]  # fmt: skip
            changes = {
                GateMetric.ERROR_RATE: (cohort.error_change, baseline.error_change),
                GateMetric.FALLBACK_RATE: (cohort.fallback_change, baseline.fallback_change),
                GateMetric.SHADOW_AGREEMENT: (cohort.agreement_change, baseline.agreement_change),
                GateMetric.ACCEPTANCE_RATE: (cohort.acceptance_change, baseline.acceptance_change),
                GateMetric.ESCALATION_RATE: (cohort.escalation_change, baseline.escalation_change),
            }[m]  # fmt: skip
        value, v = stats.judge_proportion(
            x=x,
            n=n,
            threshold=gate.threshold,
            higher_is_better=m in HIGHER_IS_BETTER,
            alpha=alpha,
            min_effect=gate.min_effect,
            min_samples=gate.min_samples,
            base_x=bx if gate.relative else None,
            base_n=bn,
            # Device-clustered when the per-device totals are known; the baseline's devices
            # also inform an absolute gate's between-device variance.
            clusters=clusters[0],
            base_clusters=clusters[1],
            # A relative gate compares each cohort device with itself before the rollout
            # when every one of them has that history (gates.within_device).
            change=changes[0],
            base_change=changes[1],
        )
        results.append(
            GateResult(m, value, gate.threshold, v.passed, n, base_value, v.low, v.high, v.reason)
        )
    return tuple(results)


def step(plan: RolloutPlan, state: RolloutState, obs: Observation) -> Decision:
    """One turn of the engine: time out silent devices, assign the stage's cohort, judge
    the gates, advance, complete, pause or abort."""
    if state.status in TERMINAL_STATUSES:
        return Decision(state)
    now = obs.now
    events: list[Event] = []
    idx = state.stage_index
    stage = plan.stages[idx]

    # Silent devices fail, also while paused: the timeout is about the device, not the stage.
    failures: list[tuple[str, str]] = []
    views: dict[str, DeviceView] = {}
    for view in obs.devices:
        if (
            view.state in IN_FLIGHT
            and view.assigned_at is not None
            and now - max(view.assigned_at, view.updated_at or view.assigned_at)
            >= plan.device_timeout_s
        ):
            failures.append((view.device_id, "timeout"))
            events.append(
                Event(
                    EventKind.DEVICE_FAILED, "timeout", idx, {"reason": "timeout"}, view.device_id
                )
            )
            view = replace(view, state=DeviceState.FAILED)
        views[view.device_id] = view
    if state.status is RolloutStatus.PAUSED:
        return Decision(state, fail=tuple(failures), events=tuple(events))

    order = ordered(plan, list(views.values()))
    want = cohort_size(stage.percent, len(order))
    untouched = [v.device_id for v in order[:want] if v.state is None]

    tokens, tokens_at = state.tokens, state.tokens_at
    if plan.max_assignments_per_s > 0:
        burst = max(1.0, plan.max_assignments_per_s)
        tokens = min(burst, tokens + (now - tokens_at) * plan.max_assignments_per_s)
        tokens_at = now
        take = min(len(untouched), int(tokens))
        tokens -= take
    else:
        take = len(untouched)
    assign = tuple(untouched[:take])
    state = replace(state, tokens=tokens, tokens_at=tokens_at)

    touched = [v for v in order if v.state is not None]
    cohort_count = len(touched) + len(assign)
    settled = not untouched[take:] and not assign and all(v.state in SETTLED for v in touched)
    failed = sum(1 for v in touched if v.state is DeviceState.FAILED)
    failed_pct = 100.0 * failed / cohort_count if cohort_count else 0.0

    if not settled:
        if state.stage_settled_at is not None:
            state = replace(state, stage_settled_at=None)
        return Decision(state, assign, tuple(failures), events=tuple(events))

    if state.stage_settled_at is None:
        state = replace(state, stage_settled_at=now)
        events.append(
            Event(
                EventKind.STAGE_SETTLED, "engine", idx, {"devices": cohort_count, "failed": failed}
            )
        )
    gates = evaluate_gates(
        stage.gates, obs.cohort, obs.baseline, failed_pct, cohort_count, plan.gate_alpha(idx)
    )
    broken = [g for g in gates if g.passed is False]
    if broken:
        actor = "gate:" + broken[0].metric.value
        detail = {"gates": [g.to_json() for g in broken]}
        events.append(Event(EventKind.GATE_FAILED, actor, idx, detail))
        if plan.on_gate_failure is GateAction.PAUSE:
            reason = f"gate {broken[0].metric.value} failed"
            state = replace(state, status=RolloutStatus.PAUSED, paused_reason=reason)
            events.append(Event(EventKind.PAUSED, actor, idx, {"reason": reason}))
            return Decision(state, fail=tuple(failures), events=tuple(events), gates=gates)
        return _abort(
            state,
            order,
            now,
            actor,
            events,
            failures,
            gates,
            f"gate {broken[0].metric.value} failed",
        )

    settled_at = state.stage_settled_at if state.stage_settled_at is not None else now
    if now - settled_at < stage.min_soak_s:
        return Decision(state, fail=tuple(failures), events=tuple(events), gates=gates)
    if any(g.passed is None for g in gates):
        missing = [g.metric.value for g in gates if g.passed is None]
        if not state.waiting_for_data:
            state = replace(state, waiting_for_data=True)
            events.append(Event(EventKind.WAITING_FOR_TELEMETRY, "engine", idx, {"gates": missing}))
        if now - settled_at - stage.min_soak_s >= stage.max_wait_s:
            # Never promoted for lack of evidence, never waiting forever: a person decides.
            reason = f"no evidence after {stage.max_wait_s:g}s for gate(s) {', '.join(missing)}"
            lacking: dict[str, Any] = {
                "gates": [g.to_json() for g in gates if g.passed is None],
                "reason": reason,
            }
            events.append(Event(EventKind.GATE_EVIDENCE_TIMEOUT, "timeout", idx, lacking))
            state = replace(state, status=RolloutStatus.PAUSED, paused_reason=reason)
            events.append(Event(EventKind.PAUSED, "timeout", idx, {"reason": reason}))
        return Decision(state, fail=tuple(failures), events=tuple(events), gates=gates)
    state, more = _advance(plan, state, now, "engine", {"gates": [g.to_json() for g in gates]})
    events.extend(more)
    return Decision(state, fail=tuple(failures), events=tuple(events), gates=gates)


def _advance(
    plan: RolloutPlan, state: RolloutState, now: float, actor: str, detail: Mapping[str, Any]
) -> tuple[RolloutState, list[Event]]:
    idx = state.stage_index
    if idx + 1 >= len(plan.stages):
        done = replace(state, status=RolloutStatus.COMPLETED, paused_reason="")
        return done, [Event(EventKind.COMPLETED, actor, idx, dict(detail))]
    nxt = replace(
        state,
        status=RolloutStatus.RUNNING,
        stage_index=idx + 1,
        stage_started_at=now,
        stage_settled_at=None,
        paused_reason="",
        waiting_for_data=False,
    )
    return nxt, [Event(EventKind.STAGE_ADVANCED, actor, idx + 1, {**detail, "from_stage": idx})]


def _abort(
    state: RolloutState,
    devices: Sequence[DeviceView],
    now: float,
    actor: str,
    events: list[Event],
    failures: Sequence[tuple[str, str]],
    gates: tuple[GateResult, ...],
    reason: str,
) -> Decision:
    failed_now = {d for d, _ in failures}
    back = tuple(
        v.device_id
        for v in devices
        # Failed devices went back when they failed, and keep "failed" with its reason.
        if v.state is not None
        and v.state not in (DeviceState.ROLLED_BACK, DeviceState.FAILED)
        and v.device_id not in failed_now
    )
    state = replace(state, status=RolloutStatus.ABORTED, paused_reason=reason)
    events.append(
        Event(
            EventKind.ABORTED, actor, state.stage_index, {"reason": reason, "rollback": len(back)}
        )
    )
    return Decision(state, fail=tuple(failures), rollback=back, events=tuple(events), gates=gates)


def command(
    plan: RolloutPlan,
    state: RolloutState,
    cmd: Command | str,
    actor: str,
    now: float,
    devices: Sequence[DeviceView] = (),
) -> Decision:
    """A manual action by `actor`; raises ConflictError when it makes no sense now."""
    cmd = Command(cmd)
    idx = state.stage_index
    if state.status in TERMINAL_STATUSES:
        raise ConflictError(f"cannot {cmd.value} a rollout that is {state.status.value}")
    if cmd is Command.PAUSE:
        if state.status is RolloutStatus.PAUSED:
            raise ConflictError("rollout is already paused")
        new = replace(state, status=RolloutStatus.PAUSED, paused_reason=f"paused by {actor}")
        return Decision(new, events=(Event(EventKind.PAUSED, actor, idx, {"reason": "manual"}),))
    if cmd is Command.RESUME:
        if state.status is RolloutStatus.RUNNING:
            raise ConflictError("rollout is not paused")
        # The gates judge the telemetry from here on, and the stage soaks afresh, so a resume
        # after a gate failure is a deliberate second look rather than an instant re-failure.
        new = replace(
            state,
            status=RolloutStatus.RUNNING,
            paused_reason="",
            gate_window_start=now,
            stage_settled_at=None,
            tokens_at=now,
            waiting_for_data=False,
        )
        return Decision(new, events=(Event(EventKind.RESUMED, actor, idx),))
    if cmd is Command.PROMOTE:
        new, events = _advance(plan, state, now, actor, {"manual": True})
        if new.status is RolloutStatus.RUNNING:
            new = replace(new, tokens_at=now)
        return Decision(new, events=tuple(events))
    return _abort(state, ordered(plan, devices), now, actor, [], (), (), f"aborted by {actor}")


def on_report(
    current: DeviceState | None, kind: ReportKind | str, version: int, plan_version: int
) -> DeviceState | None:
    """The device's assignment state after a report; None when the report does not apply
    (another version, an untouched device, or a device already settled)."""
    kind = ReportKind(kind)
    if current is None or current in SETTLED or version != plan_version:
        return None
    if kind is ReportKind.HEALTHY:
        return DeviceState.SUCCEEDED
    if kind in (ReportKind.FAILED, ReportKind.REFUSED, ReportKind.ROLLED_BACK):
        return DeviceState.FAILED
    if current is DeviceState.ASSIGNED:
        return DeviceState.INSTALLING
    return None
