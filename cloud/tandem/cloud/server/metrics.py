"""Prometheus metrics of the inference server, in a registry of its own.

Label children are resolved once per model version (`VersionMetrics`), so the request path
pays for an increment, not for a label lookup.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
# Per-token latencies: from ~1 ms (a tiny model, a GPU) to seconds (a big batch on a CPU).
_TOKEN_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


@dataclass(frozen=True)
class VersionMetrics:
    """The metric children of one model version."""

    success: Any
    queue_duration: Any
    compute_duration: Any
    batch_size: Any
    queue_depth: Any
    expired: Any
    _failure: Any
    _model: str
    _version: str

    def failure(self, reason: str) -> None:
        self._failure.labels(self._model, self._version, reason).inc()


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ("model", "version")
        self.success = Counter(
            "tandem_inference_request_success",
            "Inference requests answered.",
            labels,
            registry=self.registry,
        )
        self.failure = Counter(
            "tandem_inference_request_failure",
            "Inference requests that failed, by reason (the gRPC status name).",
            (*labels, "reason"),
            registry=self.registry,
        )
        self.queue_duration = Histogram(
            "tandem_inference_queue_duration_seconds",
            "Time from arrival until the request's batch starts computing.",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.compute_duration = Histogram(
            "tandem_inference_compute_duration_seconds",
            "Time one batch spends in the runtime.",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "tandem_inference_batch_size",
            "Rows per executed batch.",
            labels,
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "tandem_inference_queue_depth",
            "Requests waiting in the model version's queue.",
            labels,
            registry=self.registry,
        )
        self.expired = Counter(
            "tandem_inference_request_expired",
            "Requests dropped from the queue without computing (timeout or cancelled).",
            labels,
            registry=self.registry,
        )
        self.inflight = Gauge(
            "tandem_inference_inflight_requests",
            "Inference requests being handled now.",
            registry=self.registry,
        )
        self.model_ready = Gauge(
            "tandem_model_ready",
            "1 when the model version serves requests.",
            labels,
            registry=self.registry,
        )
        gpu = _GpuCollector.create()
        if gpu is not None:
            self.registry.register(gpu)
        self._generation: GenerationMetrics | None = None

    def for_generation(self) -> GenerationMetrics:
        """The generation metrics, registered on first use: a tensor-only server has none."""
        if self._generation is None:
            self._generation = GenerationMetrics(self.registry)
        return self._generation

    def for_version(self, model: str, version: int) -> VersionMetrics:
        v = str(version)
        return VersionMetrics(
            success=self.success.labels(model, v),
            queue_duration=self.queue_duration.labels(model, v),
            compute_duration=self.compute_duration.labels(model, v),
            batch_size=self.batch_size.labels(model, v),
            queue_depth=self.queue_depth.labels(model, v),
            expired=self.expired.labels(model, v),
            _failure=self.failure,
            _model=model,
            _version=v,
        )

    def failure_unversioned(self, model: str, reason: str) -> None:
        """A failure before a version was resolved (unknown model or version)."""
        self.failure.labels(model, "", reason).inc()

    def serve(self, host: str, port: int) -> Any:
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server


@dataclass(frozen=True)
class StreamMetrics:
    """The metric children of one generative model and endpoint kind."""

    tokens: Any
    prompt_tokens: Any
    time_to_first_token: Any
    inter_token: Any
    _parent: GenerationMetrics
    _model: str
    _kind: str

    def finished(self, reason: str) -> None:
        self._parent.finished.labels(self._model, self._kind, reason).inc()


class GenerationMetrics:
    """Metrics of the generative models (docs/generation.md). `kind` is the endpoint: stream
    (gRPC ModelStreamInfer), generate (HTTP V2 generate and generate_stream), openai
    (/v1/chat/completions, /v1/completions) or verify (speculative decoding)."""

    KINDS = ("stream", "generate", "openai", "verify")

    def __init__(self, registry: CollectorRegistry) -> None:
        by_kind = ("model", "kind")
        self.tokens = Counter(
            "tandem_generation_tokens",
            "Tokens generated; for verify, the accepted drafted tokens plus the next token.",
            by_kind,
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "tandem_generation_prompt_tokens",
            "Prompt tokens of the sequences admitted (and of the verify sessions started).",
            by_kind,
            registry=registry,
        )
        self.time_to_first_token = Histogram(
            "tandem_generation_time_to_first_token_seconds",
            "Time from admitting a sequence until its first token is handed to the client.",
            by_kind,
            buckets=_TOKEN_BUCKETS,
            registry=registry,
        )
        self.inter_token = Histogram(
            "tandem_generation_inter_token_latency_seconds",
            "Time between two consecutive tokens of one sequence.",
            by_kind,
            buckets=_TOKEN_BUCKETS,
            registry=registry,
        )
        self.finished = Counter(
            "tandem_generation_sequences_finished",
            "Generated sequences that ended, by reason: stop (a stop token), length "
            "(max_tokens), cancelled (the client went away), shutdown, error.",
            (*by_kind, "reason"),
            registry=registry,
        )
        self.rejected = Counter(
            "tandem_generation_requests_rejected",
            "Generation and verify requests refused, by reason (the gRPC status name: "
            "RESOURCE_EXHAUSTED is HTTP 429).",
            (*by_kind, "reason"),
            registry=registry,
        )
        self.verify_calls = Counter(
            "tandem_generation_verify_calls",
            "Verify calls answered.",
            ("model",),
            registry=registry,
        )
        self.drafted = Counter(
            "tandem_generation_drafted_tokens",
            "Drafted tokens sent to the verify call.",
            ("model",),
            registry=registry,
        )
        self.accepted = Counter(
            "tandem_generation_accepted_tokens",
            "Drafted tokens the verify call accepted.",
            ("model",),
            registry=registry,
        )
        self._engines: dict[str, Callable[[], dict[str, int]]] = {}
        registry.register(_EngineCollector(self._engines))

    def for_stream(self, model: str, kind: str) -> StreamMetrics:
        return StreamMetrics(
            tokens=self.tokens.labels(model, kind),
            prompt_tokens=self.prompt_tokens.labels(model, kind),
            time_to_first_token=self.time_to_first_token.labels(model, kind),
            inter_token=self.inter_token.labels(model, kind),
            _parent=self,
            _model=model,
            _kind=kind,
        )

    def watch(self, model: str, stats: Callable[[], dict[str, int]]) -> None:
        """Exports the engine's live figures (`Engine.stats()`), read at scrape time."""
        self._engines[model] = stats


class _EngineCollector(Collector):
    """The generation engines' live state, read when scraped: nothing on the token path."""

    GAUGES = (
        ("active_sequences", "tandem_generation_active_sequences", "Sequences being decoded."),
        (
            "waiting_sequences",
            "tandem_generation_queued_sequences",
            "Sequences admitted, waiting for their prefill.",
        ),
        ("verify_sessions", "tandem_generation_verify_sessions", "Verify sessions alive."),
        (
            "reserved_tokens",
            "tandem_generation_reserved_tokens",
            "Tokens reserved against max_total_tokens.",
        ),
    )
    COUNTERS = (
        ("decode_steps", "tandem_generation_decode_steps", "Batched decode iterations run."),
        (
            "decode_rows",
            "tandem_generation_decode_rows",
            "Sequence-rows over those iterations (rows / steps: the mean batch).",
        ),
    )

    def __init__(self, engines: dict[str, Callable[[], dict[str, int]]]) -> None:
        self._engines = engines

    def describe(self) -> Iterator[Any]:
        return iter(())  # nothing to describe until scraped: the families depend on the engines

    def collect(self) -> Iterator[Any]:
        families: list[tuple[str, GaugeMetricFamily | CounterMetricFamily]] = [
            (key, GaugeMetricFamily(n, h, labels=["model"])) for key, n, h in self.GAUGES
        ]
        families += [
            (key, CounterMetricFamily(n, h, labels=["model"])) for key, n, h in self.COUNTERS
        ]
        for model, stats in list(self._engines.items()):
            try:
                figures = stats()
            except Exception:
                log.warning("cannot read the generation engine of %s", model, exc_info=True)
                continue
            for key, family in families:
                family.add_metric([model], float(figures.get(key, 0)))
        for _, family in families:
            yield family


class _GpuCollector(Collector):
    """GPU utilisation and memory through NVML, exported only where a GPU is present."""

    def __init__(self, nvml: Any, handles: list[Any]) -> None:
        self._nvml = nvml
        self._handles = handles

    @classmethod
    def create(cls) -> _GpuCollector | None:
        try:
            import pynvml  # type: ignore[import-not-found]

            pynvml.nvmlInit()
            count = pynvml.nvmlDeviceGetCount()
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        except Exception:  # noqa: BLE001 - no NVML library, no driver or no GPU: no metrics
            return None
        if not handles:
            return None
        log.info("exporting metrics of %d GPU(s)", len(handles))
        return cls(pynvml, handles)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        util = GaugeMetricFamily(
            "tandem_gpu_utilization_ratio", "GPU busy fraction.", labels=["gpu"]
        )
        used = GaugeMetricFamily(
            "tandem_gpu_memory_used_bytes", "GPU memory in use.", labels=["gpu"]
        )
        total = GaugeMetricFamily(
            "tandem_gpu_memory_total_bytes", "GPU memory in all.", labels=["gpu"]
        )
        for i, handle in enumerate(self._handles):
            try:
                rates = self._nvml.nvmlDeviceGetUtilizationRates(handle)
                memory = self._nvml.nvmlDeviceGetMemoryInfo(handle)
            except Exception:
                log.warning("cannot read GPU %d through NVML", i, exc_info=True)
                continue
            util.add_metric([str(i)], rates.gpu / 100.0)
            used.add_metric([str(i)], float(memory.used))
            total.add_metric([str(i)], float(memory.total))
        yield util
        yield used
        yield total
