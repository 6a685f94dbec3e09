"""Dynamic batching, backpressure, request timeouts and drain, against real server processes."""

from __future__ import annotations

import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tandem.protos.inference import grpc_predict_v2_pb2 as pb
from tests.cloud.conftest import DigitsReference, ServerFactory, ServerProcess


def slow_request(x: np.ndarray[Any, Any], timeout_us: int | None = None) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="slow")
    request.inputs.add(name="x", datatype="FP32", shape=x.shape)
    request.raw_input_contents.append(x.astype(np.float32).tobytes())
    if timeout_us is not None:
        request.parameters["timeout"].int64_param = timeout_us
    return request


def y_of(response: pb.ModelInferResponse) -> np.ndarray[Any, Any]:
    return np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(
        response.outputs[0].shape
    )


@pytest.mark.parametrize("model", ["digits", "digits_x2"])
def test_concurrent_mixed_batch_sizes_get_exactly_their_rows(
    model: str, server: ServerProcess, digits_reference: DigitsReference
) -> None:
    stub = server.stub()
    batches_before = server.metric("tandem_inference_batch_size_count", model=model, version="1")
    rows_before = server.metric("tandem_inference_batch_size_sum", model=model, version="1")
    rng = np.random.default_rng(1)
    # Each request's rows are unique (request index in the first pixel), so a row that went
    # to the wrong caller, or a shifted slice, cannot match.
    requests = []
    for i in range(160):
        rows = int(rng.integers(1, 8))
        x = rng.integers(0, 17, size=(rows, 64)).astype(np.float32)
        x[:, 0] = i
        x[:, 1] = np.arange(rows)
        requests.append(x)
    start = threading.Barrier(32)

    def call(index: int) -> tuple[int, np.ndarray[Any, Any], str]:
        if index < 32:
            start.wait()
        x = requests[index]
        request = pb.ModelInferRequest(model_name=model)
        request.inputs.add(name="pixels", datatype="FP32", shape=x.shape)
        request.raw_input_contents.append(x.tobytes())
        response = stub.ModelInfer(request)
        return (
            index,
            np.frombuffer(response.raw_output_contents[0], "<f4").reshape(
                response.outputs[0].shape
            ),
            response.model_version,
        )

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(call, range(len(requests))))
    for index, logits, version in results:
        assert version == "1"
        assert logits.shape == (requests[index].shape[0], 10)
        np.testing.assert_allclose(logits, digits_reference(requests[index]), rtol=1e-4, atol=1e-4)
    batches = (
        server.metric("tandem_inference_batch_size_count", model=model, version="1")
        - batches_before
    )
    rows = server.metric("tandem_inference_batch_size_sum", model=model, version="1") - rows_before
    assert rows == sum(x.shape[0] for x in requests)
    # Requests did share batches: fewer executions than requests.
    assert batches < len(requests), (batches, len(requests))


def test_variable_length_requests_batch_only_with_equal_shapes(server: ServerProcess) -> None:
    stub = server.stub()
    rng = np.random.default_rng(4)
    cases = []
    for _ in range(96):
        rows, length = int(rng.integers(1, 5)), int(rng.integers(1, 4)) * 8
        cases.append(rng.integers(0, 1000, size=(rows, length)).astype(np.int64))

    def call(tokens: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        request = pb.ModelInferRequest(model_name="seqsum")
        tensor = request.inputs.add(name="tokens", datatype="INT64", shape=tokens.shape)
        tensor.contents.int64_contents.extend(tokens.ravel().tolist())
        return y_of(stub.ModelInfer(request))

    with ThreadPoolExecutor(24) as pool:
        results = list(pool.map(call, cases))
    for tokens, total in zip(cases, results, strict=True):
        np.testing.assert_array_equal(total, tokens.sum(axis=1, keepdims=True).astype(np.float32))


def test_full_queue_is_refused_at_once_and_others_complete(
    server: ServerProcess,
) -> None:
    stub = server.stub()
    rows_before = server.metric("tandem_inference_batch_size_sum", model="slow", version="1")
    rng = np.random.default_rng(2)
    xs = [rng.standard_normal((8, 8)).astype(np.float32) for _ in range(24)]

    def call(x: np.ndarray[Any, Any]) -> tuple[str, float, np.ndarray[Any, Any] | None]:
        started = time.monotonic()
        try:
            response = stub.ModelInfer(slow_request(x), timeout=60)
        except grpc.RpcError as exc:
            return exc.code().name, time.monotonic() - started, None
        return "OK", time.monotonic() - started, y_of(response)

    with ThreadPoolExecutor(24) as pool:
        results = list(pool.map(call, xs))
    codes = [code for code, _, _ in results]
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
    assert codes.count("RESOURCE_EXHAUSTED") > 0, codes
    assert codes.count("OK") >= 5, codes  # queue of 4 plus the batch computing
    for (code, _, y), x in zip(results, xs, strict=True):
        if code == "OK":
            np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-5)
    # Refused at once, not after waiting their turn (the median refusal came back before the
    # slowest accepted request), and never computed.
    refused = sorted(t for code, t, _ in results if code == "RESOURCE_EXHAUSTED")
    assert refused[len(refused) // 2] < max(t for code, t, _ in results if code == "OK")
    rows = server.metric("tandem_inference_batch_size_sum", model="slow", version="1")
    assert rows - rows_before == 8 * codes.count("OK")
    # Still serving.
    x = xs[0][:1]
    np.testing.assert_allclose(y_of(stub.ModelInfer(slow_request(x))), x, rtol=1e-5, atol=1e-5)


def test_requests_expiring_in_the_queue_are_not_computed(server: ServerProcess) -> None:
    stub = server.stub()
    expired_before = server.metric(
        "tandem_inference_request_expired_total", model="slow", version="1"
    )
    rows_before = server.metric("tandem_inference_batch_size_sum", model="slow", version="1")
    ok_before = server.metric("tandem_inference_request_success_total", model="slow", version="1")
    x = np.ones((8, 8), dtype=np.float32)
    # Keep the single instance busy (three full batches), then queue short-lived requests.
    busy = [stub.ModelInfer.future(slow_request(x)) for _ in range(3)]
    time.sleep(0.02)
    short = []
    for _ in range(1):
        short.append(stub.ModelInfer.future(slow_request(x[:1], timeout_us=2000)))
    codes = []
    for future in short:
        try:
            future.result(timeout=30)
            codes.append("OK")
        except grpc.RpcError as exc:
            codes.append(exc.code().name)
    for future in busy:
        future.result(timeout=60)
    assert codes == ["DEADLINE_EXCEEDED"]
    wait = time.monotonic() + 5
    while (
        time.monotonic() < wait
        and server.metric("tandem_inference_request_expired_total", model="slow", version="1")
        < expired_before + 1
    ):
        time.sleep(0.05)
    assert (
        server.metric("tandem_inference_request_expired_total", model="slow", version="1")
        == expired_before + 1
    )
    ok = server.metric("tandem_inference_request_success_total", model="slow", version="1")
    rows = server.metric("tandem_inference_batch_size_sum", model="slow", version="1")
    assert ok == ok_before + 3
    assert rows - rows_before == 24  # only the three busy batches were computed


def test_sigterm_drains_queued_requests_then_exits(
    test_repository: Path, server_factory: ServerFactory
) -> None:
    server = server_factory(test_repository, "--model", "slow")
    stub = server.stub()
    channel = grpc.insecure_channel(server.grpc_address)
    server.channels.append(channel)
    watch = health_pb2_grpc.HealthStub(channel).Watch(
        health_pb2.HealthCheckRequest(service=""), timeout=60
    )
    statuses = [next(watch).status]
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal((8, 8)).astype(np.float32) for _ in range(4)]
    futures = [stub.ModelInfer.future(slow_request(x), timeout=60) for x in xs]
    time.sleep(0.1)  # let them arrive and queue
    server.proc.send_signal(signal.SIGTERM)
    statuses += [reply.status for reply in watch]  # the stream ends after NOT_SERVING
    assert statuses == [
        health_pb2.HealthCheckResponse.SERVING,
        health_pb2.HealthCheckResponse.NOT_SERVING,
    ]
    # Stopped accepting while the queued ones are still being computed.
    with pytest.raises(grpc.RpcError) as err:
        server.stub().ModelInfer(slow_request(xs[0]), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert not all(f.done() for f in futures)
    for future, x in zip(futures, xs, strict=True):
        np.testing.assert_allclose(y_of(future.result(timeout=60)), x, rtol=1e-5, atol=1e-5)
    assert server.proc.wait(30) == 0
    log = server.log()
    assert "draining" in log and "stopped" in log
