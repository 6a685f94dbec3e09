"""tandem.sdk.datatypes: the one V2 datatype table the SDK, the server and the tests share."""

from __future__ import annotations

import numpy as np

from tandem.sdk.datatypes import CONTENTS_FIELDS, DATATYPES, datatype_of


def test_every_datatype_maps_back_from_its_dtype_in_either_byte_order() -> None:
    for name, dtype in DATATYPES.items():
        assert datatype_of(dtype) == name
        assert datatype_of(dtype.newbyteorder(">")) == name
    assert datatype_of(np.dtype(np.float32)) == "FP32"
    assert datatype_of(np.dtype(object)) is None and datatype_of(np.dtype(np.complex64)) is None


def test_typed_contents_exist_for_all_but_fp16_which_travels_raw() -> None:
    assert set(DATATYPES) - set(CONTENTS_FIELDS) == {"FP16"}
    assert "BYTES" not in DATATYPES
    assert DATATYPES["INT64"].itemsize == 8 and DATATYPES["BOOL"].itemsize == 1
