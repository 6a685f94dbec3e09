"""The fleet service as a real process against a real Mosquitto (generated config and ACL),
with simulated devices as real MQTT clients."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard

from tandem.cloud.fleet import engine as eng
from tandem.protos.fleet.v1 import topics
from tandem.sdk.artifacts import TrustedKeys, load_public_key_raw, read_manifest_unverified
from tests.fleet.conftest import GeneratedBroker, ServiceProcess, wait_devices
from tests.fleet.sim import Profile, SimFleet
from tests.support.processes import wait_until

RUNTIMES = [["onnx"], ["tflite"], ["tflite", "onnx"], ["openvino", "onnx"]]


def entry_bytes(zoo: Path, version: int, variant: str) -> bytes:
    folder = zoo / "artifacts" / "digits" / str(version) / variant
    m = read_manifest_unverified(folder)
    entry = m.file(m.entrypoint)
    return zstandard.ZstdDecompressor().decompress((folder / entry.stored_as).read_bytes())


def ids(n: int) -> list[str]:
    return [f"dev-{i:03d}" for i in range(n)]


def first_cohort(device_ids: list[str], percent: float) -> set[str]:
    p = eng.RolloutPlan("digits", 9, (eng.Stage(100),))
    order = eng.ordered(p, [eng.DeviceView(d) for d in device_ids])
    return {v.device_id for v in order[: eng.cohort_size(percent, len(order))]}


def test_rollout_through_all_stages_with_chunked_delta_delivery(
    generated_broker: Callable[[list[str]], GeneratedBroker],
    fleet_service: Callable[..., ServiceProcess],
    zoo: Path,
) -> None:
    devices = ids(12)
    broker = generated_broker(devices)
    svc = fleet_service(broker, zoo)
    creds = broker.written.device_passwords
    sim = SimFleet(
        broker.host,
        broker.port,
        creds,
        runtimes=lambda i: RUNTIMES[i % 4],
        active={"digits": 1},
        fetch=True,
        trusted=TrustedKeys([load_public_key_raw(zoo / "keys" / "signing.pub")]),
    )
    # Every device already runs v1, so it can take a delta.
    for i, dev in enumerate(sim.devices.values()):
        variant = "onnx-int8" if RUNTIMES[i % 4][0] != "tflite" else "tflite-int8"
        dev.files[("digits", 1)] = entry_bytes(zoo, 1, variant)
    sim.start()
    try:
        wait_devices(svc, 12)
        body = {
            "model": "digits",
            "version": 2,
            "selector": {"site": "lab"},
            "stages": [
                {
                    "percent": 10,
                    "min_soak_s": 0.5,
                    "gates": [{"metric": "failed_device_pct", "threshold": 0}],
                },
                {"percent": 50, "min_soak_s": 0.5},
                {"percent": 100},
            ],
        }
        created = svc.post("/rollouts", body)
        assert isinstance(created, dict) and created["baseline_version"] == 1
        rid = str(created["rollout_id"])
        done = svc.wait_rollout(rid, "completed", timeout=60)
        assert done["device_states"] == {"succeeded": 12}
        assert not sim.errors, sim.errors[:3]
        for i, dev in enumerate(sim.devices.values()):
            assert dev.active["digits"] == 2
            assert dev.delta_bytes > 0 and dev.full_bytes == 0, "delta expected"
            variant = "onnx-int8" if RUNTIMES[i % 4][0] != "tflite" else "tflite-int8"
            assert dev.files[("digits", 2)] == entry_bytes(zoo, 2, variant)
        full = (zoo / "artifacts/digits/2/onnx-int8/model.onnx.zst").stat().st_size
        one = next(iter(sim.devices.values()))
        assert one.delta_bytes < full / 5, (one.delta_bytes, full)
        events = svc.get(f"/rollouts/{rid}/events")
        assert isinstance(events, list)
        kinds = [
            (e["kind"], e["actor"], e["stage_index"])
            for e in events
            if e["kind"] in ("created", "stage_advanced", "completed")
        ]
        assert kinds == [
            ("created", "alice", 0),
            ("stage_advanced", "engine", 1),
            ("stage_advanced", "engine", 2),
            ("completed", "engine", 2),
        ]
        stages = done["stages"]
        assert isinstance(stages, list)
        assert [s["devices"] for s in stages] == [2, 4, 6]
        assert all(s["ended_at"] for s in stages)
        device = svc.get("/devices/dev-000")
        assert isinstance(device, dict) and device["active_versions"] == {"digits": 2}
        assert device["desired"][0]["version"] == 2
    finally:
        sim.stop()


def test_bad_version_stopped_at_first_stage_and_rolled_back(
    generated_broker: Callable[[list[str]], GeneratedBroker],
    fleet_service: Callable[..., ServiceProcess],
    zoo: Path,
) -> None:
    devices = ids(20)
    broker = generated_broker(devices)
    svc = fleet_service(broker, zoo)
    sim = SimFleet(
        broker.host,
        broker.port,
        broker.written.device_passwords,
        active={"digits": 2},
        telemetry_interval_s=0.2,
        profiles={
            2: Profile(latency_ms=2.0, agreement=0.98),
            3: Profile(latency_ms=9.0, agreement=0.55),
        },
    )
    sim.start()
    try:
        wait_devices(svc, 20)
        body = {
            "model": "digits",
            "version": 3,
            "stages": [
                {
                    "percent": 10,
                    "min_soak_s": 3,
                    "gates": [
                        {"metric": "shadow_agreement", "threshold": 0.9, "min_samples": 40},
                        {"metric": "p95_latency_ratio", "threshold": 1.5, "min_samples": 200},
                    ],
                },
                {"percent": 50, "min_soak_s": 1},
                {"percent": 100},
            ],
        }
        created = svc.post("/rollouts", body)
        assert isinstance(created, dict) and created["baseline_version"] == 2
        rid = str(created["rollout_id"])
        done = svc.wait_rollout(rid, "aborted", timeout=60)
        assert done["stage_index"] == 0
        cohort = first_cohort(devices, 10)
        got_v3 = {d for d, dev in sim.devices.items() if ("digits", 3) in dev.received}
        assert got_v3 == cohort, "only the first cohort ever saw the bad version"
        events = svc.get(f"/rollouts/{rid}/events")
        assert isinstance(events, list)
        gate = [e for e in events if e["kind"] == "gate_failed"]
        assert gate and gate[0]["actor"] in ("gate:shadow_agreement", "gate:p95_latency_ratio")
        # The cohort goes back to v2 by itself, as the service's desired state says.
        wait_until(
            lambda: all(sim.devices[d].active["digits"] == 2 for d in cohort),
            timeout=20,
            message="cohort rolled back",
        )
        for d in cohort:
            desired = svc.get(f"/devices/{d}")
            assert isinstance(desired, dict) and desired["desired"][0]["version"] == 2
        states = svc.get(f"/rollouts/{rid}/devices")
        assert isinstance(states, list)
        assert {s["state"] for s in states} == {"rolled_back"}
        telemetry = svc.get("/telemetry", params={"model": "digits"})
        assert isinstance(telemetry, list)
        by_version = {t["version"]: t for t in telemetry}
        assert by_version[2]["agreement"] > 0.95 and by_version[3]["agreement"] < 0.6
        assert by_version[3]["p95_latency_ms"] > 3 * by_version[2]["p95_latency_ms"]
    finally:
        sim.stop()


@pytest.mark.parametrize("db", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_service_restart_mid_rollout_resumes_without_repeating_or_skipping(
    generated_broker: Callable[[list[str]], GeneratedBroker],
    fleet_service: Callable[..., ServiceProcess],
    zoo: Path,
    db: str,
    request: pytest.FixtureRequest,
) -> None:
    """Killed (SIGKILL) between two stages, the service comes back on the same database."""
    devices = ids(10)
    broker = generated_broker(devices)
    url = request.getfixturevalue("postgres_url") if db == "postgres" else None
    svc = fleet_service(broker, zoo, db=url)
    sim = SimFleet(broker.host, broker.port, broker.written.device_passwords, active={"digits": 1})
    sim.start()
    try:
        wait_devices(svc, 10)
        body = {
            "model": "digits",
            "version": 2,
            "stages": [
                {"percent": 10, "min_soak_s": 0.3},
                {"percent": 50, "min_soak_s": 3},
                {"percent": 100, "min_soak_s": 0.3},
            ],
        }
        created = svc.post("/rollouts", body)
        assert isinstance(created, dict)
        rid = str(created["rollout_id"])
        wait_until(
            lambda: (
                svc.rollout(rid)["stage_index"] == 1
                and svc.rollout(rid)["stage_settled_at"] is not None
            ),
            timeout=30,
            interval=0.1,
            message="stage 1 settled",
        )
        svc.stop(kill=True)
        svc.start()
        done = svc.wait_rollout(rid, "completed", timeout=60)
        assert done["device_states"] == {"succeeded": 10}
        events = svc.get(f"/rollouts/{rid}/events")
        assert isinstance(events, list)
        advanced = [e["stage_index"] for e in events if e["kind"] == "stage_advanced"]
        settled = [e["stage_index"] for e in events if e["kind"] == "stage_settled"]
        assert advanced == [1, 2] and settled == [0, 1, 2]
        assert [e["kind"] for e in events].count("completed") == 1
        for dev in sim.devices.values():
            assert dev.received.count(("digits", 2)) == 1, dev.received
    finally:
        sim.stop()


def test_garbage_spoofed_and_unknown_messages_are_dropped(
    generated_broker: Callable[[list[str]], GeneratedBroker],
    fleet_service: Callable[..., ServiceProcess],
    zoo: Path,
) -> None:
    devices = ids(3)
    broker = generated_broker(devices)
    svc = fleet_service(broker, zoo)
    sim = SimFleet(broker.host, broker.port, broker.written.device_passwords, active={"digits": 1})
    sim.start()
    try:
        wait_devices(svc, 3)
        d0 = "dev-000"
        for leaf in (topics.REPORTS, topics.TELEMETRY, topics.PRESENCE, topics.CHUNK_REQUEST):
            sim.publish_raw(d0, topics.device_topic(d0, leaf), b"\xff\x00garbage" * 10)
        # A report claiming to be another device, on dev-000's own topic.
        from tandem.protos.fleet.v1 import fleet_pb2

        spoof = fleet_pb2.DeviceReport(
            device_id="dev-001", kind=fleet_pb2.DeviceReport.HEALTHY, model="digits", version=3
        )
        sim.publish_raw(d0, topics.device_topic(d0, topics.REPORTS), spoof.SerializeToString())
        # A chunk request for an artifact the device was never told to run.
        req = fleet_pb2.ChunkRequest(
            transfer_id="x",
            device_id=d0,
            model="digits",
            version=3,
            variant="onnx-int8",
            file="model.onnx",
        )
        sim.publish_raw(d0, topics.device_topic(d0, topics.CHUNK_REQUEST), req.SerializeToString())
        wait_until(
            lambda: "not in its desired state" in svc.log_tail(20000),
            timeout=10,
            message="chunk request refused",
        )
        log = svc.log_tail(20000)
        assert "garbage" in log and "dropped report for 'dev-001'" in log
        assert sim.devices[d0].chunks == 0
        assert svc.proc is not None and svc.proc.poll() is None
        # Still serving: a real rollout to these devices works afterwards.
        created = svc.post(
            "/rollouts", {"model": "digits", "version": 2, "stages": [{"percent": 100}]}
        )
        assert isinstance(created, dict)
        svc.wait_rollout(str(created["rollout_id"]), "completed", timeout=30)
        assert svc.get("/devices/dev-001")["active_versions"] == {"digits": 2}  # type: ignore[index]
    finally:
        sim.stop()


def test_manual_pause_resume_promote_abort_over_rest(
    generated_broker: Callable[[list[str]], GeneratedBroker],
    fleet_service: Callable[..., ServiceProcess],
    zoo: Path,
) -> None:
    devices = ids(10)
    broker = generated_broker(devices)
    svc = fleet_service(broker, zoo)
    sim = SimFleet(broker.host, broker.port, broker.written.device_passwords, active={"digits": 1})
    sim.start()
    try:
        wait_devices(svc, 10)
        unauth = svc.http.get("/rollouts", headers={"Authorization": "Bearer nope"})
        assert unauth.status_code == 401
        bad = svc.http.post(
            "/rollouts",
            json={"model": "digits", "version": 2, "stages": [{"percent": 50}, {"percent": 10}]},
        )
        assert bad.status_code == 422 and "plan.stages" in bad.text
        missing = svc.http.post(
            "/rollouts", json={"model": "digits", "version": 99, "stages": [{"percent": 100}]}
        )
        assert missing.status_code == 404
        body = {
            "model": "digits",
            "version": 2,
            "stages": [
                {"percent": 10, "min_soak_s": 600},
                {"percent": 50, "min_soak_s": 600},
                {"percent": 100, "min_soak_s": 600},
            ],
        }
        rid = str(svc.post("/rollouts", body)["rollout_id"])  # type: ignore[index]
        assert svc.http.post("/rollouts", json=body).status_code == 409, "one active per model"
        svc.post(f"/rollouts/{rid}/pause")
        assert svc.rollout(rid)["status"] == "paused"
        assert svc.http.post(f"/rollouts/{rid}/pause").status_code == 409
        svc.post(f"/rollouts/{rid}/resume")
        svc.post(f"/rollouts/{rid}/promote")
        wait_until(lambda: svc.rollout(rid)["device_states"] == {"succeeded": 5}, timeout=20)
        svc.post(f"/rollouts/{rid}/abort")
        r = svc.rollout(rid)
        assert r["status"] == "aborted"
        wait_until(
            lambda: sum(d.active["digits"] == 1 for d in sim.devices.values()) == 10,
            timeout=20,
            message="all back on v1",
        )
        events = svc.get(f"/rollouts/{rid}/events")
        assert isinstance(events, list)
        manual = [
            (e["kind"], e["actor"])
            for e in events
            if e["kind"] in ("paused", "resumed", "stage_advanced", "aborted")
        ]
        assert manual == [
            ("paused", "alice"),
            ("resumed", "alice"),
            ("stage_advanced", "alice"),
            ("aborted", "alice"),
        ]
        assert hashlib.sha256(b"x").hexdigest()
    finally:
        sim.stop()


def test_replicas_share_the_load_and_survive_one_stopping(
    generated_broker: Callable[[list[str]], GeneratedBroker],
    fleet_service: Callable[..., ServiceProcess],
    zoo: Path,
    tmp_path: Path,
) -> None:
    """Two service processes on one database and one shared subscription: telemetry is
    ingested exactly once while both run and after one stops; the engine-less replica
    serves the desired states the other decides."""
    from tandem.cloud.fleet.store import Store

    devices = ids(6)
    broker = generated_broker(devices)
    db = f"sqlite:///{tmp_path / 'shared.db'}"
    a = fleet_service(broker, zoo, db=db)
    b = fleet_service(broker, None, "--client-id", "replica-b", "--no-engine", db=db)
    sim = SimFleet(
        broker.host,
        broker.port,
        broker.written.device_passwords,
        active={"digits": 1},
        telemetry_interval_s=0.1,
        profiles={1: Profile(), 2: Profile()},
    )
    reader = Store(db)
    sim.start()
    try:
        wait_devices(b, 6)
        wait_until(lambda: reader.telemetry_count()[1] >= 60, timeout=20, message="ingest")
        phases = {"a_stop": time.time()}
        # A clean stop under load: it leaves the shared subscriptions, takes what was on its
        # way (the exactly-once count below says nothing was lost), and exits 0, promptly:
        # ~0.3 s here (it was ~0.55 s; a slow exit costs every test that stops a service).
        assert a.stop() == 0, a.log_tail()
        phases["a_stopped"] = time.time()
        assert phases["a_stopped"] - phases["a_stop"] < 2.0, f"stop took {phases}"
        rid = None
        # Replica b has no engine: a rollout created through it waits for an engine...
        created = b.post(
            "/rollouts", {"model": "digits", "version": 2, "stages": [{"percent": 100}]}
        )
        assert isinstance(created, dict)
        rid = str(created["rollout_id"])
        assert created["device_states"] == {"assigned": 6}, "create takes the first step"
        b.wait_rollout(rid, "running")
        # ...while telemetry keeps flowing through the surviving replica alone.
        before = reader.telemetry_count()[1]
        wait_until(
            lambda: reader.telemetry_count()[1] >= before + 60,
            timeout=20,
            message="ingest after replica a stopped",
        )
        phases["a_start"] = time.time()
        a.start()
        phases["b_stop"] = time.time()
        b.stop()
        phases["b_stopped"] = time.time()
        a.wait_rollout(rid, "completed", timeout=30)
        sim.telemetry_paused = True
        # The barrier: a call the simulation thread runs after the pause is set; it sends no
        # telemetry from then on, so the count is final.
        paused = threading.Event()
        sim.call(paused.set)
        assert paused.wait(5), "simulation thread stuck"
        sent = sim.telemetry_sent
        try:
            wait_until(lambda: reader.telemetry_count()[1] >= sent, timeout=20)
        except TimeoutError:
            import sqlalchemy as sa

            with reader.engine.connect() as c:
                have = set(c.execute(sa.text("select summary_id from telemetry_seen")).scalars())
            missing = [t for t, i in sim.telemetry_log if i not in have]
            raise AssertionError(
                f"missing {len(missing)} of {sent}: at {missing} phases {phases}"
            ) from None
        # Summary ids are counted once each, and no summary was sent after `sent`: more than
        # `sent` would be summaries from nowhere, so nothing needs waiting for.
        assert reader.telemetry_count()[1] == sent, "each summary exactly once"
        assert all(d.active["digits"] == 2 for d in sim.devices.values())
    finally:
        sim.stop()
        reader.close()


def test_silent_and_failing_devices_count_as_failed_and_go_back(
    generated_broker: Callable[[list[str]], GeneratedBroker],
    fleet_service: Callable[..., ServiceProcess],
    zoo: Path,
) -> None:
    """A device that never answers times out (actor `timeout`); one that reports FAILED
    fails at once; both are moved back to v1, and the gate on failed devices judges them."""
    devices = ids(8)
    broker = generated_broker(devices)
    svc = fleet_service(broker, zoo)
    sim = SimFleet(
        broker.host,
        broker.port,
        broker.written.device_passwords,
        active={"digits": 1},
        silent=frozenset({"dev-003"}),
    )
    sim.start()
    try:
        wait_devices(svc, 8)
        body = {
            "model": "digits",
            "version": 2,
            "device_timeout_s": 2,
            "stages": [
                {"percent": 100, "gates": [{"metric": "failed_device_pct", "threshold": 20}]}
            ],
        }
        rid = str(svc.post("/rollouts", body)["rollout_id"])  # type: ignore[index]
        done = svc.wait_rollout(rid, "completed", timeout=30)
        assert done["device_states"] == {"succeeded": 7, "failed": 1}
        rows = {r["device_id"]: r for r in svc.get(f"/rollouts/{rid}/devices")}  # type: ignore[union-attr]
        assert rows["dev-003"]["state"] == "failed" and rows["dev-003"]["reason"] == "timeout"
        desired = svc.get("/devices/dev-003")
        assert isinstance(desired, dict) and desired["desired"][0]["version"] == 1
        events = svc.get(f"/rollouts/{rid}/events")
        assert isinstance(events, list)
        assert any(
            e["kind"] == "device_failed" and e["actor"] == "timeout" and e["device_id"] == "dev-003"
            for e in events
        )

        # Version 3 fails on every device: the gate (> 20% failed) aborts after stage one.
        sim.fail_versions = frozenset({3})
        body = {
            "model": "digits",
            "version": 3,
            # As above: the failing device reports within it, the silent one times out (the
            # stage waits for that timeout, so a longer one only makes the test slower).
            "device_timeout_s": 2,
            "stages": [
                {"percent": 25, "gates": [{"metric": "failed_device_pct", "threshold": 20}]},
                {"percent": 100},
            ],
        }
        rid = str(svc.post("/rollouts", body)["rollout_id"])  # type: ignore[index]
        done = svc.wait_rollout(rid, "aborted", timeout=30)
        assert done["stage_index"] == 0
        rows = {r["device_id"]: r for r in svc.get(f"/rollouts/{rid}/devices")}  # type: ignore[union-attr]
        assert len(rows) == 2 and all(r["state"] == "failed" for r in rows.values()), rows
        for device_id, r in rows.items():
            assert r["reason"] == ("timeout" if device_id == "dev-003" else "simulated failure")
        got_v3 = {d for d, dev in sim.devices.items() if ("digits", 3) in dev.received}
        assert got_v3 == set(rows)
        for device_id, r in rows.items():  # desired back to what each ran before (1 or 2)
            back = svc.get(f"/devices/{device_id}")
            assert isinstance(back, dict)
            assert back["desired"][0]["version"] == r["previous_version"]
            assert r["previous_version"] == (1 if device_id == "dev-003" else 2)
    finally:
        sim.stop()
