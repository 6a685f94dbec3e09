"""What a report does to an assignment, without a store."""

from __future__ import annotations

from tandem.cloud.fleet import engine as eng
from tandem.cloud.fleet.reports import ReportEffect, report_effect


def test_a_failed_report_fails_the_device_and_moves_it_back() -> None:
    for kind in (eng.ReportKind.FAILED, eng.ReportKind.REFUSED, eng.ReportKind.ROLLED_BACK):
        effect = report_effect(eng.DeviceState.INSTALLING, kind, 2, 2)
        assert effect == ReportEffect(eng.DeviceState.FAILED, failed=True)


def test_healthy_succeeds_and_other_versions_change_nothing() -> None:
    healthy = report_effect(eng.DeviceState.INSTALLING, eng.ReportKind.HEALTHY, 2, 2)
    assert healthy == ReportEffect(eng.DeviceState.SUCCEEDED, failed=False)
    assert report_effect(eng.DeviceState.INSTALLING, eng.ReportKind.FAILED, 1, 2) is None
    assert report_effect(eng.DeviceState.SUCCEEDED, eng.ReportKind.FAILED, 2, 2) is None
