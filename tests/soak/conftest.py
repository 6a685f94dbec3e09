"""The soak reuses the reliability suite's fixtures (agents on a generated-ACL broker, the
fleet service, the SDK's test models)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.reliability.conftest import (
    artifacts,
    fleet_agents_factory,
    fleet_service,
    generated_broker,
    models,
    zoo,
    zoo_signer,
)
from tests.support.figures import Figures, results_path

__all__ = [  # fixtures, used by name
    "artifacts",
    "fleet_agents_factory",
    "fleet_service",
    "generated_broker",
    "models",
    "zoo",
    "zoo_signer",
]


@pytest.fixture(scope="session")
def figures() -> Iterator[Figures]:
    """The soak's figures go to their own file (bench/results/reliability-soak.txt)."""
    collected = Figures(results_path("reliability-soak.txt"))
    yield collected
    collected.write()
