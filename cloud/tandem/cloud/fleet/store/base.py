"""The store's engine, sessions and error translation."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import (
    Engine,
    create_engine,
    event,
    inspect,
    text,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from ..errors import ConflictError, NotFoundError, StoreError
from ..models import (
    Base,
)


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


# --- the store ----------------------------------------------------------------------------

_T = TypeVar("_T")


class StoreBase:
    """The fleet's data layer over one SQLAlchemy engine."""

    def __init__(
        self,
        url: str,
        *,
        telemetry_window_s: float = 60.0,
        echo: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.url = url
        # The service's clock, so that a store used by a service with a fake clock stamps
        # the same times the service decides with.
        self.clock = clock
        self.telemetry_window_s = telemetry_window_s
        try:
            if url.startswith("sqlite"):
                database = make_url(url).database
                if database and database != ":memory:":
                    Path(database).parent.mkdir(parents=True, exist_ok=True)
                self.engine: Engine = create_engine(
                    url, echo=echo, connect_args={"check_same_thread": False, "timeout": 30}
                )
                event.listen(self.engine, "connect", _sqlite_pragmas)
            else:
                self.engine = create_engine(url, echo=echo, pool_pre_ping=True, pool_size=10)
            self.dialect = self.engine.dialect.name
            Base.metadata.create_all(self.engine)
            _add_new_columns(self.engine)
        except SQLAlchemyError as exc:
            raise StoreError(f"cannot open the fleet database {_redact(url)}: {exc}") from exc
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        # SQLite has one writer; serializing our own writers avoids busy-retry storms.
        self._write_lock = threading.Lock() if self.dialect == "sqlite" else None

    def close(self) -> None:
        self.engine.dispose()

    def retry_on_conflict(self, attempt: Callable[[], _T], tries: int = 3) -> _T:
        """Runs `attempt` again when it raises `ConflictError`: another replica wrote the
        same unique key (a report or summary id, a device) meanwhile, and the next try
        sees that write. The last conflict propagates."""
        for n in range(tries):
            try:
                return attempt()
            except ConflictError:
                if n == tries - 1:
                    raise
        raise AssertionError("unreachable")

    @contextmanager
    def session(self, write: bool = True) -> Iterator[Session]:
        lock = self._write_lock if write else None
        if lock is not None:
            lock.acquire()
        try:
            with self._sessions() as session, session.begin():
                yield session
        except (NotFoundError, ConflictError):
            raise
        except IntegrityError as exc:
            raise ConflictError(f"conflicts with stored data: {exc.orig}") from exc
        except DBAPIError as exc:
            if _lost_a_race(exc):
                # Replicas writing the same rows in another order (two report batches, or
                # a presence batch beside one): PostgreSQL aborts one; a retry succeeds.
                raise ConflictError(f"lost a race with another transaction: {exc.orig}") from exc
            raise StoreError(f"fleet database error: {exc}") from exc
        except SQLAlchemyError as exc:
            raise StoreError(f"fleet database error: {exc}") from exc
        finally:
            if lock is not None:
                lock.release()


def _add_new_columns(engine: Engine) -> None:
    """Adds the columns a newer tandem appended to an existing table (create_all creates
    only missing tables). Only additive columns with a scalar default qualify, which is
    the one kind of schema change the store makes without a migration tool."""
    inspector = inspect(engine)
    existing_tables = set(inspector.get_table_names())
    with engine.begin() as conn:
        for table in Base.metadata.sorted_tables:
            if table.name not in existing_tables:
                continue
            have = {c["name"] for c in inspector.get_columns(table.name)}
            for col in table.columns:
                if col.name in have:
                    continue
                default = getattr(col.default, "arg", None)
                numeric = isinstance(default, int | float) and not isinstance(default, bool)
                if not (numeric or (default is None and col.nullable)):
                    raise StoreError(
                        f"the fleet database's table {table.name} lacks column {col.name}, "
                        "which cannot be added in place: migrate or start a new database"
                    )
                ddl = f"ALTER TABLE {table.name} ADD COLUMN {col.name} "
                ddl += col.type.compile(dialect=engine.dialect)
                if numeric:
                    ddl += f" DEFAULT {default!r}"
                conn.execute(text(ddl))


# PostgreSQL's deadlock_detected and serialization_failure: the transaction was rolled back
# because of a concurrent one, and the same transaction tried again is expected to pass.
_RACE_SQLSTATES = frozenset({"40P01", "40001"})


def _lost_a_race(exc: DBAPIError) -> bool:
    state = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
    return state in _RACE_SQLSTATES


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}"
    return url
