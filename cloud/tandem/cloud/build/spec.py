"""The build spec of a user's model (`tandem models build --spec model.toml`), parsed and checked.

Layout (paths relative to the spec file)::

    [model]  name = "wine", task = "classification" | "embedding" | "regression" | "generic",
             scores = "probabilities"   # optional: the output holding a classifier's scores
    [full]   onnx = "wine.onnx"
    [edge]   quantize = "int8" | "none", runtimes = ["onnx", "openvino"]   # optional
    [data]   calibration = "calib.npz", validation = "val.npz" (+ `labels` for classifiers)
    [checks] min_top1_agreement, max_accuracy_drop, min_cosine, max_abs_error,
             max_mean_abs_error                                           # optional

Every problem is a `SpecError` naming the field or file and what was expected.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tandem.cloud.build.errors import SpecError

TASKS = ("classification", "embedding", "regression", "generic")
QUANTIZE = ("int8", "none")
EDGE_RUNTIMES = ("onnx", "openvino", "tflite", "torch")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_SECTIONS: dict[str, tuple[str, ...]] = {
    "model": ("name", "task", "scores"),
    "full": ("onnx", "torchscript", "exported_program", "factory", "weights"),
    "edge": ("from", "quantize", "runtimes"),
    "data": ("calibration", "validation"),
    "checks": (
        "min_top1_agreement",
        "max_accuracy_drop",
        "min_cosine",
        "max_abs_error",
        "max_mean_abs_error",
    ),
}
# Per-task defaults; max_abs_error / max_mean_abs_error default to 1.0x / 0.1x of the full
# model's mean absolute output (see `checks.tolerances`), since their scale is the model's.
DEFAULT_CHECKS: dict[str, dict[str, float]] = {
    "classification": {"min_top1_agreement": 0.98, "max_accuracy_drop": 0.02},
    "embedding": {"min_cosine": 0.98},
    "regression": {},
    "generic": {},
}


@dataclass(frozen=True)
class ModelSpec:
    path: Path  # the spec file
    name: str
    task: str
    full_onnx: Path
    calibration: Path
    validation: Path
    scores: str | None = None  # output name of a classifier's scores; default: first output
    quantize: str = "int8"
    runtimes: tuple[str, ...] = ("onnx", "openvino", "tflite", "torch")
    checks: Mapping[str, float] = field(default_factory=dict)

    def files(self) -> tuple[Path, ...]:
        """Every file the build reads besides the spec itself (for the cache key)."""
        return (self.full_onnx, self.calibration, self.validation)


def _table(document: Mapping[str, Any], section: str, required: bool) -> Mapping[str, Any]:
    value = document.get(section)
    if value is None:
        if required:
            raise SpecError(f"[{section}]: missing section")
        return {}
    if not isinstance(value, Mapping):
        raise SpecError(f"[{section}]: expected a table, got {type(value).__name__}")
    for key in value:
        if key not in _SECTIONS[section]:
            raise SpecError(
                f"[{section}] {key}: unknown key; expected one of {', '.join(_SECTIONS[section])}"
            )
    return value


def _text(table: Mapping[str, Any], section: str, key: str) -> str:
    value = table.get(key)
    if not isinstance(value, str) or not value:
        raise SpecError(f"[{section}] {key}: expected a non-empty string, got {value!r}")
    return value


def _file(base: Path, table: Mapping[str, Any], section: str, key: str) -> Path:
    path = (base / _text(table, section, key)).resolve()
    if not path.is_file():
        raise SpecError(f"[{section}] {key}: file {path} does not exist")
    return path


def load_spec(path: Path) -> ModelSpec:
    """Reads and checks a spec file; the files it names must exist."""
    path = Path(path).resolve()
    try:
        document = tomllib.loads(path.read_text())
    except OSError as exc:
        raise SpecError(f"spec {path}: cannot read it ({exc.strerror})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"spec {path}: not valid TOML ({exc})") from exc
    for section in document:
        if section not in _SECTIONS:
            raise SpecError(f"[{section}]: unknown section; expected one of {', '.join(_SECTIONS)}")
    base = path.parent
    model = _table(document, "model", True)
    name = _text(model, "model", "name")
    if not _NAME.match(name):
        raise SpecError(f"[model] name: {name!r} is not a plain name (letters, digits, _ . -)")
    task = _text(model, "model", "task")
    if task not in TASKS:
        raise SpecError(f"[model] task: {task!r} is not one of {', '.join(TASKS)}")
    scores = _text(model, "model", "scores") if "scores" in model else None

    full = _table(document, "full", True)
    if "onnx" not in full:
        given = ", ".join(full) or "nothing"
        raise SpecError(
            f"[full]: this build reads an ONNX file (onnx = ...); got {given}."
            " PyTorch sources: export to ONNX with torch.onnx.export first"
        )
    full_onnx = _file(base, full, "full", "onnx")

    edge = _table(document, "edge", False)
    if edge.get("from", "full") != "full":
        raise SpecError(
            f'[edge] from: only "full" (quantize the full model) is supported, got {edge["from"]!r}'
        )
    quantize = edge.get("quantize", "int8")
    if quantize not in QUANTIZE:
        raise SpecError(f"[edge] quantize: {quantize!r} is not one of {', '.join(QUANTIZE)}")
    runtimes = edge.get("runtimes", list(EDGE_RUNTIMES))
    if (
        not isinstance(runtimes, list)
        or not runtimes
        or any(r not in EDGE_RUNTIMES for r in runtimes)
    ):
        raise SpecError(
            f"[edge] runtimes: expected a list of {', '.join(EDGE_RUNTIMES)}, got {runtimes!r}"
        )

    data = _table(document, "data", True)
    calibration = _file(base, data, "data", "calibration")
    validation = _file(base, data, "data", "validation")

    given_checks = _table(document, "checks", False)
    checks = dict(DEFAULT_CHECKS[task])
    for key, value in given_checks.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise SpecError(f"[checks] {key}: expected a number >= 0, got {value!r}")
        checks[key] = float(value)
    return ModelSpec(
        path=path,
        name=name,
        task=task,
        full_onnx=full_onnx,
        calibration=calibration,
        validation=validation,
        scores=scores,
        quantize=str(quantize),
        runtimes=tuple(dict.fromkeys(runtimes)),
        checks=checks,
    )
