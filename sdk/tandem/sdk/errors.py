"""tandem.sdk's own error subclasses, under the `SDKError` branch of `tandem.errors`.

SDKError
├── InputError
├── RuntimeBackendError
│   └── ReferenceMismatchError   a runtime's outputs disagree with the artifact's reference
├── NoLocalModelError
├── CloudError
│   ├── CloudUnavailableError
│   │   └── CircuitOpenError      every endpoint's breaker is open
│   ├── CloudTimeoutError
│   └── CloudRejectedError
│       └── CloudInputError       the server refused the inputs (also an InputError)
├── DeadlineExceededError         neither path answered within the deadline policy's budget
└── ClientClosedError
"""

from __future__ import annotations

from tandem.errors import (
    ClientClosedError,
    CloudError,
    CloudRejectedError,
    CloudTimeoutError,
    CloudUnavailableError,
    ConfigError,
    InputError,
    MissingDependencyError,
    NoLocalModelError,
    RuntimeBackendError,
    SDKError,
)

__all__ = [
    "CircuitOpenError",
    "ClientClosedError",
    "CloudError",
    "CloudInputError",
    "CloudRejectedError",
    "CloudTimeoutError",
    "CloudUnavailableError",
    "ConfigError",
    "DeadlineExceededError",
    "InputError",
    "MissingDependencyError",
    "NoLocalModelError",
    "ReferenceMismatchError",
    "RuntimeBackendError",
    "SDKError",
]


class ReferenceMismatchError(RuntimeBackendError):
    """A runtime's outputs on the reference inputs disagree with the reference outputs."""


class CircuitOpenError(CloudUnavailableError):
    """No endpoint may be called: every circuit breaker is open."""


class CloudInputError(CloudRejectedError, InputError):
    """The cloud tier refused the request's inputs (INVALID_ARGUMENT)."""


class DeadlineExceededError(SDKError, TimeoutError):
    """Neither path answered within the deadline policy's budget."""
