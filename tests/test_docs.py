"""Every code sample in README.md and docs/ runs.

- A ```python block runs as its own script, in a folder where `zoo/` is the test zoo. When it
  talks to `localhost:8001` (the cloud tier's default gRPC port), a real `tandem serve` is
  started on a free port and the sample is pointed at it.
- A ```sh block is checked command by command: every `tandem ...` subcommand it uses must
  exist (`--help` answers), so the docs cannot drift from the CLI.
- A block preceded by `<!-- docs-test: skip (why) -->` is not run; the reason is required.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.serve import ServeProcess

ROOT = Path(__file__).resolve().parents[1]
TANDEM = str(Path(sys.executable).parent / "tandem")
FENCE = re.compile(
    r"(?P<skip><!-- docs-test: skip \(.+?\) -->\s*)?```(?P<lang>\w+)\n(?P<body>.*?)```", re.S
)


def _doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]


def _blocks(lang: str) -> Iterator[tuple[str, str]]:
    for path in _doc_files():
        text = path.read_text()
        for match in FENCE.finditer(text):
            if match["lang"] != lang or match["skip"]:
                continue
            line = text[: match.start()].count("\n") + 1
            yield f"{path.relative_to(ROOT)}:{line}", match["body"]


PYTHON_SAMPLES = list(_blocks("python"))
SHELL_SAMPLES = list(_blocks("sh"))


def test_docs_have_samples() -> None:
    assert PYTHON_SAMPLES, "no python samples found in the docs"


@pytest.fixture(scope="module")
def cloud_port(digits_zoo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    server = ServeProcess(digits_zoo / "repository", tmp_path_factory.mktemp("docs-serve"))
    try:
        yield server.port
    finally:
        server.stop()


@pytest.mark.parametrize(("where", "code"), PYTHON_SAMPLES, ids=[w for w, _ in PYTHON_SAMPLES])
def test_python_sample_runs(
    where: str, code: str, digits_zoo: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    (tmp_path / "zoo").symlink_to(digits_zoo)
    if "localhost:8001" in code:
        port = request.getfixturevalue("cloud_port")
        code = code.replace("localhost:8001", f"127.0.0.1:{port}")
    script = tmp_path / "sample.py"
    script.write_text(code)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TANDEM_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, f"{where} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"


def _tandem_commands(body: str) -> Iterator[list[str]]:
    for raw in body.replace("\\\n", " ").splitlines():
        line = raw.split("#", 1)[0].strip()
        for prefix in ("tandem ", ".venv/bin/tandem "):
            if line.startswith(prefix):
                words = [w for w in shlex.split(line[len(prefix) :]) if not w.startswith("-")]
                yield words[:2]


@pytest.mark.parametrize(("where", "body"), SHELL_SAMPLES, ids=[w for w, _ in SHELL_SAMPLES])
def test_shell_sample_commands_exist(where: str, body: str) -> None:
    for words in _tandem_commands(body):
        # `tandem sub` or `tandem sub subsub`; arguments after them are not subcommands.
        for depth in (2, 1):
            proc = subprocess.run(
                [TANDEM, *words[:depth], "--help"], capture_output=True, text=True, timeout=60
            )
            if proc.returncode == 0:
                break
        assert proc.returncode == 0, f"{where}: `tandem {' '.join(words)}` does not exist"
