"""The fleet's one data layer (SQLAlchemy 2): SQLite by default, PostgreSQL by URL.

Everything the service knows lives here: devices and what they should run, models, versions
and signed artifacts, rollouts with their stages, per-device assignments and the event
history, and merged telemetry. Methods return plain frozen records, never ORM objects, and
SQLAlchemy's errors leave as `StoreError`.

SQLite runs in WAL mode with a busy timeout, so the MQTT thread, the rollout loop and the REST
threads can share one file; PostgreSQL is what several service replicas share.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from sqlalchemy import (
    Engine,
    Table,
    create_engine,
    delete,
    event,
    func,
    insert,
    select,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from tandem.protos.fleet.v1 import fleet_pb2

from . import engine as eng
from .errors import ConflictError, NotFoundError, StoreError
from .models import (
    ArtifactRow,
    AssignmentRow,
    Base,
    DesiredRow,
    DeviceRow,
    EventRow,
    ModelRow,
    RolloutRow,
    SeenReportRow,
    SeenSummaryRow,
    StageRow,
    TelemetryRow,
    VersionRow,
)
from .telemetry import Aggregate, Histogram, TelemetryStats, combine, summarize_summaries

log = logging.getLogger(__name__)

_IN_CHUNK = 400  # keys per IN (...) query: well under SQLite's bound-parameter limit


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


# --- records ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Device:
    device_id: str
    online: bool
    agent_version: str
    tags: Mapping[str, str]
    hardware: str
    runtimes: tuple[str, ...]
    active_versions: Mapping[str, int]
    first_seen: float
    last_seen: float
    desired_revision: int

    def to_json(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "online": self.online,
            "agent_version": self.agent_version,
            "tags": dict(self.tags),
            "hardware": self.hardware,
            "runtimes": list(self.runtimes),
            "active_versions": dict(self.active_versions),
            "first_seen": self.first_seen,
            "last_seen": self.last_seen,
        }


@dataclass(frozen=True)
class Artifact:
    model: str
    version: int
    variant: str
    runtime: str
    hardware: str
    manifest: bytes
    signatures: tuple[tuple[str, bytes], ...]  # (keyid, raw signature)
    path: str
    stored_bytes: int

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "version": self.version,
            "variant": self.variant,
            "runtime": self.runtime,
            "hardware": self.hardware,
            "stored_bytes": self.stored_bytes,
        }

    def signed_manifest(self) -> fleet_pb2.SignedManifest:
        return fleet_pb2.SignedManifest(
            signed=self.manifest,
            signatures=[fleet_pb2.Signature(keyid=k, sig=s) for k, s in self.signatures],
        )


@dataclass(frozen=True)
class Desired:
    device_id: str
    model: str
    version: int
    variant: str
    rollout_id: str


@dataclass(frozen=True)
class Rollout:
    rollout_id: str
    plan: eng.RolloutPlan
    state: eng.RolloutState
    baseline_version: int | None
    selector: Mapping[str, str]
    created_by: str
    created_at: float
    updated_at: float
    last_gates: tuple[Mapping[str, Any], ...] = ()

    def to_json(self) -> dict[str, Any]:
        p, s = self.plan, self.state
        return {
            "rollout_id": self.rollout_id,
            "model": p.model,
            "version": p.version,
            "baseline_version": self.baseline_version,
            "selector": dict(self.selector),
            "stages": [st.to_json() for st in p.stages],
            "on_gate_failure": p.on_gate_failure.value,
            "device_timeout_s": p.device_timeout_s,
            "max_assignments_per_s": p.max_assignments_per_s,
            "status": s.status.value,
            "stage_index": s.stage_index,
            "stage_started_at": s.stage_started_at,
            "stage_settled_at": s.stage_settled_at,
            "paused_reason": s.paused_reason,
            "created_by": self.created_by,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "gates": [dict(g) for g in self.last_gates],
        }


@dataclass(frozen=True)
class Assignment:
    rollout_id: str
    device_id: str
    stage_index: int
    state: eng.DeviceState
    variant: str
    previous_version: int | None
    reason: str
    assigned_at: float
    updated_at: float

    def to_json(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "stage_index": self.stage_index,
            "state": self.state.value,
            "variant": self.variant,
            "previous_version": self.previous_version,
            "reason": self.reason,
            "assigned_at": self.assigned_at,
            "updated_at": self.updated_at,
        }


@dataclass(frozen=True)
class EventRecord:
    id: int
    at: float
    rollout_id: str | None
    device_id: str | None
    kind: str
    actor: str
    stage_index: int | None
    detail: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "at": self.at,
            "rollout_id": self.rollout_id,
            "device_id": self.device_id,
            "kind": self.kind,
            "actor": self.actor,
            "stage_index": self.stage_index,
            "detail": dict(self.detail),
        }


@dataclass(frozen=True)
class PresenceUpdate:
    accepted: bool  # False: older than the presence we have
    came_online: bool  # new device, or offline before


@dataclass(frozen=True)
class ReportIn:
    device_id: str
    kind: eng.ReportKind
    model: str
    version: int
    rollout_id: str = ""
    variant: str = ""
    reason: str = ""
    report_id: str = ""  # the agent's id; empty (older agents): applied without dedup


@dataclass(frozen=True)
class ReportOutcome:
    known: bool  # False: no such device (the report was dropped)
    desired_changed: bool  # the device was moved back to its baseline
    duplicate: bool = False  # its report_id was applied before: nothing was done


HARDWARE_ANY = "any"


def pick_variant(device: Device, artifacts: Sequence[Artifact]) -> str | None:
    """The variant for a device: its runtimes in its order of preference, matching hardware."""
    for runtime in device.runtimes:
        for art in artifacts:
            if art.runtime == runtime and art.hardware in (HARDWARE_ANY, device.hardware):
                return art.variant
    return None


@dataclass(frozen=True)
class IngestResult:
    ingested: int
    duplicates: int


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
    p = row.plan
    return eng.RolloutPlan(
        model=row.model,
        version=row.version,
        stages=tuple(eng.Stage.from_json(s) for s in p["stages"]),
        on_gate_failure=eng.GateAction(p["on_gate_failure"]),
        device_timeout_s=float(p["device_timeout_s"]),
        max_assignments_per_s=float(p["max_assignments_per_s"]),
    )


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
    return Aggregate(
        device_id=row.device_id,
        model=row.model,
        version=row.version,
        window_start_ms=row.window_start_ms,
        requests=row.requests,
        errors=row.errors,
        fallbacks=row.fallbacks,
        cache_hits=row.cache_hits,
        shadow_sampled=row.shadow_sampled,
        shadow_agreed=row.shadow_agreed,
        counts=dict(row.counts or {}),
        confidence=list(row.confidence or []),
        latency_local=Histogram.from_json(row.latency_local),
        latency_cloud=Histogram.from_json(row.latency_cloud),
        runtime=row.runtime,
        summaries=row.summaries,
    )


def _aggregate_values(agg: Aggregate, now: float) -> dict[str, Any]:
    return {
        "device_id": agg.device_id,
        "model": agg.model,
        "version": agg.version,
        "window_start_ms": agg.window_start_ms,
        "requests": agg.requests,
        "errors": agg.errors,
        "fallbacks": agg.fallbacks,
        "cache_hits": agg.cache_hits,
        "shadow_sampled": agg.shadow_sampled,
        "shadow_agreed": agg.shadow_agreed,
        "counts": agg.counts,
        "confidence": agg.confidence,
        "latency_local": agg.latency_local.to_json() if agg.latency_local else None,
        "latency_cloud": agg.latency_cloud.to_json() if agg.latency_cloud else None,
        "runtime": agg.runtime,
        "summaries": agg.summaries,
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


# --- the store ----------------------------------------------------------------------------


class Store:
    """The fleet's data layer over one SQLAlchemy engine."""

    def __init__(self, url: str, *, telemetry_window_s: float = 60.0, echo: bool = False) -> None:
        self.url = url
        self.telemetry_window_s = telemetry_window_s
        try:
            if url.startswith("sqlite"):
                database = make_url(url).database
                if database and database != ":memory:":
                    Path(database).parent.mkdir(parents=True, exist_ok=True)
                self.engine: Engine = create_engine(
                    url, echo=echo, connect_args={"check_same_thread": False, "timeout": 30}
                )
                event.listen(self.engine, "connect", _sqlite_pragmas)
            else:
                self.engine = create_engine(url, echo=echo, pool_pre_ping=True, pool_size=10)
            self.dialect = self.engine.dialect.name
            Base.metadata.create_all(self.engine)
        except SQLAlchemyError as exc:
            raise StoreError(f"cannot open the fleet database {_redact(url)}: {exc}") from exc
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        # SQLite has one writer; serializing our own writers avoids busy-retry storms.
        self._write_lock = threading.Lock() if self.dialect == "sqlite" else None

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def session(self, write: bool = True) -> Iterator[Session]:
        lock = self._write_lock if write else None
        if lock is not None:
            lock.acquire()
        try:
            with self._sessions() as session, session.begin():
                yield session
        except (NotFoundError, ConflictError):
            raise
        except IntegrityError as exc:
            raise ConflictError(f"conflicts with stored data: {exc.orig}") from exc
        except SQLAlchemyError as exc:
            raise StoreError(f"fleet database error: {exc}") from exc
        finally:
            if lock is not None:
                lock.release()

    # --- devices ---------------------------------------------------------------------------

    def upsert_presence(self, p: fleet_pb2.Presence, now: float | None = None) -> PresenceUpdate:
        """Records a presence message (ignored when older than what we have)."""
        return self.upsert_presences([p], now)[0]

    def upsert_presences(
        self, presences: Sequence[fleet_pb2.Presence], now: float | None = None
    ) -> list[PresenceUpdate]:
        """Many presence messages in one transaction (in order)."""
        now = now or time.time()
        for attempt in range(3):
            try:
                with self.session() as s:
                    return [self._upsert_presence_in(s, p, now) for p in presences]
            except ConflictError:
                # Another replica registered one of these devices meanwhile: now it exists.
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _upsert_presence_in(self, s: Session, p: fleet_pb2.Presence, now: float) -> PresenceUpdate:
        row = s.get(DeviceRow, p.device_id)
        was_online = False
        if row is None:
            row = DeviceRow(device_id=p.device_id, first_seen=now, desired_revision=0)
            s.add(row)
        elif p.timestamp_ms and row.presence_ms and p.timestamp_ms < row.presence_ms:
            return PresenceUpdate(False, False)
        else:
            was_online = row.online
        row.online = p.online
        row.last_seen = now
        row.presence_ms = p.timestamp_ms
        if p.online or p.agent_version:
            # A last will carries only online=false; keep what the device said before.
            row.agent_version = p.agent_version or row.agent_version
            row.tags = dict(p.tags) if p.tags else dict(row.tags or {})
            row.hardware = p.hardware or row.hardware
            row.runtimes = list(p.runtimes) if p.runtimes else list(row.runtimes or [])
            if p.active_versions:
                row.active_versions = {k: int(v) for k, v in p.active_versions.items()}
        return PresenceUpdate(True, p.online and not was_online)

    def device(self, device_id: str) -> Device:
        with self.session(write=False) as s:
            row = s.get(DeviceRow, device_id)
            if row is None:
                raise NotFoundError(f"no device {device_id!r}")
            return _device(row)

    def has_device(self, device_id: str) -> bool:
        with self.session(write=False) as s:
            return s.get(DeviceRow, device_id) is not None

    def devices(
        self, tags: Mapping[str, str] | None = None, online: bool | None = None
    ) -> list[Device]:
        with self.session(write=False) as s:
            table = DeviceRow.__table__
            q = select(table).order_by(table.c.device_id)
            if online is not None:
                q = q.where(table.c.online == online)
            rows = [_device(r) for r in s.execute(q)]
        if tags:
            rows = [d for d in rows if all(d.tags.get(k) == v for k, v in tags.items())]
        return rows

    # --- desired state ---------------------------------------------------------------------

    def desired(self, device_id: str) -> tuple[int, list[Desired]]:
        """(revision, models) the device should run."""
        with self.session(write=False) as s:
            row = s.get(DeviceRow, device_id)
            rev = row.desired_revision if row else 0
            rows = s.scalars(
                select(DesiredRow)
                .where(DesiredRow.device_id == device_id)
                .order_by(DesiredRow.model)
            )
            return rev, [
                Desired(r.device_id, r.model, r.version, r.variant, r.rollout_id) for r in rows
            ]

    def _set_desired(
        self,
        s: Session,
        device_id: str,
        model: str,
        version: int | None,
        variant: str,
        rollout_id: str,
        now: float,
    ) -> None:
        self._set_desired_many(s, model, [(device_id, version, variant, rollout_id)], now)

    def _set_desired_many(
        self,
        s: Session,
        model: str,
        items: Sequence[tuple[str, int | None, str, str]],
        now: float,
    ) -> None:
        """Sets (device, version or None, variant, rollout_id) for one model, bumping each
        device's desired revision; a few statements whatever the number of devices."""
        ids = [item[0] for item in items]
        with s.no_autoflush:
            existing: dict[str, DesiredRow] = {}
            for part in _chunks(ids):
                q = select(DesiredRow).where(
                    DesiredRow.model == model, DesiredRow.device_id.in_(list(part))
                )
                existing.update((r.device_id, r) for r in s.scalars(q))
            for device_id, version, variant, rollout_id in items:
                row = existing.get(device_id)
                if version is None:
                    if row is not None:
                        s.delete(row)
                elif row is None:
                    s.add(
                        DesiredRow(
                            device_id=device_id,
                            model=model,
                            version=version,
                            variant=variant,
                            rollout_id=rollout_id,
                            updated_at=now,
                        )
                    )
                else:
                    row.version, row.variant, row.rollout_id, row.updated_at = (
                        version,
                        variant,
                        rollout_id,
                        now,
                    )
        for part in _chunks(ids):
            s.execute(
                update(DeviceRow)
                .where(DeviceRow.device_id.in_(list(part)))
                .values(desired_revision=DeviceRow.desired_revision + 1)
                .execution_options(synchronize_session="fetch")
            )

    def set_desired(
        self,
        device_id: str,
        model: str,
        version: int | None,
        variant: str = "",
        rollout_id: str = "",
        actor: str = "system",
    ) -> None:
        now = time.time()
        with self.session() as s:
            if s.get(DeviceRow, device_id) is None:
                raise NotFoundError(f"no device {device_id!r}")
            self._set_desired(s, device_id, model, version, variant, rollout_id, now)
            s.add(
                EventRow(
                    at=now,
                    device_id=device_id,
                    kind="desired_set",
                    actor=actor,
                    detail={"model": model, "version": version, "variant": variant},
                )
            )

    # --- models, versions, artifacts -------------------------------------------------------

    def add_artifact(
        self,
        model: str,
        version: int,
        variant: str,
        *,
        runtime: str,
        hardware: str,
        task: str,
        manifest: bytes,
        signatures: Sequence[tuple[str, bytes]],
        path: str,
        stored_bytes: int,
        metrics: Mapping[str, Any] | None = None,
    ) -> bool:
        """Registers a signed variant; False when the identical one is there already."""
        now = time.time()
        with self.session() as s:
            if s.get(ModelRow, model) is None:
                s.add(ModelRow(name=model, task=task, created_at=now))
                s.flush()
            vrow = s.get(VersionRow, (model, version))
            if vrow is None:
                s.add(
                    VersionRow(
                        model=model, version=version, metrics=dict(metrics or {}), created_at=now
                    )
                )
            elif metrics:
                vrow.metrics = {**(vrow.metrics or {}), **dict(metrics)}
            existing = s.get(ArtifactRow, (model, version, variant))
            if existing is not None:
                if bytes(existing.manifest) != manifest:
                    raise ConflictError(
                        f"{model} v{version} {variant} exists with a different manifest; "
                        "versions are immutable, build a new version"
                    )
                existing.path = path
                return False
            s.add(
                ArtifactRow(
                    model=model,
                    version=version,
                    variant=variant,
                    runtime=runtime,
                    hardware=hardware,
                    manifest=manifest,
                    signatures=[{"keyid": k, "sig": sig.hex()} for k, sig in signatures],
                    path=path,
                    stored_bytes=stored_bytes,
                    created_at=now,
                )
            )
            return True

    def models(self) -> list[dict[str, Any]]:
        with self.session(write=False) as s:
            out = []
            for m in s.scalars(select(ModelRow).order_by(ModelRow.name)):
                versions = s.scalars(
                    select(VersionRow)
                    .where(VersionRow.model == m.name)
                    .order_by(VersionRow.version)
                )
                out.append(
                    {"name": m.name, "task": m.task, "versions": [v.version for v in versions]}
                )
            return out

    def versions(self, model: str) -> list[dict[str, Any]]:
        with self.session(write=False) as s:
            if s.get(ModelRow, model) is None:
                raise NotFoundError(f"no model {model!r}")
            out = []
            for v in s.scalars(
                select(VersionRow).where(VersionRow.model == model).order_by(VersionRow.version)
            ):
                arts = s.scalars(
                    select(ArtifactRow)
                    .where(ArtifactRow.model == model, ArtifactRow.version == v.version)
                    .order_by(ArtifactRow.variant)
                )
                out.append(
                    {
                        "model": model,
                        "version": v.version,
                        "metrics": dict(v.metrics or {}),
                        "created_at": v.created_at,
                        "artifacts": [_artifact(a).to_json() for a in arts],
                    }
                )
            return out

    def artifact(self, model: str, version: int, variant: str) -> Artifact:
        with self.session(write=False) as s:
            row = s.get(ArtifactRow, (model, version, variant))
            if row is None:
                raise NotFoundError(f"no artifact {model} v{version} {variant}")
            return _artifact(row)

    def artifacts(self, model: str, version: int | None = None) -> list[Artifact]:
        with self.session(write=False) as s:
            q = select(ArtifactRow).where(ArtifactRow.model == model)
            if version is not None:
                q = q.where(ArtifactRow.version == version)
            return [
                _artifact(r)
                for r in s.scalars(q.order_by(ArtifactRow.version, ArtifactRow.variant))
            ]

    # --- rollouts --------------------------------------------------------------------------

    def create_rollout(
        self,
        rollout_id: str,
        plan: eng.RolloutPlan,
        *,
        baseline_version: int | None,
        selector: Mapping[str, str],
        created_by: str,
        now: float,
    ) -> Rollout:
        state = eng.RolloutState.initial(now)
        with self.session() as s:
            if s.get(VersionRow, (plan.model, plan.version)) is None:
                raise NotFoundError(f"no version {plan.model} v{plan.version}")
            active = s.scalars(
                select(RolloutRow.rollout_id).where(
                    RolloutRow.model == plan.model,
                    RolloutRow.status.in_(
                        [eng.RolloutStatus.RUNNING.value, eng.RolloutStatus.PAUSED.value]
                    ),
                )
            ).first()
            if active is not None:
                raise ConflictError(
                    f"rollout {active} of {plan.model} is still active; finish or abort it first"
                )
            row = RolloutRow(
                rollout_id=rollout_id,
                model=plan.model,
                version=plan.version,
                baseline_version=baseline_version,
                selector=dict(selector),
                plan={
                    "stages": [st.to_json() for st in plan.stages],
                    "on_gate_failure": plan.on_gate_failure.value,
                    "device_timeout_s": plan.device_timeout_s,
                    "max_assignments_per_s": plan.max_assignments_per_s,
                },
                created_by=created_by,
                created_at=now,
                updated_at=now,
                last_gates=[],
            )
            _write_state(row, state)
            s.add(row)
            for i, st in enumerate(plan.stages):
                s.add(
                    StageRow(
                        rollout_id=rollout_id,
                        stage_index=i,
                        percent=st.percent,
                        min_soak_s=st.min_soak_s,
                        gates=[g.to_json() for g in st.gates],
                        started_at=now if i == 0 else None,
                    )
                )
            s.add(
                EventRow(
                    at=now,
                    rollout_id=rollout_id,
                    kind="created",
                    actor=created_by,
                    stage_index=0,
                    detail={
                        "model": plan.model,
                        "version": plan.version,
                        "baseline_version": baseline_version,
                    },
                )
            )
            s.flush()
            return _rollout(row)

    def rollout(self, rollout_id: str) -> Rollout:
        with self.session(write=False) as s:
            row = s.get(RolloutRow, rollout_id)
            if row is None:
                raise NotFoundError(f"no rollout {rollout_id!r}")
            return _rollout(row)

    def rollouts(
        self, status: Iterable[str] | None = None, model: str | None = None
    ) -> list[Rollout]:
        with self.session(write=False) as s:
            q = select(RolloutRow).order_by(RolloutRow.created_at.desc())
            if status is not None:
                q = q.where(RolloutRow.status.in_(list(status)))
            if model is not None:
                q = q.where(RolloutRow.model == model)
            return [_rollout(r) for r in s.scalars(q)]

    def stages(self, rollout_id: str) -> list[dict[str, Any]]:
        with self.session(write=False) as s:
            rows = s.scalars(
                select(StageRow)
                .where(StageRow.rollout_id == rollout_id)
                .order_by(StageRow.stage_index)
            )
            return [
                {
                    "stage_index": r.stage_index,
                    "percent": r.percent,
                    "min_soak_s": r.min_soak_s,
                    "gates": r.gates,
                    "started_at": r.started_at,
                    "settled_at": r.settled_at,
                    "ended_at": r.ended_at,
                }
                for r in rows
            ]

    def assignments(self, rollout_id: str) -> list[Assignment]:
        with self.session(write=False) as s:
            table = AssignmentRow.__table__
            q = select(table).where(table.c.rollout_id == rollout_id).order_by(table.c.device_id)
            return [_assignment(r) for r in s.execute(q)]

    def active_assignments(self, device_id: str) -> list[tuple[Rollout, Assignment]]:
        """This device's assignments in running or paused rollouts."""
        with self.session(write=False) as s:
            q = (
                select(RolloutRow, AssignmentRow)
                .join(AssignmentRow, AssignmentRow.rollout_id == RolloutRow.rollout_id)
                .where(
                    AssignmentRow.device_id == device_id,
                    RolloutRow.status.in_(
                        [eng.RolloutStatus.RUNNING.value, eng.RolloutStatus.PAUSED.value]
                    ),
                )
            )
            return [(_rollout(r), _assignment(a)) for r, a in s.execute(q).all()]

    def events(
        self,
        rollout_id: str | None = None,
        since_id: int = 0,
        limit: int = 1000,
        device_id: str | None = None,
    ) -> list[EventRecord]:
        with self.session(write=False) as s:
            q = select(EventRow).where(EventRow.id > since_id)
            if rollout_id is not None:
                q = q.where(EventRow.rollout_id == rollout_id)
            if device_id is not None:
                q = q.where(EventRow.device_id == device_id)
            return [_event(r) for r in s.scalars(q.order_by(EventRow.id).limit(limit))]

    def add_event(
        self,
        kind: str,
        actor: str,
        *,
        rollout_id: str | None = None,
        device_id: str | None = None,
        stage_index: int | None = None,
        detail: Mapping[str, Any] | None = None,
        now: float | None = None,
    ) -> None:
        with self.session() as s:
            s.add(
                EventRow(
                    at=now or time.time(),
                    rollout_id=rollout_id,
                    device_id=device_id,
                    kind=kind,
                    actor=actor,
                    stage_index=stage_index,
                    detail=dict(detail or {}),
                )
            )

    def apply_decision(
        self,
        rollout_id: str,
        expected: eng.RolloutState,
        decision: eng.Decision,
        now: float,
        *,
        variants: Mapping[str, str],
        previous: Mapping[str, int | None],
        baseline_variants: Mapping[str, str],
        fail_reasons: Mapping[str, str] | None = None,
    ) -> list[str]:
        """Persists one engine decision atomically; returns the devices whose desired state
        changed (to publish). Raises ConflictError when the stored state moved meanwhile
        (another replica or a manual command), so the caller re-reads and tries again.

        `variants`: device -> variant of the new version for the devices to assign;
        `previous`: device -> version it runs now (its baseline); `baseline_variants`:
        device -> variant of its baseline version for devices moved back."""
        changed: list[str] = []
        with self.session() as s:
            row = s.get(RolloutRow, rollout_id, with_for_update=True)
            if row is None:
                raise NotFoundError(f"no rollout {rollout_id!r}")
            if _state(row) != expected:
                raise ConflictError(f"rollout {rollout_id} changed while it was being stepped")
            plan = _plan(row)
            old_index = row.stage_index
            _write_state(row, decision.state)
            row.updated_at = now
            if decision.gates:
                row.last_gates = [g.to_json() for g in decision.gates]
            s.add_all(
                AssignmentRow(
                    rollout_id=rollout_id,
                    device_id=device_id,
                    stage_index=old_index,
                    state=eng.DeviceState.ASSIGNED.value,
                    variant=variants[device_id],
                    previous_version=previous.get(device_id),
                    reason="",
                    assigned_at=now,
                    updated_at=now,
                )
                for device_id in decision.assign
            )
            self._set_desired_many(
                s,
                plan.model,
                [(d, plan.version, variants[d], rollout_id) for d in decision.assign],
                now,
            )
            changed.extend(decision.assign)
            back: dict[str, tuple[eng.DeviceState, str]] = {
                d: (eng.DeviceState.FAILED, r) for d, r in decision.fail
            }
            back.update((d, (eng.DeviceState.ROLLED_BACK, "rollback")) for d in decision.rollback)
            moved: list[AssignmentRow] = []
            for part in _chunks(list(back)):
                q = select(AssignmentRow).where(
                    AssignmentRow.rollout_id == rollout_id,
                    AssignmentRow.device_id.in_(list(part)),
                )
                for a in s.scalars(q):
                    new_state, reason = back[a.device_id]
                    a.state, a.reason, a.updated_at = new_state.value, reason, now
                    moved.append(a)
            changed.extend(
                self._move_back_many(s, moved, plan.model, rollout_id, baseline_variants, now)
            )
            for e in decision.events:
                s.add(
                    EventRow(
                        at=now,
                        rollout_id=rollout_id,
                        device_id=e.device_id,
                        kind=e.kind,
                        actor=e.actor,
                        stage_index=e.stage_index,
                        detail=dict(e.detail),
                    )
                )
            self._record_stage_times(s, rollout_id, old_index, decision, now)
        return changed

    def _move_back(
        self,
        s: Session,
        a: AssignmentRow,
        model: str,
        rollout_id: str,
        baseline_variants: Mapping[str, str],
        now: float,
    ) -> None:
        self._move_back_many(s, [a], model, rollout_id, baseline_variants, now)

    def _move_back_many(
        self,
        s: Session,
        assignments: Sequence[AssignmentRow],
        model: str,
        rollout_id: str,
        baseline_variants: Mapping[str, str],
        now: float,
    ) -> list[str]:
        """Points each device back at the version it ran before (its assignment's
        previous_version); returns the devices whose desired state changed."""
        owned: set[str] = set()
        ids = [a.device_id for a in assignments]
        with s.no_autoflush:
            for part in _chunks(ids):
                q = select(DesiredRow.device_id).where(
                    DesiredRow.model == model,
                    DesiredRow.rollout_id == rollout_id,
                    DesiredRow.device_id.in_(list(part)),
                )
                # A later rollout or a manual change may own a device now: leave it alone.
                owned.update(s.scalars(q))
        items: list[tuple[str, int | None, str, str]] = []
        for a in assignments:
            if a.device_id not in owned:
                continue
            version = a.previous_version
            variant = baseline_variants.get(a.device_id, "")
            if version is not None and not variant:
                version = None  # no artifact for the baseline: withdraw the model instead
            items.append((a.device_id, version, variant, ""))
        if items:
            self._set_desired_many(s, model, items, now)
        return [item[0] for item in items]

    def _record_stage_times(
        self, s: Session, rollout_id: str, old_index: int, d: eng.Decision, now: float
    ) -> None:
        kinds = {e.kind for e in d.events}
        cur = s.get(StageRow, (rollout_id, old_index))
        if cur is None:
            return
        if "stage_settled" in kinds and cur.settled_at is None:
            cur.settled_at = now
        if d.state.stage_index != old_index or d.state.status in eng.TERMINAL_STATUSES:
            cur.ended_at = cur.ended_at or now
            nxt = s.get(StageRow, (rollout_id, d.state.stage_index))
            if nxt is not None and nxt is not cur and nxt.started_at is None:
                nxt.started_at = now

    def apply_report(
        self,
        device_id: str,
        kind: eng.ReportKind,
        model: str,
        version: int,
        *,
        rollout_id: str = "",
        variant: str = "",
        reason: str = "",
        now: float,
    ) -> ReportOutcome:
        """One device report: the event, the device's active version, and the assignment
        transition (`engine.on_report`) in every active rollout of the model; a failure moves
        the device back to its baseline."""
        report = ReportIn(device_id, kind, model, version, rollout_id, variant, reason)
        return self.apply_reports([report], now)[0]

    def apply_reports(self, reports: Sequence[ReportIn], now: float) -> list[ReportOutcome]:
        """Many reports in one transaction (in order), each `report_id` once: a report
        applied before (also by another replica) changes nothing and records no event."""
        for attempt in range(3):
            try:
                return self._apply_reports_once(reports, now)
            except ConflictError:
                # Another replica applied one of these report ids (or registered one of
                # these devices) meanwhile: the retry sees it.
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _apply_reports_once(self, reports: Sequence[ReportIn], now: float) -> list[ReportOutcome]:
        seen = cast(Table, SeenReportRow.__table__)
        with self.session() as s:
            conn = s.connection()
            done = _seen_ids(conn, seen.c.report_id, [r.report_id for r in reports if r.report_id])
            fresh: list[str] = []
            outcomes: list[ReportOutcome] = []
            for r in reports:
                if r.report_id and r.report_id in done:
                    outcomes.append(ReportOutcome(True, desired_changed=False, duplicate=True))
                    continue
                outcome = self._apply_report_in(s, r, now)
                if outcome.known and r.report_id:
                    # Only once applied: a report from a device not registered yet is
                    # dropped, and its re-send after the registration must still count.
                    done.add(r.report_id)
                    fresh.append(r.report_id)
                outcomes.append(outcome)
            if fresh:
                conn.execute(insert(seen), [{"report_id": i, "received_at": now} for i in fresh])
            return outcomes

    def _apply_report_in(self, s: Session, r_in: ReportIn, now: float) -> ReportOutcome:
        device_id, kind, model, version = r_in.device_id, r_in.kind, r_in.model, r_in.version
        rollout_id, variant, reason = r_in.rollout_id, r_in.variant, r_in.reason
        dev = s.get(DeviceRow, device_id)
        if dev is None:
            return ReportOutcome(known=False, desired_changed=False)
        dev.last_seen = now
        if kind is not eng.ReportKind.PROGRESS:
            s.add(
                EventRow(
                    at=now,
                    rollout_id=rollout_id or None,
                    device_id=device_id,
                    kind=f"report:{kind.value.lower()}",
                    actor=f"device:{device_id}",
                    detail={
                        "model": model,
                        "version": version,
                        "variant": variant,
                        "reason": reason,
                    },
                )
            )
        if kind is eng.ReportKind.HEALTHY:
            dev.active_versions = {**(dev.active_versions or {}), model: version}
        q = (
            select(RolloutRow, AssignmentRow)
            .join(AssignmentRow, AssignmentRow.rollout_id == RolloutRow.rollout_id)
            .where(
                AssignmentRow.device_id == device_id,
                RolloutRow.model == model,
                RolloutRow.status.in_(
                    [eng.RolloutStatus.RUNNING.value, eng.RolloutStatus.PAUSED.value]
                ),
            )
        )
        changed = False
        for r, a in s.execute(q).all():
            new_state = eng.on_report(eng.DeviceState(a.state), kind, version, r.version)
            if new_state is None:
                continue
            a.state, a.updated_at = new_state.value, now
            if reason:
                a.reason = reason
            if new_state is eng.DeviceState.FAILED:
                s.add(
                    EventRow(
                        at=now,
                        rollout_id=r.rollout_id,
                        device_id=device_id,
                        kind="device_failed",
                        actor=f"device:{device_id}",
                        stage_index=a.stage_index,
                        detail={"reason": reason or kind.value.lower()},
                    )
                )
                base = ""
                if a.previous_version is not None:
                    base = self._variant_in(s, _device(dev), model, a.previous_version) or ""
                self._move_back(s, a, model, r.rollout_id, {device_id: base}, now)
                changed = True
        return ReportOutcome(known=True, desired_changed=changed)

    def _variant_in(self, s: Session, device: Device, model: str, version: int) -> str | None:
        rows = s.scalars(
            select(ArtifactRow).where(ArtifactRow.model == model, ArtifactRow.version == version)
        )
        return pick_variant(device, [_artifact(r) for r in rows])

    def desired_views(
        self, device_ids: Sequence[str]
    ) -> dict[str, tuple[int, list[Desired], dict[str, int]]]:
        """`desired_view` for many devices in a few queries."""
        out: dict[str, tuple[int, list[Desired], dict[str, int]]] = {}
        with self.session(write=False) as s:
            for part in _chunks(list(dict.fromkeys(device_ids))):
                for row in s.scalars(select(DeviceRow).where(DeviceRow.device_id.in_(list(part)))):
                    active = {k: int(v) for k, v in (row.active_versions or {}).items()}
                    out[row.device_id] = (row.desired_revision, [], active)
                q = (
                    select(DesiredRow)
                    .where(DesiredRow.device_id.in_(list(part)))
                    .order_by(DesiredRow.device_id, DesiredRow.model)
                )
                for r in s.scalars(q):
                    if r.device_id in out:
                        out[r.device_id][1].append(
                            Desired(r.device_id, r.model, r.version, r.variant, r.rollout_id)
                        )
        return out

    def desired_view(self, device_id: str) -> tuple[int, list[Desired], dict[str, int]]:
        """(revision, desired models, active versions) of a device, in one read."""
        with self.session(write=False) as s:
            row = s.get(DeviceRow, device_id)
            rows = s.scalars(
                select(DesiredRow)
                .where(DesiredRow.device_id == device_id)
                .order_by(DesiredRow.model)
            )
            desired = [
                Desired(r.device_id, r.model, r.version, r.variant, r.rollout_id) for r in rows
            ]
            if row is None:
                return 0, desired, {}
            active = {k: int(v) for k, v in (row.active_versions or {}).items()}
            return row.desired_revision, desired, active

    def command(
        self,
        rollout_id: str,
        cmd: eng.Command,
        actor: str,
        now: float,
        baseline_variants: Mapping[str, str] | None = None,
    ) -> tuple[Rollout, list[str]]:
        """A manual command, applied under the row lock; returns the rollout and the devices
        whose desired state changed."""
        for _ in range(5):
            r = self.rollout(rollout_id)
            views = [
                eng.DeviceView(a.device_id, a.state, a.assigned_at, a.updated_at)
                for a in self.assignments(rollout_id)
            ]
            decision = eng.command(r.plan, r.state, cmd, actor, now, views)
            try:
                changed = self.apply_decision(
                    rollout_id,
                    r.state,
                    decision,
                    now,
                    variants={},
                    previous={},
                    baseline_variants=baseline_variants or {},
                )
            except ConflictError:
                continue
            return self.rollout(rollout_id), changed
        raise ConflictError(f"rollout {rollout_id} keeps changing; try again")

    # --- telemetry -------------------------------------------------------------------------

    def ingest(
        self, summaries: Sequence[fleet_pb2.TelemetrySummary], now: float | None = None
    ) -> IngestResult:
        """Merges summaries into the per-device, per-version, per-window aggregates, each
        summary_id once (also across service replicas: the id insert decides)."""
        if not summaries:
            return IngestResult(0, 0)
        now = now or time.time()
        unique: dict[str, fleet_pb2.TelemetrySummary] = {}
        for summary in summaries:
            if summary.summary_id and summary.device_id and summary.model:
                unique.setdefault(summary.summary_id, summary)
        for attempt in range(3):
            try:
                return self._ingest_once(list(unique.values()), len(summaries), now)
            except ConflictError:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _ingest_once(
        self, summaries: list[fleet_pb2.TelemetrySummary], offered: int, now: float
    ) -> IngestResult:
        # Core statements with executemany throughout: at thousands of summaries per second
        # the ORM's per-object bookkeeping would cost more than the database.
        seen = cast(Table, SeenSummaryRow.__table__)
        tel = cast(Table, TelemetryRow.__table__)
        with self.session() as s:
            conn = s.connection()
            known = _seen_ids(conn, seen.c.summary_id, [x.summary_id for x in summaries])
            fresh = [x for x in summaries if x.summary_id not in known]
            if fresh:
                # A replica inserting the same id meanwhile makes this fail: the caller retries
                # and the select above then sees the id.
                rows = [{"summary_id": x.summary_id, "received_at": now} for x in fresh]
                conn.execute(insert(seen), rows)
            aggs = summarize_summaries(fresh, self.telemetry_window_s)
            keys = list(aggs)
            existing: dict[tuple[str, str, int, int], Any] = {}
            key_cols = tuple_(tel.c.device_id, tel.c.model, tel.c.version, tel.c.window_start_ms)
            for part in _chunks(keys):
                q = select(tel).where(key_cols.in_(list(part)))
                if self.dialect == "postgresql":
                    # Replicas merging into the same window wait for each other, not overwrite.
                    q = q.with_for_update()
                for row in conn.execute(q):
                    existing[(row.device_id, row.model, row.version, row.window_start_ms)] = row
            inserts: list[dict[str, Any]] = []
            updates: list[dict[str, Any]] = []
            for key, agg in aggs.items():
                current = existing.get(key)
                if current is None:
                    inserts.append(_aggregate_values(agg, now))
                    continue
                merged = _aggregate(current)
                merged.merge(agg)
                updates.append(_aggregate_values(merged, now))
            if inserts:
                # A replica inserting the same window meanwhile fails this: the caller retries.
                conn.execute(insert(tel), inserts)
            if updates:
                # Rewriting the (locked) rows as one multi-row upsert instead of one UPDATE
                # per row: a round trip per batch, not per aggregate, on PostgreSQL.
                dialect_insert = (
                    postgresql.insert if self.dialect == "postgresql" else sqlite.insert
                )
                upsert = dialect_insert(tel)
                keys_ = ["device_id", "model", "version", "window_start_ms"]
                stmt = upsert.on_conflict_do_update(
                    index_elements=keys_,
                    set_={c: upsert.excluded[c] for c in updates[0] if c not in keys_},
                )
                conn.execute(stmt, updates)
            return IngestResult(len(fresh), offered - len(fresh))

    def telemetry_rows(
        self,
        model: str,
        version: int | None = None,
        *,
        since: float | None = None,
        until: float | None = None,
        device_ids: Iterable[str] | None = None,
    ) -> list[Aggregate]:
        with self.session(write=False) as s:
            q = select(TelemetryRow).where(TelemetryRow.model == model)
            if version is not None:
                q = q.where(TelemetryRow.version == version)
            if since is not None:
                # A window counts when it ends after `since`.
                q = q.where(
                    TelemetryRow.window_start_ms
                    > int(since * 1000) - int(self.telemetry_window_s * 1000)
                )
            if until is not None:
                q = q.where(TelemetryRow.window_start_ms < int(until * 1000))
            rows = [_aggregate(r) for r in s.scalars(q)]
        if device_ids is not None:
            wanted = set(device_ids)
            rows = [r for r in rows if r.device_id in wanted]
        return rows

    def telemetry_stats(
        self,
        model: str,
        version: int,
        *,
        since: float | None = None,
        until: float | None = None,
        device_ids: Iterable[str] | None = None,
    ) -> TelemetryStats:
        rows = self.telemetry_rows(model, version, since=since, until=until, device_ids=device_ids)
        if rows:
            first = min(r.window_start_ms for r in rows) / 1000
            last = max(r.window_start_ms for r in rows) / 1000 + self.telemetry_window_s
            lo = max(first, since) if since is not None else first
            hi = min(last, until) if until is not None else min(last, time.time())
            span = max(hi - lo, 1e-9)
        else:
            span = 0.0
        return combine(model, version, rows, span)

    def telemetry_versions(self, model: str) -> list[int]:
        with self.session(write=False) as s:
            q = select(TelemetryRow.version).where(TelemetryRow.model == model).distinct()
            return sorted(int(v) for v in s.scalars(q))

    def telemetry_count(self) -> tuple[int, int]:
        """(aggregate rows, ingested summary ids)."""
        with self.session(write=False) as s:
            rows = s.scalar(select(func.count()).select_from(TelemetryRow)) or 0
            seen = s.scalar(select(func.count()).select_from(SeenSummaryRow)) or 0
            return int(rows), int(seen)

    def purge_telemetry(self, retention_s: float, now: float | None = None) -> int:
        """Deletes aggregates whose window ended before the retention horizon, and the
        summary and report ids received before it. Returns the number of aggregates deleted."""
        now = now or time.time()
        horizon = now - retention_s
        with self.session() as s:
            res = s.execute(
                delete(TelemetryRow).where(
                    TelemetryRow.window_start_ms
                    < int(horizon * 1000) - int(self.telemetry_window_s * 1000)
                )
            )
            s.execute(delete(SeenSummaryRow).where(SeenSummaryRow.received_at < horizon))
            # Report ids go with the same horizon: an agent re-sends a report only while
            # it lacks the PUBACK, far sooner than this.
            s.execute(delete(SeenReportRow).where(SeenReportRow.received_at < horizon))
            return int(getattr(res, "rowcount", 0) or 0)


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


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}"
    return url


__all__ = [
    "Artifact",
    "Assignment",
    "Desired",
    "Device",
    "EventRecord",
    "IngestResult",
    "Rollout",
    "Store",
]
