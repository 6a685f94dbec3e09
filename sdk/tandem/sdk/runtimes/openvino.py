"""OpenVINO: compiles the IR (or ONNX) for the best device it offers, CPU by default."""

from __future__ import annotations

import importlib
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from tandem.errors import MissingDependencyError, RuntimeBackendError
from tandem.sdk.artifacts import Manifest
from tandem.sdk.runtimes.base import Arrays, Runtime, register_runtime


def import_openvino() -> ModuleType:
    """`openvino`, imported without its usage telemetry. Every tandem import of it goes here.

    `import openvino` (and NNCF, and `convert_model`) sends a usage event to Google
    Analytics through openvino_telemetry, on unless the user opted out, from a child process
    it forks. On a device that is a network call nobody asked for; and a fork in a process
    with other threads running (MQTT, runtimes, JAX in the build) can leave the child
    deadlocked on a lock it copied, which the parent then waits for at exit, deaf to SIGTERM:
    how the demo's device process once hung at shutdown. OpenVINO and NNCF fall back to
    no-op stubs when openvino_telemetry cannot be imported, so a None entry in sys.modules
    makes it unimportable first, unless something imported it already.
    """
    sys.modules.setdefault("openvino_telemetry", None)  # type: ignore[arg-type]
    return importlib.import_module("openvino")


# One Core per process, created and used for loading under one lock. In the demo's device
# process two agents warmed up OpenVINO models at the same moment (each creating its first
# Core while SDK threads selected runtimes) and the process hung for good, deaf to SIGTERM;
# serialising Core creation and model compilation removes that race. Compiled models still
# run concurrently (one infer request per thread).
_CORE_LOCK = threading.Lock()
_CORE: Any = None


def _shared_core(ov: Any) -> Any:
    global _CORE
    with _CORE_LOCK:
        if _CORE is None:
            _CORE = ov.Core()
        return _CORE


def compile_model(
    ov: Any, path: Path, *, device: str = "CPU", threads: int = 1, precision: str = "f32"
) -> Any:
    """The IR (or ONNX) file at `path`, read and compiled on the process's one Core under its
    lock (see above). Pinned to `precision` f32: on CPUs with bf16 units OpenVINO would
    otherwise run an fp32 model in bf16 and drift from the reference outputs (INT8 layers
    stay INT8 either way). Raises OpenVINO's RuntimeError."""
    core = _shared_core(ov)
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": precision}
    if device == "CPU":
        config["INFERENCE_NUM_THREADS"] = threads
    with _CORE_LOCK:
        return core.compile_model(core.read_model(str(path)), device, config)


@register_runtime
class OpenVINORuntime(Runtime):
    name = "openvino"
    packages = ("openvino",)
    extra = "openvino"

    def __init__(self, manifest: Manifest, model_dir: Path, compiled: Any, device: str) -> None:
        super().__init__(manifest, model_dir)
        self.compiled = compiled
        self.device = device
        self._local = threading.local()
        self._ports = [compiled.output(i) for i in range(len(compiled.outputs))]

    @classmethod
    def import_package(cls) -> ModuleType:
        try:
            return import_openvino()
        except ImportError as exc:
            raise MissingDependencyError("openvino", cls.extra, "the openvino runtime") from exc

    @classmethod
    def devices(cls) -> tuple[str, ...]:
        return tuple(_shared_core(cls.import_package()).available_devices)

    @classmethod
    def load(
        cls,
        manifest: Manifest,
        model_dir: Path,
        *,
        device: str = "CPU",
        threads: int = 1,
        precision: str = "f32",
        **_: Any,
    ) -> OpenVINORuntime:
        ov = cls.import_package()
        try:
            compiled = compile_model(
                ov,
                model_dir / manifest.entrypoint,
                device=device,
                threads=threads,
                precision=precision,
            )
        except RuntimeError as exc:
            raise RuntimeBackendError(f"OpenVINO cannot load {manifest.entrypoint}: {exc}") from exc
        return cls(manifest, model_dir, compiled, device)

    def run(self, feeds: Mapping[str, np.ndarray[Any, Any]]) -> Arrays:
        # One infer request per thread: a request is not safe to share.
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        try:
            # share_inputs: OpenVINO reads the caller's arrays in place (infer is synchronous,
            # and the arrays are C-contiguous after validation) instead of copying them.
            results = request.infer(dict(feeds), share_inputs=True)
        except RuntimeError as exc:
            raise RuntimeBackendError(f"OpenVINO run failed: {exc}") from exc
        return {
            name: np.array(results[port], copy=True)
            for name, port in zip(self.output_names, self._ports, strict=True)
        }

    def describe(self) -> str:
        return f"openvino[{self.device}]"
