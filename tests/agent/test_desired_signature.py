"""Signed desired states: the agent obeys only its fleet's signature, for its own device id,
at a revision higher than any it accepted (or the very state it accepted last, delivered
again), and remembers that revision across restarts. Unit tests of the pure check, then one
replay through a real Mosquitto: an old, validly signed state re-published after a newer one
neither rolls the device back nor stops it from applying the next state."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tandem.agent import errors
from tandem.agent.desired import Accepted, admit
from tandem.agent.errors import RefusedError
from tandem.agent.state import AgentState
from tandem.protos.fleet.v1 import desired as signing
from tandem.protos.fleet.v1 import fleet_pb2
from tandem.sdk.artifacts import TrustedKeys
from tests.agent.artifacts import Signer, build_variant
from tests.agent.conftest import AgentProcess
from tests.agent.fleet_double import FleetDouble, Kind
from tests.support.processes import wait_until

DEVICE = "dev-1"


@pytest.fixture
def fleet_key(tmp_path: Path) -> Signer:
    return Signer.create(tmp_path / "fleet", name="fleet")


@pytest.fixture
def fleet_keys(fleet_key: Signer) -> TrustedKeys:
    return TrustedKeys.from_files([fleet_key.public_path])


def manifest(version: int) -> fleet_pb2.SignedManifest:
    # admit() names manifests by digest only; their own signatures are checked per install.
    return fleet_pb2.SignedManifest(
        signed=json.dumps({"model": "digits", "version": version}).encode(),
        signatures=[fleet_pb2.Signature(keyid="release", sig=b"\0" * 64)],
    )


def state(
    key: Signer | None, revision: int, version: int, *, device: str = DEVICE, issued_ms: int = 1
) -> fleet_pb2.DesiredState:
    msg = fleet_pb2.DesiredState(
        device_id=device,
        revision=revision,
        models=[
            fleet_pb2.DesiredModel(
                model="digits",
                version=version,
                variant="onnx-int8",
                manifest=manifest(version),
                rollout_id="r1",
            )
        ],
    )
    if key is not None:
        raw = signing.payload_for(msg, issued_ms).SerializeToString()
        entry = key.sign(signing.signing_input(raw))
        msg.signed.payload = raw
        msg.signed.signatures.add(keyid=entry.keyid, sig=entry.sig)
    return msg


def refusal(msg: fleet_pb2.DesiredState, keys: TrustedKeys, last: Accepted | None) -> str:
    with pytest.raises(RefusedError) as caught:
        admit(msg, keys, DEVICE, last)
    return caught.value.code


def test_a_signed_state_is_admitted_from_its_signed_payload(
    fleet_key: Signer, fleet_keys: TrustedKeys
) -> None:
    msg = state(fleet_key, 3, 2, issued_ms=1234)
    # The unsigned transport fields say something else: only the signed payload counts.
    msg.revision = 99
    msg.models[0].version = 7
    msg.models[0].rollout_id = "forged"
    admitted = admit(msg, fleet_keys, DEVICE, Accepted(2, "older"))
    assert admitted.fresh and admitted.keyid == fleet_key.keyid
    assert admitted.accepted.revision == 3 and admitted.issued_at_ms == 1234
    (model,) = admitted.models
    assert (model.model, model.version, model.variant, model.rollout_id) == (
        "digits",
        2,
        "onnx-int8",
        "r1",
    )
    assert model.manifest == manifest(2)


def test_unsigned_tampered_and_foreign_states_are_refused(
    fleet_key: Signer, fleet_keys: TrustedKeys, tmp_path: Path
) -> None:
    assert refusal(state(None, 5, 2), fleet_keys, None) == errors.DESIRED_UNSIGNED

    tampered = state(fleet_key, 5, 2)
    payload = fleet_pb2.DesiredStatePayload.FromString(tampered.signed.payload)
    payload.revision = 10**12  # a huge revision would stall every real state after it
    tampered.signed.payload = payload.SerializeToString()
    assert refusal(tampered, fleet_keys, None) == errors.DESIRED_BAD_SIGNATURE

    other_key = Signer.create(tmp_path / "other", name="fleet")
    assert refusal(state(other_key, 5, 2), fleet_keys, None) == errors.DESIRED_BAD_SIGNATURE
    # The release key is another role: a state it signs is not the fleet's.
    release = Signer.create(tmp_path / "release")
    assert refusal(state(release, 5, 2), fleet_keys, None) == errors.DESIRED_BAD_SIGNATURE

    assert (
        refusal(state(fleet_key, 5, 2, device="dev-2"), fleet_keys, None)
        == errors.DESIRED_WRONG_DEVICE
    )

    swapped = state(fleet_key, 5, 2)
    swapped.models[0].manifest.CopyFrom(manifest(1))  # an older manifest under a signed state
    assert refusal(swapped, fleet_keys, None) == errors.DESIRED_MALFORMED


def test_replays_of_older_or_other_states_are_refused_the_current_one_is_not(
    fleet_key: Signer, fleet_keys: TrustedKeys
) -> None:
    old = state(fleet_key, 4, 1)
    current = state(fleet_key, 5, 2, issued_ms=10)
    last = admit(current, fleet_keys, DEVICE, admit(old, fleet_keys, DEVICE, None).accepted)
    assert last.fresh

    assert refusal(old, fleet_keys, last.accepted) == errors.DESIRED_REPLAY
    # The same revision signed again later (a re-publish after a reconnect) is the state
    # the device has: admitted, but not news.
    again = admit(state(fleet_key, 5, 2, issued_ms=20), fleet_keys, DEVICE, last.accepted)
    assert not again.fresh and again.accepted == last.accepted
    # Another state under the revision already accepted is not.
    assert refusal(state(fleet_key, 5, 1), fleet_keys, last.accepted) == errors.DESIRED_REPLAY


def test_the_highest_accepted_revision_survives_a_restart(
    fleet_key: Signer, fleet_keys: TrustedKeys, tmp_path: Path
) -> None:
    first = AgentState(tmp_path / ".agent")
    first.load()
    first.desired = admit(state(fleet_key, 7, 2), fleet_keys, DEVICE, None).accepted
    first.save()

    restarted = AgentState(tmp_path / ".agent")
    restarted.load()
    assert restarted.desired == first.desired
    assert refusal(state(fleet_key, 6, 1), fleet_keys, restarted.desired) == errors.DESIRED_REPLAY
    assert admit(state(fleet_key, 8, 3), fleet_keys, DEVICE, restarted.desired).fresh


def test_a_replayed_older_state_neither_rolls_back_nor_stalls_the_agent(
    fleet: FleetDouble,
    signer: Signer,
    agent_factory: Callable[..., AgentProcess],
    tmp_path: Path,
) -> None:
    agent = agent_factory(DEVICE, "--health-window", "0.3", "--health-probe-interval", "0.1")
    # Small models, the later ones built while the agent starts and installs the first.
    fleet.set_desired(DEVICE, build_variant(tmp_path / "zoo", signer, version=1, hidden=32))
    v2, v3 = (build_variant(tmp_path / "zoo", signer, version=v, hidden=32) for v in (2, 3))
    fleet.wait_report(DEVICE, Kind.HEALTHY, 1, timeout=40)
    captured = fleet_pb2.DesiredState()
    captured.CopyFrom(fleet.desired[DEVICE])  # what an eavesdropper on the broker keeps
    fleet.set_desired(DEVICE, v2)
    fleet.wait_report(DEVICE, Kind.HEALTHY, 2, timeout=40)

    replayed_at = len(fleet.reports)
    fleet.publish_desired(captured)  # retained, like the fleet's own: v1 is installed there
    refused = fleet.wait_report(DEVICE, Kind.REFUSED, timeout=20, after=replayed_at)
    assert refused.reason.startswith(errors.DESIRED_REPLAY), refused.reason
    assert "older than r2" in refused.reason and not refused.model
    # The same replay with a huge unsigned revision, and a forged unsigned state.
    captured.revision = 2**63
    fleet.publish_desired(captured)
    forged = fleet_pb2.DesiredState()
    forged.CopyFrom(captured)
    forged.ClearField("signed")
    fleet.publish_desired(forged)
    wait_until(
        lambda: any(r.reason.startswith(errors.DESIRED_UNSIGNED) for r in fleet.reports),
        20,
        message="the unsigned state refused",
    )

    # The barrier: the fleet's next state is still applied after all of that.
    fleet.set_desired(DEVICE, v3)
    fleet.wait_report(DEVICE, Kind.HEALTHY, 3, timeout=40)
    after_replay = [(Kind.Name(r.kind), r.version) for r in fleet.reports[replayed_at:]]
    assert ("ACTIVATED", 1) not in after_replay, after_replay
    # The replay, re-sent with another revision, is reported once: the payload is the same.
    replays = [r for r in fleet.reports[replayed_at:] if r.reason.startswith("desired_replay")]
    assert len({r.report_id for r in replays}) == 1, replays
    pointer = json.loads((agent.store / "digits" / "active.json").read_text())
    assert pointer["version"] == 3
    stored = json.loads((agent.store / ".agent" / "state.json").read_text())
    assert stored["desired"]["revision"] == fleet.desired[DEVICE].revision == 3
    signed = fleet_pb2.DesiredStatePayload.FromString(fleet.desired[DEVICE].signed.payload)
    assert stored["desired"]["digest"] == signing.content_digest(signed)
