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
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from google.protobuf.message import DecodeError

from tandem.errors import ConfigError
from tandem.protos.fleet.v1 import fleet_pb2, topics
from tandem.sdk.artifacts import (
    TrustedKeys,
    load_public_key_raw,
)

from . import engine as eng
from . import imports, observe
from .config import RolloutRequest, ServiceConfig
from .delivery import Delivery
from .errors import ConflictError, NotFoundError
from .fleet_key import DEFAULT_KEY_FILE, FleetKey
from .leader import LeaderElector
from .rollouts import apply_command
from .store import Artifact, Device, IngestResult, ReportIn, Rollout, Store, pick_variant

__all__ = ["REPORT_KINDS", "FleetService", "RolloutRequest", "ServiceConfig", "valid_device_id"]

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
        # Each rollout's pre-rollout device history, read once per refresh (observe).
        self._history: observe.HistoryCache = {}
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
        return imports.import_zoo(self.store, self.config.artifacts_dir, self._trusted, zoo)

    def import_variant(
        self,
        folder: Path,
        trusted: TrustedKeys | None = None,
        report: Mapping[str, Any] | None = None,
    ) -> tuple[str, int, str]:
        """Imports one signed variant folder (verified against `trusted`, else the
        configured keys) into the store and the artifact folder."""
        return imports.import_variant(
            self.store, self.config.artifacts_dir, folder, trusted or self._trusted, report
        )

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
            "targeted": len(observe.targets(self.store, r)[0]),
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
            baseline = observe.baseline_variants(
                self.store, r, [a.device_id for a in self.store.assignments(rollout_id)]
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
                self._history.pop(rollout_id, None)
                return None
            now = self.clock()
            targets, variants = observe.targets(self.store, r)
            obs = observe.observation(self.store, r, now, targets, self._history)
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
                baseline_variants=observe.baseline_variants(self.store, r, moved),
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
        parsed = [p for _, p in _from_their_devices(items, fleet_pb2.Presence, "presence")]
        if not parsed:
            return set()
        results = self.store.upsert_presences(parsed, self.clock())
        return {p.device_id for p, r in zip(parsed, results, strict=True) if r.came_online}

    def handle_report(self, topic_device: str, payload: bytes) -> list[str]:
        return self.handle_reports([(topic_device, payload)]).get(topic_device, [])

    def handle_reports(self, items: Sequence[tuple[str, bytes]]) -> dict[str, list[str]]:
        """Device reports as (topic device, payload), in one transaction; devices that a
        failure moved back get their desired state published.

        Returns, per device, the ids of the reports now stored (applied now, or before: a
        copy) or dropped for good (an unknown kind), which the MQTT link acknowledges to the
        device (`ReportAck`); the device sends the others again. PROGRESS reports are not
        listed (the agent does not queue them), nor those from unknown devices (their copy
        sent after the device registers must count)."""
        parsed: list[ReportIn] = []
        stored: dict[str, list[str]] = {}
        for topic_device, report in _from_their_devices(items, fleet_pb2.DeviceReport, "report"):
            kind = REPORT_KINDS.get(report.kind)
            if kind is None:
                log.warning("dropped report of unknown kind %d from %s", report.kind, topic_device)
                if report.report_id:
                    stored.setdefault(topic_device, []).append(report.report_id)
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
            return stored
        outcomes = self.store.apply_reports(parsed, self.clock())
        changed = []
        for r, outcome in zip(parsed, outcomes, strict=True):
            if outcome.duplicate:
                log.debug("report %s from %s applied before: dropped", r.report_id, r.device_id)
            elif not outcome.known:
                log.warning("dropped report from unknown device %r", r.device_id)
                continue
            elif outcome.desired_changed:
                changed.append(r.device_id)
            if r.report_id and r.kind is not eng.ReportKind.PROGRESS:
                stored.setdefault(r.device_id, []).append(r.report_id)
        self._publish(changed)
        return stored

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


_Msg = TypeVar("_Msg", fleet_pb2.Presence, fleet_pb2.DeviceReport)


def _from_their_devices(
    items: Sequence[tuple[str, bytes]], message: type[_Msg], what: str
) -> Iterator[tuple[str, _Msg]]:
    """(topic device, message) for each payload that parses and is about the device whose
    topic it came on; garbage and spoofed payloads are logged and dropped."""
    for topic_device, payload in items:
        msg = message()
        try:
            msg.ParseFromString(payload)
        except DecodeError as exc:
            log.warning("dropped garbage %s payload from %s: %s", what, topic_device, exc)
            continue
        if msg.device_id != topic_device:
            log.warning("dropped %s for %r on the topic of %r", what, msg.device_id, topic_device)
            continue
        yield topic_device, msg


def valid_device_id(device_id: str) -> bool:
    return topics.is_valid_device_id(device_id)
