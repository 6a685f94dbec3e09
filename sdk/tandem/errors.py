"""The root of tandem's error tree.

Every error tandem raises derives from `TandemError`; each component adds its own branch,
and exceptions from third-party libraries (onnxruntime, grpc, paho, SQLAlchemy) are
translated at the component boundary, `raise ... from exc`, so callers only ever catch ours::

    TandemError
    ├── ConfigError                 a config value is wrong (names the field and why)
    ├── MissingDependencyError      an optional extra is not installed (names the extra)
    ├── ArtifactError               a model artifact is unusable
    │   ├── SignatureError          bad, missing or untrusted signature
    │   ├── DigestError             sha256 or size mismatch
    │   ├── ManifestExpiredError    manifest past its expiry
    │   └── RollbackError           version lower than one already accepted
    ├── SDKError                    tandem.sdk
    │   ├── InputError              wrong tensor name, dtype or shape (names the tensor)
    │   ├── RuntimeBackendError     a local runtime failed to load or run
    │   ├── NoLocalModelError       no local model is available
    │   ├── CloudError              the cloud tier failed
    │   │   ├── CloudUnavailableError   unreachable, or the breaker is open
    │   │   ├── CloudTimeoutError       deadline exceeded
    │   │   └── CloudRejectedError      the server refused the request (status in .code)
    │   └── ClientClosedError       the client was used after close()
    ├── AgentError                  tandem.agent
    ├── CloudServerError            tandem.cloud.server
    ├── FleetError                  tandem.cloud.fleet
    └── BuildError                  tandem.cloud.build

Component modules define their own subclasses under these branches.
"""

from __future__ import annotations


class TandemError(Exception):
    """Base class of every error tandem raises."""


class ConfigError(TandemError, ValueError):
    """A configuration value is invalid; the message names the field and why."""

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"{field}: {problem}")


class MissingDependencyError(TandemError, ImportError):
    """An optional dependency is missing; the message names the extra that installs it."""

    def __init__(self, package: str, extra: str, purpose: str = "") -> None:
        self.package = package
        self.extra = extra
        what = f" for {purpose}" if purpose else ""
        super().__init__(
            f"{package} is needed{what} but is not installed: pip install 'tandem[{extra}]'"
        )


class ArtifactError(TandemError):
    """A model artifact is unusable."""


class SignatureError(ArtifactError):
    """The manifest's signature is bad, missing or from an untrusted key."""


class DigestError(ArtifactError):
    """A file's sha256 digest or size does not match its manifest."""


class ManifestExpiredError(ArtifactError):
    """The manifest is past its expiry time."""


class RollbackError(ArtifactError):
    """The manifest's version is lower than one already accepted."""


class SDKError(TandemError):
    """Errors raised by tandem.sdk."""


class InputError(SDKError, ValueError):
    """An input tensor does not match the model's signature."""


class RuntimeBackendError(SDKError):
    """A local runtime failed to load or run a model."""


class NoLocalModelError(SDKError):
    """The client has no local model to answer with."""


class CloudError(SDKError):
    """The cloud tier failed to answer."""


class CloudUnavailableError(CloudError):
    """The cloud tier is unreachable, or the circuit breaker is open."""


class CloudTimeoutError(CloudError):
    """The cloud call exceeded its deadline."""


class CloudRejectedError(CloudError):
    """The cloud tier refused the request; `code` holds the gRPC status name."""

    def __init__(self, message: str, code: str = "") -> None:
        self.code = code
        super().__init__(message)


class ClientClosedError(SDKError):
    """The client was used after it was closed."""


class AgentError(TandemError):
    """Errors raised by the device agent."""


class CloudServerError(TandemError):
    """Errors raised by the cloud inference server."""


class FleetError(TandemError):
    """Errors raised by the fleet service."""


class BuildError(TandemError):
    """Errors raised by the model build pipeline."""
