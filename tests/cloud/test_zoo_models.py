"""The models `tandem models build` writes serve out of the box: the digits teacher on
ONNX Runtime, TorchScript and OpenVINO, and minilm FP32, checked against the same files run
directly through their runtimes in the test."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from tandem.protos.inference import grpc_predict_v2_pb2 as pb
from tests.cloud.conftest import ServerFactory, infer_request

BACKEND_FILES = {
    "onnxruntime": ("model.onnx",),
    "pytorch": ("model.pt",),
    "openvino": ("model.xml", "model.bin"),
}


def latest(model_dir: Path) -> Path:
    return model_dir / str(max(int(p.name) for p in model_dir.iterdir() if p.name.isdigit()))


def repository_per_backend(source: Path, out: Path) -> list[str]:
    """`<name>_<backend>` models over the same version folder, one per file the zoo built."""
    config = json.loads((source / "config.json").read_text())
    version = latest(source)
    names = []
    for backend, files in BACKEND_FILES.items():
        if not all((version / f).is_file() for f in files):
            continue
        name = f"{source.name}_{backend}"
        (out / name / "1").mkdir(parents=True)
        for f in files:
            shutil.copyfile(version / f, out / name / "1" / f)
        (out / name / "config.json").write_text(
            json.dumps(dict(config, name=name, backend=backend))
        )
        names.append(name)
    return names


def ort_run(model: Path, feeds: dict[str, np.ndarray[Any, Any]]) -> list[Any]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return list(session.run(None, feeds))


def test_digits_teacher_serves_on_every_backend_it_was_built_for(
    digits_zoo: Path, tmp_path: Path, server_factory: ServerFactory
) -> None:
    source = digits_zoo / "repository" / "digits"
    names = repository_per_backend(source, tmp_path / "repo")
    assert "digits_onnxruntime" in names
    server = server_factory(tmp_path / "repo")
    x = np.random.default_rng(9).integers(0, 17, size=(12, 64)).astype(np.float32)
    expected = ort_run(latest(source) / "model.onnx", {"pixels": x})[0]
    stub = server.stub()
    for name in names:
        response = stub.ModelInfer(infer_request(name, x))
        logits = np.frombuffer(response.raw_output_contents[0], "<f4").reshape(12, 10)
        np.testing.assert_allclose(logits, expected, rtol=1e-3, atol=1e-3, err_msg=name)
        assert (logits.argmax(1) == expected.argmax(1)).all(), name


def minilm_request(model: str, ids: np.ndarray[Any, Any]) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    mask = np.ones_like(ids)
    request.inputs.add(name="input_ids", datatype="INT64", shape=ids.shape)
    request.inputs.add(name="attention_mask", datatype="INT64", shape=mask.shape)
    request.raw_input_contents.extend([ids.tobytes(), mask.tobytes()])
    return request


def test_minilm_fp32_serves_variable_lengths_concurrently(
    minilm_zoo: Path, tmp_path: Path, server_factory: ServerFactory
) -> None:
    source = minilm_zoo / "repository" / "minilm"
    names = repository_per_backend(source, tmp_path / "repo")
    server = server_factory(tmp_path / "repo")
    rng = np.random.default_rng(10)
    cases = []
    for length in (5, 9, 5, 16, 9, 5):
        ids = rng.integers(1000, 20000, size=(2, length)).astype(np.int64)
        ids[:, 0], ids[:, -1] = 101, 102
        cases.append(ids)
    model_file = latest(source) / "model.onnx"
    expected = [
        ort_run(model_file, {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]
        for ids in cases
    ]
    stub = server.stub()
    for name in names:
        with ThreadPoolExecutor(6) as pool:
            responses = list(
                pool.map(
                    lambda ids, n=name: stub.ModelInfer(minilm_request(n, ids), timeout=120), cases
                )
            )
        for response, want in zip(responses, expected, strict=True):
            assert response.outputs[0].name == "embedding"
            got = np.frombuffer(response.raw_output_contents[0], "<f4").reshape(2, 384)
            np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4, err_msg=name)
            np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-3)
