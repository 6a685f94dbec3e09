"""A running fleet for the console and CLI tests (no tests here).

Real Mosquitto (the `mosquitto_factory` fixture, one identity per device, each device
limited to its own subtree), a real `tandem fleet serve` process on SQLite with a small
signed zoo (digits v1, v2, v3), and simulated devices (real MQTT clients, `tests.fleet.sim`)
that install what the service tells them and send telemetry per version: v1 and v2 are
healthy, v3 is slow, disagrees with the cloud and errors.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from tests.fleet.helpers import fake_zoo
from tests.fleet.sim import Profile, SimFleet
from tests.support.mosquitto import Broker
from tests.support.processes import free_port, stop_process, wait_for_port, wait_until

TANDEM = str(Path(sys.executable).parent / "tandem")
TOKEN = "console-test-token"
USER = "alice"
FLEET_USER = "tandem-fleet"
PROFILES = {
    1: Profile(latency_ms=2.0, fallback_rate=0.12, agreement=0.97, requests=100, shadow=20),
    2: Profile(latency_ms=1.6, fallback_rate=0.08, agreement=0.98, requests=100, shadow=20),
    3: Profile(
        latency_ms=9.0, fallback_rate=0.45, agreement=0.55, error_rate=0.2, requests=100, shadow=20
    ),
}


def _acl() -> str:
    return f"user {FLEET_USER}\ntopic readwrite #\n\npattern readwrite tandem/v1/devices/%u/#\n"


class ConsoleFleet:
    """Broker + fleet service process + simulated devices; `stop()` ends all of them."""

    def __init__(
        self,
        tmp: Path,
        mosquitto_factory: Callable[..., Broker],
        devices: int = 6,
        telemetry_interval_s: float = 0.4,
    ) -> None:
        self.tmp = tmp
        self.device_ids = [f"dev-{i:02d}" for i in range(devices)]
        passwords = {d: secrets.token_urlsafe(12) for d in self.device_ids}
        fleet_password = secrets.token_urlsafe(12)
        self.broker = mosquitto_factory(users={FLEET_USER: fleet_password, **passwords}, acl=_acl())
        zoo = fake_zoo(tmp / "zoo", versions=(1, 2, 3), size=20_000)
        self.rest_port = free_port()
        self.url = f"http://127.0.0.1:{self.rest_port}"
        self.log_path = tmp / "fleet-service.log"
        args = [
            TANDEM, "fleet", "serve",
            "--broker", f"mqtt://{self.broker.host}:{self.broker.port}",
            "--username", FLEET_USER,
            "--password", fleet_password,
            "--client-id", "console-test-fleet",
            "--db", f"sqlite:///{tmp / 'fleet.db'}",
            "--artifacts", str(tmp / "fleet-artifacts"),
            "--zoo", str(zoo),
            "--rest-port", str(self.rest_port),
            "--api-token", f"{USER}:{TOKEN}",
            "--tick", "0.1",
            "--telemetry-window", "1",
        ]  # fmt: skip
        with self.log_path.open("ab") as log:
            self.proc: subprocess.Popen[bytes] | None = subprocess.Popen(
                args,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                start_new_session=True,
            )
        self.sim: SimFleet | None = None
        self.http = httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10
        )
        try:
            wait_for_port(self.rest_port, proc=self.proc, timeout=60)
            self.sim = SimFleet(
                self.broker.host,
                self.broker.port,
                passwords,
                runtimes=lambda i: ["onnx"] if i % 2 else ["tflite", "onnx"],
                tags=lambda i: {"ring": "canary" if i < 2 else "main", "site": f"s{i % 3}"},
                active={"digits": 1},
                profiles=PROFILES,
                telemetry_interval_s=telemetry_interval_s,
            )
            self.sim.start()
            wait_until(
                lambda: len(self.get("/api/v1/devices", params={"online": "true"})) == devices,
                timeout=30,
                interval=0.2,
                message=f"{devices} devices online",
            )
        except BaseException:
            self.stop()
            raise

    def get(self, path: str, **kwargs: Any) -> Any:
        r = self.http.get(path, **kwargs)
        assert r.status_code == 200, f"{path}: {r.status_code} {r.text}\n{self.log_tail()}"
        return r.json()

    def post(self, path: str, body: Any = None) -> Any:
        r = self.http.post(path, json=body)
        assert r.status_code < 300, f"{path}: {r.status_code} {r.text}\n{self.log_tail()}"
        return r.json()

    def rollout(self, rollout_id: str) -> dict[str, Any]:
        data: dict[str, Any] = self.get(f"/api/v1/rollouts/{rollout_id}")
        return data

    def wait_status(self, rollout_id: str, status: str, timeout: float = 30) -> dict[str, Any]:
        wait_until(
            lambda: self.rollout(rollout_id)["status"] == status,
            timeout=timeout,
            interval=0.2,
            message=f"rollout {rollout_id} {status}\n{self.log_tail()}",
        )
        return self.rollout(rollout_id)

    def log_tail(self, n: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]

    def stop(self) -> None:
        if self.sim is not None:
            self.sim.stop()
            self.sim = None
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None
        self.http.close()


def quick_plan(version: int, **extra: Any) -> dict[str, Any]:
    """Two stages with a short soak and gates that a healthy version passes."""
    gates = [
        {"metric": "error_rate", "threshold": 0.05, "min_samples": 50},
        {"metric": "shadow_agreement", "threshold": 0.9, "min_samples": 10},
        {"metric": "p95_latency_ratio", "threshold": 1.5, "min_samples": 50},
    ]
    return {
        "model": "digits",
        "version": version,
        "stages": [
            {"percent": 30, "min_soak_s": 1.0, "gates": gates},
            {"percent": 100, "min_soak_s": 0.5, "gates": gates},
        ],
        "device_timeout_s": 30,
        **extra,
    }
