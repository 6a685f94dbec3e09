"""Shadow sampling: the agreement measures and the sampled share, end to end."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tandem.errors import ConfigError
from tandem.sdk import Client, ShadowConfig, TelemetryConfig
from tandem.sdk.artifacts import TensorSpec
from tandem.sdk.shadow import agreement
from tandem.sdk.signature import Signature
from tandem.sdk.telemetry import read_spool_file
from tests.sdk.v2double import V2Server
from tests.support.processes import wait_until

Factory = Callable[..., Client]


def test_shadow_agreement_measures() -> None:
    sig = Signature(
        [TensorSpec("pixels", "FP32", (-1, 64))],
        [TensorSpec("logits", "FP32", (-1, 3))],
        task="classification",
    )
    a = {"logits": np.array([[3, 1, 0], [0, 2, 1]], np.float32)}
    b = {"logits": np.array([[5, 0, 0], [0, 0, 9]], np.float32)}
    assert agreement(sig, a, b, 0.95) == (2, 1)
    emb = Signature(
        [TensorSpec("ids", "INT64", (-1, -1))],
        [TensorSpec("embedding", "FP32", (-1, 2))],
        task="embedding",
    )
    e1 = {"embedding": np.array([[1, 0], [0, 1]], np.float32)}
    e2 = {"embedding": np.array([[0.99, 0.05], [1, 0]], np.float32)}
    assert agreement(emb, e1, e2, 0.95) == (2, 1)
    with pytest.raises(ConfigError):
        ShadowConfig(fraction=1.5)


def test_shadow_sampling_reports_agreement(
    clients: Factory,
    artifacts: Path,
    v2: V2Server,
    test_set: tuple[np.ndarray, np.ndarray],
    tmp_path: Path,
) -> None:
    local = clients(artifacts=artifacts, policy="local_only", runtime="onnx")
    model = local.current
    assert model is not None
    # The cloud double answers with the student's own logits for half the rows' classes
    # shifted, so agreement is known exactly.
    x = test_set[0][:20]

    def compute(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        logits = model.run({"pixels": np.ascontiguousarray(inputs["pixels"])})["logits"]
        if inputs["pixels"][0, 0] == -1:
            logits = np.roll(logits, 1, axis=1)
        return {"logits": logits}

    v2.script.compute = compute
    spool = tmp_path / "spool"
    c = clients(
        artifacts=artifacts,
        cloud=v2.address,
        policy="local_only",
        runtime="onnx",
        shadow=ShadowConfig(fraction=1.0, queue_size=100),
        telemetry=TelemetryConfig(spool_dir=spool, interval_s=3600),
    )
    for row in x[:10]:
        assert c.infer(row).source == "local"
    marked = x[10:].copy()
    marked[:, 0] = -1
    for row in marked:
        c.infer(row)
    assert c.shadow is not None
    wait_until(lambda: c.shadow is not None and c.shadow.sampled == 20, timeout=10)
    assert c.shadow.agreed == 10
    c.close()
    summary = next(s for f in spool.iterdir() for s in read_spool_file(f))
    assert (summary.shadow_sampled, summary.shadow_agreed) == (20, 10)

    few = clients(
        artifacts=artifacts, cloud=v2.address, policy="local_only", runtime="onnx", shadow=0.1
    )
    calls = v2.servicer.infer_calls
    for _ in range(300):
        few.infer(x[:1])
    few.shadow.join()  # type: ignore[union-attr]
    sent = v2.servicer.infer_calls - calls
    assert 10 <= sent <= 60  # about 30 of 300
