"""The dynamic batcher of one model version.

Requests queue in arrival order (bounded: past `max_queue_size`, `QueueFullError` at once).
One worker per model instance; one worker at a time forms a batch while the others compute:

- it takes requests front to back while their rows fit in `max_batch_size`;
- it runs at once when the batch is full or its size is a preferred batch size, and otherwise
  waits for more requests until the oldest has waited `max_queue_delay_us`;
- requests whose timeout passed, or whose caller went away, are dropped, never computed.

The batch's inputs are concatenated along the first dimension, run on the instance's own
thread, and each caller gets exactly its own rows of every output back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from .backends import Backend
from .config import ModelConfig
from .errors import BackendError, ModelUnavailableError, QueueFullError, RequestTimeoutError
from .metrics import VersionMetrics

log = logging.getLogger(__name__)

Outputs = dict[str, np.ndarray[Any, Any]]


@dataclass(slots=True)
class _Pending:
    inputs: Mapping[str, np.ndarray[Any, Any]]
    rows: int
    future: asyncio.Future[Outputs]
    enqueued: float  # time.monotonic() at arrival
    deadline: float | None  # time.monotonic() past which it must not be computed
    shape_key: tuple[tuple[int, ...], ...] | None  # non-batch dims, when some are variable


class Batcher:
    def __init__(
        self, config: ModelConfig, instances: list[Backend], metrics: VersionMetrics
    ) -> None:
        self.config = config
        self._instances = instances
        self._metrics = metrics
        self._queue: deque[_Pending] = deque()
        self._limit = config.queue_limit
        batching = config.dynamic_batching
        self._batching = batching is not None
        self._max_rows = config.max_batch_size if batching is not None else 0
        self._delay = batching.max_queue_delay_us / 1e6 if batching is not None else 0.0
        self._preferred = frozenset(batching.preferred_batch_sizes if batching else ())
        # Requests only share a batch when their tensors can be stacked: with a variable
        # non-batch dimension (e.g. sequence length) only requests of equal shapes batch.
        self._variable = any(-1 in t.dims for t in config.inputs)
        self._queued_rows = 0  # rows of everything in the queue
        # The forming worker sleeps on `_waiter`; an arrival wakes it only once the queue
        # holds `_wake_at` rows (the next preferred size, or a full batch), so a batch of 64
        # costs one wake-up, not 64.
        self._waiter: asyncio.Future[None] | None = None
        self._wake_at = 1
        self._forming = asyncio.Lock()
        self._closing = False
        self._executors = [
            ThreadPoolExecutor(1, thread_name_prefix=f"{config.name}-{i}")
            for i in range(len(instances))
        ]
        self._workers = [
            asyncio.create_task(self._work(backend, executor), name=f"batcher-{config.name}-{i}")
            for i, (backend, executor) in enumerate(zip(instances, self._executors, strict=True))
        ]

    @property
    def queued(self) -> int:
        return len(self._queue)

    def submit(
        self, inputs: Mapping[str, np.ndarray[Any, Any]], rows: int, timeout_s: float | None
    ) -> asyncio.Future[Outputs]:
        """Queues a request; the future resolves to its outputs. Raises when it cannot queue."""
        if self._closing:
            raise ModelUnavailableError(f"model {self.config.name!r} is not accepting requests")
        if len(self._queue) >= self._limit:
            raise QueueFullError(
                f"model {self.config.name!r}: queue full ({self._limit} requests waiting)"
            )
        now = time.monotonic()
        future: asyncio.Future[Outputs] = asyncio.get_running_loop().create_future()
        deadline = now + timeout_s if timeout_s is not None else None
        shape_key = (
            tuple(inputs[t.name].shape[1:] for t in self.config.inputs) if self._variable else None
        )
        self._queue.append(_Pending(inputs, rows, future, now, deadline, shape_key))
        self._queued_rows += rows
        self._metrics.queue_depth.set(len(self._queue))
        if self._waiter is not None and self._queued_rows >= self._wake_at:
            self._wake()
        return future

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _sleep(self, wake_at_rows: int, timeout_s: float | None) -> None:
        """Sleeps until the queue holds `wake_at_rows` rows, `timeout_s` passes, or close."""
        loop = asyncio.get_running_loop()
        self._waiter = waiter = loop.create_future()
        self._wake_at = wake_at_rows
        timer = loop.call_later(timeout_s, self._wake) if timeout_s is not None else None
        try:
            await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    async def close(self) -> None:
        """Stops accepting, computes what is queued, then frees the instances."""
        self._closing = True
        self._wake()
        await asyncio.gather(*self._workers, return_exceptions=True)
        for executor in self._executors:
            executor.shutdown(wait=True)
        for backend in self._instances:
            backend.close()

    async def _work(self, backend: Backend, executor: ThreadPoolExecutor) -> None:
        while True:
            async with self._forming:
                batch = await self._next_batch()
            if batch is None:
                return
            await self._execute(batch, backend, executor)

    async def _next_batch(self) -> list[_Pending] | None:
        """Waits for and removes the next batch; None once closing with an empty queue."""
        while True:
            self._drop_dead()
            if not self._queue:
                if self._closing:
                    return None
                await self._sleep(1, None)
                continue
            if not self._batching:
                return self._take(1)
            count, rows, full = self._formable()
            best = count
            if not full and rows not in self._preferred and self._preferred:
                # The largest preferred size that a prefix of the queue makes, if any.
                best = self._largest_preferred_prefix(count)
            ready_at = self._queue[0].enqueued + self._delay
            now = time.monotonic()
            if full or rows in self._preferred or (best < count and best > 0):
                return self._take(best if best > 0 else count)
            if now >= ready_at or self._closing:
                return self._take(count)
            if self._variable:
                wake_at = self._queued_rows + 1  # any arrival may change what can batch
            else:
                wake_at = min([p for p in self._preferred if p > rows] + [self._max_rows])
            await self._sleep(max(wake_at, self._queued_rows + 1), ready_at - now)

    def _formable(self) -> tuple[int, int, bool]:
        """(requests, rows, full): the longest queue prefix whose rows fit in one batch."""
        rows = 0
        count = 0
        key = self._queue[0].shape_key
        for pending in self._queue:
            if pending.shape_key != key:
                return count, rows, True  # the next one cannot join this batch: run it
            if rows + pending.rows > self._max_rows:
                return count, rows, True
            rows += pending.rows
            count += 1
            if rows == self._max_rows:
                return count, rows, True
        return count, rows, False

    def _largest_preferred_prefix(self, count: int) -> int:
        rows = 0
        best = 0
        for i in range(count):
            rows += self._queue[i].rows
            if rows in self._preferred:
                best = i + 1
        return best

    def _take(self, count: int) -> list[_Pending]:
        batch = [self._queue.popleft() for _ in range(count)]
        self._queued_rows -= sum(p.rows for p in batch)
        self._metrics.queue_depth.set(len(self._queue))
        return batch

    def _drop_dead(self) -> None:
        """Removes requests at the front that expired or whose caller went away."""
        now = time.monotonic()
        queue = self._queue
        dropped = 0
        while queue:
            head = queue[0]
            if head.future.done():
                queue.popleft()
                self._queued_rows -= head.rows
                dropped += 1
            elif head.deadline is not None and now >= head.deadline:
                queue.popleft()
                self._queued_rows -= head.rows
                head.future.set_exception(
                    RequestTimeoutError(f"model {self.config.name!r}: request timed out in queue")
                )
                dropped += 1
            else:
                break
        if dropped:
            self._metrics.expired.inc(dropped)
            self._metrics.queue_depth.set(len(queue))

    async def _execute(
        self, batch: list[_Pending], backend: Backend, executor: ThreadPoolExecutor
    ) -> None:
        # Drop the ones that expired while the batch was forming.
        now = time.monotonic()
        live = []
        for pending in batch:
            if pending.future.done():
                self._metrics.expired.inc()
            elif pending.deadline is not None and now >= pending.deadline:
                self._metrics.expired.inc()
                pending.future.set_exception(
                    RequestTimeoutError(f"model {self.config.name!r}: request timed out in queue")
                )
            else:
                live.append(pending)
                self._metrics.queue_duration.observe(now - pending.enqueued)
        if not live:
            return
        if len(live) == 1:
            inputs = live[0].inputs
        else:
            inputs = {
                t.name: np.concatenate([p.inputs[t.name] for p in live]) for t in self.config.inputs
            }
        total = sum(p.rows for p in live)
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            outputs = await loop.run_in_executor(executor, backend.run, inputs)
        except BackendError as exc:
            log.error("batch of %d rows failed: %s", total, exc)
            for pending in live:
                if not pending.future.done():
                    pending.future.set_exception(exc)
            return
        except Exception as exc:
            log.exception("batch of %d rows failed", total)
            error = BackendError(f"model {self.config.name!r}: {exc}")
            for pending in live:
                if not pending.future.done():
                    pending.future.set_exception(error)
            return
        self._metrics.compute_duration.observe(time.perf_counter() - started)
        self._metrics.batch_size.observe(total)
        if len(live) == 1:
            if not live[0].future.done():
                live[0].future.set_result(outputs)
            return
        for name, value in outputs.items():
            if value.ndim == 0 or value.shape[0] != total:
                error = BackendError(
                    f"model {self.config.name!r}: output {name!r} has shape {value.shape}, "
                    f"expected {total} rows"
                )
                for pending in live:
                    if not pending.future.done():
                        pending.future.set_exception(error)
                return
        offset = 0
        for pending in live:
            end = offset + pending.rows
            if not pending.future.done():
                pending.future.set_result({n: v[offset:end] for n, v in outputs.items()})
            offset = end
