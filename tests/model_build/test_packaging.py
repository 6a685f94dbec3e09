"""Signing keys and variant packaging, without building a model (fast)."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import numpy as np
import pytest

from tandem.cloud.build.errors import KeyFileError, ModelUnavailableError, UnknownModelError
from tandem.cloud.build.packaging import repository_config, write_repository_model, write_variant
from tandem.cloud.build.signing import Signer, generate_keypair
from tandem.errors import DigestError, SignatureError
from tandem.sdk.artifacts import (
    MANIFEST_FILE,
    SIGNATURES_FILE,
    TensorSpec,
    TrustedKeys,
    load_npz,
    load_variant,
    split_reference,
    unpack_variant,
    verify_stored_files,
)

PIXELS = TensorSpec("pixels", "FP32", (-1, 64))
LOGITS = TensorSpec("logits", "FP32", (-1, 10))


def test_generate_keypair_writes_private_key_0600_and_refuses_overwrite(tmp_path: Path) -> None:
    key, pub = generate_keypair(tmp_path / "keys")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert b"BEGIN PRIVATE KEY" in key.read_bytes()
    assert b"BEGIN PUBLIC KEY" in pub.read_bytes()
    before = key.read_bytes()
    with pytest.raises(KeyFileError, match="already exists"):
        generate_keypair(tmp_path / "keys")
    assert key.read_bytes() == before
    generate_keypair(tmp_path / "keys", overwrite=True)
    assert key.read_bytes() != before
    assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_signer_rejects_a_file_that_is_not_a_key(tmp_path: Path) -> None:
    bogus = tmp_path / "signing.key"
    bogus.write_text("not a key")
    with pytest.raises(KeyFileError, match="not an unencrypted PEM"):
        Signer.from_file(bogus)
    with pytest.raises(KeyFileError, match="cannot read"):
        Signer.from_file(tmp_path / "absent.key")


def _write(tmp_path: Path, signer: Signer) -> Path:
    payload = tmp_path / "model.bin"
    payload.write_bytes(b"weights" * 1000)
    rows = np.arange(3 * 64, dtype=np.float32).reshape(3, 64)
    variant = write_variant(
        tmp_path / "artifacts" / "toy" / "1" / "onnx-int8",
        signer=signer,
        model="toy",
        version=1,
        variant="onnx-int8",
        runtime="onnx",
        precision="int8",
        task="classification",
        hardware="any",
        entrypoint="model.onnx",
        payload_files={"model.onnx": payload},
        inputs=[PIXELS],
        outputs=[LOGITS],
        reference={"input.pixels": rows, "output.logits": np.ones((3, 10), np.float32)},
        validation={"input.pixels": rows, "labels": np.array([1, 2, 3])},
        calibration={"method": "temperature", "temperature": 1.5},
        metrics={"accuracy": np.float64(0.97)},
    )
    return variant.path


def test_write_variant_signs_compresses_and_round_trips(tmp_path: Path) -> None:
    key, pub = generate_keypair(tmp_path / "keys")
    signer = Signer.from_file(key)
    folder = _write(tmp_path, signer)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [
            MANIFEST_FILE,
            SIGNATURES_FILE,
            "model.onnx.zst",
            "reference.npz.zst",
            "validation.npz.zst",
        ]
    )
    variant = load_variant(folder, TrustedKeys.from_files([pub]))
    manifest = variant.manifest
    assert manifest.temperature == 1.5
    assert manifest.metrics["accuracy"] == 0.97
    assert manifest.validation == "validation.npz"
    assert (folder / MANIFEST_FILE).read_bytes() == manifest.to_bytes()
    verify_stored_files(variant)
    unpack_variant(variant)
    assert (folder / "model.onnx").read_bytes() == b"weights" * 1000
    inputs, outputs = split_reference(load_npz(folder / "reference.npz"))
    assert inputs["pixels"].shape == (3, 64) and outputs["logits"].shape == (3, 10)

    _, other_pub = generate_keypair(tmp_path / "other")
    with pytest.raises(SignatureError):
        load_variant(folder, TrustedKeys.from_files([other_pub]))

    stored = folder / "model.onnx.zst"
    stored.write_bytes(stored.read_bytes()[:-1] + b"\0")
    with pytest.raises(DigestError):
        verify_stored_files(variant)


def test_write_variant_replaces_an_existing_variant_whole(tmp_path: Path) -> None:
    key, _ = generate_keypair(tmp_path / "keys")
    signer = Signer.from_file(key)
    folder = _write(tmp_path, signer)
    (folder / "stale.txt").write_text("left from before")
    _write(tmp_path, signer)
    assert not (folder / "stale.txt").exists()
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]


def test_repository_model_layout_and_config(tmp_path: Path) -> None:
    onnx = tmp_path / "teacher.onnx"
    onnx.write_bytes(b"onnx")
    config = repository_config("toy", backend="onnxruntime", inputs=[PIXELS], outputs=[LOGITS])
    write_repository_model(tmp_path / "repository", "toy", 1, {"model.onnx": onnx}, config)
    written = json.loads((tmp_path / "repository" / "toy" / "config.json").read_text())
    assert written["input"] == [{"name": "pixels", "datatype": "FP32", "dims": [64]}]
    assert written["output"] == [{"name": "logits", "datatype": "FP32", "dims": [10]}]
    assert written["max_batch_size"] == 64
    assert written["dynamic_batching"]["preferred_batch_sizes"] == [16, 32, 64]
    assert (tmp_path / "repository" / "toy" / "1" / "model.onnx").read_bytes() == b"onnx"


def test_unknown_and_unavailable_models_raise_build_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tandem.cloud.build import pipeline

    with pytest.raises(UnknownModelError, match=r"unknown model 'nope'.*known models: digits"):
        pipeline.build_zoo(tmp_path / "zoo", models=("nope",))
    # A default model whose spec folder is not there (an installed wheel has no examples/).
    monkeypatch.setattr(pipeline, "EXAMPLES", tmp_path / "examples")
    with pytest.raises(ModelUnavailableError, match=r"minilm.*examples/minilm/model\.toml"):
        pipeline.load_builder("minilm")
    assert pipeline.known_models() == ("digits", "minilm")
