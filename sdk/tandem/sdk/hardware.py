"""Probing what the device can run: CPU features, accelerators, execution providers."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tandem.errors import MissingDependencyError, TandemError

log = logging.getLogger(__name__)

# The CPU flags that change which runtime (and kernel) is fastest for INT8 and FP32 work.
INTERESTING_FLAGS = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
    "asimd",
    "asimddp",
    "sve",
    "i8mm",
)


@dataclass(frozen=True)
class HardwareInfo:
    machine: str  # platform.machine(): x86_64, aarch64, ...
    cpu_count: int
    cpu_flags: tuple[str, ...]  # the interesting flags from /proc/cpuinfo
    onnx_providers: tuple[str, ...] = ()
    openvino_devices: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    def fingerprint(self) -> str:
        """Changes when the hardware or the runtimes' view of it changes."""
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:16]

    def to_json(self) -> dict[str, Any]:
        return {
            "machine": self.machine,
            "cpu_count": self.cpu_count,
            "cpu_flags": list(self.cpu_flags),
            "onnx_providers": list(self.onnx_providers),
            "openvino_devices": list(self.openvino_devices),
        }

    def matches(self, hardware: str) -> bool:
        """Whether an artifact built for `hardware` ("any", "x86_64", "aarch64") runs here."""
        aliases = {"amd64": "x86_64", "arm64": "aarch64"}
        here = aliases.get(self.machine.lower(), self.machine.lower())
        return hardware in ("any", "", here, self.machine)


def read_cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> tuple[str, ...]:
    try:
        text = cpuinfo.read_text()
    except OSError:
        return ()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            present = set(value.split())
            return tuple(f for f in INTERESTING_FLAGS if f in present)
    return ()


def probe(*, runtimes: tuple[str, ...] = ("onnx", "openvino")) -> HardwareInfo:
    """Probes the CPU and asks the installed runtimes what accelerators they see."""
    providers: tuple[str, ...] = ()
    devices: tuple[str, ...] = ()
    from tandem.sdk.runtimes import get_runtime

    if "onnx" in runtimes:
        try:
            cls = get_runtime("onnx")
            if cls.is_installed():
                providers = cls.available_providers()  # type: ignore[attr-defined]
        except (MissingDependencyError, TandemError) as exc:
            log.debug("onnxruntime probe failed: %s", exc)
    if "openvino" in runtimes:
        try:
            cls = get_runtime("openvino")
            if cls.is_installed():
                devices = cls.devices()  # type: ignore[attr-defined]
        except (MissingDependencyError, TandemError, RuntimeError) as exc:
            log.debug("openvino probe failed: %s", exc)
    return HardwareInfo(
        machine=platform.machine(),
        cpu_count=os.cpu_count() or 1,
        cpu_flags=read_cpu_flags(),
        onnx_providers=providers,
        openvino_devices=devices,
    )
