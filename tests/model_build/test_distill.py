"""A spec's own code and a distilled edge model: `[prepare]`, `[edge.distill]`, `[package]`,
`[serve]`, on a small PyTorch classifier that trains in seconds."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tandem.cloud.build.errors import SpecDataError, SpecError
from tandem.cloud.build.prepare import KEEP, run_prepare
from tandem.cloud.build.runners import load_runner
from tandem.cloud.build.spec import load_spec
from tandem.cloud.build.user import build_from_spec
from tandem.sdk.artifacts import TrustedKeys, load_variant

TRAIN = '''
"""Three Gaussian blobs in 6-D; a wide teacher MLP and a narrow student."""
from pathlib import Path

import numpy as np
import torch
from torch import nn

CALLS = Path(__file__).parent.with_name("calls.log")  # outside the spec's folder: its key


def blobs(rows, seed):
    rng = np.random.default_rng(seed)
    centres = np.eye(3, 6, dtype=np.float32) * 4.0
    labels = rng.integers(0, 3, rows)
    x = centres[labels] + rng.normal(size=(rows, 6)).astype(np.float32)
    return x.astype(np.float32), labels.astype(np.int64)


class Net(nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(6, hidden), nn.ReLU(), nn.Linear(hidden, 3))

    def forward(self, x):
        return self.layers(x)


def make_teacher():
    return Net(64)


def make_student():
    return Net(8)


def make_wrong_student():
    return nn.Linear(6, 5)


def augment(inputs, generator):
    noise = torch.randn(inputs["x"].shape, generator=generator) * 0.05
    return {"x": inputs["x"] + noise}


def prepare(out, seed):
    with CALLS.open("a") as fh:
        fh.write(f"{seed}\\n")
    torch.manual_seed(seed)
    x, y = blobs(600, seed)
    teacher = make_teacher()
    optimizer = torch.optim.Adam(teacher.parameters(), lr=1e-2)
    for _ in range(60):
        loss = nn.functional.cross_entropy(teacher(torch.from_numpy(x)), torch.from_numpy(y))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.save(teacher.state_dict(), out / "teacher.pt")
    np.savez(out / "train.npz", x=x, labels=y)
    np.savez(out / "calib.npz", x=x[:64])
    vx, vy = blobs(300, seed + 1)
    np.savez(out / "val.npz", x=vx, labels=vy)
    (out / "classes.txt").write_text("a\\nb\\nc\\n")
    return {"teacher_rows": int(len(y))}
'''

SPEC = """
[model]
name = "blobs"
task = "classification"
inputs = ["x"]
outputs = ["logits"]
[prepare]
function = "train:prepare"
outputs = ["teacher.pt", "train.npz", "calib.npz", "val.npz", "classes.txt"]
[full]
factory = "train:make_teacher"
weights = "teacher.pt"
[edge]
runtimes = ["onnx", "torch"]
[edge.distill]
student = "train:{student}"
data = "train.npz"
epochs = 15
batch_size = 32
learning_rate = 5e-3
augment = "train:augment"
[data]
calibration = "calib.npz"
validation = "val.npz"
[checks]
min_top1_agreement = 0.95
max_accuracy_drop = 0.03
[package]
files = ["classes.txt"]
[serve]
max_batch_size = 32
preferred_batch_sizes = [8, 32]
backends = ["onnxruntime", "pytorch", "openvino"]
parameters = {{ labels_file = "classes.txt" }}
"""


def write_example(folder: Path, student: str = "make_student", spec: str = SPEC) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.py").write_text(TRAIN)
    path = folder / "model.toml"
    path.write_text(spec.format(student=student))
    return path


def calls(folder: Path) -> list[str]:
    log = folder.with_name("calls.log")
    return log.read_text().split() if log.exists() else []


def test_prepare_then_distill_builds_checked_student_variants(tmp_path: Path) -> None:
    spec = write_example(tmp_path / "ex")
    zoo = tmp_path / "ex" / "zoo"  # beside the spec, as the guide does: not part of its key
    report = build_from_spec(spec, zoo)
    entry = report["models"]["blobs"]
    metrics = entry["metrics"]
    assert calls(tmp_path / "ex") == ["0"]
    assert metrics["teacher_rows"] == 600  # what prepare returned
    assert metrics["student_parameters"] * 5 < metrics["full_parameters"]
    assert metrics["student_variant"] == "normal"
    assert metrics["distill_epochs"] == 15
    assert metrics["full_accuracy"] > 0.9
    assert metrics["student_accuracy"] >= metrics["full_accuracy"] - 0.03
    assert set(entry["variants"]) == {"onnx-int8", "torch-fp32"}, entry["notes"]
    for row in entry["variants"].values():
        assert row["top1_agreement"] >= 0.95
        assert 0 <= row["ece_after"] <= 1 and 0 <= row["ece_before"] <= 1
        assert row["temperature"] > 0
        assert row["latency_ms_batch1"] > 0
    prepared = Path(entry["prepared_dir"])
    assert prepared.parent == zoo / ".cache" / "blobs"
    assert json.loads((prepared / "prepare.json").read_text())["metrics"] == {"teacher_rows": 600}

    # The variants are the student's, signed, with the [package] file beside the model.
    trusted = TrustedKeys.from_files([zoo / "keys" / "signing.pub"])
    variant = load_variant(zoo / "artifacts" / "blobs" / "1" / "torch-fp32", trusted)
    assert variant.manifest.file("classes.txt").size == len("a\nb\nc\n")
    assert variant.manifest.metrics["student_parameters"] == metrics["student_parameters"]
    assert variant.manifest.calibration["temperature"] > 0
    repository = zoo / "repository" / "blobs"
    config = json.loads((repository / "config.json").read_text())
    assert config["max_batch_size"] == 32
    assert config["dynamic_batching"]["preferred_batch_sizes"] == [8, 32]
    assert config["parameters"]["labels_file"] == "classes.txt"
    assert config["parameters"]["pytorch_file"] == "model.pt"
    assert (repository / "1" / "classes.txt").read_text() == "a\nb\nc\n"
    # The full model for each backend: ONNX, TorchScript, OpenVINO IR, answering alike.
    assert sorted(entry["repository"]["files"]) == sorted(
        ["model.onnx", "model.pt", "model.xml", "model.bin", "classes.txt"]
    )
    rows = {"x": np.load(prepared / "val.npz")["x"][:16]}
    answers = [
        load_runner(runtime, repository / "1" / name, ["x"], ["logits"])(rows)["logits"]
        for runtime, name in (
            ("onnx", "model.onnx"),
            ("torch", "model.pt"),
            ("openvino", "model.xml"),
        )
    ]
    for other in answers[1:]:
        np.testing.assert_allclose(other, answers[0], atol=1e-4)

    # Cached as a whole; a new version distills a new student from the same prepared teacher.
    assert build_from_spec(spec, zoo)["run"]["cached"] == ["blobs"]
    v2 = build_from_spec(spec, zoo, version=2)["models"]["blobs"]
    assert calls(tmp_path / "ex") == ["0"]
    assert v2["prepared_dir"] == entry["prepared_dir"]
    # Editing the example's code is a new key: prepare runs again.
    (tmp_path / "ex" / "train.py").write_text(TRAIN + "\n# edited\n")
    build_from_spec(spec, zoo, version=2)
    assert calls(tmp_path / "ex") == ["0", "0"]
    # Old prepared folders go once there are more than prepare.KEEP.
    loaded = load_spec(spec)
    assert loaded.prepare is not None
    for edit in range(2):
        (tmp_path / "ex" / "train.py").write_text(TRAIN + f"\n# edit {edit}\n")
        run_prepare(spec, loaded.prepare, zoo / ".cache" / "blobs", seed=0, libraries={})
    kept = sorted(p.name for p in (zoo / ".cache" / "blobs").glob("prepare-*"))
    assert len(kept) == KEEP and prepared.name not in kept


def test_a_bad_student_is_published_with_a_note_and_is_bad(tmp_path: Path) -> None:
    spec = write_example(tmp_path / "ex")
    zoo = tmp_path / "zoo"
    good = build_from_spec(spec, zoo)["models"]["blobs"]
    bad = build_from_spec(spec, zoo, version=2, options={"student_variant": "bad"})
    entry = bad["models"]["blobs"]
    assert entry["metrics"]["student_variant"] == "bad"
    assert entry["metrics"]["distill_epochs"] == 15  # min(epochs, 15)
    assert entry["metrics"]["student_accuracy"] < 0.6 < good["metrics"]["student_accuracy"]
    assert set(entry["variants"]) == {"onnx-int8", "torch-fp32"}
    assert any("published although it misses" in n for n in entry["notes"])
    assert any("shuffled labels" in n for n in entry["notes"])
    with pytest.raises(SpecError, match="student_variant"):
        build_from_spec(spec, zoo, version=3, options={"student_variant": "awful"})
    with pytest.raises(SpecError, match="unknown for blobs"):
        build_from_spec(spec, zoo, version=3, options={"epochs": 3})


def test_dynamic_onnx_quantization_of_the_full_model(tmp_path: Path) -> None:
    text = SPEC.replace(
        '[edge]\nruntimes = ["onnx", "torch"]',
        '[edge]\nruntimes = ["onnx"]\nonnx_quantization = "dynamic"',
    )
    start, end = text.index("[edge.distill]"), text.index("[data]")
    spec = write_example(tmp_path / "ex", spec=text[:start] + text[end:])
    entry = build_from_spec(spec, tmp_path / "zoo")["models"]["blobs"]
    assert set(entry["variants"]) == {"onnx-int8"}
    assert "student_parameters" not in entry["metrics"]  # the full model, quantized
    assert entry["variants"]["onnx-int8"]["top1_agreement"] >= 0.95


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (("make_student", "make_wrong_student"), SpecError, r"\[edge.distill\] student: returns"),
        (("make_student", "nowhere"), SpecError, r"\[edge.distill\] student: .*nowhere"),
        (("epochs = 15", "epochs = 0"), SpecError, r"\[edge.distill\] epochs"),
        (("epochs = 15", "epoch = 15"), SpecError, r"\[edge.distill\] epoch: unknown key"),
        (
            ('"classes.txt"]\n[full]', '"classes.txt", "more.txt"]\n[full]'),
            SpecError,
            r"\[prepare\] .*did not write more.txt",
        ),
        (
            ('function = "train:prepare"', 'function = "train:absent"'),
            SpecError,
            r"\[prepare\] function: train has no attribute 'absent'",
        ),
        (
            ('data = "train.npz"', 'data = "classes.txt"'),
            SpecDataError,
            r"\[edge.distill\] data: .*classes.txt is not a readable .npz",
        ),
        (
            ('files = ["classes.txt"]', 'files = ["missing.txt"]'),
            SpecError,
            r"\[package\] files: file .*missing.txt does not exist",
        ),
        (("max_batch_size = 32", "max_batch_size = 0"), SpecError, r"\[serve\] max_batch_size"),
        (
            ('weights = "teacher.pt"', 'weights = "teacher.pt"\nonnx_exporter = "jit"'),
            SpecError,
            r"\[full\] onnx_exporter: 'jit' is not one of auto, dynamo, torchscript",
        ),
        (("[8, 32]", "[8, 64]"), SpecError, r"\[serve\] preferred_batch_sizes"),
        (('"openvino"]\nparameters', '"triton"]\nparameters'), SpecError, r"\[serve\] backends"),
        (
            ('outputs = ["logits"]', 'outputs = ["logits"]\ndynamic_axes = {{ y = [1] }}'),
            SpecError,
            r"\[model\] dynamic_axes y: not an input",
        ),
        (
            ('outputs = ["logits"]', 'outputs = ["logits"]\ndynamic_axes = {{ x = [0] }}'),
            SpecError,
            r"\[model\] dynamic_axes x: expected a list of axes >= 1",
        ),
    ],
)
def test_bad_prepare_and_distill_input_is_one_named_error_and_writes_nothing(
    tmp_path: Path, change: tuple[str, str], error: type[Exception], match: str | None
) -> None:
    text = SPEC.replace(*change) if change[0] != "make_student" else SPEC
    student = change[1] if change[0] == "make_student" else "make_student"
    spec = write_example(tmp_path / "ex", student=student, spec=text)
    zoo = tmp_path / "zoo"
    with pytest.raises(error, match=match):
        build_from_spec(spec, zoo)
    assert not (zoo / "artifacts").exists()
    assert not (zoo / "repository").exists()
    cache = zoo / ".cache" / "blobs"
    assert not list(cache.glob(".prepare-*")) if cache.exists() else True


def test_a_spec_with_prepare_loads_before_its_outputs_exist(tmp_path: Path) -> None:
    spec = load_spec(write_example(tmp_path / "ex"))
    assert spec.prepare is not None and spec.prepared_dir is None
    assert spec.distill is not None and spec.distill.epochs == 15
    # The prepared files are not part of the spec's files: [prepare]'s key stands for them.
    assert all(p.parent == tmp_path / "ex" for p in spec.files())
    assert textwrap.dedent(spec.prepare.function) == "train:prepare"


SEQUENCE = """
import numpy as np
import torch
from torch import nn


class Pool(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 3)

    def forward(self, tokens):
        return self.proj(tokens).mean(dim=1)


def make_model():
    torch.manual_seed(0)
    return Pool()


def prepare(out, seed):
    rng = np.random.default_rng(seed)
    np.savez(out / "calib.npz", tokens=rng.normal(size=(32, 5, 4)).astype(np.float32))
    np.savez(out / "val.npz", tokens=rng.normal(size=(48, 7, 4)).astype(np.float32))
"""


def test_dynamic_axes_make_a_sequence_length_vary(tmp_path: Path) -> None:
    """A PyTorch model whose token axis varies: calibrated on 5 tokens, checked on 7, and its
    variants run on 9; LiteRT (fixed shapes) is skipped with a line saying why."""
    folder = tmp_path / "seq"
    folder.mkdir()
    (folder / "seq.py").write_text(SEQUENCE)
    (folder / "model.toml").write_text(
        '[model]\nname = "seq"\ntask = "generic"\ninputs = ["tokens"]\noutputs = ["pooled"]\n'
        "dynamic_axes = { tokens = [1] }\n"
        '[prepare]\nfunction = "seq:prepare"\noutputs = ["calib.npz", "val.npz"]\n'
        '[full]\nfactory = "seq:make_model"\nonnx_exporter = "torchscript"\n'
        '[edge]\nruntimes = ["onnx", "tflite", "torch"]\nquantize = "none"\n'
        '[data]\ncalibration = "calib.npz"\nvalidation = "val.npz"\n'
    )
    zoo = tmp_path / "zoo"
    entry = build_from_spec(folder / "model.toml", zoo)["models"]["seq"]
    assert set(entry["variants"]) == {"onnx-fp32", "torch-fp32"}, entry["notes"]
    assert any(
        n.startswith("tflite: skipped, a LiteRT graph has fixed shapes") for n in entry["notes"]
    )
    trusted = TrustedKeys.from_files([zoo / "keys" / "signing.pub"])
    nine = {"tokens": np.ones((2, 9, 4), np.float32)}
    for name in ("onnx-fp32", "torch-fp32"):
        variant = load_variant(zoo / "artifacts" / "seq" / "1" / name, trusted)
        assert list(variant.manifest.inputs[0].shape) == [-1, -1, 4]
    onnx_out = load_runner(
        "onnx", zoo / "repository" / "seq" / "1" / "model.onnx", ["tokens"], ["pooled"]
    )(nine)
    assert onnx_out["pooled"].shape == (2, 3)
    import onnx

    exported = onnx.load(str(zoo / "repository" / "seq" / "1" / "model.onnx"))
    assert {o.version for o in exported.opset_import if o.domain == ""} == {17}  # TorchScript
