"""Retry and breaker policies (pure), and the cloud client over a real gRPC connection."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import numpy as np
import pytest

from tandem.errors import (
    CloudRejectedError,
    CloudTimeoutError,
    CloudUnavailableError,
    ConfigError,
    InputError,
)
from tandem.sdk.cloud import CloudClient, CloudConfig
from tandem.sdk.errors import CircuitOpenError, CloudInputError
from tandem.sdk.resilience import BreakerConfig, CircuitBreaker, Retry
from tests.sdk.v2double import V2Server, default_compute, self_signed
from tests.support.processes import free_port, wait_until

X = np.random.default_rng(3).uniform(0, 16, (4, 64)).astype(np.float32)

# --- Retry: an immutable value --------------------------------------------------------------


def test_retry_is_immutable_and_counts_per_cause() -> None:
    retry = Retry(total=2, backoff_factor=0.1, backoff_max=0.3, jitter="none")
    assert retry.is_retry("UNAVAILABLE") and not retry.is_retry("INVALID_ARGUMENT")
    assert retry.get_backoff_time() == 0.0
    once = retry.increment("UNAVAILABLE")
    assert retry.history == () and once.history == ("UNAVAILABLE",)
    assert once.get_backoff_time() == pytest.approx(0.1)
    twice = once.increment("RESOURCE_EXHAUSTED")
    assert twice.get_backoff_time() == pytest.approx(0.2)
    assert not twice.can_retry("UNAVAILABLE")  # budget of 2 spent
    assert twice.increment("UNAVAILABLE").is_exhausted()
    capped = Retry(total=10, backoff_factor=0.1, backoff_max=0.3, jitter="none")
    for _ in range(6):
        capped = capped.increment("UNAVAILABLE")
    assert capped.get_backoff_time() == pytest.approx(0.3)


def test_retry_jitter_stays_within_the_capped_backoff() -> None:
    retry = Retry(total=5, backoff_factor=0.1, backoff_max=0.25).increment("UNAVAILABLE")
    retry = retry.increment("UNAVAILABLE").increment("UNAVAILABLE")  # cap min(0.25, 0.4)
    rng = random.Random(0)
    waits = [retry.get_backoff_time(rng) for _ in range(200)]
    assert all(0.0 <= w <= 0.25 for w in waits)
    assert max(waits) > 0.2 and min(waits) < 0.05  # spread out, not a constant


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"total": -1}, "total"),
        ({"backoff_factor": -1}, "backoff_factor"),
        ({"backoff_factor": 1.0, "backoff_max": 0.5}, "backoff_max"),
        ({"jitter": "half"}, "jitter"),
    ],
)
def test_retry_config_names_the_bad_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        Retry(**kwargs)  # type: ignore[arg-type]
    assert info.value.field == field


# --- CircuitBreaker: every transition -------------------------------------------------------


def test_breaker_opens_on_failure_ratio_then_half_opens_then_closes() -> None:
    config = BreakerConfig(
        window_s=10,
        min_calls=4,
        failure_ratio=0.5,
        consecutive_failures=100,
        open_s=2.0,
        half_open_calls=1,
        close_after=2,
    )
    b = CircuitBreaker(config)
    b = b.on_success(0.0).on_success(0.1).on_failure(0.2)
    assert b.current_state(0.2) == "closed"  # 1/3, fewer than min_calls
    b = b.on_failure(0.25)  # 2/4 = 0.5
    assert b.current_state(0.25) == "open" and not b.allows(1.0)
    assert b.current_state(2.25) == "half_open" and b.allows(2.3)
    trial = b.before_call(2.3)
    assert not trial.allows(2.3)  # one trial at a time
    trial = trial.on_success(2.4)
    assert trial.current_state(2.4) == "half_open" and trial.allows(2.4)
    closed = trial.before_call(2.5).on_success(2.5)
    assert closed.current_state(2.5) == "closed" and closed.outcomes == ()


def test_breaker_half_open_failure_reopens_and_consecutive_failures_open() -> None:
    config = BreakerConfig(min_calls=100, consecutive_failures=3, open_s=1.0)
    b = CircuitBreaker(config).on_failure(0).on_failure(0.1)
    assert b.current_state(0.1) == "closed"
    b = b.on_failure(0.2)
    assert b.current_state(0.2) == "open"
    b = b.before_call(1.5).on_failure(1.5)
    assert b.current_state(1.5) == "open" and b.opened_at == 1.5
    assert b.current_state(2.49) == "open" and b.current_state(2.5) == "half_open"


def test_breaker_window_forgets_old_outcomes() -> None:
    config = BreakerConfig(window_s=1.0, min_calls=2, failure_ratio=0.5, consecutive_failures=99)
    b = CircuitBreaker(config).on_failure(0.0).on_success(0.5)
    b = b.on_success(5.0).on_failure(5.1)  # the old failure fell out of the window: 1/2
    assert b.current_state(5.1) == "open"
    b2 = CircuitBreaker(config).on_failure(0.0).on_success(5.0).on_success(5.1).on_failure(5.2)
    assert b2.current_state(5.2) == "closed"  # 1/3 in the window
    assert b2.counts() == (3, 1)
    # However many calls the window holds, it is a handful of counters.
    busy = CircuitBreaker(config)
    for i in range(10_000):
        busy = busy.on_success(i * 0.001)
    assert len(busy.outcomes) <= config.buckets and busy.counts()[0] <= 1001


def test_breaker_config_validation() -> None:
    with pytest.raises(ConfigError) as info:
        BreakerConfig(failure_ratio=0)
    assert info.value.field == "failure_ratio"
    with pytest.raises(ConfigError) as info:
        BreakerConfig(buckets=0)
    assert info.value.field == "buckets"


# --- the cloud client against a real gRPC server ---------------------------------------------


def _client(*addresses: str, **kwargs: object) -> CloudClient:
    config = CloudConfig(endpoints=tuple(addresses), **kwargs)  # type: ignore[arg-type]
    return CloudClient(config, "digits")


def test_cloud_call_roundtrip_and_bearer_token(v2: V2Server) -> None:
    v2.script.token = "s3cret"
    client = _client(v2.address, token="s3cret")
    answer = client.infer({"pixels": X})
    np.testing.assert_allclose(answer.outputs["logits"], default_compute({"pixels": X})["logits"])
    assert answer.model_version == "7" and answer.attempts == 1
    assert v2.servicer.metadata_seen[-1]["authorization"] == "Bearer s3cret"
    wrong = _client(v2.address, token="nope", retry=Retry.disabled())
    with pytest.raises(CloudRejectedError) as info:
        wrong.infer({"pixels": X})
    assert info.value.code == "UNAUTHENTICATED"
    client.close()
    wrong.close()


def test_retries_unavailable_then_succeeds(v2: V2Server) -> None:
    v2.script.fail_next = ["UNAVAILABLE", "RESOURCE_EXHAUSTED"]
    lenient = BreakerConfig(min_calls=100, consecutive_failures=100)
    client = _client(
        v2.address, retry=Retry(total=2, backoff_factor=0.01, backoff_max=0.02), breaker=lenient
    )
    answer = client.infer({"pixels": X})
    assert answer.attempts == 3 and v2.servicer.infer_calls == 3
    v2.script.fail_next = ["UNAVAILABLE"] * 3
    with pytest.raises(CloudUnavailableError):
        client.infer({"pixels": X})
    assert v2.servicer.infer_calls == 6  # 1 + 2 retries, then it gave up
    client.close()


def test_invalid_argument_is_not_retried_and_is_an_input_error(v2: V2Server) -> None:
    v2.script.fail_next = ["INVALID_ARGUMENT"]
    client = _client(v2.address, retry=Retry(total=3, backoff_factor=0.01, backoff_max=0.02))
    with pytest.raises(CloudInputError) as info:
        client.infer({"pixels": X})
    assert isinstance(info.value, InputError) and info.value.code == "INVALID_ARGUMENT"
    assert v2.servicer.infer_calls == 1
    assert client.breaker_states()[v2.address] == "closed"  # a client error is no outage
    client.close()


def test_deadline_exceeded_is_a_timeout(v2: V2Server) -> None:
    v2.script.delay_s = 0.3
    client = _client(v2.address, timeout_ms=50)
    start = time.monotonic()
    with pytest.raises(CloudTimeoutError):
        client.infer({"pixels": X})
    assert time.monotonic() - start < 0.25
    client.close()


def test_breaker_opens_refuses_without_calling_then_recovers(v2: V2Server) -> None:
    breaker = BreakerConfig(consecutive_failures=3, min_calls=100, open_s=0.3, close_after=1)
    client = _client(v2.address, retry=Retry.disabled(), breaker=breaker)
    v2.script.fail_always = "UNAVAILABLE"
    for _ in range(3):
        with pytest.raises(CloudUnavailableError):
            client.infer({"pixels": X})
    assert client.breaker_states()[v2.address] == "open"
    calls = v2.servicer.infer_calls
    with pytest.raises(CircuitOpenError):
        client.infer({"pixels": X})
    assert v2.servicer.infer_calls == calls  # refused locally, the server saw nothing
    v2.script.fail_always = None
    wait_until(lambda: client.breaker_states()[v2.address] == "half_open", timeout=5)
    client.infer({"pixels": X})
    assert client.breaker_states()[v2.address] == "closed"
    client.close()


def test_calls_spread_over_endpoints_and_skip_unhealthy_ones(
    v2_factory: object,
) -> None:
    a, b = v2_factory(), v2_factory()  # type: ignore[operator]
    client = _client(a.address, b.address, retry=Retry.disabled())
    for _ in range(10):
        client.infer({"pixels": X})
    assert a.servicer.infer_calls == 5 and b.servicer.infer_calls == 5

    # A dead endpoint: its failures are retried on the live one, then its breaker opens and
    # it is skipped altogether.
    dead = f"127.0.0.1:{free_port()}"
    breaker = BreakerConfig(consecutive_failures=2, min_calls=100, open_s=60)
    client2 = _client(
        dead, a.address, retry=Retry(total=1, backoff_factor=0.0, backoff_max=0.0), breaker=breaker
    )
    before = a.servicer.infer_calls
    for _ in range(10):
        assert client2.infer({"pixels": X}).endpoint == a.address
    assert a.servicer.infer_calls - before == 10
    assert client2.breaker_states()[dead] == "open"
    client.close()
    client2.close()


def test_async_client_retries_and_translates(v2: V2Server) -> None:
    async def main() -> None:
        client = _client(v2.address, retry=Retry(total=2, backoff_factor=0.01, backoff_max=0.02))
        v2.script.fail_next = ["UNAVAILABLE"]
        answer = await client.ainfer({"pixels": X})
        assert answer.attempts == 2
        v2.script.fail_next = ["NOT_FOUND"]
        with pytest.raises(CloudRejectedError) as info:
            await client.ainfer({"pixels": X})
        assert info.value.code == "NOT_FOUND"
        v2.script.delay_s = 0.3
        with pytest.raises(CloudTimeoutError):
            await client.ainfer({"pixels": X}, timeout_ms=50)
        await client.aclose()

    asyncio.run(main())


def test_cloud_config_validation() -> None:
    for kwargs, field in (
        ({"endpoints": ()}, "endpoints"),
        ({"endpoints": ("nohostport",)}, "endpoints"),
        ({"endpoints": ("h:1",), "timeout_ms": 0}, "timeout_ms"),
        ({"endpoints": ("h:1",), "token": " "}, "token"),
        ({"endpoints": ("h:1",), "root_certificates": "ca.pem"}, "root_certificates"),
    ):
        with pytest.raises(ConfigError) as info:
            CloudConfig(**kwargs)  # type: ignore[arg-type]
        assert info.value.field == field


def test_tls_with_a_pinned_ca_and_server_name(tmp_path: Path) -> None:
    key, cert = self_signed("tandem-test")
    server = V2Server(tls=(key, cert))
    try:
        ca = tmp_path / "ca.pem"
        ca.write_bytes(cert)
        client = _client(
            server.address,
            tls=True,
            root_certificates=str(ca),
            server_name="tandem-test",
            token="t",
        )
        answer = client.infer({"pixels": X})
        assert answer.outputs["logits"].shape == (4, 10)
        assert server.servicer.metadata_seen[-1]["authorization"] == "Bearer t"
        client.close()
        # Plaintext against a TLS server, or TLS trusting another CA, does not connect.
        _, other = self_signed("someone-else")
        wrong_ca = tmp_path / "other.pem"
        wrong_ca.write_bytes(other)
        for kwargs in (
            {},
            {"tls": True, "root_certificates": str(wrong_ca), "server_name": "tandem-test"},
        ):
            bad = _client(server.address, retry=Retry.disabled(), timeout_ms=1000, **kwargs)
            with pytest.raises(CloudUnavailableError):
                bad.infer({"pixels": X})
            bad.close()
    finally:
        server.stop()
