"""One fleet-service process: the service, its MQTT link, the engine loop and the REST API."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from .mqtt import BrokerSettings, MqttLink
from .service import FleetService, ServiceConfig

log = logging.getLogger(__name__)


class FleetNode:
    def __init__(
        self,
        config: ServiceConfig,
        broker: BrokerSettings | None,
        *,
        rest_host: str = "127.0.0.1",
        rest_port: int | None = None,
        run_engine: bool = True,
        app_factory: Callable[[FleetService], Any] | None = None,
    ) -> None:
        self.service = FleetService(config)
        self.link = MqttLink(self.service, broker) if broker is not None else None
        self.rest_host = rest_host
        self.rest_port = rest_port
        self.run_engine = run_engine
        self.app_factory = app_factory  # None: the REST API alone (fleet.rest.create_app)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._rest: object | None = None

    def start(self) -> None:
        if self.link is not None:
            self.link.start()
        if self.run_engine:
            t = threading.Thread(
                target=self.service.run_engine, args=(self._stop,), name="fleet-engine", daemon=True
            )
            t.start()
            self._threads.append(t)
        if self.rest_port is not None:
            import uvicorn

            from .rest import create_app

            server = uvicorn.Server(
                uvicorn.Config(
                    (self.app_factory or create_app)(self.service),
                    host=self.rest_host,
                    port=self.rest_port,
                    log_level="warning",
                    lifespan="off",
                )
            )
            self._rest = server
            t = threading.Thread(target=server.run, name="fleet-rest", daemon=True)
            t.start()
            self._threads.append(t)
        log.info("fleet service running (engine=%s, rest=%s)", self.run_engine, self.rest_port)

    def wait(self) -> None:
        self._stop.wait()

    def request_stop(self) -> None:
        self._stop.set()

    def stop(self) -> None:
        self._stop.set()
        if self._rest is not None:
            self._rest.should_exit = True  # type: ignore[attr-defined]
        if self.link is not None:
            # Leaving the shared subscriptions (and taking what the broker already sent) takes
            # a quiet spell of `leave_grace_s`; the REST server and the engine wind down in
            # their threads meanwhile instead of one after the other (~0.2 s per stop).
            self.link.leave()
        for t in self._threads:
            t.join(10)
        if self.link is not None:
            self.link.stop()
        self.service.close()
