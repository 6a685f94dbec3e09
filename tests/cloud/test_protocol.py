"""The whole V2 protocol over gRPC and HTTP against a real `tandem serve` process, every
error status, and that the server keeps serving after each error."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tandem.protos.inference import grpc_predict_v2_pb2 as pb
from tests.cloud.conftest import (
    TANDEM,
    DigitsReference,
    ServerProcess,
    http_get,
    http_post,
    infer_request,
    start_server,
)

RNG = np.random.default_rng(0)
MAX_MESSAGE = 2 * 1024 * 1024


@pytest.fixture(scope="module")
def server(test_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    proc = start_server(
        test_repository,
        tmp_path_factory.mktemp("server"),
        "--max-message-bytes",
        str(MAX_MESSAGE),
    )
    yield proc
    proc.stop()


def pixels(rows: int) -> np.ndarray[Any, Any]:
    return RNG.integers(0, 17, size=(rows, 64)).astype(np.float32)


def logits_of(response: pb.ModelInferResponse, index: int = 0) -> np.ndarray[Any, Any]:
    out = response.outputs[index]
    assert out.datatype == "FP32"
    return np.frombuffer(response.raw_output_contents[index], dtype="<f4").reshape(out.shape)


def test_server_live_ready_and_metadata(server: ServerProcess) -> None:
    stub = server.stub()
    assert stub.ServerLive(pb.ServerLiveRequest()).live
    assert stub.ServerReady(pb.ServerReadyRequest()).ready
    meta = stub.ServerMetadata(pb.ServerMetadataRequest())
    assert meta.name == "tandem"
    assert meta.version
    assert "model_repository" in meta.extensions


def test_model_ready_and_not_found(server: ServerProcess) -> None:
    stub = server.stub()
    assert stub.ModelReady(pb.ModelReadyRequest(name="digits")).ready
    assert stub.ModelReady(pb.ModelReadyRequest(name="digits", version="1")).ready
    for request in (
        pb.ModelReadyRequest(name="nope"),
        pb.ModelReadyRequest(name="digits", version="7"),
    ):
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelReady(request)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_model_metadata(server: ServerProcess) -> None:
    stub = server.stub()
    meta = stub.ModelMetadata(pb.ModelMetadataRequest(name="digits"))
    assert meta.name == "digits"
    assert list(meta.versions) == ["1"]
    assert meta.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("pixels", "FP32", [-1, 64])
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
        ("logits", "FP32", [-1, 10])
    ]
    assert stub.ModelMetadata(pb.ModelMetadataRequest(name="digits_pt")).platform == (
        "pytorch_libtorch"
    )
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelMetadata(pb.ModelMetadataRequest(name="digits", version="2"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("model", ["digits", "digits_pt", "digits_ov", "digits_nobatch"])
def test_infer_raw_every_backend(
    server: ServerProcess, model: str, digits_reference: DigitsReference
) -> None:
    stub = server.stub()
    x = pixels(5)
    response = stub.ModelInfer(infer_request(model, x, id="req-1"))
    assert response.model_name == model
    assert response.model_version == "1"
    assert response.id == "req-1"
    assert response.outputs[0].name == "logits"
    assert list(response.outputs[0].shape) == [5, 10]
    # Other runtimes than the reference's onnxruntime: equal to float32 rounding.
    tolerance = 1e-5 if model in ("digits", "digits_nobatch") else 1e-3
    np.testing.assert_allclose(
        logits_of(response), digits_reference(x), rtol=tolerance, atol=tolerance
    )
    assert (logits_of(response).argmax(1) == digits_reference(x).argmax(1)).all()


def test_infer_typed_contents(server: ServerProcess, digits_reference: DigitsReference) -> None:
    x = pixels(3)
    request = pb.ModelInferRequest(model_name="digits", model_version="1")
    tensor = request.inputs.add(name="pixels", datatype="FP32", shape=[3, 64])
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    request.outputs.add(name="logits")
    response = server.stub().ModelInfer(request)
    assert len(response.raw_output_contents) == 1  # outputs come back as raw bytes
    np.testing.assert_allclose(logits_of(response), digits_reference(x), rtol=1e-4, atol=1e-4)


def _invalid(server: ServerProcess, request: pb.ModelInferRequest) -> str:
    with pytest.raises(grpc.RpcError) as err:
        server.stub().ModelInfer(request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    return str(err.value.details())


def _request(
    name: str = "pixels",
    datatype: str = "FP32",
    shape: tuple[int, ...] = (2, 64),
    raw: bytes | None = None,
) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="digits")
    request.inputs.add(name=name, datatype=datatype, shape=shape)
    count = int(np.prod(shape)) if all(d < 1 << 20 for d in shape) else 1
    request.raw_input_contents.append(raw if raw is not None else b"\0" * 4 * count)
    return request


def test_invalid_arguments_name_the_tensor(
    server: ServerProcess, digits_reference: DigitsReference
) -> None:
    assert "'pixel'" in _invalid(server, _request(name="pixel"))
    assert "'pixels'" in _invalid(server, _request(datatype="FP64", raw=b"\0" * 8 * 128))
    assert "'pixels'" in _invalid(server, _request(shape=(2, 63)))  # wrong dim
    assert "'pixels'" in _invalid(server, _request(shape=(128,)))  # wrong rank
    assert "'pixels'" in _invalid(server, _request(shape=(65, 64)))  # over max_batch_size
    assert "'pixels'" in _invalid(server, _request(raw=b"\0" * 4 * 127))  # byte length
    # An element count that overflows int64 (and any sane limit).
    details = _invalid(server, _request(shape=(1 << 40, 1 << 40, 64), raw=b""))
    assert "'pixels'" in details
    assert "elements" in details
    # raw_input_contents and typed contents both set.
    both = _request()
    both.inputs[0].contents.fp32_contents.extend([0.0] * 128)
    assert "'pixels'" in _invalid(server, both)
    # Typed contents with the wrong number of values.
    typed = pb.ModelInferRequest(model_name="digits")
    typed.inputs.add(name="pixels", datatype="FP32", shape=[2, 64]).contents.fp32_contents.extend(
        [1.0] * 100
    )
    assert "'pixels'" in _invalid(server, typed)
    # Missing input, unknown requested output.
    assert "'pixels'" in _invalid(server, pb.ModelInferRequest(model_name="digits"))
    unknown_out = _request()
    unknown_out.outputs.add(name="probs")
    assert "'probs'" in _invalid(server, unknown_out)
    # The server is still serving.
    x = pixels(1)
    np.testing.assert_allclose(
        logits_of(server.stub().ModelInfer(infer_request("digits", x))),
        digits_reference(x),
        rtol=1e-4,
        atol=1e-4,
    )


def test_unknown_model_and_version_are_not_found(server: ServerProcess) -> None:
    for model, version in (("nope", ""), ("digits", "2"), ("digits", "x")):
        with pytest.raises(grpc.RpcError) as err:
            server.stub().ModelInfer(infer_request(model, pixels(1), version=version))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_oversized_message_gets_a_clear_status(server: ServerProcess) -> None:
    rows = 64
    request = _request(shape=(rows, 64), raw=b"\0" * (MAX_MESSAGE + 1024))
    stub = server.stub(**{"grpc.max_send_message_length": 64 << 20})
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(request)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in str(err.value.details()).lower()
    assert stub.ServerLive(pb.ServerLiveRequest()).live


def test_grpc_health_service(server: ServerProcess) -> None:
    channel = grpc.insecure_channel(server.grpc_address)
    server.channels.append(channel)
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "inference.GRPCInferenceService"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_http_endpoints(server: ServerProcess, digits_reference: DigitsReference) -> None:
    base = server.http_url
    assert http_get(f"{base}/v2/health/live")[0] == 200
    assert http_get(f"{base}/v2/health/ready")[0] == 200
    status, body = http_get(f"{base}/v2")
    assert status == 200 and json.loads(body)["name"] == "tandem"
    status, body = http_get(f"{base}/v2/models/digits")
    meta = json.loads(body)
    assert status == 200 and meta["inputs"][0] == {
        "name": "pixels",
        "datatype": "FP32",
        "shape": [-1, 64],
    }
    assert http_get(f"{base}/v2/models/digits/ready")[0] == 200
    assert http_get(f"{base}/v2/models/digits/versions/1/ready")[0] == 200
    assert http_get(f"{base}/v2/models/nope/ready")[0] == 404
    x = pixels(4)
    payload = {
        "id": "h1",
        "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [4, 64], "data": x.tolist()}],
    }
    status, body = http_post(f"{base}/v2/models/digits/infer", json.dumps(payload).encode())
    assert status == 200, body
    result = json.loads(body)
    assert result["id"] == "h1" and result["model_version"] == "1"
    out = result["outputs"][0]
    assert out["name"] == "logits" and out["shape"] == [4, 10]
    np.testing.assert_allclose(
        np.array(out["data"]).reshape(4, 10), digits_reference(x), rtol=1e-4, atol=1e-4
    )
    status, body = http_post(
        f"{base}/v2/models/digits/versions/1/infer", json.dumps(payload).encode()
    )
    assert status == 200
    bad = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [4, 64], "data": [1.0]}]}
    labels = {"model": "digits", "version": "1", "reason": "INVALID_ARGUMENT"}
    failures = server.metric("tandem_inference_request_failure_total", **labels)
    status, body = http_post(f"{base}/v2/models/digits/infer", json.dumps(bad).encode())
    assert status == 400 and "'pixels'" in json.loads(body)["error"]
    assert server.metric("tandem_inference_request_failure_total", **labels) == failures + 1
    status, _ = http_post(f"{base}/v2/models/nope/infer", json.dumps(payload).encode())
    assert status == 404
    status, _ = http_post(f"{base}/v2/models/digits/infer", b"{not json")
    assert status == 400


def test_metrics_and_access_log(server: ServerProcess) -> None:
    stub = server.stub()
    before = server.metric("tandem_inference_request_success_total", model="digits", version="1")
    failed_before = server.metric(
        "tandem_inference_request_failure_total",
        model="digits",
        version="1",
        reason="INVALID_ARGUMENT",
    )
    for _ in range(3):
        stub.ModelInfer(infer_request("digits", pixels(2)))
    with pytest.raises(grpc.RpcError):
        stub.ModelInfer(_request(shape=(2, 63)))
    text = server.metrics_text()
    after = server.metric("tandem_inference_request_success_total", model="digits", version="1")
    assert after == before + 3
    assert (
        server.metric(
            "tandem_inference_request_failure_total",
            model="digits",
            version="1",
            reason="INVALID_ARGUMENT",
        )
        == failed_before + 1
    )
    for name in (
        "tandem_inference_queue_duration_seconds_bucket",
        "tandem_inference_compute_duration_seconds_bucket",
        "tandem_inference_batch_size_bucket",
        "tandem_inference_queue_depth",
        "tandem_inference_inflight_requests",
    ):
        assert name in text, name
    assert server.metric("tandem_inference_batch_size_count", model="digits", version="1") > 0
    lines = [
        json.loads(line.split(" ", 4)[-1])
        for line in server.log().splitlines()
        if "tandem.cloud.server.access" in line
    ]
    ok = [r for r in lines if r["model"] == "digits" and r["status"] == "OK"]
    assert ok and ok[-1]["protocol"] == "grpc" and ok[-1]["duration_ms"] >= 0
    assert any(r["status"] == "INVALID_ARGUMENT" for r in lines)


def test_either_event_loop_serves(
    server: ServerProcess,
    test_repository: Path,
    tmp_path: Path,
    digits_reference: DigitsReference,
) -> None:
    """uvloop by default (it comes with the cloud extra), asyncio's own loop on request;
    an unknown choice is refused by name before anything starts."""
    assert "event loop uvloop" in server.log()
    plain = start_server(test_repository, tmp_path, "--loop", "asyncio", "--model", "digits")
    try:
        assert "event loop asyncio" in plain.log()
        x = pixels(3)
        response = plain.stub().ModelInfer(infer_request("digits", x))
        np.testing.assert_allclose(logits_of(response), digits_reference(x), rtol=1e-5, atol=1e-5)
    finally:
        assert plain.stop() == 0
    refused = subprocess.run(
        [str(TANDEM), "serve", "--repository", str(test_repository), "--loop", "trio"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode != 0
    assert "loop" in refused.stderr and "trio" in refused.stderr
