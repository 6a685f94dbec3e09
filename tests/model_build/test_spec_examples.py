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


CNN = EXAMPLE.parent / "cnn"
# The CNN example's weights and data, kept across test sessions (like build/test-zoo) and
# remade only when the example's code changes; its zoo then comes from the content-hash cache.
CNN_WORK = Path(__file__).resolve().parents[2] / "build" / "test-examples" / "cnn"


def _cnn_example() -> Path:
    """A copy of examples/cnn with its weights and data written by make_model.py."""
    import fcntl
    import hashlib

    sources = sorted(p for p in CNN.rglob("*") if p.is_file() and p.suffix in (".py", ".toml"))
    stamp = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()
    CNN_WORK.mkdir(parents=True, exist_ok=True)
    folder = CNN_WORK / "example"
    with (CNN_WORK / ".lock").open("a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        if (CNN_WORK / "stamp").exists() and (CNN_WORK / "stamp").read_text() == stamp:
            return folder
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(CNN, folder, ignore=shutil.ignore_patterns("*.pt", "*.npz", "__pycache__"))
        loaded = importlib.util.spec_from_file_location("cnn_make_model", folder / "make_model.py")
        assert loaded is not None and loaded.loader is not None
        module = importlib.util.module_from_spec(loaded)
        loaded.loader.exec_module(module)
        module.main(folder)
        spec = folder / "model.toml"  # OpenVINO from a PyTorch source is bench_build_cnn's
        spec.write_text(spec.read_text().replace('"openvino", ', ""))  # (keeps this test fast)
        (CNN_WORK / "stamp").write_text(stamp)
    return folder


def test_cnn_example_builds_every_runtime_and_answers_locally() -> None:
    pytest.importorskip("torch")
    pytest.importorskip("litert_torch")
    from tandem.sdk import Client

    folder = _cnn_example()
    zoo = CNN_WORK / "zoo"
    entry = build_from_spec(folder / "model.toml", zoo)["models"]["cnn"]
    assert entry["spec_source"] == "factory"
    assert set(entry["variants"]) == {"onnx-int8", "tflite-int8", "torch-fp32"}, entry["notes"]
    for name, row in entry["variants"].items():
        assert row["top1_agreement"] >= 0.98, (name, row)
        assert row["embedding.cosine_mean"] >= 0.98, (name, row)  # the secondary output
        assert row["accuracy"] >= 0.85 and row["temperature"] > 0, (name, row)
    assert entry["variants"]["torch-fp32"]["top1_agreement"] == 1.0
    assert build_from_spec(folder / "model.toml", zoo)["run"]["cached"] == ["cnn"]
    rows = np.load(folder / "val.npz")["pixels"][:3]
    answers = {}
    for runtime in ("torch", "onnx", "tflite"):  # the SDK's runtimes, each variant
        with Client(
            model="cnn", artifacts=zoo / "artifacts", policy="local_only", runtime=runtime
        ) as client:
            result = client.infer({"pixels": rows})
        assert result.outputs["logits"].shape == (3, 10), runtime
        answers[runtime] = result.outputs["embedding"]
    full = answers["torch"]  # FP32: the full model's answer
    for runtime in ("torch", "onnx"):
        assert np.all(_cosine(full, answers[runtime]) > 0.98), runtime


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_cnn_example_tflite_secondary_output_matches_the_full_model() -> None:
    """Issue 11: the SDK's LiteRT embedding came from a previous build's file, left in the
    device cache under the same model, version and variant (and size); the build's check of
    the new file passed. The example is retrained whenever its code changes."""
    pytest.importorskip("torch")
    pytest.importorskip("litert_torch")
    from tandem.sdk import Client

    folder = _cnn_example()
    zoo = CNN_WORK / "zoo"
    build_from_spec(folder / "model.toml", zoo)  # cached by content after the test above
    rows = np.load(folder / "val.npz")["pixels"][:8]
    answers = {}
    for runtime in ("torch", "tflite"):
        with Client(
            model="cnn", artifacts=zoo / "artifacts", policy="local_only", runtime=runtime
        ) as client:
            answers[runtime] = client.infer({"pixels": rows}).outputs
    assert answers["tflite"]["embedding"].shape == (8, 32)
    assert np.all(_cosine(answers["torch"]["embedding"], answers["tflite"]["embedding"]) > 0.98)
    agree = answers["torch"]["logits"].argmax(1) == answers["tflite"]["logits"].argmax(1)
    assert agree.sum() >= 7, agree


def test_the_guides_cnn_spec_is_the_examples() -> None:
    import re
    import tomllib

    guide = (EXAMPLE.parents[1] / "docs" / "own-model.md").read_text()
    blocks = [tomllib.loads(b) for b in re.findall(r"```toml\n(.*?)```", guide, re.S)]
    example = tomllib.loads((CNN / "model.toml").read_text())
    assert example in blocks
