"""What `Client.generate` / `agenerate` stand on: the device's generative variant (found in
the same model store as the other variants), prompt preparation (text or chat messages), and
the streams they return.

    for token in client.generate("Once upon a time", max_tokens=32):   # stream=True
        print(token.text, end="")        # token.id, token.source ("local" | "cloud")
    result = client.generate([{"role": "user", "content": "Hi"}], stream=False)
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tandem.errors import InputError, MissingDependencyError, TandemError
from tandem.sdk.artifacts import TrustedKeys, load_variant, unpack_variant
from tandem.sdk.generation.generator import GENERATION_FILE, TOKENIZER_FILE, LocalGenerator
from tandem.sdk.generation.session import GenerationResult, Run, Token
from tandem.sdk.store import ModelStore

ROLES = ("system", "user", "assistant")
DEFAULT_THREADS = 2  # ONNX Runtime intra-op threads per local generator (Client's default)


@dataclass(frozen=True)
class GenerativeVariant:
    """The active generative variant of a model in a store: its files and generation.json."""

    version: int
    name: str
    model_path: Path
    tokenizer_path: Path
    config: dict[str, Any]

    @classmethod
    def find(cls, store: ModelStore, model: str, trusted: TrustedKeys | None) -> GenerativeVariant:
        version, variants = store.active_variants(model)
        for variant in variants:
            if variant.manifest.task != "generation":
                continue
            if trusted is not None:
                variant = load_variant(variant.path, trusted)
            folder = unpack_variant(variant, verify=trusted is not None)
            config = json.loads((folder / GENERATION_FILE).read_text(encoding="utf-8"))
            return cls(
                version,
                variant.manifest.variant,
                folder / variant.manifest.entrypoint,
                folder / TOKENIZER_FILE,
                config,
            )
        raise InputError(f"{model!r} v{version} has no generative variant in {store.root}")


class GeneratorPool:
    """LocalGenerators of one variant: each generation holds one alone (they are stateful)."""

    def __init__(self, variant: GenerativeVariant, *, threads: int = DEFAULT_THREADS) -> None:
        self.variant = variant
        self.threads = threads  # ONNX Runtime intra-op threads of each generator
        self._free: list[LocalGenerator] = []
        self._lock = threading.Lock()
        self.tokenizer = self._new()  # also the one that encodes prompts (read-only use)
        self._free.append(self.tokenizer)

    def _new(self) -> LocalGenerator:
        v = self.variant
        return LocalGenerator(v.model_path, v.tokenizer_path, v.config, threads=self.threads)

    def take(self) -> LocalGenerator:
        with self._lock:
            if self._free:
                return self._free.pop()
        return self._new()

    def give(self, generator: LocalGenerator) -> None:
        with self._lock:
            self._free.append(generator)


def check_messages(messages: Any) -> list[dict[str, str]]:
    """Chat messages as a chat template takes them; InputError names what is wrong."""
    if not isinstance(messages, Sequence) or isinstance(messages, str | bytes) or not messages:
        raise InputError("messages must be a non-empty list of {role, content} objects")
    checked: list[dict[str, str]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InputError(f"messages[{i}] must be an object with role and content")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise InputError(f"messages[{i}].role must be one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise InputError(f"messages[{i}].content must be a string")
        checked.append({"role": role, "content": content})
    return checked


def render_chat(template: str, messages: list[dict[str, str]], config: Mapping[str, Any]) -> str:
    """The chat template (Jinja, in the environment transformers' apply_chat_template gives
    it: trim/lstrip blocks, loop controls, raise_exception, a tojson that keeps non-ASCII)
    with the generation prompt, so that the device renders what the server renders."""
    try:
        import jinja2
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as exc:
        raise MissingDependencyError("jinja2", "generation", "chat messages") from exc

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        x: Any,
        ensure_ascii: bool = False,
        indent: int | None = None,
        separators: tuple[str, str] | None = None,
        sort_keys: bool = False,
    ) -> str:
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    try:
        return str(
            env.from_string(template).render(
                messages=messages,
                add_generation_prompt=True,
                bos_token=config.get("bos_token", ""),
                eos_token=config.get("eos_token", ""),
            )
        )
    except jinja2.exceptions.TemplateError as exc:
        raise InputError(f"the variant's chat template refused the messages: {exc}") from exc


def prompt_ids(
    prompt: Any, generator: LocalGenerator | None, config: Mapping[str, Any]
) -> list[int]:
    """Token ids of a text prompt or of chat messages (under the variant's chat template)."""
    if generator is None:
        raise InputError(
            "generation needs the device's generative variant to tokenize the prompt "
            "(give the client a model store holding one)"
        )
    if isinstance(prompt, str):
        if not prompt.strip():
            raise InputError("the prompt must be a non-empty string")
        ids = generator.encode(prompt)
    else:
        messages = check_messages(prompt)
        template = config.get("chat_template")
        if not isinstance(template, str) or not template:
            raise InputError(
                "chat messages need a chat template: this variant's generation.json has none"
            )
        ids = list(
            generator.tokenizer.encode(
                render_chat(template, messages, config), add_special_tokens=False
            ).ids
        )
    if not ids:
        raise InputError("the prompt has no tokens")
    if len(ids) >= generator.max_context:
        raise InputError(
            f"prompt of {len(ids)} tokens; the model takes fewer than {generator.max_context}"
        )
    return ids


class GenerationStream:
    """Tokens as they come (`.id`, `.text`, `.source`); `.result` once exhausted."""

    def __init__(
        self, run: Run, tokens: Iterator[Token], finish: Callable[[Run, bool | None], None]
    ):
        self._run, self._tokens, self._finish = run, tokens, finish
        self._done = False

    @property
    def result(self) -> GenerationResult | None:
        return self._run.result

    def __iter__(self) -> GenerationStream:
        return self

    def __next__(self) -> Token:
        if self._done:
            raise StopIteration
        try:
            return next(self._tokens)
        except StopIteration:
            self._end(True)
            raise
        except BaseException:
            self._end(False)
            raise

    def _end(self, ok: bool | None) -> None:
        # ok: True finished, False failed, None abandoned (closed by the caller before the
        # end: not an error of the model's, so not a generation error in the telemetry).
        if not self._done:
            self._done = True
            self._finish(self._run, ok)

    def close(self) -> None:
        """Stops early: frees the server's sequence and the local generator."""
        close = getattr(self._tokens, "close", None)
        if close is not None:
            close()
        self._end(None)

    def __del__(self) -> None:  # an abandoned stream still frees what it holds
        with contextlib.suppress(TandemError):
            self.close()


class AsyncGenerationStream:
    def __init__(
        self, run: Run, tokens: AsyncIterator[Token], finish: Callable[[Run, bool | None], None]
    ) -> None:
        self._run, self._tokens, self._finish = run, tokens, finish
        self._done = False

    @property
    def result(self) -> GenerationResult | None:
        return self._run.result

    def __aiter__(self) -> AsyncGenerationStream:
        return self

    async def __anext__(self) -> Token:
        if self._done:
            raise StopAsyncIteration
        try:
            return await self._tokens.__anext__()
        except StopAsyncIteration:
            self._end(True)
            raise
        except BaseException:
            self._end(False)
            raise

    def _end(self, ok: bool | None) -> None:  # as GenerationStream._end
        if not self._done:
            self._done = True
            self._finish(self._run, ok)

    async def aclose(self) -> None:
        close = getattr(self._tokens, "aclose", None)
        if close is not None:
            await close()
        self._end(None)
