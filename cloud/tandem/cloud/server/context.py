"""Per-request context, set by the protocol adapters' auth step and read by the access log."""

from __future__ import annotations

import contextvars
import hmac
import itertools
import json
import logging
import time
from dataclasses import dataclass

access_log = logging.getLogger("tandem.cloud.server.access")

_ids = itertools.count(1)


@dataclass(slots=True)
class RequestContext:
    request_id: str
    protocol: str  # "grpc" or "http"
    method: str
    peer: str
    started: float  # time.perf_counter()


current_request: contextvars.ContextVar[RequestContext | None] = contextvars.ContextVar(
    "tandem_request", default=None
)


def new_context(protocol: str, method: str, peer: str) -> RequestContext:
    ctx = RequestContext(f"{protocol}-{next(_ids)}", protocol, method, peer, time.perf_counter())
    current_request.set(ctx)
    return ctx


def token_matches(presented: str | None, expected: str) -> bool:
    """Compares an `authorization` value ("Bearer <token>") in constant time."""
    if presented is None:
        return False
    scheme, _, value = presented.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(value.strip().encode(), expected.encode())


def log_access(
    status: str, model: str = "", version: str = "", rows: int = 0, detail: str = ""
) -> None:
    """One structured line per request: JSON in the message, fields also as `extra`."""
    if not access_log.isEnabledFor(logging.INFO):
        return
    ctx = current_request.get()
    record = {
        "request_id": ctx.request_id if ctx else "",
        "protocol": ctx.protocol if ctx else "",
        "method": ctx.method if ctx else "",
        "peer": ctx.peer if ctx else "",
        "model": model,
        "version": version,
        "rows": rows,
        "status": status,
        "duration_ms": round((time.perf_counter() - ctx.started) * 1e3, 3) if ctx else 0.0,
    }
    if detail:
        record["detail"] = detail
    access_log.info(json.dumps(record, separators=(",", ":")), extra={"access": record})
