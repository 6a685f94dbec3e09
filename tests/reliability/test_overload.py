"""The cloud tier at twice its saturation throughput: it sheds with RESOURCE_EXHAUSTED, the
requests it accepts keep a bounded latency, and it recovers fully once the surge ends.

A real `tandem serve` with one CPU-bound model (about 10 ms of work per row, batches of up
to 8, a queue of 32) and the project's load generator (`bench/loadgen.py`, asyncio gRPC, open
loop with Poisson arrivals). The test runs the surge for OVERLOAD_SECONDS (10 by default;
60 for the benchmark figure: `OVERLOAD_SECONDS=60 pytest tests/reliability/test_overload.py`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import numpy as np
import pytest

from tandem.protos.inference import grpc_predict_v2_pb2 as pb
from tests.cloud.conftest import ServerProcess, start_server
from tests.cloud.modelkit import slow_config, slow_onnx, write_config
from tests.conftest import ROOT
from tests.support.figures import Figures

sys.path.insert(0, str(ROOT / "bench"))
from loadgen import LoadResult, check_once, run_load

SURGE_S = float(os.environ.get("OVERLOAD_SECONDS", "10"))
QUEUE = 32
MAX_BATCH = 8


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repository = tmp_path_factory.mktemp("overload-repo")
    config = slow_config("work")
    config["dynamic_batching"] = {"max_queue_delay_us": 500, "max_queue_size": QUEUE}
    write_config(repository / "work", config)
    slow_onnx(repository / "work" / "1" / "model.onnx", layers=8, width=512, copies=128)
    proc = start_server(repository, tmp_path_factory.mktemp("overload"), "--no-access-log")
    yield proc
    proc.stop()


def payload() -> bytes:
    x = np.random.default_rng(0).standard_normal((1, 8)).astype(np.float32)
    request = pb.ModelInferRequest(model_name="work")
    request.inputs.add(name="x", datatype="FP32", shape=x.shape)
    request.raw_input_contents.append(x.tobytes())
    return request.SerializeToString()


def summary(result: LoadResult) -> str:
    s = result.summary()
    return (
        f"{s['throughput_rps']} ok/s, p50 {s['p50_ms']} ms, p99 {s['p99_ms']} ms, "
        f"errors {s['errors'] or 'none'}"
    )


def test_twice_saturation_sheds_keeps_latency_bounded_and_recovers(
    server: ServerProcess, figures: Figures
) -> None:
    target, body = server.grpc_address, payload()
    check_once(target, body)
    calm = run_load(target, body, concurrency=2, duration_s=2, warmup_s=0.5)
    # Saturation: the best closed-loop throughput, with a few clients (small batches, the
    # least overhead per row here) or enough to keep full batches queued.
    saturated = max(
        (run_load(target, body, concurrency=c, duration_s=3, warmup_s=1) for c in (4, 24)),
        key=lambda r: r.throughput,
    )
    capacity = saturated.throughput
    assert capacity > 0 and not saturated.errors, summary(saturated)

    surge = run_load(target, body, rate=2 * capacity, duration_s=SURGE_S, warmup_s=1)
    offered = 2 * capacity * SURGE_S
    shed = surge.errors.get("RESOURCE_EXHAUSTED", 0)
    after = run_load(target, body, concurrency=2, duration_s=2, warmup_s=0.5)

    # A full queue waits at most QUEUE / capacity seconds, plus the batch being computed.
    bound_ms = (QUEUE + 2 * MAX_BATCH) / capacity * 1e3 * 2 + 50
    figures.record(
        f"overload: 2x saturation for {SURGE_S:.0f} s",
        saturation=summary(saturated),
        offered_requests=round(offered),
        accepted=surge.requests,
        shed_resource_exhausted=shed,
        other_errors={k: v for k, v in surge.errors.items() if k != "RESOURCE_EXHAUSTED"},
        accepted_throughput_vs_saturation=round(surge.throughput / capacity, 2),
        accepted_p50_ms=round(surge.percentile(50), 1),
        accepted_p99_ms=round(surge.percentile(99), 1),
        accepted_p99_bound_ms=round(bound_ms, 1),
        before=summary(calm),
        after=summary(after),
    )
    assert set(surge.errors) == {"RESOURCE_EXHAUSTED"}, surge.errors
    assert shed >= 0.1 * offered, (shed, offered)
    # It keeps serving at capacity while it sheds, instead of collapsing.
    assert surge.throughput >= 0.6 * capacity, (surge.throughput, capacity)
    assert surge.percentile(99) <= bound_ms, (surge.percentile(99), bound_ms)
    # Fully recovered: no errors, latency back to what it was before the surge.
    assert not after.errors, after.errors
    assert after.percentile(50) <= 2 * calm.percentile(50) + 5, (summary(calm), summary(after))
    assert server.proc.poll() is None
