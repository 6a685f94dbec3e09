"""The agent's branch of the error tree (rooted in `tandem.errors.AgentError`)::

    AgentError
    ├── RefusedError        a delivery or a desired state was refused; `.code` is a stable
    │                       reason code
    ├── WarmupError         the new version failed to load or its outputs did not match
    └── TransferError       a chunk stream could not be continued (bad chunk, disk)

Refusals carry a short machine-readable code (sent in DeviceReport.reason as
``"<code>: <detail>"``) so the fleet service can count them without parsing prose.
"""

from __future__ import annotations

from tandem.errors import AgentError

# Stable reason codes, the prefix of DeviceReport.reason for REFUSED reports.
BAD_SIGNATURE = "bad_signature"
EXPIRED = "expired"
ROLLBACK = "rollback"
WRONG_MODEL = "wrong_model"
WRONG_HARDWARE = "wrong_hardware"
WRONG_RUNTIME = "wrong_runtime"
TOO_LARGE = "too_large"
DIGEST_MISMATCH = "digest_mismatch"
MALFORMED = "malformed"
NO_SPACE = "no_space"  # writing the delivery failed (disk full, file size limit, read-only)
# A desired state refused as a whole (tandem.agent.desired): nothing of it is obeyed.
DESIRED_UNSIGNED = "desired_unsigned"  # no fleet signature, and this agent has a fleet key
DESIRED_BAD_SIGNATURE = "desired_bad_signature"  # not signed by a configured fleet key
DESIRED_WRONG_DEVICE = "desired_wrong_device"  # signed for another device
DESIRED_REPLAY = "desired_replay"  # an older revision, or another state under the same one
DESIRED_MALFORMED = "desired_malformed"  # signed, but its payload or manifests do not add up

REFUSAL_CODES = (
    BAD_SIGNATURE,
    EXPIRED,
    ROLLBACK,
    WRONG_MODEL,
    WRONG_HARDWARE,
    WRONG_RUNTIME,
    TOO_LARGE,
    DIGEST_MISMATCH,
    MALFORMED,
    NO_SPACE,
    DESIRED_UNSIGNED,
    DESIRED_BAD_SIGNATURE,
    DESIRED_WRONG_DEVICE,
    DESIRED_REPLAY,
    DESIRED_MALFORMED,
)


class RefusedError(AgentError):
    """A delivery was refused; nothing of it touches the active model."""

    def __init__(self, code: str, detail: str) -> None:
        if code not in REFUSAL_CODES:
            raise ValueError(f"unknown refusal code {code!r}")
        self.code = code
        self.detail = detail
        super().__init__(f"{code}: {detail}")


class WarmupError(AgentError):
    """A staged version could not be loaded, or its outputs disagree with its reference."""


class TransferError(AgentError):
    """A chunk stream could not be continued."""
