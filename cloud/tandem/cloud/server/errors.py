"""Errors of the cloud inference server, under `tandem.errors.CloudServerError`::

    CloudServerError
    ├── ModelNotFoundError        unknown model or version              -> NOT_FOUND / 404
    ├── InvalidInputError         bad tensor (names it in .tensor)      -> INVALID_ARGUMENT / 400
    ├── QueueFullError            the model's queue is at max_queue_size -> RESOURCE_EXHAUSTED / 429
    ├── RequestTimeoutError       the request expired before compute    -> DEADLINE_EXCEEDED / 504
    ├── ModelUnavailableError     draining, or the version is unloading -> UNAVAILABLE / 503
    ├── BackendError              the runtime failed to load or run     -> INTERNAL / 500
    └── RepositoryError           the repository or a config is unusable

The protocol adapters map these to status codes in one place each; nothing from onnxruntime,
torch, openvino or grpc crosses this boundary.
"""

from __future__ import annotations

from tandem.errors import CloudServerError


class ModelNotFoundError(CloudServerError, LookupError):
    """The requested model, or the requested version of it, is not being served."""


class InvalidInputError(CloudServerError, ValueError):
    """A request tensor is wrong; `tensor` names it (empty when the request as a whole is)."""

    def __init__(self, message: str, tensor: str = "") -> None:
        self.tensor = tensor
        super().__init__(message)


class QueueFullError(CloudServerError):
    """The model's queue holds max_queue_size requests already; the request was refused."""


class RequestTimeoutError(CloudServerError, TimeoutError):
    """The request's timeout passed while it was queued; it was not computed."""


class ModelUnavailableError(CloudServerError):
    """The server is draining, or the model version stopped accepting requests."""


class BackendError(CloudServerError):
    """A runtime failed to load a model or to run a batch."""


class RepositoryError(CloudServerError):
    """The model repository, or a model's config.json, is unusable."""
