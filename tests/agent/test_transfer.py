"""Chunk decisions (pure) and the staging folder (resume, digests, deltas), without a broker."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pytest
import zstandard

from tandem.agent.transfer import (
    Chunk,
    FileProgress,
    Staging,
    Step,
    apply_delta,
    decide_chunk,
)
from tandem.errors import DigestError
from tandem.sdk.artifacts import FileEntry, Manifest
from tests.agent.test_verify import manifest as make_manifest

# Mostly incompressible (like weights), so the stored file spans many chunks.
RAW = b"".join(hashlib.sha256(str(i).encode()).digest() for i in range(1500)) + bytes(4096)
STORED = zstandard.ZstdCompressor().compress(RAW)
ENTRY = FileEntry(
    "model.onnx",
    len(RAW),
    hashlib.sha256(RAW).hexdigest(),
    "model.onnx.zst",
    len(STORED),
    hashlib.sha256(STORED).hexdigest(),
)
LIMIT = 1 << 20


def full_chunk(offset: int, size: int = 100) -> Chunk:
    return Chunk(
        "t1",
        ENTRY.name,
        offset,
        STORED[offset : offset + size],
        ENTRY.stored_size,
        ENTRY.stored_sha256,
    )


def decide(progress: FileProgress, chunk: Chunk, bases: frozenset[int] = frozenset()) -> Step:
    return decide_chunk(progress, chunk, ENTRY, max_payload_bytes=LIMIT, delta_bases=bases).step


def test_chunk_decisions() -> None:
    empty = FileProgress(ENTRY.name)
    assert decide(empty, full_chunk(0)) is Step.APPEND
    assert decide(empty, full_chunk(100)) is Step.GAP
    started = replace(empty, offset=100, total_size=ENTRY.stored_size, sha256=ENTRY.stored_sha256)
    assert decide(started, full_chunk(0)) is Step.DUPLICATE
    assert decide(started, full_chunk(100)) is Step.APPEND
    assert decide(started, full_chunk(300)) is Step.GAP
    assert decide(replace(started, done=True), full_chunk(100)) is Step.DUPLICATE


def test_full_payload_must_match_the_signed_manifest() -> None:
    chunk = full_chunk(0)
    assert decide(FileProgress(ENTRY.name), replace(chunk, sha256="0" * 64)) is Step.REJECT
    assert decide(FileProgress(ENTRY.name), replace(chunk, total_size=5)) is Step.REJECT
    past = replace(full_chunk(0), offset=ENTRY.stored_size - 10)
    assert decide(FileProgress(ENTRY.name), past) is Step.REJECT


def test_delta_chunks_need_a_base_the_device_has() -> None:
    delta = Chunk("t1", ENTRY.name, 0, b"x" * 10, 50, "d" * 64, True, 2)
    assert decide(FileProgress(ENTRY.name), delta) is Step.REJECT
    assert decide(FileProgress(ENTRY.name), delta, frozenset({2})) is Step.APPEND
    huge = replace(delta, total_size=LIMIT + 1)
    assert decide(FileProgress(ENTRY.name), huge, frozenset({2})) is Step.REJECT


def test_a_changed_stream_restarts_the_file() -> None:
    delta_progress = FileProgress(ENTRY.name, 20, 50, "d" * 64, True, 2)
    assert decide(delta_progress, full_chunk(0), frozenset({2})) is Step.RESTART


def test_an_empty_chunk_at_the_end_completes() -> None:
    at_end = FileProgress(ENTRY.name, ENTRY.stored_size, ENTRY.stored_size, ENTRY.stored_sha256)
    final = Chunk("t1", ENTRY.name, ENTRY.stored_size, b"", ENTRY.stored_size, ENTRY.stored_sha256)
    assert decide(at_end, final) is Step.APPEND


def staged_manifest() -> Manifest:
    return make_manifest(files=(ENTRY,), entrypoint=ENTRY.name)


def feed(staging: Staging, upto: int, step: int = 1000) -> None:
    offset = staging.progress[ENTRY.name].offset
    while offset < upto:
        staging.append(ENTRY.name, full_chunk(offset, min(step, upto - offset)))
        offset = staging.progress[ENTRY.name].offset


def test_staging_resumes_from_the_persisted_offset(tmp_path: Path) -> None:
    m = staged_manifest()
    staging = Staging(tmp_path, "abc123", m, sync_every_bytes=1000)
    staging.open(m.to_bytes(), b"{}")
    feed(staging, 3000)
    # A crash after the bytes were written but before the offset was saved: extra bytes.
    with (staging.path / "model.onnx.part").open("ab") as fh:
        fh.write(b"junk that was never acknowledged")
    again = Staging(tmp_path, "abc123", m)
    again.open(m.to_bytes(), b"{}")
    assert again.progress[ENTRY.name].offset == 3000
    assert (again.path / "model.onnx.part").stat().st_size == 3000
    assert again.next_needed() == again.progress[ENTRY.name]
    feed(again, ENTRY.stored_size)
    again.finish_file(ENTRY, None)
    again.verify_complete()
    assert (again.path / "model.onnx").read_bytes() == RAW
    assert again.next_needed() is None
    saved = json.loads((again.path / "transfer.json").read_text())
    assert saved["files"][0]["done"] is True
    dest = tmp_path / "store" / "digits" / "3" / "onnx-int8"
    again.install_into(dest)
    assert (dest / "model.onnx").read_bytes() == RAW
    assert (dest / "model.onnx.zst").read_bytes() == STORED
    assert not (dest / "transfer.json").exists() and not again.path.exists()


def test_corrupt_payload_raises_and_starts_the_file_over(tmp_path: Path) -> None:
    m = staged_manifest()
    staging = Staging(tmp_path, "abc123", m)
    staging.open(m.to_bytes(), b"{}")
    offset = 0
    while offset < ENTRY.stored_size:
        chunk = full_chunk(offset, 1000)
        if offset == 0:
            chunk = replace(chunk, data=b"\x00" + chunk.data[1:])
        staging.append(ENTRY.name, chunk)
        offset += len(chunk.data)
    with pytest.raises(DigestError):
        staging.finish_file(ENTRY, None)
    assert staging.progress[ENTRY.name] == FileProgress(ENTRY.name)
    assert not (staging.path / "model.onnx").exists()


def test_delta_against_the_previous_file(tmp_path: Path) -> None:
    old = RAW
    new = RAW[:20000] + b"new head" * 100 + RAW[20000:]
    dictionary = zstandard.ZstdCompressionDict(old, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    delta = zstandard.ZstdCompressor(level=19, dict_data=dictionary).compress(new)
    assert len(delta) < len(zstandard.ZstdCompressor().compress(new)) / 2
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "model.onnx").write_bytes(old)
    (tmp_path / "delta").write_bytes(delta)
    entry = FileEntry(
        "model.onnx", len(new), hashlib.sha256(new).hexdigest(), "model.onnx.zst", 1, "x" * 64
    )
    apply_delta(tmp_path / "delta", tmp_path / "base" / "model.onnx", entry, tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == new
    # Against the wrong base the result cannot match the manifest.
    (tmp_path / "base" / "model.onnx").write_bytes(old[::-1])
    with pytest.raises(DigestError):
        apply_delta(tmp_path / "delta", tmp_path / "base" / "model.onnx", entry, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()
    # A delta that expands past the manifest's size stops at the limit.
    small = replace(entry, size=100)
    (tmp_path / "base" / "model.onnx").write_bytes(old)
    with pytest.raises(DigestError, match="past"):
        apply_delta(tmp_path / "delta", tmp_path / "base" / "model.onnx", small, tmp_path / "o3")


def test_block_delta_rebuilds_the_file_and_refuses_corruption(tmp_path: Path) -> None:
    from tandem.sdk.delta import make as make_block_delta  # the agent side needs no cloud code

    old = b"".join(hashlib.sha256(b"block %d" % i).digest() for i in range(6400))  # 200 KiB
    new = bytearray(old)
    new[5000:5100] = bytes(100)  # changed in place
    new = bytes(new[:90112]) + b"inserted" * 1024 + bytes(new[90112:])  # shifted two blocks
    delta = make_block_delta(old, new, block_size=4096)
    assert len(delta) < 2048, len(delta)  # the shifted blocks are copied from the old file
    base = tmp_path / "base.onnx"
    base.write_bytes(old)
    entry = FileEntry("model.onnx", len(new), hashlib.sha256(new).hexdigest(), "m.zst", 1, "x")
    (tmp_path / "delta").write_bytes(delta)
    apply_delta(tmp_path / "delta", base, entry, tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == new
    bad_ops = delta[:28] + zstandard.ZstdCompressor().compress(b"Q")  # header, then no op
    cases = {
        "truncated": (delta[: len(delta) - 20], "truncated"),
        "bad ops": (bad_ops, "unknown op"),
        "wrong version": (delta[:4] + b"\x09" + delta[5:], "version 9"),
        # A zstd frame asking for a 2 GiB window (descriptor 0xA8), empty raw last block.
        "window": (b"\x28\xb5\x2f\xfd\x00\xa8\x01\x00\x00", "too much memory"),
    }
    for label, (corrupt, reason) in cases.items():
        (tmp_path / "delta").write_bytes(corrupt)
        with pytest.raises(DigestError, match=reason):
            apply_delta(tmp_path / "delta", base, entry, tmp_path / label)
        assert not (tmp_path / label).exists(), label
    (tmp_path / "delta").write_bytes(delta)
    base.write_bytes(old[:-1])
    with pytest.raises(DigestError, match="base"):
        apply_delta(tmp_path / "delta", base, entry, tmp_path / "o2")


def test_offsets_are_saved_only_for_synced_bytes(tmp_path: Path) -> None:
    m = staged_manifest()
    staging = Staging(tmp_path, "abc123", m, sync_every_bytes=10**9)
    staging.open(m.to_bytes(), b"{}")
    feed(staging, 3000)
    assert staging.unsynced == 3000
    crashed = Staging(tmp_path, "abc123", m)
    crashed.open(m.to_bytes(), b"{}")  # nothing was synced: starts over, never trusts more
    assert crashed.progress[ENTRY.name].offset == 0
    assert not (crashed.path / "model.onnx.part").exists()
    feed(crashed, 2000)
    crashed.sync()
    assert crashed.unsynced == 0
    again = Staging(tmp_path, "abc123", m)
    again.open(m.to_bytes(), b"{}")
    assert again.progress[ENTRY.name].offset == 2000
    feed(again, ENTRY.stored_size)  # the last chunk of a file always syncs
    assert again.unsynced == 0
    again.finish_file(ENTRY, None)
    assert (again.path / "model.onnx").read_bytes() == RAW
