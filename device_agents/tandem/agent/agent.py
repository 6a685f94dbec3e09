"""The device agent: the MQTT session and the IO around the pure verification logic.

One background thread runs an asyncio loop; paho's own network thread (loop_start) feeds
it events through a queue. Everything that decides (is this manifest acceptable, what does
this chunk mean, is the new version healthy) lives in pure modules (`verify`, `transfer`,
`health`); this module does the MQTT, the files and the timing around them.

Lifecycle of one delivery::

    desired state -> plan -> check_offer (signature first) -> chunk requests ->
    staging (persisted offsets) -> per-file digest -> VERIFIED -> install into the store ->
    warm-up against the reference -> switch active.json -> ACTIVATED -> health window ->
    HEALTHY, or switch back -> ROLLED_BACK

A refused or interrupted delivery never touches `active.json` or the installed versions.

Reports other than PROGRESS are at-least-once: each enters the outbox in `state.json` in
the same atomic write as the state change it describes, and leaves it only after the
broker's PUBACK; the timer re-sends what is unacknowledged (after a reconnect or a
restart) with its original `report_id`, which the fleet service deduplicates on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from google.protobuf.message import DecodeError
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.subscribeoptions import SubscribeOptions

from tandem.agent import errors
from tandem.agent.config import AGENT_VERSION, AgentConfig
from tandem.agent.detect import detect_hardware, detect_runtimes
from tandem.agent.errors import RefusedError, WarmupError
from tandem.agent.health import HealthWatch, Verdict
from tandem.agent.state import AgentState, PendingHealth
from tandem.agent.telemetry import delete_files, read_batch
from tandem.agent.transfer import Chunk, FileProgress, Staging, Step, decide_chunk
from tandem.agent.verify import (
    Action,
    DeviceFacts,
    LocalModelState,
    Offer,
    check_offer,
    delta_base,
    plan,
)
from tandem.agent.warmup import Probe, warm_up
from tandem.errors import AgentError, ArtifactError, DigestError
from tandem.protos.fleet.v1 import fleet_pb2, topics
from tandem.sdk.artifacts import (
    Manifest,
    SignatureEntry,
    TrustedKeys,
    read_manifest_unverified,
    signatures_to_bytes,
)
from tandem.sdk.store import ActivePointer, ModelStore

log = logging.getLogger(__name__)

Kind = fleet_pb2.DeviceReport.Kind
_TICK_S = 0.25  # seconds between timer checks (stalls, health windows)
_REREQUEST_MIN_S = 1.0  # seconds between two re-requests of the same file on a gap


@dataclass
class _Delivery:
    """One install in progress."""

    offer: Offer
    manifest: Manifest
    staging: Staging
    base_version: int  # delta base offered to the fleet (0: none)
    no_delta: set[str] = field(default_factory=set)  # files to fetch in full
    failures: int = 0
    last_activity: float = 0.0
    last_request: tuple[str, int, float] = ("", -1, 0.0)
    reported_bytes: int = 0


@dataclass
class _Watch:
    health: HealthWatch
    probe: Probe | None
    pending: PendingHealth
    next_probe: float = 0.0


class Agent:
    """`Agent(config).start()` runs the agent on a background thread; `stop()` ends it."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.facts = DeviceFacts(
            hardware=config.hardware or detect_hardware(),
            runtimes=config.runtimes if config.runtimes is not None else detect_runtimes(),
            max_payload_bytes=config.max_payload_bytes,
        )
        self.trusted = TrustedKeys.from_files(config.trusted_keys)
        self.store = ModelStore(config.store)
        self.state = AgentState(config.agent_dir)
        self._staging_root = config.agent_dir / "staging"
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[tuple[str, bytes]] | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._stopped = threading.Event()
        self._connected = threading.Event()
        self._client: mqtt.Client | None = None
        self._revision = -1
        self._desired: dict[str, Offer] = {}
        self._delivery: _Delivery | None = None
        self._watches: dict[str, _Watch] = {}
        self._seen_summaries: deque[str] = deque(maxlen=4096)
        self._failed_mids: set[int] = set()
        self._refusals_reported: dict[str, int] = {}  # offer key -> desired revision
        # report id -> (publish in flight, monotonic time it was sent)
        self._outbox_inflight: dict[str, tuple[mqtt.MQTTMessageInfo, float]] = {}
        self.error: BaseException | None = None

    # --- lifecycle ---------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> Agent:
        if self._thread is not None:
            raise AgentError("agent already started")
        self._thread = threading.Thread(
            target=self._thread_main, name=f"tandem-agent-{self.config.device_id}", daemon=True
        )
        self._thread.start()
        if not self._started.wait(timeout):
            raise AgentError("agent did not start in time")
        if self.error is not None:
            raise AgentError(f"agent failed to start: {self.error}") from self.error
        return self

    def stop(self, timeout: float = 10.0) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop.set)
        if self._thread is not None:
            self._thread.join(timeout)

    def wait(self, timeout: float | None = None) -> bool:
        """Blocks until the agent has stopped; True when it has."""
        return self._stopped.wait(timeout)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def __enter__(self) -> Agent:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def _thread_main(self) -> None:
        try:
            asyncio.run(self._main())
        except Exception as exc:  # the host app must never crash from here
            log.exception("agent stopped on an unexpected error")
            self.error = exc
        finally:
            self._started.set()
            self._stopped.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue()
        self._stop = asyncio.Event()
        self.state.load()
        self._resume_health_watches()
        self._client = self._make_client()
        self._client.connect_async(
            self.config.broker.host,
            self.config.broker.port,
            keepalive=self.config.keepalive_s,
            clean_start=True,
        )
        self._client.loop_start()
        self._started.set()
        log.info(
            "agent %s up: hardware=%s runtimes=%s broker=%s:%d",
            self.config.device_id,
            self.facts.hardware,
            ",".join(self.facts.runtimes),
            self.config.broker.host,
            self.config.broker.port,
        )
        tasks = [
            asyncio.create_task(self._event_loop(), name="events"),
            asyncio.create_task(self._ticker(), name="ticker"),
            asyncio.create_task(self._telemetry_loop(), name="telemetry"),
        ]
        try:
            await self._stop.wait()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self._delivery is not None:
                with contextlib.suppress(OSError):
                    self._delivery.staging.sync()
            await self._shutdown_client()

    async def _shutdown_client(self) -> None:
        client = self._client
        if client is None:
            return
        if self._connected.is_set():
            info = client.publish(
                self.config.topic(topics.PRESENCE), self._presence(online=False), qos=1, retain=True
            )
            await self._await_puback(info, timeout=2.0)
            # PUBACKs come in order: what was sent before the presence is acknowledged now.
            self._collect_report_acks()
        client.disconnect()
        client.loop_stop()

    # --- MQTT plumbing (paho thread -> asyncio queue) ------------------------------------

    def _make_client(self) -> mqtt.Client:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.config.device_id,
            protocol=mqtt.MQTTv5,
        )
        if self.config.username is not None:
            client.username_pw_set(self.config.username, self.config.password)
        client.will_set(
            self.config.topic(topics.PRESENCE), self._presence(online=False), qos=1, retain=True
        )
        client.reconnect_delay_set(
            min_delay=max(1, round(self.config.reconnect_min_s)),
            max_delay=max(1, round(self.config.reconnect_max_s)),
        )
        client.max_queued_messages_set(10_000)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        return client

    def _post(self, kind: str, payload: bytes = b"") -> None:
        loop, queue = self._loop, self._queue
        if loop is None or queue is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # loop closing: the event no longer matters
            loop.call_soon_threadsafe(queue.put_nowait, (kind, payload))

    def _on_connect(
        self, client: mqtt.Client, _u: Any, _flags: Any, reason_code: Any, _props: Any
    ) -> None:
        if getattr(reason_code, "is_failure", False):
            log.error("broker refused the connection: %s", reason_code)
            return
        self._connected.set()
        client.subscribe(
            [
                (self.config.topic(topics.DESIRED), SubscribeOptions(qos=topics.QOS)),
                (self.config.topic(topics.CHUNKS), SubscribeOptions(qos=topics.QOS)),
            ]
        )
        self._post("connected")

    def _on_disconnect(
        self, _c: mqtt.Client, _u: Any, _flags: Any, reason_code: Any, _props: Any
    ) -> None:
        self._connected.clear()
        log.warning("disconnected from the broker (%s); paho reconnects with backoff", reason_code)

    def _on_message(self, _c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        if message.topic == self.config.topic(topics.DESIRED):
            self._post("desired", bytes(message.payload))
        elif message.topic == self.config.topic(topics.CHUNKS):
            self._post("chunk", bytes(message.payload))
        else:
            log.warning("message on unexpected topic %s dropped", message.topic)

    def _on_publish(self, _c: mqtt.Client, _u: Any, mid: int, reason_code: Any, _p: Any) -> None:
        if getattr(reason_code, "is_failure", False):
            log.warning("broker refused publish %d: %s", mid, reason_code)
            self._failed_mids.add(mid)

    def _publish(self, leaf: str, payload: bytes, *, retain: bool = False) -> mqtt.MQTTMessageInfo:
        assert self._client is not None
        return self._client.publish(self.config.topic(leaf), payload, qos=topics.QOS, retain=retain)

    async def _await_puback(self, info: mqtt.MQTTMessageInfo, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if info.is_published():
                return info.mid not in self._failed_mids
            await asyncio.sleep(0.02)
        return False

    # --- events ----------------------------------------------------------------------------

    async def _event_loop(self) -> None:
        assert self._queue is not None
        while True:
            kind, payload = await self._queue.get()
            try:
                if kind == "connected":
                    await self._handle_connected()
                elif kind == "desired":
                    await self._handle_desired(payload)
                elif kind == "chunk":
                    await self._handle_chunk(payload)
            except asyncio.CancelledError:
                raise
            except Exception:  # one bad event must not end the agent
                log.exception("agent: handling a %s event failed", kind)

    async def _handle_connected(self) -> None:
        log.info("connected to %s:%d", self.config.broker.host, self.config.broker.port)
        self._publish_presence()
        self._send_outbox()
        delivery = self._delivery
        if delivery is not None:
            # Chunks in flight died with the old connection: ask again from what is on disk.
            self._request_next(delivery, force=True)

    async def _handle_desired(self, payload: bytes) -> None:
        desired = fleet_pb2.DesiredState()
        try:
            desired.ParseFromString(payload)
        except DecodeError as exc:
            log.warning("garbage on the desired-state topic dropped: %s", exc)
            return
        if desired.device_id and desired.device_id != self.config.device_id:
            log.warning("desired state for device %r dropped", desired.device_id)
            return
        if desired.revision < self._revision:
            log.info("stale desired state r%d < r%d ignored", desired.revision, self._revision)
            return
        offers: dict[str, Offer] = {}
        limit = self.config.max_desired_models
        if len(desired.models) > limit:
            log.warning(
                "desired state names %d models; only the first %d are considered",
                len(desired.models),
                limit,
            )
        for item in desired.models[:limit]:
            try:
                offers[item.model] = _offer_from_proto(item)
            except (ValueError, ArtifactError) as exc:
                log.warning("desired model %r malformed, dropped: %s", item.model, exc)
        # The revision is not signed: only a state carrying a manifest signed by a trusted
        # key may raise it. Otherwise one garbled or forged state with a huge revision would
        # make the agent ignore its fleet's real desired states until it restarts.
        if any(self._authentic(offer) for offer in offers.values()):
            self._revision = desired.revision
        elif desired.models:
            log.warning(
                "desired state r%d carries no trusted manifest: its revision is not adopted",
                desired.revision,
            )
        self._desired = offers
        await self._reconcile()

    def _authentic(self, offer: Offer) -> bool:
        try:
            self.trusted.verify(offer.signed, offer.signatures)
        except ArtifactError:
            return False
        return True

    # --- reconciling desired state with the store --------------------------------------

    def _local_state(self, model: str) -> LocalModelState:
        pointer = self.store.read_active(model)
        installed = frozenset(
            (version, path.name)
            for version in self.store.versions(model)
            for path in self.store.variant_dirs(model, version)
        )
        memory = self.state.model(model)
        accepted = max(memory.max_accepted_version, pointer.max_accepted_version if pointer else 0)
        return LocalModelState(
            active=(pointer.version, pointer.variant) if pointer else None,
            installed=installed,
            max_accepted_version=accepted,
            failed=frozenset(memory.failed),
        )

    async def _reconcile(self) -> None:
        delivery = self._delivery
        if delivery is not None:
            wanted = self._desired.get(delivery.offer.model)
            if wanted is None or wanted.digest != delivery.offer.digest:
                log.info(
                    "desired state moved away from %s v%d: abandoning its transfer",
                    delivery.offer.model,
                    delivery.offer.version,
                )
                delivery.staging.discard()
                self._delivery = None
            else:
                delivery.offer = wanted  # same manifest; the rollout id may be new
                return  # one delivery at a time; the rest follow when it ends
        for model in sorted(self._desired):
            offer = self._desired[model]
            try:
                local = self._local_state(model)
            except ArtifactError as exc:
                log.error("store for %s unreadable: %s", model, exc)
                continue
            decision = plan(offer, local)
            if decision.action is Action.NOTHING:
                log.debug("%s: %s", model, decision.why)
                continue
            if decision.action is Action.REACTIVATE:
                await self._activate(model, offer.version, offer.variant, offer.rollout_id)
                continue
            if offer.offer_key in self.state.refused:
                # Refused before: no new verification, but a new revision of the desired
                # state hears the answer again (the service may have missed the first one).
                if self._refusals_reported.get(offer.offer_key) != self._revision:
                    self._refusals_reported[offer.offer_key] = self._revision
                    self._report(Kind.REFUSED, offer, reason=self.state.refused[offer.offer_key])
                continue
            if await self._begin_install(offer, local):
                return

    async def _begin_install(self, offer: Offer, local: LocalModelState) -> bool:
        """Verifies the offer and starts its transfer; False when it was refused."""
        try:
            manifest = check_offer(offer, self.trusted, self.facts, local, datetime.now(UTC))
        except RefusedError as exc:
            self._refuse(offer, exc)
            return False
        self._drop_other_staging(offer.transfer_id)
        staging = Staging(
            self._staging_root,
            offer.transfer_id,
            manifest,
            sync_every_bytes=self.config.sync_every_bytes,
        )
        try:
            staging.open(offer.signed, signatures_to_bytes(offer.signatures))
        except OSError as exc:
            staging.discard()
            self._refuse(offer, _no_space(exc))
            return False
        base = delta_base(offer, local)
        delivery = _Delivery(offer, manifest, staging, base_version=base)
        delivery.last_activity = time.monotonic()
        self._delivery = delivery
        log.info(
            "installing %s v%d %s (%d bytes, delta base v%d, resuming at %d)",
            offer.model,
            offer.version,
            offer.variant,
            staging.bytes_total,
            base,
            staging.bytes_received,
        )
        self._report(
            Kind.PROGRESS,
            offer,
            bytes_received=staging.bytes_received,
            bytes_total=staging.bytes_total,
        )
        await self._continue(delivery)
        return True

    def _drop_other_staging(self, keep: str) -> None:
        """One delivery at a time: leftovers of abandoned ones only take disk space."""
        if not self._staging_root.is_dir():
            return
        for folder in self._staging_root.iterdir():
            if folder.name != keep:
                shutil.rmtree(folder, ignore_errors=True)

    def _refuse(self, offer: Offer, exc: RefusedError) -> None:
        log.warning("refused %s v%d %s: %s", offer.model, offer.version, offer.variant, exc)
        self.state.remember_refusal(offer.offer_key, str(exc))
        self._refusals_reported[offer.offer_key] = self._revision
        try:
            self._report(Kind.REFUSED, offer, reason=str(exc))
        except OSError as save_exc:  # a full disk: the report still goes out from memory
            log.warning("could not save the refusal: %s", save_exc)

    # --- transfer ------------------------------------------------------------------------

    def _request_next(self, delivery: _Delivery, *, force: bool = False) -> None:
        progress = delivery.staging.next_needed()
        if progress is None or not self._connected.is_set():
            return
        now = time.monotonic()
        name, offset, when = delivery.last_request
        if (
            not force
            and name == progress.name
            and offset == progress.offset
            and (now - when < _REREQUEST_MIN_S)
        ):
            return
        delivery.last_request = (progress.name, progress.offset, now)
        delivery.last_activity = now
        base = 0 if progress.name in delivery.no_delta else delivery.base_version
        offer = delivery.offer
        request = fleet_pb2.ChunkRequest(
            transfer_id=offer.transfer_id,
            device_id=self.config.device_id,
            model=offer.model,
            version=offer.version,
            variant=offer.variant,
            file=progress.name,
            offset=progress.offset,
            accept_delta=base > 0,
            have_version=base,
        )
        log.debug("requesting %s from %d (delta base v%d)", progress.name, progress.offset, base)
        self._publish(topics.CHUNK_REQUEST, request.SerializeToString())

    def _delta_bases(self, delivery: _Delivery, name: str) -> frozenset[int]:
        if name in delivery.no_delta or not delivery.base_version:
            return frozenset()
        return frozenset({delivery.base_version})

    async def _handle_chunk(self, payload: bytes) -> None:
        message = fleet_pb2.ArtifactChunk()
        try:
            message.ParseFromString(payload)
        except DecodeError as exc:
            log.warning("garbage on the chunk topic dropped: %s", exc)
            return
        delivery = self._delivery
        if delivery is None or message.transfer_id != delivery.offer.transfer_id:
            log.debug("chunk for transfer %r not in progress, ignored", message.transfer_id)
            return
        chunk = Chunk(
            transfer_id=message.transfer_id,
            file=message.file,
            offset=message.offset,
            data=bytes(message.data),
            total_size=message.total_size,
            sha256=message.sha256,
            is_delta=message.is_delta,
            delta_base_version=message.delta_base_version,
        )
        try:
            entry = delivery.manifest.file(chunk.file)
        except ArtifactError:
            log.warning("chunk for unknown file %r dropped", chunk.file)
            return
        staging = delivery.staging
        delivery.last_activity = time.monotonic()
        decision = decide_chunk(
            staging.progress[entry.name],
            chunk,
            entry,
            max_payload_bytes=self.config.max_payload_bytes,
            delta_bases=self._delta_bases(delivery, entry.name),
        )
        if decision.step is Step.RESTART:
            log.info("%s: %s; starting the file over", entry.name, decision.why)
            staging.restart_file(entry.name, FileProgress(entry.name))
            decision = decide_chunk(
                staging.progress[entry.name],
                chunk,
                entry,
                max_payload_bytes=self.config.max_payload_bytes,
                delta_bases=self._delta_bases(delivery, entry.name),
            )
        if decision.step is Step.DUPLICATE:
            return
        if decision.step is Step.GAP:
            self._request_next(delivery)
            return
        if decision.step is Step.REJECT:
            log.warning("%s: chunk rejected: %s", entry.name, decision.why)
            if chunk.is_delta:
                delivery.no_delta.add(entry.name)
                self._request_next(delivery, force=True)
            else:
                await self._file_failed(delivery, entry.name, decision.why)
            return
        try:
            progress = await asyncio.to_thread(staging.append, entry.name, chunk)
        except OSError as exc:
            await self._storage_failed(delivery, exc)
            return
        received = staging.bytes_received
        if received - delivery.reported_bytes >= self.config.progress_every_bytes:
            delivery.reported_bytes = received
            self._report(
                Kind.PROGRESS,
                delivery.offer,
                bytes_received=received,
                bytes_total=staging.bytes_total,
            )
        if progress.offset < progress.total_size:
            return
        base_dir = (
            self.store.model_dir(delivery.offer.model)
            / str(progress.delta_base_version)
            / delivery.offer.variant
            if progress.is_delta
            else None
        )
        try:
            await asyncio.to_thread(staging.finish_file, entry, base_dir)
        except OSError as exc:
            await self._storage_failed(delivery, exc)
            return
        except DigestError as exc:
            if progress.is_delta:
                log.warning("%s: delta failed (%s); fetching the full file", entry.name, exc)
                delivery.no_delta.add(entry.name)
                self._request_next(delivery, force=True)
            else:
                await self._file_failed(delivery, entry.name, str(exc))
            return
        await self._continue(delivery)

    async def _file_failed(self, delivery: _Delivery, name: str, why: str) -> None:
        delivery.failures += 1
        if delivery.failures >= self.config.delivery_attempts:
            delivery.staging.discard()
            self._delivery = None
            self._refuse(
                delivery.offer,
                RefusedError(
                    errors.DIGEST_MISMATCH, f"{name}: {why} ({delivery.failures} attempts)"
                ),
            )
            await self._reconcile()
            return
        delivery.staging.restart_file(name, FileProgress(name))
        self._request_next(delivery, force=True)

    async def _storage_failed(self, delivery: _Delivery, exc: OSError) -> None:
        """The device cannot hold the delivery (disk full, file size limit, read-only store):
        refuse it and keep the active model; retrying the same bytes would fail the same way."""
        delivery.staging.discard()
        self._delivery = None
        self._refuse(delivery.offer, _no_space(exc))
        await self._reconcile()

    async def _continue(self, delivery: _Delivery) -> None:
        """Requests the next file, or finishes the delivery when every file is staged."""
        if delivery.staging.next_needed() is not None:
            self._request_next(delivery, force=True)
            return
        offer = delivery.offer
        try:
            await asyncio.to_thread(delivery.staging.verify_complete)
        except OSError as exc:
            await self._storage_failed(delivery, exc)
            return
        except DigestError as exc:
            delivery.staging.discard()
            self._delivery = None
            self._refuse(offer, RefusedError(errors.DIGEST_MISMATCH, str(exc)))
            return
        memory = self.state.model(offer.model)
        memory.max_accepted_version = max(memory.max_accepted_version, offer.version)
        total = delivery.staging.bytes_total
        self._report(Kind.VERIFIED, offer, bytes_received=total, bytes_total=total)
        dest = self.store.model_dir(offer.model) / str(offer.version) / offer.variant
        try:
            await asyncio.to_thread(delivery.staging.install_into, dest)
        except OSError as exc:
            shutil.rmtree(dest, ignore_errors=True)
            await self._storage_failed(delivery, exc)
            return
        self._delivery = None
        await self._activate(
            offer.model, offer.version, offer.variant, offer.rollout_id, fresh=True
        )
        await self._reconcile()

    # --- activation, health, rollback -----------------------------------------------------

    async def _activate(
        self, model: str, version: int, variant: str, rollout_id: str, *, fresh: bool = False
    ) -> None:
        """Warms up an installed variant and switches to it (`fresh`: just installed)."""
        variant_dir = self.store.model_dir(model) / str(version) / variant
        offer_like = _Ref(model, version, variant, rollout_id)
        try:
            manifest = read_manifest_unverified(variant_dir)
            probe = await asyncio.to_thread(
                warm_up, variant_dir, manifest, self.config.warmup_rtol, self.config.warmup_atol
            )
        except (WarmupError, ArtifactError) as exc:
            log.error("%s v%d %s failed warm-up: %s", model, version, variant, exc)
            memory = self.state.model(model)
            memory.failed.add((version, variant))
            self._report(Kind.FAILED, offer_like, reason=f"warmup: {exc}")
            if fresh:
                # Never used, never will be: do not keep it on the device's disk.
                shutil.rmtree(variant_dir, ignore_errors=True)
            return
        old_watch = self._watches.pop(model, None)
        if old_watch is not None:
            log.info(
                "%s: health watch of v%d ended by a new activation", model, old_watch.health.version
            )
        current = self.store.read_active(model)
        previous = (current.version, current.variant) if current else None
        if previous == (version, variant):
            previous = (
                (current.previous_version, current.previous_variant)
                if (current and current.previous_version is not None)
                else None
            )
        memory = self.state.model(model)
        accepted = max(memory.max_accepted_version, current.max_accepted_version if current else 0)
        # The health window is recorded BEFORE the pointer switch. The other order leaves,
        # for a kill between the two writes, a pointer on the new version with no window on
        # disk: the restarted agent then finds it active, plans nothing, and never reports
        # HEALTHY. In this order a kill between them leaves a window for a version that is
        # not active, which `_resume_health_watches` drops, and the desired state switches
        # to it again (REACTIVATE).
        started = time.time()
        pending = PendingHealth(version, variant, previous, started, rollout_id)
        memory.health = pending
        self.state.save()
        self.store.write_active(
            model,
            ActivePointer(
                version=version,
                variant=variant,
                previous_version=previous[0] if previous else None,
                previous_variant=previous[1] if previous else None,
                max_accepted_version=max(accepted, version),
            ),
        )
        log.info("%s: v%d %s active (previous %s)", model, version, variant, previous)
        self._report(Kind.ACTIVATED, offer_like)
        self._publish_presence()
        self._watch(model, pending, probe)

    def _watch(self, model: str, pending: PendingHealth, probe: Probe | None) -> None:
        self._watches[model] = _Watch(
            health=HealthWatch(
                model=model,
                version=pending.version,
                variant=pending.variant,
                started=pending.started,
                window_s=self.config.health_window_s,
                max_error_rate=self.config.max_error_rate,
                min_requests=self.config.min_health_requests,
            ),
            probe=probe,
            pending=pending,
            next_probe=time.monotonic() + self.config.health_probe_interval_s,
        )

    def _resume_health_watches(self) -> None:
        """A restart inside a health window continues the window (probe reloaded lazily)."""
        for model, memory in self.state.models.items():
            pending = memory.health
            if pending is None:
                continue
            try:
                pointer = self.store.read_active(model)
            except ArtifactError:
                pointer = None
            if pointer is None or (pointer.version, pointer.variant) != (
                pending.version,
                pending.variant,
            ):
                memory.health = None
                if (pending.version, pending.variant) in memory.failed:
                    # Killed after a rollback moved the pointer back, before its report was
                    # queued: queue it now (saved with the window's end).
                    ref = _Ref(model, pending.version, pending.variant, pending.rollout_id)
                    self._report(
                        Kind.ROLLED_BACK,
                        ref,
                        reason="failed its health window; rolled back before a restart",
                    )
                continue
            self._watch(model, pending, None)
            if (pending.version, pending.variant) in memory.failed:
                # Killed between marking it failed and switching back: finish the rollback.
                self._watches[model].health.failure = "failed its health window before a restart"

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(_TICK_S)
            try:
                await self._tick()
            except asyncio.CancelledError:
                raise
            except Exception:  # one failed tick (a full disk, say) must not end the timers
                log.exception("agent: timer tick failed")

    async def _tick(self) -> None:
        delivery = self._delivery
        if (
            delivery is not None
            and delivery.staging.unsynced
            and time.monotonic() - delivery.last_activity > self.config.sync_idle_s
        ):
            # The stream paused (a disconnect, a dead service): make what arrived durable so
            # a restart resumes from here.
            await asyncio.to_thread(delivery.staging.sync)
        if (
            delivery is not None
            and self._connected.is_set()
            and time.monotonic() - delivery.last_activity > self.config.stall_timeout_s
        ):
            log.info("no chunk for %.1fs: asking again", self.config.stall_timeout_s)
            self._request_next(delivery, force=True)
        for model, watch in list(self._watches.items()):
            await self._check_health(model, watch)
        if self._outbox_inflight or self.state.outbox:
            self._collect_report_acks()
            self._send_outbox()

    async def _check_health(self, model: str, watch: _Watch) -> None:
        now = time.monotonic()
        if watch.health.verdict(time.time()) is Verdict.PENDING and now >= watch.next_probe:
            watch.next_probe = now + self.config.health_probe_interval_s
            problem = await asyncio.to_thread(self._run_probe, model, watch)
            watch.health.observe_probe(problem)
        if self._watches.get(model) is not watch:
            return  # replaced while probing
        verdict = watch.health.verdict(time.time())
        if verdict is Verdict.PENDING:
            return
        del self._watches[model]
        pending = watch.pending
        memory = self.state.model(model)
        ref = _Ref(model, pending.version, pending.variant, pending.rollout_id)
        if verdict is Verdict.HEALTHY:
            memory.health = None
            log.info("%s v%d %s healthy", model, pending.version, pending.variant)
            self._report(Kind.HEALTHY, ref)  # one write: the window ends, the report is queued
            await asyncio.to_thread(self._prune, model)
            return
        reason = watch.health.failure or "unhealthy"
        # The window stays on disk until the pointer is back: a kill between the two writes
        # then restarts into a window for a version already marked failed, which rolls back
        # at once (`_resume_health_watches`). Clearing it first would leave the failed
        # version active with nothing left to take it away.
        memory.failed.add((pending.version, pending.variant))
        self.state.save()
        where = self._roll_back(model, pending, reason)
        memory.health = None
        # The window ends and the report is queued in one write; a kill before it restarts
        # into the window with the pointer already back, which queues the report then.
        self._report(Kind.ROLLED_BACK, ref, reason=f"{reason}; {where}")
        self._publish_presence()

    def _prune(self, model: str) -> None:
        """Keeps the active version and the one a rollback would return to; deletes the rest.

        Runs only after a health window passed, so the SDK never loses what it uses, and a
        rollout abort still finds its baseline (the previous version) on the device.
        """
        pointer = self.store.read_active(model)
        if pointer is None:
            return
        keep = {(pointer.version, pointer.variant)}
        if pointer.previous_version is not None:
            keep.add((pointer.previous_version, pointer.previous_variant))
        for version in self.store.versions(model):
            version_dir = self.store.model_dir(model) / str(version)
            for variant_dir in self.store.variant_dirs(model, version):
                # An unpinned pointer (variant None) keeps every variant of its version.
                if (version, variant_dir.name) not in keep and (version, None) not in keep:
                    log.info(
                        "%s: removing v%d %s (neither active nor previous)",
                        model,
                        version,
                        variant_dir.name,
                    )
                    shutil.rmtree(variant_dir, ignore_errors=True)
            if version_dir.is_dir() and not any(version_dir.iterdir()):
                version_dir.rmdir()

    def _run_probe(self, model: str, watch: _Watch) -> str | None:
        try:
            if watch.probe is None:
                folder = self.store.model_dir(model) / str(watch.pending.version)
                folder = folder / watch.pending.variant
                manifest = read_manifest_unverified(folder)
                watch.probe = Probe(
                    folder, manifest, self.config.warmup_rtol, self.config.warmup_atol
                )
            watch.probe.check()
        except (WarmupError, ArtifactError) as exc:
            return str(exc)
        return None

    def _roll_back(self, model: str, pending: PendingHealth, reason: str) -> str:
        """Moves the pointer off a failed version; returns where the device is now."""
        current = self.store.read_active(model)
        accepted = current.max_accepted_version if current else 0
        previous = pending.previous
        previous_dir = (
            self.store.model_dir(model) / str(previous[0]) / str(previous[1])
            if previous and previous[1]
            else None
        )
        if previous is not None and (previous_dir is None or previous_dir.is_dir()):
            self.store.write_active(
                model,
                ActivePointer(
                    version=previous[0],
                    variant=previous[1],
                    max_accepted_version=max(accepted, pending.version),
                ),
            )
            where = f"back on v{previous[0]} {previous[1] or ''}".rstrip()
        else:
            # Nothing to go back to: take the failing version away so the SDK asks the cloud.
            (self.store.model_dir(model) / "active.json").unlink(missing_ok=True)
            shutil.rmtree(
                self.store.model_dir(model) / str(pending.version) / pending.variant,
                ignore_errors=True,
            )
            where = "no previous version: local model removed"
        log.error(
            "%s v%d %s unhealthy (%s): %s", model, pending.version, pending.variant, reason, where
        )
        return where

    # --- telemetry -----------------------------------------------------------------------

    async def _telemetry_loop(self) -> None:
        while True:
            interval = self.config.telemetry_interval_s
            if self._watches:
                interval = min(interval, 1.0)  # health windows need fresh error counts
            await asyncio.sleep(interval)
            try:
                await self._ship_telemetry()
            except asyncio.CancelledError:
                raise
            except Exception:  # shipping must never end the agent
                log.exception("telemetry shipping failed; will retry")

    async def _ship_telemetry(self) -> None:
        while True:
            batch = await asyncio.to_thread(
                read_batch,
                self.config.spool_dir,
                self.config.device_id,
                self.config.telemetry_batch_max,
            )
            if not batch.files:
                return
            for summary in batch.summaries:
                if summary.summary_id in self._seen_summaries:
                    continue
                self._seen_summaries.append(summary.summary_id)
                watch = self._watches.get(summary.model)
                if watch is not None:
                    watch.health.observe_summary(
                        summary.model, summary.version, summary.requests, summary.errors
                    )
            if batch.summaries:
                if not self._connected.is_set():
                    return
                info = self._publish(topics.TELEMETRY, batch.payload())
                if not await self._await_puback(info, self.config.publish_timeout_s):
                    log.warning(
                        "telemetry batch not acknowledged; keeping %d files", len(batch.files)
                    )
                    return
            await asyncio.to_thread(delete_files, batch.files)
            if len(batch.summaries) < self.config.telemetry_batch_max:
                return

    # --- reports and presence --------------------------------------------------------------

    def _report(
        self,
        kind: int,
        ref: Offer | _Ref,
        *,
        reason: str = "",
        bytes_received: int = 0,
        bytes_total: int = 0,
    ) -> None:
        report = fleet_pb2.DeviceReport(
            report_id=uuid.uuid4().hex,
            device_id=self.config.device_id,
            kind=kind,  # type: ignore[arg-type]
            model=ref.model,
            version=ref.version,
            variant=ref.variant,
            rollout_id=ref.rollout_id,
            reason=reason[:1000],
            bytes_received=bytes_received,
            bytes_total=bytes_total,
            timestamp_ms=int(time.time() * 1000),
        )
        if kind == Kind.PROGRESS:
            # Informative only (the next one or VERIFIED supersedes it): not worth a write.
            self._publish(topics.REPORTS, report.SerializeToString())
            return
        self.state.queue_report(report)
        try:
            # Also makes durable whatever state change the caller made just before: the
            # change and its report land in one atomic write.
            self.state.save()
        finally:
            self._send_outbox()

    def _send_outbox(self) -> None:
        """Publishes the queued reports not in flight (or in flight for too long)."""
        if self._client is None or not self._connected.is_set():
            return  # paho would queue them; the reconnect sends them instead
        now = time.monotonic()
        for report in list(self.state.outbox):
            inflight = self._outbox_inflight.get(report.report_id)
            if inflight is not None and now - inflight[1] < self.config.publish_timeout_s:
                continue
            info = self._publish(topics.REPORTS, report.SerializeToString())
            self._outbox_inflight[report.report_id] = (info, now)

    def _collect_report_acks(self) -> None:
        """Drops the acknowledged reports from the outbox (one write for all of them)."""
        acked = False
        for report_id, (info, _) in list(self._outbox_inflight.items()):
            try:
                if not info.is_published():
                    continue
            except (ValueError, RuntimeError):  # paho never queued it: send it again
                del self._outbox_inflight[report_id]
                continue
            del self._outbox_inflight[report_id]
            if info.mid in self._failed_mids:
                self._failed_mids.discard(info.mid)
                continue  # refused by the broker: stays queued and is sent again
            acked = self.state.report_acknowledged(report_id) or acked
        if acked:
            self.state.save()

    def active_versions(self) -> dict[str, int]:
        found: dict[str, int] = {}
        root = self.store.root
        if not root.is_dir():
            return found
        for folder in sorted(root.iterdir()):
            if folder.name.startswith(".") or not folder.is_dir():
                continue
            try:
                pointer = self.store.read_active(folder.name)
            except ArtifactError:
                continue
            if pointer is not None:
                found[folder.name] = pointer.version
        return found

    def _presence(self, *, online: bool) -> bytes:
        presence = fleet_pb2.Presence(
            device_id=self.config.device_id,
            online=online,
            agent_version=AGENT_VERSION,
            tags=dict(self.config.tags),
            hardware=self.facts.hardware,
            runtimes=list(self.facts.runtimes),
            active_versions=self.active_versions() if online else {},
            timestamp_ms=int(time.time() * 1000),
        )
        return bytes(presence.SerializeToString())

    def _publish_presence(self) -> None:
        self._publish(topics.PRESENCE, self._presence(online=True), retain=True)


@dataclass(frozen=True)
class _Ref:
    """Names a model version in a report when no offer is at hand."""

    model: str
    version: int
    variant: str
    rollout_id: str = ""


def _offer_from_proto(item: fleet_pb2.DesiredModel) -> Offer:
    if not item.model or item.version < 1 or not item.variant:
        raise ValueError("model, version and variant are required")
    # Names from outside become folder names: refuse anything but a plain name.
    for name in (item.model, item.variant):
        if name != Path(name).name or name in (".", "..") or name.startswith("."):
            raise ValueError(f"{name!r} is not a plain name")
    return Offer(
        model=item.model,
        version=item.version,
        variant=item.variant,
        signed=bytes(item.manifest.signed),
        signatures=tuple(SignatureEntry(s.keyid, bytes(s.sig)) for s in item.manifest.signatures),
        rollout_id=item.rollout_id,
        delta_base_version=item.delta_base_version,
    )


def _no_space(exc: OSError) -> RefusedError:
    return RefusedError(errors.NO_SPACE, f"the store cannot hold the delivery: {exc}")
