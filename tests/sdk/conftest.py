"""Fixtures for the SDK's tests: small real models, stores, and real gRPC servers."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tandem.sdk import Client
from tandem.sdk.store import ActivePointer, ModelStore
from tests.sdk.modelkit import build_models
from tests.sdk.v2double import V2Server
from tests.support.serve import ServeProcess

TANDEM = Path(sys.executable).parent / "tandem"


@pytest.fixture(scope="session")
def models() -> Path:
    """artifacts/ (digits v1 and v2, four variants each), repository/ (teacher), test_set.npz."""
    return build_models()


@pytest.fixture(scope="session")
def artifacts(models: Path) -> Path:
    return models / "artifacts"


@pytest.fixture(scope="session")
def test_set(models: Path) -> tuple[np.ndarray, np.ndarray]:
    data = np.load(models / "test_set.npz")
    return data["x"], data["y"]


def make_store(
    artifacts: Path,
    root: Path,
    *,
    versions: tuple[int, ...] = (1, 2),
    variants: tuple[str, ...] = ("onnx-int8",),
    active: int | None = 1,
) -> ModelStore:
    """A device-style model store: copies of the chosen variants, and an active pointer."""
    for version in versions:
        for variant in variants:
            shutil.copytree(
                artifacts / "digits" / str(version) / variant,
                root / "digits" / str(version) / variant,
            )
    store = ModelStore(root)
    if active is not None:
        store.write_active("digits", ActivePointer(version=active, variant=None))
    return store


@pytest.fixture
def clients(tmp_path: Path) -> Iterator[Callable[..., Client]]:
    """Makes Clients with a private cache folder; closes them after the test."""
    made: list[Client] = []

    def make(**kwargs: Any) -> Client:
        kwargs.setdefault("cache_dir", tmp_path / "cache")
        kwargs.setdefault("model", "digits")
        client = Client(**kwargs)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


@pytest.fixture
def v2() -> Iterator[V2Server]:
    server = V2Server()
    yield server
    server.stop()


@pytest.fixture
def v2_factory() -> Iterator[Callable[[], V2Server]]:
    servers: list[V2Server] = []

    def make() -> V2Server:
        server = V2Server()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def cloud_server(models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    """The real cloud tier (`tandem serve`) serving the digits teacher."""
    server = ServeProcess(models / "repository", tmp_path_factory.mktemp("serve"))
    yield server
    server.stop()
