"""The LiteRT runtime on tiny two-output .tflite files written here (no converter, < 1 s).

Issue 11: the SDK answered the CNN example's INT8 LiteRT embedding from a previous build.
The unpack cache was keyed by model, version and variant and trusted files of the right
size; a rebuild keeps all four (same version, same architecture), so the device ran the old
model against the old reference outputs, and its own check passed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tandem.errors import RuntimeBackendError

pytest.importorskip("ai_edge_litert")

from ai_edge_litert.interpreter import Interpreter

from tandem.sdk import Client
from tandem.sdk.artifacts import TensorSpec
from tandem.sdk.runtimes.litert import match_tensors
from tests.sdk.modelkit import _write_variant

IN, OUT = 4, 3


def tiny_tflite(
    weights: Sequence[np.ndarray],
    names: Sequence[str],
    *,
    computed: Sequence[int] | None = None,
    signature: bool = True,
) -> bytes:
    """A float .tflite whose output k is `x @ weights[k].T` (FULLY_CONNECTED), batch 1.

    `computed` is the order the outputs are computed in, which is the order LiteRT lists
    them in (litert-torch does the same); `signature` adds litert-torch's signature def
    (`args_0`, `output_<k>` by position). The file's size does not depend on the weights.
    """
    import flatbuffers  # type: ignore[import-untyped]
    from ai_edge_litert import schema_py_generated as s

    buffers = [s.BufferT()]
    tensors: list[Any] = []

    def tensor(name: str, shape: tuple[int, ...], data: np.ndarray | None = None) -> int:
        t = s.TensorT()
        t.name, t.shape, t.type, t.buffer = name.encode(), list(shape), s.TensorType.FLOAT32, 0
        if data is not None:
            b = s.BufferT()
            b.data = np.frombuffer(np.asarray(data, np.float32).tobytes(), np.uint8).tolist()
            buffers.append(b)
            t.buffer = len(buffers) - 1
        tensors.append(t)
        return len(tensors) - 1

    x = tensor("x", (1, IN))
    produced: dict[int, int] = {}
    operators = []
    for k in computed if computed is not None else range(len(weights)):
        w = tensor(f"weight_{k}", weights[k].shape, weights[k])
        produced[k] = tensor(names[k], (1, weights[k].shape[0]))
        op = s.OperatorT()
        op.opcodeIndex, op.inputs, op.outputs = 0, [x, w, -1], [produced[k]]
        op.builtinOptionsType = s.BuiltinOptions.FullyConnectedOptions
        op.builtinOptions = s.FullyConnectedOptionsT()
        operators.append(op)
    graph = s.SubGraphT()
    graph.tensors, graph.inputs, graph.operators = tensors, [x], operators
    graph.outputs = list(produced.values())
    code = s.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = s.BuiltinOperator.FULLY_CONNECTED
    code.version = 1
    model = s.ModelT()
    model.version, model.operatorCodes, model.subgraphs, model.buffers = 3, [code], [graph], buffers
    if signature:

        def mapping(key: str, index: int) -> Any:
            m = s.TensorMapT()
            m.name, m.tensorIndex = key.encode(), index
            return m

        sig = s.SignatureDefT()
        sig.signatureKey, sig.subgraphIndex = b"serving_default", 0
        sig.inputs = [mapping("args_0", x)]
        sig.outputs = [mapping(f"output_{k}", produced[k]) for k in range(len(weights))]
        model.signatureDefs = [sig]
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def _weights(sign: float = 1.0) -> list[np.ndarray]:
    rng = np.random.default_rng(11)
    return [sign * rng.normal(size=(OUT, IN)).astype(np.float32) for _ in range(2)]


def _rows(n: int) -> np.ndarray:
    return np.random.default_rng(5).normal(size=(n, IN)).astype(np.float32)


def _write(artifacts: Path, data: bytes, weights: Sequence[np.ndarray], key: Any) -> None:
    """artifacts/pair/1/tflite-fp32: outputs `score` then `embedding`, both [-1, 3]."""
    (artifacts / "model.tflite").parent.mkdir(parents=True, exist_ok=True)
    (artifacts / "model.tflite").write_bytes(data)
    x = _rows(4)
    _write_variant(
        artifacts / "pair" / "1" / "tflite-fp32",
        model="pair",
        version=1,
        variant="tflite-fp32",
        runtime="tflite",
        payload={"model.tflite": artifacts / "model.tflite"},
        entrypoint="model.tflite",
        reference={
            "input.x": x,
            "output.score": x @ weights[0].T,
            "output.embedding": x @ weights[1].T,
        },
        validation=None,
        temperature=1.0,
        signing_key=key,
        inputs=(TensorSpec("x", "FP32", (-1, IN)),),
        outputs=(
            TensorSpec("score", "FP32", (-1, OUT)),
            TensorSpec("embedding", "FP32", (-1, OUT)),
        ),
    )
    (artifacts / "model.tflite").unlink()


def _answer(artifacts: Path, cache: Path, rows: np.ndarray) -> dict[str, np.ndarray]:
    with Client(
        model="pair", artifacts=artifacts, policy="local_only", runtime="tflite", cache_dir=cache
    ) as client:
        return client.infer({"x": rows}).outputs


def test_a_rebuild_of_the_same_version_is_not_answered_from_the_previous_build(
    tmp_path: Path,
) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    names = ["score", "embedding"]
    old, new = _weights(), _weights(-1.0)
    first, second = tiny_tflite(old, names), tiny_tflite(new, names)
    assert len(first) == len(second) and first != second  # what a retrained INT8 file does
    _write(tmp_path / "build1", first, old, key)
    _write(tmp_path / "build2", second, new, key)
    rows = _rows(5)
    cache = tmp_path / "cache"  # one device cache across both builds
    before = _answer(tmp_path / "build1", cache, rows)
    np.testing.assert_allclose(before["embedding"], rows @ old[1].T, rtol=1e-5, atol=1e-5)
    after = _answer(tmp_path / "build2", cache, rows)
    np.testing.assert_allclose(after["score"], rows @ new[0].T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(after["embedding"], rows @ new[1].T, rtol=1e-5, atol=1e-5)


def _interpreter(data: bytes) -> Any:
    interpreter = Interpreter(model_content=data)
    interpreter.allocate_tensors()
    return interpreter


@pytest.mark.parametrize("computed", [(0, 1), (1, 0)])
def test_same_shaped_outputs_are_matched_by_name_not_by_suffix_or_order(
    computed: tuple[int, int],
) -> None:
    # `raw_score` ends in `_score`: a suffix match let it stand for `score` too.
    names = ["score", "raw_score"]
    interpreter = _interpreter(tiny_tflite(_weights(), names, computed=computed))
    got = [str(d["name"]) for d in match_tensors(interpreter, names, "outputs")]
    assert got == names
    assert [str(d["name"]) for d in match_tensors(interpreter, ["x"], "inputs")] == ["x"]


@pytest.mark.parametrize("computed", [(0, 1), (1, 0)])
def test_unnamed_outputs_are_matched_by_the_signatures_positions(
    computed: tuple[int, int],
) -> None:
    weights = _weights()
    unnamed = ["StatefulPartitionedCall:0", "StatefulPartitionedCall:1"]
    interpreter = _interpreter(tiny_tflite(weights, unnamed, computed=computed))
    details = match_tensors(interpreter, ["score", "embedding"], "outputs")
    interpreter.set_tensor(match_tensors(interpreter, ["pixels"], "inputs")[0]["index"], _rows(1))
    interpreter.invoke()
    for detail, w in zip(details, weights, strict=True):
        np.testing.assert_allclose(
            interpreter.get_tensor(detail["index"]), _rows(1) @ w.T, rtol=1e-5, atol=1e-5
        )


def test_same_shaped_outputs_without_names_or_signature_are_refused() -> None:
    unnamed = ["a:0", "b:0"]
    interpreter = _interpreter(tiny_tflite(_weights(), unnamed, computed=(1, 0), signature=False))
    with pytest.raises(RuntimeBackendError, match="cannot be told apart"):
        match_tensors(interpreter, ["score", "embedding"], "outputs")


def test_a_batch_of_n_is_answered_from_a_batch_one_file(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    weights = _weights()
    data = tiny_tflite(weights, ["score", "embedding"])
    assert list(_interpreter(data).get_input_details()[0]["shape"]) == [1, IN]
    _write(tmp_path / "zoo", data, weights, Ed25519PrivateKey.generate())
    with Client(
        model="pair",
        artifacts=tmp_path / "zoo",
        policy="local_only",
        runtime="tflite",
        cache_dir=tmp_path / "cache",
    ) as client:
        for n in (1, 7, 2, 7):
            rows = _rows(n)
            got = client.infer({"x": rows}).outputs
            assert got["score"].shape == (n, OUT) and got["embedding"].shape == (n, OUT)
            np.testing.assert_allclose(got["score"], rows @ weights[0].T, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(got["embedding"], rows @ weights[1].T, rtol=1e-5, atol=1e-5)
