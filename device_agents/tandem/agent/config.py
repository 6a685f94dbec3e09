"""The agent's configuration: one frozen dataclass, validated at construction.

Every limit lives here, each field commented with its unit (python-tuf habit), so a reviewer
sees in one place how much an untrusted fleet message can make the device do.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from urllib.parse import urlsplit

from tandem.errors import ConfigError
from tandem.protos.fleet.v1 import topics
from tandem.sdk.artifacts import RUNTIMES

AGENT_VERSION = "0.1.0"


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int

    @classmethod
    def parse(cls, url: str) -> BrokerAddress:
        """`mqtt://HOST:PORT` (port 1883 when omitted)."""
        parts = urlsplit(url)
        if parts.scheme != "mqtt" or not parts.hostname:
            raise ConfigError("broker", f"{url!r} is not an mqtt://HOST:PORT url")
        try:
            port = parts.port or 1883
        except ValueError as exc:
            raise ConfigError("broker", f"{url!r} has a bad port: {exc}") from exc
        return cls(parts.hostname, port)


@dataclass(frozen=True)
class AgentConfig:
    device_id: str
    broker: BrokerAddress
    store: Path
    trusted_keys: tuple[Path, ...]
    # The fleet service's public keys (PEM): a desired state must be signed by one of them.
    # Empty: desired states are obeyed unsigned, as before they were signed, with a warning
    # (docs/security.md); set them on every device that a fleet key can be provisioned to.
    fleet_keys: tuple[Path, ...] = ()
    username: str | None = None
    password: str | None = None
    tags: Mapping[str, str] = field(default_factory=dict)
    # None: detected (platform.machine(), normalised; importable runtime packages).
    hardware: str | None = None
    runtimes: tuple[str, ...] | None = None

    # --- delivery limits
    max_payload_bytes: int = 512 * 1024 * 1024  # bytes, sum of a variant's files (both forms)
    stall_timeout_s: float = 10.0  # seconds without a chunk before re-requesting
    progress_every_bytes: int = 1024 * 1024  # bytes between PROGRESS reports
    sync_every_bytes: int = 1024 * 1024  # bytes between fsyncs: what a power cut may refetch
    sync_idle_s: float = 0.5  # seconds a stream may pause before what arrived is synced
    delivery_attempts: int = 3  # full-file retries after a digest mismatch before refusing
    max_desired_models: int = 64  # models one desired state may name; the rest are dropped

    # --- activation and health
    warmup_rtol: float = 1e-3  # relative tolerance, outputs vs the artifact's reference
    warmup_atol: float = 1e-3  # absolute tolerance
    health_window_s: float = 30.0  # seconds of watching after a switch before HEALTHY
    health_probe_interval_s: float = 5.0  # seconds between reference probes in the window
    max_error_rate: float = 0.05  # errors / requests in the window's telemetry; above fails
    min_health_requests: int = 1  # requests the error rate needs before it counts

    # --- telemetry shipping
    telemetry_interval_s: float = 5.0  # seconds between spool scans
    telemetry_batch_max: int = 200  # summaries per published batch
    telemetry_spool: Path | None = None  # None: STORE/.telemetry-spool

    # --- MQTT session
    keepalive_s: int = 30  # seconds
    reconnect_min_s: float = 0.5  # seconds, first reconnect delay
    reconnect_max_s: float = 30.0  # seconds, cap of the exponential backoff
    publish_timeout_s: float = 10.0  # seconds to wait for a PUBACK
    # Seconds to wait for the fleet's ReportAck before a report is sent again; the wait
    # doubles with each send up to report_resend_max_s (resend.py).
    report_ack_timeout_s: float = 10.0
    report_resend_max_s: float = 300.0  # seconds, cap of the growing wait

    def __post_init__(self) -> None:
        if not topics.is_valid_device_id(self.device_id):
            raise ConfigError(
                "device_id", f"{self.device_id!r} must match {topics.DEVICE_ID_PATTERN.pattern}"
            )
        if not self.trusted_keys:
            raise ConfigError("trusted_keys", "at least one trusted public key is required")
        object.__setattr__(self, "store", Path(self.store))
        object.__setattr__(self, "trusted_keys", tuple(Path(p) for p in self.trusted_keys))
        object.__setattr__(self, "fleet_keys", tuple(Path(p) for p in self.fleet_keys))
        object.__setattr__(self, "tags", MappingProxyType(dict(self.tags)))
        for key, tag_value in self.tags.items():
            if not key or "=" in key:
                raise ConfigError("tags", f"tag key {key!r} must be non-empty without '='")
            if not isinstance(tag_value, str):
                raise ConfigError("tags", f"tag {key!r} value must be a string")
        if self.runtimes is not None:
            object.__setattr__(self, "runtimes", tuple(self.runtimes))
            unknown = sorted(set(self.runtimes) - set(RUNTIMES))
            if unknown:
                raise ConfigError("runtimes", f"unknown {unknown}; known: {list(RUNTIMES)}")
        positive: dict[str, float] = {
            "max_payload_bytes": self.max_payload_bytes,
            "stall_timeout_s": self.stall_timeout_s,
            "progress_every_bytes": self.progress_every_bytes,
            "sync_every_bytes": self.sync_every_bytes,
            "sync_idle_s": self.sync_idle_s,
            "delivery_attempts": self.delivery_attempts,
            "max_desired_models": self.max_desired_models,
            "health_probe_interval_s": self.health_probe_interval_s,
            "telemetry_interval_s": self.telemetry_interval_s,
            "telemetry_batch_max": self.telemetry_batch_max,
            "keepalive_s": self.keepalive_s,
            "reconnect_min_s": self.reconnect_min_s,
            "reconnect_max_s": self.reconnect_max_s,
            "publish_timeout_s": self.publish_timeout_s,
            "report_ack_timeout_s": self.report_ack_timeout_s,
            "report_resend_max_s": self.report_resend_max_s,
        }
        for name, value in positive.items():
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ConfigError(name, f"must be a positive number, got {value!r}")
        non_negative: dict[str, float] = {
            "warmup_rtol": self.warmup_rtol,
            "warmup_atol": self.warmup_atol,
            "health_window_s": self.health_window_s,
            "min_health_requests": self.min_health_requests,
        }
        for name, value in non_negative.items():
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ConfigError(name, f"must be a non-negative number, got {value!r}")
        if not 0 <= self.max_error_rate <= 1:
            raise ConfigError("max_error_rate", f"must be within [0, 1], got {self.max_error_rate}")
        if self.reconnect_min_s > self.reconnect_max_s:
            raise ConfigError(
                "reconnect_min_s",
                f"{self.reconnect_min_s} exceeds reconnect_max_s {self.reconnect_max_s}",
            )

        if self.report_ack_timeout_s > self.report_resend_max_s:
            raise ConfigError(
                "report_ack_timeout_s",
                f"{self.report_ack_timeout_s} exceeds report_resend_max_s "
                f"{self.report_resend_max_s}",
            )

    @property
    def spool_dir(self) -> Path:
        return self.telemetry_spool or self.store / ".telemetry-spool"

    @property
    def agent_dir(self) -> Path:
        """The agent's private state: staging, persisted transfer offsets, accepted versions."""
        return self.store / ".agent"

    def topic(self, leaf: str) -> str:
        return topics.device_topic(self.device_id, leaf)
