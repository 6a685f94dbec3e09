"""V2 tensors to numpy and back: pure functions, no IO, every error names the tensor.

The checks run in the order a client would want to read them: name, then datatype, then shape
(rank, fixed dimensions, batch size, element count), then the bytes themselves.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from tandem.sdk.datatypes import DATATYPES

from .errors import InvalidInputError

if TYPE_CHECKING:
    from .config import ModelConfig


@dataclass(frozen=True)
class TensorHeader:
    """What a request says about one input tensor, before its data is decoded."""

    name: str
    datatype: str
    shape: tuple[int, ...]


def element_count(name: str, shape: Sequence[int], max_elements: int) -> int:
    """The element count of `shape`, refusing negative dims and counts past `max_elements`."""
    count = 1
    for dim in shape:
        if dim < 0:
            raise InvalidInputError(
                f"input {name!r}: negative dimension in shape {list(shape)}", name
            )
        count *= dim  # Python ints do not overflow; the bound check below catches giant shapes
        if count > max_elements:
            raise InvalidInputError(
                f"input {name!r}: shape {list(shape)} has more elements than the "
                f"server accepts ({max_elements})",
                name,
            )
    return count


def check_headers(config: ModelConfig, headers: Sequence[TensorHeader], max_elements: int) -> int:
    """Validates names, datatypes and shapes against the model; returns the batch size.

    The batch size is the leading dimension shared by every input when the model batches,
    and 1 when it does not.
    """
    expected = {t.name: t for t in config.inputs}
    seen: set[str] = set()
    rows: int | None = None
    for header in headers:
        spec = expected.get(header.name)
        if spec is None:
            raise InvalidInputError(
                f"unknown input {header.name!r} for model {config.name!r}; "
                f"expected {sorted(expected)}",
                header.name,
            )
        if header.name in seen:
            raise InvalidInputError(f"input {header.name!r} given twice", header.name)
        seen.add(header.name)
        if header.datatype != spec.datatype:
            raise InvalidInputError(
                f"input {header.name!r}: datatype {header.datatype} but the model takes "
                f"{spec.datatype}",
                header.name,
            )
        full = config.full_shape(spec)
        element_count(header.name, header.shape, max_elements)
        if len(header.shape) != len(full) or any(
            want != -1 and got != want for want, got in zip(full, header.shape, strict=True)
        ):
            raise InvalidInputError(
                f"input {header.name!r}: shape {list(header.shape)} does not match the "
                f"model's {list(full)}",
                header.name,
            )
        if config.max_batch_size > 0:
            batch = header.shape[0]
            if batch < 1 or batch > config.max_batch_size:
                raise InvalidInputError(
                    f"input {header.name!r}: batch size {batch} outside 1..{config.max_batch_size}",
                    header.name,
                )
            if rows is not None and batch != rows:
                raise InvalidInputError(
                    f"input {header.name!r}: batch size {batch} differs from the other "
                    f"inputs' {rows}",
                    header.name,
                )
            rows = batch
    missing = sorted(set(expected) - seen)
    if missing:
        raise InvalidInputError(f"missing input {missing[0]!r}", missing[0])
    return rows if rows is not None else 1


def from_raw(header: TensorHeader, raw: bytes) -> np.ndarray[Any, Any]:
    dtype = DATATYPES[header.datatype]
    count = 1
    for dim in header.shape:
        count *= dim
    expected = count * dtype.itemsize
    if len(raw) != expected:
        raise InvalidInputError(
            f"input {header.name!r}: {len(raw)} bytes of raw data, but shape "
            f"{list(header.shape)} of {header.datatype} needs {expected}",
            header.name,
        )
    return np.frombuffer(raw, dtype=dtype).reshape(header.shape)


def from_values(header: TensorHeader, values: Sequence[Any]) -> np.ndarray[Any, Any]:
    """Typed `contents` (gRPC) or JSON `data` (HTTP, may be nested) to an array."""
    dtype = DATATYPES[header.datatype]
    try:
        array = np.asarray(values, dtype=dtype)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidInputError(
            f"input {header.name!r}: data is not {header.datatype}: {exc}", header.name
        ) from exc
    count = 1
    for dim in header.shape:
        count *= dim
    if array.size != count:
        raise InvalidInputError(
            f"input {header.name!r}: {array.size} values, but shape {list(header.shape)} "
            f"needs {count}",
            header.name,
        )
    return array.reshape(header.shape)


def requested_outputs(config: ModelConfig, names: Sequence[str]) -> tuple[str, ...]:
    """The outputs to return: the ones asked for (checked), else all of the model's."""
    if not names:
        return tuple(t.name for t in config.outputs)
    known = {t.name for t in config.outputs}
    for name in names:
        if name not in known:
            raise InvalidInputError(
                f"unknown output {name!r} for model {config.name!r}; expected {sorted(known)}",
                name,
            )
    return tuple(names)


def output_datatypes(config: ModelConfig) -> Mapping[str, str]:
    return {t.name: t.datatype for t in config.outputs}
