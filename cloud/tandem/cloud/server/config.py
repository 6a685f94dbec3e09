"""Model and server configuration: frozen dataclasses validated at construction.

A model's `config.json` (Triton-like; `dims` exclude the batch dimension when
`max_batch_size > 0`) is parsed by `ModelConfig.from_dict`, which names the wrong field.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tandem.errors import ConfigError
from tandem.sdk.datatypes import DATATYPES

from .errors import RepositoryError

BACKENDS = ("onnxruntime", "pytorch", "openvino")
# The file each backend loads from `<model>/<version>/`.
MODEL_FILES = {"onnxruntime": "model.onnx", "pytorch": "model.pt", "openvino": "model.xml"}
# The V2 `platform` string each backend reports in ModelMetadata (Triton's names).
PLATFORMS = {
    "onnxruntime": "onnxruntime_onnx",
    "pytorch": "pytorch_libtorch",
    "openvino": "openvino",
}
INSTANCE_KINDS = ("auto", "cpu", "gpu")


@dataclass(frozen=True)
class TensorConfig:
    name: str
    datatype: str  # a V2 datatype name, e.g. "FP32"
    dims: tuple[int, ...]  # -1 for a variable dimension; excludes the batch dim when batching

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("name", "a tensor needs a name")
        if self.datatype not in DATATYPES:
            raise ConfigError(f"{self.name}.datatype", f"unsupported datatype {self.datatype!r}")
        for d in self.dims:
            if d < -1 or d == 0:
                raise ConfigError(f"{self.name}.dims", f"dimension {d} must be -1 or positive")


@dataclass(frozen=True)
class DynamicBatching:
    max_queue_delay_us: int = 0  # microseconds a batch may wait for more requests
    preferred_batch_sizes: tuple[int, ...] = ()  # batch sizes run as soon as they can be formed
    max_queue_size: int = 1024  # requests queued per version; past it RESOURCE_EXHAUSTED

    def __post_init__(self) -> None:
        if self.max_queue_delay_us < 0:
            raise ConfigError("dynamic_batching.max_queue_delay_us", "must be >= 0")
        if any(b <= 0 for b in self.preferred_batch_sizes):
            raise ConfigError("dynamic_batching.preferred_batch_sizes", "sizes must be > 0")
        if self.max_queue_size <= 0:
            raise ConfigError("dynamic_batching.max_queue_size", "must be > 0")


@dataclass(frozen=True)
class VersionPolicy:
    """Which versions on disk are served: the latest N, or exactly the listed ones."""

    latest: int | None = 1  # serve the N highest versions (None when `specific` is set)
    specific: tuple[int, ...] = ()  # serve exactly these versions

    def __post_init__(self) -> None:
        if (self.latest is None) == (not self.specific):
            raise ConfigError("version_policy", "give exactly one of latest or specific")
        if self.latest is not None and self.latest <= 0:
            raise ConfigError("version_policy.latest.num_versions", "must be > 0")

    def select(self, available: Sequence[int]) -> tuple[int, ...]:
        ordered = sorted(set(available))
        if self.latest is not None:
            return tuple(ordered[-self.latest :])
        return tuple(v for v in ordered if v in self.specific)


@dataclass(frozen=True)
class ModelConfig:
    name: str
    backend: str
    inputs: tuple[TensorConfig, ...]
    outputs: tuple[TensorConfig, ...]
    max_batch_size: int = 0  # 0: the model takes no batch dimension of ours
    # None: no dynamic batching; each request runs on its own.
    dynamic_batching: DynamicBatching | None = None
    max_queue_size: int = 1024  # used when dynamic_batching is None
    instance_count: int = 1  # concurrent executions (one runtime session each)
    instance_kind: str = "auto"  # auto: GPU when the backend can use one, else CPU
    version_policy: VersionPolicy = field(default_factory=VersionPolicy)
    parameters: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ConfigError("name", f"invalid model name {self.name!r}")
        if self.backend not in BACKENDS:
            raise ConfigError("backend", f"{self.backend!r} is not one of {', '.join(BACKENDS)}")
        if not self.inputs:
            raise ConfigError("input", "a model needs at least one input")
        if not self.outputs:
            raise ConfigError("output", "a model needs at least one output")
        if self.max_batch_size < 0:
            raise ConfigError("max_batch_size", "must be >= 0")
        if self.instance_count <= 0:
            raise ConfigError("instance_group.count", "must be > 0")
        if self.instance_kind not in INSTANCE_KINDS:
            raise ConfigError("instance_group.kind", f"must be one of {INSTANCE_KINDS}")
        if self.dynamic_batching is not None:
            if self.max_batch_size == 0:
                raise ConfigError("dynamic_batching", "needs max_batch_size > 0")
            too_big = [
                b for b in self.dynamic_batching.preferred_batch_sizes if b > self.max_batch_size
            ]
            if too_big:
                raise ConfigError(
                    "dynamic_batching.preferred_batch_sizes",
                    f"{too_big} exceed max_batch_size {self.max_batch_size}",
                )

    @property
    def queue_limit(self) -> int:
        db = self.dynamic_batching
        return db.max_queue_size if db is not None else self.max_queue_size

    @property
    def platform(self) -> str:
        return PLATFORMS[self.backend]

    @property
    def model_file(self) -> str:
        return MODEL_FILES[self.backend]

    def full_shape(self, tensor: TensorConfig) -> tuple[int, ...]:
        """The tensor's shape as clients see it: with a leading -1 when the model batches."""
        return ((-1,) if self.max_batch_size > 0 else ()) + tensor.dims

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> ModelConfig:
        try:
            return cls._from_dict(raw)
        except ConfigError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ConfigError("config.json", f"malformed: {exc!r}") from exc

    @classmethod
    def _from_dict(cls, raw: Mapping[str, Any]) -> ModelConfig:
        def tensors(key: str) -> tuple[TensorConfig, ...]:
            items = raw.get(key, [])
            if not isinstance(items, list):
                raise ConfigError(key, "must be a list of tensors")
            return tuple(
                TensorConfig(str(t["name"]), str(t["datatype"]), tuple(int(d) for d in t["dims"]))
                for t in items
            )

        db_raw = raw.get("dynamic_batching")
        dynamic = None
        if db_raw is not None:
            dynamic = DynamicBatching(
                max_queue_delay_us=int(db_raw.get("max_queue_delay_us", 0)),
                preferred_batch_sizes=tuple(
                    int(b) for b in db_raw.get("preferred_batch_sizes", ())
                ),
                max_queue_size=int(db_raw.get("max_queue_size", 1024)),
            )
        group = raw.get("instance_group") or {}
        vp_raw = raw.get("version_policy") or {"latest": {"num_versions": 1}}
        if "specific" in vp_raw:
            policy = VersionPolicy(
                latest=None, specific=tuple(int(v) for v in vp_raw["specific"]["versions"])
            )
        elif "all" in vp_raw:
            policy = VersionPolicy(latest=1_000_000)
        else:
            policy = VersionPolicy(latest=int(vp_raw["latest"]["num_versions"]))
        params = raw.get("parameters") or {}
        return cls(
            name=str(raw["name"]),
            backend=str(raw["backend"]),
            inputs=tensors("input"),
            outputs=tensors("output"),
            max_batch_size=int(raw.get("max_batch_size", 0)),
            dynamic_batching=dynamic,
            max_queue_size=int(raw.get("max_queue_size", 1024)),
            instance_count=int(group.get("count", 1)),
            instance_kind=str(group.get("kind", "auto")),
            version_policy=policy,
            parameters={str(k): str(v) for k, v in params.items()},
        )

    @classmethod
    def load(cls, path: Path) -> ModelConfig:
        raw = read_json_object(path)
        try:
            config = cls.from_dict(raw)
        except ConfigError as exc:
            raise RepositoryError(f"{path}: {exc}") from exc
        if config.name != path.parent.name:
            raise RepositoryError(
                f"{path}: name {config.name!r} differs from its folder {path.parent.name!r}"
            )
        return config


def read_json_object(path: Path) -> dict[str, Any]:
    """A repository file that must hold one JSON object (config.json, generation.json);
    RepositoryError names the file when it cannot be read or holds something else."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RepositoryError(f"cannot read {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise RepositoryError(f"{path}: expected a JSON object")
    return raw


@dataclass(frozen=True)
class ServerConfig:
    """Everything `tandem serve` takes; each limit in one place, with its unit."""

    repository: Path
    host: str = "127.0.0.1"
    grpc_port: int = 8001
    http_port: int = 8000  # 0 disables the HTTP endpoint
    metrics_port: int = 8002  # 0 disables the metrics endpoint
    token: str | None = None  # bearer token every inference call must carry
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # set: clients must present a cert signed by it (mTLS)
    max_message_bytes: int = 64 * 1024 * 1024  # largest gRPC message accepted / sent
    max_elements: int = 1 << 28  # largest element count of one request tensor
    poll_interval_s: float = 0.0  # seconds between repository scans; 0: explicit load only
    drain_timeout_s: float = 30.0  # seconds SIGTERM waits for queued requests
    models: tuple[str, ...] = ()  # serve only these models (empty: every model found)

    def __post_init__(self) -> None:
        for name in ("grpc_port", "http_port", "metrics_port"):
            port = getattr(self, name)
            if not 0 <= port <= 65535:
                raise ConfigError(name.replace("_", "-"), f"port {port} out of range")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("tls", "--tls-cert and --tls-key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ConfigError("tls-client-ca", "mTLS needs --tls-cert and --tls-key too")
        if self.token is not None and not self.token:
            raise ConfigError("token", "must not be empty")
        if self.max_message_bytes <= 0:
            raise ConfigError("max-message-bytes", "must be > 0")
        if self.poll_interval_s < 0:
            raise ConfigError("poll-interval", "must be >= 0")
        if self.drain_timeout_s < 0:
            raise ConfigError("drain-timeout", "must be >= 0")
