"""Warm-up of a new variant against its reference outputs (`tandem.agent.warmup`)."""

from __future__ import annotations

from pathlib import Path

import pytest


def test_warm_up_checks_outputs_against_the_reference(tmp_path: Path) -> None:
    import numpy as np

    from tandem.agent.errors import WarmupError
    from tandem.agent.warmup import compare_outputs, warm_up
    from tandem.sdk.artifacts import load_variant, unpack_variant
    from tests.agent.artifacts import Signer, build_variant

    signer = Signer.create(tmp_path / "keys")
    good = build_variant(tmp_path / "zoo", signer, version=1)
    unpack_variant(load_variant(good.path))
    probe = warm_up(good.path, good.manifest, 1e-3, 1e-3)
    probe.check()  # and again, as the health probe does

    wrong = build_variant(tmp_path / "zoo", signer, version=2, wrong_reference=True)
    unpack_variant(load_variant(wrong.path))
    with pytest.raises(WarmupError, match="differs from the reference"):
        warm_up(wrong.path, wrong.manifest, 1e-3, 1e-3)

    (good.path / "model.onnx").write_bytes(b"not an onnx model")
    with pytest.raises(WarmupError, match="could not load"):
        warm_up(good.path, good.manifest, 1e-3, 1e-3)

    ref = {"logits": np.zeros((2, 3), np.float32)}
    with pytest.raises(WarmupError, match="missing"):
        compare_outputs({}, ref, 1e-3, 1e-3)
    with pytest.raises(WarmupError, match="shape"):
        compare_outputs({"logits": np.zeros((3, 2), np.float32)}, ref, 1e-3, 1e-3)
    compare_outputs({"logits": np.full((2, 3), 1e-4, np.float32)}, ref, 1e-3, 1e-3)
