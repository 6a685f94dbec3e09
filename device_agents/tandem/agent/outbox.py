"""The report outbox: reports other than PROGRESS are at-least-once.

Each enters the outbox in `state.json` in the same atomic write as the state change it
describes, and leaves it only after the broker's PUBACK; the timer re-sends what is
unacknowledged (after a reconnect or a restart) with its original `report_id`, which the
fleet service deduplicates on.
"""

from __future__ import annotations

import logging
import time
import uuid

from tandem.agent.core import AgentCore, Ref
from tandem.agent.verify import Offer
from tandem.protos.fleet.v1 import fleet_pb2, topics

log = logging.getLogger(__name__)

Kind = fleet_pb2.DeviceReport.Kind


class OutboxMixin(AgentCore):
    """Queues, sends and acknowledges the agent's reports."""

    def _report(
        self,
        kind: int,
        ref: Offer | Ref,
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
