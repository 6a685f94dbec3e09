"""Model artifacts: the signed manifest, its verification, and unpacking a variant.

One artifact variant is a folder::

    <variant>/
        manifest.json        the signed bytes: canonical JSON (sorted keys, no spaces)
        manifest.sig.json    {"signatures": [{"keyid": "...", "sig": "<hex>"}]}
        model.onnx.zst       every payload file zstd-compressed (`stored_as` in the manifest)
        reference.npz.zst    reference inputs and outputs for correctness checks
        validation.npz.zst   (classifiers) validation inputs and labels, for the cascade threshold

The build pipeline writes `artifacts/<model>/<version>/<variant>/`; the device agent writes
the same layout into its model store with the payload files decompressed beside the .zst
(see `tandem.sdk.store`). Verification is pure (`verify_manifest` takes bytes and returns a
`Manifest`); the IO lives in `load_variant` and `unpack_variant`.

The manifest's `signed` document (schema version 1)::

    {"spec_version": 1, "type": "tandem/model-manifest",
     "model": "digits", "version": 3, "variant": "onnx-int8",
     "runtime": "onnx" | "tflite" | "openvino" | "torch",
     "hardware": "any" | "x86_64" | "aarch64",
     "precision": "int8" | "fp32", "task": "classification" | "embedding",
     "created": "2026-11-22T05:00:00Z", "expires": "2027-11-22T05:00:00Z",
     "entrypoint": "model.onnx",
     "files": [{"name": "model.onnx", "size": 1234, "sha256": "...",
                "stored_as": "model.onnx.zst", "stored_size": 999, "stored_sha256": "..."}],
     "inputs":  [{"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}],
     "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}],
     "calibration": {"method": "temperature", "temperature": 1.4} | null,
     "reference": "reference.npz", "validation": "validation.npz" | null,
     "metrics": {...free-form numbers from the build report...}}
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from tandem.errors import (
    ArtifactError,
    DigestError,
    ManifestExpiredError,
    RollbackError,
    SignatureError,
)
from tandem.sdk.atomic import atomic_open
from tandem.sdk.datatypes import DATATYPES

SPEC_VERSION = 1
MANIFEST_TYPE = "tandem/model-manifest"
MANIFEST_FILE = "manifest.json"
SIGNATURES_FILE = "manifest.sig.json"
RUNTIMES = ("onnx", "tflite", "openvino", "torch")
_COPY_CHUNK = 1 << 20  # bytes per read while hashing or decompressing


def canonical_json(document: Mapping[str, Any]) -> bytes:
    """The bytes that get signed: sorted keys, no whitespace, UTF-8."""
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def key_id(public_key_raw: bytes) -> str:
    return hashlib.sha256(public_key_raw).hexdigest()[:16]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]

    @property
    def dtype(self) -> np.dtype[Any]:
        return DATATYPES[self.datatype]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TensorSpec:
        datatype = str(data["datatype"])
        if datatype not in DATATYPES:
            raise ArtifactError(f"tensor {data.get('name')!r}: unknown datatype {datatype!r}")
        return cls(str(data["name"]), datatype, tuple(int(d) for d in data["shape"]))


@dataclass(frozen=True)
class FileEntry:
    name: str  # the uncompressed file name the runtime loads
    size: int  # bytes, uncompressed
    sha256: str  # of the uncompressed bytes
    stored_as: str  # the file on disk or on the wire (zstd-compressed)
    stored_size: int  # bytes, compressed
    stored_sha256: str  # of the compressed bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "size": self.size,
            "sha256": self.sha256,
            "stored_as": self.stored_as,
            "stored_size": self.stored_size,
            "stored_sha256": self.stored_sha256,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FileEntry:
        entry = cls(
            name=str(data["name"]),
            size=int(data["size"]),
            sha256=str(data["sha256"]),
            stored_as=str(data["stored_as"]),
            stored_size=int(data["stored_size"]),
            stored_sha256=str(data["stored_sha256"]),
        )
        for name in (entry.name, entry.stored_as):
            # Names come from outside: never let one climb out of its folder.
            if not name or name != os.path.basename(name) or name in (".", ".."):
                raise ArtifactError(f"manifest file name {name!r} is not a plain file name")
        return entry


@dataclass(frozen=True)
class Manifest:
    model: str
    version: int
    variant: str
    runtime: str
    hardware: str
    precision: str
    task: str
    created: datetime
    expires: datetime
    entrypoint: str
    files: tuple[FileEntry, ...]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    calibration: Mapping[str, Any] | None = None
    reference: str | None = "reference.npz"
    validation: str | None = None
    metrics: Mapping[str, Any] = field(default_factory=dict)

    @property
    def temperature(self) -> float:
        if self.calibration and "temperature" in self.calibration:
            return float(self.calibration["temperature"])
        return 1.0

    def file(self, name: str) -> FileEntry:
        for entry in self.files:
            if entry.name == name:
                return entry
        raise ArtifactError(f"{self.model} v{self.version} {self.variant}: no file {name!r}")

    def to_json(self) -> dict[str, Any]:
        return {
            "spec_version": SPEC_VERSION,
            "type": MANIFEST_TYPE,
            "model": self.model,
            "version": self.version,
            "variant": self.variant,
            "runtime": self.runtime,
            "hardware": self.hardware,
            "precision": self.precision,
            "task": self.task,
            "created": _format_time(self.created),
            "expires": _format_time(self.expires),
            "entrypoint": self.entrypoint,
            "files": [f.to_json() for f in self.files],
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
            "calibration": dict(self.calibration) if self.calibration else None,
            "reference": self.reference,
            "validation": self.validation,
            "metrics": dict(self.metrics),
        }

    def to_bytes(self) -> bytes:
        return canonical_json(self.to_json())

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Manifest:
        try:
            if data.get("type") != MANIFEST_TYPE:
                raise ArtifactError(f"not a tandem model manifest (type={data.get('type')!r})")
            if int(data["spec_version"]) != SPEC_VERSION:
                raise ArtifactError(f"manifest spec_version {data['spec_version']} unsupported")
            manifest = cls(
                model=str(data["model"]),
                version=int(data["version"]),
                variant=str(data["variant"]),
                runtime=str(data["runtime"]),
                hardware=str(data["hardware"]),
                precision=str(data["precision"]),
                task=str(data["task"]),
                created=_parse_time(str(data["created"])),
                expires=_parse_time(str(data["expires"])),
                entrypoint=str(data["entrypoint"]),
                files=tuple(FileEntry.from_json(f) for f in data["files"]),
                inputs=tuple(TensorSpec.from_json(t) for t in data["inputs"]),
                outputs=tuple(TensorSpec.from_json(t) for t in data["outputs"]),
                calibration=data.get("calibration"),
                reference=data.get("reference"),
                validation=data.get("validation"),
                metrics=data.get("metrics") or {},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"malformed manifest: {exc!r}") from exc
        if manifest.version < 1:
            raise ArtifactError(f"manifest version must be >= 1, got {manifest.version}")
        if manifest.runtime not in RUNTIMES:
            raise ArtifactError(f"manifest runtime {manifest.runtime!r} not one of {RUNTIMES}")
        manifest.file(manifest.entrypoint)
        return manifest


def _format_time(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


# --- signing and verification -----------------------------------------------------------


@dataclass(frozen=True)
class SignatureEntry:
    keyid: str
    sig: bytes


def parse_signatures(data: bytes) -> tuple[SignatureEntry, ...]:
    try:
        doc = json.loads(data)
        return tuple(
            SignatureEntry(str(s["keyid"]), bytes.fromhex(str(s["sig"]))) for s in doc["signatures"]
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise SignatureError(f"malformed signature file: {exc!r}") from exc


def signatures_to_bytes(signatures: Iterable[SignatureEntry]) -> bytes:
    return canonical_json(
        {"signatures": [{"keyid": s.keyid, "sig": s.sig.hex()} for s in signatures]}
    )


class TrustedKeys:
    """The ed25519 public keys a verifier accepts, by key id."""

    def __init__(self, public_keys_raw: Iterable[bytes]) -> None:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        self._keys = {
            key_id(raw): Ed25519PublicKey.from_public_bytes(raw) for raw in public_keys_raw
        }
        if not self._keys:
            raise SignatureError("no trusted public keys configured")

    @classmethod
    def from_files(cls, paths: Iterable[str | os.PathLike[str]]) -> TrustedKeys:
        return cls(load_public_key_raw(Path(p)) for p in paths)

    def verify(self, signed: bytes, signatures: Sequence[SignatureEntry]) -> str:
        """Returns the id of the trusted key that signed `signed`, or raises SignatureError."""
        from cryptography.exceptions import InvalidSignature

        if not signatures:
            raise SignatureError("manifest is unsigned")
        for entry in signatures:
            key = self._keys.get(entry.keyid)
            if key is None:
                continue
            try:
                key.verify(entry.sig, signed)
            except InvalidSignature:
                raise SignatureError(f"bad signature from key {entry.keyid}") from None
            return entry.keyid
        raise SignatureError(
            "manifest is not signed by a trusted key (signed by: "
            + ", ".join(s.keyid for s in signatures)
            + ")"
        )


def load_public_key_raw(path: Path) -> bytes:
    """Raw 32-byte ed25519 public key from a PEM file written by `tandem keys generate`."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise SignatureError(f"cannot read public key {path}: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(f"{path} is not an ed25519 public key")
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def verify_manifest(
    signed: bytes,
    signatures: Sequence[SignatureEntry],
    trusted: TrustedKeys,
    *,
    now: datetime | None = None,
    min_version: int | None = None,
    model: str | None = None,
) -> Manifest:
    """Checks the signature first, then parses; refuses expired and rolled-back manifests."""
    trusted.verify(signed, signatures)
    try:
        document = json.loads(signed)
    except ValueError as exc:
        raise ArtifactError(f"signed manifest is not JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise ArtifactError("signed manifest is not a JSON object")
    manifest = Manifest.from_json(document)
    current = now or datetime.now(UTC)
    if manifest.expires <= current:
        raise ManifestExpiredError(
            f"{manifest.model} v{manifest.version} manifest expired at "
            f"{_format_time(manifest.expires)}"
        )
    if model is not None and manifest.model != model:
        raise ArtifactError(f"manifest is for model {manifest.model!r}, expected {model!r}")
    if min_version is not None and manifest.version < min_version:
        raise RollbackError(
            f"{manifest.model} v{manifest.version} is older than v{min_version}, "
            "which this device already accepted"
        )
    return manifest


# --- reading variants from disk ---------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """A verified variant on disk: its folder and its manifest."""

    path: Path
    manifest: Manifest

    def stored_path(self, name: str) -> Path:
        return self.path / self.manifest.file(name).stored_as


def read_manifest_unverified(variant_dir: Path) -> Manifest:
    """Parses a variant's manifest without checking its signature (for local, trusted dirs)."""
    try:
        document = json.loads((variant_dir / MANIFEST_FILE).read_bytes())
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"cannot read manifest in {variant_dir}: {exc}") from exc
    return Manifest.from_json(document)


def load_variant(variant_dir: Path, trusted: TrustedKeys | None = None) -> Variant:
    """Reads a variant folder; with `trusted`, verifies its signature and expiry too."""
    if trusted is None:
        return Variant(variant_dir, read_manifest_unverified(variant_dir))
    try:
        signed = (variant_dir / MANIFEST_FILE).read_bytes()
        signatures = parse_signatures((variant_dir / SIGNATURES_FILE).read_bytes())
    except OSError as exc:
        raise ArtifactError(f"cannot read manifest in {variant_dir}: {exc}") from exc
    return Variant(variant_dir, verify_manifest(signed, signatures, trusted))


def sha256_file(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as fh:
        while chunk := fh.read(_COPY_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def verify_stored_files(variant: Variant) -> None:
    """Checks every compressed file's size and sha256 against the manifest."""
    for entry in variant.manifest.files:
        path = variant.path / entry.stored_as
        if not path.exists():
            raise DigestError(f"{path.name}: missing")
        digest, size = sha256_file(path)
        if size != entry.stored_size:
            raise DigestError(f"{path.name}: size {size} != manifest {entry.stored_size}")
        if digest != entry.stored_sha256:
            raise DigestError(f"{path.name}: sha256 mismatch")


def decompress_file(source: Path, entry: FileEntry, dest: Path) -> None:
    """Decompresses `source` into `dest` atomically, checking size and sha256 as it streams.

    The size limit is enforced while streaming, so a decompression bomb stops at
    `entry.size` bytes instead of filling the disk.
    """
    import zstandard

    digest = hashlib.sha256()
    written = 0
    try:
        with atomic_open(dest) as out, source.open("rb") as raw:
            reader = zstandard.ZstdDecompressor().stream_reader(raw)
            while chunk := reader.read(_COPY_CHUNK):
                written += len(chunk)
                if written > entry.size:
                    raise DigestError(f"{entry.name}: decompresses past its {entry.size} bytes")
                digest.update(chunk)
                out.write(chunk)
            # Checked inside the block: a mismatch discards the file instead of replacing dest.
            if written != entry.size:
                raise DigestError(f"{entry.name}: size {written} != manifest {entry.size}")
            if digest.hexdigest() != entry.sha256:
                raise DigestError(f"{entry.name}: sha256 mismatch after decompression")
    except zstandard.ZstdError as exc:
        raise DigestError(f"{entry.name}: corrupt zstd data: {exc}") from exc


def unpacked_is_complete(variant: Variant, dest: Path) -> bool:
    for entry in variant.manifest.files:
        path = dest / entry.name
        if not path.exists() or path.stat().st_size != entry.size:
            return False
    return True


def unpack_variant(variant: Variant, dest: Path | None = None, *, verify: bool = True) -> Path:
    """Decompresses every payload file of `variant` into `dest` (default: beside the .zst).

    Already-unpacked files of the right size are kept, so this is cheap after the first call.
    Returns the folder holding the uncompressed files.
    """
    target = dest or variant.path
    if unpacked_is_complete(variant, target):
        return target
    for entry in variant.manifest.files:
        path = target / entry.name
        intact = path.exists() and path.stat().st_size == entry.size
        if intact and (not verify or sha256_file(path)[0] == entry.sha256):
            continue
        decompress_file(variant.path / entry.stored_as, entry, path)
    return target


def load_npz(path: Path) -> dict[str, np.ndarray[Any, Any]]:
    """Reads an .npz of plain arrays (never pickles: these files can come from outside)."""
    with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def split_reference(
    arrays: Mapping[str, np.ndarray[Any, Any]],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Splits a reference .npz into inputs (`input.<name>`) and outputs (`output.<name>`)."""
    inputs = {k.removeprefix("input."): v for k, v in arrays.items() if k.startswith("input.")}
    outputs = {k.removeprefix("output."): v for k, v in arrays.items() if k.startswith("output.")}
    return inputs, outputs
