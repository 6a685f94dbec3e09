"""The models the story needs, built through the build pipeline (and its cache).

- digits v1 in the user's zoo (`tandem models build --out ZOO` builds the same, cached);
- digits v2, a retrained student, in `ZOO/demo/v2/`;
- digits v3, a deliberately bad student (trained on shuffled labels), in `ZOO/demo/v3/`.

v2 and v3 live in zoos of their own because a zoo's report holds one entry per model: built
into the user's zoo, each would replace v1's entry in its report. They are signed with the
user's zoo key, so the devices trust one key, and they reuse the zoo's prepared teacher and
data (examples/digits' `[prepare]` outputs, cached under a key of everything they depend on
but not the version or options), so each costs a student, not a teacher.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tandem.cloud.build.context import ProgressEvent
from tandem.cloud.build.pipeline import build_zoo
from tandem.cloud.build.signing import PUBLIC_KEY_FILE, Signer

log = logging.getLogger(__name__)

MODEL = "digits"
STORY_DIR = "demo"
# (version, student variant) of the story's extra versions.
STORY_VERSIONS = ((2, "normal"), (3, "bad"))


@dataclass(frozen=True)
class StoryZoo:
    zoo: Path  # v1 (and whatever else the user built), the cloud repository, the keys
    versions: dict[int, Path]  # version -> the zoo folder holding its artifacts
    public_key: Path
    seed: int
    reports: dict[int, dict[str, Any]]  # version -> the digits report entry
    built: tuple[str, ...]  # what was (re)built in this run, for the output

    def to_json(self) -> dict[str, Any]:
        return {
            "zoo": str(self.zoo),
            "versions": {str(k): str(v) for k, v in self.versions.items()},
            "public_key": str(self.public_key),
            "seed": self.seed,
            "reports": {str(k): v for k, v in self.reports.items()},
            "built": list(self.built),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StoryZoo:
        return cls(
            zoo=Path(data["zoo"]),
            versions={int(k): Path(v) for k, v in data["versions"].items()},
            public_key=Path(data["public_key"]),
            seed=int(data["seed"]),
            reports={int(k): dict(v) for k, v in data["reports"].items()},
            built=tuple(data["built"]),
        )


def _digits_entry(report: dict[str, Any]) -> dict[str, Any]:
    entry = report.get("models", {}).get(MODEL)
    return dict(entry) if isinstance(entry, dict) else {}


def _share_teacher(zoo: Path, out: Path) -> None:
    """Copies the zoo's prepared teacher and data (`.cache/digits/prepare-*/`) into a story
    zoo's cache, when not there yet: the story's versions are students of the same teacher."""
    src = zoo / ".cache" / MODEL
    dest = out / ".cache" / MODEL
    dest.mkdir(parents=True, exist_ok=True)
    for prepared in src.glob("prepare-*"):
        target = dest / prepared.name
        if prepared.is_dir() and not target.exists():
            tmp = dest / f".{prepared.name}.copy"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(prepared, tmp)
            tmp.rename(target)  # complete or absent: the build never sees half a copy


def _public_key(private: Path, out_dir: Path) -> Path:
    """The public half beside the private key, or written into `out_dir` when absent."""
    beside = private.parent / PUBLIC_KEY_FILE
    pem = Signer.from_file(private).public_key_pem()
    if beside.is_file() and beside.read_bytes() == pem:
        return beside
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / PUBLIC_KEY_FILE
    if not path.is_file() or path.read_bytes() != pem:
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(pem)
        tmp.replace(path)
    return path


def ensure_story_zoo(
    zoo: Path, progress: Callable[[ProgressEvent], None] | None = None
) -> StoryZoo:
    """Builds (or finds in the cache) digits v1 in `zoo` and v2, v3 beside it."""
    zoo = zoo.absolute()
    built: list[str] = []
    seed = 0
    key: Path | None = None
    existing = zoo / "report.json"
    if existing.is_file():
        # Same seed (so the same teacher) and same signing key as the zoo was built with:
        # a zoo built with `--key elsewhere` must not be rebuilt under a fresh key.
        try:
            report = json.loads(existing.read_text())
            seed = int(_digits_entry(report).get("seed", 0))
            used = (report.get("signing_key") or {}).get("path")
            key = Path(used) if used and Path(used).is_file() else None
        except (OSError, ValueError, AttributeError):
            seed, key = 0, None
    result = build_zoo(zoo, (MODEL,), progress=progress, seed=seed, key_path=key)
    built += [f"{m} v1" for m in result["run"]["built"]]
    reports = {1: _digits_entry(result)}
    versions = {1: zoo}
    key = Path(result["signing_key"]["path"])
    public = _public_key(key, zoo / STORY_DIR)
    for version, student in STORY_VERSIONS:
        out = zoo / STORY_DIR / f"v{version}"
        _share_teacher(zoo, out)
        result = build_zoo(
            out,
            (MODEL,),
            progress=progress,
            key_path=key,
            version=version,
            seed=seed,
            options={MODEL: {"student_variant": student}},
        )
        built += [f"{m} v{version}" for m in result["run"]["built"]]
        reports[version] = _digits_entry(result)
        versions[version] = out
    return StoryZoo(
        zoo=zoo,
        versions=versions,
        public_key=public,
        seed=seed,
        reports=reports,
        built=tuple(built),
    )


def accuracy(entry: dict[str, Any], variant: str | None = None) -> float | None:
    """A version's validation accuracy from its report entry (one variant's, or the FP32
    student's)."""
    if variant is not None:
        value = entry.get("variants", {}).get(variant, {}).get("accuracy")
    else:
        value = entry.get("metrics", {}).get("student_accuracy")
    return float(value) if isinstance(value, int | float) else None


def write_test_split(path: Path, entry: Mapping[str, Any] | None = None) -> int:
    """The digits test split (never trained or fitted on) with its labels, as .npz keyed by
    the model's input name, plus `labels` (what `tandem.agent.simulator` reads): the
    `test.npz` that examples/digits' `[prepare]` wrote for the build whose report `entry`
    is given, or else a fresh one from the example's own split."""
    prepared = (entry or {}).get("prepared_dir")
    source = Path(prepared) / "test.npz" if prepared else None
    tmp = path.with_name(path.name + ".tmp")
    if source is not None and source.is_file():
        shutil.copyfile(source, tmp)
    else:
        from tandem.cloud.build import usercode
        from tandem.cloud.build.pipeline import EXAMPLES

        code = EXAMPLES / MODEL / "train.py"
        split = usercode.import_callable("train:load_split", code, "digits test split")()
        with tmp.open("wb") as fh:
            np.savez(fh, pixels=split.x_test, labels=split.y_test)
    tmp.replace(path)
    with np.load(path) as data:
        return len(data["labels"])


def main(argv: list[str] | None = None) -> int:
    """`python -m tandem.cloud.demo.zoo ZOO DATASET.npz`: the build, out of the demo process.

    The build loads torch, JAX and friends with their thread pools; the demo process that
    forks the other children stays free of them. Progress goes to stdout as JSON lines.
    """
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        sys.stderr.write("usage: python -m tandem.cloud.demo.zoo ZOO DATASET.npz\n")
        return 2
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)

    def emit(doc: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(doc) + "\n")
        sys.stdout.flush()

    def on_progress(event: ProgressEvent) -> None:
        emit(
            {
                "event": "progress",
                "model": event.model,
                "step": event.step,
                "completed": event.completed,
                "total": event.total,
            }
        )

    story = ensure_story_zoo(Path(args[0]), on_progress)
    rows = write_test_split(Path(args[1]), story.reports[1])
    emit({"event": "done", "story": story.to_json(), "test_rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
