"""The device agent (`tandem agent run`) killed at every step of a delivery, and a device
whose disk cannot take the update.

Driven by the fleet double (tests/agent/fleet_double.py) through a real Mosquitto with the
fleet's ACL. After every fault the device must run a valid model, the old or the new one and
never a broken one: the test loads the store's active version with the SDK (signatures
checked) and runs the variant's reference inputs through it. Then the delivery must complete.
"""

from __future__ import annotations

import io
import json
import resource
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import zstandard

from tandem.sdk import Client
from tandem.sdk.artifacts import split_reference
from tests.agent.artifacts import BuiltVariant, Signer, build_variant
from tests.agent.conftest import AgentProcess
from tests.agent.fleet_double import FleetDouble, Kind
from tests.support.figures import Figures
from tests.support.processes import wait_until


def active_version(store: Path) -> int | None:
    path = store / "digits" / "active.json"
    return int(json.loads(path.read_text())["version"]) if path.exists() else None


def check_device_runs_a_valid_model(
    store: Path, built: dict[int, BuiltVariant], signer: Signer, cache: Path
) -> int:
    """Loads the active version as an app would and checks it on the reference inputs."""
    version = active_version(store)
    assert version is not None, "no active model"
    stored = built[version].path / "reference.npz.zst"
    arrays = np.load(io.BytesIO(zstandard.ZstdDecompressor().decompress(stored.read_bytes())))
    inputs, outputs = split_reference(dict(arrays))
    with Client(
        "digits",
        artifacts=store,
        policy="local_only",
        runtime="onnx",
        trusted_keys=[signer.public_path],
        cache_dir=cache,
        watch_interval_s=60,
    ) as client:
        result = client.infer(inputs["pixels"])
    assert result.model_version == version, (result.model_version, version)
    np.testing.assert_allclose(result.outputs["logits"], outputs["logits"], rtol=1e-4, atol=1e-4)
    return version


def test_agent_killed_at_every_step_of_a_delivery(
    fleet: FleetDouble,
    signer: Signer,
    agent_factory: Callable[..., AgentProcess],
    tmp_path: Path,
    figures: Figures,
) -> None:
    zoo = tmp_path / "zoo"
    built = {v: build_variant(zoo, signer, version=v) for v in range(1, 6)}
    agent = agent_factory("dev-1")
    fleet.set_desired("dev-1", built[1])
    fleet.wait_report("dev-1", Kind.HEALTHY, 1, timeout=40)
    store = agent.store
    staging = store / ".agent" / "staging"

    def staged_bytes() -> int:
        total = 0
        for state in staging.glob("*/transfer.json"):
            total += sum(int(f["offset"]) for f in json.loads(state.read_text())["files"])
        return total

    def installed(version: int) -> Callable[[], bool]:
        return lambda: (store / "digits" / str(version) / "onnx-int8" / "model.onnx").exists()

    def reported(kind: int, version: int) -> Callable[[], bool]:
        return lambda: any(
            r.kind == kind and r.version == version and r.device_id == "dev-1"
            for r in list(fleet.reports)
        )

    # Each step: (what is going on at the kill, version delivered, when to kill).
    steps: list[tuple[str, int, Callable[[], bool]]] = [
        ("mid-chunk (file partly staged)", 2, lambda: staged_bytes() > 0),
        ("after verify (VERIFIED reported)", 3, reported(Kind.VERIFIED, 3)),
        ("during activation (installed, warming up)", 4, installed(4)),
        ("after activation (inside the health window)", 5, reported(Kind.ACTIVATED, 5)),
    ]
    kills = 0
    outcomes: dict[str, str] = {}
    for label, version, trigger in steps:
        if version == 2:
            fleet.chunk_budget = 3  # the stream stalls after 3 chunks: a kill lands mid-file
        fleet.set_desired("dev-1", built[version], rollout_id=f"r{version}")
        wait_until(trigger, 40, interval=0.005, message=f"{label}: {agent.log()[-2000:]}")
        agent.kill()
        kills += 1
        running = check_device_runs_a_valid_model(store, built, signer, tmp_path / "cache")
        assert running in (version - 1, version), (label, running)
        fleet.chunk_budget = None
        agent.start()
        fleet.wait_report("dev-1", Kind.HEALTHY, version, timeout=60)
        assert check_device_runs_a_valid_model(store, built, signer, tmp_path / "cache") == version
        assert agent.alive
        outcomes[label] = f"ran v{running} after the kill, v{version} healthy after restart"
    # A resumed delivery never activated twice (a kill between the pointer switch and the
    # ACTIVATED report loses that report; the resumed health window still says HEALTHY),
    # and nothing was refused. Counted as the fleet service records reports, once per
    # report_id: reports are at-least-once, so a kill before the agent took in a PUBACK
    # legitimately puts the same report on the wire again after the restart.
    for version in range(2, 6):
        kinds = fleet.recorded("dev-1", version)
        assert kinds.count("ACTIVATED") <= 1 and kinds.count("HEALTHY") == 1, (version, kinds)
    assert "REFUSED" not in fleet.kinds("dev-1") and "FAILED" not in fleet.kinds("dev-1")
    figures.record(
        "agent SIGKILLed at every step of a delivery",
        deliveries=len(steps),
        kills=kills,
        broken_models_seen=0,
        deliveries_completed=len(steps),
        **outcomes,
    )


def test_a_full_disk_refuses_the_update_and_keeps_serving(
    fleet: FleetDouble,
    signer: Signer,
    agent_factory: Callable[..., AgentProcess],
    tmp_path: Path,
    figures: Figures,
) -> None:
    """A disk that cannot take the new version: the agent's writes fail with EFBIG, as they
    would with ENOSPC on a full disk. RLIMIT_FSIZE (set on the agent process only, no
    privileges needed) caps any file the agent writes at 64 KiB; the new model is ~130 KiB,
    while state, pointers and telemetry files stay far below. The old version keeps serving.
    """
    zoo = tmp_path / "zoo"
    built = {v: build_variant(zoo, signer, version=v) for v in (1, 2)}
    assert built[2].manifest.file("model.onnx").size > 100_000
    fleet.deltas = False  # the full file, so the staging write itself hits the limit
    agent = agent_factory("dev-1")
    fleet.set_desired("dev-1", built[1])
    fleet.wait_report("dev-1", Kind.HEALTHY, 1, timeout=40)
    agent.stop()

    limit = 64 * 1024

    def small_disk() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    assert agent.proc is not None
    log = agent.log_path.open("ab")
    agent.proc = subprocess.Popen(
        agent.argv(),
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=small_disk,
        start_new_session=True,
    )
    log.close()
    wait_until(
        lambda: fleet.presence.get("dev-1") is not None and fleet.presence["dev-1"].online, 20
    )
    mark = len(fleet.reports)
    fleet.set_desired("dev-1", built[2], rollout_id="r2")
    report = fleet.wait_report("dev-1", Kind.REFUSED, 2, timeout=40, after=mark)
    time.sleep(1.0)
    assert agent.alive
    assert active_version(agent.store) == 1
    assert check_device_runs_a_valid_model(agent.store, built, signer, tmp_path / "cache") == 1
    assert "ACTIVATED" not in fleet.kinds("dev-1", 2)
    figures.record(
        "device disk cannot take the update (RLIMIT_FSIZE 64 KiB on the agent)",
        update_bytes=built[2].manifest.file("model.onnx").size,
        refused_with=report.reason[:160],
        still_active="v1",
        agent_alive=agent.alive,
    )
