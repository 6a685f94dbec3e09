"""The demo's summary: pure functions from what the story collected to numbers and tables.

`summarize` turns the simulators' per-device stats and the fleet's rollout records into a
`Summary` (also written as summary.json); `render` turns that into rich tables.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text


@dataclass(frozen=True)
class TrafficSummary:
    devices: int
    by_runtime: dict[str, int]
    requests: int
    local: int
    cloud: int
    escalated: int  # cascade: the local answer was unsure, the cloud answered
    fallback: int  # no usable local model yet: the cloud answered
    errors: int
    correct: int
    local_correct: int
    local_by_version: dict[str, int]

    @property
    def answered(self) -> int:
        return self.requests - self.errors

    @property
    def local_share(self) -> float | None:
        return self.local / self.answered if self.answered else None

    @property
    def cloud_share(self) -> float | None:
        return self.cloud / self.answered if self.answered else None

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.answered if self.answered else None

    @property
    def local_accuracy(self) -> float | None:
        return self.local_correct / self.local if self.local else None


@dataclass(frozen=True)
class RolloutSummary:
    rollout_id: str
    version: int
    baseline_version: int | None
    status: str  # completed, aborted, paused, running
    stages_total: int
    stages_reached: int  # 1-based index of the last stage that had devices
    stage_percents: list[float]
    stage_devices: list[int]  # devices assigned in each stage
    device_states: dict[str, int]
    gates: list[dict[str, Any]]  # the last evaluated gate values
    failed_gates: list[dict[str, Any]]  # the gates that stopped it (empty when none did)
    stopped_by: str | None  # the actor of the gate_failed event (gate:<metric>)
    rolled_back: int  # devices moved back to the baseline by the abort
    first_cohort: list[str]
    devices_with_version: list[str]  # devices whose store ever held this version
    outside_first_cohort_with_version: list[str]
    back_on_baseline: list[str]  # first-cohort devices active on the baseline at the end
    seconds: float


@dataclass(frozen=True)
class Summary:
    broker: str
    console_url: str
    traffic: TrafficSummary
    rollouts: list[RolloutSummary] = field(default_factory=list)
    elapsed_s: float = 0.0
    build_note: str = ""

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        t = self.traffic
        doc["traffic"].update(
            local_share=t.local_share,
            cloud_share=t.cloud_share,
            accuracy=t.accuracy,
            local_accuracy=t.local_accuracy,
        )
        return doc


def traffic_summary(devices: Mapping[str, Mapping[str, Any]]) -> TrafficSummary:
    """Adds up the simulators' per-device stats."""
    by_runtime: dict[str, int] = {}
    local_by_version: dict[str, int] = {}
    totals = dict.fromkeys(
        ("requests", "local", "cloud", "escalated", "fallback", "errors", "correct"), 0
    )
    local_correct = 0
    for stats in devices.values():
        runtime = str(stats.get("runtime", "?"))
        by_runtime[runtime] = by_runtime.get(runtime, 0) + 1
        for key in totals:
            totals[key] += int(stats.get(key, 0))
        local_correct += int(stats.get("local_correct", 0))
        for version, count in (stats.get("local_by_version") or {}).items():
            local_by_version[str(version)] = local_by_version.get(str(version), 0) + int(count)
    return TrafficSummary(
        devices=len(devices),
        by_runtime=dict(sorted(by_runtime.items())),
        local_correct=local_correct,
        local_by_version=dict(sorted(local_by_version.items(), key=lambda kv: int(kv[0]))),
        **totals,
    )


def rollout_summary(
    rollout: Mapping[str, Any],
    assignments: Sequence[Mapping[str, Any]],
    events: Sequence[Mapping[str, Any]],
    devices: Mapping[str, Mapping[str, Any]],
    seconds: float,
) -> RolloutSummary:
    """One rollout's outcome, checked against what the devices themselves saw."""
    version = int(rollout["version"])
    baseline = rollout.get("baseline_version")
    stages = list(rollout.get("stages") or [])
    stage_devices = [int(s.get("devices", 0)) for s in stages]
    # A completed rollout went through every stage, even those that added no device (a
    # small fleet); otherwise the engine's stage index is where it stands or stopped.
    if rollout["status"] == "completed":
        reached = len(stages)
    else:
        reached = int(rollout.get("stage_index", 0)) + 1
    first_cohort = sorted(str(a["device_id"]) for a in assignments if a.get("stage_index") == 0)
    relative = {
        str(g.get("metric")): bool(g.get("relative"))
        for s in stages
        for g in (s.get("gates") or [])
    }
    gate_events = [e for e in events if e.get("kind") == "gate_failed"]
    failed_gates = [
        {**g, "relative": relative.get(str(g.get("metric")), False)}
        for g in (gate_events[0]["detail"].get("gates", []) if gate_events else [])
    ]
    gates = [
        {**g, "relative": relative.get(str(g.get("metric")), False)}
        for g in (rollout.get("gates") or [])
    ]
    aborted = [e for e in events if e.get("kind") == "aborted"]
    rolled_back = (
        int(aborted[0]["detail"].get("rollback", 0))
        if aborted
        else sum(1 for a in assignments if a.get("state") == "rolled_back")
    )
    with_version = sorted(d for d, s in devices.items() if version in _ints(s.get("versions_seen")))
    outside = sorted(set(with_version) - set(first_cohort))
    back = sorted(
        d
        for d in first_cohort
        if baseline is not None and devices.get(d, {}).get("active_version") == baseline
    )
    return RolloutSummary(
        rollout_id=str(rollout["rollout_id"]),
        version=version,
        baseline_version=int(baseline) if baseline is not None else None,
        status=str(rollout["status"]),
        stages_total=len(stages),
        stages_reached=reached,
        stage_percents=[float(s.get("percent", 0)) for s in stages],
        stage_devices=stage_devices,
        device_states=dict(rollout.get("device_states") or {}),
        gates=gates,
        failed_gates=failed_gates,
        stopped_by=str(gate_events[0]["actor"]) if gate_events else None,
        rolled_back=rolled_back,
        first_cohort=first_cohort,
        devices_with_version=with_version,
        outside_first_cohort_with_version=outside,
        back_on_baseline=back,
        seconds=round(seconds, 1),
    )


def _ints(values: Iterable[Any] | None) -> set[int]:
    return {int(v) for v in values or ()}


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def gate_text(gate: Mapping[str, Any]) -> str:
    """`fallback_rate 1.000 (baseline 0.038): +0.962, limit +0.25 FAIL (n=32)`."""
    value = gate.get("value")
    metric = str(gate.get("metric"))
    base = gate.get("baseline")
    threshold = float(gate.get("threshold", 0))
    verdict = {True: "pass", False: "FAIL", None: "waiting for data"}[gate.get("passed")]
    samples = f"n={gate.get('samples', 0)}"
    higher_better = metric == "shadow_agreement"
    if value is None:
        return f"{metric}: no data yet ({verdict}, {samples})"
    value = float(value)
    if gate.get("relative") and isinstance(base, int | float):
        # The engine judges the difference to the baseline version; show both sides.
        own = base - value if higher_better else base + value
        sign = "-" if higher_better else "+"
        return (
            f"{metric} {own:.3f} vs baseline {float(base):.3f}: {sign}{abs(value):.3f}, "
            f"limit {sign}{threshold:g} {verdict} ({samples})"
        )
    op = ">=" if higher_better else "<="
    baseline = f", baseline {float(base):.3f}" if isinstance(base, int | float) else ""
    return f"{metric} {value:.3f} {op} {threshold:g} {verdict} ({samples}{baseline})"


def render(summary: Summary) -> Group:
    t = summary.traffic
    traffic = Table(title="Traffic", show_header=False, title_justify="left")
    traffic.add_column(style="bold")
    traffic.add_column()
    runtimes = ", ".join(f"{n} {rt}" for rt, n in t.by_runtime.items())
    traffic.add_row("devices", f"{t.devices} ({runtimes})")
    traffic.add_row("requests", f"{t.requests} ({t.errors} errors)")
    traffic.add_row(
        "answered locally", f"{t.local} ({_pct(t.local_share)}), by version {t.local_by_version}"
    )
    traffic.add_row(
        "answered by the cloud",
        f"{t.cloud} ({_pct(t.cloud_share)}): {t.escalated} low-confidence escalations, "
        f"{t.fallback} with no local model yet",
    )
    traffic.add_row(
        "accuracy (labels known)", f"{_pct(t.accuracy)} overall, {_pct(t.local_accuracy)} local"
    )
    traffic.add_row("broker", summary.broker)
    traffic.add_row("elapsed", f"{summary.elapsed_s:.0f} s")
    rollouts = Table(title="Rollouts", title_justify="left", expand=True)
    rollouts.add_column("version", no_wrap=True)
    rollouts.add_column("outcome")
    rollouts.add_column("stages", no_wrap=True)
    rollouts.add_column("gates (last evaluation)", ratio=1)
    rollouts.add_column("rolled back", no_wrap=True)
    rollouts.add_column("got it outside\ncohort 1", no_wrap=True)
    for r in summary.rollouts:
        outcome = Text(r.status, style="green" if r.status == "completed" else "red")
        if r.stopped_by:
            outcome.append(f"\nby {r.stopped_by}")
        outcome.append(f"\nin {r.seconds:.0f} s", style="default")
        stages = f"{r.stages_reached}/{r.stages_total}\n" + "/".join(
            f"{p:g}%" for p in r.stage_percents
        )
        gates = r.gates or r.failed_gates
        rollouts.add_row(
            f"v{r.version} (from v{r.baseline_version})",
            outcome,
            stages,
            "\n".join(gate_text(g) for g in gates) or "-",
            str(r.rolled_back),
            "-" if r.status == "completed" else str(len(r.outside_first_cohort_with_version)),
        )
    return Group(traffic, rollouts)
