"""The agent as a real process (`tandem agent run`) against a real Mosquitto with the fleet's
ACL, driven by the fleet double: delivery, delta, activation, health, rollback, resume."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tandem.agent import Agent, AgentConfig, BrokerAddress
from tandem.protos.fleet.v1 import fleet_pb2
from tandem.sdk.telemetry import TelemetryConfig, TelemetryRecorder
from tests.agent.artifacts import Signer, build_variant
from tests.agent.conftest import USERS, AgentProcess
from tests.agent.fleet_double import FleetDouble, Kind
from tests.support.processes import wait_until


def active(store: Path, model: str = "digits") -> dict[str, object] | None:
    path = store / model / "active.json"
    return json.loads(path.read_text()) if path.exists() else None


def staged(store: Path, name: str = "model.onnx") -> list[Path]:
    """The partial file of the transfer in progress (one per file being received)."""
    return list((store / ".agent" / "staging").glob(f"*/{name}.part"))


def spool_summary(store: Path, version: int, *, requests: int, errors: int) -> str:
    """What the app's SDK does: record requests, flush a summary into the agent's spool."""
    recorder = TelemetryRecorder(
        TelemetryConfig(spool_dir=store / ".telemetry-spool", interval_s=3600)
    )
    for i in range(requests):
        outcome = "error" if i < errors else "ok"
        recorder.record("digits", version, "onnx", "local", outcome, 0.2, None, 0.9, False, False)
    (summary,) = recorder.flush()
    return str(summary.summary_id)


def test_delivery_activation_health_delta_and_return_to_baseline(
    fleet: FleetDouble,
    signer: Signer,
    agent_factory: Callable[..., AgentProcess],
    tmp_path: Path,
) -> None:
    v1 = build_variant(tmp_path / "zoo", signer, version=1)
    v2 = build_variant(tmp_path / "zoo", signer, version=2)  # same backbone, new head
    agent = agent_factory("dev-1")
    wait_until(lambda: "dev-1" in fleet.presence, 20, message="presence")
    presence = fleet.presence["dev-1"]
    assert presence.online and presence.tags["ring"] == "canary" and "onnx" in presence.runtimes

    fleet.set_desired("dev-1", v1)
    fleet.wait_report("dev-1", Kind.HEALTHY, 1, timeout=40)
    assert fleet.kinds("dev-1", 1)[-3:] == ["VERIFIED", "ACTIVATED", "HEALTHY"]
    assert active(agent.store) == {
        "version": 1,
        "variant": "onnx-int8",
        "previous": None,
        "max_accepted_version": 1,
    }
    installed = agent.store / "digits" / "1" / "onnx-int8" / "model.onnx"
    v1_model = v1.manifest.file("model.onnx")
    assert hashlib.sha256(installed.read_bytes()).hexdigest() == v1_model.sha256
    wait_until(
        lambda: fleet.presence["dev-1"].active_versions.get("digits") == 1,
        10,
        message="presence shows v1",
    )

    # Telemetry: spooled summaries arrive as zstd batches and leave the spool after PUBACK.
    ids = {spool_summary(agent.store, 1, requests=10, errors=0) for _ in range(3)}
    wait_until(
        lambda: ids <= {s.summary_id for b in fleet.telemetry for s in b.summaries},
        15,
        message="telemetry shipped",
    )
    wait_until(
        lambda: not list((agent.store / ".telemetry-spool").glob("*.pb*")),
        10,
        message="spool emptied",
    )
    assert all(s.device_id == "dev-1" for b in fleet.telemetry for s in b.summaries)

    # v2 comes as a delta against v1 (only the head changed) and is smaller than the full file.
    fleet.set_desired("dev-1", v2, delta_base_version=1)
    fleet.wait_report("dev-1", Kind.HEALTHY, 2, timeout=40)
    model_chunks = [c for c in fleet.sent if c.version == 2 and c.file == "model.onnx"]
    assert model_chunks and all(c.is_delta and c.delta_base_version == 1 for c in model_chunks)
    assert model_chunks[0].total_size < v2.manifest.file("model.onnx").stored_size / 2
    pointer = active(agent.store)
    assert pointer is not None and pointer["version"] == 2
    assert pointer["previous"] == {"version": 1, "variant": "onnx-int8"}
    v2_installed = agent.store / "digits" / "2" / "onnx-int8" / "model.onnx"
    v2_sha = v2.manifest.file("model.onnx").sha256
    assert hashlib.sha256(v2_installed.read_bytes()).hexdigest() == v2_sha

    # A rollout abort points the device back at the baseline it already has: not a rollback
    # attack, so it switches (no new transfer) and reports it healthy.
    sent_before = len(fleet.sent)
    fleet.set_desired("dev-1", v1, rollout_id="abort")
    report = fleet.wait_report("dev-1", Kind.HEALTHY, 1, timeout=20)
    assert report.rollout_id in ("abort", "r1")
    wait_until(lambda: (active(agent.store) or {}).get("version") == 1, 10, message="back on v1")
    assert "REFUSED" not in fleet.kinds("dev-1")
    assert len(fleet.sent) == sent_before
    assert agent.alive


def test_failed_health_rolls_back_by_itself(
    fleet: FleetDouble,
    signer: Signer,
    agent_factory: Callable[..., AgentProcess],
    tmp_path: Path,
) -> None:
    v1 = build_variant(tmp_path / "zoo", signer, version=1)
    v2 = build_variant(tmp_path / "zoo", signer, version=2)
    agent = agent_factory("dev-1", "--health-window", "4")
    fleet.set_desired("dev-1", v1)
    fleet.wait_report("dev-1", Kind.HEALTHY, 1, timeout=40)
    fleet.set_desired("dev-1", v2)
    fleet.wait_report("dev-1", Kind.ACTIVATED, 2, timeout=40)
    # The app's SDK spools what it sees: v2 answers with errors half of the time.
    spool_summary(agent.store, 2, requests=40, errors=20)
    report = fleet.wait_report("dev-1", Kind.ROLLED_BACK, 2, timeout=20)
    assert "error rate" in report.reason and "back on v1" in report.reason
    assert "HEALTHY" not in fleet.kinds("dev-1", 2)
    pointer = active(agent.store)
    assert pointer is not None and pointer["version"] == 1 and pointer["variant"] == "onnx-int8"
    # The desired state still names v2, and the agent does not try it again when it sees it
    # again (a new revision, as after a reconnect). The barrier: a later desired state, on the
    # same topic from the same publisher, whose offer the agent refuses; it handles desired
    # states one at a time and in order, so by that refusal it has judged v2's again.
    before = len(fleet.reports)
    fleet.set_desired("dev-1", v2)
    fleet.set_desired("dev-1", v2, model="faces")  # a digits manifest offered as "faces"
    refusal = fleet.wait_report("dev-1", Kind.REFUSED, 2, timeout=20, after=before)
    assert refusal.model == "faces"
    retried = [r for r in fleet.reports[before:] if r.model == "digits" and r.version == 2]
    assert [Kind.Name(r.kind) for r in retried if r.kind != Kind.ROLLED_BACK] == []
    assert fleet.kinds("dev-1", 2).count("ACTIVATED") == 1
    assert (active(agent.store) or {}).get("version") == 1


def test_resume_after_agent_kill_mid_transfer(
    fleet: FleetDouble,
    signer: Signer,
    agent_factory: Callable[..., AgentProcess],
    tmp_path: Path,
) -> None:
    v1 = build_variant(tmp_path / "zoo", signer, version=1)
    fleet.chunk_budget = 6  # then the "network" goes quiet
    agent = agent_factory("dev-1")
    fleet.set_desired("dev-1", v1)
    staging = agent.store / ".agent" / "staging"

    def persisted_offset() -> int:
        for state in staging.glob("*/transfer.json"):
            files = json.loads(state.read_text())["files"]
            return sum(f["offset"] for f in files if f["name"] == "model.onnx")
        return 0

    wait_until(lambda: persisted_offset() >= 5 * fleet.chunk_size, 30, message="partial file")
    agent.kill()
    offset = persisted_offset()
    assert 0 < offset < v1.manifest.file("model.onnx").stored_size
    assert active(agent.store) is None
    wait_until(lambda: not fleet.presence["dev-1"].online, 10, message="last will")

    fleet.chunk_budget = None
    before = len(fleet.requests)
    agent.start()
    fleet.wait_report("dev-1", Kind.HEALTHY, 1, timeout=40)
    resumed = [r for r in fleet.requests[before:] if r.file == "model.onnx"]
    assert resumed[0].offset == offset
    sent_after = [c for c in fleet.sent if c.file == "model.onnx" and c.offset < offset]
    assert len(sent_after) == offset // fleet.chunk_size  # bytes on disk were never sent twice
    installed = agent.store / "digits" / "1" / "onnx-int8" / "model.onnx"
    assert (
        hashlib.sha256(installed.read_bytes()).hexdigest() == v1.manifest.file("model.onnx").sha256
    )


def test_resume_after_broker_restart_mid_transfer(
    fleet: FleetDouble,
    signer: Signer,
    agent_factory: Callable[..., AgentProcess],
    tmp_path: Path,
) -> None:
    v1 = build_variant(tmp_path / "zoo", signer, version=1)
    fleet.chunk_budget = 5
    agent = agent_factory("dev-1")
    fleet.set_desired("dev-1", v1)
    wait_until(
        lambda: len([c for c in fleet.sent if c.file == "model.onnx"]) >= 5,
        30,
        message="first chunks sent",
    )
    # Those five chunks are on disk (the agent appends each to its .part file as it comes).
    wait_until(
        lambda: sum(p.stat().st_size for p in staged(agent.store)) >= 5 * fleet.chunk_size,
        10,
        message="first chunks written",
    )
    before = len(fleet.requests)
    fleet.broker.restart()  # no persistence: retained state and sessions are gone
    fleet.chunk_budget = None
    fleet.wait_report("dev-1", Kind.HEALTHY, 1, timeout=60)
    resumed = [r for r in fleet.requests[before:] if r.file == "model.onnx"]
    assert resumed and resumed[0].offset == 5 * fleet.chunk_size
    assert agent.alive


def test_garbage_on_every_topic_is_dropped(
    fleet: FleetDouble,
    signer: Signer,
    agent_factory: Callable[..., AgentProcess],
    tmp_path: Path,
) -> None:
    v1 = build_variant(tmp_path / "zoo", signer, version=1)
    agent = agent_factory("dev-1")
    wait_until(lambda: "dev-1" in fleet.presence, 20, message="presence")
    spool = agent.store / ".telemetry-spool"
    spool.mkdir(parents=True, exist_ok=True)
    (spool / "junk.pb").write_bytes(b"\xff\xfe not a protobuf")
    (spool / "junk.pb.zst").write_bytes(b"not zstd")
    (spool / "empty.pb").write_bytes(b"")
    fleet.publish_raw("dev-1", "desired", b"\x0a\xff\xff\xff garbage")
    fleet.publish_raw("dev-1", "chunks", b"\x00\x01\x02 garbage")
    fleet.publish_raw(
        "dev-1",
        "chunks",
        fleet_pb2.ArtifactChunk(
            transfer_id="nope", file="../../etc/passwd", data=b"x", total_size=1
        ).SerializeToString(),
    )
    fleet.publish_raw(
        "dev-1",
        "desired",
        fleet_pb2.DesiredState(
            device_id="dev-1",
            revision=0,
            models=[fleet_pb2.DesiredModel(model="../evil", version=1, variant="x")],
        ).SerializeToString(),
    )
    wait_until(lambda: not any(spool.iterdir()), 10, message="garbage spool files consumed")
    assert agent.alive
    # Still fully working afterwards.
    fleet.set_desired("dev-1", v1)
    fleet.wait_report("dev-1", Kind.HEALTHY, 1, timeout=40)
    assert not (tmp_path / "evil").exists() and not (agent.store.parent / "evil").exists()
    assert "garbage" in agent.log() or "dropped" in agent.log()


def test_resume_after_fleet_service_restart_mid_transfer(
    fleet: FleetDouble,
    signer: Signer,
    agent_factory: Callable[..., AgentProcess],
    tmp_path: Path,
) -> None:
    v1 = build_variant(tmp_path / "zoo", signer, version=1)
    fleet.chunk_budget = 5
    agent = agent_factory("dev-1")
    fleet.set_desired("dev-1", v1)
    wait_until(
        lambda: len([c for c in fleet.sent if c.file == "model.onnx"]) >= 5,
        30,
        message="first chunks sent",
    )
    fleet.close()  # the service dies with the rest of the stream unsent
    replacement = FleetDouble(fleet.broker)
    try:
        replacement.offer(v1)  # knows the artifact, has not been asked for anything yet
        # The agent's stall timer asks again from its offset; the new service answers.
        replacement.wait_report("dev-1", Kind.HEALTHY, 1, timeout=40)
        resumed = [r for r in replacement.requests if r.file == "model.onnx"]
        assert resumed and resumed[0].offset == 5 * fleet.chunk_size
        assert agent.alive
    finally:
        replacement.close()


def test_health_window_survives_an_agent_restart(
    fleet: FleetDouble,
    signer: Signer,
    agent_factory: Callable[..., AgentProcess],
    tmp_path: Path,
) -> None:
    v1 = build_variant(tmp_path / "zoo", signer, version=1)
    agent = agent_factory("dev-1", "--health-window", "5")
    fleet.set_desired("dev-1", v1)
    fleet.wait_report("dev-1", Kind.ACTIVATED, 1, timeout=40)
    agent.kill()  # inside the health window
    state = json.loads((agent.store / ".agent" / "state.json").read_text())
    assert state["models"]["digits"]["health"]["version"] == 1
    agent.start()
    fleet.wait_report("dev-1", Kind.HEALTHY, 1, timeout=30)
    # Resumed, not re-activated: one ACTIVATED report, though the restart may send it again
    # (killed before the PUBACK was taken in, it was still in the outbox).
    assert fleet.recorded("dev-1", 1).count("ACTIVATED") == 1
    state = json.loads((agent.store / ".agent" / "state.json").read_text())
    assert state["models"]["digits"]["health"] is None


def test_telemetry_is_deleted_only_after_puback(
    fleet: FleetDouble,
    signer: Signer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # In this process, for a PUBACK timeout of a second (the command line keeps the default
    # 10 s): the warning that a batch went unacknowledged proves the agent shipped it.
    store = tmp_path / "store"
    config = AgentConfig(
        device_id="dev-1",
        broker=BrokerAddress.parse(fleet.broker.url),
        store=store,
        trusted_keys=(signer.public_path,),
        username="dev-1",
        password=USERS["dev-1"],
        telemetry_interval_s=0.5,
        publish_timeout_s=1.0,
    )
    agent = Agent(config).start()
    try:
        wait_until(lambda: "dev-1" in fleet.presence, 20, message="presence")
        broker = fleet.broker.proc
        assert broker is not None
        os.kill(broker.pid, signal.SIGSTOP)  # connections stay up, nothing is acknowledged
        try:
            with caplog.at_level("WARNING", logger="tandem.agent.shipping"):
                summary_id = spool_summary(store, 1, requests=5, errors=0)
                wait_until(
                    lambda: "telemetry batch not acknowledged" in caplog.text,
                    10,
                    message="a batch published and not acknowledged",
                )
            assert list((store / ".telemetry-spool").glob("*.pb.zst"))
        finally:
            os.kill(broker.pid, signal.SIGCONT)
        wait_until(
            lambda: summary_id in {s.summary_id for b in fleet.telemetry for s in b.summaries},
            30,
            message="shipped once the broker answers",
        )
        wait_until(
            lambda: not list((store / ".telemetry-spool").glob("*.pb.zst")),
            10,
            message="deleted after PUBACK",
        )
        assert agent.error is None
    finally:
        agent.stop()
    assert agent.wait(5) and agent.error is None


def test_sigterm_stops_the_agent_cleanly_and_promptly(
    fleet: FleetDouble, agent_factory: Callable[..., AgentProcess]
) -> None:
    """SIGTERM: the agent says it is offline, leaves the broker and exits 0, at once (the
    stop starts in the signal handler; every test that stops an agent waits for it)."""
    agent = agent_factory("dev-1")
    wait_until(
        lambda: "dev-1" in fleet.presence and fleet.presence["dev-1"].online,
        20,
        message="online presence",
    )
    assert agent.proc is not None
    started = time.monotonic()
    agent.proc.send_signal(signal.SIGTERM)
    assert agent.proc.wait(10) == 0, agent.log()[-3000:]
    took = time.monotonic() - started
    wait_until(lambda: not fleet.presence["dev-1"].online, 10, message="offline presence")
    assert "signal 15: stopping" in agent.log()
    assert took < 1.5, f"SIGTERM to exit took {took:.2f} s (~0.1 s expected)"
