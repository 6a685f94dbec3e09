"""Every policy's plan through both drivers, against a fake router with no model and no network.

Each test runs twice, once through `drive` (threads) and once through `adrive` (asyncio), so a
decision that the two paths take differently fails here.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from tandem.errors import CloudUnavailableError, NoLocalModelError, RuntimeBackendError
from tandem.sdk import Cascade, CloudOnly, Deadline, LocalOnly, Policy, PreferCloud, PreferLocal
from tandem.sdk.errors import DeadlineExceededError
from tandem.sdk.policies import adrive, drive
from tandem.sdk.result import Result

FEEDS = {"x": np.zeros((1, 2), np.float32)}
MODEL: Any = object()  # the plans only ask whether there is one


@dataclass
class FakePath:
    delay_s: float = 0.0
    error: Exception | None = None
    confidence: float | None = 0.99


@dataclass
class FakeLegs:
    """The `Legs` protocol, answering from settings; it records every call it gets."""

    local: FakePath = field(default_factory=FakePath)
    cloud: FakePath = field(default_factory=FakePath)
    has_cloud: bool = True
    threshold: float = 0.9  # what cascade_threshold derives
    hedge_ms: float = 20.0
    expected: dict[str, float] = field(default_factory=dict)
    calls: list[tuple[str, float | None]] = field(default_factory=list)
    pool: concurrent.futures.ThreadPoolExecutor = field(
        default_factory=lambda: concurrent.futures.ThreadPoolExecutor(4)
    )
    # Set at teardown: a leg the plan gave up on (still "working" in the pool) ends then,
    # instead of the teardown's pool shutdown sleeping out its delay.
    closed: threading.Event = field(default_factory=threading.Event)

    def _path(self, path: str, timeout_ms: float | None) -> FakePath:
        self.calls.append((path, timeout_ms))
        return self.local if path == "local" else self.cloud

    def _answer(self, path: str, settings: FakePath) -> Result:
        if settings.error is not None:
            raise settings.error
        return Result({"y": np.ones(1)}, path, path, 1, None, 1.0, confidence=settings.confidence)

    def run(self, path: str, feeds: Any, model: Any, timeout_ms: float | None) -> Result:
        settings = self._path(path, timeout_ms)
        self.closed.wait(settings.delay_s)
        return self._answer(path, settings)

    async def arun(self, path: str, feeds: Any, model: Any, timeout_ms: float | None) -> Result:
        settings = self._path(path, timeout_ms)
        await asyncio.sleep(settings.delay_s)
        return self._answer(path, settings)

    def cascade_threshold(self, policy: Cascade, model: Any) -> float:
        return self.threshold

    def hedge_delay_ms(self, path: str, policy: Deadline) -> float:
        return self.hedge_ms

    def expected_ms(self, path: str) -> float | None:
        return self.expected.get(path)

    def executor(self) -> concurrent.futures.Executor:
        return self.pool


Infer = Callable[..., Result]


@pytest.fixture(params=["sync", "async"])
def infer(request: pytest.FixtureRequest) -> Iterator[Infer]:
    legs_seen: list[FakeLegs] = []

    def run(policy: Policy, legs: FakeLegs, model: Any = MODEL) -> Result:
        legs_seen.append(legs)
        plan = policy.plan(legs, model)
        if request.param == "sync":
            return drive(plan, legs, FEEDS, model)
        return asyncio.run(adrive(plan, legs, FEEDS, model))

    yield run
    for legs in legs_seen:
        legs.closed.set()
        legs.pool.shutdown(wait=True)


def failing(exc: Exception, delay_s: float = 0.0) -> FakePath:
    return FakePath(delay_s=delay_s, error=exc)


def test_local_only(infer: Infer) -> None:
    legs = FakeLegs()
    assert infer(LocalOnly(), legs).source == "local"
    with pytest.raises(RuntimeBackendError):
        infer(LocalOnly(), FakeLegs(local=failing(RuntimeBackendError("boom"))))
    assert legs.calls == [("local", None)]


def test_cloud_only_passes_its_timeout(infer: Infer) -> None:
    legs = FakeLegs()
    assert infer(CloudOnly(timeout_ms=50.0), legs).source == "cloud"
    assert legs.calls == [("cloud", 50.0)]


def test_prefer_local(infer: Infer) -> None:
    result = infer(PreferLocal(), FakeLegs())
    assert result.source == "local" and not result.fallback
    for error in (RuntimeBackendError("boom"), NoLocalModelError("none")):
        legs = FakeLegs(local=failing(error))
        result = infer(PreferLocal(timeout_ms=30.0), legs)
        assert result.source == "cloud" and result.fallback
        assert legs.calls == [("local", None), ("cloud", 30.0)]
    with pytest.raises(RuntimeBackendError):
        infer(PreferLocal(), FakeLegs(local=failing(RuntimeBackendError("x")), has_cloud=False))


def test_prefer_cloud(infer: Infer) -> None:
    result = infer(PreferCloud(), FakeLegs())
    assert result.source == "cloud" and not result.fallback
    result = infer(PreferCloud(), FakeLegs(cloud=failing(CloudUnavailableError("down"))))
    assert result.source == "local" and result.fallback
    with pytest.raises(CloudUnavailableError):
        infer(PreferCloud(), FakeLegs(cloud=failing(CloudUnavailableError("down"))), None)
    result = infer(PreferCloud(), FakeLegs(has_cloud=False))
    assert result.source == "local" and not result.fallback


def test_cascade(infer: Infer) -> None:
    assert infer(Cascade(threshold=0.9), FakeLegs()).source == "local"
    unsure = FakePath(confidence=0.5)
    result = infer(Cascade(threshold=0.9, timeout_ms=40.0), legs := FakeLegs(local=unsure))
    assert result.source == "cloud" and result.escalated and result.local_ms == 1.0
    assert legs.calls == [("local", None), ("cloud", 40.0)]
    result = infer(
        Cascade(threshold=0.9),
        FakeLegs(local=unsure, cloud=failing(CloudUnavailableError("down"))),
    )
    assert result.source == "local" and result.escalated and "down" in str(result.cloud_error)
    result = infer(Cascade(threshold=0.9), FakeLegs(local=unsure, has_cloud=False))
    assert result.source == "local" and not result.escalated
    result = infer(Cascade(threshold=0.9), legs := FakeLegs(), None)
    assert result.source == "cloud" and result.fallback and legs.calls == [("cloud", None)]
    result = infer(Cascade(threshold=0.9), FakeLegs(local=failing(RuntimeBackendError("x"))))
    assert result.source == "cloud" and result.fallback
    # A derived threshold comes from the router: 0.99 is below the derived 0.995.
    result = infer(Cascade(max_accuracy_loss=0.01), FakeLegs(threshold=0.995))
    assert result.source == "cloud" and result.escalated


def test_deadline_answers_on_the_primary_without_hedging(infer: Infer) -> None:
    legs = FakeLegs()
    result = infer(Deadline(budget_ms=500), legs)
    assert result.source == "local" and not result.hedged and not result.fallback
    assert legs.calls == [("local", None)]
    legs = FakeLegs(expected={"local": 9.0, "cloud": 3.0})
    assert infer(Deadline(budget_ms=500), legs).source == "cloud"  # the faster path first


def test_deadline_hedges_and_the_cloud_leg_gets_the_rest_of_the_budget(infer: Infer) -> None:
    legs = FakeLegs(local=FakePath(delay_s=1.0))
    start = time.monotonic()
    result = infer(Deadline(budget_ms=500), legs)
    assert time.monotonic() - start < 0.4
    assert result.source == "cloud" and result.hedged and result.fallback
    ((path, timeout_ms),) = legs.calls[1:]
    assert path == "cloud" and timeout_ms is not None and timeout_ms <= 500 - 20


def test_deadline_hedges_at_once_when_the_primary_fails(infer: Infer) -> None:
    legs = FakeLegs(local=failing(RuntimeBackendError("boom")), hedge_ms=400.0)
    start = time.monotonic()
    result = infer(Deadline(budget_ms=1000), legs)
    assert time.monotonic() - start < 0.3
    assert result.source == "cloud" and result.hedged and result.fallback


def test_deadline_raises_at_the_budget_when_no_path_answers(infer: Infer) -> None:
    slow = FakePath(delay_s=1.0)
    start = time.monotonic()
    with pytest.raises(DeadlineExceededError):
        infer(Deadline(budget_ms=150), FakeLegs(local=slow, cloud=slow))
    assert time.monotonic() - start < 0.6
    with pytest.raises(CloudUnavailableError):  # every path failed: the last error, at once
        infer(
            Deadline(budget_ms=5000),
            FakeLegs(
                local=failing(RuntimeBackendError("a")), cloud=failing(CloudUnavailableError("b"))
            ),
        )


@pytest.mark.parametrize("no_cloud", [True, False])
def test_deadline_with_one_path_raises_at_the_budget_not_after_a_late_answer(
    infer: Infer, no_cloud: bool
) -> None:
    """The sync driver used to wait for a late single path and raise only then."""
    legs = FakeLegs(
        local=FakePath(delay_s=1.0), cloud=FakePath(delay_s=1.0), has_cloud=not no_cloud
    )
    start = time.monotonic()
    with pytest.raises(DeadlineExceededError):
        infer(Deadline(budget_ms=150), legs, MODEL if no_cloud else None)
    assert time.monotonic() - start < 0.6
    with pytest.raises(RuntimeBackendError):
        infer(
            Deadline(budget_ms=150),
            FakeLegs(local=failing(RuntimeBackendError("x")), has_cloud=False),
        )
