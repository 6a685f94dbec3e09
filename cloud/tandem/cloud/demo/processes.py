"""The demo's child processes: started in their own process groups, all stopped on any exit.

Every child gets its own session (so a terminal's Ctrl-C reaches only the demo, which then
stops the children in order) and, on Linux, a parent-death signal (so a demo killed with
SIGKILL still takes its children with it). `Supervisor.stop_all` sends SIGTERM to each
child's process group, waits, and SIGKILLs whatever is left; it runs from `atexit` too.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ctypes.util
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO

from .errors import ChildFailedError

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


def _load_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        return ctypes.CDLL(name, use_errno=True).prctl  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


# Resolved here, in the parent: the child between fork and exec only calls it.
_PRCTL = _load_prctl()


def _die_with_parent() -> None:
    """preexec_fn: ask the kernel to SIGTERM this child when the demo process dies."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


@dataclass
class Child:
    name: str
    args: list[str]
    proc: subprocess.Popen[bytes]
    log_path: Path
    _log: IO[bytes]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


class Supervisor:
    """Starts child processes and guarantees they are all stopped."""

    def __init__(self, log_dir: Path, *, stop_timeout_s: float = 10.0) -> None:
        self.log_dir = log_dir
        self.stop_timeout_s = stop_timeout_s
        self.children: list[Child] = []
        self._lock = threading.Lock()
        self._stopped = False
        log_dir.mkdir(parents=True, exist_ok=True)
        atexit.register(self.stop_all)

    def start(
        self,
        name: str,
        args: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        capture_stdout: bool = False,
    ) -> Child:
        """Starts a child; its output goes to LOG_DIR/NAME.log (stdout to a pipe on request)."""
        with self._lock:
            if self._stopped:
                raise ChildFailedError(f"not starting {name}: the demo is stopping")
            log_path = self.log_dir / f"{name}.log"
            out = log_path.open("ab")
            proc = subprocess.Popen(
                list(args),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if capture_stdout else out,
                stderr=out if capture_stdout else subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
            child = Child(name, list(args), proc, log_path, out)
            self.children.append(child)
        log.info("started %s (pid %d): %s", name, proc.pid, " ".join(args))
        return child

    def finished(self, child: Child) -> None:
        """A child that was meant to end (a build) and did: no longer watched."""
        with self._lock:
            if child in self.children:
                self.children.remove(child)
        with contextlib.suppress(OSError):
            child._log.close()

    def pids(self) -> list[int]:
        return [c.pid for c in self.children]

    def check(self) -> None:
        """Raises when a child has exited on its own."""
        for child in self.children:
            code = child.proc.poll()
            if code is not None:
                raise ChildFailedError(
                    f"{child.name} exited with status {code}; log {child.log_path}:\n"
                    f"{child.log_tail()}"
                )

    def wait_for_port(self, child: Child, port: int, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not child.alive():
                raise ChildFailedError(
                    f"{child.name} exited with status {child.proc.returncode} before port "
                    f"{port} opened; log {child.log_path}:\n{child.log_tail()}"
                )
            if port_open(port):
                return
            time.sleep(0.1)
        raise ChildFailedError(
            f"{child.name} did not open port {port} in {timeout_s:.0f}s; "
            f"log {child.log_path}:\n{child.log_tail()}"
        )

    def stop(self, child: Child, timeout_s: float | None = None) -> None:
        self._stop_many([child], self.stop_timeout_s if timeout_s is None else timeout_s)

    def stop_all(self) -> None:
        """SIGTERM every child's process group (newest first), then SIGKILL what is left."""
        with self._lock:
            self._stopped = True
            children = list(reversed(self.children))
        self._stop_many(children, self.stop_timeout_s)

    def _stop_many(self, children: Sequence[Child], timeout_s: float) -> None:
        for child in children:
            if child.alive():
                _signal_group(child.proc, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for child in children:
            remaining = max(0.0, deadline - time.monotonic())
            try:
                child.proc.wait(remaining)
            except subprocess.TimeoutExpired:
                log.warning(
                    "%s did not stop on SIGTERM: killing it (thread stacks, where it dumps them "
                    "on SIGUSR1, are in its log)",
                    child.name,
                )
                # tandem's own children dump every thread's stack on SIGUSR1 (faulthandler,
                # which works even when a thread holds the GIL), so a hang leaves evidence.
                with contextlib.suppress(OSError):
                    child.proc.send_signal(signal.SIGUSR1)
                time.sleep(0.5)
        for child in children:
            # The leader may be gone while something it started still runs in its group.
            _signal_group(child.proc, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.proc.wait(5)
            with contextlib.suppress(OSError):
                child._log.close()


def _signal_group(proc: subprocess.Popen[bytes], signum: int) -> None:
    # Each child leads its own session, so its process group id is its pid.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signum)


class Interrupted(BaseException):  # like KeyboardInterrupt: no `except Exception` eats it
    """SIGINT or SIGTERM arrived: unwind the story and stop every child."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


def install_signal_handlers() -> Callable[[], None]:
    """SIGINT and SIGTERM raise `Interrupted` in the main thread; returns the restorer."""
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def _raise(signum: int, _frame: FrameType | None) -> None:
        # Once: a second Ctrl-C while stopping must not cut the cleanup short.
        for s in previous:
            signal.signal(s, signal.SIG_IGN)
        raise Interrupted(signum)

    for s in previous:
        signal.signal(s, _raise)

    def restore() -> None:
        for s, handler in previous.items():
            signal.signal(s, handler)

    return restore
