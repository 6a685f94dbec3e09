"""The models and servers that bench/bench_server.py measures.

The digits and minilm repositories built from the test zoo and their request payloads, and the
servers under test: `tandem serve`, a no-op grpc.aio server (the frontend ceiling) and Seldon
MLServer 1.7 in its own virtualenv (build/venvs/mlserver) with a small custom ONNX runtime
(`MLSERVER_RUNTIME`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from loadgen import check_once  # noqa: E402

from tandem.protos.inference import grpc_predict_v2_pb2 as pb  # noqa: E402
from tests.support.processes import free_port, stop_process, wait_for_port, wait_until  # noqa: E402

# Runtime threads for every server under test (ours and MLServer alike): the cores left after
# one for the server's event loop and gRPC, as `tandem serve` defaults to.
THREADS = max(1, (os.cpu_count() or 1) - 1)
WORK = ROOT / "build" / "bench-server"
ZOO = ROOT / "build" / "test-zoo"
MLSERVER_VENV = ROOT / "build" / "venvs" / "mlserver"
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
    threads = str(THREADS)
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


NOOP_SERVER = """
import asyncio, sys
import grpc
from grpc import aio

async def main(port):
    async def infer(request, context):
        return RESPONSE
    handler = grpc.method_handlers_generic_handler(
        "inference.GRPCInferenceService",
        {"ModelInfer": grpc.unary_unary_rpc_method_handler(infer)})
    server = aio.server()
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()

RESPONSE = bytes.fromhex(sys.argv[2])
try:  # the event loop tandem serve runs on by default
    import uvloop
except ImportError:
    asyncio.run(main(int(sys.argv[1])))
else:
    uvloop.run(main(int(sys.argv[1])))
"""


@contextmanager
def noop_server() -> Iterator[str]:
    """A grpc.aio server that answers ModelInfer with a fixed response and does nothing else:
    the ceiling any Python asyncio gRPC server reaches on this machine with this client
    (on uvloop when installed, as `tandem serve`)."""
    response = pb.ModelInferResponse(model_name="digits", model_version="1")
    response.outputs.add(name="logits", datatype="FP32", shape=[1, 10])
    response.raw_output_contents.append(bytes(40))
    port = free_port()
    script = WORK / "noop_server.py"
    script.write_text(NOOP_SERVER)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(port), response.SerializeToString().hex()]
    )
    try:
        wait_for_port(port, proc=proc, timeout=60)
        yield f"127.0.0.1:{port}"
    finally:
        stop_process(proc, timeout=10)


MLSERVER_VENV_CHECK = (
    "import mlserver, onnxruntime, uvloop; "
    "assert tuple(map(int, uvloop.__version__.split('.')[:2])) < (0, 22)"
)


def ensure_mlserver() -> Path:
    """build/venvs/mlserver with mlserver 1.7 and onnxruntime (created once, then reused)."""
    exe = MLSERVER_VENV / "bin" / "mlserver"
    python = MLSERVER_VENV / "bin" / "python"
    if (
        exe.exists()
        and subprocess.run([str(python), "-c", MLSERVER_VENV_CHECK], capture_output=True).returncode
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
            # MLServer 1.7's parallel workers call asyncio.get_event_loop() with no loop set,
            # which uvloop 0.22 turned into an error: its inference pool never starts.
            "uvloop<0.22",
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
    name: str = "mlserver",
) -> Iterator[str]:
    exe = ensure_mlserver()
    folder = WORK / name
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
