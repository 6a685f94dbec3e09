"""The own-model guide's wine example (docs/own-model.md), end to end: build, then an SDK answer."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest

from tandem.cloud.build.user import build_from_spec

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "wine"


def test_wine_example_builds_and_answers_locally(tmp_path: Path) -> None:
    pytest.importorskip("skl2onnx")
    from tandem.sdk import Client

    folder = tmp_path / "wine"
    shutil.copytree(EXAMPLE, folder, ignore=shutil.ignore_patterns("*.onnx", "*.npz"))
    loaded = importlib.util.spec_from_file_location("wine_make_model", folder / "make_model.py")
    assert loaded is not None and loaded.loader is not None
    module = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(module)
    module.main(folder)
    spec = folder / "model.toml"
    spec.write_text(spec.read_text().replace('"openvino", ', ""))  # keep the test fast
    entry = build_from_spec(spec, tmp_path / "zoo")["models"]["wine"]
    assert "onnx-int8" in entry["variants"], entry["notes"]
    assert entry["variants"]["onnx-int8"]["accuracy"] >= 0.9
    assert entry["variants"]["onnx-int8"]["temperature"] > 0
    assert any(n.startswith("tflite: skipped") for n in entry["notes"])
    rows = np.load(folder / "val.npz")["X"][:3]
    with Client(model="wine", artifacts=tmp_path / "zoo/artifacts", policy="local_only") as client:
        result = client.infer({"X": rows})
    assert result.outputs["probabilities"].shape == (3, 3)
