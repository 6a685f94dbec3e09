"""The SDK's import stays small: no runtime, cloud or fleet stack until one is used."""

from __future__ import annotations

import json
import subprocess
import sys

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
