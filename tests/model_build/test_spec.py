"""Parsing a build spec: defaults per task, and each mistake named by field or file."""

from __future__ import annotations

from pathlib import Path

import pytest

from tandem.cloud.build.errors import SpecError
from tandem.cloud.build.spec import load_spec

BASE = (
    '[model]\nname = "m"\ntask = "{task}"\n[full]\nonnx = "m.onnx"\n'
    '[data]\ncalibration = "c.npz"\nvalidation = "v.npz"\n'
)


def write(folder: Path, text: str) -> Path:
    for name in ("m.onnx", "c.npz", "v.npz"):
        (folder / name).write_bytes(b"x")
    path = folder / "model.toml"
    path.write_text(text)
    return path


def test_defaults_per_task_and_paths_relative_to_the_spec(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, BASE.format(task="embedding")))
    assert spec.full_onnx == (tmp_path / "m.onnx").resolve()
    assert spec.checks == {"min_cosine": 0.98}
    assert spec.quantize == "int8" and "openvino" in spec.runtimes
    override = BASE.format(task="classification") + "[checks]\nmin_top1_agreement = 0.9\n"
    checks = load_spec(write(tmp_path, override)).checks
    assert checks == {"min_top1_agreement": 0.9, "max_accuracy_drop": 0.02}


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (BASE.format(task="ranking"), r"\[model\] task: 'ranking'"),
        (BASE.format(task="generic") + "[extra]\n", r"\[extra\]: unknown section"),
        (BASE.format(task="generic").replace("m.onnx", "gone.onnx"), "gone.onnx does not exist"),
        (BASE.format(task="generic") + '[edge]\nquantize = "int4"\n', r"\[edge\] quantize"),
        (BASE.format(task="generic") + "[checks]\nmin_cosine = -1\n", r"\[checks\] min_cosine"),
        (BASE.format(task="generic").replace('onnx = "m.onnx"', 'weights = "m.onnx"'), r"\[full\]"),
        ("[model\n", "not valid TOML"),
        (
            BASE.format(task="generic").replace("[full]\n", '[full]\ntorchscript = "m.onnx"\n'),
            "exactly one",
        ),
        (
            BASE.format(task="generic").replace("m.onnx", 'm.onnx"\nweights = "c.npz'),
            "weights: goes",
        ),
        (
            BASE.format(task="generic") + "[checks.outputs.emb]\nmin_cos = 1\n",
            "outputs.emb. min_cos",
        ),
        (BASE.format(task="generic") + "[checks.outputs.emb]\nmin_cosine = -1\n", "min_cosine"),
        (BASE.format(task="generic").replace('name = "m"', 'name = "m"\noutputs = []'), "outputs"),
    ],
)
def test_each_mistake_is_named(tmp_path: Path, text: str, words: str) -> None:
    with pytest.raises(SpecError, match=words):
        load_spec(write(tmp_path, text))


def test_pytorch_sources_resolve_relative_to_the_spec(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "net.py").write_text("def make(): ...\n")
    (tmp_path / "w.pt").write_bytes(b"x")
    text = BASE.format(task="classification").replace(
        'onnx = "m.onnx"', 'factory = "pkg.net:make"\nweights = "w.pt"'
    )
    text = text.replace('name = "m"', 'name = "m"\noutputs = ["logits", "emb"]')
    text += "[checks.outputs.emb]\nmin_cosine = 0.9\n"
    spec = load_spec(write(tmp_path, text))
    assert spec.source == "factory" and spec.full_onnx is None and spec.is_torch
    assert spec.source_file == (tmp_path / "pkg/net.py").resolve()
    assert spec.weights == (tmp_path / "w.pt").resolve()
    assert spec.outputs == ("logits", "emb")
    assert spec.output_checks == {"emb": {"min_cosine": 0.9}}
    assert set(spec.files()) >= {spec.source_file, spec.weights}
