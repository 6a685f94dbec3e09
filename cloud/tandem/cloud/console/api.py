"""The console's routes on the fleet service's FastAPI app.

`mount_console(app, service)` adds:

- ``GET /console/`` the page, and ``/console/static/*`` its CSS and JavaScript;
- ``GET /console/api/stream`` server-sent events: every new fleet event, and a ``change``
  message naming what changed (fleet, rollouts, telemetry) so the page refreshes only that;
- read-only JSON views the page and the CLI share: the fleet with each device's last
  telemetry, a model with its versions and variants, a rollout's detail (stage cohorts,
  device states, gates, events) and its chart series, and telemetry queries per version and
  time window.

Every ``/console/api`` route takes the service's bearer token (``Authorization: Bearer``);
the event stream also takes ``?token=`` because a browser's EventSource cannot set headers.
The page itself carries no data and needs no token.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from importlib import resources
from typing import Annotated, Any, Protocol

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles

from tandem.cloud.fleet.engine import RolloutStatus
from tandem.cloud.fleet.errors import NotFoundError
from tandem.cloud.fleet.store import Store
from tandem.errors import FleetError
from tandem.sdk.tags import parse_tags

from . import views

log = logging.getLogger(__name__)

STATIC = resources.files("tandem.cloud.console") / "static"
# How often the event stream looks for changes (seconds), and sends a keep-alive comment.
POLL_S = 0.5
KEEPALIVE_S = 15.0
# One stream lasts at most this long (seconds); the browser reconnects by itself and resumes
# from the Last-Event-ID it saw, so a server shutdown never waits on an endless response.
STREAM_MAX_S = 30.0


class HasStore(Protocol):
    @property
    def store(self) -> Store: ...


def service_tokens(service: object) -> dict[str, str]:
    """The bearer tokens the service accepts (token -> user name): ``config.api_tokens``."""
    config = getattr(service, "config", None)
    tokens = getattr(config, "api_tokens", None) or getattr(service, "api_tokens", None)
    return {str(k): str(v) for k, v in dict(tokens or {}).items()}


def bearer_checker(
    tokens: Mapping[str, str] | None, *, allow_query: bool = False
) -> Callable[[Request], str]:
    """A FastAPI dependency: the user name of the request's bearer token, or 401. Like the
    REST API, with no tokens configured nothing is served."""
    known = {k.encode(): v for k, v in (tokens or {}).items()}

    def check(request: Request) -> str:
        given = ""
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            given = value.strip()
        elif allow_query:
            given = request.query_params.get("token", "")
        raw = given.encode()
        # Compare against every token so the time taken does not say which one was close.
        user = None
        for token, name in known.items():
            if hmac.compare_digest(raw, token):
                user = name
        if user is None:
            raise HTTPException(
                status_code=401,
                detail="missing or wrong bearer token",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return user

    return check


def _not_found(exc: NotFoundError) -> HTTPException:
    return HTTPException(status_code=404, detail=str(exc))


def console_router(
    store: Store,
    tokens: Mapping[str, str] | None,
    *,
    poll_s: float = POLL_S,
    max_s: float = STREAM_MAX_S,
) -> tuple[APIRouter, APIRouter]:
    """(the token-protected JSON and stream routes, the public page routes)."""
    api = APIRouter(
        prefix="/console/api",
        tags=["console"],
        dependencies=[Depends(bearer_checker(tokens, allow_query=False))],
        responses={401: {"description": "missing or wrong bearer token"}},
    )
    pages = APIRouter(include_in_schema=False)

    @pages.get("/console")
    def console_root() -> RedirectResponse:
        return RedirectResponse("/console/", status_code=307)

    @pages.get("/console/")
    def console_page() -> FileResponse:
        with resources.as_file(STATIC / "index.html") as path:
            return FileResponse(path, media_type="text/html; charset=utf-8")

    @api.get("/fleet", summary="Devices with presence, tags, runtimes, versions, telemetry")
    def fleet_view(
        tag: Annotated[list[str] | None, Query(description="key=value; repeat to AND")] = None,
        online: bool | None = None,
    ) -> dict[str, Any]:
        try:
            tags = parse_tags(tag or [])
        except ValueError as exc:
            raise HTTPException(status_code=422, detail=str(exc)) from exc
        return views.fleet(store, tags, online)

    @api.get("/models", summary="Every model with its versions")
    def models_view() -> list[dict[str, Any]]:
        return store.models()

    @api.get("/artifacts", summary="Signed artifact variants of a model (or one version)")
    def artifacts_view(
        model: str, version: Annotated[int | None, Query(ge=0, le=2**63 - 1)] = None
    ) -> list[dict[str, Any]]:
        return [a.to_json() for a in store.artifacts(model, version)]

    @api.get("/rollouts", summary="Rollouts, newest first")
    def rollouts_view(
        status: Annotated[list[RolloutStatus] | None, Query()] = None,
        model: str | None = None,
    ) -> list[dict[str, Any]]:
        wanted = [s.value for s in status] if status else None
        return [r.to_json() for r in store.rollouts(wanted, model)]

    @api.get("/models/{name}", summary="A model's versions, metrics and variants")
    def model_view(name: str) -> dict[str, Any]:
        try:
            return views.model(store, name)
        except NotFoundError as exc:
            raise _not_found(exc) from exc

    @api.get("/rollouts/{rollout_id}", summary="A rollout's stages, cohorts, gates, events")
    def rollout_view(rollout_id: str) -> dict[str, Any]:
        try:
            return views.rollout_detail(store, rollout_id)
        except NotFoundError as exc:
            raise _not_found(exc) from exc

    @api.get(
        "/rollouts/{rollout_id}/series",
        summary="Per-window telemetry of the new version against the baseline",
    )
    def rollout_series(rollout_id: str) -> dict[str, Any]:
        try:
            return views.rollout_series(store, rollout_id)
        except NotFoundError as exc:
            raise _not_found(exc) from exc

    @api.get("/telemetry", summary="Telemetry of one model version over a time window")
    def telemetry(
        model: str,
        version: Annotated[int, Query(ge=0, le=2**63 - 1)],
        since: Annotated[float | None, Query(ge=0, le=1e11, description="epoch seconds")] = None,
        until: Annotated[float | None, Query(ge=0, le=1e11, description="epoch seconds")] = None,
        device: Annotated[list[str] | None, Query(description="restrict to these devices")] = None,
        per_window: bool = False,
    ) -> dict[str, Any]:
        summary = views.telemetry_summary(
            store, model, version, since=since, until=until, device_ids=device
        )
        if per_window:
            summary["series"] = views.series(
                store, model, version, since=since, until=until, device_ids=device
            )
        return summary

    @pages.get(
        "/console/api/stream",
        dependencies=[Depends(bearer_checker(tokens, allow_query=True))],
    )
    async def stream(
        request: Request,
        since_id: Annotated[int | None, Query(ge=0)] = None,
    ) -> StreamingResponse:
        last_seen = request.headers.get("last-event-id", "")
        if since_id is None and last_seen.isdigit():
            since_id = int(last_seen)
        return StreamingResponse(
            _events(request, store, since_id, poll_s, max_s),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    return api, pages


def _sse(kind: str, data: Any, event_id: int | None = None) -> str:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


async def _events(
    request: Request, store: Store, since_id: int | None, poll_s: float, max_s: float
) -> AsyncIterator[str]:
    marks = await asyncio.to_thread(views.change_marks, store)
    last_id = marks["event_id"] if since_id is None else since_id
    yield "retry: 2000\n\n"
    yield _sse("hello", {"event_id": last_id})
    started = quiet_since = time.monotonic()
    while time.monotonic() - started < max_s and not await request.is_disconnected():
        try:
            events = await asyncio.to_thread(store.events, None, last_id, 200)
            new_marks = await asyncio.to_thread(views.change_marks, store)
        except FleetError:  # a failing poll (database busy) must not end the page's stream
            log.warning("console stream poll failed", exc_info=True)
            await asyncio.sleep(poll_s * 4)
            continue
        for e in events:
            last_id = e.id
            yield _sse("fleet-event", e.to_json(), e.id)
        changed = [k for k in ("fleet", "rollouts", "telemetry") if new_marks[k] != marks[k]]
        if events:
            changed.append("events")
        if changed:
            marks = new_marks
            yield _sse("change", {"what": changed, "event_id": last_id})
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= KEEPALIVE_S:
            quiet_since = time.monotonic()
            yield ": keep-alive\n\n"
        await asyncio.sleep(poll_s)


def mount_console(
    app: FastAPI,
    service: HasStore,
    *,
    tokens: Mapping[str, str] | None = None,
    poll_s: float = POLL_S,
) -> None:
    """Adds the console's page, static files, event stream and views to the fleet app.

    `tokens` (bearer token -> user name) default to the service's ``config.api_tokens``."""
    known = dict(tokens) if tokens is not None else service_tokens(service)
    api, pages = console_router(service.store, known, poll_s=poll_s)
    app.include_router(api)
    app.include_router(pages)
    with resources.as_file(STATIC) as folder:
        app.mount("/console/static", StaticFiles(directory=folder), name="console-static")

    @app.get("/", include_in_schema=False)
    def root() -> Response:
        return RedirectResponse("/console/", status_code=307)
