"""tandem.sdk.atomic: the one atomic file write (temp file, fsync, os.replace, fsync dir)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tandem.sdk import atomic
from tandem.sdk.atomic import PRIVATE, PUBLIC, atomic_open, write_atomic


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_write_replaces_content_with_the_mode_asked_for(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "key.pem"
    write_atomic(target, "first")
    assert target.read_text() == "first" and _mode(target) == PRIVATE
    write_atomic(target, b"second", mode=PUBLIC)
    assert target.read_bytes() == b"second" and _mode(target) == PUBLIC
    assert sorted(p.name for p in target.parent.iterdir()) == ["key.pem"]


def test_file_and_folder_are_fsynced_before_and_after_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "active.json"
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(src: str, dst: str | os.PathLike[str]) -> None:
        events.append("replace")
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    monkeypatch.setattr(atomic.os, "replace", replace)
    write_atomic(target, b"{}")
    assert events == ["fsync file", "replace", "fsync dir"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "model.onnx"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="digest"), atomic_open(target) as fh:
        fh.write(b"half of the new")
        raise RuntimeError("digest mismatch")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_the_temp_file_is_private_before_the_first_byte(tmp_path: Path) -> None:
    with atomic_open(tmp_path / "signing.key") as fh:
        assert stat.S_IMODE(os.fstat(fh.fileno()).st_mode) == PRIVATE
        fh.write(b"secret")
