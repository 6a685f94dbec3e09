"""The agent's MQTT session: paho's callbacks feed the asyncio loop; publishes, PUBACKs
and presence. It subscribes to the device's `desired`, `chunks` and `reports/ack` topics.

paho's network thread (loop_start) only posts events into the agent's queue; everything
else runs on the agent's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.subscribeoptions import SubscribeOptions

from tandem.agent.config import AGENT_VERSION
from tandem.agent.core import AgentCore
from tandem.protos.fleet.v1 import fleet_pb2, topics

log = logging.getLogger(__name__)

Kind = fleet_pb2.DeviceReport.Kind


class SessionMixin(AgentCore):
    """MQTT plumbing (paho thread -> asyncio queue), publishing and presence."""

    async def _shutdown_client(self) -> None:
        client = self._client
        if client is None:
            return
        if self._connected.is_set():
            info = client.publish(
                self.config.topic(topics.PRESENCE), self._presence(online=False), qos=1, retain=True
            )
            await self._await_puback(info, timeout=2.0)
        client.disconnect()
        client.loop_stop()

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
                (self.config.topic(topics.REPORT_ACKS), SubscribeOptions(qos=topics.QOS)),
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
        elif message.topic == self.config.topic(topics.REPORT_ACKS):
            self._post("report_ack", bytes(message.payload))
        else:
            log.warning("message on unexpected topic %s dropped", message.topic)

    def _on_publish(self, _c: mqtt.Client, _u: Any, mid: int, reason_code: Any, _p: Any) -> None:
        if getattr(reason_code, "is_failure", False):
            log.warning("broker refused publish %d: %s", mid, reason_code)
            self._failed_mids.add(mid)

    def _publish(self, leaf: str, payload: bytes, *, retain: bool = False) -> mqtt.MQTTMessageInfo:
        assert self._client is not None
        info = self._client.publish(self.config.topic(leaf), payload, qos=topics.QOS, retain=retain)
        # paho reuses message ids: a refusal recorded for an older message with this id
        # (a report, which nobody waits on: it is sent again until the fleet's ack) is not
        # this one's.
        self._failed_mids.discard(info.mid)
        return info

    async def _await_puback(self, info: mqtt.MQTTMessageInfo, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if info.is_published():
                return info.mid not in self._failed_mids
            await asyncio.sleep(0.02)
        return False

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
