"""Telemetry: decoding device batches, merging log histograms, and the derived statistics.

A device publishes ``zstd(TelemetryBatch)``; each `TelemetrySummary` covers one device, one
model version and one interval. The store merges summaries into one aggregate per device,
model version and time window (`Aggregate`), and ingests each `summary_id` once. Latency
quantiles come from the merged log histograms, so a fleet-wide p95 is exact to the bucket
width (the growth factor), whatever the number of devices.

Text generation rides in the same summaries: generations, their errors, tokens and seconds,
drafted and accepted tokens, escalations and a time-to-first-token histogram, summed like the
request counts. Rates are ratios of sums (tokens/s = tokens / seconds, acceptance = accepted /
drafted), so they are the same however the windows and devices are grouped.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import zstandard
from google.protobuf.message import DecodeError

from tandem.errors import FleetError
from tandem.protos.fleet.v1 import fleet_pb2
from tandem.sdk.histogram import LogHistogram, merge_histograms

from .gates import estimated_accuracy
from .plan import Rates

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


# --- aggregates and statistics ------------------------------------------------------------


# The summary's plain counters (TelemetrySummary fields of these names): summed field by
# field wherever summaries, rows or totals merge, and carried under the same names by
# Aggregate, TelemetryStats and the store's rows.
COUNTERS = (
    "requests",
    "errors",
    "fallbacks",
    "cache_hits",
    "shadow_sampled",
    "shadow_agreed",
    "generations",
    "generation_errors",
    "generated_tokens",
    "generation_seconds",
    "drafted",
    "accepted",
    "escalations",
)
# Aggregate's log histograms, by the TelemetrySummary field each comes from.
HISTOGRAMS = {
    "latency_local": "latency_local_ms",
    "latency_cloud": "latency_cloud_ms",
    "ttft": "ttft_ms",
    "ms_per_token": "ms_per_token",
}


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
    confidence_sum: float = 0.0
    latency_local: LogHistogram | None = None
    latency_cloud: LogHistogram | None = None
    runtime: str = ""
    summaries: int = 0
    generations: int = 0
    generation_errors: int = 0
    generated_tokens: int = 0
    generation_seconds: float = 0.0
    drafted: int = 0
    accepted: int = 0
    escalations: int = 0
    ttft: LogHistogram | None = None
    ms_per_token: LogHistogram | None = None

    @property
    def key(self) -> tuple[str, str, int, int]:
        return (self.device_id, self.model, self.version, self.window_start_ms)

    def add(self, s: fleet_pb2.TelemetrySummary) -> None:
        for name in COUNTERS:
            setattr(self, name, getattr(self, name) + getattr(s, name))
        for k, v in s.counts.items():
            self.counts[k] = self.counts.get(k, 0) + v
        self.confidence = merge_confidence(self.confidence, s.confidence_buckets)
        self.confidence_sum += s.confidence_sum
        for name, proto_field in HISTOGRAMS.items():
            if s.HasField(proto_field):
                histogram = LogHistogram.from_proto(getattr(s, proto_field))
                setattr(self, name, merge_histograms([getattr(self, name), histogram]))
        if s.runtime:
            self.runtime = s.runtime
        self.summaries += 1

    def merge(self, other: Aggregate, *, histograms: bool = True) -> None:
        """Adds `other` in; `histograms=False` leaves the histograms out (per-device totals
        need none)."""
        for name in COUNTERS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for k, v in other.counts.items():
            self.counts[k] = self.counts.get(k, 0) + v
        self.confidence = merge_confidence(self.confidence, other.confidence)
        self.confidence_sum += other.confidence_sum
        if histograms:
            for name in HISTOGRAMS:
                setattr(self, name, merge_histograms([getattr(self, name), getattr(other, name)]))
        self.runtime = other.runtime or self.runtime
        self.summaries += other.summaries


def merge_confidence(a: Sequence[int], b: Sequence[int]) -> list[int]:
    """The sum of two linear confidence histograms over [0, 1].

    Bucket i of B holds confidences in [i/B, (i+1)/B). Two devices configured with different
    B do not add index by index: the finer one is re-bucketed into the coarser layout at its
    bucket midpoints (exact when one B divides the other, as 10 and 20 do).
    """
    if not a or not b or len(a) == len(b):
        if not b:
            return list(a)
        if not a:
            return list(b)
        return [x + y for x, y in zip(a, b, strict=True)]
    coarse, fine = (list(a), b) if len(a) < len(b) else (list(b), a)
    n, m = len(coarse), len(fine)
    for j, c in enumerate(fine):
        if c:
            coarse[min(int((j + 0.5) / m * n), n - 1)] += c
    return coarse


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
class DeviceTotals:
    """One device's totals of one version over the span: a cluster for the gates."""

    device_id: str
    requests: int = 0
    errors: int = 0
    fallbacks: int = 0
    shadow_sampled: int = 0
    shadow_agreed: int = 0
    answers: int = 0  # local answers with a confidence
    confidence_mass: float = 0.0  # their estimated-accuracy mass (mean confidence x answers)
    generations: int = 0  # finished text generations
    escalations: int = 0  # of those, the ones that changed path (cascade, fallback)
    drafted: int = 0  # speculative tokens the device drafted
    accepted: int = 0  # of those, accepted by the cloud
    generated_tokens: int = 0
    generation_seconds: float = 0.0


def device_totals(rows: Sequence[Aggregate]) -> tuple[DeviceTotals, ...]:
    """The rows (any windows) summed per device, in device order."""
    by: dict[str, Aggregate] = {}
    for r in rows:
        agg = by.get(r.device_id)
        if agg is None:
            agg = by[r.device_id] = Aggregate(r.device_id, r.model, r.version, 0)
        agg.merge(r, histograms=False)
    out = []
    for device_id in sorted(by):
        a = by[device_id]
        est = estimated_accuracy(a.confidence, a.confidence_sum)
        out.append(
            DeviceTotals(
                device_id, a.requests, a.errors, a.fallbacks, a.shadow_sampled,
                a.shadow_agreed, est[1] if est else 0, est[0] * est[1] if est else 0.0,
                a.generations, a.escalations, a.drafted, a.accepted, a.generated_tokens,
                a.generation_seconds,
            )
        )  # fmt: skip
    return tuple(out)


@dataclass(frozen=True)
class TelemetryStats(Rates):
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
    # Merged linear confidence buckets of the local answers (for estimated accuracy) and the
    # merged local-latency histogram (for the latency gate's rank test).
    confidence_buckets: tuple[int, ...] = ()
    # Their sum, when every device sent it (0.0 otherwise): the exact mean confidence.
    confidence_sum: float = 0.0
    latency_local: LogHistogram | None = field(default=None, compare=False, repr=False)
    # Each device's totals (from the same rows: no extra query), for the clustered gates.
    per_device: tuple[DeviceTotals, ...] = field(default=(), compare=False, repr=False)
    # Text generation (0 where the devices' agents predate it).
    generations: int = 0
    generation_errors: int = 0
    generated_tokens: int = 0
    generation_seconds: float = 0.0
    drafted: int = 0
    accepted: int = 0
    escalations: int = 0
    p50_ttft_ms: float | None = None
    p95_ttft_ms: float | None = None
    # Per-generation milliseconds per token, merged: the tokens_per_s_ratio gate's samples.
    ms_per_token: LogHistogram | None = field(default=None, compare=False, repr=False)

    @property
    def tokens_per_s(self) -> float | None:
        """Tokens over the seconds the finished generations took (not a mean of rates)."""
        return self.generated_tokens / self.generation_seconds if self.generation_seconds else None

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted over drafted speculative tokens."""
        return self.accepted / self.drafted if self.drafted else None

    @property
    def escalation_rate(self) -> float | None:
        """Generations that changed path (cascade to the cloud, fallback) over generations."""
        return self.escalations / self.generations if self.generations else None

    @property
    def estimated_accuracy(self) -> float | None:
        """Label-free accuracy of the local answers from their calibrated confidences."""
        est = estimated_accuracy(self.confidence_buckets, self.confidence_sum)
        return est[0] if est else None

    @property
    def request_rate(self) -> float | None:
        return self.requests / self.span_s if self.span_s > 0 else None

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "version": self.version,
            "devices": self.devices,
            **{name: getattr(self, name) for name in COUNTERS},
            "span_s": self.span_s,
            "error_rate": self.error_rate,
            "fallback_rate": self.fallback_rate,
            "agreement": self.agreement,
            "request_rate": self.request_rate,
            "p50_latency_ms": self.p50_latency_ms,
            "p95_latency_ms": self.p95_latency_ms,
            "p95_cloud_latency_ms": self.p95_cloud_latency_ms,
            "confidence_buckets": list(self.confidence_buckets),
            "estimated_accuracy": self.estimated_accuracy,
            "tokens_per_s": self.tokens_per_s,
            "acceptance_rate": self.acceptance_rate,
            "escalation_rate": self.escalation_rate,
            "p50_ttft_ms": self.p50_ttft_ms,
            "p95_ttft_ms": self.p95_ttft_ms,
        }


def combine(model: str, version: int, rows: Sequence[Aggregate], span_s: float) -> TelemetryStats:
    local = merge_histograms(r.latency_local for r in rows)
    cloud = merge_histograms(r.latency_cloud for r in rows)
    ttft = merge_histograms(r.ttft for r in rows)
    ms_per_token = merge_histograms(r.ms_per_token for r in rows)
    confidence: list[int] = []
    for r in rows:
        confidence = merge_confidence(confidence, r.confidence)
    # A sum only counts when every row with confidences carries one (older agents send 0).
    with_conf = [r for r in rows if any(r.confidence)]
    confidence_sum = (
        sum(r.confidence_sum for r in with_conf)
        if with_conf and all(r.confidence_sum > 0 for r in with_conf)
        else 0.0
    )
    return TelemetryStats(
        model=model,
        version=version,
        devices=len({r.device_id for r in rows}),
        **{name: sum(getattr(r, name) for r in rows) for name in COUNTERS},
        span_s=span_s,
        p50_latency_ms=local.quantile(0.5) if local else None,
        p95_latency_ms=local.quantile(0.95) if local else None,
        p95_cloud_latency_ms=cloud.quantile(0.95) if cloud else None,
        confidence_buckets=tuple(confidence),
        confidence_sum=confidence_sum,
        latency_local=local,
        per_device=device_totals(rows),
        p50_ttft_ms=ttft.quantile(0.5) if ttft else None,
        p95_ttft_ms=ttft.quantile(0.95) if ttft else None,
        ms_per_token=ms_per_token,
    )
