"""The generation engine: continuous (iteration-level) batching over concurrent sequences, and
the verify sessions of speculative decoding.

One worker thread owns the model. Each iteration it admits waiting sequences (one prefill each),
then runs ONE forward over every active sequence: their per-sequence KV caches are left-padded
to the longest and stacked, with an attention mask over the padding and each row's own
positions, and split back after the step. A sequence joins at the next iteration and leaves
the moment it ends or its client goes away (`cancel`), so the batch is re-formed per token,
not per request.

A verify session keeps its KV cache between calls: a call feeds only the tokens new since the
last one (the model's previous next token and the fresh draft), so it costs O(draft length);
the cache is cropped back to the accepted prefix afterwards.

Limits (`EngineLimits`) refuse work past them with `QueueFullError` (RESOURCE_EXHAUSTED / 429),
and bad input with `InvalidInputError`; an unknown sequence id is `ModelNotFoundError`.

Shutdown: `drain()` refuses new sequences and verify sessions with `ModelUnavailableError`
(UNAVAILABLE / 503) while the live ones go on (a verify session keeps taking calls until it
ends); `close()` ends whatever is left with the same error.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import threading
import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from tandem.cloud.server.errors import (
    InvalidInputError,
    ModelNotFoundError,
    ModelUnavailableError,
    QueueFullError,
)
from tandem.errors import ConfigError

log = logging.getLogger(__name__)

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [1, heads, length, dim]
SHUTTING_DOWN = "server shutting down"


@dataclass(frozen=True)
class EngineLimits:
    max_sequences: int = 16  # generations and verify sessions alive at once
    max_total_tokens: int = 32768  # tokens reserved over all of them (prompt + max_tokens)
    max_prompt_tokens: int = 2048
    max_new_tokens: int = 1024  # the largest max_tokens a request may ask for
    max_draft_tokens: int = 64  # the most drafted tokens one verify call may carry
    idle_timeout_s: float = 60.0  # a verify session unused this long is dropped
    # torch intra-op threads for the model. 1 by default: on 2 shared cores a batch of 8 took
    # 0.13 s per step with 1 thread and 0.96 s with 2 (OpenMP threads spinning on each other).
    threads: int = 1

    def __post_init__(self) -> None:
        for name in ("max_sequences", "max_total_tokens", "max_prompt_tokens", "max_new_tokens"):
            if getattr(self, name) <= 0:
                raise ConfigError(name, "must be > 0")
        if self.max_draft_tokens <= 0:
            raise ConfigError("max_draft_tokens", "must be > 0")
        if self.threads <= 0:
            raise ConfigError("threads", "must be > 0")
        if self.idle_timeout_s <= 0:
            raise ConfigError("idle_timeout_s", "must be > 0")


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop_ids: frozenset[int] = frozenset()

    def check(self, limits: EngineLimits) -> None:
        if not 1 <= self.max_tokens <= limits.max_new_tokens:
            raise InvalidInputError(f"max_tokens must be in 1..{limits.max_new_tokens}")
        if not 0.0 <= self.temperature <= 10.0:
            raise InvalidInputError("temperature must be in 0..10")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidInputError("top_p must be in (0, 1]")


@dataclass(frozen=True)
class Done:
    """The last event of a stream: why it stopped ("stop" or "length")."""

    reason: str


@dataclass(eq=False)
class _Sequence:
    id: int
    prompt: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[int | Done | BaseException]
    reserved: int
    generator: torch.Generator | None = None
    kv: KV | None = None
    length: int = 0  # tokens in the cache
    last: int = -1  # the token to feed next
    generated: int = 0
    cancelled: bool = False

    def emit(self, item: int | Done | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)


@dataclass(eq=False)
class _Session:
    """A verify session: the cache covers `length` tokens; `pending` is the model's next token,
    not yet in the cache."""

    id: str
    kv: KV | None = None
    length: int = 0
    pending: int | None = None
    used: float = field(default_factory=time.monotonic)
    busy: bool = False


@dataclass(frozen=True)
class VerifyResult:
    accepted: int
    next_token: int
    length: int  # tokens now in the session's cache


def _kv_of(cache: Any) -> KV:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _cache_argument(model: Any) -> str:
    """The forward's name for the KV cache: `cache` since transformers 5.2x, which deprecates
    `past_key_values` (and `out.past_key_values`); older versions know only the latter."""
    try:
        names = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in names else "past_key_values"


def sample(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None) -> int:
    """Greedy at temperature 0, else temperature + nucleus (top-p) sampling."""
    if params.temperature <= 0.0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < params.top_p
        sorted_p = sorted_p * keep
        pick = torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=gen)
        return int(order[pick])
    return int(torch.multinomial(probs, 1, generator=gen))


class Engine:
    def __init__(self, model: Any, vocab_size: int, limits: EngineLimits) -> None:
        self.model = model
        self.vocab_size = vocab_size
        self._cache_kw = _cache_argument(model)
        self.limits = limits
        self._ids = itertools.count(1)
        self._lock = threading.Lock()  # guards the tables below
        self._wake = threading.Condition(self._lock)
        self._model_lock = threading.Lock()  # one forward at a time
        self._waiting: list[_Sequence] = []
        self._active: dict[int, _Sequence] = {}
        self._sessions: dict[str, _Session] = {}
        self._closed = False
        self._draining = False
        self.steps = 0  # batched decode iterations run
        self.step_rows = 0  # sequence-rows over those iterations (mean batch = rows / steps)
        self.cancelled = 0
        self._thread = threading.Thread(target=self._run, name="generation", daemon=True)
        self._thread.start()

    # --- bookkeeping -------------------------------------------------------------------------
    def _reserved(self) -> int:
        live = itertools.chain(self._waiting, self._active.values())
        return sum(s.reserved for s in live) + sum(s.length for s in self._sessions.values())

    def _count(self) -> int:
        return len(self._waiting) + len(self._active) + len(self._sessions)

    def _admit_check(self, tokens: int) -> None:
        """Under self._lock: refuses past the limits, and everything new once draining."""
        if self._closed or self._draining:
            raise ModelUnavailableError(SHUTTING_DOWN)
        if self._count() >= self.limits.max_sequences:
            raise QueueFullError(
                f"{self.limits.max_sequences} sequences are running already (max_sequences)"
            )
        if self._reserved() + tokens > self.limits.max_total_tokens:
            raise QueueFullError(
                f"{tokens} more tokens would pass max_total_tokens {self.limits.max_total_tokens}"
            )

    def check_tokens(self, ids: Sequence[int], what: str) -> list[int]:
        out = [int(i) for i in ids]
        bad = [i for i in out if not 0 <= i < self.vocab_size]
        if bad:
            raise InvalidInputError(
                f"{what}: token ids {bad[:5]} are outside the vocabulary 0..{self.vocab_size - 1}"
            )
        return out

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "active_sequences": len(self._active),
                "waiting_sequences": len(self._waiting),
                "verify_sessions": len(self._sessions),
                "reserved_tokens": self._reserved(),
                "decode_steps": self.steps,
                "decode_rows": self.step_rows,
                "cancelled": self.cancelled,
            }

    # --- streaming generation ----------------------------------------------------------------
    def submit(self, prompt: Sequence[int], params: SamplingParams) -> _Sequence:
        params.check(self.limits)
        ids = self.check_tokens(prompt, "prompt")
        if not ids:
            raise InvalidInputError("the prompt is empty")
        if len(ids) > self.limits.max_prompt_tokens:
            raise InvalidInputError(
                f"the prompt has {len(ids)} tokens; max_prompt_tokens is "
                f"{self.limits.max_prompt_tokens}"
            )
        gen = None
        if params.temperature > 0:
            gen = torch.Generator()
            gen.manual_seed(params.seed if params.seed is not None else time.time_ns())
        loop = asyncio.get_running_loop()
        with self._lock:
            self._admit_check(len(ids) + params.max_tokens)
            seq = _Sequence(
                next(self._ids), ids, params, loop, asyncio.Queue(), len(ids) + params.max_tokens
            )
            seq.generator = gen
            self._waiting.append(seq)
            self._wake.notify()
        return seq

    def cancel(self, seq: _Sequence) -> None:
        """Frees the sequence now: it leaves the tables (and the limits) at once; a step in
        flight drops its row."""
        with self._lock:
            if seq.cancelled:
                return
            seq.cancelled = True
            self._active.pop(seq.id, None)
            if seq in self._waiting:
                self._waiting.remove(seq)
            seq.kv = None

    async def stream(self, seq: _Sequence) -> AsyncGenerator[int | Done, None]:
        """The sequence's tokens as they come, then its Done; cancels it when the consumer stops
        early (a client that went away)."""
        try:
            while True:
                item = await seq.events.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, Done):
                    return
        finally:
            was_live = (not seq.cancelled and seq.id in self._active) or seq in self._waiting
            self.cancel(seq)
            if was_live:
                with self._lock:
                    self.cancelled += 1

    def drain(self) -> None:
        """Refuses new sequences and verify sessions from now on; the live ones go on."""
        with self._lock:
            self._draining = True

    def idle(self) -> bool:
        """No sequence and no verify session alive."""
        with self._lock:
            return self._count() == 0

    def close(self) -> None:
        """Ends every live sequence with UNAVAILABLE and drops the verify sessions."""
        with self._lock:
            self._closed = True
            for seq in [*self._waiting, *self._active.values()]:
                seq.emit(ModelUnavailableError(SHUTTING_DOWN))
                seq.cancelled = True
            self._waiting.clear()
            self._active.clear()
            self._sessions.clear()
            self._wake.notify()
        self._thread.join(timeout=5)

    # --- the worker ---------------------------------------------------------------------------
    def _forward(self, cache: Any, **inputs: Any) -> Any:
        """One forward that extends `cache` (a DynamicCache) in place; the caller reads the new
        keys and values from `cache`, not from the output."""
        return self.model(**inputs, **{self._cache_kw: cache}, use_cache=True)

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        torch.set_num_threads(self.limits.threads)
        while True:
            with self._lock:
                while not self._closed and not self._waiting and not self._active:
                    self._wake.wait()
                if self._closed:
                    return
                admitted = self._waiting[:]
                self._waiting.clear()
                for seq in admitted:
                    self._active[seq.id] = seq
            try:
                for seq in admitted:
                    self._prefill(seq)
                with self._lock:
                    batch = [s for s in self._active.values() if s.kv is not None]
                if batch:
                    self._decode(batch)
            except Exception as exc:
                log.exception("generation step failed")
                with self._lock:
                    failed = list(self._active.values())
                    self._active.clear()
                for seq in failed:
                    seq.emit(exc)

    def _finish(self, seq: _Sequence, reason: str) -> None:
        with self._lock:
            self._active.pop(seq.id, None)
        seq.kv = None
        seq.emit(Done(reason))

    def _accept(self, seq: _Sequence, logits: torch.Tensor) -> None:
        """Samples the next token from `logits` and emits it (or ends the sequence)."""
        token = sample(logits, seq.params, seq.generator)
        if token in seq.params.stop_ids:
            self._finish(seq, "stop")
            return
        seq.generated += 1
        seq.last = token
        seq.emit(token)
        if seq.generated >= seq.params.max_tokens:
            self._finish(seq, "length")

    def _prefill(self, seq: _Sequence) -> None:
        if seq.cancelled:
            return
        cache = DynamicCache()
        with self._model_lock:
            out = self._forward(cache, input_ids=torch.tensor([seq.prompt]))
        if seq.cancelled:
            return
        seq.kv = _kv_of(cache)
        seq.length = len(seq.prompt)
        self._accept(seq, out.logits[0, -1])

    def _decode(self, batch: list[_Sequence]) -> None:
        """One forward over every active sequence (left-padded, masked), one token each."""
        batch = [s for s in batch if s.kv is not None]
        kvs: list[KV] = [s.kv for s in batch if s.kv is not None]
        lengths = [s.length for s in batch]
        longest = max(lengths)
        layers = len(kvs[0])
        if len(batch) == 1:
            stacked = kvs[0]
            mask = None
        else:
            stacked = []
            for layer in range(layers):
                keys = [
                    F.pad(kv[layer][0], (0, 0, longest - n, 0))
                    for kv, n in zip(kvs, lengths, strict=True)
                ]
                values = [
                    F.pad(kv[layer][1], (0, 0, longest - n, 0))
                    for kv, n in zip(kvs, lengths, strict=True)
                ]
                stacked.append((torch.cat(keys), torch.cat(values)))
            mask = torch.zeros(len(batch), longest + 1, dtype=torch.long)
            for row, n in enumerate(lengths):
                mask[row, longest - n :] = 1
        inputs = torch.tensor([[s.last] for s in batch])
        positions = torch.tensor([[n] for n in lengths])
        cache = DynamicCache(ddp_cache_data=stacked)  # type: ignore[arg-type]
        with self._model_lock:
            out = self._forward(
                cache, input_ids=inputs, attention_mask=mask, position_ids=positions
            )
        self.steps += 1
        self.step_rows += len(batch)
        new = _kv_of(cache)
        for row, seq in enumerate(batch):
            if seq.cancelled:
                continue
            start = longest - lengths[row]
            seq.kv = [(k[row : row + 1, :, start:], v[row : row + 1, :, start:]) for k, v in new]
            seq.length += 1
            self._accept(seq, out.logits[row, -1])

    # --- verify sessions (speculative decoding) -----------------------------------------------
    def expire_sessions(self) -> int:
        cutoff = time.monotonic() - self.limits.idle_timeout_s
        with self._lock:
            old = [k for k, s in self._sessions.items() if s.used < cutoff and not s.busy]
            for key in old:
                del self._sessions[key]
        if old:
            log.info(
                "verify sessions expired after %.0f s idle: %d",
                self.limits.idle_timeout_s,
                len(old),
            )
        return len(old)

    def _open_session(self, sequence_id: str, prompt: list[int]) -> _Session:
        if not prompt:
            raise InvalidInputError("sequence_start needs the prompt's token ids")
        if len(prompt) > self.limits.max_prompt_tokens:
            raise InvalidInputError(
                f"the prompt has {len(prompt)} tokens; max_prompt_tokens is "
                f"{self.limits.max_prompt_tokens}"
            )
        with self._lock:
            old = self._sessions.pop(sequence_id, None)  # a restart replaces the old session
            if old is not None and old.busy:
                self._sessions[sequence_id] = old
                raise InvalidInputError(f"sequence {sequence_id!r} has a verify call in flight")
            self._admit_check(len(prompt))
            session = _Session(sequence_id, busy=True)
            self._sessions[sequence_id] = session
        return session

    def _take_session(self, sequence_id: str) -> _Session:
        with self._lock:
            session = self._sessions.get(sequence_id)
            if session is None:
                raise ModelNotFoundError(
                    f"unknown sequence id {sequence_id!r}: never started (sequence_start), "
                    f"ended, or expired after {self.limits.idle_timeout_s:.0f} s idle"
                )
            if session.busy:
                raise InvalidInputError(f"sequence {sequence_id!r} has a verify call in flight")
            session.busy = True
        return session

    def verify(
        self,
        sequence_id: str,
        draft: Sequence[int],
        *,
        start: bool = False,
        prompt: Sequence[int] = (),
        end: bool = False,
    ) -> VerifyResult:
        """Greedy verification of `draft` (the tokens drafted after the model's last next token,
        or after the prompt on `start`): how many the model accepts, and its next token after
        them. Blocking: call it from a worker thread."""
        if not sequence_id:
            raise InvalidInputError("a verify call needs a sequence id")
        torch.set_num_threads(self.limits.threads)  # OpenMP's setting is per calling thread
        drafted = self.check_tokens(draft, "draft")
        if len(drafted) > self.limits.max_draft_tokens:
            raise InvalidInputError(
                f"{len(drafted)} drafted tokens; max_draft_tokens is {self.limits.max_draft_tokens}"
            )
        self.expire_sessions()
        if start:
            fed = self.check_tokens(prompt, "prompt")
            session = self._open_session(sequence_id, fed)
        else:
            if prompt:
                raise InvalidInputError("prompt ids go only with sequence_start")
            session = self._take_session(sequence_id)
            fed = [session.pending] if session.pending is not None else []
        try:
            with self._lock:
                grow = len(fed) + len(drafted)
                if self._reserved() + grow > self.limits.max_total_tokens:
                    raise QueueFullError(
                        f"{grow} more tokens would pass max_total_tokens "
                        f"{self.limits.max_total_tokens}"
                    )
            if session.length + grow > self.limits.max_prompt_tokens + self.limits.max_new_tokens:
                raise InvalidInputError("the sequence is longer than the model's context here")
            tokens = fed + drafted
            cache = DynamicCache(ddp_cache_data=session.kv) if session.kv else DynamicCache()  # type: ignore[arg-type]
            with torch.no_grad(), self._model_lock:
                out = self._forward(cache, input_ids=torch.tensor([tokens]))
            predicted = torch.argmax(out.logits[0], dim=-1).tolist()
            base = len(fed) - 1  # predicted[base + j] is the model's choice for drafted[j]
            accepted = 0
            while accepted < len(drafted) and predicted[base + accepted] == drafted[accepted]:
                accepted += 1
            next_token = int(predicted[base + accepted])
            keep = session.length + len(fed) + accepted
            session.kv = [(k[:, :, :keep], v[:, :, :keep]) for k, v in _kv_of(cache)]
            session.length = keep
            session.pending = next_token
            return VerifyResult(accepted, next_token, keep)
        except BaseException:
            if start:
                with self._lock:
                    self._sessions.pop(sequence_id, None)
            raise
        finally:
            session.used = time.monotonic()
            session.busy = False
            if end:
                with self._lock:
                    if self._sessions.get(sequence_id) is session:
                        del self._sessions[sequence_id]
