"""The demo's processes: the broker, the cloud tier, the fleet service and the device
simulators, each started under the `processes.Supervisor` on a port the OS picks.

`Launcher` holds what the started processes share (the ports, the fleet's REST client and
its token, the children recorded in children.json); `story.Story` builds on it and tells the
story against them. The module-level helpers find the tools the demo runs (Mosquitto, the
`tandem` command) and prepare the work dir.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console

from tandem.cloud.fleet.broker_config import BrokerConfig, device_ids_for, write_broker_config

from .config import RUNTIMES, DemoConfig
from .errors import PrerequisiteError, StoryError
from .processes import Child, Supervisor, free_port
from .zoo import StoryZoo

MODEL = "digits"
MARKER = ".tandem-demo"
MOSQUITTO_PATHS = (
    "/usr/sbin/mosquitto",
    "/usr/local/sbin/mosquitto",
    "/opt/homebrew/sbin/mosquitto",
)


def find_mosquitto() -> str | None:
    """The Mosquitto binary, or None."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for path in MOSQUITTO_PATHS:
        if os.access(path, os.X_OK):
            return path
    return None


MOSQUITTO_MISSING = (
    "--broker mosquitto: no Mosquitto found; install it with `sudo apt-get install mosquitto` "
    "(Debian/Ubuntu), `brew install mosquitto` (macOS) or `make system-deps`, or run with "
    "--broker embedded"
)


def mosquitto_version(binary: str) -> str:
    try:
        out = subprocess.run(
            [binary, "-h"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown version"
    match = re.search(r"mosquitto version (\S+)", out)
    return match.group(1) if match else "unknown version"


def tandem_command() -> list[str]:
    """How to run `tandem` with this interpreter's installation."""
    script = Path(sys.executable).parent / "tandem"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from tandem.cli import main; main()"]


def prepare_workdir(workdir: Path) -> None:
    """Creates the work dir; a non-empty one is reused only when an earlier demo made it."""
    if workdir.exists() and any(workdir.iterdir()):
        if not (workdir / MARKER).exists():
            raise StoryError(
                f"{workdir} is not empty and was not made by `tandem demo`: pick another "
                "--workdir (the demo clears its work dir before each run)"
            )
        for item in workdir.iterdir():
            if item.is_dir() and not item.is_symlink():
                shutil.rmtree(item)
            else:
                item.unlink()
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / MARKER).write_text("made by `tandem demo`; cleared at the start of each run\n")


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)


class Launcher:
    """Starts the demo's processes and records them; the base of `story.Story`."""

    def __init__(self, config: DemoConfig, console: Console) -> None:
        self.config = config
        self.console = console
        self.work = config.workdir
        self.token = secrets.token_urlsafe(18)
        self.supervisor: Supervisor | None = None
        self.children: dict[str, Child] = {}
        self.ports: dict[str, int] = {}
        self.http: httpx.Client | None = None
        self.broker_name = ""
        self.console_url = ""
        self.device_ids = device_ids_for(config.devices)

    @property
    def fleet_public_key(self) -> Path:
        """Where the devices' copy of the fleet's public key goes (see start_fleet)."""
        return self.work / "fleet.pub"

    def say(self, text: str) -> None:
        self.console.print(text)

    def _record_children(self) -> None:
        doc = {
            "demo_pid": os.getpid(),
            "children": [
                {"name": c.name, "pid": c.pid, "args": c.args} for c in self.children.values()
            ],
            "ports": self.ports,
        }
        (self.work / "children.json").write_text(json.dumps(doc, indent=2))

    def _start(self, name: str, args: list[str], port: int | None = None) -> Child:
        assert self.supervisor is not None
        child = self.supervisor.start(name, args)
        self.children[name] = child
        self._record_children()
        if port is not None:
            self.supervisor.wait_for_port(child, port, timeout_s=90)
        return child

    def api(self, method: str, path: str, body: Any = None, **params: Any) -> Any:
        assert self.http is not None
        try:
            response = self.http.request(method, path, json=body, params=params or None)
        except httpx.HTTPError as exc:
            raise StoryError(f"fleet REST {method} {path} failed: {exc}") from exc
        if response.status_code >= 300:
            raise StoryError(
                f"fleet REST {method} {path}: {response.status_code} {response.text[:500]}"
            )
        return response.json()

    def start_broker(self) -> dict[str, str]:
        """Mosquitto when installed (or asked for), else the embedded MQTT 5 broker; both
        with the password file and ACL that `tandem fleet broker-config` writes."""
        binary = find_mosquitto() if self.config.broker != "embedded" else None
        if binary is None and self.config.broker == "mosquitto":
            raise PrerequisiteError(MOSQUITTO_MISSING)
        port = free_port(self.config.host)
        self.ports["mqtt"] = port
        written = write_broker_config(
            BrokerConfig(self.work / "broker", self.config.host, port, persistence=False),
            self.device_ids,
        )
        url = f"mqtt://{self.config.host}:{port}"
        identities = f"{len(written.device_passwords)} device identities + ACL"
        if binary is not None:
            self._start("mosquitto", [binary, "-c", str(written.conf)], port)
            self.broker_name = f"Mosquitto {mosquitto_version(binary)} ({binary}) on {url}, "
        else:
            args = [
                sys.executable,
                "-m",
                "tandem.cloud.demo.broker",
                "--config",
                str(written.conf.parent),
                "--host",
                self.config.host,
                "--port",
                str(port),
            ]
            self._start("broker", args, port)
            why = "" if self.config.broker == "embedded" else " (no Mosquitto installed)"
            self.broker_name = f"embedded Python MQTT 5 broker{why} on {url}, "
        self.broker_name += identities
        self.say(f"   MQTT broker: {self.broker_name}")
        self._fleet_password_file = written.fleet_password_file
        return written.device_passwords

    def start_cloud(self) -> None:
        port = free_port(self.config.host)
        self.ports["grpc"] = port
        args = [
            *tandem_command(),
            "serve",
            "--repository",
            str(self.config.zoo / "repository"),
            "--host",
            self.config.host,
            "--grpc-port",
            str(port),
            "--http-port",
            "0",
            "--metrics-port",
            "0",
            "--model",
            MODEL,
            "--no-access-log",
        ]
        self._start("cloud", args, port)
        self.say(f"   cloud tier: tandem serve (V2 gRPC) on {self.config.host}:{port}")

    def start_fleet(self, story: StoryZoo) -> None:
        port = free_port(self.config.host)
        self.ports["fleet_rest"] = port
        args = [
            *tandem_command(),
            "fleet",
            "serve",
            "--broker",
            f"mqtt://{self.config.host}:{self.ports['mqtt']}",
            "--username",
            "tandem-fleet",
            "--password-file",
            str(self._fleet_password_file),
            "--client-id",
            "tandem-fleet-demo",
            "--db",
            f"sqlite:///{self.work / 'fleet.db'}",
            "--artifacts",
            str(self.work / "fleet-artifacts"),
            "--trusted-key",
            str(story.public_key),
            "--zoo",
            str(story.zoo),
            "--rest-host",
            self.config.host,
            "--rest-port",
            str(port),
            "--api-token",
            f"demo:{self.token}",
            "--tick",
            "0.2",
            "--telemetry-window",
            "1",
        ]
        self._start("fleet", args, port)
        base = f"http://{self.config.host}:{port}"
        self.http = httpx.Client(
            base_url=f"{base}/api/v1",
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=15,
        )
        for version in (2, 3):
            self.api("POST", "/models/import", {"zoo": str(story.versions[version])})
        # Provision the devices as an operator would: the public half of the key the fleet
        # signs desired states with, from its API (the service made the key on first start).
        fleet_key = self.api("GET", "/fleet-key")
        self.fleet_public_key.write_text(fleet_key["public_key_pem"])
        self.console_url = f"{base}/console/?token={self.token}"
        self.say(
            f"   fleet service: tandem fleet serve, SQLite {self.work / 'fleet.db'}, desired "
            f"states signed with fleet key {fleet_key['keyid']}"
        )
        self.say(f"\n   [bold]console:[/] {self.console_url}\n")

    def start_devices(self, passwords: Mapping[str, str], dataset: Path, story: StoryZoo) -> None:
        by_runtime: dict[str, list[dict[str, Any]]] = {}
        for i, device_id in enumerate(self.device_ids):
            runtime = self.config.runtime_of(i)
            by_runtime.setdefault(runtime, []).append(
                {
                    "device_id": device_id,
                    "password": passwords[device_id],
                    "runtime": runtime,
                    "store": str(self.work / "devices" / device_id / "store"),
                    "tags": {"site": "demo", "runtime": runtime},
                }
            )
        (self.work / "sim").mkdir(exist_ok=True)
        specs = self.work / "specs"
        specs.mkdir(exist_ok=True)
        for runtime in RUNTIMES:
            devices = by_runtime.get(runtime)
            if not devices:
                continue
            spec = {
                "broker_host": self.config.host,
                "broker_port": self.ports["mqtt"],
                "trusted_key": str(story.public_key),
                "fleet_key": str(self.fleet_public_key),
                "cloud": f"{self.config.host}:{self.ports['grpc']}",
                "dataset": str(dataset),
                "stats": str(self.work / "sim" / f"{runtime}.json"),
                "devices": devices,
                "rate_per_s": self.config.rate_per_s,
                "shadow_fraction": self.config.shadow_fraction,
                "max_accuracy_loss": self.config.max_accuracy_loss,
                "telemetry_interval_s": 1.0,
                "health_window_s": self.config.health_window_s,
            }
            path = specs / f"{runtime}.json"
            _write_private(path, json.dumps(spec, indent=2))
            self._start(
                f"devices-{runtime}",
                [sys.executable, "-m", "tandem.agent.simulator", str(path)],
            )
        counts = ", ".join(f"{len(v)} {k}" for k, v in by_runtime.items())
        self.say(
            f"   devices: {len(self.device_ids)} simulated ({counts}), one process per runtime, "
            "each device a real agent + SDK client"
        )
