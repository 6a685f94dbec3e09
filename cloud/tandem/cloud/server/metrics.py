"""Prometheus metrics of the inference server, in a registry of its own.

Label children are resolved once per model version (`VersionMetrics`), so the request path
pays for an increment, not for a label lookup.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
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
