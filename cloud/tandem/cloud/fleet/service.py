"""`FleetService`: the fleet's API, shared by the MQTT link, the REST layer and the CLI.

It owns the store, imports signed artifacts, turns rollouts with the pure engine, and
decides what each device should run. It does no MQTT itself: whenever a device's desired
state changes it calls `on_desired_changed(device_ids)`, which the MQTT link (`mqtt.py`) sets
to publish the retained DesiredState.

Device messages arrive through `handle_presence`, `handle_report`, `handle_telemetry` and
`chunks_for`; each checks that the message is about the device whose topic it came on and
that the device is known, and drops (and logs) anything else.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf.message import DecodeError

from tandem.errors import ArtifactError, ConfigError
from tandem.protos.fleet.v1 import fleet_pb2, topics
from tandem.sdk.artifacts import (
    MANIFEST_FILE,
    SIGNATURES_FILE,
    TrustedKeys,
    load_public_key_raw,
    load_variant,
    verify_stored_files,
)
from tandem.sdk.histogram import LogHistogram

from . import engine as eng
from .delivery import DEFAULT_CHUNK_SIZE, Delivery
from .errors import ConflictError, ImportRefusedError, NotFoundError
from .fleet_key import DEFAULT_KEY_FILE, FleetKey
from .leader import LeaderElector
from .rollouts import apply_command
from .store import Artifact, Device, IngestResult, ReportIn, Rollout, Store, pick_variant
from .telemetry import TelemetryStats

log = logging.getLogger(__name__)

REPORT_KINDS = {
    fleet_pb2.DeviceReport.PROGRESS: eng.ReportKind.PROGRESS,
    fleet_pb2.DeviceReport.VERIFIED: eng.ReportKind.VERIFIED,
    fleet_pb2.DeviceReport.ACTIVATED: eng.ReportKind.ACTIVATED,
    fleet_pb2.DeviceReport.HEALTHY: eng.ReportKind.HEALTHY,
    fleet_pb2.DeviceReport.FAILED: eng.ReportKind.FAILED,
    fleet_pb2.DeviceReport.REFUSED: eng.ReportKind.REFUSED,
    fleet_pb2.DeviceReport.ROLLED_BACK: eng.ReportKind.ROLLED_BACK,
}


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


def _now() -> float:
    return time.time()


class FleetService:
    """The fleet's API over one store."""

    def __init__(self, config: ServiceConfig, *, clock: Callable[[], float] = _now) -> None:
        self.config = config
        self.clock = clock
        self.store = Store(config.db_url, telemetry_window_s=config.telemetry_window_s, clock=clock)
        self.delivery = Delivery(config.chunk_size)
        # Called with the devices whose desired state changed; the MQTT link publishes them.
        self.on_desired_changed: Callable[[Sequence[str]], None] = lambda _device_ids: None
        self._trusted = (
            TrustedKeys(load_public_key_raw(p) for p in config.trusted_keys)
            if config.trusted_keys
            else None
        )
        self._engine_lock = threading.Lock()
        # Which replica turns the engine (always this one on SQLite); see leader.py.
        self.leader = LeaderElector(
            self.store.engine.url, replica_id=config.replica_id, lease_s=config.lease_s
        )
        self._artifacts: dict[tuple[str, int, str], Artifact] = {}
        config.artifacts_dir.mkdir(parents=True, exist_ok=True)

    def close(self) -> None:
        self.leader.close()
        self.store.close()

    # --- import ----------------------------------------------------------------------------

    def import_zoo(self, zoo: Path) -> list[tuple[str, int, str]]:
        """Imports every signed variant under `zoo/artifacts/<model>/<version>/<variant>/`."""
        root = zoo / "artifacts"
        if not root.is_dir():
            raise ImportRefusedError(f"{zoo} has no artifacts/ folder (not a model zoo?)")
        trusted = self._trusted
        if trusted is None and (zoo / "keys" / "signing.pub").exists():
            # With no key configured the zoo's own public key is the anchor: the zoo on this
            # machine is trusted input; devices check signatures against their own keys anyway.
            trusted = TrustedKeys([load_public_key_raw(zoo / "keys" / "signing.pub")])
        report = _read_report(zoo)
        imported = []
        for manifest_path in sorted(root.glob(f"*/*/*/{MANIFEST_FILE}")):
            folder = manifest_path.parent
            imported.append(self.import_variant(folder, trusted, report))
        if not imported:
            raise ImportRefusedError(f"no artifact variants under {root}")
        return imported

    def import_variant(
        self,
        folder: Path,
        trusted: TrustedKeys | None = None,
        report: Mapping[str, Any] | None = None,
    ) -> tuple[str, int, str]:
        trusted = trusted or self._trusted
        if trusted is None:
            raise ImportRefusedError(
                f"no trusted key to verify {folder} with: pass --trusted-key (or --signing-key)"
            )
        try:
            variant = load_variant(folder, trusted)
            verify_stored_files(variant)
            signed = (folder / MANIFEST_FILE).read_bytes()
            sig_doc = json.loads((folder / SIGNATURES_FILE).read_bytes())
        except (ArtifactError, OSError, ValueError) as exc:
            raise ImportRefusedError(f"refusing {folder}: {exc}") from exc
        m = variant.manifest
        try:
            existing = self.store.artifact(m.model, m.version, m.variant)
        except NotFoundError:
            existing = None
        if existing is not None and existing.manifest != signed:
            raise ConflictError(
                f"{m.model} v{m.version} {m.variant} exists with a different manifest; "
                "versions are immutable, build a new version"
            )
        dest = self.config.artifacts_dir / m.model / str(m.version) / m.variant
        _copy_variant(
            folder, dest, [MANIFEST_FILE, SIGNATURES_FILE, *(f.stored_as for f in m.files)]
        )
        metrics = dict(m.metrics)
        model_report = (report or {}).get("models", {}).get(m.model)
        if isinstance(model_report, Mapping):
            metrics.setdefault("build_report", dict(model_report))
        self.store.add_artifact(
            m.model,
            m.version,
            m.variant,
            runtime=m.runtime,
            hardware=m.hardware,
            task=m.task,
            manifest=signed,
            signatures=[
                (str(s["keyid"]), bytes.fromhex(str(s["sig"]))) for s in sig_doc["signatures"]
            ],
            path=str(dest),
            stored_bytes=sum(f.stored_size for f in m.files),
            metrics=metrics,
        )
        log.info("imported %s v%d %s", m.model, m.version, m.variant)
        return (m.model, m.version, m.variant)

    # --- queries ---------------------------------------------------------------------------

    def devices(
        self, tags: Mapping[str, str] | None = None, online: bool | None = None
    ) -> list[Device]:
        return self.store.devices(tags, online)

    def device(self, device_id: str) -> dict[str, Any]:
        d = self.store.device(device_id)
        rev, desired = self.store.desired(device_id)
        return {
            **d.to_json(),
            "desired_revision": rev,
            "desired": [
                {
                    "model": x.model,
                    "version": x.version,
                    "variant": x.variant,
                    "rollout_id": x.rollout_id,
                }
                for x in desired
            ],
        }

    def models(self) -> list[dict[str, Any]]:
        return self.store.models()

    def versions(self, model: str) -> list[dict[str, Any]]:
        return self.store.versions(model)

    def rollouts(self, status: Sequence[str] | None = None) -> list[Rollout]:
        return self.store.rollouts(status)

    def rollout(self, rollout_id: str) -> dict[str, Any]:
        r = self.store.rollout(rollout_id)
        assignments = self.store.assignments(rollout_id)
        counts: dict[str, int] = {}
        for a in assignments:
            counts[a.state.value] = counts.get(a.state.value, 0) + 1
        return {
            **r.to_json(),
            "stages": [
                {**st, "devices": sum(1 for a in assignments if a.stage_index == st["stage_index"])}
                for st in self.store.stages(rollout_id)
            ],
            "device_states": counts,
            "targeted": len(self._targets(r)[0]),
        }

    def rollout_devices(self, rollout_id: str) -> list[dict[str, Any]]:
        self.store.rollout(rollout_id)
        return [a.to_json() for a in self.store.assignments(rollout_id)]

    def events(
        self, rollout_id: str | None = None, since_id: int = 0, limit: int = 1000
    ) -> list[dict[str, Any]]:
        if rollout_id is not None:
            self.store.rollout(rollout_id)
        return [e.to_json() for e in self.store.events(rollout_id, since_id, limit)]

    def telemetry(
        self,
        model: str,
        version: int | None = None,
        *,
        since: float | None = None,
        until: float | None = None,
    ) -> list[dict[str, Any]]:
        versions = [version] if version is not None else self.store.telemetry_versions(model)
        return [
            self.store.telemetry_stats(model, v, since=since, until=until).to_json()
            for v in versions
        ]

    # --- rollouts --------------------------------------------------------------------------

    def create_rollout(self, request: RolloutRequest, actor: str) -> Rollout:
        plan = eng.RolloutPlan(
            model=request.model,
            version=request.version,
            stages=request.stages,
            on_gate_failure=request.on_gate_failure,
            device_timeout_s=request.device_timeout_s,
            max_assignments_per_s=request.max_assignments_per_s,
            false_abort_rate=request.false_abort_rate,
        )
        if not self.store.artifacts(plan.model, plan.version):
            raise NotFoundError(f"no artifacts for {plan.model} v{plan.version}: import them first")
        baseline = request.baseline_version
        if baseline is None:
            older = [v for v in self.store.versions(plan.model) if v["version"] < plan.version]
            baseline = older[-1]["version"] if older else None
        elif baseline >= plan.version:
            raise ConfigError("baseline_version", f"must be below the version {plan.version}")
        rollout_id = "r-" + uuid.uuid4().hex[:12]
        r = self.store.create_rollout(
            rollout_id,
            plan,
            baseline_version=baseline,
            selector=request.selector,
            created_by=actor,
            now=self.clock(),
        )
        log.info("rollout %s created by %s: %s v%d", rollout_id, actor, plan.model, plan.version)
        if self.leader.is_leader:  # else the leader's next turn takes the first step
            self.step_rollout(rollout_id)
        return self.store.rollout(r.rollout_id)

    def command(self, rollout_id: str, cmd: eng.Command | str, actor: str) -> Rollout:
        with self._engine_lock:
            r = self.store.rollout(rollout_id)
            baseline = self._baseline_variants(
                r, [a.device_id for a in self.store.assignments(rollout_id)]
            )
            rollout, changed = apply_command(
                self.store, rollout_id, eng.Command(cmd), actor, self.clock(), baseline
            )
        log.info("rollout %s: %s by %s", rollout_id, eng.Command(cmd).value, actor)
        self._publish(changed)
        if rollout.state.status is eng.RolloutStatus.RUNNING and self.leader.is_leader:
            self.step_rollout(rollout_id)
        return self.store.rollout(rollout_id)

    def tick(self) -> None:
        """One engine turn over every running or paused rollout."""
        for r in self.store.rollouts(
            [eng.RolloutStatus.RUNNING.value, eng.RolloutStatus.PAUSED.value]
        ):
            try:
                self.step_rollout(r.rollout_id)
            except ConflictError as exc:
                log.info("rollout %s moved meanwhile, next turn: %s", r.rollout_id, exc)

    def step_rollout(self, rollout_id: str) -> eng.Decision | None:
        with self._engine_lock:
            r = self.store.rollout(rollout_id)
            if r.state.status in eng.TERMINAL_STATUSES:
                return None
            now = self.clock()
            targets, variants = self._targets(r)
            assignments = {a.device_id: a for a in self.store.assignments(rollout_id)}
            views = [eng.DeviceView(d.device_id) for d in targets if d.device_id not in assignments]
            views += [
                eng.DeviceView(a.device_id, a.state, a.assigned_at, a.updated_at)
                for a in assignments.values()
            ]
            touched = list(assignments)
            cohort = (
                self.store.telemetry_stats(
                    r.plan.model,
                    r.plan.version,
                    since=r.state.gate_window_start,
                    device_ids=touched,
                )
                if touched
                else None
            )
            baseline = (
                self.store.telemetry_stats(
                    r.plan.model, r.baseline_version, since=r.state.gate_window_start
                )
                if r.baseline_version is not None
                else None
            )
            base_hist = baseline.latency_local if baseline is not None else None
            obs = eng.Observation(
                now, views, _version_stats(cohort, base_hist), _version_stats(baseline)
            )
            decision = eng.step(r.plan, r.state, obs)
            gates_changed = [g.to_json() for g in decision.gates] != list(r.last_gates)
            if not decision.changed and decision.state == r.state and not gates_changed:
                return decision
            by_id = {d.device_id: d for d in targets}
            previous = {
                d: by_id[d].active_versions.get(r.plan.model) if d in by_id else None
                for d in decision.assign
            }
            moved = [d for d, _ in decision.fail] + list(decision.rollback)
            changed = self.store.apply_decision(
                rollout_id,
                r.state,
                decision,
                now,
                variants={d: variants[d] for d in decision.assign},
                previous=previous,
                baseline_variants=self._baseline_variants(r, moved),
            )
        for e in decision.events:
            log.info(
                "rollout %s stage %d: %s by %s %s",
                rollout_id,
                e.stage_index,
                e.kind,
                e.actor,
                dict(e.detail) if e.kind != "device_failed" else e.device_id,
            )
        self._publish(changed)
        return decision

    def _targets(self, r: Rollout) -> tuple[list[Device], dict[str, str]]:
        """Online devices matching the selector that have a variant, and that variant."""
        artifacts = self.store.artifacts(r.plan.model, r.plan.version)
        out, variants = [], {}
        for d in self.store.devices(r.selector, online=True):
            variant = pick_variant(d, artifacts)
            if variant is not None:
                out.append(d)
                variants[d.device_id] = variant
        return out, variants

    def _baseline_variants(self, r: Rollout, device_ids: Sequence[str]) -> dict[str, str]:
        if not device_ids:
            return {}
        assignments = {a.device_id: a for a in self.store.assignments(r.rollout_id)}
        cache: dict[int, list[Artifact]] = {}
        out: dict[str, str] = {}
        for device_id in device_ids:
            a = assignments.get(device_id)
            version = a.previous_version if a else r.baseline_version
            if version is None:
                continue
            if version not in cache:
                cache[version] = self.store.artifacts(r.plan.model, version)
            try:
                device = self.store.device(device_id)
            except NotFoundError:
                continue
            variant = pick_variant(device, cache[version])
            if variant is not None:
                out[device_id] = variant
        return out

    def _publish(self, device_ids: Sequence[str]) -> None:
        ids = list(dict.fromkeys(device_ids))
        if not ids:
            return
        try:
            self.on_desired_changed(ids)
        except Exception:  # a publish hook must never break the engine
            log.exception("publishing the desired state of %d devices failed", len(ids))

    def run_engine(self, stop: threading.Event) -> None:
        """Turns the engine every `tick_s` and purges old telemetry hourly, until `stop`,
        while this replica leads: the lead is checked before every turn, and a follower
        tries to take it at each turn instead. On stop the lead is released at once."""
        last_purge = 0.0
        try:
            while not stop.is_set():
                try:
                    if self.leader.check():
                        self.tick()
                        if time.monotonic() - last_purge > 3600:
                            last_purge = time.monotonic()
                            self.store.purge_telemetry(
                                self.config.telemetry_retention_s, self.clock()
                            )
                except Exception:
                    log.exception("rollout engine turn failed")
                stop.wait(self.config.tick_s)
        finally:
            self.leader.step_down()

    # --- desired state ---------------------------------------------------------------------

    @functools.cached_property
    def fleet_key(self) -> FleetKey:
        """Signs every desired state; agents verify with its public half (`--fleet-key`)."""
        path = self.config.fleet_key or self.config.artifacts_dir / DEFAULT_KEY_FILE
        return FleetKey.load_or_create(path)

    def artifact(self, model: str, version: int, variant: str) -> Artifact:
        """An artifact record, cached: versions are immutable once imported."""
        key = (model, version, variant)
        art = self._artifacts.get(key)
        if art is None:
            art = self.store.artifact(model, version, variant)
            self._artifacts[key] = art
        return art

    def desired_state(self, device_id: str) -> fleet_pb2.DesiredState:
        return self.desired_states([device_id])[0]

    def desired_states(self, device_ids: Sequence[str]) -> list[fleet_pb2.DesiredState]:
        """The retained DesiredState message of each device (same order), signed."""
        views = self.store.desired_views(device_ids)
        out = []
        for device_id in device_ids:
            revision, rows, active = views.get(device_id, (0, [], {}))
            msg = fleet_pb2.DesiredState(device_id=device_id, revision=revision)
            for row in rows:
                try:
                    art = self.artifact(row.model, row.version, row.variant)
                except NotFoundError:
                    log.error(
                        "desired %s v%d %s for %s has no artifact",
                        row.model,
                        row.version,
                        row.variant,
                        device_id,
                    )
                    continue
                base = active.get(row.model)
                delta_base = 0
                if base and base != row.version:
                    try:
                        self.artifact(row.model, base, row.variant)
                        delta_base = base
                    except NotFoundError:
                        pass
                msg.models.append(
                    fleet_pb2.DesiredModel(
                        model=row.model,
                        version=row.version,
                        variant=row.variant,
                        manifest=art.signed_manifest(),
                        rollout_id=row.rollout_id,
                        delta_base_version=delta_base,
                    )
                )
            self.fleet_key.sign(msg, issued_at_ms=int(self.clock() * 1000))
            out.append(msg)
        return out

    def set_desired(
        self,
        device_id: str,
        model: str,
        version: int | None,
        actor: str,
        variant: str | None = None,
    ) -> None:
        """Pins a device to a version by hand (None withdraws the model)."""
        device = self.store.device(device_id)
        if version is not None and variant is None:
            variant = pick_variant(device, self.store.artifacts(model, version))
            if variant is None:
                raise NotFoundError(f"no variant of {model} v{version} runs on {device_id}")
        self.store.set_desired(device_id, model, version, variant or "", "", actor)
        self._publish([device_id])

    # --- device messages -------------------------------------------------------------------

    def handle_presence(self, topic_device: str, payload: bytes) -> bool:
        """True when the device came online (its desired state should be republished)."""
        return topic_device in self.handle_presences([(topic_device, payload)])

    def handle_presences(self, items: Sequence[tuple[str, bytes]]) -> set[str]:
        """Presence messages as (topic device, payload), in one transaction; returns the
        devices that came online. Garbage and spoofed payloads are dropped and logged."""
        parsed = []
        for topic_device, payload in items:
            p = fleet_pb2.Presence()
            try:
                p.ParseFromString(payload)
            except DecodeError as exc:
                log.warning("dropped garbage presence payload from %s: %s", topic_device, exc)
                continue
            if p.device_id != topic_device:
                log.warning("dropped presence for %r on the topic of %r", p.device_id, topic_device)
                continue
            parsed.append(p)
        if not parsed:
            return set()
        results = self.store.upsert_presences(parsed, self.clock())
        return {p.device_id for p, r in zip(parsed, results, strict=True) if r.came_online}

    def handle_report(self, topic_device: str, payload: bytes) -> None:
        self.handle_reports([(topic_device, payload)])

    def handle_reports(self, items: Sequence[tuple[str, bytes]]) -> None:
        """Device reports as (topic device, payload), in one transaction; devices that a
        failure moved back get their desired state published."""
        parsed: list[ReportIn] = []
        for topic_device, payload in items:
            report = fleet_pb2.DeviceReport()
            try:
                report.ParseFromString(payload)
            except DecodeError as exc:
                log.warning("dropped garbage report payload from %s: %s", topic_device, exc)
                continue
            if report.device_id != topic_device:
                log.warning(
                    "dropped report for %r on the topic of %r", report.device_id, topic_device
                )
                continue
            kind = REPORT_KINDS.get(report.kind)
            if kind is None:
                log.warning("dropped report of unknown kind %d from %s", report.kind, topic_device)
                continue
            parsed.append(
                ReportIn(
                    topic_device,
                    kind,
                    report.model,
                    int(report.version),
                    report.rollout_id,
                    report.variant,
                    report.reason,
                    report.report_id,
                )
            )
        if not parsed:
            return
        outcomes = self.store.apply_reports(parsed, self.clock())
        changed = []
        for r, outcome in zip(parsed, outcomes, strict=True):
            if outcome.duplicate:
                log.debug("report %s from %s applied before: dropped", r.report_id, r.device_id)
            elif not outcome.known:
                log.warning("dropped report from unknown device %r", r.device_id)
            elif outcome.desired_changed:
                changed.append(r.device_id)
        self._publish(changed)

    def handle_telemetry(
        self, topic_device: str, summaries: Sequence[fleet_pb2.TelemetrySummary]
    ) -> list[fleet_pb2.TelemetrySummary]:
        """The summaries that may be ingested: about this device, from a known device."""
        ok = [s for s in summaries if s.device_id == topic_device]
        if len(ok) != len(summaries):
            log.warning(
                "dropped %d telemetry summaries about other devices from %s",
                len(summaries) - len(ok),
                topic_device,
            )
        return ok

    def ingest(self, summaries: Sequence[fleet_pb2.TelemetrySummary]) -> IngestResult:
        return self.store.ingest(summaries, self.clock())

    def chunks_for(self, topic_device: str, payload: bytes) -> Iterator[fleet_pb2.ArtifactChunk]:
        """The chunks answering a ChunkRequest; empty when it is not allowed."""
        req = fleet_pb2.ChunkRequest()
        req.ParseFromString(payload)
        if req.device_id != topic_device:
            log.warning(
                "dropped chunk request for %r on the topic of %r", req.device_id, topic_device
            )
            return iter(())
        _, desired = self.store.desired(topic_device)
        wanted = {(d.model, d.version, d.variant) for d in desired}
        if (req.model, req.version, req.variant) not in wanted:
            # Devices get only what they are told to run: no browsing of the artifact store.
            log.warning(
                "dropped chunk request from %s for %s v%d %s: not in its desired state",
                topic_device,
                req.model,
                req.version,
                req.variant,
            )
            return iter(())
        artifact = self.artifact(req.model, req.version, req.variant)
        base = None
        if req.accept_delta and req.have_version and req.have_version != req.version:
            try:
                base = self.artifact(req.model, req.have_version, req.variant)
            except NotFoundError:
                base = None
        payload_ = self.delivery.payload(artifact, req.file, base)
        return self.delivery.chunks(req, payload_)


def _version_stats(
    stats: TelemetryStats | None, layout: LogHistogram | None = None
) -> eng.VersionStats:
    """The engine's view of one version's telemetry. The local-latency histogram goes into
    `layout`'s buckets (the baseline's) when given, so cohort and baseline are ranked on one
    bucket layout even when their devices were configured differently."""
    if stats is None:
        return eng.VersionStats()
    hist = stats.latency_local
    if hist is not None and layout is not None and hist.layout != layout.layout:
        rebucketed = LogHistogram(layout.min_value, layout.growth, len(layout.counts))
        rebucketed.merge(hist)
        hist = rebucketed
    return eng.VersionStats(
        requests=stats.requests,
        errors=stats.errors,
        fallbacks=stats.fallbacks,
        shadow_sampled=stats.shadow_sampled,
        shadow_agreed=stats.shadow_agreed,
        p95_latency_ms=stats.p95_latency_ms,
        latency_counts=hist.bucket_counts() if hist is not None else (),
        latency_layout=hist.layout if hist is not None else None,
        confidence_buckets=stats.confidence_buckets,
        confidence_sum=stats.confidence_sum,
    )


def _read_report(zoo: Path) -> dict[str, Any]:
    try:
        data = json.loads((zoo / "report.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _copy_variant(src: Path, dest: Path, names: Sequence[str]) -> None:
    """Copies a variant into the service's artifact folder, all or nothing."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists() and all(
        (dest / n).exists() and (dest / n).read_bytes() == (src / n).read_bytes() for n in names
    ):
        return
    tmp = Path(tempfile.mkdtemp(prefix=".import-", dir=dest.parent))
    try:
        for name in names:
            shutil.copyfile(src / name, tmp / name)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def valid_device_id(device_id: str) -> bool:
    return topics.is_valid_device_id(device_id)
