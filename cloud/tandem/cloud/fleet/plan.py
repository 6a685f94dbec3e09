"""The rollout engine's values: the plan (fixed at creation), the state (persisted by the
service), what the engine observes, and the decision it returns.

Frozen dataclasses and enums that check themselves on construction (a bad field is a
`ConfigError` naming it) and convert to and from JSON. The rules that turn them are in
`engine`, which re-exports every name here: callers write `eng.RolloutPlan`, `eng.step`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from tandem.errors import ConfigError

from .gates import Change, Clusters

# --- the plan -----------------------------------------------------------------------------


class GateMetric(StrEnum):
    ERROR_RATE = "error_rate"  # errors / requests of the new version in the cohort
    P95_LATENCY_RATIO = "p95_latency_ratio"  # new p95 local latency / baseline p95
    FALLBACK_RATE = "fallback_rate"  # fallbacks / requests of the new version in the cohort
    SHADOW_AGREEMENT = "shadow_agreement"  # shadow_agreed / shadow_sampled (higher is better)
    FAILED_DEVICE_PCT = "failed_device_pct"  # failed devices / cohort devices, in percent
    # Label-free: mean calibrated confidence of local answers (higher is better).
    ESTIMATED_ACCURACY = "estimated_accuracy"
    # Text generation: accepted / drafted speculative tokens (higher is better), and
    # generations that changed path (cascade to the cloud, fallback) / generations.
    ACCEPTANCE_RATE = "acceptance_rate"
    ESCALATION_RATE = "escalation_rate"
    # The cohort's median tokens/s per generation over the baseline's (higher is better).
    TOKENS_PER_S_RATIO = "tokens_per_s_ratio"


# Metrics where a higher value is better: the gate fails when the value drops below.
HIGHER_IS_BETTER = {
    GateMetric.SHADOW_AGREEMENT,
    GateMetric.ESTIMATED_ACCURACY,
    GateMetric.ACCEPTANCE_RATE,
    GateMetric.TOKENS_PER_S_RATIO,
}
# Metrics that can also be bounded relative to the baseline version (value - baseline).
TELEMETRY_METRICS = {
    GateMetric.ERROR_RATE,
    GateMetric.P95_LATENCY_RATIO,
    GateMetric.FALLBACK_RATE,
    GateMetric.SHADOW_AGREEMENT,
    GateMetric.ESTIMATED_ACCURACY,
    GateMetric.ACCEPTANCE_RATE,
    GateMetric.ESCALATION_RATE,
    GateMetric.TOKENS_PER_S_RATIO,
}
# Ratios to the baseline by definition: `relative` adds nothing to them.
RATIO_METRICS = {GateMetric.P95_LATENCY_RATIO, GateMetric.TOKENS_PER_S_RATIO}


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
        if self.relative and self.metric not in TELEMETRY_METRICS - RATIO_METRICS:
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
        """The false-abort budget of one sampled gate of a stage: Bonferroni over the stages
        that have sampled gates and over those gates. A counted gate (failed_device_pct)
        judges the whole cohort, not a sample, and a stage without gates looks at nothing:
        neither spends any of the budget, so neither takes a share of it."""

        def sampled(stage: Stage) -> int:
            return sum(g.metric is not GateMetric.FAILED_DEVICE_PCT for g in stage.gates)

        stages = sum(1 for st in self.stages if sampled(st))
        return self.false_abort_rate / (max(1, stages) * max(1, sampled(self.stages[stage_index])))

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
IN_FLIGHT = {DeviceState.ASSIGNED, DeviceState.INSTALLING}


@dataclass(frozen=True)
class DeviceView:
    """One targeted device as the engine sees it."""

    device_id: str
    state: DeviceState | None = None  # None: not touched by this rollout
    assigned_at: float | None = None
    updated_at: float | None = None  # last report for this rollout


class Rates:
    """The rates of a version's telemetry totals; None where their denominator is 0.
    Shared by the engine's `VersionStats` and the store's `TelemetryStats`."""

    requests: int
    errors: int
    fallbacks: int
    shadow_sampled: int
    shadow_agreed: int

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
class VersionStats(Rates):
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
    # The same for text generation's per-generation milliseconds per token, and their median.
    token_time_counts: tuple[int, ...] = ()
    token_time_layout: tuple[float, float] | None = None
    p50_ms_per_token: float | None = None
    # Merged confidence buckets (linear over [0, 1]) of the local answers.
    confidence_buckets: tuple[int, ...] = ()
    confidence_sum: float = 0.0  # their sum when known: the exact mean (see gates)
    # Per-device totals of the proportions (successes, trials on each device) as moments:
    # the gates' device-clustered variance (gates.Clusters). None: only totals are known.
    error_clusters: Clusters | None = None  # (errors, requests)
    fallback_clusters: Clusters | None = None  # (fallbacks, requests)
    agreement_clusters: Clusters | None = None  # (shadow_agreed, shadow_sampled)
    accuracy_clusters: Clusters | None = None  # (confidence mass, local answers)
    acceptance_clusters: Clusters | None = None  # (accepted, drafted)
    escalation_clusters: Clusters | None = None  # (escalations, generations)
    # The same devices' change since before the rollout, per device (gates.Change): for the
    # cohort, from the baseline version before to the new one now; for the baseline, its
    # devices' drift over the same time. None: no per-device history.
    error_change: Change | None = None
    fallback_change: Change | None = None
    agreement_change: Change | None = None
    accuracy_change: Change | None = None
    acceptance_change: Change | None = None
    escalation_change: Change | None = None
    # Text generation totals: the acceptance_rate and escalation_rate gates' samples.
    drafted: int = 0
    accepted: int = 0
    generations: int = 0
    escalations: int = 0


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


# --- the commands and reports -------------------------------------------------------------


class Command(StrEnum):
    PAUSE = "pause"
    RESUME = "resume"
    PROMOTE = "promote"
    ABORT = "abort"


class ReportKind(StrEnum):
    PROGRESS = "PROGRESS"
    VERIFIED = "VERIFIED"
    ACTIVATED = "ACTIVATED"
    HEALTHY = "HEALTHY"
    FAILED = "FAILED"
    REFUSED = "REFUSED"
    ROLLED_BACK = "ROLLED_BACK"
