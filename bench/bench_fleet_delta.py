"""Delta update size: a retrained student head (backbone unchanged) vs the full artifact.

Two models, each exported twice with torch, the second time after retraining only the head:

- the digits student (`StudentCNN` of examples/digits/train.py, ~3.8k parameters, of which
  the head is 2.6k: the head is most of this tiny model), FP32 ONNX and static INT8 QDQ ONNX
  as the build makes them;
- a larger student (a ~1.2M-parameter convolutional backbone with the same 10-class head),
  FP32 ONNX, where the backbone dominates, as in a real distilled student.

Full = the new file zstd-compressed at level 19 (what the zoo stores and the service sends
without a delta). Delta = the new file compressed with the old file as a raw-content zstd
dictionary (what `tandem.cloud.fleet.delivery` sends when the device has the old version).

    .venv/bin/python -m pytest bench/bench_fleet_delta.py -q -s
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zstandard

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tandem.cloud.fleet.delivery import apply_delta, make_delta  # noqa: E402
from tandem.sdk.artifacts import TensorSpec  # noqa: E402
from tests.support.examples import load_example  # noqa: E402

torch = pytest.importorskip("torch")
nn = torch.nn
RESULTS = ROOT / "bench" / "results" / "fleet_delta.txt"
_rows: dict[str, str] = {}


class LargeStudent(nn.Module):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(1, 64, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(64, 128, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(128, 256, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(256, 256, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(1024, 256),
            nn.ReLU(),
        )
        self.fc = nn.Linear(256, 10)

    def forward(self, pixels: Any) -> Any:
        return self.fc(self.backbone(pixels.reshape(-1, 1, 8, 8)))


def retrain_head(model: Any, seed: int) -> None:
    """What fine-tuning only the head does to the weights: the head changes, nothing else."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.fc.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)


def export(model: Any, path: Path, sample: Any) -> bytes:
    from tandem.cloud.build.torch_source import export_onnx

    pixels, logits = TensorSpec("pixels", "FP32", (-1, 64)), TensorSpec("logits", "FP32", (-1, 10))
    export_onnx(model.eval(), path, [pixels], [logits], {"pixels": sample})
    return path.read_bytes()


def quantize_int8(fp32: Path, out: Path, sample: Any) -> bytes:
    from tandem.cloud.build.variants import onnx_int8  # the build's own static QDQ INT8

    return onnx_int8(fp32, out, {"pixels": sample}).read_bytes()


def measure(name: str, old: bytes, new: bytes, benchmark: Any) -> None:
    full = zstandard.ZstdCompressor(level=19).compress(new)
    delta = benchmark.pedantic(make_delta, args=(old, new), rounds=3, iterations=1)
    assert apply_delta(old, delta, len(new) + 1) == new, "delta does not reproduce the file"
    changed = sum(a != b for a, b in zip(old, new, strict=False)) + abs(len(old) - len(new))
    _rows[name] = (
        f"{name:<34} file {len(new):>9,} B  changed bytes {changed:>8,}  "
        f"full (zstd-19) {len(full):>9,} B  delta {len(delta):>8,} B  "
        f"delta/full {len(delta) / len(full):6.1%}  "
        f"(delta built in {benchmark.stats.stats.median * 1000:.0f} ms)"
    )
    _write()
    assert len(delta) < len(full)


@pytest.fixture(scope="module")
def sample() -> Any:
    return np.random.default_rng(0).uniform(0, 16, size=(64, 64)).astype(np.float32)


def test_digits_student_head_fp32(benchmark: Any, sample: Any, tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = load_example("digits").StudentCNN(4.9, 6.0)
    old = export(model, tmp_path / "v1.onnx", sample)
    retrain_head(model, 2)
    new = export(model, tmp_path / "v2.onnx", sample)
    measure("digits student, FP32 ONNX", old, new, benchmark)


def test_digits_student_head_int8(benchmark: Any, sample: Any, tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = load_example("digits").StudentCNN(4.9, 6.0)
    export(model, tmp_path / "v1.onnx", sample)
    old = quantize_int8(tmp_path / "v1.onnx", tmp_path / "v1.int8.onnx", sample)
    retrain_head(model, 2)
    export(model, tmp_path / "v2.onnx", sample)
    new = quantize_int8(tmp_path / "v2.onnx", tmp_path / "v2.int8.onnx", sample)
    measure("digits student, INT8 QDQ ONNX", old, new, benchmark)


def test_large_student_head_fp32(benchmark: Any, sample: Any, tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = LargeStudent()
    old = export(model, tmp_path / "v1.onnx", sample)
    retrain_head(model, 2)
    new = export(model, tmp_path / "v2.onnx", sample)
    measure("1.2M-param student, FP32 ONNX", old, new, benchmark)


def _write() -> None:
    lines = [
        "fleet delta update size (bench/bench_fleet_delta.py)",
        f"date: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}",
        "scenario: retrain only the student's head (fc), keep the backbone; export v1 and v2 "
        "with torch.onnx (dynamo), INT8 with onnxruntime static QDQ as the build pipeline does",
        "full = v2 file zstd level 19 (stored artifact); delta = zstd level 19 of v2 with v1 as "
        "a raw-content dictionary (what the service sends to a device that has v1)",
        *[_rows[k] for k in sorted(_rows)],
        "note: the digits student is tiny (3.8k parameters) and its head is 2.6k of them, so "
        "its delta saves less than a student whose backbone dominates (the 1.2M row)",
    ]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q", "-s"]))
