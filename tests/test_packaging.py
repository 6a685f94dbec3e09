"""A device installs only what it runs: the device extras never pull the cloud stack."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLOUD_ONLY = {"torch", "fastapi", "sqlalchemy", "openvino", "uvicorn", "psycopg", "nncf"}


def _resolve(spec: str, tmp_path: Path) -> set[str]:
    report = tmp_path / "report.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--ignore-installed",
            "--quiet",
            "--report",
            str(report),
            spec,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(report.read_text())
    return {item["metadata"]["name"].lower().replace("_", "-") for item in data["install"]}


@pytest.mark.parametrize("extra", ["onnx", "tflite"])
def test_device_install_pulls_no_cloud_packages(extra: str, tmp_path: Path) -> None:
    names = _resolve(f".[{extra}]", tmp_path)
    assert "tandem" in names
    assert {"numpy", "grpcio", "protobuf", "zstandard", "paho-mqtt"} <= names
    assert not names & CLOUD_ONLY, f"device extra [{extra}] pulls {sorted(names & CLOUD_ONLY)}"
    assert "grpcio-tools" not in names


def test_device_modules_import_without_cloud_stack() -> None:
    """Importing every SDK and agent module leaves torch, fastapi, SQLAlchemy unloaded."""
    code = r"""
import importlib, pkgutil, sys
import tandem.sdk, tandem.agent
for pkg in (tandem.sdk, tandem.agent):
    for mod in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
        importlib.import_module(mod.name)
# (grpc_tools is not listed: `import grpc` probes for it when installed; test_protos shows
# the generated code imports with it blocked.)
heavy = sorted(m for m in ("torch", "fastapi", "sqlalchemy", "openvino", "tandem.cloud")
               if m in sys.modules)
print(",".join(heavy))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "", f"device modules imported: {proc.stdout.strip()}"
