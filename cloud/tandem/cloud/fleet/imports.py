"""Importing signed artifact variants (a zoo, or one variant folder) into the fleet: each is
verified against the trusted keys before its files are copied and its record stored."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tandem.errors import ArtifactError
from tandem.sdk.artifacts import (
    MANIFEST_FILE,
    SIGNATURES_FILE,
    TrustedKeys,
    load_public_key_raw,
    load_variant,
    verify_stored_files,
)

from .errors import ConflictError, ImportRefusedError, NotFoundError
from .store import Store

log = logging.getLogger(__name__)


def import_zoo(
    store: Store, artifacts_dir: Path, trusted: TrustedKeys | None, zoo: Path
) -> list[tuple[str, int, str]]:
    """Imports every signed variant under `zoo/artifacts/<model>/<version>/<variant>/`."""
    root = zoo / "artifacts"
    if not root.is_dir():
        raise ImportRefusedError(f"{zoo} has no artifacts/ folder (not a model zoo?)")
    if trusted is None and (zoo / "keys" / "signing.pub").exists():
        # With no key configured the zoo's own public key is the anchor: the zoo on this
        # machine is trusted input; devices check signatures against their own keys anyway.
        trusted = TrustedKeys([load_public_key_raw(zoo / "keys" / "signing.pub")])
    report = _read_report(zoo)
    imported = []
    for manifest_path in sorted(root.glob(f"*/*/*/{MANIFEST_FILE}")):
        folder = manifest_path.parent
        imported.append(import_variant(store, artifacts_dir, folder, trusted, report))
    if not imported:
        raise ImportRefusedError(f"no artifact variants under {root}")
    return imported


def import_variant(
    store: Store,
    artifacts_dir: Path,
    folder: Path,
    trusted: TrustedKeys | None,
    report: Mapping[str, Any] | None = None,
) -> tuple[str, int, str]:
    """Verifies one variant folder against `trusted`, copies it under `artifacts_dir` and
    records it; a version is immutable, so a different manifest for it is a conflict."""
    if trusted is None:
        raise ImportRefusedError(
            f"no trusted key to verify {folder} with: pass --trusted-key (or --signing-key)"
        )
    try:
        variant = load_variant(folder, trusted)
        verify_stored_files(variant)
        signed = (folder / MANIFEST_FILE).read_bytes()
        sig_doc = json.loads((folder / SIGNATURES_FILE).read_bytes())
    except (ArtifactError, OSError, ValueError) as exc:
        raise ImportRefusedError(f"refusing {folder}: {exc}") from exc
    m = variant.manifest
    try:
        existing = store.artifact(m.model, m.version, m.variant)
    except NotFoundError:
        existing = None
    if existing is not None and existing.manifest != signed:
        raise ConflictError(
            f"{m.model} v{m.version} {m.variant} exists with a different manifest; "
            "versions are immutable, build a new version"
        )
    dest = artifacts_dir / m.model / str(m.version) / m.variant
    _copy_variant(folder, dest, [MANIFEST_FILE, SIGNATURES_FILE, *(f.stored_as for f in m.files)])
    metrics = dict(m.metrics)
    model_report = (report or {}).get("models", {}).get(m.model)
    if isinstance(model_report, Mapping):
        metrics.setdefault("build_report", dict(model_report))
    store.add_artifact(
        m.model,
        m.version,
        m.variant,
        runtime=m.runtime,
        hardware=m.hardware,
        task=m.task,
        manifest=signed,
        signatures=[(str(s["keyid"]), bytes.fromhex(str(s["sig"]))) for s in sig_doc["signatures"]],
        path=str(dest),
        stored_bytes=sum(f.stored_size for f in m.files),
        metrics=metrics,
    )
    log.info("imported %s v%d %s", m.model, m.version, m.variant)
    return (m.model, m.version, m.variant)


def _read_report(zoo: Path) -> dict[str, Any]:
    try:
        data = json.loads((zoo / "report.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _copy_variant(src: Path, dest: Path, names: Sequence[str]) -> None:
    """Copies a variant into the service's artifact folder, all or nothing."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists() and all(
        (dest / n).exists() and (dest / n).read_bytes() == (src / n).read_bytes() for n in names
    ):
        return
    tmp = Path(tempfile.mkdtemp(prefix=".import-", dir=dest.parent))
    try:
        for name in names:
            shutil.copyfile(src / name, tmp / name)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
