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
        **policy_settings: Any,
    ) -> None:
        if not model:
            raise ConfigError("model", "a model name is needed")
        self.model = model
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
        }

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
