"""Reads for the console's overview pages: each device's newest telemetry window and cheap
fingerprints of what the pages show."""

from __future__ import annotations

from sqlalchemy import case, func, select

from ..models import DeviceRow, EventRow, RolloutRow, TelemetryRow
from ..telemetry import Aggregate
from .records import ChangeMarks
from .rows import _aggregate
from .telemetry import TelemetryStore


class OverviewStore(TelemetryStore):
    def newest_windows(self, since_ms: int) -> dict[str, tuple[Aggregate, float]]:
        """Per device, its newest telemetry window starting at `since_ms` or later (any
        model), with the time it was last updated."""
        newest: dict[str, tuple[Aggregate, float]] = {}
        with self.session(write=False) as s:
            for row in s.scalars(
                select(TelemetryRow)
                .where(TelemetryRow.window_start_ms >= since_ms)
                .order_by(TelemetryRow.window_start_ms)
            ):
                newest[row.device_id] = (_aggregate(row), row.updated_at)
        return newest

    def change_marks(self) -> ChangeMarks:
        with self.session(write=False) as s:
            last_event = s.scalar(select(func.max(EventRow.id))) or 0
            devices = s.execute(
                select(
                    func.count(),
                    func.sum(case((DeviceRow.online, 1), else_=0)),
                    func.max(DeviceRow.last_seen),
                    func.sum(DeviceRow.desired_revision),
                )
            ).one()
            rollouts = s.scalar(select(func.max(RolloutRow.updated_at))) or 0.0
            telemetry = s.scalar(select(func.max(TelemetryRow.updated_at))) or 0.0
        return ChangeMarks(
            event_id=int(last_event),
            devices=int(devices[0] or 0),
            online=int(devices[1] or 0),
            last_seen=float(devices[2] or 0.0),
            desired_revisions=int(devices[3] or 0),
            rollouts_updated=float(rollouts),
            telemetry_updated=float(telemetry),
        )
