"""What this device can run: its hardware and the runtimes importable here.

Detection never imports a runtime (importing openvino or torch costs seconds and memory on
a small device); it only asks whether the package could be imported.
"""

from __future__ import annotations

import importlib.util
import logging
import platform

from tandem.errors import TandemError

log = logging.getLogger(__name__)

# Manifest runtime name -> packages any of which provides it.
RUNTIME_PACKAGES: dict[str, tuple[str, ...]] = {
    "onnx": ("onnxruntime",),
    "tflite": ("ai_edge_litert", "tflite_runtime"),
    "openvino": ("openvino",),
    "torch": ("torch",),
}

_MACHINE_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64", "armv8": "aarch64"}


def detect_hardware() -> str:
    machine = platform.machine().lower()
    return _MACHINE_ALIASES.get(machine, machine) or "unknown"


def _importable(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def detect_runtimes() -> tuple[str, ...]:
    """The runtimes the SDK's registry reports installed (plugins included), else our table."""
    try:
        from tandem.sdk.runtimes import get_runtime, runtime_names
    except ImportError:
        return _detect_from_table()
    found: list[str] = []
    for name in runtime_names():
        try:
            if get_runtime(name).is_installed():
                found.append(name)
        except (TandemError, ImportError, ValueError) as exc:
            log.debug("runtime %s not usable here: %s", name, exc)
    return tuple(found)


def _detect_from_table() -> tuple[str, ...]:
    return tuple(
        runtime
        for runtime, packages in RUNTIME_PACKAGES.items()
        if any(_importable(p) for p in packages)
    )
