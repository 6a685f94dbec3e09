"""`tandem infer`: one SDK call from the command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from tandem.sdk.cli import app
from tests.sdk.v2double import V2Server, default_compute


def test_infer_from_npy_with_a_policy_setting(
    artifacts: Path, tmp_path: Path, test_set: tuple[np.ndarray, np.ndarray]
) -> None:
    x = test_set[0][:3]
    np.save(tmp_path / "x.npy", x)
    result = CliRunner().invoke(
        app,
        [
            "--model",
            "digits",
            "--artifacts",
            str(artifacts),
            "--runtime",
            "onnx",
            "--policy",
            "cascade",
            "--set",
            "threshold=0.0",
            "--input",
            str(tmp_path / "x.npy"),
            "--json",
        ],
        env={"TANDEM_CACHE_DIR": str(tmp_path / "cache")},
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.output.strip().splitlines()[-1])
    assert out["source"] == "local" and out["runtime"] == "onnx" and out["model_version"] == 2
    assert len(out["top_class"]) == 3
    assert np.array(out["outputs"]["logits"]).shape == (3, 10)


def test_infer_values_against_the_cloud(v2: V2Server, tmp_path: Path) -> None:
    values = ",".join(str(i % 17) for i in range(64))
    result = CliRunner().invoke(
        app,
        [
            "--model",
            "digits",
            "--cloud",
            v2.address,
            "--policy",
            "cloud_only",
            "--values",
            values,
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.output.strip().splitlines()[-1])
    expected = default_compute({"pixels": np.array([[i % 17 for i in range(64)]], np.float32)})
    np.testing.assert_allclose(out["outputs"]["logits"], expected["logits"], rtol=1e-5)
    assert out["source"] == "cloud"


def test_bad_setting_and_the_tandem_command(artifacts: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        [
            "--model",
            "digits",
            "--artifacts",
            str(artifacts),
            "--policy",
            "cascade",
            "--set",
            "treshold=0.9",
            "--values",
            "1,2",
        ],
    )
    assert result.exit_code != 0
    assert "treshold" in str(result.exception)
    tandem = Path(sys.executable).parent / "tandem"
    proc = subprocess.run(
        [
            str(tandem),
            "infer",
            "--model",
            "digits",
            "--artifacts",
            str(artifacts),
            "--runtime",
            "onnx",
            "--values",
            "1,2,3",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={"TANDEM_CACHE_DIR": str(tmp_path / "c"), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 1
    assert "input tensor 'pixels'" in proc.stderr and "got [1, 3]" in proc.stderr
