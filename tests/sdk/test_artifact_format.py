"""The signed manifest and the model store: pure verification, refusals, safe unpacking."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import zstandard
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tandem.errors import (
    ArtifactError,
    DigestError,
    ManifestExpiredError,
    NoLocalModelError,
    RollbackError,
    SignatureError,
)
from tandem.sdk.artifacts import (
    MANIFEST_FILE,
    SIGNATURES_FILE,
    FileEntry,
    Manifest,
    SignatureEntry,
    TensorSpec,
    TrustedKeys,
    key_id,
    load_variant,
    parse_signatures,
    signatures_to_bytes,
    unpack_variant,
    verify_manifest,
    verify_stored_files,
)
from tandem.sdk.store import ActivePointer, ModelStore

NOW = datetime(2026, 11, 22, tzinfo=UTC)


def _raw(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _manifest(
    version: int = 2, files: tuple[FileEntry, ...] | None = None, **kw: object
) -> Manifest:
    entry = FileEntry("model.onnx", 4, "0" * 64, "model.onnx.zst", 4, "0" * 64)
    fields: dict[str, object] = dict(
        model="digits",
        version=version,
        variant="onnx-int8",
        runtime="onnx",
        hardware="any",
        precision="int8",
        task="classification",
        created=NOW - timedelta(days=1),
        expires=NOW + timedelta(days=30),
        entrypoint="model.onnx",
        files=files or (entry,),
        inputs=(TensorSpec("pixels", "FP32", (-1, 64)),),
        outputs=(TensorSpec("logits", "FP32", (-1, 10)),),
        calibration={"method": "temperature", "temperature": 1.5},
    )
    fields.update(kw)
    return Manifest(**fields)  # type: ignore[arg-type]


def _sign(key: Ed25519PrivateKey, signed: bytes) -> tuple[SignatureEntry, ...]:
    return (SignatureEntry(key_id(_raw(key)), key.sign(signed)),)


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def test_roundtrip_and_verify(key: Ed25519PrivateKey) -> None:
    manifest = _manifest()
    signed = manifest.to_bytes()
    got = verify_manifest(signed, _sign(key, signed), TrustedKeys([_raw(key)]), now=NOW)
    assert got == manifest
    assert got.temperature == 1.5
    assert parse_signatures(signatures_to_bytes(_sign(key, signed)))[0].keyid == key_id(_raw(key))


def test_refuses_untrusted_key_and_tampering(key: Ed25519PrivateKey) -> None:
    signed = _manifest().to_bytes()
    other = Ed25519PrivateKey.generate()
    with pytest.raises(SignatureError, match="not signed by a trusted key"):
        verify_manifest(signed, _sign(other, signed), TrustedKeys([_raw(key)]), now=NOW)
    tampered = signed.replace(b'"version":2', b'"version":9')
    with pytest.raises(SignatureError, match="bad signature"):
        verify_manifest(tampered, _sign(key, signed), TrustedKeys([_raw(key)]), now=NOW)
    with pytest.raises(SignatureError, match="unsigned"):
        verify_manifest(signed, (), TrustedKeys([_raw(key)]), now=NOW)


def test_refuses_expired_rollback_and_wrong_model(key: Ed25519PrivateKey) -> None:
    trusted = TrustedKeys([_raw(key)])
    expired = _manifest(expires=NOW - timedelta(seconds=1)).to_bytes()
    with pytest.raises(ManifestExpiredError):
        verify_manifest(expired, _sign(key, expired), trusted, now=NOW)
    old = _manifest(version=2).to_bytes()
    with pytest.raises(RollbackError, match="older than v3"):
        verify_manifest(old, _sign(key, old), trusted, now=NOW, min_version=3)
    with pytest.raises(ArtifactError, match="expected 'minilm'"):
        verify_manifest(old, _sign(key, old), trusted, now=NOW, model="minilm")


def test_refuses_path_traversal_in_file_names(key: Ed25519PrivateKey) -> None:
    evil = FileEntry("../../etc/passwd", 4, "0" * 64, "x.zst", 4, "0" * 64)
    doc = _manifest().to_json()
    doc["files"] = [evil.to_json()]
    doc["entrypoint"] = "../../etc/passwd"
    signed = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    with pytest.raises(ArtifactError, match="not a plain file name"):
        verify_manifest(signed, _sign(key, signed), TrustedKeys([_raw(key)]), now=NOW)


def _write_variant(
    folder: Path, key: Ed25519PrivateKey, payload: bytes, declared_size: int | None = None
) -> None:
    folder.mkdir(parents=True)
    stored = zstandard.ZstdCompressor().compress(payload)
    (folder / "model.onnx.zst").write_bytes(stored)
    entry = FileEntry(
        "model.onnx",
        declared_size if declared_size is not None else len(payload),
        hashlib.sha256(payload).hexdigest(),
        "model.onnx.zst",
        len(stored),
        hashlib.sha256(stored).hexdigest(),
    )
    manifest = _manifest(files=(entry,), expires=datetime.now(UTC) + timedelta(days=1))
    signed = manifest.to_bytes()
    (folder / MANIFEST_FILE).write_bytes(signed)
    (folder / SIGNATURES_FILE).write_bytes(signatures_to_bytes(_sign(key, signed)))


def test_unpack_verifies_and_is_idempotent(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    payload = np.arange(1000, dtype=np.float32).tobytes()
    _write_variant(tmp_path / "v", key, payload)
    variant = load_variant(tmp_path / "v", TrustedKeys([_raw(key)]))
    verify_stored_files(variant)
    out = unpack_variant(variant, tmp_path / "out")
    assert (out / "model.onnx").read_bytes() == payload
    assert unpack_variant(variant, tmp_path / "out") == out


def test_unpack_stops_a_decompression_bomb(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    payload = bytes(4 << 20)  # 4 MiB of zeros compresses to almost nothing
    _write_variant(tmp_path / "v", key, payload, declared_size=1024)
    variant = load_variant(tmp_path / "v")
    with pytest.raises(DigestError, match="past its 1024 bytes"):
        unpack_variant(variant, tmp_path / "out")
    assert not (tmp_path / "out" / "model.onnx").exists()
    assert not list((tmp_path / "out").glob(".*tmp"))


def test_unpack_refuses_corrupt_payload(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    _write_variant(tmp_path / "v", key, b"x" * 5000)
    (tmp_path / "v" / "model.onnx.zst").write_bytes(b"not zstd at all")
    variant = load_variant(tmp_path / "v")
    with pytest.raises(DigestError):
        verify_stored_files(variant)
    with pytest.raises(DigestError):
        unpack_variant(variant, tmp_path / "out")


def test_store_active_pointer(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    store = ModelStore(tmp_path)
    with pytest.raises(NoLocalModelError):
        store.active_variants("digits")
    _write_variant(tmp_path / "digits" / "1" / "onnx-int8", key, b"a" * 10)
    _write_variant(tmp_path / "digits" / "2" / "onnx-int8", key, b"b" * 10)
    version, variants = store.active_variants("digits")
    assert version == 2 and len(variants) == 1  # no pointer: the highest version
    before = store.active_token("digits")
    store.write_active("digits", ActivePointer(1, "onnx-int8", 2, "onnx-int8", 2))
    assert store.active_token("digits") != before
    pointer = store.read_active("digits")
    assert pointer is not None and pointer.version == 1 and pointer.max_accepted_version == 2
    assert store.active_variants("digits")[0] == 1
    with pytest.raises(ArtifactError):
        store.model_dir("../etc")
