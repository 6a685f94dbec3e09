"""Hostile gRPC input: a hypothesis-driven fuzzer against a real `tandem serve` process.

Random and malformed ModelInfer requests (wrong datatypes, shapes that disagree with the byte
length, negative or huge dimensions, typed and raw contents mixed, unknown models and
versions, messages over the size limit). Every answer must carry the status a client can act
on (OK for a valid request, NOT_FOUND for an unknown model or version, INVALID_ARGUMENT for a
bad input, RESOURCE_EXHAUSTED for a message over the limit), never UNKNOWN or INTERNAL; the
process stays up and its resident memory stays bounded.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tandem.protos.inference import grpc_predict_v2_pb2 as pb
from tandem.sdk import datatypes
from tests.cloud.conftest import ServerProcess, start_server
from tests.cloud.modelkit import build_test_repository
from tests.support.figures import Figures

MAX_MESSAGE = 1 << 20
EXAMPLES = 400
# Known models in the cloud test repository: input name, datatype, dims without the batch.
MODELS: dict[str, tuple[str, str, tuple[int, ...], int]] = {
    "digits": ("pixels", "FP32", (64,), 64),
    "seqsum": ("tokens", "INT64", (-1,), 64),
}
# Bytes per element of each datatype tandem knows; anything else the test sends counts as 4.
ITEM = {name: dtype.itemsize for name, dtype in datatypes.DATATYPES.items()}
DATATYPES = [*ITEM, "BYTES", "BF16", "float", "", "FP32 "]
SANE = {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED"}


@pytest.fixture(scope="module")
def server(teacher: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("fuzz-repo")
    repository = build_test_repository(root / "repository", teacher)
    proc = start_server(
        repository,
        tmp_path_factory.mktemp("fuzz-server"),
        "--max-message-bytes",
        str(MAX_MESSAGE),
        "--no-access-log",
    )
    yield proc
    proc.stop()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


dims = st.one_of(
    st.integers(0, 70),
    st.sampled_from([-1, -(2**40), 2**31, 2**40, 2**62, 2**63 - 1, -(2**63)]),
)


@st.composite
def requests(draw: st.DrawFn) -> tuple[pb.ModelInferRequest, str]:
    """A request and the status a correct server gives it."""
    known = draw(st.booleans()) or draw(st.booleans())
    model = (
        draw(st.sampled_from(sorted(MODELS)))
        if known
        else draw(st.sampled_from(["nope", "", "../digits", "digits ", "DIGITS", "x" * 300]))
    )
    version = draw(st.sampled_from(["", "", "", "", "", "1", "1", "2", "0", "-1", "x", "9" * 30]))
    request = pb.ModelInferRequest(model_name=model, model_version=version, id=draw(st.text()))
    expected = "OK"
    if model not in MODELS or version not in ("", "1"):
        expected = "NOT_FOUND"
    spec = MODELS.get(model, ("pixels", "FP32", (64,), 64))
    count = draw(st.sampled_from([1, 1, 1, 1, 0, 2, 3]))
    if count != 1:
        expected = "INVALID_ARGUMENT" if expected == "OK" else expected
    for _ in range(count):
        valid = draw(st.booleans())
        name = spec[0] if valid or draw(st.booleans()) else draw(st.text(max_size=20))
        datatype = spec[1] if valid or draw(st.booleans()) else draw(st.sampled_from(DATATYPES))
        batch = draw(st.integers(1, 8))
        if valid:
            shape = [batch, *(d if d > 0 else draw(st.integers(1, 16)) for d in spec[2])]
        else:
            shape = draw(st.lists(dims, max_size=4))
        tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
        elements = int(np.prod(shape, dtype=object)) if shape else 1
        exact = elements * ITEM.get(datatype, 4) if 0 <= elements < 1 << 16 else 0
        how = draw(st.sampled_from(["raw", "raw", "typed", "both", "none"])) if not valid else "raw"
        if how in ("raw", "both"):
            length = exact if valid or draw(st.booleans()) else draw(st.integers(0, 4096))
            # Drawing big byte strings is slow in hypothesis; their content does not matter.
            data = draw(st.binary(min_size=length, max_size=length)) if length <= 512 else None
            request.raw_input_contents.append(data if data is not None else b"\x07" * length)
        if how in ("typed", "both"):
            tensor.contents.fp32_contents.extend(draw(st.lists(st.floats(width=32), max_size=200)))
        well_formed = (
            name == spec[0]
            and datatype == spec[1]
            and len(shape) == len(spec[2]) + 1
            and 1 <= shape[0] <= spec[3]
            and all(s == d or (d == -1 and s > 0) for s, d in zip(shape[1:], spec[2], strict=False))
            and how == "raw"
            and len(request.raw_input_contents[-1]) == exact
        )
        if not well_formed and expected == "OK":
            expected = "INVALID_ARGUMENT"
    if draw(st.integers(0, 9)) == 0:
        request.outputs.add(name=draw(st.sampled_from(["logits", "total", "probs", ""])))
        wanted = "logits" if model == "digits" else "total"
        if expected == "OK" and request.outputs[0].name != wanted:
            expected = "INVALID_ARGUMENT"
    return request, expected


def call(stub: Any, request: pb.ModelInferRequest) -> tuple[str, str]:
    try:
        stub.ModelInfer(request, timeout=20)
    except grpc.RpcError as exc:
        return exc.code().name, str(exc.details())
    return "OK", ""


def test_fuzzed_model_infer_gets_the_right_status_and_memory_stays_bounded(
    server: ServerProcess, figures: Figures
) -> None:
    stub = server.stub(**{"grpc.max_send_message_length": 64 << 20})
    warm = pb.ModelInferRequest(model_name="digits")
    warm.inputs.add(name="pixels", datatype="FP32", shape=[4, 64])
    warm.raw_input_contents.append(b"\0" * 4 * 4 * 64)
    for _ in range(50):
        assert call(stub, warm)[0] == "OK"
    before = rss_kib(server.proc.pid)
    codes: Counter[str] = Counter()
    wrong: list[tuple[str, str, str, str]] = []

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(requests())
    def fuzz(case: tuple[pb.ModelInferRequest, str]) -> None:
        request, expected = case
        code, details = call(stub, request)
        codes[code] += 1
        if code != expected:
            wrong.append((expected, code, details[:120], str(request)[:300]))

    fuzz()
    # Over the size limit, in both ways a client can be: many rows, or one huge tensor.
    huge = 0
    for size in (MAX_MESSAGE + 1, 4 * MAX_MESSAGE, 32 * MAX_MESSAGE):
        request = pb.ModelInferRequest(model_name="digits")
        request.inputs.add(name="pixels", datatype="FP32", shape=[size // 256, 64])
        request.raw_input_contents.append(b"\1" * size)
        code, details = call(stub, request)
        codes[code] += 1
        huge += 1
        if code != "RESOURCE_EXHAUSTED":
            wrong.append(("RESOURCE_EXHAUSTED", code, details, f"{size} bytes"))
    after = rss_kib(server.proc.pid)
    assert server.proc.poll() is None, "server died"
    assert call(stub, warm)[0] == "OK"
    tried = sum(codes.values())
    figures.record(
        "hostile gRPC: fuzzed ModelInfer against tandem serve",
        inputs_tried=tried,
        oversized_messages=huge,
        statuses=dict(sorted(codes.items())),
        wrong_status=len(wrong),
        unknown_or_internal=codes["UNKNOWN"] + codes["INTERNAL"],
        server_crashes=0 if server.proc.poll() is None else 1,
        rss_before_mib=round(before / 1024, 1),
        rss_after_mib=round(after / 1024, 1),
    )
    assert not set(codes) - SANE, codes
    assert not wrong, wrong[:10]
    assert after - before < 64 * 1024, (before, after)
