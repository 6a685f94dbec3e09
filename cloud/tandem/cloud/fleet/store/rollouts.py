"""Rollouts, stages, assignments and the event history."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import (
    select,
)
from sqlalchemy.orm import Session

from .. import engine as eng
from ..errors import ConflictError, NotFoundError
from ..models import (
    AssignmentRow,
    DesiredRow,
    EventRow,
    RolloutRow,
    StageRow,
    VersionRow,
)
from .artifacts import ArtifactStore
from .records import (
    Assignment,
    EventRecord,
    Rollout,
)
from .rows import (
    _assignment,
    _chunks,
    _event,
    _plan,
    _rollout,
    _state,
    _write_state,
)


class RolloutStore(ArtifactStore):
    # --- rollouts --------------------------------------------------------------------------

    def create_rollout(
        self,
        rollout_id: str,
        plan: eng.RolloutPlan,
        *,
        baseline_version: int | None,
        selector: Mapping[str, str],
        created_by: str,
        now: float,
    ) -> Rollout:
        state = eng.RolloutState.initial(now)
        with self.session() as s:
            if s.get(VersionRow, (plan.model, plan.version)) is None:
                raise NotFoundError(f"no version {plan.model} v{plan.version}")
            active = s.scalars(
                select(RolloutRow.rollout_id).where(
                    RolloutRow.model == plan.model,
                    RolloutRow.status.in_(
                        [eng.RolloutStatus.RUNNING.value, eng.RolloutStatus.PAUSED.value]
                    ),
                )
            ).first()
            if active is not None:
                raise ConflictError(
                    f"rollout {active} of {plan.model} is still active; finish or abort it first"
                )
            row = RolloutRow(
                rollout_id=rollout_id,
                model=plan.model,
                version=plan.version,
                baseline_version=baseline_version,
                selector=dict(selector),
                # Everything but model and version, which have columns of their own.
                plan={k: v for k, v in plan.to_json().items() if k not in ("model", "version")},
                created_by=created_by,
                created_at=now,
                updated_at=now,
                last_gates=[],
            )
            _write_state(row, state)
            s.add(row)
            for i, st in enumerate(plan.stages):
                s.add(
                    StageRow(
                        rollout_id=rollout_id,
                        stage_index=i,
                        percent=st.percent,
                        min_soak_s=st.min_soak_s,
                        gates=[g.to_json() for g in st.gates],
                        started_at=now if i == 0 else None,
                    )
                )
            s.add(
                EventRow(
                    at=now,
                    rollout_id=rollout_id,
                    kind=eng.EventKind.CREATED.value,
                    actor=created_by,
                    stage_index=0,
                    detail={
                        "model": plan.model,
                        "version": plan.version,
                        "baseline_version": baseline_version,
                    },
                )
            )
            s.flush()
            return _rollout(row)

    def rollout(self, rollout_id: str) -> Rollout:
        with self.session(write=False) as s:
            row = s.get(RolloutRow, rollout_id)
            if row is None:
                raise NotFoundError(f"no rollout {rollout_id!r}")
            return _rollout(row)

    def rollouts(
        self, status: Iterable[str] | None = None, model: str | None = None
    ) -> list[Rollout]:
        with self.session(write=False) as s:
            q = select(RolloutRow).order_by(RolloutRow.created_at.desc())
            if status is not None:
                q = q.where(RolloutRow.status.in_(list(status)))
            if model is not None:
                q = q.where(RolloutRow.model == model)
            return [_rollout(r) for r in s.scalars(q)]

    def stages(self, rollout_id: str) -> list[dict[str, Any]]:
        with self.session(write=False) as s:
            rows = s.scalars(
                select(StageRow)
                .where(StageRow.rollout_id == rollout_id)
                .order_by(StageRow.stage_index)
            )
            return [
                {
                    "stage_index": r.stage_index,
                    "percent": r.percent,
                    "min_soak_s": r.min_soak_s,
                    "gates": r.gates,
                    "started_at": r.started_at,
                    "settled_at": r.settled_at,
                    "ended_at": r.ended_at,
                }
                for r in rows
            ]

    def assignments(self, rollout_id: str) -> list[Assignment]:
        with self.session(write=False) as s:
            table = AssignmentRow.__table__
            q = select(table).where(table.c.rollout_id == rollout_id).order_by(table.c.device_id)
            return [_assignment(r) for r in s.execute(q)]

    def active_assignments(self, device_id: str) -> list[tuple[Rollout, Assignment]]:
        """This device's assignments in running or paused rollouts."""
        with self.session(write=False) as s:
            q = (
                select(RolloutRow, AssignmentRow)
                .join(AssignmentRow, AssignmentRow.rollout_id == RolloutRow.rollout_id)
                .where(
                    AssignmentRow.device_id == device_id,
                    RolloutRow.status.in_(
                        [eng.RolloutStatus.RUNNING.value, eng.RolloutStatus.PAUSED.value]
                    ),
                )
            )
            return [(_rollout(r), _assignment(a)) for r, a in s.execute(q).all()]

    def events(
        self,
        rollout_id: str | None = None,
        since_id: int = 0,
        limit: int = 1000,
        device_id: str | None = None,
    ) -> list[EventRecord]:
        with self.session(write=False) as s:
            q = select(EventRow).where(EventRow.id > since_id)
            if rollout_id is not None:
                q = q.where(EventRow.rollout_id == rollout_id)
            if device_id is not None:
                q = q.where(EventRow.device_id == device_id)
            return [_event(r) for r in s.scalars(q.order_by(EventRow.id).limit(limit))]

    def add_event(
        self,
        kind: str,
        actor: str,
        *,
        rollout_id: str | None = None,
        device_id: str | None = None,
        stage_index: int | None = None,
        detail: Mapping[str, Any] | None = None,
        now: float | None = None,
    ) -> None:
        with self.session() as s:
            s.add(
                EventRow(
                    at=now or self.clock(),
                    rollout_id=rollout_id,
                    device_id=device_id,
                    kind=str(kind),
                    actor=actor,
                    stage_index=stage_index,
                    detail=dict(detail or {}),
                )
            )

    def apply_decision(
        self,
        rollout_id: str,
        expected: eng.RolloutState,
        decision: eng.Decision,
        now: float,
        *,
        variants: Mapping[str, str],
        previous: Mapping[str, int | None],
        baseline_variants: Mapping[str, str],
        fail_reasons: Mapping[str, str] | None = None,
    ) -> list[str]:
        """Persists one engine decision atomically; returns the devices whose desired state
        changed (to publish). Raises ConflictError when the stored state moved meanwhile
        (another replica or a manual command), so the caller re-reads and tries again.

        `variants`: device -> variant of the new version for the devices to assign;
        `previous`: device -> version it runs now (its baseline); `baseline_variants`:
        device -> variant of its baseline version for devices moved back."""
        changed: list[str] = []
        with self.session() as s:
            row = s.get(RolloutRow, rollout_id, with_for_update=True)
            if row is None:
                raise NotFoundError(f"no rollout {rollout_id!r}")
            if _state(row) != expected:
                raise ConflictError(f"rollout {rollout_id} changed while it was being stepped")
            plan = _plan(row)
            old_index = row.stage_index
            _write_state(row, decision.state)
            row.updated_at = now
            if decision.gates:
                row.last_gates = [g.to_json() for g in decision.gates]
            s.add_all(
                AssignmentRow(
                    rollout_id=rollout_id,
                    device_id=device_id,
                    stage_index=old_index,
                    state=eng.DeviceState.ASSIGNED.value,
                    variant=variants[device_id],
                    previous_version=previous.get(device_id),
                    reason="",
                    assigned_at=now,
                    updated_at=now,
                )
                for device_id in decision.assign
            )
            self._set_desired_many(
                s,
                plan.model,
                [(d, plan.version, variants[d], rollout_id) for d in decision.assign],
                now,
            )
            changed.extend(decision.assign)
            back: dict[str, tuple[eng.DeviceState, str]] = {
                d: (eng.DeviceState.FAILED, r) for d, r in decision.fail
            }
            back.update((d, (eng.DeviceState.ROLLED_BACK, "rollback")) for d in decision.rollback)
            moved: list[AssignmentRow] = []
            for part in _chunks(list(back)):
                q = select(AssignmentRow).where(
                    AssignmentRow.rollout_id == rollout_id,
                    AssignmentRow.device_id.in_(list(part)),
                )
                for a in s.scalars(q):
                    new_state, reason = back[a.device_id]
                    a.state, a.reason, a.updated_at = new_state.value, reason, now
                    moved.append(a)
            changed.extend(
                self._move_back_many(s, moved, plan.model, rollout_id, baseline_variants, now)
            )
            for e in decision.events:
                s.add(
                    EventRow(
                        at=now,
                        rollout_id=rollout_id,
                        device_id=e.device_id,
                        kind=str(e.kind),
                        actor=e.actor,
                        stage_index=e.stage_index,
                        detail=dict(e.detail),
                    )
                )
            self._record_stage_times(s, rollout_id, old_index, decision, now)
        return changed

    def _move_back(
        self,
        s: Session,
        a: AssignmentRow,
        model: str,
        rollout_id: str,
        baseline_variants: Mapping[str, str],
        now: float,
    ) -> None:
        self._move_back_many(s, [a], model, rollout_id, baseline_variants, now)

    def _move_back_many(
        self,
        s: Session,
        assignments: Sequence[AssignmentRow],
        model: str,
        rollout_id: str,
        baseline_variants: Mapping[str, str],
        now: float,
    ) -> list[str]:
        """Points each device back at the version it ran before (its assignment's
        previous_version); returns the devices whose desired state changed."""
        owned: set[str] = set()
        ids = [a.device_id for a in assignments]
        with s.no_autoflush:
            for part in _chunks(ids):
                q = select(DesiredRow.device_id).where(
                    DesiredRow.model == model,
                    DesiredRow.rollout_id == rollout_id,
                    DesiredRow.device_id.in_(list(part)),
                )
                # A later rollout or a manual change may own a device now: leave it alone.
                owned.update(s.scalars(q))
        items: list[tuple[str, int | None, str, str]] = []
        for a in assignments:
            if a.device_id not in owned:
                continue
            version = a.previous_version
            variant = baseline_variants.get(a.device_id, "")
            if version is not None and not variant:
                version = None  # no artifact for the baseline: withdraw the model instead
            items.append((a.device_id, version, variant, ""))
        if items:
            self._set_desired_many(s, model, items, now)
        return [item[0] for item in items]

    def _record_stage_times(
        self, s: Session, rollout_id: str, old_index: int, d: eng.Decision, now: float
    ) -> None:
        kinds = {e.kind for e in d.events}
        cur = s.get(StageRow, (rollout_id, old_index))
        if cur is None:
            return
        if "stage_settled" in kinds and cur.settled_at is None:
            cur.settled_at = now
        if d.state.stage_index != old_index or d.state.status in eng.TERMINAL_STATUSES:
            cur.ended_at = cur.ended_at or now
            nxt = s.get(StageRow, (rollout_id, d.state.stage_index))
            if nxt is not None and nxt is not cur and nxt.started_at is None:
                nxt.started_at = now
