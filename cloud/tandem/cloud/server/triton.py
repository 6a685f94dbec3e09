"""Triton model repositories, read as they are: `<model>/config.pbtxt` and numbered versions.

A model folder holding `config.pbtxt` is a Triton model: the file is parsed with protobuf's
text format against Triton's own `model_config.proto` (vendored in `tandem.protos.triton`), so
a misspelt field is refused the way Triton refuses it, and mapped onto the server's
`ModelConfig`:

- `platform` / `backend`: onnxruntime_onnx / onnxruntime, pytorch_libtorch / pytorch and
  openvino; neither given: the model file in the version folders decides, as in Triton.
- `max_batch_size`, `input`, `output` (`TYPE_FP32` -> `FP32`; with `max_batch_size > 0` the
  batch dimension is implicit, as in Triton). An ONNX model whose config lists no inputs or
  outputs gets them from the model file (Triton's auto-complete); TorchScript cannot.
- `dynamic_batching` (preferred sizes, `max_queue_delay_microseconds`, the default queue
  policy's `max_queue_size`), `version_policy` (latest, all, specific), `instance_group`
  (count; KIND_CPU, KIND_GPU, KIND_AUTO; KIND_GPU without a GPU falls back to CPU with a
  warning), `parameters` (string values, passed to the backend as the project's own).

Any other field carrying a value (sequence batching, ensembles, the python backend, warmup,
optimization, ...) is refused with a `RepositoryError` naming the model and the field, so a
Triton user never gets a server silently behaving differently from Triton.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf import text_format
from google.protobuf.message import Message

from tandem.errors import ConfigError
from tandem.protos.triton import model_config_pb2 as mc
from tandem.sdk.datatypes import DATATYPES, datatype_of

from .config import MODEL_FILES, DynamicBatching, ModelConfig, TensorConfig, VersionPolicy
from .errors import RepositoryError

log = logging.getLogger(__name__)

CONFIG_FILE = "config.pbtxt"

# Triton's platform and backend names -> the server's backend.
_PLATFORMS = {"onnxruntime_onnx": "onnxruntime", "pytorch_libtorch": "pytorch"}
_BACKENDS = {"onnxruntime": "onnxruntime", "pytorch": "pytorch", "openvino": "openvino"}
_KINDS = {
    mc.ModelInstanceGroup.KIND_AUTO: "auto",
    mc.ModelInstanceGroup.KIND_CPU: "cpu",
    mc.ModelInstanceGroup.KIND_GPU: "gpu",
}
# The fields tandem maps, per message; a field outside these that carries a value is refused.
_MAPPED: dict[str, frozenset[str]] = {
    "inference.ModelConfig": frozenset(
        {
            "name",
            "platform",
            "backend",
            "version_policy",
            "max_batch_size",
            "input",
            "output",
            "dynamic_batching",
            "instance_group",
            "parameters",
            "default_model_filename",
        }
    ),
    # `format` and `label_filename` describe the tensor; they change nothing in serving.
    "inference.ModelInput": frozenset({"name", "data_type", "format", "dims"}),
    "inference.ModelOutput": frozenset({"name", "data_type", "dims", "label_filename"}),
    # Responses go back per request, so the order they leave in is not observable.
    "inference.ModelDynamicBatching": frozenset(
        {"preferred_batch_size", "max_queue_delay_microseconds", "preserve_ordering"}
        | {"default_queue_policy"}
    ),
    "inference.ModelQueuePolicy": frozenset({"max_queue_size"}),
    "inference.ModelInstanceGroup": frozenset({"name", "kind", "count", "gpus"}),
    "inference.ModelVersionPolicy": frozenset({"latest", "all", "specific"}),
    "inference.ModelVersionPolicy.Latest": frozenset({"num_versions"}),
    "inference.ModelVersionPolicy.Specific": frozenset({"versions"}),
}


def is_triton_model(folder: Path) -> bool:
    return (folder / CONFIG_FILE).is_file()


def parse_config(text: str, source: str) -> mc.ModelConfig:
    """config.pbtxt text -> Triton's ModelConfig message; `source` names it in errors."""
    config = mc.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        raise RepositoryError(f"{source}: not a valid Triton model config: {exc}") from exc
    return config


def has_gpu(backend: str) -> bool:
    """Whether `backend` can run on a GPU here (openvino picks its device itself)."""
    if backend == "onnxruntime":
        import onnxruntime as ort

        return "CUDAExecutionProvider" in ort.get_available_providers()
    if backend == "pytorch":
        import torch

        return bool(torch.cuda.is_available())
    return True


def load_triton_config(path: Path) -> ModelConfig:
    """Reads `<model>/config.pbtxt` into the server's ModelConfig."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise RepositoryError(f"cannot read {path}: {exc}") from exc
    return to_model_config(parse_config(text, str(path)), path.parent)


def to_model_config(
    raw: mc.ModelConfig, folder: Path, gpu_available: Callable[[str], bool] = has_gpu
) -> ModelConfig:
    """Maps a parsed config.pbtxt of the model in `folder` onto the server's ModelConfig."""
    name = folder.name
    if raw.name and raw.name != name:
        raise RepositoryError(
            f"model {name!r}: config.pbtxt names it {raw.name!r}, its folder is {name!r}"
        )
    _refuse_unmapped(raw, name, "")
    backend = _backend(raw, name, folder)
    if raw.default_model_filename and raw.default_model_filename != MODEL_FILES[backend]:
        raise RepositoryError(
            f"model {name!r}: default_model_filename {raw.default_model_filename!r} is not "
            f"supported: tandem loads {MODEL_FILES[backend]!r} from each version folder"
        )
    try:
        inputs = tuple(_tensor(t, name, f"input[{i}]") for i, t in enumerate(raw.input))
        outputs = tuple(_tensor(t, name, f"output[{i}]") for i, t in enumerate(raw.output))
        if not inputs or not outputs:
            inputs, outputs = _complete(name, backend, folder, raw.max_batch_size, inputs, outputs)
        kind, count = _instances(raw, name, backend, gpu_available)
        return ModelConfig(
            name=name,
            backend=backend,
            inputs=inputs,
            outputs=outputs,
            max_batch_size=raw.max_batch_size,
            dynamic_batching=_dynamic_batching(raw),
            instance_count=count,
            instance_kind=kind,
            version_policy=_version_policy(raw.version_policy),
            parameters={k: v.string_value for k, v in raw.parameters.items()},
        )
    except ConfigError as exc:
        raise RepositoryError(f"model {name!r}: config.pbtxt {exc}") from exc


def _refuse_unmapped(message: Message, model: str, where: str) -> None:
    """Refuses any field outside `_MAPPED` that holds a value, recursing into mapped ones."""
    allowed = _MAPPED.get(message.DESCRIPTOR.full_name, frozenset())
    for field, value in message.ListFields():
        path = f"{where}.{field.name}" if where else field.name
        if field.name not in allowed:
            raise RepositoryError(
                f"model {model!r}: config.pbtxt field {path!r} is not supported by tandem serve"
            )
        if field.message_type is None or field.message_type.GetOptions().map_entry:
            continue
        if field.is_repeated:
            for i, item in enumerate(value):
                _refuse_unmapped(item, model, f"{path}[{i}]")
        else:
            _refuse_unmapped(value, model, path)


def _backend(raw: mc.ModelConfig, name: str, folder: Path) -> str:
    chosen: set[str] = set()
    if raw.platform:
        if raw.platform not in _PLATFORMS:
            raise RepositoryError(
                f"model {name!r}: platform {raw.platform!r} is not supported by tandem serve "
                f"(supported: {', '.join(_PLATFORMS)})"
            )
        chosen.add(_PLATFORMS[raw.platform])
    if raw.backend:
        if raw.backend not in _BACKENDS:
            raise RepositoryError(
                f"model {name!r}: backend {raw.backend!r} is not supported by tandem serve "
                f"(supported: {', '.join(_BACKENDS)})"
            )
        chosen.add(_BACKENDS[raw.backend])
    if len(chosen) > 1:
        raise RepositoryError(
            f"model {name!r}: platform {raw.platform!r} and backend {raw.backend!r} disagree"
        )
    if chosen:
        return chosen.pop()
    found = {b for b, file in MODEL_FILES.items() if _versions_with(folder, file)}
    if len(found) != 1:
        raise RepositoryError(
            f"model {name!r}: config.pbtxt gives neither platform nor backend, and the version "
            f"folders hold {'no' if not found else 'several kinds of'} model file "
            f"(expected one of {', '.join(MODEL_FILES.values())})"
        )
    return found.pop()


def _versions_with(folder: Path, file: str) -> list[int]:
    return sorted(
        int(p.name)
        for p in folder.iterdir()
        if p.is_dir() and p.name.isdigit() and int(p.name) > 0 and (p / file).is_file()
    )


def _datatype(value: int, model: str, where: str) -> str:
    triton = mc.DataType.Name(value)
    v2 = "BYTES" if triton == "TYPE_STRING" else triton.removeprefix("TYPE_")
    if v2 not in DATATYPES:
        raise RepositoryError(
            f"model {model!r}: config.pbtxt {where}.data_type {triton} is not supported "
            f"(supported: {', '.join('TYPE_' + d for d in DATATYPES)})"
        )
    return v2


def _tensor(t: mc.ModelInput | mc.ModelOutput, model: str, where: str) -> TensorConfig:
    if not t.dims:
        raise RepositoryError(f"model {model!r}: config.pbtxt {where} ({t.name!r}) has no dims")
    return TensorConfig(t.name, _datatype(t.data_type, model, where), tuple(t.dims))


def _complete(
    model: str,
    backend: str,
    folder: Path,
    max_batch_size: int,
    inputs: tuple[TensorConfig, ...],
    outputs: tuple[TensorConfig, ...],
) -> tuple[tuple[TensorConfig, ...], tuple[TensorConfig, ...]]:
    """Triton's auto-complete: the missing side's tensors from the newest ONNX model file."""
    versions = _versions_with(folder, MODEL_FILES["onnxruntime"])
    if backend != "onnxruntime" or not versions:
        raise RepositoryError(
            f"model {model!r}: config.pbtxt must list its input and output tensors "
            f"(they are read from the model only for ONNX models)"
        )
    import onnxruntime as ort

    path = folder / str(versions[-1]) / MODEL_FILES["onnxruntime"]
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise RepositoryError(f"model {model!r}: cannot read tensors from {path}: {exc}") from exc

    def read(args: Iterable[Any]) -> tuple[TensorConfig, ...]:
        return tuple(_onnx_tensor(model, path, max_batch_size, a) for a in args)

    return inputs or read(session.get_inputs()), outputs or read(session.get_outputs())


def _onnx_tensor(model: str, path: Path, max_batch_size: int, arg: Any) -> TensorConfig:
    # onnxruntime spells types "tensor(float)"; numpy knows every other element type by name.
    element = str(arg.type).removeprefix("tensor(").removesuffix(")")
    element = {"float": "float32", "double": "float64"}.get(element, element)
    try:
        datatype = datatype_of(np.dtype(element))
    except TypeError:
        datatype = None
    if datatype is None:
        raise RepositoryError(f"model {model!r}: {path} tensor {arg.name!r}: type {arg.type}")
    dims = [d if isinstance(d, int) and d > 0 else -1 for d in arg.shape]
    if max_batch_size > 0:
        if not dims or dims[0] != -1:
            raise RepositoryError(
                f"model {model!r}: max_batch_size {max_batch_size} but {path} tensor "
                f"{arg.name!r} has no variable first dimension (shape {arg.shape})"
            )
        dims = dims[1:]
    return TensorConfig(arg.name, datatype, tuple(dims))


def _dynamic_batching(raw: mc.ModelConfig) -> DynamicBatching | None:
    if not raw.HasField("dynamic_batching"):
        return None
    db = raw.dynamic_batching
    # 0 in Triton means no limit; the server always has one, its default.
    queue = db.default_queue_policy.max_queue_size or DynamicBatching.max_queue_size
    return DynamicBatching(
        max_queue_delay_us=db.max_queue_delay_microseconds,
        preferred_batch_sizes=tuple(db.preferred_batch_size),
        max_queue_size=queue,
    )


def _version_policy(policy: mc.ModelVersionPolicy) -> VersionPolicy:
    choice = policy.WhichOneof("policy_choice")
    if choice == "all":
        return VersionPolicy(latest=1_000_000)
    if choice == "specific":
        return VersionPolicy(latest=None, specific=tuple(policy.specific.versions))
    # Triton's default, and `latest {}` without num_versions, serve the single newest.
    return VersionPolicy(latest=policy.latest.num_versions or 1)


def _instances(
    raw: mc.ModelConfig, model: str, backend: str, gpu_available: Callable[[str], bool]
) -> tuple[str, int]:
    if not raw.instance_group:
        return "auto", 1
    kinds = {g.kind for g in raw.instance_group}
    if len(kinds) > 1:
        raise RepositoryError(
            f"model {model!r}: config.pbtxt instance_group mixes kinds; tandem serve runs "
            "every instance of a model on one kind of device"
        )
    (kind_value,) = kinds
    if kind_value not in _KINDS:
        raise RepositoryError(
            f"model {model!r}: config.pbtxt instance_group kind "
            f"{mc.ModelInstanceGroup.Kind.Name(kind_value)} is not supported "
            "(KIND_AUTO, KIND_CPU or KIND_GPU)"
        )
    kind = _KINDS[kind_value]
    gpus = {gpu for g in raw.instance_group for gpu in g.gpus}
    if gpus - {0}:
        raise RepositoryError(
            f"model {model!r}: config.pbtxt instance_group gpus {sorted(gpus)}: tandem serve "
            "runs on the first GPU only (gpus: [0] or none)"
        )
    if kind == "gpu" and not gpu_available(backend):
        log.warning("model %s: instance_group KIND_GPU but no GPU for %s: CPU", model, backend)
        kind = "cpu"
    # Triton's count defaults to 1 per group.
    return kind, sum(g.count or 1 for g in raw.instance_group)
