"""The build spec of a user's model (`tandem models build --spec model.toml`), parsed and checked.

Layout (paths relative to the spec file)::

    [model]  name = "wine", task = "classification" | "embedding" | "regression" | "generic",
             scores = "probabilities"   # optional: the primary output (default: the first)
             inputs = ["x"], outputs = ["logits", "embedding"]   # optional, PyTorch sources
    [full]   onnx = "wine.onnx" | torchscript = "m.pt" | exported_program = "m.pt2"
             | factory = "pkg.module:make_model" + weights = "model.pt"
    [edge]   quantize = "int8" | "none", runtimes = ["onnx", "openvino"]   # optional
    [data]   calibration = "calib.npz", validation = "val.npz" (+ `labels` for classifiers)
    [checks] min_top1_agreement, max_accuracy_drop, min_cosine, max_abs_error,
             max_mean_abs_error                   # optional, for the primary output
    [checks.outputs.<name>] min_cosine, max_abs_error, max_mean_abs_error, min_agreement
                                                  # optional, for each secondary output

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
    "model": ("name", "task", "scores", "inputs", "outputs"),
    "full": ("onnx", "torchscript", "exported_program", "factory", "weights"),
    "edge": ("from", "quantize", "runtimes"),
    "data": ("calibration", "validation"),
    "checks": (
        "min_top1_agreement",
        "max_accuracy_drop",
        "min_cosine",
        "max_abs_error",
        "max_mean_abs_error",
        "outputs",
    ),
}
SOURCES = ("onnx", "torchscript", "exported_program", "factory")
OUTPUT_CHECKS = ("min_cosine", "max_abs_error", "max_mean_abs_error", "min_agreement")
# Secondary outputs: float ones by cosine, integer/bool ones by exact agreement.
DEFAULT_OUTPUT_CHECKS = {"min_cosine": 0.98, "min_agreement": 0.98}
_FACTORY = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*$")
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
    full_onnx: Path | None  # the ONNX source; None for a PyTorch source
    calibration: Path
    validation: Path
    scores: str | None = None  # output name of a classifier's scores; default: first output
    quantize: str = "int8"
    runtimes: tuple[str, ...] = ("onnx", "openvino", "tflite", "torch")
    checks: Mapping[str, float] = field(default_factory=dict)
    # per secondary output name: its tolerances (defaults in DEFAULT_OUTPUT_CHECKS)
    output_checks: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    source: str = "onnx"  # one of SOURCES
    source_file: Path | None = None  # the .pt / .pt2 file, or the factory's module file
    factory: str | None = None  # "pkg.module:make_model"
    weights: Path | None = None  # the factory model's state dict
    inputs: tuple[str, ...] | None = None  # PyTorch sources: input names, in forward's order
    outputs: tuple[str, ...] | None = None  # PyTorch sources: output names, in return order

    @property
    def is_torch(self) -> bool:
        return self.source != "onnx"

    def files(self) -> tuple[Path, ...]:
        """Every file the build reads besides the spec itself (for the cache key)."""
        sources = (self.full_onnx, self.source_file, self.weights)
        return (*(p for p in sources if p is not None), self.calibration, self.validation)


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

    inputs = _names(model, "inputs")
    outputs = _names(model, "outputs")

    full = _table(document, "full", True)
    given = [k for k in SOURCES if k in full]
    if len(given) != 1:
        raise SpecError(
            f"[full]: expected exactly one of {', '.join(SOURCES)};"
            f" got {', '.join(full) or 'nothing'}"
        )
    source = given[0]
    if ("weights" in full) != (source == "factory"):
        raise SpecError(
            "[full] weights: goes with factory (and only with it): the state dict"
            " torch.save(model.state_dict(), ...) wrote for the factory's model"
        )
    full_onnx = source_file = weights = None
    factory = None
    if source == "onnx":
        full_onnx = _file(base, full, "full", "onnx")
    elif source == "factory":
        factory = _text(full, "full", "factory")
        if not _FACTORY.match(factory):
            raise SpecError(
                f"[full] factory: {factory!r} is not of the form 'pkg.module:make_model'"
            )
        source_file = _factory_file(base, factory)
        weights = _file(base, full, "full", "weights")
    else:
        source_file = _file(base, full, "full", source)

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
    output_checks: dict[str, dict[str, float]] = {}
    for key, value in given_checks.items():
        if key == "outputs":
            output_checks = _output_checks(value)
            continue
        checks[key] = _number(value, f"[checks] {key}")
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
        output_checks=output_checks,
        source=source,
        source_file=source_file,
        factory=factory,
        weights=weights,
        inputs=inputs,
        outputs=outputs,
    )


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise SpecError(f"{where}: expected a number >= 0, got {value!r}")
    return float(value)


def _names(table: Mapping[str, Any], key: str) -> tuple[str, ...] | None:
    if key not in table:
        return None
    value = table[key]
    if (
        not isinstance(value, list)
        or not value
        or any(not isinstance(v, str) or not v for v in value)
        or len(set(value)) != len(value)
    ):
        raise SpecError(f"[model] {key}: expected a list of distinct tensor names, got {value!r}")
    return tuple(value)


def _output_checks(value: Any) -> dict[str, dict[str, float]]:
    if not isinstance(value, Mapping):
        raise SpecError("[checks] outputs: expected tables [checks.outputs.<output name>]")
    result: dict[str, dict[str, float]] = {}
    for name, table in value.items():
        where = f"[checks.outputs.{name}]"
        if not isinstance(table, Mapping):
            raise SpecError(f"{where}: expected a table, got {type(table).__name__}")
        for key in table:
            if key not in OUTPUT_CHECKS:
                raise SpecError(
                    f"{where} {key}: unknown key; expected one of {', '.join(OUTPUT_CHECKS)}"
                )
        result[str(name)] = {k: _number(v, f"{where} {k}") for k, v in table.items()}
    return result


def _factory_file(base: Path, factory: str) -> Path:
    """The factory's module file, resolved relative to the spec's folder."""
    module = factory.split(":", 1)[0]
    relative = Path(*module.split("."))
    for candidate in (base / relative.with_suffix(".py"), base / relative / "__init__.py"):
        if candidate.is_file():
            return candidate.resolve()
    raise SpecError(
        f"[full] factory: module {module!r} not found under {base}"
        f" (expected {relative.with_suffix('.py')} or {relative / '__init__.py'})"
    )
