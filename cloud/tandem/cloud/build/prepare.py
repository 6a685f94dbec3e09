"""`[prepare]`: a spec's own code makes the files the rest of the spec names.

A built-in example trains its full model and writes its data sets this way (digits: the
teacher's weights and the split; minilm: tokenized sentences and the tokenizer files); a user
can do the same instead of committing generated files. The function is called as
`prepare(out: Path, seed: int) -> dict | None` with `out` an empty folder; it must write every
name in `[prepare] outputs` there. A returned mapping of plain values is merged into the
report entry's `metrics`.

The result is kept in `<zoo>/.cache/<model>/prepare-<key>/` under a content key: every file
in the spec's folder (its code and data, recursively), the seed and the versions of the
libraries that shape the outputs; not the build's version or options, so a new version of
the model (a retrained student) reuses the prepared teacher. The folder is written under a
temporary name and renamed when complete, so a failed or interrupted run leaves nothing that
a later build would take for finished.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tandem.cloud.build import usercode
from tandem.cloud.build.errors import SpecError
from tandem.cloud.build.spec import PrepareSpec
from tandem.sdk.atomic import write_atomic

log = logging.getLogger(__name__)

RECORD = "prepare.json"
KEEP = 3  # prepared folders kept per model (the newest); older ones are deleted
ZOO_MARKER = ".build.lock"  # pipeline.zoo_lock's file: the folder is a zoo
_SKIPPED = ("__pycache__",)


def folder_digest(folder: Path) -> str:
    """sha256 over every file under `folder` (relative names and contents), in name order.

    Left out: hidden files and folders, `__pycache__`, and any zoo built inside the folder
    (a folder holding `.build.lock`): `--out zoo/` beside the spec must not change its key.
    """
    digest = hashlib.sha256()
    files: list[Path] = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(
            d
            for d in dirs
            if not d.startswith(".")
            and d not in _SKIPPED
            and not (Path(root) / d / ZOO_MARKER).exists()
        )
        files += [Path(root) / n for n in names if not n.startswith(".") and not n.endswith(".pyc")]
    for path in sorted(files):
        digest.update(f"{path.relative_to(folder).as_posix()}\0".encode())
        with path.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


def prepare_key(spec_path: Path, seed: int, libraries: Mapping[str, str]) -> str:
    facts = {
        "folder": folder_digest(spec_path.parent),
        "seed": seed,
        "libraries": dict(libraries),
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()


def run_prepare(
    spec_path: Path,
    prepare: PrepareSpec,
    cache_dir: Path,
    *,
    seed: int,
    libraries: Mapping[str, str],
) -> tuple[Path, dict[str, Any], bool]:
    """(folder holding the outputs, the function's metrics, True when taken from the cache)."""
    key = prepare_key(spec_path, seed, libraries)
    folder = cache_dir / f"prepare-{key[:16]}"
    record = _read_record(folder, key, prepare.outputs)
    if record is not None:
        log.info("%s: [prepare] outputs up to date in %s", spec_path.name, folder)
        return folder, dict(record.get("metrics") or {}), True
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=cache_dir, prefix=".prepare-"))
    try:
        started = time.perf_counter()
        where = "[prepare] function"
        metrics = usercode.call(prepare.function, prepare.module_file, where, staging, seed)
        seconds = round(time.perf_counter() - started, 2)
        if metrics is None:
            metrics = {}
        if not isinstance(metrics, Mapping):
            raise SpecError(
                f"{where}: returned a {type(metrics).__name__}; expected a dict or None"
            )
        missing = [name for name in prepare.outputs if not (staging / name).is_file()]
        if missing:
            raise SpecError(
                f"{where}: did not write {', '.join(missing)} (listed in [prepare] outputs)"
                f" into the folder it was given"
            )
        try:
            document = json.dumps(
                {"key": key, "metrics": dict(metrics), "seconds": seconds}, indent=2
            )
        except TypeError as exc:
            raise SpecError(f"{where}: returned metrics that are not JSON values ({exc})") from exc
        write_atomic(staging / RECORD, document)
        shutil.rmtree(folder, ignore_errors=True)
        staging.rename(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _prune(cache_dir, keep=folder)
    log.info("%s: [prepare] made %s in %.1f s", spec_path.name, ", ".join(prepare.outputs), seconds)
    return folder, dict(metrics), False


def _prune(cache_dir: Path, keep: Path) -> None:
    """Deletes all but the KEEP newest prepared folders (each edit of a spec's code makes
    one; a teacher's weights are megabytes). The zoo lock is held: no build reads them."""
    folders = sorted(
        (p for p in cache_dir.glob("prepare-*") if p.is_dir() and p != keep),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    for old in folders[KEEP - 1 :]:
        log.info("deleting the old prepared folder %s", old)
        shutil.rmtree(old, ignore_errors=True)


def _read_record(folder: Path, key: str, outputs: tuple[str, ...]) -> dict[str, Any] | None:
    try:
        record = json.loads((folder / RECORD).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("key") != key:
        return None
    if any(not (folder / name).is_file() for name in outputs):
        return None
    return record
