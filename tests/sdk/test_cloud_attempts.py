"""The cloud client's attempts (one IO-free object) and the sync/async senders around it."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import numpy as np
import pytest

from tandem.errors import CloudRejectedError, CloudTimeoutError, CloudUnavailableError
from tandem.sdk import cloud as cloud_module
from tandem.sdk.cloud import Attempts, CloudClient, CloudConfig, status_name
from tandem.sdk.resilience import Retry
from tests.sdk.v2double import V2Server

X = np.random.default_rng(3).uniform(0, 16, (4, 64)).astype(np.float32)


class Failure(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return "scripted"


def _client(address: str = "127.0.0.1:9", **kwargs: Any) -> CloudClient:
    return CloudClient(CloudConfig(endpoints=(address,), **kwargs), "digits")


def test_attempts_back_off_within_the_deadline_then_stop_without_io() -> None:
    client = _client(retry=Retry(total=2, backoff_factor=10.0, backoff_max=10.0, jitter="none"))
    attempts = Attempts(client, time.monotonic() + 0.5)
    endpoint, timeout = attempts.next()
    assert endpoint is client.endpoints[0] and 0 < timeout <= 0.5
    wait = attempts.failed(endpoint, Failure(grpc.StatusCode.UNAVAILABLE))
    assert 0 < wait <= 0.5  # the 10 s backoff is cut to what is left of the deadline
    attempts.failed(endpoint, Failure(grpc.StatusCode.RESOURCE_EXHAUSTED))
    with pytest.raises(CloudUnavailableError):  # the retry budget of 2 is spent
        attempts.failed(endpoint, Failure(grpc.StatusCode.UNAVAILABLE))
    with pytest.raises(CloudRejectedError):  # never retried
        Attempts(client, time.monotonic() + 1).failed(endpoint, Failure(grpc.StatusCode.INTERNAL))
    with pytest.raises(CloudTimeoutError):
        Attempts(client, time.monotonic() - 0.001).next()


def test_status_name_reads_every_rpc_error_the_same_way() -> None:
    assert status_name(Failure(grpc.StatusCode.ABORTED)) == "ABORTED"
    assert status_name(grpc.RpcError()) == "UNKNOWN"  # no code() at all


class _NoCodeStub:
    """A channel that fails with a bare RpcError (no code(), no details())."""

    def __init__(self, is_async: bool) -> None:
        self.is_async = is_async

    def ModelInfer(self, *args: Any, **kwargs: Any) -> Any:
        if not self.is_async:
            raise grpc.RpcError()

        async def fail() -> None:
            raise grpc.RpcError()

        return fail()

    ModelMetadata = ModelInfer


def test_a_rpc_error_without_a_code_is_rejected_in_both_paths() -> None:
    """The sync path used to call exc.code() unguarded and crash with AttributeError."""
    client = _client()
    endpoint = client.endpoints[0]
    endpoint._stub = _NoCodeStub(is_async=False)
    with pytest.raises(CloudRejectedError, match="UNKNOWN"):
        client.infer({"pixels": X})

    async def main() -> None:
        endpoint._aio_stub = _NoCodeStub(is_async=True)
        endpoint._aio_loop = asyncio.get_running_loop()
        with pytest.raises(CloudRejectedError, match="UNKNOWN"):
            await client.ainfer({"pixels": X})

    asyncio.run(main())
    with pytest.raises(CloudRejectedError, match="UNKNOWN"):
        client.metadata()


def test_chunks_of_a_split_batch_share_one_deadline_sync_and_async(
    v2: V2Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each chunk spends 0.2 s before its call (a slow encode); two chunks cannot fit in 0.3 s.

    The async path used to give every chunk the full deadline, counted from its own start."""
    encode = cloud_module.encode_request

    def slow_encode(*args: Any) -> Any:
        time.sleep(0.2)
        return encode(*args)

    monkeypatch.setattr(cloud_module, "encode_request", slow_encode)
    client = _client(v2.address, max_batch_rows=2, timeout_ms=300.0)
    with pytest.raises(CloudTimeoutError):
        client.infer({"pixels": X})
    with pytest.raises(CloudTimeoutError):
        asyncio.run(client.ainfer({"pixels": X}))
    monkeypatch.setattr(cloud_module, "encode_request", encode)
    answer = asyncio.run(client.ainfer({"pixels": X}))
    assert all(len(output) == 4 for output in answer.outputs.values())
    client.close()
