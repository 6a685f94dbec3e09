"""The block delta: how a large artifact file's new version is sent as changes to the old.

The fleet makes it (`tandem.cloud.fleet.delivery`) and the device agent applies it
(`tandem.agent.transfer`); the format lives here, once, where both may import it. Files up
to the zstd window of the other delta kind (a zstd frame with the old file as raw-content
dictionary, 8 MiB at level 19) use that one; a dictionary does not reach further back, and
long-distance matching does not search it (a 64 MiB file with 6 KiB changed came out at
66 MB), so larger files use this one.

Format version 1, all integers big-endian:

    header  MAGIC, u8 version, 3 zero bytes, u32 block size, u64 old size, u64 new size;
            then one zstd frame of ops:
    b"C" u64 old offset, u64 length        copy from the old file
    b"X" u64 old offset, u32 length, data  new = data XOR old[offset:offset + length]
    b"L" u32 length, data                  new = data
    b"E"                                   end (a stream without it is truncated)

Data lengths are at most the block size (<= MAX_BLOCK), so applying one takes memory for a
block, not for a file. A block matches only at a multiple of the block size, so a tensor
changed in place costs about its own size; an insertion that shifts the rest by other than a
multiple of the block size costs about the compressed new file (the fleet then sends the
file in full).
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Callable
from typing import BinaryIO

import zstandard

MAGIC = b"TDBD"
VERSION = 1
HEADER = struct.Struct(">4sB3xIQQ")
BLOCK_SIZE = 64 * 1024
MAX_BLOCK = 1 << 20
LEVEL = 9  # of the op stream: mostly XORed and literal blocks
# A zstd frame in a delta may ask for a window up to this; a larger one is refused instead
# of allocated.
MAX_WINDOW = 1 << 30
_COPY = struct.Struct(">cQQ")
_XOR = struct.Struct(">cQI")
_LITERAL = struct.Struct(">cI")
_COPY_CHUNK = 1 << 20


class DeltaError(ValueError):
    """A block delta that is malformed, truncated, or made against another base."""


def is_block_delta(head: bytes) -> bool:
    return head[: len(MAGIC)] == MAGIC


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(len(a), "little")


def make(old: bytes, new: bytes, block_size: int = BLOCK_SIZE) -> bytes:
    """The block delta of `new` against `old`."""
    if not 0 < block_size <= MAX_BLOCK:
        raise ValueError(f"block_size must be in 1..{MAX_BLOCK}, got {block_size}")
    index: dict[bytes, int] = {}
    for offset in range(0, len(old) - block_size + 1, block_size):
        digest = hashlib.blake2b(old[offset : offset + block_size], digest_size=16).digest()
        index.setdefault(digest, offset)
    compressor = zstandard.ZstdCompressor(level=LEVEL).compressobj()
    parts = [HEADER.pack(MAGIC, VERSION, block_size, len(old), len(new))]
    copy_from, copy_length = 0, 0

    def flush_copy() -> None:
        nonlocal copy_length
        if copy_length:
            parts.append(compressor.compress(_COPY.pack(b"C", copy_from, copy_length)))
            copy_length = 0

    for offset in range(0, len(new), block_size):
        block = new[offset : offset + block_size]
        same = old[offset : offset + len(block)]
        source = -1
        if same == block:
            source = offset
        elif len(block) == block_size:
            found = index.get(hashlib.blake2b(block, digest_size=16).digest(), -1)
            if found >= 0 and old[found : found + block_size] == block:
                source = found
        if source >= 0:
            if copy_length and copy_from + copy_length == source:
                copy_length += len(block)
            else:
                flush_copy()
                copy_from, copy_length = source, len(block)
            continue
        flush_copy()
        if len(same) == len(block):
            xored = _xor(block, same)
            if xored.count(0) >= len(block) // 8:  # mostly the old bytes: XOR compresses
                parts.append(compressor.compress(_XOR.pack(b"X", offset, len(block)) + xored))
                continue
        parts.append(compressor.compress(_LITERAL.pack(b"L", len(block)) + block))
    flush_copy()
    parts.append(compressor.compress(b"E"))
    parts.append(compressor.flush())
    return b"".join(parts)


def apply(
    head: bytes,
    raw: BinaryIO,
    old: BinaryIO,
    expected_size: int,
    emit: Callable[[bytes], None],
    name: str = "file",
) -> None:
    """Streams the new file of a block delta to `emit`, a block at a time. `head` is the
    delta's first HEADER.size bytes and `raw` the rest; `old` is the base (seekable).
    Raises DeltaError (naming `name`) for anything malformed; zstd's own errors pass as
    zstandard.ZstdError. The caller checks the result's digest."""
    if len(head) < HEADER.size:
        raise DeltaError(f"{name}: block delta header truncated")
    _, version, block_size, old_size, new_size = HEADER.unpack(head)
    if version != VERSION:
        raise DeltaError(f"{name}: block delta format version {version} is not supported")
    if not 0 < block_size <= MAX_BLOCK:
        raise DeltaError(f"{name}: block delta block size {block_size} out of range")
    if new_size != expected_size:
        raise DeltaError(f"{name}: block delta makes {new_size} bytes, expected {expected_size}")
    actual_old = os.fstat(old.fileno()).st_size if _has_fileno(old) else _seek_size(old)
    if old_size != actual_old:
        raise DeltaError(f"{name}: block delta is against a {old_size}-byte base, not this one")
    reader = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW).stream_reader(raw)

    def take(n: int) -> bytes:
        data = b""
        while len(data) < n:
            more = reader.read(n - len(data))
            if not more:
                raise DeltaError(f"{name}: block delta truncated")
            data += more
        return data

    def old_bytes(offset: int, length: int) -> bytes:
        if offset + length > old_size:
            raise DeltaError(f"{name}: block delta reads past the base's {old_size} bytes")
        old.seek(offset)
        return old.read(length)

    def within_block(length: int) -> int:
        if length > block_size:
            raise DeltaError(f"{name}: block delta op longer than its {block_size}-byte block")
        return length

    while (op := take(1)) != b"E":
        if op == b"C":
            offset, length = struct.unpack(">QQ", take(16))
            if offset + length > old_size:
                raise DeltaError(f"{name}: block delta reads past the base's {old_size} bytes")
            while length:
                step = min(length, _COPY_CHUNK)
                emit(old_bytes(offset, step))
                offset += step
                length -= step
        elif op == b"X":
            offset, length = struct.unpack(">QI", take(12))
            data = take(within_block(length))
            emit(_xor(data, old_bytes(offset, length)))
        elif op == b"L":
            (length,) = struct.unpack(">I", take(4))
            emit(take(within_block(length)))
        else:
            raise DeltaError(f"{name}: block delta has an unknown op {op!r}")


def _has_fileno(f: BinaryIO) -> bool:
    try:
        f.fileno()
    except (OSError, AttributeError, ValueError):
        return False
    return True


def _seek_size(f: BinaryIO) -> int:
    at = f.tell()
    size = f.seek(0, os.SEEK_END)
    f.seek(at)
    return size
