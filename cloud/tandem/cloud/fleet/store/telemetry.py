"""Merged telemetry aggregates."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, cast

from sqlalchemy import (
    Table,
    delete,
    func,
    insert,
    select,
    tuple_,
)
from sqlalchemy.dialects import postgresql, sqlite

from tandem.protos.fleet.v1 import fleet_pb2

from ..models import (
    SeenReportRow,
    SeenSummaryRow,
    TelemetryRow,
)
from ..telemetry import Aggregate, TelemetryStats, combine, summarize_summaries
from .records import (
    IngestResult,
)
from .reports import ReportStore
from .rows import (
    _aggregate,
    _aggregate_values,
    _chunks,
    _seen_ids,
)


class TelemetryStore(ReportStore):
    # --- telemetry -------------------------------------------------------------------------

    def ingest(
        self, summaries: Sequence[fleet_pb2.TelemetrySummary], now: float | None = None
    ) -> IngestResult:
        """Merges summaries into the per-device, per-version, per-window aggregates, each
        summary_id once (also across service replicas: the id insert decides)."""
        if not summaries:
            return IngestResult(0, 0)
        now = now or self.clock()
        unique: dict[str, fleet_pb2.TelemetrySummary] = {}
        for summary in summaries:
            if summary.summary_id and summary.device_id and summary.model:
                unique.setdefault(summary.summary_id, summary)
        return self.retry_on_conflict(
            lambda: self._ingest_once(list(unique.values()), len(summaries), now)
        )

    def _ingest_once(
        self, summaries: list[fleet_pb2.TelemetrySummary], offered: int, now: float
    ) -> IngestResult:
        # Core statements with executemany throughout: at thousands of summaries per second
        # the ORM's per-object bookkeeping would cost more than the database.
        seen = cast(Table, SeenSummaryRow.__table__)
        tel = cast(Table, TelemetryRow.__table__)
        with self.session() as s:
            conn = s.connection()
            known = _seen_ids(conn, seen.c.summary_id, [x.summary_id for x in summaries])
            fresh = [x for x in summaries if x.summary_id not in known]
            if fresh:
                # A replica inserting the same id meanwhile makes this fail: the caller retries
                # and the select above then sees the id.
                rows = [{"summary_id": x.summary_id, "received_at": now} for x in fresh]
                conn.execute(insert(seen), rows)
            aggs = summarize_summaries(fresh, self.telemetry_window_s)
            keys = list(aggs)
            existing: dict[tuple[str, str, int, int], Any] = {}
            key_cols = tuple_(tel.c.device_id, tel.c.model, tel.c.version, tel.c.window_start_ms)
            for part in _chunks(keys):
                q = select(tel).where(key_cols.in_(list(part)))
                if self.dialect == "postgresql":
                    # Replicas merging into the same window wait for each other, not overwrite.
                    q = q.with_for_update()
                for row in conn.execute(q):
                    existing[(row.device_id, row.model, row.version, row.window_start_ms)] = row
            inserts: list[dict[str, Any]] = []
            updates: list[dict[str, Any]] = []
            for key, agg in aggs.items():
                current = existing.get(key)
                if current is None:
                    inserts.append(_aggregate_values(agg, now))
                    continue
                merged = _aggregate(current)
                merged.merge(agg)
                updates.append(_aggregate_values(merged, now))
            if inserts:
                # A replica inserting the same window meanwhile fails this: the caller retries.
                conn.execute(insert(tel), inserts)
            if updates:
                # Rewriting the (locked) rows as one multi-row upsert instead of one UPDATE
                # per row: a round trip per batch, not per aggregate, on PostgreSQL.
                dialect_insert = (
                    postgresql.insert if self.dialect == "postgresql" else sqlite.insert
                )
                upsert = dialect_insert(tel)
                keys_ = ["device_id", "model", "version", "window_start_ms"]
                stmt = upsert.on_conflict_do_update(
                    index_elements=keys_,
                    set_={c: upsert.excluded[c] for c in updates[0] if c not in keys_},
                )
                conn.execute(stmt, updates)
            return IngestResult(len(fresh), offered - len(fresh))

    def telemetry_rows(
        self,
        model: str,
        version: int | None = None,
        *,
        since: float | None = None,
        until: float | None = None,
        device_ids: Iterable[str] | None = None,
    ) -> list[Aggregate]:
        with self.session(write=False) as s:
            q = select(TelemetryRow).where(TelemetryRow.model == model)
            if version is not None:
                q = q.where(TelemetryRow.version == version)
            if since is not None:
                # A window counts when it ends after `since`.
                q = q.where(
                    TelemetryRow.window_start_ms
                    > int(since * 1000) - int(self.telemetry_window_s * 1000)
                )
            if until is not None:
                q = q.where(TelemetryRow.window_start_ms < int(until * 1000))
            rows = [_aggregate(r) for r in s.scalars(q)]
        if device_ids is not None:
            wanted = set(device_ids)
            rows = [r for r in rows if r.device_id in wanted]
        return rows

    def telemetry_stats(
        self,
        model: str,
        version: int,
        *,
        since: float | None = None,
        until: float | None = None,
        device_ids: Iterable[str] | None = None,
    ) -> TelemetryStats:
        rows = self.telemetry_rows(model, version, since=since, until=until, device_ids=device_ids)
        if rows:
            first = min(r.window_start_ms for r in rows) / 1000
            last = max(r.window_start_ms for r in rows) / 1000 + self.telemetry_window_s
            lo = max(first, since) if since is not None else first
            hi = min(last, until) if until is not None else min(last, self.clock())
            span = max(hi - lo, 1e-9)
        else:
            span = 0.0
        return combine(model, version, rows, span)

    def telemetry_versions(self, model: str) -> list[int]:
        with self.session(write=False) as s:
            q = select(TelemetryRow.version).where(TelemetryRow.model == model).distinct()
            return sorted(int(v) for v in s.scalars(q))

    def telemetry_count(self) -> tuple[int, int]:
        """(aggregate rows, ingested summary ids)."""
        with self.session(write=False) as s:
            rows = s.scalar(select(func.count()).select_from(TelemetryRow)) or 0
            seen = s.scalar(select(func.count()).select_from(SeenSummaryRow)) or 0
            return int(rows), int(seen)

    def purge_telemetry(self, retention_s: float, now: float | None = None) -> int:
        """Deletes aggregates whose window ended before the retention horizon, and the
        summary and report ids received before it. Returns the number of aggregates deleted."""
        now = now or self.clock()
        horizon = now - retention_s
        with self.session() as s:
            res = s.execute(
                delete(TelemetryRow).where(
                    TelemetryRow.window_start_ms
                    < int(horizon * 1000) - int(self.telemetry_window_s * 1000)
                )
            )
            s.execute(delete(SeenSummaryRow).where(SeenSummaryRow.received_at < horizon))
            # Report ids go with the same horizon: an agent re-sends a report only while
            # it lacks the PUBACK, far sooner than this.
            s.execute(delete(SeenReportRow).where(SeenReportRow.received_at < horizon))
            return int(getattr(res, "rowcount", 0) or 0)
