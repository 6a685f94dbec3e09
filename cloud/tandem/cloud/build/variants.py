"""The edge variants of a spec build, each made with its runtime's own tooling, and the cloud
repository's files for the other backends.

ONNX Runtime: static QDQ INT8 with the calibration data, dynamic INT8 (weights only), FP16
(ONNX Runtime's converter) or the FP32 model as it is. OpenVINO: IR INT8 by NNCF, or FP16
weights. From a PyTorch edge model also LiteRT (litert-torch) and torch (a TorchScript or
ExportedProgram file). A runtime that cannot be made is one note, never a traceback.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from tandem.cloud.build.errors import ExportError, brief
from tandem.cloud.build.runners import load_runner
from tandem.cloud.build.spec import ModelSpec

Array = np.ndarray[Any, Any]
Variant = tuple[str, str, str, str, dict[str, Path]]  # name, runtime, precision, entry, payload
_NEEDS = {"tflite": "LiteRT needs a PyTorch source", "torch": "torch needs a PyTorch source"}


def onnx_int8(source: Path, out: Path, calibration: Mapping[str, Array]) -> Path:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    rows = next(iter(calibration.values())).shape[0]

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self._batches = iter(
                [{k: v[i : i + 1] for k, v in calibration.items()} for i in range(rows)]
            )

        def get_next(self) -> dict[str, Array] | None:
            return next(self._batches, None)

    try:
        quantize_static(
            str(source),
            str(out),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
        )
    except Exception as exc:
        raise ExportError(f"onnxruntime INT8 quantization failed: {brief(exc)}") from exc
    return out


def onnx_int8_dynamic(source: Path, out: Path) -> Path:
    """INT8 weights, activations quantized at run time (transformers: no calibration needed)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    try:
        quantize_dynamic(str(source), str(out), per_channel=True, weight_type=QuantType.QInt8)
    except Exception as exc:
        raise ExportError(f"onnxruntime dynamic INT8 quantization failed: {brief(exc)}") from exc
    return out


def onnx_fp16(source: Path, out: Path) -> Path:
    """FP16 weights and arithmetic, FP32 inputs and outputs (the signature stays as it is):
    ONNX Runtime's own converter (onnxruntime.transformers.float16)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    try:
        model = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
        onnx.save(model, str(out))
    except Exception as exc:
        raise ExportError(f"onnxruntime FP16 conversion failed: {brief(exc)}") from exc
    return out


def openvino_fp16(source: Path, out_dir: Path) -> Path:
    """OpenVINO IR with FP16 weights (`compress_to_fp16`); the CPU plugin computes in FP32."""
    from tandem.sdk.runtimes.openvino import import_openvino

    ov = import_openvino()
    out_dir.mkdir(parents=True, exist_ok=True)
    xml = out_dir / "model.xml"
    try:
        ov.save_model(ov.convert_model(str(source)), str(xml), compress_to_fp16=True)
    except Exception as exc:
        raise ExportError(f"OpenVINO FP16 IR export failed: {brief(exc)}") from exc
    return xml


def openvino_int8(
    source: Path, out_dir: Path, calibration: Mapping[str, Array], model_type: str = "default"
) -> Path:
    """OpenVINO IR INT8 by NNCF post-training quantization on the calibration rows;
    `model_type = "transformer"` keeps attention's softmax and layer norms accurate (without
    it, MiniLM's INT8 embeddings are noise: mean cosine 0.11 instead of 0.998)."""
    from tandem.sdk.runtimes.openvino import import_openvino

    ov = import_openvino()
    import nncf

    extra = {"model_type": nncf.ModelType.TRANSFORMER} if model_type == "transformer" else {}

    rows = next(iter(calibration.values())).shape[0]
    out_dir.mkdir(parents=True, exist_ok=True)
    xml = out_dir / "model.xml"
    try:
        model = ov.Core().read_model(str(source))
        items = [{k: v[i : i + 1] for k, v in calibration.items()} for i in range(rows)]
        with contextlib.redirect_stdout(io.StringIO()):  # NNCF's progress bar
            quantized = nncf.quantize(model, nncf.Dataset(items), subset_size=rows, **extra)
        ov.save_model(quantized, str(xml), compress_to_fp16=False)
    except Exception as exc:
        raise ExportError(f"OpenVINO/NNCF INT8 quantization failed: {brief(exc)}") from exc
    return xml


def make_variants(
    spec: ModelSpec, work: Path, full_onnx: Path, calibration: Mapping[str, Array], notes: list[str]
) -> list[Variant]:
    """The ONNX Runtime and OpenVINO variants (from `full_onnx`) that could be made."""
    made: list[Variant] = []
    for runtime in spec.runtimes:
        if runtime in ("tflite", "torch"):
            if not spec.edge_is_torch:
                notes.append(
                    f"{runtime}: skipped, the source is a bare ONNX file ({_NEEDS[runtime]})"
                )
            continue
        try:
            if runtime == "onnx" and spec.quantize == "none":
                made.append(("onnx-fp32", "onnx", "fp32", "model.onnx", {"model.onnx": full_onnx}))
            elif runtime == "onnx" and spec.quantize == "fp16":
                path = onnx_fp16(full_onnx, work / "fp16.onnx")
                made.append(("onnx-fp16", "onnx", "fp16", "model.onnx", {"model.onnx": path}))
            elif runtime == "onnx" and spec.onnx_quantization == "dynamic":
                path = onnx_int8_dynamic(full_onnx, work / "int8.onnx")
                made.append(("onnx-int8", "onnx", "int8", "model.onnx", {"model.onnx": path}))
            elif runtime == "onnx":
                path = onnx_int8(full_onnx, work / "int8.onnx", calibration)
                made.append(("onnx-int8", "onnx", "int8", "model.onnx", {"model.onnx": path}))
            elif spec.quantize == "none":
                notes.append("openvino: skipped, quantize = none (the onnx runtime serves FP32)")
            elif spec.quantize == "fp16":
                xml = openvino_fp16(full_onnx, work / "openvino")
                payload = {"model.xml": xml, "model.bin": xml.with_suffix(".bin")}
                made.append(("openvino-fp16", "openvino", "fp16", "model.xml", payload))
            else:
                xml = openvino_int8(
                    full_onnx, work / "openvino", calibration, spec.openvino_model_type
                )
                payload = {"model.xml": xml, "model.bin": xml.with_suffix(".bin")}
                made.append(("openvino-int8", "openvino", "int8", "model.xml", payload))
        except ExportError as exc:
            notes.append(f"{runtime}: skipped, {exc}")
    return made


def make_torch_variants(
    spec: ModelSpec,
    work: Path,
    model: Any,
    input_names: list[str],
    output_names: list[str],
    calibration: Mapping[str, Array],
    notes: list[str],
) -> list[Variant]:
    """The LiteRT and torch variants of a PyTorch source."""
    from tandem.cloud.build import torch_source

    made: list[Variant] = []
    if spec.quantize == "fp16":
        for runtime in ("tflite", "torch"):
            if runtime in spec.runtimes:
                notes.append(
                    f"{runtime}: skipped, quantize = fp16 is made for ONNX Runtime and OpenVINO"
                    " (litert-torch converts FP32 or INT8; the torch runtime runs FP32 on CPUs)"
                )
        return made
    if "tflite" in spec.runtimes:
        if spec.dynamic_axes:
            notes.append(
                "tflite: skipped, a LiteRT graph has fixed shapes and [model] dynamic_axes"
                f" makes {', '.join(spec.dynamic_axes)} vary"
            )
        elif spec.edge_source == "torchscript":
            notes.append(
                "tflite: skipped, litert-torch converts an nn.Module or ExportedProgram,"
                " not TorchScript (give factory + weights or exported_program)"
            )
        else:
            try:
                path, precision, note = torch_source.export_tflite(
                    model,
                    work / "model.tflite",
                    input_names,
                    output_names,
                    calibration,
                    spec.quantize,
                )
                if note:
                    notes.append(f"tflite: {note}")
                payload = {"model.tflite": path}
                made.append((f"tflite-{precision}", "tflite", precision, "model.tflite", payload))
            except ExportError as exc:
                notes.append(f"tflite: skipped, {exc}")
    if "torch" in spec.runtimes:
        try:
            path = torch_source.export_torch(
                spec,
                model,
                work / "torch",
                input_names,
                calibration,
                given_file=spec.edge_torch_file,
            )
            made.append(("torch-fp32", "torch", "fp32", path.name, {path.name: path}))
        except ExportError as exc:
            notes.append(f"torch: skipped, {exc}")
    return made


def variant_runner(
    runtime: str, path: Path, input_names: list[str], output_names: list[str]
) -> Any:
    if runtime == "tflite" or runtime == "torch":
        from tandem.cloud.build import torch_source

        if runtime == "tflite":
            return torch_source.tflite_runner(path, input_names, output_names)
        return torch_source.torch_runner(
            torch_source.load_torch_file(path), input_names, output_names
        )
    return load_runner(runtime, path, input_names, output_names)


def backend_files(
    spec: ModelSpec, work: Path, full_onnx: Path, torch_model: Any, sample: Mapping[str, Array]
) -> dict[str, Path]:
    """The full model for the cloud tier's other backends (`[serve] backends`): TorchScript
    `model.pt` (pytorch) and OpenVINO IR FP32 `model.xml` + `model.bin` (openvino), so an
    operator can switch a model's backend in its config."""
    files: dict[str, Path] = {}
    if "pytorch" in spec.backends:
        from tandem.cloud.build import torch_source

        names = torch_source.input_names(spec, torch_model)
        files["model.pt"] = torch_source.export_torchscript(
            torch_model, work / "full.pt", names, sample
        )
    if "openvino" in spec.backends:
        from tandem.sdk.runtimes.openvino import import_openvino

        ov = import_openvino()
        folder = work / "full-openvino"
        folder.mkdir(exist_ok=True)
        xml = folder / "model.xml"
        try:
            ov.save_model(ov.convert_model(str(full_onnx)), str(xml), compress_to_fp16=False)
        except Exception as exc:
            raise ExportError(f"[serve] backends: OpenVINO IR export failed: {brief(exc)}") from exc
        files["model.xml"], files["model.bin"] = xml, xml.with_suffix(".bin")
    return files
