from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SignedManifest(_message.Message):
    __slots__ = ("signed", "signatures")
    SIGNED_FIELD_NUMBER: _ClassVar[int]
    SIGNATURES_FIELD_NUMBER: _ClassVar[int]
    signed: bytes
    signatures: _containers.RepeatedCompositeFieldContainer[Signature]
    def __init__(self, signed: _Optional[bytes] = ..., signatures: _Optional[_Iterable[_Union[Signature, _Mapping]]] = ...) -> None: ...

class Signature(_message.Message):
    __slots__ = ("keyid", "sig")
    KEYID_FIELD_NUMBER: _ClassVar[int]
    SIG_FIELD_NUMBER: _ClassVar[int]
    keyid: str
    sig: bytes
    def __init__(self, keyid: _Optional[str] = ..., sig: _Optional[bytes] = ...) -> None: ...

class DesiredState(_message.Message):
    __slots__ = ("device_id", "revision", "models", "signed")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    SIGNED_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    revision: int
    models: _containers.RepeatedCompositeFieldContainer[DesiredModel]
    signed: SignedDesiredState
    def __init__(self, device_id: _Optional[str] = ..., revision: _Optional[int] = ..., models: _Optional[_Iterable[_Union[DesiredModel, _Mapping]]] = ..., signed: _Optional[_Union[SignedDesiredState, _Mapping]] = ...) -> None: ...

class SignedDesiredState(_message.Message):
    __slots__ = ("payload", "signatures")
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    SIGNATURES_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    signatures: _containers.RepeatedCompositeFieldContainer[Signature]
    def __init__(self, payload: _Optional[bytes] = ..., signatures: _Optional[_Iterable[_Union[Signature, _Mapping]]] = ...) -> None: ...

class DesiredStatePayload(_message.Message):
    __slots__ = ("device_id", "revision", "issued_at_ms", "models")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    ISSUED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    revision: int
    issued_at_ms: int
    models: _containers.RepeatedCompositeFieldContainer[DesiredModelRef]
    def __init__(self, device_id: _Optional[str] = ..., revision: _Optional[int] = ..., issued_at_ms: _Optional[int] = ..., models: _Optional[_Iterable[_Union[DesiredModelRef, _Mapping]]] = ...) -> None: ...

class DesiredModelRef(_message.Message):
    __slots__ = ("model", "version", "variant", "manifest_sha256", "rollout_id", "delta_base_version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_SHA256_FIELD_NUMBER: _ClassVar[int]
    ROLLOUT_ID_FIELD_NUMBER: _ClassVar[int]
    DELTA_BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    variant: str
    manifest_sha256: str
    rollout_id: str
    delta_base_version: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., variant: _Optional[str] = ..., manifest_sha256: _Optional[str] = ..., rollout_id: _Optional[str] = ..., delta_base_version: _Optional[int] = ...) -> None: ...

class DesiredModel(_message.Message):
    __slots__ = ("model", "version", "variant", "manifest", "rollout_id", "delta_base_version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    ROLLOUT_ID_FIELD_NUMBER: _ClassVar[int]
    DELTA_BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    variant: str
    manifest: SignedManifest
    rollout_id: str
    delta_base_version: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., variant: _Optional[str] = ..., manifest: _Optional[_Union[SignedManifest, _Mapping]] = ..., rollout_id: _Optional[str] = ..., delta_base_version: _Optional[int] = ...) -> None: ...

class Presence(_message.Message):
    __slots__ = ("device_id", "online", "agent_version", "tags", "hardware", "runtimes", "active_versions", "timestamp_ms")
    class TagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class ActiveVersionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    ONLINE_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    HARDWARE_FIELD_NUMBER: _ClassVar[int]
    RUNTIMES_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    online: bool
    agent_version: str
    tags: _containers.ScalarMap[str, str]
    hardware: str
    runtimes: _containers.RepeatedScalarFieldContainer[str]
    active_versions: _containers.ScalarMap[str, int]
    timestamp_ms: int
    def __init__(self, device_id: _Optional[str] = ..., online: _Optional[bool] = ..., agent_version: _Optional[str] = ..., tags: _Optional[_Mapping[str, str]] = ..., hardware: _Optional[str] = ..., runtimes: _Optional[_Iterable[str]] = ..., active_versions: _Optional[_Mapping[str, int]] = ..., timestamp_ms: _Optional[int] = ...) -> None: ...

class DeviceReport(_message.Message):
    __slots__ = ("report_id", "device_id", "kind", "model", "version", "variant", "rollout_id", "reason", "bytes_received", "bytes_total", "timestamp_ms")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[DeviceReport.Kind]
        PROGRESS: _ClassVar[DeviceReport.Kind]
        VERIFIED: _ClassVar[DeviceReport.Kind]
        ACTIVATED: _ClassVar[DeviceReport.Kind]
        HEALTHY: _ClassVar[DeviceReport.Kind]
        FAILED: _ClassVar[DeviceReport.Kind]
        REFUSED: _ClassVar[DeviceReport.Kind]
        ROLLED_BACK: _ClassVar[DeviceReport.Kind]
    KIND_UNSPECIFIED: DeviceReport.Kind
    PROGRESS: DeviceReport.Kind
    VERIFIED: DeviceReport.Kind
    ACTIVATED: DeviceReport.Kind
    HEALTHY: DeviceReport.Kind
    FAILED: DeviceReport.Kind
    REFUSED: DeviceReport.Kind
    ROLLED_BACK: DeviceReport.Kind
    REPORT_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    ROLLOUT_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    report_id: str
    device_id: str
    kind: DeviceReport.Kind
    model: str
    version: int
    variant: str
    rollout_id: str
    reason: str
    bytes_received: int
    bytes_total: int
    timestamp_ms: int
    def __init__(self, report_id: _Optional[str] = ..., device_id: _Optional[str] = ..., kind: _Optional[_Union[DeviceReport.Kind, str]] = ..., model: _Optional[str] = ..., version: _Optional[int] = ..., variant: _Optional[str] = ..., rollout_id: _Optional[str] = ..., reason: _Optional[str] = ..., bytes_received: _Optional[int] = ..., bytes_total: _Optional[int] = ..., timestamp_ms: _Optional[int] = ...) -> None: ...

class ReportAck(_message.Message):
    __slots__ = ("device_id", "report_ids")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    REPORT_IDS_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    report_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, device_id: _Optional[str] = ..., report_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class LogHistogram(_message.Message):
    __slots__ = ("min_value", "growth", "counts", "underflow", "count", "sum", "max")
    MIN_VALUE_FIELD_NUMBER: _ClassVar[int]
    GROWTH_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    UNDERFLOW_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    SUM_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    min_value: float
    growth: float
    counts: _containers.RepeatedScalarFieldContainer[int]
    underflow: int
    count: int
    sum: float
    max: float
    def __init__(self, min_value: _Optional[float] = ..., growth: _Optional[float] = ..., counts: _Optional[_Iterable[int]] = ..., underflow: _Optional[int] = ..., count: _Optional[int] = ..., sum: _Optional[float] = ..., max: _Optional[float] = ...) -> None: ...

class TelemetrySummary(_message.Message):
    __slots__ = ("summary_id", "device_id", "model", "version", "interval_start_ms", "interval_end_ms", "counts", "latency_local_ms", "latency_cloud_ms", "confidence_buckets", "requests", "fallbacks", "cache_hits", "errors", "shadow_sampled", "shadow_agreed", "runtime", "confidence_sum", "generations", "generation_errors", "generated_tokens", "generation_seconds", "drafted", "accepted", "escalations", "ttft_ms", "ms_per_token")
    class CountsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    SUMMARY_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_START_MS_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_END_MS_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_LOCAL_MS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_CLOUD_MS_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_BUCKETS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    FALLBACKS_FIELD_NUMBER: _ClassVar[int]
    CACHE_HITS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    SHADOW_SAMPLED_FIELD_NUMBER: _ClassVar[int]
    SHADOW_AGREED_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_SUM_FIELD_NUMBER: _ClassVar[int]
    GENERATIONS_FIELD_NUMBER: _ClassVar[int]
    GENERATION_ERRORS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GENERATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DRAFTED_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    ESCALATIONS_FIELD_NUMBER: _ClassVar[int]
    TTFT_MS_FIELD_NUMBER: _ClassVar[int]
    MS_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    summary_id: str
    device_id: str
    model: str
    version: int
    interval_start_ms: int
    interval_end_ms: int
    counts: _containers.ScalarMap[str, int]
    latency_local_ms: LogHistogram
    latency_cloud_ms: LogHistogram
    confidence_buckets: _containers.RepeatedScalarFieldContainer[int]
    requests: int
    fallbacks: int
    cache_hits: int
    errors: int
    shadow_sampled: int
    shadow_agreed: int
    runtime: str
    confidence_sum: float
    generations: int
    generation_errors: int
    generated_tokens: int
    generation_seconds: float
    drafted: int
    accepted: int
    escalations: int
    ttft_ms: LogHistogram
    ms_per_token: LogHistogram
    def __init__(self, summary_id: _Optional[str] = ..., device_id: _Optional[str] = ..., model: _Optional[str] = ..., version: _Optional[int] = ..., interval_start_ms: _Optional[int] = ..., interval_end_ms: _Optional[int] = ..., counts: _Optional[_Mapping[str, int]] = ..., latency_local_ms: _Optional[_Union[LogHistogram, _Mapping]] = ..., latency_cloud_ms: _Optional[_Union[LogHistogram, _Mapping]] = ..., confidence_buckets: _Optional[_Iterable[int]] = ..., requests: _Optional[int] = ..., fallbacks: _Optional[int] = ..., cache_hits: _Optional[int] = ..., errors: _Optional[int] = ..., shadow_sampled: _Optional[int] = ..., shadow_agreed: _Optional[int] = ..., runtime: _Optional[str] = ..., confidence_sum: _Optional[float] = ..., generations: _Optional[int] = ..., generation_errors: _Optional[int] = ..., generated_tokens: _Optional[int] = ..., generation_seconds: _Optional[float] = ..., drafted: _Optional[int] = ..., accepted: _Optional[int] = ..., escalations: _Optional[int] = ..., ttft_ms: _Optional[_Union[LogHistogram, _Mapping]] = ..., ms_per_token: _Optional[_Union[LogHistogram, _Mapping]] = ...) -> None: ...

class TelemetryBatch(_message.Message):
    __slots__ = ("summaries",)
    SUMMARIES_FIELD_NUMBER: _ClassVar[int]
    summaries: _containers.RepeatedCompositeFieldContainer[TelemetrySummary]
    def __init__(self, summaries: _Optional[_Iterable[_Union[TelemetrySummary, _Mapping]]] = ...) -> None: ...

class ArtifactChunk(_message.Message):
    __slots__ = ("transfer_id", "model", "version", "variant", "file", "offset", "data", "total_size", "sha256", "is_delta", "delta_base_version")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    FILE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    IS_DELTA_FIELD_NUMBER: _ClassVar[int]
    DELTA_BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    model: str
    version: int
    variant: str
    file: str
    offset: int
    data: bytes
    total_size: int
    sha256: str
    is_delta: bool
    delta_base_version: int
    def __init__(self, transfer_id: _Optional[str] = ..., model: _Optional[str] = ..., version: _Optional[int] = ..., variant: _Optional[str] = ..., file: _Optional[str] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., total_size: _Optional[int] = ..., sha256: _Optional[str] = ..., is_delta: _Optional[bool] = ..., delta_base_version: _Optional[int] = ...) -> None: ...

class ChunkRequest(_message.Message):
    __slots__ = ("transfer_id", "device_id", "model", "version", "variant", "file", "offset", "accept_delta", "have_version")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    FILE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    ACCEPT_DELTA_FIELD_NUMBER: _ClassVar[int]
    HAVE_VERSION_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    device_id: str
    model: str
    version: int
    variant: str
    file: str
    offset: int
    accept_delta: bool
    have_version: int
    def __init__(self, transfer_id: _Optional[str] = ..., device_id: _Optional[str] = ..., model: _Optional[str] = ..., version: _Optional[int] = ..., variant: _Optional[str] = ..., file: _Optional[str] = ..., offset: _Optional[int] = ..., accept_delta: _Optional[bool] = ..., have_version: _Optional[int] = ...) -> None: ...
