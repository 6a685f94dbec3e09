"""The agent killed between any two durable writes of an activation, without a broker.

A SIGKILL leaves on disk exactly what the agent had written (every write is atomic and
fsynced). So instead of racing a kill against a real process, the first agent's activation
snapshots the store after each of its durable writes; each snapshot is then the disk a kill
at that point leaves behind. A fresh agent on every snapshot, given the same (retained)
desired state, must end on the new version with its health confirmed: reported HEALTHY by
one of the two runs, never left active without a health window (the restarted agent would
then see it active, do nothing, and never report HEALTHY).
"""

from __future__ import annotations

import asyncio
import shutil
import time
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


class _Broker:
    """Stands in for the MQTT client: keeps the reports the agent publishes."""

    def __init__(self) -> None:
        self.reports: list[tuple[str, int]] = []

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        if topic.endswith("/" + topics.REPORTS):
            report = fleet_pb2.DeviceReport.FromString(payload)
            self.reports.append((Kind.Name(report.kind), report.version))


def _agent(store: Path, signer: Signer) -> tuple[Agent, _Broker]:
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
    broker = _Broker()
    agent._client = broker  # type: ignore[assignment]
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


def test_a_kill_at_any_write_of_an_activation_still_ends_healthy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    signer = Signer.create(tmp_path / "keys")
    v1 = build_variant(tmp_path / "zoo", signer, version=1)
    v2 = build_variant(tmp_path / "zoo", signer, version=2)
    store = tmp_path / "store"
    _install(store, v1)
    ModelStore(store).write_active(
        "digits", ActivePointer(version=1, variant="onnx-int8", max_accepted_version=2)
    )
    _install(store, v2)  # the kill "during activation": installed, not yet switched to

    snapshots: list[Path] = []
    write_atomic = tandem.sdk.store.write_atomic

    def write_then_snapshot(path: Path, data: bytes) -> None:
        write_atomic(path, data)
        snapshot = tmp_path / f"kill-{len(snapshots)}"
        shutil.copytree(store, snapshot)
        snapshots.append(snapshot)

    first, first_broker = _agent(store, signer)
    with monkeypatch.context() as patch:
        patch.setattr(tandem.sdk.store, "write_atomic", write_then_snapshot)  # the pointer
        patch.setattr(tandem.agent.state, "write_atomic", write_then_snapshot)  # state.json
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
    signer = Signer.create(tmp_path / "keys")
    v1 = build_variant(tmp_path / "zoo", signer, version=1)
    v2 = build_variant(tmp_path / "zoo", signer, version=2)
    store = tmp_path / "store"
    _install(store, v1)
    ModelStore(store).write_active(
        "digits", ActivePointer(version=1, variant="onnx-int8", max_accepted_version=2)
    )
    _install(store, v2)
    first, first_broker = _agent(store, signer)
    asyncio.run(_desired(first, _offer(v2), settle=False))
    # The app's telemetry says v2 fails half of its requests: the window ends unhealthy.
    first._watches["digits"].health.observe_summary("digits", 2, requests=40, errors=20)

    snapshots: list[Path] = []
    write_atomic = tandem.sdk.store.write_atomic

    def write_then_snapshot(path: Path, data: bytes) -> None:
        write_atomic(path, data)
        snapshot = tmp_path / f"kill-{len(snapshots)}"
        shutil.copytree(store, snapshot)
        snapshots.append(snapshot)

    with monkeypatch.context() as patch:
        patch.setattr(tandem.sdk.store, "write_atomic", write_then_snapshot)
        patch.setattr(tandem.agent.state, "write_atomic", write_then_snapshot)
        asyncio.run(_desired(first, _offer(v2)))
    assert first_broker.reports == [("ACTIVATED", 2), ("ROLLED_BACK", 2)]
    assert len(snapshots) >= 2, "the rollback wrote the agent state and the pointer"

    for index, snapshot in enumerate(snapshots):
        restarted, broker = _agent(snapshot, signer)
        asyncio.run(_desired(restarted, _offer(v2)))  # the retained state still names v2
        pointer = ModelStore(snapshot).read_active("digits")
        assert pointer is not None and pointer.version == 1, (index, pointer, broker.reports)
        assert ("ACTIVATED", 2) not in broker.reports, (index, broker.reports)
        assert (2, "onnx-int8") in restarted.state.model("digits").failed, index
