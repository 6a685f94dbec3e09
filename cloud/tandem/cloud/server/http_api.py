"""The HTTP/REST adapter: the Open Inference Protocol's endpoints with JSON tensors, plus
Triton's model-repository extension (index, load, unload)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from tandem.errors import CloudServerError, TandemError

from .context import log_access, new_context, token_matches
from .errors import (
    BackendError,
    InvalidInputError,
    ModelNotFoundError,
    ModelUnavailableError,
    QueueFullError,
    RepositoryError,
    RequestTimeoutError,
)
from .protocol import EXTENSIONS, SERVER_NAME, server_version, status_of
from .state import ServerState
from .tensors import TensorHeader, check_headers, from_values, output_datatypes, requested_outputs

if TYPE_CHECKING:
    from starlette.middleware.base import RequestResponseEndpoint

HTTP_STATUS: list[tuple[type[Exception], int]] = [
    (ModelNotFoundError, 404),
    (InvalidInputError, 400),
    (QueueFullError, 429),
    (RequestTimeoutError, 504),
    (ModelUnavailableError, 503),
    (RepositoryError, 400),
    (BackendError, 500),
]


def http_status_of(exc: Exception) -> int:
    for kind, status in HTTP_STATUS:
        if isinstance(exc, kind):
            return status
    return 500


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="tandem inference server", docs_url=None, redoc_url=None, openapi_url=None)
    repo = state.repository
    token = state.config.token
    max_elements = state.config.max_elements

    @app.middleware("http")
    async def authenticate(request: Request, call_next: RequestResponseEndpoint) -> Response:
        peer = f"{request.client.host}:{request.client.port}" if request.client else ""
        new_context("http", f"{request.method} {request.url.path}", peer)
        path = request.url.path
        if (
            token is not None
            and not path.startswith("/v2/health/")
            and not token_matches(request.headers.get("authorization"), token)
        ):
            log_access("UNAUTHENTICATED")
            return _error(401, "missing or wrong token")
        return await call_next(request)

    @app.get("/v2")
    async def server_metadata() -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": server_version(), "extensions": list(EXTENSIONS)}

    @app.get("/v2/health/live")
    async def live() -> Response:
        return Response(status_code=200)

    @app.get("/v2/health/ready")
    async def ready() -> Response:
        return Response(status_code=200 if state.ready else 503)

    def metadata(name: str, version: str) -> Response:
        if state.generation is not None and name in state.generation.models:
            if version not in ("", "1"):
                return _error(404, f"generative model {name!r} has version 1 only")
            return JSONResponse(state.generation.models[name].metadata())
        try:
            mv = repo.get(name, version)
            versions = repo.versions(name) if not version else [mv.version]
        except ModelNotFoundError as exc:
            return _error(404, str(exc))
        config = mv.config

        def tensor(t: Any) -> dict[str, Any]:
            return {"name": t.name, "datatype": t.datatype, "shape": list(config.full_shape(t))}

        return JSONResponse(
            {
                "name": config.name,
                "versions": [str(v) for v in versions],
                "platform": config.platform,
                "inputs": [tensor(t) for t in config.inputs],
                "outputs": [tensor(t) for t in config.outputs],
            }
        )

    @app.get("/v2/models/{name}")
    async def model_metadata(name: str) -> Response:
        return metadata(name, "")

    @app.get("/v2/models/{name}/versions/{version}")
    async def model_version_metadata(name: str, version: str) -> Response:
        return metadata(name, version)

    def model_ready(name: str, version: str) -> Response:
        if state.generation is not None and name in state.generation.models:
            return Response(status_code=503 if state.draining else 200)
        try:
            repo.get(name, version)
        except ModelNotFoundError as exc:
            return _error(404, str(exc))
        return Response(status_code=503 if state.draining else 200)

    @app.get("/v2/models/{name}/ready")
    async def ready_latest(name: str) -> Response:
        return model_ready(name, "")

    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def ready_version(name: str, version: str) -> Response:
        return model_ready(name, version)

    async def infer(name: str, version: str, request: Request) -> Response:
        state.metrics.inflight.inc()
        mv = None
        rows = 0
        try:
            mv = repo.get(name, version)
            try:
                body = json.loads(await request.body())
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise InvalidInputError(f"request body is not JSON: {exc}") from exc
            if not isinstance(body, dict) or not isinstance(body.get("inputs"), list):
                raise InvalidInputError("request body needs an 'inputs' list")
            config = mv.config
            headers = []
            for item in body["inputs"]:
                try:
                    headers.append(
                        TensorHeader(
                            str(item["name"]),
                            str(item["datatype"]),
                            tuple(int(d) for d in item["shape"]),
                        )
                    )
                except (KeyError, TypeError, ValueError) as exc:
                    raise InvalidInputError(
                        f"each input needs name, datatype and shape: {exc!r}",
                        str(item.get("name", "")) if isinstance(item, dict) else "",
                    ) from exc
            rows = check_headers(config, headers, max_elements)
            arrays = {}
            for item, header in zip(body["inputs"], headers, strict=True):
                if "data" not in item:
                    raise InvalidInputError(f"input {header.name!r} has no data", header.name)
                arrays[header.name] = from_values(header, item["data"])
            wanted = requested_outputs(config, [str(o["name"]) for o in body.get("outputs") or []])
            timeout_s = None
            params = body.get("parameters") or {}
            if "timeout" in params:
                try:
                    timeout_s = float(params["timeout"]) / 1e6
                except (TypeError, ValueError) as exc:
                    raise InvalidInputError("parameter 'timeout' must be microseconds") from exc
                if timeout_s <= 0:
                    raise InvalidInputError("parameter 'timeout' must be > 0 microseconds")
            if state.draining:
                raise ModelUnavailableError("server is draining")
            outputs = await mv.infer(arrays, rows, timeout_s)
            datatypes = output_datatypes(config)
            result: dict[str, Any] = {
                "model_name": config.name,
                "model_version": str(mv.version),
                "outputs": [
                    {
                        "name": n,
                        "datatype": datatypes[n],
                        "shape": list(outputs[n].shape),
                        "data": np.asarray(outputs[n]).ravel().tolist(),
                    }
                    for n in wanted
                ],
            }
            if "id" in body:
                result["id"] = body["id"]
            mv.metrics.success.inc()
            log_access("OK", config.name, str(mv.version), rows)
            return JSONResponse(result)
        except CloudServerError as exc:
            status = http_status_of(exc)
            reason = status_of(exc).name  # the same reason label as over gRPC
            if mv is not None:
                mv.metrics.failure(reason)
            else:
                state.metrics.failure_unversioned(name, reason)
            log_access(reason, name, version, rows, str(exc))
            return _error(status, str(exc))
        finally:
            state.metrics.inflight.dec()

    @app.post("/v2/models/{name}/infer")
    async def infer_latest(name: str, request: Request) -> Response:
        return await infer(name, "", request)

    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def infer_version(name: str, version: str, request: Request) -> Response:
        return await infer(name, version, request)

    @app.post("/v2/repository/index")
    async def repository_index() -> list[dict[str, str]]:
        return repo.index()

    @app.post("/v2/repository/models/{name}/load")
    async def load(name: str) -> Response:
        try:
            versions = await repo.load(name)
        except TandemError as exc:
            return _error(http_status_of(exc), str(exc))
        return JSONResponse({"name": name, "versions": [str(v) for v in versions]})

    @app.post("/v2/repository/models/{name}/unload")
    async def unload(name: str) -> Response:
        try:
            await repo.unload(name)
        except TandemError as exc:
            return _error(http_status_of(exc), str(exc))
        return Response(status_code=200)

    if state.generation is not None:
        from tandem.cloud.generation.http import mount

        mount(app, state.generation, lambda: state.draining)
    return app
