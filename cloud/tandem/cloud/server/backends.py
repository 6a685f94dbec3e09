"""Runtimes behind one small interface: load a model version, run a batch, close.

One `Backend` object is one model instance (one session / compiled model). `run` is called
from a worker thread owned by the batcher, one call at a time per instance, so a backend needs
no locking of its own. Runtimes are imported lazily: a missing one raises
`MissingDependencyError` naming the extra, and any runtime failure becomes `BackendError`.
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from tandem.errors import MissingDependencyError
from tandem.sdk.runtimes.openvino import import_openvino

from .config import ModelConfig
from .errors import BackendError

log = logging.getLogger(__name__)

Arrays = Mapping[str, np.ndarray[Any, Any]]


class Backend(ABC):
    """One loaded instance of one model version."""

    device: str = "cpu"

    def __init__(self, config: ModelConfig, path: Path) -> None:
        self.config = config
        self.path = path

    @abstractmethod
    def run(self, inputs: Arrays) -> dict[str, np.ndarray[Any, Any]]:
        """Runs one batch; returns every output of the model by name."""

    def close(self) -> None:  # noqa: B027 - optional hook; most runtimes free on GC
        """Frees the runtime's resources."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _threads(config: ModelConfig) -> int:
    """CPU threads per instance: the model's `parameters.threads`, else the cores left after
    one for the event loop and gRPC, shared by the instances (on a 2-core machine one runtime
    thread measured ~14% more throughput than two: the frontend needs its core)."""
    if "threads" in config.parameters:
        return max(1, int(config.parameters["threads"]))
    return max(1, ((os.cpu_count() or 1) - 1) // config.instance_count)


class OnnxRuntimeBackend(Backend):
    def __init__(self, config: ModelConfig, path: Path) -> None:
        super().__init__(config, path)
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise MissingDependencyError("onnxruntime", "onnx", "the onnxruntime backend") from exc
        options = ort.SessionOptions()
        options.intra_op_num_threads = _threads(config)
        options.inter_op_num_threads = 1
        # Spinning worker threads steal cores from the event loop and the other instances.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers: list[str] = ["CPUExecutionProvider"]
        if config.instance_kind != "cpu" and "CUDAExecutionProvider" in (
            ort.get_available_providers()
        ):
            providers.insert(0, "CUDAExecutionProvider")
        elif config.instance_kind == "gpu":
            raise BackendError(f"{config.name}: instance kind gpu but onnxruntime has no CUDA")
        try:
            self._session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:
            raise BackendError(f"{config.name}: onnxruntime cannot load {path}: {exc}") from exc
        self.device = "cuda" if "CUDAExecutionProvider" in self._session.get_providers() else "cpu"
        self._outputs = [o.name for o in self._session.get_outputs()]

    def run(self, inputs: Arrays) -> dict[str, np.ndarray[Any, Any]]:
        try:
            results = self._session.run(self._outputs, dict(inputs))
        except Exception as exc:
            raise BackendError(f"{self.config.name}: onnxruntime failed: {exc}") from exc
        return dict(zip(self._outputs, results, strict=True))


class TorchScriptBackend(Backend):
    def __init__(self, config: ModelConfig, path: Path) -> None:
        super().__init__(config, path)
        try:
            import torch
        except ImportError as exc:
            raise MissingDependencyError("torch", "torch", "the pytorch backend") from exc
        self._torch = torch
        use_cuda = config.instance_kind != "cpu" and torch.cuda.is_available()
        if config.instance_kind == "gpu" and not use_cuda:
            raise BackendError(f"{config.name}: instance kind gpu but torch has no CUDA")
        self.device = "cuda" if use_cuda else "cpu"
        try:
            self._module = torch.jit.load(  # type: ignore[no-untyped-call]
                str(path), map_location=self.device
            ).eval()
        except Exception as exc:
            raise BackendError(f"{config.name}: torch cannot load {path}: {exc}") from exc

    def run(self, inputs: Arrays) -> dict[str, np.ndarray[Any, Any]]:
        torch = self._torch
        try:
            with torch.inference_mode():
                args = [
                    torch.from_numpy(np.ascontiguousarray(inputs[t.name])).to(self.device)
                    for t in self.config.inputs
                ]
                result = self._module(*args)
        except Exception as exc:
            raise BackendError(f"{self.config.name}: torch failed: {exc}") from exc
        if isinstance(result, dict):
            values = [result[t.name] for t in self.config.outputs]
        elif isinstance(result, list | tuple):
            values = list(result)
        else:
            values = [result]
        if len(values) != len(self.config.outputs):
            raise BackendError(
                f"{self.config.name}: model returned {len(values)} outputs, "
                f"config names {len(self.config.outputs)}"
            )
        return {
            t.name: v.detach().cpu().numpy()
            for t, v in zip(self.config.outputs, values, strict=True)
        }


class OpenVinoBackend(Backend):
    def __init__(self, config: ModelConfig, path: Path) -> None:
        super().__init__(config, path)
        try:
            ov = import_openvino()
        except ImportError as exc:
            raise MissingDependencyError("openvino", "openvino", "the openvino backend") from exc
        core = ov.Core()
        device = "CPU"
        if config.instance_kind != "cpu" and "GPU" in core.available_devices:
            device = "GPU"
        self.device = device.lower()
        try:
            model = core.read_model(str(path))
            compiled = core.compile_model(
                model,
                device,
                {
                    "INFERENCE_NUM_THREADS": _threads(config),
                    # The cloud tier serves the full-precision model: no silent bf16 on CPUs
                    # that have it (the config's `precision` parameter can ask for it).
                    "INFERENCE_PRECISION_HINT": config.parameters.get("precision", "f32"),
                },
            )
        except Exception as exc:
            raise BackendError(f"{config.name}: openvino cannot load {path}: {exc}") from exc
        self._request = compiled.create_infer_request()
        self._outputs = [(o, o.get_any_name()) for o in compiled.outputs]

    def run(self, inputs: Arrays) -> dict[str, np.ndarray[Any, Any]]:
        try:
            results = self._request.infer(dict(inputs))
            return {name: np.array(results[port]) for port, name in self._outputs}
        except Exception as exc:
            raise BackendError(f"{self.config.name}: openvino failed: {exc}") from exc


_BACKENDS: dict[str, type[Backend]] = {
    "onnxruntime": OnnxRuntimeBackend,
    "pytorch": TorchScriptBackend,
    "openvino": OpenVinoBackend,
}


def load_backend(config: ModelConfig, version_dir: Path) -> Backend:
    """Loads one instance of `config`'s model from `version_dir`."""
    path = version_dir / config.model_file
    if not path.is_file():
        raise BackendError(f"{config.name}: {path} does not exist")
    backend = _BACKENDS[config.backend](config, path)
    log.info("loaded %s from %s on %s", config.name, path, backend.device)
    return backend
