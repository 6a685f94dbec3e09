"""A user's own model through the whole system, nothing simulated: the wine example
(examples/wine, a scikit-learn classifier converted with skl2onnx, built from its spec as
versions 1 and 2) is imported into a real `tandem fleet serve`, rolled out in stages over a
Mosquitto started from `tandem fleet broker-config` output to real `tandem agent run`
processes, and then answers through the SDK on a device's store under `cascade`, with the
low-confidence rows escalated to a real `tandem serve` serving the same zoo's full model,
and its telemetry shipped by the agent to the fleet. The console shows both rollouts done.

Nothing here or in the system under test knows the model's name beyond the spec.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.fleet.conftest import (
    GeneratedBroker,
    ServiceProcess,
    fleet_service,
    generated_broker,
    wait_devices,
)
from tests.support.agent import agent_argv
from tests.support.processes import stop_processes, wait_until
from tests.support.serve import ServeProcess
from tests.support.wine import build_wine_zoo

__all__ = ["fleet_service", "generated_broker"]  # fixtures, used by name
pytestmark = pytest.mark.slow
MODEL = "wine"
DEVICES = ("own-a", "own-b", "own-c")
MAX_ACCURACY_LOSS = 0.0  # the cascade may not lose a single validation row to the edge model


@pytest.fixture(scope="module")
def wine_zoo() -> Path:
    pytest.importorskip("skl2onnx")
    return build_wine_zoo()


def active(store: Path) -> tuple[int, str] | None:
    path = store / MODEL / "active.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    return int(data["version"]), str(data["variant"])


@pytest.fixture
def fleet(
    wine_zoo: Path,
    generated_broker: Callable[[list[str]], GeneratedBroker],
    fleet_service: Callable[..., ServiceProcess],
    tmp_path: Path,
) -> Iterator[tuple[ServiceProcess, ServeProcess, dict[str, Path]]]:
    broker = generated_broker(list(DEVICES))
    stores = {d: tmp_path / "devices" / d / "store" for d in DEVICES}
    agents: list[subprocess.Popen[bytes]] = []
    cloud = ServeProcess(wine_zoo / "repository", tmp_path, "--model", MODEL)
    try:
        for device in DEVICES:
            agents.append(
                subprocess.Popen(
                    agent_argv(
                        device,
                        broker.url,
                        broker.written.device_passwords[device],
                        stores[device],
                        wine_zoo / "keys" / "signing.pub",
                        runtimes=("onnx",),
                    ),
                    stdout=(tmp_path / f"agent-{device}.log").open("wb"),
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        svc = fleet_service(broker, None, db=f"sqlite:///{tmp_path / 'fleet.db'}")
        wait_devices(svc, len(DEVICES), timeout=60)
        yield svc, cloud, stores
    finally:
        stop_processes(agents)
        cloud.stop()


def console(svc: ServiceProcess, path: str, params: dict[str, str] | None = None) -> Any:
    """GET on the console's JSON API (beside the REST API, same token)."""
    r = svc.http.get(f"http://127.0.0.1:{svc.rest_port}/console/api{path}", params=params)
    r.raise_for_status()
    return r.json()


def roll_out(svc: ServiceProcess, version: int) -> dict[str, Any]:
    r = svc.post(
        "/rollouts",
        {
            "model": MODEL,
            "version": version,
            "selector": {"site": "lab"},
            "stages": [
                {
                    "percent": 34,
                    "min_soak_s": 0.5,
                    "gates": [{"metric": "failed_device_pct", "threshold": 0}],
                },
                {"percent": 100},
            ],
            "device_timeout_s": 60,
        },
    )
    assert isinstance(r, dict)
    return svc.wait_rollout(str(r["rollout_id"]), "completed", timeout=60)


def test_own_model_rolls_out_and_answers_under_cascade(
    fleet: tuple[ServiceProcess, ServeProcess, dict[str, Path]], wine_zoo: Path
) -> None:
    from tandem.sdk import Client
    from tandem.sdk.telemetry import TelemetryConfig

    svc, cloud, stores = fleet
    imported = svc.post("/models/import", {"zoo": str(wine_zoo)})
    assert isinstance(imported, dict)
    assert {(i["model"], i["version"]) for i in imported["imported"]} == {(MODEL, 1), (MODEL, 2)}

    rollouts = {}
    for version in (1, 2):
        done = roll_out(svc, version)
        assert done["device_states"] == {"succeeded": len(DEVICES)}, done
        assert done["baseline_version"] == (None if version == 1 else 1), done
        rollouts[version] = str(done["rollout_id"])
        events = svc.get(f"/rollouts/{done['rollout_id']}/events")
        assert isinstance(events, list)
        assert [e["stage_index"] for e in events if e["kind"] == "stage_advanced"] == [1]
        for device, store in stores.items():
            assert active(store) == (version, "onnx-int8"), device

    # The console says the same: both rollouts of the user's model completed, all three
    # devices run v2, and v2 carries the build report's accuracy.
    listed = console(svc, "/rollouts", {"model": MODEL})
    assert isinstance(listed, list)
    assert {(r["version"], r["status"]) for r in listed} == {(1, "completed"), (2, "completed")}
    detail = console(svc, f"/rollouts/{rollouts[2]}")
    assert isinstance(detail, dict)
    assert detail["rollout"]["status"] == "completed"
    assert [s["phase"] for s in detail["stages"]] == ["done", "done"]
    assert sum(s["states"]["succeeded"] for s in detail["stages"]) == len(DEVICES)
    view = console(svc, f"/models/{MODEL}")
    assert isinstance(view, dict) and view["task"] == "classification"
    by_version = {v["version"]: v for v in view["versions"]}
    report = json.loads((wine_zoo / "report.json").read_text())["models"][MODEL]
    assert by_version[2]["devices"] == len(DEVICES) and by_version[1]["devices"] == 0
    assert by_version[2]["variants"][0]["accuracy"] == pytest.approx(
        report["variants"]["onnx-int8"]["accuracy"]
    )

    # An app on one device answers the validation rows through the SDK under cascade.
    device = DEVICES[0]
    val = np.load(wine_zoo.parent / f"{wine_zoo.name}-src" / "val.npz")
    x, labels = val["X"], val["labels"]
    sources: list[tuple[str, object]] = []
    predicted = []
    escalated_flags = []
    with Client(
        model=MODEL,
        artifacts=stores[device],
        cloud=cloud.address,
        policy="cascade",
        max_accuracy_loss=MAX_ACCURACY_LOSS,
        trusted_keys=[wine_zoo / "keys" / "signing.pub"],
        cache_dir=stores[device].parent / "sdk-cache",
        telemetry=TelemetryConfig(
            spool_dir=stores[device] / ".telemetry-spool",
            device_id=device,
            interval_s=0.5,
            drain_interval_s=0.1,
        ),
    ) as client:
        assert client.current is not None and client.current.version == 2
        for row in x:
            result = client.infer({"X": row[None, :]})
            sources.append((result.source, result.model_version))
            escalated_flags.append(result.escalated)
            predicted.append(int(np.argmax(result.outputs["probabilities"], axis=1)[0]))
    # The edge model's own calibrated confidence for each row, to check what was escalated.
    with Client(
        model=MODEL,
        artifacts=stores[device],
        policy="local_only",
        trusted_keys=[wine_zoo / "keys" / "signing.pub"],
        cache_dir=stores[device].parent / "sdk-cache",
    ) as client:
        confidence = np.array([client.infer({"X": row[None, :]}).confidence for row in x])
    is_local = np.array([s == "local" for s, _ in sources])
    assert is_local.any() and all(v == 2 for s, v in sources if s == "local"), sources
    # The least confident rows went to the cloud tier, which serves the same zoo's model
    # (its latest version, 2).
    assert (~is_local).any() and all(v == 2 for s, v in sources if s == "cloud"), sources
    assert all(s in {"local", "cloud"} for s, _ in sources)
    assert escalated_flags == list(~is_local)
    assert confidence[is_local].min() > confidence[~is_local].max(), (confidence, sources)
    accuracy = float(np.mean(np.array(predicted) == labels))
    assert accuracy >= report["variants"]["onnx-int8"]["full_accuracy"] - MAX_ACCURACY_LOSS, (
        accuracy,
        int(is_local.sum()),
        int((~is_local).sum()),
    )

    # The app's telemetry reached the fleet through its agent, counted against v2.
    def shipped() -> dict[str, Any] | None:
        rows = svc.get("/telemetry", params={"model": MODEL, "version": 2})
        assert isinstance(rows, list)
        return rows[0] if rows and rows[0]["requests"] >= len(x) else None

    wait_until(shipped, timeout=30, interval=0.2, message="the app's telemetry in the fleet")
    stats = shipped()
    assert stats is not None
    assert (stats["devices"], stats["requests"], stats["errors"]) == (1, len(x), 0), stats
    assert stats["fallbacks"] == int((~is_local).sum()), stats  # escalations count as such
    # The label-free estimate from the calibrated confidences is near the measured accuracy.
    assert stats["estimated_accuracy"] == pytest.approx(accuracy, abs=0.05), stats
