"""Every bad input raises InputError naming the tensor, what was expected and what came."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tandem.errors import InputError
from tandem.sdk import Client
from tandem.sdk.artifacts import TensorSpec
from tandem.sdk.signature import Signature

GOOD = np.zeros((2, 64), np.float32)


@pytest.fixture
def client(clients: Callable[..., Client], artifacts: Path) -> Client:
    return clients(artifacts=artifacts, policy="local_only", runtime="onnx")


@pytest.mark.parametrize(
    ("inputs", "pattern"),
    [
        ({"pixel": GOOD}, r"unexpected input tensor 'pixel'.*\['pixels'\]"),
        ({"pixels": GOOD, "extra": GOOD}, r"unexpected input tensor 'extra'"),
        ({}, r"input tensor 'pixels' is missing: expected float32 \[\?, 64\], got nothing"),
        ({"pixels": GOOD.astype(np.float64)}, r"'pixels': expected dtype float32, got float64"),
        ({"pixels": GOOD.astype(np.int64)}, r"'pixels': expected dtype float32, got int64"),
        (
            {"pixels": np.zeros((2, 63), np.float32)},
            r"'pixels': expected shape \[\?, 64\], got \[2, 63\] \(dimension 1 must be 64\)",
        ),
        (
            {"pixels": np.zeros((1, 2, 64), np.float32)},
            r"'pixels': expected shape \[\?, 64\] \(rank 2\), got \[1, 2, 64\]",
        ),
        ({"pixels": np.zeros((0, 64), np.float32)}, r"'pixels': empty batch, got shape \[0, 64\]"),
        ({"pixels": [[0.0] * 64]}, r"'pixels': expected a numpy array of float32, got list"),
        ([1, 2, 3], r"inputs: expected a numpy array or a dict .* got list"),
        (np.zeros((2, 64), np.float16), r"'pixels': expected dtype float32, got float16"),
    ],
)
def test_bad_inputs_name_the_tensor(client: Client, inputs: object, pattern: str) -> None:
    with pytest.raises(InputError, match=pattern):
        client.infer(inputs)  # type: ignore[arg-type]


def test_good_inputs_single_array_single_row_and_non_contiguous(client: Client) -> None:
    x = np.arange(128, dtype=np.float32).reshape(2, 64) % 16
    assert client.infer(x).output.shape == (2, 10)
    assert client.infer({"pixels": x}).output.shape == (2, 10)
    assert client.infer(x[0]).output.shape == (1, 10)  # one sample: the batch dim is added
    wide = np.zeros((2, 128), np.float32)
    wide[:, ::2] = x
    strided = wide[:, ::2]
    assert not strided.flags.c_contiguous
    np.testing.assert_allclose(client.infer(strided).output, client.infer(x).output)


def test_single_array_for_a_multi_input_model_is_refused() -> None:
    sig = Signature(
        [
            TensorSpec("input_ids", "INT64", (-1, -1)),
            TensorSpec("attention_mask", "INT64", (-1, -1)),
        ],
        [TensorSpec("embedding", "FP32", (-1, 384))],
        task="embedding",
    )
    with pytest.raises(InputError, match=r"2 inputs \['input_ids', 'attention_mask'\].*dict"):
        sig.prepare(np.zeros((1, 8), np.int64))
    ids = np.ones((1, 8), np.int64)
    with pytest.raises(InputError, match="'attention_mask' is missing"):
        sig.prepare({"input_ids": ids})
    feeds = sig.prepare({"input_ids": ids, "attention_mask": ids})
    assert set(feeds) == {"input_ids", "attention_mask"}
    assert sig.confidence({"embedding": np.zeros((1, 384), np.float32)}) is None


def test_calibrated_confidence_uses_the_manifest_temperature(client: Client) -> None:
    model = client.current
    assert model is not None
    temperature = model.manifest.temperature
    assert temperature != 1.0
    x = np.random.default_rng(1).uniform(0, 16, (3, 64)).astype(np.float32)
    result = client.infer(x)
    z = result.output.astype(np.float64) / temperature
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    np.testing.assert_allclose(result.confidences, p.max(1), rtol=1e-9)
    assert result.confidence == pytest.approx(p.max(1).min())
    # One row takes the pure-Python path; it must agree with the numpy one.
    one = client.infer(x[:1])
    z1 = one.output[0].astype(np.float64) / temperature
    expected = 1.0 / np.exp(z1 - z1.max()).sum()
    assert one.confidence == pytest.approx(expected, rel=1e-9)
