"""The router: the two paths a policy's plan chooses between, and what it learns meanwhile.

`Router` runs one path (`run` / `arun`: the local model, or the cloud client) and answers the
plans' questions (`Facts`: is there a cloud, the cascade threshold, the learned hedge delay).
It is the client's private part: the policies' drivers call it, applications do not.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable

import numpy as np

from tandem.errors import ConfigError, NoLocalModelError
from tandem.sdk.cloud import CloudAnswer, CloudClient
from tandem.sdk.local import LocalModel, LocalModels
from tandem.sdk.policies import Cascade, Deadline, Policy, derive_threshold
from tandem.sdk.result import Result
from tandem.sdk.signature import Arrays, Signature

log = logging.getLogger(__name__)

_perf = time.perf_counter


class LatencyWindow:
    """The last `size` latencies of one path, and a percentile of them (recomputed lazily)."""

    def __init__(self, size: int = 256) -> None:
        self._values: collections.deque[float] = collections.deque(maxlen=size)
        self._sorted: list[float] | None = None

    def add(self, value_ms: float) -> None:
        self._values.append(value_ms)
        self._sorted = None

    def __len__(self) -> int:
        return len(self._values)

    def percentile(self, q: float) -> float | None:
        values = self._sorted
        if values is None:
            values = self._sorted = sorted(self._values)
        if not values:
            return None
        return values[min(len(values) - 1, int(q * len(values)))]


class Router:
    """Implements `policies.Legs` for one client."""

    def __init__(
        self,
        model: str,
        policy: Policy,
        local_models: LocalModels | None,
        cloud: CloudClient | None,
        cloud_signature: Callable[[], Signature | None],
    ) -> None:
        self.model = model
        self.local_models = local_models
        self.cloud = cloud
        self._cloud_signature = cloud_signature
        self._lock = threading.Lock()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._thresholds: dict[tuple[int, float], float] = {}
        window = policy.window if isinstance(policy, Deadline) else 256
        self.latency = {"local": LatencyWindow(window), "cloud": LatencyWindow(window)}
        # Only the deadline policy learns from latencies; others skip the bookkeeping.
        self._track_latency = isinstance(policy, Deadline)

    @property
    def has_cloud(self) -> bool:
        return self.cloud is not None

    def run(
        self, path: str, feeds: Arrays, model: LocalModel | None, timeout_ms: float | None
    ) -> Result:
        if path == "local":
            return self.local(feeds, model)
        return self._cloud_result(self._require_cloud().infer(feeds, timeout_ms=timeout_ms))

    async def arun(
        self, path: str, feeds: Arrays, model: LocalModel | None, timeout_ms: float | None
    ) -> Result:
        if path == "local":
            return await asyncio.to_thread(self.local, feeds, model)
        answer = await self._require_cloud().ainfer(feeds, timeout_ms=timeout_ms)
        return self._cloud_result(answer)

    def local(self, feeds: Arrays, model: LocalModel | None) -> Result:
        if model is None:
            if self.local_models is None:
                raise NoLocalModelError(f"no local model store configured for {self.model!r}")
            model = self.local_models.require()
        start = _perf()
        outputs = model.run(feeds)
        elapsed = (_perf() - start) * 1e3
        if self._track_latency:
            self.latency["local"].add(elapsed)
        return Result(outputs, "local", model.runtime_name, model.version, model.signature, elapsed)

    def _require_cloud(self) -> CloudClient:
        if self.cloud is None:
            raise ConfigError("cloud", "this client has no cloud endpoint")
        return self.cloud

    def _cloud_result(self, answer: CloudAnswer) -> Result:
        if self._track_latency:
            self.latency["cloud"].add(answer.elapsed_ms)
        current = self.local_models.current if self.local_models is not None else None
        signature = current.signature if current is not None else self._cloud_signature()
        version: int | str = (
            int(answer.model_version) if answer.model_version.isdigit() else answer.model_version
        )
        return Result(
            answer.outputs,
            "cloud",
            "cloud",
            version,
            signature,
            cloud_ms=answer.elapsed_ms,
            endpoint=answer.endpoint,
        )

    def cascade_threshold(self, policy: Cascade, model: LocalModel) -> float:
        assert policy.max_accuracy_loss is not None
        key = (model.version, policy.max_accuracy_loss)
        threshold = self._thresholds.get(key)
        if threshold is None:
            inputs, labels = model.validation()
            feeds = model.signature.prepare(inputs)
            outputs = model.run(feeds)
            logits = outputs[model.signature.logits_name or model.signature.outputs[0].name]
            confidences = model.signature.confidences(outputs)
            if confidences is None:
                raise ConfigError("max_accuracy_loss", "needs a classifier with logits")
            correct = np.argmax(logits, axis=1) == labels.reshape(-1)
            threshold = derive_threshold(confidences, correct, policy.max_accuracy_loss)
            self._thresholds[key] = threshold
            log.info(
                "cascade threshold for %s v%s at max accuracy loss %.4f: %.4f (local share %.3f)",
                model.model,
                model.version,
                policy.max_accuracy_loss,
                threshold,
                float((confidences >= threshold).mean()),
            )
        return threshold

    def hedge_delay_ms(self, path: str, policy: Deadline) -> float:
        window = self.latency[path]
        cap = policy.budget_ms * policy.max_hedge_fraction
        if len(window) < policy.min_samples:
            return cap
        learned = window.percentile(policy.hedge_percentile) or cap
        return min(max(learned, policy.min_hedge_ms), cap)

    def expected_ms(self, path: str) -> float | None:
        return self.latency[path].percentile(0.5)

    def executor(self) -> concurrent.futures.Executor:
        if self._executor is None:
            with self._lock:
                if self._executor is None:
                    self._executor = concurrent.futures.ThreadPoolExecutor(
                        max_workers=8, thread_name_prefix="tandem-hedge"
                    )
        return self._executor

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
