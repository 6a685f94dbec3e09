"""The SDK on the build pipeline's real digits variants (the `digits_zoo` fixture).

Every runtime loads its variant straight from the zoo's `artifacts/` folder (unpacking into
the cache, never into the zoo), reproduces the variant's reference outputs, and
auto-selection picks one of them; the cascade derives its threshold from the shipped
validation set.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tandem.errors import NoLocalModelError
from tandem.sdk import Client
from tandem.sdk.artifacts import load_npz, split_reference
from tandem.sdk.store import ModelStore

pytestmark = pytest.mark.slow


def _variants(zoo: Path) -> dict[str, str]:
    _, variants = ModelStore(zoo / "artifacts").active_variants("digits")
    return {v.manifest.runtime: v.manifest.variant for v in variants}


@pytest.mark.parametrize("runtime", ["onnx", "tflite", "openvino", "torch"])
def test_zoo_variant_matches_its_reference(
    clients: Callable[..., Client], digits_zoo: Path, runtime: str, tmp_path: Path
) -> None:
    variant = _variants(digits_zoo).get(runtime)
    assert variant is not None, f"the zoo has no {runtime} variant of digits"
    before = sorted(p.name for p in (digits_zoo / "artifacts").rglob("*"))
    c = clients(artifacts=digits_zoo / "artifacts", policy="local_only", runtime=variant)
    model = c.current
    assert model is not None and model.runtime_name == runtime
    inputs, expected = split_reference(load_npz(model.unpacked / "reference.npz"))
    for name, want in expected.items():
        got = c.infer(inputs).outputs[name]
        scale = max(1.0, float(np.abs(want).max()))
        np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2 * scale)
        assert (got.argmax(1) == want.argmax(1)).mean() >= 0.99
    assert sorted(p.name for p in (digits_zoo / "artifacts").rglob("*")) == before


def test_zoo_auto_selection_and_cascade(clients: Callable[..., Client], digits_zoo: Path) -> None:
    c = clients(artifacts=digits_zoo / "artifacts", policy="cascade", max_accuracy_loss=0.005)
    selection = c.stats()["selection"]
    assert selection is not None
    timed = [x for x in selection["candidates"] if x["median_ms"] is not None]
    assert len(timed) >= 2
    assert selection["runtime"] == min(timed, key=lambda x: x["median_ms"])["runtime"]
    model = c.current
    assert model is not None
    threshold = c._router.cascade_threshold(c.policy, model)  # type: ignore[arg-type]
    assert 0.0 <= threshold <= 1.0 + 1e-9


def test_trusted_keys_verify_signatures_before_loading(
    clients: Callable[..., Client], digits_zoo: Path, tmp_path: Path
) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    good = clients(
        artifacts=digits_zoo / "artifacts",
        policy="local_only",
        runtime="onnx",
        trusted_keys=[digits_zoo / "keys" / "signing.pub"],
    )
    assert good.current is not None
    other = tmp_path / "other.pub"
    other.write_bytes(
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    bad = clients(
        artifacts=digits_zoo / "artifacts",
        policy="local_only",
        runtime="onnx",
        trusted_keys=[other],
    )
    assert bad.current is None
    with pytest.raises(NoLocalModelError, match="not signed by a trusted key"):
        bad.infer(np.zeros((1, 64), np.float32))
