"""The Open Inference Protocol (V2) tensor datatypes tandem handles: one table for all sides.

The SDK's cloud client, the artifact manifests, the inference server and the tests read the
same three facts from here: a V2 datatype's numpy dtype (little-endian, as the protocol's raw
bytes are; its `itemsize` is the element size on the wire), the `InferTensorContents` field
that carries it in typed form, and the way back from a numpy dtype to the V2 name.

BYTES (length-prefixed strings) is not here: no tandem model takes or returns it, so every
side refuses it as an unknown datatype. FP16 has no typed contents field in the protocol; it
travels only as raw bytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import numpy as np

# V2 datatype name -> numpy dtype, little-endian.
DATATYPES: Mapping[str, np.dtype[Any]] = MappingProxyType(
    {
        "BOOL": np.dtype(np.bool_),
        "UINT8": np.dtype("<u1"),
        "UINT16": np.dtype("<u2"),
        "UINT32": np.dtype("<u4"),
        "UINT64": np.dtype("<u8"),
        "INT8": np.dtype("<i1"),
        "INT16": np.dtype("<i2"),
        "INT32": np.dtype("<i4"),
        "INT64": np.dtype("<i8"),
        "FP16": np.dtype("<f2"),
        "FP32": np.dtype("<f4"),
        "FP64": np.dtype("<f8"),
    }
)

# V2 datatype name -> the InferTensorContents field that carries it (FP16: none, raw only).
CONTENTS_FIELDS: Mapping[str, str] = MappingProxyType(
    {
        "BOOL": "bool_contents",
        "UINT8": "uint_contents",
        "UINT16": "uint_contents",
        "UINT32": "uint_contents",
        "UINT64": "uint64_contents",
        "INT8": "int_contents",
        "INT16": "int_contents",
        "INT32": "int_contents",
        "INT64": "int64_contents",
        "FP32": "fp32_contents",
        "FP64": "fp64_contents",
    }
)

_NAMES = {dtype: name for name, dtype in DATATYPES.items()}


def datatype_of(dtype: np.dtype[Any]) -> str | None:
    """The V2 datatype name of a numpy dtype in either byte order; None when it has none.

    Each caller raises its own component's error for None, naming the tensor.
    """
    return _NAMES.get(dtype.newbyteorder("<"))
