"""The outbox keeps a report until the fleet's ReportAck, whatever the broker's PUBACK says,
and sends it again on the growing, capped waits of `tandem.agent.resend`; without a broker
(a stand-in client that PUBACKs everything at once)."""

from __future__ import annotations

import base64
import itertools
import json
import time
from pathlib import Path

import pytest

from tandem.agent.agent import Agent
from tandem.agent.config import AgentConfig, BrokerAddress
from tandem.agent.core import Ref
from tandem.agent.resend import ResendPolicy, ResendSchedule
from tandem.errors import ConfigError
from tandem.protos.fleet.v1 import fleet_pb2, topics
from tests.agent.artifacts import Signer

Kind = fleet_pb2.DeviceReport.Kind


def test_the_wait_grows_by_its_factor_up_to_the_cap_with_bounded_jitter() -> None:
    policy = ResendPolicy(first_s=1.0, factor=2.0, max_s=5.0, jitter=0.2)
    assert [policy.wait_s(n) for n in range(1, 6)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert policy.wait_s(10_000) == 5.0  # no overflow on a long outage
    assert policy.wait_s(1, rand=0.0) == pytest.approx(0.8)
    assert policy.wait_s(3, rand=0.999999) == pytest.approx(4.8, rel=1e-5)
    for bad in (
        {"first_s": 0},
        {"max_s": -1},
        {"factor": 0.5},
        {"jitter": 1.0},
        {"first_s": 10, "max_s": 5},
    ):
        with pytest.raises(ConfigError):
            ResendPolicy(**bad)  # type: ignore[arg-type]


def test_the_schedule_says_what_is_due() -> None:
    s = ResendSchedule(ResendPolicy(first_s=1.0, max_s=4.0, jitter=0.0))
    assert s.due(["a", "b"], now=0.0) == ["a", "b"], "never sent: due at once"
    assert s.sent("a", now=0.0) == 1.0
    assert s.due(["a", "b"], now=0.5) == ["b"]
    assert s.due(["a"], now=1.0) == ["a"]
    assert s.sent("a", now=1.0) == 2.0 and s.sends("a") == 2
    assert s.due(["a"], now=2.9) == []
    s.all_due_now()  # a reconnect
    assert s.due(["a"], now=2.9) == ["a"]
    assert s.sent("a", now=3.0) == 4.0, "the wait goes on growing across a reconnect"
    s.acknowledged("a")
    assert s.sends("a") == 0 and s.due(["a"], now=3.0) == ["a"]
    s.sent("b", now=0.0)
    s.keep_only([])  # b left the outbox (dropped when full)
    assert s.sends("b") == 0


class _Client:
    """Stands in for paho: every publish is PUBACKed at once, and kept."""

    def __init__(self) -> None:
        self.reports: list[fleet_pb2.DeviceReport] = []

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> object:
        if topic.endswith("/" + topics.REPORTS):
            self.reports.append(fleet_pb2.DeviceReport.FromString(payload))

        class _Sent:
            mid = 1

            def is_published(self) -> bool:
                return True

        return _Sent()


def _agent(store: Path, public: Path, ack_timeout_s: float = 0.2) -> tuple[Agent, _Client]:
    agent = Agent(
        AgentConfig(
            device_id="dev-1",
            broker=BrokerAddress.parse("mqtt://127.0.0.1:1"),
            store=store,
            trusted_keys=(public,),
            hardware="x86_64",
            runtimes=("onnx",),
            report_ack_timeout_s=ack_timeout_s,
            report_resend_max_s=ack_timeout_s * 2,
        )
    )
    client = _Client()
    agent._client = client  # type: ignore[assignment]
    agent._connected.set()
    agent.state.load()
    return agent, client


def _on_disk(store: Path) -> list[str]:
    doc = json.loads((store / ".agent" / "state.json").read_text())
    return [
        fleet_pb2.DeviceReport.FromString(base64.b64decode(item)).report_id
        for item in doc.get("outbox", [])
    ]


def _ack(device_id: str, *report_ids: str) -> bytes:
    return bytes(
        fleet_pb2.ReportAck(device_id=device_id, report_ids=list(report_ids)).SerializeToString()
    )


def test_a_report_stays_until_the_fleet_acks_it_and_is_resent_with_backoff(
    tmp_path: Path,
) -> None:
    store, public = tmp_path / "store", Signer.create(tmp_path / "keys").public_path
    agent, client = _agent(store, public)
    agent._report(Kind.HEALTHY, Ref("digits", 2, "onnx-int8", "r1"))
    assert [r.kind for r in client.reports] == [Kind.HEALTHY]
    report_id = client.reports[0].report_id
    # PUBACKed by the broker, not acknowledged by the fleet: kept, on disk too.
    agent._send_outbox()
    assert len(client.reports) == 1, "not due again before its wait"
    assert _on_disk(store) == [report_id]

    sent_at = [time.monotonic()]
    deadline = time.monotonic() + 5
    while len(client.reports) < 3 and time.monotonic() < deadline:
        before = len(client.reports)
        agent._send_outbox()
        if len(client.reports) > before:
            sent_at.append(time.monotonic())
        time.sleep(0.01)
    assert [r.report_id for r in client.reports] == [report_id] * 3, "same bytes, same id"
    waits = [b - a for a, b in itertools.pairwise(sent_at)]
    # 0.2 s, then doubled (jitter 20 %); the upper bounds leave room for a busy machine.
    assert 0.15 <= waits[0] < 1.0 and 0.3 <= waits[1] < 1.5, waits

    # Acks that are not this device's, or garbage, change nothing.
    agent._handle_report_ack(_ack("dev-2", report_id))
    agent._handle_report_ack(b"\xff not a message")
    assert _on_disk(store) == [report_id]

    # A restart before the ack: the next run sends it at once, from disk.
    restarted, again = _agent(store, public)
    restarted._send_outbox()
    assert [r.report_id for r in again.reports] == [report_id]

    restarted._handle_report_ack(_ack("dev-1", report_id, "some-other-id"))
    assert _on_disk(store) == [] and restarted.state.outbox == []
    time.sleep(0.5)
    restarted._send_outbox()
    assert len(again.reports) == 1, "acknowledged: never sent again"


def test_progress_is_sent_once_and_never_queued(tmp_path: Path) -> None:
    public = Signer.create(tmp_path / "keys").public_path
    agent, client = _agent(tmp_path / "store", public, ack_timeout_s=0.05)
    agent._report(Kind.PROGRESS, Ref("digits", 2, "onnx-int8", "r1"), bytes_received=10)
    time.sleep(0.1)
    agent._send_outbox()
    assert [r.kind for r in client.reports] == [Kind.PROGRESS]
    assert agent.state.outbox == []
