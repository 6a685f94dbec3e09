"""PyTorch sources of a spec build: loading the model, its signature and each runtime's export.

`[full]` names one of: `torchscript = "m.pt"` (torch.jit.load), `exported_program = "m.pt2"`
(torch.export.load), or `factory = "pkg.module:make_model"` + `weights = "model.pt"` (the
factory's module is imported from the spec's folder, called with no arguments, and must
return an `nn.Module` whose `load_state_dict` takes the weights strictly). Every problem is
one `SpecError`/`ModelLoadError` naming the field.

From the loaded model the build exports: FP32 ONNX (`torch.onnx.export`, dynamic batch; the
cloud tier's model and the source of the ONNX Runtime and OpenVINO INT8 variants), the torch
variant (the TorchScript/ExportedProgram file as given, or an ExportedProgram with a dynamic
batch for a factory model) and LiteRT via litert-torch (PT2E static INT8 where it converts,
else FP32; fixed batch 1, which the SDK's LiteRT runtime feeds row by row).
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import shutil
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tandem.cloud.build import usercode
from tandem.cloud.build.errors import (
    ExportError,
    ModelLoadError,
    SpecDataError,
    SpecError,
    brief,
)
from tandem.cloud.build.spec import ModelSpec
from tandem.sdk.artifacts import TensorSpec

log = logging.getLogger(__name__)
Array = np.ndarray[Any, Any]
_DATATYPES = {
    "float32": "FP32",
    "float16": "FP16",
    "int64": "INT64",
    "int32": "INT32",
    "uint8": "UINT8",
    "bool": "BOOL",
}
ONNX_OPSET = 18
TFLITE_CALIBRATION_ROWS = 64


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Swallows the progress bars and deprecation chatter of the exporters."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# --- loading ---------------------------------------------------------------------------------


def _load_weights(spec: ModelSpec, model: Any) -> None:
    import torch

    assert spec.weights is not None
    try:
        state = torch.load(str(spec.weights), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise SpecError(
            f"[full] weights: {spec.weights.name} is not a state dict torch.load can read"
            f" ({type(exc).__name__}: {exc})"
        ) from exc
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise SpecError(
            f"[full] weights: {spec.weights.name} holds a {type(state).__name__};"
            " expected a state dict (torch.save(model.state_dict(), ...))"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())
        raise SpecError(
            f"[full] weights: {spec.weights.name} does not match the model {spec.factory}"
            f" returns: {detail[:600]}"
        ) from exc


def make_module(reference: str, module_file: Path, where: str) -> Any:
    """Calls a spec's factory (`usercode`) and checks that it returned an `nn.Module`."""
    import torch

    model = usercode.call(reference, module_file, where)
    if not isinstance(model, torch.nn.Module):
        raise SpecError(
            f"{where}: {reference}() returned a {type(model).__name__}; expected a torch.nn.Module"
        )
    return model


def load_torch_model(spec: ModelSpec) -> Any:
    """The spec's PyTorch model, in eval mode, on the CPU."""
    import torch

    assert spec.is_torch and spec.source_file is not None
    if spec.source == "factory":
        assert spec.factory is not None
        model = make_module(spec.factory, spec.source_file, "[full] factory")
        if spec.weights is not None:
            _load_weights(spec, model)
        return model.eval()
    try:
        with quiet():
            if spec.source == "torchscript":
                model = torch.jit.load(str(spec.source_file), map_location="cpu")  # type: ignore[no-untyped-call]
                return model.eval()
            return torch.export.load(str(spec.source_file)).module()
    except Exception as exc:
        loader = "torch.jit.load" if spec.source == "torchscript" else "torch.export.load"
        raise ModelLoadError(
            f"[full] {spec.source}: {loader} cannot read {spec.source_file.name}"
            f" ({type(exc).__name__}: {' '.join(str(exc).split())[:300]})"
        ) from exc


def input_names(spec: ModelSpec, model: Any) -> tuple[str, ...]:
    """The spec's `[model] inputs`, else the names of forward's parameters."""
    if spec.inputs is not None:
        return spec.inputs
    schema = getattr(getattr(model, "forward", None), "schema", None)
    if schema is not None:  # TorchScript
        return tuple(a.name for a in schema.arguments[1:])
    try:
        parameters = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError) as exc:
        raise SpecError(
            "[model] inputs: cannot read forward's parameters; name the inputs"
        ) from exc
    names = tuple(
        p.name
        for p in parameters
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    )
    if not names:
        raise SpecError("[model] inputs: forward takes no positional inputs; name the inputs")
    return names


def _datatype(dtype: Any, where: str) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _DATATYPES:
        raise ModelLoadError(f"{where} has dtype {name}; expected one of {', '.join(_DATATYPES)}")
    return _DATATYPES[name]


def _flatten(out: Any, names: Sequence[str] | None) -> tuple[list[str] | None, list[Any]]:
    if isinstance(out, Mapping):
        return [str(k) for k in out], list(out.values())
    if isinstance(out, tuple | list):
        return None, list(out)
    return None, [out]


def torch_signature(
    spec: ModelSpec, model: Any, sample: Mapping[str, Array]
) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """Inputs (from the data, batch dim dynamic) and outputs (from one run on `sample`)."""
    names = input_names(spec, model)
    if set(names) - set(sample) or set(sample) - set(names) - {"labels"}:
        raise SpecDataError(
            f"[data] calibration: holds {sorted(sample)}; expected the model's inputs"
            f" {list(names)} (forward's parameters, or [model] inputs) and optionally labels"
        )
    for name, axes in spec.dynamic_axes.items():
        if name not in names:
            raise SpecError(f"[model] dynamic_axes {name}: not an input; inputs: {list(names)}")
        if max(axes) >= sample[name].ndim:
            raise SpecError(
                f"[model] dynamic_axes {name}: axis {max(axes)} is beyond its"
                f" {sample[name].ndim} dimensions"
            )

    def shape(name: str) -> tuple[int, ...]:
        dynamic = spec.dynamic_axes.get(name, ())
        return tuple(
            -1 if axis == 0 or axis in dynamic else size
            for axis, size in enumerate(sample[name].shape)
        )

    inputs = tuple(
        TensorSpec(n, _datatype(sample[n].dtype, f"[data] input {n}"), shape(n)) for n in names
    )
    out = run_module(model, {n: sample[n][:2] for n in names}, names)
    keys, values = _flatten(out, spec.outputs)
    if spec.outputs is not None:
        if len(spec.outputs) != len(values):
            raise SpecError(
                f"[model] outputs: names {len(spec.outputs)} outputs {list(spec.outputs)};"
                f" the model returns {len(values)}"
            )
        keys = list(spec.outputs)
    elif keys is None:
        keys = ["output"] if len(values) == 1 else [f"output_{i}" for i in range(len(values))]
    outputs = tuple(
        TensorSpec(k, _datatype(v.dtype, f"output {k}"), (-1, *v.shape[1:]))
        for k, v in zip(keys, values, strict=True)
    )
    return inputs, outputs


def run_module(model: Any, feeds: Mapping[str, Array], names: Sequence[str]) -> Any:
    import torch

    with torch_threads(1), torch.inference_mode():
        return model(*(torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in names))


def torch_runner(model: Any, inputs: Sequence[str], outputs: Sequence[str]) -> Any:
    """Runs a loaded module on arrays keyed by name; outputs keyed by the signature's names."""

    def run(feeds: Mapping[str, Array]) -> dict[str, Array]:
        _, values = _flatten(run_module(model, feeds, inputs), outputs)
        return {n: v.detach().numpy().copy() for n, v in zip(outputs, values, strict=True)}

    return run


# --- exports ---------------------------------------------------------------------------------


def _sample(feeds: Mapping[str, Array], names: Sequence[str], rows: int) -> tuple[Any, ...]:
    import torch

    return tuple(torch.from_numpy(np.ascontiguousarray(feeds[n][:rows])) for n in names)


def export_onnx(
    model: Any,
    path: Path,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    sample: Mapping[str, Array],
    check: Mapping[str, Array] | None = None,
    exporter: str = "auto",
) -> Path:
    """FP32 ONNX with a dynamic batch dim and the inputs' other -1 dims dynamic too.

    `exporter` "auto": the dynamo exporter, and the TorchScript one where dynamo fails or
    where ONNX Runtime cannot load or run its graph on `check` (rows of another shape than
    `sample`); "dynamo" or "torchscript": that one only (`[full] onnx_exporter`: a model
    known to need the TorchScript exporter skips a dynamo attempt that can take as long as
    the rest of its build)."""
    import torch

    in_names = [t.name for t in inputs]
    out_names = [t.name for t in outputs]
    args = _sample(sample, in_names, 2)
    dynamic = {t.name: [a for a, d in enumerate(t.shape) if d == -1 and a > 0] for t in inputs}
    errors = []
    try:
        if exporter == "torchscript":
            raise ExportError("not tried ([full] onnx_exporter = torchscript)")
        with torch_threads(1), quiet():
            batch = torch.export.Dim("batch", min=1, max=65536)
            shapes = tuple(
                {0: batch, **{a: torch.export.Dim.AUTO for a in dynamic[n]}} for n in in_names
            )
            torch.onnx.export(
                model,
                args,
                str(path),
                input_names=in_names,
                output_names=out_names,
                dynamic_shapes=shapes,
                opset_version=ONNX_OPSET,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
        _check_onnx(path, in_names, out_names, check or {n: sample[n][:3] for n in in_names})
        return path
    except Exception as exc:  # noqa: BLE001 - the exporter raises anything; the fallback follows
        errors.append(f"dynamo: {brief(exc, 200)}")
    if exporter == "dynamo":
        raise ExportError("torch.onnx.export failed (" + "; ".join(errors) + ")")
    try:
        axes = {n: {0: "N", **{a: f"{n}_{a}" for a in dynamic[n]}} for n in in_names}
        with torch_threads(1), quiet():
            torch.onnx.export(
                model,
                args,
                str(path),
                input_names=in_names,
                output_names=out_names,
                dynamic_axes={**axes, **{n: {0: "N"} for n in out_names}},
                opset_version=17,
                dynamo=False,
            )
        return path
    except Exception as exc:  # noqa: BLE001 - reported with the first failure below
        errors.append(f"torchscript: {brief(exc, 200)}")
    raise ExportError("torch.onnx.export failed (" + "; ".join(errors) + ")")


def _check_onnx(
    path: Path, in_names: Sequence[str], out_names: Sequence[str], feeds: Mapping[str, Array]
) -> None:
    """ONNX Runtime loads the graph and runs it on `feeds` (a dynamo export can be a graph
    that defines a name twice, or one that fixed a dimension that should vary)."""
    from tandem.cloud.build.runners import load_runner

    load_runner("onnx", path, list(in_names), list(out_names))({n: feeds[n] for n in in_names})


def export_torch(
    spec: ModelSpec,
    model: Any,
    out_dir: Path,
    in_names: Sequence[str],
    sample: Mapping[str, Array],
    *,
    given_file: Path | None = None,
) -> Path:
    """The torch variant's file: `given_file` (a TorchScript .pt or ExportedProgram .pt2
    that `model` was loaded from) as it is, or else a new .pt2 of `model`."""
    import torch

    out_dir.mkdir(parents=True, exist_ok=True)
    if given_file is not None:
        return Path(shutil.copyfile(given_file, out_dir / f"model{given_file.suffix}"))
    path = out_dir / "model.pt2"
    try:
        with torch_threads(1), quiet():
            batch = torch.export.Dim("batch", min=1, max=65536)
            program = torch.export.export(
                model,
                _sample(sample, in_names, 2),
                dynamic_shapes=tuple(
                    {0: batch, **{a: torch.export.Dim.AUTO for a in spec.dynamic_axes.get(n, ())}}
                    for n in in_names
                ),
            )
            torch.export.save(program, str(path))
    except Exception as exc:
        raise ExportError(f"torch.export failed: {brief(exc)}") from exc
    return path


def export_torchscript(
    model: Any, path: Path, in_names: Sequence[str], sample: Mapping[str, Array]
) -> Path:
    """TorchScript of `model` (torch.jit.trace on two sample rows): the cloud repository's
    `model.pt`, for the pytorch backend."""
    import torch

    try:
        with torch_threads(1), quiet():
            traced = torch.jit.trace(model.eval(), _sample(sample, in_names, 2))  # type: ignore[no-untyped-call]
            traced.save(str(path))  # type: ignore[no-untyped-call]
    except Exception as exc:
        raise ExportError(f"TorchScript trace failed: {brief(exc)}") from exc
    return path


def load_torch_file(path: Path) -> Any:
    """A torch variant's file, loaded as the SDK's torch runtime loads it."""
    import torch

    with quiet():
        if path.suffix == ".pt2":
            return torch.export.load(str(path)).module()
        return torch.jit.load(str(path), map_location="cpu").eval()  # type: ignore[no-untyped-call]


def export_tflite(
    model: Any,
    path: Path,
    in_names: Sequence[str],
    out_names: Sequence[str],
    calibration: Mapping[str, Array],
    quantize: str,
) -> tuple[Path, str, str | None]:
    """(file, precision, note) of the LiteRT variant: INT8 (PT2E) where it converts, else FP32."""
    import litert_torch
    import torch

    sample = _sample(calibration, in_names, 1)
    note = None
    if quantize == "int8":
        try:
            _tflite_int8(model, path, in_names, calibration, sample)
            name_tflite_tensors(path, in_names, out_names)
            return path, "int8", None
        except Exception as exc:  # noqa: BLE001 - INT8 is best effort; FP32 follows
            note = f"litert-torch INT8 failed ({brief(exc, 200)}); published FP32"
            log.info("tflite INT8 failed, falling back to FP32: %s", brief(exc))
    try:
        with torch_threads(1), quiet(), torch.no_grad():
            litert_torch.convert(model, sample).export(str(path))
        name_tflite_tensors(path, in_names, out_names)
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"litert-torch conversion failed: {brief(exc)}") from exc
    return path, "fp32", note


def _tflite_int8(
    model: Any,
    path: Path,
    in_names: Sequence[str],
    calibration: Mapping[str, Array],
    sample: tuple[Any, ...],
) -> None:
    import litert_torch
    import torch
    from litert_torch.quantize import pt2e_quantizer, quant_config
    from torchao.quantization.pt2e import (  # type: ignore[import-untyped]
        move_exported_model_to_eval,
        quantize_pt2e,
    )

    rows = min(TFLITE_CALIBRATION_ROWS, next(iter(calibration.values())).shape[0])
    with torch_threads(1), quiet():
        exported = torch.export.export(model, sample).module()
        quantizer = pt2e_quantizer.PT2EQuantizer().set_global(
            pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=True)
        )
        prepared = quantize_pt2e.prepare_pt2e(exported, quantizer)
        with torch.no_grad():
            for i in range(rows):
                prepared(*(torch.from_numpy(calibration[n][i : i + 1]) for n in in_names))
        converted = quantize_pt2e.convert_pt2e(prepared, fold_quantize=False)
        converted = move_exported_model_to_eval(converted)
        converted.training = False  # an exported GraphModule refuses .eval()
        litert_torch.convert(
            converted, sample, quant_config=quant_config.QuantConfig(pt2e_quantizer=quantizer)
        ).export(str(path))


def name_tflite_tensors(path: Path, inputs: Sequence[str], outputs: Sequence[str]) -> None:
    """Renames the graph's input/output tensors to the signature's names, in place.

    litert-torch names them `serving_default_args_<i>` / `..._output_<i>_output` and orders
    the tensors by when they are computed, not by position; runtimes (the SDK's LiteRT one
    too) match tensors to the manifest by name first, so the names are made exact here from
    the signature def, which keeps the positions (args_<i>, output_<i>).
    """
    import flatbuffers  # type: ignore[import-untyped]
    from ai_edge_litert import schema_py_generated as schema

    data = path.read_bytes()
    model = schema.ModelT.InitFromPackedBuf(bytearray(data), 0)
    if any(getattr(b, "offset", 0) > 1 for b in model.buffers or []):
        raise ExportError(f"{path.name} keeps buffers outside the flatbuffer; cannot rename")
    signatures = model.signatureDefs or []
    if len(signatures) != 1 or len(model.subgraphs) < 1:
        raise ExportError(f"{path.name}: expected one signature, found {len(signatures)}")
    graph = model.subgraphs[signatures[0].subgraphIndex or 0]
    for mappings, names, prefix in (
        (signatures[0].inputs, inputs, "args_"),
        (signatures[0].outputs, outputs, "output_"),
    ):
        if len(mappings or []) != len(names):
            raise ExportError(f"{path.name}: the signature has {len(mappings or [])} {prefix}*")
        for mapping in mappings:
            key = mapping.name.decode() if isinstance(mapping.name, bytes) else str(mapping.name)
            position = int(key.removeprefix(prefix))
            graph.tensors[mapping.tensorIndex].name = names[position].encode()
    builder = flatbuffers.Builder(len(data) + 4096)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    path.write_bytes(bytes(builder.Output()))


def tflite_runner(path: Path, inputs: Sequence[str], outputs: Sequence[str]) -> Any:
    """Row-by-row LiteRT runner: the SDK's tensor matching and (de)quantization, so the
    build checks a variant's file the way a device will read it."""
    from ai_edge_litert.interpreter import Interpreter

    from tandem.errors import RuntimeBackendError
    from tandem.sdk.runtimes.litert import dequantize, match_tensors, quantize

    interpreter = Interpreter(model_path=str(path), num_threads=1)
    interpreter.allocate_tensors()
    try:
        in_details = match_tensors(interpreter, inputs, "inputs")
        out_details = match_tensors(interpreter, outputs, "outputs")
    except RuntimeBackendError as exc:
        raise ExportError(f"{path.name}: {exc}") from exc
    wants = [
        np.dtype(np.float32)
        if np.dtype(d["dtype"]).kind in "iu" and d["quantization"][0]
        else np.dtype(d["dtype"])
        for d in out_details
    ]

    def run(feeds: Mapping[str, Array]) -> dict[str, Array]:
        rows: list[list[Array]] = []
        for i in range(int(feeds[inputs[0]].shape[0])):
            for name, detail in zip(inputs, in_details, strict=True):
                value = np.ascontiguousarray(quantize(feeds[name][i : i + 1], detail))
                interpreter.set_tensor(detail["index"], value)
            interpreter.invoke()
            rows.append(
                [
                    dequantize(interpreter.get_tensor(d["index"]), d, want)
                    for d, want in zip(out_details, wants, strict=True)
                ]
            )
        return {n: np.concatenate([r[k] for r in rows]) for k, n in enumerate(outputs)}

    return run


__all__ = [
    "export_onnx",
    "export_tflite",
    "export_torch",
    "load_torch_file",
    "load_torch_model",
    "tflite_runner",
    "torch_runner",
    "torch_signature",
]
