"""Interop: real `tandem agent run` processes against the real fleet service
(`tandem fleet serve`) on a Mosquitto configured by `tandem fleet broker-config`.

The fleet's own tests simulate devices; this one checks that the agent and the service
agree on the wire: rollouts complete on agent reports, the second version travels as a
delta, and an abort returns the touched devices to the baseline they already have.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from tests.agent.artifacts import Signer, build_variant
from tests.support.agent import agent_argv
from tests.support.processes import stop_processes, wait_until

pytest.importorskip("tandem.cloud.fleet.service")
from tests.fleet.conftest import (
    GeneratedBroker,
    ServiceProcess,
    fleet_service,
    generated_broker,
    wait_devices,
)

__all__ = ["fleet_service", "generated_broker"]  # fixtures, used by name
# device -> its runtimes, in its order of preference
DEVICES = {"dev-a": ["onnx"], "dev-b": ["openvino"], "dev-c": ["openvino", "onnx"]}
VARIANT_OF = {"onnx": "onnx-int8", "openvino": "openvino-fp32"}


@pytest.fixture
def zoo(tmp_path: Path) -> Path:
    root = tmp_path / "zoo"
    signer = Signer.create(root / "keys")
    # The fleet key: the service signs desired states with it (fleet.key), agents verify.
    fleet = Signer.create(root / "keys", name="fleet")
    private = root / "keys" / "fleet.key"
    private.write_bytes(fleet.key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    private.chmod(0o600)
    for version in (1, 2):
        build_variant(root / "artifacts", signer, version=version)
        # OpenVINO reads ONNX too: a second runtime without a second model format.
        build_variant(
            root / "artifacts", signer, version=version, variant="openvino-fp32", runtime="openvino"
        )
    (root / "report.json").write_text(json.dumps({"models": {"digits": {}}}))
    return root


@pytest.fixture
def agents(
    generated_broker: Callable[[list[str]], GeneratedBroker], zoo: Path, tmp_path: Path
) -> Iterator[tuple[GeneratedBroker, dict[str, Path]]]:
    broker = generated_broker(list(DEVICES))
    procs: list[subprocess.Popen[bytes]] = []
    stores = {d: tmp_path / f"store-{d}" for d in DEVICES}
    for device in DEVICES:
        with (tmp_path / f"agent-{device}.log").open("wb") as log:
            procs.append(
                subprocess.Popen(
                    agent_argv(
                        device,
                        broker.url,
                        broker.written.device_passwords[device],
                        stores[device],
                        zoo / "keys/signing.pub",
                        runtimes=DEVICES[device],
                        health_window=1,
                        health_probe_interval=0.3,
                        telemetry_interval=0.5,
                        extra=["--fleet-key", str(zoo / "keys/fleet.pub")],
                    ),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
    yield broker, stores
    stop_processes(procs)


def active_version(store: Path) -> int | None:
    path = store / "digits" / "active.json"
    return int(json.loads(path.read_text())["version"]) if path.exists() else None


def test_rollouts_and_abort_between_agents_and_the_fleet_service(
    agents: tuple[GeneratedBroker, dict[str, Path]],
    fleet_service: Callable[..., ServiceProcess],
    zoo: Path,
) -> None:
    broker, stores = agents
    svc = fleet_service(
        broker,
        zoo,
        "--trusted-key",
        str(zoo / "keys/signing.pub"),
        "--fleet-key",
        str(zoo / "keys/fleet.key"),
    )
    wait_devices(svc, len(DEVICES))
    # What operators provision agents with: the public half of the key the service signs with.
    key = svc.get("/fleet-key")
    assert isinstance(key, dict)
    assert key["public_key_pem"].encode() == (zoo / "keys/fleet.pub").read_bytes()
    selector = {"site": "lab"}

    first = svc.post(
        "/rollouts",
        {"model": "digits", "version": 1, "selector": selector, "stages": [{"percent": 100}]},
    )
    assert isinstance(first, dict)
    done = svc.wait_rollout(str(first["rollout_id"]), "completed", timeout=60)
    assert done["device_states"] == {"succeeded": len(DEVICES)}
    assert all(active_version(s) == 1 for s in stores.values())
    # Each device got the variant for its first runtime.
    for device, runtimes in DEVICES.items():
        pointer = json.loads((stores[device] / "digits" / "active.json").read_text())
        assert pointer["variant"] == VARIANT_OF[runtimes[0]], (device, pointer)

    # v2 to a first cohort that soaks long enough to abort it by hand.
    second = svc.post(
        "/rollouts",
        {
            "model": "digits",
            "version": 2,
            "selector": selector,
            "stages": [{"percent": 34, "min_soak_s": 120}, {"percent": 100}],
        },
    )
    assert isinstance(second, dict)
    rid = str(second["rollout_id"])

    def cohort() -> set[str]:
        rows = svc.get(f"/rollouts/{rid}/devices")
        assert isinstance(rows, list)
        return {str(r["device_id"]) for r in rows}

    def cohort_healthy() -> bool:
        touched = cohort()
        return bool(touched) and all(active_version(stores[d]) == 2 for d in touched)

    wait_until(cohort_healthy, 40, message=f"first cohort on v2: {svc.log_tail()}")
    touched = cohort()
    assert 0 < len(touched) < len(DEVICES)
    svc.post(f"/rollouts/{rid}/abort")
    wait_until(
        lambda: all(active_version(s) == 1 for s in stores.values()),
        40,
        message=f"back on the baseline: {svc.log_tail()}",
    )
    # Nobody outside the cohort ever received v2; the cohort switched back to the v1 it had.
    for name, store in stores.items():
        assert (store / "digits" / "2").exists() == (name in touched)
    rollout = svc.rollout(rid)
    assert rollout["status"] == "aborted", rollout
    # The service acknowledged every report (its ReportAck, through the generated ACL): no
    # agent still holds one in its outbox, so none is sent again.
    wait_until(
        lambda: all(not queued_reports(s) for s in stores.values()),
        15,
        message=f"outboxes drained: { {d: queued_reports(s) for d, s in stores.items()} }",
    )


def queued_reports(store: Path) -> list[str]:
    doc = json.loads((store / ".agent" / "state.json").read_text())
    return list(doc.get("outbox", []))
