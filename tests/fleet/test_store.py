"""The fleet data layer on SQLite and on a real PostgreSQL."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tandem.cloud.fleet import engine as eng
from tandem.cloud.fleet.errors import ConflictError, NotFoundError
from tandem.cloud.fleet.rollouts import apply_command
from tandem.cloud.fleet.store import ReportIn, Store
from tandem.protos.fleet.v1 import fleet_pb2
from tests.fleet.helpers import summary


def presence(device_id: str, ts: int, online: bool = True, **tags: str) -> fleet_pb2.Presence:
    return fleet_pb2.Presence(
        device_id=device_id,
        online=online,
        agent_version="0.1",
        tags=tags,
        hardware="x86_64",
        runtimes=["onnx", "tflite"],
        active_versions={"digits": 1},
        timestamp_ms=ts,
    )


def add_versions(store: Store, *versions: int) -> None:
    for v in versions:
        for variant, rt in (("onnx-int8", "onnx"), ("tflite-int8", "tflite")):
            store.add_artifact(
                "digits",
                v,
                variant,
                runtime=rt,
                hardware="any",
                task="classification",
                manifest=f"m{v}{variant}".encode(),
                signatures=[("abcd", b"\x01" * 64)],
                path=f"/a/{v}/{variant}",
                stored_bytes=10,
                metrics={"accuracy": 0.9 + v / 100},
            )


def test_devices_presence_and_last_will(store: Store) -> None:
    assert store.upsert_presence(presence("d1", 1000, site="lab")).came_online
    assert store.upsert_presence(presence("d2", 1000, site="field")).came_online
    assert not store.upsert_presence(presence("d1", 500)).accepted, "older presence ignored"
    assert not store.upsert_presence(presence("d1", 1500)).came_online, "was online already"
    will = fleet_pb2.Presence(device_id="d1", online=False, timestamp_ms=2000)
    assert store.upsert_presence(will).accepted
    assert store.upsert_presence(presence("d1", 2500)).came_online
    will.timestamp_ms = 3000
    assert store.upsert_presence(will).accepted
    d1 = store.device("d1")
    assert not d1.online and d1.tags == {"site": "lab"} and d1.runtimes == ("onnx", "tflite")
    assert d1.active_versions == {"digits": 1}
    assert [d.device_id for d in store.devices(tags={"site": "field"})] == ["d2"]
    assert [d.device_id for d in store.devices(online=True)] == ["d2"]
    with pytest.raises(NotFoundError):
        store.device("nope")


def test_models_versions_artifacts(store: Store) -> None:
    add_versions(store, 1, 2)
    assert store.models() == [{"name": "digits", "task": "classification", "versions": [1, 2]}]
    versions = store.versions("digits")
    assert versions[1]["metrics"]["accuracy"] == pytest.approx(0.92)
    assert {a["variant"] for a in versions[1]["artifacts"]} == {"onnx-int8", "tflite-int8"}
    art = store.artifact("digits", 2, "onnx-int8")
    assert art.manifest == b"m2onnx-int8" and art.signatures == (("abcd", b"\x01" * 64),)
    assert art.signed_manifest().signatures[0].keyid == "abcd"
    # Re-importing the same bytes is fine; other bytes under the same version are refused.
    add_versions(store, 2)
    with pytest.raises(ConflictError):
        store.add_artifact(
            "digits",
            2,
            "onnx-int8",
            runtime="onnx",
            hardware="any",
            task="c",
            manifest=b"other",
            signatures=[],
            path="/x",
            stored_bytes=1,
        )


def test_rollout_lifecycle_persists_state_assignments_desired_and_events(store: Store) -> None:
    add_versions(store, 1, 2)
    for i in range(10):
        store.upsert_presence(presence(f"d{i}", 1000))
    plan = eng.RolloutPlan("digits", 2, (eng.Stage(10, 0), eng.Stage(100, 0)))
    r = store.create_rollout(
        "r1", plan, baseline_version=1, selector={}, created_by="alice", now=100.0
    )
    with pytest.raises(ConflictError):
        store.create_rollout("r2", plan, baseline_version=1, selector={}, created_by="a", now=100.0)
    views = [eng.DeviceView(f"d{i}") for i in range(10)]
    d = eng.step(plan, r.state, eng.Observation(101.0, views))
    assert len(d.assign) == 1
    dev = d.assign[0]
    changed = store.apply_decision(
        "r1",
        r.state,
        d,
        101.0,
        variants={dev: "onnx-int8"},
        previous={dev: 1},
        baseline_variants={},
    )
    assert changed == [dev]
    rev, desired = store.desired(dev)
    assert rev == 1 and desired[0].version == 2 and desired[0].rollout_id == "r1"
    with pytest.raises(ConflictError):  # a stale expected state is refused
        store.apply_decision(
            "r1", r.state, d, 101.0, variants={dev: "onnx-int8"}, previous={}, baseline_variants={}
        )
    out = store.apply_report(dev, eng.ReportKind.PROGRESS, "digits", 2, now=101.5)
    assert out.known and not out.desired_changed
    assert store.assignments("r1")[0].state is eng.DeviceState.INSTALLING
    out = store.apply_report(dev, eng.ReportKind.HEALTHY, "digits", 2, now=102.0)
    assert out.known and not out.desired_changed
    assert not store.apply_report("ghost", eng.ReportKind.HEALTHY, "digits", 2, now=1).known
    assert store.device(dev).active_versions["digits"] == 2
    r = store.rollout("r1")
    assert r.state == d.state and r.plan == plan
    [a] = store.assignments("r1")
    assert a.state is eng.DeviceState.SUCCEEDED and a.previous_version == 1

    r, changed = apply_command(
        store, "r1", eng.Command.ABORT, "bob", 103.0, baseline_variants={dev: "onnx-int8"}
    )
    assert r.state.status is eng.RolloutStatus.ABORTED and changed == [dev]
    rev, desired = store.desired(dev)
    assert rev == 2 and desired[0].version == 1 and desired[0].rollout_id == ""
    kinds = [(e.kind, e.actor) for e in store.events("r1")]
    assert kinds[0] == ("created", "alice") and kinds[-1] == ("aborted", "bob")
    stages = store.stages("r1")
    assert stages[0]["started_at"] == 100.0 and stages[0]["ended_at"] == 103.0
    assert store.active_assignments(dev) == []


def test_the_whole_plan_is_stored(store: Store) -> None:
    """Every field of a plan survives the store: the statistical knobs included."""
    add_versions(store, 1, 2)
    gate = eng.Gate(eng.GateMetric.ERROR_RATE, 0.05, min_samples=50, relative=True, min_effect=0.01)
    plan = eng.RolloutPlan(
        "digits",
        2,
        (eng.Stage(10, 30, (gate,), max_wait_s=120.0), eng.Stage(100, 0)),
        on_gate_failure=eng.GateAction.PAUSE,
        device_timeout_s=90.0,
        max_assignments_per_s=2.5,
        false_abort_rate=0.002,
    )
    store.create_rollout("r1", plan, baseline_version=1, selector={}, created_by="a", now=1.0)
    assert store.rollout("r1").plan == plan


def test_device_failure_report_moves_it_back(store: Store) -> None:
    add_versions(store, 1, 2)
    p = presence("d0", 1000)
    p.runtimes[:] = ["tflite", "onnx"]
    store.upsert_presence(p)
    plan = eng.RolloutPlan("digits", 2, (eng.Stage(100, 0),))
    r = store.create_rollout("r1", plan, baseline_version=1, selector={}, created_by="a", now=1.0)
    d = eng.step(plan, r.state, eng.Observation(2.0, [eng.DeviceView("d0")]))
    store.apply_decision(
        "r1",
        r.state,
        d,
        2.0,
        variants={"d0": "tflite-int8"},
        previous={"d0": 1},
        baseline_variants={},
    )
    out = store.apply_report(
        "d0", eng.ReportKind.REFUSED, "digits", 2, reason="bad signature", now=3.0
    )
    assert out.desired_changed
    _, desired = store.desired("d0")
    assert (desired[0].version, desired[0].variant) == (1, "tflite-int8")
    [a] = store.assignments("r1")
    assert a.state is eng.DeviceState.FAILED and a.reason == "bad signature"
    assert store.events("r1")[-1].actor == "device:d0"


def test_telemetry_ingest_is_idempotent_and_merges_per_window(store: Store) -> None:
    t0 = 1_700_000_000_000
    batch = [
        summary("d1", 2, start_ms=t0 + i * 10_000, requests=100, errors=i, fallbacks=10)
        for i in range(3)
    ]
    batch.append(summary("d2", 2, start_ms=t0, requests=50, latency_ms=8.0))
    res = store.ingest(batch)
    assert (res.ingested, res.duplicates) == (4, 0)
    again = store.ingest([*batch, batch[0]])
    assert (again.ingested, again.duplicates) == (0, 5)
    rows, seen = store.telemetry_count()
    assert (rows, seen) == (2, 4), "three d1 summaries merged into one 60 s window"
    stats = store.telemetry_stats("digits", 2)
    assert stats.requests == 350 and stats.errors == 3 and stats.devices == 2
    assert stats.fallback_rate == pytest.approx(40 / 350)
    assert stats.agreement == 1.0
    # 300 requests at 2 ms, 50 at 8 ms: p95 sits at 8 ms (within a bucket's growth).
    assert stats.p95_latency_ms == pytest.approx(8.0, rel=0.1)
    assert stats.p50_latency_ms == pytest.approx(2.0, rel=0.1)
    only_d1 = store.telemetry_stats("digits", 2, device_ids=["d1"])
    assert only_d1.requests == 300 and only_d1.p95_latency_ms == pytest.approx(2.0, rel=0.1)
    assert store.telemetry_versions("digits") == [2]
    # A later batch into the same windows merges into the stored aggregates.
    later = [
        summary("d1", 2, start_ms=t0 + 30_000, requests=50, errors=5, latency_ms=30.0),
        summary("d3", 2, start_ms=t0, requests=10),
    ]
    assert store.ingest(later).ingested == 2
    assert store.telemetry_count() == (3, 6)
    stats = store.telemetry_stats("digits", 2, device_ids=["d1"])
    assert (stats.requests, stats.errors) == (350, 8)
    assert stats.p95_latency_ms == pytest.approx(30.0, rel=0.1)


def test_telemetry_retention(store: Store) -> None:
    now = time.time()
    old = summary("d1", 1, start_ms=int((now - 7200) * 1000))
    new = summary("d1", 1, start_ms=int(now * 1000))
    store.ingest([old], now=now - 7200)
    store.ingest([new], now=now)
    assert store.purge_telemetry(retention_s=3600, now=now) == 1
    assert store.telemetry_count() == (1, 1)


def test_a_report_received_twice_is_applied_once(tmp_path: Path) -> None:
    """Agents re-send a report until the broker acknowledges it (after a restart or a
    reconnect), so HEALTHY or ROLLED_BACK may arrive twice with the same report_id: the
    copy must not record a second event, fail the device again, bump its desired state or
    undo what happened since (here a later presence saying the device is back on v1)."""
    from tandem.cloud.fleet.service import FleetService, ServiceConfig

    svc = FleetService(ServiceConfig(f"sqlite:///{tmp_path / 'f.db'}", tmp_path / "store"))
    store = svc.store
    add_versions(store, 1, 2)
    for device_id in ("d0", "d1"):
        store.upsert_presence(presence(device_id, 1000))
    plan = eng.RolloutPlan("digits", 2, (eng.Stage(100, 0),))
    r = store.create_rollout("r1", plan, baseline_version=1, selector={}, created_by="a", now=1.0)
    d = eng.step(plan, r.state, eng.Observation(2.0, [eng.DeviceView("d0"), eng.DeviceView("d1")]))
    store.apply_decision(
        "r1",
        r.state,
        d,
        2.0,
        variants={"d0": "onnx-int8", "d1": "onnx-int8"},
        previous={"d0": 1, "d1": 1},
        baseline_variants={},
    )

    def wire(device_id: str, kind: int, report_id: str) -> tuple[str, bytes]:
        report = fleet_pb2.DeviceReport(
            report_id=report_id,
            device_id=device_id,
            kind=kind,  # type: ignore[arg-type]
            model="digits",
            version=2,
            variant="onnx-int8",
            rollout_id="r1",
            reason="error rate 0.5; back on v1" if device_id == "d1" else "",
        )
        return device_id, report.SerializeToString()

    healthy = wire("d0", fleet_pb2.DeviceReport.HEALTHY, "h-1")
    rolled_back = wire("d1", fleet_pb2.DeviceReport.ROLLED_BACK, "rb-1")

    def recorded() -> dict[str, int]:
        kinds = [e.kind for e in store.events("r1")]
        return {
            k: kinds.count(k) for k in ("report:healthy", "report:rolled_back", "device_failed")
        }

    svc.handle_reports([healthy, rolled_back])
    once = recorded()
    assert once == {"report:healthy": 1, "report:rolled_back": 1, "device_failed": 1}
    states = {a.device_id: a.state for a in store.assignments("r1")}
    assert states == {"d0": eng.DeviceState.SUCCEEDED, "d1": eng.DeviceState.FAILED}
    revision = store.desired("d1")[0]
    assert store.desired("d1")[1][0].version == 1, "moved back to its baseline"

    # The copies: in a later batch, and twice within one batch.
    svc.handle_reports([rolled_back, healthy])
    svc.handle_reports([healthy, healthy, rolled_back])
    assert recorded() == once
    assert {a.device_id: a.state for a in store.assignments("r1")} == states
    assert store.desired("d1")[0] == revision, "no second move back"
    # The device went back to v1 since (its presence says so): a late copy of its HEALTHY
    # must not make the fleet believe it runs v2 again.
    back = presence("d0", 2000)
    store.upsert_presence(back)
    assert store.device("d0").active_versions["digits"] == 1
    svc.handle_reports([healthy])
    assert store.device("d0").active_versions["digits"] == 1
    outcome = store.apply_reports(
        [ReportIn("d0", eng.ReportKind.HEALTHY, "digits", 2, "r1", report_id="h-1")], now=5.0
    )
    assert outcome[0].duplicate and not outcome[0].desired_changed
    svc.close()


def test_observation_compares_each_cohort_device_with_its_own_history(store: Store) -> None:
    from tandem.cloud.fleet import gates, observe

    add_versions(store, 1, 2)
    t = 1_700_000_000.0
    for i in range(4):
        store.upsert_presence(presence(f"d{i}", int(t * 1000)))
    # An hour of history before the rollout: d0..d2 on v1 (d0's inputs are hard: 30%
    # fallbacks), d3 none (it joined later); and one window too old to count.
    for i, fallbacks in enumerate((30, 5, 5)):
        store.ingest([summary(f"d{i}", 1, start_ms=int((t - 600) * 1000), fallbacks=fallbacks)])
    store.ingest([summary("d1", 1, start_ms=int((t - 7200) * 1000), fallbacks=90)])
    plan = eng.RolloutPlan("digits", 2, (eng.Stage(50, 0), eng.Stage(100, 0)))
    r = store.create_rollout("r1", plan, baseline_version=1, selector={}, created_by="a", now=t)
    targets, variants = observe.targets(store, r)
    d = eng.step(plan, r.state, observe.observation(store, r, t + 1, targets))
    store.apply_decision(
        "r1", r.state, d, t + 1, variants=variants, previous=dict.fromkeys(d.assign, 1),
        baseline_variants={},
    )  # fmt: skip
    cohort = set(d.assign)
    assert cohort == {"d1", "d2"}  # the first half of the model's hashed device order
    after = int((t + 60) * 1000)
    for i in range(4):
        dev = f"d{i}"
        store.ingest([summary(dev, 2 if dev in cohort else 1, start_ms=after, fallbacks=8)])
    obs = observe.observation(store, store.rollout("r1"), t + 120, targets)
    change, drift = obs.cohort.fallback_change, obs.baseline.fallback_change
    assert change is not None and drift is not None
    # Each cohort device against itself (8% now, 5% before; d1's window two hours back, at
    # 90%, is outside the hour of history): +3 points.
    assert (change.count, change.unpaired) == (2, 0)
    assert change.effect == pytest.approx(0.03)
    # The baseline's drift: d0 (30% -> 8%); d3 has no history, so it cannot say.
    assert (drift.count, drift.unpaired) == (1, 1)
    assert drift.effect == pytest.approx(-0.22)
    # The gates' within-device degradation: the cohort's change minus the baseline's drift.
    value, low, high = gates.within_device(1e-3, change, drift, higher_is_better=False)
    assert value == pytest.approx(0.03 + 0.22) and low < value < high


def test_observation_reads_the_history_once_per_refresh_with_a_cache(store: Store) -> None:
    from tandem.cloud.fleet import observe

    add_versions(store, 1, 2)
    t = 1_700_000_000.0
    for i in range(2):
        store.upsert_presence(presence(f"d{i}", int(t * 1000)))
        store.ingest([summary(f"d{i}", 1, start_ms=int((t - 600) * 1000), fallbacks=5)])
    plan = eng.RolloutPlan("digits", 2, (eng.Stage(100, 0),))
    r = store.create_rollout("r1", plan, baseline_version=1, selector={}, created_by="a", now=t)
    targets, variants = observe.targets(store, r)
    d = eng.step(plan, r.state, observe.observation(store, r, t + 1, targets))
    store.apply_decision(
        "r1", r.state, d, t + 1, variants=variants, previous=dict.fromkeys(d.assign, 1),
        baseline_variants={},
    )  # fmt: skip
    r = store.rollout("r1")
    store.ingest([summary("d0", 2, start_ms=int((t + 60) * 1000), fallbacks=8)])
    cache: observe.HistoryCache = {}
    first = observe.observation(store, r, t + 100, targets, cache)
    assert first.cohort.fallback_change is not None
    assert first.cohort.fallback_change.count == 1
    # A summary of the hour before, arriving late (a resend): d0 gains history...
    store.ingest([summary("d0", 1, start_ms=int((t - 300) * 1000), fallbacks=50)])
    cached = observe.observation(store, r, t + 100 + observe.HISTORY_REFRESH_S / 2, targets, cache)
    # ...which a turn inside the refresh period does not read again,
    assert cached.cohort.fallback_change == first.cohort.fallback_change
    fresh = observe.observation(store, r, t + 101 + observe.HISTORY_REFRESH_S, targets, cache)
    # and the next one after it does (d0's history now averages 5% and 50%).
    assert fresh.cohort.fallback_change != first.cohort.fallback_change
    assert (
        fresh.cohort.fallback_change
        == observe.observation(store, r, t + 200, targets).cohort.fallback_change
    )
