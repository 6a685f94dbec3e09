"""The plain frozen records the store returns: never ORM objects."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tandem.protos.fleet.v1 import fleet_pb2

from .. import engine as eng

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
            "false_abort_rate": p.false_abort_rate,
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


@dataclass(frozen=True)
class ChangeMarks:
    """Cheap fingerprints of what the console's pages show."""

    event_id: int  # the newest event's id
    devices: int
    online: int
    last_seen: float  # newest presence, unix seconds
    desired_revisions: int  # sum over devices: changes when any desired state changes
    rollouts_updated: float  # unix seconds
    telemetry_updated: float  # unix seconds
