"""Shadow sampling: a fraction of local answers is also asked of the cloud, in the background.

The agreement rate (same top class for classifiers; cosine similarity above a threshold for
embeddings) measures field accuracy without labels. The queue is bounded and `offer` never
blocks: when the worker falls behind, samples are dropped (and counted).
"""

from __future__ import annotations

import logging
import queue
import random
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from tandem.errors import ConfigError, TandemError
from tandem.sdk.signature import Arrays, Signature

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShadowConfig:
    fraction: float = 0.0  # share of local answers also sent to the cloud (0..1)
    queue_size: int = 64  # samples waiting for the worker before new ones are dropped
    cosine_threshold: float = 0.95  # embeddings agree at or above this cosine similarity
    timeout_ms: float | None = None  # deadline of a shadow call; None = the cloud config's

    def __post_init__(self) -> None:
        if not 0.0 <= self.fraction <= 1.0:
            raise ConfigError("fraction", f"must be in [0, 1], got {self.fraction}")
        if self.queue_size < 1:
            raise ConfigError("queue_size", f"must be >= 1, got {self.queue_size}")
        if not -1.0 <= self.cosine_threshold <= 1.0:
            raise ConfigError("cosine_threshold", "must be in [-1, 1]")


def agreement(
    signature: Signature,
    local: Mapping[str, Any],
    cloud: Mapping[str, Any],
    cosine_threshold: float,
) -> tuple[int, int]:
    """(rows compared, rows that agree) between a local and a cloud answer."""
    name = signature.outputs[0].name
    a, b = local.get(name), cloud.get(name)
    if a is None or b is None or a.shape != b.shape:
        rows = int(a.shape[0]) if a is not None and a.ndim else 1
        return rows, 0
    a2 = a.reshape(a.shape[0], -1).astype(np.float64) if a.ndim else a.reshape(1, 1)
    b2 = b.reshape(b.shape[0], -1).astype(np.float64) if b.ndim else b.reshape(1, 1)
    if signature.task == "classification":
        same = np.argmax(a2, axis=1) == np.argmax(b2, axis=1)
    else:
        norms = np.linalg.norm(a2, axis=1) * np.linalg.norm(b2, axis=1)
        cosine = (a2 * b2).sum(axis=1) / np.maximum(norms, 1e-12)
        same = cosine >= cosine_threshold
    return int(same.size), int(same.sum())


class ShadowSampler:
    def __init__(
        self,
        config: ShadowConfig,
        call_cloud: Callable[[Arrays, float | None], Arrays],
        record: Callable[[str, int, int, int], None],
    ) -> None:
        self.config = config
        self._call_cloud = call_cloud
        self._record = record
        self._queue: queue.Queue[tuple[Any, ...] | None] = queue.Queue(config.queue_size)
        self._random = random.random
        self.offered = 0
        self.dropped = 0
        self.failed = 0
        self.sampled = 0
        self.agreed = 0
        self._thread = threading.Thread(target=self._work, name="tandem-shadow", daemon=True)
        self._thread.start()

    def offer(
        self,
        model: str,
        version: int,
        signature: Signature,
        feeds: Arrays,
        outputs: Mapping[str, Any],
    ) -> None:
        if self._random() >= self.config.fraction:
            return
        self.offered += 1
        try:
            self._queue.put_nowait((model, version, signature, feeds, outputs))
        except queue.Full:
            self.dropped += 1

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                model, version, signature, feeds, outputs = item
                try:
                    cloud = self._call_cloud(feeds, self.config.timeout_ms)
                except TandemError as exc:
                    self.failed += 1
                    log.debug("shadow call failed: %s", exc)
                    continue
                rows, agreed = agreement(signature, outputs, cloud, self.config.cosine_threshold)
                self.sampled += rows
                self.agreed += agreed
                self._record(model, version, rows, agreed)
            except Exception:
                log.exception("shadow sample failed")
            finally:
                self._queue.task_done()

    def join(self) -> None:
        """Waits until every queued sample is done (tests, flush)."""
        self._queue.join()

    def close(self) -> None:
        try:
            self._queue.put(None, timeout=1)
        except queue.Full:
            log.warning("shadow queue still full at close; worker left to finish")
            return
        self._thread.join(timeout=5)
