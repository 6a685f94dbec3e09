"""ed25519 signing keys for model manifests.

`generate_keypair` writes `signing.key` (PEM, PKCS#8, unencrypted, mode 0600) and
`signing.pub` (PEM, SubjectPublicKeyInfo). Devices trust the public key; the private key
stays with whoever builds the zoo. Verification lives in `tandem.sdk.artifacts`, which only
needs the raw public key.
"""

from __future__ import annotations

import logging
import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tandem.cloud.build.errors import KeyFileError
from tandem.sdk.artifacts import SignatureEntry, key_id
from tandem.sdk.atomic import PRIVATE, PUBLIC, write_atomic

log = logging.getLogger(__name__)

PRIVATE_KEY_FILE = "signing.key"
PUBLIC_KEY_FILE = "signing.pub"
PRIVATE_KEY_MODE = PRIVATE


def generate_keypair(out_dir: Path, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Writes a new key pair into `out_dir`; returns (private key path, public key path).

    Refuses to replace an existing key unless `overwrite`: losing a signing key means every
    device that trusts it has to be re-provisioned.
    """
    out_dir = Path(out_dir)
    key_path = out_dir / PRIVATE_KEY_FILE
    pub_path = out_dir / PUBLIC_KEY_FILE
    if not overwrite:
        for path in (key_path, pub_path):
            if path.exists():
                raise KeyFileError(f"{path} already exists; pass --force to replace it")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KeyFileError(f"cannot create key folder {out_dir}: {exc}") from exc
    private_key = Ed25519PrivateKey.generate()
    private_pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    try:
        # write_atomic gives the temp file its mode before the first byte: the private key
        # is never readable by others, not even for a moment.
        write_atomic(key_path, private_pem, mode=PRIVATE_KEY_MODE)
        write_atomic(pub_path, public_pem, mode=PUBLIC)
    except OSError as exc:
        raise KeyFileError(f"cannot write key pair into {out_dir}: {exc}") from exc
    signer = Signer(private_key)
    log.info("generated signing key %s (key id %s)", key_path, signer.keyid)
    return key_path, pub_path


class Signer:
    """Signs manifest bytes with one ed25519 private key."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self._public_raw = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @classmethod
    def from_file(cls, path: Path) -> Signer:
        path = Path(path)
        try:
            data = path.read_bytes()
            mode = stat.S_IMODE(path.stat().st_mode)
        except OSError as exc:
            raise KeyFileError(f"cannot read signing key {path}: {exc}") from exc
        if mode & 0o077:
            log.warning("signing key %s is readable by others (mode %o); chmod 600 it", path, mode)
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise KeyFileError(f"{path} is not an unencrypted PEM private key: {exc}") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise KeyFileError(f"{path} is a {type(key).__name__}, not an ed25519 private key")
        return cls(key)

    @property
    def public_key_raw(self) -> bytes:
        """The 32 raw public key bytes (what `tandem.sdk.artifacts.TrustedKeys` takes)."""
        return self._public_raw

    @property
    def keyid(self) -> str:
        return key_id(self._public_raw)

    def public_key_pem(self) -> bytes:
        return self._key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def sign(self, data: bytes) -> SignatureEntry:
        return SignatureEntry(self.keyid, self._key.sign(data))
