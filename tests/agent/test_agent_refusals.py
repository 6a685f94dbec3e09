"""Every refusal, end to end: a real agent process, a real broker, the fleet double. Each
refusal is reported with its reason code and leaves the active model untouched; the broker
ACL keeps a device inside its own topic subtree."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tandem.agent import Agent, AgentConfig, BrokerAddress
from tandem.protos.fleet.v1 import topics
from tests.agent.artifacts import Signer, build_variant
from tests.agent.conftest import USERS, AgentProcess
from tests.agent.fleet_double import FleetDouble, Kind
from tests.support.mosquitto import Broker
from tests.support.processes import wait_until


def test_every_refusal_is_reported_and_leaves_the_active_model_alone(
    fleet: FleetDouble,
    signer: Signer,
    agent_factory: Callable[..., AgentProcess],
    tmp_path: Path,
) -> None:
    zoo = tmp_path / "zoo"
    agent = agent_factory(
        "dev-1",
        "--runtime",
        "onnx",
        "--hardware",
        "x86_64",
        "--max-payload-bytes",
        str(50 * 1024 * 1024),
    )
    v2 = build_variant(zoo, signer, version=2)
    fleet.set_desired("dev-1", v2)
    fleet.wait_report("dev-1", Kind.HEALTHY, 2, timeout=40)
    active_path = agent.store / "digits" / "active.json"
    baseline = active_path.read_bytes()
    installed_before = sorted(p.relative_to(agent.store) for p in agent.store.glob("digits/*/*"))

    intruder = Signer.create(tmp_path / "intruder")
    untrusted = build_variant(tmp_path / "intruder-zoo", intruder, version=3)
    tampered = build_variant(zoo / "tampered", signer, version=3)
    forged = tampered.signed.replace(b'"hardware":"any"', b'"hardware":"x86_64"')
    assert forged != tampered.signed
    cases = [
        ("bad_signature", untrusted, {}),
        ("bad_signature", tampered, {"signed": forged}),
        (
            "expired",
            build_variant(
                zoo / "expired", signer, version=3, expires=datetime.now(UTC) - timedelta(hours=1)
            ),
            {},
        ),
        ("rollback", build_variant(zoo / "old", signer, version=1), {}),
        (
            "wrong_model",
            build_variant(zoo / "other", signer, model="faces", version=3),
            {"model": "digits"},
        ),
        ("wrong_hardware", build_variant(zoo / "hw", signer, version=3, hardware="riscv64"), {}),
        (
            "wrong_runtime",
            build_variant(zoo / "rt", signer, version=3, runtime="tflite", variant="tflite-int8"),
            {},
        ),
        ("too_large", build_variant(zoo / "big", signer, version=3, claimed_size=10**11), {}),
    ]
    for code, built, overrides in cases:
        before = len(fleet.reports)
        fleet.set_desired("dev-1", built, **overrides)  # type: ignore[arg-type]
        report = fleet.wait_report(
            "dev-1", Kind.REFUSED, built.manifest.version, timeout=20, after=before
        )
        assert report.reason.startswith(code + ":"), (code, report.reason)
        assert active_path.read_bytes() == baseline, code
    # The same refused offer under a new desired revision hears the answer again.
    expired = cases[2][1]
    before = len(fleet.reports)
    fleet.set_desired("dev-1", expired)
    again = fleet.wait_report("dev-1", Kind.REFUSED, 3, timeout=20, after=before)
    assert again.reason.startswith("expired:")
    # None of those asked for a single byte.
    assert {r.version for r in fleet.requests} == {2}

    # Bytes that do not hash to the signed digest: retried, then refused.
    corrupt = build_variant(zoo / "corrupt", signer, version=3)
    fleet.corrupt = True
    before = len(fleet.reports)
    fleet.set_desired("dev-1", corrupt)
    report = fleet.wait_report("dev-1", Kind.REFUSED, 3, timeout=30, after=before)
    assert report.reason.startswith("digest_mismatch:") and "3 attempts" in report.reason
    fleet.corrupt = False
    assert active_path.read_bytes() == baseline
    assert not list((agent.store / ".agent" / "staging").glob("*/*.part"))

    # A version whose outputs do not match its own reference never becomes active.
    broken = build_variant(zoo / "broken", signer, version=4, wrong_reference=True)
    fleet.set_desired("dev-1", broken)
    report = fleet.wait_report("dev-1", Kind.FAILED, 4, timeout=30)
    assert "differs from the reference" in report.reason
    assert active_path.read_bytes() == baseline
    assert not (agent.store / "digits" / "4").joinpath("onnx-int8").exists()
    assert sorted(p.relative_to(agent.store) for p in agent.store.glob("digits/*/*")) == [
        *installed_before
    ]

    # Refusals did not wedge anything: a good version still goes through.
    good = build_variant(zoo / "good", signer, version=5)
    fleet.set_desired("dev-1", good)
    fleet.wait_report("dev-1", Kind.HEALTHY, 5, timeout=40)
    pointer = json.loads(active_path.read_text())
    assert pointer["version"] == 5 and pointer["max_accepted_version"] == 5
    assert agent.alive


def _client(broker: Broker, user: str) -> tuple[mqtt.Client, dict[int, object]]:
    acks: dict[int, object] = {}
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"acl-{user}", protocol=mqtt.MQTTv5)
    client.username_pw_set(user, USERS[user])
    client.on_publish = lambda _c, _u, mid, rc, _p: acks.__setitem__(mid, rc)
    connected = threading.Event()
    client.on_connect = lambda *_: connected.set()
    client.connect(broker.host, broker.port)
    client.loop_start()
    assert connected.wait(5), f"{user} could not connect"
    return client, acks


def _subscribe(client: mqtt.Client, topic: str) -> list[int]:
    """Subscribes at QoS 1 and returns the SUBACK's reason codes."""
    codes: list[int] = []
    done = threading.Event()

    def on_subscribe(_c: object, _u: object, _mid: int, reasons: list[Any], _p: object) -> None:
        codes.extend(int(r.value) for r in reasons)
        done.set()

    client.on_subscribe = on_subscribe
    client.subscribe(topic, qos=1)
    assert done.wait(5), f"no SUBACK for {topic}"
    return codes


GRANTED_QOS_1 = 1


def test_broker_acl_keeps_a_device_in_its_own_subtree(fleet_broker: Broker) -> None:
    seen: list[str] = []
    admin, _ = _client(fleet_broker, "admin")
    admin.on_message = lambda _c, _u, msg: seen.append(msg.topic)
    assert _subscribe(admin, "tandem/v1/devices/#") == [GRANTED_QOS_1]
    device, acks = _client(fleet_broker, "dev-1")
    forbidden = [
        topics.device_topic("dev-2", topics.REPORTS),
        topics.device_topic("dev-2", topics.PRESENCE),
        topics.device_topic("dev-2", topics.DESIRED),
        topics.device_topic("dev-1", topics.DESIRED),  # only the fleet writes desired state
        topics.device_topic("dev-1", topics.CHUNKS),
    ]
    infos = [device.publish(t, b"forged", qos=1) for t in forbidden]
    own = device.publish(topics.device_topic("dev-1", topics.REPORTS), b"own", qos=1)
    for info in [*infos, own]:
        info.wait_for_publish(5)
    # The broker forwards one client's messages to a subscriber in the order it got them:
    # once the device's own report (published last) is in, a forged one would be too.
    wait_until(
        lambda: topics.device_topic("dev-1", topics.REPORTS) in seen,
        5,
        message="own report delivered",
    )
    assert seen == [topics.device_topic("dev-1", topics.REPORTS)]
    for info in infos:
        assert getattr(acks[info.mid], "is_failure", False), acks[info.mid]
    assert not getattr(acks[own.mid], "is_failure", True)
    # Mosquitto's ACL file never refuses a SUBSCRIBE (the SUBACK grants QoS 1); it applies
    # the read ACL to every delivery instead, so another device's messages never arrive.
    snooped: list[str] = []
    device.on_message = lambda _c, _u, msg: snooped.append(msg.topic)
    assert _subscribe(device, topics.device_topic("dev-2", topics.DESIRED)) == [GRANTED_QOS_1]
    assert _subscribe(device, topics.device_topic("dev-1", topics.DESIRED)) == [GRANTED_QOS_1]
    admin.publish(topics.device_topic("dev-2", topics.DESIRED), b"secret", qos=1).wait_for_publish(
        5
    )
    admin.publish(topics.device_topic("dev-2", topics.DESIRED), b"", qos=1, retain=True)
    # The barrier: the admin's next message, on a topic the device may read, comes after.
    admin.publish(topics.device_topic("dev-1", topics.DESIRED), b"own", qos=1).wait_for_publish(5)
    wait_until(lambda: snooped, 5, message="own desired state delivered")
    assert snooped == [topics.device_topic("dev-1", topics.DESIRED)], snooped
    for client in (admin, device):
        client.disconnect()  # first: it wakes the network thread, so loop_stop returns at once
        client.loop_stop()


def test_agent_runs_inside_an_app_process(
    fleet: FleetDouble, signer: Signer, tmp_path: Path
) -> None:
    v1 = build_variant(tmp_path / "zoo", signer, version=1)
    config = AgentConfig(
        device_id="dev-2",
        broker=BrokerAddress.parse(fleet.broker.url),
        store=tmp_path / "app-store",
        trusted_keys=(signer.public_path,),
        username="dev-2",
        password=USERS["dev-2"],
        tags={"app": "demo"},
        health_window_s=0.5,
        health_probe_interval_s=0.2,
    )
    agent = Agent(config).start()
    try:
        wait_until(lambda: agent.connected, 10, message="connected")
        fleet.set_desired("dev-2", v1)
        fleet.wait_report("dev-2", Kind.HEALTHY, 1, timeout=40)
        assert json.loads((tmp_path / "app-store/digits/active.json").read_text())["version"] == 1
        assert fleet.presence["dev-2"].tags["app"] == "demo"
    finally:
        agent.stop()
    assert agent.wait(5) and agent.error is None
    wait_until(lambda: not fleet.presence["dev-2"].online, 10, message="offline presence")


def test_wrong_credentials_keep_retrying_without_crashing(
    fleet_broker: Broker, signer: Signer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = AgentConfig(
        device_id="dev-1",
        broker=BrokerAddress.parse(fleet_broker.url),
        store=tmp_path / "store",
        trusted_keys=(signer.public_path,),
        username="dev-1",
        password="wrong",
        reconnect_max_s=1.0,
    )
    with caplog.at_level("ERROR", logger="tandem.agent.agent"):
        agent = Agent(config).start()
        try:
            wait_until(
                lambda: caplog.text.count("refused the connection") >= 2,
                10,
                message="refused, and refused again on the retry",
            )
            assert not agent.connected and agent.error is None
        finally:
            agent.stop()
    assert agent.wait(5)


def test_old_versions_are_pruned_after_a_healthy_window(
    fleet: FleetDouble, signer: Signer, tmp_path: Path
) -> None:
    config = AgentConfig(
        device_id="dev-3",
        broker=BrokerAddress.parse(fleet.broker.url),
        store=tmp_path / "store",
        trusted_keys=(signer.public_path,),
        username="dev-3",
        password=USERS["dev-3"],
        health_window_s=0.3,
        health_probe_interval_s=0.1,
    )
    agent = Agent(config).start()
    try:
        wait_until(lambda: agent.connected, 10, message="connected")
        for version in (1, 2, 3):
            fleet.set_desired("dev-3", build_variant(tmp_path / "zoo", signer, version=version))
            fleet.wait_report("dev-3", Kind.HEALTHY, version, timeout=40)
        digits = tmp_path / "store" / "digits"
        wait_until(lambda: not (digits / "1").exists(), 10, message="v1 pruned")
        # The active version and the one a rollback or an abort returns to stay.
        assert sorted(p.name for p in digits.iterdir() if p.is_dir()) == ["2", "3"]
        # An abort back to v2 finds it without a transfer.
        before = len(fleet.requests)
        fleet.set_desired("dev-3", build_variant(tmp_path / "zoo2", signer, version=2))
        fleet.wait_report("dev-3", Kind.HEALTHY, 2, timeout=40)
        assert len(fleet.requests) == before
    finally:
        agent.stop()
