"""Runs the server: gRPC, HTTP and metrics in one process on one event loop.

Lifecycle: load the repository, open the metrics, gRPC and HTTP ports, mark health SERVING.
On SIGTERM (or SIGINT): health NOT_SERVING and readiness false first, so load balancers stop
sending; then the gRPC server stops taking new calls and waits for those in flight, each
model's batcher computes what it has queued, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import Iterator
from typing import Any

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from tandem.errors import ConfigError, MissingDependencyError
from tandem.protos.inference import grpc_predict_v2_pb2_grpc as pb_grpc

from .config import ServerConfig
from .grpc_service import AuthInterceptor, InferenceServicer
from .http_api import create_app
from .metrics import ServerMetrics
from .repository import ModelRepository
from .state import ServerState

log = logging.getLogger(__name__)

GRPC_SERVICE = "inference.GRPCInferenceService"
EVENT_LOOPS = ("auto", "uvloop", "asyncio")


class _Health(HealthServicer):  # type: ignore[misc]
    """grpc.health.v1 whose Watch streams end after reporting NOT_SERVING at shutdown, so
    they do not hold the drain open until the grace period runs out."""

    async def Watch(self, request: Any, context: Any) -> None:
        condition = self._server_watchers[request.service]
        self._watcher_count_by_service[request.service] += 1
        last = None
        try:
            async with condition:
                while True:
                    status = self._server_status.get(
                        request.service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
                    )
                    if status != last:
                        await context.write(health_pb2.HealthCheckResponse(status=status))
                    last = status
                    if self._gracefully_shutting_down:
                        return
                    await condition.wait()
        finally:
            self._watcher_count_by_service[request.service] -= 1
            if self._watcher_count_by_service[request.service] == 0:
                del self._server_watchers[request.service]
                del self._watcher_count_by_service[request.service]


def _grpc_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    if config.tls_cert is None or config.tls_key is None:
        return None
    root = config.tls_client_ca.read_bytes() if config.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(config.tls_key.read_bytes(), config.tls_cert.read_bytes())],
        root_certificates=root,
        require_client_auth=root is not None,
    )


class _Uvicorn:
    """uvicorn inside our loop, without its own signal handling (we own SIGTERM)."""

    def __init__(self, app: Any, config: ServerConfig) -> None:
        import ssl

        import uvicorn

        kwargs: dict[str, Any] = {}
        if config.tls_cert is not None:
            kwargs.update(ssl_certfile=str(config.tls_cert), ssl_keyfile=str(config.tls_key))
            if config.tls_client_ca is not None:
                kwargs.update(
                    ssl_ca_certs=str(config.tls_client_ca), ssl_cert_reqs=ssl.CERT_REQUIRED
                )
        uv_config = uvicorn.Config(
            app,
            host=config.host,
            port=config.http_port,
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=int(config.drain_timeout_s),
            **kwargs,
        )

        class Server(uvicorn.Server):  # type: ignore[misc]
            @contextlib.contextmanager
            def capture_signals(self) -> Iterator[None]:
                yield

        self.server = Server(uv_config)

    async def serve(self) -> None:
        await self.server.serve()

    def stop(self) -> None:
        self.server.should_exit = True


def serve_forever(config: ServerConfig, loop: str = "auto") -> None:
    """Runs the server until SIGTERM on the chosen event loop: "uvloop", "asyncio", or
    "auto" (uvloop when installed). On 2 cores under load, uvloop took 495 us of server CPU
    per batched call against 580 us on asyncio's own loop."""
    if loop not in EVENT_LOOPS:
        raise ConfigError("loop", f"must be one of {', '.join(EVENT_LOOPS)}, not {loop!r}")
    if loop != "asyncio":
        try:
            import uvloop
        except ImportError as exc:
            if loop == "uvloop":
                raise MissingDependencyError(
                    "uvloop", "cloud", "tandem serve --loop uvloop"
                ) from exc
        else:
            uvloop.run(run_server(config))
            return
    asyncio.run(run_server(config))


async def _load_generation(state: ServerState) -> None:
    """Generative models (folders with generation.json) get the generation surfaces; the
    generation package (torch, transformers) is imported only when there are some."""
    config = state.config
    from tandem.cloud.generation import find_generative

    paths = find_generative(config.repository, config.models)
    if not paths:
        return
    from tandem.cloud.generation.service import GenerationService

    state.generation = await asyncio.to_thread(
        GenerationService.load, paths, state.metrics.for_generation()
    )
    state.generation.start()


async def run_server(config: ServerConfig, ready: asyncio.Event | None = None) -> None:
    metrics = ServerMetrics()
    repository = ModelRepository(config.repository, metrics, config.models)
    state = ServerState(config, repository, metrics)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, state.stop.set)

    await repository.load_all()
    await _load_generation(state)
    # What is loaded by now (runtimes, their modules, the models) lives as long as the
    # process. Frozen out of the collector's reach, it is not walked by every full
    # collection, which otherwise pauses the event loop for ~35 ms on a small CPU, several
    # times a minute under load: a pause every request in flight waits out (p99 latency).
    gc.collect()
    gc.freeze()
    metrics_server = (
        metrics.serve(config.host, config.metrics_port) if config.metrics_port else None
    )

    health = _Health()
    options = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    # grpc.aio interceptors cost about a third of the server's throughput on a small CPU,
    # so the auth interceptor is installed only when there is a token to check; without
    # one, handlers set the request context themselves.
    interceptors = [AuthInterceptor(config.token)] if config.token is not None else []
    server = aio.server(interceptors=interceptors, options=options)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(  # type: ignore[no-untyped-call]
        InferenceServicer(state), server
    )
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    address = f"{config.host}:{config.grpc_port}"
    credentials = _grpc_credentials(config)
    if credentials is None:
        server.add_insecure_port(address)
    else:
        server.add_secure_port(address, credentials)

    http: _Uvicorn | None = None
    tasks: list[asyncio.Task[Any]] = []
    try:
        await server.start()
        if config.http_port:
            http = _Uvicorn(create_app(state), config)
            tasks.append(asyncio.create_task(http.serve(), name="http"))
        if config.poll_interval_s > 0:
            tasks.append(
                asyncio.create_task(repository.poll_forever(config.poll_interval_s), name="poll")
            )
        for service in ("", GRPC_SERVICE):
            await health.set(service, health_pb2.HealthCheckResponse.SERVING)
        state.started = True
        log.info(
            "serving %s: grpc %s, http %s, metrics %s, event loop %s",
            config.repository,
            address,
            config.http_port or "off",
            config.metrics_port or "off",
            type(loop).__module__.split(".")[0],
        )
        if ready is not None:
            ready.set()
        await state.stop.wait()
        log.info("draining: no new requests, finishing %d queued", repository.queued())
    finally:
        state.draining = True
        deadline = loop.time() + config.drain_timeout_s
        if state.generation is not None:
            state.generation.refuse_new()
        await health.enter_graceful_shutdown()
        if state.generation is not None:
            # Streams and verify sessions go on up to the grace (the ports stay open, so a
            # session's next call arrives; anything new is UNAVAILABLE), then what is left is
            # ended with UNAVAILABLE "server shutting down", sent before the ports close.
            await state.generation.drain(config.drain_timeout_s)
            await state.generation.close()
        if http is not None:
            http.stop()
        # Stop takes no new RPCs at once and waits up to the grace for the ones in flight,
        # whose requests sit in the batchers, which keep computing.
        await server.stop(max(deadline - loop.time(), min(config.drain_timeout_s, 1.0)))
        for task in tasks:
            if task.get_name() == "poll":
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await repository.close()
        if metrics_server is not None:
            metrics_server.shutdown()
        log.info("stopped")
