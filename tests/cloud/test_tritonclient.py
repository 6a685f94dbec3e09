"""Wire compatibility: Triton's own Python gRPC client (`tritonclient[grpc]`) calls the server.

tritonclient pins protobuf < 7, so it lives in its own virtual environment under
build/venvs/tritonclient (created once, then reused) and runs as a separate client process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tests.cloud.conftest import DigitsReference, ServerProcess
from tests.conftest import ROOT

VENV = ROOT / "build" / "venvs" / "tritonclient"

CLIENT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    url, pixels_path = sys.argv[1], sys.argv[2]
    x = np.load(pixels_path)
    client = grpcclient.InferenceServerClient(url=url)
    out = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready("digits"),
        "server": client.get_server_metadata(as_json=True),
        "model": client.get_model_metadata("digits", as_json=True),
    }
    inp = grpcclient.InferInput("pixels", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer("digits", [inp], outputs=[grpcclient.InferRequestedOutput("logits")],
                          request_id="triton-1", timeout=5_000_000)
    out["id"] = result.get_response().id
    out["logits"] = result.as_numpy("logits").tolist()
    errors = {}
    bad = grpcclient.InferInput("pixel", list(x.shape), "FP32")
    bad.set_data_from_numpy(x)
    for name, call in {
        "wrong_name": lambda: client.infer("digits", [bad]),
        "unknown_model": lambda: client.infer("nope", [inp]),
    }.items():
        try:
            call()
            errors[name] = None
        except InferenceServerException as exc:
            errors[name] = [exc.status(), exc.message()]
    out["errors"] = errors
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="session")
def triton_python() -> Path:
    python = VENV / "bin" / "python"
    check = [str(python), "-c", "import tritonclient.grpc, numpy"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    VENV.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True)
    install = subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            "tritonclient[grpc]",
            "numpy",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if install.returncode != 0:
        pytest.skip(
            f"cannot install tritonclient[grpc] from the package registry: "
            f"{install.stderr.strip()[-500:]}"
        )
    return python


def test_triton_grpc_client_calls_the_server(
    server: ServerProcess, triton_python: Path, tmp_path: Path, digits_reference: DigitsReference
) -> None:
    x = np.random.default_rng(5).integers(0, 17, size=(3, 64)).astype(np.float32)
    np.save(tmp_path / "pixels.npy", x)
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    run = subprocess.run(
        [str(triton_python), str(script), server.grpc_address, str(tmp_path / "pixels.npy")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["live"] and out["ready"] and out["model_ready"]
    assert out["server"]["name"] == "tandem"
    assert out["model"]["platform"] == "onnxruntime_onnx"
    assert out["model"]["inputs"][0] == {
        "name": "pixels",
        "datatype": "FP32",
        "shape": ["-1", "64"],
    }
    assert out["id"] == "triton-1"
    np.testing.assert_allclose(np.array(out["logits"]), digits_reference(x), rtol=1e-4, atol=1e-4)
    status, message = out["errors"]["wrong_name"]
    assert status == "StatusCode.INVALID_ARGUMENT" and "'pixel'" in message
    assert out["errors"]["unknown_model"][0] == "StatusCode.NOT_FOUND"
