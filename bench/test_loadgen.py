"""The h2load path of the load generator counts only real answers: a run in which some calls
fail must raise, not report them as throughput (h2load itself sees HTTP 200 for a gRPC error).
Runs with `make bench` (which installs h2load); skipped where h2load is missing."""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loadgen import h2load_available, run_h2load

pytestmark = pytest.mark.skipif(not h2load_available(), reason="h2load (nghttp2-client) missing")

ANSWER = b"\x0a\x06digits\x12\x011"  # ModelInferResponse(model_name="digits", model_version="1")


@pytest.fixture
def server() -> Iterator[tuple[str, dict[str, int]]]:
    """A gRPC server on loopback answering ModelInfer; fails every `fail_every`-th call."""
    settings = {"fail_every": 0}
    calls = itertools.count(1)

    def infer(request: bytes, context: grpc.ServicerContext) -> bytes:
        n = next(calls)
        if settings["fail_every"] and n % settings["fail_every"] == 0:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")
        return ANSWER

    handler = grpc.method_handlers_generic_handler(
        "inference.GRPCInferenceService",
        {"ModelInfer": grpc.unary_unary_rpc_method_handler(infer)},
    )
    server = grpc.server(ThreadPoolExecutor(4))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", settings
    finally:
        server.stop(0)


def test_every_answer_counts(server: tuple[str, dict[str, Any]]) -> None:
    target, _ = server
    closed = run_h2load(target, b"", concurrency=8, duration_s=1, warmup_s=0.5)
    assert closed.requests >= 200 and len(closed.latencies_ms) == closed.requests
    assert closed.throughput > 0
    opened = run_h2load(target, b"", rate=200, duration_s=1, warmup_s=0)
    assert opened.requests == 200 and opened.mode == "open"
    assert 150 < opened.throughput < 260  # paced, not as fast as it can


def test_failed_calls_raise(server: tuple[str, dict[str, Any]]) -> None:
    target, settings = server
    settings["fail_every"] = 50
    with pytest.raises(RuntimeError, match="some calls failed"):
        run_h2load(target, b"", concurrency=8, duration_s=1, warmup_s=0.5)
