"""Hostile MQTT against the real agent and the real fleet service, on a Mosquitto set up by
`tandem fleet broker-config`.

Random and truncated payloads (hypothesis) on every topic either process reads: the agent's
desired state and chunks (published with the fleet's own credentials, the worst case: a
compromised fleet account cannot sign, so it can only send garbage or replays), and the
service's presence, reports, telemetry and chunk requests (published by a device on its own
subtree, as a compromised device can). Then a device impersonating another (refused by the
broker's ACL, and not seen by the service). Both processes must keep working: a normal
rollout still completes afterwards.

Forged manifests (bad signature, replayed old version, wrong model, expired, oversized) are
published on a device's desired-state topic with the fleet's credentials: each is refused
with its reason code and the active model stays; the service then rolls the fleet back to v1.
(tests/agent/test_agent_refusals.py checks every refusal code against the fleet double.)
"""

from __future__ import annotations

import json
import threading
import time
import zlib
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import paho.mqtt.client as mqtt
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion

from tandem.protos.fleet.v1 import fleet_pb2, topics
from tests.agent.artifacts import BuiltVariant, Signer, build_variant
from tests.fleet.conftest import GeneratedBroker, ServiceProcess, wait_devices
from tests.reliability.conftest import FleetAgents
from tests.support.figures import Figures
from tests.support.processes import wait_until

DEVICES = ["dev-a", "dev-b"]
EXAMPLES = 40  # per topic


class Publisher:
    """A paho client with one identity; records every PUBACK reason code."""

    def __init__(self, broker: GeneratedBroker, user: str, password: str) -> None:
        self.acks: dict[int, object] = {}
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"hostile-{user}", protocol=mqtt.MQTTv5
        )
        self.client.username_pw_set(user, password)
        self.client.on_publish = lambda _c, _u, mid, rc, _p: self.acks.__setitem__(mid, rc)
        connected = threading.Event()
        self.client.on_connect = lambda *_: connected.set()
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert connected.wait(10), f"{user} could not connect"

    def publish(self, topic: str, payload: bytes) -> object:
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(10)
        wait_until(lambda: info.mid in self.acks, 5, message="puback")
        return self.acks[info.mid]

    def retained(self, topic: str) -> bytes:
        """The retained message on a topic (what the device last said about itself)."""
        got: list[bytes] = []
        self.client.message_callback_add(topic, lambda _c, _u, msg: got.append(msg.payload))
        self.client.subscribe(topic, qos=1)
        wait_until(lambda: got, 5, message=f"retained {topic}")
        self.client.unsubscribe(topic)
        self.client.message_callback_remove(topic)
        return got[0]

    def close(self) -> None:
        self.client.disconnect()  # first: it wakes the network thread (loop_stop is then prompt)
        self.client.loop_stop()


def valid_messages(device: str) -> dict[str, bytes]:
    batch = fleet_pb2.TelemetryBatch(
        summaries=[
            fleet_pb2.TelemetrySummary(summary_id="x" * 32, device_id=device, model="digits")
        ]
    )
    return {
        topics.DESIRED: fleet_pb2.DesiredState(
            device_id=device,
            revision=10**6,
            models=[fleet_pb2.DesiredModel(model="digits", version=9, variant="onnx-int8")],
        ).SerializeToString(),
        topics.CHUNKS: fleet_pb2.ArtifactChunk(
            transfer_id="abc", file="model.onnx", offset=0, data=b"\0" * 64, total_size=64
        ).SerializeToString(),
        topics.PRESENCE: fleet_pb2.Presence(
            device_id=device, online=True, runtimes=["onnx"]
        ).SerializeToString(),
        topics.REPORTS: fleet_pb2.DeviceReport(
            device_id=device, model="digits", version=1, kind=fleet_pb2.DeviceReport.Kind.HEALTHY
        ).SerializeToString(),
        topics.TELEMETRY: zstandard.ZstdCompressor().compress(batch.SerializeToString()),
        topics.CHUNK_REQUEST: fleet_pb2.ChunkRequest(
            transfer_id="abc", device_id=device, model="digits", version=1, file="model.onnx"
        ).SerializeToString(),
    }


@st.composite
def hostile(draw: st.DrawFn, valid: bytes) -> bytes:
    kind = draw(st.sampled_from(["random", "truncated", "flipped", "huge-varint", "empty"]))
    if kind == "random":
        return draw(st.binary(max_size=2048))
    if kind == "truncated":
        return valid[: draw(st.integers(0, max(0, len(valid) - 1)))]
    if kind == "flipped":
        data = bytearray(valid)
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= draw(st.integers(1, 255))
        return bytes(data)
    if kind == "huge-varint":
        # A field header followed by a length that claims far more bytes than follow.
        return b"\x0a\xff\xff\xff\xff\x0f" + draw(st.binary(max_size=32))
    return b""


def fuzz_topic(publisher: Publisher, topic: str, valid: bytes) -> int:
    """Publishes hypothesis-made hostile payloads on one topic; returns how many."""
    count = 0

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(hostile(valid))
    def send(payload: bytes) -> None:
        nonlocal count
        code = publisher.publish(topic, payload)
        assert not getattr(code, "is_failure", False), code
        count += 1

    send()
    return count


def forged_offers(signer: Signer, out: Path) -> list[tuple[str, fleet_pb2.DesiredModel]]:
    """(expected refusal code, desired model) for every kind of forged manifest."""
    intruder = Signer.create(out / "intruder-keys")
    past = datetime.now(UTC) - timedelta(hours=1)
    cases: list[tuple[str, BuiltVariant, str]] = [
        ("bad_signature", build_variant(out / "a", intruder, version=3), "digits"),
        # An old version the device never installed (v2 is accepted): a replay.
        ("rollback", build_variant(out / "b", signer, version=1, variant="onnx-fp32"), "digits"),
        ("wrong_model", build_variant(out / "c", signer, model="faces", version=3), "digits"),
        ("expired", build_variant(out / "d", signer, version=3, expires=past), "digits"),
        ("too_large", build_variant(out / "e", signer, version=3, claimed_size=10**12), "digits"),
    ]
    return [
        (
            code,
            fleet_pb2.DesiredModel(
                model=model,
                version=built.manifest.version,
                variant=built.manifest.variant,
                manifest=built.signed_manifest(),
                rollout_id="forged",
            ),
        )
        for code, built, model in cases
    ]


def test_hostile_payloads_and_impersonation_leave_agent_and_service_working(
    fleet_agents_factory: FleetAgents,
    fleet_service: type[ServiceProcess] | object,
    zoo: Path,
    zoo_signer: Signer,
    tmp_path: Path,
    figures: Figures,
) -> None:
    broker, agents = fleet_agents_factory(DEVICES)
    svc: ServiceProcess = fleet_service(  # type: ignore[operator]
        broker, zoo, "--trusted-key", str(zoo / "keys" / "signing.pub")
    )
    wait_devices(svc, len(DEVICES))
    first = svc.post(
        "/rollouts",
        {
            "model": "digits",
            "version": 1,
            "selector": {"site": "lab"},
            "stages": [{"percent": 100}],
        },
    )
    assert isinstance(first, dict)
    svc.wait_rollout(str(first["rollout_id"]), "completed", timeout=60)
    fleet_password = broker.written.fleet_password_file.read_text().strip()
    fleet_user = Publisher(broker, "tandem-fleet", fleet_password)
    device_b = Publisher(broker, "dev-b", broker.written.device_passwords["dev-b"])
    device_a = Publisher(broker, "dev-a", broker.written.device_passwords["dev-a"])
    sent: Counter[str] = Counter()
    presence_topic = topics.device_topic("dev-b", topics.PRESENCE)
    own_presence = fleet_user.retained(presence_topic)
    try:
        # --- garbage on every topic the agent (dev-a) and the service (from dev-b) read
        targets = [
            (fleet_user, "dev-a", topics.DESIRED),
            (fleet_user, "dev-a", topics.CHUNKS),
            (device_b, "dev-b", topics.PRESENCE),
            (device_b, "dev-b", topics.REPORTS),
            (device_b, "dev-b", topics.TELEMETRY),
            (device_b, "dev-b", topics.CHUNK_REQUEST),
        ]
        for publisher, device, leaf in targets:
            sent[leaf] += fuzz_topic(
                publisher, topics.device_topic(device, leaf), valid_messages(device)[leaf]
            )
        # A decompression bomb (256 MiB of zeros in ~8 KiB of zstd) and a zlib stream as
        # telemetry, and absurd numbers in an otherwise valid chunk request.
        bomb = zstandard.ZstdCompressor(level=3).compress(b"\0" * (256 << 20))
        for payload in (bomb, zlib.compress(b"\0" * 1000)):
            device_b.publish(topics.device_topic("dev-b", topics.TELEMETRY), payload)
            sent[topics.TELEMETRY] += 1
        absurd = fleet_pb2.ChunkRequest(
            transfer_id="x" * 10_000,
            device_id="dev-b",
            model="digits",
            version=2**63 - 1,
            variant="onnx-int8",
            file="../../etc/passwd",
            offset=2**63 - 1,
            accept_delta=True,
            have_version=2**63 - 1,
        )
        device_b.publish(
            topics.device_topic("dev-b", topics.CHUNK_REQUEST), absurd.SerializeToString()
        )
        sent[topics.CHUNK_REQUEST] += 1

        # Garbage that parses can say "dev-b is offline" on dev-b's own topic, which the
        # service must believe; the device's next presence (sent again here) restores it.
        device_b.client.publish(presence_topic, own_presence, qos=1, retain=True).wait_for_publish(
            5
        )
        wait_devices(svc, len(DEVICES))

        # --- dev-a impersonating dev-b: refused by the broker, unseen by the service
        before = svc.get("/devices/dev-b")
        assert isinstance(before, dict)
        forged = {
            topics.PRESENCE: fleet_pb2.Presence(
                device_id="dev-b", online=False, tags={"site": "evil"}
            ).SerializeToString(),
            topics.REPORTS: fleet_pb2.DeviceReport(
                device_id="dev-b",
                model="digits",
                version=1,
                kind=fleet_pb2.DeviceReport.Kind.FAILED,
                reason="forged",
            ).SerializeToString(),
            topics.TELEMETRY: valid_messages("dev-b")[topics.TELEMETRY],
            topics.CHUNK_REQUEST: valid_messages("dev-b")[topics.CHUNK_REQUEST],
            topics.DESIRED: valid_messages("dev-b")[topics.DESIRED],
            topics.CHUNKS: valid_messages("dev-b")[topics.CHUNKS],
        }
        refused = 0
        for leaf, payload in forged.items():
            code = device_a.publish(topics.device_topic("dev-b", leaf), payload)
            assert getattr(code, "is_failure", False), (leaf, code)
            refused += 1
        time.sleep(1.0)
        after = svc.get("/devices/dev-b")
        assert isinstance(after, dict)
        assert after.get("tags") == before.get("tags"), (before, after)
        assert after.get("online") is True, after
        assert svc.get("/devices", params={"online": True}) and len(
            svc.get("/devices", params={"online": True})  # type: ignore[arg-type]
        ) == len(DEVICES)

        # --- both processes still work: a normal rollout to every device completes
        for agent in agents.values():
            assert agent.alive, agent.log()[-2000:]
        assert svc.proc is not None and svc.proc.poll() is None, svc.log_tail()
        wait_devices(svc, len(DEVICES))
        second = svc.post(
            "/rollouts",
            {
                "model": "digits",
                "version": 2,
                "selector": {"site": "lab"},
                "stages": [{"percent": 100}],
            },
        )
        assert isinstance(second, dict)
        done = svc.wait_rollout(str(second["rollout_id"]), "completed", timeout=60)
        assert done["device_states"] == {"succeeded": len(DEVICES)}, done

        # --- forged manifests on dev-a's desired state, at the revision it already has
        desired_topic = topics.device_topic("dev-a", topics.DESIRED)
        current = fleet_pb2.DesiredState.FromString(fleet_user.retained(desired_topic))
        forged_cases = forged_offers(zoo_signer, tmp_path / "forged")
        active_path = agents["dev-a"].store / "digits" / "active.json"
        active_before = active_path.read_bytes()
        log_mark = len(agents["dev-a"].log())
        for code, item in forged_cases:
            state = fleet_pb2.DesiredState(
                device_id="dev-a", revision=current.revision, models=[item]
            )
            fleet_user.publish(desired_topic, state.SerializeToString())
            wait_until(
                lambda code=code: f": {code}:" in agents["dev-a"].log()[log_mark:],
                20,
                message=f"refused {code}: {agents['dev-a'].log()[-1500:]}",
            )
            assert active_path.read_bytes() == active_before, code
        # The service is still in charge of the device: back to v1 everywhere.
        third = svc.post(
            "/rollouts",
            {
                "model": "digits",
                "version": 1,
                "selector": {"site": "lab"},
                "stages": [{"percent": 100}],
            },
        )
        assert isinstance(third, dict)
        done = svc.wait_rollout(str(third["rollout_id"]), "completed", timeout=60)
        assert done["device_states"] == {"succeeded": len(DEVICES)}, done
        for agent in agents.values():
            assert json.loads((agent.store / "digits" / "active.json").read_text())["version"] == 1
    finally:
        for p in (fleet_user, device_a, device_b):
            p.close()
    figures.record(
        "hostile MQTT: garbage on every topic, impersonation (real agent + fleet service)",
        payloads_sent=dict(sorted(sent.items())),
        payloads_total=sum(sent.values()),
        impersonation_publishes_refused_by_acl=f"{refused}/{len(forged)}",
        forged_state_seen_by_service=0,
        agent_crashes=0,
        service_crashes=0,
        forged_manifests_refused={code: 1 for code, _ in forged_cases},
        rollout_after_attack="v2 then back to v1, completed on every device",
    )
