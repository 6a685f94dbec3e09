"""Device reports and the per-device desired views."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

from sqlalchemy import (
    Table,
    insert,
    select,
)
from sqlalchemy.orm import Session

from .. import engine as eng
from ..models import (
    ArtifactRow,
    AssignmentRow,
    DesiredRow,
    DeviceRow,
    EventRow,
    RolloutRow,
    SeenReportRow,
)
from ..reports import report_effect
from .records import (
    Desired,
    Device,
    ReportIn,
    ReportOutcome,
    pick_variant,
)
from .rollouts import RolloutStore
from .rows import (
    _artifact,
    _chunks,
    _device,
    _seen_ids,
)


class ReportStore(RolloutStore):
    def apply_report(
        self,
        device_id: str,
        kind: eng.ReportKind,
        model: str,
        version: int,
        *,
        rollout_id: str = "",
        variant: str = "",
        reason: str = "",
        now: float,
    ) -> ReportOutcome:
        """One device report: the event, the device's active version, and the assignment
        transition (`engine.on_report`) in every active rollout of the model; a failure moves
        the device back to its baseline."""
        report = ReportIn(device_id, kind, model, version, rollout_id, variant, reason)
        return self.apply_reports([report], now)[0]

    def apply_reports(self, reports: Sequence[ReportIn], now: float) -> list[ReportOutcome]:
        """Many reports in one transaction (in order), each `report_id` once: a report
        applied before (also by another replica) changes nothing and records no event."""
        # Another replica applying one of these report ids (or registering one of these
        # devices) meanwhile makes a try conflict: the retry sees its write.
        return self.retry_on_conflict(lambda: self._apply_reports_once(reports, now))

    def _apply_reports_once(self, reports: Sequence[ReportIn], now: float) -> list[ReportOutcome]:
        seen = cast(Table, SeenReportRow.__table__)
        with self.session() as s:
            conn = s.connection()
            done = _seen_ids(conn, seen.c.report_id, [r.report_id for r in reports if r.report_id])
            fresh: list[str] = []
            outcomes: list[ReportOutcome] = []
            for r in reports:
                if r.report_id and r.report_id in done:
                    outcomes.append(ReportOutcome(True, desired_changed=False, duplicate=True))
                    continue
                outcome = self._apply_report_in(s, r, now)
                if outcome.known and r.report_id:
                    # Only once applied: a report from a device not registered yet is
                    # dropped, and its re-send after the registration must still count.
                    done.add(r.report_id)
                    fresh.append(r.report_id)
                outcomes.append(outcome)
            if fresh:
                conn.execute(insert(seen), [{"report_id": i, "received_at": now} for i in fresh])
            return outcomes

    def _apply_report_in(self, s: Session, r_in: ReportIn, now: float) -> ReportOutcome:
        device_id, kind, model, version = r_in.device_id, r_in.kind, r_in.model, r_in.version
        rollout_id, variant, reason = r_in.rollout_id, r_in.variant, r_in.reason
        dev = s.get(DeviceRow, device_id)
        if dev is None:
            return ReportOutcome(known=False, desired_changed=False)
        dev.last_seen = now
        if kind is not eng.ReportKind.PROGRESS:
            s.add(
                EventRow(
                    at=now,
                    rollout_id=rollout_id or None,
                    device_id=device_id,
                    kind=eng.report_event_kind(kind.value),
                    actor=f"device:{device_id}",
                    detail={
                        "model": model,
                        "version": version,
                        "variant": variant,
                        "reason": reason,
                    },
                )
            )
        if kind is eng.ReportKind.HEALTHY:
            dev.active_versions = {**(dev.active_versions or {}), model: version}
        q = (
            select(RolloutRow, AssignmentRow)
            .join(AssignmentRow, AssignmentRow.rollout_id == RolloutRow.rollout_id)
            .where(
                AssignmentRow.device_id == device_id,
                RolloutRow.model == model,
                RolloutRow.status.in_(
                    [eng.RolloutStatus.RUNNING.value, eng.RolloutStatus.PAUSED.value]
                ),
            )
        )
        changed = False
        for r, a in s.execute(q).all():
            effect = report_effect(eng.DeviceState(a.state), kind, version, r.version)
            if effect is None:
                continue
            a.state, a.updated_at = effect.state.value, now
            if reason:
                a.reason = reason
            if effect.failed:
                s.add(
                    EventRow(
                        at=now,
                        rollout_id=r.rollout_id,
                        device_id=device_id,
                        kind=eng.EventKind.DEVICE_FAILED.value,
                        actor=f"device:{device_id}",
                        stage_index=a.stage_index,
                        detail={"reason": reason or kind.value.lower()},
                    )
                )
                base = ""
                if a.previous_version is not None:
                    base = self._variant_in(s, _device(dev), model, a.previous_version) or ""
                self._move_back(s, a, model, r.rollout_id, {device_id: base}, now)
                changed = True
        return ReportOutcome(known=True, desired_changed=changed)

    def _variant_in(self, s: Session, device: Device, model: str, version: int) -> str | None:
        rows = s.scalars(
            select(ArtifactRow).where(ArtifactRow.model == model, ArtifactRow.version == version)
        )
        return pick_variant(device, [_artifact(r) for r in rows])

    def desired_views(
        self, device_ids: Sequence[str]
    ) -> dict[str, tuple[int, list[Desired], dict[str, int]]]:
        """`desired_view` for many devices in a few queries."""
        out: dict[str, tuple[int, list[Desired], dict[str, int]]] = {}
        with self.session(write=False) as s:
            for part in _chunks(list(dict.fromkeys(device_ids))):
                for row in s.scalars(select(DeviceRow).where(DeviceRow.device_id.in_(list(part)))):
                    active = {k: int(v) for k, v in (row.active_versions or {}).items()}
                    out[row.device_id] = (row.desired_revision, [], active)
                q = (
                    select(DesiredRow)
                    .where(DesiredRow.device_id.in_(list(part)))
                    .order_by(DesiredRow.device_id, DesiredRow.model)
                )
                for r in s.scalars(q):
                    if r.device_id in out:
                        out[r.device_id][1].append(
                            Desired(r.device_id, r.model, r.version, r.variant, r.rollout_id)
                        )
        return out

    def desired_view(self, device_id: str) -> tuple[int, list[Desired], dict[str, int]]:
        """(revision, desired models, active versions) of a device, in one read."""
        with self.session(write=False) as s:
            row = s.get(DeviceRow, device_id)
            rows = s.scalars(
                select(DesiredRow)
                .where(DesiredRow.device_id == device_id)
                .order_by(DesiredRow.model)
            )
            desired = [
                Desired(r.device_id, r.model, r.version, r.variant, r.rollout_id) for r in rows
            ]
            if row is None:
                return 0, desired, {}
            active = {k: int(v) for k, v in (row.active_versions or {}).items()}
            return row.desired_revision, desired, active
