"""tests.support.proxy's `latency` mode: a round trip through it takes at least the RTT,
half of it in each direction, and chunks in flight overlap (pipelined) instead of waiting
one delay each. `delay` mode (the reliability suite's) still holds only client->server."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from tests.support.proxy import FaultProxy

RTT_S = 0.2


class EchoServer:
    """Echoes every chunk back; records when each chunk arrived (perf_counter)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.arrivals: list[float] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                self.arrivals.append(time.perf_counter())
                conn.sendall(data)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def echo_proxy() -> Iterator[tuple[EchoServer, FaultProxy]]:
    server = EchoServer()
    proxy = FaultProxy(server.port)
    yield server, proxy
    proxy.close()
    server.close()


def _connect(proxy: FaultProxy) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _read(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, "the proxy closed the connection"
        data += chunk
    return data


def test_latency_round_trip_takes_the_rtt_half_each_way(
    echo_proxy: tuple[EchoServer, FaultProxy],
) -> None:
    server, proxy = echo_proxy
    proxy.set_latency(rtt_s=RTT_S)
    with _connect(proxy) as sock:
        sent = time.perf_counter()
        sock.sendall(b"ping")
        assert _read(sock, 4) == b"ping"
        back = time.perf_counter()
    arrived = server.arrivals[0]
    assert arrived - sent >= RTT_S / 2  # client -> server delayed
    assert back - arrived >= RTT_S / 2  # and server -> client
    assert back - sent >= RTT_S
    assert proxy.stats.delayed >= 2
    assert (proxy.stats.bytes_up, proxy.stats.bytes_down) == (4, 4)


def test_latency_is_pipelined_not_one_chunk_per_delay(
    echo_proxy: tuple[EchoServer, FaultProxy],
) -> None:
    _server, proxy = echo_proxy
    proxy.set_latency(one_way_s=RTT_S / 2)
    payload = bytes(range(256)) * (8 * 1024)  # 2 MiB: >= 32 reads of 64 KiB each way
    with _connect(proxy) as sock:
        echoed: list[bytes] = []
        reader = threading.Thread(target=lambda: echoed.append(_read(sock, len(payload))))
        started = time.perf_counter()
        reader.start()
        sock.sendall(payload)
        reader.join(10)
        elapsed = time.perf_counter() - started
    assert echoed == [payload]  # whole and in order
    assert elapsed >= RTT_S
    # One chunk per delay would take >= 32 x one-way = 3.2 s for the upstream half alone.
    assert elapsed < 1.0, elapsed


def test_delay_mode_still_holds_only_the_client_side(
    echo_proxy: tuple[EchoServer, FaultProxy],
) -> None:
    server, proxy = echo_proxy
    proxy.set_mode("delay", RTT_S / 2)
    with _connect(proxy) as sock:
        sent = time.perf_counter()
        sock.sendall(b"x")
        assert _read(sock, 1) == b"x"
        back = time.perf_counter()
    assert server.arrivals[0] - sent >= RTT_S / 2
    assert back - server.arrivals[0] < RTT_S / 2
    with pytest.raises(ValueError):
        proxy.set_latency(rtt_s=RTT_S, one_way_s=RTT_S / 2)
