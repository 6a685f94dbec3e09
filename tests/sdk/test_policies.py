"""Every routing policy, against a real local runtime and a real gRPC cloud double."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tandem.errors import (
    ClientClosedError,
    CloudUnavailableError,
    ConfigError,
    NoLocalModelError,
    RuntimeBackendError,
)
from tandem.sdk import BreakerConfig, Cascade, Client, CloudConfig, Deadline, Retry, make_policy
from tandem.sdk.errors import DeadlineExceededError
from tandem.sdk.policies import derive_threshold
from tests.sdk.v2double import V2Server, default_compute

Factory = Callable[..., Client]


@pytest.fixture
def x(test_set: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    return test_set[0][:4]


def _slow(client: Client, seconds: float) -> None:
    model = client.current
    assert model is not None
    run = model.run

    def slow(feeds: Any) -> Any:
        time.sleep(seconds)
        return run(feeds)

    model.run = slow  # type: ignore[method-assign]


def _broken(client: Client) -> None:
    model = client.current
    assert model is not None

    def broken(feeds: Any) -> Any:
        raise RuntimeBackendError("simulated runtime failure")

    model.run = broken  # type: ignore[method-assign]


def test_policy_names_and_settings(clients: Factory, artifacts: Path, v2: V2Server) -> None:
    c = clients(
        artifacts=artifacts, cloud=v2.address, policy="cascade", threshold=0.9, runtime="onnx"
    )
    assert c.policy == Cascade(threshold=0.9)
    d = clients(
        artifacts=artifacts, cloud=v2.address, policy="deadline", budget_ms=200, runtime="onnx"
    )
    assert isinstance(d.policy, Deadline) and d.policy.budget_ms == 200
    with pytest.raises(ConfigError) as info:
        make_policy("cascade", treshold=0.9)
    assert info.value.field == "treshold"
    with pytest.raises(ConfigError, match="unknown policy 'fastest'"):
        make_policy("fastest")
    with pytest.raises(ConfigError) as info:
        make_policy("cascade")
    assert info.value.field == "threshold"
    with pytest.raises(ConfigError) as info:
        make_policy("deadline", budget_ms=0)
    assert info.value.field == "budget_ms"
    with pytest.raises(ConfigError) as info:
        make_policy(Deadline(), budget_ms=5)
    # Policies are values: equal settings compare equal, and they cannot be changed in place.
    assert make_policy("deadline", budget_ms=5) == Deadline(budget_ms=5)
    with pytest.raises(AttributeError):
        d.policy.budget_ms = 1  # type: ignore[misc]


def test_local_only(
    clients: Factory, artifacts: Path, v2: V2Server, x: np.ndarray, tmp_path: Path
) -> None:
    c = clients(artifacts=artifacts, cloud=v2.address, policy="local_only", runtime="onnx")
    result = c.infer(x)
    assert (result.source, result.runtime, result.model_version) == ("local", "onnx", 2)
    assert result.local_ms is not None and result.cloud_ms is None
    assert result.timings["total_ms"] >= result.timings["local_ms"]
    assert v2.servicer.infer_calls == 0
    empty = tmp_path / "empty-store"
    empty.mkdir()
    nothing = clients(artifacts=empty, cloud=v2.address, policy="local_only")
    with pytest.raises(NoLocalModelError):
        nothing.infer(x)


def test_cloud_only(clients: Factory, artifacts: Path, v2: V2Server, x: np.ndarray) -> None:
    c = clients(artifacts=artifacts, cloud=v2.address, policy="cloud_only", runtime="onnx")
    result = c.infer(x)
    assert (result.source, result.runtime, result.model_version) == ("cloud", "cloud", 7)
    assert result.endpoint == v2.address and result.cloud_ms is not None
    np.testing.assert_allclose(result.output, default_compute({"pixels": x})["logits"], rtol=1e-6)
    # Without any local model the signature comes from the server's ModelMetadata.
    remote = clients(artifacts=None, cloud=v2.address, policy="cloud_only")
    assert remote.infer(x[0]).output.shape == (1, 10)
    with pytest.raises(Exception, match="'pixels': expected dtype float32"):
        remote.infer(x.astype(np.float64))


def test_prefer_local_falls_back_when_local_is_missing_or_fails(
    clients: Factory, artifacts: Path, v2: V2Server, x: np.ndarray, tmp_path: Path
) -> None:
    c = clients(artifacts=artifacts, cloud=v2.address, policy="prefer_local", runtime="onnx")
    assert c.infer(x).source == "local"
    _broken(c)
    result = c.infer(x)
    assert result.source == "cloud" and result.fallback
    empty = tmp_path / "empty-store"
    empty.mkdir()
    nothing = clients(artifacts=empty, cloud=v2.address, policy="prefer_local")
    result = nothing.infer(x)
    assert result.source == "cloud" and result.fallback
    alone = clients(artifacts=empty, policy="prefer_local")
    with pytest.raises(NoLocalModelError):
        alone.infer(x)


def test_prefer_cloud_falls_back_when_cloud_is_down_slow_or_open(
    clients: Factory, artifacts: Path, v2: V2Server, x: np.ndarray
) -> None:
    cloud = CloudConfig(
        endpoints=(v2.address,),
        retry=Retry.disabled(),
        timeout_ms=100,
        breaker=BreakerConfig(consecutive_failures=2, min_calls=100, open_s=60),
    )
    c = clients(artifacts=artifacts, cloud=cloud, policy="prefer_cloud", runtime="onnx")
    assert c.infer(x).source == "cloud"
    v2.script.delay_s = 0.3  # slow
    result = c.infer(x)
    assert result.source == "local" and result.fallback
    v2.script.delay_s = 0.0
    v2.script.fail_always = "UNAVAILABLE"  # down
    assert c.infer(x).source == "local"
    assert c.cloud is not None and c.cloud.breaker_states()[v2.address] == "open"
    calls = v2.servicer.infer_calls
    assert c.infer(x).source == "local"  # breaker open: not even tried
    assert v2.servicer.infer_calls == calls
    no_local = clients(artifacts=None, cloud=cloud, policy="prefer_cloud")
    with pytest.raises(CloudUnavailableError):
        no_local.infer({"pixels": x})


def test_cascade_with_a_threshold(
    clients: Factory, artifacts: Path, v2: V2Server, test_set: tuple[np.ndarray, np.ndarray]
) -> None:
    xs = test_set[0][:60]
    c = clients(
        artifacts=artifacts, cloud=v2.address, policy="cascade", threshold=0.95, runtime="onnx"
    )
    local_only = clients(artifacts=artifacts, policy="local_only", runtime="onnx")
    sources = set()
    for row in xs:
        confidence = local_only.infer(row).confidence
        assert confidence is not None
        result = c.infer(row)
        expected = "local" if confidence >= 0.95 else "cloud"
        assert result.source == expected, (confidence, result)
        assert result.escalated == (expected == "cloud")
        if expected == "cloud":
            assert result.local_ms is not None and result.cloud_ms is not None
        sources.add(result.source)
    assert sources == {"local", "cloud"}  # the sample exercises both branches

    # A failing local runtime sends the request to the cloud too.
    model = c.current
    assert model is not None
    working = model.run
    _broken(c)
    result = c.infer(xs[0])
    assert result.source == "cloud" and result.fallback
    model.run = working  # type: ignore[method-assign]

    # An unsure answer whose escalation fails is still answered, locally, with the reason.
    v2.script.fail_always = "UNAVAILABLE"
    unsure = next(r for r in xs if (local_only.infer(r).confidence or 1) < 0.95)
    result = c.infer(unsure)
    assert (
        result.source == "local" and result.escalated and "UNAVAILABLE" in str(result.cloud_error)
    )


def test_derive_threshold_is_the_lowest_that_keeps_the_loss() -> None:
    conf = np.array([0.99, 0.95, 0.9, 0.8, 0.7, 0.6])
    correct = np.array([1, 1, 0, 1, 0, 1], bool)
    # Accepting the top k costs (#wrong among them)/n against an always-right cloud.
    assert derive_threshold(conf, correct, 0.0) == 0.95
    assert derive_threshold(conf, correct, 1 / 6) == 0.8
    assert derive_threshold(conf, correct, 2 / 6) == 0.0
    assert derive_threshold(np.array([0.9, 0.8]), np.array([0, 1], bool), 0.0) > 1.0
    # With the cloud's own answers the loss is exact: where the cloud is also wrong, answering
    # locally costs nothing.
    cloud = np.array([1, 1, 0, 1, 1, 1], bool)
    assert derive_threshold(conf, correct, 0.0, cloud) == 0.8
    # Ties: a threshold never splits equal confidences.
    assert derive_threshold(np.array([0.9, 0.9, 0.5]), np.array([1, 0, 1], bool), 0.0) > 1.0


def test_cascade_derives_its_threshold_from_the_validation_set(
    clients: Factory, artifacts: Path, v2: V2Server
) -> None:
    c = clients(
        artifacts=artifacts,
        cloud=v2.address,
        policy="cascade",
        max_accuracy_loss=0.01,
        runtime="onnx",
    )
    model = c.current
    assert model is not None
    threshold = c._router.cascade_threshold(c.policy, model)  # type: ignore[arg-type]
    inputs, labels = model.validation()
    outputs = model.run(model.signature.prepare(inputs))
    conf = model.signature.confidences(outputs)
    assert conf is not None
    correct = outputs["logits"].argmax(1) == labels
    assert threshold == derive_threshold(conf, correct, 0.01)
    accepted = conf >= threshold
    assert ((~correct) & accepted).mean() <= 0.01 + 1e-12
    assert 0.0 < threshold < 1.0
    tighter = clients(
        artifacts=artifacts,
        cloud=v2.address,
        policy="cascade",
        max_accuracy_loss=0.001,
        runtime="onnx",
    )
    assert tighter._router.cascade_threshold(tighter.policy, model) >= threshold  # type: ignore[arg-type]


def test_deadline_hedges_to_the_cloud_when_local_is_slow(
    clients: Factory, artifacts: Path, v2: V2Server, x: np.ndarray
) -> None:
    c = clients(
        artifacts=artifacts,
        cloud=v2.address,
        policy="deadline",
        budget_ms=400,
        primary="local",
        runtime="onnx",
    )
    fast = c.infer(x)
    assert fast.source == "local" and not fast.hedged
    _slow(c, 1.0)
    start = time.monotonic()
    result = c.infer(x)
    elapsed = time.monotonic() - start
    assert result.source == "cloud" and result.hedged and result.fallback
    assert elapsed < 0.4


def test_deadline_hedge_delay_is_learned_from_observed_latencies(
    clients: Factory, artifacts: Path, v2: V2Server, x: np.ndarray
) -> None:
    policy = Deadline(budget_ms=1000, hedge_percentile=0.9, min_samples=8, min_hedge_ms=0.0)
    c = clients(artifacts=artifacts, cloud=v2.address, policy=policy, runtime="onnx")
    assert c._router.hedge_delay_ms("local", policy) == 500.0  # before learning: half the budget
    window = c._router.latency["local"]
    for value in [1.0] * 90 + [50.0] * 10:
        window.add(value)
    assert c._router.hedge_delay_ms("local", policy) == 50.0
    for value in [2.0] * 256:
        window.add(value)  # the window is bounded: old latencies age out
    assert c._router.hedge_delay_ms("local", policy) == 2.0
    # Primary "auto" starts the path observed faster.
    for value in [0.5] * 256:
        c._router.latency["cloud"].add(value)
    assert policy._order(c._router, c.current) == ("cloud", "local")
    _slow(c, 0.3)
    start = time.monotonic()
    result = c.infer(x)
    assert result.source == "cloud" and not result.fallback
    assert time.monotonic() - start < 0.25


def test_deadline_raises_when_neither_path_answers_in_budget(
    clients: Factory, artifacts: Path, v2: V2Server, x: np.ndarray
) -> None:
    c = clients(
        artifacts=artifacts,
        cloud=v2.address,
        policy="deadline",
        budget_ms=150,
        primary="local",
        runtime="onnx",
    )
    _slow(c, 0.6)
    v2.script.delay_s = 0.6
    start = time.monotonic()
    with pytest.raises(DeadlineExceededError):
        c.infer(x)
    assert time.monotonic() - start < 0.45


def test_deadline_with_only_the_local_path_raises_at_the_budget_sync_and_async(
    clients: Factory, artifacts: Path, x: np.ndarray
) -> None:
    """One deadline for the whole call: the sync path used to wait for the late answer."""
    c = clients(artifacts=artifacts, policy="deadline", budget_ms=150, runtime="onnx")
    _slow(c, 1.0)
    start = time.monotonic()
    with pytest.raises(DeadlineExceededError):
        c.infer(x)
    assert time.monotonic() - start < 0.6

    async def timed() -> float:  # timed inside: asyncio.run then waits for the worker thread
        start = time.monotonic()
        with pytest.raises(DeadlineExceededError):
            await c.ainfer(x)
        return time.monotonic() - start

    assert asyncio.run(timed()) < 0.6


def test_async_policies(clients: Factory, artifacts: Path, v2: V2Server, x: np.ndarray) -> None:
    async def main() -> None:
        c = clients(
            artifacts=artifacts,
            cloud=v2.address,
            policy="cascade",
            threshold=0.9999,
            runtime="onnx",
        )
        results = await asyncio.gather(*(c.ainfer(row) for row in x))
        assert {r.source for r in results} <= {"local", "cloud"}
        assert any(r.source == "cloud" for r in results)
        d = clients(
            artifacts=artifacts,
            cloud=v2.address,
            policy="deadline",
            budget_ms=400,
            primary="local",
            runtime="onnx",
        )
        _slow(d, 1.0)
        result = await d.ainfer(x)
        assert result.source == "cloud" and result.hedged
        p = clients(artifacts=artifacts, cloud=v2.address, policy="prefer_cloud", runtime="onnx")
        v2.script.fail_always = "UNAVAILABLE"
        assert (await p.ainfer(x)).source == "local"
        await c.aclose()

    asyncio.run(main())


def test_client_lifecycle(clients: Factory, artifacts: Path, x: np.ndarray, tmp_path: Path) -> None:
    with Client(
        "digits", artifacts=artifacts, policy="local_only", runtime="onnx", cache_dir=tmp_path / "c"
    ) as c:
        assert c.infer(x).source == "local"
    with pytest.raises(ClientClosedError):
        c.infer(x)
    c.close()  # idempotent
    with pytest.raises(ConfigError) as info:
        Client("digits")
    assert info.value.field == "artifacts"
    with pytest.raises(ConfigError) as info:
        Client("", artifacts=artifacts)
    assert info.value.field == "model"
    for kwargs, field in (
        ({"artifacts": artifacts, "policy": "cloud_only"}, "cloud"),
        ({"cloud": "127.0.0.1:1", "policy": "local_only"}, "artifacts"),
        ({"artifacts": artifacts, "shadow": 0.5}, "shadow"),
        ({"artifacts": artifacts, "policy": "cascade", "threshold": 1.5}, "threshold"),
    ):
        with pytest.raises(ConfigError) as info:
            Client("digits", cache_dir=tmp_path / "c", **kwargs)  # type: ignore[arg-type]
        assert info.value.field == field
