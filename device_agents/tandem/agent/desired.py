"""Pure trust logic for the fleet's desired state: is it the fleet's, for this device, and new.

Like `verify` for manifests (python-tuf's `TrustedMetadataSet` habit): no IO, values in, a
decision out or a `RefusedError` with a stable code. The agent persists `Accepted` and does
the MQTT around it.

Why: the desired-state topic is writable by the fleet's broker account, and the broker
re-delivers the retained copy to every new subscription. The manifests a state names are
signed by the release key, but the revision and the choice of versions are not: without this
check, anyone holding that account (or replaying an old retained message) could send an old
state with a higher revision (roll the device back to a version it has installed) or one
with a huge revision (make the agent ignore every real state after it). The fleet service
signs each state with its own key (a role separate from the release key); the agent obeys
only a state signed by a configured fleet key, for its own device id, with a revision
strictly higher than any it accepted before, or the very state it accepted last (the same
revision and models, re-delivered after a reconnect or a restart).
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.message import DecodeError

from tandem.agent import errors
from tandem.agent.errors import RefusedError
from tandem.errors import SignatureError
from tandem.protos.fleet.v1 import desired as signing
from tandem.protos.fleet.v1 import fleet_pb2
from tandem.sdk.artifacts import SignatureEntry, TrustedKeys


@dataclass(frozen=True)
class Accepted:
    """The newest desired state this device obeyed (persisted in the agent's state)."""

    revision: int
    digest: str  # `tandem.protos.fleet.v1.desired.content_digest` of its payload


@dataclass(frozen=True)
class Admitted:
    """A desired state that passed every check, as the agent obeys it."""

    accepted: Accepted
    issued_at_ms: int  # when the fleet signed it (unix ms); informative
    keyid: str  # the fleet key that signed it
    models: tuple[fleet_pb2.DesiredModel, ...]  # built from the signed payload
    fresh: bool  # False: the state accepted last, delivered again


def admit(
    state: fleet_pb2.DesiredState,
    fleet_keys: TrustedKeys,
    device_id: str,
    last: Accepted | None,
) -> Admitted:
    """Checks a desired state before anything in it is looked at.

    Order matters, as for manifests: the signature over the raw payload bytes first, then
    the fields of the signed payload only. The unsigned fields of `state` are ignored except
    for the manifests, which are taken by the digest the payload names (they carry their
    own release signatures, checked later per install).
    """
    if not state.HasField("signed") or not state.signed.signatures:
        raise RefusedError(errors.DESIRED_UNSIGNED, "desired state carries no fleet signature")
    envelope = state.signed
    entries = [SignatureEntry(s.keyid, bytes(s.sig)) for s in envelope.signatures]
    try:
        keyid = fleet_keys.verify(signing.signing_input(bytes(envelope.payload)), entries)
    except SignatureError as exc:
        signers = ", ".join(entry.keyid for entry in entries)
        raise RefusedError(
            errors.DESIRED_BAD_SIGNATURE,
            f"desired state not validly signed by a configured fleet key (signed by: {signers})",
        ) from exc
    payload = fleet_pb2.DesiredStatePayload()
    try:
        payload.ParseFromString(bytes(envelope.payload))
    except DecodeError as exc:
        raise RefusedError(errors.DESIRED_MALFORMED, f"signed payload unreadable: {exc}") from exc
    if payload.device_id != device_id:
        raise RefusedError(
            errors.DESIRED_WRONG_DEVICE,
            f"desired state r{payload.revision} is signed for device {payload.device_id!r}",
        )
    accepted = Accepted(payload.revision, signing.content_digest(payload))
    fresh = True
    if last is not None:
        if payload.revision < last.revision:
            raise RefusedError(
                errors.DESIRED_REPLAY,
                f"desired state r{payload.revision} is older than r{last.revision}, which this "
                "device already accepted",
            )
        if payload.revision == last.revision:
            if accepted.digest != last.digest:
                raise RefusedError(
                    errors.DESIRED_REPLAY,
                    f"desired state r{payload.revision} differs from the r{last.revision} this "
                    "device already accepted",
                )
            fresh = False
    return Admitted(
        accepted=accepted,
        issued_at_ms=payload.issued_at_ms,
        keyid=keyid,
        models=_models(payload, state),
        fresh=fresh,
    )


def _models(
    payload: fleet_pb2.DesiredStatePayload, state: fleet_pb2.DesiredState
) -> tuple[fleet_pb2.DesiredModel, ...]:
    manifests = {signing.manifest_sha256(item.manifest): item.manifest for item in state.models}
    models = []
    for ref in payload.models:
        manifest = manifests.get(ref.manifest_sha256)
        if manifest is None:
            raise RefusedError(
                errors.DESIRED_MALFORMED,
                f"the manifest signed for {ref.model} v{ref.version} {ref.variant} is missing",
            )
        models.append(
            fleet_pb2.DesiredModel(
                model=ref.model,
                version=ref.version,
                variant=ref.variant,
                manifest=manifest,
                rollout_id=ref.rollout_id,
                delta_base_version=ref.delta_base_version,
            )
        )
    return tuple(models)
