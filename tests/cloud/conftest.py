"""Fixtures for the inference server's tests: a model repository and REAL server processes.

Every server is `.venv/bin/tandem serve ...` in a subprocess on free loopback ports, stopped
with SIGTERM (then SIGKILL) after the test; its log is kept for failing assertions.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from tandem.protos.inference import grpc_predict_v2_pb2 as pb
from tandem.protos.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from tests.cloud.modelkit import build_test_repository
from tests.conftest import ROOT
from tests.support.processes import free_port, stop_process, wait_for_port, wait_until

TANDEM = Path(sys.executable).parent / "tandem"


@dataclass
class ServerProcess:
    proc: subprocess.Popen[bytes]
    grpc_port: int
    http_port: int
    metrics_port: int
    log_path: Path
    token: str | None = None
    channels: list[grpc.Channel] = field(default_factory=list)

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def stub(self, token: str | None = None, **options: int) -> pb_grpc.GRPCInferenceServiceStub:
        channel = grpc.insecure_channel(self.grpc_address, options=list(options.items()))
        self.channels.append(channel)
        return pb_grpc.GRPCInferenceServiceStub(channel)

    def metadata(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.token}")] if self.token else []

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics_text(self) -> str:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5
        ) as r:
            return str(r.read().decode())

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample from a fresh scrape (0 when absent)."""
        want = ",".join(f'{k}="{v}"' for k, v in labels.items())
        for line in self.metrics_text().splitlines():
            if line.startswith("#"):
                continue
            key, _, value = line.rpartition(" ")
            if key == name or (
                want
                and key.startswith(name + "{")
                and all(f'{k}="{v}"' in key for k, v in labels.items())
            ):
                return float(value)
        return 0.0

    def stop(self) -> int:
        for channel in self.channels:
            channel.close()
        stop_process(self.proc, timeout=20)
        return self.proc.returncode


def http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def http_post(
    url: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    request = urllib.request.Request(
        url,
        data=body,
        method="POST",
        headers={"content-type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def start_server(
    repository: Path,
    log_dir: Path,
    *args: str,
    token: str | None = None,
    wait_ready: bool = True,
) -> ServerProcess:
    grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"server-{grpc_port}.log"
    command = [
        str(TANDEM),
        "serve",
        "--repository",
        str(repository),
        "--grpc-port",
        str(grpc_port),
        "--http-port",
        str(http_port),
        "--metrics-port",
        str(metrics_port),
        *args,
    ]
    if token is not None:
        command += ["--token", token]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    server = ServerProcess(proc, grpc_port, http_port, metrics_port, log_path, token)
    if wait_ready:
        try:
            wait_for_port(grpc_port, proc=proc, timeout=60)
            wait_for_port(http_port, proc=proc, timeout=30)
            wait_until(
                lambda: http_get(f"{server.http_url}/v2/health/ready")[0] == 200,
                timeout=30,
                message="server ready",
            )
        except (TimeoutError, RuntimeError) as exc:
            server.stop()
            raise RuntimeError(f"server did not start: {exc}\n{server.log()}") from exc
    return server


ServerFactory = Callable[..., ServerProcess]


def _latest(model_dir: Path) -> Path:
    return model_dir / str(max(int(p.name) for p in model_dir.iterdir() if p.name.isdigit()))


@pytest.fixture(scope="session")
def teacher(digits_zoo: Path) -> Path:
    """The version folder of the zoo's digits teacher (model.onnx, model.pt)."""
    return _latest(digits_zoo / "repository" / "digits")


@pytest.fixture(scope="session")
def test_repository(teacher: Path) -> Path:
    """The test model repository (built fresh once per session, a few seconds)."""
    root = ROOT / "build" / "test-cloud-repo"
    shutil.rmtree(root, ignore_errors=True)
    return build_test_repository(root, teacher)


DigitsReference = Callable[[np.ndarray[Any, Any]], np.ndarray[Any, Any]]


@pytest.fixture(scope="session")
def digits_reference(teacher: Path) -> DigitsReference:
    """The teacher's logits for some pixels, from onnxruntime run here, not by the server."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(teacher / "model.onnx"), providers=["CPUExecutionProvider"])

    def reference(pixels: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        return np.asarray(session.run(None, {"pixels": pixels.astype(np.float32)})[0])

    return reference


@pytest.fixture(scope="session")
def minilm_zoo() -> Path:
    """The test zoo with minilm built (cached by the pipeline), without needing digits."""
    from tandem.cloud.build.pipeline import build_zoo
    from tests.conftest import TEST_ZOO

    build_zoo(TEST_ZOO, models=("minilm",))
    return TEST_ZOO


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[ServerFactory]:
    servers: list[ServerProcess] = []

    def make(repository: Path, *args: str, **kwargs: object) -> ServerProcess:
        server = start_server(repository, tmp_path, *args, **kwargs)  # type: ignore[arg-type]
        servers.append(server)
        return server

    yield make
    for server in servers:
        with contextlib.suppress(Exception):
            server.stop()


@pytest.fixture(scope="session")
def server(
    test_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """One server over the test repository, shared by the session's tests."""
    proc = start_server(test_repository, tmp_path_factory.mktemp("server"))
    yield proc
    proc.stop()


def infer_request(
    model: str, pixels: object, version: str = "", **kw: object
) -> pb.ModelInferRequest:
    import numpy as np

    array = np.asarray(pixels, dtype=np.float32)
    request = pb.ModelInferRequest(model_name=model, model_version=version, **kw)  # type: ignore[arg-type]
    tensor = request.inputs.add()
    tensor.name = "pixels"
    tensor.datatype = "FP32"
    tensor.shape.extend(array.shape)
    request.raw_input_contents.append(array.tobytes())
    return request
