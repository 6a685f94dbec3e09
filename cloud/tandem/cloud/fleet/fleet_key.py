"""The fleet key: the fleet service's own ed25519 key, which signs every desired state.

A role separate from the release key that signs model manifests (TUF's split of roles): the
release key says "this artifact is genuine", the fleet key says "this device should run these
artifacts now, as of revision N". The private key stays with the fleet service (every replica
uses the same file); agents are provisioned with its public half (`tandem fleet fleet-key`,
`GET /v1/fleet-key`, or the `fleet.pub` written beside it) through `--fleet-key`.

`FleetKey.load_or_create` generates the key on first start (PKCS#8 PEM, mode 0600) without
ever replacing an existing one: two replicas starting at once on a shared folder end up with
the same key, because the file is linked into place only if nothing is there yet.
"""

from __future__ import annotations

import logging
import os
import stat
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tandem.errors import ConfigError
from tandem.protos.fleet.v1 import desired as signing
from tandem.protos.fleet.v1 import fleet_pb2
from tandem.sdk.artifacts import key_id

log = logging.getLogger(__name__)

DEFAULT_KEY_FILE = Path(".keys") / "fleet.key"  # under the service's artifacts folder
PUBLIC_SUFFIX = ".pub"  # fleet.key -> fleet.pub beside it


class FleetKey:
    """Signs desired states with one ed25519 private key."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        public = private_key.public_key()
        self.keyid = key_id(
            public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        )
        self.public_pem = public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    @classmethod
    def load_or_create(cls, path: Path) -> FleetKey:
        """The key at `path`, generated there first when the file does not exist."""
        path = Path(path)
        if not path.exists():
            _create(path)
        key = cls.load(path)
        public_path = path.with_suffix(PUBLIC_SUFFIX)
        try:
            if not public_path.exists() or public_path.read_bytes() != key.public_pem:
                public_path.write_bytes(key.public_pem)
        except OSError as exc:  # the private key is what matters; the copy is a convenience
            log.warning("cannot write the fleet public key %s: %s", public_path, exc)
        return key

    @classmethod
    def load(cls, path: Path) -> FleetKey:
        try:
            data = path.read_bytes()
            mode = stat.S_IMODE(path.stat().st_mode)
        except OSError as exc:
            raise ConfigError("fleet_key", f"cannot read {path}: {exc}") from exc
        if mode & 0o077:
            log.warning("fleet key %s is readable by others (mode %o); chmod 600 it", path, mode)
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise ConfigError("fleet_key", f"{path} is not an unencrypted PEM key: {exc}") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError("fleet_key", f"{path} is not an ed25519 private key")
        return cls(key)

    def sign(self, state: fleet_pb2.DesiredState, issued_at_ms: int) -> None:
        """Sets `state.signed` to this key's signature over what `state` asks for."""
        payload = signing.payload_for(state, issued_at_ms).SerializeToString()
        state.signed.CopyFrom(
            fleet_pb2.SignedDesiredState(
                payload=payload,
                signatures=[
                    fleet_pb2.Signature(
                        keyid=self.keyid, sig=self._key.sign(signing.signing_input(payload))
                    )
                ],
            )
        )


def _create(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        pem = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        # mkstemp creates the file 0600: the key is never readable by others, not even briefly.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(pem)
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(tmp, path)  # never over an existing key
            except FileExistsError:
                return  # another replica was first: use its key
        finally:
            os.unlink(tmp)
    except OSError as exc:
        raise ConfigError("fleet_key", f"cannot create a fleet key at {path}: {exc}") from exc
    log.info("generated the fleet key %s: provision agents with its public half", path)
