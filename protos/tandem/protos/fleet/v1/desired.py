"""The bytes of a desired-state signature, shared by the fleet service (which signs) and the
agent (which verifies), so the two cannot drift apart.

The fleet service signs `signing_input(payload)`: a domain prefix, then a serialized
`DesiredStatePayload` built by `payload_for` from the DesiredState it publishes. The prefix
keeps a desired-state signature from ever verifying as anything else (a manifest's canonical
JSON, a future message) even if an operator reuses one key for two roles.
"""

from __future__ import annotations

import hashlib

from tandem.protos.fleet.v1 import fleet_pb2

DOMAIN = b"tandem/fleet/v1/desired-state\x00"


def signing_input(payload: bytes) -> bytes:
    """What the fleet key signs for one serialized `DesiredStatePayload`."""
    return DOMAIN + payload


def manifest_sha256(manifest: fleet_pb2.SignedManifest) -> str:
    """Names a manifest in the signed payload: the sha256 of its signed bytes."""
    return hashlib.sha256(manifest.signed).hexdigest()


def payload_for(state: fleet_pb2.DesiredState, issued_at_ms: int) -> fleet_pb2.DesiredStatePayload:
    """The signed statement of `state`: its device, revision and every model assignment."""
    return fleet_pb2.DesiredStatePayload(
        device_id=state.device_id,
        revision=state.revision,
        issued_at_ms=issued_at_ms,
        models=[
            fleet_pb2.DesiredModelRef(
                model=item.model,
                version=item.version,
                variant=item.variant,
                manifest_sha256=manifest_sha256(item.manifest),
                rollout_id=item.rollout_id,
                delta_base_version=item.delta_base_version,
            )
            for item in state.models
        ],
    )


def content_digest(payload: fleet_pb2.DesiredStatePayload) -> str:
    """Identifies what a payload asks for, whenever it was signed: two signings of one
    revision (a re-publish after a reconnect) have the same digest."""
    models = fleet_pb2.DesiredStatePayload(models=payload.models)
    return hashlib.sha256(models.SerializeToString(deterministic=True)).hexdigest()
