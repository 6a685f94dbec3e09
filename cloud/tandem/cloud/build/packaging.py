"""Writing the zoo's two outputs: signed edge variants and the cloud model repository.

Edge variant (`artifacts/<model>/<version>/<variant>/`, format in `tandem.sdk.artifacts`):
every payload file plus `reference.npz` (and `validation.npz`) zstd-compressed, a
`manifest.json` holding exactly `Manifest.to_bytes()`, and `manifest.sig.json`. The folder is
assembled beside its final place (a dot-named staging folder) and swapped in with two
renames, so a reader sees the old variant, the new one, or for an instant none; never a mix.

Cloud repository (`repository/<model>/config.json` + `repository/<model>/<version>/...`),
Triton-like: `config.json` holds the backend, tensors without the batch dimension, batching
and instance settings (see `repository_config`).
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from tandem.cloud.build.errors import BuildError
from tandem.cloud.build.signing import Signer
from tandem.sdk.artifacts import (
    MANIFEST_FILE,
    RUNTIMES,
    SIGNATURES_FILE,
    FileEntry,
    Manifest,
    TensorSpec,
    Variant,
    sha256_file,
    signatures_to_bytes,
)
from tandem.sdk.atomic import PUBLIC, write_atomic

log = logging.getLogger(__name__)

REFERENCE_FILE = "reference.npz"
VALIDATION_FILE = "validation.npz"
ZSTD_LEVEL = 10  # good ratio on weights; level 19 costs ~10x the time for a few percent
CONFIG_FILE = "config.json"
Array = np.ndarray[Any, Any]


def npz_bytes(arrays: Mapping[str, Array]) -> bytes:
    """An .npz of plain arrays (no object arrays: readers load with allow_pickle=False)."""
    for name, value in arrays.items():
        if np.asarray(value).dtype == np.dtype(object):
            raise BuildError(f"array {name!r} has dtype object; cannot store it without pickle")
    buffer = io.BytesIO()
    savez: Any = np.savez  # numpy's stub types **kwds as its own keyword flags
    savez(buffer, **{k: np.asarray(v) for k, v in arrays.items()})
    return buffer.getvalue()


def _compress_into(source: Path, folder: Path, name: str, level: int) -> FileEntry:
    import zstandard

    stored_as = f"{name}.zst"
    target = folder / stored_as
    compressor = zstandard.ZstdCompressor(level=level, write_checksum=True)
    with source.open("rb") as raw, target.open("wb") as out:
        compressor.copy_stream(raw, out)
    sha, size = sha256_file(source)
    stored_sha, stored_size = sha256_file(target)
    return FileEntry(name, size, sha, stored_as, stored_size, stored_sha)


def _replace_dir(staging: Path, final: Path) -> None:
    """Moves `staging` to `final`; an existing `final` is renamed away first, then removed."""
    old: Path | None = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(final, old)
    os.replace(staging, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def tensor_specs(specs: Sequence[TensorSpec | Mapping[str, Any]]) -> tuple[TensorSpec, ...]:
    return tuple(s if isinstance(s, TensorSpec) else TensorSpec.from_json(s) for s in specs)


def write_variant(
    out_dir: Path,
    *,
    signer: Signer,
    model: str,
    version: int,
    variant: str,
    runtime: str,
    precision: str,
    task: str,
    hardware: str = "any",
    entrypoint: str,
    payload_files: Mapping[str, Path],
    inputs: Sequence[TensorSpec | Mapping[str, Any]],
    outputs: Sequence[TensorSpec | Mapping[str, Any]],
    reference: Mapping[str, Array],
    validation: Mapping[str, Array] | None = None,
    calibration: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    expires_days: int = 365,
    zstd_level: int = ZSTD_LEVEL,
    now: datetime | None = None,
) -> Variant:
    """Packs and signs one edge variant into `out_dir` (the variant folder itself).

    `payload_files` maps the name the runtime loads (`model.onnx`) to the file to pack.
    `reference` holds `input.<name>` / `output.<name>` arrays (outputs from this variant);
    `validation` holds `input.<name>` arrays and `labels` for classifiers.
    Returns the written `Variant` (its manifest is what was signed).
    """
    out_dir = Path(out_dir)
    if runtime not in RUNTIMES:
        raise BuildError(f"variant {variant}: runtime {runtime!r} not one of {RUNTIMES}")
    if entrypoint not in payload_files:
        raise BuildError(f"variant {variant}: entrypoint {entrypoint!r} is not a payload file")
    if not any(k.startswith("input.") for k in reference) or not any(
        k.startswith("output.") for k in reference
    ):
        raise BuildError(f"variant {variant}: reference needs input.<name> and output.<name>")
    reserved = {REFERENCE_FILE, VALIDATION_FILE, MANIFEST_FILE, SIGNATURES_FILE}
    for name, source in payload_files.items():
        if name in reserved or name != os.path.basename(name):
            raise BuildError(f"variant {variant}: payload name {name!r} is not allowed")
        if not Path(source).is_file():
            raise BuildError(f"variant {variant}: payload {name} ({source}) does not exist")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.staging-"))
    try:
        entries: list[FileEntry] = []
        for name, source in payload_files.items():
            entries.append(_compress_into(Path(source), staging, name, zstd_level))
        extras: list[tuple[str, Mapping[str, Array]]] = [(REFERENCE_FILE, reference)]
        if validation is not None:
            extras.append((VALIDATION_FILE, validation))
        with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=".npz-") as scratch:
            for name, arrays in extras:
                plain = Path(scratch) / name
                plain.write_bytes(npz_bytes(arrays))
                entries.append(_compress_into(plain, staging, name, zstd_level))

        created = (now or datetime.now(UTC)).replace(microsecond=0)
        manifest = Manifest(
            model=model,
            version=int(version),
            variant=variant,
            runtime=runtime,
            hardware=hardware,
            precision=precision,
            task=task,
            created=created,
            expires=created + timedelta(days=expires_days),
            entrypoint=entrypoint,
            files=tuple(entries),
            inputs=tensor_specs(inputs),
            outputs=tensor_specs(outputs),
            calibration=dict(calibration) if calibration else None,
            reference=REFERENCE_FILE,
            validation=VALIDATION_FILE if validation is not None else None,
            metrics=_jsonable(dict(metrics or {})),
        )
        signed = manifest.to_bytes()
        # Round-trip through the parser so that a manifest we could not read back never ships.
        Manifest.from_json(json.loads(signed))
        (staging / MANIFEST_FILE).write_bytes(signed)
        (staging / SIGNATURES_FILE).write_bytes(signatures_to_bytes([signer.sign(signed)]))
        os.chmod(staging, 0o755)
        _replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info(
        "packed %s v%s %s (%d files, %d bytes stored)",
        model,
        version,
        variant,
        len(entries),
        sum(e.stored_size for e in entries),
    )
    return Variant(out_dir, manifest)


def _jsonable(value: Any) -> Any:
    """Numbers from numpy and nested containers, as plain JSON values."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


# --- the cloud model repository ---------------------------------------------------------


def repository_config(
    name: str,
    *,
    backend: str,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    max_batch_size: int = 64,
    max_queue_delay_us: int = 2000,
    preferred_batch_sizes: Sequence[int] = (16, 32, 64),
    max_queue_size: int = 1024,
    instance_count: int = 1,
    instance_kind: str = "auto",
    num_versions: int = 1,
    parameters: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A repository `config.json` document; tensor dims exclude the leading batch dim."""

    def dims(spec: TensorSpec) -> dict[str, Any]:
        if not spec.shape or spec.shape[0] != -1:
            raise BuildError(f"{name}: tensor {spec.name} must have a leading batch dim of -1")
        return {"name": spec.name, "datatype": spec.datatype, "dims": list(spec.shape[1:])}

    config: dict[str, Any] = {
        "name": name,
        "backend": backend,
        "max_batch_size": max_batch_size,
        "input": [dims(s) for s in inputs],
        "output": [dims(s) for s in outputs],
        "dynamic_batching": {
            "max_queue_delay_us": max_queue_delay_us,
            "preferred_batch_sizes": list(preferred_batch_sizes),
            "max_queue_size": max_queue_size,
        },
        "instance_group": {"count": instance_count, "kind": instance_kind},
        "version_policy": {"latest": {"num_versions": num_versions}},
    }
    if parameters:
        config["parameters"] = _jsonable(dict(parameters))
    return config


def write_repository_model(
    repo_dir: Path,
    model: str,
    version: int,
    files: Mapping[str, Path],
    config: Mapping[str, Any],
) -> Path:
    """Copies `files` into `repo_dir/<model>/<version>/` and writes `repo_dir/<model>/config.json`.

    The version folder is swapped in whole; other versions of the model are left alone.
    Returns the version folder.
    """
    model_dir = Path(repo_dir) / model
    model_dir.mkdir(parents=True, exist_ok=True)
    final = model_dir / str(int(version))
    staging = Path(tempfile.mkdtemp(dir=model_dir, prefix=f".{version}.staging-"))
    try:
        for name, source in files.items():
            if name != os.path.basename(name):
                raise BuildError(f"{model}: repository file name {name!r} is not a plain name")
            shutil.copyfile(source, staging / name)
        os.chmod(staging, 0o755)
        _replace_dir(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    document = json.dumps(_jsonable(dict(config)), indent=2, sort_keys=True).encode() + b"\n"
    write_atomic(model_dir / CONFIG_FILE, document, mode=PUBLIC)
    return final
