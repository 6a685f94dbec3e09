"""The SDK against the real cloud tier (`tandem serve` in a subprocess)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tandem.sdk import Client, CloudConfig, Retry
from tandem.sdk.errors import CloudInputError
from tests.support.serve import ServeProcess

Factory = Callable[..., Client]


def _teacher(models: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(models / "repository" / "digits" / "1" / "model.onnx"))
    return np.asarray(session.run(None, {"pixels": x})[0])


def test_cloud_only_matches_the_teacher(
    clients: Factory,
    models: Path,
    cloud_server: ServeProcess,
    test_set: tuple[np.ndarray, np.ndarray],
) -> None:
    c = clients(artifacts=None, cloud=cloud_server.address, policy="cloud_only")
    x = test_set[0][:32]
    result = c.infer(x)
    assert result.source == "cloud" and result.model_version == 1
    np.testing.assert_allclose(result.output, _teacher(models, x), rtol=1e-4, atol=1e-4)
    with pytest.raises(CloudInputError, match="batch size"):
        c.infer(test_set[0][:100])  # over the server's max_batch_size: refused, not retried


def test_async_cloud_calls_against_the_server(
    clients: Factory,
    models: Path,
    cloud_server: ServeProcess,
    test_set: tuple[np.ndarray, np.ndarray],
) -> None:
    async def main() -> list[np.ndarray]:
        c = clients(artifacts=None, cloud=cloud_server.address, policy="cloud_only")
        results = await asyncio.gather(*(c.ainfer(row) for row in test_set[0][:16]))
        await c.aclose()
        return [r.output[0] for r in results]

    rows = asyncio.run(main())
    np.testing.assert_allclose(
        np.stack(rows), _teacher(models, test_set[0][:16]), rtol=1e-4, atol=1e-4
    )


def test_cascade_answers_most_locally_and_keeps_cloud_accuracy(
    clients: Factory,
    artifacts: Path,
    cloud_server: ServeProcess,
    test_set: tuple[np.ndarray, np.ndarray],
) -> None:
    x, y = test_set
    cloud = clients(artifacts=None, cloud=cloud_server.address, policy="cloud_only")
    cascade = clients(
        artifacts=artifacts,
        cloud=cloud_server.address,
        policy="cascade",
        max_accuracy_loss=0.005,
        runtime="onnx",
    )
    cloud_pred = np.array([cloud.infer(row).output[0].argmax() for row in x])
    results = [cascade.infer(row) for row in x]
    cascade_pred = np.array([r.output[0].argmax() for r in results])
    local_share = np.mean([r.source == "local" for r in results])
    cloud_acc, cascade_acc = (cloud_pred == y).mean(), (cascade_pred == y).mean()
    assert local_share >= 0.85, local_share
    assert cascade_acc >= cloud_acc - 0.005, (cascade_acc, cloud_acc)
    assert any(r.source == "cloud" and r.escalated for r in results)


def test_prefer_cloud_survives_the_server_going_away(
    clients: Factory,
    artifacts: Path,
    models: Path,
    tmp_path: Path,
    test_set: tuple[np.ndarray, np.ndarray],
) -> None:
    server = ServeProcess(models / "repository", tmp_path / "serve")
    try:
        config = CloudConfig(
            endpoints=(server.address,),
            timeout_ms=500,
            retry=Retry(total=1, backoff_factor=0.01, backoff_max=0.02),
        )
        c = clients(artifacts=artifacts, cloud=config, policy="prefer_cloud", runtime="onnx")
        assert c.infer(test_set[0][:2]).source == "cloud"
    finally:
        server.stop()
    result = c.infer(test_set[0][:2])
    assert result.source == "local" and result.fallback


def test_large_batches_split_into_the_servers_max_batch(
    clients: Factory,
    models: Path,
    cloud_server: ServeProcess,
    test_set: tuple[np.ndarray, np.ndarray],
) -> None:
    config = CloudConfig(endpoints=(cloud_server.address,), max_batch_rows=64)
    c = clients(artifacts=None, cloud=config, policy="cloud_only")
    x = test_set[0][:150]
    result = c.infer(x)
    assert result.output.shape == (150, 10)
    np.testing.assert_allclose(result.output, _teacher(models, x), rtol=1e-4, atol=1e-4)

    async def main() -> np.ndarray:
        out = (await c.ainfer(x)).output
        await c.aclose()
        return out

    np.testing.assert_allclose(asyncio.run(main()), result.output, rtol=1e-6)
