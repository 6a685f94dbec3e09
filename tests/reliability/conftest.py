"""Fixtures for the reliability suite: the figures collector, and the other components'
fixtures (real servers, brokers, agents, fleet services) reused under their own names."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.agent.conftest import agent_factory, fleet, fleet_broker, signer
from tests.cloud.conftest import teacher
from tests.conftest import ROOT
from tests.fleet.conftest import fleet_service, generated_broker
from tests.sdk.conftest import artifacts, models, test_set
from tests.support.figures import Figures

__all__ = [  # fixtures, used by name
    "agent_factory",
    "artifacts",
    "fleet",
    "fleet_broker",
    "fleet_service",
    "generated_broker",
    "models",
    "signer",
    "teacher",
    "test_set",
]

RESULTS = ROOT / "bench" / "results" / "reliability.txt"


@pytest.fixture(scope="session")
def figures() -> Iterator[Figures]:
    """Each test records its figures here; the file is written when the session ends."""
    collected = Figures(RESULTS)
    yield collected
    collected.write()
