"""When the agent sends a queued report again: pure, no IO (the outbox does the IO).

A report leaves the outbox only when the fleet service acknowledges it (a `ReportAck` on the
device's `reports/ack` topic). The broker's PUBACK is not enough: it says the broker has the
report, not that a fleet replica stored it, and a replica killed with reports queued in its
MQTT session never stores them. So each report is sent again until an ack names it, after
`first_s`, then after waits growing by `factor` up to `max_s`, each jittered so that a fleet
of devices coming back from one outage does not resend in lockstep. There is no last try:
an unacknowledged report may be the HEALTHY a rollout waits for, and the fleet applies each
`report_id` once, so a copy costs a message and nothing else. What bounds the traffic is the
capped wait and the outbox's size (`state.MAX_OUTBOX_REPORTS`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from tandem.errors import ConfigError


@dataclass(frozen=True)
class ResendPolicy:
    """How long the agent waits for the fleet's ack before sending a report again."""

    first_s: float = 10.0  # seconds after the first send
    factor: float = 2.0  # each further wait is this many times the one before
    max_s: float = 300.0  # seconds, cap of the growing wait
    jitter: float = 0.2  # each wait is drawn from [1 - jitter, 1 + jitter] times its value

    def __post_init__(self) -> None:
        for name in ("first_s", "max_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(name, f"must be a positive number, got {value!r}")
        if not (math.isfinite(self.factor) and self.factor >= 1):
            raise ConfigError("factor", f"must be >= 1, got {self.factor!r}")
        if not 0 <= self.jitter < 1:
            raise ConfigError("jitter", f"must be within [0, 1), got {self.jitter!r}")
        if self.max_s < self.first_s:
            raise ConfigError("max_s", f"{self.max_s} is below first_s {self.first_s}")

    def wait_s(self, sends: int, rand: float = 0.5) -> float:
        """Seconds to wait for the ack after the `sends`-th send (1 for the first), for a
        uniform draw `rand` in [0, 1) (0.5: no jitter)."""
        base = min(self.max_s, self.first_s * self.factor ** max(0, min(sends - 1, 64)))
        return base * (1 + self.jitter * (2 * rand - 1))


class ResendSchedule:
    """Per queued report: how often it was sent and when it is due again (monotonic s).

    Not persisted: after a restart every report in the outbox is due at once, which is what
    a restart should do (the previous run's sends may have died with it)."""

    def __init__(self, policy: ResendPolicy, rand: Callable[[], float] = random.random) -> None:
        self.policy = policy
        self._rand = rand
        self._sends: dict[str, int] = {}
        self._due: dict[str, float] = {}

    def due(self, report_ids: Iterable[str], now: float) -> list[str]:
        """The ids, in their order, never sent or whose wait for an ack is over."""
        return [i for i in report_ids if self._due.get(i, -math.inf) <= now]

    def sent(self, report_id: str, now: float) -> float:
        """Records a send; returns the seconds until the report is due again."""
        sends = self._sends.get(report_id, 0) + 1
        self._sends[report_id] = sends
        wait = self.policy.wait_s(sends, self._rand())
        self._due[report_id] = now + wait
        return wait

    def sends(self, report_id: str) -> int:
        return self._sends.get(report_id, 0)

    def acknowledged(self, report_id: str) -> None:
        self._sends.pop(report_id, None)
        self._due.pop(report_id, None)

    def all_due_now(self) -> None:
        """After a reconnect: what was sent on the old connection may have died with it, so
        everything goes again now (the growing waits go on from where they were)."""
        self._due.clear()

    def keep_only(self, report_ids: Iterable[str]) -> None:
        """Forgets the reports that left the outbox some other way (dropped when full)."""
        keep = set(report_ids)
        for table in (self._sends, self._due):
            for i in [i for i in table if i not in keep]:
                del table[i]
