"""Fixtures for the agent's tests: a broker with the fleet's ACL, signed variants, agent
processes (`tandem agent run`) and the fleet double."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.agent.artifacts import Signer
from tests.agent.fleet_double import FleetDouble
from tests.support.agent import agent_argv
from tests.support.mosquitto import Broker
from tests.support.processes import stop_process, stop_processes

DEVICES = ("dev-1", "dev-2", "dev-3", "dev-4")
USERS = {"admin": "admin-secret", **{d: f"{d}-secret" for d in DEVICES}}
# What `tandem fleet broker-config` generates, in small: a device reads its desired state,
# chunks and report acks, writes its presence, reports, telemetry and chunk requests, and
# nothing else.
ACL = """user admin
topic readwrite #

pattern read tandem/v1/devices/%u/desired
pattern read tandem/v1/devices/%u/chunks
pattern read tandem/v1/devices/%u/reports/ack
pattern write tandem/v1/devices/%u/presence
pattern write tandem/v1/devices/%u/reports
pattern write tandem/v1/devices/%u/telemetry
pattern write tandem/v1/devices/%u/chunks/request
"""


@pytest.fixture
def fleet_broker(mosquitto_factory: Callable[..., Broker]) -> Broker:
    return mosquitto_factory(users=USERS, acl=ACL)


@pytest.fixture
def signer(tmp_path: Path) -> Signer:
    return Signer.create(tmp_path / "keys")


@pytest.fixture
def fleet_signer(tmp_path: Path) -> Signer:
    """The fleet key: the fleet double signs desired states with it, agents verify them."""
    return Signer.create(tmp_path / "fleet-keys", name="fleet")


@pytest.fixture
def fleet(fleet_broker: Broker, fleet_signer: Signer) -> Iterator[FleetDouble]:
    double = FleetDouble(fleet_broker, fleet_signer=fleet_signer)
    yield double
    double.close()


@dataclass
class AgentProcess:
    broker: Broker
    device_id: str
    store: Path
    trusted_key: Path
    log_path: Path
    fleet_key: Path | None = None
    extra: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        return agent_argv(
            self.device_id,
            self.broker.url,
            USERS[self.device_id],
            self.store,
            self.trusted_key,
            tags=("site=lab", "ring=canary"),
            stall_timeout=2,
            extra=[*(["--fleet-key", str(self.fleet_key)] if self.fleet_key else []), *self.extra],
        )

    def start(self) -> AgentProcess:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.argv(), stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        log.close()
        return self

    def kill(self) -> None:
        """SIGKILL: no chance to publish anything or tidy up (the last will fires)."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def agent_factory(
    fleet_broker: Broker, signer: Signer, fleet_signer: Signer, tmp_path: Path
) -> Iterator[Callable[..., AgentProcess]]:
    started: list[AgentProcess] = []

    def make(device_id: str = "dev-1", *extra: str, start: bool = True) -> AgentProcess:
        agent = AgentProcess(
            broker=fleet_broker,
            device_id=device_id,
            store=tmp_path / f"store-{device_id}",
            trusted_key=signer.public_path,
            log_path=tmp_path / f"agent-{device_id}.log",
            fleet_key=fleet_signer.public_path,
            extra=list(extra),
        )
        started.append(agent)
        return agent.start() if start else agent

    yield make
    stop_processes(agent.proc for agent in started if agent.proc is not None)
