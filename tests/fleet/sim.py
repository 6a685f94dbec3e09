"""Simulated devices for fleet tests and benchmarks: many real MQTT connections in one thread.

Each simulated device is a real paho-mqtt 2.x MQTT 5 client with its own broker identity.
All of them are driven by one selector loop (paho's external-loop API), so a thousand
connections cost one thread. A device:

- publishes retained presence (tags, hardware, runtimes, active versions) with a last will;
- on a DesiredState, for each model version it does not run: optionally downloads the
  entrypoint file through ChunkRequests (verifying the signature, the payload digest, the
  zstd delta against its previous file, and the manifest digest), then reports VERIFIED,
  ACTIVATED and HEALTHY (or FAILED for versions told to fail) and updates its presence;
- publishes telemetry for its active version from a per-version profile;
- given a `resend` policy, keeps each report until the fleet's ReportAck names it and sends
  it again on the agent's own schedule (`tandem.agent.resend`), as the real agent does.

Simulated devices run no model: they report HEALTHY as soon as the (optional) download
checks out. That is what the rollout benchmark measures: the service and the broker.
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import itertools
import json
import logging
import selectors
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
import zstandard
from paho.mqtt.subscribeoptions import SubscribeOptions

from tandem.agent.resend import ResendPolicy, ResendSchedule
from tandem.protos.fleet.v1 import fleet_pb2, topics
from tandem.sdk.artifacts import TrustedKeys, parse_signatures, verify_manifest

log = logging.getLogger("tests.fleet.sim")


@dataclass(frozen=True)
class Profile:
    """Telemetry a device sends for one version, per interval."""

    requests: int = 100
    error_rate: float = 0.0
    latency_ms: float = 2.0
    fallback_rate: float = 0.1
    agreement: float = 0.98
    shadow: int = 20


def _histogram(
    value: float, n: int, min_value: float = 0.01, growth: float = 1.1
) -> fleet_pb2.LogHistogram:
    import math

    i = int(math.log(value / min_value) / math.log(growth))
    counts = [0] * (i + 1)
    counts[i] = n
    return fleet_pb2.LogHistogram(
        min_value=min_value, growth=growth, counts=counts, count=n, sum=value * n, max=value
    )


@dataclass
class SimDevice:
    device_id: str
    password: str
    runtimes: list[str]
    tags: dict[str, str]
    hardware: str = "x86_64"
    active: dict[str, int] = field(default_factory=dict)
    received: list[tuple[str, int]] = field(default_factory=list)  # every desired version seen
    reports: list[tuple[str, int]] = field(default_factory=list)  # (kind, version) sent
    files: dict[tuple[str, int], bytes] = field(default_factory=dict)  # uncompressed entrypoint
    revision: int = 0
    connected: bool = False
    client: Any = None
    transfer: dict[str, Any] | None = None
    delta_bytes: int = 0
    full_bytes: int = 0
    chunks: int = 0
    unacked: dict[str, bytes] = field(default_factory=dict)  # report id -> payload
    resends: ResendSchedule | None = None
    resent: int = 0  # reports sent again for want of an ack
    acked: int = 0  # reports the fleet acknowledged


class SimFleet:
    def __init__(
        self,
        host: str,
        port: int,
        credentials: Mapping[str, str],
        *,
        runtimes: Callable[[int], list[str]] = lambda _i: ["onnx"],
        tags: Callable[[int], dict[str, str]] = lambda _i: {"site": "lab"},
        active: Mapping[str, int] | None = None,
        fetch: bool = False,
        trusted: TrustedKeys | None = None,
        fail_versions: frozenset[int] = frozenset(),
        profiles: Mapping[int, Profile] | None = None,
        telemetry_interval_s: float = 0.0,
        install_delay_s: float = 0.0,
        silent: frozenset[str] = frozenset(),
        resend: ResendPolicy | None = None,
    ) -> None:
        self.host, self.port = host, port
        self.devices = {
            d: SimDevice(d, pw, runtimes(i), tags(i), active=dict(active or {}))
            for i, (d, pw) in enumerate(credentials.items())
        }
        self.fetch = fetch
        self.trusted = trusted
        self.fail_versions = fail_versions
        self.profiles = dict(profiles or {})
        self.telemetry_interval_s = telemetry_interval_s
        self.install_delay_s = install_delay_s
        self.silent = silent  # devices that take desired states and never answer
        self.resend = resend  # None: reports are fire-and-forget (the broker's PUBACK)
        if resend is not None:
            for dev in self.devices.values():
                dev.resends = ResendSchedule(resend)
        self.errors: list[str] = []
        self.telemetry_sent = 0  # summaries published
        self.telemetry_log: list[tuple[float, str]] = []  # (time, summary id) published
        self.telemetry_paused = False
        self._sel = selectors.DefaultSelector()
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._by_sock: dict[socket.socket, SimDevice] = {}
        self._lock = threading.Lock()
        self._calls: list[Callable[[], None]] = []

    # --- lifecycle -------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> None:
        for dev in self.devices.values():
            self._make_client(dev)
        self._thread = threading.Thread(target=self._loop, name="sim-fleet", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(d.connected for d in self.devices.values()):
                return
            time.sleep(0.05)
        missing = [d for d, x in self.devices.items() if not x.connected]
        raise TimeoutError(f"{len(missing)} simulated devices not connected: {missing[:5]}")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        for dev in self.devices.values():
            with contextlib.suppress(Exception):
                dev.client.disconnect()
        self._sel.close()

    def call(self, fn: Callable[[], None]) -> None:
        """Runs `fn` on the simulation thread (paho clients are not shared across threads)."""
        with self._lock:
            self._calls.append(fn)

    def publish_raw(self, device_id: str, topic: str, payload: bytes) -> None:
        dev = self.devices[device_id]
        self.call(lambda: dev.client.publish(topic, payload, qos=1))

    # --- clients ---------------------------------------------------------------------------

    def _make_client(self, dev: SimDevice) -> None:
        c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=dev.device_id,
            protocol=mqtt.MQTTv5,
            userdata=dev,
        )
        c.username_pw_set(dev.device_id, dev.password)
        will = fleet_pb2.Presence(device_id=dev.device_id, online=False)
        c.will_set(
            topics.device_topic(dev.device_id, topics.PRESENCE),
            will.SerializeToString(),
            qos=1,
            retain=True,
        )
        c.on_connect = self._on_connect
        c.on_message = self._on_message
        c.on_socket_open = self._on_socket_open
        c.on_socket_close = self._on_socket_close
        c.on_socket_register_write = self._on_register_write
        c.on_socket_unregister_write = self._on_unregister_write
        c.max_inflight_messages_set(100)
        dev.client = c
        c.connect(self.host, self.port, keepalive=60)

    def _on_socket_open(self, client: Any, dev: SimDevice, sock: Any) -> None:
        self._by_sock[sock] = dev
        self._sel.register(sock, selectors.EVENT_READ, dev)

    def _on_socket_close(self, client: Any, dev: SimDevice, sock: Any) -> None:
        self._by_sock.pop(sock, None)
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(sock)

    def _on_register_write(self, client: Any, dev: SimDevice, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._sel.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, dev)

    def _on_unregister_write(self, client: Any, dev: SimDevice, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._sel.modify(sock, selectors.EVENT_READ, dev)

    def _loop(self) -> None:
        last_misc = 0.0
        next_telemetry = time.monotonic() + (self.telemetry_interval_s or 1e18)
        while not self._stop.is_set():
            for key, events in self._sel.select(timeout=0.02):
                dev = key.data
                if events & selectors.EVENT_READ:
                    dev.client.loop_read()
                if events & selectors.EVENT_WRITE:
                    dev.client.loop_write()
            now = time.monotonic()
            with self._lock:
                calls, self._calls = self._calls, []
            for fn in calls:
                fn()
            while self._timers and self._timers[0][0] <= now:
                _, _, fn = heapq.heappop(self._timers)
                fn()
            if now >= next_telemetry and not self.telemetry_paused:
                next_telemetry = now + self.telemetry_interval_s
                self._send_telemetry()
            if now - last_misc > 1.0:
                last_misc = now
                for dev in self.devices.values():
                    dev.client.loop_misc()

    def _later(self, delay: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._seq), fn))

    # --- device behaviour ------------------------------------------------------------------

    def _presence(self, dev: SimDevice) -> None:
        p = fleet_pb2.Presence(
            device_id=dev.device_id,
            online=True,
            agent_version="sim",
            tags=dev.tags,
            hardware=dev.hardware,
            runtimes=dev.runtimes,
            active_versions=dev.active,
            timestamp_ms=int(time.time() * 1000),
        )
        dev.client.publish(
            topics.device_topic(dev.device_id, topics.PRESENCE),
            p.SerializeToString(),
            qos=1,
            retain=True,
        )

    def _on_connect(self, client: Any, dev: SimDevice, _flags: Any, rc: Any, _p: Any) -> None:
        if rc.is_failure:
            self.errors.append(f"{dev.device_id}: connect refused {rc}")
            return
        opts = SubscribeOptions(qos=1)
        client.subscribe(
            [
                (topics.device_topic(dev.device_id, topics.DESIRED), opts),
                (topics.device_topic(dev.device_id, topics.CHUNKS), opts),
                (topics.device_topic(dev.device_id, topics.REPORT_ACKS), opts),
            ]
        )
        self._presence(dev)
        dev.connected = True

    def _on_message(self, client: Any, dev: SimDevice, msg: Any) -> None:
        try:
            if msg.topic.endswith("/" + topics.DESIRED):
                self._on_desired(dev, msg.payload)
            elif msg.topic.endswith("/" + topics.CHUNKS):
                self._on_chunk(dev, msg.payload)
            elif msg.topic.endswith("/" + topics.REPORT_ACKS):
                self._on_report_ack(dev, msg.payload)
        except Exception as exc:  # record and keep simulating
            log.exception("sim device %s", dev.device_id)
            self.errors.append(f"{dev.device_id}: {exc!r}")

    def _report(
        self, dev: SimDevice, kind: int, model: str, version: int, rollout_id: str, reason: str = ""
    ) -> None:
        r = fleet_pb2.DeviceReport(
            report_id=uuid.uuid4().hex,
            device_id=dev.device_id,
            kind=kind,
            model=model,
            version=version,
            rollout_id=rollout_id,
            reason=reason,
            timestamp_ms=int(time.time() * 1000),
        )
        dev.reports.append((fleet_pb2.DeviceReport.Kind.Name(kind), version))
        payload = r.SerializeToString()
        dev.client.publish(topics.device_topic(dev.device_id, topics.REPORTS), payload, qos=1)
        if dev.resends is not None:
            dev.unacked[r.report_id] = payload
            self._later(dev.resends.sent(r.report_id, time.monotonic()), lambda: self._resend(dev))

    def _resend(self, dev: SimDevice) -> None:
        assert dev.resends is not None
        for report_id in dev.resends.due(list(dev.unacked), time.monotonic()):
            dev.client.publish(
                topics.device_topic(dev.device_id, topics.REPORTS), dev.unacked[report_id], qos=1
            )
            dev.resent += 1
            wait = dev.resends.sent(report_id, time.monotonic())
            self._later(wait, lambda: self._resend(dev))

    def _on_report_ack(self, dev: SimDevice, payload: bytes) -> None:
        ack = fleet_pb2.ReportAck.FromString(payload)
        for report_id in ack.report_ids:
            if dev.unacked.pop(report_id, None) is not None:
                dev.acked += 1
            if dev.resends is not None:
                dev.resends.acknowledged(report_id)

    def _on_desired(self, dev: SimDevice, payload: bytes) -> None:
        state = fleet_pb2.DesiredState()
        state.ParseFromString(payload)
        if state.revision <= dev.revision:
            return
        dev.revision = state.revision
        for m in state.models:
            dev.received.append((m.model, m.version))
            if dev.active.get(m.model) == m.version or dev.device_id in self.silent:
                continue
            if self.fetch:
                self._start_transfer(dev, m)
            else:
                self._later(self.install_delay_s, lambda m=m: self._install(dev, m))

    def _install(self, dev: SimDevice, m: fleet_pb2.DesiredModel) -> None:
        R = fleet_pb2.DeviceReport
        if m.version in self.fail_versions:
            self._report(dev, R.FAILED, m.model, m.version, m.rollout_id, "simulated failure")
            return
        self._report(dev, R.VERIFIED, m.model, m.version, m.rollout_id)
        self._report(dev, R.ACTIVATED, m.model, m.version, m.rollout_id)
        dev.active[m.model] = m.version
        self._report(dev, R.HEALTHY, m.model, m.version, m.rollout_id)
        self._presence(dev)

    def _start_transfer(self, dev: SimDevice, m: fleet_pb2.DesiredModel) -> None:
        manifest = json.loads(m.manifest.signed)
        if self.trusted is not None:
            sigs = parse_signatures(
                json.dumps(
                    {
                        "signatures": [
                            {"keyid": s.keyid, "sig": s.sig.hex()} for s in m.manifest.signatures
                        ]
                    }
                ).encode()
            )
            verify_manifest(m.manifest.signed, sigs, self.trusted, model=m.model)
        entry = next(f for f in manifest["files"] if f["name"] == manifest["entrypoint"])
        have = dev.active.get(m.model, 0)
        dev.transfer = {
            "model": m,
            "entry": entry,
            "buf": bytearray(),
            "id": uuid.uuid4().hex,
            "have": have,
        }
        self.request_chunks(dev, 0)

    def request_chunks(self, dev: SimDevice, offset: int) -> None:
        t = dev.transfer
        assert t is not None
        m = t["model"]
        have = t["have"] if (m.model, t["have"]) in dev.files else 0
        req = fleet_pb2.ChunkRequest(
            transfer_id=t["id"],
            device_id=dev.device_id,
            model=m.model,
            version=m.version,
            variant=m.variant,
            file=t["entry"]["name"],
            offset=offset,
            accept_delta=bool(have),
            have_version=have,
        )
        dev.client.publish(
            topics.device_topic(dev.device_id, topics.CHUNK_REQUEST), req.SerializeToString(), qos=1
        )

    def _on_chunk(self, dev: SimDevice, payload: bytes) -> None:
        chunk = fleet_pb2.ArtifactChunk()
        chunk.ParseFromString(payload)
        t = dev.transfer
        if t is None or chunk.transfer_id != t["id"]:
            return
        buf: bytearray = t["buf"]
        if chunk.offset != len(buf):
            return  # a duplicate from a superseded stream
        buf.extend(chunk.data)
        dev.chunks += 1
        if len(buf) < chunk.total_size:
            return
        m, entry = t["model"], t["entry"]
        dev.transfer = None
        R = fleet_pb2.DeviceReport
        if hashlib.sha256(buf).hexdigest() != chunk.sha256:
            self._report(dev, R.REFUSED, m.model, m.version, m.rollout_id, "payload digest")
            return
        if chunk.is_delta:
            old = dev.files[(m.model, chunk.delta_base_version)]
            d = zstandard.ZstdCompressionDict(old, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
            with zstandard.ZstdDecompressor(dict_data=d).stream_reader(bytes(buf)) as r:
                data = r.read(entry["size"] + 1)
            dev.delta_bytes += len(buf)
        else:
            with zstandard.ZstdDecompressor().stream_reader(bytes(buf)) as r:
                data = r.read(entry["size"] + 1)
            dev.full_bytes += len(buf)
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            self._report(dev, R.REFUSED, m.model, m.version, m.rollout_id, "file digest")
            return
        dev.files[(m.model, m.version)] = data
        self._install(dev, m)

    def _send_telemetry(self) -> None:
        now_ms = int(time.time() * 1000)
        cctx = zstandard.ZstdCompressor(level=1)
        for dev in self.devices.values():
            for model, version in dev.active.items():
                p = self.profiles.get(version)
                if p is None:
                    continue
                errors = round(p.requests * p.error_rate)
                s = fleet_pb2.TelemetrySummary(
                    summary_id=uuid.uuid4().hex,
                    device_id=dev.device_id,
                    model=model,
                    version=version,
                    interval_start_ms=now_ms - 500,
                    interval_end_ms=now_ms,
                    requests=p.requests,
                    errors=errors,
                    fallbacks=round(p.requests * p.fallback_rate),
                    shadow_sampled=p.shadow,
                    shadow_agreed=round(p.shadow * p.agreement),
                    latency_local_ms=_histogram(p.latency_ms, p.requests - errors),
                    runtime=dev.runtimes[0],
                )
                batch = fleet_pb2.TelemetryBatch(summaries=[s])
                self.telemetry_sent += 1
                self.telemetry_log.append((time.time(), s.summary_id))
                dev.client.publish(
                    topics.device_topic(dev.device_id, topics.TELEMETRY),
                    cctx.compress(batch.SerializeToString()),
                    qos=1,
                )
