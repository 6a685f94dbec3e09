"""The protocol facts both adapters answer with: the server's name, version and extensions,
and the gRPC status each server error maps to (HTTP reports the same reason label)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version

import grpc

from .errors import (
    BackendError,
    InvalidInputError,
    ModelNotFoundError,
    ModelUnavailableError,
    QueueFullError,
    RequestTimeoutError,
)

SERVER_NAME = "tandem"
EXTENSIONS = ("model_repository", "parameters")

STATUS_OF: list[tuple[type[Exception], grpc.StatusCode]] = [
    (ModelNotFoundError, grpc.StatusCode.NOT_FOUND),
    (InvalidInputError, grpc.StatusCode.INVALID_ARGUMENT),
    (QueueFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (RequestTimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (ModelUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (BackendError, grpc.StatusCode.INTERNAL),
]


def status_of(exc: Exception) -> grpc.StatusCode:
    for kind, code in STATUS_OF:
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


def server_version() -> str:
    try:
        return package_version("tandem")
    except PackageNotFoundError:
        return "0"
