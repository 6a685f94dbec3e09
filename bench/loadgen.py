"""A V2 gRPC load generator: N concurrent clients (closed loop) or a fixed arrival rate (open
loop), for a bounded time, against a loopback address only.

The request is serialised once and sent as raw bytes, and responses are not parsed on the hot
path (one in every `check_every` is, and its status counted), so the client spends its CPU on
the wire, not on protobuf: the server, not the load generator, should be the bottleneck.
Clients can be spread over several processes (`processes`); latencies are merged.

    python bench/loadgen.py --target 127.0.0.1:8001 --model digits --rows 1 \\
        --concurrency 64 --duration 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import random
import re
import shutil
import statistics
import struct
import subprocess
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

METHOD = "/inference.GRPCInferenceService/ModelInfer"
H2LOAD_TIMEOUT_S = 900


@dataclass
class LoadResult:
    mode: str
    concurrency: int
    target_rate: float | None
    duration_s: float
    requests: int
    rows_per_request: int
    errors: dict[str, int] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list, repr=False)

    @property
    def throughput(self) -> float:
        """Successful requests per second."""
        return self.requests / self.duration_s if self.duration_s else 0.0

    def percentile(self, q: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        ordered = sorted(self.latencies_ms)
        index = min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))  # nearest rank
        return ordered[index]

    def summary(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "concurrency": self.concurrency,
            "target_rate": self.target_rate,
            "duration_s": round(self.duration_s, 2),
            "requests": self.requests,
            "throughput_rps": round(self.throughput, 1),
            "rows_per_s": round(self.throughput * self.rows_per_request, 1),
            "p50_ms": round(self.percentile(50), 3),
            "p90_ms": round(self.percentile(90), 3),
            "p99_ms": round(self.percentile(99), 3),
            "mean_ms": round(statistics.fmean(self.latencies_ms), 3) if self.latencies_ms else None,
            "errors": dict(self.errors),
        }


def _check_loopback(target: str) -> None:
    host = target.rsplit(":", 1)[0].strip("[]")
    if host not in ("localhost", "::1") and not host.startswith("127."):
        raise ValueError(f"load generator only targets loopback addresses, not {target!r}")


async def _closed_loop(
    target: str,
    payload: bytes,
    concurrency: int,
    duration_s: float,
    warmup_s: float,
    metadata: tuple[tuple[str, str], ...],
    channels: int,
) -> tuple[int, list[float], Counter[str], float]:
    pool = [
        aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(channels)
    ]
    calls = [ch.unary_unary(METHOD) for ch in pool]  # bytes in, bytes out
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    done = 0
    start = time.perf_counter()
    measure_from = start + warmup_s
    stop_at = measure_from + duration_s

    async def client(index: int) -> None:
        nonlocal done
        call = calls[index % len(calls)]
        while True:
            sent = time.perf_counter()
            if sent >= stop_at:
                return
            try:
                await call(payload, metadata=metadata or None, timeout=30)
                ok = True
            except grpc.RpcError as exc:
                ok = False
                if sent >= measure_from:
                    errors[exc.code().name] += 1
            now = time.perf_counter()
            if ok and sent >= measure_from and now <= stop_at:
                done += 1
                latencies.append((now - sent) * 1e3)

    await asyncio.gather(*(client(i) for i in range(concurrency)))
    for ch in pool:
        await ch.close()
    return done, latencies, errors, duration_s


async def _open_loop(
    target: str,
    payload: bytes,
    rate: float,
    duration_s: float,
    warmup_s: float,
    metadata: tuple[tuple[str, str], ...],
    channels: int,
    seed: int,
) -> tuple[int, list[float], Counter[str], float]:
    pool = [
        aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(channels)
    ]
    calls = [ch.unary_unary(METHOD) for ch in pool]
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    done = 0
    rng = random.Random(seed)
    start = time.perf_counter()
    measure_from = start + warmup_s
    stop_at = measure_from + duration_s
    tasks: set[asyncio.Task[None]] = set()

    async def one(index: int, sent: float) -> None:
        nonlocal done
        try:
            await calls[index % len(calls)](payload, metadata=metadata or None, timeout=30)
        except grpc.RpcError as exc:
            if sent >= measure_from:
                errors[exc.code().name] += 1
            return
        if sent >= measure_from:
            done += 1
            latencies.append((time.perf_counter() - sent) * 1e3)

    # Poisson arrivals: latency is measured from the scheduled send time, so a client that
    # falls behind shows up in the latencies (no coordinated omission).
    next_send = start
    index = 0
    while next_send < stop_at:
        now = time.perf_counter()
        if next_send > now:
            await asyncio.sleep(next_send - now)
        task = asyncio.create_task(one(index, next_send))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        index += 1
        next_send += rng.expovariate(rate)
    if tasks:
        await asyncio.gather(*tasks)
    for ch in pool:
        await ch.close()
    return done, latencies, errors, duration_s


def _worker(args: dict[str, Any]) -> tuple[int, list[float], dict[str, int], float]:
    if args["rate"] is None:
        result = asyncio.run(
            _closed_loop(
                args["target"],
                args["payload"],
                args["concurrency"],
                args["duration_s"],
                args["warmup_s"],
                args["metadata"],
                args["channels"],
            )
        )
    else:
        result = asyncio.run(
            _open_loop(
                args["target"],
                args["payload"],
                args["rate"],
                args["duration_s"],
                args["warmup_s"],
                args["metadata"],
                args["channels"],
                args["seed"],
            )
        )
    done, latencies, errors, duration = result
    return done, latencies, dict(errors), duration


def run_load(
    target: str,
    payload: bytes,
    *,
    rows_per_request: int = 1,
    concurrency: int = 64,
    rate: float | None = None,
    duration_s: float = 10.0,
    warmup_s: float = 2.0,
    processes: int = 1,
    channels: int = 4,
    metadata: tuple[tuple[str, str], ...] = (),
) -> LoadResult:
    """Closed loop with `concurrency` clients, or open loop at `rate` requests/s."""
    _check_loopback(target)
    if duration_s <= 0 or duration_s > 600:
        raise ValueError("duration_s must be in (0, 600]")
    jobs = []
    for p in range(processes):
        jobs.append(
            {
                "target": target,
                "payload": payload,
                "concurrency": concurrency // processes + (1 if p < concurrency % processes else 0),
                "rate": rate / processes if rate is not None else None,
                "duration_s": duration_s,
                "warmup_s": warmup_s,
                "metadata": metadata,
                "channels": channels,
                "seed": p,
            }
        )
    if processes == 1:
        parts = [_worker(jobs[0])]
    else:
        with multiprocessing.get_context("spawn").Pool(processes) as pool:
            parts = pool.map(_worker, jobs)
    result = LoadResult(
        mode="closed" if rate is None else "open",
        concurrency=concurrency,
        target_rate=rate,
        duration_s=duration_s,
        requests=0,
        rows_per_request=rows_per_request,
    )
    errors: Counter[str] = Counter()
    for done, latencies, errs, _ in parts:
        result.requests += done
        result.latencies_ms.extend(latencies)
        errors.update(errs)
    result.errors = dict(errors)
    return result


def h2load_available() -> bool:
    return shutil.which("h2load") is not None


def call_raw(target: str, payload: bytes, metadata: tuple[tuple[str, str], ...] = ()) -> bytes:
    """Sends the payload once and returns the response message's bytes as they came."""
    _check_loopback(target)
    with grpc.insecure_channel(target) as channel:
        raw: bytes = channel.unary_unary(METHOD)(payload, metadata=metadata or None, timeout=30)
    return raw


def _h2load(args: list[str]) -> str:
    proc = subprocess.run(
        ["h2load", *args], capture_output=True, text=True, timeout=H2LOAD_TIMEOUT_S, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"h2load failed ({proc.returncode}): {proc.stderr or proc.stdout}")
    return proc.stdout


def run_h2load(
    target: str,
    payload: bytes,
    *,
    rows_per_request: int = 1,
    concurrency: int = 64,
    rate: float | None = None,
    duration_s: float = 10.0,
    warmup_s: float = 2.0,
    connections: int | None = None,
    metadata: tuple[tuple[str, str], ...] = (),
) -> LoadResult:
    """The same measurement as `run_load`, made by nghttp2's h2load (C, Debian package
    nghttp2-client), which spends a fraction of the CPU per call that a Python gRPC client
    does: on a small machine the load generator shares the cores with the server under test.

    A gRPC unary call is an HTTP/2 POST of one length-prefixed message, so h2load can send it.
    h2load does not read gRPC trailers, so every call is checked by its answer's size: an error
    is a trailers-only response with no body, and each successful answer carries exactly the
    bytes of the answer to one checked call (`call_raw`). A run of N requests (`-n`, counted
    from the warm-up's rate for the closed loop) must return N such answers, or it raises.
    Closed loop: `connections` connections (default: 4, at most `concurrency`) with
    concurrency / connections streams each.
    Open loop: `connections` clients sending at rate / connections each, at a constant pace
    (h2load's --rps), with enough streams that they never wait for an answer to send.
    """
    _check_loopback(target)
    if duration_s <= 0 or duration_s > 600:
        raise ValueError("duration_s must be in (0, 600]")
    connections = connections or min(4, concurrency)
    answer = call_raw(target, payload, metadata)
    frame = 5 + len(answer)  # gRPC message prefix: 1 flag byte, 4 length bytes
    with tempfile.TemporaryDirectory(prefix="h2load-") as tmp:
        body = Path(tmp) / "request.bin"
        body.write_bytes(b"\0" + struct.pack(">I", len(payload)) + payload)
        url = f"http://{target}{METHOD}"
        common = ["-d", str(body), "-H", "content-type: application/grpc", "-H", "te: trailers"]
        for key, value in metadata:
            common += ["-H", f"{key}: {value}"]
        if rate is None:
            streams = max(1, concurrency // connections)
            shape = ["-c", str(connections), "-m", str(streams)]
            warm = _h2load([*shape, "-D", f"{max(warmup_s, 0.5) * 1000:.0f}ms", *common, url])
            requests = max(200, round(_finished(warm)[1] * duration_s))
        else:
            per_client = rate / connections
            streams = max(64, concurrency)
            shape = ["-c", str(connections), "-m", str(streams), f"--rps={per_client:.3f}"]
            if warmup_s > 0:
                _h2load([*shape, "-D", f"{warmup_s * 1000:.0f}ms", *common, url])
            requests = max(connections, round(rate * duration_s))
        log = Path(tmp) / "requests.log"
        out = _h2load([*shape, "-n", str(requests), "--log-file", str(log), *common, url])
        elapsed, _ = _finished(out)
        data = _traffic_data_bytes(out)
        latencies = [int(row.split("\t")[2]) / 1e3 for row in log.read_text().splitlines()]
    if data != requests * frame or len(latencies) != requests:
        raise RuntimeError(
            f"h2load: {requests} requests to {target} got {data / frame:.1f} answers of "
            f"{frame} bytes and {len(latencies)} logged: some calls failed"
        )
    return LoadResult(
        mode="closed" if rate is None else "open",
        concurrency=concurrency,
        target_rate=rate,
        duration_s=elapsed,
        requests=requests,
        rows_per_request=rows_per_request,
        latencies_ms=latencies,
    )


def _finished(out: str) -> tuple[float, float]:
    """(seconds, requests/s) from h2load's `finished in 5.00s, 2573.80 req/s, ...` line."""
    match = re.search(r"finished in ([\d.]+)(ms|s), ([\d.]+) req/s", out)
    if match is None:
        raise RuntimeError(f"h2load printed no summary:\n{out}")
    scale = 1e-3 if match.group(2) == "ms" else 1.0
    return float(match.group(1)) * scale, float(match.group(3))


def _traffic_data_bytes(out: str) -> int:
    match = re.search(r"traffic: .*?\((\d+)\) data", out)
    if match is None:
        raise RuntimeError(f"h2load printed no traffic line:\n{out}")
    return int(match.group(1))


def check_once(target: str, payload: bytes, metadata: tuple[tuple[str, str], ...] = ()) -> Any:
    """Sends the payload once and returns the parsed response (raises on an error status)."""
    from tandem.protos.inference import grpc_predict_v2_pb2 as pb

    _check_loopback(target)
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(METHOD)
        raw = call(payload, metadata=metadata or None, timeout=30)
    return pb.ModelInferResponse.FromString(raw)


def main() -> None:
    import numpy as np

    from tandem.protos.inference import grpc_predict_v2_pb2 as pb

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="127.0.0.1:8001")
    parser.add_argument("--model", default="digits")
    parser.add_argument("--input", default="pixels")
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rate", type=float, default=None)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--processes", type=int, default=1)
    args = parser.parse_args()
    x = np.random.default_rng(0).integers(0, 17, (args.rows, args.features)).astype(np.float32)
    request = pb.ModelInferRequest(model_name=args.model)
    request.inputs.add(name=args.input, datatype="FP32", shape=x.shape)
    request.raw_input_contents.append(x.tobytes())
    payload = request.SerializeToString()
    check_once(args.target, payload)
    result = run_load(
        args.target,
        payload,
        rows_per_request=args.rows,
        concurrency=args.concurrency,
        rate=args.rate,
        duration_s=args.duration,
        warmup_s=args.warmup,
        processes=args.processes,
    )
    print(json.dumps(result.summary(), indent=2))


if __name__ == "__main__":
    main()
