"""What the fleet service is configured with (`ServiceConfig`) and what a user asks a
rollout to be (`RolloutRequest`, validated into an engine plan by the service)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tandem.errors import ConfigError

from . import engine as eng
from .delivery import DEFAULT_CHUNK_SIZE


@dataclass(frozen=True)
class ServiceConfig:
    """Everything the service process is configured with; each field's unit in its comment."""

    db_url: str
    artifacts_dir: Path  # where imported artifact variants are copied to and served from
    trusted_keys: tuple[Path, ...] = ()  # PEM ed25519 public keys that imports must be signed by
    chunk_size: int = DEFAULT_CHUNK_SIZE  # bytes of payload per ArtifactChunk
    tick_s: float = 0.5  # seconds between rollout-engine turns
    telemetry_window_s: float = 60.0  # seconds per merged telemetry window
    telemetry_retention_s: float = 7 * 86400.0  # seconds telemetry aggregates are kept
    telemetry_flush_s: float = 0.2  # seconds the ingest writer waits to batch summaries
    telemetry_queue: int = 200_000  # summaries buffered for the writer before dropping
    api_tokens: Mapping[str, str] = field(default_factory=dict)  # bearer token -> user name
    # The fleet key (ed25519 private, PEM) that signs every desired state; None: the one in
    # artifacts_dir/.keys/fleet.key, generated there on first use (fleet_key.py).
    fleet_key: Path | None = None
    replica_id: str = ""  # this replica's name in the leader election; default hostname:pid
    # Seconds a silent engine leader keeps the lead (PostgreSQL); None: 10 s or 4 ticks.
    leader_lease_s: float | None = None

    def __post_init__(self) -> None:
        if not self.db_url:
            raise ConfigError("db_url", "must not be empty")
        if self.chunk_size < 1024 or self.chunk_size > 4 * 1024 * 1024:
            raise ConfigError("chunk_size", f"must be 1 KiB..4 MiB, got {self.chunk_size}")
        for name in ("tick_s", "telemetry_window_s", "telemetry_retention_s", "telemetry_flush_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(name, f"must be > 0, got {getattr(self, name)}")
        if self.telemetry_retention_s < self.telemetry_window_s:
            raise ConfigError("telemetry_retention_s", "must be at least one telemetry window")
        if self.telemetry_queue < 1:
            raise ConfigError("telemetry_queue", "must be >= 1")
        if self.leader_lease_s is not None and self.leader_lease_s < max(1.0, 4 * self.tick_s):
            # The leader re-checks its lock once a turn; a lease shorter than a few turns
            # would let the server end the lock session between two checks.
            raise ConfigError(
                "leader_lease_s", f"must be >= 1 s and >= 4 ticks, got {self.leader_lease_s}"
            )

    @property
    def lease_s(self) -> float:
        return self.leader_lease_s or max(10.0, 4 * self.tick_s)


@dataclass(frozen=True)
class RolloutRequest:
    """What a user asks for; validated into an engine plan by `FleetService.create_rollout`."""

    model: str
    version: int
    stages: tuple[eng.Stage, ...]
    selector: Mapping[str, str] = field(default_factory=dict)  # device tags that must match
    baseline_version: int | None = None  # default: the newest imported version below `version`
    on_gate_failure: eng.GateAction = eng.GateAction.ABORT
    device_timeout_s: float = 600.0
    max_assignments_per_s: float = 0.0
    false_abort_rate: float = 0.01  # the chance of stopping a good version the plan accepts

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RolloutRequest:
        try:
            return cls(
                model=str(data["model"]),
                version=int(data["version"]),
                stages=tuple(eng.Stage.from_json(s) for s in data["stages"]),
                selector={str(k): str(v) for k, v in (data.get("selector") or {}).items()},
                baseline_version=(
                    int(data["baseline_version"]) if data.get("baseline_version") else None
                ),
                on_gate_failure=eng.GateAction(data.get("on_gate_failure", "abort")),
                device_timeout_s=float(data.get("device_timeout_s", 600.0)),
                max_assignments_per_s=float(data.get("max_assignments_per_s", 0.0)),
                false_abort_rate=float(data.get("false_abort_rate", 0.01)),
            )
        except KeyError as exc:
            raise ConfigError(str(exc.args[0]), "is required") from exc
        except (TypeError, ValueError) as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError("rollout", str(exc)) from exc
