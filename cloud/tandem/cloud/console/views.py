"""What the console shows, computed from the fleet store: pure reads, no FastAPI here.

Each function takes the fleet `Store` and returns JSON-able dicts, so the page, the CLI and
the tests read the same numbers.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from tandem.cloud.fleet import engine as eng
from tandem.cloud.fleet.store import Device, Rollout, Store, pick_variant
from tandem.cloud.fleet.telemetry import Aggregate, combine

# How far back the rollout charts reach before the rollout started (seconds): the baseline
# version's numbers just before the change are the reference a person compares against.
CHART_LOOKBACK_S = 600.0
# Events shown on a rollout page (the newest; the REST events route pages through the rest).
EVENT_HISTORY = 500
# "Last telemetry" of a device looks this far back (seconds).
LAST_TELEMETRY_S = 3600.0


def _round(value: float | None, digits: int = 6) -> float | None:
    return None if value is None else round(value, digits)


def window_stats(
    model: str, version: int, rows: Sequence[Aggregate], span_s: float
) -> dict[str, Any]:
    stats = combine(model, version, rows, span_s)
    return {
        "requests": stats.requests,
        "errors": stats.errors,
        "devices": stats.devices,
        "request_rate": _round(stats.request_rate),
        "error_rate": _round(stats.error_rate),
        "fallback_rate": _round(stats.fallback_rate),
        "agreement": _round(stats.agreement),
        "shadow_sampled": stats.shadow_sampled,
        "p50_latency_ms": _round(stats.p50_latency_ms, 4),
        "p95_latency_ms": _round(stats.p95_latency_ms, 4),
    }


def series(
    store: Store,
    model: str,
    version: int,
    *,
    since: float | None = None,
    until: float | None = None,
    device_ids: Iterable[str] | None = None,
) -> list[dict[str, Any]]:
    """One point per telemetry window: request rate, p50/p95 latency, fallback rate, shadow
    agreement and errors of one model version (over `device_ids` when given)."""
    rows = store.telemetry_rows(model, version, since=since, until=until, device_ids=device_ids)
    by_window: dict[int, list[Aggregate]] = defaultdict(list)
    for row in rows:
        by_window[row.window_start_ms].append(row)
    width = store.telemetry_window_s
    return [
        {"t": start / 1000.0, **window_stats(model, version, by_window[start], width)}
        for start in sorted(by_window)
    ]


def telemetry_summary(
    store: Store,
    model: str,
    version: int,
    *,
    since: float | None = None,
    until: float | None = None,
    device_ids: Iterable[str] | None = None,
) -> dict[str, Any]:
    stats = store.telemetry_stats(model, version, since=since, until=until, device_ids=device_ids)
    return {**stats.to_json(), "since": since, "until": until}


def last_telemetry(store: Store, now: float | None = None) -> dict[str, dict[str, Any]]:
    """Per device, its newest telemetry window (any model): what it ran and how it went."""
    now = now or time.time()
    horizon_ms = int((now - LAST_TELEMETRY_S) * 1000)
    out: dict[str, dict[str, Any]] = {}
    for device_id, (agg, updated_at) in store.newest_windows(horizon_ms).items():
        hist = agg.latency_local
        p95 = hist.quantile(0.95) if hist else None
        out[device_id] = {
            "model": agg.model,
            "version": agg.version,
            "runtime": agg.runtime,
            "window_start": agg.window_start_ms / 1000.0,
            "requests": agg.requests,
            "errors": agg.errors,
            "fallback_rate": _round(agg.fallbacks / agg.requests if agg.requests else None),
            "p95_latency_ms": _round(p95, 4),
            "updated_at": updated_at,
        }
    return out


def device_json(d: Device, last: Mapping[str, Any] | None) -> dict[str, Any]:
    return {**d.to_json(), "last_telemetry": dict(last) if last else None}


def fleet(
    store: Store, tags: Mapping[str, str] | None = None, online: bool | None = None
) -> dict[str, Any]:
    devices = store.devices(tags=tags or None, online=online)
    last = last_telemetry(store)
    versions: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    tag_values: dict[str, set[str]] = defaultdict(set)
    for d in store.devices():
        for k, v in d.tags.items():
            tag_values[k].add(v)
    for d in devices:
        for model, version in d.active_versions.items():
            versions[model][str(version)] += 1
    return {
        "total": len(devices),
        "online": sum(1 for d in devices if d.online),
        "versions": {m: dict(v) for m, v in versions.items()},
        "tags": {k: sorted(v) for k, v in sorted(tag_values.items())},
        "devices": [device_json(d, last.get(d.device_id)) for d in devices],
    }


def _manifest_numbers(manifest: bytes) -> dict[str, Any]:
    """The metrics a signed manifest carries, plus `size_bytes`: its files unpacked."""
    try:
        doc = json.loads(manifest)
    except ValueError:
        return {}
    if not isinstance(doc, dict):
        return {}
    metrics = doc.get("metrics")
    out = dict(metrics) if isinstance(metrics, Mapping) else {}
    files = doc.get("files")
    if isinstance(files, list):
        sizes = [f.get("size") for f in files if isinstance(f, Mapping)]
        ints = [x for x in sizes if isinstance(x, int)]
        if ints and len(ints) == len(sizes):
            out.setdefault("size_bytes", sum(ints))
    return out


def model(store: Store, name: str) -> dict[str, Any]:
    """A model's versions with the build report's metrics, the size and numbers of each
    variant (from its signed manifest and the build report), and how many devices run each
    version."""
    versions = store.versions(name)  # raises NotFoundError
    running: dict[int, int] = defaultdict(int)
    for d in store.devices():
        if name in d.active_versions:
            running[d.active_versions[name]] += 1
    out = []
    for v in versions:
        metrics = dict(v.get("metrics") or {})
        report = metrics.pop("build_report", None)
        report = report if isinstance(report, Mapping) else {}
        report_metrics = report.get("metrics")
        report_metrics = dict(report_metrics) if isinstance(report_metrics, Mapping) else {}
        report_variants = report.get("variants")
        report_variants = report_variants if isinstance(report_variants, Mapping) else {}
        manifests = {
            a.variant: _manifest_numbers(a.manifest) for a in store.artifacts(name, v["version"])
        }
        variants = []
        for a in v.get("artifacts", []):
            extra = report_variants.get(a["variant"], {})
            numbers = {
                **manifests.get(a["variant"], {}),
                **(dict(extra) if isinstance(extra, Mapping) else {}),
            }
            variants.append(
                {
                    **a,
                    "size_bytes": numbers.get("size_bytes"),
                    "accuracy": _first(numbers, *ACCURACY_KEYS),
                    "latency_ms_batch1": numbers.get("latency_ms_batch1"),
                    "metrics": {k: x for k, x in sorted(numbers.items()) if _scalar(x)},
                }
            )
        accuracy = _first(report_metrics, *ACCURACY_KEYS)
        if accuracy is None:
            accuracies = [x["accuracy"] for x in variants if x["accuracy"] is not None]
            accuracy = max(accuracies) if accuracies else None
        out.append(
            {
                "version": v["version"],
                "created_at": v.get("created_at"),
                "accuracy": accuracy,
                "metrics": {k: x for k, x in sorted(report_metrics.items()) if _scalar(x)},
                "variants": variants,
                "devices": running.get(int(v["version"]), 0),
            }
        )
    task = next((m.get("task", "") for m in store.models() if m["name"] == name), "")
    return {"name": name, "task": task, "versions": out}


# The numbers a model or variant calls its accuracy, most specific first (classification
# accuracy; the embedding model's cosine similarity to its FP32 original).
ACCURACY_KEYS = ("accuracy", "student_accuracy", "int8_accuracy", "cosine_mean", "teacher_accuracy")


def _scalar(value: object) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def _first(data: Mapping[str, Any], *keys: str) -> Any:
    for key in keys:
        value = data.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return value
    return None


def targeted(store: Store, rollout: Rollout) -> list[Device]:
    """What the engine targets: online devices matching the selector that have a variant."""
    artifacts = store.artifacts(rollout.plan.model, rollout.plan.version)
    return [
        d
        for d in store.devices(tags=rollout.selector or None, online=True)
        if pick_variant(d, artifacts) is not None
    ]


def rollout_detail(store: Store, rollout_id: str, now: float | None = None) -> dict[str, Any]:
    """Everything the rollout page shows: the rollout, each stage's cohort with its device
    states and progress, the gates of the current stage against their thresholds, the
    device list and the newest events."""
    now = now or time.time()
    r = store.rollout(rollout_id)  # raises NotFoundError
    stage_rows = store.stages(rollout_id)
    assignments = store.assignments(rollout_id)
    n = len(targeted(store, r))
    stages = []
    previous_size = 0
    for i, st in enumerate(r.plan.stages):
        size = eng.cohort_size(st.percent, n)
        members = [a for a in assignments if a.stage_index == i]
        counts = {s.value: 0 for s in eng.DeviceState}
        for a in members:
            counts[a.state.value] += 1
        row = stage_rows[i] if i < len(stage_rows) else {}
        if r.state.status is eng.RolloutStatus.COMPLETED or i < r.state.stage_index:
            phase = "done"
        elif i == r.state.stage_index:
            phase = r.state.status.value
        else:
            phase = "pending"
        soak_left = None
        if i == r.state.stage_index and r.state.stage_settled_at is not None:
            soak_left = max(0.0, st.min_soak_s - (now - r.state.stage_settled_at))
        stages.append(
            {
                "index": i,
                "percent": st.percent,
                "min_soak_s": st.min_soak_s,
                "gates": [g.to_json() for g in st.gates],
                "cohort_target": max(0, size - previous_size),
                "cumulative_target": size,
                "assigned": len(members),
                "states": counts,
                "phase": phase,
                "started_at": row.get("started_at"),
                "settled_at": row.get("settled_at"),
                "ended_at": row.get("ended_at"),
                "soak_left_s": soak_left,
            }
        )
        previous_size = size
    events = store.events(rollout_id=rollout_id, limit=100_000)[-EVENT_HISTORY:]
    return {
        "rollout": r.to_json(),
        "targeted_devices": n,
        "stages": stages,
        "gates": [dict(g) for g in r.last_gates],
        "assignments": [a.to_json() for a in assignments],
        "events": [e.to_json() for e in reversed(events)],
        "now": now,
    }


def rollout_series(store: Store, rollout_id: str, now: float | None = None) -> dict[str, Any]:
    """Per-window telemetry of the new version on the rollout's devices against the baseline
    version on the whole fleet (what the gates compare), from a little before the start."""
    now = now or time.time()
    r = store.rollout(rollout_id)
    since = r.created_at - CHART_LOOKBACK_S
    until = None if r.state.status not in eng.TERMINAL_STATUSES else r.updated_at + 60.0
    cohort = [a.device_id for a in store.assignments(rollout_id)]
    new = series(store, r.plan.model, r.plan.version, since=since, until=until, device_ids=cohort)
    base: list[dict[str, Any]] = []
    if r.baseline_version is not None:
        base = series(store, r.plan.model, r.baseline_version, since=since, until=until)
    return {
        "model": r.plan.model,
        "version": r.plan.version,
        "baseline_version": r.baseline_version,
        "window_s": store.telemetry_window_s,
        "started_at": r.created_at,
        "new": new,
        "baseline": base,
    }


def change_marks(store: Store) -> dict[str, Any]:
    """Cheap fingerprints of what the pages show; the event stream compares them between
    polls and tells the page what to refresh."""
    m = store.change_marks()
    return {
        "event_id": m.event_id,
        "fleet": [m.devices, m.online, m.last_seen, m.desired_revisions],
        "rollouts": m.rollouts_updated,
        "telemetry": m.telemetry_updated,
    }
