"""The agent killed between any two durable writes of an activation, without a broker.

A SIGKILL leaves on disk exactly what the agent had written (every write is atomic and
fsynced). So instead of racing a kill against a real process, the first agent's activation
snapshots the store after each of its durable writes; each snapshot is then the disk a kill
at that point leaves behind. A fresh agent on every snapshot, given the same (retained)
desired state, must end on the new version with its health confirmed: reported HEALTHY by
one of the two runs, never left active without a health window (the restarted agent would
then see it active, do nothing, and never report HEALTHY).

The same stand-in for the broker and the fleet can withhold the fleet's acks: a report the
fleet never acknowledged stays in the agent's outbox on disk and is sent again by the next
run.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import tandem.agent.state
import tandem.sdk.store
from tandem.agent.agent import Agent
from tandem.agent.config import AgentConfig, BrokerAddress
from tandem.agent.verify import Offer
from tandem.protos.fleet.v1 import fleet_pb2, topics
from tandem.sdk.artifacts import load_variant, unpack_variant
from tandem.sdk.store import ActivePointer, ModelStore
from tests.agent.artifacts import BuiltVariant, Signer, build_variant

Kind = fleet_pb2.DeviceReport.Kind


@dataclass
class _Sent:
    """What paho's publish returns, as far as the agent looks at it."""

    mid: int
    acked: bool

    def is_published(self) -> bool:
        return self.acked


class _Broker:
    """Stands in for the MQTT client and the fleet behind it: keeps the reports the agent
    publishes, and acknowledges them (PUBACK, and the fleet's ReportAck, handed to the
    agent at once) unless `acks` is False."""

    def __init__(self, agent: Agent, *, acks: bool = True) -> None:
        self.agent = agent
        self.acks = acks
        self.reports: list[tuple[str, int]] = []
        self.report_ids: list[str] = []

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> _Sent:
        if topic.endswith("/" + topics.REPORTS):
            report = fleet_pb2.DeviceReport.FromString(payload)
            self.reports.append((Kind.Name(report.kind), report.version))
            self.report_ids.append(report.report_id)
            if self.acks and report.kind != Kind.PROGRESS:
                ack = fleet_pb2.ReportAck(device_id=report.device_id, report_ids=[report.report_id])
                self.agent._handle_report_ack(ack.SerializeToString())
        return _Sent(mid=len(self.reports), acked=self.acks)


def _agent(store: Path, signer: Signer, *, acks: bool = True) -> tuple[Agent, _Broker]:
    """An agent as `_main` starts it (state loaded, health windows resumed), minus MQTT."""
    agent = Agent(
        AgentConfig(
            device_id="dev-1",
            broker=BrokerAddress.parse("mqtt://127.0.0.1:1"),
            store=store,
            trusted_keys=(signer.public_path,),
            hardware="x86_64",
            runtimes=("onnx",),
            health_window_s=0.3,
            health_probe_interval_s=0.05,
        )
    )
    broker = _Broker(agent, acks=acks)
    agent._client = broker  # type: ignore[assignment]
    agent._connected.set()
    agent.state.load()
    agent._resume_health_watches()
    return agent, broker


async def _desired(agent: Agent, offer: Offer, *, settle: bool = True) -> None:
    """What the agent does with a (retained) desired state, then its timer ticks until every
    health window has a verdict."""
    agent._desired = {offer.model: offer}
    await agent._reconcile()
    deadline = time.monotonic() + 15
    while settle and agent._watches and time.monotonic() < deadline:
        await agent._tick()
        await asyncio.sleep(0.02)
    assert not settle or not agent._watches, "a health window never ended"


def _install(store: Path, built: BuiltVariant) -> None:
    """The variant verified and moved into the store, as `Staging.install_into` leaves it."""
    unpack_variant(load_variant(built.path))
    dest = store / "digits" / str(built.manifest.version) / built.manifest.variant
    shutil.copytree(built.path, dest)


def _offer(built: BuiltVariant) -> Offer:
    return Offer(
        model="digits",
        version=built.manifest.version,
        variant=built.manifest.variant,
        signed=built.signed,
        signatures=built.signatures,
        rollout_id="r2",
    )


def _v1_active_v2_installed(tmp_path: Path) -> tuple[Signer, BuiltVariant, Path]:
    """(signer, v2, store): a store running v1 with v2 verified and installed beside it, not
    yet switched to (where a kill "during activation" finds it)."""
    signer = Signer.create(tmp_path / "keys")
    v1 = build_variant(tmp_path / "zoo", signer, version=1)
    v2 = build_variant(tmp_path / "zoo", signer, version=2)
    store = tmp_path / "store"
    _install(store, v1)
    ModelStore(store).write_active(
        "digits", ActivePointer(version=1, variant="onnx-int8", max_accepted_version=2)
    )
    _install(store, v2)
    return signer, v2, store


@contextlib.contextmanager
def _snapshot_every_write(
    store: Path, into: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[list[Path]]:
    """Copies the store after each durable write (the pointer, the agent's state.json)
    while the block runs: each copy is the disk a kill at that point leaves behind."""
    snapshots: list[Path] = []
    write_atomic = tandem.sdk.store.write_atomic

    def write_then_snapshot(path: Path, data: bytes) -> None:
        write_atomic(path, data)
        snapshot = into / f"kill-{len(snapshots)}"
        shutil.copytree(store, snapshot)
        snapshots.append(snapshot)

    with monkeypatch.context() as patch:
        patch.setattr(tandem.sdk.store, "write_atomic", write_then_snapshot)
        patch.setattr(tandem.agent.state, "write_atomic", write_then_snapshot)
        yield snapshots


def test_a_kill_at_any_write_of_an_activation_still_ends_healthy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    signer, v2, store = _v1_active_v2_installed(tmp_path)
    first, first_broker = _agent(store, signer)
    with _snapshot_every_write(store, tmp_path, monkeypatch) as snapshots:
        asyncio.run(_desired(first, _offer(v2), settle=False))  # activation only
    assert first_broker.reports == [("ACTIVATED", 2)]
    assert len(snapshots) >= 2, "the activation wrote the pointer and the agent state"

    for index, snapshot in enumerate(snapshots):
        restarted, broker = _agent(snapshot, signer)
        asyncio.run(_desired(restarted, _offer(v2)))
        pointer = ModelStore(snapshot).read_active("digits")
        assert pointer is not None and pointer.version == 2, (index, pointer)
        assert ("HEALTHY", 2) in broker.reports, (index, broker.reports)
        # Resumed (no second activation) or switched again (the first switch never happened).
        assert broker.reports in (
            [("HEALTHY", 2)],
            [("ACTIVATED", 2), ("HEALTHY", 2)],
        ), (index, broker.reports)


def test_a_kill_at_any_write_of_a_rollback_still_ends_on_the_old_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    signer, v2, store = _v1_active_v2_installed(tmp_path)
    first, first_broker = _agent(store, signer)
    asyncio.run(_desired(first, _offer(v2), settle=False))
    # The app's telemetry says v2 fails half of its requests: the window ends unhealthy.
    first._watches["digits"].health.observe_summary("digits", 2, requests=40, errors=20)

    with _snapshot_every_write(store, tmp_path, monkeypatch) as snapshots:
        asyncio.run(_desired(first, _offer(v2)))
    assert first_broker.reports == [("ACTIVATED", 2), ("ROLLED_BACK", 2)]
    assert len(snapshots) >= 2, "the rollback wrote the agent state and the pointer"

    for index, snapshot in enumerate(snapshots):
        restarted, broker = _agent(snapshot, signer)
        asyncio.run(_desired(restarted, _offer(v2)))  # the retained state still names v2
        pointer = ModelStore(snapshot).read_active("digits")
        assert pointer is not None and pointer.version == 1, (index, pointer, broker.reports)
        # No second activation: an ACTIVATED here is the first run's, re-sent from its
        # outbox (the ack had not been taken in yet), with the first run's report id.
        activated = [
            i for i, r in zip(broker.report_ids, broker.reports, strict=True) if r[0] == "ACTIVATED"
        ]
        assert set(activated) <= set(first_broker.report_ids), (index, broker.reports)
        assert (2, "onnx-int8") in restarted.state.model("digits").failed, index


async def _connected_then_tick(agent: Agent) -> None:
    """The broker session comes up (the agent sends what its outbox holds), then one turn
    of the timer."""
    await agent._handle_connected()
    await agent._tick()


def _queued(store: Path) -> list[str]:
    """The report ids waiting in the agent's outbox on disk."""
    doc = json.loads((store / ".agent" / "state.json").read_text())
    return [
        fleet_pb2.DeviceReport.FromString(base64.b64decode(item)).report_id
        for item in doc.get("outbox", [])
    ]


def test_a_report_the_fleet_never_acknowledged_is_sent_again_after_a_restart(
    tmp_path: Path,
) -> None:
    """HEALTHY saved on disk, published, but no ack before the kill: without an outbox
    the restarted agent finds v2 active and healthy and never says so again, and a rollout
    waits for it forever."""
    signer, v2, store = _v1_active_v2_installed(tmp_path)

    first, unacked = _agent(store, signer, acks=False)
    asyncio.run(_desired(first, _offer(v2)))
    assert unacked.reports == [("ACTIVATED", 2), ("HEALTHY", 2)]
    healthy_id = unacked.report_ids[1]
    assert healthy_id in _queued(store), "an unacknowledged HEALTHY must stay on disk"
    assert first.state.model("digits").health is None  # the window is over: nothing resumes

    # The kill: the first agent is simply dropped. The next run, given the same desired
    # state, has nothing to install or watch, and still sends HEALTHY, with the same id.
    restarted, broker = _agent(store, signer)
    asyncio.run(_desired(restarted, _offer(v2)))
    asyncio.run(_connected_then_tick(restarted))
    assert ("HEALTHY", 2) in broker.reports, broker.reports
    sent = zip(broker.report_ids, broker.reports, strict=True)
    resent = [i for i, r in sent if r[0] == "HEALTHY"]
    assert resent == [healthy_id], "re-sent as the same report, so the fleet counts it once"
    assert ("ACTIVATED", 2) in broker.reports  # unacknowledged too, so also re-sent

    # Acknowledged now: the outbox is empty on disk and a third run sends nothing.
    assert _queued(store) == []
    third, quiet = _agent(store, signer)
    asyncio.run(_desired(third, _offer(v2)))
    asyncio.run(_connected_then_tick(third))
    assert quiet.reports == []


def test_a_kill_after_a_rollback_moved_the_pointer_still_reports_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every disk a kill inside a rollback can leave: ROLLED_BACK reaches the fleet from
    one of the two runs (or is waiting in the outbox the restart sends from)."""
    signer, v2, store = _v1_active_v2_installed(tmp_path)
    first, _ = _agent(store, signer, acks=False)
    asyncio.run(_desired(first, _offer(v2), settle=False))
    first._watches["digits"].health.observe_summary("digits", 2, requests=40, errors=20)

    with _snapshot_every_write(store, tmp_path, monkeypatch) as snapshots:
        asyncio.run(_desired(first, _offer(v2)))
    assert len(snapshots) >= 3, "failure mark, pointer back, window end with its report"

    for index, snapshot in enumerate(snapshots):
        restarted, broker = _agent(snapshot, signer)
        asyncio.run(_desired(restarted, _offer(v2)))
        asyncio.run(_connected_then_tick(restarted))
        assert ("ROLLED_BACK", 2) in broker.reports, (index, broker.reports)
        assert _queued(snapshot) == [], index
        assert restarted.state.model("digits").health is None, index
