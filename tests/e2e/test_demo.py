"""`tandem demo` as a user runs it: the real command, real processes, the test zoo.

The story must end with v2 on every device, v3 stopped by the gates at the first stage with
its cohort back on v2 and no other device ever holding v3, and nothing left running. The
fleet's own database is read afterwards as a second witness beside the demo's summary.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
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


def test_missing_mosquitto_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from tandem.cloud.demo import story
    from tandem.cloud.demo.errors import PrerequisiteError

    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(story, "MOSQUITTO_PATHS", ("/nonexistent/mosquitto",))
    with pytest.raises(PrerequisiteError, match="apt-get install mosquitto"):
        story.find_mosquitto()


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
