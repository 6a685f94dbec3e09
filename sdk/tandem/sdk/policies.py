"""Routing policies: which path answers a request. Names are part of the API.

A policy is an immutable value holding its settings (urllib3 `Retry` style: `replace(...)`
gives a changed copy). Everything that changes while the client runs (learned latencies,
derived thresholds) lives in the client's router, not in the policy.

Each policy decides once, in `plan`: a generator that yields steps and receives their
outcomes, and does no IO itself (httpx's BaseClient holds every decision; Client and
AsyncClient only send). Two short drivers carry the steps out, `drive` with the calling
thread and a pool, `adrive` with asyncio tasks, so the sync and async paths cannot diverge:

    Call(path, timeout_ms)   run that path now; the plan receives its Result, or its error
                             is raised inside the plan where the `yield` stands
    Start(path, timeout_ms)  start that path in the background and go on
    Wait(until)              the next started path to finish, as an Outcome, or None when
                             nothing finished by `until` (a time.monotonic() value)

    local_only    the local model, never the cloud
    cloud_only    the cloud, never the local model
    prefer_local  local; the cloud when there is no local model or the local runtime fails
    prefer_cloud  the cloud; local when the cloud is unreachable, too slow or its breaker is open
    cascade       local when calibrated confidence >= threshold, else the cloud; the threshold
                  is given, or derived from the artifact's validation set for a target
                  accuracy loss (`max_accuracy_loss`)
    deadline      answer within `budget_ms`: start the faster path, hedge to the other after a
                  delay learned from observed latencies, take whichever answers first; the
                  budget holds for the whole call, with one path or two
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import time
from collections.abc import Generator
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Generic, Literal, Protocol, TypeVar

import numpy as np

from tandem.errors import CloudError, ConfigError, NoLocalModelError, RuntimeBackendError
from tandem.sdk.errors import DeadlineExceededError
from tandem.sdk.local import LocalModel
from tandem.sdk.result import Result
from tandem.sdk.signature import Arrays

LOCAL_FAILURES = (NoLocalModelError, RuntimeBackendError)

PathName = Literal["local", "cloud"]


@dataclass(frozen=True)
class Call:
    """Run `path` now; the plan receives its Result or has its error raised at the yield."""

    path: PathName
    timeout_ms: float | None = None  # the cloud call's deadline; None = the cloud config's


@dataclass(frozen=True)
class Start:
    """Start `path` in the background; a later Wait collects it."""

    path: PathName
    timeout_ms: float | None = None


@dataclass(frozen=True)
class Wait:
    """Receive the next started path to finish, or None when none has by `until`."""

    until: float  # time.monotonic() seconds


@dataclass(frozen=True)
class Outcome:
    """How one started path ended: a result or an error."""

    path: PathName
    result: Result | None
    error: BaseException | None

    @classmethod
    def of(
        cls, path: PathName, done: concurrent.futures.Future[Result] | asyncio.Task[Result]
    ) -> Outcome:
        error = done.exception()
        return cls(path, None if error is not None else done.result(), error)


Step = Call | Start | Wait
Plan = Generator[Step, Any, Result]


class Facts(Protocol):
    """What a plan may ask of the client; none of it waits on a path."""

    @property
    def has_cloud(self) -> bool: ...

    def cascade_threshold(self, policy: Cascade, model: LocalModel) -> float: ...

    def hedge_delay_ms(self, path: str, policy: Deadline) -> float: ...

    def expected_ms(self, path: str) -> float | None: ...


class Legs(Facts, Protocol):
    """What the drivers need besides the facts: run one path, sync or async."""

    def run(
        self, path: str, feeds: Arrays, model: LocalModel | None, timeout_ms: float | None
    ) -> Result: ...

    async def arun(
        self, path: str, feeds: Arrays, model: LocalModel | None, timeout_ms: float | None
    ) -> Result: ...

    def executor(self) -> concurrent.futures.Executor: ...


Pending = TypeVar("Pending", concurrent.futures.Future[Result], asyncio.Task[Result])


class _Progress(Generic[Pending]):
    """A plan being carried out: what to send it next and which paths it started (no IO)."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.started: dict[Pending, PathName] = {}
        self.result: Result | None = None
        self._reply: Any = None
        self._error: Exception | None = None

    def next(self) -> Step | None:
        """The plan's next step, or None once it has returned (its value is `result`)."""
        reply, error, self._reply, self._error = self._reply, self._error, None, None
        try:
            return self.plan.send(reply) if error is None else self.plan.throw(error)
        except StopIteration as stop:
            self.result = stop.value
            return None

    def answered(self, reply: Result | None = None, error: Exception | None = None) -> None:
        self._reply, self._error = reply, error

    def timeout(self, step: Wait) -> float:
        return max(0.0, step.until - time.monotonic())

    def finished(self, done: set[Pending]) -> None:
        """The first of `done` goes to the plan as an Outcome; the rest stay for later Waits."""
        if done:
            first = done.pop()
            self._reply = Outcome.of(self.started.pop(first), first)

    def outcome(self) -> Result:
        assert self.result is not None
        return self.result


def drive(plan: Plan, legs: Legs, feeds: Arrays, model: LocalModel | None) -> Result:
    """Carries a plan out on this thread; background paths run on the legs' pool."""
    run = _Progress[concurrent.futures.Future[Result]](plan)
    try:
        while (step := run.next()) is not None:
            if isinstance(step, Call):
                try:
                    run.answered(legs.run(step.path, feeds, model, step.timeout_ms))
                except Exception as exc:  # noqa: BLE001 - handed to the plan, which decides
                    run.answered(error=exc)
            elif isinstance(step, Start):
                leg = legs.executor().submit(legs.run, step.path, feeds, model, step.timeout_ms)
                run.started[leg] = step.path
            elif run.started:
                first = concurrent.futures.FIRST_COMPLETED
                run.finished(concurrent.futures.wait(run.started, run.timeout(step), first)[0])
        return run.outcome()
    finally:
        for leg in run.started:
            leg.cancel()  # a thread already running cannot be stopped; its answer is dropped


async def adrive(plan: Plan, legs: Legs, feeds: Arrays, model: LocalModel | None) -> Result:
    """Carries a plan out on the running event loop; background paths are tasks."""
    run = _Progress[asyncio.Task[Result]](plan)
    try:
        while (step := run.next()) is not None:
            if not isinstance(step, Call | Start):
                if run.started:
                    first = asyncio.FIRST_COMPLETED
                    done, _ = await asyncio.wait(
                        run.started, timeout=run.timeout(step), return_when=first
                    )
                    run.finished(done)
                continue
            leg = legs.arun(step.path, feeds, model, step.timeout_ms)
            if isinstance(step, Start):
                run.started[asyncio.ensure_future(leg)] = step.path
                continue
            try:
                run.answered(await leg)
            except Exception as exc:  # noqa: BLE001 - handed to the plan, which decides
                run.answered(error=exc)
        return run.outcome()
    finally:
        for task in run.started:
            task.cancel()


def call(path: PathName, timeout_ms: float | None = None) -> Generator[Step, Any, Result]:
    """`yield from call(...)`: one Call step, typed."""
    result: Result = yield Call(path, timeout_ms)
    return result


def _local_else_cloud(facts: Facts, timeout_ms: float | None) -> Plan:
    """The local answer; the cloud's, marked as a fallback, when there is no local one."""
    try:
        return (yield from call("local"))
    except LOCAL_FAILURES:
        if not facts.has_cloud:
            raise
    result = yield from call("cloud", timeout_ms)
    result.fallback = True
    return result


class Policy:
    name: ClassVar[str]

    def plan(self, facts: Facts, model: LocalModel | None) -> Plan:
        """The decision, as steps (see the module docstring)."""
        raise NotImplementedError

    def infer(self, legs: Legs, feeds: Arrays, model: LocalModel | None) -> Result:
        return drive(self.plan(legs, model), legs, feeds, model)

    async def ainfer(self, legs: Legs, feeds: Arrays, model: LocalModel | None) -> Result:
        return await adrive(self.plan(legs, model), legs, feeds, model)


@dataclass(frozen=True)
class LocalOnly(Policy):
    name = "local_only"

    def plan(self, facts: Facts, model: LocalModel | None) -> Plan:
        return (yield from call("local"))


@dataclass(frozen=True)
class CloudOnly(Policy):
    name = "cloud_only"
    timeout_ms: float | None = None  # per-call deadline; None = the cloud config's

    def __post_init__(self) -> None:
        _check_timeout(self.timeout_ms)

    def plan(self, facts: Facts, model: LocalModel | None) -> Plan:
        return (yield from call("cloud", self.timeout_ms))


@dataclass(frozen=True)
class PreferLocal(Policy):
    name = "prefer_local"
    timeout_ms: float | None = None  # deadline of the fallback cloud call

    def __post_init__(self) -> None:
        _check_timeout(self.timeout_ms)

    def plan(self, facts: Facts, model: LocalModel | None) -> Plan:
        return (yield from _local_else_cloud(facts, self.timeout_ms))


@dataclass(frozen=True)
class PreferCloud(Policy):
    name = "prefer_cloud"
    timeout_ms: float | None = None  # past this the cloud counts as too slow (milliseconds)

    def __post_init__(self) -> None:
        _check_timeout(self.timeout_ms)

    def plan(self, facts: Facts, model: LocalModel | None) -> Plan:
        if not facts.has_cloud:
            return (yield from call("local"))
        try:
            return (yield from call("cloud", self.timeout_ms))
        except CloudError:
            if model is None:
                raise
        result = yield from call("local")
        result.fallback = True
        return result


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

    def _threshold(self, facts: Facts, model: LocalModel) -> float:
        if self.threshold is not None:
            return self.threshold
        return facts.cascade_threshold(self, model)

    def plan(self, facts: Facts, model: LocalModel | None) -> Plan:
        if model is None and facts.has_cloud:
            result = yield from call("cloud", self.timeout_ms)
            result.fallback = True
            return result
        local = yield from _local_else_cloud(facts, self.timeout_ms)
        if local.fallback:
            return local
        assert model is not None
        confidence = local.compute_confidence()
        if confidence is None or confidence >= self._threshold(facts, model):
            return local
        if not facts.has_cloud:
            return local
        try:
            result = yield from call("cloud", self.timeout_ms)
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

    def _order(self, facts: Facts, model: LocalModel | None) -> tuple[PathName, PathName | None]:
        if model is None:
            return "cloud", None
        if not facts.has_cloud:
            return "local", None
        if self.primary != "auto":
            return self.primary, "cloud" if self.primary == "local" else "local"
        local, cloud = facts.expected_ms("local"), facts.expected_ms("cloud")
        if local is not None and cloud is not None and cloud < local:
            return "cloud", "local"
        return "local", "cloud"

    def plan(self, facts: Facts, model: LocalModel | None) -> Plan:
        deadline = time.monotonic() + self.budget_ms / 1e3
        first, second = self._order(facts, model)

        def start(path: PathName) -> Start:
            if path == "local":
                return Start(path)
            return Start(path, max(1.0, (deadline - time.monotonic()) * 1e3))

        yield start(first)
        running = 1
        errors: list[BaseException] = []
        if second is not None:
            early: Outcome | None = yield Wait(
                time.monotonic() + facts.hedge_delay_ms(first, self) / 1e3
            )
            if early is not None and early.result is not None:
                return early.result
            if early is not None and early.error is not None:
                errors.append(early.error)
                running -= 1
            yield start(second)
            running += 1
        while running:
            got: Outcome | None = yield Wait(deadline)
            if got is None:
                break
            running -= 1
            if got.result is not None:
                got.result.hedged = second is not None
                got.result.fallback = got.path != first
                return got.result
            assert got.error is not None
            errors.append(got.error)
        if errors and not running:
            raise errors[-1]
        raise DeadlineExceededError(
            f"no path answered within {self.budget_ms} ms"
            + (f" (errors: {'; '.join(str(e) for e in errors)})" if errors else "")
        )


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
