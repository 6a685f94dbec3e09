"""Rollout rules that span the engine's pure decisions and the store's writes.

The store stores and loads; the engine decides. What is left is the read-decide-apply loop
around them: read the rollout and its assignments, let the engine decide, and apply that
decision under the row lock, deciding again from fresh data when another writer got there
first.
"""

from __future__ import annotations

from collections.abc import Mapping

from . import engine as eng
from .errors import ConflictError
from .store import Rollout, Store

COMMAND_TRIES = 5  # reads and decisions of one manual command before it gives up


def apply_command(
    store: Store,
    rollout_id: str,
    cmd: eng.Command,
    actor: str,
    now: float,
    baseline_variants: Mapping[str, str] | None = None,
) -> tuple[Rollout, list[str]]:
    """A manual command, applied under the row lock; returns the rollout and the devices
    whose desired state changed."""

    def attempt() -> list[str]:
        r = store.rollout(rollout_id)
        views = [
            eng.DeviceView(a.device_id, a.state, a.assigned_at, a.updated_at)
            for a in store.assignments(rollout_id)
        ]
        decision = eng.command(r.plan, r.state, cmd, actor, now, views)
        return store.apply_decision(
            rollout_id,
            r.state,
            decision,
            now,
            variants={},
            previous={},
            baseline_variants=baseline_variants or {},
        )

    try:
        changed = store.retry_on_conflict(attempt, tries=COMMAND_TRIES)
    except ConflictError as exc:
        raise ConflictError(f"rollout {rollout_id} keeps changing; try again") from exc
    return store.rollout(rollout_id), changed
