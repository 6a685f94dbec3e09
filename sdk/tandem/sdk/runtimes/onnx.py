"""ONNX Runtime, with execution providers in priority order."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tandem.errors import RuntimeBackendError
from tandem.sdk.artifacts import Manifest
from tandem.sdk.runtimes.base import Arrays, Runtime, register_runtime

# Fastest first; only those the installed onnxruntime offers are used.
PROVIDER_PRIORITY = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "CoreMLExecutionProvider",
    "OpenVINOExecutionProvider",
    "XnnpackExecutionProvider",
    "CPUExecutionProvider",
)


def session_options(ort: Any, threads: int) -> Any:
    """The options of every tandem ONNX Runtime session: `threads` intra-op threads (a small
    model answers faster on one thread than after waking a pool), one inter-op thread, and
    warnings and errors only in the log."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return options


def cpu_session(path: Path, threads: int = 1) -> Any:
    """An ONNX Runtime session over `path` on the CPU provider (the build's runners, the
    local text generator): `MissingDependencyError` names the `onnx` extra when absent."""
    ort = OnnxRuntime.import_package()
    return ort.InferenceSession(
        str(path), sess_options=session_options(ort, threads), providers=["CPUExecutionProvider"]
    )


@register_runtime
class OnnxRuntime(Runtime):
    name = "onnx"
    packages = ("onnxruntime",)
    extra = "onnx"

    def __init__(self, manifest: Manifest, model_dir: Path, session: Any) -> None:
        super().__init__(manifest, model_dir)
        self.session = session
        self._run = session.run
        self.providers = tuple(session.get_providers())
        self._single_output = self.output_names[0] if len(self.output_names) == 1 else None

    @classmethod
    def available_providers(cls) -> tuple[str, ...]:
        ort = cls.import_package()
        return tuple(ort.get_available_providers())

    @classmethod
    def load(
        cls,
        manifest: Manifest,
        model_dir: Path,
        *,
        providers: Sequence[str] | None = None,
        intra_op_threads: int = 1,
        **_: Any,
    ) -> OnnxRuntime:
        ort = cls.import_package()
        available = set(ort.get_available_providers())
        chosen = [p for p in (providers or PROVIDER_PRIORITY) if p in available]
        options = session_options(ort, intra_op_threads)
        try:
            session = ort.InferenceSession(
                str(model_dir / manifest.entrypoint), sess_options=options, providers=chosen
            )
        except Exception as exc:
            raise RuntimeBackendError(
                f"onnxruntime cannot load {manifest.entrypoint}: {exc}"
            ) from exc
        return cls(manifest, model_dir, session)

    def run(self, feeds: Mapping[str, np.ndarray[Any, Any]]) -> Arrays:
        try:
            outputs = self._run(self.output_names, feeds)
        except Exception as exc:
            raise RuntimeBackendError(f"onnxruntime run failed: {exc}") from exc
        if self._single_output is not None:
            return {self._single_output: outputs[0]}
        return dict(zip(self.output_names, outputs, strict=True))

    def describe(self) -> str:
        return f"onnx[{','.join(self.providers)}]"
