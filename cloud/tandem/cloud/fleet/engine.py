"""The rollout engine: pure logic, no IO (python-tuf style).

The service calls `step(plan, state, observation)` on a timer and `command(...)` for manual
actions; each returns a `Decision`: the next `RolloutState` (persisted by the caller), the
devices to move to the new version, the devices to move back to their baseline, and the
events to record (each with its actor: a user name, ``gate:<metric>``, ``timeout`` or
``engine``). Device reports go through `on_report`. Nothing here reads a clock, a database or
a broker, so every rule is tested directly (tests/fleet/test_engine.py).

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
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from tandem.errors import ConfigError

from . import gates as stats
from .errors import ConflictError

# --- the plan -----------------------------------------------------------------------------


class GateMetric(StrEnum):
    ERROR_RATE = "error_rate"  # errors / requests of the new version in the cohort
    P95_LATENCY_RATIO = "p95_latency_ratio"  # new p95 local latency / baseline p95
    FALLBACK_RATE = "fallback_rate"  # fallbacks / requests of the new version in the cohort
    SHADOW_AGREEMENT = "shadow_agreement"  # shadow_agreed / shadow_sampled (higher is better)
    FAILED_DEVICE_PCT = "failed_device_pct"  # failed devices / cohort devices, in percent
    # Label-free: mean calibrated confidence of local answers (higher is better).
    ESTIMATED_ACCURACY = "estimated_accuracy"


# Metrics where a higher value is better: the gate fails when the value drops below.
_HIGHER_IS_BETTER = {GateMetric.SHADOW_AGREEMENT, GateMetric.ESTIMATED_ACCURACY}
# Metrics that can also be bounded relative to the baseline version (value - baseline).
_TELEMETRY_METRICS = {
    GateMetric.ERROR_RATE,
    GateMetric.P95_LATENCY_RATIO,
    GateMetric.FALLBACK_RATE,
    GateMetric.SHADOW_AGREEMENT,
    GateMetric.ESTIMATED_ACCURACY,
}


@dataclass(frozen=True)
class Gate:
    """One health check. Lower-is-better metrics fail above `threshold`;
    shadow_agreement fails below it. With `relative`, the threshold bounds the difference to
    the baseline version's value instead (new - baseline, or baseline - new for agreement)."""

    metric: GateMetric
    threshold: float
    # Samples the new version needs in the cohort before the gate can judge (requests, or
    # shadow samples for agreement); below that the gate holds the stage.
    min_samples: int = 1
    relative: bool = False
    # The smallest degradation the gate must catch: it passes only once the confidence bound
    # shows the cohort within threshold + min_effect (threshold - min_effect for
    # higher-is-better metrics); between the two it waits for more data.
    min_effect: float = 0.02

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "metric", GateMetric(self.metric))
        except ValueError:
            raise ConfigError(
                "gate.metric", f"{self.metric!r} is not one of {[m.value for m in GateMetric]}"
            ) from None
        if not math.isfinite(self.threshold) or self.threshold < 0:
            raise ConfigError(
                "gate.threshold", f"must be a finite number >= 0, got {self.threshold}"
            )
        if not (0 <= self.min_effect < math.inf):
            raise ConfigError("gate.min_effect", f"must be >= 0, got {self.min_effect}")
        if self.min_samples < 0:
            raise ConfigError("gate.min_samples", f"must be >= 0, got {self.min_samples}")
        if self.relative and self.metric not in _TELEMETRY_METRICS - {GateMetric.P95_LATENCY_RATIO}:
            raise ConfigError("gate.relative", f"not meaningful for {self.metric.value}")

    def to_json(self) -> dict[str, Any]:
        return {
            "metric": self.metric.value,
            "threshold": self.threshold,
            "min_samples": self.min_samples,
            "relative": self.relative,
            "min_effect": self.min_effect,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Gate:
        try:
            metric = GateMetric(str(data["metric"]))
        except ValueError:
            raise ConfigError(
                "gate.metric", f"{data['metric']!r} is not one of {[m.value for m in GateMetric]}"
            ) from None
        return cls(
            metric=metric,
            threshold=float(data["threshold"]),
            min_samples=int(data.get("min_samples", 1)),
            relative=bool(data.get("relative", False)),
            min_effect=float(data.get("min_effect", 0.02)),
        )


@dataclass(frozen=True)
class Stage:
    percent: float  # of the targeted devices, (0, 100]
    min_soak_s: float = 0.0  # seconds the settled stage must run before advancing
    gates: tuple[Gate, ...] = ()
    # Seconds after the soak that a gate may lack evidence before the rollout pauses.
    max_wait_s: float = 600.0

    def __post_init__(self) -> None:
        if not (0 < self.percent <= 100):
            raise ConfigError("stage.percent", f"must be in (0, 100], got {self.percent}")
        if not (0 <= self.min_soak_s < math.inf):
            raise ConfigError("stage.min_soak_s", f"must be >= 0 and finite, got {self.min_soak_s}")
        if not (0 < self.max_wait_s < math.inf):
            raise ConfigError("stage.max_wait_s", f"must be > 0 and finite, got {self.max_wait_s}")
        object.__setattr__(self, "gates", tuple(self.gates))

    def to_json(self) -> dict[str, Any]:
        return {
            "percent": self.percent,
            "min_soak_s": self.min_soak_s,
            "gates": [g.to_json() for g in self.gates],
            "max_wait_s": self.max_wait_s,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Stage:
        return cls(
            percent=float(data["percent"]),
            min_soak_s=float(data.get("min_soak_s", 0.0)),
            gates=tuple(Gate.from_json(g) for g in data.get("gates", ())),
            max_wait_s=float(data.get("max_wait_s", 600.0)),
        )


class GateAction(StrEnum):
    PAUSE = "pause"
    ABORT = "abort"


@dataclass(frozen=True)
class RolloutPlan:
    """What a rollout does; fixed at creation."""

    model: str
    version: int
    stages: tuple[Stage, ...]
    on_gate_failure: GateAction = GateAction.ABORT
    device_timeout_s: float = 600.0  # seconds from assignment to HEALTHY before a device fails
    max_assignments_per_s: float = 0.0  # new devices per second; 0 = unlimited
    # Chance that a version as good as the gates ask is stopped anyway, over the whole
    # rollout (split across stages and gates, and spent over the looks of each gate).
    false_abort_rate: float = 0.01

    def __post_init__(self) -> None:
        if not self.model:
            raise ConfigError("plan.model", "must not be empty")
        if not (1 <= self.version < 2**63):
            raise ConfigError("plan.version", f"must be in 1..2**63-1, got {self.version}")
        object.__setattr__(self, "stages", tuple(self.stages))
        if not self.stages:
            raise ConfigError("plan.stages", "at least one stage is needed")
        percents = [s.percent for s in self.stages]
        if any(b <= a for a, b in itertools.pairwise(percents)):
            raise ConfigError("plan.stages", f"percents must increase, got {percents}")
        try:
            object.__setattr__(self, "on_gate_failure", GateAction(self.on_gate_failure))
        except ValueError:
            raise ConfigError(
                "plan.on_gate_failure", f"must be 'pause' or 'abort', got {self.on_gate_failure!r}"
            ) from None
        if not (0 < self.device_timeout_s < math.inf):
            raise ConfigError(
                "plan.device_timeout_s", f"must be > 0 and finite, got {self.device_timeout_s}"
            )
        if not (0 <= self.max_assignments_per_s < math.inf):
            raise ConfigError(
                "plan.max_assignments_per_s", f"must be >= 0, got {self.max_assignments_per_s}"
            )
        if not (0 < self.false_abort_rate < 0.5):
            raise ConfigError(
                "plan.false_abort_rate", f"must be in (0, 0.5), got {self.false_abort_rate}"
            )

    def gate_alpha(self, stage_index: int) -> float:
        """The false-abort budget of one gate of a stage (Bonferroni over stages and gates)."""
        return self.false_abort_rate / (
            len(self.stages) * max(1, len(self.stages[stage_index].gates))
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "version": self.version,
            "stages": [s.to_json() for s in self.stages],
            "on_gate_failure": self.on_gate_failure.value,
            "device_timeout_s": self.device_timeout_s,
            "max_assignments_per_s": self.max_assignments_per_s,
            "false_abort_rate": self.false_abort_rate,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RolloutPlan:
        """Plans stored before the statistical gates load with the defaults."""
        return cls(
            model=str(data["model"]),
            version=int(data["version"]),
            stages=tuple(Stage.from_json(s) for s in data["stages"]),
            on_gate_failure=GateAction(data.get("on_gate_failure", "abort")),
            device_timeout_s=float(data.get("device_timeout_s", 600.0)),
            max_assignments_per_s=float(data.get("max_assignments_per_s", 0.0)),
            false_abort_rate=float(data.get("false_abort_rate", 0.01)),
        )


# --- the state ----------------------------------------------------------------------------


class RolloutStatus(StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    ABORTED = "aborted"


TERMINAL_STATUSES = {RolloutStatus.COMPLETED, RolloutStatus.ABORTED}


@dataclass(frozen=True)
class RolloutState:
    status: RolloutStatus
    stage_index: int
    stage_started_at: float  # seconds (the caller's clock)
    stage_settled_at: float | None = None  # when every cohort device finished; soak from here
    gate_window_start: float = 0.0  # telemetry since this time feeds the gates
    paused_reason: str = ""
    tokens: float = 0.0  # rate-limit token bucket
    tokens_at: float = 0.0
    waiting_for_data: bool = False  # an event about it was recorded already

    @classmethod
    def initial(cls, now: float) -> RolloutState:
        return cls(
            status=RolloutStatus.RUNNING,
            stage_index=0,
            stage_started_at=now,
            gate_window_start=now,
            tokens=0.0,
            tokens_at=now,
        )


class DeviceState(StrEnum):
    ASSIGNED = "assigned"  # desired state points at the new version
    INSTALLING = "installing"  # reported progress, verified or activated
    SUCCEEDED = "succeeded"  # reported HEALTHY for the new version
    FAILED = "failed"  # failed, refused, rolled back by itself, or timed out
    ROLLED_BACK = "rolled_back"  # moved back to its baseline by an abort


SETTLED = {DeviceState.SUCCEEDED, DeviceState.FAILED, DeviceState.ROLLED_BACK}
_IN_FLIGHT = {DeviceState.ASSIGNED, DeviceState.INSTALLING}


def cohort_key(model: str, device_id: str) -> int:
    """A device's place in the rollout order of a model: stable across rollouts and retries."""
    digest = hashlib.sha256(f"{model}\x00{device_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


@dataclass(frozen=True)
class DeviceView:
    """One targeted device as the engine sees it."""

    device_id: str
    state: DeviceState | None = None  # None: not touched by this rollout
    assigned_at: float | None = None
    updated_at: float | None = None  # last report for this rollout


@dataclass(frozen=True)
class VersionStats:
    """Telemetry totals of one version over a set of devices and a time window."""

    requests: int = 0
    errors: int = 0
    fallbacks: int = 0
    shadow_sampled: int = 0
    shadow_agreed: int = 0
    p95_latency_ms: float | None = None
    # Merged local-latency histogram counts (underflow first) and its (min_value, growth)
    # layout; the latency gate tests them when both sides share a layout.
    latency_counts: tuple[int, ...] = ()
    latency_layout: tuple[float, float] | None = None
    # Merged confidence buckets (linear over [0, 1]) of the local answers.
    confidence_buckets: tuple[int, ...] = ()

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None

    @property
    def fallback_rate(self) -> float | None:
        return self.fallbacks / self.requests if self.requests else None

    @property
    def agreement(self) -> float | None:
        return self.shadow_agreed / self.shadow_sampled if self.shadow_sampled else None


@dataclass(frozen=True)
class Observation:
    now: float
    devices: Sequence[DeviceView]  # every targeted device (touched or not)
    cohort: VersionStats = field(default_factory=VersionStats)  # new version, touched devices
    baseline: VersionStats = field(default_factory=VersionStats)  # baseline version, fleet


# --- the decision -------------------------------------------------------------------------


class EventKind(StrEnum):
    """What a rollout event records; stored as its value. Device reports add
    ``report:<kind>`` events of their own (`report_event_kind`)."""

    CREATED = "created"
    DESIRED_SET = "desired_set"
    STAGE_SETTLED = "stage_settled"
    STAGE_ADVANCED = "stage_advanced"
    WAITING_FOR_TELEMETRY = "waiting_for_telemetry"
    GATE_EVIDENCE_TIMEOUT = "gate_evidence_timeout"
    GATE_FAILED = "gate_failed"
    PAUSED = "paused"
    RESUMED = "resumed"
    ABORTED = "aborted"
    COMPLETED = "completed"
    DEVICE_FAILED = "device_failed"


def report_event_kind(kind: str) -> str:
    return f"report:{kind.lower()}"


@dataclass(frozen=True)
class Event:
    kind: EventKind
    actor: str
    stage_index: int
    detail: Mapping[str, Any] = field(default_factory=dict)
    device_id: str | None = None


@dataclass(frozen=True)
class GateResult:
    metric: GateMetric
    value: float | None  # None: not enough data
    threshold: float
    passed: bool | None  # None: not enough data to judge
    samples: int = 0
    baseline: float | None = None
    low: float | None = None  # confidence bound of the value (Mann-Whitney AUC for latency)
    high: float | None = None
    reason: str = ""  # why it passed, failed or waits

    def to_json(self) -> dict[str, Any]:
        return {
            "metric": self.metric.value,
            "value": self.value,
            "threshold": self.threshold,
            "passed": self.passed,
            "samples": self.samples,
            "baseline": self.baseline,
            "low": self.low,
            "high": self.high,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class Decision:
    state: RolloutState
    assign: tuple[str, ...] = ()  # move to the new version (now in the cohort)
    fail: tuple[tuple[str, str], ...] = ()  # (device, reason): mark failed and move back
    rollback: tuple[str, ...] = ()  # move back to baseline, mark rolled_back
    events: tuple[Event, ...] = ()
    gates: tuple[GateResult, ...] = ()

    @property
    def changed(self) -> bool:
        return bool(self.assign or self.fail or self.rollback or self.events)


# --- the rules ----------------------------------------------------------------------------


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
        if m is GateMetric.ESTIMATED_ACCURACY:
            est = stats.estimated_accuracy(cohort.confidence_buckets)
            best = stats.estimated_accuracy(baseline.confidence_buckets)
            x, n = (est[0] * est[1], est[1]) if est else (0.0, 0)
            bx, bn = (best[0] * best[1], best[1]) if best else (0.0, 0)
            base_value = best[0] if best else None
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
            }[m]  # fmt: skip
            base_value = bx / bn if bn else None
        value, v = stats.judge_proportion(
            x=x,
            n=n,
            threshold=gate.threshold,
            higher_is_better=m in _HIGHER_IS_BETTER,
            alpha=alpha,
            min_effect=gate.min_effect,
            min_samples=gate.min_samples,
            base_x=bx if gate.relative else None,
            base_n=bn,
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
            view.state in _IN_FLIGHT
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


class Command(StrEnum):
    PAUSE = "pause"
    RESUME = "resume"
    PROMOTE = "promote"
    ABORT = "abort"


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


class ReportKind(StrEnum):
    PROGRESS = "PROGRESS"
    VERIFIED = "VERIFIED"
    ACTIVATED = "ACTIVATED"
    HEALTHY = "HEALTHY"
    FAILED = "FAILED"
    REFUSED = "REFUSED"
    ROLLED_BACK = "ROLLED_BACK"


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
