"""The one small interface every local runtime implements, and the registry that names them.

A runtime is shaped like an httpx transport: `load` (a classmethod that builds it from an
unpacked variant folder and its manifest), `run` and `close`, plus context-manager support.
Runtimes register by name; third-party runtimes can register under the `tandem.runtimes`
entry-point group. Every optional package is imported lazily, inside `load`, and a missing
one raises `MissingDependencyError` naming the extra to install.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any, ClassVar

import numpy as np

from tandem.errors import ConfigError, MissingDependencyError
from tandem.sdk.artifacts import Manifest

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "tandem.runtimes"
Arrays = dict[str, np.ndarray[Any, Any]]


class Runtime(ABC):
    """A loaded model on one local runtime. `run` must be safe to call from many threads."""

    name: ClassVar[str]  # the manifest's `runtime` value this class loads
    packages: ClassVar[tuple[str, ...]]  # import names, first found wins
    extra: ClassVar[str]  # the tandem extra that installs it
    # Whether `run` takes any batch size even when the model was exported for batch 1.
    resizes_batch: ClassVar[bool] = False

    def __init__(self, manifest: Manifest, model_dir: Path) -> None:
        self.manifest = manifest
        self.model_dir = model_dir
        self.output_names = tuple(t.name for t in manifest.outputs)

    @classmethod
    def is_installed(cls) -> bool:
        return any(importlib.util.find_spec(p) is not None for p in cls.packages)

    @classmethod
    def import_package(cls) -> ModuleType:
        for package in cls.packages:
            try:
                return importlib.import_module(package)
            except ImportError:
                continue
        raise MissingDependencyError(cls.packages[0], cls.extra, f"the {cls.name} runtime")

    @classmethod
    @abstractmethod
    def load(cls, manifest: Manifest, model_dir: Path, **options: Any) -> Runtime:
        """Builds the runtime from an unpacked variant folder."""

    @abstractmethod
    def run(self, feeds: Mapping[str, np.ndarray[Any, Any]]) -> Arrays:
        """Runs one batch; returns outputs by the manifest's output names."""

    def close(self) -> None:  # noqa: B027 - most runtimes free everything on garbage collection
        """Releases what the runtime holds."""

    def describe(self) -> str:
        return self.name

    def __enter__(self) -> Runtime:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


_REGISTRY: dict[str, type[Runtime] | str] = {
    "onnx": "tandem.sdk.runtimes.onnx:OnnxRuntime",
    "tflite": "tandem.sdk.runtimes.litert:LiteRTRuntime",
    "openvino": "tandem.sdk.runtimes.openvino:OpenVINORuntime",
    "torch": "tandem.sdk.runtimes.torch:TorchRuntime",
}
_entry_points_loaded = False


def register_runtime(cls: type[Runtime]) -> type[Runtime]:
    """Registers a runtime class under `cls.name` (usable as a decorator)."""
    _REGISTRY[cls.name] = cls
    return cls


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        _REGISTRY.setdefault(ep.name, ep.value)


def runtime_names() -> tuple[str, ...]:
    _load_entry_points()
    return tuple(_REGISTRY)


def get_runtime(name: str) -> type[Runtime]:
    """The runtime class registered as `name` (imports its module, not its package)."""
    _load_entry_points()
    entry = _REGISTRY.get(name)
    if entry is None:
        raise ConfigError("runtime", f"unknown runtime {name!r}; known: {sorted(_REGISTRY)}")
    if isinstance(entry, str):
        module_name, _, attr = entry.partition(":")
        cls = getattr(importlib.import_module(module_name), attr)
        if not (isinstance(cls, type) and issubclass(cls, Runtime)):
            raise ConfigError("runtime", f"{entry} is not a tandem Runtime")
        _REGISTRY[name] = cls
        return cls
    return entry
