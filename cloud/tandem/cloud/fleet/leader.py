"""Which replica runs the rollout engine: leader election through the fleet's database.

Several fleet-service replicas may share one PostgreSQL database; exactly one of them turns
the rollout engine at a time. The leader holds a session-level advisory lock
(`pg_try_advisory_lock(ENGINE_LOCK_KEY)`) on a connection of its own, outside the store's
pool. PostgreSQL releases a session lock when its session ends, so a leader that dies
(SIGKILL, a crashed host, a dropped connection) hands over by itself: a follower tries the
lock on every engine turn and gets it at its next try.

Safety, stated once:
- Exclusivity: while the holder's session lives, PostgreSQL grants the lock to no other
  session. `check()` is called before every engine turn; the leader first verifies that its
  own session still holds the lock (a query on that connection), and on any error or a
  missing lock it steps down at once, before the turn, and only then reconnects and tries
  again. A replica never turns the engine on a cached belief that it leads.
- A leader that is alive but stuck (frozen, or cut off by a network partition) would keep
  its session, and with it the lock, until the server notices. The lock session therefore
  sets `idle_session_timeout` to the lease (PostgreSQL 14 and later): a holder that has not
  queried for `lease_s` loses its session, and the lock, on the server's own clock. The
  client side bounds its wait on a dead peer with TCP keepalives and `tcp_user_timeout`, so
  the partitioned replica's next check fails and it steps down.
- A turn decided just before the lock was lost can still reach the database after another
  replica took over. Every engine step is applied with a compare-and-swap on the rollout's
  stored state (`Store.apply_decision` raises ConflictError when it moved), so such a late
  step is refused instead of applied twice: the lock decides who turns the engine, the
  compare-and-swap keeps a stale turn from counting.

SQLite is the single-replica mode: one process owns the file, and it always leads.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

log = logging.getLogger(__name__)

# The advisory-lock key of the rollout engine ("tandem" and 1). Advisory locks are scoped to
# one database, so replicas sharing a database contend for the same lock.
ENGINE_LOCK_KEY = 0x74616E64656D01
APPLICATION_PREFIX = "tandem-engine "  # pg_stat_activity.application_name of a lock session
# libpq connection parameters that psycopg and psycopg2 accept.
_LIBPQ_DRIVERS = frozenset({"psycopg", "psycopg2"})

_HELD = text(
    "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted"
    " AND pid = pg_backend_pid() AND objsubid = 1"
    " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    " AND ((classid::bigint << 32) | objid::bigint) = :key)"
)
_HOLDER = text(
    "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
    " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1"
    " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    " AND ((l.classid::bigint << 32) | l.objid::bigint) = :key LIMIT 1"
)


def default_replica_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class LeaderElector:
    """Decides, before each engine turn, whether this replica may turn the engine.

    `check()` is the only call that touches the database and is meant for the engine thread;
    `is_leader` and `status()` read what the last check found and are safe from any thread.
    `on_change(is_leader)` is called when this replica gains or loses the lead."""

    def __init__(
        self,
        url: str | URL,
        *,
        replica_id: str = "",
        lease_s: float = 10.0,  # seconds a silent holder keeps the lock (idle_session_timeout)
        key: int = ENGINE_LOCK_KEY,
        on_change: Callable[[bool], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.url = make_url(url)
        self.replica_id = replica_id or default_replica_id()
        self.lease_s = lease_s
        self.key = key
        self.on_change = on_change
        self.clock = clock
        self.single = self.url.get_backend_name() != "postgresql"
        self._lock = threading.Lock()
        self._engine: Engine | None = None
        self._conn: Connection | None = None
        self._leader = self.single
        self._since: float | None = clock() if self.single else None
        self._holder: str | None = self.replica_id if self.single else None
        self._contending = False
        self._takeovers = 0
        self._last_error = ""

    @property
    def is_leader(self) -> bool:
        return self._leader

    def check(self) -> bool:
        """True when this replica holds the lead now: the leader verifies its lock session,
        a follower tries to take the lock. Never raises; database errors mean "not leader"."""
        with self._lock:
            self._contending = True
            if self.single:
                return True
            if self._leader:
                if self._verify():
                    return True
                self._set_leader(False)
            return self._try_acquire()

    def step_down(self) -> None:
        """Releases the lead (a clean stop), so a follower takes over at its next try."""
        with self._lock:
            self._contending = False
            if self.single:
                return
            if self._leader and self._conn is not None:
                try:
                    self._conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": self.key})
                except SQLAlchemyError as exc:
                    log.debug("releasing the engine lock failed (the session ends anyway): %s", exc)
            if self._leader:
                self._set_leader(False)
            self._drop_connection()

    def close(self) -> None:
        self.step_down()
        with self._lock:
            if self._engine is not None:
                self._engine.dispose()
                self._engine = None

    def status(self) -> dict[str, Any]:
        """What a replica reports about the lead (GET /api/v1/leader)."""
        return {
            "replica_id": self.replica_id,
            "is_leader": self._leader,
            "mode": "single-replica" if self.single else "postgresql-advisory-lock",
            "contending": self._contending,
            "leader": self.replica_id if self._leader else self._holder,
            "leader_since": self._since if self._leader else None,
            "takeovers": self._takeovers,
        }

    # --- inside check(), under self._lock ------------------------------------------------

    def _verify(self) -> bool:
        if self._conn is None:
            return False
        try:
            held = bool(self._conn.execute(_HELD, {"key": self.key}).scalar_one())
        except SQLAlchemyError as exc:
            log.warning("replica %s lost its engine-lock session: %s", self.replica_id, exc)
            self._drop_connection()
            return False
        if not held:
            log.warning("replica %s no longer holds the engine lock", self.replica_id)
            self._drop_connection()
        return held

    def _try_acquire(self) -> bool:
        try:
            conn = self._connection()
            got = bool(
                conn.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": self.key}).scalar()
            )
            holder = None if got else conn.execute(_HOLDER, {"key": self.key}).scalar()
        except SQLAlchemyError as exc:
            self._drop_connection()
            if str(exc) != self._last_error:  # once per distinct error, not once per tick
                log.warning("replica %s cannot reach the engine lock: %s", self.replica_id, exc)
                self._last_error = str(exc)
            return False
        self._last_error = ""
        if not got:
            # Keep the last holder we saw: while a dead leader's backend exits, the lock can
            # outlive its row in pg_stat_activity, and a takeover must still name who it
            # took over from.
            self._holder = _holder_id(holder) or self._holder
            return False
        previous = self._holder
        self._set_leader(True)
        if previous is not None and previous != self.replica_id:
            self._takeovers += 1
            log.warning(
                "replica %s took over the rollout engine from %s", self.replica_id, previous
            )
        else:
            log.info("replica %s leads the rollout engine", self.replica_id)
        return True

    def _set_leader(self, leader: bool) -> None:
        self._leader = leader
        self._since = self.clock() if leader else None
        self._holder = self.replica_id if leader else None
        if not leader:
            log.warning("replica %s stepped down from the rollout engine", self.replica_id)
        if self.on_change is not None:
            try:
                self.on_change(leader)
            except Exception:  # a listener must never break the engine loop
                log.exception("leader change listener failed")

    def _connection(self) -> Connection:
        if self._conn is not None:
            return self._conn
        if self._engine is None:
            self._engine = create_engine(
                self.url,
                poolclass=NullPool,  # the lock lives and dies with exactly this connection
                isolation_level="AUTOCOMMIT",
                connect_args=self._connect_args(),
            )
        conn = self._engine.connect()
        try:
            # The lease: the server ends this session (and releases the lock) when it has
            # been idle this long, so a frozen or cut-off holder cannot keep the lead.
            conn.execute(
                text("SELECT set_config('idle_session_timeout', :ms, false)"),
                {"ms": f"{int(self.lease_s * 1000)}ms"},
            )
        except SQLAlchemyError as exc:  # PostgreSQL before 14: no server-side lease
            log.warning("no idle_session_timeout on this server, no lease on the lock: %s", exc)
            conn.close()
            conn = self._engine.connect()
        self._conn = conn
        return conn

    def _connect_args(self) -> dict[str, Any]:
        if self.url.get_driver_name() not in _LIBPQ_DRIVERS:
            return {}
        lease = max(1, int(self.lease_s))
        return {
            "application_name": (APPLICATION_PREFIX + self.replica_id)[:63],
            "connect_timeout": min(lease, 5),
            # Notice a dead server or a partition within about the lease, client side.
            "keepalives": 1,
            "keepalives_idle": max(1, lease // 3),
            "keepalives_interval": 1,
            "keepalives_count": 3,
            "tcp_user_timeout": lease * 1000,
        }

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except SQLAlchemyError:
                conn.invalidate()


def _holder_id(application_name: object) -> str | None:
    name = str(application_name or "")
    return name[len(APPLICATION_PREFIX) :] if name.startswith(APPLICATION_PREFIX) else None
