"""Resumable chunked transfer of a variant's files.

`decide_chunk` is pure: given what has been persisted of one file and an incoming chunk, it
says append, ignore, re-request or restart. `Staging` is the IO around it: a folder under
the agent's private directory holding the signed manifest, one `.part` file per payload and
`transfer.json` with the persisted offsets, so a transfer resumes from the last chunk after
a disconnect or a restart of either side.

Write order: payload bytes are appended as chunks arrive; every `sync_every_bytes` (and on
`sync()`, which the agent calls when the stream pauses, and when a file completes) the
`.part` files are fsynced and only then the offsets saved (atomic replace). The saved
offset therefore never claims bytes that are not durable; after a crash the `.part` may be
longer than it, never shorter, and is truncated back on resume. Syncing per chunk would cost
three fsyncs per 64 KiB, which dominates on a device's flash storage.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path
from typing import Any, BinaryIO

from tandem.agent.errors import TransferError
from tandem.errors import DigestError
from tandem.sdk import delta as block_delta
from tandem.sdk.artifacts import (
    MANIFEST_FILE,
    SIGNATURES_FILE,
    FileEntry,
    Manifest,
    decompress_file,
    sha256_file,
)
from tandem.sdk.atomic import atomic_open, write_atomic

log = logging.getLogger(__name__)

TRANSFER_FILE = "transfer.json"
_COPY_CHUNK = 1 << 20


@dataclass(frozen=True)
class Chunk:
    """The fields of an ArtifactChunk that matter, as plain values."""

    transfer_id: str
    file: str
    offset: int
    data: bytes
    total_size: int
    sha256: str
    is_delta: bool = False
    delta_base_version: int = 0


@dataclass(frozen=True)
class FileProgress:
    """What has been persisted of one file's payload (full .zst or delta)."""

    name: str  # FileEntry.name
    offset: int = 0  # payload bytes persisted
    total_size: int = 0  # payload bytes in all; 0 until the first chunk
    sha256: str = ""  # of the whole payload, from the stream
    is_delta: bool = False
    delta_base_version: int = 0
    done: bool = False

    @property
    def started(self) -> bool:
        return self.total_size > 0

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "offset": self.offset,
            "total_size": self.total_size,
            "sha256": self.sha256,
            "is_delta": self.is_delta,
            "delta_base_version": self.delta_base_version,
            "done": self.done,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FileProgress:
        return cls(
            name=str(data["name"]),
            offset=int(data["offset"]),
            total_size=int(data["total_size"]),
            sha256=str(data["sha256"]),
            is_delta=bool(data["is_delta"]),
            delta_base_version=int(data["delta_base_version"]),
            done=bool(data["done"]),
        )


class Step(Enum):
    APPEND = "append"  # write chunk.data at progress.offset
    DUPLICATE = "duplicate"  # already have these bytes: ignore
    GAP = "gap"  # a chunk went missing: re-request from progress.offset
    RESTART = "restart"  # the stream changed (other payload): drop the file, start over
    REJECT = "reject"  # the chunk is unacceptable: re-request the full file


@dataclass(frozen=True)
class Decision:
    step: Step
    why: str = ""


def decide_chunk(
    progress: FileProgress,
    chunk: Chunk,
    entry: FileEntry,
    *,
    max_payload_bytes: int,
    delta_bases: frozenset[int],
) -> Decision:
    """What to do with one chunk of `entry`'s payload. Pure."""
    end = chunk.offset + len(chunk.data)
    if chunk.is_delta:
        if chunk.delta_base_version not in delta_bases:
            return Decision(Step.REJECT, f"delta against v{chunk.delta_base_version}, not here")
        if chunk.total_size > max_payload_bytes or chunk.total_size <= 0:
            return Decision(Step.REJECT, f"delta of {chunk.total_size} bytes is out of bounds")
    else:
        # The signed manifest says what the full payload is: a stream claiming otherwise
        # cannot turn into the right file.
        if chunk.total_size != entry.stored_size or chunk.sha256 != entry.stored_sha256:
            return Decision(Step.REJECT, "full payload does not match the signed manifest")
    if end > chunk.total_size:
        return Decision(Step.REJECT, f"chunk ends at {end}, past total {chunk.total_size}")
    if progress.done:
        return Decision(Step.DUPLICATE, "file already complete")
    if progress.started and (
        progress.is_delta != chunk.is_delta
        or progress.sha256 != chunk.sha256
        or progress.total_size != chunk.total_size
        or progress.delta_base_version != chunk.delta_base_version
    ):
        return Decision(Step.RESTART, "the payload stream changed")
    if chunk.offset == progress.offset:
        if not chunk.data and end != chunk.total_size:
            return Decision(Step.DUPLICATE, "empty chunk")
        return Decision(Step.APPEND)
    if chunk.offset < progress.offset:
        return Decision(Step.DUPLICATE, f"offset {chunk.offset} < {progress.offset}")
    return Decision(Step.GAP, f"offset {chunk.offset} > {progress.offset}")


def started_from(progress: FileProgress, chunk: Chunk) -> FileProgress:
    """Progress for a stream that starts (or restarts) with `chunk`'s payload."""
    return replace(
        progress,
        offset=0,
        total_size=chunk.total_size,
        sha256=chunk.sha256,
        is_delta=chunk.is_delta,
        delta_base_version=chunk.delta_base_version,
        done=False,
    )


class Staging:
    """One delivery's staging folder: `.agent/staging/<transfer_id>/`."""

    def __init__(
        self,
        root: Path,
        transfer_id: str,
        manifest: Manifest,
        *,
        sync_every_bytes: int = 1 << 20,
    ) -> None:
        if not transfer_id.isalnum():
            raise TransferError(f"transfer id {transfer_id!r} is not alphanumeric")
        self.path = root / transfer_id
        self.transfer_id = transfer_id
        self.manifest = manifest
        self.progress: dict[str, FileProgress] = {
            e.name: FileProgress(e.name) for e in manifest.files
        }
        self._hashers: dict[str, Any] = {}
        self.sync_every_bytes = sync_every_bytes  # bytes appended between fsync + save
        self._dirty: set[str] = set()  # .part files with bytes not yet fsynced
        self._unsynced = 0  # bytes appended since the last sync

    # --- lifecycle

    def open(self, signed: bytes, signature_bytes: bytes) -> None:
        """Creates the folder, or resumes one left by an earlier run of the same transfer."""
        self.path.mkdir(parents=True, exist_ok=True)
        manifest_path = self.path / MANIFEST_FILE
        if not manifest_path.exists() or manifest_path.read_bytes() != signed:
            write_atomic(manifest_path, signed)
            write_atomic(self.path / SIGNATURES_FILE, signature_bytes)
        state_path = self.path / TRANSFER_FILE
        try:
            saved = json.loads(state_path.read_bytes())
            for item in saved.get("files", []):
                progress = FileProgress.from_json(item)
                if progress.name in self.progress:
                    self.progress[progress.name] = progress
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning(
                "staging %s: unreadable %s (%s); starting over", self.path, TRANSFER_FILE, exc
            )
        for name, progress in list(self.progress.items()):
            if progress.done:
                if not (self.path / name).exists():
                    self.progress[name] = FileProgress(name)
                continue
            self._truncate_to(progress)

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    # --- state

    def next_needed(self) -> FileProgress | None:
        for entry in self.manifest.files:
            progress = self.progress[entry.name]
            if not progress.done:
                return progress
        return None

    @property
    def bytes_received(self) -> int:
        return sum(
            self.manifest.file(p.name).stored_size if p.done else p.offset
            for p in self.progress.values()
        )

    @property
    def bytes_total(self) -> int:
        return sum(e.stored_size for e in self.manifest.files)

    @property
    def unsynced(self) -> int:
        return self._unsynced

    def sync(self) -> None:
        """Makes every appended byte durable, then saves the offsets that cover them."""
        self._save()

    def _save(self) -> None:
        for name in sorted(self._dirty):
            part = self._part(name)
            if part.exists():
                fd = os.open(part, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        self._dirty.clear()
        self._unsynced = 0
        doc = {
            "transfer_id": self.transfer_id,
            "files": [p.to_json() for p in self.progress.values()],
        }
        write_atomic(self.path / TRANSFER_FILE, json.dumps(doc, sort_keys=True).encode())

    def _part(self, name: str) -> Path:
        return self.path / f"{name}.part"

    def _truncate_to(self, progress: FileProgress) -> None:
        part = self._part(progress.name)
        hasher = hashlib.sha256()
        if progress.offset == 0 or not part.exists():
            part.unlink(missing_ok=True)
            if progress.offset:
                self.progress[progress.name] = replace(progress, offset=0)
        else:
            size = part.stat().st_size
            if size < progress.offset:
                # Persisted offset claims more than the disk has: trust the disk.
                self.progress[progress.name] = replace(progress, offset=0)
                part.unlink()
            else:
                with part.open("r+b") as fh:
                    fh.truncate(progress.offset)
                    fh.seek(0)
                    remaining = progress.offset
                    while remaining:
                        block = fh.read(min(_COPY_CHUNK, remaining))
                        if not block:
                            break
                        hasher.update(block)
                        remaining -= len(block)
        self._hashers[progress.name] = hasher

    # --- writes

    def restart_file(self, name: str, progress: FileProgress) -> None:
        self._part(name).unlink(missing_ok=True)
        self.progress[name] = progress
        self._hashers[name] = hashlib.sha256()
        self._save()

    def append(self, name: str, chunk: Chunk) -> FileProgress:
        """Appends a chunk at the current offset; syncs every `sync_every_bytes`."""
        progress = self.progress[name]
        if not progress.started:
            progress = started_from(progress, chunk)
        part = self._part(name)
        with part.open("ab") as fh:
            if fh.tell() != progress.offset:
                fh.truncate(progress.offset)
                fh.seek(progress.offset)
            fh.write(chunk.data)
        self._dirty.add(name)
        self._unsynced += len(chunk.data)
        self._hashers.setdefault(name, hashlib.sha256()).update(chunk.data)
        progress = replace(progress, offset=progress.offset + len(chunk.data))
        self.progress[name] = progress
        if self._unsynced >= self.sync_every_bytes or progress.offset >= progress.total_size:
            self._save()
        return progress

    def finish_file(self, entry: FileEntry, delta_base_dir: Path | None) -> None:
        """Turns a complete payload into the verified uncompressed file (raises DigestError)."""
        progress = self.progress[entry.name]
        part = self._part(entry.name)
        digest = self._hashers[entry.name].hexdigest()
        if digest != progress.sha256:
            self.restart_file(entry.name, FileProgress(entry.name))
            raise DigestError(f"{entry.name}: payload sha256 does not match its stream header")
        try:
            if progress.is_delta:
                if delta_base_dir is None:
                    raise DigestError(
                        f"{entry.name}: delta base v{progress.delta_base_version} gone"
                    )
                apply_delta(part, delta_base_dir / entry.name, entry, self.path / entry.name)
                part.unlink()
            else:
                stored = self.path / entry.stored_as
                os.replace(part, stored)
                decompress_file(stored, entry, self.path / entry.name)
        except DigestError:
            self.restart_file(entry.name, FileProgress(entry.name))
            (self.path / entry.stored_as).unlink(missing_ok=True)
            raise
        self.progress[entry.name] = replace(progress, done=True)
        self._save()

    def verify_complete(self) -> None:
        """Every uncompressed file matches the manifest's size and sha256."""
        for entry in self.manifest.files:
            digest, size = sha256_file(self.path / entry.name)
            if size != entry.size or digest != entry.sha256:
                raise DigestError(f"{entry.name}: does not match the manifest after staging")

    def install_into(self, dest: Path) -> None:
        """Moves the staged variant into the model store (same filesystem: one rename)."""
        for name in (TRANSFER_FILE,):
            (self.path / name).unlink(missing_ok=True)
        for leftover in self.path.glob("*.part"):
            leftover.unlink()
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            trash = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.old."))
            os.replace(dest, trash / dest.name)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(self.path, dest)
        fd = os.open(dest.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# A zstd frame in a delta may ask for a window up to this; a larger one is refused.
MAX_DELTA_WINDOW = block_delta.MAX_WINDOW


def apply_delta(delta: Path, base: Path, entry: FileEntry, dest: Path) -> None:
    """Rebuilds `entry` from the previous version's file `base` and a delta payload: a zstd
    frame with `base` as raw-content dictionary, or a block delta (told apart by its magic).

    Streams with the manifest's size as the limit, then checks the manifest's sha256; the
    result replaces `dest` atomically. Any malformed delta raises DigestError.
    """
    import zstandard

    try:
        with delta.open("rb") as raw:
            head = raw.read(block_delta.HEADER.size)
    except OSError as exc:
        raise DigestError(f"{entry.name}: delta unreadable: {exc}") from exc
    digest = hashlib.sha256()
    written = 0

    def emit(out: BinaryIO, block: bytes) -> None:
        nonlocal written
        written += len(block)
        if written > entry.size:
            raise DigestError(f"{entry.name}: delta expands past {entry.size} bytes")
        digest.update(block)
        out.write(block)

    try:
        if block_delta.is_block_delta(head):
            with atomic_open(dest) as out, delta.open("rb") as raw, base.open("rb") as old:
                raw.seek(len(head))
                block_delta.apply(head, raw, old, entry.size, lambda b: emit(out, b), entry.name)
                if written != entry.size or digest.hexdigest() != entry.sha256:
                    raise DigestError(f"{entry.name}: delta result does not match the manifest")
            return
        try:
            base_bytes = base.read_bytes()
        except OSError as exc:
            raise DigestError(f"{entry.name}: delta base unreadable: {exc}") from exc
        dictionary = zstandard.ZstdCompressionDict(
            base_bytes, dict_type=zstandard.DICT_TYPE_RAWCONTENT
        )
        decompressor = zstandard.ZstdDecompressor(
            dict_data=dictionary, max_window_size=MAX_DELTA_WINDOW
        )
        with atomic_open(dest) as out, delta.open("rb") as raw:
            reader = decompressor.stream_reader(raw)
            while block := reader.read(_COPY_CHUNK):
                emit(out, block)
            # Checked inside the block: a mismatch discards the file instead of replacing dest.
            if written != entry.size or digest.hexdigest() != entry.sha256:
                raise DigestError(f"{entry.name}: delta result does not match the manifest")
    except block_delta.DeltaError as exc:
        raise DigestError(str(exc)) from exc
    except zstandard.ZstdError as exc:
        raise DigestError(f"{entry.name}: corrupt zstd delta: {exc}") from exc
    except OSError as exc:
        raise DigestError(f"{entry.name}: delta base unreadable: {exc}") from exc
