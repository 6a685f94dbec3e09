"""LiteRT (`ai_edge_litert`), falling back to `tflite_runtime` only where LiteRT is absent.

Tensors are matched to the manifest by name where the model keeps the names, else by the
signature's keys (`match_tensors`, which the build's check of the same file uses too).
Quantized (int8/uint8) inputs and outputs are (de)quantized with each tensor's own scale and
zero point, so callers always see the manifest's dtypes. Variants are exported for batch 1;
a batch of N is served by resizing the input where the model allows it, else row by row. A
LiteRT interpreter is not thread-safe, and resizing re-allocates, so runs are serialised and
the last shape is kept.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tandem.errors import RuntimeBackendError
from tandem.sdk.artifacts import Manifest
from tandem.sdk.runtimes.base import Arrays, Runtime, register_runtime


def match_tensors(
    interpreter: Any, names: Sequence[str], side: str = "outputs"
) -> list[dict[str, Any]]:
    """The interpreter's input or output (`side`) tensor details, in the order of `names`.

    By exact tensor name first (tandem's builds write the manifest's names into the file);
    else by the signature's keys: the names themselves (TensorFlow keeps them) or, from
    litert-torch, `args_<i>` / `output_<i>` by position. The tensors' own order is when they
    are computed, not their position, so it is a last resort, taken only where every tensor
    has its own shape and a swap could not pass the reference check unseen. One matcher for
    the SDK and the build's check of the same file, so the two cannot disagree.
    """
    details = list(
        interpreter.get_input_details() if side == "inputs" else interpreter.get_output_details()
    )
    by_name = {str(d["name"]): d for d in details}
    if all(n in by_name for n in names):
        return [by_name[n] for n in names]
    if len(details) != len(names):
        raise RuntimeBackendError(
            f"LiteRT model has {len(details)} {side}, the manifest names {len(names)}: "
            f"{list(names)}"
        )
    by_index = {int(d["index"]): d for d in details}
    keyed = _signature_indices(interpreter, side)
    if keyed is not None and all(n in keyed for n in names):
        return [by_index[keyed[n]] for n in names]
    positional = _positions(keyed) if keyed is not None else None
    if positional is not None and len(positional) == len(names):
        return [by_index[i] for i in positional]
    suffixed = [
        [d for d in details if str(d["name"]).endswith((f"_{n}", f"{n}:0", f"/{n}"))] for n in names
    ]
    if all(len(c) == 1 for c in suffixed) and len({id(c[0]) for c in suffixed}) == len(names):
        return [c[0] for c in suffixed]
    shapes = [tuple(int(x) for x in d["shape"]) for d in details]
    if len(set(shapes)) == len(shapes):
        return sorted(details, key=lambda d: int(d["index"]))
    raise RuntimeBackendError(
        f"LiteRT model's {side} {sorted(by_name)} cannot be told apart for the manifest's "
        f"{list(names)}: no names or signature match them and some share a shape"
    )


def _signature_indices(interpreter: Any, side: str) -> dict[str, int] | None:
    """{signature key: tensor index} of the model's only signature; None without exactly one."""
    try:
        signatures = interpreter.get_signature_list()
        if len(signatures) != 1:
            return None
        runner = interpreter.get_signature_runner(next(iter(signatures)))
        details = runner.get_input_details() if side == "inputs" else runner.get_output_details()
        return {str(key): int(d["index"]) for key, d in details.items()}
    except (AttributeError, ValueError, RuntimeError, KeyError):
        return None


def _positions(keyed: Mapping[str, int]) -> list[int] | None:
    """Tensor indices by position from keys `<prefix>_<i>` numbering 0..n-1, else None."""
    numbered: dict[int, int] = {}
    for key, index in keyed.items():
        prefix, _, number = key.rpartition("_")
        if not prefix or not number.isdigit():
            return None
        numbered[int(number)] = index
    if sorted(numbered) != list(range(len(keyed))):
        return None
    return [numbered[i] for i in range(len(keyed))]


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
        self._inputs = match_tensors(interpreter, self.input_names, "inputs")
        self._outputs = match_tensors(interpreter, self.output_names, "outputs")
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
                it.set_tensor(detail["index"], quantize(feeds[name], detail))
            it.invoke()
            outputs = {
                name: dequantize(it.get_tensor(detail["index"]), detail, spec.dtype)
                for name, detail, spec in zip(
                    self.output_names, self._outputs, self.manifest.outputs, strict=True
                )
            }
        except (ValueError, RuntimeError) as exc:
            raise RuntimeBackendError(f"LiteRT run failed: {exc}") from exc
        if self._shapes != self._original:
            self._resized_ok = True
        return outputs


def quantize(array: np.ndarray[Any, Any], detail: dict[str, Any]) -> np.ndarray[Any, Any]:
    """`array` in the input tensor's dtype; float into int8/uint8 by its scale and zero point."""
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


def dequantize(
    array: np.ndarray[Any, Any], detail: dict[str, Any], want: np.dtype[Any]
) -> np.ndarray[Any, Any]:
    """An output tensor's copy in dtype `want`; int8/uint8 into float by scale and zero point."""
    scale, zero = detail.get("quantization", (0.0, 0))
    if array.dtype.kind in "iu" and want.kind == "f" and scale:
        real: np.ndarray[Any, Any] = (array.astype(np.float32) - zero) * scale
        return real.astype(want)
    return np.array(array, dtype=want, copy=True)
