"""LiteRT (`ai_edge_litert`), falling back to `tflite_runtime` only where LiteRT is absent.

Tensors are matched to the manifest by name where the model keeps the names, else by
position. Quantized (int8/uint8) inputs and outputs are (de)quantized with the tensor's scale
and zero point, so callers always see the manifest's dtypes. A LiteRT interpreter is not
thread-safe, and resizing for a new batch size re-allocates, so runs are serialised and the
last shape is kept.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from tandem.errors import RuntimeBackendError
from tandem.sdk.artifacts import Manifest
from tandem.sdk.runtimes.base import Arrays, Runtime, register_runtime


def _match(details: list[dict[str, Any]], names: tuple[str, ...]) -> list[dict[str, Any]]:
    by_name: dict[str, dict[str, Any]] = {}
    for d in details:
        raw = str(d["name"])
        for name in names:
            if raw == name or raw.endswith(f"_{name}") or raw.endswith(f"{name}:0"):
                by_name[name] = d
    if len(by_name) == len(names):
        return [by_name[n] for n in names]
    if len(details) != len(names):
        raise RuntimeBackendError(
            f"LiteRT model has {len(details)} tensors, manifest names {len(names)}: {names}"
        )
    return sorted(details, key=lambda d: int(d["index"]))


@register_runtime
class LiteRTRuntime(Runtime):
    name = "tflite"
    packages = ("ai_edge_litert", "tflite_runtime")
    extra = "tflite"
    resizes_batch = True

    def __init__(self, manifest: Manifest, model_dir: Path, interpreter: Any) -> None:
        super().__init__(manifest, model_dir)
        self.interpreter = interpreter
        self._lock = threading.Lock()
        self.input_names = tuple(t.name for t in manifest.inputs)
        self._inputs = _match(interpreter.get_input_details(), self.input_names)
        self._outputs = _match(interpreter.get_output_details(), self.output_names)
        self._fixed_shape = False
        self._resized_ok = False
        self._shapes = {
            name: tuple(d["shape"]) for name, d in zip(self.input_names, self._inputs, strict=True)
        }
        self._original = dict(self._shapes)

    @classmethod
    def load(
        cls, manifest: Manifest, model_dir: Path, *, threads: int = 1, **_: Any
    ) -> LiteRTRuntime:
        package = cls.import_package()
        if package.__name__ == "ai_edge_litert":
            from importlib import import_module

            interpreter_cls = import_module("ai_edge_litert.interpreter").Interpreter
        else:
            interpreter_cls = package.interpreter.Interpreter
        try:
            interpreter = interpreter_cls(
                model_path=str(model_dir / manifest.entrypoint), num_threads=threads
            )
            interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise RuntimeBackendError(f"LiteRT cannot load {manifest.entrypoint}: {exc}") from exc
        return cls(manifest, model_dir, interpreter)

    def run(self, feeds: Mapping[str, np.ndarray[Any, Any]]) -> Arrays:
        with self._lock:
            if self._fixed_shape:
                return self._run_rows(feeds)
            try:
                return self._run(feeds)
            except RuntimeBackendError:
                if self._resized_ok:
                    raise
                # This model does not resize: serve batches one row at a time from now on.
                self._fixed_shape = True
                self._restore_shapes()
                return self._run_rows(feeds)

    def _restore_shapes(self) -> None:
        it = self.interpreter
        for name, detail in zip(self.input_names, self._inputs, strict=True):
            it.resize_tensor_input(detail["index"], list(self._original[name]))
            self._shapes[name] = self._original[name]
        it.allocate_tensors()

    def _run_rows(self, feeds: Mapping[str, np.ndarray[Any, Any]]) -> Arrays:
        rows = next(iter(feeds.values())).shape[0]
        parts = [self._run({k: v[i : i + 1] for k, v in feeds.items()}) for i in range(rows)]
        return {name: np.concatenate([p[name] for p in parts]) for name in self.output_names}

    def _run(self, feeds: Mapping[str, np.ndarray[Any, Any]]) -> Arrays:
        it = self.interpreter
        try:
            resized = False
            for name, detail in zip(self.input_names, self._inputs, strict=True):
                shape = feeds[name].shape
                if self._shapes[name] != shape:
                    it.resize_tensor_input(detail["index"], list(shape))
                    self._shapes[name] = shape
                    resized = True
            if resized:
                it.allocate_tensors()
            for name, detail in zip(self.input_names, self._inputs, strict=True):
                it.set_tensor(detail["index"], _quantize(feeds[name], detail))
            it.invoke()
            outputs = {
                name: _dequantize(it.get_tensor(detail["index"]), detail, spec.dtype)
                for name, detail, spec in zip(
                    self.output_names, self._outputs, self.manifest.outputs, strict=True
                )
            }
        except (ValueError, RuntimeError) as exc:
            raise RuntimeBackendError(f"LiteRT run failed: {exc}") from exc
        if self._shapes != self._original:
            self._resized_ok = True
        return outputs


def _quantize(array: np.ndarray[Any, Any], detail: dict[str, Any]) -> np.ndarray[Any, Any]:
    dtype = np.dtype(detail["dtype"])
    if array.dtype == dtype:
        return array
    scale, zero = detail.get("quantization", (0.0, 0))
    if dtype.kind in "iu" and array.dtype.kind == "f" and scale:
        info = np.iinfo(dtype)
        quantized: np.ndarray[Any, Any] = np.clip(
            np.round(array / scale + zero), info.min, info.max
        )
        return quantized.astype(dtype)
    return array.astype(dtype)


def _dequantize(
    array: np.ndarray[Any, Any], detail: dict[str, Any], want: np.dtype[Any]
) -> np.ndarray[Any, Any]:
    scale, zero = detail.get("quantization", (0.0, 0))
    if array.dtype.kind in "iu" and want.kind == "f" and scale:
        real: np.ndarray[Any, Any] = (array.astype(np.float32) - zero) * scale
        return real.astype(want)
    return np.array(array, dtype=want, copy=True)
