"""Devices, presence and desired state."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from sqlalchemy import (
    select,
    update,
)
from sqlalchemy.orm import Session

from tandem.protos.fleet.v1 import fleet_pb2

from .. import engine as eng
from ..errors import NotFoundError
from ..models import (
    DesiredRow,
    DeviceRow,
    EventRow,
)
from .base import StoreBase
from .records import (
    Desired,
    Device,
    PresenceUpdate,
)
from .rows import (
    _chunks,
    _device,
)


class DeviceStore(StoreBase):
    # --- devices ---------------------------------------------------------------------------

    def upsert_presence(self, p: fleet_pb2.Presence, now: float | None = None) -> PresenceUpdate:
        """Records a presence message (ignored when older than what we have)."""
        return self.upsert_presences([p], now)[0]

    def upsert_presences(
        self, presences: Sequence[fleet_pb2.Presence], now: float | None = None
    ) -> list[PresenceUpdate]:
        """Many presence messages in one transaction (in order)."""
        now = now or self.clock()

        def attempt() -> list[PresenceUpdate]:
            with self.session() as s:
                return [self._upsert_presence_in(s, p, now) for p in presences]

        # Another replica registering one of these devices meanwhile conflicts: the retry
        # finds it.
        return self.retry_on_conflict(attempt)

    def _upsert_presence_in(self, s: Session, p: fleet_pb2.Presence, now: float) -> PresenceUpdate:
        row = s.get(DeviceRow, p.device_id)
        was_online = False
        if row is None:
            row = DeviceRow(device_id=p.device_id, first_seen=now, desired_revision=0)
            s.add(row)
        elif p.timestamp_ms and row.presence_ms and p.timestamp_ms < row.presence_ms:
            return PresenceUpdate(False, False)
        else:
            was_online = row.online
        row.online = p.online
        row.last_seen = now
        row.presence_ms = p.timestamp_ms
        if p.online or p.agent_version:
            # A last will carries only online=false; keep what the device said before.
            row.agent_version = p.agent_version or row.agent_version
            row.tags = dict(p.tags) if p.tags else dict(row.tags or {})
            row.hardware = p.hardware or row.hardware
            row.runtimes = list(p.runtimes) if p.runtimes else list(row.runtimes or [])
            if p.active_versions:
                row.active_versions = {k: int(v) for k, v in p.active_versions.items()}
        return PresenceUpdate(True, p.online and not was_online)

    def device(self, device_id: str) -> Device:
        with self.session(write=False) as s:
            row = s.get(DeviceRow, device_id)
            if row is None:
                raise NotFoundError(f"no device {device_id!r}")
            return _device(row)

    def has_device(self, device_id: str) -> bool:
        with self.session(write=False) as s:
            return s.get(DeviceRow, device_id) is not None

    def devices(
        self, tags: Mapping[str, str] | None = None, online: bool | None = None
    ) -> list[Device]:
        with self.session(write=False) as s:
            table = DeviceRow.__table__
            q = select(table).order_by(table.c.device_id)
            if online is not None:
                q = q.where(table.c.online == online)
            rows = [_device(r) for r in s.execute(q)]
        if tags:
            rows = [d for d in rows if all(d.tags.get(k) == v for k, v in tags.items())]
        return rows

    # --- desired state ---------------------------------------------------------------------

    def desired(self, device_id: str) -> tuple[int, list[Desired]]:
        """(revision, models) the device should run."""
        with self.session(write=False) as s:
            row = s.get(DeviceRow, device_id)
            rev = row.desired_revision if row else 0
            rows = s.scalars(
                select(DesiredRow)
                .where(DesiredRow.device_id == device_id)
                .order_by(DesiredRow.model)
            )
            return rev, [
                Desired(r.device_id, r.model, r.version, r.variant, r.rollout_id) for r in rows
            ]

    def _set_desired(
        self,
        s: Session,
        device_id: str,
        model: str,
        version: int | None,
        variant: str,
        rollout_id: str,
        now: float,
    ) -> None:
        self._set_desired_many(s, model, [(device_id, version, variant, rollout_id)], now)

    def _set_desired_many(
        self,
        s: Session,
        model: str,
        items: Sequence[tuple[str, int | None, str, str]],
        now: float,
    ) -> None:
        """Sets (device, version or None, variant, rollout_id) for one model, bumping each
        device's desired revision; a few statements whatever the number of devices."""
        ids = [item[0] for item in items]
        with s.no_autoflush:
            existing: dict[str, DesiredRow] = {}
            for part in _chunks(ids):
                q = select(DesiredRow).where(
                    DesiredRow.model == model, DesiredRow.device_id.in_(list(part))
                )
                existing.update((r.device_id, r) for r in s.scalars(q))
            for device_id, version, variant, rollout_id in items:
                row = existing.get(device_id)
                if version is None:
                    if row is not None:
                        s.delete(row)
                elif row is None:
                    s.add(
                        DesiredRow(
                            device_id=device_id,
                            model=model,
                            version=version,
                            variant=variant,
                            rollout_id=rollout_id,
                            updated_at=now,
                        )
                    )
                else:
                    row.version, row.variant, row.rollout_id, row.updated_at = (
                        version,
                        variant,
                        rollout_id,
                        now,
                    )
        for part in _chunks(ids):
            s.execute(
                update(DeviceRow)
                .where(DeviceRow.device_id.in_(list(part)))
                .values(desired_revision=DeviceRow.desired_revision + 1)
                .execution_options(synchronize_session="fetch")
            )

    def set_desired(
        self,
        device_id: str,
        model: str,
        version: int | None,
        variant: str = "",
        rollout_id: str = "",
        actor: str = "system",
    ) -> None:
        now = self.clock()
        with self.session() as s:
            if s.get(DeviceRow, device_id) is None:
                raise NotFoundError(f"no device {device_id!r}")
            self._set_desired(s, device_id, model, version, variant, rollout_id, now)
            s.add(
                EventRow(
                    at=now,
                    device_id=device_id,
                    kind=eng.EventKind.DESIRED_SET.value,
                    actor=actor,
                    detail={"model": model, "version": version, "variant": variant},
                )
            )
