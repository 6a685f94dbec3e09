"""Telemetry shipping: the SDK's spooled summaries go to the fleet in batches, and feed
the health windows on their way.

A batch's files are deleted only after the broker's PUBACK; shipping failures are logged
and retried, never fatal to the agent.
"""

from __future__ import annotations

import asyncio
import logging

from tandem.agent.core import AgentCore
from tandem.agent.telemetry import delete_files, read_batch
from tandem.protos.fleet.v1 import fleet_pb2, topics

log = logging.getLogger(__name__)

Kind = fleet_pb2.DeviceReport.Kind


class ShippingMixin(AgentCore):
    """Ships spooled telemetry and feeds it to the health windows."""

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
