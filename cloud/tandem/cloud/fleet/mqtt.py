"""The fleet service's MQTT 5 session (paho-mqtt 2.x, QoS 1).

Subscriptions:

- ``tandem/v1/devices/+/presence``: a plain subscription, so that every replica receives the
  retained presence of every device when it connects (shared subscriptions get no retained
  messages); the upsert is idempotent, so replicas doing the same work is harmless.
- ``$share/<group>/tandem/v1/devices/+/{reports,telemetry,chunks/request}``: shared, so
  replicas split the load.

Work leaves paho's network thread at once: presence and reports go through one ordered
control queue; telemetry goes to a batching writer (`telemetry_flush_s`); chunk requests to a
small pool that streams chunks with a bounded number in flight per transfer, and a newer
request for the same transfer cancels the older stream.

Publishes: the retained DesiredState of a device, signed with the fleet key (fleet_key.py),
whenever it changes, when the device comes online and when the session (re)connects (a
broker without persistence loses retained messages on restart); the ArtifactChunks
answering a ChunkRequest; and a ReportAck on the device's `reports/ack` once its reports
are stored, which is what lets the agent drop them from its outbox (it sends the others
again: the broker's PUBACK to the device says nothing about a replica storing them).

The session expiry is short (`session_expiry_s`, 60 s): a replica that crashed keeps its
share of the shared subscriptions queued at the broker only that long. A long expiry kept
a dead replica's reports there for an hour, and a rollout waiting for them stalled until
the replica came back; once the session expires the broker gives the group's messages to
the replicas still connected, and the devices' resends of unacknowledged reports reach
them. What a short expiry costs is the telemetry that was queued for the dead replica (the
agent deletes a batch on the broker's PUBACK: telemetry is not acknowledged end to end)
and chunk requests, which a device repeats when its stream stalls.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from google.protobuf.message import DecodeError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from tandem.errors import ConfigError, FleetError
from tandem.protos.fleet.v1 import fleet_pb2, topics

from .errors import BrokerError
from .service import FleetService
from .telemetry import TelemetryDecodeError, decode_batch

log = logging.getLogger(__name__)

# Seconds telemetry from a not-yet-registered device is held before it is dropped: its
# presence may still be on its way through the control queue or another replica.
UNKNOWN_HOLD_S = 2.0
_Ack = tuple[int, int] | None  # (mid, qos) of a received message, to PUBACK when handled


@dataclass(frozen=True)
class BrokerSettings:
    url: str  # mqtt://HOST:PORT
    username: str = ""
    password: str = ""
    client_id: str = ""  # stable per replica so its session (queued QoS 1) survives restarts
    share_group: str = topics.SHARE_GROUP
    keepalive_s: int = 30  # seconds
    # Seconds the broker keeps our session (and queues our share of the shared
    # subscriptions) while we are away: long enough for a quick restart, short enough that
    # a dead replica does not hold devices' messages (module docstring).
    session_expiry_s: int = 60
    chunk_workers: int = 4  # threads streaming chunks
    chunk_window: int = 32  # chunks in flight (unacknowledged) per transfer
    leave_grace_s: float = 0.3  # seconds of silence a stopping replica waits for (x10 at most)
    host: str = field(init=False)
    port: int = field(init=False)

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("mqtt", "tcp") or not parts.hostname:
            raise ConfigError("broker", f"expected mqtt://HOST:PORT, got {self.url!r}")
        object.__setattr__(self, "host", parts.hostname)
        object.__setattr__(self, "port", parts.port or 1883)
        if not self.client_id:
            object.__setattr__(self, "client_id", f"tandem-fleet-{uuid.uuid4().hex[:8]}")
        if self.chunk_workers < 1:
            raise ConfigError("chunk_workers", "must be >= 1")
        if not 0 <= self.session_expiry_s <= 2**32 - 1:
            raise ConfigError(
                "session_expiry_s", f"must be 0..4294967295, got {self.session_expiry_s}"
            )
        if self.chunk_window < 1:
            raise ConfigError("chunk_window", "must be >= 1")


class MqttLink:
    """Connects a `FleetService` to the broker."""

    def __init__(self, service: FleetService, settings: BrokerSettings) -> None:
        self.service = service
        self.settings = settings
        self.stats: dict[str, int] = {
            "presence": 0,
            "reports": 0,
            "telemetry_messages": 0,
            "summaries_ingested": 0,
            "summaries_duplicate": 0,
            "dropped": 0,
            "chunks_sent": 0,
            "desired_published": 0,
            "report_acks": 0,
        }
        self._known: set[str] = {d.device_id for d in service.store.devices()}
        # Every queued message carries its (mid, qos): the broker gets our PUBACK only once
        # what the message says is written (manual acks). Acked on arrival, a report or a
        # telemetry batch taken just before a crash was lost: the device had deleted it.
        self._control: queue.Queue[tuple[str, str, bytes, _Ack] | None] = queue.Queue()
        self._telemetry: queue.Queue[tuple[str, bytes, _Ack] | None] = queue.Queue(
            maxsize=max(1, service.config.telemetry_queue // 10)
        )
        self._chunks = ThreadPoolExecutor(settings.chunk_workers, "fleet-chunks")
        self._streams: dict[tuple[str, str, str], int] = {}
        self._streams_lock = threading.Lock()
        self._connected = threading.Event()
        self._last_message = time.monotonic()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,  # type: ignore[attr-defined]
            client_id=settings.client_id,
            protocol=mqtt.MQTTv5,
            manual_ack=True,
        )
        if settings.username:
            self.client.username_pw_set(settings.username, settings.password)
        self.client.max_inflight_messages_set(200)
        self.client.max_queued_messages_set(0)
        self.client.reconnect_delay_set(1, 5)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        service.on_desired_changed = self.publish_desired
        # Loaded (or generated) now, so a missing or unreadable fleet key stops the service at
        # start rather than at its first publish.
        log.info("desired states are signed with fleet key %s", service.fleet_key.keyid)

    # --- lifecycle -------------------------------------------------------------------------

    def start(self, timeout: float = 15.0) -> None:
        for target, name in (
            (self._control_loop, "fleet-control"),
            (self._ingest_loop, "fleet-ingest"),
        ):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self.settings.session_expiry_s
        try:
            self.client.connect_async(
                self.settings.host,
                self.settings.port,
                self.settings.keepalive_s,
                clean_start=False,
                properties=props,
            )
        except (OSError, ValueError) as exc:
            raise BrokerError(f"cannot reach the broker at {self.settings.url}: {exc}") from exc
        self.client.loop_start()
        if not self._connected.wait(timeout):
            self.stop()
            raise BrokerError(f"no MQTT session with {self.settings.url} after {timeout}s")

    def leave(self) -> None:
        """The first half of `stop`, which a caller may start early (while its REST server
        and engine wind down): hands this replica's share of the devices' messages to the
        other replicas and takes what was already on its way. Publishing still works."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._chunks.shutdown(wait=False, cancel_futures=True)
        if self.connected:
            # Leave the shared subscriptions first, so the broker hands the group's next
            # messages to the other replicas, and take what is already on its way to us.
            unsubscribed = threading.Event()
            self.client.on_unsubscribe = lambda *_args: unsubscribed.set()
            self.client.unsubscribe(self._shared_filters())
            unsubscribed.wait(5)
            # Messages the broker had already queued for us keep coming for a moment: take
            # them until the stream goes quiet (bounded), or they would die with the session.
            deadline = time.monotonic() + 10 * self.settings.leave_grace_s
            while time.monotonic() < deadline:
                if time.monotonic() - self._last_message > self.settings.leave_grace_s:
                    break
                time.sleep(0.05)

    def stop(self) -> None:
        """Leaves the broker first (no message is taken after that), then finishes what was
        taken: queued presence, reports and telemetry are written before the threads end."""
        self.leave()
        # A clean stop ends the session at the broker: otherwise it would keep queueing this
        # replica's share of the shared subscriptions until the session expires. (After a
        # crash the session stays, and its share is delivered when the replica returns.)
        props = Properties(PacketTypes.DISCONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 0
        self.client.disconnect(properties=props)
        self.client.loop_stop()
        self._control.put(None)
        try:
            self._telemetry.put(None, timeout=30)
        except queue.Full:
            log.warning("telemetry queue full at shutdown; pending summaries are dropped")
        for t in self._threads:
            t.join(30)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    # --- paho callbacks (network thread: hand off, never block) ------------------------------

    def _on_connect(
        self, client: mqtt.Client, _userdata: Any, _flags: Any, reason_code: Any, _props: Any
    ) -> None:
        if reason_code.is_failure:
            log.error("broker refused the fleet session: %s", reason_code)
            return
        opts = SubscribeOptions(qos=topics.QOS)
        client.subscribe(
            [(topics.all_devices(topics.PRESENCE), opts)]
            + [(f, opts) for f in self._shared_filters()]
        )
        log.info("fleet MQTT session up at %s as %s", self.settings.url, self.settings.client_id)
        self._control.put(("republish", "", b"", None))
        self._connected.set()

    def _shared_filters(self) -> list[str]:
        group = self.settings.share_group
        return [
            topics.shared(topics.all_devices(leaf), group)
            for leaf in (topics.REPORTS, topics.TELEMETRY, topics.CHUNK_REQUEST)
        ]

    def _on_disconnect(
        self, _client: mqtt.Client, _userdata: Any, _flags: Any, reason_code: Any, _props: Any
    ) -> None:
        self._connected.clear()
        if not self._stopping.is_set():
            log.warning("fleet MQTT session lost (%s); reconnecting", reason_code)

    def _on_message(self, _client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self._last_message = time.monotonic()
        parsed = topics.parse_device_topic(msg.topic)
        if parsed is None:
            self._drop("message on unexpected topic %r", msg.topic)
            self._ack((msg.mid, msg.qos))
            return
        device_id, leaf = parsed
        payload = bytes(msg.payload)
        ack: _Ack = (msg.mid, msg.qos)
        if leaf == topics.PRESENCE:
            self._control.put(("presence", device_id, payload, ack))
        elif leaf == topics.REPORTS:
            self._control.put(("report", device_id, payload, ack))
        elif leaf == topics.TELEMETRY:
            try:
                self._telemetry.put((device_id, payload, ack), timeout=1.0)
            except queue.Full:
                self._drop("telemetry from %s: ingest queue full", device_id)
                self._ack(ack)
        elif leaf == topics.CHUNK_REQUEST:
            self._ack(ack)  # a device asks again when a stream stalls
            if not self._stopping.is_set():  # leaving: the chunk workers are shut down
                self._chunks.submit(self._serve_chunks, device_id, payload)
        else:
            self._drop("message on unexpected leaf %r", msg.topic)
            self._ack(ack)

    def _ack(self, ack: _Ack) -> None:
        """PUBACKs a message taken care of (any thread; a lost session makes it a no-op: the
        broker sends the message again, and handling it twice is harmless)."""
        if ack is not None and ack[1] > 0:
            self.client.ack(ack[0], ack[1])

    def _drop(self, fmt: str, *args: object) -> None:
        self.stats["dropped"] += 1
        log.warning("dropped " + fmt, *args)

    # --- workers ---------------------------------------------------------------------------

    def _control_loop(self) -> None:
        """Presence and reports, in arrival order, applied in batches: whatever queued up
        while the previous batch was written goes into one transaction."""
        while True:
            item = self._control.get()
            batch = [item]
            while item is not None and len(batch) < 500:
                try:
                    item = self._control.get_nowait()
                except queue.Empty:
                    break
                batch.append(item)
            stop = batch[-1] is None
            runs: list[tuple[str, list[tuple[str, bytes]]]] = []
            acks: list[_Ack] = []
            for entry in batch:
                if entry is None:
                    break
                kind, device_id, payload, ack = entry
                acks.append(ack)
                if runs and runs[-1][0] == kind:
                    runs[-1][1].append((device_id, payload))
                else:
                    runs.append((kind, [(device_id, payload)]))
            for kind, items in runs:
                self._handle_run(kind, items)
            for ack in acks:
                self._ack(ack)
            if stop:
                return

    def _handle_run(self, kind: str, items: list[tuple[str, bytes]]) -> None:
        try:
            if kind == "republish":
                self.publish_desired(
                    [d.device_id for d in self.service.store.devices() if d.desired_revision]
                )
            elif kind == "presence":
                self.stats["presence"] += len(items)
                online = self.service.handle_presences(items)
                for device_id, _ in items:
                    if device_id not in self._known and self.service.store.has_device(device_id):
                        self._known.add(device_id)
                if online:
                    self.publish_desired(sorted(online))
            elif kind == "report":
                self.stats["reports"] += len(items)
                # Stored (the transaction has committed): tell each device.
                self.publish_report_acks(self.service.handle_reports(items))
        except FleetError as exc:
            log.error("handling %d %s messages failed: %s", len(items), kind, exc)
        except Exception:  # one bad batch must not stop the loop
            log.exception("handling %d %s messages failed", len(items), kind)

    def _is_known(self, device_id: str) -> bool:
        """Registered here or by another replica (the store decides; positives are cached)."""
        if device_id in self._known:
            return True
        if self.service.store.has_device(device_id):
            self._known.add(device_id)
            return True
        return False

    def _ingest_loop(self) -> None:
        """Batches telemetry for `telemetry_flush_s` and writes each batch in one transaction.

        A message from a device not registered yet is held for up to `UNKNOWN_HOLD_S`: its
        presence may still be in the control queue (or with another replica). A batch the
        store refuses is retried, then dropped with an error."""
        flush_s = self.service.config.telemetry_flush_s
        batch_limit = 20_000
        held: list[tuple[float, str, bytes, _Ack]] = []
        done = False
        while not done:
            try:
                item = self._telemetry.get(timeout=flush_s if held else None)
            except queue.Empty:
                item = ("", b"", None)  # nothing new: just look at the held messages again
            if item is None:
                done = True
            pending: list[fleet_pb2.TelemetrySummary] = []
            taken: list[_Ack] = []  # acked once `pending` is written
            deadline = time.monotonic() + flush_s
            retry, held = held, []
            for since, device_id, payload, ack in retry:
                self._take(device_id, payload, ack, since, pending, held, taken, final=done)
            while item is not None:
                device_id, payload, ack = item
                if device_id:
                    self.stats["telemetry_messages"] += 1
                    self._take(
                        device_id, payload, ack, time.monotonic(), pending, held, taken, final=False
                    )
                if len(pending) >= batch_limit:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    item = self._telemetry.get(timeout=left)
                except queue.Empty:
                    break
                if item is None:
                    done = True
            if pending:
                self._ingest_with_retry(pending)
            for ack in taken:
                self._ack(ack)

    def _take(
        self,
        device_id: str,
        payload: bytes,
        ack: _Ack,
        since: float,
        pending: list[fleet_pb2.TelemetrySummary],
        held: list[tuple[float, str, bytes, _Ack]],
        taken: list[_Ack],
        final: bool,
    ) -> None:
        if not self._is_known(device_id):
            if final or time.monotonic() - since > UNKNOWN_HOLD_S:
                self._drop("telemetry from unknown device %r", device_id)
                taken.append(ack)
            else:
                held.append((since, device_id, payload, ack))
            return
        taken.append(ack)
        try:
            pending.extend(self.service.handle_telemetry(device_id, decode_batch(payload)))
        except TelemetryDecodeError as exc:
            self._drop("garbage telemetry from %s: %s", device_id, exc)

    def _ingest_with_retry(self, pending: list[fleet_pb2.TelemetrySummary]) -> None:
        for attempt in range(4):
            try:
                result = self.service.ingest(pending)
            except FleetError as exc:
                if attempt == 3:
                    log.error(
                        "telemetry ingest of %d summaries failed, dropped: %s", len(pending), exc
                    )
                    return
                log.warning("telemetry ingest failed (%s); retrying", exc)
                time.sleep(0.2 * 2**attempt)
                continue
            self.stats["summaries_ingested"] += result.ingested
            self.stats["summaries_duplicate"] += result.duplicates
            return

    def _serve_chunks(self, device_id: str, payload: bytes) -> None:
        if not self._is_known(device_id):
            self._drop("chunk request from unknown device %r", device_id)
            return
        try:
            req = fleet_pb2.ChunkRequest()
            req.ParseFromString(payload)
        except DecodeError as exc:
            self._drop("garbage chunk request from %s: %s", device_id, exc)
            return
        key = (device_id, req.transfer_id, req.file)
        with self._streams_lock:
            generation = self._streams.get(key, 0) + 1
            self._streams[key] = generation
        topic = topics.device_topic(device_id, topics.CHUNKS)
        in_flight: deque[mqtt.MQTTMessageInfo] = deque()
        try:
            for chunk in self.service.chunks_for(device_id, payload):
                if self._streams.get(key) != generation or self._stopping.is_set():
                    log.info("chunk stream %s superseded at %d", key, chunk.offset)
                    return
                while len(in_flight) >= self.settings.chunk_window:
                    in_flight.popleft().wait_for_publish(30)
                in_flight.append(
                    self.client.publish(topic, chunk.SerializeToString(), qos=topics.QOS)
                )
                self.stats["chunks_sent"] += 1
        except FleetError as exc:
            log.error("cannot serve chunks to %s: %s", device_id, exc)
        except (RuntimeError, ValueError) as exc:  # paho: not connected / queue problems
            log.warning("chunk stream to %s interrupted: %s", device_id, exc)
        finally:
            with self._streams_lock:
                if self._streams.get(key) == generation:
                    self._streams.pop(key, None)

    # --- publishing ------------------------------------------------------------------------

    def publish_desired(self, device_ids: Sequence[str]) -> None:
        """Publishes the retained, signed DesiredState of each device. A re-publish signs the
        same revision again (a new issue time, the same content), which agents accept as
        the state they already have."""
        for i in range(0, len(device_ids), 500):
            for msg in self.service.desired_states(device_ids[i : i + 500]):
                self.client.publish(
                    topics.device_topic(msg.device_id, topics.DESIRED),
                    msg.SerializeToString(),
                    qos=topics.QOS,
                    retain=True,
                )
                self.stats["desired_published"] += 1

    def publish_report_acks(self, stored: Mapping[str, Sequence[str]]) -> None:
        """One ReportAck per device, naming its reports that are stored. Not retained: an
        ack lost on the way (the device offline) only costs the device a resend, which is
        acknowledged again."""
        for device_id, report_ids in stored.items():
            if not report_ids:
                continue
            ack = fleet_pb2.ReportAck(device_id=device_id, report_ids=list(report_ids))
            try:
                self.client.publish(
                    topics.device_topic(device_id, topics.REPORT_ACKS),
                    ack.SerializeToString(),
                    qos=topics.QOS,
                )
            except (RuntimeError, ValueError) as exc:  # paho: queue problems
                log.warning("report ack to %s not sent: %s", device_id, exc)
                continue
            self.stats["report_acks"] += 1
