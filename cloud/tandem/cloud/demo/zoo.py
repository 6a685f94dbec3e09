"""The models the story needs, built through the build pipeline (and its cache).

- digits v1 in the user's zoo (`tandem models build --out ZOO` builds the same, cached);
- digits v2, a retrained student, in `ZOO/demo/v2/`;
- digits v3, a deliberately bad student (trained on shuffled labels), in `ZOO/demo/v3/`.

v2 and v3 live in zoos of their own because a zoo's report holds one entry per model: built
into the user's zoo, each would replace v1's entry in its report. They are signed with the
user's zoo key, so the devices trust one key, and they reuse the zoo's teacher (its cache
file is keyed by everything the teacher depends on), so each costs a student, not a teacher.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from collections.abc import Callable
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
    """Copies the zoo's cached teacher(s) into a story zoo's cache, when not there yet."""
    src = zoo / ".cache" / MODEL
    dest = out / ".cache" / MODEL
    dest.mkdir(parents=True, exist_ok=True)
    for teacher in src.glob("teacher-*.pt"):
        target = dest / teacher.name
        if not target.exists():
            tmp = target.with_suffix(".tmp")
            shutil.copyfile(teacher, tmp)
            tmp.replace(target)


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
    """A version's test accuracy from its report entry (one variant's, or the student's)."""
    if variant is not None:
        value = entry.get("variants", {}).get(variant, {}).get("accuracy")
    else:
        value = entry.get("metrics", {}).get("student_fp32_accuracy")
    return float(value) if isinstance(value, int | float) else None


def write_test_split(path: Path) -> int:
    """The digits test split (never trained on) with its labels, as .npz keyed by the
    model's input name, plus `labels` (what `tandem.agent.simulator` reads)."""
    from tandem.cloud.build.digits import INPUTS, load_split

    split = load_split()
    arrays: dict[str, Any] = {INPUTS[0].name: split.x_test.astype(np.float32)}
    np.savez(path, labels=split.y_test.astype(np.int64), **arrays)
    return len(split.y_test)


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
    rows = write_test_split(Path(args[1]))
    emit({"event": "done", "story": story.to_json(), "test_rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
