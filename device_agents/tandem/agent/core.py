"""What the agent's parts share: its state, the records they pass around, and their seams.

`Agent` (agent.py) is wired from one part per concern, each a mixin in its own module:
`session` (MQTT), `reconcile` (desired state against the store), `chunks` (the delivery's
IO around the pure `delivery.DeliveryState`), `activation` (warm-up, switch, health window,
rollback), `shipping` (telemetry) and `outbox` (at-least-once reports). Each part is typed
against `AgentCore`, which declares the attributes the agent holds and the methods one part
calls on another, so no part imports another.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt

from tandem.agent.config import AgentConfig
from tandem.agent.delivery import DeliveryState
from tandem.agent.errors import RefusedError
from tandem.agent.health import HealthWatch
from tandem.agent.resend import ResendSchedule
from tandem.agent.state import AgentState, PendingHealth
from tandem.agent.transfer import Staging
from tandem.agent.verify import DeviceFacts, Offer
from tandem.agent.warmup import Probe
from tandem.sdk.artifacts import Manifest, TrustedKeys
from tandem.sdk.store import ModelStore


@dataclass
class ActiveDelivery:
    """One install in progress: the offer, its staging on disk and the pure decisions."""

    offer: Offer
    manifest: Manifest
    staging: Staging
    state: DeliveryState


@dataclass
class Watch:
    """A health window in progress, with its probe (loaded lazily after a restart)."""

    health: HealthWatch
    probe: Probe | None
    pending: PendingHealth
    next_probe: float = 0.0


@dataclass(frozen=True)
class Ref:
    """Names a model version in a report when no offer is at hand."""

    model: str
    version: int
    variant: str
    rollout_id: str = ""


class AgentCore:
    """The attributes every part of the agent reads, and the seams between the parts."""

    config: AgentConfig
    facts: DeviceFacts
    trusted: TrustedKeys
    fleet_keys: TrustedKeys | None
    store: ModelStore
    state: AgentState
    error: BaseException | None
    _staging_root: Path
    _loop: asyncio.AbstractEventLoop | None
    _queue: asyncio.Queue[tuple[str, bytes]] | None
    _connected: threading.Event
    _client: mqtt.Client | None
    _revision: int
    _desired: dict[str, Offer]
    _delivery: ActiveDelivery | None
    _watches: dict[str, Watch]
    _seen_summaries: deque[str]
    _failed_mids: set[int]
    _refusals_reported: dict[str, int]  # offer key -> desired revision
    _desired_refusals_reported: set[str]
    _unsigned_warned: bool
    _resends: ResendSchedule  # when each queued report is due again

    # session
    def _publish(self, leaf: str, payload: bytes, *, retain: bool = False) -> mqtt.MQTTMessageInfo:
        raise NotImplementedError

    async def _await_puback(self, info: mqtt.MQTTMessageInfo, timeout: float) -> bool:
        raise NotImplementedError

    def _presence(self, *, online: bool) -> bytes:
        raise NotImplementedError

    def _publish_presence(self) -> None:
        raise NotImplementedError

    def active_versions(self) -> dict[str, int]:
        raise NotImplementedError

    # reconcile
    async def _reconcile(self) -> None:
        raise NotImplementedError

    def _refuse(self, offer: Offer, exc: RefusedError) -> None:
        raise NotImplementedError

    # chunks
    def _request_next(self, delivery: ActiveDelivery, *, force: bool = False) -> None:
        raise NotImplementedError

    async def _continue(self, delivery: ActiveDelivery) -> None:
        raise NotImplementedError

    # activation
    async def _activate(
        self, model: str, version: int, variant: str, rollout_id: str, *, fresh: bool = False
    ) -> None:
        raise NotImplementedError

    # outbox
    def _report(
        self,
        kind: int,
        ref: Offer | Ref,
        *,
        reason: str = "",
        bytes_received: int = 0,
        bytes_total: int = 0,
    ) -> None:
        raise NotImplementedError

    def _send_outbox(self) -> None:
        raise NotImplementedError

    def _handle_report_ack(self, payload: bytes) -> None:
        raise NotImplementedError
