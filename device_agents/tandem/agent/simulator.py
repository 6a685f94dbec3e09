"""The demo's simulated devices: `python -m tandem.agent.simulator SPEC.json`.

One process hosts several devices of one runtime. Each device is what a real one runs: a
device agent (`tandem.agent.Agent`) with its own broker credentials, model store and
telemetry spool, and beside it an application that calls `Client.infer` with the cascade
policy and shadow sampling at a modest rate on a labelled data set (the demo's: the digits
test split). The model is any classifier in the zoo: the data set is an .npz of arrays keyed
by the model's input names (one row per request), with its `labels` when known, as a spec
build's validation data (docs/own-model.md). The SDK spools telemetry
summaries; the agent ships them to the fleet. This module is the device half of the demo: it
imports only the device-side packages (tandem.sdk, tandem.agent), never the cloud side.

Every half second the process writes what it saw to the stats file named in the spec
(atomically): per device the requests, where they were answered, errors, accuracy against
the labels, the active version and every version that ever reached its store. SIGTERM or
SIGINT stops the traffic, flushes telemetry, stops the agents and writes the final stats.
"""

from __future__ import annotations

import faulthandler
import gc
import json
import logging
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np

from tandem.errors import ArtifactError, ConfigError, TandemError
from tandem.sdk.atomic import write_atomic

log = logging.getLogger("tandem.agent.simulator")

MODEL = "digits"  # the demo's model; SimSpec.model names another
LABELS = "labels"  # the data set's array of true classes, when it has one


@dataclass(frozen=True)
class DeviceSpec:
    device_id: str
    password: str
    runtime: str  # the only runtime this simulated device has: onnx, tflite, openvino, torch
    store: Path
    tags: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DeviceSpec:
        return cls(
            device_id=str(data["device_id"]),
            password=str(data["password"]),
            runtime=str(data["runtime"]),
            store=Path(str(data["store"])),
            tags={str(k): str(v) for k, v in (data.get("tags") or {}).items()},
        )


@dataclass(frozen=True)
class SimSpec:
    """What one simulator process runs; written by the orchestrator as JSON (0600)."""

    broker_host: str
    broker_port: int
    trusted_key: Path
    cloud: str  # host:port of the V2 gRPC endpoint
    dataset: Path  # .npz: one array per model input ([n, ...] each), and `labels` ([n])
    stats: Path
    devices: tuple[DeviceSpec, ...]
    rate_per_s: float = 5.0  # requests per second per device
    shadow_fraction: float = 0.25  # share of local answers also asked of the cloud
    max_accuracy_loss: float = 0.01  # the cascade threshold is derived for this loss
    telemetry_interval_s: float = 1.0  # seconds per SDK telemetry summary
    health_window_s: float = 3.0  # seconds an agent watches a new version before HEALTHY
    seed: int = 0
    fleet_key: Path | None = None  # the fleet's public key: desired states must be signed
    model: str = MODEL
    scores: str = ""  # the output whose argmax is the predicted class ("": the first)

    def __post_init__(self) -> None:
        if not self.devices:
            raise ConfigError("devices", "at least one device")
        if not 0 < self.rate_per_s <= 1000:
            raise ConfigError("rate_per_s", f"must be in (0, 1000], got {self.rate_per_s}")
        if not 0 <= self.shadow_fraction <= 1:
            raise ConfigError("shadow_fraction", f"must be in [0, 1], got {self.shadow_fraction}")

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SimSpec:
        try:
            return cls(
                broker_host=str(data["broker_host"]),
                broker_port=int(data["broker_port"]),
                trusted_key=Path(str(data["trusted_key"])),
                cloud=str(data["cloud"]),
                dataset=Path(str(data["dataset"])),
                stats=Path(str(data["stats"])),
                devices=tuple(DeviceSpec.from_json(d) for d in data["devices"]),
                rate_per_s=float(data.get("rate_per_s", 5.0)),
                shadow_fraction=float(data.get("shadow_fraction", 0.25)),
                max_accuracy_loss=float(data.get("max_accuracy_loss", 0.01)),
                telemetry_interval_s=float(data.get("telemetry_interval_s", 1.0)),
                health_window_s=float(data.get("health_window_s", 3.0)),
                fleet_key=Path(str(data["fleet_key"])) if data.get("fleet_key") else None,
                seed=int(data.get("seed", 0)),
                model=str(data.get("model", MODEL)),
                scores=str(data.get("scores", "")),
            )
        except KeyError as exc:
            raise ConfigError(str(exc.args[0]), "is required in the simulator spec") from exc


@dataclass
class DeviceStats:
    runtime: str
    requests: int = 0
    local: int = 0
    cloud: int = 0
    errors: int = 0
    escalated: int = 0  # cascade: local confidence under the threshold, the cloud answered
    fallback: int = 0  # no usable local model: the cloud answered
    correct: int = 0
    local_correct: int = 0
    local_by_version: dict[int, int] = field(default_factory=dict)
    active_version: int | None = None
    versions_seen: set[int] = field(default_factory=set)
    connected: bool = False
    last_error: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "runtime": self.runtime,
            "requests": self.requests,
            "local": self.local,
            "cloud": self.cloud,
            "errors": self.errors,
            "escalated": self.escalated,
            "fallback": self.fallback,
            "correct": self.correct,
            "local_correct": self.local_correct,
            "local_by_version": {str(k): v for k, v in sorted(self.local_by_version.items())},
            "active_version": self.active_version,
            "versions_seen": sorted(self.versions_seen),
            "connected": self.connected,
            "last_error": self.last_error,
        }


@dataclass(frozen=True)
class Dataset:
    """The requests a simulated app sends: rows of the model's inputs, and their labels."""

    inputs: Mapping[str, np.ndarray[Any, Any]]
    labels: np.ndarray[Any, Any] | None

    @classmethod
    def load(cls, path: Path) -> Dataset:
        try:
            with np.load(path) as data:
                arrays = {k: np.ascontiguousarray(data[k]) for k in data.files}
        except (OSError, ValueError) as exc:
            raise ConfigError("dataset", f"{path} is not a readable .npz file ({exc})") from exc
        labels = arrays.pop(LABELS, None)
        if not arrays:
            raise ConfigError("dataset", f"{path} holds no input arrays")
        rows = {len(a) for a in arrays.values()} | ({len(labels)} if labels is not None else set())
        if len(rows) != 1 or 0 in rows:
            raise ConfigError(
                "dataset", f"{path}: arrays need the same number of rows (>0), got {sorted(rows)}"
            )
        return cls(arrays, labels.reshape(-1) if labels is not None else None)

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def row(self, i: int) -> tuple[dict[str, np.ndarray[Any, Any]], int | None]:
        label = int(self.labels[i]) if self.labels is not None else None
        return {k: v[i : i + 1] for k, v in self.inputs.items()}, label


class SimulatedDevice:
    """One agent and one SDK client sharing a store, and the app loop calling the client."""

    def __init__(self, spec: DeviceSpec, sim: SimSpec, data: Dataset) -> None:
        from tandem.agent import Agent
        from tandem.agent.config import AgentConfig, BrokerAddress
        from tandem.sdk import Client
        from tandem.sdk.local import SelectionConfig
        from tandem.sdk.shadow import ShadowConfig
        from tandem.sdk.store import ModelStore
        from tandem.sdk.telemetry import TelemetryConfig

        self.spec = spec
        self.sim = sim
        self.data = data
        self.stats = DeviceStats(spec.runtime)
        self.lock = threading.Lock()
        spec.store.mkdir(parents=True, exist_ok=True)
        self.model_store = ModelStore(spec.store)
        config = AgentConfig(
            device_id=spec.device_id,
            broker=BrokerAddress(sim.broker_host, sim.broker_port),
            store=spec.store,
            trusted_keys=(sim.trusted_key,),
            fleet_keys=(sim.fleet_key,) if sim.fleet_key else (),
            username=spec.device_id,
            password=spec.password,
            tags=dict(spec.tags),
            runtimes=(spec.runtime,),
            stall_timeout_s=5.0,
            health_window_s=sim.health_window_s,
            health_probe_interval_s=max(0.5, sim.health_window_s / 3),
            telemetry_interval_s=sim.telemetry_interval_s,
            reconnect_min_s=0.5,
            reconnect_max_s=5.0,
        )
        self.agent = Agent(config)
        self.client = Client(
            sim.model,
            artifacts=spec.store,
            cloud=sim.cloud,
            policy="cascade",
            max_accuracy_loss=sim.max_accuracy_loss,
            selection=SelectionConfig(runtime=spec.runtime, warmup_runs=1, timed_runs=3),
            shadow=ShadowConfig(fraction=sim.shadow_fraction, queue_size=16),
            telemetry=TelemetryConfig(
                spool_dir=config.spool_dir,
                device_id=spec.device_id,
                interval_s=sim.telemetry_interval_s,
                drain_interval_s=min(0.2, sim.telemetry_interval_s),
            ),
            cache_dir=spec.store.parent / "sdk-cache",
        )
        self.rate = sim.rate_per_s
        self.random = random.Random(f"{sim.seed}:{spec.device_id}")
        self.thread = threading.Thread(
            target=self._traffic, name=f"app-{spec.device_id}", daemon=True
        )
        self.stop_event = threading.Event()

    def start(self) -> None:
        self.agent.start()
        self.thread.start()

    def _traffic(self) -> None:
        period = 1.0 / self.rate
        next_at = time.monotonic() + self.random.uniform(0, period)
        while not self.stop_event.wait(max(0.0, next_at - time.monotonic())):
            next_at += period * self.random.uniform(0.8, 1.2)
            i = self.random.randrange(len(self.data))
            self._one(*self.data.row(i))
            if time.monotonic() - next_at > 5 * period:
                next_at = time.monotonic()  # fell behind (a busy machine): do not burst

    def _one(self, inputs: Mapping[str, np.ndarray[Any, Any]], label: int | None) -> None:
        try:
            result = self.client.infer(inputs)
        except TandemError as exc:
            with self.lock:
                self.stats.requests += 1
                self.stats.errors += 1
                self.stats.last_error = f"{type(exc).__name__}: {exc}"[:300]
            return
        scores = result.outputs.get(self.sim.scores) if self.sim.scores else None
        if scores is None:
            scores = next(iter(result.outputs.values()))
        predicted = int(np.argmax(np.asarray(scores).reshape(1, -1), axis=1)[0])
        with self.lock:
            s = self.stats
            s.requests += 1
            right = label is not None and predicted == label
            s.correct += right
            if result.source == "local":
                s.local += 1
                s.local_correct += right
                version = int(result.model_version or 0)
                s.local_by_version[version] = s.local_by_version.get(version, 0) + 1
            else:
                s.cloud += 1
                s.escalated += result.escalated
                s.fallback += result.fallback

    def observe(self) -> None:
        """What the device's store holds now: the active version and every installed one."""
        try:
            pointer = self.model_store.read_active(self.sim.model)
        except ArtifactError:
            pointer = None
        try:
            installed = set(self.model_store.versions(self.sim.model))
        except OSError:
            installed = set()
        with self.lock:
            self.stats.active_version = pointer.version if pointer is not None else None
            self.stats.versions_seen |= installed
            if pointer is not None:
                self.stats.versions_seen.add(pointer.version)
            self.stats.connected = self.agent.connected

    def stop_traffic(self) -> None:
        self.stop_event.set()

    def close(self) -> None:
        self.stop_event.set()
        self.thread.join(5)
        self.client.close()  # flushes the last telemetry summary into the spool
        self.agent.stop()

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return self.stats.to_json()


def write_stats(path: Path, devices: list[SimulatedDevice], final: bool) -> None:
    doc = {
        "pid": os.getpid(),
        "updated": time.time(),
        "final": final,
        "devices": {d.spec.device_id: d.snapshot() for d in devices},
    }
    write_atomic(path, json.dumps(doc))


def run(sim: SimSpec) -> int:
    stop = threading.Event()

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    # A supervisor that finds us deaf to SIGTERM sends SIGUSR1 first: dump every thread's stack
    # to the log (from C, so it works even when a thread is stuck holding the GIL).
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    data = Dataset.load(sim.dataset)
    devices: list[SimulatedDevice] = []
    try:
        for spec in sim.devices:
            if stop.is_set():
                break
            device = SimulatedDevice(spec, sim, data)
            devices.append(device)
            device.start()
            log.info("device %s (%s) up", spec.device_id, spec.runtime)
        while not stop.wait(0.5):
            for d in devices:
                d.observe()
            write_stats(sim.stats, devices, final=False)
    finally:
        for d in devices:
            d.stop_traffic()
        for d in devices:
            d.close()
        for d in devices:
            d.observe()
        write_stats(sim.stats, devices, final=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.stderr.write("usage: python -m tandem.agent.simulator SPEC.json\n")
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    sim = SimSpec.from_json(json.loads(Path(args[0]).read_text()))
    code = run(sim)
    # Every device is closed and the final stats are written: skip the interpreter's final
    # collections over what is left (with torch loaded, ~0.35 s of each exit; see tandem.cli).
    gc.freeze()
    return code


if __name__ == "__main__":
    sys.exit(main())
