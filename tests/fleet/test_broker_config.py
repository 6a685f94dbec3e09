"""`tandem fleet broker-config` output, run by a real Mosquitto: the ACL holds."""

from __future__ import annotations

import json
import stat
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.subscribeoptions import SubscribeOptions

from tandem.cloud.fleet.broker_config import mosquitto_hash
from tandem.protos.fleet.v1 import topics
from tests.fleet.conftest import TANDEM
from tests.support.mosquitto import MOSQUITTO
from tests.support.processes import free_port, stop_process, wait_for_port, wait_until

GRANTED_QOS_1 = 1  # a SUBACK reason code; failures are 0x80 and up (0x87: not authorized)


class Client:
    def __init__(self, port: int, user: str, password: str) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.suback: list[Any] = []
        self.connected = threading.Event()
        self.refused: Any = None
        self.c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"{user}-{time.time()}",
            protocol=mqtt.MQTTv5,
        )
        self.c.username_pw_set(user, password)
        self.c.on_connect = self._on_connect
        self.c.on_message = lambda _c, _u, m: self.messages.append((m.topic, m.payload))
        self.c.on_subscribe = lambda _c, _u, _mid, codes, _p: self.suback.extend(codes)
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()

    def _on_connect(self, _c: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        if rc.is_failure:
            self.refused = rc
        else:
            self.connected.set()

    def sub(self, topic: str) -> int:
        """Subscribes at QoS 1 and returns the SUBACK's reason code."""
        before = len(self.suback)
        self.c.subscribe([(topic, SubscribeOptions(qos=1))])
        wait_until(lambda: len(self.suback) > before, timeout=5, message=f"SUBACK for {topic}")
        return int(self.suback[-1].value)

    def pub(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.c.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def test_password_hash_matches_mosquitto_format() -> None:
    h = mosquitto_hash("secret", salt=b"\x00" * 12)
    assert h.startswith("$7$101$AAAAAAAAAAAAAAAA$") and len(h.split("$")[-1]) == 88


def test_generated_config_enforces_device_acl(tmp_path: Path) -> None:
    port = free_port()
    out = tmp_path / "broker"
    proc = subprocess.run(
        [
            TANDEM,
            "fleet",
            "broker-config",
            "--out",
            str(out),
            "--device-ids",
            "cam-1,cam-2",
            "--devices",
            "2",
            "--port",
            str(port),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["devices"] == 4
    creds = json.loads((out / "credentials.json").read_text())
    assert set(creds["devices"]) == {"cam-1", "cam-2", "device-0001", "device-0002"}
    for name in ("passwd", "acl", "credentials.json", "fleet.password"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o600, name
    broker = subprocess.Popen(
        [MOSQUITTO, "-c", str(out / "mosquitto.conf")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    clients: list[Client] = []
    try:
        wait_for_port(port, proc=broker)
        fleet = Client(port, "tandem-fleet", creds["fleet"]["password"])
        cam1 = Client(port, "cam-1", creds["devices"]["cam-1"]["password"])
        intruder = Client(port, "cam-1", "wrong-password")
        clients += [fleet, cam1, intruder]
        assert fleet.connected.wait(5) and cam1.connected.wait(5)
        wait_until(lambda: intruder.refused is not None, timeout=5, message="bad password refused")

        assert fleet.sub(topics.all_devices("#")) == GRANTED_QOS_1
        assert cam1.sub(topics.device_topic("cam-1", topics.DESIRED)) == GRANTED_QOS_1
        assert cam1.sub(topics.device_topic("cam-1", topics.CHUNKS)) == GRANTED_QOS_1
        assert cam1.sub(topics.device_topic("cam-1", topics.REPORT_ACKS)) == GRANTED_QOS_1
        assert cam1.sub(topics.device_topic("cam-2", topics.REPORT_ACKS)) == GRANTED_QOS_1
        # Its own subtree at large: only the leaves it may read deliver (checked below).
        assert cam1.sub(topics.device_topic("cam-1", "#")) == GRANTED_QOS_1
        # Mosquitto's ACL file never refuses a SUBSCRIBE: the SUBACK grants these two as well,
        # and the read ACL filters every delivery, so they never deliver anything of cam-2's
        # (checked below).
        assert cam1.sub(topics.device_topic("cam-2", topics.DESIRED)) == GRANTED_QOS_1
        assert cam1.sub(topics.all_devices(topics.REPORTS)) == GRANTED_QOS_1

        allowed = [
            topics.device_topic("cam-1", leaf)
            for leaf in (topics.PRESENCE, topics.REPORTS, topics.TELEMETRY, topics.CHUNK_REQUEST)
        ]
        refused = [
            topics.device_topic("cam-1", topics.DESIRED),
            topics.device_topic("cam-1", topics.CHUNKS),
            # A forged ack would make the device's own agent drop unstored reports.
            topics.device_topic("cam-1", topics.REPORT_ACKS),
            topics.device_topic("cam-2", topics.REPORTS),
            topics.device_topic("cam-2", topics.DESIRED),
            topics.device_topic("cam-2", topics.PRESENCE),
        ]
        for t in refused + allowed:
            cam1.pub(t, t.encode())
        # The broker forwards one client's messages to a subscriber in the order it got them:
        # once the allowed ones (published last) are in, a refused one would be too.
        wait_until(
            lambda: {m[0] for m in fleet.messages} >= set(allowed),
            timeout=5,
            message="allowed device publishes delivered",
        )
        assert not {m[0] for m in fleet.messages} & set(refused), "the ACL let a write through"

        fleet.pub(topics.device_topic("cam-1", topics.DESIRED), b"desired", retain=True)
        fleet.pub(topics.device_topic("cam-2", topics.DESIRED), b"not-for-cam-1", retain=True)
        wait_until(
            lambda: (topics.device_topic("cam-1", topics.DESIRED), b"desired") in cam1.messages,
            timeout=5,
        )
        fleet.pub(topics.device_topic("cam-2", topics.REPORTS), b"cam-2 report")
        fleet.pub(topics.device_topic("cam-2", topics.REPORT_ACKS), b"cam-2 ack")
        fleet.pub(topics.device_topic("cam-1", topics.REPORT_ACKS), b"cam-1 ack")
        # The barrier: the fleet's next message, on a topic cam-1 may read, comes after those.
        fleet.pub(topics.device_topic("cam-1", topics.CHUNKS), b"barrier")
        wait_until(
            lambda: (topics.device_topic("cam-1", topics.CHUNKS), b"barrier") in cam1.messages,
            timeout=5,
            message="barrier delivered",
        )
        assert all(
            m[1] not in (b"not-for-cam-1", b"cam-2 report", b"cam-2 ack") for m in cam1.messages
        )
        assert all(m[0].startswith(topics.device_topic("cam-1", "")) for m in cam1.messages)
        # The fleet's ack reached cam-1 (on its ack subscription and on cam-1/#), and
        # nothing cam-1 published itself came back to it: it reads no leaf it writes.
        acks = [
            m for m in cam1.messages if m[0] == topics.device_topic("cam-1", topics.REPORT_ACKS)
        ]
        assert acks and all(m[1] == b"cam-1 ack" for m in acks), acks
        readable = {
            topics.device_topic("cam-1", leaf)
            for leaf in (topics.DESIRED, topics.CHUNKS, topics.REPORT_ACKS)
        }
        assert {m[0] for m in cam1.messages} <= readable, cam1.messages
    finally:
        for c in clients:
            c.close()
        stop_process(broker)


def test_broker_config_refuses_bad_ids(tmp_path: Path) -> None:
    from tandem.cloud.fleet.broker_config import BrokerConfig, write_broker_config
    from tandem.errors import ConfigError

    with pytest.raises(ConfigError, match="device_ids"):
        write_broker_config(BrokerConfig(tmp_path), ["ok", "../evil"])
    with pytest.raises(ConfigError, match="device_ids"):
        write_broker_config(BrokerConfig(tmp_path), ["tandem-fleet"])
    with pytest.raises(ConfigError, match="port"):
        BrokerConfig(tmp_path, port=0)
