"""Load a staged variant and check it against its own reference outputs.

`load_runner` is the one seam to the runtimes: it uses the SDK's runtime layer when that
is installed (`tandem.sdk.runtimes.get_runtime(name).load(manifest, folder)`), and
otherwise loads the model directly with the runtime the manifest names. Either way it
returns a plain callable.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from tandem.agent.errors import WarmupError
from tandem.errors import MissingDependencyError, TandemError
from tandem.sdk.artifacts import Manifest, load_npz, split_reference

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray[Any, Any]]
Runner = Callable[[Mapping[str, np.ndarray[Any, Any]]], Arrays]


def _sdk_runner(variant_dir: Path, manifest: Manifest) -> Runner | None:
    """The SDK's runtime for the manifest, or None where the SDK has no runtime layer."""
    try:
        runtimes = importlib.import_module("tandem.sdk.runtimes")
    except ImportError:
        return None
    runtime_cls = runtimes.get_runtime(manifest.runtime)
    backend = runtime_cls.load(manifest, variant_dir)
    return lambda inputs: dict(backend.run(dict(inputs)))


def _onnx_runner(variant_dir: Path, manifest: Manifest) -> Runner:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise MissingDependencyError("onnxruntime", "onnx", "ONNX models") from exc
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(
        str(variant_dir / manifest.entrypoint), options, providers=["CPUExecutionProvider"]
    )
    names = [o.name for o in manifest.outputs]

    def run(inputs: Mapping[str, np.ndarray[Any, Any]]) -> Arrays:
        values = session.run(names, dict(inputs))
        return {name: np.asarray(v) for name, v in zip(names, values, strict=True)}

    return run


def _openvino_runner(variant_dir: Path, manifest: Manifest) -> Runner:
    try:
        import openvino as ov
    except ImportError as exc:
        raise MissingDependencyError("openvino", "openvino", "OpenVINO models") from exc
    compiled = ov.Core().compile_model(str(variant_dir / manifest.entrypoint), "CPU")
    names = [o.name for o in manifest.outputs]

    def run(inputs: Mapping[str, np.ndarray[Any, Any]]) -> Arrays:
        result = compiled(dict(inputs))
        return {
            name: np.asarray(result[compiled.output(name)])  # by tensor name
            for name in names
        }

    return run


def _tflite_runner(variant_dir: Path, manifest: Manifest) -> Runner:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter
        except ImportError as exc:
            raise MissingDependencyError("ai-edge-litert", "tflite", "LiteRT models") from exc
    interpreter = Interpreter(model_path=str(variant_dir / manifest.entrypoint))

    def run(inputs: Mapping[str, np.ndarray[Any, Any]]) -> Arrays:
        details = interpreter.get_input_details()
        for spec, detail in zip(manifest.inputs, details, strict=False):
            value = inputs[spec.name]
            interpreter.resize_tensor_input(detail["index"], list(value.shape))
        interpreter.allocate_tensors()
        for spec, detail in zip(manifest.inputs, interpreter.get_input_details(), strict=False):
            interpreter.set_tensor(detail["index"], inputs[spec.name])
        interpreter.invoke()
        outs = interpreter.get_output_details()
        return {
            spec.name: np.asarray(interpreter.get_tensor(d["index"]))
            for spec, d in zip(manifest.outputs, outs, strict=False)
        }

    return run


_DIRECT: dict[str, Callable[[Path, Manifest], Runner]] = {
    "onnx": _onnx_runner,
    "openvino": _openvino_runner,
    "tflite": _tflite_runner,
}


def load_runner(variant_dir: Path, manifest: Manifest) -> Runner:
    """A callable running the variant; raises WarmupError when it cannot be loaded."""
    try:
        runner = _sdk_runner(variant_dir, manifest)
        if runner is not None:
            return runner
        direct = _DIRECT.get(manifest.runtime)
        if direct is None:
            raise WarmupError(f"no loader for runtime {manifest.runtime!r} on this device")
        return direct(variant_dir, manifest)
    except WarmupError:
        raise
    except MissingDependencyError as exc:
        raise WarmupError(str(exc)) from exc
    except Exception as exc:  # runtimes raise anything; translate at the boundary
        raise WarmupError(
            f"{manifest.runtime} could not load {manifest.entrypoint}: {exc}"
        ) from exc


def reference_io(variant_dir: Path, manifest: Manifest) -> tuple[Arrays, Arrays]:
    if not manifest.reference:
        raise WarmupError(f"{manifest.model} v{manifest.version} has no reference inputs")
    try:
        arrays = load_npz(variant_dir / manifest.reference)
    except (OSError, ValueError) as exc:
        raise WarmupError(f"cannot read {manifest.reference}: {exc}") from exc
    inputs, outputs = split_reference(arrays)
    if not inputs or not outputs:
        raise WarmupError(f"{manifest.reference} holds no input./output. arrays")
    return inputs, outputs


def compare_outputs(
    got: Mapping[str, Any], expected: Mapping[str, Any], rtol: float, atol: float
) -> None:
    """Raises WarmupError naming the first output that is missing or out of tolerance."""
    for name, want in expected.items():
        if name not in got:
            raise WarmupError(f"output {name!r} missing from the runtime's result")
        have = np.asarray(got[name])
        if have.shape != np.shape(want):
            raise WarmupError(f"output {name!r}: shape {have.shape} != reference {np.shape(want)}")
        if not np.allclose(have, want, rtol=rtol, atol=atol, equal_nan=False):
            worst = float(np.max(np.abs(have.astype(np.float64) - np.asarray(want, np.float64))))
            raise WarmupError(
                f"output {name!r} differs from the reference by up to {worst:.6g} "
                f"(rtol={rtol}, atol={atol})"
            )


class Probe:
    """A loaded variant and its reference inputs, runnable again and again (health probe)."""

    def __init__(self, variant_dir: Path, manifest: Manifest, rtol: float, atol: float) -> None:
        self.manifest = manifest
        self.rtol = rtol
        self.atol = atol
        self.inputs, self.outputs = reference_io(variant_dir, manifest)
        self.runner = load_runner(variant_dir, manifest)

    def check(self) -> None:
        """Runs the reference inputs once; raises WarmupError on any failure."""
        try:
            got = self.runner(self.inputs)
        except TandemError as exc:
            raise WarmupError(f"reference run failed: {exc}") from exc
        except Exception as exc:  # runtime errors of any type are a failed probe
            raise WarmupError(f"reference run failed: {exc!r}") from exc
        compare_outputs(got, self.outputs, self.rtol, self.atol)


def warm_up(variant_dir: Path, manifest: Manifest, rtol: float, atol: float) -> Probe:
    """Loads the variant and checks it against its reference; returns the probe for later."""
    probe = Probe(variant_dir, manifest, rtol, atol)
    probe.check()
    log.info("warm-up passed: %s v%d %s", manifest.model, manifest.version, manifest.variant)
    return probe
