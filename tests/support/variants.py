"""Signed artifact variants written the way the build pipeline writes them, for every suite.

The agent's tiny ONNX variants (tests/agent/artifacts.py), the fleet's pseudo zoo
(tests/fleet/helpers.py) and the fakes that offer them over MQTT all go through here: one
ed25519 test key type, one way to compress a payload file into its manifest entry, one way to
sign a manifest into a variant folder, and one way to put that signed manifest on the wire.
What a suite varies (the payload, the manifest's fields, a lie about a size) stays with it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import zstandard
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tandem.protos.fleet.v1 import fleet_pb2
from tandem.sdk.artifacts import (
    MANIFEST_FILE,
    SIGNATURES_FILE,
    FileEntry,
    Manifest,
    SignatureEntry,
    key_id,
    signatures_to_bytes,
)


def signature(key: Ed25519PrivateKey, signed: bytes) -> SignatureEntry:
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return SignatureEntry(key_id(raw), key.sign(signed))


@dataclass(frozen=True)
class Signer:
    """A throwaway ed25519 key and the PEM file of its public half (what devices trust)."""

    key: Ed25519PrivateKey
    public_path: Path

    @classmethod
    def create(cls, folder: Path, name: str = "signing", *, private: bool = False) -> Signer:
        """Writes `folder/<name>.pub` (and `<name>.key`, PKCS#8 PEM, when `private`)."""
        folder.mkdir(parents=True, exist_ok=True)
        key = Ed25519PrivateKey.generate()
        if private:
            (folder / f"{name}.key").write_bytes(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
        public = folder / f"{name}.pub"
        public.write_bytes(
            key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        return cls(key, public)

    @property
    def keyid(self) -> str:
        return signature(self.key, b"").keyid

    def sign(self, signed: bytes) -> SignatureEntry:
        return signature(self.key, signed)


def pack(name: str, data: bytes, *, level: int = 3) -> tuple[FileEntry, bytes]:
    """The manifest entry of payload `name` and its zstd-compressed bytes (`name.zst`)."""
    stored = zstandard.ZstdCompressor(level=level).compress(data)
    entry = FileEntry(
        name=name,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        stored_as=f"{name}.zst",
        stored_size=len(stored),
        stored_sha256=hashlib.sha256(stored).hexdigest(),
    )
    return entry, stored


def signed_manifest(
    signed: bytes, signatures: Iterable[SignatureEntry]
) -> fleet_pb2.SignedManifest:
    """Manifest bytes and their signatures as the fleet sends them in a DesiredModel."""
    return fleet_pb2.SignedManifest(
        signed=signed,
        signatures=[fleet_pb2.Signature(keyid=s.keyid, sig=s.sig) for s in signatures],
    )


@dataclass(frozen=True)
class BuiltVariant:
    path: Path
    manifest: Manifest
    signed: bytes
    signatures: tuple[SignatureEntry, ...]

    def signed_manifest(self) -> fleet_pb2.SignedManifest:
        return signed_manifest(self.signed, self.signatures)


def write_signed_variant(
    folder: Path, key: Ed25519PrivateKey, manifest: Manifest, stored: Mapping[str, bytes]
) -> BuiltVariant:
    """Writes the stored files (name -> compressed bytes), then the manifest and its signature.

    The manifest is signed as given: a test that lies in it (a size, an expiry) gets a
    validly signed lie, which is what a compromised build would ship.
    """
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in stored.items():
        (folder / name).write_bytes(data)
    signed = manifest.to_bytes()
    entry = signature(key, signed)
    (folder / MANIFEST_FILE).write_bytes(signed)
    (folder / SIGNATURES_FILE).write_bytes(signatures_to_bytes([entry]))
    return BuiltVariant(folder, manifest, signed, (entry,))
