"""The one mergeable log histogram, for the SDK's telemetry and the fleet's aggregates.

Bucket i counts values in [min_value * growth**i, min_value * growth**(i+1)); values below
`min_value` go to `underflow`, values beyond the last bucket into it. A device records into
its own layout; the fleet merges thousands of them. Histograms with the same layout merge
exactly (so a fleet-wide quantile is exact to the bucket width, whatever the number of
devices); one with another layout is re-bucketed at its bucket midpoints, so a device with
an odd configuration still counts, at the cost of one bucket's precision.

The wire form is the proto `fleet.v1.LogHistogram`; `to_json`/`from_json` are the store's.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from tandem.protos.fleet.v1 import fleet_pb2

__all__ = ["LogHistogram", "merge_histograms"]


class LogHistogram:
    """Log-spaced buckets: bucket i counts [min * growth**i, min * growth**(i+1))."""

    __slots__ = ("_log_growth", "count", "counts", "growth", "max", "min_value", "sum", "underflow")

    def __init__(
        self, min_value: float = 0.001, growth: float = 2**0.25, buckets: int = 128
    ) -> None:
        if min_value <= 0 or growth <= 1.0:
            raise ValueError(
                f"a log histogram needs min_value > 0 and growth > 1, got {min_value}, {growth}"
            )
        self.min_value = float(min_value)
        self.growth = float(growth)
        self._log_growth = math.log(self.growth)
        self.counts = [0] * buckets
        self.underflow = 0
        self.count = 0
        self.sum = 0.0
        self.max = 0.0

    @property
    def layout(self) -> tuple[float, float]:
        """(min_value, growth): histograms with equal layouts merge bucket by bucket."""
        return (self.min_value, self.growth)

    def add(self, value: float) -> None:
        self.count += 1
        self.sum += value
        if value > self.max:
            self.max = value
        if value < self.min_value:
            self.underflow += 1
            return
        index = int(math.log(value / self.min_value) / self._log_growth)
        self.counts[min(index, len(self.counts) - 1)] += 1

    def merge(self, other: LogHistogram) -> None:
        """Adds `other` in; re-buckets it at its bucket midpoints when its layout differs."""
        if other.layout == self.layout:
            if len(other.counts) > len(self.counts):
                self.counts.extend([0] * (len(other.counts) - len(self.counts)))
            for i, c in enumerate(other.counts):
                self.counts[i] += c
            self.underflow += other.underflow
        else:
            self._add_at(other.min_value / 2, other.underflow)
            for i, c in enumerate(other.counts):
                if c:
                    self._add_at(other.min_value * other.growth ** (i + 0.5), c)
        self.count += other.count
        self.sum += other.sum
        self.max = max(self.max, other.max)

    def _add_at(self, value: float, n: int) -> None:
        if n == 0:
            return
        if value < self.min_value:
            self.underflow += n
            return
        i = int(math.log(value / self.min_value) / self._log_growth)
        if i >= len(self.counts):
            self.counts.extend([0] * (i + 1 - len(self.counts)))
        self.counts[i] += n

    def copy(self) -> LogHistogram:
        out = LogHistogram(self.min_value, self.growth, 0)
        out.counts = list(self.counts)
        out.underflow, out.count, out.sum, out.max = self.underflow, self.count, self.sum, self.max
        return out

    def quantile(self, q: float) -> float | None:
        """The q-quantile, interpolated geometrically inside its bucket and capped at max;
        None when empty."""
        total = self.underflow + sum(self.counts)
        if total == 0:
            return None
        target = q * total
        cum = float(self.underflow)
        if cum >= target:
            return min(self.min_value, self.max) if self.max else self.min_value
        for i, c in enumerate(self.counts):
            if c and cum + c >= target:
                frac = (target - cum) / c
                value = float(self.min_value * self.growth ** (i + frac))
                return min(value, self.max) if self.max > 0 else value
            cum += c
        return self.max

    def bucket_counts(self) -> tuple[int, ...]:
        """Underflow first, then the buckets: the order the latency gate ranks them in."""
        return (self.underflow, *self.counts)

    # --- wire and store forms ---------------------------------------------------------------

    def to_proto(self) -> fleet_pb2.LogHistogram:
        return fleet_pb2.LogHistogram(
            min_value=self.min_value,
            growth=self.growth,
            counts=self.counts,
            underflow=self.underflow,
            count=self.count,
            sum=self.sum,
            max=self.max,
        )

    @classmethod
    def from_proto(cls, message: fleet_pb2.LogHistogram) -> LogHistogram | None:
        """The histogram a device sent; None when it is empty or its layout is invalid
        (a zero or negative minimum, a growth <= 1), so garbage never reaches a merge."""
        if message.count == 0 or message.min_value <= 0 or message.growth <= 1.0:
            return None
        hist = cls(message.min_value, message.growth, 0)
        hist.counts = [int(c) for c in message.counts]
        hist.underflow, hist.count = int(message.underflow), int(message.count)
        hist.sum, hist.max = float(message.sum), float(message.max)
        return hist

    def to_json(self) -> dict[str, Any]:
        return {
            "min_value": self.min_value,
            "growth": self.growth,
            "counts": list(self.counts),
            "underflow": self.underflow,
            "count": self.count,
            "sum": self.sum,
            "max": self.max,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> LogHistogram | None:
        if not data:
            return None
        hist = cls(float(data["min_value"]), float(data["growth"]), 0)
        hist.counts = [int(c) for c in data["counts"]]
        hist.underflow, hist.count = int(data["underflow"]), int(data["count"])
        hist.sum, hist.max = float(data["sum"]), float(data["max"])
        return hist

    def __repr__(self) -> str:
        return f"LogHistogram(min_value={self.min_value}, growth={self.growth}, count={self.count})"


def merge_histograms(items: Iterable[LogHistogram | None]) -> LogHistogram | None:
    """One histogram holding all of `items` (in the first one's layout); None if none."""
    merged: LogHistogram | None = None
    for h in items:
        if h is None:
            continue
        if merged is None:
            merged = h.copy()
        else:
            merged.merge(h)
    return merged
