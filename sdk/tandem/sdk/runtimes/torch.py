"""PyTorch: a TorchScript file (`torch.jit.load`) or an ExportedProgram (`torch.export.load`)."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from tandem.errors import RuntimeBackendError
from tandem.sdk.artifacts import Manifest
from tandem.sdk.runtimes.base import Arrays, Runtime, register_runtime

# torch.export.load keeps its deserializer in a module global: two threads loading at once
# (two agents' warm-ups in one device process) fail with "_CURRENT_DESERIALIZER is already
# set". Loads take turns; the loaded modules run concurrently.
_EXPORT_LOAD = threading.Lock()


@register_runtime
class TorchRuntime(Runtime):
    name = "torch"
    packages = ("torch",)
    extra = "torch"

    def __init__(self, manifest: Manifest, model_dir: Path, module: Any, torch: Any) -> None:
        super().__init__(manifest, model_dir)
        self.module = module
        self._torch = torch
        self.input_names = tuple(t.name for t in manifest.inputs)

    @classmethod
    def load(
        cls, manifest: Manifest, model_dir: Path, *, threads: int = 1, **_: Any
    ) -> TorchRuntime:
        torch = cls.import_package()
        path = model_dir / manifest.entrypoint
        try:
            if path.suffix == ".pt2":
                with _EXPORT_LOAD:
                    module = torch.export.load(str(path)).module()
            else:
                module = torch.jit.load(str(path), map_location="cpu")
                module.eval()
        except Exception as exc:  # torch's loaders raise anything on a bad file
            raise RuntimeBackendError(f"torch cannot load {manifest.entrypoint}: {exc}") from exc
        if threads and torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        return cls(manifest, model_dir, module, torch)

    def run(self, feeds: Mapping[str, np.ndarray[Any, Any]]) -> Arrays:
        torch = self._torch
        try:
            with torch.inference_mode():
                out = self.module(*(torch.from_numpy(feeds[n]) for n in self.input_names))
        except (RuntimeError, ValueError, TypeError) as exc:
            raise RuntimeBackendError(f"torch run failed: {exc}") from exc
        if isinstance(out, dict):
            values = [out[n] for n in self.output_names]
        elif isinstance(out, tuple | list):
            values = list(out)
        else:
            values = [out]
        return {
            name: v.detach().numpy().copy()
            for name, v in zip(self.output_names, values, strict=True)
        }
