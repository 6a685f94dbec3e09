"""What a device's report does to its assignment in a rollout: pure, no IO.

The engine says which state a report moves an assignment to; this adds what follows from
that state, so that the store only applies the outcome: a device that failed is recorded
with a `device_failed` event and moved back to the version it ran before.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import engine as eng


@dataclass(frozen=True)
class ReportEffect:
    state: eng.DeviceState  # the assignment's new state
    failed: bool  # record `device_failed` and move the device back to its previous version


def report_effect(
    current: eng.DeviceState, kind: eng.ReportKind, reported_version: int, rollout_version: int
) -> ReportEffect | None:
    """None when the report changes nothing for this assignment."""
    new_state = eng.on_report(current, kind, reported_version, rollout_version)
    if new_state is None:
        return None
    return ReportEffect(new_state, failed=new_state is eng.DeviceState.FAILED)
