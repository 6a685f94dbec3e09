"""The demo's simulated app reads any classifier's data set: arrays keyed by the model's
input names and optional `labels`, as a spec build's validation data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tandem.agent.simulator import Dataset, SimSpec
from tandem.errors import ConfigError


def test_rows_carry_every_named_input_and_the_label(tmp_path: Path) -> None:
    path = tmp_path / "val.npz"
    ids = np.arange(12, dtype=np.int64).reshape(3, 4)
    mask = np.ones((3, 4), dtype=np.int64)
    np.savez(path, input_ids=ids, attention_mask=mask, labels=np.array([2, 0, 1]))
    data = Dataset.load(path)
    assert len(data) == 3
    inputs, label = data.row(1)
    assert set(inputs) == {"input_ids", "attention_mask"} and label == 0
    assert inputs["input_ids"].shape == (1, 4) and inputs["input_ids"].dtype == np.int64
    np.testing.assert_array_equal(inputs["input_ids"], ids[1:2])
    # without labels: requests all the same, accuracy unknown
    np.savez(path, pixels=np.zeros((2, 3, 8, 8), np.float32))
    unlabelled = Dataset.load(path)
    assert unlabelled.labels is None and unlabelled.row(0)[1] is None
    assert unlabelled.row(1)[0]["pixels"].shape == (1, 3, 8, 8)


def test_bad_data_sets_are_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "val.npz"
    np.savez(path, a=np.zeros((3, 2)), labels=np.zeros(4))
    with pytest.raises(ConfigError, match=r"same number of rows.*\[3, 4\]"):
        Dataset.load(path)
    np.savez(path, labels=np.zeros(4))
    with pytest.raises(ConfigError, match="no input arrays"):
        Dataset.load(path)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ConfigError, match=r"not a readable \.npz"):
        Dataset.load(tmp_path / "junk.npz")


def test_the_spec_names_the_model_and_its_scores_output() -> None:
    base = {
        "broker_host": "127.0.0.1",
        "broker_port": 1883,
        "trusted_key": "k.pub",
        "cloud": "127.0.0.1:8001",
        "dataset": "val.npz",
        "stats": "stats.json",
        "devices": [{"device_id": "d0", "password": "p", "runtime": "onnx", "store": "s"}],
    }
    assert SimSpec.from_json(base).model == "digits"  # the demo's default
    spec = SimSpec.from_json({**base, "model": "wine", "scores": "probabilities"})
    assert (spec.model, spec.scores) == ("wine", "probabilities")
