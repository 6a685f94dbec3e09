"""`Client`: the one object an application holds.

    with Client(model="digits", artifacts="/var/lib/tandem/models",
                cloud="inference.example.com:8001", policy="cascade", threshold=0.9) as client:
        result = client.infer(pixels)            # or: await client.ainfer(pixels)
        result.outputs["logits"], result.source, result.confidence

The hot path (local policy, cache off) is: read the current model (one attribute), validate
the inputs (precomputed checks), run the runtime, build the Result, append one telemetry
tuple. Everything else (hot-swap watching, telemetry aggregation, shadow calls) runs on
background threads.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from tandem.errors import (
    ClientClosedError,
    CloudError,
    ConfigError,
    InputError,
    TandemError,
)
from tandem.sdk.artifacts import TrustedKeys
from tandem.sdk.cache import CacheConfig, PredictionCache, cache_key
from tandem.sdk.cloud import CloudClient, CloudConfig
from tandem.sdk.generation.api import (
    DEFAULT_THREADS,
    AsyncGenerationStream,
    GenerationStream,
    GenerativeVariant,
    GeneratorPool,
    prompt_ids,
)
from tandem.sdk.generation.session import (
    DEFAULT_CASCADE_THRESHOLD,
    DEFAULT_CASCADE_WINDOW,
    GENERATION_ONLY,
    AsyncCloud,
    GenerationResult,
    Run,
    Settings,
    SyncCloud,
    run_async,
    run_sync,
)
from tandem.sdk.local import (
    LocalModel,
    LocalModels,
    RuntimeSelector,
    SelectionConfig,
    default_cache_dir,
)
from tandem.sdk.policies import Policy, adrive, drive, make_policy
from tandem.sdk.result import Result
from tandem.sdk.routing import Router
from tandem.sdk.shadow import ShadowConfig, ShadowSampler
from tandem.sdk.signature import Arrays, Signature
from tandem.sdk.store import ModelStore
from tandem.sdk.telemetry import TelemetryConfig, TelemetryRecorder

log = logging.getLogger(__name__)

_perf = time.perf_counter


def _cloud_config(
    cloud: str | Sequence[str] | CloudConfig | None, token: str | None, tls: bool
) -> CloudConfig | None:
    if cloud is None or isinstance(cloud, CloudConfig):
        if cloud is not None and (token or tls):
            raise ConfigError("token", "set token and tls inside the CloudConfig you pass")
        return cloud
    endpoints = (cloud,) if isinstance(cloud, str) else tuple(cloud)
    if isinstance(cloud, str) and "," in cloud:
        endpoints = tuple(e.strip() for e in cloud.split(",") if e.strip())
    return CloudConfig(endpoints=endpoints, token=token, tls=tls)


class Client:
    """Answers `infer` calls locally or in the cloud, as the policy says. Thread-safe."""

    def __init__(
        self,
        model: str,
        artifacts: str | os.PathLike[str] | None = None,
        cloud: str | Sequence[str] | CloudConfig | None = None,
        policy: str | Policy = "prefer_local",
        *,
        runtime: str = "auto",
        selection: SelectionConfig | None = None,
        cache: CacheConfig | int | None = None,
        shadow: ShadowConfig | float | None = None,
        telemetry: TelemetryConfig | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        token: str | None = None,
        tls: bool = False,
        trusted_keys: Sequence[str | os.PathLike[str]] | None = None,
        watch_interval_s: float = 0.25,
        generation_threads: int = DEFAULT_THREADS,
        **policy_settings: Any,
    ) -> None:
        if not model:
            raise ConfigError("model", "a model name is needed")
        self.model = model
        # generate()'s default policy; "speculative" exists only there (infer prefers local)
        self.generation_policy = policy if isinstance(policy, str) else policy.name
        if policy in GENERATION_ONLY:
            policy = "prefer_local"
        self.policy = make_policy(policy, **policy_settings)
        self.cloud_config = _cloud_config(cloud, token, tls)
        if artifacts is None and self.cloud_config is None:
            raise ConfigError("artifacts", "give a local model store, a cloud endpoint, or both")
        if selection is None:
            selection = SelectionConfig(runtime=runtime)
        elif runtime != "auto":
            raise ConfigError("runtime", "set the runtime inside the SelectionConfig you pass")
        if isinstance(cache, int):
            cache = CacheConfig(max_entries=cache)
        self.cache = PredictionCache(cache or CacheConfig(max_entries=0))
        self._cache_on = self.cache.enabled
        if isinstance(shadow, float | int):
            shadow = ShadowConfig(fraction=float(shadow))
        # Everything that can be refused is refused before any thread starts.
        if shadow is not None and shadow.fraction > 0 and self.cloud_config is None:
            raise ConfigError("shadow", "shadow sampling needs a cloud endpoint")
        if self.policy.name == "cloud_only" and self.cloud_config is None:
            raise ConfigError("cloud", "policy 'cloud_only' needs a cloud endpoint")
        if self.policy.name == "local_only" and artifacts is None:
            raise ConfigError("artifacts", "policy 'local_only' needs a local model store")
        if (
            not isinstance(generation_threads, int)
            or isinstance(generation_threads, bool)
            or generation_threads < 1
        ):
            raise ConfigError(
                "generation_threads",
                f"ONNX Runtime threads per local generator must be an integer >= 1, "
                f"got {generation_threads!r}",
            )
        self.generation_threads = generation_threads
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()

        self._state = "open"
        self._lock = threading.Lock()
        self._cloud_signature: Signature | None = None

        self.telemetry = TelemetryRecorder(telemetry or TelemetryConfig())
        self._record = self.telemetry.record_event
        self.telemetry.start()

        self.cloud: CloudClient | None = (
            CloudClient(self.cloud_config, model) if self.cloud_config is not None else None
        )
        self.local_models: LocalModels | None = None
        if artifacts is not None:
            trusted = TrustedKeys.from_files(trusted_keys) if trusted_keys else None
            self.local_models = LocalModels(
                ModelStore(artifacts),
                model,
                RuntimeSelector(self.cache_dir, selection),
                trusted=trusted,
                watch_interval_s=watch_interval_s,
            )
            self.local_models.refresh()
            self.local_models.start()
        # What the policies' plans call: private, so that it is not part of the Client API.
        self._router = Router(
            model, self.policy, self.local_models, self.cloud, lambda: self._cloud_signature
        )
        self.shadow: ShadowSampler | None = None
        if shadow is not None and shadow.fraction > 0:
            self.shadow = ShadowSampler(shadow, self._shadow_call, self.telemetry.record_shadow)
        self._shadow_offer = self.shadow.offer if self.shadow is not None else None
        self._trusted = TrustedKeys.from_files(trusted_keys) if trusted_keys else None
        self._generators: GeneratorPool | None = None
        self._generators_lock = threading.Lock()
        # Generation counters for stats(); the telemetry summaries carry them too.
        self._generation_totals: dict[str, float] = dict.fromkeys(
            (
                "generations",
                "errors",
                "abandoned",
                "tokens_local",
                "tokens_cloud",
                "drafted",
                "accepted",
                "escalations",
                "seconds",
            ),
            0,
        )

    # --- public API ------------------------------------------------------------------------

    @property
    def current(self) -> LocalModel | None:
        """The local model that the next call will use (None when there is none)."""
        return self.local_models.current if self.local_models is not None else None

    def refresh(self) -> bool:
        """Checks the store's active pointer now (the watcher does this periodically)."""
        return self.local_models.refresh() if self.local_models is not None else False

    def signature(self) -> Signature | None:
        model = self.current
        if model is not None:
            return model.signature
        if self._cloud_signature is None and self.cloud is not None:
            try:
                inputs, outputs = self.cloud.metadata()
            except CloudError as exc:
                log.debug("no cloud metadata: %s", exc)
                return None
            self._cloud_signature = Signature(inputs, outputs)
        return self._cloud_signature

    def _prepare(self, inputs: Any, model: LocalModel | None) -> Arrays:
        signature = model.signature if model is not None else self.signature()
        if signature is not None:
            return signature.prepare(inputs)
        if self.cloud is None:
            assert self.local_models is not None
            self.local_models.require()  # raises NoLocalModelError, saying why
        if isinstance(inputs, np.ndarray):
            raise InputError(
                "the model's input names are unknown (no local model, no cloud "
                "metadata): pass a dict of arrays by name"
            )
        return dict(inputs)

    def infer(self, inputs: Mapping[str, np.ndarray[Any, Any]] | np.ndarray[Any, Any]) -> Result:
        """Answers one request (a batch) as the policy says."""
        if self._state != "open":
            raise ClientClosedError("the client is closed")
        start = _perf()
        models = self.local_models
        model = models.current if models is not None else None
        if model is not None:
            feeds = model.signature.prepare(inputs)
        else:
            feeds = self._prepare(inputs, None)
        key = None
        if self._cache_on:
            key = cache_key(model.version if model is not None else 0, feeds)
            hit = self.cache.get(key)
            if hit is not None:
                return self._from_cache(hit, model, start)
        try:
            result = drive(self.policy.plan(self._router, model), self._router, feeds, model)
        except TandemError as exc:
            self._record_error(exc, model, start)
            raise
        return self._finish(result, feeds, model, key, start)

    async def ainfer(
        self, inputs: Mapping[str, np.ndarray[Any, Any]] | np.ndarray[Any, Any]
    ) -> Result:
        """The async twin of `infer`: local runs in a worker thread, cloud calls use grpc.aio."""
        if self._state != "open":
            raise ClientClosedError("the client is closed")
        start = _perf()
        model = self.current
        if model is None and self._cloud_signature is None and self.cloud is not None:
            await asyncio.to_thread(self.signature)
        feeds = self._prepare(inputs, model)
        version = model.version if model is not None else 0
        key = None
        if self._cache_on:
            key = cache_key(version, feeds)
            hit = self.cache.get(key)
            if hit is not None:
                return self._from_cache(hit, model, start)
        try:
            result = await adrive(self.policy.plan(self._router, model), self._router, feeds, model)
        except TandemError as exc:
            self._record_error(exc, model, start)
            raise
        return self._finish(result, feeds, model, key, start)

    def _finish(
        self,
        result: Result,
        feeds: Arrays,
        model: LocalModel | None,
        key: bytes | None,
        start: float,
    ) -> Result:
        result.total_ms = (_perf() - start) * 1e3
        local = result.source == "local"
        self._record(
            (
                "req",
                self.model,
                model.version if model is not None else 0,
                result.runtime if local else (model.runtime_name if model is not None else ""),
                result.source,
                "ok",
                result.local_ms,
                result.cloud_ms,
                result.compute_confidence,
                result.fallback or result.escalated,
                False,
            )
        )
        if key is not None:
            self.cache.put(
                key,
                result.outputs,
                source=result.source,
                runtime=result.runtime,
                model_version=result.model_version,
                confidence=result.compute_confidence(),
            )
        if local and self._shadow_offer is not None and model is not None:
            self._shadow_offer(self.model, model.version, model.signature, feeds, result.outputs)
        return result

    def _from_cache(self, hit: Any, model: LocalModel | None, start: float) -> Result:
        result = Result(
            hit.outputs,
            hit.source,
            hit.runtime or "",
            hit.model_version,
            model.signature if model is not None else self._cloud_signature,
            confidence=hit.confidence,
        )
        result.cached = True
        result.total_ms = (_perf() - start) * 1e3
        self._record(
            (
                "req",
                self.model,
                model.version if model is not None else 0,
                model.runtime_name if model is not None else "",
                "cache",
                "hit",
                None,
                None,
                hit.confidence,
                False,
                True,
            )
        )
        return result

    def _record_error(self, exc: Exception, model: LocalModel | None, start: float) -> None:
        path = "cloud" if isinstance(exc, CloudError) else "local"
        self._record(
            (
                "req",
                self.model,
                model.version if model is not None else 0,
                model.runtime_name if model is not None else "",
                path,
                type(exc).__name__,
                None,
                None,
                None,
                False,
                False,
            )
        )

    def _shadow_call(self, feeds: Arrays, timeout_ms: float | None) -> Arrays:
        assert self.cloud is not None
        if not self.cloud.available():
            raise CloudError("breaker open: shadow sample skipped")
        return self.cloud.infer(feeds, timeout_ms=timeout_ms).outputs

    # --- generation ------------------------------------------------------------------------

    def _generator_pool(self) -> GeneratorPool | None:
        """The pool over the store's active generative variant (None without one); a new
        active version gets a new pool."""
        if self.local_models is None:
            return None
        with self._generators_lock:
            try:
                version, _variants = self.local_models.store.active_variants(self.model)
                pool = self._generators
                if pool is None or pool.variant.version != version:
                    found = GenerativeVariant.find(
                        self.local_models.store, self.model, self._trusted
                    )
                    self._generators = pool = GeneratorPool(found, threads=self.generation_threads)
            except TandemError as exc:
                log.debug("no local generative variant of %s: %s", self.model, exc)
                return None
            return pool

    def _generation(
        self,
        prompt: Any,
        max_tokens: int,
        policy: str | None,
        cascade_threshold: float | None,
        cascade_window: int | None,
        draft_tokens: int,
    ) -> tuple[Run, Any, GeneratorPool | None]:
        """Everything checked before the first token: a bad call raises here, not mid-stream."""
        if self._state == "closed":
            raise ClientClosedError("the client is closed")
        pool = self._generator_pool()
        config = pool.variant.config if pool is not None else {}
        settings = Settings(
            policy=policy or self.generation_policy,
            model=self.cloud.model if self.cloud is not None else self.model,
            max_tokens=max_tokens,
            has_local=pool is not None,
            has_cloud=self.cloud is not None,
            cascade_threshold=float(
                cascade_threshold
                if cascade_threshold is not None
                else config.get("cascade_threshold", DEFAULT_CASCADE_THRESHOLD)
            ),
            cascade_window=int(
                cascade_window
                if cascade_window is not None
                else config.get("cascade_window", DEFAULT_CASCADE_WINDOW)
            ),
            draft_tokens=draft_tokens,
        )
        if settings.policy in ("cloud_only", "prefer_local") and pool is None:
            if not isinstance(prompt, str) or not prompt.strip():
                raise InputError(
                    "without a local generative variant the prompt must be a non-empty string "
                    "(chat messages need the variant's chat template)"
                )
            run = Run(settings, [], frozenset(), None, None, text=prompt)
            return run, None, None
        tokenizer = pool.tokenizer if pool is not None else None
        ids = prompt_ids(prompt, tokenizer, config)
        generator = pool.take() if pool is not None else None
        decode = tokenizer.decode if tokenizer is not None else None
        eos = tokenizer.eos_ids if tokenizer is not None else frozenset()
        try:
            run = Run(settings, ids, eos, generator, decode)
        except BaseException:
            if pool is not None and generator is not None:
                pool.give(generator)
            raise
        return run, generator, pool

    def _generation_done(
        self, run: Run, ok: bool | None, generator: Any, pool: GeneratorPool | None
    ) -> None:
        """`ok`: True finished, False failed, None abandoned by the caller (stream closed
        early): counted in stats() but not sent as a generation error, which rollout gates
        read as the model failing."""
        if pool is not None and generator is not None:
            pool.give(generator)
        result, state = run.result, run.state
        with self._generators_lock:
            totals = self._generation_totals
            totals["generations"] += 1
            if ok is None:
                totals["abandoned"] += 1
                return
            totals["errors"] += 0 if ok and result is not None else 1
            totals["tokens_local"] += state.sources["local"]
            totals["tokens_cloud"] += state.sources["cloud"]
            totals["drafted"] += state.drafted
            totals["accepted"] += state.accepted
            totals["escalations"] += 1 if state.escalated else 0
            totals["seconds"] += result.seconds if result is not None else 0.0
        finished = ok and result is not None
        self.telemetry.record_generation(
            self.model,
            pool.variant.version if pool is not None else 0,
            finished=finished,
            tokens=len(result.token_ids) if result is not None else 0,
            seconds=result.seconds if result is not None else 0.0,
            drafted=state.drafted,
            accepted=state.accepted,
            escalated=state.escalated,
            ttft_ms=result.ttft_ms if result is not None else None,
        )

    def _sync_cloud(self) -> SyncCloud | None:
        if self.cloud is None:
            return None
        endpoint = self.cloud.generation_endpoint()
        return SyncCloud(endpoint.stub, self.cloud.call_metadata, self._generation_timeout())

    def _async_cloud(self) -> AsyncCloud | None:
        if self.cloud is None:
            return None
        endpoint = self.cloud.generation_endpoint()
        return AsyncCloud(endpoint.aio_stub(), self.cloud.call_metadata, self._generation_timeout())

    def _generation_timeout(self) -> float:
        return max(60.0, 10 * (self.cloud_config.timeout_ms if self.cloud_config else 0) / 1e3)

    def generate(
        self,
        prompt_or_messages: str | Sequence[Mapping[str, str]],
        max_tokens: int = 64,
        stream: bool = True,
        *,
        policy: str | None = None,
        cascade_threshold: float | None = None,
        cascade_window: int | None = None,
        draft_tokens: int = 4,
    ) -> GenerationStream | GenerationResult:
        """Greedy text generation under a generation policy (default: the client's).

        stream=True returns a GenerationStream of tokens (`.id`, `.text`, `.source`) whose
        `.result` holds the GenerationResult once exhausted; stream=False returns the
        GenerationResult. Bad input raises before the first token (tandem.errors)."""
        run, generator, pool = self._generation(
            prompt_or_messages, max_tokens, policy, cascade_threshold, cascade_window, draft_tokens
        )
        try:
            cloud = self._sync_cloud() if run.settings.policy != "local_only" else None
        except TandemError:
            if run.settings.policy in ("cloud_only", "speculative"):
                self._generation_done(run, False, generator, pool)
                raise
            cloud = None
        tokens = GenerationStream(
            run, run_sync(run, cloud), lambda r, ok: self._generation_done(r, ok, generator, pool)
        )
        if stream:
            return tokens
        for _token in tokens:
            pass
        assert tokens.result is not None
        return tokens.result

    async def agenerate(
        self,
        prompt_or_messages: str | Sequence[Mapping[str, str]],
        max_tokens: int = 64,
        stream: bool = True,
        *,
        policy: str | None = None,
        cascade_threshold: float | None = None,
        cascade_window: int | None = None,
        draft_tokens: int = 4,
    ) -> AsyncGenerationStream | GenerationResult:
        """`generate` on the event loop (grpc.aio; local steps in a worker thread): the same
        plan, so the same tokens. `stream = await client.agenerate(...)`, then `async for`."""
        run, generator, pool = await asyncio.to_thread(
            self._generation,
            prompt_or_messages,
            max_tokens,
            policy,
            cascade_threshold,
            cascade_window,
            draft_tokens,
        )
        try:
            cloud = self._async_cloud() if run.settings.policy != "local_only" else None
        except TandemError:
            if run.settings.policy in ("cloud_only", "speculative"):
                self._generation_done(run, False, generator, pool)
                raise
            cloud = None
        tokens = AsyncGenerationStream(
            run, run_async(run, cloud), lambda r, ok: self._generation_done(r, ok, generator, pool)
        )
        if stream:
            return tokens
        async for _token in tokens:
            pass
        assert tokens.result is not None
        return tokens.result

    def stats(self) -> dict[str, Any]:
        """Counters for logs and the CLI."""
        models = self.local_models
        return {
            "model": self.model,
            "policy": self.policy.name,
            "local": self.current.describe() if self.current is not None else None,
            "selection": (
                models.selection.to_json() if models is not None and models.selection else None
            ),
            "swaps": models.swaps if models is not None else 0,
            "cache": {
                "entries": len(self.cache),
                "bytes": self.cache.nbytes,
                "hits": self.cache.hits,
                "misses": self.cache.misses,
            },
            "breakers": self.cloud.breaker_states() if self.cloud is not None else {},
            "shadow": (
                {
                    "sampled": self.shadow.sampled,
                    "agreed": self.shadow.agreed,
                    "dropped": self.shadow.dropped,
                    "failed": self.shadow.failed,
                }
                if self.shadow is not None
                else None
            ),
            "generation": self._generation_stats(),
        }

    def _generation_stats(self) -> dict[str, float]:
        with self._generators_lock:
            totals = dict(self._generation_totals)
        tokens = totals["tokens_local"] + totals["tokens_cloud"]
        totals["tokens_per_s"] = tokens / totals["seconds"] if totals["seconds"] else 0.0
        totals["acceptance_rate"] = (
            totals["accepted"] / totals["drafted"] if totals["drafted"] else 0.0
        )
        totals["escalation_rate"] = (
            totals["escalations"] / totals["generations"] if totals["generations"] else 0.0
        )
        return totals

    def close(self) -> None:
        """Stops the background threads, flushes telemetry and closes the channels."""
        with self._lock:
            if self._state == "closed":
                return
            self._state = "closed"
        if self.shadow is not None:
            self.shadow.close()
        if self.local_models is not None:
            self.local_models.close()
        self._router.close()
        self.telemetry.close()
        if self.cloud is not None:
            self.cloud.close()

    async def aclose(self) -> None:
        if self.cloud is not None:
            await self.cloud.aclose()
        await asyncio.to_thread(self.close)

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
