"""A test-side stand-in for the fleet service: a small paho client with the service's role.

It publishes retained DesiredState (signed with `fleet_signer` as the service signs it with
its fleet key, or unsigned without one), answers ChunkRequests with ArtifactChunks from variant
folders on disk (full stored files, or zstd deltas against the version the device says it
has, the old uncompressed file as raw-content dictionary), records what devices send, and
acknowledges each report (a ReportAck on the device's `reports/ack`) as the service does once
it has stored it.
Knobs let a test interrupt a transfer (stop after N chunks) or corrupt data in flight.
"""

from __future__ import annotations

import contextlib
import hashlib
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
import zstandard
from google.protobuf.message import DecodeError
from paho.mqtt.enums import CallbackAPIVersion

from tandem.protos.fleet.v1 import desired as desired_signing
from tandem.protos.fleet.v1 import fleet_pb2, topics
from tandem.sdk.artifacts import SignatureEntry, read_manifest_unverified
from tests.agent.artifacts import BuiltVariant, Signer
from tests.support.mosquitto import Broker
from tests.support.variants import signed_manifest

Kind = fleet_pb2.DeviceReport.Kind


@dataclass
class FleetDouble:
    broker: Broker
    fleet_signer: Signer | None = None  # the fleet key; None: desired states go unsigned
    user: str = "admin"
    password: str = "admin-secret"
    chunk_size: int = 8192
    # None: answer every request in full. N: go silent after N chunks in all.
    chunk_budget: int | None = None
    corrupt: bool = False  # flip a byte of every chunk's data, keep the headers
    deltas: bool = True
    ack_reports: bool = True  # False: a fleet that never stores (acknowledges) a report
    variants: dict[tuple[str, int, str], Path] = field(default_factory=dict)
    reports: list[fleet_pb2.DeviceReport] = field(default_factory=list)
    presence: dict[str, fleet_pb2.Presence] = field(default_factory=dict)
    requests: list[fleet_pb2.ChunkRequest] = field(default_factory=list)
    telemetry: list[fleet_pb2.TelemetryBatch] = field(default_factory=list)
    sent: list[fleet_pb2.ArtifactChunk] = field(default_factory=list)
    desired: dict[str, fleet_pb2.DesiredState] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._work: queue.Queue[fleet_pb2.ChunkRequest | None] = queue.Queue()
        self._revision = 0
        self._payloads: dict[tuple[str, int, str, str, int], tuple[bytes, bool, int] | None] = {}
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id="fleet-double", protocol=mqtt.MQTTv5
        )
        self.client.username_pw_set(self.user, self.password)
        self.client.reconnect_delay_set(1, 2)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self._connected = threading.Event()
        self.client.on_disconnect = lambda *_: self._connected.clear()
        self.client.connect_async(self.broker.host, self.broker.port)
        self.client.loop_start()
        self._sender = threading.Thread(target=self._send_loop, daemon=True)
        self._sender.start()
        if not self._connected.wait(10):
            raise TimeoutError("fleet double could not connect")

    def close(self) -> None:
        self._work.put(None)
        # DISCONNECT first: it wakes paho's network thread, which then ends at once; stopped
        # first, the thread sleeps out its select timeout (up to 1 s) before it sees the flag.
        self.client.disconnect()
        self.client.loop_stop()

    # --- MQTT

    def _on_connect(
        self, client: mqtt.Client, _u: object, _f: object, rc: object, _p: object
    ) -> None:
        client.subscribe(
            [
                (topics.all_devices(topics.CHUNK_REQUEST), 1),
                (topics.all_devices(topics.REPORTS), 1),
                (topics.all_devices(topics.PRESENCE), 1),
                (topics.all_devices(topics.TELEMETRY), 1),
            ]
        )
        # A broker without persistence forgets retained messages: publish them again, as the
        # real service does after a broker restart.
        with self._lock:
            desired = list(self.desired.items())
        for device_id, state in desired:
            client.publish(
                topics.device_topic(device_id, topics.DESIRED),
                state.SerializeToString(),
                qos=1,
                retain=True,
            )
        self._connected.set()

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        parsed = topics.parse_device_topic(msg.topic)
        if parsed is None:
            return
        device_id, leaf = parsed
        with contextlib.suppress(DecodeError, zstandard.ZstdError):  # garbage is dropped
            self._record(device_id, leaf, msg.payload)

    def _record(self, device_id: str, leaf: str, payload: bytes) -> None:
        with self._lock:
            if leaf == topics.REPORTS:
                report = fleet_pb2.DeviceReport.FromString(payload)
                self.reports.append(report)
                if self.ack_reports and report.kind != Kind.PROGRESS and report.report_id:
                    ack = fleet_pb2.ReportAck(device_id=device_id, report_ids=[report.report_id])
                    self.client.publish(
                        topics.device_topic(device_id, topics.REPORT_ACKS),
                        ack.SerializeToString(),
                        qos=1,
                    )
            elif leaf == topics.PRESENCE:
                self.presence[device_id] = fleet_pb2.Presence.FromString(payload)
            elif leaf == topics.CHUNK_REQUEST:
                request = fleet_pb2.ChunkRequest.FromString(payload)
                self.requests.append(request)
                self._work.put(request)
            elif leaf == topics.TELEMETRY:
                raw = zstandard.ZstdDecompressor().decompress(payload)
                self.telemetry.append(fleet_pb2.TelemetryBatch.FromString(raw))

    # --- desired state

    def offer(self, built: BuiltVariant | Path) -> None:
        path = built.path if isinstance(built, BuiltVariant) else built
        manifest = read_manifest_unverified(path)
        self.variants[(manifest.model, manifest.version, manifest.variant)] = path

    def set_desired(
        self,
        device_id: str,
        built: BuiltVariant,
        *,
        rollout_id: str = "r1",
        delta_base_version: int = 0,
        signed: bytes | None = None,
        model: str | None = None,
        signatures: tuple[tuple[str, bytes], ...] | None = None,
    ) -> None:
        self.offer(built)
        self._revision += 1
        sigs = (
            tuple(SignatureEntry(k, s) for k, s in signatures)
            if signatures is not None
            else built.signatures
        )
        state = fleet_pb2.DesiredState(
            device_id=device_id,
            revision=self._revision,
            models=[
                fleet_pb2.DesiredModel(
                    model=model or built.manifest.model,
                    version=built.manifest.version,
                    variant=built.manifest.variant,
                    manifest=signed_manifest(signed if signed is not None else built.signed, sigs),
                    rollout_id=rollout_id,
                    delta_base_version=delta_base_version,
                )
            ],
        )
        self.sign(state)
        with self._lock:
            self.desired[device_id] = state
        self.publish_desired(state)

    def sign(self, state: fleet_pb2.DesiredState) -> fleet_pb2.DesiredState:
        """Signs `state` in place as the fleet service does (no-op without a fleet key)."""
        if self.fleet_signer is not None:
            payload = desired_signing.payload_for(state, int(time.time() * 1000))
            raw = payload.SerializeToString()
            entry = self.fleet_signer.sign(desired_signing.signing_input(raw))
            state.signed.CopyFrom(
                fleet_pb2.SignedDesiredState(
                    payload=raw, signatures=[fleet_pb2.Signature(keyid=entry.keyid, sig=entry.sig)]
                )
            )
        return state

    def publish_desired(self, state: fleet_pb2.DesiredState) -> None:
        """Publishes `state` as it is, retained (a replay, when it is an old one)."""
        self.client.publish(
            topics.device_topic(state.device_id, topics.DESIRED),
            state.SerializeToString(),
            qos=1,
            retain=True,
        ).wait_for_publish(5)

    def prepare(self, request: fleet_pb2.ChunkRequest) -> None:
        """Builds (and caches) a payload ahead of time, so a benchmark does not time it."""
        self._payload(request)

    def publish_raw(self, device_id: str, leaf: str, payload: bytes) -> None:
        self.client.publish(topics.device_topic(device_id, leaf), payload, qos=1).wait_for_publish(
            5
        )

    # --- chunks

    def _payload(self, request: fleet_pb2.ChunkRequest) -> tuple[bytes, bool, int] | None:
        key = (
            request.model,
            request.version,
            request.variant,
            request.file,
            request.have_version if request.accept_delta else 0,
        )
        cached = self._payloads.get(key)
        if cached is None:
            cached = self._build_payload(request)
            self._payloads[key] = cached
        return cached

    def _build_payload(self, request: fleet_pb2.ChunkRequest) -> tuple[bytes, bool, int] | None:
        path = self.variants.get((request.model, request.version, request.variant))
        if path is None:
            return None
        entry = read_manifest_unverified(path).file(request.file)
        full = (path / entry.stored_as).read_bytes()
        if self.deltas and request.accept_delta and request.have_version:
            base_path = self.variants.get((request.model, request.have_version, request.variant))
            if base_path is not None:
                base_entry = read_manifest_unverified(base_path).file(request.file)
                old = zstandard.ZstdDecompressor().decompress(
                    (base_path / base_entry.stored_as).read_bytes()
                )
                new = zstandard.ZstdDecompressor().decompress(full)
                dictionary = zstandard.ZstdCompressionDict(
                    old, dict_type=zstandard.DICT_TYPE_RAWCONTENT
                )
                # Level 19 like the fleet service's DELTA_LEVEL.
                delta = zstandard.ZstdCompressor(level=19, dict_data=dictionary).compress(new)
                if len(delta) < len(full):
                    return delta, True, request.have_version
        return full, False, 0

    def _send_loop(self) -> None:
        while True:
            request = self._work.get()
            if request is None:
                return
            found = self._payload(request)
            if found is None:
                continue
            data, is_delta, base = found
            digest = hashlib.sha256(data).hexdigest()
            topic = topics.device_topic(request.device_id, topics.CHUNKS)
            offset = min(request.offset, len(data))
            first = True  # like the fleet service: an offset at the end gets one empty chunk
            while offset < len(data) or first:
                first = False
                with self._lock:
                    if self.chunk_budget is not None:
                        if self.chunk_budget <= 0:
                            break
                        self.chunk_budget -= 1
                piece = data[offset : offset + self.chunk_size]
                if self.corrupt and piece:
                    piece = bytes([piece[0] ^ 0xFF]) + piece[1:]
                chunk = fleet_pb2.ArtifactChunk(
                    transfer_id=request.transfer_id,
                    model=request.model,
                    version=request.version,
                    variant=request.variant,
                    file=request.file,
                    offset=offset,
                    data=piece,
                    total_size=len(data),
                    sha256=digest,
                    is_delta=is_delta,
                    delta_base_version=base,
                )
                with self._lock:
                    self.sent.append(chunk)
                self.client.publish(topic, chunk.SerializeToString(), qos=1)
                offset += len(piece)

    # --- waiting

    def wait_report(
        self,
        device_id: str,
        kind: int,
        version: int | None = None,
        timeout: float = 30.0,
        after: int = 0,
    ) -> fleet_pb2.DeviceReport:
        """The first matching report at index `after` or later in `self.reports`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                for report in self.reports[after:]:
                    if (
                        report.device_id == device_id
                        and report.kind == kind
                        and (version is None or report.version == version)
                    ):
                        return report
            time.sleep(0.05)
        with self._lock:
            seen = [(Kind.Name(r.kind), r.version, r.reason) for r in self.reports]
        raise TimeoutError(f"no {Kind.Name(kind)} v{version} from {device_id}; saw {seen}")

    def kinds(self, device_id: str, version: int | None = None) -> list[str]:
        with self._lock:
            return [
                Kind.Name(r.kind)
                for r in self.reports
                if r.device_id == device_id and (version is None or r.version == version)
            ]

    def recorded(self, device_id: str, version: int | None = None) -> list[str]:
        """`kinds` as the fleet service records them: once per `report_id`. Reports are
        at-least-once, so the wire may carry one twice (re-sent after a restart, a
        reconnect or an ack timeout, before the ack had been taken in); the service drops
        the copy."""
        with self._lock:
            unique = {
                r.report_id: Kind.Name(r.kind)
                for r in self.reports
                if r.device_id == device_id and (version is None or r.version == version)
            }
        return list(unique.values())
