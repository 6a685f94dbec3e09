"""Telemetry: decoding device batches, merging log histograms, and the derived statistics.

A device publishes ``zstd(TelemetryBatch)``; each `TelemetrySummary` covers one device, one
model version and one interval. The store merges summaries into one aggregate per device,
model version and time window (`Aggregate`), and ingests each `summary_id` once. Latency
quantiles come from the merged log histograms, so a fleet-wide p95 is exact to the bucket
width (the growth factor), whatever the number of devices.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import zstandard
from google.protobuf.message import DecodeError

from tandem.errors import FleetError
from tandem.protos.fleet.v1 import fleet_pb2

# A compressed batch may not inflate beyond this (bytes): a zip bomb costs nothing else.
MAX_BATCH_BYTES = 16 * 1024 * 1024
# Summaries per batch we accept; a batch with more is refused whole.
MAX_SUMMARIES_PER_BATCH = 10_000


class TelemetryDecodeError(FleetError):
    """A telemetry payload is not zstd(TelemetryBatch) within the limits."""


def decode_batch(
    payload: bytes, max_bytes: int = MAX_BATCH_BYTES
) -> list[fleet_pb2.TelemetrySummary]:
    """The summaries in a published telemetry payload; raises TelemetryDecodeError."""
    try:
        with zstandard.ZstdDecompressor().stream_reader(payload) as reader:
            raw = reader.read(max_bytes + 1)
    except zstandard.ZstdError as exc:
        raise TelemetryDecodeError(f"telemetry payload is not zstd: {exc}") from exc
    if len(raw) > max_bytes:
        raise TelemetryDecodeError(f"telemetry batch inflates beyond {max_bytes} bytes")
    batch = fleet_pb2.TelemetryBatch()
    try:
        batch.ParseFromString(raw)
    except DecodeError as exc:
        raise TelemetryDecodeError(f"telemetry batch is not a TelemetryBatch: {exc}") from exc
    if len(batch.summaries) > MAX_SUMMARIES_PER_BATCH:
        raise TelemetryDecodeError(f"batch has {len(batch.summaries)} summaries")
    return list(batch.summaries)


def encode_batch(summaries: Iterable[fleet_pb2.TelemetrySummary], level: int = 3) -> bytes:
    batch = fleet_pb2.TelemetryBatch(summaries=list(summaries))
    return zstandard.ZstdCompressor(level=level).compress(batch.SerializeToString())


# --- histograms ---------------------------------------------------------------------------


@dataclass
class Histogram:
    """A mutable log histogram (the proto's LogHistogram as plain data)."""

    min_value: float = 0.01
    growth: float = 1.1
    counts: list[int] = field(default_factory=list)
    underflow: int = 0
    count: int = 0
    sum: float = 0.0
    max: float = 0.0

    @classmethod
    def from_proto(cls, h: fleet_pb2.LogHistogram) -> Histogram | None:
        if h.count == 0 or h.min_value <= 0 or h.growth <= 1.0:
            return None
        return cls(h.min_value, h.growth, list(h.counts), h.underflow, h.count, h.sum, h.max)

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
    def from_json(cls, data: Mapping[str, Any] | None) -> Histogram | None:
        if not data:
            return None
        return cls(
            float(data["min_value"]),
            float(data["growth"]),
            [int(c) for c in data["counts"]],
            int(data["underflow"]),
            int(data["count"]),
            float(data["sum"]),
            float(data["max"]),
        )

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

    def merge(self, other: Histogram) -> None:
        """Adds `other` in; re-buckets it by bucket midpoints when its layout differs."""
        if other.min_value == self.min_value and other.growth == self.growth:
            if len(other.counts) > len(self.counts):
                self.counts.extend([0] * (len(other.counts) - len(self.counts)))
            for i, c in enumerate(other.counts):
                self.counts[i] += c
            self.underflow += other.underflow
        else:
            self._add_at(other.min_value / 2, other.underflow)
            for i, c in enumerate(other.counts):
                if c:
                    mid = other.min_value * other.growth ** (i + 0.5)
                    self._add_at(mid, c)
        self.count += other.count
        self.sum += other.sum
        self.max = max(self.max, other.max)

    def _add_at(self, value: float, n: int) -> None:
        if n == 0:
            return
        if value < self.min_value:
            self.underflow += n
            return
        i = int(math.log(value / self.min_value) / math.log(self.growth))
        if i >= len(self.counts):
            self.counts.extend([0] * (i + 1 - len(self.counts)))
        self.counts[i] += n

    def quantile(self, q: float) -> float | None:
        """The q-quantile, interpolated geometrically inside its bucket and capped at max."""
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


def merge_histograms(items: Iterable[Histogram | None]) -> Histogram | None:
    merged: Histogram | None = None
    for h in items:
        if h is None:
            continue
        if merged is None:
            merged = Histogram(
                h.min_value, h.growth, list(h.counts), h.underflow, h.count, h.sum, h.max
            )
        else:
            merged.merge(h)
    return merged


# --- aggregates and statistics ------------------------------------------------------------


@dataclass
class Aggregate:
    """Merged telemetry of one device, model version and window (one store row)."""

    device_id: str
    model: str
    version: int
    window_start_ms: int
    requests: int = 0
    errors: int = 0
    fallbacks: int = 0
    cache_hits: int = 0
    shadow_sampled: int = 0
    shadow_agreed: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    confidence: list[int] = field(default_factory=list)
    latency_local: Histogram | None = None
    latency_cloud: Histogram | None = None
    runtime: str = ""
    summaries: int = 0

    @property
    def key(self) -> tuple[str, str, int, int]:
        return (self.device_id, self.model, self.version, self.window_start_ms)

    def add(self, s: fleet_pb2.TelemetrySummary) -> None:
        self.requests += s.requests
        self.errors += s.errors
        self.fallbacks += s.fallbacks
        self.cache_hits += s.cache_hits
        self.shadow_sampled += s.shadow_sampled
        self.shadow_agreed += s.shadow_agreed
        for k, v in s.counts.items():
            self.counts[k] = self.counts.get(k, 0) + v
        if len(s.confidence_buckets) > len(self.confidence):
            self.confidence.extend([0] * (len(s.confidence_buckets) - len(self.confidence)))
        for i, c in enumerate(s.confidence_buckets):
            self.confidence[i] += c
        if s.HasField("latency_local_ms"):
            self.latency_local = merge_histograms(
                [self.latency_local, Histogram.from_proto(s.latency_local_ms)]
            )
        if s.HasField("latency_cloud_ms"):
            self.latency_cloud = merge_histograms(
                [self.latency_cloud, Histogram.from_proto(s.latency_cloud_ms)]
            )
        if s.runtime:
            self.runtime = s.runtime
        self.summaries += 1

    def merge(self, other: Aggregate) -> None:
        self.requests += other.requests
        self.errors += other.errors
        self.fallbacks += other.fallbacks
        self.cache_hits += other.cache_hits
        self.shadow_sampled += other.shadow_sampled
        self.shadow_agreed += other.shadow_agreed
        for k, v in other.counts.items():
            self.counts[k] = self.counts.get(k, 0) + v
        if len(other.confidence) > len(self.confidence):
            self.confidence.extend([0] * (len(other.confidence) - len(self.confidence)))
        for i, c in enumerate(other.confidence):
            self.confidence[i] += c
        self.latency_local = merge_histograms([self.latency_local, other.latency_local])
        self.latency_cloud = merge_histograms([self.latency_cloud, other.latency_cloud])
        self.runtime = other.runtime or self.runtime
        self.summaries += other.summaries


def window_start(interval_start_ms: int, window_s: float) -> int:
    width = max(1, int(window_s * 1000))
    return (interval_start_ms // width) * width


def summarize_summaries(
    summaries: Sequence[fleet_pb2.TelemetrySummary], window_s: float
) -> dict[tuple[str, str, int, int], Aggregate]:
    """Summaries grouped into per-device, per-version, per-window aggregates."""
    out: dict[tuple[str, str, int, int], Aggregate] = {}
    for s in summaries:
        key = (s.device_id, s.model, int(s.version), window_start(s.interval_start_ms, window_s))
        agg = out.get(key)
        if agg is None:
            agg = out[key] = Aggregate(*key)
        agg.add(s)
    return out


@dataclass(frozen=True)
class TelemetryStats:
    """Totals and rates of one model version over devices and a time span."""

    model: str
    version: int
    devices: int
    requests: int
    errors: int
    fallbacks: int
    cache_hits: int
    shadow_sampled: int
    shadow_agreed: int
    span_s: float
    p50_latency_ms: float | None
    p95_latency_ms: float | None
    p95_cloud_latency_ms: float | None

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None

    @property
    def fallback_rate(self) -> float | None:
        return self.fallbacks / self.requests if self.requests else None

    @property
    def agreement(self) -> float | None:
        return self.shadow_agreed / self.shadow_sampled if self.shadow_sampled else None

    @property
    def request_rate(self) -> float | None:
        return self.requests / self.span_s if self.span_s > 0 else None

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "version": self.version,
            "devices": self.devices,
            "requests": self.requests,
            "errors": self.errors,
            "fallbacks": self.fallbacks,
            "cache_hits": self.cache_hits,
            "shadow_sampled": self.shadow_sampled,
            "shadow_agreed": self.shadow_agreed,
            "span_s": self.span_s,
            "error_rate": self.error_rate,
            "fallback_rate": self.fallback_rate,
            "agreement": self.agreement,
            "request_rate": self.request_rate,
            "p50_latency_ms": self.p50_latency_ms,
            "p95_latency_ms": self.p95_latency_ms,
            "p95_cloud_latency_ms": self.p95_cloud_latency_ms,
        }


def combine(model: str, version: int, rows: Sequence[Aggregate], span_s: float) -> TelemetryStats:
    local = merge_histograms(r.latency_local for r in rows)
    cloud = merge_histograms(r.latency_cloud for r in rows)
    return TelemetryStats(
        model=model,
        version=version,
        devices=len({r.device_id for r in rows}),
        requests=sum(r.requests for r in rows),
        errors=sum(r.errors for r in rows),
        fallbacks=sum(r.fallbacks for r in rows),
        cache_hits=sum(r.cache_hits for r in rows),
        shadow_sampled=sum(r.shadow_sampled for r in rows),
        shadow_agreed=sum(r.shadow_agreed for r in rows),
        span_s=span_s,
        p50_latency_ms=local.quantile(0.5) if local else None,
        p95_latency_ms=local.quantile(0.95) if local else None,
        p95_cloud_latency_ms=cloud.quantile(0.95) if cloud else None,
    )
