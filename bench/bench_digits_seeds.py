"""Do the digits accuracies hold across data splits, or only on the split the build uses?

For each split seed in SPLIT_SEEDS (training seed 0, derived exactly as a build with
`--seed 0` derives it), trains the teacher with examples/digits/train.py (`train_teacher`,
`load_split(seed)`) and distills the student as the build does (`tandem.cloud.build.distill`
with the spec's [edge.distill] recipe), and records validation and test accuracy of both and
the student's drop. The exports and INT8 variants are skipped (they track the fp32 student;
the zoo tests check them on the build's split). Splits train in parallel worker processes,
each single-threaded like the build.

Run (not part of `make test`; ~1-2 CPU-minutes per split):
    .venv/bin/python bench/bench_digits_seeds.py [--label NAME] [--out FILE] [--workers N]
or  .venv/bin/pytest bench/bench_digits_seeds.py -q -s
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support.examples import load_example, spec_file  # noqa: E402

SPLIT_SEEDS = (0, 1, 7, 42, 1797)
TRAINING_SEED = 0
RESULTS = Path(__file__).parent / "results" / "build_digits_seeds.txt"


@dataclass(frozen=True)
class SplitResult:
    split_seed: int
    training_seed: int
    teacher_val: float
    teacher_test: float
    student_val: float
    student_test: float
    drop: float  # teacher_test - student_test
    teacher_cpu_s: float
    student_cpu_s: float


def measure(split_seed: int, training_seed: int = TRAINING_SEED) -> SplitResult:
    """Teacher and student accuracies on one split, trained with one build seed."""
    from tandem.cloud.build import distill
    from tandem.cloud.build.spec import ModelSpec, load_spec

    train = load_example("digits")
    spec = load_spec(spec_file("digits"))
    assert isinstance(spec, ModelSpec) and spec.distill is not None
    split = train.load_split(split_seed)
    started = time.process_time()
    teacher = train.train_teacher(split, train.derive_seed(training_seed, "teacher"))
    teacher_cpu = time.process_time() - started
    started = time.process_time()
    seed = distill.derive_seed("digits", "student:v1:normal", training_seed)
    student = distill.make_student(spec.distill, seed)
    # make_student normalises with the build split's statistics; this split has its own
    student.normalize.mean.fill_(float(split.x_train.mean()))
    student.normalize.std.fill_(float(split.x_train.std()))

    def answer(args: Any) -> list[Any]:
        return [teacher(*args)]

    distill.distill(
        spec.distill,
        teacher=answer,
        student=student,
        data={"pixels": split.x_train, "labels": split.y_train},
        input_names=["pixels"],
        output_names=["logits"],
        primary="logits",
        task="classification",
        seed=seed,
    )
    student_cpu = time.process_time() - started

    def acc(model: Any, x: Any, y: Any) -> float:
        return float(train.accuracy(model, x, y))

    teacher_test = acc(teacher, split.x_test, split.y_test)
    student_test = acc(student, split.x_test, split.y_test)
    return SplitResult(
        split_seed=split_seed,
        training_seed=training_seed,
        teacher_val=acc(teacher, split.x_val, split.y_val),
        teacher_test=teacher_test,
        student_val=acc(student, split.x_val, split.y_val),
        student_test=student_test,
        drop=teacher_test - student_test,
        teacher_cpu_s=teacher_cpu,
        student_cpu_s=student_cpu,
    )


def run(
    seeds: tuple[int, ...] = SPLIT_SEEDS,
    workers: int = 2,
    training_seeds: tuple[int, ...] = (TRAINING_SEED,),
) -> list[SplitResult]:
    jobs = [(s, t) for t in training_seeds for s in seeds]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(measure, *zip(*jobs, strict=True)))


def table(label: str, results: list[SplitResult]) -> str:
    lines = [
        f"[{label}]",
        "split train  teacher val  teacher test  student val  student test  drop (pts)  "
        "CPU s teacher/student",
    ]
    for r in results:
        lines.append(
            f"{r.split_seed:>5} {r.training_seed:>5}  "
            f"{r.teacher_val:>10.2%}  {r.teacher_test:>11.2%}  "
            f"{r.student_val:>10.2%}  {r.student_test:>11.2%}  {100 * r.drop:>9.2f}  "
            f"{r.teacher_cpu_s:>7.1f} / {r.student_cpu_s:.1f}"
        )
    for name, pick in (("median", statistics.median), ("min", min), ("max", max)):
        row = {k: pick(getattr(r, k) for r in results) for k in asdict(results[0])}
        lines.append(
            f"{name:>12} {row['teacher_val']:>10.2%}  {row['teacher_test']:>11.2%}  "
            f"{row['student_val']:>10.2%}  {row['student_test']:>11.2%}  "
            f"{100 * row['drop']:>9.2f}"
        )
    return "\n".join(lines) + "\n"


def test_digits_accuracies_hold_across_split_seeds() -> None:
    results = run()
    print(table("pytest", results))
    assert min(r.teacher_test for r in results) >= 0.985
    assert max(r.drop for r in results) <= 0.025


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default="current code")
    parser.add_argument("--out", type=Path, default=None, help="append the table to this file")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="*", default=list(SPLIT_SEEDS))
    parser.add_argument("--training-seeds", type=int, nargs="*", default=[TRAINING_SEED])
    args = parser.parse_args()
    started = time.perf_counter()
    text = table(args.label, run(tuple(args.seeds), args.workers, tuple(args.training_seeds)))
    text += f"wall {time.perf_counter() - started:.0f} s, {args.workers} workers\n"
    print(text, end="")
    if args.out is not None:
        with args.out.open("a") as handle:
            handle.write(text + "\n")


if __name__ == "__main__":
    main()
