"""A model's input/output signature and the checks every request goes through.

The checks run on every call, so they are precomputed into plain tuples at construction and
cost about a microsecond per tensor. Errors name the tensor, what was expected and what came.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from tandem.errors import InputError
from tandem.sdk.artifacts import TensorSpec

Arrays = dict[str, np.ndarray[Any, Any]]


def _shape_text(shape: Sequence[int]) -> str:
    return "[" + ", ".join("?" if d < 0 else str(d) for d in shape) + "]"


class Signature:
    """Inputs and outputs of a model; `prepare` validates a request against them."""

    def __init__(
        self,
        inputs: Sequence[TensorSpec],
        outputs: Sequence[TensorSpec],
        *,
        task: str = "",
        temperature: float = 1.0,
    ) -> None:
        self.inputs = tuple(inputs)
        self.outputs = tuple(outputs)
        self.task = task
        self.temperature = float(temperature)
        self.input_names = tuple(t.name for t in self.inputs)
        self._names = frozenset(self.input_names)
        self._single = self.inputs[0].name if len(self.inputs) == 1 else None
        self._checks = tuple(
            (
                t.name,
                t.dtype,
                len(t.shape),
                tuple((axis, d) for axis, d in enumerate(t.shape) if d >= 0),
                t.shape,
                len(t.shape) >= 1 and t.shape[0] < 0,
            )
            for t in self.inputs
        )
        first = self._checks[0] if self._checks else None
        self._fast = (
            (first[0], first[1], first[2], first[3])
            if self._single is not None and first is not None and first[5]
            else None
        )
        # The first output of a classifier holds its logits.
        self.logits_name = (
            self.outputs[0].name if task == "classification" and self.outputs else None
        )

    def same_as(self, other: Signature) -> bool:
        return self.inputs == other.inputs and self.outputs == other.outputs

    def prepare(self, inputs: Mapping[str, Any] | np.ndarray[Any, Any]) -> Arrays:
        """Checks `inputs`; returns C-contiguous arrays by input name (a batch dim is added to
        a single sample whose rank is one less than the model's batched input)."""
        fast = self._fast
        if fast is not None and type(inputs) is np.ndarray:
            # The common call: one input, already the right dtype, rank and layout.
            name, dtype, rank, fixed = fast
            if inputs.dtype == dtype and inputs.ndim == rank and inputs.flags.c_contiguous:
                shape = inputs.shape
                for axis, size in fixed:
                    if shape[axis] != size:
                        break
                else:
                    if shape[0]:
                        return {name: inputs}
        if isinstance(inputs, np.ndarray):
            if self._single is None:
                raise InputError(
                    f"the model has {len(self.inputs)} inputs {list(self.input_names)}: "
                    "pass a dict of arrays by name, not a single array"
                )
            inputs = {self._single: inputs}
        elif not isinstance(inputs, Mapping):
            raise InputError(
                f"inputs: expected a numpy array or a dict of arrays by name "
                f"{list(self.input_names)}, got {type(inputs).__name__}"
            )
        if len(inputs) != len(self._checks) or not self._names.issuperset(inputs):
            unexpected = sorted(str(k) for k in inputs if k not in self._names)
            if unexpected:
                raise InputError(
                    f"unexpected input tensor {unexpected[0]!r}: the model's inputs are "
                    f"{list(self.input_names)}"
                )
        feeds: Arrays = {}
        for name, dtype, rank, fixed, shape_spec, batched in self._checks:
            array = inputs.get(name)
            if array is None:
                raise InputError(
                    f"input tensor {name!r} is missing: expected {dtype} "
                    f"{_shape_text(shape_spec)}, got nothing"
                )
            if not isinstance(array, np.ndarray):
                raise InputError(
                    f"input tensor {name!r}: expected a numpy array of {dtype}, "
                    f"got {type(array).__name__}"
                )
            if array.dtype != dtype:
                raise InputError(
                    f"input tensor {name!r}: expected dtype {dtype}, got {array.dtype}"
                )
            shape = array.shape
            if len(shape) != rank:
                if batched and len(shape) == rank - 1:
                    array = array[np.newaxis]
                    shape = array.shape
                else:
                    raise InputError(
                        f"input tensor {name!r}: expected shape {_shape_text(shape_spec)} "
                        f"(rank {rank}), got {list(shape)}"
                    )
            for axis, size in fixed:
                if shape[axis] != size:
                    raise InputError(
                        f"input tensor {name!r}: expected shape {_shape_text(shape_spec)}, "
                        f"got {list(shape)} (dimension {axis} must be {size})"
                    )
            if batched and shape[0] == 0:
                raise InputError(f"input tensor {name!r}: empty batch, got shape {list(shape)}")
            if not array.flags.c_contiguous:
                array = np.ascontiguousarray(array)
            feeds[name] = array
        return feeds

    def confidences(
        self, outputs: Mapping[str, np.ndarray[Any, Any]]
    ) -> np.ndarray[Any, Any] | None:
        """Calibrated confidence per row: max softmax(logits / temperature)."""
        if self.logits_name is None:
            return None
        logits = outputs.get(self.logits_name)
        if logits is None or logits.ndim != 2:
            return None
        return softmax_max(logits, self.temperature)

    def confidence(self, outputs: Mapping[str, np.ndarray[Any, Any]]) -> float | None:
        """The least confident row's calibrated confidence (one number for the request)."""
        if self.logits_name is None:
            return None
        logits = outputs.get(self.logits_name)
        if logits is None or logits.ndim != 2 or logits.shape[0] == 0:
            return None
        if logits.shape[0] == 1:
            # Plain Python beats numpy's per-call overhead on one row of a few classes.
            row = logits[0].tolist()
            top = max(row)
            inv_t = 1.0 / self.temperature
            total = 0.0
            for v in row:
                total += math.exp((v - top) * inv_t)
            return 1.0 / total
        return float(softmax_max(logits, self.temperature).min())


def softmax_max(logits: np.ndarray[Any, Any], temperature: float) -> np.ndarray[Any, Any]:
    z = logits.astype(np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    result: np.ndarray[Any, Any] = 1.0 / np.exp(z).sum(axis=1)
    return result
