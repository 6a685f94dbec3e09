"""A thin REST layer (FastAPI) over `FleetService`, with bearer-token authentication.

Every route maps to one service method; the console (issue 6) mounts itself on this app
in `tandem.cloud.console.app`, one layer up, so fleet never imports the console. Errors map
to status codes in one place: NotFoundError 404, ConflictError 409, ConfigError 422,
ImportRefusedError 400, other FleetError 500 with the message.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from tandem.errors import ConfigError, FleetError
from tandem.sdk.tags import parse_tags

from . import engine as eng
from .errors import ConflictError, ImportRefusedError, NotFoundError
from .service import FleetService, RolloutRequest

API = "/api/v1"

# Numbers the store can hold: versions and ids are 64-bit signed in the database, times are
# Unix seconds turned into 64-bit milliseconds. Past these a request is the caller's mistake
# (422), not a 500 from an overflowing database parameter.
INT64_MAX = 2**63 - 1
MAX_UNIX_S = 1e11  # the year 5138
Version = Annotated[int, Field(ge=1, le=INT64_MAX)]


class _Strict(BaseModel):
    """A request body that refuses fields it does not know (422 naming them) instead of
    dropping them: a misspelt or newer knob must never be silently ignored."""

    model_config = ConfigDict(extra="forbid")


class GateIn(_Strict):
    metric: str
    threshold: float
    min_samples: int = 1
    relative: bool = False
    min_effect: float = 0.02


class StageIn(_Strict):
    percent: float
    min_soak_s: float = 0.0
    gates: list[GateIn] = Field(default_factory=list)
    max_wait_s: float = 600.0


class RolloutIn(_Strict):
    model: str
    version: Version
    stages: list[StageIn]
    selector: dict[str, str] = Field(default_factory=dict)
    baseline_version: Version | None = None
    on_gate_failure: str = "abort"
    device_timeout_s: float = 600.0
    max_assignments_per_s: float = 0.0
    false_abort_rate: float = 0.01


class ImportIn(BaseModel):
    zoo: str  # a zoo folder on the service's machine


class DesiredIn(BaseModel):
    model: str
    version: Version | None
    variant: str | None = None


_bearer = HTTPBearer(auto_error=False)


def _actor(
    request: Request,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    """The user name behind the bearer token (the actor recorded in events), or 401."""
    tokens: Mapping[str, str] = request.app.state.tokens
    if creds is not None:
        for token, user in tokens.items():
            if hmac.compare_digest(creds.credentials.encode(), token.encode()):
                return user
    raise HTTPException(
        401, "missing or invalid bearer token", headers={"WWW-Authenticate": "Bearer"}
    )


User = Annotated[str, Depends(_actor)]


def create_app(service: FleetService, tokens: Mapping[str, str] | None = None) -> FastAPI:
    """The REST app; `tokens` maps bearer token -> user name (the actor in events)."""
    tokens = dict(tokens if tokens is not None else service.config.api_tokens)
    app = FastAPI(title="tandem fleet", version="1")
    app.state.service = service
    app.state.tokens = tokens

    @app.exception_handler(FleetError)
    async def _fleet_error(_request: Request, exc: FleetError) -> JSONResponse:
        status = 500
        if isinstance(exc, NotFoundError):
            status = 404
        elif isinstance(exc, ConflictError):
            status = 409
        elif isinstance(exc, ImportRefusedError):
            status = 400
        return JSONResponse({"detail": str(exc)}, status_code=status)

    @app.exception_handler(ConfigError)
    async def _config_error(_request: Request, exc: ConfigError) -> JSONResponse:
        return JSONResponse({"detail": str(exc), "field": exc.field}, status_code=422)

    async def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        # The service is synchronous (SQLAlchemy sessions): keep the event loop free.
        return await run_in_threadpool(fn, *args, **kwargs)

    @app.get(f"{API}/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(f"{API}/leader")
    async def leader(_user: User) -> dict[str, Any]:
        """Which replica turns the rollout engine, as this replica last saw it."""
        return service.leader.status()

    @app.get(f"{API}/devices")
    async def devices(
        _user: User,
        tag: Annotated[list[str] | None, Query(description="key=value, repeatable")] = None,
        online: bool | None = None,
    ) -> list[dict[str, Any]]:
        tags = parse_tags(tag or [])  # a ConfigError: 422 naming the tag
        return [d.to_json() for d in await call(service.devices, tags, online)]

    @app.get(f"{API}/devices/{{device_id}}")
    async def device(device_id: str, _user: User) -> dict[str, Any]:
        result: dict[str, Any] = await call(service.device, device_id)
        return result

    @app.put(f"{API}/devices/{{device_id}}/desired")
    async def set_desired(device_id: str, body: DesiredIn, user: User) -> dict[str, Any]:
        await call(service.set_desired, device_id, body.model, body.version, user, body.variant)
        result: dict[str, Any] = await call(service.device, device_id)
        return result

    @app.get(f"{API}/fleet-key")
    async def fleet_key(_user: User) -> dict[str, str]:
        """The public half of the key that signs desired states: what `tandem agent run
        --fleet-key` is provisioned with."""
        key = service.fleet_key
        return {"keyid": key.keyid, "public_key_pem": key.public_pem.decode()}

    @app.get(f"{API}/models")
    async def models(_user: User) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await call(service.models)
        return result

    @app.get(f"{API}/models/{{model}}/versions")
    async def versions(model: str, _user: User) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await call(service.versions, model)
        return result

    @app.post(f"{API}/models/import")
    async def import_zoo(body: ImportIn, _user: User) -> dict[str, Any]:
        imported = await call(service.import_zoo, Path(body.zoo))
        return {"imported": [{"model": m, "version": v, "variant": x} for m, v, x in imported]}

    @app.get(f"{API}/rollouts")
    async def rollouts(
        _user: User, status: Annotated[list[str] | None, Query()] = None
    ) -> list[dict[str, Any]]:
        return [r.to_json() for r in await call(service.rollouts, status)]

    @app.post(f"{API}/rollouts", status_code=201)
    async def create_rollout(body: RolloutIn, user: User) -> dict[str, Any]:
        request = RolloutRequest.from_json(body.model_dump())
        r = await call(service.create_rollout, request, user)
        result: dict[str, Any] = await call(service.rollout, r.rollout_id)
        return result

    @app.get(f"{API}/rollouts/{{rollout_id}}")
    async def rollout(rollout_id: str, _user: User) -> dict[str, Any]:
        result: dict[str, Any] = await call(service.rollout, rollout_id)
        return result

    @app.get(f"{API}/rollouts/{{rollout_id}}/devices")
    async def rollout_devices(rollout_id: str, _user: User) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await call(service.rollout_devices, rollout_id)
        return result

    @app.get(f"{API}/rollouts/{{rollout_id}}/events")
    async def rollout_events(
        rollout_id: str,
        _user: User,
        since_id: Annotated[int, Query(ge=0, le=INT64_MAX)] = 0,
        limit: int = Query(1000, ge=1, le=10000),
    ) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await call(service.events, rollout_id, since_id, limit)
        return result

    def _command(cmd: eng.Command) -> Callable[[str, str], Awaitable[dict[str, Any]]]:
        async def run(rollout_id: str, user: User) -> dict[str, Any]:
            await call(service.command, rollout_id, cmd, user)
            result: dict[str, Any] = await call(service.rollout, rollout_id)
            return result

        run.__name__ = f"{cmd.value}_rollout"
        return run

    for cmd in eng.Command:
        app.post(f"{API}/rollouts/{{rollout_id}}/{cmd.value}")(_command(cmd))

    @app.get(f"{API}/telemetry")
    async def telemetry(
        _user: User,
        model: str,
        version: Annotated[int | None, Query(ge=0, le=INT64_MAX)] = None,
        since: Annotated[float | None, Query(ge=0, le=MAX_UNIX_S)] = None,
        until: Annotated[float | None, Query(ge=0, le=MAX_UNIX_S)] = None,
    ) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await call(
            service.telemetry, model, version, since=since, until=until
        )
        return result

    return app
