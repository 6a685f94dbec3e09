"""The report outbox: reports other than PROGRESS are at-least-once, end to end.

Each enters the outbox in `state.json` in the same atomic write as the state change it
describes, and leaves it only when the fleet service acknowledges it: a `ReportAck` on the
device's `reports/ack` topic naming its `report_id`, which the service publishes once the
report is stored. The broker's PUBACK is not that: a fleet replica killed with reports
queued in its MQTT session never stores them. Until the ack, the timer sends the report
again (same bytes, same `report_id`, which the service applies once) on the growing,
capped waits of `resend.ResendPolicy`, at once after a reconnect and after a restart.
"""

from __future__ import annotations

import logging
import time
import uuid

from google.protobuf.message import DecodeError

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
        """Publishes the queued reports that are due: never sent on this connection, or
        not acknowledged by the fleet within their wait."""
        if self._client is None or not self._connected.is_set():
            return  # the reconnect sends them
        queued = [report.report_id for report in self.state.outbox]
        self._resends.keep_only(queued)
        due = set(self._resends.due(queued, time.monotonic()))
        for report in list(self.state.outbox):
            if report.report_id not in due:
                continue
            sends = self._resends.sends(report.report_id)
            if sends:
                log.info(
                    "report %s (%s v%d) not acknowledged by the fleet: sending it again (%d)",
                    report.report_id,
                    Kind.Name(report.kind),
                    report.version,
                    sends + 1,
                )
            # Scheduled first: the ack may come back before the publish call returns.
            self._resends.sent(report.report_id, time.monotonic())
            self._publish(topics.REPORTS, report.SerializeToString())

    def _handle_report_ack(self, payload: bytes) -> None:
        """Drops the reports the fleet says it stored from the outbox (one write)."""
        try:
            ack = fleet_pb2.ReportAck.FromString(payload)
        except DecodeError as exc:
            log.warning("unreadable report ack dropped: %s", exc)
            return
        if ack.device_id != self.config.device_id:
            log.warning("report ack for device %r dropped", ack.device_id)
            return
        acked = False
        for report_id in ack.report_ids:
            self._resends.acknowledged(report_id)
            acked = self.state.report_acknowledged(report_id) or acked
        if acked:
            self.state.save()
