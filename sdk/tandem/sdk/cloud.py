"""The cloud client: Open Inference Protocol (V2) over gRPC, sync and async.

One `CloudClient` talks to one or more endpoints. Calls spread round-robin over the endpoints
whose circuit breaker lets them through; a retryable failure (UNAVAILABLE, RESOURCE_EXHAUSTED,
ABORTED: the server did not run the request) is retried on the next endpoint after a capped,
jittered exponential backoff, within the call's one overall deadline. Tensors travel as
`raw_input_contents` (little-endian bytes, no per-element encoding). grpc's exceptions are
translated into the `CloudError` branch at this boundary.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from tandem.errors import (
    ArtifactError,
    CloudError,
    CloudRejectedError,
    CloudTimeoutError,
    CloudUnavailableError,
    ConfigError,
)
from tandem.protos.inference import grpc_predict_v2_pb2 as pb
from tandem.protos.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from tandem.sdk.artifacts import TensorSpec
from tandem.sdk.datatypes import CONTENTS_FIELDS, DATATYPES, datatype_of
from tandem.sdk.errors import CircuitOpenError, CloudInputError
from tandem.sdk.resilience import DEFAULT_FAILURE_CODES, BreakerConfig, CircuitBreaker, Retry

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray[Any, Any]]


@dataclass(frozen=True)
class CloudConfig:
    """Where the cloud tier is and how to call it."""

    endpoints: tuple[str, ...]  # "host:port", one or more
    model: str = ""  # model name on the server ("" = the client's model name)
    model_version: str = ""  # "" = the server's default version
    timeout_ms: float = 2000.0  # per-call deadline, retries included (milliseconds)
    token: str | None = None  # bearer token sent as `authorization: Bearer <token>`
    tls: bool = False  # use TLS (system roots unless root_certificates is set)
    root_certificates: str | None = None  # PEM file path of the CA to trust
    server_name: str | None = None  # TLS name to check when it differs from the host
    retry: Retry = field(default_factory=Retry)
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    max_message_bytes: int = 64 << 20  # gRPC send/receive limit (bytes)
    max_batch_rows: int | None = None  # split larger batches into calls of this many rows
    # Longest wait between reconnect attempts to a dead endpoint. gRPC's own default grows
    # to 120 s, so a server back after a restart stayed unused long after its breaker let
    # calls through again; bounded, it is found again within this (plus the breaker's open_s).
    reconnect_backoff_max_ms: float = 500.0

    def __post_init__(self) -> None:
        if isinstance(self.endpoints, str):
            object.__setattr__(self, "endpoints", (self.endpoints,))
        if not self.endpoints:
            raise ConfigError("endpoints", "at least one host:port is needed")
        for endpoint in self.endpoints:
            host, sep, port = endpoint.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ConfigError("endpoints", f"{endpoint!r} is not host:port")
        if self.timeout_ms <= 0:
            raise ConfigError("timeout_ms", f"must be > 0 milliseconds, got {self.timeout_ms}")
        if self.token is not None and not self.token.strip():
            raise ConfigError("token", "is empty")
        if self.root_certificates is not None and not self.tls:
            raise ConfigError("root_certificates", "given but tls is False")
        if self.max_message_bytes <= 0:
            raise ConfigError("max_message_bytes", "must be > 0 bytes")
        if self.max_batch_rows is not None and self.max_batch_rows < 1:
            raise ConfigError("max_batch_rows", f"must be >= 1, got {self.max_batch_rows}")
        if self.reconnect_backoff_max_ms < 100:
            raise ConfigError("reconnect_backoff_max_ms", "must be >= 100 milliseconds")


@dataclass(frozen=True)
class CloudAnswer:
    outputs: Arrays
    endpoint: str
    model_version: str
    attempts: int
    elapsed_ms: float


def status_name(exc: grpc.RpcError) -> str:
    """The gRPC status name of a failed call; UNKNOWN when the error carries none."""
    code = exc.code() if callable(getattr(exc, "code", None)) else None
    return code.name if code is not None else "UNKNOWN"


def translate(exc: grpc.RpcError, endpoint: str) -> CloudError:
    """grpc's error -> ours, most specific first."""
    name = status_name(exc)
    details = exc.details() if hasattr(exc, "details") else str(exc)
    message = f"{endpoint}: {name}: {details}"
    if name == "DEADLINE_EXCEEDED":
        return CloudTimeoutError(message)
    if name == "UNAVAILABLE":
        return CloudUnavailableError(message)
    if name == "INVALID_ARGUMENT":
        return CloudInputError(message, code=name)
    return CloudRejectedError(message, code=name)


def encode_request(model: str, version: str, feeds: Mapping[str, np.ndarray[Any, Any]]) -> Any:
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    for name, array in feeds.items():
        datatype = datatype_of(array.dtype)
        if datatype is None:
            raise ArtifactError(
                f"input {name!r}: numpy dtype {array.dtype} has no Open Inference Protocol datatype"
            )
        request.inputs.add(name=name, datatype=datatype, shape=array.shape)
        request.raw_input_contents.append(
            array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        )
    return request


def decode_response(response: Any) -> Arrays:
    outputs: Arrays = {}
    raw = response.raw_output_contents
    for i, tensor in enumerate(response.outputs):
        dtype = DATATYPES.get(tensor.datatype)
        if dtype is None:
            raise CloudRejectedError(
                f"output {tensor.name!r}: unsupported datatype {tensor.datatype}"
            )
        shape = tuple(tensor.shape)
        if i < len(raw):
            array = np.frombuffer(raw[i], dtype=dtype.newbyteorder("<")).astype(dtype, copy=False)
        else:
            values = getattr(tensor.contents, CONTENTS_FIELDS.get(tensor.datatype, "fp32_contents"))
            array = np.asarray(values, dtype=dtype)
        try:
            outputs[tensor.name] = array.reshape(shape)
        except ValueError as exc:
            raise CloudRejectedError(
                f"output {tensor.name!r}: {array.size} values do not fit shape {list(shape)}"
            ) from exc
    return outputs


class Endpoint:
    """One server address: its channels, stubs and breaker."""

    def __init__(self, address: str, config: CloudConfig) -> None:
        self.address = address
        self.config = config
        self.breaker = CircuitBreaker(config.breaker)
        self.lock = threading.Lock()
        self._options: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.enable_retries", 0),  # retries are ours, with our breaker in the loop
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", int(config.reconnect_backoff_max_ms)),
        ]
        if config.server_name:
            self._options.append(("grpc.ssl_target_name_override", config.server_name))
        self._channel: grpc.Channel | None = None
        self._stub: Any = None
        self._aio_channel: Any = None
        self._aio_stub: Any = None
        self._aio_loop: asyncio.AbstractEventLoop | None = None

    def _credentials(self) -> grpc.ChannelCredentials:
        roots = (
            Path(self.config.root_certificates).read_bytes()
            if self.config.root_certificates
            else None
        )
        return grpc.ssl_channel_credentials(root_certificates=roots)

    @property
    def stub(self) -> Any:
        if self._stub is None:
            with self.lock:
                if self._stub is None:
                    if self.config.tls:
                        channel = grpc.secure_channel(
                            self.address, self._credentials(), self._options
                        )
                    else:
                        channel = grpc.insecure_channel(self.address, self._options)
                    self._channel = channel
                    self._stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        return self._stub

    def aio_stub(self) -> Any:
        loop = asyncio.get_running_loop()
        if self._aio_stub is None or self._aio_loop is not loop:
            if self.config.tls:
                channel = grpc.aio.secure_channel(self.address, self._credentials(), self._options)
            else:
                channel = grpc.aio.insecure_channel(self.address, self._options)
            self._aio_channel, self._aio_loop = channel, loop
            self._aio_stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        return self._aio_stub

    # Breaker transitions: each swaps in the next immutable value under the lock.
    def admit(self, now: float) -> bool:
        with self.lock:
            if not self.breaker.allows(now):
                return False
            self.breaker = self.breaker.before_call(now)
            return True

    def record(self, code: str | None, now: float) -> None:
        with self.lock:
            if code is None:
                self.breaker = self.breaker.on_success(now)
            elif code in DEFAULT_FAILURE_CODES:
                self.breaker = self.breaker.on_failure(now)
            else:
                self.breaker = self.breaker.on_ignored(now)

    def state(self) -> str:
        return self.breaker.current_state(time.monotonic())

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
        self._channel = self._stub = None

    async def aclose(self) -> None:
        if self._aio_channel is not None:
            await self._aio_channel.close()
        self._aio_channel = self._aio_stub = None


class Attempts:
    """One request's attempts: endpoint choice, deadline, retries and backoff, without IO.

    The sync and async senders ask `next()` for where to send and with what timeout, and
    report how the attempt ended; `failed` answers the seconds to back off before the next
    attempt, or raises the translated error when there is to be none.
    """

    def __init__(self, client: CloudClient, deadline: float) -> None:
        self.client = client
        self.deadline = deadline  # time.monotonic() seconds, shared by every attempt
        self.retry = client.config.retry
        self.start = time.perf_counter()
        self.last: Endpoint | None = None

    def next(self) -> tuple[Endpoint, float]:
        now = time.monotonic()
        remaining = self.deadline - now
        if remaining <= 0:
            raise CloudTimeoutError(
                f"cloud deadline spent after {len(self.retry.history)} attempts"
            )
        self.last = self.client.pick(now, self.last)
        return self.last, remaining

    def failed(self, endpoint: Endpoint, exc: grpc.RpcError) -> float:
        code = status_name(exc)
        endpoint.record(code, time.monotonic())
        if not self.retry.can_retry(code):
            raise translate(exc, endpoint.address) from exc
        self.retry = self.retry.increment(code)
        left = max(0.0, self.deadline - time.monotonic())
        wait = min(self.retry.get_backoff_time(self.client.rng), left)
        log.debug("retrying after %s from %s in %.3fs", code, endpoint.address, wait)
        return wait

    def cancelled(self, endpoint: Endpoint) -> None:
        endpoint.record("CANCELLED", time.monotonic())

    def succeeded(self, endpoint: Endpoint, response: Any) -> CloudAnswer:
        endpoint.record(None, time.monotonic())
        self.client.calls += 1
        return CloudAnswer(
            decode_response(response),
            endpoint.address,
            response.model_version,
            len(self.retry.history) + 1,
            (time.perf_counter() - self.start) * 1e3,
        )


class CloudClient:
    """Calls `ModelInfer` on the cloud tier with deadlines, retries and breakers."""

    def __init__(self, config: CloudConfig, model: str) -> None:
        self.config = config
        self.model = config.model or model
        self.endpoints = [Endpoint(a, config) for a in config.endpoints]
        self._rr = itertools.count()
        self.rng = random.Random()
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {config.token}"),) if config.token else ()
        )
        self.calls = 0

    def breaker_states(self) -> dict[str, str]:
        return {e.address: e.state() for e in self.endpoints}

    def available(self) -> bool:
        now = time.monotonic()
        return any(e.breaker.allows(now) for e in self.endpoints)

    def pick(self, now: float, avoid: Endpoint | None) -> Endpoint:
        n = len(self.endpoints)
        start = next(self._rr)
        fallback: Endpoint | None = None
        for i in range(n):
            endpoint = self.endpoints[(start + i) % n]
            if endpoint is avoid and n > 1:
                fallback = endpoint
                continue
            if endpoint.admit(now):
                return endpoint
        if fallback is not None and fallback.admit(now):
            return fallback
        states = ", ".join(f"{e.address}={e.state()}" for e in self.endpoints)
        raise CircuitOpenError(f"no cloud endpoint may be called: breakers {states}")

    @property
    def call_metadata(self) -> tuple[tuple[str, str], ...]:
        """The metadata every call carries (the bearer token), for the generation calls."""
        return self._metadata

    def generation_endpoint(self) -> Endpoint:
        """Where a generation goes: the first endpoint whose breaker allows a call (a token
        stream is one long call; its fallback is the generation policy's, not a retry)."""
        now = time.monotonic()
        for endpoint in self.endpoints:
            if endpoint.breaker.allows(now):
                return endpoint
        return self.endpoints[0]

    def _deadline(self, timeout_ms: float | None) -> float:
        return time.monotonic() + (timeout_ms or self.config.timeout_ms) / 1e3

    def _chunks(self, feeds: Mapping[str, np.ndarray[Any, Any]]) -> list[Arrays]:
        limit = self.config.max_batch_rows
        rows = next(iter(feeds.values())).shape[0] if feeds else 0
        if limit is None or rows <= limit:
            return [dict(feeds)]
        return [{k: v[i : i + limit] for k, v in feeds.items()} for i in range(0, rows, limit)]

    @staticmethod
    def _join(answers: Sequence[CloudAnswer], elapsed_ms: float) -> CloudAnswer:
        first = answers[0]
        if len(answers) == 1:
            return first
        outputs = {
            name: np.concatenate([a.outputs[name] for a in answers]) for name in first.outputs
        }
        attempts = sum(a.attempts for a in answers)
        return CloudAnswer(outputs, first.endpoint, first.model_version, attempts, elapsed_ms)

    def infer(
        self, feeds: Mapping[str, np.ndarray[Any, Any]], *, timeout_ms: float | None = None
    ) -> CloudAnswer:
        start, deadline = time.perf_counter(), self._deadline(timeout_ms)
        # One deadline for the whole request, spent across its chunks.
        answers = [self._send(chunk, Attempts(self, deadline)) for chunk in self._chunks(feeds)]
        return self._join(answers, (time.perf_counter() - start) * 1e3)

    def _send(self, feeds: Arrays, attempts: Attempts) -> CloudAnswer:
        request = encode_request(self.model, self.config.model_version, feeds)
        while True:
            endpoint, timeout = attempts.next()
            try:
                response = endpoint.stub.ModelInfer(
                    request, timeout=timeout, metadata=self._metadata
                )
            except grpc.RpcError as exc:
                time.sleep(attempts.failed(endpoint, exc))  # raises when it may not retry
            else:
                return attempts.succeeded(endpoint, response)

    async def ainfer(
        self, feeds: Mapping[str, np.ndarray[Any, Any]], *, timeout_ms: float | None = None
    ) -> CloudAnswer:
        start, deadline = time.perf_counter(), self._deadline(timeout_ms)
        chunks = self._chunks(feeds)
        if len(chunks) == 1:
            return await self._asend(chunks[0], Attempts(self, deadline))
        tasks = [asyncio.ensure_future(self._asend(c, Attempts(self, deadline))) for c in chunks]
        try:  # the chunks run at once under the one deadline
            answers = await asyncio.gather(*tasks)
        finally:
            for task in tasks:  # the first failure ends the call: the others are not needed
                task.cancel()
        return self._join(answers, (time.perf_counter() - start) * 1e3)

    async def _asend(self, feeds: Arrays, attempts: Attempts) -> CloudAnswer:
        request = encode_request(self.model, self.config.model_version, feeds)
        while True:
            endpoint, timeout = attempts.next()
            stub = endpoint.aio_stub()
            try:
                response = await stub.ModelInfer(request, timeout=timeout, metadata=self._metadata)
            except grpc.RpcError as exc:
                await asyncio.sleep(attempts.failed(endpoint, exc))
            except asyncio.CancelledError:
                attempts.cancelled(endpoint)
                raise
            else:
                return attempts.succeeded(endpoint, response)

    def metadata(
        self, timeout_ms: float | None = None
    ) -> tuple[list[TensorSpec], list[TensorSpec]]:
        """The model's inputs and outputs as the server describes them."""
        endpoint = self.pick(time.monotonic(), None)
        try:
            response = endpoint.stub.ModelMetadata(
                pb.ModelMetadataRequest(name=self.model, version=self.config.model_version),
                timeout=(timeout_ms or self.config.timeout_ms) / 1e3,
                metadata=self._metadata,
            )
        except grpc.RpcError as exc:
            endpoint.record(status_name(exc), time.monotonic())
            raise translate(exc, endpoint.address) from exc
        endpoint.record(None, time.monotonic())

        def specs(items: Sequence[Any]) -> list[TensorSpec]:
            return [TensorSpec(t.name, t.datatype, tuple(int(d) for d in t.shape)) for t in items]

        return specs(response.inputs), specs(response.outputs)

    def close(self) -> None:
        for endpoint in self.endpoints:
            endpoint.close()

    async def aclose(self) -> None:
        for endpoint in self.endpoints:
            await endpoint.aclose()
        self.close()
