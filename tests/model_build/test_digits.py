"""The digits zoo (examples/digits/model.toml, built once per session by the `digits_zoo`
fixture through the spec build): every number the issue asks for, the layout, signatures,
digests, and that the shipped references reproduce in each runtime as a device runs them."""

from __future__ import annotations

import json
import stat
import time
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tandem.cloud.build.calibration import fit_temperature
from tandem.cloud.build.runners import load_runner, run_batched
from tandem.cloud.build.signing import generate_keypair
from tandem.errors import SignatureError
from tandem.sdk.artifacts import (
    TrustedKeys,
    Variant,
    load_npz,
    load_variant,
    split_reference,
    unpack_variant,
    verify_stored_files,
)
from tandem.sdk.runtimes import get_runtime
from tests.support.examples import load_example, spec_file

VARIANTS = ("onnx-int8", "openvino-int8", "tflite-int8", "torch-fp32")
INT8 = ("onnx-int8", "openvino-int8", "tflite-int8")
CHECKS = tomllib.loads(spec_file("digits").read_text())["checks"]

pytestmark = pytest.mark.slow
Array = np.ndarray[Any, Any]


def _report(zoo: Path) -> dict[str, Any]:
    # Other tests may build later digits versions into the same zoo: read v1's own entry.
    report = json.loads((zoo / "report.json").read_text())
    return report["versions"]["digits"]["1"]  # type: ignore[no-any-return]


def _variant(zoo: Path, name: str) -> Variant:
    trusted = TrustedKeys.from_files([zoo / "keys" / "signing.pub"])
    return load_variant(zoo / "artifacts" / "digits" / "1" / name, trusted)


def _prepared(zoo: Path, name: str) -> dict[str, Array]:
    """One of the files examples/digits' [prepare] wrote for this build (test.npz, ...)."""
    return load_npz(Path(_report(zoo)["prepared_dir"]) / name)


def _accuracy(logits: Array, labels: Array) -> float:
    return float(np.mean(logits.argmax(1) == labels))


def test_teacher_student_and_int8_accuracies_meet_the_issue(digits_zoo: Path) -> None:
    entry = _report(digits_zoo)
    metrics = entry["metrics"]
    assert metrics["teacher_accuracy"] >= 0.985  # test split, from [prepare]
    assert metrics["split"] == {"train": 1167, "validation": 270, "test": 360}
    assert metrics["student_variant"] == "normal"
    assert metrics["full_accuracy"] >= 0.985  # validation split
    assert metrics["student_accuracy"] >= metrics["full_accuracy"] - 0.025
    assert metrics["student_parameters"] * 50 < metrics["full_parameters"]
    for name in VARIANTS:
        variant = entry["variants"][name]
        assert variant["full_accuracy"] == metrics["full_accuracy"], name
        assert variant["top1_agreement"] >= CHECKS["min_top1_agreement"], name
        assert variant["full_accuracy"] - variant["accuracy"] <= CHECKS["max_accuracy_drop"]
    for name in INT8:
        variant = entry["variants"][name]
        assert variant["precision"] == "int8"
        assert variant["accuracy"] >= metrics["student_accuracy"] - 0.010, name
    assert entry["variants"]["torch-fp32"]["accuracy"] == pytest.approx(
        metrics["student_accuracy"], abs=1e-6
    )
    assert not any("not published" in note for note in entry["notes"])


def test_cloud_teacher_runs_with_dynamic_batches_and_is_the_measured_one(
    digits_zoo: Path,
) -> None:
    test = _prepared(digits_zoo, "test.npz")
    runner = load_runner(
        "onnx", digits_zoo / "repository" / "digits" / "1" / "model.onnx", ["pixels"], ["logits"]
    )
    for batch in (1, 7, 64):
        out = runner({"pixels": test["pixels"][:batch]})["logits"]
        assert out.shape == (batch, 10) and out.dtype == np.float32
    # The exported cloud model, not just the torch teacher [prepare] measured: the same
    # test accuracy, and the validation accuracy the build reports.
    logits = run_batched(runner, {"pixels": test["pixels"]})["logits"]
    metrics = _report(digits_zoo)["metrics"]
    assert _accuracy(logits, test["labels"]) == pytest.approx(metrics["teacher_accuracy"], abs=1e-6)
    val = _prepared(digits_zoo, "val.npz")
    val_logits = run_batched(runner, {"pixels": val["pixels"]})["logits"]
    assert _accuracy(val_logits, val["labels"]) == pytest.approx(metrics["full_accuracy"], abs=1e-6)
    # TorchScript and OpenVINO IR of the same teacher give the same logits
    folder = digits_zoo / "repository" / "digits" / "1"
    scripted = load_runner("torch", folder / "model.pt", ["pixels"], ["logits"])
    np.testing.assert_allclose(
        scripted({"pixels": test["pixels"][:16]})["logits"], logits[:16], rtol=1e-3, atol=1e-3
    )
    ir = load_runner("openvino", folder / "model.xml", ["pixels"], ["logits"])
    for batch in (1, 64):
        np.testing.assert_allclose(
            ir({"pixels": test["pixels"][:batch]})["logits"], logits[:batch], rtol=1e-3, atol=1e-3
        )


def test_temperature_scaling_lowers_calibration_error(digits_zoo: Path) -> None:
    entry = _report(digits_zoo)
    for name in VARIANTS:
        row = entry["variants"][name]
        assert row["ece_after"] < row["ece_before"], name
        manifest = _variant(digits_zoo, name).manifest
        assert manifest.calibration is not None
        assert manifest.calibration["method"] == "temperature"
        assert manifest.temperature == pytest.approx(row["temperature"], rel=1e-5)


def test_report_has_size_latency_and_build_time_per_variant(digits_zoo: Path) -> None:
    entry = _report(digits_zoo)
    for name in VARIANTS:
        row = entry["variants"][name]
        assert row["size_bytes"] > 0 and row["stored_bytes"] > 0
        assert 0 < row["latency_ms_batch1"] < 100
    # The issue's budget: the digits zoo builds in under 5 minutes on 2 cores.
    assert 0 < entry["build_seconds"] < 300
    markdown = (digits_zoo / "report.md").read_text()
    for name in VARIANTS:
        assert f"| {name} |" in markdown


def test_layout_and_repository_config(digits_zoo: Path) -> None:
    repo = digits_zoo / "repository" / "digits"
    config = json.loads((repo / "config.json").read_text())
    assert config["name"] == "digits"
    assert config["backend"] == "onnxruntime"
    assert config["max_batch_size"] == 64
    assert config["input"] == [{"name": "pixels", "datatype": "FP32", "dims": [64]}]
    assert config["output"] == [{"name": "logits", "datatype": "FP32", "dims": [10]}]
    assert set(config["dynamic_batching"]) == {
        "max_queue_delay_us",
        "preferred_batch_sizes",
        "max_queue_size",
    }
    assert config["instance_group"] == {"count": 1, "kind": "auto"}
    assert config["version_policy"] == {"latest": {"num_versions": 1}}
    assert config["parameters"]["pytorch_file"] == "model.pt"
    assert config["parameters"]["openvino_file"] == "model.xml"
    # the 620k-parameter teacher, for each backend an operator can switch to
    assert (repo / "1" / "model.onnx").stat().st_size > 100_000
    assert (repo / "1" / "model.pt").stat().st_size > 100_000
    assert (repo / "1" / "model.xml").exists()
    assert (repo / "1" / "model.bin").stat().st_size > 100_000
    variants = sorted(p.name for p in (digits_zoo / "artifacts" / "digits" / "1").iterdir())
    assert variants == sorted(VARIANTS)
    key = digits_zoo / "keys" / "signing.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert (digits_zoo / "keys" / "signing.pub").exists()


def test_prepared_files_are_the_examples_split(digits_zoo: Path) -> None:
    split = load_example("digits").load_split()
    np.testing.assert_array_equal(_prepared(digits_zoo, "test.npz")["pixels"], split.x_test)
    np.testing.assert_array_equal(_prepared(digits_zoo, "val.npz")["labels"], split.y_val)
    train = _prepared(digits_zoo, "train.npz")
    assert train["pixels"].shape == (1167, 64) and train["labels"].dtype == np.int64


def test_manifests_verify_with_the_zoo_key_and_fail_with_another(
    digits_zoo: Path, tmp_path: Path
) -> None:
    _, other_pub = generate_keypair(tmp_path / "other")
    other = TrustedKeys.from_files([other_pub])
    for name in VARIANTS:
        variant = _variant(digits_zoo, name)
        manifest = variant.manifest
        assert (manifest.model, manifest.version, manifest.variant) == ("digits", 1, name)
        assert manifest.task == "classification"
        assert manifest.validation == "validation.npz"
        assert [t.name for t in manifest.inputs] == ["pixels"]
        assert [t.name for t in manifest.outputs] == ["logits"]
        assert manifest.inputs[0].shape[1:] == (64,)
        assert manifest.outputs[0].shape[1:] == (10,)
        assert manifest.metrics["student_variant"] == "normal"
        with pytest.raises(SignatureError):
            load_variant(variant.path, other)


def test_stored_and_unpacked_files_match_their_digests(digits_zoo: Path, tmp_path: Path) -> None:
    for name in VARIANTS:
        variant = _variant(digits_zoo, name)
        verify_stored_files(variant)
        # decompress_file checks size and sha256 of every plain file while it streams
        unpack_variant(variant, tmp_path / name)
        for entry in variant.manifest.files:
            assert (tmp_path / name / entry.name).stat().st_size == entry.size


def test_reference_outputs_reproduce_in_each_runtime(digits_zoo: Path, tmp_path: Path) -> None:
    val = _prepared(digits_zoo, "val.npz")
    test = _prepared(digits_zoo, "test.npz")
    for name in VARIANTS:
        variant = _variant(digits_zoo, name)
        folder = unpack_variant(variant, tmp_path / name)
        inputs, outputs = split_reference(load_npz(folder / "reference.npz"))
        assert inputs["pixels"].shape[1:] == (64,) and len(inputs["pixels"]) >= 8
        # The SDK's runtime, as a device loads the variant.
        with get_runtime(variant.manifest.runtime).load(variant.manifest, folder) as loaded:
            got = loaded.run({"pixels": inputs["pixels"]})["logits"]
            assert got.dtype == np.float32
            np.testing.assert_allclose(got, outputs["logits"], rtol=1e-4, atol=1e-4, err_msg=name)
            # The shipped file is the measured one: on the whole validation split it
            # reproduces the report's accuracy exactly (a share of the few reference rows
            # would be a coin toss at ~99%).
            logits = np.concatenate(
                [
                    loaded.run({"pixels": val["pixels"][i : i + 64]})["logits"]
                    for i in range(0, 270, 64)
                ]
            )
            reported = _report(digits_zoo)["variants"][name]["accuracy"]
            assert _accuracy(logits, val["labels"]) == pytest.approx(reported, abs=1e-6), name
            # and on the test split, never fitted on, it is as good as the issue asks
            test_logits = np.concatenate(
                [
                    loaded.run({"pixels": test["pixels"][i : i + 64]})["logits"]
                    for i in range(0, 360, 64)
                ]
            )
            assert _accuracy(test_logits, test["labels"]) >= 0.985 - 0.025 - 0.010, name
            # one row and 64 rows give the same answers as row by row
            batch = loaded.run({"pixels": test["pixels"][:64]})["logits"]
            row = loaded.run({"pixels": test["pixels"][5:6]})["logits"]
            np.testing.assert_allclose(batch[5:6], row, rtol=1e-4, atol=1e-4, err_msg=name)


def test_validation_set_ships_and_reproduces_the_fitted_temperature(
    digits_zoo: Path, tmp_path: Path
) -> None:
    variant = _variant(digits_zoo, "onnx-int8")
    folder = unpack_variant(variant, tmp_path / "onnx")
    validation = load_npz(folder / "validation.npz")
    assert validation["input.pixels"].shape == (270, 64)
    assert validation["labels"].shape == (270,)
    runner = load_runner("onnx", folder / "model.onnx", ["pixels"], ["logits"])
    logits = runner({"pixels": validation["input.pixels"]})["logits"]
    refit = fit_temperature(logits, validation["labels"])
    assert refit == pytest.approx(variant.manifest.temperature, rel=1e-3)


def test_unchanged_rebuild_is_served_from_the_cache(digits_zoo: Path) -> None:
    from tandem.cloud.build.pipeline import build_zoo

    folder = digits_zoo / "artifacts" / "digits" / "1" / "onnx-int8"
    before = (folder / "manifest.json").stat().st_mtime_ns
    prepared = Path(_report(digits_zoo)["prepared_dir"])
    started = time.perf_counter()
    report = build_zoo(digits_zoo, models=("digits",))
    elapsed = time.perf_counter() - started
    assert report["run"]["cached"] == ["digits"] and report["run"]["built"] == []
    # Other test sessions may hold the zoo lock while they build; only the work is timed.
    assert report["run"]["seconds"] < 10
    assert elapsed - report["run"]["lock_wait_seconds"] < 10
    assert (folder / "manifest.json").stat().st_mtime_ns == before
    assert report["models"]["digits"]["prepared_dir"] == str(prepared)
