"""The fleet's one data layer (SQLAlchemy 2): SQLite by default, PostgreSQL by URL.

Everything the service knows lives here: devices and what they should run, models, versions
and signed artifacts, rollouts with their stages, per-device assignments and the event
history, and merged telemetry. Methods return plain frozen records, never ORM objects, and
SQLAlchemy's errors leave as `StoreError`.

SQLite runs in WAL mode with a busy timeout, so the MQTT thread, the rollout loop and the REST
threads can share one file; PostgreSQL is what several service replicas share.
"""

from .base import sqlite_url
from .overview import OverviewStore
from .records import (
    HARDWARE_ANY,
    Artifact,
    Assignment,
    ChangeMarks,
    Desired,
    Device,
    EventRecord,
    IngestResult,
    PresenceUpdate,
    ReportIn,
    ReportOutcome,
    Rollout,
    pick_variant,
)


class Store(OverviewStore):
    """The fleet's data layer over one SQLAlchemy engine."""


__all__ = [
    "HARDWARE_ANY",
    "Artifact",
    "Assignment",
    "ChangeMarks",
    "Desired",
    "Device",
    "EventRecord",
    "IngestResult",
    "PresenceUpdate",
    "ReportIn",
    "ReportOutcome",
    "Rollout",
    "Store",
    "pick_variant",
    "sqlite_url",
]
