"""digits: a CNN teacher for the cloud and a distilled INT8 student for four edge runtimes.

Data: scikit-learn's 8x8 digits (1797 images, shipped inside the package), split once with a
fixed seed into train (65%), validation (15%) and test (20%), stratified by label. The split
never depends on `ctx.seed`, so accuracies of different builds and versions compare.

Tensors, the same for teacher and student: `pixels` FP32 [-1, 64] raw 0..16 pixel values
(normalisation is the model's first layer) -> `logits` FP32 [-1, 10].

Steps: train the teacher (random shifts, rotations and zooms as augmentation); distill the
student from it (KL on temperature-softened logits plus cross-entropy on the labels); export
the student to ONNX INT8 (onnxruntime static QDQ, calibrated on train rows), OpenVINO IR INT8
(NNCF), TFLite INT8 (litert-torch's PT2E quantizer, no TensorFlow) and TorchScript FP32; fit
a temperature per variant on that variant's validation logits; measure accuracy, ECE and
batch-1 latency of every variant in its own runtime; package and sign. The teacher goes to
the cloud repository as ONNX FP32 (`model.onnx`, default backend onnxruntime), TorchScript
(`model.pt`) and OpenVINO IR FP32 (`model.xml` + `model.bin`), so an operator can switch
backends in config.

Options (`ctx.options`): `student_variant` = "normal" (default) or "bad" (a student trained
on shuffled labels: a deliberately broken version for rollout tests; quality gates are
recorded but not enforced for it).

The TFLite variant has a fixed batch of 1: litert-torch cannot lower a symbolic batch for
this graph, and the converted reshapes pin the batch. Its manifest says so (input shape
[1, 64], `metrics.fixed_batch` = 1); runtimes feed it row by row.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import inspect
import io
import itertools
import json
import logging
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tandem.cloud.build.context import BuildContext
from tandem.cloud.build.errors import ExportError, QualityGateError, TrainingError
from tandem.cloud.build.packaging import (
    repository_config,
    write_repository_model,
    write_variant,
)
from tandem.cloud.build.runners import Runner, load_runner, median_latency_ms, run_batched
from tandem.sdk.artifacts import TensorSpec
from tandem.sdk.atomic import PUBLIC, atomic_open
from tandem.sdk.runtimes.openvino import import_openvino

log = logging.getLogger(__name__)

MODEL = "digits"
TASK = "classification"
NUM_CLASSES = 10
INPUTS = (TensorSpec("pixels", "FP32", (-1, 64)),)
OUTPUTS = (TensorSpec("logits", "FP32", (-1, NUM_CLASSES)),)
VARIANTS = ("onnx-int8", "openvino-int8", "tflite-int8", "torch-fp32")

# Fixed: every build and version sees the same split. Declared, not chosen for its results:
# the seed study (bench/bench_digits_seeds.py, bench/results/build_digits_seeds.txt) trains
# teacher and student on split seeds 0, 1, 7, 42 and 1797 and every gate holds on each.
SPLIT_SEED = 7
TEST_FRACTION = 0.20
VALIDATION_FRACTION = 0.15
REFERENCE_ROWS = 32  # test rows whose outputs ship in each artifact
ECE_BINS = 15
ONNX_OPSET = 18

# Quality gates (fractions of the test set).
TEACHER_MIN_ACCURACY = 0.985
STUDENT_MAX_DROP = 0.025  # student fp32 vs teacher
INT8_MAX_DROP = 0.010  # each INT8 variant vs student fp32


@dataclass(frozen=True)
class TrainConfig:
    epochs: int  # passes over the training split
    learning_rate: float  # peak of the one-cycle schedule
    batch_size: int  # rows per step
    weight_decay: float  # AdamW decoupled weight decay
    kd_temperature: float = 4.0  # softening of teacher and student logits for the KD term
    kd_weight: float = 0.0  # share of the KD term; the rest is cross-entropy on labels
    label_smoothing: float = 0.0  # of the cross-entropy term
    shift_augment: bool = True  # random +-1 pixel shifts of each training image
    rotate_degrees: float = 0.0  # > 0: also random rotations within +-this many degrees
    scale_jitter: float = 0.0  # > 0: also random zoom by a factor within 1 +- this

    def __post_init__(self) -> None:
        from tandem.errors import ConfigError

        if self.epochs < 1:
            raise ConfigError("epochs", f"must be >= 1, got {self.epochs}")
        if not 0.0 <= self.kd_weight <= 1.0:
            raise ConfigError("kd_weight", f"must be within [0, 1], got {self.kd_weight}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(
                "label_smoothing", f"must be within [0, 1), got {self.label_smoothing}"
            )
        if not 0.0 <= self.rotate_degrees <= 45.0:
            raise ConfigError(
                "rotate_degrees", f"must be within [0, 45], got {self.rotate_degrees}"
            )
        if not 0.0 <= self.scale_jitter < 0.5:
            raise ConfigError("scale_jitter", f"must be within [0, 0.5), got {self.scale_jitter}")
        if self.kd_temperature <= 0:
            raise ConfigError("kd_temperature", f"must be > 0, got {self.kd_temperature}")


# Label smoothing regularises both nets and leaves them underconfident, which the fitted
# temperature then corrects. Without it both are calibrated to within the noise of a
# 360-image test set (ECE ~0.006-0.01 at ~99% accuracy) and a temperature fitted on 270
# validation images cannot show a gain: it chases the one or two confident mistakes there.
# Augmentation: random rotations (+-10 degrees), zooms (+-10%) and sub-pixel shifts (+-1
# pixel). Chosen on the validation splits of the seed study (bench/bench_digits_seeds.py):
# mean teacher validation accuracy over 5 split seeds 99.41% with integer shifts only, 99.63%
# with this, at the same CPU cost; 60 epochs instead of 40 did not help (99.48%).
TEACHER_TRAINING = TrainConfig(
    epochs=40,
    learning_rate=2e-3,
    batch_size=64,
    weight_decay=1e-4,
    label_smoothing=0.1,
    rotate_degrees=10.0,
    scale_jitter=0.1,
)
# The student distils on the same augmented images (the teacher labels each one): mean
# validation accuracy over the 5 split seeds 99.11% either way, worst split 98.89% instead
# of 98.52% with integer shifts only; 80 epochs (99.19%) or kd_weight 0.9 (99.04%) were not
# worth their cost.
STUDENT_TRAINING = TrainConfig(
    epochs=60,
    learning_rate=2e-3,
    batch_size=64,
    weight_decay=1e-4,
    kd_weight=0.7,
    label_smoothing=0.1,
    rotate_degrees=10.0,
    scale_jitter=0.1,
)
BAD_STUDENT_TRAINING = TrainConfig(
    epochs=15, learning_rate=2e-3, batch_size=64, weight_decay=1e-4, shift_augment=False
)

Array = np.ndarray[Any, Any]


# --- data --------------------------------------------------------------------------------


@dataclass(frozen=True)
class DigitsSplit:
    x_train: Array  # float32 [n, 64], raw 0..16
    y_train: Array  # int64 [n]
    x_val: Array
    y_val: Array
    x_test: Array
    y_test: Array

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.y_train), "validation": len(self.y_val), "test": len(self.y_test)}


def load_split(seed: int = SPLIT_SEED) -> DigitsSplit:
    """The stratified train / validation / test split drawn with `seed` (SPLIT_SEED by default)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = np.asarray(data.data, dtype=np.float32)
    y = np.asarray(data.target, dtype=np.int64)
    x_rest, x_test, y_rest, y_test = train_test_split(
        x, y, test_size=TEST_FRACTION, random_state=seed, stratify=y
    )
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest,
        y_rest,
        test_size=VALIDATION_FRACTION / (1.0 - TEST_FRACTION),
        random_state=seed,
        stratify=y_rest,
    )
    return DigitsSplit(x_train, y_train, x_val, y_val, x_test, y_test)


# --- models ------------------------------------------------------------------------------


class Normalize(nn.Module):
    """Raw 0..16 pixels -> zero mean, unit variance, using the training split's statistics."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: float, std: float) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels - self.mean) / self.std


class TeacherCNN(nn.Module):
    """Three 3x3 convolutions and two dense layers: ~620k parameters."""

    def __init__(self, mean: float, std: float) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 128, 3, padding=1)
        self.fc1 = nn.Linear(128 * 4 * 4, 256)
        self.fc2 = nn.Linear(256, NUM_CLASSES)
        self.dropout = nn.Dropout(0.3)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.normalize(pixels).reshape(-1, 1, 8, 8)
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.conv3(x))
        x = self.dropout(F.relu(self.fc1(x.reshape(-1, 128 * 4 * 4))))
        return self.fc2(x)  # type: ignore[no-any-return]


class StudentCNN(nn.Module):
    """Two small convolutions and one dense layer: ~3.8k parameters, 160x fewer."""

    def __init__(self, mean: float, std: float) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 4 * 4, NUM_CLASSES)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.normalize(pixels).reshape(-1, 1, 8, 8)
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(x.reshape(-1, 16 * 4 * 4))  # type: ignore[no-any-return]


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --- training ----------------------------------------------------------------------------


@contextlib.contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    # One thread: reproducible reductions, and fair to the other users of a small machine.
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _shift(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shifts every image by its own random -1..1 pixels in each direction (zero fill)."""
    count = batch.shape[0]
    padded = F.pad(batch.reshape(count, 8, 8), (1, 1, 1, 1))
    dy = torch.randint(0, 3, (count,), generator=generator)
    dx = torch.randint(0, 3, (count,), generator=generator)
    steps = torch.arange(8)
    rows = (dy[:, None] + steps)[:, :, None]
    cols = (dx[:, None] + steps)[:, None, :]
    return padded[torch.arange(count)[:, None, None], rows, cols].reshape(count, 64)


def _affine(batch: torch.Tensor, generator: torch.Generator, config: TrainConfig) -> torch.Tensor:
    """Rotates, zooms and shifts every image by its own random amounts (bilinear, zero fill).

    Rotation within +-`rotate_degrees`, zoom within 1 +- `scale_jitter`, and (with
    `shift_augment`) a sub-pixel shift within +-1 pixel in each direction.
    """
    count = batch.shape[0]

    def uniform(limit: float) -> torch.Tensor:
        return (torch.rand(count, generator=generator) * 2.0 - 1.0) * limit

    angle = uniform(math.radians(config.rotate_degrees))
    scale = 1.0 + uniform(config.scale_jitter)
    pixel = 2.0 / 8.0  # one pixel in affine_grid's [-1, 1] coordinates
    shift_limit = pixel if config.shift_augment else 0.0
    tx, ty = uniform(shift_limit), uniform(shift_limit)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, tx], dim=1), torch.stack([sin, cos, ty], dim=1)], dim=1
    )
    images = batch.reshape(count, 1, 8, 8)
    grid = F.affine_grid(theta, [count, 1, 8, 8], align_corners=False)
    warped = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return warped.reshape(count, 64)


def _augment(batch: torch.Tensor, generator: torch.Generator, config: TrainConfig) -> torch.Tensor:
    if config.rotate_degrees > 0 or config.scale_jitter > 0:
        return _affine(batch, generator, config)
    if config.shift_augment:
        return _shift(batch, generator)
    return batch


def train(
    model: nn.Module,
    split: DigitsSplit,
    config: TrainConfig,
    seed: int,
    *,
    teacher: nn.Module | None = None,
    labels: Array | None = None,
) -> nn.Module:
    """Trains `model` in place on the training split (labels overridable) and returns it."""
    generator = torch.Generator().manual_seed(seed)
    x_all = torch.from_numpy(split.x_train)
    y_all = torch.from_numpy(split.y_train if labels is None else labels)
    steps_per_epoch = math.ceil(len(x_all) / config.batch_size)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=config.learning_rate * 3,
        total_steps=config.epochs * steps_per_epoch,
    )
    if teacher is not None:
        teacher.eval()
    with _torch_threads(1):
        for _ in range(config.epochs):
            model.train()
            order = torch.randperm(len(x_all), generator=generator)
            for start in range(0, len(order), config.batch_size):
                rows = order[start : start + config.batch_size]
                x, y = x_all[rows], y_all[rows]
                x = _augment(x, generator, config)
                logits = model(x)
                loss = F.cross_entropy(logits, y, label_smoothing=config.label_smoothing)
                if teacher is not None and config.kd_weight > 0:
                    with torch.no_grad():
                        soft_targets = F.softmax(teacher(x) / config.kd_temperature, dim=1)
                    kd = F.kl_div(
                        F.log_softmax(logits / config.kd_temperature, dim=1),
                        soft_targets,
                        reduction="batchmean",
                    ) * (config.kd_temperature**2)
                    loss = config.kd_weight * kd + (1.0 - config.kd_weight) * loss
                optimizer.zero_grad()
                loss.backward()  # type: ignore[no-untyped-call]
                optimizer.step()
                schedule.step()
    model.eval()
    return model


def predict(model: nn.Module, x: Array) -> Array:
    with _torch_threads(1), torch.inference_mode():
        return np.asarray(model(torch.from_numpy(x)).numpy())


def accuracy(logits: Array, labels: Array) -> float:
    return float(np.mean(np.argmax(logits, axis=1) == labels))


# --- calibration -------------------------------------------------------------------------


def softmax(logits: Array, temperature: float = 1.0) -> Array:
    z = logits.astype(np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return np.asarray(e / e.sum(axis=1, keepdims=True))


def negative_log_likelihood(logits: Array, labels: Array, temperature: float) -> float:
    probs = softmax(logits, temperature)
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1.0))))


def fit_temperature(logits: Array, labels: Array) -> float:
    """The temperature minimising validation NLL (golden-section search on log T)."""
    lo, hi = math.log(0.05), math.log(20.0)
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa = negative_log_likelihood(logits, labels, math.exp(a))
    fb = negative_log_likelihood(logits, labels, math.exp(b))
    for _ in range(60):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = negative_log_likelihood(logits, labels, math.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = negative_log_likelihood(logits, labels, math.exp(b))
    return float(math.exp((lo + hi) / 2))


def expected_calibration_error(probs: Array, labels: Array, bins: int = ECE_BINS) -> float:
    """Top-label ECE with equal-width confidence bins."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    total = 0.0
    for low, high in itertools.pairwise(edges):
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            gap = abs(float(correct[inside].mean()) - float(confidence[inside].mean()))
            total += gap * float(inside.mean())
    return total


@dataclass(frozen=True)
class Calibration:
    temperature: float
    ece_before: float  # on the test split, temperature 1
    ece_after: float  # on the test split, fitted temperature
    nll_before: float
    nll_after: float

    def manifest_entry(self) -> dict[str, Any]:
        return {
            "method": "temperature",
            "temperature": round(self.temperature, 6),
            "fitted_on": "validation",
            "ece_before": round(self.ece_before, 6),
            "ece_after": round(self.ece_after, 6),
        }


def calibrate(val_logits: Array, y_val: Array, test_logits: Array, y_test: Array) -> Calibration:
    temperature = fit_temperature(val_logits, y_val)
    return Calibration(
        temperature=temperature,
        ece_before=expected_calibration_error(softmax(test_logits), y_test),
        ece_after=expected_calibration_error(softmax(test_logits, temperature), y_test),
        nll_before=negative_log_likelihood(test_logits, y_test, 1.0),
        nll_after=negative_log_likelihood(test_logits, y_test, temperature),
    )


# --- exports -----------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Swallows the progress bars that NNCF and litert-torch print to stdout."""
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink):
        yield


def export_onnx(model: nn.Module, path: Path, sample: Array) -> Path:
    """FP32 ONNX with a dynamic batch dimension and the contract's tensor names."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    try:
        with _quiet():
            torch.onnx.export(
                model,
                (torch.from_numpy(sample[:2]),),
                str(path),
                input_names=["pixels"],
                output_names=["logits"],
                dynamic_shapes={"pixels": {0: batch}},
                opset_version=ONNX_OPSET,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
    except Exception as exc:
        raise ExportError(f"ONNX export failed: {exc}") from exc
    return path


def quantize_onnx_int8(fp32_path: Path, out_path: Path, calibration_rows: Array) -> Path:
    """Static QDQ INT8 (per-channel weights) with activation ranges from `calibration_rows`."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self._batches = iter(
                [
                    {"pixels": calibration_rows[i : i + 64]}
                    for i in range(0, len(calibration_rows), 64)
                ]
            )

        def get_next(self) -> dict[str, Array] | None:
            return next(self._batches, None)

    prepared = out_path.with_name(out_path.stem + ".prep.onnx")
    try:
        quant_pre_process(str(fp32_path), str(prepared))
        quantize_static(
            str(prepared),
            str(out_path),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
    except Exception as exc:
        raise ExportError(f"onnxruntime INT8 quantization failed: {exc}") from exc
    finally:
        prepared.unlink(missing_ok=True)
    return out_path


def export_openvino_fp32(onnx_path: Path, out_dir: Path) -> Path:
    """OpenVINO IR at full FP32 precision (no FP16 weight compression); returns the .xml."""
    ov = import_openvino()
    out_dir.mkdir(parents=True, exist_ok=True)
    xml = out_dir / "model.xml"
    try:
        ov.save_model(ov.convert_model(str(onnx_path)), str(xml), compress_to_fp16=False)
    except Exception as exc:
        raise ExportError(f"OpenVINO IR export failed: {exc}") from exc
    return xml


def quantize_openvino_int8(fp32_onnx: Path, out_dir: Path, calibration_rows: Array) -> Path:
    """OpenVINO IR INT8 via NNCF post-training quantization; returns the .xml path."""
    ov = import_openvino()  # first: it keeps NNCF's telemetry off too
    import nncf

    out_dir.mkdir(parents=True, exist_ok=True)
    xml = out_dir / "model.xml"
    try:
        model = ov.Core().read_model(str(fp32_onnx))
        dataset = nncf.Dataset([calibration_rows[i : i + 1] for i in range(len(calibration_rows))])
        with _quiet():
            quantized = nncf.quantize(
                model,
                dataset,
                subset_size=len(calibration_rows),
                preset=nncf.QuantizationPreset.MIXED,
            )
        ov.save_model(quantized, str(xml), compress_to_fp16=False)
    except Exception as exc:
        raise ExportError(f"OpenVINO/NNCF INT8 quantization failed: {exc}") from exc
    return xml


def quantize_tflite_int8(model: nn.Module, out_path: Path, calibration_rows: Array) -> Path:
    """TFLite INT8 via litert-torch: PT2E static quantization, then conversion (batch 1)."""
    import litert_torch
    from litert_torch.quantize import pt2e_quantizer, quant_config
    from torchao.quantization.pt2e import (  # type: ignore[import-untyped]
        move_exported_model_to_eval,
        quantize_pt2e,
    )

    sample = (torch.from_numpy(calibration_rows[:1]),)
    try:
        with _torch_threads(1), _quiet(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch-internal deprecations
            exported = torch.export.export(copy.deepcopy(model).eval(), sample).module()
            quantizer = pt2e_quantizer.PT2EQuantizer().set_global(
                pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=True)
            )
            prepared = quantize_pt2e.prepare_pt2e(exported, quantizer)
            with torch.no_grad():
                for i in range(len(calibration_rows)):
                    prepared(torch.from_numpy(calibration_rows[i : i + 1]))
            converted = quantize_pt2e.convert_pt2e(prepared, fold_quantize=False)
            converted = move_exported_model_to_eval(converted)
            # An exported GraphModule refuses .eval(); the graph above is already in eval
            # form, so only the flag litert-torch checks (and warns about) is left to set.
            converted.training = False
            edge = litert_torch.convert(
                converted,
                sample,
                quant_config=quant_config.QuantConfig(pt2e_quantizer=quantizer),
            )
            raw = out_path.with_name(out_path.stem + ".raw.tflite")
            edge.export(str(raw))
        out_path.write_bytes(dequantize_tflite_outputs(raw.read_bytes()))
        raw.unlink()
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"litert-torch INT8 conversion failed: {exc}") from exc
    return out_path


def dequantize_tflite_outputs(model_bytes: bytes) -> bytes:
    """Appends a DEQUANTIZE op to every int8/uint8 graph output, so outputs are float32.

    The converter ends a fully quantized graph with int8 outputs; the contract says
    `logits` FP32, and a float output keeps every runtime free of per-tensor scale handling.
    """
    import flatbuffers  # type: ignore[import-untyped]
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(bytearray(model_bytes), 0)
    if any(getattr(b, "offset", 0) > 1 for b in model.buffers or []):
        raise ExportError("TFLite model keeps buffers outside the flatbuffer; cannot rewrite it")
    dequantize = schema.BuiltinOperator.DEQUANTIZE
    opcode = next(
        (
            i
            for i, code in enumerate(model.operatorCodes)
            if max(code.builtinCode, code.deprecatedBuiltinCode) == dequantize
        ),
        None,
    )
    if opcode is None:
        code = schema.OperatorCodeT()
        code.builtinCode = dequantize
        code.deprecatedBuiltinCode = dequantize
        code.version = 2  # int8 input
        model.operatorCodes.append(code)
        opcode = len(model.operatorCodes) - 1
    quantized_types = (schema.TensorType.INT8, schema.TensorType.UINT8)
    for graph in model.subgraphs:
        for position, index in enumerate(list(graph.outputs)):
            tensor = graph.tensors[index]
            if tensor.type not in quantized_types:
                continue
            out = schema.TensorT()
            out.shape = tensor.shape
            out.shapeSignature = tensor.shapeSignature
            out.type = schema.TensorType.FLOAT32
            out.name = tensor.name
            out.buffer = 0  # buffer 0 is the empty sentinel: a computed tensor
            tensor.name = (tensor.name or b"") + b"_quantized"
            graph.tensors.append(out)
            new_index = len(graph.tensors) - 1
            op = schema.OperatorT()
            op.opcodeIndex = opcode
            op.inputs = np.array([index], dtype=np.int32)
            op.outputs = np.array([new_index], dtype=np.int32)
            graph.operators.append(op)
            graph.outputs[position] = new_index
            for signature in model.signatureDefs or []:
                for mapping in signature.outputs or []:
                    if mapping.tensorIndex == index:
                        mapping.tensorIndex = new_index
    builder = flatbuffers.Builder(len(model_bytes) + 4096)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def export_torchscript(model: nn.Module, path: Path, sample: Array) -> Path:
    try:
        with _torch_threads(1):
            traced = torch.jit.trace(  # type: ignore[no-untyped-call]
                copy.deepcopy(model).eval(), torch.from_numpy(sample[:2])
            )
            traced.save(str(path))  # type: ignore[no-untyped-call]
    except Exception as exc:
        raise ExportError(f"TorchScript export failed: {exc}") from exc
    return path


# --- the build ---------------------------------------------------------------------------


def derive_seed(seed: int, purpose: str) -> int:
    """The training seed of one `purpose` ("teacher", "student:v1:normal") for a build seed."""
    digest = hashlib.sha256(f"{MODEL}:{purpose}:{seed}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _seed_for(ctx: BuildContext, purpose: str) -> int:
    return derive_seed(ctx.seed, purpose)


def student_purpose(version: int, student_variant: str) -> str:
    return f"student:v{version}:{student_variant}"


def train_teacher(split: DigitsSplit, seed: int) -> nn.Module:
    """A freshly initialised teacher trained on `split` (what the build caches)."""
    mean, std = float(split.x_train.mean()), float(split.x_train.std())
    torch.manual_seed(seed)
    model = TeacherCNN(mean, std)
    return train(model, split, TEACHER_TRAINING, seed)


def train_student(
    split: DigitsSplit, teacher: nn.Module, seed: int, student_variant: str = "normal"
) -> nn.Module:
    """A freshly initialised student distilled from `teacher` ("bad": on shuffled labels)."""
    mean, std = float(split.x_train.mean()), float(split.x_train.std())
    torch.manual_seed(seed)
    student = StudentCNN(mean, std)
    if student_variant == "bad":
        shuffled = np.random.default_rng(seed).permutation(split.y_train)
        return train(student, split, BAD_STUDENT_TRAINING, seed, labels=shuffled)
    return train(student, split, STUDENT_TRAINING, seed, teacher=teacher)


def _teacher_cache_key(seed: int, mean: float, std: float) -> str:
    facts = {
        "seed": seed,
        "config": dataclasses.asdict(TEACHER_TRAINING),
        "source": inspect.getsource(TeacherCNN)
        + inspect.getsource(train)
        + inspect.getsource(train_teacher)
        + inspect.getsource(_shift)
        + inspect.getsource(_affine)
        + inspect.getsource(_augment),
        "split": [SPLIT_SEED, TEST_FRACTION, VALIDATION_FRACTION],
        "stats": [mean, std],
        "torch": torch.__version__,
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]


def _teacher(ctx: BuildContext, split: DigitsSplit, mean: float, std: float) -> nn.Module:
    """Trains the teacher, or loads it from ctx.cache_dir when nothing it depends on changed.

    The teacher depends on `seed` only (not on `version`): a new version retrains the student
    against the same teacher, as a real team would.
    """
    seed = _seed_for(ctx, "teacher")
    cached = ctx.cache_dir / f"teacher-{_teacher_cache_key(seed, mean, std)}.pt"
    if cached.exists():
        model = TeacherCNN(mean, std)
        model.load_state_dict(torch.load(cached, map_location="cpu", weights_only=True))
        model.eval()
        log.info("digits: teacher loaded from %s", cached)
        return model
    trained = train_teacher(split, seed)
    with atomic_open(cached, mode=PUBLIC) as fh:
        torch.save(trained.state_dict(), fh)
    return trained


@dataclass
class _VariantResult:
    name: str
    runtime: str
    precision: str
    entrypoint: str
    payload: dict[str, Path]
    runner: Runner
    input_shape: tuple[int, ...]
    metrics: dict[str, Any]
    calibration: Calibration | None = None


def build(ctx: BuildContext) -> dict[str, Any]:
    """Builds digits v`ctx.version` into the zoo; returns its report entry."""
    student_variant = str(ctx.options.get("student_variant", "normal"))
    if student_variant not in ("normal", "bad"):
        from tandem.errors import ConfigError

        raise ConfigError("student_variant", f"must be 'normal' or 'bad', got {student_variant!r}")
    enforce_gates = student_variant == "normal"
    steps = ctx.steps(11)
    work = ctx.work_dir

    steps.advance("loading scikit-learn digits")
    split = load_split()
    mean = float(split.x_train.mean())
    std = float(split.x_train.std())

    steps.advance("training the teacher CNN")
    teacher = _teacher(ctx, split, mean, std)
    teacher_test = predict(teacher, split.x_test)
    teacher_accuracy = accuracy(teacher_test, split.y_test)
    log.info("digits: teacher test accuracy %.4f", teacher_accuracy)
    if teacher_accuracy < TEACHER_MIN_ACCURACY:
        raise TrainingError(
            f"teacher test accuracy {teacher_accuracy:.4f} < {TEACHER_MIN_ACCURACY} "
            f"(seed {ctx.seed})"
        )

    steps.advance(f"distilling the student ({student_variant})")
    student_seed = _seed_for(ctx, student_purpose(ctx.version, student_variant))
    student = train_student(split, teacher, student_seed, student_variant)
    student_val = predict(student, split.x_val)
    student_test = predict(student, split.x_test)
    student_accuracy = accuracy(student_test, split.y_test)
    student_calibration = calibrate(student_val, split.y_val, student_test, split.y_test)
    log.info("digits: student fp32 test accuracy %.4f", student_accuracy)

    steps.advance("exporting the teacher (ONNX, TorchScript)")
    teacher_onnx = export_onnx(teacher, work / "teacher.onnx", split.x_train)
    teacher_pt = export_torchscript(teacher, work / "teacher.pt", split.x_train)
    teacher_xml = export_openvino_fp32(teacher_onnx, work / "teacher-openvino")
    teacher_runner = load_runner("onnx", teacher_onnx, ["pixels"], ["logits"])
    teacher_onnx_accuracy = accuracy(
        run_batched(teacher_runner, {"pixels": split.x_test})["logits"], split.y_test
    )
    teacher_calibration = calibrate(
        predict(teacher, split.x_val), split.y_val, teacher_test, split.y_test
    )

    calibration_rows = split.x_train  # activation ranges come from training data only
    student_onnx = export_onnx(student, work / "student.onnx", split.x_train)
    results: list[_VariantResult] = []

    steps.advance("quantizing for ONNX Runtime (static QDQ INT8)")
    onnx_int8 = quantize_onnx_int8(student_onnx, work / "student.int8.onnx", calibration_rows)
    results.append(
        _VariantResult(
            "onnx-int8",
            "onnx",
            "int8",
            "model.onnx",
            {"model.onnx": onnx_int8},
            load_runner("onnx", onnx_int8, ["pixels"], ["logits"]),
            (-1, 64),
            {"quantization": "onnxruntime static QDQ, per-channel int8 weights, minmax"},
        )
    )

    steps.advance("quantizing for OpenVINO (NNCF INT8)")
    ov_xml = quantize_openvino_int8(student_onnx, work / "openvino", calibration_rows)
    results.append(
        _VariantResult(
            "openvino-int8",
            "openvino",
            "int8",
            "model.xml",
            {"model.xml": ov_xml, "model.bin": ov_xml.with_suffix(".bin")},
            load_runner("openvino", ov_xml, ["pixels"], ["logits"]),
            (-1, 64),
            {"quantization": "NNCF post-training, mixed preset"},
        )
    )

    steps.advance("converting for LiteRT (litert-torch PT2E INT8)")
    tflite = quantize_tflite_int8(student, work / "student.int8.tflite", calibration_rows)
    results.append(
        _VariantResult(
            "tflite-int8",
            "tflite",
            "int8",
            "model.tflite",
            {"model.tflite": tflite},
            load_runner("tflite", tflite, ["pixels"], ["logits"]),
            (1, 64),
            {
                "quantization": "litert-torch PT2E static, per-channel int8 weights",
                "fixed_batch": 1,
            },
        )
    )

    steps.advance("exporting TorchScript FP32")
    student_pt = export_torchscript(student, work / "student.pt", split.x_train)
    results.append(
        _VariantResult(
            "torch-fp32",
            "torch",
            "fp32",
            "model.pt",
            {"model.pt": student_pt},
            load_runner("torch", student_pt, ["pixels"], ["logits"]),
            (-1, 64),
            {"format": "torchscript"},
        )
    )

    steps.advance("measuring every variant in its runtime")
    gates: dict[str, dict[str, Any]] = {}

    def gate(name: str, value: float, limit: float, passed: bool) -> None:
        gates[name] = {"value": round(value, 6), "limit": limit, "passed": bool(passed)}

    gate(
        "teacher_accuracy",
        teacher_accuracy,
        TEACHER_MIN_ACCURACY,
        teacher_accuracy >= TEACHER_MIN_ACCURACY,
    )
    drop = teacher_accuracy - student_accuracy
    gate("student_drop_vs_teacher", drop, STUDENT_MAX_DROP, drop <= STUDENT_MAX_DROP)
    single_row = {"pixels": split.x_test[:1]}
    for result in results:
        val_logits = run_batched(result.runner, {"pixels": split.x_val})["logits"]
        test_logits = run_batched(result.runner, {"pixels": split.x_test})["logits"]
        variant_accuracy = accuracy(test_logits, split.y_test)
        result.calibration = calibrate(val_logits, split.y_val, test_logits, split.y_test)
        result.metrics.update(
            {
                "accuracy": round(variant_accuracy, 6),
                "accuracy_drop_vs_student_fp32": round(student_accuracy - variant_accuracy, 6),
                "temperature": round(result.calibration.temperature, 6),
                "ece_before": round(result.calibration.ece_before, 6),
                "ece_after": round(result.calibration.ece_after, 6),
                "latency_ms_batch1": round(median_latency_ms(result.runner, single_row), 4),
            }
        )
        if result.precision == "int8":
            gate(
                f"{result.name}_drop_vs_student_fp32",
                student_accuracy - variant_accuracy,
                INT8_MAX_DROP,
                student_accuracy - variant_accuracy <= INT8_MAX_DROP,
            )
    teacher_latency = median_latency_ms(teacher_runner, single_row)
    failed = [name for name, g in gates.items() if not g["passed"]]
    if failed and enforce_gates:
        raise QualityGateError(
            "digits quality gates failed: "
            + ", ".join(f"{n}={gates[n]['value']} (limit {gates[n]['limit']})" for n in failed)
        )

    steps.advance("writing the cloud repository (teacher)")
    config = repository_config(
        MODEL,
        backend="onnxruntime",
        inputs=INPUTS,
        outputs=OUTPUTS,
        parameters={
            "temperature": round(teacher_calibration.temperature, 6),
            "pytorch_file": "model.pt",
            "openvino_file": "model.xml",
        },
    )
    write_repository_model(
        ctx.repository_dir,
        MODEL,
        ctx.version,
        {
            "model.onnx": teacher_onnx,
            "model.pt": teacher_pt,
            "model.xml": teacher_xml,
            "model.bin": teacher_xml.with_suffix(".bin"),
        },
        config,
    )

    steps.advance("signing and packaging edge variants")
    reference_rows = split.x_test[:REFERENCE_ROWS]
    validation = {"input.pixels": split.x_val, "labels": split.y_val}
    variants_report: dict[str, dict[str, Any]] = {}
    for result in results:
        assert result.calibration is not None
        reference = {
            "input.pixels": reference_rows,
            "output.logits": run_batched(result.runner, {"pixels": reference_rows})["logits"],
        }
        manifest_metrics = {
            **result.metrics,
            "teacher_accuracy": round(teacher_accuracy, 6),
            "student_fp32_accuracy": round(student_accuracy, 6),
            "student_variant": student_variant,
            "test_rows": len(split.y_test),
        }
        written = write_variant(
            ctx.variant_dir(result.name),
            signer=ctx.signer,
            model=MODEL,
            version=ctx.version,
            variant=result.name,
            runtime=result.runtime,
            precision=result.precision,
            task=TASK,
            hardware="any",
            entrypoint=result.entrypoint,
            payload_files=result.payload,
            inputs=[TensorSpec("pixels", "FP32", result.input_shape)],
            outputs=[TensorSpec("logits", "FP32", (result.input_shape[0], NUM_CLASSES))],
            reference=reference,
            validation=validation,
            calibration=result.calibration.manifest_entry(),
            metrics=manifest_metrics,
        )
        entry = written.manifest.file(result.entrypoint)
        variants_report[result.name] = {
            "runtime": result.runtime,
            "precision": result.precision,
            "size_bytes": sum(written.manifest.file(n).size for n in result.payload),
            "stored_bytes": sum(f.stored_size for f in written.manifest.files),
            "entrypoint_sha256": entry.sha256,
            **result.metrics,
        }
    steps.finish()

    notes = [
        "tflite-int8 has a fixed batch of 1 (input shape [1, 64]); runtimes feed it row by row",
        "latency: median of 200 single-row calls, one thread, on the build machine",
        "ECE: top-label, 15 bins, on the test split; temperature fitted on the validation split",
    ]
    if student_variant == "bad":
        notes.append("student_variant=bad: trained on shuffled labels; gates not enforced")
    return {
        "model": MODEL,
        "version": ctx.version,
        "task": TASK,
        "metrics": {
            "teacher_accuracy": round(teacher_accuracy, 6),
            "teacher_onnx_accuracy": round(teacher_onnx_accuracy, 6),
            "teacher_parameters": parameter_count(teacher),
            "teacher_latency_ms_batch1": round(teacher_latency, 4),
            "teacher_ece_before": round(teacher_calibration.ece_before, 6),
            "teacher_ece_after": round(teacher_calibration.ece_after, 6),
            "teacher_temperature": round(teacher_calibration.temperature, 6),
            "student_fp32_accuracy": round(student_accuracy, 6),
            "student_parameters": parameter_count(student),
            "student_drop_vs_teacher": round(drop, 6),
            "ece_before": round(student_calibration.ece_before, 6),
            "ece_after": round(student_calibration.ece_after, 6),
            "nll_before": round(student_calibration.nll_before, 6),
            "nll_after": round(student_calibration.nll_after, 6),
            "temperature": round(student_calibration.temperature, 6),
            "student_variant": student_variant,
            "split": split.sizes(),
        },
        "gates": gates,
        "variants": variants_report,
        "repository": {
            "backend": "onnxruntime",
            "files": ["model.onnx", "model.pt", "model.xml", "model.bin"],
        },
        "notes": notes,
    }
