"""Pure trust logic: is an offered model version acceptable to this device, and what to do.

No IO here (python-tuf's `TrustedMetadataSet` habit): the functions take the offer, the
device's facts and its local state as values, and return a decision or raise `RefusedError`
with a stable reason code. The agent does the MQTT and file IO around them, and the tests
exercise every refusal without a broker.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import Enum

from tandem.agent import errors
from tandem.agent.errors import RefusedError
from tandem.errors import (
    ArtifactError,
    ManifestExpiredError,
    SignatureError,
)
from tandem.sdk.artifacts import Manifest, SignatureEntry, TrustedKeys, verify_manifest


@dataclass(frozen=True)
class Offer:
    """One model assignment from the fleet's desired state, as plain values."""

    model: str
    version: int
    variant: str
    signed: bytes
    signatures: tuple[SignatureEntry, ...]
    rollout_id: str = ""
    delta_base_version: int = 0

    @property
    def digest(self) -> str:
        """Identifies this exact manifest (and so this delivery) across restarts."""
        return hashlib.sha256(self.signed).hexdigest()

    @property
    def offer_key(self) -> str:
        """Identifies the manifest AND its signatures: what a refusal is remembered by.

        Keyed on the signatures too, so a copy of a good manifest refused for a bad signature
        never blocks the same manifest correctly signed.
        """
        digest = hashlib.sha256(self.signed)
        for entry in self.signatures:
            digest.update(entry.keyid.encode() + b"\0" + entry.sig)
        return digest.hexdigest()

    @property
    def transfer_id(self) -> str:
        return self.digest[:16]


@dataclass(frozen=True)
class DeviceFacts:
    hardware: str
    runtimes: tuple[str, ...]
    max_payload_bytes: int  # bytes


@dataclass(frozen=True)
class LocalModelState:
    """What the device has of one model."""

    active: tuple[int, str | None] | None  # (version, variant) the SDK uses now
    installed: frozenset[tuple[int, str]]  # (version, variant) folders present and verified
    max_accepted_version: int
    failed: frozenset[tuple[int, str]] = frozenset()  # failed warm-up or health here


class Action(Enum):
    NOTHING = "nothing"  # already active, or already failed here
    INSTALL = "install"  # fetch, verify, stage, activate
    REACTIVATE = "reactivate"  # installed and verified before: switch to it


@dataclass(frozen=True)
class Plan:
    action: Action
    why: str


def plan(offer: Offer, state: LocalModelState) -> Plan:
    """What to do about one desired model, before any manifest check."""
    target = (offer.version, offer.variant)
    if (
        state.active is not None
        and state.active[0] == offer.version
        and (state.active[1] in (None, offer.variant))
    ):
        return Plan(Action.NOTHING, f"v{offer.version} {offer.variant} is already active")
    if target in state.failed:
        return Plan(Action.NOTHING, f"v{offer.version} {offer.variant} already failed here")
    if target in state.installed:
        # Not a rollback attack: the version was verified when it was installed, and the fleet
        # asks for it back (a rollout abort returns devices to the baseline).
        return Plan(Action.REACTIVATE, f"v{offer.version} {offer.variant} is installed")
    return Plan(Action.INSTALL, f"v{offer.version} {offer.variant} is new here")


def payload_sizes(manifest: Manifest) -> tuple[int, int]:
    """(bytes on the wire, bytes unpacked) of a variant's files."""
    return (
        sum(entry.stored_size for entry in manifest.files),
        sum(entry.size for entry in manifest.files),
    )


def check_offer(
    offer: Offer,
    trusted: TrustedKeys,
    facts: DeviceFacts,
    state: LocalModelState,
    now: datetime,
) -> Manifest:
    """Verifies a NEW manifest before a single payload byte is requested.

    Order matters: the signature is checked over the raw bytes before they are parsed, and
    every later check reads only signed fields.
    """
    try:
        manifest = verify_manifest(
            offer.signed,
            offer.signatures,
            trusted,
            now=now,
        )
    except SignatureError as exc:
        raise RefusedError(errors.BAD_SIGNATURE, str(exc)) from exc
    except ManifestExpiredError as exc:
        raise RefusedError(errors.EXPIRED, str(exc)) from exc
    except ArtifactError as exc:
        raise RefusedError(errors.MALFORMED, str(exc)) from exc
    if manifest.model != offer.model:
        raise RefusedError(
            errors.WRONG_MODEL,
            f"manifest is for model {manifest.model!r}, desired state names {offer.model!r}",
        )
    if manifest.version != offer.version or manifest.variant != offer.variant:
        raise RefusedError(
            errors.WRONG_MODEL,
            f"desired state names v{offer.version} {offer.variant} but the signed manifest is "
            f"v{manifest.version} {manifest.variant}",
        )
    if manifest.version < state.max_accepted_version:
        raise RefusedError(
            errors.ROLLBACK,
            f"{manifest.model} v{manifest.version} is older than v{state.max_accepted_version}, "
            "which this device already accepted",
        )
    if manifest.hardware not in ("any", facts.hardware):
        raise RefusedError(
            errors.WRONG_HARDWARE,
            f"manifest targets {manifest.hardware}, this device is {facts.hardware}",
        )
    if manifest.runtime not in facts.runtimes:
        raise RefusedError(
            errors.WRONG_RUNTIME,
            f"manifest needs runtime {manifest.runtime}, this device has "
            f"{', '.join(facts.runtimes) or 'none'}",
        )
    wire, unpacked = payload_sizes(manifest)
    if max(wire, unpacked) > facts.max_payload_bytes:
        raise RefusedError(
            errors.TOO_LARGE,
            f"payload of {max(wire, unpacked)} bytes exceeds the limit of "
            f"{facts.max_payload_bytes}",
        )
    return manifest


def delta_base(offer: Offer, state: LocalModelState) -> int:
    """The version this device can offer as a delta base for `offer` (0: none).

    Only a version of the same variant works as a base: the delta dictionary is that
    variant's previous uncompressed file of the same name.
    """
    candidates: Sequence[int] = []
    if offer.delta_base_version and (offer.delta_base_version, offer.variant) in state.installed:
        return offer.delta_base_version
    if state.active is not None and (state.active[0], offer.variant) in state.installed:
        candidates = [state.active[0]]
    else:
        candidates = sorted(v for v, variant in state.installed if variant == offer.variant)
    return candidates[-1] if candidates else 0
