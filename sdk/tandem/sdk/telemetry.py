"""The telemetry recorder: cheap to call, bounded in memory, summaries spooled to disk.

`record` only appends one tuple to a bounded deque (thread-safe in CPython, no lock, well
under a microsecond); everything else happens on a background thread: the events are drained
every `drain_interval_s` into per-(model, version) aggregates, and every `interval_s` each
aggregate becomes a `TelemetrySummary` (tandem.protos.fleet.v1) written to the spool folder as
one file, `<summary_id>.pb.zst` = zstd(TelemetryBatch{summaries: [summary]}), written to a
temporary name and renamed, so the agent only ever sees whole files. The agent ships them and
deletes each after the fleet acknowledges it. When the deque is full the oldest events are
dropped rather than blocking the caller; the recorder catches and logs its own failures.

Text generations (`record_generation`, one event per generation that ended) go into the same
per-(model, version) summary: counts, tokens and seconds summed (tokens/s is their ratio over
any set of summaries), drafted and accepted tokens, escalations, and a time-to-first-token
histogram on the latency histograms' layout.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tandem.errors import ConfigError
from tandem.protos.fleet.v1 import fleet_pb2
from tandem.sdk.atomic import PUBLIC, write_atomic

from .histogram import LogHistogram, merge_histograms

__all__ = [
    "LogHistogram",
    "TelemetryConfig",
    "TelemetryRecorder",
    "merge_histograms",
    "read_spool_file",
]

log = logging.getLogger(__name__)

SPOOL_SUFFIX = ".pb.zst"


@dataclass(frozen=True)
class TelemetryConfig:
    spool_dir: Path | None = None  # where summaries go; None keeps them in memory only
    device_id: str = ""  # written into every summary
    interval_s: float = 60.0  # seconds per summary
    drain_interval_s: float = 0.2  # seconds between moving events from the deque to aggregates
    max_pending_events: int = 65536  # events held before the oldest are dropped
    max_spool_files: int = 1000  # summaries kept on disk when the agent is not shipping
    latency_min_ms: float = 0.001  # lowest latency bucket edge (milliseconds)
    latency_growth: float = 2**0.25  # ratio between bucket edges
    latency_buckets: int = 128  # buckets above latency_min_ms (2**32 x the minimum)
    confidence_buckets: int = 20  # linear buckets over [0, 1]

    def __post_init__(self) -> None:
        if self.interval_s <= 0:
            raise ConfigError("interval_s", f"must be > 0 seconds, got {self.interval_s}")
        if not 0 < self.drain_interval_s <= self.interval_s:
            raise ConfigError("drain_interval_s", "must be > 0 and <= interval_s")
        if self.max_pending_events < 1:
            raise ConfigError("max_pending_events", "must be >= 1")
        if self.max_spool_files < 1:
            raise ConfigError("max_spool_files", "must be >= 1")
        if self.latency_min_ms <= 0 or self.latency_growth <= 1:
            raise ConfigError("latency_growth", "needs latency_min_ms > 0 and growth > 1")
        if self.latency_buckets < 1 or self.confidence_buckets < 1:
            raise ConfigError("latency_buckets", "bucket counts must be >= 1")


@dataclass
class _Aggregate:
    model: str
    version: int
    start_ms: int
    latency_local: LogHistogram
    latency_cloud: LogHistogram
    confidence: list[int]
    counts: collections.Counter[str] = field(default_factory=collections.Counter)
    requests: int = 0
    fallbacks: int = 0
    cache_hits: int = 0
    errors: int = 0
    shadow_sampled: int = 0
    shadow_agreed: int = 0
    runtime: str = ""
    confidence_sum: float = 0.0
    generations: int = 0
    generation_errors: int = 0
    generated_tokens: int = 0
    generation_seconds: float = 0.0
    drafted: int = 0
    accepted: int = 0
    escalations: int = 0
    ttft: LogHistogram | None = None
    ms_per_token: LogHistogram | None = None


# Event tuples (cheap to build on the hot path):
#   ("req", model, version, runtime, path, outcome, local_ms, cloud_ms, confidence,
#    fallback, cached)
#   ("shadow", model, version, sampled, agreed)
#   ("gen", model, version, finished, tokens, seconds, drafted, accepted, escalated, ttft_ms)
# `confidence` is a float, None, or a zero-argument callable evaluated on the drain thread.
Event = tuple[Any, ...]


class TelemetryRecorder:
    def __init__(self, config: TelemetryConfig) -> None:
        self.config = config
        self._events: collections.deque[Event] = collections.deque(maxlen=config.max_pending_events)
        self.record_event = self._events.append  # the whole hot path
        self._aggregates: dict[tuple[str, int], _Aggregate] = {}
        self._interval_start_ms = _now_ms()
        self._lock = threading.Lock()  # drain/flush only; never taken by record
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.written: list[Path] = []
        self.summaries: collections.deque[Any] = collections.deque(maxlen=64)  # recent, in memory
        self.failures = 0
        self.on_summary: Callable[[Any], None] | None = None

    def record(
        self,
        model: str,
        version: int,
        runtime: str,
        path: str,
        outcome: str,
        local_ms: float | None,
        cloud_ms: float | None,
        confidence: Any,
        fallback: bool,
        cached: bool,
    ) -> None:
        self._events.append(
            (
                "req",
                model,
                version,
                runtime,
                path,
                outcome,
                local_ms,
                cloud_ms,
                confidence,
                fallback,
                cached,
            )
        )

    def record_shadow(self, model: str, version: int, sampled: int, agreed: int) -> None:
        self._events.append(("shadow", model, version, sampled, agreed))

    def record_generation(
        self,
        model: str,
        version: int,
        *,
        finished: bool,
        tokens: int = 0,
        seconds: float = 0.0,
        drafted: int = 0,
        accepted: int = 0,
        escalated: bool = False,
        ttft_ms: float | None = None,
    ) -> None:
        """One generation that ended: `finished` when its result was built; one that raised
        or was abandoned counts as a generation error only (its partial figures would skew
        tokens/s and the rates)."""
        self._events.append(
            ("gen", model, version, finished, tokens, seconds, drafted, accepted, escalated,
             ttft_ms)
        )  # fmt: skip

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="tandem-telemetry", daemon=True)
            self._thread.start()

    def _aggregate(self, model: str, version: int) -> _Aggregate:
        key = (model, version)
        agg = self._aggregates.get(key)
        if agg is None:
            c = self.config
            agg = self._aggregates[key] = _Aggregate(
                model,
                version,
                self._interval_start_ms,
                LogHistogram(c.latency_min_ms, c.latency_growth, c.latency_buckets),
                LogHistogram(c.latency_min_ms, c.latency_growth, c.latency_buckets),
                [0] * c.confidence_buckets,
            )
        return agg

    def drain(self) -> int:
        """Moves pending events into the interval's aggregates; returns how many."""
        n = 0
        pop = self._events.popleft
        with self._lock:
            while True:
                try:
                    event = pop()
                except IndexError:
                    break
                n += 1
                try:
                    self._apply(event)
                except Exception:
                    self.failures += 1
                    log.exception("telemetry event dropped")
        return n

    def _apply(self, event: Event) -> None:
        if event[0] == "shadow":
            _, model, version, sampled, agreed = event
            agg = self._aggregate(model, version)
            agg.shadow_sampled += sampled
            agg.shadow_agreed += agreed
            return
        if event[0] == "gen":
            self._apply_generation(event)
            return
        _, model, version, runtime, path, outcome, local_ms, cloud_ms, conf, fallback, cached = (
            event
        )
        agg = self._aggregate(model, version)
        agg.requests += 1
        agg.counts[f"{path}/{outcome}"] += 1
        if runtime:
            agg.runtime = runtime
        if outcome not in ("ok", "hit"):
            agg.errors += 1
        if fallback:
            agg.fallbacks += 1
        if cached:
            agg.cache_hits += 1
        if local_ms is not None:
            agg.latency_local.add(local_ms)
        if cloud_ms is not None:
            agg.latency_cloud.add(cloud_ms)
        if callable(conf):
            conf = conf()
        if conf is not None:
            buckets = agg.confidence
            buckets[min(int(conf * len(buckets)), len(buckets) - 1)] += 1
            agg.confidence_sum += conf

    def _apply_generation(self, event: Event) -> None:
        _, model, version, finished, tokens, seconds, drafted, accepted, escalated, ttft = event
        agg = self._aggregate(model, version)
        if not finished:
            agg.generation_errors += 1
            return
        agg.generations += 1
        agg.generated_tokens += int(tokens)
        agg.generation_seconds += float(seconds)
        agg.drafted += int(drafted)
        agg.accepted += int(accepted)
        agg.escalations += 1 if escalated else 0
        c = self.config
        if ttft is not None:
            if agg.ttft is None:
                agg.ttft = LogHistogram(c.latency_min_ms, c.latency_growth, c.latency_buckets)
            agg.ttft.add(ttft)
        if tokens > 0 and seconds > 0:
            if agg.ms_per_token is None:
                agg.ms_per_token = LogHistogram(
                    c.latency_min_ms, c.latency_growth, c.latency_buckets
                )
            agg.ms_per_token.add(1000.0 * float(seconds) / int(tokens))

    def flush(self) -> list[Any]:
        """Ends the interval: drains, builds summaries, spools them. Returns the summaries."""
        self.drain()
        with self._lock:
            end_ms = _now_ms()
            aggregates, self._aggregates = self._aggregates, {}
            self._interval_start_ms = end_ms
        summaries = [self._summary(agg, end_ms) for agg in aggregates.values()]
        for summary in summaries:
            self.summaries.append(summary)
            try:
                self._spool(summary)
            except Exception:
                self.failures += 1
                log.exception("cannot spool telemetry summary %s", summary.summary_id)
            if self.on_summary is not None:
                try:
                    self.on_summary(summary)
                except Exception:
                    log.exception("telemetry callback failed")
        return summaries

    def _summary(self, agg: _Aggregate, end_ms: int) -> Any:
        return fleet_pb2.TelemetrySummary(
            summary_id=uuid.uuid4().hex,
            device_id=self.config.device_id,
            model=agg.model,
            version=max(agg.version, 0),
            interval_start_ms=agg.start_ms,
            interval_end_ms=end_ms,
            counts=dict(agg.counts),
            latency_local_ms=agg.latency_local.to_proto(),
            latency_cloud_ms=agg.latency_cloud.to_proto(),
            confidence_buckets=agg.confidence,
            confidence_sum=agg.confidence_sum,
            requests=agg.requests,
            fallbacks=agg.fallbacks,
            cache_hits=agg.cache_hits,
            errors=agg.errors,
            shadow_sampled=agg.shadow_sampled,
            shadow_agreed=agg.shadow_agreed,
            runtime=agg.runtime,
            generations=agg.generations,
            generation_errors=agg.generation_errors,
            generated_tokens=agg.generated_tokens,
            generation_seconds=agg.generation_seconds,
            drafted=agg.drafted,
            accepted=agg.accepted,
            escalations=agg.escalations,
            ttft_ms=agg.ttft.to_proto() if agg.ttft is not None else None,
            ms_per_token=agg.ms_per_token.to_proto() if agg.ms_per_token is not None else None,
        )

    def _spool(self, summary: Any) -> None:
        folder = self.config.spool_dir
        if folder is None:
            return
        import zstandard

        folder.mkdir(parents=True, exist_ok=True)
        data = zstandard.ZstdCompressor(level=3).compress(
            fleet_pb2.TelemetryBatch(summaries=[summary]).SerializeToString()
        )
        name = f"{summary.interval_end_ms:013d}-{summary.summary_id}{SPOOL_SUFFIX}"
        # Readable by the agent, which may run as another user than the application.
        write_atomic(folder / name, data, mode=PUBLIC)
        self.written.append(folder / name)
        self._trim_spool(folder)

    def _trim_spool(self, folder: Path) -> None:
        files = sorted(p for p in folder.iterdir() if p.name.endswith(SPOOL_SUFFIX))
        for old in files[: max(0, len(files) - self.config.max_spool_files)]:
            log.warning("telemetry spool full: dropping %s", old.name)
            old.unlink(missing_ok=True)

    def _loop(self) -> None:
        next_flush = time.monotonic() + self.config.interval_s
        while not self._stop.wait(self.config.drain_interval_s):
            try:
                self.drain()
                if time.monotonic() >= next_flush:
                    next_flush += self.config.interval_s
                    self.flush()
            except Exception:
                self.failures += 1
                log.exception("telemetry loop failed")

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        try:
            self.flush()
        except Exception:
            log.exception("final telemetry flush failed")


def read_spool_file(path: Path) -> list[Any]:
    """The summaries in one spool file (what the agent ships)."""
    import zstandard

    batch = fleet_pb2.TelemetryBatch()
    batch.ParseFromString(zstandard.ZstdDecompressor().decompress(path.read_bytes()))
    return list(batch.summaries)


def _now_ms() -> int:
    return int(time.time() * 1000)
