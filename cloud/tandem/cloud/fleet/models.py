"""The fleet's tables (SQLAlchemy 2 declarative). Times are float seconds since the epoch,
so SQLite and PostgreSQL store and compare them the same way."""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class DeviceRow(Base):
    __tablename__ = "devices"

    device_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    online: Mapped[bool] = mapped_column(Boolean, default=False)
    agent_version: Mapped[str] = mapped_column(String(64), default="")
    tags: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    hardware: Mapped[str] = mapped_column(String(64), default="")
    runtimes: Mapped[list[str]] = mapped_column(JSON, default=list)
    active_versions: Mapped[dict[str, int]] = mapped_column(JSON, default=dict)
    first_seen: Mapped[float] = mapped_column(Float)
    last_seen: Mapped[float] = mapped_column(Float)
    presence_ms: Mapped[int] = mapped_column(BigInteger, default=0)
    desired_revision: Mapped[int] = mapped_column(BigInteger, default=0)


class DesiredRow(Base):
    """What one device should run for one model (published retained as DesiredState)."""

    __tablename__ = "desired"

    device_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    model: Mapped[str] = mapped_column(String(128), primary_key=True)
    version: Mapped[int] = mapped_column(BigInteger)
    variant: Mapped[str] = mapped_column(String(64))
    rollout_id: Mapped[str] = mapped_column(String(64), default="")
    updated_at: Mapped[float] = mapped_column(Float)


class ModelRow(Base):
    __tablename__ = "models"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    task: Mapped[str] = mapped_column(String(32), default="")
    created_at: Mapped[float] = mapped_column(Float)


class VersionRow(Base):
    __tablename__ = "versions"

    model: Mapped[str] = mapped_column(ForeignKey("models.name"), primary_key=True)
    version: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[float] = mapped_column(Float)


class ArtifactRow(Base):
    """One signed variant of a version: manifest bytes and signatures as built, files on disk."""

    __tablename__ = "artifacts"

    model: Mapped[str] = mapped_column(String(128), primary_key=True)
    version: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    variant: Mapped[str] = mapped_column(String(64), primary_key=True)
    runtime: Mapped[str] = mapped_column(String(32))
    hardware: Mapped[str] = mapped_column(String(32))
    manifest: Mapped[bytes] = mapped_column(LargeBinary)
    signatures: Mapped[list[dict[str, str]]] = mapped_column(JSON)
    path: Mapped[str] = mapped_column(Text)
    stored_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[float] = mapped_column(Float)


class RolloutRow(Base):
    __tablename__ = "rollouts"

    rollout_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    model: Mapped[str] = mapped_column(String(128), index=True)
    version: Mapped[int] = mapped_column(BigInteger)
    baseline_version: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    selector: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    plan: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_by: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    # The engine's RolloutState, column by column.
    status: Mapped[str] = mapped_column(String(16), index=True)
    stage_index: Mapped[int] = mapped_column(Integer)
    stage_started_at: Mapped[float] = mapped_column(Float)
    stage_settled_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    gate_window_start: Mapped[float] = mapped_column(Float)
    paused_reason: Mapped[str] = mapped_column(Text, default="")
    tokens: Mapped[float] = mapped_column(Float, default=0.0)
    tokens_at: Mapped[float] = mapped_column(Float)
    waiting_for_data: Mapped[bool] = mapped_column(Boolean, default=False)
    last_gates: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)


class StageRow(Base):
    __tablename__ = "rollout_stages"

    rollout_id: Mapped[str] = mapped_column(ForeignKey("rollouts.rollout_id"), primary_key=True)
    stage_index: Mapped[int] = mapped_column(Integer, primary_key=True)
    percent: Mapped[float] = mapped_column(Float)
    min_soak_s: Mapped[float] = mapped_column(Float)
    gates: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    settled_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    ended_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class AssignmentRow(Base):
    """One device's part in one rollout."""

    __tablename__ = "assignments"

    rollout_id: Mapped[str] = mapped_column(ForeignKey("rollouts.rollout_id"), primary_key=True)
    device_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    stage_index: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16))
    variant: Mapped[str] = mapped_column(String(64))
    previous_version: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    assigned_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)

    __table_args__ = (Index("ix_assignments_device", "device_id"),)


class EventRow(Base):
    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[float] = mapped_column(Float, index=True)
    rollout_id: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    device_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    kind: Mapped[str] = mapped_column(String(64))
    actor: Mapped[str] = mapped_column(String(128))
    stage_index: Mapped[int | None] = mapped_column(Integer, nullable=True)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class TelemetryRow(Base):
    """Merged telemetry of one device, model version and time window."""

    __tablename__ = "telemetry"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(128))
    model: Mapped[str] = mapped_column(String(128))
    version: Mapped[int] = mapped_column(BigInteger)
    window_start_ms: Mapped[int] = mapped_column(BigInteger)
    requests: Mapped[int] = mapped_column(BigInteger, default=0)
    errors: Mapped[int] = mapped_column(BigInteger, default=0)
    fallbacks: Mapped[int] = mapped_column(BigInteger, default=0)
    cache_hits: Mapped[int] = mapped_column(BigInteger, default=0)
    shadow_sampled: Mapped[int] = mapped_column(BigInteger, default=0)
    shadow_agreed: Mapped[int] = mapped_column(BigInteger, default=0)
    counts: Mapped[dict[str, int]] = mapped_column(JSON, default=dict)
    confidence: Mapped[list[int]] = mapped_column(JSON, default=list)
    confidence_sum: Mapped[float] = mapped_column(Float, default=0.0)
    latency_local: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    latency_cloud: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    runtime: Mapped[str] = mapped_column(String(32), default="")
    summaries: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[float] = mapped_column(Float)
    # Text generation (issue 14); added in place to older databases (store.base).
    generations: Mapped[int] = mapped_column(BigInteger, default=0)
    generation_errors: Mapped[int] = mapped_column(BigInteger, default=0)
    generated_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    generation_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    drafted: Mapped[int] = mapped_column(BigInteger, default=0)
    accepted: Mapped[int] = mapped_column(BigInteger, default=0)
    escalations: Mapped[int] = mapped_column(BigInteger, default=0)
    ttft: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    ms_per_token: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)

    __table_args__ = (
        UniqueConstraint("device_id", "model", "version", "window_start_ms", name="uq_telemetry"),
        Index("ix_telemetry_version_window", "model", "version", "window_start_ms"),
    )


class SeenSummaryRow(Base):
    """Summary ids already ingested (kept as long as the telemetry they went into)."""

    __tablename__ = "telemetry_seen"

    summary_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    received_at: Mapped[float] = mapped_column(Float, index=True)


class SeenReportRow(Base):
    """Device report ids already applied: agents re-send a report until its PUBACK, so the
    same report may arrive again (kept as long as telemetry)."""

    __tablename__ = "reports_seen"

    report_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    received_at: Mapped[float] = mapped_column(Float, index=True)
