"""A TCP proxy on loopback that injects faults between a client and a real server.

Runs its own asyncio loop in a thread. Modes, switchable while it runs:
- `pass`:    bytes flow both ways untouched;
- `delay`:   every chunk from the client waits `delay_s` before it is forwarded, one chunk at
             a time (a slow, serialized link: the reliability suite's "slow cloud");
- `latency`: a link with a round-trip time: every chunk, in both directions, is forwarded
             `delay_s` (the one-way delay, half the RTT; see `set_latency`) after it arrived.
             Pipelined: each direction keeps a queue of (due time, chunk), so chunks in flight
             overlap and throughput is not one chunk per delay, as on a real long link;
- `stall`:   connections are accepted and then nothing is forwarded (a black hole);
- `drop`:    new connections are reset at once, and open ones are cut.
Counts connections, chunks and bytes each way, so tests can say how many faults they injected
(`delayed` counts the chunks held back by `delay` and by `latency`) and what crossed the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from dataclasses import dataclass

from tests.support.processes import free_port

MODES = ("pass", "delay", "latency", "stall", "drop")
# Bytes one direction of one connection may hold in its latency queue before the proxy stops
# reading from the sender (backpressure, so a fast sender cannot fill memory).
MAX_QUEUED_BYTES = 8 * 2**20


@dataclass
class ProxyStats:
    connections: int = 0
    chunks: int = 0
    delayed: int = 0
    stalled: int = 0
    dropped: int = 0
    bytes_up: int = 0  # client -> server, as read from the client's socket
    bytes_down: int = 0  # server -> client


class _Link:
    """One direction of one connection: chunks with the loop time at which they are due."""

    def __init__(self) -> None:
        self.chunks: deque[tuple[float, bytes] | None] = deque()  # None: the sender is done
        self.queued_bytes = 0
        self.arrived = asyncio.Event()
        self.room = asyncio.Event()
        self.room.set()

    def put(self, item: tuple[float, bytes] | None) -> None:
        self.chunks.append(item)
        if item is not None:
            self.queued_bytes += len(item[1])
            if self.queued_bytes >= MAX_QUEUED_BYTES:
                self.room.clear()
        self.arrived.set()

    async def get(self) -> tuple[float, bytes] | None:
        while not self.chunks:
            self.arrived.clear()
            await self.arrived.wait()
        item = self.chunks.popleft()
        if item is not None:
            self.queued_bytes -= len(item[1])
            if self.queued_bytes < MAX_QUEUED_BYTES:
                self.room.set()
        return item


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
        """`delay_s`: the client->server delay in `delay`, the one-way delay in `latency`."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        if delay_s < 0:
            raise ValueError(f"delay_s must be >= 0, not {delay_s}")
        self.mode, self.delay_s = mode, delay_s
        if mode == "drop":
            self._loop.call_soon_threadsafe(self._cut_all)

    def set_latency(self, rtt_s: float | None = None, *, one_way_s: float | None = None) -> None:
        """`latency` mode with a round-trip time (half of it each way) or a one-way delay."""
        if (rtt_s is None) == (one_way_s is None):
            raise ValueError("give exactly one of rtt_s and one_way_s")
        self.set_mode("latency", rtt_s / 2 if rtt_s is not None else float(one_way_s or 0.0))

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
        link = _Link()
        receiver = asyncio.ensure_future(self._receive(reader, link, upstream=upstream))
        sender = asyncio.ensure_future(self._send(link, writer))
        try:
            await asyncio.wait((receiver, sender), return_when=asyncio.FIRST_COMPLETED)
            if not receiver.done():
                # The far side is gone: stop reading, so that the connection is torn down.
                receiver.cancel()
            await asyncio.gather(receiver, sender, return_exceptions=True)
        finally:
            receiver.cancel()
            sender.cancel()

    async def _receive(self, reader: asyncio.StreamReader, link: _Link, *, upstream: bool) -> None:
        loop = asyncio.get_running_loop()
        try:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while data := await reader.read(65536):
                    arrived = loop.time()
                    self.stats.chunks += 1
                    if upstream:
                        self.stats.bytes_up += len(data)
                    else:
                        self.stats.bytes_down += len(data)
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
                    due = arrived
                    if self.mode == "latency" and self.delay_s > 0:
                        self.stats.delayed += 1
                        due = arrived + self.delay_s
                    link.put((due, data))
                    await link.room.wait()
        finally:
            link.put(None)

    async def _send(self, link: _Link, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(OSError):
            while (item := await link.get()) is not None:
                due, data = item
                if (wait := due - loop.time()) > 0:
                    await asyncio.sleep(wait)
                if self.mode == "drop":
                    return
                writer.write(data)
                await writer.drain()

    def close(self) -> None:
        async def shutdown() -> None:
            self._server.close()
            self._cut_all()
            # Let the connections' tasks see their aborted transports and end by themselves
            # (a cancelled connection handler would be logged as an error by asyncio), so
            # that none is left pending when the loop stops.
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            if tasks:
                await asyncio.wait(tasks, timeout=2)

        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(5)
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
