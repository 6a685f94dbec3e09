"""The model repository: which models and versions are loaded, and swapping them live.

Layout (what `tandem models build` writes): `ROOT/<model>/config.json` and
`ROOT/<model>/<version>/model.onnx|model.pt|model.xml`, versions being positive integers.
A model folder with a `config.pbtxt` instead is a Triton model, read by `triton.py`.

Loading a new version never fails requests in flight: the new version is loaded off the event
loop, then published with one dict assignment; a version that leaves the policy stops taking
new requests, finishes the ones it queued, and only then frees its runtime.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tandem.errors import TandemError

from .backends import Backend, load_backend
from .batcher import Batcher, Outputs
from .config import ModelConfig
from .errors import (
    ModelNotFoundError,
    RepositoryError,
    RequestTimeoutError,
)
from .metrics import ServerMetrics, VersionMetrics
from .triton import CONFIG_FILE as TRITON_CONFIG
from .triton import load_triton_config

log = logging.getLogger(__name__)


def _config_path(folder: Path) -> Path | None:
    """The model's config: Triton's config.pbtxt when there is one, else config.json."""
    for name in (TRITON_CONFIG, "config.json"):
        if (folder / name).is_file():
            return folder / name
    return None


def _read_config(path: Path) -> ModelConfig:
    return load_triton_config(path) if path.name == TRITON_CONFIG else ModelConfig.load(path)


class ModelVersion:
    """One loaded version of a model: its config, its batcher and its metrics."""

    def __init__(
        self,
        config: ModelConfig,
        version: int,
        path: Path,
        batcher: Batcher,
        metrics: VersionMetrics,
        device: str,
    ) -> None:
        self.config = config
        self.version = version
        self.path = path
        self.batcher = batcher
        self.metrics = metrics
        self.device = device

    async def infer(
        self, inputs: Mapping[str, np.ndarray[Any, Any]], rows: int, timeout_s: float | None
    ) -> Outputs:
        future = self.batcher.submit(inputs, rows, timeout_s)
        if timeout_s is None:
            return await future
        try:
            return await asyncio.wait_for(future, timeout_s)
        except TimeoutError as exc:
            raise RequestTimeoutError(
                f"model {self.config.name!r}: no answer within the request's timeout "
                f"({timeout_s * 1e3:.1f} ms)"
            ) from exc


@dataclass
class _Model:
    config: ModelConfig | None = None
    config_mtime: float = 0.0
    versions: dict[int, ModelVersion] = field(default_factory=dict)
    error: str = ""  # why the last load failed, for the index


class ModelRepository:
    def __init__(self, root: Path, metrics: ServerMetrics, only: tuple[str, ...] = ()) -> None:
        if not root.is_dir():
            raise RepositoryError(f"model repository {root} is not a directory")
        self.root = root
        self._metrics = metrics
        self._only = only
        self._models: dict[str, _Model] = {}
        self._lock = asyncio.Lock()  # one load or unload at a time
        self._retiring: set[asyncio.Task[None]] = set()

    # --- lookups (the request path) --------------------------------------------------------
    def get(self, name: str, version: str = "") -> ModelVersion:
        model = self._models.get(name)
        if model is None or not model.versions:
            raise ModelNotFoundError(f"unknown model {name!r}")
        if not version:
            return model.versions[max(model.versions)]
        try:
            found = model.versions.get(int(version))
        except ValueError:
            found = None
        if found is None:
            raise ModelNotFoundError(
                f"model {name!r} has no version {version!r}; serving {sorted(model.versions)}"
            )
        return found

    def versions(self, name: str) -> list[int]:
        model = self._models.get(name)
        if model is None or not model.versions:
            raise ModelNotFoundError(f"unknown model {name!r}")
        return sorted(model.versions)

    def index(self) -> list[dict[str, str]]:
        rows: list[dict[str, str]] = []
        for name in self._model_names():
            model = self._models.get(name)
            if model is None or not model.versions:
                reason = model.error if model is not None else "not loaded"
                rows.append({"name": name, "version": "", "state": "UNAVAILABLE", "reason": reason})
                continue
            for v in sorted(model.versions):
                rows.append({"name": name, "version": str(v), "state": "READY", "reason": ""})
        return rows

    def queued(self) -> int:
        return sum(mv.batcher.queued for m in self._models.values() for mv in m.versions.values())

    # --- loading ---------------------------------------------------------------------------
    def _model_names(self) -> list[str]:
        names = sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and _config_path(p) is not None
        )
        return [n for n in names if not self._only or n in self._only]

    async def load_all(self) -> None:
        for name in self._model_names():
            try:
                await self.load(name)
            except TandemError as exc:
                log.error("model %s not loaded: %s", name, exc)

    async def load(self, name: str) -> list[int]:
        """(Re)reads a model's config and versions, loads what the policy selects and is not
        loaded yet, and retires what it no longer selects. Returns the served versions."""
        if self._only and name not in self._only:
            raise ModelNotFoundError(f"model {name!r} is not among the served models")
        folder = self.root / name
        config_path = None if "/" in name or name.startswith(".") else _config_path(folder)
        if config_path is None:
            raise ModelNotFoundError(f"no model {name!r} in repository {self.root}")
        async with self._lock:
            model = self._models.setdefault(name, _Model())
            try:
                return await self._load_locked(name, folder, config_path, model)
            except TandemError as exc:
                model.error = str(exc)
                raise

    async def _load_locked(
        self, name: str, folder: Path, config_path: Path, model: _Model
    ) -> list[int]:
        # Off the loop: a Triton ONNX model without tensors in its config opens the model.
        config = await asyncio.to_thread(_read_config, config_path)
        mtime = config_path.stat().st_mtime
        config_changed = model.config is not None and config != model.config
        on_disk = version_folders(folder, config.model_file)
        wanted = config.version_policy.select(on_disk)
        if not wanted:
            raise RepositoryError(
                f"model {name!r}: no version on disk matches its version policy "
                f"(found {sorted(on_disk)})"
            )
        loaded: dict[int, ModelVersion] = {}
        for version in wanted:
            current = model.versions.get(version)
            if current is not None and not config_changed:
                loaded[version] = current
                continue
            loaded[version] = await self._load_version(config, version, folder / str(version))
        retired = [mv for v, mv in model.versions.items() if loaded.get(v) is not mv]
        # Publish first: from here new requests go to the new set of versions.
        model.config = config
        model.config_mtime = mtime
        model.versions = loaded
        model.error = ""
        for mv in retired:
            self._retire(mv)
        log.info("model %s serving versions %s", name, sorted(loaded))
        return sorted(loaded)

    async def _load_version(self, config: ModelConfig, version: int, path: Path) -> ModelVersion:
        instances: list[Backend] = []
        try:
            for _ in range(config.instance_count):
                instances.append(await asyncio.to_thread(load_backend, config, path))
        except BaseException:
            for backend in instances:
                backend.close()
            raise
        metrics = self._metrics.for_version(config.name, version)
        batcher = Batcher(config, instances, metrics)
        self._metrics.model_ready.labels(config.name, str(version)).set(1)
        return ModelVersion(config, version, path, batcher, metrics, instances[0].device)

    def _retire(self, mv: ModelVersion) -> None:
        async def retire() -> None:
            await mv.batcher.close()
            self._metrics.model_ready.labels(mv.config.name, str(mv.version)).set(0)
            log.info("model %s version %d unloaded", mv.config.name, mv.version)

        task = asyncio.create_task(retire())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def unload(self, name: str) -> None:
        async with self._lock:
            model = self._models.get(name)
            if model is None or not model.versions:
                raise ModelNotFoundError(f"unknown model {name!r}")
            versions, model.versions = model.versions, {}
            for mv in versions.values():
                self._retire(mv)

    async def poll(self) -> None:
        """One scan: loads models whose config or version folders changed."""
        for name in self._model_names():
            model = self._models.get(name)
            if model is not None and model.config is not None and not self._changed(name, model):
                continue
            try:
                await self.load(name)
            except TandemError as exc:
                log.warning("poll: model %s not loaded: %s", name, exc)

    def _changed(self, name: str, model: _Model) -> bool:
        folder = self.root / name
        assert model.config is not None
        try:
            config_path = _config_path(folder)
            if config_path is None:  # removed: keep serving, as when config.json goes
                return False
            if config_path.stat().st_mtime != model.config_mtime:
                return True
            on_disk = version_folders(folder, model.config.model_file)
        except OSError:
            return False
        return set(model.config.version_policy.select(on_disk)) != set(model.versions)

    async def poll_forever(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.poll()
            except OSError as exc:
                log.warning("poll of %s failed: %s", self.root, exc)

    async def close(self) -> None:
        """Stops every version after it has computed what it queued."""
        async with self._lock:
            for model in self._models.values():
                versions, model.versions = model.versions, {}
                for mv in versions.values():
                    self._retire(mv)
        while self._retiring:
            await asyncio.gather(*list(self._retiring), return_exceptions=True)


def version_folders(folder: Path, model_file: str) -> list[int]:
    """The versions on disk under a model's folder: numbered folders (1 and up) that hold
    the model file."""
    return [
        int(p.name)
        for p in folder.iterdir()
        if p.is_dir() and p.name.isdigit() and int(p.name) > 0 and (p / model_file).is_file()
    ]
