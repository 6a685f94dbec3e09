"""Soak: mixed traffic and rollouts at a few percent of capacity for SOAK_SECONDS (30 minutes
with `make soak`), with the memory (VmRSS) and open file descriptors of every process sampled
and checked flat: a least-squares slope over the run after warm-up, projected over the run,
must stay within a small allowance.

The system as deployed, on loopback: `tandem serve` (cloud tier), Mosquitto from
`tandem fleet broker-config`, `tandem fleet serve`, two `tandem agent run` devices, and in this
process the "apps": SDK clients (prefer_local, cascade, cloud_only) reading each device's
model store, spooling telemetry into its agent. Rollouts alternate v1 and v2 every
ROLLOUT_EVERY_S. Skipped unless SOAK_SECONDS is set (it is not part of `make test`).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tandem.sdk import Client, CloudConfig, Retry, TelemetryConfig
from tests.fleet.conftest import ServiceProcess, wait_devices
from tests.reliability.conftest import FleetAgents
from tests.support.figures import Figures
from tests.support.serve import ServeProcess

SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "0"))
SAMPLE_EVERY_S = 2.0
ROLLOUT_EVERY_S = 30.0
CALLS_PER_S = 15.0  # per app thread: a few percent of what the cloud tier serves
DEVICES = ["soak-a", "soak-b"]
WARMUP_FRACTION = 0.25
# Growth allowed over the measured part of the run, projected from the slope: a flat process
# still wobbles by a few MiB (allocator arenas, caches filling once).
RSS_ALLOWANCE_MIB = 16.0
RSS_ALLOWANCE_FRACTION = 0.05
FD_ALLOWANCE = 2.0

pytestmark = [
    pytest.mark.skipif(SOAK_SECONDS <= 0, reason="soak runs with `make soak` (SOAK_SECONDS)"),
    pytest.mark.timeout(SOAK_SECONDS + 900 if SOAK_SECONDS > 0 else 600),
]


def proc_sample(pid: int) -> tuple[float, int] | None:
    """(VmRSS in MiB, open file descriptors), or None when the process is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024, fds
    return None


def fd_targets(pid: int) -> dict[str, int]:
    """What a process's descriptors point at, counted by kind (file paths kept)."""
    found: dict[str, int] = {}
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                key = target.split(":[")[0] if ":[" in target else target
                found[key] = found.get(key, 0) + 1
    except OSError:
        pass
    return found


@dataclass
class Series:
    t: list[float] = field(default_factory=list)
    rss: list[float] = field(default_factory=list)
    fds: list[float] = field(default_factory=list)


def slope_per_s(t: list[float], y: list[float]) -> float:
    if len(t) < 3:
        return 0.0
    return float(np.polyfit(np.asarray(t), np.asarray(y), 1)[0])


class Sampler:
    def __init__(self, pids: Callable[[], dict[str, int]]) -> None:
        self.pids = pids
        self.series: dict[str, Series] = {}
        self.start = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY_S):
            now = time.monotonic() - self.start
            for name, pid in self.pids().items():
                sample = proc_sample(pid)
                if sample is None:
                    continue
                s = self.series.setdefault(name, Series())
                s.t.append(now)
                s.rss.append(sample[0])
                s.fds.append(sample[1])

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def app_traffic(
    clients: list[Client], rows: np.ndarray, stop: threading.Event, counts: dict[str, int]
) -> None:
    i = 0
    period = 1.0 / CALLS_PER_S
    while not stop.is_set():
        client = clients[i % len(clients)]
        row = rows[i % len(rows)]
        i += 1
        try:
            result = client.infer(row)
            counts[result.source] = counts.get(result.source, 0) + 1
        except Exception as exc:  # noqa: BLE001 - counted and reported, never expected
            counts[f"error:{type(exc).__name__}"] = counts.get(f"error:{type(exc).__name__}", 0) + 1
        time.sleep(period)


def test_soak_mixed_traffic_and_rollouts_memory_and_fds_flat(
    fleet_agents_factory: FleetAgents,
    fleet_service: Callable[..., ServiceProcess],
    zoo: Path,
    models: Path,
    tmp_path: Path,
    figures: Figures,
) -> None:
    broker, agents = fleet_agents_factory(DEVICES)
    svc = fleet_service(broker, zoo, "--trusted-key", str(zoo / "keys" / "signing.pub"))
    server = ServeProcess(models / "repository", tmp_path / "serve")
    wait_devices(svc, len(DEVICES))
    rows = np.load(models / "test_set.npz")["x"]
    cloud = CloudConfig(
        endpoints=(server.address,),
        timeout_ms=2000,
        retry=Retry(total=1, backoff_factor=0.01, backoff_max=0.05),
    )
    clients: list[Client] = []
    settings: list[dict[str, Any]] = [
        {"policy": "prefer_local"},
        {"policy": "cascade", "threshold": 0.9},
        {"policy": "cloud_only"},
    ]
    for device, agent in agents.items():
        for kwargs in settings:
            clients.append(
                Client(
                    "digits",
                    artifacts=agent.store,
                    cloud=cloud,
                    runtime="onnx",
                    cache_dir=tmp_path / "cache",
                    trusted_keys=[zoo / "keys" / "signing.pub"],
                    telemetry=TelemetryConfig(
                        spool_dir=agent.store / ".telemetry-spool",
                        device_id=device,
                        interval_s=5.0,
                    ),
                    **kwargs,
                )
            )

    def pids() -> dict[str, int]:
        found = {"app (SDK clients)": os.getpid(), "tandem serve": server.pid}
        if svc.proc is not None:
            found["tandem fleet serve"] = svc.proc.pid
        if broker.proc is not None:
            found["mosquitto"] = broker.proc.pid
        for device, agent in agents.items():
            if agent.proc is not None:
                found[f"agent {device}"] = agent.proc.pid
        return found

    stop = threading.Event()
    counts: dict[str, int] = {}
    traffic = [
        threading.Thread(target=app_traffic, args=(clients[i::2], rows, stop, counts))
        for i in range(2)
    ]
    sampler = Sampler(pids)
    rollouts: list[tuple[int, str]] = []
    started = time.monotonic()
    try:
        for t in traffic:
            t.start()
        version = 1
        next_rollout = started
        while time.monotonic() - started < SOAK_SECONDS:
            time.sleep(max(0.0, next_rollout - time.monotonic()))
            next_rollout += ROLLOUT_EVERY_S
            created = svc.post(
                "/rollouts",
                {
                    "model": "digits",
                    "version": version,
                    "selector": {"site": "lab"},
                    "stages": [{"percent": 50, "min_soak_s": 2}, {"percent": 100}],
                },
            )
            assert isinstance(created, dict)
            done = svc.wait_rollout(str(created["rollout_id"]), "completed", timeout=120)
            rollouts.append((version, str(done["status"])))
            version = 2 if version == 1 else 1
            if next_rollout - started >= SOAK_SECONDS:
                time.sleep(max(0.0, started + SOAK_SECONDS - time.monotonic()))
        # What the processes hold open at the end, for a report that shows fds growing.
        open_files = {name: fd_targets(pid) for name, pid in pids().items()}
    finally:
        stop.set()
        for t in traffic:
            t.join(10)
        sampler.stop()
        for client in clients:
            client.close()
        server.stop()
    elapsed = time.monotonic() - started

    report: dict[str, object] = {
        "duration_s": round(elapsed),
        "rollouts_completed": f"{sum(1 for _, s in rollouts if s == 'completed')}/{len(rollouts)}",
        "app_calls": dict(sorted(counts.items())),
        "samples_per_process": min(len(s.t) for s in sampler.series.values()),
    }
    failures: list[str] = []
    for name, s in sorted(sampler.series.items()):
        begin = int(len(s.t) * WARMUP_FRACTION)
        t, rss, fds = s.t[begin:], s.rss[begin:], s.fds[begin:]
        if len(t) < 3:
            failures.append(f"{name}: too few samples ({len(t)})")
            continue
        window = t[-1] - t[0]
        rss_growth = slope_per_s(t, rss) * window
        fd_growth = slope_per_s(t, fds) * window
        allowance = max(RSS_ALLOWANCE_MIB, RSS_ALLOWANCE_FRACTION * float(np.median(rss)))
        report[name] = (
            f"RSS {rss[0]:.0f}->{rss[-1]:.0f} MiB (slope {slope_per_s(t, rss) * 3600:+.1f} MiB/h,"
            f" {rss_growth:+.1f} MiB over {window:.0f} s, allowed {allowance:.0f}); "
            f"fds {fds[0]:.0f}->{fds[-1]:.0f} (slope {fd_growth:+.2f} over the run)"
        )
        if rss_growth > allowance:
            failures.append(f"{name}: RSS grew {rss_growth:.1f} MiB > {allowance:.1f}")
        if fd_growth > FD_ALLOWANCE:
            failures.append(
                f"{name}: fds grew {fd_growth:.1f} > {FD_ALLOWANCE}; "
                f"fds over time {s.fds[:: max(1, len(s.fds) // 12)]}; "
                f"open at the end: {open_files.get(name)}"
            )
    errors = {k: v for k, v in counts.items() if k.startswith("error:")}
    report["app_call_errors"] = sum(errors.values())
    figures.record(f"soak: {SOAK_SECONDS:.0f} s of mixed traffic and rollouts", **report)
    assert rollouts and all(s == "completed" for _, s in rollouts), rollouts
    assert not errors, errors
    assert sum(counts.values()) > SOAK_SECONDS * CALLS_PER_S, counts
    assert not failures, failures
