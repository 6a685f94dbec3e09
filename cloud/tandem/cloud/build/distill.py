"""`[edge.distill]`: training the edge model as a student of the full model.

Knowledge distillation (Hinton et al., 2015) on the spec's training data: each step the
teacher (the full model) answers the same, optionally augmented, batch and the student learns
from its answers. The loss, on the primary output (`[model] scores`):

- classification: `kd_weight` x KL(softmax(teacher/T) || softmax(student/T)) x T^2, plus
  (1 - kd_weight) x cross-entropy on the labels (with `label_smoothing`) when the data has
  them (KD alone otherwise);
- embedding, regression, generic: mean squared error to the teacher's output;

and mean squared error to the teacher on every other float output. AdamW with a one-cycle
schedule (peak 3x `learning_rate`), one torch thread: reproducible, and fair to the other
users of a small build machine. The student's initial weights, batch order and augmentation
all come from `seed`.

`student_variant = "bad"` (a build option) trains a deliberately broken student, on shuffled
labels with no teacher and no augmentation for at most 15 epochs: the bad version that
rollout tests and the demo need. Only a classifier with labels can be broken this way.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from tandem.cloud.build import usercode
from tandem.cloud.build.errors import SpecDataError, SpecError, TrainingError
from tandem.cloud.build.spec import DistillSpec
from tandem.cloud.build.torch_source import make_module, torch_threads

Array = np.ndarray[Any, Any]
STUDENT_VARIANTS = ("normal", "bad")
BAD_EPOCHS = 15


@dataclasses.dataclass(frozen=True)
class Distilled:
    student: Any  # the trained nn.Module, in eval mode
    seconds: float
    epochs: int
    parameters: int


def derive_seed(model: str, purpose: str, seed: int) -> int:
    """The training seed of one `purpose` ("student:v2:normal") for a build seed."""
    digest = hashlib.sha256(f"{model}:{purpose}:{seed}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def parameter_count(module: Any) -> int:
    return int(sum(p.numel() for p in module.parameters()))


def make_student(spec: DistillSpec, seed: int) -> Any:
    import torch

    torch.manual_seed(seed)  # the student's initial weights
    return make_module(spec.student, spec.student_file, "[edge.distill] student")


def distill(
    spec: DistillSpec,
    *,
    teacher: Callable[[Sequence[Any]], list[Any]],
    student: Any,
    data: Mapping[str, Array],
    input_names: Sequence[str],
    output_names: Sequence[str],
    primary: str,
    task: str,
    seed: int,
    student_variant: str = "normal",
) -> Distilled:
    """Trains `student` in place on `data` (inputs by name, plus `labels`) and returns it.

    `teacher` maps a tuple of input tensors to the full model's outputs (a list, in
    `output_names` order); the student must return the same outputs.
    """
    import torch

    if student_variant not in STUDENT_VARIANTS:
        raise SpecError(
            f"option student_variant: {student_variant!r} is not one of"
            f" {', '.join(STUDENT_VARIANTS)}"
        )
    missing = [n for n in input_names if n not in data]
    if missing:
        raise SpecDataError(
            f"[edge.distill] data: {spec.data.name} lacks the model's inputs {missing}"
        )
    labels_array = data.get("labels")
    bad = student_variant == "bad"
    if bad and (task != "classification" or labels_array is None):
        raise SpecError(
            "option student_variant = 'bad': needs a classifier whose [edge.distill] data"
            " has labels (the bad student learns shuffled labels)"
        )
    rows = int(data[input_names[0]].shape[0])
    if labels_array is not None and labels_array.shape[:1] != (rows,):
        raise SpecDataError(f"[edge.distill] data: labels must have one entry per row ({rows})")
    epochs = min(spec.epochs, BAD_EPOCHS) if bad else spec.epochs
    kd_weight = 0.0 if bad else spec.kd_weight
    augment = None
    if spec.augment is not None and not bad:
        assert spec.augment_file is not None
        augment = usercode.import_callable(
            spec.augment, spec.augment_file, "[edge.distill] augment"
        )
    inputs = {n: torch.from_numpy(np.ascontiguousarray(data[n])) for n in input_names}
    labels = None
    if labels_array is not None and task == "classification":
        labels_np = labels_array.astype(np.int64)
        if bad:
            labels_np = np.random.default_rng(seed).permutation(labels_np)
        labels = torch.from_numpy(labels_np)
    primary_index = list(output_names).index(primary)
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(rows / spec.batch_size)
    optimizer = torch.optim.AdamW(
        student.parameters(), lr=spec.learning_rate, weight_decay=spec.weight_decay
    )
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=spec.learning_rate * 3, total_steps=epochs * steps_per_epoch
    )
    temperature = spec.temperature
    started = time.perf_counter()
    with torch_threads(1):
        for _ in range(epochs):
            student.train()
            order = torch.randperm(rows, generator=generator)
            for start in range(0, rows, spec.batch_size):
                picked = order[start : start + spec.batch_size]
                batch = {n: t[picked] for n, t in inputs.items()}
                if augment is not None:
                    batch = _augmented(augment, batch, generator)
                args = [batch[n] for n in input_names]
                outputs = _as_list(student(*args))
                if len(outputs) != len(output_names):
                    raise SpecError(
                        f"[edge.distill] student: returns {len(outputs)} outputs; the full"
                        f" model returns {len(output_names)} ({', '.join(output_names)})"
                    )
                targets: list[Any] = []
                if kd_weight > 0 or labels is None or len(output_names) > 1:
                    with torch.no_grad():
                        targets = teacher(args)
                loss = _loss(
                    outputs,
                    targets,
                    None if labels is None else labels[picked],
                    primary_index,
                    task,
                    kd_weight,
                    temperature,
                    spec.label_smoothing,
                )
                if not torch.isfinite(loss):
                    raise TrainingError(
                        "[edge.distill]: the loss is not finite; lower learning_rate"
                    )
                optimizer.zero_grad()
                loss.backward()  # type: ignore[no-untyped-call]
                optimizer.step()
                schedule.step()
    student.eval()
    return Distilled(
        student=student,
        seconds=round(time.perf_counter() - started, 2),
        epochs=epochs,
        parameters=parameter_count(student),
    )


def _augmented(
    augment: Callable[..., Any], batch: dict[str, Any], generator: Any
) -> dict[str, Any]:
    try:
        result = augment(batch, generator)
    except Exception as exc:
        raise SpecError(f"[edge.distill] augment: raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(result, Mapping) or set(result) != set(batch):
        raise SpecError(
            "[edge.distill] augment: must return a dict with the same input names it was given"
        )
    return dict(result)


def _as_list(out: Any) -> list[Any]:
    if isinstance(out, Mapping):
        return list(out.values())
    if isinstance(out, tuple | list):
        return list(out)
    return [out]


def _loss(
    outputs: list[Any],
    targets: list[Any],
    labels: Any,
    primary_index: int,
    task: str,
    kd_weight: float,
    temperature: float,
    label_smoothing: float,
) -> Any:
    import torch.nn.functional as F

    student_primary = outputs[primary_index]
    if task == "classification":
        loss = None
        if labels is not None:
            loss = F.cross_entropy(student_primary, labels, label_smoothing=label_smoothing)
        if targets and (kd_weight > 0 or labels is None):
            soft = F.softmax(targets[primary_index] / temperature, dim=1)
            kd = F.kl_div(
                F.log_softmax(student_primary / temperature, dim=1), soft, reduction="batchmean"
            ) * (temperature**2)
            loss = kd if loss is None else kd_weight * kd + (1.0 - kd_weight) * loss
    else:
        loss = F.mse_loss(student_primary, targets[primary_index])
    assert loss is not None  # no labels: the teacher answered (see `distill`)
    for index, (out, target) in enumerate(zip(outputs, targets, strict=False)):
        if index != primary_index and out.is_floating_point():
            loss = loss + F.mse_loss(out, target)
    return loss
