"""Atomic file writes: readers see the old content or the new, never half of either.

The one way tandem replaces a file (python-tuf's habit): write a temporary file in the same
folder, fsync it, `os.replace` it over the target, then fsync the folder so that the rename
itself survives a power cut. The temporary file has its final mode before the first byte is
written (a private key is never readable by others, not even for a moment), and it is removed
when anything fails, so a failed write leaves the old file and no litter.

`write_atomic(path, data)` writes bytes or text in one go; `atomic_open(path)` yields a binary
file for a caller that streams (decompression with a size limit, `torch.save`). Leaving the
`with` block by an exception discards everything written.

This module sits below `tandem.sdk.store` and `tandem.sdk.artifacts` (both use it), so it
imports nothing of tandem's.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

PRIVATE = 0o600  # owner read/write: what tempfile.mkstemp creates, the default here
PUBLIC = 0o644  # owner read/write, everyone read


@contextmanager
def atomic_open(path: str | os.PathLike[str], *, mode: int = PRIVATE) -> Iterator[BinaryIO]:
    """A binary file that replaces `path` with exactly `mode` when the block ends cleanly."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), mode)
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _fsync_dir(target.parent)


def write_atomic(path: str | os.PathLike[str], data: bytes | str, *, mode: int = PRIVATE) -> None:
    """Replaces `path` with `data` (text is written as UTF-8), its mode exactly `mode`."""
    with atomic_open(path, mode=mode) as fh:
        fh.write(data.encode() if isinstance(data, str) else data)


def _fsync_dir(folder: Path) -> None:
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
