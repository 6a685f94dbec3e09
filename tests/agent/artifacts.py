"""Tiny signed model variants for the agent's tests, built the way the build pipeline does.

A two-layer MLP in ONNX (pixels FP32 [-1, 64] -> logits FP32 [-1, 10]) whose "backbone"
and "head" weights come from separate seeds, so a retrained head makes a small zstd delta
against the previous version. Reference outputs are computed with onnxruntime, exactly as
the artifact format expects. Packing and signing are tests/support/variants.py's, with a
throwaway ed25519 key.
"""

from __future__ import annotations

import io
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from tandem.sdk.artifacts import Manifest, TensorSpec
from tests.support.variants import BuiltVariant, Signer, pack, write_signed_variant

__all__ = ["HIDDEN", "BuiltVariant", "Signer", "build_variant"]

HIDDEN = 512  # backbone width: makes model.onnx ~130 KB, enough chunks to interrupt


def _onnx_model(backbone_seed: int, head_seed: int, hidden: int = HIDDEN) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    rng_b = np.random.default_rng(backbone_seed)
    rng_h = np.random.default_rng(head_seed)
    w1 = (rng_b.standard_normal((64, hidden)) * 0.05).astype(np.float32)
    w2 = (rng_h.standard_normal((hidden, 10)) * 0.05).astype(np.float32)
    b2 = (rng_h.standard_normal(10) * 0.1).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["pixels", "w1"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("MatMul", ["r", "w2"], ["z"]),
            helper.make_node("Add", ["z", "b2"], ["logits"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["n", 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 10])],
        initializer=[
            numpy_helper.from_array(w1, "w1"),
            numpy_helper.from_array(w2, "w2"),
            numpy_helper.from_array(b2, "b2"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def _reference(model_bytes: bytes) -> bytes:
    import onnxruntime as ort

    pixels = np.random.default_rng(7).integers(0, 17, size=(8, 64)).astype(np.float32)
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"pixels": pixels})
    buffer = io.BytesIO()
    np.savez(buffer, **{"input.pixels": pixels, "output.logits": np.asarray(logits)})
    return buffer.getvalue()


def build_variant(
    out: Path,
    signer: Signer,
    *,
    model: str = "digits",
    version: int = 1,
    variant: str = "onnx-int8",
    runtime: str = "onnx",
    hardware: str = "any",
    head_seed: int | None = None,
    expires: datetime | None = None,
    wrong_reference: bool = False,
    claimed_size: int | None = None,
    hidden: int = HIDDEN,
    manifest_changes: dict[str, Any] | None = None,
) -> BuiltVariant:
    """Writes `out/<model>/<version>/<variant>/` and returns it with its signed manifest."""
    folder = out / model / str(version) / variant
    onnx_bytes = _onnx_model(
        backbone_seed=1,
        head_seed=head_seed if head_seed is not None else 100 + version,
        hidden=hidden,
    )
    reference = _reference(onnx_bytes)
    if wrong_reference:
        # Outputs no runtime will reproduce: warm-up must fail.
        arrays = dict(np.load(io.BytesIO(reference)))
        arrays["output.logits"] = arrays["output.logits"] + 5.0
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        reference = buffer.getvalue()
    entries = []
    stored: dict[str, bytes] = {}
    for name, data in (("model.onnx", onnx_bytes), ("reference.npz", reference)):
        entry, compressed = pack(name, data)
        stored[entry.stored_as] = compressed
        if claimed_size is not None and name == "model.onnx":
            entry = replace(entry, size=claimed_size)
        entries.append(entry)
    now = datetime.now(UTC).replace(microsecond=0)
    manifest = Manifest(
        model=model,
        version=version,
        variant=variant,
        runtime=runtime,
        hardware=hardware,
        precision="fp32",
        task="classification",
        created=now - timedelta(minutes=5),
        expires=expires or now + timedelta(days=30),
        entrypoint="model.onnx",
        files=tuple(entries),
        inputs=(TensorSpec("pixels", "FP32", (-1, 64)),),
        outputs=(TensorSpec("logits", "FP32", (-1, 10)),),
        calibration=None,
        reference="reference.npz",
    )
    if manifest_changes:
        manifest = replace(manifest, **manifest_changes)
    return write_signed_variant(folder, signer.key, manifest, stored)
