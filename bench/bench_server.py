"""Benchmarks of the cloud inference server (`tandem serve`), side by side in one run.

1. digits teacher on CPU, 64 concurrent clients: dynamic batching vs batching off
   (target: >= 4x throughput) -> bench/results/server_batching.txt
2. latency at half the saturation throughput, open loop (target: p99 <= 3x p50)
   -> bench/results/server_batching.txt
3. against Seldon MLServer 1.7 serving the same ONNX file with its adaptive batching, same
   load generator, same machine (target: >= 2x throughput at equal or lower p99)
   -> bench/results/server_mlserver.txt. MLServer 1.7 ships no ONNX runtime, so the benchmark
   writes a small custom MLServer runtime (`MLSERVER_RUNTIME` below) that runs onnxruntime
   with the same thread settings as ours; MLServer lives in its own virtualenv
   (build/venvs/mlserver) because it pins an older FastAPI and protobuf.
4. minilm FP32 (when the zoo has it): batch 1 and with batching, on CPU
   -> bench/results/server_minilm.txt

Everything runs on loopback with bounded durations. Run with
`.venv/bin/python -m pytest bench/bench_server.py --benchmark-only -s` (or `make bench`), or
`.venv/bin/python bench/bench_server.py`. BENCH_DURATION / BENCH_WARMUP (seconds) override
the per-measurement time.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from loadgen import LoadResult, check_once, run_load  # noqa: E402

from tandem.protos.inference import grpc_predict_v2_pb2 as pb  # noqa: E402
from tests.support.processes import free_port, stop_process, wait_for_port, wait_until  # noqa: E402

RESULTS = ROOT / "bench" / "results"
WORK = ROOT / "build" / "bench-server"
ZOO = ROOT / "build" / "test-zoo"
MLSERVER_VENV = ROOT / "build" / "venvs" / "mlserver"
DURATION = float(os.environ.get("BENCH_DURATION", "10"))
WARMUP = float(os.environ.get("BENCH_WARMUP", "2"))
CONCURRENCY = 64
DIGITS_BATCHING = {
    "max_queue_delay_us": 2000,
    "preferred_batch_sizes": [16, 32, 64],
    "max_queue_size": 1024,
}


# --- models ------------------------------------------------------------------------------
def zoo_repository(models: tuple[str, ...]) -> Path:
    from tandem.cloud.build.pipeline import build_zoo

    build_zoo(ZOO, models=models)
    return ZOO / "repository"


def latest_version(model_dir: Path) -> Path:
    versions = sorted(int(p.name) for p in model_dir.iterdir() if p.name.isdigit())
    return model_dir / str(versions[-1])


def digits_bench_repository() -> tuple[Path, Path]:
    """(repository, teacher.onnx): the zoo's digits teacher served twice, batching on/off."""
    override = os.environ.get("BENCH_DIGITS_ONNX")  # another digits-shaped ONNX file
    if override:
        source = Path(override)
        zoo_config = {
            "backend": "onnxruntime",
            "max_batch_size": 64,
            "input": [{"name": "pixels", "datatype": "FP32", "dims": [64]}],
            "output": [{"name": "logits", "datatype": "FP32", "dims": [10]}],
        }
    else:
        source = latest_version(zoo_repository(("digits",)) / "digits") / "model.onnx"
        zoo_config = json.loads((source.parent.parent / "config.json").read_text())
    repo = WORK / "digits-repository"
    shutil.rmtree(repo, ignore_errors=True)
    threads = str(max(1, (os.cpu_count() or 1)))
    for name, batching in (("digits", DIGITS_BATCHING), ("digits_nobatch", None)):
        config = dict(
            zoo_config,
            name=name,
            instance_group={"count": 1, "kind": "cpu"},
            parameters={"threads": threads},
        )
        config.pop("dynamic_batching", None)
        if batching is not None:
            config["dynamic_batching"] = batching
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "config.json").write_text(json.dumps(config, indent=2))
        shutil.copyfile(source, repo / name / "1" / "model.onnx")
    return repo, source


def digits_payload(model: str, rows: int = 1) -> bytes:
    x = np.random.default_rng(0).integers(0, 17, size=(rows, 64)).astype(np.float32)
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="pixels", datatype="FP32", shape=x.shape)
    request.raw_input_contents.append(x.tobytes())
    return request.SerializeToString()


# --- servers -----------------------------------------------------------------------------
@contextmanager
def tandem_server(repository: Path, *models: str) -> Iterator[str]:
    grpc_port = free_port()
    log = (WORK / f"tandem-{grpc_port}.log").open("wb")
    args = [
        str(ROOT / ".venv" / "bin" / "tandem"),
        "serve",
        "--repository",
        str(repository),
        "--grpc-port",
        str(grpc_port),
        "--http-port",
        str(free_port()),
        "--metrics-port",
        str(free_port()),
        "--no-access-log",
    ]
    for model in models:
        args += ["--model", model]
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        wait_for_port(grpc_port, proc=proc, timeout=120)
        yield f"127.0.0.1:{grpc_port}"
    finally:
        stop_process(proc, timeout=30)
        log.close()


MLSERVER_RUNTIME = '''
"""A minimal MLServer runtime running an ONNX file with onnxruntime (MLServer 1.7 has none)."""
import os

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri


class OnnxRuntimeModel(MLModel):
    async def load(self) -> bool:
        uri = await get_model_uri(self._settings)
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(os.environ.get("BENCH_ORT_THREADS", "1"))
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = ort.InferenceSession(uri, options, providers=["CPUExecutionProvider"])
        self._outputs = [o.name for o in self._session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds = {i.name: NumpyCodec.decode_input(i) for i in payload.inputs}
        results = self._session.run(self._outputs, feeds)
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            outputs=[NumpyCodec.encode_output(n, r) for n, r in zip(self._outputs, results)],
        )
'''


def ensure_mlserver() -> Path:
    """build/venvs/mlserver with mlserver 1.7 and onnxruntime (created once, then reused)."""
    exe = MLSERVER_VENV / "bin" / "mlserver"
    python = MLSERVER_VENV / "bin" / "python"
    if (
        exe.exists()
        and subprocess.run(
            [str(python), "-c", "import mlserver, onnxruntime"], capture_output=True
        ).returncode
        == 0
    ):
        return exe
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(MLSERVER_VENV)], check=True)
    subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            "mlserver==1.7.*",
            "onnxruntime",
            "numpy",
        ],
        check=True,
        timeout=1200,
    )
    return exe


@contextmanager
def mlserver(
    onnx_file: Path,
    threads: int,
    max_batch_size: int,
    max_batch_time_s: float,
    parallel_workers: int,
) -> Iterator[str]:
    exe = ensure_mlserver()
    folder = WORK / "mlserver"
    shutil.rmtree(folder, ignore_errors=True)
    model_dir = folder / "digits"
    model_dir.mkdir(parents=True)
    shutil.copyfile(onnx_file, model_dir / "model.onnx")
    (folder / "onnx_runtime.py").write_text(textwrap.dedent(MLSERVER_RUNTIME))
    (model_dir / "onnx_runtime.py").write_text(textwrap.dedent(MLSERVER_RUNTIME))
    grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
    (folder / "settings.json").write_text(
        json.dumps(
            {
                "host": "127.0.0.1",
                "grpc_port": grpc_port,
                "http_port": http_port,
                "metrics_port": metrics_port,
                "parallel_workers": parallel_workers,
                "debug": False,
                "logging_level": "WARNING",
            }
        )
    )
    (model_dir / "model-settings.json").write_text(
        json.dumps(
            {
                "name": "digits",
                "implementation": "onnx_runtime.OnnxRuntimeModel",
                "parameters": {"uri": "./model.onnx"},
                "max_batch_size": max_batch_size,
                "max_batch_time": max_batch_time_s,
            }
        )
    )
    log = (WORK / f"mlserver-{grpc_port}.log").open("wb")
    env = dict(os.environ, BENCH_ORT_THREADS=str(threads))
    proc = subprocess.Popen(
        [str(exe), "start", "."],
        cwd=folder,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    target = f"127.0.0.1:{grpc_port}"
    try:
        wait_for_port(grpc_port, proc=proc, timeout=180)
        payload = digits_payload("digits")

        def answers() -> bool:
            try:
                check_once(target, payload)
            except Exception:  # noqa: BLE001 - not ready yet, whatever the error
                return False
            return True

        wait_until(answers, timeout=120, interval=0.5, message="MLServer answers")
        yield target
    finally:
        stop_process(proc, timeout=30)
        log.close()


# --- measurements ------------------------------------------------------------------------
def closed(
    target: str, payload: bytes, rows: int = 1, concurrency: int = CONCURRENCY
) -> LoadResult:
    check_once(target, payload)
    return run_load(
        target,
        payload,
        rows_per_request=rows,
        concurrency=concurrency,
        duration_s=DURATION,
        warmup_s=WARMUP,
    )


def line(label: str, r: LoadResult) -> str:
    s = r.summary()
    errors = f" errors={s['errors']}" if s["errors"] else ""
    return (
        f"{label:<44} {s['throughput_rps']:>9.1f} req/s {s['rows_per_s']:>9.1f} rows/s  "
        f"p50 {s['p50_ms']:>8.2f} ms  p90 {s['p90_ms']:>8.2f} ms  p99 {s['p99_ms']:>8.2f} ms"
        f"{errors}"
    )


def header(title: str) -> list[str]:
    load = os.getloadavg()
    return [
        f"# {title}",
        f"# {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M UTC}; {platform.node()}; "
        f"{os.cpu_count()} CPUs; python {platform.python_version()}",
        f"# load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (other work shares "
        "this machine: figures are noisy; re-run on a quiet machine for final numbers)",
        f"# load generator: bench/loadgen.py, asyncio gRPC, closed loop, {DURATION:.0f} s "
        f"measured after {WARMUP:.0f} s warm-up, loopback",
        "",
    ]


def write(name: str, lines: list[str]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return path


def bench_batching() -> dict[str, Any]:
    WORK.mkdir(parents=True, exist_ok=True)
    repo, source = digits_bench_repository()
    with tandem_server(repo, "digits", "digits_nobatch") as target:
        off = closed(target, digits_payload("digits_nobatch"))
        on = closed(target, digits_payload("digits"))
        saturation = on.throughput
        half = run_load(
            target,
            digits_payload("digits"),
            rate=saturation / 2,
            duration_s=DURATION,
            warmup_s=WARMUP,
        )
    ratio = on.throughput / off.throughput if off.throughput else float("inf")
    tail = half.percentile(99) / half.percentile(50)
    lines = header("tandem serve: digits teacher on CPU, ONNX Runtime, 1 instance")
    lines += [
        f"# model: {source.relative_to(ROOT) if source.is_relative_to(ROOT) else source}",
        line(f"batching off, {CONCURRENCY} clients", off),
        line(f"dynamic batching (2 ms, 16/32/64), {CONCURRENCY} clients", on),
        f"throughput ratio batching/off: {ratio:.2f}x (target >= 4x: "
        f"{'met' if ratio >= 4 else 'MISSED'})",
        "",
        line(f"open loop at half saturation ({saturation / 2:.0f} req/s)", half),
        f"p99/p50 at half saturation: {tail:.2f} (target <= 3: {'met' if tail <= 3 else 'MISSED'})",
    ]
    write("server_batching.txt", lines)
    return {
        "ratio": ratio,
        "p99_over_p50": tail,
        "on_rps": on.throughput,
        "off_rps": off.throughput,
    }


def bench_mlserver() -> dict[str, Any]:
    WORK.mkdir(parents=True, exist_ok=True)
    repo, onnx_file = digits_bench_repository()
    threads = max(1, os.cpu_count() or 1)
    with tandem_server(repo, "digits") as target:
        ours = closed(target, digits_payload("digits"))
    results: list[tuple[str, LoadResult]] = []
    for workers in (1, 0):
        label = f"MLServer 1.7, adaptive batching (64, 2 ms), parallel_workers={workers}"
        with mlserver(onnx_file, threads, 64, 0.002, workers) as target:
            results.append((label, closed(target, digits_payload("digits"))))
    _, best = max(results, key=lambda item: item[1].throughput)
    ratio = ours.throughput / best.throughput if best.throughput else float("inf")
    met = ratio >= 2 and ours.percentile(99) <= best.percentile(99)
    lines = header("tandem serve vs Seldon MLServer 1.7: same digits teacher ONNX file")
    lines += [
        f"# model: {onnx_file.relative_to(ROOT) if onnx_file.is_relative_to(ROOT) else onnx_file}",
        line("tandem serve, dynamic batching (64, 2 ms)", ours),
    ]
    lines += [line(label, r) for label, r in results]
    lines += [
        f"throughput ratio tandem/MLServer (best MLServer config): {ratio:.2f}x; p99 "
        f"{ours.percentile(99):.2f} ms vs {best.percentile(99):.2f} ms "
        f"(target >= 2x at equal or lower p99: {'met' if met else 'MISSED'})",
        "# MLServer runs the ONNX file through a ~30-line custom runtime (onnxruntime, same "
        "thread settings); see MLSERVER_RUNTIME in bench/bench_server.py.",
    ]
    write("server_mlserver.txt", lines)
    return {"ratio": ratio, "ours_p99": ours.percentile(99), "mlserver_p99": best.percentile(99)}


def minilm_payload(model: str, rows: int, seq: int = 32) -> bytes:
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 20000, size=(rows, seq)).astype(np.int64)
    ids[:, 0] = 101
    ids[:, -1] = 102
    mask = np.ones_like(ids)
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="input_ids", datatype="INT64", shape=ids.shape)
    request.inputs.add(name="attention_mask", datatype="INT64", shape=mask.shape)
    request.raw_input_contents.extend([ids.tobytes(), mask.tobytes()])
    return request.SerializeToString()


def bench_minilm() -> dict[str, Any]:
    WORK.mkdir(parents=True, exist_ok=True)
    source = zoo_repository(("minilm",)) / "minilm"
    repo = WORK / "minilm-repository"
    shutil.rmtree(repo, ignore_errors=True)
    zoo_config = json.loads((source / "config.json").read_text())
    version = latest_version(source)
    threads = str(max(1, os.cpu_count() or 1))
    for name, batching in (("minilm", True), ("minilm_nobatch", False)):
        config = dict(
            zoo_config,
            name=name,
            instance_group={"count": 1, "kind": "auto"},
            parameters={"threads": threads},
        )
        if not batching:
            config.pop("dynamic_batching", None)
        (repo / name).mkdir(parents=True)
        (repo / name / "config.json").write_text(json.dumps(config, indent=2))
        shutil.copytree(version, repo / name / "1")
    with tandem_server(repo, "minilm", "minilm_nobatch") as target:
        single = closed(target, minilm_payload("minilm_nobatch", 1), concurrency=1)
        unbatched = closed(target, minilm_payload("minilm_nobatch", 1), concurrency=16)
        batched = closed(target, minilm_payload("minilm", 1), concurrency=16)
    lines = header("tandem serve: minilm FP32 (zoo) on CPU, ONNX Runtime, 32 tokens/request")
    lines += [
        line("batch 1, 1 client, batching off", single),
        line("batch 1, 16 clients, batching off", unbatched),
        line("batch 1, 16 clients, dynamic batching", batched),
        f"throughput ratio batching/off at 16 clients: "
        f"{batched.throughput / max(unbatched.throughput, 1e-9):.2f}x",
        "# device: CPU (no GPU on this machine)",
    ]
    write("server_minilm.txt", lines)
    return {"single_p50": single.percentile(50), "batched_rps": batched.throughput}


# --- pytest-benchmark entry points (one round each: these are load tests) -----------------
def test_batching_vs_off(benchmark: Any) -> None:
    benchmark.extra_info.update(benchmark.pedantic(bench_batching, rounds=1, iterations=1))


def test_against_mlserver(benchmark: Any) -> None:
    benchmark.extra_info.update(benchmark.pedantic(bench_mlserver, rounds=1, iterations=1))


def test_minilm(benchmark: Any) -> None:
    benchmark.extra_info.update(benchmark.pedantic(bench_minilm, rounds=1, iterations=1))


if __name__ == "__main__":
    which = sys.argv[1:] or ["batching", "mlserver", "minilm"]
    for name in which:
        started = time.monotonic()
        globals()[f"bench_{name}"]()
        print(f"# {name}: {time.monotonic() - started:.0f} s")
