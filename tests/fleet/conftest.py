"""Fleet fixtures: the store on SQLite and on a real PostgreSQL, a Mosquitto started from
`tandem fleet broker-config` output, a fake zoo, and the fleet service as a real
`tandem fleet serve` process."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tandem.cloud.fleet.broker_config import BrokerConfig, Written, write_broker_config
from tandem.cloud.fleet.store import Store
from tests.fleet.helpers import fake_zoo
from tests.support.mosquitto import MOSQUITTO
from tests.support.processes import (
    free_port,
    stop_process,
    stop_processes,
    wait_for_port,
    wait_until,
)

TANDEM = str(Path(sys.executable).parent / "tandem")
TOKEN = "test-token"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'fleet.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    s = Store(url, telemetry_window_s=60)
    yield s
    s.close()


@dataclass
class GeneratedBroker:
    host: str
    port: int
    out: Path
    written: Written
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @classmethod
    def started(cls, out: Path, device_ids: list[str]) -> GeneratedBroker:
        """`tandem fleet broker-config` output for these devices in `out`, on a free
        loopback port, with Mosquitto running it. With persistence, as the generated config
        has by default: a broker restart then keeps the fleet's session and the QoS 1
        messages it had taken for it (without it, telemetry the broker had PUBACKed to a
        device but not yet delivered was lost in a restart, and the fault test that
        restarts the broker under telemetry failed on it)."""
        port = free_port()
        written = write_broker_config(BrokerConfig(out, "127.0.0.1", port), device_ids)
        broker = cls("127.0.0.1", port, out, written)
        broker.start()
        return broker

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.written.conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_for_port(self.port, self.host, proc=self.proc)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None


@pytest.fixture
def generated_broker(tmp_path: Path) -> Iterator[Callable[[list[str]], GeneratedBroker]]:
    brokers: list[GeneratedBroker] = []

    def make(device_ids: list[str]) -> GeneratedBroker:
        b = GeneratedBroker.started(tmp_path / f"broker-{len(brokers)}", device_ids)
        brokers.append(b)
        return b

    yield make
    for b in brokers:
        b.stop()


@pytest.fixture
def zoo(tmp_path: Path) -> Path:
    return fake_zoo(tmp_path / "zoo")


@dataclass
class ServiceProcess:
    args: list[str]
    rest_port: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    http: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        self.http = httpx.Client(
            base_url=f"http://127.0.0.1:{self.rest_port}/api/v1",
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=10,
        )

    def start(self) -> None:
        log = self.log_path.open("ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            self.args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        wait_for_port(self.rest_port, proc=self.proc, timeout=30)

    def stop(self, kill: bool = False) -> int | None:
        """SIGTERM (or SIGKILL); the exit status, None when it was not running."""
        if self.proc is None:
            return None
        if kill:
            self.proc.kill()
            self.proc.wait(10)
        else:
            stop_process(self.proc)
        code, self.proc = self.proc.returncode, None
        return code

    def get(self, path: str, **kw: object) -> object:
        r = self.http.get(path, **kw)  # type: ignore[arg-type]
        r.raise_for_status()
        return r.json()

    def post(self, path: str, json: object = None) -> object:
        r = self.http.post(path, json=json)
        assert r.status_code < 300, r.text
        return r.json()

    def rollout(self, rollout_id: str) -> dict[str, object]:
        data = self.get(f"/rollouts/{rollout_id}")
        assert isinstance(data, dict)
        return data

    def wait_rollout(self, rollout_id: str, status: str, timeout: float = 60) -> dict[str, object]:
        wait_until(
            lambda: self.rollout(rollout_id)["status"] == status,
            timeout=timeout,
            interval=0.05,  # one small GET: polling often costs little, and is seen sooner
            message=f"rollout {rollout_id} {status}: {self.log_tail()}",
        )
        return self.rollout(rollout_id)

    def log_tail(self, n: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]


def fleet_serve_argv(
    broker: GeneratedBroker,
    *,
    client_id: str,
    db: str,
    artifacts: Path,
    rest_port: int,
    token_user: str = "alice",
    extra: Sequence[str] = (),
) -> list[str]:
    """`tandem fleet serve` on a generated broker with its fleet account, and a REST API
    that takes `TOKEN`: the command line tests and benchmarks start the service with."""
    return [
        TANDEM, "fleet", "serve",
        "--broker", broker.url,
        "--username", "tandem-fleet",
        "--password-file", str(broker.written.fleet_password_file),
        "--client-id", client_id,
        "--db", db,
        "--artifacts", str(artifacts),
        "--rest-port", str(rest_port),
        "--api-token", f"{token_user}:{TOKEN}",
        *extra,
    ]  # fmt: skip


@pytest.fixture
def fleet_service(tmp_path: Path) -> Iterator[Callable[..., ServiceProcess]]:
    started: list[ServiceProcess] = []

    def make(
        broker: GeneratedBroker, zoo: Path | None = None, *extra: str, db: str | None = None
    ) -> ServiceProcess:
        rest_port = free_port()
        args = fleet_serve_argv(
            broker,
            client_id="tandem-fleet-test",
            db=db or f"sqlite:///{tmp_path / 'fleet.db'}",
            artifacts=tmp_path / "fleet-artifacts",
            rest_port=rest_port,
            extra=["--tick", "0.1", "--telemetry-window", "1", *extra],
        )
        if zoo is not None:
            args += ["--zoo", str(zoo)]
        svc = ServiceProcess(args, rest_port, tmp_path / "fleet-service.log")
        svc.start()
        started.append(svc)
        return svc

    yield make
    stop_processes(svc.proc for svc in started if svc.proc is not None)
    for svc in started:
        svc.stop()  # already exited: only forgets the process
        svc.http.close()


def wait_devices(svc: ServiceProcess, n: int, timeout: float = 30) -> None:
    def online() -> bool:
        devices = svc.get("/devices", params={"online": True})
        assert isinstance(devices, list)
        return len(devices) >= n

    wait_until(online, timeout=timeout, interval=0.05, message=f"{n} devices online")
    time.sleep(0.2)
