"""Fixtures shared by every component's tests: real brokers, databases and model zoos.

Everything started here binds to loopback, uses a free port, and is torn down after.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.mosquitto import Broker, start_broker

ROOT = Path(__file__).resolve().parents[1]

# A simple default: one admin user that may do anything, one device that may only use its
# own subtree. Tests that need more pass their own users and ACL to `mosquitto_factory`.
DEFAULT_USERS = {"admin": "admin-secret", "dev-1": "dev-1-secret"}
DEFAULT_ACL = """user admin
topic readwrite #

user dev-1
topic readwrite tandem/v1/devices/dev-1/#
"""


@pytest.fixture
def mosquitto_factory(tmp_path: Path) -> Iterator[Callable[..., Broker]]:
    """Starts real Mosquitto brokers: `mosquitto_factory(users=..., acl=...)`."""
    brokers: list[Broker] = []

    def make(users: dict[str, str] | None = None, acl: str | None = None) -> Broker:
        broker = start_broker(
            tmp_path / f"broker-{len(brokers)}",
            users or DEFAULT_USERS,
            acl if acl is not None else DEFAULT_ACL,
        )
        brokers.append(broker)
        return broker

    yield make
    for broker in brokers:
        broker.stop()


@pytest.fixture
def mosquitto(mosquitto_factory: Callable[..., Broker]) -> Broker:
    """A real Mosquitto broker with the default users and ACL."""
    return mosquitto_factory()


POSTGRES_ADMIN_URL = os.environ.get(
    "TANDEM_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"
)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database (SQLAlchemy URL); skips visibly when no server answers."""
    try:
        import psycopg
    except ImportError:
        pytest.skip("psycopg not installed: PostgreSQL tests skipped")
    try:
        admin = psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        pytest.skip(f"no PostgreSQL server at {POSTGRES_ADMIN_URL}: {exc}")
    name = f"tandem_test_{uuid.uuid4().hex[:12]}"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0]
        try:
            yield f"{base.replace('postgresql://', 'postgresql+psycopg://', 1)}/{name}"
        finally:
            with contextlib.suppress(psycopg.Error):
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# --- model zoo ---------------------------------------------------------------------------
# Built once per test session into build/test-zoo (content-hash cached by the pipeline, so a
# second run is quick). Tests that need models take these fixtures.
TEST_ZOO = ROOT / "build" / "test-zoo"


@pytest.fixture(scope="session")
def digits_zoo() -> Path:
    """A zoo with the digits model built (repository/, artifacts/, report.json, keys/)."""
    from tandem.cloud.build.pipeline import build_zoo

    build_zoo(TEST_ZOO, models=("digits",))
    return TEST_ZOO


@pytest.fixture(scope="session")
def full_zoo(digits_zoo: Path) -> Path:
    """The zoo with every model (digits and minilm)."""
    from tandem.cloud.build.pipeline import build_zoo

    build_zoo(TEST_ZOO, models=("digits", "minilm"))
    return TEST_ZOO
