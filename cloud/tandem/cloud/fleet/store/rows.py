"""Row <-> record conversion and the small query helpers the store modules share."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from sqlalchemy import (
    select,
)
from sqlalchemy.engine import Connection

from tandem.sdk.histogram import LogHistogram

from .. import engine as eng
from ..models import (
    ArtifactRow,
    EventRow,
    RolloutRow,
)
from ..telemetry import COUNTERS, HISTOGRAMS, Aggregate
from .records import (
    Artifact,
    Assignment,
    Device,
    EventRecord,
    Rollout,
)

_IN_CHUNK = 400  # keys per IN (...) query: well under SQLite's bound-parameter limit


# --- conversions --------------------------------------------------------------------------


def _device(row: Any) -> Device:
    # An ORM row or a Core row (bulk reads skip the ORM's per-object cost).
    return Device(
        row.device_id,
        row.online,
        row.agent_version,
        dict(row.tags or {}),
        row.hardware,
        tuple(row.runtimes or ()),
        {k: int(v) for k, v in (row.active_versions or {}).items()},
        row.first_seen,
        row.last_seen,
        row.desired_revision,
    )


def _artifact(row: ArtifactRow) -> Artifact:
    return Artifact(
        row.model,
        row.version,
        row.variant,
        row.runtime,
        row.hardware,
        bytes(row.manifest),
        tuple((s["keyid"], bytes.fromhex(s["sig"])) for s in row.signatures),
        row.path,
        row.stored_bytes,
    )


def _plan(row: RolloutRow) -> eng.RolloutPlan:
    # The row's model and version columns are the plan's; the rest (stages, gates, the
    # false-abort budget, ...) is its JSON, with defaults for plans stored before a field.
    return eng.RolloutPlan.from_json({**row.plan, "model": row.model, "version": row.version})


def _state(row: RolloutRow) -> eng.RolloutState:
    return eng.RolloutState(
        status=eng.RolloutStatus(row.status),
        stage_index=row.stage_index,
        stage_started_at=row.stage_started_at,
        stage_settled_at=row.stage_settled_at,
        gate_window_start=row.gate_window_start,
        paused_reason=row.paused_reason,
        tokens=row.tokens,
        tokens_at=row.tokens_at,
        waiting_for_data=row.waiting_for_data,
    )


def _rollout(row: RolloutRow) -> Rollout:
    return Rollout(
        row.rollout_id,
        _plan(row),
        _state(row),
        row.baseline_version,
        dict(row.selector or {}),
        row.created_by,
        row.created_at,
        row.updated_at,
        tuple(row.last_gates or ()),
    )


def _assignment(row: Any) -> Assignment:
    return Assignment(
        row.rollout_id,
        row.device_id,
        row.stage_index,
        eng.DeviceState(row.state),
        row.variant,
        row.previous_version,
        row.reason,
        row.assigned_at,
        row.updated_at,
    )


def _event(row: EventRow) -> EventRecord:
    return EventRecord(
        row.id,
        row.at,
        row.rollout_id,
        row.device_id,
        row.kind,
        row.actor,
        row.stage_index,
        dict(row.detail or {}),
    )


def _aggregate(row: Any) -> Aggregate:
    # A NULL counter or histogram is one an older tandem's row lacked (the column came
    # later; SQLite's ADD COLUMN fills the default, a NULL is read as 0 all the same).
    measured: dict[str, Any] = {name: getattr(row, name) or 0 for name in COUNTERS}
    measured.update({name: LogHistogram.from_json(getattr(row, name)) for name in HISTOGRAMS})
    return Aggregate(
        device_id=row.device_id,
        model=row.model,
        version=row.version,
        window_start_ms=row.window_start_ms,
        counts=dict(row.counts or {}),
        confidence=list(row.confidence or []),
        confidence_sum=float(row.confidence_sum or 0.0),
        runtime=row.runtime,
        summaries=row.summaries,
        **measured,
    )


def _aggregate_values(agg: Aggregate, now: float) -> dict[str, Any]:
    histograms = {name: getattr(agg, name) for name in HISTOGRAMS}
    return {
        "device_id": agg.device_id,
        "model": agg.model,
        "version": agg.version,
        "window_start_ms": agg.window_start_ms,
        "counts": agg.counts,
        "confidence": agg.confidence,
        "confidence_sum": agg.confidence_sum,
        "runtime": agg.runtime,
        "summaries": agg.summaries,
        **{name: getattr(agg, name) for name in COUNTERS},
        **{name: h.to_json() if h else None for name, h in histograms.items()},
        "updated_at": now,
    }


def _chunks(items: Sequence[Any], size: int = _IN_CHUNK) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _seen_ids(conn: Connection, column: Any, ids: Sequence[str]) -> set[str]:
    """The ids among `ids` already in a seen-id table (`column`: its primary key). Telemetry
    summaries and device reports are both at-least-once, deduplicated this way: the id is
    looked up, and inserted in the same transaction as what it stands for; a replica
    inserting the same id meanwhile fails the insert, and the caller's retry sees it."""
    known: set[str] = set()
    for part in _chunks(list(ids)):
        known.update(conn.execute(select(column).where(column.in_(list(part)))).scalars())
    return known


def _write_state(row: RolloutRow, st: eng.RolloutState) -> None:
    row.status = st.status.value
    row.stage_index = st.stage_index
    row.stage_started_at = st.stage_started_at
    row.stage_settled_at = st.stage_settled_at
    row.gate_window_start = st.gate_window_start
    row.paused_reason = st.paused_reason
    row.tokens = st.tokens
    row.tokens_at = st.tokens_at
    row.waiting_for_data = st.waiting_for_data
