"""A two-input INT64 embedding model: inputs by name, dynamic lengths, cosine shadow agreement."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tandem.errors import InputError
from tandem.sdk import Client, ShadowConfig
from tests.sdk.embedkit import DIM, build_embedder
from tests.sdk.v2double import V2Server
from tests.support.processes import wait_until


@pytest.fixture(scope="module")
def embedder() -> Path:
    return build_embedder() / "artifacts"


def _batch(n: int, length: int, seed: int = 0) -> dict[str, np.ndarray]:
    ids = np.random.default_rng(seed).integers(0, 50, (n, length)).astype(np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def test_multi_input_embedding_model(clients: Callable[..., Client], embedder: Path) -> None:
    c = clients(model="embedder", artifacts=embedder, policy="local_only")
    for n, length in ((1, 3), (4, 11)):
        result = c.infer(_batch(n, length))
        assert result.output.shape == (n, DIM)
        np.testing.assert_allclose(np.linalg.norm(result.output, axis=1), 1.0, rtol=1e-5)
        assert result.confidence is None and result.runtime == "onnx"
    with pytest.raises(InputError, match=r"2 inputs \['input_ids', 'attention_mask'\]"):
        c.infer(_batch(1, 3)["input_ids"])
    bad = _batch(1, 3)
    bad["attention_mask"] = bad["attention_mask"].astype(np.int32)
    with pytest.raises(InputError, match="'attention_mask': expected dtype int64, got int32"):
        c.infer(bad)
    with pytest.raises(InputError, match="'attention_mask' is missing"):
        c.infer({"input_ids": bad["input_ids"]})


def test_shadow_agreement_by_cosine(
    clients: Callable[..., Client], embedder: Path, v2: V2Server
) -> None:
    local = clients(model="embedder", artifacts=embedder, policy="local_only")
    model = local.current
    assert model is not None

    def compute(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {k: np.ascontiguousarray(v) for k, v in inputs.items()}
        out = model.run(feeds)["embedding"]
        if inputs["input_ids"][0, 0] == 0:  # marked rows: an unrelated embedding
            out = np.roll(out, 3, axis=1)
        return {"embedding": out}

    v2.script.compute = compute
    c = clients(
        model="embedder",
        artifacts=embedder,
        cloud=v2.address,
        policy="local_only",
        shadow=ShadowConfig(fraction=1.0, cosine_threshold=0.99),
    )
    for seed in range(6):
        batch = _batch(1, 5, seed)
        batch["input_ids"][0, 0] = 0 if seed % 2 else 7
        c.infer(batch)
    wait_until(lambda: c.shadow is not None and c.shadow.sampled == 6, timeout=10)
    assert c.shadow is not None and c.shadow.agreed == 3
