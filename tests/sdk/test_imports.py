"""The SDK's import stays small: no runtime, cloud or fleet stack until one is used."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HEAVY = (
    "torch",
    "onnxruntime",
    "openvino",
    "ai_edge_litert",
    "tflite_runtime",
    "fastapi",
    "sqlalchemy",
    "paho",
    "tandem.cloud",
    "tandem.agent",
)


def test_importing_the_sdk_pulls_no_heavy_package() -> None:
    code = (
        "import sys, json\n"
        "from tandem.sdk import Client, Result, Retry, BreakerConfig\n"
        "import tandem.sdk.cli\n"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_openvino_loads_without_phoning_home(tmp_path: Path) -> None:
    """`import openvino` sends a usage event to Google Analytics from a forked process unless
    the user opted out (openvino_telemetry). tandem's every import of it goes through
    import_openvino, which keeps that module out: no fork, nothing sent. A fresh HOME (no
    opt-out file) and no CI variables (which would silence it) make the test meaningful."""
    code = (
        "import atexit, os, sys\n"
        "forks = []\n"
        "os.register_at_fork(before=lambda: forks.append(1))\n"
        "from tandem.sdk.runtimes.openvino import OpenVINORuntime\n"
        "ov = OpenVINORuntime.import_package()\n"
        "ov.Core().available_devices\n"
        "import nncf\n"
        # The telemetry sends run on thread-pool workers, which the interpreter joins (each
        # finishing the work already queued) before atexit handlers run: so this report
        # comes after every send that the imports queued, with no guessed sleep.
        "report = lambda: print(len(forks), sys.modules.get('openvino_telemetry', 'absent'))\n"
        "atexit.register(report)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "TF_BUILD", "JENKINS_URL")}
    env["HOME"] = str(tmp_path)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", "None"]
    assert not (tmp_path / "intel").exists()  # no client id written either
