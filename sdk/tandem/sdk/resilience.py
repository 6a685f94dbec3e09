"""Retry and circuit-breaker policies as immutable values, in the urllib3 `Retry` style.

`Retry.increment(cause)` returns a new `Retry` with one more attempt in its history; the
questions a caller asks are small named methods (`is_retry`, `is_exhausted`,
`get_backoff_time`). `CircuitBreaker` is the same idea for endpoint health: every transition
(`on_success`, `on_failure`, `before_call`) returns the next breaker value, and the holder
swaps it in under a lock. Both are pure and take the clock as an argument, so their tests
need no sleeping.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from typing import Literal

from tandem.errors import ConfigError

# gRPC status names that mean "the server did not process this; trying again is safe".
# Inference is a pure function of its inputs, so these retries are idempotent.
DEFAULT_RETRY_ON = frozenset({"UNAVAILABLE", "RESOURCE_EXHAUSTED", "ABORTED"})
# Status names that count against an endpoint's health (a client mistake does not).
DEFAULT_FAILURE_CODES = frozenset(
    {"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "INTERNAL", "UNKNOWN", "ABORTED"}
)


@dataclass(frozen=True)
class Retry:
    """How many times, on which failures, and how long to wait before the next attempt."""

    total: int = 2  # retries after the first attempt
    backoff_factor: float = 0.025  # seconds; the n-th retry waits up to factor * 2**(n-1)
    backoff_max: float = 0.5  # seconds; cap on one wait
    jitter: Literal["full", "none"] = "full"  # full jitter: uniform in [0, capped backoff]
    retry_on: frozenset[str] = DEFAULT_RETRY_ON
    history: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        if self.total < 0:
            raise ConfigError("total", f"must be >= 0, got {self.total}")
        if self.backoff_factor < 0:
            raise ConfigError("backoff_factor", f"must be >= 0 seconds, got {self.backoff_factor}")
        if self.backoff_max < self.backoff_factor:
            raise ConfigError("backoff_max", "must be >= backoff_factor")
        if self.jitter not in ("full", "none"):
            raise ConfigError("jitter", f"must be 'full' or 'none', got {self.jitter!r}")

    @classmethod
    def disabled(cls) -> Retry:
        return cls(total=0)

    def is_retry(self, code: str) -> bool:
        """Whether a failure with this status may be retried (ignoring the budget)."""
        return code in self.retry_on

    def is_exhausted(self) -> bool:
        return len(self.history) > self.total

    def increment(self, code: str) -> Retry:
        """The policy after one more failed attempt with status `code`."""
        return replace(self, history=(*self.history, code))

    def can_retry(self, code: str) -> bool:
        return self.is_retry(code) and len(self.history) < self.total

    def get_backoff_time(self, rng: random.Random | None = None) -> float:
        """Seconds to wait before the next attempt (0 before the first retry)."""
        retries = len(self.history)
        if retries == 0:
            return 0.0
        cap = float(min(self.backoff_max, self.backoff_factor * 2.0 ** (retries - 1)))
        if self.jitter == "none":
            return cap
        return float((rng or random).uniform(0.0, cap))


BreakerState = Literal["closed", "open", "half_open"]


@dataclass(frozen=True)
class BreakerConfig:
    """When a breaker opens, how long it stays open, and how it closes again."""

    window_s: float = 10.0  # seconds of outcomes that count
    buckets: int = 10  # the window is kept as this many counters (bounds memory and cost)
    min_calls: int = 5  # fewer outcomes than this in the window never open the breaker
    failure_ratio: float = 0.5  # open when failures / calls in the window reach this
    consecutive_failures: int = 5  # ...or when this many calls fail in a row
    open_s: float = 2.0  # seconds open before trial calls are let through
    half_open_calls: int = 1  # trial calls allowed at once while half-open
    close_after: int = 2  # successful trial calls that close the breaker

    def __post_init__(self) -> None:
        positive = {
            "window_s": self.window_s,
            "buckets": self.buckets,
            "min_calls": self.min_calls,
            "consecutive_failures": self.consecutive_failures,
            "half_open_calls": self.half_open_calls,
            "close_after": self.close_after,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ConfigError(name, f"must be > 0, got {value}")
        if not 0.0 < self.failure_ratio <= 1.0:
            raise ConfigError("failure_ratio", f"must be in (0, 1], got {self.failure_ratio}")
        if self.open_s < 0:
            raise ConfigError("open_s", f"must be >= 0 seconds, got {self.open_s}")

    @property
    def bucket_s(self) -> float:
        return self.window_s / self.buckets


# One window bucket: (bucket number = floor(time / bucket_s), successes, failures).
Bucket = tuple[int, int, int]


@dataclass(frozen=True)
class CircuitBreaker:
    """One endpoint's breaker: closed (calls flow), open (calls refused), half-open (trials).

    The window is a short tuple of per-bucket counters, so recording an outcome costs the
    same however many calls the window holds.
    """

    config: BreakerConfig = field(default_factory=BreakerConfig)
    state: BreakerState = "closed"
    outcomes: tuple[Bucket, ...] = ()
    consecutive: int = 0  # failures in a row
    opened_at: float = 0.0
    trials_in_flight: int = 0
    trial_successes: int = 0

    def _record(self, now: float, ok: bool) -> tuple[Bucket, ...]:
        index = int(now // self.config.bucket_s)
        kept = self.outcomes
        horizon = index - self.config.buckets + 1
        if kept and kept[0][0] < horizon:
            kept = tuple(b for b in kept if b[0] >= horizon)
        if kept and kept[-1][0] == index:
            _, successes, failures = kept[-1]
            return (*kept[:-1], (index, successes + ok, failures + (not ok)))
        return (*kept, (index, int(ok), int(not ok)))

    def counts(self) -> tuple[int, int]:
        """(calls, failures) in the window as last recorded."""
        return (
            sum(b[1] + b[2] for b in self.outcomes),
            sum(b[2] for b in self.outcomes),
        )

    def current_state(self, now: float) -> BreakerState:
        """The state as seen at `now` (open turns half-open once open_s has passed)."""
        if self.state == "open" and now - self.opened_at >= self.config.open_s:
            return "half_open"
        return self.state

    def allows(self, now: float) -> bool:
        state = self.current_state(now)
        if state == "closed":
            return True
        if state == "open":
            return False
        return self.trials_in_flight < self.config.half_open_calls

    def before_call(self, now: float) -> CircuitBreaker:
        """The breaker after admitting one call (check `allows` first)."""
        if self.state == "closed":
            return self
        if self.current_state(now) == "half_open":
            return replace(self, state="half_open", trials_in_flight=self.trials_in_flight + 1)
        return self

    def on_success(self, now: float) -> CircuitBreaker:
        if self.state == "closed":
            return CircuitBreaker(self.config, "closed", self._record(now, True), 0)
        if self.current_state(now) == "half_open":
            successes = self.trial_successes + 1
            if successes >= self.config.close_after:
                return CircuitBreaker(self.config)
            return replace(
                self,
                state="half_open",
                trials_in_flight=max(0, self.trials_in_flight - 1),
                trial_successes=successes,
            )
        return self

    def on_failure(self, now: float) -> CircuitBreaker:
        if self.state != "closed":
            if self.current_state(now) == "half_open":
                return self._open(now)
            return self
        outcomes = self._record(now, False)
        consecutive = self.consecutive + 1
        calls = sum(b[1] + b[2] for b in outcomes)
        failures = sum(b[2] for b in outcomes)
        if consecutive >= self.config.consecutive_failures or (
            calls >= self.config.min_calls and failures / calls >= self.config.failure_ratio
        ):
            return self._open(now)
        return CircuitBreaker(self.config, "closed", outcomes, consecutive)

    def on_ignored(self, now: float) -> CircuitBreaker:
        """A call that neither proves nor disproves health (e.g. the caller's bad input)."""
        if self.state == "half_open":
            return replace(self, trials_in_flight=max(0, self.trials_in_flight - 1))
        return self

    def _open(self, now: float) -> CircuitBreaker:
        return CircuitBreaker(self.config, state="open", opened_at=now)
