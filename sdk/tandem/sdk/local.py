"""Local models: unpacking a version, choosing its runtime, and swapping versions hot.

`LocalModel` is one loaded version (immutable). `select_runtime` loads every variant of a
version that this device can run, rejects those whose outputs disagree with the artifact's
reference outputs, times the rest on the reference inputs and keeps the fastest; the choice is
remembered per model version (and hardware) in a JSON file in the cache folder. `LocalModels`
holds the current `LocalModel` and replaces it when the store's active pointer changes: the
new version is loaded beside the old one and swapped in by one reference assignment, so calls
in flight finish on the old version and no call fails because of the swap.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from tandem.errors import (
    ArtifactError,
    ConfigError,
    MissingDependencyError,
    NoLocalModelError,
    TandemError,
)
from tandem.sdk.artifacts import (
    TensorSpec,
    TrustedKeys,
    Variant,
    load_npz,
    load_variant,
    split_reference,
    unpack_variant,
    unpacked_is_complete,
)
from tandem.sdk.atomic import write_atomic
from tandem.sdk.errors import ReferenceMismatchError
from tandem.sdk.hardware import HardwareInfo, probe, read_cpu_flags
from tandem.sdk.runtimes import Runtime, get_runtime
from tandem.sdk.signature import Arrays, Signature
from tandem.sdk.store import ModelStore

log = logging.getLogger(__name__)

CHOICES_FILE = "runtime-choices.json"
GENERATION_TASK = "generation"  # a manifest task that tandem.sdk.generation loads, not runtimes


def default_cache_dir() -> Path:
    env = os.environ.get("TANDEM_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tandem"


@dataclass(frozen=True)
class SelectionConfig:
    """How the runtime is chosen. Every field is checked at construction."""

    runtime: str = "auto"  # "auto", a runtime name ("onnx", ...) or a variant name ("onnx-int8")
    warmup_runs: int = 3  # untimed runs per candidate
    timed_runs: int = 15  # timed runs per candidate; the median counts
    rtol: float = 1e-2  # relative tolerance against the reference outputs
    atol: float = 1e-2  # absolute tolerance, scaled by max(1, max |reference|)
    remember: bool = True  # persist the choice per model version in the cache folder
    runtime_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.runtime:
            raise ConfigError("runtime", "must be 'auto', a runtime name or a variant name")
        if self.warmup_runs < 0:
            raise ConfigError("warmup_runs", f"must be >= 0, got {self.warmup_runs}")
        if self.timed_runs < 1:
            raise ConfigError("timed_runs", f"must be >= 1, got {self.timed_runs}")
        if self.rtol < 0 or self.atol < 0:
            raise ConfigError("rtol" if self.rtol < 0 else "atol", "must be >= 0")


class LocalModel:
    """One loaded model version on one runtime."""

    def __init__(self, variant: Variant, runtime: Runtime, unpacked: Path) -> None:
        manifest = variant.manifest
        self.variant = variant
        self.manifest = manifest
        self.model = manifest.model
        self.version = manifest.version
        self.variant_name = manifest.variant
        self.runtime = runtime
        self.runtime_name = runtime.name
        self.unpacked = unpacked
        inputs = manifest.inputs
        # A variant exported for batch 1 (LiteRT flatbuffers often are) still takes batches:
        # the runtime resizes its input where it can, else the rows run one by one.
        self.batch_one = bool(inputs) and all(len(t.shape) >= 2 and t.shape[0] == 1 for t in inputs)
        if self.batch_one:
            inputs = tuple(TensorSpec(t.name, t.datatype, (-1, *t.shape[1:])) for t in inputs)
        self.signature = Signature(
            inputs, manifest.outputs, task=manifest.task, temperature=manifest.temperature
        )
        self.run = runtime.run
        if self.batch_one and not runtime.resizes_batch:
            self.run = self._run_rows
        self._validation: tuple[Arrays, np.ndarray[Any, Any]] | None = None

    def _run_rows(self, feeds: Mapping[str, np.ndarray[Any, Any]]) -> Arrays:
        rows = next(iter(feeds.values())).shape[0]
        if rows == 1:
            return self.runtime.run(feeds)
        parts = [self.runtime.run({k: v[i : i + 1] for k, v in feeds.items()}) for i in range(rows)]
        return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}

    def reference(self) -> tuple[Arrays, Arrays]:
        if not self.manifest.reference:
            raise ArtifactError(f"{self.describe()} ships no reference data")
        return split_reference(load_npz(self.unpacked / self.manifest.reference))

    def validation(self) -> tuple[Arrays, np.ndarray[Any, Any]]:
        """The validation inputs and labels shipped in the artifact (for the cascade threshold)."""
        if self._validation is None:
            if not self.manifest.validation:
                raise ArtifactError(f"{self.describe()} ships no validation data")
            arrays = load_npz(self.unpacked / self.manifest.validation)
            inputs, _ = split_reference(arrays)
            labels = next(
                (arrays[k] for k in ("labels", "label", "output.labels", "y") if k in arrays), None
            )
            if labels is None or not inputs:
                raise ArtifactError(
                    f"{self.describe()}: validation data needs input.<name> arrays and labels; "
                    f"has {sorted(arrays)}"
                )
            self._validation = (inputs, labels)
        return self._validation

    def describe(self) -> str:
        return f"{self.model} v{self.version} {self.variant_name} on {self.runtime.describe()}"

    def close(self) -> None:
        self.runtime.close()


@dataclass(frozen=True)
class Candidate:
    variant: str
    runtime: str
    median_ms: float | None = None
    rejected: str | None = None  # why it was not usable


@dataclass(frozen=True)
class Selection:
    model: str
    version: int
    variant: str
    runtime: str
    candidates: tuple[Candidate, ...]
    hardware: dict[str, Any]
    from_cache: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "variant": self.variant,
            "runtime": self.runtime,
            "candidates": [c.__dict__ for c in self.candidates],
            "hardware": self.hardware,
            "chosen_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }


def payload_id(variant: Variant) -> str:
    """A short digest of the variant's payload: the names and sha256s its manifest signs."""
    digest = hashlib.sha256()
    for entry in sorted(variant.manifest.files, key=lambda e: e.name):
        digest.update(f"{entry.name}\0{entry.sha256}\n".encode())
    return digest.hexdigest()[:16]


def unpack_to_cache(variant: Variant, cache_dir: Path) -> Path:
    """Where the variant's payload files are usable: in place when the agent already
    decompressed them, else in the cache folder (never inside a build's artifacts folder).

    The cache folder is named by the payload's digest as well as model, version and variant:
    a rebuild keeps those three (a test zoo, a user rebuilding version 1 with new weights), and
    an INT8 file of the same architecture keeps its size, so a folder named by them alone
    served the previous build's model, and its reference outputs, whose check then passed.
    """
    if unpacked_is_complete(variant, variant.path):
        return variant.path
    m = variant.manifest
    dest = cache_dir / "unpacked" / m.model / str(m.version) / f"{m.variant}-{payload_id(variant)}"
    return unpack_variant(variant, dest)


def check_against_reference(model: LocalModel, config: SelectionConfig) -> tuple[Arrays, Arrays]:
    """Runs the reference inputs; raises ReferenceMismatchError naming the first bad output."""
    inputs, expected = model.reference()
    feeds = model.signature.prepare(inputs)
    got = model.run(feeds)
    for name, want in expected.items():
        have = got.get(name)
        if have is None:
            raise ReferenceMismatchError(f"{model.describe()}: no output {name!r}")
        if have.shape != want.shape:
            raise ReferenceMismatchError(
                f"{model.describe()}: output {name!r} shape {have.shape} != reference {want.shape}"
            )
        scale = max(1.0, float(np.abs(want).max())) if want.size else 1.0
        if not np.allclose(have, want, rtol=config.rtol, atol=config.atol * scale):
            diff = float(np.abs(have.astype(np.float64) - want).max())
            raise ReferenceMismatchError(
                f"{model.describe()}: output {name!r} differs from the reference "
                f"by up to {diff:.4g}"
            )
    return feeds, got


def _time_runs(model: LocalModel, feeds: Arrays, config: SelectionConfig) -> float:
    single = {k: v[:1] for k, v in feeds.items()}
    for _ in range(config.warmup_runs):
        model.run(single)
    samples = []
    for _ in range(config.timed_runs):
        start = time.perf_counter()
        model.run(single)
        samples.append((time.perf_counter() - start) * 1e3)
    return float(statistics.median(samples))


def _hardware_key() -> str:
    """A cheap key for the remembered choice: it changes with the CPU and installed runtimes."""
    import platform

    from tandem.sdk.runtimes import runtime_names

    installed = []
    for name in runtime_names():
        try:
            if get_runtime(name).is_installed():
                installed.append(name)
        except TandemError:
            continue
    return f"{platform.machine()}|{','.join(read_cpu_flags())}|{','.join(installed)}"


class RuntimeSelector:
    """Loads a version's variants, checks and times them, and remembers the winner."""

    def __init__(self, cache_dir: Path, config: SelectionConfig) -> None:
        self.cache_dir = cache_dir
        self.config = config
        self._hardware: HardwareInfo | None = None
        self._lock = threading.Lock()

    @property
    def hardware(self) -> HardwareInfo:
        if self._hardware is None:
            self._hardware = probe()
        return self._hardware

    def _load(self, variant: Variant) -> LocalModel:
        m = variant.manifest
        cls = get_runtime(m.runtime)
        unpacked = unpack_to_cache(variant, self.cache_dir)
        options = dict(self.config.runtime_options.get(m.runtime, {}))
        return LocalModel(variant, cls.load(m, unpacked, **options), unpacked)

    def _choices_path(self) -> Path:
        return self.cache_dir / CHOICES_FILE

    def _read_choices(self) -> dict[str, Any]:
        try:
            data = json.loads(self._choices_path().read_bytes())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _remember(self, selection: Selection, key: str) -> None:
        if not self.config.remember:
            return
        try:
            with self._lock:
                choices = self._read_choices()
                entry = selection.to_json()
                entry["hardware_key"] = key
                choices[f"{selection.model}/{selection.version}"] = entry
                write_atomic(self._choices_path(), json.dumps(choices, indent=1).encode())
        except OSError as exc:
            log.warning("cannot remember the runtime choice in %s: %s", self.cache_dir, exc)

    def remembered(self, model: str, version: int) -> dict[str, Any] | None:
        return self._read_choices().get(f"{model}/{version}")

    def choose(self, variants: Sequence[Variant]) -> tuple[LocalModel, Selection]:
        """Returns the loaded winner among `variants` (all of one model version)."""
        if not variants:
            raise NoLocalModelError("no variants to choose from")
        first = variants[0].manifest
        forced = self.config.runtime
        pool = list(variants)
        if forced != "auto":
            pool = [v for v in variants if forced in (v.manifest.runtime, v.manifest.variant)]
            if not pool:
                raise NoLocalModelError(
                    f"{first.model} v{first.version} has no variant for runtime {forced!r}; "
                    f"variants: {[v.manifest.variant for v in variants]}"
                )
        key = _hardware_key()
        if forced == "auto" and self.config.remember:
            stored = self.remembered(first.model, first.version)
            if stored and stored.get("hardware_key") == key:
                hit = [v for v in pool if v.manifest.variant == stored.get("variant")]
                if hit:
                    try:
                        model = self._load(hit[0])
                        check_against_reference(model, self.config)
                        return model, Selection(
                            first.model,
                            first.version,
                            model.variant_name,
                            model.runtime_name,
                            (),
                            dict(stored.get("hardware") or {}),
                            from_cache=True,
                        )
                    except (TandemError, OSError) as exc:
                        log.warning("remembered runtime choice no longer works: %s", exc)
        hardware = self.hardware if forced == "auto" else None
        candidates: list[Candidate] = []
        best: tuple[float, LocalModel] | None = None
        for variant in pool:
            m = variant.manifest
            if hardware is not None and not hardware.matches(m.hardware):
                candidates.append(
                    Candidate(m.variant, m.runtime, rejected=f"built for {m.hardware}")
                )
                continue
            try:
                model = self._load(variant)
            except MissingDependencyError as exc:
                candidates.append(Candidate(m.variant, m.runtime, rejected=str(exc)))
                continue
            except (TandemError, OSError) as exc:
                candidates.append(Candidate(m.variant, m.runtime, rejected=f"load failed: {exc}"))
                log.warning("variant %s does not load: %s", m.variant, exc)
                continue
            try:
                feeds, _ = check_against_reference(model, self.config)
                median = _time_runs(model, feeds, self.config) if len(pool) > 1 else 0.0
            except (TandemError, OSError) as exc:
                candidates.append(Candidate(m.variant, m.runtime, rejected=str(exc)))
                log.warning("variant %s rejected: %s", m.variant, exc)
                model.close()
                continue
            candidates.append(Candidate(m.variant, m.runtime, median_ms=median))
            if best is None or median < best[0]:
                if best is not None:
                    best[1].close()
                best = (median, model)
            else:
                model.close()
        if best is None:
            reasons = "; ".join(f"{c.variant}: {c.rejected}" for c in candidates)
            raise NoLocalModelError(
                f"{first.model} v{first.version}: no variant runs correctly here ({reasons})"
            )
        winner = best[1]
        selection = Selection(
            first.model,
            first.version,
            winner.variant_name,
            winner.runtime_name,
            tuple(candidates),
            hardware.to_json() if hardware else {},
        )
        log.info(
            "runtime for %s v%s: %s (%s)",
            first.model,
            first.version,
            winner.variant_name,
            ", ".join(
                f"{c.variant}={c.median_ms:.3f}ms"
                if c.median_ms is not None
                else f"{c.variant}=rejected"
                for c in candidates
            ),
        )
        if forced == "auto":
            self._remember(selection, key)
        return winner, selection


class LocalModels:
    """The current local model of one name, swapped when the store's active pointer moves."""

    def __init__(
        self,
        store: ModelStore,
        model: str,
        selector: RuntimeSelector,
        *,
        trusted: TrustedKeys | None = None,
        watch_interval_s: float = 0.25,
    ) -> None:
        self.store = store
        self.model = model
        self.selector = selector
        self.trusted = trusted
        self.watch_interval_s = watch_interval_s
        self.current: LocalModel | None = None
        self.selection: Selection | None = None
        self.error: Exception | None = None
        self.swaps = 0
        self._token: tuple[int, int] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def refresh(self) -> bool:
        """Loads the active version if it changed; returns True when a swap happened.

        A version that fails to load leaves the current one in place (calls keep working).
        """
        with self._lock:
            token = self.store.active_token(self.model)
            if token == self._token:
                return False
            try:
                version, found = self.store.active_variants(self.model)
                # Generative variants are the generation path's (Client.generate), never a
                # tensor model: loading one here only wastes seconds and warns.
                variants = [v for v in found if v.manifest.task != GENERATION_TASK]
                if self.trusted is not None:
                    variants = [load_variant(v.path, self.trusted) for v in variants]
            except (TandemError, OSError) as exc:
                self._token = token
                self.error = exc
                log.warning("no usable active version of %s: %s", self.model, exc)
                return False
            if found and not variants:  # generative-only: nothing for infer, nothing wrong
                self._token = token
                self.error = NoLocalModelError(
                    f"{self.model} v{version} has no tensor variant (only generative ones)"
                )
                log.debug("%s", self.error)
                return False
            current = self.current
            if (
                current is not None
                and current.version == version
                and any(v.manifest.variant == current.variant_name for v in variants)
            ):
                self._token = token
                return False
            try:
                loaded, selection = self.selector.choose(variants)
            except (TandemError, OSError) as exc:
                self._token = token
                self.error = exc
                log.warning("cannot load %s v%s: %s", self.model, version, exc)
                return False
            # One reference assignment: callers that already hold the old model finish on it,
            # the next call reads the new one. The old runtime is freed when the last call
            # holding it returns (reference counting), so it is never closed under a call.
            self.current = loaded
            self.selection = selection
            self.error = None
            self._token = token
            if current is not None:
                self.swaps += 1
                log.info("swapped %s v%s -> v%s", self.model, current.version, loaded.version)
            return True

    def require(self) -> LocalModel:
        model = self.current
        if model is None:
            if self.error is not None:
                raise NoLocalModelError(f"no local model for {self.model!r}: {self.error}")
            raise NoLocalModelError(f"no local model for {self.model!r}")
        return model

    def start(self) -> None:
        if self._thread is not None or self.watch_interval_s <= 0:
            return
        self._thread = threading.Thread(
            target=self._watch, name=f"tandem-watch-{self.model}", daemon=True
        )
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(self.watch_interval_s):
            try:
                self.refresh()
            except Exception:
                log.exception("model watcher failed")

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        model, self.current = self.current, None
        if model is not None:
            model.close()
