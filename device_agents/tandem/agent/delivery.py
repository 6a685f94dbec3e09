"""Pure delivery decisions: what one install in progress does next when a file goes wrong.

No IO here (like `verify` and `transfer.decide_chunk`): `DeliveryState` holds the counters
of one delivery as values and answers the questions the chunk handler asks, so every rule
(a refused or broken delta falls back to the full file; N digest failures of full files
refuse the offer; the same gap is not re-requested more than once a second) is tested
without a broker or a disk. The agent does the MQTT and the staging IO around it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from tandem.agent import errors
from tandem.agent.errors import RefusedError

REREQUEST_MIN_S = 1.0  # seconds between two re-requests of the same file offset on a gap


class Next(Enum):
    """What the agent does after a file failed (a rejected chunk or a digest mismatch)."""

    FETCH_FULL = "fetch_full"  # the delta was refused or broken: ask for the whole file
    RETRY_FILE = "retry_file"  # start the file over and ask for it again
    REFUSE = "refuse"  # attempts used up: discard the delivery and refuse the offer


@dataclass
class DeliveryState:
    """Counters and choices of one delivery; `attempts` full-file digest failures refuse it."""

    base_version: int  # delta base offered to the fleet (0: none)
    attempts: int  # full-file digest failures before the offer is refused
    no_delta: set[str] = field(default_factory=set)  # files to fetch in full
    failures: int = 0
    last_activity: float = 0.0  # monotonic seconds of the last chunk or request
    last_request: tuple[str, int, float] = ("", -1, 0.0)  # file, offset, monotonic time
    reported_bytes: int = 0  # bytes received at the last PROGRESS report

    def delta_base(self, name: str) -> int:
        """The delta base version to ask for when requesting `name` (0: the full file)."""
        return 0 if name in self.no_delta else self.base_version

    def delta_bases(self, name: str) -> frozenset[int]:
        """The delta bases a chunk of `name` may be built against."""
        base = self.delta_base(name)
        return frozenset({base}) if base else frozenset()

    def should_request(self, name: str, offset: int, now: float, *, force: bool) -> bool:
        """True when `name` from `offset` is to be requested now (and records the request).

        Without `force`, the same gap is asked for at most once per `REREQUEST_MIN_S`: every
        chunk past a gap would otherwise trigger another request for it.
        """
        last_name, last_offset, when = self.last_request
        if (
            not force
            and (last_name, last_offset) == (name, offset)
            and now - when < REREQUEST_MIN_S
        ):
            return False
        self.last_request = (name, offset, now)
        self.last_activity = now
        return True

    def file_failed(self, name: str, *, is_delta: bool) -> Next:
        """A chunk of `name` was rejected or the finished file failed its digest.

        A delta failure costs no attempt: the full file is fetched instead, and later chunks
        of that file are no longer accepted as deltas.
        """
        if is_delta:
            self.no_delta.add(name)
            return Next.FETCH_FULL
        self.failures += 1
        return Next.REFUSE if self.failures >= self.attempts else Next.RETRY_FILE

    def refusal(self, name: str, why: str) -> RefusedError:
        """The refusal after `file_failed` answered REFUSE."""
        return RefusedError(errors.DIGEST_MISMATCH, f"{name}: {why} ({self.failures} attempts)")

    def progress_due(self, received: int, every_bytes: int) -> bool:
        """True when a PROGRESS report is due at `received` bytes (and records it)."""
        if received - self.reported_bytes < every_bytes:
            return False
        self.reported_bytes = received
        return True

    def idle_for(self, now: float) -> float:
        """Seconds since the last chunk or request."""
        return now - self.last_activity


def no_space(exc: OSError) -> RefusedError:
    """The refusal for a device that cannot hold the delivery (disk full, read-only store)."""
    return RefusedError(errors.NO_SPACE, f"the store cannot hold the delivery: {exc}")
