"""A TCP proxy on loopback that injects faults between a client and a real server.

Runs its own asyncio loop in a thread. Modes, switchable while it runs:
- `pass`:  bytes flow both ways untouched;
- `delay`: every chunk from the client waits `delay_s` before it is forwarded (latency);
- `stall`: connections are accepted and then nothing is forwarded (a black hole);
- `drop`:  new connections are reset at once, and open ones are cut.
Counts connections and chunks so tests can say how many faults they injected.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from dataclasses import dataclass

from tests.support.processes import free_port

MODES = ("pass", "delay", "stall", "drop")


@dataclass
class ProxyStats:
    connections: int = 0
    chunks: int = 0
    delayed: int = 0
    stalled: int = 0
    dropped: int = 0


class FaultProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self.mode = "pass"
        self.delay_s = 0.0
        self.stats = ProxyStats()
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fault-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("proxy did not start")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def set_mode(self, mode: str, delay_s: float = 0.0) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        self.mode, self.delay_s = mode, delay_s
        if mode == "drop":
            self._loop.call_soon_threadsafe(self._cut_all)

    def _cut_all(self) -> None:
        for writer in list(self._writers):
            self.stats.dropped += 1
            writer.transport.abort()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", self.port)
        )
        self._ready.set()
        self._loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.stats.connections += 1
        if self.mode == "drop":
            self.stats.dropped += 1
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        try:
            await asyncio.gather(
                self._pump(reader, up_writer, upstream=True),
                self._pump(up_reader, writer, upstream=False),
            )
        finally:
            for w in (writer, up_writer):
                self._writers.discard(w)
                w.transport.abort()

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, upstream: bool
    ) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(65536):
                self.stats.chunks += 1
                if self.mode == "stall":
                    # Hold everything (both directions) until the mode changes.
                    self.stats.stalled += 1
                    while self.mode == "stall":
                        await asyncio.sleep(0.01)
                if upstream and self.mode == "delay" and self.delay_s > 0:
                    self.stats.delayed += 1
                    await asyncio.sleep(self.delay_s)
                if self.mode == "drop":
                    return
                writer.write(data)
                await writer.drain()

    def close(self) -> None:
        async def shutdown() -> None:
            self._server.close()
            self._cut_all()

        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(5)
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
