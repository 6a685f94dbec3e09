"""The shared fixtures themselves work: a real broker enforces its ACL; PostgreSQL answers."""

from __future__ import annotations

import threading
import time

import paho.mqtt.client as mqtt
import pytest

from tests.support.mosquitto import Broker


def _connect(broker: Broker, user: str, password: str) -> mqtt.Client:
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=f"t-{user}", protocol=mqtt.MQTTv5
    )
    client.username_pw_set(user, password)
    client.connect(broker.host, broker.port)
    client.loop_start()
    return client


def test_broker_enforces_acl(mosquitto: Broker) -> None:
    received: list[str] = []
    got = threading.Event()

    admin = _connect(mosquitto, "admin", "admin-secret")

    def on_message(_c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        received.append(msg.topic)
        got.set()

    admin.on_message = on_message
    admin.subscribe("tandem/v1/devices/#", qos=1)[0]
    device = _connect(mosquitto, "dev-1", "dev-1-secret")
    time.sleep(0.3)
    device.publish("tandem/v1/devices/dev-2/reports", b"forged", qos=1).wait_for_publish(5)
    device.publish("tandem/v1/devices/dev-1/reports", b"own", qos=1).wait_for_publish(5)
    assert got.wait(5)
    time.sleep(0.3)
    assert received == ["tandem/v1/devices/dev-1/reports"]
    for c in (admin, device):
        c.disconnect()  # first: it wakes the network thread, so loop_stop returns at once
        c.loop_stop()


def test_broker_refuses_bad_password(mosquitto: Broker) -> None:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.username_pw_set("dev-1", "wrong")
    result: list[object] = []
    done = threading.Event()

    def on_connect(_c: mqtt.Client, _u: object, _f: object, rc: object, _p: object) -> None:
        result.append(rc)
        done.set()

    client.on_connect = on_connect
    client.connect(mosquitto.host, mosquitto.port)
    # Driven here, without a network thread: after the refusal, one would sit in paho's
    # reconnect wait (1 s sleeps) that loop_stop has to sit out.
    deadline = time.monotonic() + 5
    while not done.is_set() and time.monotonic() < deadline:
        client.loop(0.05)
    assert done.is_set()
    assert getattr(result[0], "is_failure", True)


@pytest.mark.postgres
def test_postgres_fixture(postgres_url: str) -> None:
    import sqlalchemy as sa

    engine = sa.create_engine(postgres_url)
    with engine.connect() as conn:
        assert conn.execute(sa.text("select 1")).scalar() == 1
    engine.dispose()
