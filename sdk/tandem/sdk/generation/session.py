"""Text generation under a policy: one state machine, driven by a sync and an async driver.

`plan(...)` is a generator that yields *operations* (`Local`, `Verify`, `Open`, `Next`,
`Close`) and *tokens* (`Token`). `run_sync` and `run_async` perform the operations (blocking,
or awaited over grpc.aio with local compute in a thread), send their results back in, and hand
the tokens to the caller. The two drivers hold no policy logic, so `generate` and `agenerate`
cannot drift apart.

Policies (their meaning is the same as for `infer`):

- local_only: the device's generative variant decodes greedily.
- cloud_only: the server streams tokens (gRPC ModelStreamInfer).
- prefer_local: local when the device has a generative variant, else the cloud.
- prefer_cloud: the cloud; when the stream fails, the device continues from the tokens
  already produced.
- cascade: local, until the mean confidence (max softmax probability) over the last
  `window` tokens falls below `threshold`; then the cloud continues the sequence.
- speculative: the device drafts k tokens, the server verifies them (the verify call, a
  server-side sequence); k grows by one after a fully accepted draft and halves after a
  rejection in its first half, within 1..16. Greedy output equals cloud_only's.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from tandem.errors import CloudError, ConfigError, InputError, TandemError
from tandem.protos.inference import grpc_predict_v2_pb2 as pb

POLICIES = ("local_only", "cloud_only", "prefer_local", "prefer_cloud", "cascade", "speculative")
GENERATION_ONLY = ("speculative",)  # not a policy of infer()
CLOUD_POLICIES = ("cloud_only", "prefer_cloud", "speculative")
LOCAL_POLICIES = ("local_only", "cascade", "speculative")
DEFAULT_CASCADE_THRESHOLD = 0.5  # mean max-prob below which the cloud takes over
DEFAULT_CASCADE_WINDOW = 8  # tokens the running confidence is taken over
MIN_DRAFT, MAX_DRAFT = 1, 16
_ids = itertools.count(1)


@dataclass(frozen=True)
class Token:
    id: int
    text: str
    source: str  # "local" | "cloud"


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    tokens_by_source: dict[str, int]
    ttft_ms: float | None
    tokens_per_s: float
    stop_reason: str  # "stop" (an end token), "length" (max_tokens)
    policy: str
    drafted: int = 0
    accepted: int = 0
    round_trips: int = 0
    mean_accepted_block: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0
    escalated: bool = False  # cascade handed over / prefer_cloud fell back
    seconds: float = 0.0


# --- operations the drivers perform -----------------------------------------------------


@dataclass(frozen=True)
class Local:
    """Blocking local compute: fn() -> value."""

    fn: Callable[[], Any]


@dataclass(frozen=True)
class Verify:
    request: Any  # pb.ModelInferRequest -> pb.ModelInferResponse


@dataclass(frozen=True)
class VerifyWhile:
    """A verify call with blocking local compute overlapped: -> the verify response. fn's
    value is dropped; when it raises, that is raised once the call is back."""

    request: Any
    fn: Callable[[], Any]


@dataclass(frozen=True)
class Open:
    request: Any  # pb.ModelInferRequest -> a stream handle


@dataclass(frozen=True)
class Next:
    handle: Any  # -> pb.ModelStreamInferResponse, or None at the end


@dataclass(frozen=True)
class Close:
    handle: Any


Op = Local | Verify | VerifyWhile | Open | Next | Close


class StreamFailed(CloudError):
    """The cloud's token stream ended in an error (transport or the server's message)."""


class Abandoned(Exception):
    """Thrown into a plan whose caller stopped reading, so that it frees what it holds."""


# --- wire -------------------------------------------------------------------------------


def _ids_tensor(request: Any, name: str, ids: Sequence[int]) -> None:
    tensor = request.inputs.add()
    tensor.name, tensor.datatype = name, "INT64"
    tensor.shape.append(len(ids))
    tensor.contents.int64_contents.extend(int(i) for i in ids)


def stream_request(model: str, ids: Sequence[int], max_tokens: int, text: str = "") -> Any:
    """A ModelStreamInfer request: the token ids, or (no tokenizer here) the text."""
    request = pb.ModelInferRequest(model_name=model, id=f"g{next(_ids)}")
    if ids or not text:
        _ids_tensor(request, "input_ids", ids)
    else:
        tensor = request.inputs.add()
        tensor.name, tensor.datatype = "text_input", "BYTES"
        tensor.shape.append(1)
        tensor.contents.bytes_contents.append(text.encode())
    request.parameters["max_tokens"].int64_param = int(max_tokens)
    return request


def verify_request(
    model: str,
    sequence_id: str,
    draft: Sequence[int],
    *,
    prompt: Sequence[int] = (),
    start: bool = False,
    end: bool = False,
) -> Any:
    request = pb.ModelInferRequest(model_name=model, id=sequence_id)
    request.parameters["sequence_id"].string_param = sequence_id
    request.parameters["sequence_start"].bool_param = start
    request.parameters["sequence_end"].bool_param = end
    _ids_tensor(request, "draft_ids", draft)
    if start:
        _ids_tensor(request, "prompt_ids", prompt)
    return request


def _output(response: Any, name: str) -> int:
    for out in response.outputs:
        if out.name == name:
            return int(out.contents.int64_contents[0])
    raise CloudError(f"the verify answer has no output {name!r}")


def _prefill(generator: Any, prompt: Sequence[int], draft_one: bool) -> None:
    """The device's prompt into its cache (computing the cache also drafts one token)."""
    generator.start(list(prompt))
    if draft_one:
        generator.draft(1)


# --- the state machine ------------------------------------------------------------------


@dataclass
class Settings:
    policy: str
    model: str
    max_tokens: int
    has_local: bool
    has_cloud: bool
    cascade_threshold: float = DEFAULT_CASCADE_THRESHOLD
    cascade_window: int = DEFAULT_CASCADE_WINDOW
    draft_tokens: int = 4  # the first k of speculative decoding


@dataclass
class _State:
    settings: Settings
    prompt: list[int]
    eos: frozenset[int]
    out: list[int] = field(default_factory=list)
    sources: dict[str, int] = field(default_factory=lambda: {"local": 0, "cloud": 0})
    stop_reason: str = "length"
    drafted: int = 0
    accepted: int = 0
    round_trips: int = 0
    blocks: list[int] = field(default_factory=list)
    sent: int = 0
    received: int = 0
    escalated: bool = False
    text: str = ""  # the prompt's text, sent when there are no ids (no local tokenizer)

    @property
    def remaining(self) -> int:
        return self.settings.max_tokens - len(self.out)


def check_settings(settings: Settings) -> None:
    if settings.policy not in POLICIES:
        raise ConfigError(
            "policy", f"unknown generation policy {settings.policy!r}; one of {POLICIES}"
        )
    if isinstance(settings.max_tokens, bool) or not isinstance(settings.max_tokens, int):
        raise InputError(f"max_tokens must be an integer, got {settings.max_tokens!r}")
    if settings.max_tokens <= 0:
        raise InputError(f"max_tokens must be >= 1, got {settings.max_tokens}")
    if settings.policy in CLOUD_POLICIES and not settings.has_cloud:
        raise ConfigError("cloud", f"generation policy {settings.policy!r} needs a cloud endpoint")
    if settings.policy in LOCAL_POLICIES and not settings.has_local:
        raise ConfigError(
            "artifacts", f"generation policy {settings.policy!r} needs a local generative variant"
        )
    if settings.policy == "prefer_local" and not (settings.has_local or settings.has_cloud):
        raise ConfigError("artifacts", "no local generative variant and no cloud endpoint")
    if not 0.0 <= settings.cascade_threshold <= 1.0:
        raise ConfigError(
            "cascade_threshold", f"must be in [0, 1], got {settings.cascade_threshold}"
        )
    if settings.cascade_window < 1:
        raise ConfigError("cascade_window", f"must be >= 1, got {settings.cascade_window}")
    if not MIN_DRAFT <= settings.draft_tokens <= MAX_DRAFT:
        raise ConfigError("draft_tokens", f"must be in {MIN_DRAFT}..{MAX_DRAFT}")


Plan = Generator[Op | Token, Any, None]


class Run:
    """One generation: the plan (`steps`), its state, and the result it ends with."""

    def __init__(
        self,
        settings: Settings,
        prompt: list[int],
        eos: frozenset[int],
        generator: Any,
        decode: Callable[[list[int]], str] | None,
        text: str = "",
    ) -> None:
        check_settings(settings)
        self.settings = settings
        self.state = _State(settings, prompt, eos, text=text)
        self.generator = generator
        self.decode = decode
        self._shown = ""
        self._cloud_text: list[str] = []
        self.start = time.perf_counter()
        self.first: float | None = None
        self.result: GenerationResult | None = None

    # tokens ----------------------------------------------------------------------------

    def _emit(self, token: int, source: str, cloud_text: str = "") -> Token | None:
        """Commits one token; None when it ends the sequence (not shown)."""
        state = self.state
        if token in state.eos:
            state.stop_reason = "stop"
            return None
        state.out.append(token)
        state.sources[source] += 1
        if self.first is None:
            self.first = time.perf_counter()
        if self.decode is None:
            self._cloud_text.append(cloud_text)
            return Token(token, cloud_text, source)
        text = self.decode(state.out)
        piece = text[len(self._shown) :] if text.startswith(self._shown) else ""
        if "\ufffd" in piece:
            piece = ""
        else:
            self._shown = text
        return Token(token, piece, source)

    def done(self) -> bool:
        return self.state.stop_reason == "stop" or self.state.remaining <= 0

    # legs ------------------------------------------------------------------------------

    def _local(self, confidence_gate: bool) -> Plan:
        """Greedy on the device from prompt + out; with the gate, returns early (escalation)
        when the running confidence falls below the threshold."""
        gen, state, s = self.generator, self.state, self.settings
        yield Local(lambda: gen.start([*state.prompt, *state.out]))
        confidences: list[float] = []
        while not self.done():
            token, confidence = yield Local(gen.step)
            emitted = self._emit(token, "local")
            if emitted is not None:
                yield emitted
            confidences.append(confidence)
            window = confidences[-s.cascade_window :]
            if (
                confidence_gate
                and not self.done()
                and len(window) == s.cascade_window
                and sum(window) / len(window) < s.cascade_threshold
            ):
                state.escalated = True
                return

    def _cloud(self) -> Plan:
        state, s = self.state, self.settings
        request = stream_request(s.model, [*state.prompt, *state.out], state.remaining, state.text)
        state.sent += request.ByteSize()
        handle = yield Open(request)
        try:
            while not self.done():
                response = yield Next(handle)
                if response is None:
                    raise StreamFailed("the token stream ended without a final response")
                state.received += response.ByteSize()
                if response.error_message:
                    raise StreamFailed(response.error_message)
                answer = response.infer_response
                params = answer.parameters
                if "triton_final_response" in params and params["triton_final_response"].bool_param:
                    reason = (
                        params["finish_reason"].string_param if "finish_reason" in params else ""
                    )
                    state.stop_reason = "stop" if reason == "stop" else "length"
                    return
                token, text = None, ""
                for out in answer.outputs:
                    if out.name == "token_id":
                        token = int(out.contents.int64_contents[0])
                    elif out.name == "text_output":
                        text = out.contents.bytes_contents[0].decode("utf-8", "replace")
                if token is None:
                    raise StreamFailed("a stream response without token_id")
                emitted = self._emit(token, "cloud", text)
                if emitted is not None:
                    yield emitted
        finally:
            yield Close(handle)

    def _speculative(self) -> Plan:
        """The first verify carries the prompt alone (an empty draft): the server's first
        token comes after one round trip and its prefill, while the device prefills the same
        prompt beside it (its one drafted token is dropped for the server's). Each later round
        drafts k tokens from prompt + out and verifies them in one call."""
        gen, state, s = self.generator, self.state, self.settings
        sequence = f"spec-{os.getpid()}-{next(_ids)}-{time.monotonic_ns()}"
        k = s.draft_tokens
        first, ended = True, False
        try:
            while not self.done():
                k_now = min(k, state.remaining - 1, MAX_DRAFT)
                last = k_now == 0  # the verifier's token is the last one wanted
                draft: list[int] = (
                    (yield Local(functools.partial(gen.draft, k_now)))
                    if k_now > 0 and not first
                    else []
                )
                request = verify_request(
                    s.model, sequence, draft, prompt=state.prompt, start=first, end=last
                )
                state.sent += request.ByteSize()
                if first:
                    prefill = functools.partial(_prefill, gen, state.prompt, not last)
                    response = yield VerifyWhile(request, prefill)
                else:
                    response = yield Verify(request)
                state.received += response.ByteSize()
                state.round_trips += 1
                ended = ended or last
                n, bonus = _output(response, "accepted"), _output(response, "next_token")
                state.drafted += len(draft)
                state.accepted += n
                state.blocks.append(n)
                if draft or (first and not last):  # the prefill drafted one token: dropped
                    yield Local(functools.partial(gen.accept, n, bonus))
                kept = [(t, "local") for t in draft[:n]] + [(bonus, "cloud")]
                for token, source in kept:
                    emitted = self._emit(token, source)
                    if emitted is not None:
                        yield emitted
                    if self.done():
                        break
                if draft and n == len(draft):
                    k = min(k + 1, MAX_DRAFT)
                elif draft and n < len(draft) // 2:
                    k = max(k // 2, MIN_DRAFT)
                first = False
        finally:
            if not ended:  # free the server's sequence; a failure here changes nothing
                request = verify_request(s.model, sequence, [], end=True)
                with contextlib.suppress(TandemError, grpc.RpcError, OSError):
                    yield Verify(request)

    def steps(self) -> Plan:
        s = self.settings
        policy = s.policy
        if policy == "prefer_local":
            policy = "local_only" if s.has_local else "cloud_only"
        if policy == "local_only":
            yield from self._local(confidence_gate=False)
        elif policy == "cloud_only":
            yield from self._cloud()
        elif policy == "cascade":
            yield from self._local(confidence_gate=True)
            if not self.done() and self.state.escalated:
                if s.has_cloud:
                    yield from self._cloud()
                else:  # nowhere to escalate to: the device goes on
                    yield from self._local(confidence_gate=False)
        elif policy == "prefer_cloud":
            try:
                yield from self._cloud()
            except (CloudError, grpc.RpcError):
                if not s.has_local:
                    raise
                self.state.escalated = True
                yield from self._local(confidence_gate=False)
        else:
            yield from self._speculative()
        self._finish()

    def _finish(self) -> None:
        state = self.state
        end = time.perf_counter()
        seconds = end - self.start
        text = self.decode(state.out) if self.decode is not None else "".join(self._cloud_text)
        self.result = GenerationResult(
            text=text,
            token_ids=list(state.out),
            tokens_by_source={k: v for k, v in state.sources.items()},
            ttft_ms=1000 * (self.first - self.start) if self.first is not None else None,
            tokens_per_s=len(state.out) / seconds if seconds > 0 else 0.0,
            stop_reason=state.stop_reason,
            policy=self.settings.policy,
            drafted=state.drafted,
            accepted=state.accepted,
            round_trips=state.round_trips,
            mean_accepted_block=(sum(state.blocks) / len(state.blocks)) if state.blocks else 0.0,
            bytes_sent=state.sent,
            bytes_received=state.received,
            escalated=state.escalated,
            seconds=seconds,
        )


# --- drivers ----------------------------------------------------------------------------


def _translate(exc: grpc.RpcError) -> CloudError:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return StreamFailed(f"cloud generation failed: {getattr(code, 'name', code)}: {details}")


class SyncCloud:
    """Blocking gRPC calls for a driver: stub, metadata, timeout."""

    def __init__(self, stub: Any, metadata: Sequence[tuple[str, str]], timeout_s: float) -> None:
        self.stub, self.metadata, self.timeout_s = stub, tuple(metadata), timeout_s

    def verify(self, request: Any) -> Any:
        try:
            return self.stub.ModelInfer(request, metadata=self.metadata, timeout=self.timeout_s)
        except grpc.RpcError as exc:
            raise _translate(exc) from exc

    def open(self, request: Any) -> Any:
        return self.stub.ModelStreamInfer(
            iter([request]), metadata=self.metadata, timeout=self.timeout_s
        )

    def next(self, handle: Any) -> Any:
        try:
            return next(handle, None)
        except grpc.RpcError as exc:
            raise _translate(exc) from exc

    def close(self, handle: Any) -> None:
        handle.cancel()


def run_sync(run: Run, cloud: SyncCloud | None) -> Iterator[Token]:
    steps = run.steps()
    value: Any = None
    error: BaseException | None = None
    finished = False
    try:
        while True:
            try:
                item = steps.throw(error) if error is not None else steps.send(value)
            except StopIteration:
                finished = True
                return
            value, error = None, None
            if isinstance(item, Token):
                yield item
                continue
            try:
                value = _perform(item, cloud)
            except Exception as exc:  # noqa: BLE001 - handed to the plan: fallback or raise
                error = exc
    except GeneratorExit:
        raise  # the caller stopped reading: cleanup below
    except BaseException:
        finished = True  # the plan raised: its finally blocks have run
        raise
    finally:
        if not finished:  # the caller stopped reading: let the plan free what it holds
            try:
                item = steps.throw(Abandoned())
                while True:
                    result = None if isinstance(item, Token) else _quiet(_perform, item, cloud)
                    item = steps.send(result)
            except (StopIteration, Abandoned):
                pass


def _quiet(perform: Callable[..., Any], item: Any, cloud: Any) -> Any:
    try:
        return perform(item, cloud)
    except Exception:  # noqa: BLE001 - cleanup after the caller left: nothing to report to
        return None


def _perform(op: Op, cloud: SyncCloud | None) -> Any:
    if isinstance(op, Local):
        return op.fn()
    if cloud is None:
        raise ConfigError("cloud", "this generation needs a cloud endpoint")
    if isinstance(op, Verify):
        return cloud.verify(op.request)
    if isinstance(op, VerifyWhile):
        return _verify_while(op, cloud)
    if isinstance(op, Open):
        return cloud.open(op.request)
    if isinstance(op, Next):
        return cloud.next(op.handle)
    cloud.close(op.handle)
    return None


def _verify_while(op: VerifyWhile, cloud: SyncCloud) -> Any:
    """op.fn on a worker thread during the call; both are done when this returns."""
    failed: list[BaseException] = []

    def work() -> None:
        try:
            op.fn()
        except BaseException as exc:  # noqa: BLE001 - raised on the caller's thread below
            failed.append(exc)

    worker = threading.Thread(target=work, name="tandem-prefill", daemon=True)
    worker.start()
    try:
        response = cloud.verify(op.request)
    finally:
        worker.join()
    if failed:
        raise failed[0]
    return response


class AsyncCloud:
    def __init__(self, stub: Any, metadata: Sequence[tuple[str, str]], timeout_s: float) -> None:
        self.stub, self.metadata, self.timeout_s = stub, tuple(metadata), timeout_s

    async def verify(self, request: Any) -> Any:
        try:
            return await self.stub.ModelInfer(
                request, metadata=self.metadata, timeout=self.timeout_s
            )
        except grpc.RpcError as exc:
            raise _translate(exc) from exc

    def open(self, request: Any) -> Any:
        async def one() -> AsyncIterator[Any]:
            yield request

        return self.stub.ModelStreamInfer(one(), metadata=self.metadata, timeout=self.timeout_s)

    async def next(self, handle: Any) -> Any:
        try:
            response = await handle.read()
        except grpc.RpcError as exc:
            raise _translate(exc) from exc
        return None if response is grpc.aio.EOF else response

    def close(self, handle: Any) -> None:
        handle.cancel()


async def _aperform(op: Op, cloud: AsyncCloud | None) -> Any:
    if isinstance(op, Local):
        return await asyncio.to_thread(op.fn)
    if cloud is None:
        raise ConfigError("cloud", "this generation needs a cloud endpoint")
    if isinstance(op, Verify):
        return await cloud.verify(op.request)
    if isinstance(op, VerifyWhile):
        local = asyncio.ensure_future(asyncio.to_thread(op.fn))
        try:
            response = await cloud.verify(op.request)
        finally:
            await asyncio.wait([local])  # the worker thread is done before anything moves on
            failed = local.exception()  # retrieved even when the call raised
        if failed is not None:
            raise failed
        return response
    if isinstance(op, Open):
        return cloud.open(op.request)
    if isinstance(op, Next):
        return await cloud.next(op.handle)
    cloud.close(op.handle)
    return None


async def run_async(run: Run, cloud: AsyncCloud | None) -> AsyncIterator[Token]:
    steps = run.steps()
    value: Any = None
    error: BaseException | None = None
    finished = False
    try:
        while True:
            try:
                item = steps.throw(error) if error is not None else steps.send(value)
            except StopIteration:
                finished = True
                return
            value, error = None, None
            if isinstance(item, Token):
                yield item
                continue
            try:
                value = await _aperform(item, cloud)
            except Exception as exc:  # noqa: BLE001 - handed to the plan: fallback or raise
                error = exc
    except GeneratorExit:
        raise
    except BaseException:
        finished = True
        raise
    finally:
        if not finished:
            try:
                item = steps.throw(Abandoned())
                while True:
                    result = None
                    if not isinstance(item, Token):
                        try:
                            result = await _aperform(item, cloud)
                        except Exception:  # noqa: BLE001 - cleanup after the caller left
                            result = None
                    item = steps.send(result)
            except (StopIteration, Abandoned):
                pass
