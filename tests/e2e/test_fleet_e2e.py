"""The fleet end to end, with nothing simulated: real `tandem agent run` processes on four
runtimes, each beside an app using the SDK (local answers, shadow samples to a real
`tandem serve` cloud tier, spooled telemetry), one `tandem fleet serve`, and a Mosquitto
started from `tandem fleet broker-config` output. The models are the build pipeline's:
digits v1, a retrained v2, and a deliberately bad v3 (trained on shuffled labels: it loads,
warms up against its own references and serves without errors, but disagrees with the
cloud model).

1. v1 then v2 roll out through every stage to completion on every device.
2. v3's first stage is stopped by the shadow-agreement gate and rolled back; no device
   outside the first cohort ever receives it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.fleet.conftest import (
    TANDEM,
    GeneratedBroker,
    ServiceProcess,
    fleet_service,
    generated_broker,
    wait_devices,
)
from tests.support.agent import agent_argv
from tests.support.processes import free_port, stop_processes, wait_for_port, wait_until

__all__ = ["fleet_service", "generated_broker"]  # fixtures, used by name
pytestmark = pytest.mark.slow
RUNTIMES = {
    "dev-onnx": "onnx",
    "dev-tflite": "tflite",
    "dev-openvino": "openvino",
    "dev-torch": "torch",
}


@pytest.fixture(scope="module")
def story(digits_zoo: Path) -> object:
    from tandem.cloud.demo.zoo import ensure_story_zoo

    return ensure_story_zoo(digits_zoo)


def active(store: Path) -> tuple[int, str] | None:
    path = store / "digits" / "active.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    return int(data["version"]), str(data["variant"])


@pytest.fixture
def fleet(
    story: object,
    generated_broker: Callable[[list[str]], GeneratedBroker],
    fleet_service: Callable[..., ServiceProcess],
    tmp_path: Path,
) -> Iterator[tuple[ServiceProcess, dict[str, Path]]]:
    from tandem.cloud.demo.zoo import StoryZoo, write_test_split

    assert isinstance(story, StoryZoo)
    broker = generated_broker(list(RUNTIMES))
    db = f"sqlite:///{tmp_path / 'fleet.db'}"
    for folder in story.versions.values():
        subprocess.run(
            [
                TANDEM,
                "fleet",
                "import",
                "--zoo",
                str(folder),
                "--db",
                db,
                "--artifacts",
                str(tmp_path / "fleet-artifacts"),
                "--trusted-key",
                str(story.public_key),
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
    procs: list[subprocess.Popen[bytes]] = []
    apps: list[subprocess.Popen[bytes]] = []
    grpc_port = free_port()
    cloud = subprocess.Popen(
        [
            TANDEM,
            "serve",
            "--repository",
            str(story.zoo / "repository"),
            "--model",
            "digits",
            "--grpc-port",
            str(grpc_port),
            "--http-port",
            "0",
            "--metrics-port",
            "0",
        ],
        stdout=(tmp_path / "cloud.log").open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    procs.append(cloud)
    stores = {d: tmp_path / "devices" / d / "store" for d in RUNTIMES}
    try:
        wait_for_port(grpc_port, proc=cloud, timeout=90)
        for device, runtime in RUNTIMES.items():
            procs.append(
                subprocess.Popen(
                    agent_argv(
                        device,
                        broker.url,
                        broker.written.device_passwords[device],
                        stores[device],
                        story.public_key,
                        runtimes=(runtime,),
                    ),
                    stdout=(tmp_path / f"agent-{device}.log").open("wb"),
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        split = tmp_path / "test-split.npz"
        write_test_split(split, story.reports[1])
        apps.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.fleet.app_traffic",
                    f"127.0.0.1:{grpc_port}",
                    str(split),
                    *[f"{d}={s}" for d, s in stores.items()],
                ],
                stdout=(tmp_path / "apps.log").open("wb"),
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=Path(__file__).resolve().parents[2],
            )
        )
        svc = fleet_service(broker, None, db=db)
        wait_devices(svc, len(RUNTIMES), timeout=90)
        yield svc, stores
    finally:
        # The apps first (their clients call the cloud tier), then the agents and the cloud
        # tier together.
        stop_processes(apps)
        stop_processes(procs)


def test_fleet_rollouts_with_real_agents_models_and_telemetry(
    fleet: tuple[ServiceProcess, dict[str, Path]],
) -> None:
    svc, stores = fleet
    stages = [
        {
            "percent": 25,
            "min_soak_s": 2,
            "gates": [{"metric": "failed_device_pct", "threshold": 0}],
        },
        {"percent": 50, "min_soak_s": 1},
        {"percent": 100},
    ]
    for version in (1, 2):
        r = svc.post(
            "/rollouts",
            {
                "model": "digits",
                "version": version,
                "selector": {"site": "lab"},
                "stages": stages,
                "device_timeout_s": 120,
            },
        )
        assert isinstance(r, dict)
        done = svc.wait_rollout(str(r["rollout_id"]), "completed", timeout=240)
        assert done["device_states"] == {"succeeded": 4}, done
        for device, runtime in RUNTIMES.items():
            got = active(stores[device])
            assert got is not None and got[0] == version, (device, got)
            assert got[1].startswith(runtime), (device, got)
        events = svc.get(f"/rollouts/{r['rollout_id']}/events")
        assert isinstance(events, list)
        assert [e["stage_index"] for e in events if e["kind"] == "stage_advanced"] == [1, 2]

    # Telemetry from the apps' SDKs reached the store through the agents, with shadow
    # samples: the good v2 agrees with the cloud model.
    def v2_agreement() -> float:
        rows = svc.get("/telemetry", params={"model": "digits", "version": 2})
        assert isinstance(rows, list)
        return rows[0]["agreement"] or 0.0 if rows and rows[0]["shadow_sampled"] >= 40 else 0.0

    wait_until(
        lambda: v2_agreement() > 0.85, timeout=60, interval=0.5, message="v2 shadow telemetry"
    )

    bad = svc.post(
        "/rollouts",
        {
            "model": "digits",
            "version": 3,
            "selector": {"site": "lab"},
            "stages": [
                {
                    "percent": 25,
                    "min_soak_s": 60,
                    "gates": [
                        {"metric": "shadow_agreement", "threshold": 0.85, "min_samples": 30},
                        {"metric": "failed_device_pct", "threshold": 0},
                    ],
                },
                {"percent": 100, "min_soak_s": 1},
            ],
            "device_timeout_s": 120,
        },
    )
    assert isinstance(bad, dict) and bad["baseline_version"] == 2
    rid = str(bad["rollout_id"])
    done = svc.wait_rollout(rid, "aborted", timeout=180)
    assert done["stage_index"] == 0
    events = svc.get(f"/rollouts/{rid}/events")
    assert isinstance(events, list)
    failed = [e for e in events if e["kind"] == "gate_failed"]
    assert failed and failed[0]["actor"] == "gate:shadow_agreement", events
    cohort = {str(a["device_id"]) for a in svc.get(f"/rollouts/{rid}/devices")}  # type: ignore[union-attr]
    assert len(cohort) == 1
    wait_until(
        lambda: all(
            active(s) is not None and active(s)[0] == 2  # type: ignore[index]
            for s in stores.values()
        ),
        timeout=60,
        message="all back on v2",
    )
    for device, store in stores.items():
        assert (store / "digits" / "3").exists() == (device in cohort), device
