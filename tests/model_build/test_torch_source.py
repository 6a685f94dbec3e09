"""Spec builds from PyTorch sources: factory + weights, TorchScript, ExportedProgram.

Tiny two-input, two-output models keep each build to a few seconds; the CNN example
(test_spec_examples.py) and bench/bench_build_cnn.py cover a real image model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tandem.cloud.build.errors import SpecDataError, SpecError
from tandem.cloud.build.spec import ModelSpec, load_spec
from tandem.cloud.build.user import build_from_spec, check_secondary

torch = pytest.importorskip("torch")

NET = """
import torch
from torch import nn


class TwoHead(nn.Module):
    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.body = nn.Linear(8, hidden)
        self.scores = nn.Linear(hidden, 4)
        self.feats = nn.Linear(hidden, 6)

    def forward(self, x, shift):
        h = torch.relu(self.body(x) + shift)
        return self.scores(h), self.feats(h)


def make_model():
    return TwoHead()


def make_wide():
    return TwoHead(hidden=32)


def make_nothing():
    return 42


not_callable = 3
"""
SPEC = """[model]
name = "m"
task = "classification"
outputs = ["scores", "feats"]
[full]
{full}
[edge]
runtimes = {runtimes}
[data]
calibration = "calib.npz"
validation = "val.npz"
{extra}"""


def _model() -> torch.nn.Module:
    namespace: dict[str, object] = {}
    exec(NET, namespace)  # the same class the factory module defines
    torch.manual_seed(0)
    model = namespace["make_model"]()  # type: ignore[operator]
    return model.eval()  # type: ignore[no-any-return]


def _entrypoint(zoo: Path, variant: str) -> str:
    manifest = json.loads((zoo / "artifacts/m/1" / variant / "manifest.json").read_text())
    return str(manifest["entrypoint"])


def write_example(
    folder: Path, full: str | None = None, runtimes: str = '["onnx", "torch"]', extra: str = ""
) -> Path:
    """A factory package, its weights, data with clear winners, and the spec."""
    (folder / "pkg").mkdir(parents=True, exist_ok=True)
    (folder / "pkg" / "__init__.py").write_text("")
    (folder / "pkg" / "net.py").write_text(NET)
    model = _model()
    torch.save(model.state_dict(), folder / "weights.pt")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 8)).astype(np.float32)
    shift = rng.normal(scale=0.1, size=(600, 16)).astype(np.float32)
    with torch.no_grad():
        scores = model(torch.from_numpy(x), torch.from_numpy(shift))[0].numpy()
    top2 = np.sort(scores, axis=1)[:, -2:]
    keep = (top2[:, 1] - top2[:, 0]) > 0.15  # clear winners: INT8 must not flip them
    x, shift, labels = x[keep][:96], shift[keep][:96], scores[keep][:96].argmax(1)
    np.savez(folder / "calib.npz", x=x, shift=shift)
    np.savez(folder / "val.npz", x=x, shift=shift, labels=labels)
    full = full or 'factory = "pkg.net:make_model"\nweights = "weights.pt"'
    spec = folder / "model.toml"
    spec.write_text(SPEC.format(full=full, runtimes=runtimes, extra=extra))
    return spec


def test_factory_source_with_two_inputs_builds_checks_and_answers(tmp_path: Path) -> None:
    from tandem.sdk import Client

    spec = write_example(tmp_path / "ex", runtimes='["onnx", "tflite", "torch"]')
    entry = build_from_spec(spec, tmp_path / "zoo")["models"]["m"]
    assert set(entry["variants"]) == {"onnx-int8", "tflite-int8", "torch-fp32"}, entry["notes"]
    for name, row in entry["variants"].items():
        assert row["top1_agreement"] >= 0.98, (name, row)
        assert row["feats.cosine_mean"] >= 0.98 and "feats.max_abs_error" in row, (name, row)
    assert _entrypoint(tmp_path / "zoo", "torch-fp32") == "model.pt2"  # ExportedProgram
    assert (tmp_path / "zoo/repository/m/1/model.onnx").is_file()  # the cloud tier's model
    data = np.load(tmp_path / "ex/val.npz")
    feeds = {"x": data["x"][:5], "shift": data["shift"][:5]}  # a batch the export never saw
    with torch.no_grad():
        expected = _model()(torch.from_numpy(feeds["x"]), torch.from_numpy(feeds["shift"]))
    for runtime in ("torch", "onnx", "tflite"):
        with Client(
            model="m", artifacts=tmp_path / "zoo/artifacts", policy="local_only", runtime=runtime
        ) as client:
            outputs = client.infer(feeds).outputs
        assert outputs["scores"].shape == (5, 4) and outputs["feats"].shape == (5, 6), runtime
        # Each output by name, not by position: feats must be close to the model's feats.
        assert np.abs(outputs["feats"] - expected[1].numpy()).max() < 0.1, runtime
    again = build_from_spec(spec, tmp_path / "zoo")
    assert again["run"]["cached"] == ["m"]
    files = load_spec(spec).files()  # what the cache key hashes besides the spec
    assert {(tmp_path / p).resolve() for p in ("ex/weights.pt", "ex/pkg/net.py")} <= set(files)


@pytest.mark.parametrize("source", ["torchscript", "exported_program"])
def test_torchscript_and_exported_program_sources(tmp_path: Path, source: str) -> None:
    folder = tmp_path / "ex"
    spec = write_example(folder, runtimes='["onnx", "tflite", "torch"]')
    model = _model()
    data = np.load(folder / "calib.npz")
    args = (torch.from_numpy(data["x"][:2]), torch.from_numpy(data["shift"][:2]))
    if source == "torchscript":
        torch.jit.trace(model, args).save(str(folder / "m.pt"))
        full = 'torchscript = "m.pt"'
    else:
        batch = torch.export.Dim("batch", min=1, max=1024)
        program = torch.export.export(model, args, dynamic_shapes=({0: batch}, {0: batch}))
        torch.export.save(program, str(folder / "m.pt2"))
        full = 'exported_program = "m.pt2"'
    runtimes = '["onnx", "tflite", "torch"]' if source == "torchscript" else '["onnx", "torch"]'
    spec.write_text(SPEC.format(full=full, runtimes=runtimes, extra=""))
    entry = build_from_spec(spec, tmp_path / "zoo")["models"]["m"]
    assert entry["spec_source"] == source
    assert {"onnx-int8", "torch-fp32"} <= set(entry["variants"]), entry["notes"]
    suffix = ".pt" if source == "torchscript" else ".pt2"
    assert _entrypoint(tmp_path / "zoo", "torch-fp32") == f"model{suffix}"  # the file as given
    if source == "torchscript":
        assert "tflite-int8" not in entry["variants"]
        assert any(n.startswith("tflite: skipped, litert-torch") for n in entry["notes"])


def test_a_secondary_output_outside_its_tolerance_is_not_published(tmp_path: Path) -> None:
    extra = "[checks.outputs.feats]\nmax_abs_error = 0.0\n"
    spec = write_example(tmp_path / "ex", runtimes='["onnx"]', extra=extra)
    entry = build_from_spec(spec, tmp_path / "zoo")["models"]["m"]
    assert entry["variants"] == {}
    note = next(n for n in entry["notes"] if n.startswith("onnx-int8: not published"))
    assert "feats max_abs_error" in note and "over by" in note
    assert not (tmp_path / "zoo/artifacts/m/1/onnx-int8").exists()


@pytest.mark.parametrize(
    ("full", "extra", "words"),
    [
        ('factory = "gone.net:make_model"\nweights = "weights.pt"', "", r"\[full\] factory.*gone"),
        ('factory = "pkg.net:missing"\nweights = "weights.pt"', "", r"no attribute 'missing'"),
        ('factory = "pkg.net:not_callable"\nweights = "weights.pt"', "", "not callable"),
        ('factory = "pkg.net:make_nothing"\nweights = "weights.pt"', "", "torch.nn.Module"),
        ('factory = "pkg.net:make_wide"\nweights = "weights.pt"', "", r"\[full\] weights.*match"),
        ('factory = "pkg.net:make_model"\nweights = "calib.npz"', "", r"\[full\] weights"),
        ('torchscript = "weights.pt"\nweights = "weights.pt"', "", r"\[full\] weights"),
        ('factory = "pkg/net.py"\nweights = "weights.pt"', "", "pkg.module:make_model"),
        ('torchscript = "calib.npz"', "", r"\[full\] torchscript: torch.jit.load"),
        ('exported_program = "weights.pt"', "", r"\[full\] exported_program"),
        ("", "[checks.outputs.nope]\nmin_cosine = 0.9\n", r"\[checks.outputs.nope\]"),
        ("", "[checks.outputs.feats]\ncosine = 0.9\n", r"\[checks.outputs.feats\] cosine"),
    ],
)
def test_bad_pytorch_input_is_one_named_error_and_writes_nothing(
    tmp_path: Path, full: str, extra: str, words: str
) -> None:
    spec = write_example(tmp_path / "ex", full=full or None, extra=extra)
    with pytest.raises(SpecError, match=words):
        build_from_spec(spec, tmp_path / "zoo")
    zoo = tmp_path / "zoo"
    assert not (zoo / "artifacts").exists() and not (zoo / "repository").exists()
    assert not list(zoo.glob(".work-*")) if zoo.exists() else True


def test_data_that_does_not_fit_forward_names_the_inputs(tmp_path: Path) -> None:
    spec = write_example(tmp_path / "ex")
    data = np.load(tmp_path / "ex/calib.npz")
    np.savez(tmp_path / "ex/calib.npz", x=data["x"])  # `shift` is missing
    with pytest.raises(SpecDataError, match=r"\[data\] calibration.*\['x', 'shift'\]"):
        build_from_spec(spec, tmp_path / "zoo")


def test_secondary_checks_by_kind_of_output(tmp_path: Path) -> None:
    spec = ModelSpec(
        path=tmp_path / "model.toml",
        name="m",
        task="classification",
        full_onnx=None,
        calibration=tmp_path / "c.npz",
        validation=tmp_path / "v.npz",
        output_checks={"label": {"min_agreement": 0.9}},
    )
    labels = np.arange(10, dtype=np.int64)
    flipped = labels.copy()
    flipped[:2] = 9
    metrics, misses = check_secondary(spec, "label", labels, flipped)
    assert metrics["label.agreement"] == 0.8 and "label agreement 0.8000 < 0.9" in misses[0]
    column = np.linspace(1, 2, 10, dtype=np.float32)[:, None]
    metrics, misses = check_secondary(spec, "value", column, -column)  # one number per row
    assert metrics["value.cosine_mean"] == -1.0 and misses
    assert check_secondary(spec, "value", column, column * 1.001)[1] == []


def test_quantize_none_publishes_the_fp32_export_and_the_torch_file(tmp_path: Path) -> None:
    spec = write_example(tmp_path / "ex", runtimes='["onnx", "openvino", "torch"]')
    spec.write_text(spec.read_text().replace("[edge]\n", '[edge]\nquantize = "none"\n'))
    entry = build_from_spec(spec, tmp_path / "zoo")["models"]["m"]
    assert set(entry["variants"]) == {"onnx-fp32", "torch-fp32"}, entry["notes"]
    assert entry["variants"]["onnx-fp32"]["feats.max_abs_error"] < 1e-4  # the FP32 export
    assert any(n.startswith("openvino: skipped, quantize = none") for n in entry["notes"])


def test_edge_from_a_small_exported_program_of_the_users(tmp_path: Path) -> None:
    """`[edge] from = "small.pt2"`: the user's own smaller PyTorch model (an ExportedProgram)
    makes every edge variant (the torch one is the file as given), checked against the full."""
    spec = write_example(tmp_path / "ex", runtimes='["onnx", "tflite", "torch"]')
    namespace: dict[str, object] = {}
    exec(NET, namespace)
    torch.manual_seed(0)
    small = namespace["make_model"]().eval()  # type: ignore[operator]
    small.body.weight.data *= 1.001  # not the full model: nearly the same answers
    data = np.load(tmp_path / "ex/calib.npz")
    sample = (torch.from_numpy(data["x"][:2]), torch.from_numpy(data["shift"][:2]))
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(small, sample, dynamic_shapes=({0: batch}, {0: batch}))
    torch.export.save(program, str(tmp_path / "ex/small.pt2"))
    spec.write_text(spec.read_text().replace("[edge]\n", '[edge]\nfrom = "small.pt2"\n'))
    entry = build_from_spec(spec, tmp_path / "zoo")["models"]["m"]
    assert set(entry["variants"]) == {"onnx-int8", "tflite-int8", "torch-fp32"}, entry["notes"]
    for name, row in entry["variants"].items():
        assert row["top1_agreement"] >= 0.98, (name, row)
    assert _entrypoint(tmp_path / "zoo", "torch-fp32") == "model.pt2"
    stored = tmp_path / "zoo/artifacts/m/1/torch-fp32"
    manifest = json.loads((stored / "manifest.json").read_text())
    entry_file = next(f for f in manifest["files"] if f["name"] == "model.pt2")
    import hashlib

    given = hashlib.sha256((tmp_path / "ex/small.pt2").read_bytes()).hexdigest()
    assert entry_file["sha256"] == given  # shipped as the user gave it
