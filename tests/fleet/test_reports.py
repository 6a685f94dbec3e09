"""What a report does to an assignment (pure), and which reports the service acknowledges."""

from __future__ import annotations

from pathlib import Path

from tandem.cloud.fleet import engine as eng
from tandem.cloud.fleet.reports import ReportEffect, report_effect
from tandem.protos.fleet.v1 import fleet_pb2


def test_a_failed_report_fails_the_device_and_moves_it_back() -> None:
    for kind in (eng.ReportKind.FAILED, eng.ReportKind.REFUSED, eng.ReportKind.ROLLED_BACK):
        effect = report_effect(eng.DeviceState.INSTALLING, kind, 2, 2)
        assert effect == ReportEffect(eng.DeviceState.FAILED, failed=True)


def test_healthy_succeeds_and_other_versions_change_nothing() -> None:
    healthy = report_effect(eng.DeviceState.INSTALLING, eng.ReportKind.HEALTHY, 2, 2)
    assert healthy == ReportEffect(eng.DeviceState.SUCCEEDED, failed=False)
    assert report_effect(eng.DeviceState.INSTALLING, eng.ReportKind.FAILED, 1, 2) is None
    assert report_effect(eng.DeviceState.SUCCEEDED, eng.ReportKind.FAILED, 2, 2) is None


def test_the_service_acknowledges_stored_reports_and_copies_change_nothing(
    tmp_path: Path,
) -> None:
    """`handle_reports` names the report ids it stored, which the MQTT link acknowledges to
    the device (ReportAck). A resend of one (its ack was lost, or the first copy sat in a
    dead replica's queue and arrives after all) is acknowledged again, so the device stops,
    but counts nothing twice: no second event, no second transition, no stage step. A
    report from a device not registered yet is not acknowledged: its resend after the
    registration is the one that counts."""
    from tandem.cloud.fleet.service import FleetService, ServiceConfig
    from tests.fleet.test_store import add_versions, presence

    svc = FleetService(ServiceConfig(f"sqlite:///{tmp_path / 'f.db'}", tmp_path / "store"))
    store = svc.store
    add_versions(store, 1, 2)
    for device_id in ("d0", "d1"):
        store.upsert_presence(presence(device_id, 1000))
    plan = eng.RolloutPlan("digits", 2, (eng.Stage(100, 0),))
    r = store.create_rollout("r1", plan, baseline_version=1, selector={}, created_by="a", now=1.0)
    devices = [eng.DeviceView("d0"), eng.DeviceView("d1")]
    store.apply_decision(
        "r1",
        r.state,
        eng.step(plan, r.state, eng.Observation(2.0, devices)),
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
        )
        return device_id, report.SerializeToString()

    R = fleet_pb2.DeviceReport
    verified, healthy = wire("d0", R.VERIFIED, "v-0"), wire("d0", R.HEALTHY, "h-0")
    progress = wire("d1", R.PROGRESS, "p-1")
    stranger = wire("d9", R.HEALTHY, "h-9")

    def snapshot() -> tuple[list[str], dict[str, eng.DeviceState], eng.RolloutState]:
        return (
            [e.kind for e in store.events("r1")],
            {a.device_id: a.state for a in store.assignments("r1")},
            store.rollout("r1").state,
        )

    stored = svc.handle_reports([verified, healthy, progress, stranger, ("d1", b"\xff garbage")])
    assert stored == {"d0": ["v-0", "h-0"]}, "PROGRESS, strangers and garbage are not acked"
    once = snapshot()
    assert once[1]["d0"] is eng.DeviceState.SUCCEEDED
    assert once[0].count("report:healthy") == 1

    # The copies, alone and mixed with a fresh report: acknowledged again, applied never.
    assert svc.handle_reports([healthy]) == {"d0": ["h-0"]}
    assert svc.handle_reports([healthy, verified, healthy]) == {"d0": ["h-0", "v-0", "h-0"]}
    assert snapshot() == once
    # The engine's next turn sees the same assignments: one device succeeded, not two.
    decision = eng.step(plan, store.rollout("r1").state, eng.Observation(3.0, devices))
    assert decision == eng.step(plan, once[2], eng.Observation(3.0, devices))

    # The stranger registers; its resend (same id) now counts, and is acknowledged.
    store.upsert_presence(presence("d9", 1000))
    assert svc.handle_reports([stranger]) == {"d9": ["h-9"]}
    assert any(e.device_id == "d9" for e in store.events(None))
    svc.close()
