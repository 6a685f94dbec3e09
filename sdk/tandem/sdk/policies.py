"""Routing policies: which path answers a request. Names are part of the API.

A policy is an immutable value holding its settings (urllib3 `Retry` style: `replace(...)`
gives a changed copy). Its `infer` / `ainfer` decide between the two paths the client offers
through the small `Router` protocol; everything that changes while the client runs (learned
latencies, derived thresholds) lives in the client, not in the policy.

    local_only    the local model, never the cloud
    cloud_only    the cloud, never the local model
    prefer_local  local; the cloud when there is no local model or the local runtime fails
    prefer_cloud  the cloud; local when the cloud is unreachable, too slow or its breaker is open
    cascade       local when calibrated confidence >= threshold, else the cloud; the threshold
                  is given, or derived from the artifact's validation set for a target
                  accuracy loss (`max_accuracy_loss`)
    deadline      answer within `budget_ms`: start the faster path, hedge to the other after a
                  delay learned from observed latencies, take whichever answers first
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Literal, Protocol

import numpy as np

from tandem.errors import CloudError, ConfigError, NoLocalModelError, RuntimeBackendError
from tandem.sdk.errors import DeadlineExceededError
from tandem.sdk.local import LocalModel
from tandem.sdk.result import Result
from tandem.sdk.signature import Arrays

LOCAL_FAILURES = (NoLocalModelError, RuntimeBackendError)


class Router(Protocol):
    """What a policy may ask of the client."""

    @property
    def has_cloud(self) -> bool: ...

    def local(self, feeds: Arrays, model: LocalModel | None) -> Result: ...

    def remote(self, feeds: Arrays, timeout_ms: float | None = None) -> Result: ...

    async def alocal(self, feeds: Arrays, model: LocalModel | None) -> Result: ...

    async def aremote(self, feeds: Arrays, timeout_ms: float | None = None) -> Result: ...

    def cascade_threshold(self, policy: Cascade, model: LocalModel) -> float: ...

    def hedge_delay_ms(self, path: str, policy: Deadline) -> float: ...

    def expected_ms(self, path: str) -> float | None: ...

    def executor(self) -> concurrent.futures.Executor: ...


class Policy:
    name: ClassVar[str]

    def infer(self, router: Router, feeds: Arrays, model: LocalModel | None) -> Result:
        raise NotImplementedError

    async def ainfer(self, router: Router, feeds: Arrays, model: LocalModel | None) -> Result:
        raise NotImplementedError


@dataclass(frozen=True)
class LocalOnly(Policy):
    name = "local_only"

    def infer(self, router: Router, feeds: Arrays, model: LocalModel | None) -> Result:
        return router.local(feeds, model)

    async def ainfer(self, router: Router, feeds: Arrays, model: LocalModel | None) -> Result:
        return await router.alocal(feeds, model)


@dataclass(frozen=True)
class CloudOnly(Policy):
    name = "cloud_only"
    timeout_ms: float | None = None  # per-call deadline; None = the cloud config's

    def __post_init__(self) -> None:
        _check_timeout(self.timeout_ms)

    def infer(self, router: Router, feeds: Arrays, model: LocalModel | None) -> Result:
        return router.remote(feeds, self.timeout_ms)

    async def ainfer(self, router: Router, feeds: Arrays, model: LocalModel | None) -> Result:
        return await router.aremote(feeds, self.timeout_ms)


@dataclass(frozen=True)
class PreferLocal(Policy):
    name = "prefer_local"
    timeout_ms: float | None = None  # deadline of the fallback cloud call

    def __post_init__(self) -> None:
        _check_timeout(self.timeout_ms)

    def infer(self, router: Router, feeds: Arrays, model: LocalModel | None) -> Result:
        try:
            return router.local(feeds, model)
        except LOCAL_FAILURES:
            if not router.has_cloud:
                raise
        result = router.remote(feeds, self.timeout_ms)
        result.fallback = True
        return result

    async def ainfer(self, router: Router, feeds: Arrays, model: LocalModel | None) -> Result:
        try:
            return await router.alocal(feeds, model)
        except LOCAL_FAILURES:
            if not router.has_cloud:
                raise
        result = await router.aremote(feeds, self.timeout_ms)
        result.fallback = True
        return result


@dataclass(frozen=True)
class PreferCloud(Policy):
    name = "prefer_cloud"
    timeout_ms: float | None = None  # past this the cloud counts as too slow (milliseconds)

    def __post_init__(self) -> None:
        _check_timeout(self.timeout_ms)

    def infer(self, router: Router, feeds: Arrays, model: LocalModel | None) -> Result:
        if router.has_cloud:
            try:
                return router.remote(feeds, self.timeout_ms)
            except CloudError as exc:
                if model is None:
                    raise
                cloud_error = exc
        else:
            cloud_error = None
        result = router.local(feeds, model)
        result.fallback = cloud_error is not None
        return result

    async def ainfer(self, router: Router, feeds: Arrays, model: LocalModel | None) -> Result:
        if router.has_cloud:
            try:
                return await router.aremote(feeds, self.timeout_ms)
            except CloudError:
                if model is None:
                    raise
            result = await router.alocal(feeds, model)
            result.fallback = True
            return result
        return await router.alocal(feeds, model)


@dataclass(frozen=True)
class Cascade(Policy):
    name = "cascade"
    threshold: float | None = None  # answer locally when confidence >= this
    max_accuracy_loss: float | None = None  # or: derive the threshold for this loss (0..1)
    timeout_ms: float | None = None  # deadline of the escalated cloud call

    def __post_init__(self) -> None:
        if (self.threshold is None) == (self.max_accuracy_loss is None):
            raise ConfigError("threshold", "give exactly one of threshold or max_accuracy_loss")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ConfigError("threshold", f"must be in [0, 1], got {self.threshold}")
        if self.max_accuracy_loss is not None and not 0.0 <= self.max_accuracy_loss < 1.0:
            raise ConfigError(
                "max_accuracy_loss", f"must be in [0, 1) (a fraction), got {self.max_accuracy_loss}"
            )
        _check_timeout(self.timeout_ms)

    def _threshold(self, router: Router, model: LocalModel) -> float:
        if self.threshold is not None:
            return self.threshold
        return router.cascade_threshold(self, model)

    def infer(self, router: Router, feeds: Arrays, model: LocalModel | None) -> Result:
        if model is None and router.has_cloud:
            result = router.remote(feeds, self.timeout_ms)
            result.fallback = True
            return result
        try:
            local = router.local(feeds, model)
        except LOCAL_FAILURES:
            if not router.has_cloud:
                raise
            result = router.remote(feeds, self.timeout_ms)
            result.fallback = True
            return result
        assert model is not None
        confidence = local.compute_confidence()
        if confidence is None or confidence >= self._threshold(router, model):
            return local
        if not router.has_cloud:
            return local
        try:
            result = router.remote(feeds, self.timeout_ms)
        except CloudError as exc:
            local.escalated = True
            local.cloud_error = str(exc)
            return local
        result.escalated = True
        result.local_ms = local.local_ms
        return result

    async def ainfer(self, router: Router, feeds: Arrays, model: LocalModel | None) -> Result:
        if model is None and router.has_cloud:
            result = await router.aremote(feeds, self.timeout_ms)
            result.fallback = True
            return result
        try:
            local = await router.alocal(feeds, model)
        except LOCAL_FAILURES:
            if not router.has_cloud:
                raise
            result = await router.aremote(feeds, self.timeout_ms)
            result.fallback = True
            return result
        assert model is not None
        confidence = local.compute_confidence()
        if confidence is None or confidence >= self._threshold(router, model):
            return local
        if not router.has_cloud:
            return local
        try:
            result = await router.aremote(feeds, self.timeout_ms)
        except CloudError as exc:
            local.escalated = True
            local.cloud_error = str(exc)
            return local
        result.escalated = True
        result.local_ms = local.local_ms
        return result


def derive_threshold(
    confidences: np.ndarray[Any, Any],
    local_correct: np.ndarray[Any, Any],
    max_accuracy_loss: float,
    cloud_correct: np.ndarray[Any, Any] | None = None,
) -> float:
    """The lowest confidence threshold whose accuracy loss on this data is <= the target.

    Answering sample i locally instead of in the cloud changes accuracy by
    local_correct[i] - cloud_correct[i]; without the cloud's answers the cloud is assumed
    right, which bounds the loss from above. Returns a value above 1 when even the most
    confident sample costs too much (everything goes to the cloud).
    """
    n = len(confidences)
    if n == 0:
        raise ConfigError("max_accuracy_loss", "the validation set is empty")
    cloud = np.ones(n) if cloud_correct is None else cloud_correct.astype(np.float64)
    order = np.argsort(-confidences, kind="stable")
    conf = confidences[order]
    loss = np.cumsum(cloud[order] - local_correct[order].astype(np.float64)) / n
    # A threshold can only sit between distinct confidence values.
    boundary = np.ones(n, dtype=bool)
    boundary[:-1] = conf[:-1] > conf[1:]
    ok = np.nonzero((loss <= max_accuracy_loss + 1e-12) & boundary)[0]
    if len(ok) == 0:
        return math.nextafter(1.0, 2.0)
    k = int(ok[-1])
    return 0.0 if k == n - 1 else float(conf[k])


@dataclass(frozen=True)
class Deadline(Policy):
    name = "deadline"
    budget_ms: float = 100.0  # answer within this (milliseconds)
    primary: Literal["auto", "local", "cloud"] = "auto"  # auto: the faster path observed
    hedge_percentile: float = 0.95  # hedge once the primary is slower than this percentile
    min_hedge_ms: float = 0.5  # never hedge sooner (milliseconds)
    max_hedge_fraction: float = 0.5  # never hedge later than this fraction of the budget
    min_samples: int = 8  # observations needed before the learned delay is trusted
    window: int = 256  # latencies kept per path

    def __post_init__(self) -> None:
        if self.budget_ms <= 0:
            raise ConfigError("budget_ms", f"must be > 0 milliseconds, got {self.budget_ms}")
        if self.primary not in ("auto", "local", "cloud"):
            raise ConfigError("primary", f"must be auto, local or cloud, got {self.primary!r}")
        if not 0.0 < self.hedge_percentile < 1.0:
            raise ConfigError("hedge_percentile", f"must be in (0, 1), got {self.hedge_percentile}")
        if self.min_hedge_ms < 0:
            raise ConfigError("min_hedge_ms", "must be >= 0 milliseconds")
        if not 0.0 < self.max_hedge_fraction <= 1.0:
            raise ConfigError("max_hedge_fraction", "must be in (0, 1]")
        if self.min_samples < 1 or self.window < self.min_samples:
            raise ConfigError("window", "needs 1 <= min_samples <= window")

    def _order(self, router: Router, model: LocalModel | None) -> tuple[str, str | None]:
        if model is None:
            return "cloud", None
        if not router.has_cloud:
            return "local", None
        if self.primary != "auto":
            return self.primary, "cloud" if self.primary == "local" else "local"
        local, cloud = router.expected_ms("local"), router.expected_ms("cloud")
        if local is not None and cloud is not None and cloud < local:
            return "cloud", "local"
        return "local", "cloud"

    def infer(self, router: Router, feeds: Arrays, model: LocalModel | None) -> Result:
        start = time.monotonic()
        deadline = start + self.budget_ms / 1e3
        first, second = self._order(router, model)

        def leg(path: str) -> Callable[[], Result]:
            if path == "local":
                return lambda: router.local(feeds, model)
            return lambda: router.remote(feeds, max(1.0, (deadline - time.monotonic()) * 1e3))

        if second is None:
            result = leg(first)()
            if time.monotonic() > deadline:
                raise DeadlineExceededError(
                    f"{first} answered after the {self.budget_ms} ms budget"
                )
            return result
        pool = router.executor()
        pending = {pool.submit(leg(first)): first}
        delay = router.hedge_delay_ms(first, self) / 1e3
        done, _ = concurrent.futures.wait(pending, timeout=delay)
        errors: list[BaseException] = []
        for future in done:
            if future.exception() is None:
                return future.result()
            errors.append(future.exception())  # type: ignore[arg-type]
            pending.pop(future)
        hedged = pool.submit(leg(second))
        pending[hedged] = second
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            done, _ = concurrent.futures.wait(
                pending, timeout=remaining, return_when=concurrent.futures.FIRST_COMPLETED
            )
            for future in done:
                pending.pop(future)
                exc = future.exception()
                if exc is None:
                    result = future.result()
                    result.hedged = True
                    result.fallback = result.source != first
                    return result
                errors.append(exc)
        if errors and not pending:
            raise errors[-1]
        raise DeadlineExceededError(
            f"no path answered within {self.budget_ms} ms"
            + (f" (errors: {'; '.join(str(e) for e in errors)})" if errors else "")
        )

    async def ainfer(self, router: Router, feeds: Arrays, model: LocalModel | None) -> Result:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.budget_ms / 1e3
        first, second = self._order(router, model)

        def leg(path: str) -> Awaitable[Result]:
            if path == "local":
                return router.alocal(feeds, model)
            return router.aremote(feeds, max(1.0, (deadline - loop.time()) * 1e3))

        tasks: dict[asyncio.Task[Result], str] = {asyncio.ensure_future(leg(first)): first}
        errors: list[BaseException] = []
        try:
            if second is not None:
                delay = router.hedge_delay_ms(first, self) / 1e3
                done, _ = await asyncio.wait(tasks, timeout=delay)
                for task in done:
                    if task.exception() is None:
                        return task.result()
                    errors.append(task.exception())  # type: ignore[arg-type]
                    tasks.pop(task)
                tasks[asyncio.ensure_future(leg(second))] = second
            hedged = second is not None
            while tasks:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                done, _ = await asyncio.wait(
                    tasks, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
                for task in done:
                    tasks.pop(task)
                    exc = task.exception()
                    if exc is None:
                        result = task.result()
                        result.hedged = hedged
                        result.fallback = result.source != first
                        return result
                    errors.append(exc)
            if errors and not tasks:
                raise errors[-1]
            raise DeadlineExceededError(
                f"no path answered within {self.budget_ms} ms"
                + (f" (errors: {'; '.join(str(e) for e in errors)})" if errors else "")
            )
        finally:
            for task in tasks:
                task.cancel()


POLICIES: dict[str, type[Policy]] = {
    cls.name: cls for cls in (LocalOnly, CloudOnly, PreferLocal, PreferCloud, Cascade, Deadline)
}


def make_policy(policy: str | Policy, **settings: Any) -> Policy:
    """A policy from its name and keyword settings, or the policy object itself."""
    if isinstance(policy, Policy):
        if settings:
            raise ConfigError(
                next(iter(settings)), "settings go into the policy object when one is given"
            )
        return policy
    cls = POLICIES.get(policy)
    if cls is None:
        raise ConfigError("policy", f"unknown policy {policy!r}; one of {sorted(POLICIES)}")
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    for key in settings:
        if key not in known:
            raise ConfigError(
                key, f"not a setting of policy {policy!r} (settings: {sorted(known) or 'none'})"
            )
    return cls(**settings)


def _check_timeout(value: float | None) -> None:
    if value is not None and value <= 0:
        raise ConfigError("timeout_ms", f"must be > 0 milliseconds, got {value}")
