"""Artifact delivery: the bytes that answer a device's ChunkRequest.

For each requested file the service sends one *payload*, in chunks from the requested offset
to its end (so a transfer resumes from the last chunk the device kept):

- the stored file as built (`FileEntry.stored_as`, zstd-compressed; the device checks
  `stored_sha256` and decompresses), or
- a *delta* when the device offers a version it has (`ChunkRequest.have_version`,
  `accept_delta`) whose same-named file of the same variant the service holds. Files up to
  `DICT_DELTA_MAX` get a zstd frame of the new uncompressed file with the old one as a
  raw-content dictionary; larger files a *block delta* (`make_block_delta`): the new file in
  `BLOCK_SIZE` blocks, each copied from an equal block of the old file, XORed with the old
  block at the same offset or sent literally, the whole op stream zstd-compressed. The
  device tells the two apart by their first bytes, rebuilds the file from its old one and
  checks the manifest's `sha256` of the result. The delta is used only when smaller than
  the stored file.

Payloads are deterministic, so a resumed transfer continues with the same bytes; they are
cached (bounded by bytes) because computing a delta costs far more than sending it.
"""

from __future__ import annotations

import hashlib
import io
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import zstandard

from tandem.errors import ArtifactError
from tandem.protos.fleet.v1 import fleet_pb2
from tandem.sdk import delta as block_delta
from tandem.sdk.artifacts import FileEntry, Manifest

from .errors import NotFoundError
from .store import Artifact

log = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 64 * 1024  # bytes of payload per ArtifactChunk
DELTA_LEVEL = 19
# Uncompressed file size up to which the zstd-dictionary delta is used (bytes). A match into
# the old file (a raw-content dictionary before the new one) must lie within the
# compressor's window, 8 MiB at level 19: for a larger file an unchanged byte sits further
# back than that and the delta comes out at about the stored size after minutes of CPU (a
# 253 MiB SmolLM2 variant with one tensor changed). python-zstandard has no
# ZSTD_CCtx_refPrefix (`zstd --patch-from`), and long-distance matching does not search a
# dictionary: a 64 MiB random file with 6 KiB changed gave a 66 MB frame at window_log 28
# with enable_ldm. Larger files get the block delta instead.
DICT_DELTA_MAX = 1 << zstandard.ZstdCompressionParameters.from_level(DELTA_LEVEL).window_log

# Files over DICT_DELTA_MAX get a block delta (tandem.sdk.delta: the format, made here and
# applied by the agent).
BLOCK_SIZE = block_delta.BLOCK_SIZE


@dataclass(frozen=True)
class Payload:
    data: bytes
    sha256: str
    is_delta: bool
    base_version: int
    full_size: int  # bytes of the stored (non-delta) file, for comparison and reports


def manifest_of(artifact: Artifact) -> Manifest:
    import json

    try:
        return Manifest.from_json(json.loads(artifact.manifest))
    except (ValueError, ArtifactError) as exc:
        raise NotFoundError(
            f"stored manifest of {artifact.model} v{artifact.version} is bad"
        ) from exc


def find_file(manifest: Manifest, name: str) -> FileEntry:
    for entry in manifest.files:
        if name in (entry.name, entry.stored_as):
            return entry
    raise NotFoundError(
        f"{manifest.model} v{manifest.version} {manifest.variant}: no file {name!r}"
    )


def _decompressed(path: Path, entry: FileEntry) -> bytes:
    with zstandard.ZstdDecompressor().stream_reader(path.read_bytes()) as reader:
        data = reader.read(entry.size + 1)
    if len(data) != entry.size or hashlib.sha256(data).hexdigest() != entry.sha256:
        raise NotFoundError(f"{path} does not decompress to its manifest's digest")
    return data


def make_delta(old: bytes, new: bytes, level: int = DELTA_LEVEL) -> bytes:
    """A delta that rebuilds `new` from `old` (what the agent reverses): zstd with `old` as a
    raw-content dictionary for files up to DICT_DELTA_MAX, else a block delta."""
    if max(len(old), len(new)) > DICT_DELTA_MAX:
        return make_block_delta(old, new)
    dictionary = zstandard.ZstdCompressionDict(old, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    return zstandard.ZstdCompressor(level=level, dict_data=dictionary).compress(new)


def make_block_delta(old: bytes, new: bytes, block_size: int = BLOCK_SIZE) -> bytes:
    """The block delta of `new` against `old` (tandem.sdk.delta)."""
    return block_delta.make(old, new, block_size)


def apply_delta(old: bytes, delta: bytes, max_size: int) -> bytes:
    """`new` from `old` and a delta of make_delta (at most max_size + 1 bytes of it)."""
    if block_delta.is_block_delta(delta):
        return _apply_block_delta(old, delta, max_size)
    dictionary = zstandard.ZstdCompressionDict(old, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    with zstandard.ZstdDecompressor(dict_data=dictionary).stream_reader(delta) as reader:
        return reader.read(max_size + 1)


def _apply_block_delta(old: bytes, delta: bytes, max_size: int) -> bytes:
    head = delta[: block_delta.HEADER.size]
    new_size = block_delta.HEADER.unpack(head)[4] if len(head) == block_delta.HEADER.size else 0
    if new_size > max_size:
        raise ValueError(f"block delta makes {new_size} bytes, over {max_size}")
    out = bytearray()
    block_delta.apply(head, io.BytesIO(delta[len(head) :]), io.BytesIO(old), new_size, out.extend)
    return bytes(out)


class Delivery:
    """Builds and caches payloads; thread-safe."""

    def __init__(self, chunk_size: int = DEFAULT_CHUNK_SIZE, cache_bytes: int = 256 << 20) -> None:
        if chunk_size < 1024:
            raise ValueError(f"chunk_size must be >= 1024 bytes, got {chunk_size}")
        self.chunk_size = chunk_size
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[tuple[object, ...], Payload] = OrderedDict()
        self._cached = 0
        self._lock = threading.Lock()
        self._building: dict[tuple[object, ...], threading.Lock] = {}

    def payload(self, artifact: Artifact, file: str, base: Artifact | None = None) -> Payload:
        """The payload for `file` of `artifact`, a delta against `base` when that is smaller."""
        key = (
            artifact.model,
            artifact.version,
            artifact.variant,
            file,
            base.version if base else 0,
        )
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
            building = self._building.setdefault(key, threading.Lock())
        with building:  # one builder per payload; the others wait for its result
            with self._lock:
                hit = self._cache.get(key)
                if hit is not None:
                    return hit
            result = self._build(artifact, file, base)
            with self._lock:
                self._cache[key] = result
                self._cached += len(result.data)
                while self._cached > self.cache_bytes and len(self._cache) > 1:
                    _, old = self._cache.popitem(last=False)
                    self._cached -= len(old.data)
                self._building.pop(key, None)
            return result

    def _build(self, artifact: Artifact, file: str, base: Artifact | None) -> Payload:
        manifest = manifest_of(artifact)
        entry = find_file(manifest, file)
        stored_path = Path(artifact.path) / entry.stored_as
        try:
            stored = stored_path.read_bytes()
        except OSError as exc:
            raise NotFoundError(f"artifact file {stored_path} is missing: {exc}") from exc
        full = Payload(stored, hashlib.sha256(stored).hexdigest(), False, 0, len(stored))
        if base is None or base.version == artifact.version:
            return full
        try:
            base_entry = find_file(manifest_of(base), entry.name)
        except NotFoundError:
            return full
        try:
            old = _decompressed(Path(base.path) / base_entry.stored_as, base_entry)
            new = _decompressed(stored_path, entry)
        except (OSError, NotFoundError, zstandard.ZstdError) as exc:
            log.warning("no delta for %s v%s %s: %s", artifact.model, artifact.version, file, exc)
            return full
        delta = make_delta(old, new)
        log.info(
            "delta %s v%s->v%s %s %s: %d bytes vs %d full",
            artifact.model,
            base.version,
            artifact.version,
            artifact.variant,
            entry.name,
            len(delta),
            len(stored),
        )
        if len(delta) >= len(stored):
            return full
        return Payload(delta, hashlib.sha256(delta).hexdigest(), True, base.version, len(stored))

    def chunks(
        self, request: fleet_pb2.ChunkRequest, payload: Payload
    ) -> Iterator[fleet_pb2.ArtifactChunk]:
        """The chunks from the requested offset (any byte offset) to the end. An offset at or
        past the end gets one empty chunk at the end, so the device still learns the size and
        digest it should have."""
        total = len(payload.data)
        offset = min(int(request.offset), total)
        first = True
        while offset < total or first:
            first = False
            end = min(offset + self.chunk_size, total)
            yield fleet_pb2.ArtifactChunk(
                transfer_id=request.transfer_id,
                model=request.model,
                version=request.version,
                variant=request.variant,
                file=request.file,
                offset=offset,
                data=payload.data[offset:end],
                total_size=total,
                sha256=payload.sha256,
                is_delta=payload.is_delta,
                delta_base_version=payload.base_version,
            )
            offset = end
