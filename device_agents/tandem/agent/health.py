"""Post-activation health: a pure state object fed by telemetry summaries and probes.

The agent feeds it the SDK's telemetry summaries for the model (as the shipper reads them
from the spool) and the results of periodic reference probes; `verdict(now)` answers
pending, healthy (the window passed cleanly) or unhealthy (with the reason).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Verdict(Enum):
    PENDING = "pending"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"


@dataclass
class HealthWatch:
    model: str
    version: int
    variant: str
    started: float  # seconds (the agent's clock)
    window_s: float
    max_error_rate: float
    min_requests: int
    requests: int = 0
    errors: int = 0
    failure: str | None = None
    probes: int = 0

    def observe_summary(self, model: str, version: int, requests: int, errors: int) -> None:
        if model != self.model or version != self.version:
            return
        self.requests += requests
        self.errors += errors
        if self.failure is None and self.requests >= max(self.min_requests, 1):
            rate = self.errors / self.requests
            if rate > self.max_error_rate:
                self.failure = (
                    f"error rate {rate:.3f} over {self.requests} requests exceeds "
                    f"{self.max_error_rate:.3f}"
                )

    def observe_probe(self, problem: str | None) -> None:
        self.probes += 1
        if problem is not None and self.failure is None:
            self.failure = f"health probe failed: {problem}"

    def verdict(self, now: float) -> Verdict:
        if self.failure is not None:
            return Verdict.UNHEALTHY
        if now - self.started >= self.window_s:
            return Verdict.HEALTHY
        return Verdict.PENDING

    def remaining(self, now: float) -> float:
        return max(0.0, self.started + self.window_s - now)
