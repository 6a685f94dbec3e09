"""The gRPC adapter: `inference.GRPCInferenceService`, health, and the auth interceptor."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc import aio

from tandem.protos.inference import grpc_predict_v2_pb2 as pb
from tandem.protos.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from tandem.sdk.datatypes import CONTENTS_FIELDS

from .context import access_log, current_request, log_access, new_context, token_matches
from .errors import (
    BackendError,
    InvalidInputError,
    ModelNotFoundError,
    ModelUnavailableError,
    QueueFullError,
    RequestTimeoutError,
)
from .protocol import EXTENSIONS, SERVER_NAME, server_version, status_of
from .state import ServerState
from .tensors import (
    TensorHeader,
    check_headers,
    from_raw,
    from_values,
    output_datatypes,
    requested_outputs,
)

log = logging.getLogger(__name__)

# Health endpoints stay open without a token: Kubernetes probes cannot carry one.
UNAUTHENTICATED_METHODS = frozenset(
    {"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"}
)


def timeout_parameter(params: Any) -> float | None:
    """The request's `timeout` parameter (microseconds, as Triton's clients send it), in s."""
    if "timeout" not in params:
        return None
    param = params["timeout"]
    kind = param.WhichOneof("parameter_choice")
    if kind in ("int64_param", "uint64_param", "double_param"):
        value = float(getattr(param, kind))
    else:
        raise InvalidInputError("parameter 'timeout' must be a number of microseconds")
    if value <= 0:
        raise InvalidInputError("parameter 'timeout' must be > 0 microseconds")
    return value / 1e6


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, state: ServerState) -> None:
        self._state = state
        self._repo = state.repository
        self._metrics = state.metrics
        self._max_elements = state.config.max_elements

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._state.ready)

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.ModelReadyResponse:
        generation = self._state.generation
        if generation is not None and request.name in generation.models:
            return pb.ModelReadyResponse(ready=not self._state.draining)
        try:
            self._repo.get(request.name, request.version)
        except ModelNotFoundError as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        return pb.ModelReadyResponse(ready=not self._state.draining)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=server_version(), extensions=EXTENSIONS
        )

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.ModelMetadataResponse:
        generation = self._state.generation
        if generation is not None and request.name in generation.models:
            if request.version not in ("", "1"):
                await context.abort(
                    grpc.StatusCode.NOT_FOUND,
                    f"generative model {request.name!r} has version 1 only",
                )
            return _generative_metadata(generation.models[request.name].metadata())
        try:
            mv = self._repo.get(request.name, request.version)
            versions = self._repo.versions(request.name)
        except ModelNotFoundError as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        config = mv.config
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=config.name,
            versions=[str(v) for v in versions] if not request.version else [str(mv.version)],
            platform=config.platform,
            inputs=[
                tensor(name=t.name, datatype=t.datatype, shape=config.full_shape(t))
                for t in config.inputs
            ],
            outputs=[
                tensor(name=t.name, datatype=t.datatype, shape=config.full_shape(t))
                for t in config.outputs
            ],
        )

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.ModelInferResponse:
        metrics = self._metrics
        if current_request.get() is None and access_log.isEnabledFor(logging.INFO):
            new_context("grpc", "ModelInfer", context.peer())
        metrics.inflight.inc()
        mv = None
        rows = 0
        try:
            generation = self._state.generation
            if generation is not None and request.model_name in generation.models:
                from tandem.cloud.generation.grpc import verify_infer

                # While draining, the engine refuses new sessions; live ones go on to their end.
                return await verify_infer(generation, request)
            mv = self._repo.get(request.model_name, request.model_version)
            config = mv.config
            inputs = request.inputs
            headers = [TensorHeader(t.name, t.datatype, tuple(t.shape)) for t in inputs]
            rows = check_headers(config, headers, self._max_elements)
            raw = request.raw_input_contents
            arrays = {}
            if raw:
                if len(raw) != len(inputs):
                    raise InvalidInputError(
                        f"{len(raw)} raw_input_contents for {len(inputs)} inputs"
                    )
                for tensor, header, data in zip(inputs, headers, raw, strict=True):
                    if tensor.HasField("contents"):
                        raise InvalidInputError(
                            f"input {tensor.name!r}: both raw_input_contents and contents "
                            "are set; use one",
                            tensor.name,
                        )
                    arrays[header.name] = from_raw(header, data)
            else:
                for tensor, header in zip(inputs, headers, strict=True):
                    field = CONTENTS_FIELDS.get(header.datatype)
                    values = getattr(tensor.contents, field) if field is not None else None
                    if values is None:
                        raise InvalidInputError(
                            f"input {tensor.name!r}: datatype {header.datatype} travels only "
                            "in raw_input_contents",
                            tensor.name,
                        )
                    arrays[header.name] = from_values(header, values)
            wanted = requested_outputs(config, [o.name for o in request.outputs])
            timeout_s = timeout_parameter(request.parameters)
            if self._state.draining:
                raise ModelUnavailableError("server is draining")
            outputs = await mv.infer(arrays, rows, timeout_s)
            response = pb.ModelInferResponse(
                model_name=config.name, model_version=str(mv.version), id=request.id
            )
            datatypes = output_datatypes(config)
            for name in wanted:
                value = outputs[name]
                out = response.outputs.add()
                out.name = name
                out.datatype = datatypes[name]
                out.shape.extend(value.shape)
                response.raw_output_contents.append(value.tobytes())
            mv.metrics.success.inc()
            log_access("OK", config.name, str(mv.version), rows)
            return response
        except (
            ModelNotFoundError,
            InvalidInputError,
            QueueFullError,
            RequestTimeoutError,
            ModelUnavailableError,
            BackendError,
        ) as exc:
            code = status_of(exc)
            if mv is not None:
                mv.metrics.failure(code.name)
            else:
                metrics.failure_unversioned(request.model_name, code.name)
            log_access(code.name, request.model_name, request.model_version, rows, str(exc))
            await context.abort(code, str(exc))
            raise AssertionError("unreachable") from exc  # abort raises
        finally:
            metrics.inflight.dec()

    async def ModelStreamInfer(
        self, request_iterator: Any, context: aio.ServicerContext[Any, Any]
    ) -> Any:
        """Triton's streaming extension, served for generative models (docs/generation.md)."""
        generation = self._state.generation
        if generation is None:
            await context.abort(
                grpc.StatusCode.UNIMPLEMENTED, "ModelStreamInfer serves generative models only"
            )
        from tandem.cloud.generation.engine import SHUTTING_DOWN
        from tandem.cloud.generation.grpc import stream_infer

        if self._state.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
        try:
            async for response in stream_infer(generation, request_iterator):
                yield response
        except ModelUnavailableError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))


def _generative_metadata(meta: dict[str, Any]) -> pb.ModelMetadataResponse:
    """A generative model's metadata over gRPC: the V2 message has no parameters field, so the
    limits are on HTTP only (GET /v2/models/{name})."""
    tensor = pb.ModelMetadataResponse.TensorMetadata
    return pb.ModelMetadataResponse(
        name=meta["name"],
        versions=meta["versions"],
        platform=meta["platform"],
        inputs=[tensor(**t) for t in meta["inputs"]],
        outputs=[tensor(**t) for t in meta["outputs"]],
    )


class AuthInterceptor(aio.ServerInterceptor):  # type: ignore[misc]
    """Sets the request context, and refuses calls without the right bearer token."""

    def __init__(self, token: str | None) -> None:
        self._token = token

        async def deny(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token")

        async def deny_stream(requests: Any, context: aio.ServicerContext[Any, Any]) -> Any:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token")
            yield  # an async generator, as a streaming handler must be

        self._deny_unary = grpc.unary_unary_rpc_method_handler(deny)
        self._deny_stream = grpc.stream_stream_rpc_method_handler(deny_stream)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = details.method
        new_context("grpc", method, "")
        if self._token is None or method in UNAUTHENTICATED_METHODS:
            return await continuation(details)
        presented = None
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                presented = value if isinstance(value, str) else value.decode()
                break
        if token_matches(presented, self._token):
            return await continuation(details)
        log.warning("refused %s: missing or wrong token", method)
        if method.endswith("/ModelStreamInfer"):
            return self._deny_stream
        return self._deny_unary
