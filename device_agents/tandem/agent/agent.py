"""The device agent: wiring of its parts onto one asyncio loop on a background thread.

One background thread runs an asyncio loop; paho's own network thread (loop_start) feeds
it events through a queue. Everything that decides (is this manifest acceptable, what does
this chunk mean, what a failed file costs, is the new version healthy) lives in pure
modules (`verify`, `transfer`, `delivery`, `health`); the IO around them is one module per
concern, each a part of `Agent`:

    session      MQTT client, callbacks, publishes, PUBACKs, presence
    reconcile    desired state -> plan -> check_offer (signature first) -> begin install
    chunks       chunk requests -> staging (persisted offsets) -> per-file digest -> VERIFIED
                 -> install into the store
    activation   warm-up against the reference -> switch active.json -> ACTIVATED -> health
                 window -> HEALTHY, or switch back -> ROLLED_BACK
    shipping     spooled telemetry -> the fleet (and the health windows)
    outbox       at-least-once reports, kept in state.json until the fleet's ReportAck
                 and sent again on the growing waits of `resend`

This module holds the lifecycle, the event loop and the timer that drive them. A refused or
interrupted delivery never touches `active.json` or the installed versions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque

import paho.mqtt.client as mqtt

from tandem.agent.activation import ActivationMixin
from tandem.agent.chunks import ChunksMixin
from tandem.agent.config import AgentConfig
from tandem.agent.core import ActiveDelivery, Watch
from tandem.agent.detect import detect_hardware, detect_runtimes
from tandem.agent.outbox import OutboxMixin
from tandem.agent.reconcile import ReconcileMixin
from tandem.agent.resend import ResendPolicy, ResendSchedule
from tandem.agent.session import SessionMixin
from tandem.agent.shipping import ShippingMixin
from tandem.agent.state import AgentState
from tandem.agent.verify import DeviceFacts, Offer
from tandem.errors import AgentError, ArtifactError
from tandem.sdk.artifacts import TrustedKeys
from tandem.sdk.store import ModelStore

log = logging.getLogger(__name__)

_TICK_S = 0.25  # seconds between timer checks (stalls, health windows)


class Agent(
    SessionMixin,
    ReconcileMixin,
    ChunksMixin,
    ActivationMixin,
    ShippingMixin,
    OutboxMixin,
):
    """`Agent(config).start()` runs the agent on a background thread; `stop()` ends it."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.facts = DeviceFacts(
            hardware=config.hardware or detect_hardware(),
            runtimes=config.runtimes if config.runtimes is not None else detect_runtimes(),
            max_payload_bytes=config.max_payload_bytes,
        )
        self.trusted = TrustedKeys.from_files(config.trusted_keys)
        # None: desired states are obeyed unsigned (reconcile warns once).
        self.fleet_keys = TrustedKeys.from_files(config.fleet_keys) if config.fleet_keys else None
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
        self._delivery: ActiveDelivery | None = None
        self._watches: dict[str, Watch] = {}
        self._seen_summaries: deque[str] = deque(maxlen=4096)
        self._failed_mids: set[int] = set()
        self._refusals_reported: dict[str, int] = {}  # offer key -> desired revision
        self._desired_refusals_reported: set[str] = set()  # "<code>[:<payload sha256>]"
        self._unsigned_warned = False
        self._resends = ResendSchedule(
            ResendPolicy(first_s=config.report_ack_timeout_s, max_s=config.report_resend_max_s)
        )
        self.error: BaseException | None = None

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

    def request_stop(self) -> None:
        """Asks the agent to stop and returns at once (a signal handler may call it): the
        agent publishes its offline presence and disconnects; `wait()` says when it is done."""
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop.set)

    def stop(self, timeout: float = 10.0) -> None:
        self.request_stop()
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
                elif kind == "report_ack":
                    self._handle_report_ack(payload)
            except asyncio.CancelledError:
                raise
            except Exception:  # one bad event must not end the agent
                log.exception("agent: handling a %s event failed", kind)

    async def _handle_connected(self) -> None:
        log.info("connected to %s:%d", self.config.broker.host, self.config.broker.port)
        self._publish_presence()
        self._resends.all_due_now()  # sends on the old connection may have died with it
        self._send_outbox()
        delivery = self._delivery
        if delivery is not None:
            # Chunks in flight died with the old connection: ask again from what is on disk.
            self._request_next(delivery, force=True)

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
            and delivery.state.idle_for(time.monotonic()) > self.config.sync_idle_s
        ):
            # The stream paused (a disconnect, a dead service): make what arrived durable so
            # a restart resumes from here.
            await asyncio.to_thread(delivery.staging.sync)
        if (
            delivery is not None
            and self._connected.is_set()
            and delivery.state.idle_for(time.monotonic()) > self.config.stall_timeout_s
        ):
            log.info("no chunk for %.1fs: asking again", self.config.stall_timeout_s)
            self._request_next(delivery, force=True)
        for model, watch in list(self._watches.items()):
            await self._check_health(model, watch)
        if self.state.outbox:
            self._send_outbox()

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
