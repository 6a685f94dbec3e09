"""Running an exported model file in its own runtime, at build time.

The build measures every variant in the runtime that will run it on a device: accuracy on
the test set, the reference outputs shipped in the artifact, and a batch-1 latency. These
runners are deliberately thin wrappers over each runtime's Python API (the device-side SDK
has its own, richer runtimes); tests use them to check that the shipped reference outputs
reproduce. Every runner takes and returns arrays keyed by the manifest's tensor names.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tandem.cloud.build.errors import ExportError
from tandem.errors import MissingDependencyError
from tandem.sdk.runtimes.openvino import import_openvino

Array = np.ndarray[Any, Any]
Runner = Callable[[Mapping[str, Array]], dict[str, Array]]


def load_runner(
    runtime: str,
    model_path: Path,
    input_names: Sequence[str],
    output_names: Sequence[str],
    *,
    threads: int = 1,
) -> Runner:
    """A callable running `model_path` in `runtime` ("onnx", "openvino", "tflite", "torch")."""
    loaders = {
        "onnx": _onnx,
        "openvino": _openvino,
        "tflite": _tflite,
        "torch": _torch,
    }
    if runtime not in loaders:
        raise ExportError(f"no build-time runner for runtime {runtime!r}")
    return loaders[runtime](Path(model_path), tuple(input_names), tuple(output_names), threads)


def _onnx(path: Path, inputs: tuple[str, ...], outputs: tuple[str, ...], threads: int) -> Runner:
    from tandem.sdk.runtimes.onnx import cpu_session

    session = cpu_session(path, threads)

    def run(feeds: Mapping[str, Array]) -> dict[str, Array]:
        values = session.run(list(outputs), {name: feeds[name] for name in inputs})
        return {name: np.asarray(v) for name, v in zip(outputs, values, strict=True)}

    return run


def _openvino(
    path: Path, inputs: tuple[str, ...], outputs: tuple[str, ...], threads: int
) -> Runner:
    try:
        ov = import_openvino()
    except ImportError as exc:
        raise MissingDependencyError("openvino", "openvino", "OpenVINO variants") from exc
    # f32 precision hint: on CPUs with bf16 units OpenVINO otherwise computes in bf16, and
    # the reference outputs shipped in artifacts must be the model's exact f32 answers.
    compiled = ov.Core().compile_model(
        str(path), "CPU", {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"}
    )
    request = compiled.create_infer_request()
    ports = {port.get_any_name(): port for port in compiled.outputs}

    def run(feeds: Mapping[str, Array]) -> dict[str, Array]:
        result = request.infer({name: feeds[name] for name in inputs})
        return {name: np.array(result[ports[name]]) for name in outputs}

    return run


def _tflite(path: Path, inputs: tuple[str, ...], outputs: tuple[str, ...], threads: int) -> Runner:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as exc:
        raise MissingDependencyError("ai-edge-litert", "tflite", "TFLite variants") from exc
    interpreter = Interpreter(model_path=str(path), num_threads=threads)
    interpreter.allocate_tensors()
    # The SDK's matcher (names, else the signature's positions), so build and device agree.
    from tandem.errors import RuntimeBackendError
    from tandem.sdk.runtimes.litert import match_tensors

    try:
        in_details = match_tensors(interpreter, inputs, "inputs")
        out_details = match_tensors(interpreter, outputs, "outputs")
    except RuntimeBackendError as exc:
        raise ExportError(f"{path.name}: {exc}") from exc
    fixed_batch = int(in_details[0]["shape"][0])

    def invoke(rows: Mapping[str, Array]) -> list[Array]:
        for name, detail in zip(inputs, in_details, strict=True):
            interpreter.set_tensor(detail["index"], np.ascontiguousarray(rows[name]))
        interpreter.invoke()
        return [np.array(interpreter.get_tensor(d["index"])) for d in out_details]

    def run(feeds: Mapping[str, Array]) -> dict[str, Array]:
        # A LiteRT graph has a fixed batch (litert-torch pins it): feed it slice by slice.
        batch = int(feeds[inputs[0]].shape[0])
        chunks: list[list[Array]] = []
        for start in range(0, batch, fixed_batch):
            chunks.append(invoke({n: feeds[n][start : start + fixed_batch] for n in inputs}))
        return {
            name: np.concatenate([chunk[i] for chunk in chunks]) for i, name in enumerate(outputs)
        }

    return run


def _torch(path: Path, inputs: tuple[str, ...], outputs: tuple[str, ...], threads: int) -> Runner:
    try:
        import torch
    except ImportError as exc:
        raise MissingDependencyError("torch", "torch", "PyTorch variants") from exc
    module = torch.jit.load(str(path), map_location="cpu")  # type: ignore[no-untyped-call]
    module.eval()

    def run(feeds: Mapping[str, Array]) -> dict[str, Array]:
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            with torch.inference_mode():
                out = module(*(torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in inputs))
        finally:
            torch.set_num_threads(previous)
        values = list(out) if isinstance(out, tuple | list) else [out]
        return {name: v.numpy().copy() for name, v in zip(outputs, values, strict=True)}

    return run


def run_batched(
    runner: Runner, feeds: Mapping[str, Array], batch_size: int = 64
) -> dict[str, Array]:
    """Runs `feeds` through `runner` in batches of `batch_size` rows and joins the outputs."""
    total = int(next(iter(feeds.values())).shape[0])
    parts: list[dict[str, Array]] = []
    for start in range(0, total, batch_size):
        parts.append(runner({k: v[start : start + batch_size] for k, v in feeds.items()}))
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def median_latency_ms(
    runner: Runner, feeds: Mapping[str, Array], *, warmup: int = 20, repeats: int = 200
) -> float:
    """Median wall time of one call, in milliseconds (noisy on a shared machine)."""
    for _ in range(warmup):
        runner(feeds)
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        runner(feeds)
        samples.append((time.perf_counter() - started) * 1000.0)
    return float(statistics.median(samples))
