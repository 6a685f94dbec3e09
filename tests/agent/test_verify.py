"""The agent's pure trust logic, without a broker: every refusal, the plan, the delta base."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tandem.agent import errors
from tandem.agent.errors import RefusedError
from tandem.agent.verify import (
    Action,
    DeviceFacts,
    LocalModelState,
    Offer,
    check_offer,
    delta_base,
    plan,
)
from tandem.sdk.artifacts import (
    FileEntry,
    Manifest,
    SignatureEntry,
    TensorSpec,
    TrustedKeys,
    canonical_json,
)
from tests.agent.artifacts import Signer

NOW = datetime(2026, 11, 22, 6, 0, tzinfo=UTC)
FACTS = DeviceFacts(hardware="x86_64", runtimes=("onnx", "openvino"), max_payload_bytes=10_000)
FRESH = LocalModelState(active=None, installed=frozenset(), max_accepted_version=0)


def manifest(**changes: object) -> Manifest:
    base = Manifest(
        model="digits",
        version=3,
        variant="onnx-int8",
        runtime="onnx",
        hardware="any",
        precision="int8",
        task="classification",
        created=NOW - timedelta(days=1),
        expires=NOW + timedelta(days=30),
        entrypoint="model.onnx",
        files=(FileEntry("model.onnx", 4000, "a" * 64, "model.onnx.zst", 3000, "b" * 64),),
        inputs=(TensorSpec("pixels", "FP32", (-1, 64)),),
        outputs=(TensorSpec("logits", "FP32", (-1, 10)),),
    )
    return replace(base, **changes)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def signer(tmp_path_factory: pytest.TempPathFactory) -> Signer:
    return Signer.create(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def trusted(signer: Signer) -> TrustedKeys:
    return TrustedKeys.from_files([signer.public_path])


def offer_of(signer: Signer, m: Manifest, **changes: object) -> Offer:
    signed = m.to_bytes()
    offer = Offer(m.model, m.version, m.variant, signed, (signer.sign(signed),))
    return replace(offer, **changes)  # type: ignore[arg-type]


def refusal(
    trusted: TrustedKeys, offer: Offer, state: LocalModelState = FRESH, facts: DeviceFacts = FACTS
) -> str:
    with pytest.raises(RefusedError) as caught:
        check_offer(offer, trusted, facts, state, NOW)
    assert str(caught.value).startswith(caught.value.code + ": ")
    return caught.value.code


def test_a_good_offer_passes(signer: Signer, trusted: TrustedKeys) -> None:
    m = check_offer(offer_of(signer, manifest()), trusted, FACTS, FRESH, NOW)
    assert (m.model, m.version, m.variant) == ("digits", 3, "onnx-int8")


def test_untrusted_key_is_a_bad_signature(
    signer: Signer, trusted: TrustedKeys, tmp_path: Path
) -> None:
    other = Signer.create(tmp_path)
    assert refusal(trusted, offer_of(other, manifest())) == errors.BAD_SIGNATURE


def test_tampered_bytes_are_a_bad_signature(signer: Signer, trusted: TrustedKeys) -> None:
    good = offer_of(signer, manifest())
    tampered = good.signed.replace(b'"version":3', b'"version":9')
    assert tampered != good.signed
    assert refusal(trusted, replace(good, signed=tampered)) == errors.BAD_SIGNATURE


def test_unsigned_is_a_bad_signature(signer: Signer, trusted: TrustedKeys) -> None:
    assert refusal(trusted, offer_of(signer, manifest(), signatures=())) == errors.BAD_SIGNATURE


def test_signature_is_checked_before_parsing(signer: Signer, trusted: TrustedKeys) -> None:
    garbage = Offer("digits", 3, "onnx-int8", b"\xff not json", (SignatureEntry("x" * 16, b"0"),))
    assert refusal(trusted, garbage) == errors.BAD_SIGNATURE


def test_signed_garbage_is_malformed(signer: Signer, trusted: TrustedKeys) -> None:
    signed = canonical_json({"type": "something else"})
    offer = Offer("digits", 3, "onnx-int8", signed, (signer.sign(signed),))
    assert refusal(trusted, offer) == errors.MALFORMED


def test_expired(signer: Signer, trusted: TrustedKeys) -> None:
    offer = offer_of(signer, manifest(expires=NOW - timedelta(seconds=1)))
    assert refusal(trusted, offer) == errors.EXPIRED


def test_lower_than_accepted_is_a_rollback(signer: Signer, trusted: TrustedKeys) -> None:
    state = replace(FRESH, max_accepted_version=4)
    assert refusal(trusted, offer_of(signer, manifest()), state) == errors.ROLLBACK
    # The same version as accepted is fine (a re-install), and so is a newer one.
    check_offer(offer_of(signer, manifest(version=4)), trusted, FACTS, state, NOW)
    check_offer(offer_of(signer, manifest(version=5)), trusted, FACTS, state, NOW)


def test_manifest_for_another_model(signer: Signer, trusted: TrustedKeys) -> None:
    offer = offer_of(signer, manifest(model="faces"), model="digits")
    assert refusal(trusted, offer) == errors.WRONG_MODEL


def test_desired_state_and_manifest_must_agree(signer: Signer, trusted: TrustedKeys) -> None:
    assert refusal(trusted, offer_of(signer, manifest(), version=4)) == errors.WRONG_MODEL
    assert refusal(trusted, offer_of(signer, manifest(), variant="x")) == errors.WRONG_MODEL


def test_other_hardware(signer: Signer, trusted: TrustedKeys) -> None:
    assert refusal(trusted, offer_of(signer, manifest(hardware="aarch64"))) == (
        errors.WRONG_HARDWARE
    )
    check_offer(offer_of(signer, manifest(hardware="x86_64")), trusted, FACTS, FRESH, NOW)


def test_runtime_the_device_lacks(signer: Signer, trusted: TrustedKeys) -> None:
    assert refusal(trusted, offer_of(signer, manifest(runtime="tflite"))) == errors.WRONG_RUNTIME


def test_payload_over_the_limit(signer: Signer, trusted: TrustedKeys) -> None:
    unpacked = manifest(
        files=(FileEntry("model.onnx", 10_001, "a" * 64, "model.onnx.zst", 100, "b" * 64),)
    )
    assert refusal(trusted, offer_of(signer, unpacked)) == errors.TOO_LARGE
    wire = manifest(
        files=(FileEntry("model.onnx", 100, "a" * 64, "model.onnx.zst", 10_001, "b" * 64),)
    )
    assert refusal(trusted, offer_of(signer, wire)) == errors.TOO_LARGE
    exact = manifest(
        files=(FileEntry("model.onnx", 10_000, "a" * 64, "model.onnx.zst", 10_000, "b" * 64),)
    )
    check_offer(offer_of(signer, exact), trusted, FACTS, FRESH, NOW)


def test_offer_key_covers_the_signatures(signer: Signer, tmp_path: Path) -> None:
    good = offer_of(signer, manifest())
    forged = offer_of(Signer.create(tmp_path), manifest())
    assert good.signed == forged.signed and good.transfer_id == forged.transfer_id
    assert good.offer_key != forged.offer_key


def test_plan() -> None:
    offer = Offer("digits", 3, "onnx-int8", b"{}", ())
    assert plan(offer, FRESH).action is Action.INSTALL
    active = LocalModelState((3, "onnx-int8"), frozenset({(3, "onnx-int8")}), 3)
    assert plan(offer, active).action is Action.NOTHING
    # An unpinned active pointer covers every variant of its version.
    assert plan(offer, replace(active, active=(3, None))).action is Action.NOTHING
    # Already installed and below the accepted maximum: the fleet asks for it back.
    older = LocalModelState((4, "onnx-int8"), frozenset({(3, "onnx-int8"), (4, "onnx-int8")}), 4)
    assert plan(offer, older).action is Action.REACTIVATE
    failed = replace(older, failed=frozenset({(3, "onnx-int8")}))
    assert plan(offer, failed).action is Action.NOTHING
    other_variant = LocalModelState((2, "onnx-int8"), frozenset({(3, "openvino-int8")}), 3)
    assert plan(offer, other_variant).action is Action.INSTALL


def test_delta_base() -> None:
    offer = Offer("digits", 5, "onnx-int8", b"{}", (), delta_base_version=3)
    installed = frozenset({(3, "onnx-int8"), (4, "onnx-int8"), (4, "openvino-int8")})
    state = LocalModelState((4, "onnx-int8"), installed, 4)
    assert delta_base(offer, state) == 3  # the fleet's suggestion, when the device has it
    assert delta_base(replace(offer, delta_base_version=2), state) == 4  # else the active one
    assert delta_base(replace(offer, variant="tflite-int8"), state) == 0  # no same variant
    no_active = replace(state, active=None)
    assert delta_base(replace(offer, delta_base_version=0), no_active) == 4


def test_refusal_codes_are_stable() -> None:
    with pytest.raises(ValueError):
        RefusedError("made_up", "x")
    assert json.dumps(errors.REFUSAL_CODES)
