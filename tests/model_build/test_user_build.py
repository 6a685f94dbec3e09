"""The spec-driven build of a user's ONNX model: variants, checks, calibration, SDK answer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tandem.cloud.build.errors import SpecDataError, SpecError
from tandem.cloud.build.user import build_from_spec
from tandem.sdk.artifacts import load_npz


def linear_onnx(path: Path, weights: np.ndarray, out_name: str = "scores") -> Path:
    """x[N,F] @ W + b, with a dynamic batch dim."""
    features, outputs = weights.shape
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], [out_name]),
        ],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", features])],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, ["N", outputs])],
        [
            numpy_helper.from_array(weights.astype(np.float32), "W"),
            numpy_helper.from_array(np.zeros(outputs, np.float32), "b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def write_spec(folder: Path, task: str, extra: str = "", runtimes: str = '["onnx"]') -> Path:
    rng = np.random.default_rng(0)
    weights = rng.normal(size=(8, 4))
    linear_onnx(folder / "m.onnx", weights)
    x = rng.normal(size=(400, 8)).astype(np.float32)
    top2 = np.sort(x @ weights, axis=1)[:, -2:]
    x = x[(top2[:, 1] - top2[:, 0]) > 1.0][:64]  # clear winners: INT8 must not flip them
    labels = (x @ weights).argmax(1)
    np.savez(folder / "calib.npz", x=x)
    np.savez(folder / "val.npz", x=x, labels=labels)
    spec = folder / "model.toml"
    spec.write_text(
        f'[model]\nname = "m"\ntask = "{task}"\n[full]\nonnx = "m.onnx"\n'
        f"[edge]\nruntimes = {runtimes}\n"
        f'[data]\ncalibration = "calib.npz"\nvalidation = "val.npz"\n{extra}'
    )
    return spec


@pytest.mark.parametrize("task", ["classification", "embedding", "regression"])
def test_each_task_builds_a_checked_signed_int8_variant(tmp_path: Path, task: str) -> None:
    spec = write_spec(tmp_path, task)
    report = build_from_spec(spec, tmp_path / "zoo")
    entry = report["models"]["m"]
    assert "onnx-int8" in entry["variants"], entry["notes"]
    assert (tmp_path / "zoo/artifacts/m/1/onnx-int8/manifest.json").is_file()
    assert (tmp_path / "zoo/repository/m/config.json").is_file()
    row = entry["variants"]["onnx-int8"]
    if task == "classification":
        assert row["top1_agreement"] >= 0.98 and "temperature" in row
    elif task == "embedding":
        assert row["cosine_mean"] >= 0.98
    else:
        assert row["mean_abs_error"] >= 0
    assert any(n.startswith("tflite: skipped") for n in entry["notes"]) is False
    again = build_from_spec(spec, tmp_path / "zoo")
    assert again["run"]["cached"] == ["m"]


def test_refused_runtimes_and_tolerance_misses_are_report_lines(tmp_path: Path) -> None:
    spec = write_spec(
        tmp_path,
        "regression",
        extra="[checks]\nmax_abs_error = 0.0\n",
        runtimes='["onnx", "tflite", "torch"]',
    )
    entry = build_from_spec(spec, tmp_path / "zoo")["models"]["m"]
    assert entry["variants"] == {}
    notes = "\n".join(entry["notes"])
    assert "tflite: skipped" in notes and "torch: skipped" in notes
    assert "onnx-int8: not published, abs_error" in notes and "over by" in notes
    assert not (tmp_path / "zoo/artifacts/m/1/onnx-int8").exists()


def test_sdk_answers_from_a_built_variant(tmp_path: Path) -> None:
    from tandem.sdk import Client

    spec = write_spec(tmp_path, "classification")
    build_from_spec(spec, tmp_path / "zoo")
    x = np.random.default_rng(1).normal(size=(2, 8)).astype(np.float32)
    with Client(model="m", artifacts=tmp_path / "zoo/artifacts", policy="local_only") as client:
        result = client.infer({"x": x})
    assert result.outputs["scores"].shape == (2, 4)


@pytest.mark.parametrize(
    ("mutate", "error", "words"),
    [
        (lambda d, s: s.write_text(s.read_text() + "colour = 1\n"), SpecError, "colour"),
        (lambda d, s: (d / "m.onnx").unlink(), SpecError, "does not exist"),
        (
            lambda d, s: np.savez(d / "calib.npz", y=np.zeros((4, 8), np.float32)),
            SpecDataError,
            "inputs",
        ),
        (
            lambda d, s: np.savez(d / "calib.npz", x=np.zeros((4, 5), np.float32)),
            SpecDataError,
            "shape",
        ),
        (
            lambda d, s: np.savez(d / "calib.npz", x=np.zeros((4, 8), np.int64)),
            SpecDataError,
            "dtype",
        ),
        (lambda d, s: (d / "m.onnx").write_bytes(b"not onnx"), SpecError, "m.onnx"),
    ],
)
def test_bad_input_is_one_clear_error_and_writes_nothing(
    tmp_path: Path, mutate, error, words
) -> None:
    spec = write_spec(tmp_path, "classification")
    mutate(tmp_path, spec)
    with pytest.raises(error, match=words):
        build_from_spec(spec, tmp_path / "zoo")
    assert not (tmp_path / "zoo/artifacts").exists()


def test_openvino_int8_variant_from_an_onnx_source(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, "classification", runtimes='["openvino"]')
    entry = build_from_spec(spec, tmp_path / "zoo")["models"]["m"]
    assert entry["variants"]["openvino-int8"]["top1_agreement"] >= 0.98, entry["notes"]


def test_cli_builds_a_spec(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from tandem.cloud.build.cli import models_app

    spec = write_spec(tmp_path, "embedding")
    result = CliRunner().invoke(
        models_app, ["build", "--spec", str(spec), "--out", str(tmp_path / "z")]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "z/artifacts/m/1/onnx-int8/manifest.sig.json").is_file()


def test_a_runtimes_many_line_error_becomes_one_report_line() -> None:
    from tandem.cloud.build.errors import brief

    openvino_error = RuntimeError(
        "Exception from \nsrc/inference/src/cpp/core.cpp:84:\nCheck 'false' failed at \n"
        "src/frontends/common_translators/src/unconverted_ops_report.cpp:151:\n"
        "FrontEnd API failed with OpConversionFailure:\n\nSummary:\n"
        "-- No conversion rule found for operations: ai.onnx.ml.LinearClassifier, \n"
        "ai.onnx.ml.Scaler\n-- Conversion is failed for: ai.onnx.ml.Normalizer\n"
    )
    line = brief(openvino_error)
    assert "\n" not in line
    assert line.startswith("No conversion rule found for operations: ai.onnx.ml.LinearClassifier")
    assert "ai.onnx.ml.Normalizer" in line
    assert brief(ValueError("x" * 500), limit=50) == ("ValueError: " + "x" * 500)[:47] + "..."
    assert brief(RuntimeError("Exception from\na.cpp:1:\nthe model has no inputs\n")) == (
        "the model has no inputs"
    )


def _unpacked(zoo: Path, variant: str) -> Path:
    from tandem.sdk.artifacts import TrustedKeys, load_variant, unpack_variant

    trusted = TrustedKeys.from_files([zoo / "keys" / "signing.pub"])
    return unpack_variant(load_variant(zoo / "artifacts" / "m" / "1" / variant, trusted))


def test_fp16_variants_for_onnx_runtime_and_openvino(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, "classification", runtimes='["onnx", "openvino", "tflite"]')
    spec.write_text(spec.read_text().replace("[edge]\n", '[edge]\nquantize = "fp16"\n'))
    entry = build_from_spec(spec, tmp_path / "zoo")["models"]["m"]
    assert set(entry["variants"]) == {"onnx-fp16", "openvino-fp16"}, entry["notes"]
    for row in entry["variants"].values():
        assert row["precision"] == "fp16" and row["top1_agreement"] == 1.0
    assert any(n.startswith("tflite: skipped") for n in entry["notes"])
    graph = onnx.load(str(_unpacked(tmp_path / "zoo", "onnx-fp16") / "model.onnx")).graph
    assert {i.data_type for i in graph.initializer} == {TensorProto.FLOAT16}
    assert graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT  # the signature


def test_edge_from_the_users_own_small_model(tmp_path: Path) -> None:
    """`[edge] from = "small.onnx"`: the variants are made from the user's smaller model and
    checked against the full one; a small model of another signature is refused."""
    spec = write_spec(tmp_path, "classification")
    weights = numpy_helper.to_array(onnx.load(str(tmp_path / "m.onnx")).graph.initializer[0])
    linear_onnx(tmp_path / "small.onnx", weights * 1.01)  # a near copy: same argmax
    spec.write_text(spec.read_text().replace("[edge]\n", '[edge]\nfrom = "small.onnx"\n'))
    entry = build_from_spec(spec, tmp_path / "zoo")["models"]["m"]
    assert entry["variants"]["onnx-int8"]["top1_agreement"] >= 0.98, entry["notes"]
    full = onnx.load(str(tmp_path / "zoo/repository/m/1/model.onnx"))
    assert np.array_equal(numpy_helper.to_array(full.graph.initializer[0]), weights)  # cloud
    reference = load_npz(_unpacked(tmp_path / "zoo", "onnx-int8") / "reference.npz")
    x = reference["input.x"]
    small_scores, full_scores = x @ (weights * 1.01), x @ weights
    # The edge variant is the small model, quantized: nearer its scores than the full one's.
    error_small = np.abs(reference["output.scores"] - small_scores).mean()
    assert error_small < np.abs(reference["output.scores"] - full_scores).mean()

    linear_onnx(tmp_path / "small.onnx", weights, out_name="other")
    with pytest.raises(SpecError, match=r"\[edge\] from: small.onnx has inputs"):
        build_from_spec(spec, tmp_path / "zoo2")
    assert not (tmp_path / "zoo2" / "artifacts").exists()
    (tmp_path / "m.onnx.bak").write_bytes(b"x")
    with_small = spec.read_text()
    for value, words in (
        ("notes.txt", "does not exist"),
        ("m.onnx.bak", r"\.onnx\), TorchScript \(\.pt\) or ExportedProgram \(\.pt2\)"),
    ):
        spec.write_text(with_small.replace('from = "small.onnx"', f'from = "{value}"'))
        with pytest.raises(SpecError, match=words):
            build_from_spec(spec, tmp_path / "zoo3")
