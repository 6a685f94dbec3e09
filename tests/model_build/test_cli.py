"""`tandem keys` and `tandem models` through the installed command, in a subprocess."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TANDEM = Path(sys.executable).with_name("tandem")


def tandem(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    return subprocess.run(
        [str(TANDEM), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env,
        check=False,
    )


def test_models_build_help_lists_its_options() -> None:
    result = tandem("models", "build", "--help")
    assert result.returncode == 0, result.stderr
    for option in ("--out", "--models", "--force", "--key"):
        assert option in result.stdout


def test_keys_generate_writes_0600_and_refuses_to_overwrite(tmp_path: Path) -> None:
    result = tandem("keys", "generate", "--out", str(tmp_path / "keys"))
    assert result.returncode == 0, result.stderr
    key = tmp_path / "keys" / "signing.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert (tmp_path / "keys" / "signing.pub").exists()
    before = key.read_bytes()

    again = tandem("keys", "generate", "--out", str(tmp_path / "keys"))
    assert again.returncode != 0
    assert "already exists" in again.stderr
    assert "Traceback" not in again.stderr
    assert key.read_bytes() == before

    forced = tandem("keys", "generate", "--out", str(tmp_path / "keys"), "--force")
    assert forced.returncode == 0, forced.stderr
    assert key.read_bytes() != before


def test_models_build_rejects_an_unknown_model_clearly(tmp_path: Path) -> None:
    result = tandem("models", "build", "--out", str(tmp_path / "zoo"), "--models", "nope")
    assert result.returncode == 1
    assert "unknown model 'nope'" in result.stderr
    assert "Traceback" not in result.stderr


def test_models_build_with_a_missing_key_file_fails_clearly(tmp_path: Path) -> None:
    result = tandem(
        "models", "build", "--out", str(tmp_path), "--models", "digits",
        "--key", str(tmp_path / "absent.key"),
    )  # fmt: skip
    assert result.returncode == 1
    assert "does not exist" in result.stderr


@pytest.mark.slow
def test_models_build_on_a_built_zoo_is_cached_and_prints_the_summary(digits_zoo: Path) -> None:
    result = tandem("models", "build", "--out", str(digits_zoo), "--models", "digits")
    assert result.returncode == 0, result.stderr
    assert "cached: digits" in result.stderr
    for variant in ("onnx-int8", "openvino-int8", "tflite-int8", "torch-fp32"):
        assert variant in result.stdout
    listing = tandem("models", "list", "--zoo", str(digits_zoo))
    assert listing.returncode == 0, listing.stderr
    assert "digits" in listing.stdout and "tflite-int8" in listing.stdout
