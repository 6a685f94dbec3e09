"""Fixtures for the reliability suite: the figures collector, and the other components'
fixtures (real servers, brokers, agents, fleet services) reused under their own names."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.agent.artifacts import Signer, build_variant
from tests.agent.conftest import (
    AgentProcess,
    agent_factory,
    fleet,
    fleet_broker,
    fleet_signer,
    signer,
)
from tests.cloud.conftest import teacher
from tests.fleet.conftest import GeneratedBroker, fleet_service, generated_broker
from tests.sdk.conftest import artifacts, models, test_set
from tests.support.agent import agent_argv
from tests.support.figures import Figures, results_path
from tests.support.processes import stop_processes

__all__ = [  # fixtures, used by name
    "agent_factory",
    "artifacts",
    "fleet",
    "fleet_broker",
    "fleet_signer",
    "fleet_service",
    "generated_broker",
    "models",
    "signer",
    "teacher",
    "test_set",
]

RESULTS = results_path("reliability.txt")


@pytest.fixture(scope="session")
def figures() -> Iterator[Figures]:
    """Each test records its figures here; the file is written when the session ends."""
    collected = Figures(RESULTS)
    yield collected
    collected.write()


@dataclass
class FleetAgent(AgentProcess):
    """`tandem agent run` on a broker set up by `tandem fleet broker-config` (its own
    passwords), tagged site=lab, onnx only."""

    password: str = ""

    def argv(self) -> list[str]:
        return agent_argv(
            self.device_id,
            self.broker.url,
            self.password,
            self.store,
            self.trusted_key,
            runtimes=("onnx",),
            health_window=1,
            health_probe_interval=0.3,
            telemetry_interval=0.3,
            stall_timeout=2,
            extra=self.extra,
        )


@pytest.fixture
def zoo_signer(tmp_path: Path) -> Signer:
    """The zoo's signing key (trusted by the agents)."""
    return Signer.create(tmp_path / "zoo" / "keys")


@pytest.fixture
def zoo(tmp_path: Path, zoo_signer: Signer) -> Path:
    """A signed zoo for the fleet service: digits v1 and v2 (real ONNX, reference outputs)."""
    root = tmp_path / "zoo"
    for version in (1, 2):
        build_variant(root / "artifacts", zoo_signer, version=version)
    (root / "report.json").write_text(json.dumps({"models": {"digits": {}}}))
    return root


FleetAgents = Callable[[list[str]], tuple[GeneratedBroker, dict[str, FleetAgent]]]


@pytest.fixture
def fleet_agents_factory(
    generated_broker: Callable[[list[str]], GeneratedBroker], zoo: Path, tmp_path: Path
) -> Iterator[FleetAgents]:
    """A generated-ACL broker and one running agent per device id."""
    started: list[FleetAgent] = []

    def make(devices: list[str]) -> tuple[GeneratedBroker, dict[str, FleetAgent]]:
        broker = generated_broker(devices)
        agents = {
            d: FleetAgent(
                broker=broker,  # type: ignore[arg-type]  # only .url is used
                device_id=d,
                store=tmp_path / f"store-{d}",
                trusted_key=zoo / "keys" / "signing.pub",
                log_path=tmp_path / f"agent-{d}.log",
                password=broker.written.device_passwords[d],
            )
            for d in devices
        }
        for agent in agents.values():
            started.append(agent.start())
        return broker, agents

    yield make
    stop_processes(agent.proc for agent in started if agent.proc is not None)
