"""`tandem demo` as a user runs it: the real command, real processes, the test zoo.

The story must end with v2 on every device, v3 stopped by the gates at the first stage with
its cohort back on v2 and no other device ever holding v3, and nothing left running. The
fleet's own database is read afterwards as a second witness beside the demo's summary.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.mosquitto import MOSQUITTO
from tests.support.processes import wait_until

TANDEM = str(Path(sys.executable).parent / "tandem")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(MOSQUITTO).exists(), reason="the demo needs Mosquitto"),
]


# Requests per second per device. The gates wait for a fixed number of samples from the
# first stage's one-device cohort, so the rollouts' length scales with 1/rate: 8 (instead of
# the demo's default 4) took the 8-device story from 101 s to 72 s here, with 0 errors. The
# fleet-wide load stays below the demo's own default (20 devices x 4 req/s).
RATE = 8.0


def demo_args(zoo: Path, workdir: Path, devices: int, duration: float) -> list[str]:
    return [
        TANDEM,
        "demo",
        "--zoo",
        str(zoo),
        "--workdir",
        str(workdir),
        "--devices",
        str(devices),
        "--duration",
        str(duration),
        "--rate",
        f"{RATE:g}",
    ]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie no one has reaped yet is not running
        state = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in state


def port_free(port: int) -> bool:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that name `text` (the work dir): none may be left."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and pid_alive(int(proc.name)):
            found.append(f"{proc.name}: {cmdline}")
    return found


def assert_all_stopped(workdir: Path) -> dict[str, Any]:
    record = json.loads((workdir / "children.json").read_text())
    pids = [c["pid"] for c in record["children"]]
    assert pids, "the demo recorded no children"
    wait_until(
        lambda: not any(pid_alive(p) for p in pids),
        timeout=15,
        message=f"children {pids} gone",
    )
    busy = [name for name, port in record["ports"].items() if not port_free(int(port))]
    assert not busy, f"ports still taken: {busy}"
    assert processes_mentioning(str(workdir)) == []
    return record


def test_demo_story_good_rollout_completes_bad_one_stopped_and_rolled_back(
    digits_zoo: Path, tmp_path: Path
) -> None:
    workdir = tmp_path / "demo"
    started = time.monotonic()
    proc = subprocess.run(
        demo_args(digits_zoo, workdir, devices=8, duration=20),
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    elapsed = time.monotonic() - started
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "console: http://127.0.0.1:" in out and "?token=" in out
    assert "MQTT broker: Mosquitto" in out
    assert "demo complete" in out

    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["problems"] == []
    traffic = summary["traffic"]
    assert traffic["devices"] == 8
    assert traffic["by_runtime"] == {"onnx": 2, "openvino": 2, "tflite": 2, "torch": 2}
    assert traffic["requests"] > 200
    assert traffic["local"] > 0 and traffic["cloud"] > 0  # the cascade used both paths
    assert traffic["errors"] == 0
    assert traffic["accuracy"] > 0.9  # labels known: the digits test split

    good, bad = summary["rollouts"]
    assert (good["version"], good["baseline_version"]) == (2, 1)
    assert good["status"] == "completed"
    assert good["stages_reached"] == good["stages_total"] == 3
    assert good["device_states"] == {"succeeded": 8}
    assert len(good["devices_with_version"]) == 8

    assert (bad["version"], bad["baseline_version"]) == (3, 2)
    assert bad["status"] == "aborted"
    assert bad["stages_reached"] == 1
    assert bad["stopped_by"].startswith("gate:")
    assert any(g["passed"] is False for g in bad["failed_gates"])
    cohort = bad["first_cohort"]
    assert len(cohort) == 1  # 10% of 8 devices, rounded up
    assert bad["rolled_back"] == len(cohort)
    assert bad["devices_with_version"] == cohort
    assert bad["outside_first_cohort_with_version"] == []
    assert bad["back_on_baseline"] == cohort

    # The fleet's own records agree: v3 was only ever assigned in the first stage.
    from tandem.cloud.fleet.store import Store

    store = Store(f"sqlite:///{workdir / 'fleet.db'}")
    try:
        assignments = store.assignments(bad["rollout_id"])
        assert {(a.device_id, a.stage_index) for a in assignments} == {(cohort[0], 0)}
        assert {a.state.value for a in assignments} == {"rolled_back"}
        assert {a.stage_index for a in store.assignments(good["rollout_id"])} == {0, 1, 2}
    finally:
        store.close()

    assert_all_stopped(workdir)
    print(f"demo test: {elapsed:.0f}s, demo elapsed {summary['elapsed_s']}s")


def test_ctrl_c_mid_run_stops_every_process_and_frees_every_port(
    digits_zoo: Path, tmp_path: Path
) -> None:
    workdir = tmp_path / "demo"
    log_path = tmp_path / "demo.out"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            demo_args(digits_zoo, workdir, devices=4, duration=60),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # SIGINT goes to the demo alone, as a terminal's would
        )
    try:

        def devices_running() -> bool:
            try:
                record = json.loads((workdir / "children.json").read_text())
            except (OSError, ValueError):
                return False
            names = {c["name"] for c in record["children"]}
            return {"mosquitto", "cloud", "fleet", "devices-torch"} <= names

        wait_until(devices_running, timeout=420, interval=0.5, message="every process started")
        time.sleep(3)  # mid-way: devices connecting, traffic flowing
        assert proc.poll() is None, log_path.read_text()[-4000:]
        proc.send_signal(signal.SIGINT)
        code = proc.wait(90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    out = log_path.read_text()
    assert code == 130, out[-4000:]
    assert "stopped every process the demo started" in out
    record = assert_all_stopped(workdir)
    assert {"mosquitto", "cloud", "fleet"} <= {c["name"] for c in record["children"]}


# --- the pure pieces, without processes ----------------------------------------------------


def test_config_names_the_wrong_field(tmp_path: Path) -> None:
    from tandem.cloud.demo.config import DemoConfig
    from tandem.errors import ConfigError

    for kwargs, field in (
        ({"devices": 0}, "devices"),
        ({"duration_s": 1}, "duration"),
        ({"rate_per_s": 0}, "rate"),
        ({"shadow_fraction": 0}, "shadow_fraction"),
    ):
        with pytest.raises(ConfigError) as info:
            DemoConfig(zoo=tmp_path, workdir=tmp_path, **kwargs)  # type: ignore[arg-type]
        assert info.value.field == field
    config = DemoConfig(zoo=tmp_path, workdir=tmp_path, duration_s=300)
    assert config.soak_s == 30
    assert [config.runtime_of(i) for i in range(5)] == [
        "onnx",
        "tflite",
        "openvino",
        "torch",
        "onnx",
    ]


def test_workdir_is_cleared_only_when_the_demo_made_it(tmp_path: Path) -> None:
    from tandem.cloud.demo.errors import StoryError
    from tandem.cloud.demo.story import prepare_workdir

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(StoryError, match="not made by `tandem demo`"):
        prepare_workdir(foreign)
    assert (foreign / "thesis.tex").read_text() == "precious"
    ours = tmp_path / "ours"
    prepare_workdir(ours)
    (ours / "fleet.db").write_text("old run")
    prepare_workdir(ours)
    assert sorted(p.name for p in ours.iterdir()) == [".tandem-demo"]


def test_asking_for_a_missing_mosquitto_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from rich.console import Console

    from tandem.cloud.demo import launch, story
    from tandem.cloud.demo.config import DemoConfig
    from tandem.cloud.demo.errors import PrerequisiteError

    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(launch, "MOSQUITTO_PATHS", ("/nonexistent/mosquitto",))
    assert launch.find_mosquitto() is None
    config = DemoConfig(zoo=tmp_path, workdir=tmp_path / "w", devices=2, broker="mosquitto")
    s = story.Story(config, Console(file=io.StringIO()))
    with pytest.raises(PrerequisiteError, match="apt-get install mosquitto"):
        s.start_broker()


def test_rollout_summary_catches_a_device_outside_the_cohort() -> None:
    from tandem.cloud.demo.summary import gate_text, rollout_summary

    rollout = {
        "rollout_id": "r-1",
        "version": 3,
        "baseline_version": 2,
        "status": "aborted",
        "stage_index": 0,
        "stages": [
            {
                "percent": 10,
                "devices": 1,
                "gates": [{"metric": "fallback_rate", "threshold": 0.25, "relative": True}],
            },
            {"percent": 100, "devices": 0, "gates": []},
        ],
        "device_states": {"rolled_back": 1},
        "gates": [],
    }
    assignments = [{"device_id": "d1", "stage_index": 0, "state": "rolled_back"}]
    failed = {"metric": "fallback_rate", "value": 0.9, "threshold": 0.25, "passed": False}
    events = [
        {"kind": "gate_failed", "actor": "gate:fallback_rate", "detail": {"gates": [failed]}},
        {"kind": "aborted", "actor": "gate:fallback_rate", "detail": {"rollback": 1}},
    ]
    devices = {
        "d1": {"active_version": 2, "versions_seen": [1, 2, 3]},
        "d2": {"active_version": 2, "versions_seen": [1, 2, 3]},  # never assigned, yet has v3
        "d3": {"active_version": 2, "versions_seen": [1, 2]},
    }
    r = rollout_summary(rollout, assignments, events, devices, 12.0)
    assert r.stages_reached == 1 and r.stopped_by == "gate:fallback_rate"
    assert r.first_cohort == ["d1"] and r.back_on_baseline == ["d1"]
    assert r.outside_first_cohort_with_version == ["d2"]
    assert r.rolled_back == 1
    text = gate_text({**r.failed_gates[0], "baseline": 0.05, "samples": 40})
    assert text == ("fallback_rate 0.950 vs baseline 0.050: +0.900, limit +0.25 FAIL (n=40)")


# --- the embedded broker (what a machine without Mosquitto gets) ---------------------------


@pytest.fixture
def embedded_broker(tmp_path: Path) -> Any:
    from tandem.cloud.demo.processes import free_port
    from tandem.cloud.fleet.broker_config import BrokerConfig, write_broker_config

    port = free_port()
    written = write_broker_config(
        BrokerConfig(tmp_path / "broker", "127.0.0.1", port, persistence=False),
        ["dev-a", "dev-b"],
    )
    log = (tmp_path / "broker.log").open("wb")
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "tandem.cloud.demo.broker"),
            *("--config", str(written.conf.parent), "--port", str(port)),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        from tests.support.processes import wait_for_port

        wait_for_port(port, proc=proc)  # type: ignore[arg-type]
        yield port, written
    finally:
        proc.terminate()
        assert proc.wait(10) == 0, (tmp_path / "broker.log").read_text()
        log.close()
        assert "Traceback" not in (tmp_path / "broker.log").read_text()


class Mqtt:
    """A paho MQTT 5 client that records what it gets."""

    def __init__(self, port: int, user: str, password: str, client_id: str | None = None) -> None:
        import paho.mqtt.client as mqtt

        self.messages: list[tuple[str, bytes, bool]] = []
        self.connected = threading.Event()
        self.refused: list[str] = []
        self.got = threading.Condition()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or user, protocol=mqtt.MQTTv5
        )
        self.client.username_pw_set(user, password)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.port = port

    def _on_connect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            self.refused.append(str(reason))
        else:
            self.connected.set()

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        with self.got:
            self.messages.append((msg.topic, msg.payload, bool(msg.retain)))
            self.got.notify_all()

    def start(self, will: tuple[str, bytes] | None = None) -> Mqtt:
        if will is not None:
            self.client.will_set(will[0], will[1], qos=1, retain=True)
        self.client.connect("127.0.0.1", self.port)
        self.client.loop_start()
        return self

    def subscribe(self, filter_: str) -> list[int]:
        codes: list[int] = []
        done = threading.Event()

        def on_subscribe(_c: Any, _u: Any, _mid: Any, reasons: Any, _p: Any) -> None:
            codes.extend(int(r.value) for r in reasons)
            done.set()

        self.client.on_subscribe = on_subscribe
        self.client.subscribe(filter_, qos=1)
        assert done.wait(5)
        return codes

    def wait_messages(self, n: int, timeout: float = 5) -> list[tuple[str, bytes, bool]]:
        with self.got:
            self.got.wait_for(lambda: len(self.messages) >= n, timeout)
            return list(self.messages)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_embedded_broker_checks_passwords_and_the_generated_acl(embedded_broker: Any) -> None:
    port, written = embedded_broker
    fleet_pw, devices = written.fleet_password, written.device_passwords
    intruder = Mqtt(port, "dev-a", "wrong").start()
    wait_until(lambda: intruder.refused, timeout=5, message="bad password refused")
    intruder.client.loop_stop()

    fleet = Mqtt(port, "tandem-fleet", fleet_pw).start()
    assert fleet.connected.wait(5)
    assert fleet.subscribe("tandem/v1/devices/+/presence") == [1]
    a = Mqtt(port, "dev-a", devices["dev-a"]).start()
    assert a.connected.wait(5)
    # A device reads only its own subtree, and writes only its own presence/reports/...
    assert a.subscribe("tandem/v1/devices/dev-a/desired") == [1]
    assert a.subscribe("tandem/v1/devices/dev-b/desired") == [0x87]
    assert a.subscribe("tandem/v1/devices/#") == [0x87]
    a.client.publish("tandem/v1/devices/dev-b/presence", b"spoofed", qos=1).wait_for_publish(5)
    a.client.publish("tandem/v1/devices/dev-a/desired", b"self-desired", qos=1).wait_for_publish(5)
    a.client.publish("tandem/v1/devices/dev-a/presence", b"online", qos=1).wait_for_publish(5)
    got = fleet.wait_messages(1)
    time.sleep(0.3)
    assert [(t, p) for t, p, _ in fleet.messages] == [
        ("tandem/v1/devices/dev-a/presence", b"online")
    ]
    assert got
    fleet.client.publish("tandem/v1/devices/dev-a/desired", b"v2", qos=1).wait_for_publish(5)
    assert [p for _, p, _ in a.wait_messages(1)] == [b"v2"]
    for c in (fleet, a):
        c.stop()


def test_embedded_broker_retained_will_and_shared_subscriptions(embedded_broker: Any) -> None:
    port, written = embedded_broker
    fleet_pw, devices = written.fleet_password, written.device_passwords
    presence = "tandem/v1/devices/dev-a/presence"
    a = Mqtt(port, "dev-a", devices["dev-a"]).start(will=(presence, b"offline"))
    assert a.connected.wait(5)
    a.client.publish(presence, b"online", qos=1, retain=True).wait_for_publish(5)

    late = Mqtt(port, "tandem-fleet", fleet_pw, client_id="late").start()
    assert late.connected.wait(5)
    late.subscribe("tandem/v1/devices/+/presence")
    assert late.wait_messages(1) == [(presence, b"online", True)]  # retained, flagged so

    # Two replicas in one shared group split the reports; each report reaches one of them.
    replicas = [
        Mqtt(port, "tandem-fleet", fleet_pw, client_id=f"replica-{i}").start() for i in (1, 2)
    ]
    for r in replicas:
        assert r.connected.wait(5)
        assert r.subscribe("$share/tandem-fleet/tandem/v1/devices/+/reports") == [1]
    for i in range(10):
        a.client.publish("tandem/v1/devices/dev-a/reports", b"%d" % i, qos=1).wait_for_publish(5)
    wait_until(
        lambda: sum(len(r.messages) for r in replicas) == 10, timeout=5, message="10 reports"
    )
    time.sleep(0.3)
    counts = [len(r.messages) for r in replicas]
    assert sum(counts) == 10 and min(counts) > 0, counts

    # A device that vanishes without DISCONNECT: its will (retained) goes out.
    a.client.socket().close()
    a.client.loop_stop()
    wait_until(lambda: (presence, b"offline", False) in late.messages, timeout=10, message="will")
    for c in (late, *replicas):
        c.stop()


def test_embedded_broker_refuses_mqtt_311_clients(embedded_broker: Any) -> None:
    port, _written = embedded_broker
    # CONNECT, protocol "MQTT" level 4 (3.1.1), clean session, keepalive 30, client id "old".
    body = b"\x00\x04MQTT\x04\x02\x00\x1e" + b"\x00\x03old"
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(bytes([0x10, len(body)]) + body)
        # The 3.1.1 CONNACK "unacceptable protocol version", then the broker hangs up.
        assert sock.recv(16) == b"\x20\x02\x00\x01"
        assert sock.recv(16) == b""


def test_demo_on_the_embedded_broker(digits_zoo: Path, tmp_path: Path) -> None:
    """What a machine without Mosquitto runs (`--broker auto` picks it there)."""
    workdir = tmp_path / "demo"
    proc = subprocess.run(
        [*demo_args(digits_zoo, workdir, devices=4, duration=15), "--broker", "embedded"],
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "MQTT broker: embedded Python MQTT 5 broker" in out
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["problems"] == []
    good, bad = summary["rollouts"]
    assert good["status"] == "completed" and good["device_states"] == {"succeeded": 4}
    assert bad["status"] == "aborted" and bad["stages_reached"] == 1
    assert bad["outside_first_cohort_with_version"] == []
    assert bad["back_on_baseline"] == bad["first_cohort"]
    assert_all_stopped(workdir)
