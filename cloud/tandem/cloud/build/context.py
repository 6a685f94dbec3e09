"""What a model builder gets from the pipeline: `BuildContext`, and progress events.

A builder (`user.build_spec_file`, bound to a spec; `generative.build_generative`) is::

    def build(ctx: BuildContext) -> dict[str, Any]

and must, for `ctx.model` at `ctx.version`:

- write the cloud model with `packaging.write_repository_model(ctx.repository_dir, ...)`
  (-> `repository/<model>/config.json` and `repository/<model>/<version>/...`);
- write each signed edge variant with
  `packaging.write_variant(ctx.variant_dir(name), signer=ctx.signer, version=ctx.version, ...)`;
- report progress with `steps = ctx.steps(total)` then `steps.advance("what happens now")`;
- derive every random choice from `ctx.seed` (and `ctx.version` where a new version must
  differ), so that the same inputs give the same build;
- keep temporary files under `ctx.work_dir` (removed after the build) and anything worth
  keeping across builds (e.g. a trained teacher) under `ctx.cache_dir`;
- read model-specific switches from `ctx.options` (e.g. a distilled model's
  `student_variant`);
- return its report entry, a JSON-able dict::

      {"model": "digits", "version": 1, "task": "classification",
       "metrics": {...model-level numbers, e.g. teacher_accuracy, student_accuracy...},
       "variants": {"onnx-int8": {"runtime": "onnx", "precision": "int8",
                                  "size_bytes": ..., "stored_bytes": ...,
                                  "latency_ms_batch1": ..., ...variant numbers...}, ...},
       "repository": {"backend": "onnxruntime", "files": ["model.onnx", ...]},
       "notes": ["free text worth reading in report.md", ...]}

The pipeline adds `build_seconds` and the cache key, merges entries into `report.json`, and
decides from the cache whether `build` is called at all.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tandem.cloud.build.signing import Signer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProgressEvent:
    model: str
    step: str  # what is happening now, for a person to read
    completed: int  # steps finished in this model's build
    total: int  # steps in this model's build; 0 when unknown
    cached: bool = False  # the model was up to date and not rebuilt


ProgressCallback = Callable[[ProgressEvent], None]


class Steps:
    """Counts a builder's steps and forwards each to the progress callback (and the log)."""

    def __init__(self, model: str, total: int, callback: ProgressCallback | None) -> None:
        self.model = model
        self.total = total
        self.completed = 0
        self._callback = callback

    def advance(self, step: str) -> None:
        """Marks the previous step done and announces `step` as the current one."""
        log.info("%s: %s", self.model, step)
        if self._callback is not None:
            self._callback(ProgressEvent(self.model, step, self.completed, self.total))
        self.completed = min(self.completed + 1, self.total) if self.total else self.completed + 1

    def finish(self, step: str = "done") -> None:
        self.completed = self.total
        if self._callback is not None:
            self._callback(ProgressEvent(self.model, step, self.total, self.total))


@dataclass(frozen=True)
class BuildContext:
    out_dir: Path  # the zoo root (DIR of `tandem models build --out DIR`)
    model: str  # the model being built
    signer: Signer  # signs every manifest this build writes
    work_dir: Path  # scratch for this build only; removed afterwards
    cache_dir: Path  # per-model files kept across builds (out_dir/.cache/<model>)
    version: int = 1  # the version number this build writes
    seed: int = 0  # the root of every random choice
    options: Mapping[str, Any] = field(default_factory=dict)  # model-specific switches
    progress: ProgressCallback | None = None

    @property
    def repository_dir(self) -> Path:
        return self.out_dir / "repository"

    @property
    def artifacts_dir(self) -> Path:
        return self.out_dir / "artifacts"

    def variant_dir(self, variant: str) -> Path:
        return self.artifacts_dir / self.model / str(self.version) / variant

    def repository_version_dir(self) -> Path:
        return self.repository_dir / self.model / str(self.version)

    def steps(self, total: int) -> Steps:
        return Steps(self.model, total, self.progress)
