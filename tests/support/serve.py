"""A real cloud tier (`tandem serve`) in a subprocess, gRPC only, on a chosen or free port.

Shared by the SDK tests and the reliability suite; the latter restarts a server on the same
port after SIGKILL to check that clients find it again by themselves.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.support.processes import free_port, stop_process, wait_for_port

ROOT = Path(__file__).resolve().parents[2]
TANDEM = Path(sys.executable).parent / "tandem"


class ServeProcess:
    """`tandem serve --repository REPO --grpc-port PORT`, started at construction."""

    def __init__(
        self, repository: Path, log_dir: Path, *args: str, port: int | None = None
    ) -> None:
        self.repository = repository
        self.args = args
        self.port = port or free_port()
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"serve-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        command = [
            str(TANDEM),
            "serve",
            "--repository",
            str(self.repository),
            "--grpc-port",
            str(self.port),
            "--http-port",
            "0",
            "--metrics-port",
            "0",
            "--no-access-log",
            *self.args,
        ]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            wait_for_port(self.port, proc=self.proc, timeout=60)
        except (TimeoutError, RuntimeError) as exc:
            self.stop()
            raise RuntimeError(f"tandem serve did not start: {exc}\n{self.log()}") from exc

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL: no drain, connections reset mid-call."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout=20)
