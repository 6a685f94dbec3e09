"""Small real models for the server's tests, written as a model repository.

`digits`-shaped models (input `pixels` FP32 [-1, 64] of raw 0..16 values, output `logits` FP32
[-1, 10]) as ONNX, TorchScript and OpenVINO IR, plus a deliberately slow ONNX model for queue
and drain tests. The expected outputs come from numpy, independently of any runtime.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

DIGITS_W = np.random.default_rng(7).standard_normal((64, 10)).astype(np.float32)
DIGITS_B = np.linspace(-1.0, 1.0, 10, dtype=np.float32)


def tiny_digits_reference(pixels: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    return ((pixels.astype(np.float32) / 16.0) @ DIGITS_W + DIGITS_B).astype(np.float32)


def write_config(folder: Path, config: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def digits_config(name: str, backend: str = "onnxruntime", **extra: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "name": name,
        "backend": backend,
        "max_batch_size": 64,
        "input": [{"name": "pixels", "datatype": "FP32", "dims": [64]}],
        "output": [{"name": "logits", "datatype": "FP32", "dims": [10]}],
        "dynamic_batching": {
            "max_queue_delay_us": 2000,
            "preferred_batch_sizes": [16, 32, 64],
            "max_queue_size": 1024,
        },
        "instance_group": {"count": 1, "kind": "cpu"},
        "version_policy": {"latest": {"num_versions": 1}},
    }
    config.update(extra)
    return config


def digits_onnx(path: Path, bias_shift: float = 0.0) -> None:
    """logits = pixels / 16 @ W + b (+ bias_shift, to tell versions apart)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [
            helper.make_node("Div", ["pixels", "sixteen"], ["scaled"]),
            helper.make_node("Gemm", ["scaled", "W", "B"], ["logits"]),
        ],
        "digits",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        [
            numpy_helper.from_array(np.array(16.0, dtype=np.float32), "sixteen"),
            numpy_helper.from_array(DIGITS_W, "W"),
            numpy_helper.from_array(DIGITS_B + np.float32(bias_shift), "B"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def digits_torchscript(path: Path) -> None:
    import torch

    class Digits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(64, 10)
            with torch.no_grad():
                self.linear.weight.copy_(torch.from_numpy(DIGITS_W.T.copy()))
                self.linear.bias.copy_(torch.from_numpy(DIGITS_B))

        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            return self.linear(pixels / 16.0)

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(torch.jit.script(Digits().eval()), str(path))


def digits_openvino(onnx_path: Path, xml_path: Path) -> None:
    from tandem.sdk.runtimes.openvino import import_openvino

    ov = import_openvino()
    xml_path.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(ov.convert_model(str(onnx_path)), str(xml_path), compress_to_fp16=False)


def slow_onnx(path: Path, layers: int = 16, width: int = 512, copies: int = 128) -> None:
    """`x` FP32 [-1, 8] -> `y` FP32 [-1, 8] with y = x, computed slowly on purpose.

    Each row is copied `copies` times into a `width`-wide state that goes through `layers`
    MatMuls with an identity matrix (about 10 ms of CPU per row), so tests can fill its queue
    and keep requests in flight; the answer stays exactly checkable.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    up = np.zeros((8, width), dtype=np.float32)
    up[np.arange(8), np.arange(8)] = 1.0
    mix = np.eye(width, dtype=np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "up"], ["wide"]),
        helper.make_node("Tile", ["wide", "repeats"], ["h0"]),
    ]
    for i in range(layers):
        nodes.append(helper.make_node("MatMul", [f"h{i}", "mix"], [f"h{i + 1}"]))
    nodes += [
        helper.make_node("Reshape", [f"h{layers}", "blocks"], ["stacked"]),
        helper.make_node("ReduceMean", ["stacked", "axis0"], ["mean"], keepdims=0),
        helper.make_node("MatMul", ["mean", "down"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
        [
            numpy_helper.from_array(up, "up"),
            numpy_helper.from_array(np.array([copies, 1], dtype=np.int64), "repeats"),
            numpy_helper.from_array(mix, "mix"),
            numpy_helper.from_array(np.array([copies, -1, width], dtype=np.int64), "blocks"),
            numpy_helper.from_array(np.array([0], dtype=np.int64), "axis0"),
            numpy_helper.from_array(up.T.copy(), "down"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def slow_config(name: str = "slow", **extra: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "name": name,
        "backend": "onnxruntime",
        "max_batch_size": 8,
        "input": [{"name": "x", "datatype": "FP32", "dims": [8]}],
        "output": [{"name": "y", "datatype": "FP32", "dims": [8]}],
        "dynamic_batching": {"max_queue_delay_us": 0, "max_queue_size": 4},
        "instance_group": {"count": 1, "kind": "cpu"},
        "parameters": {"threads": "1"},
    }
    config.update(extra)
    return config


def seqsum_onnx(path: Path) -> None:
    """`tokens` INT64 [-1, -1] -> `total` FP32 [-1, 1]: each row's sum (a variable length)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["tokens"], ["as_float"], to=TensorProto.FLOAT),
            helper.make_node("ReduceSum", ["as_float", "axis1"], ["total"], keepdims=1),
        ],
        "seqsum",
        [helper.make_tensor_value_info("tokens", TensorProto.INT64, ["N", "L"])],
        [helper.make_tensor_value_info("total", TensorProto.FLOAT, ["N", 1])],
        [numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def build_test_repository(root: Path, teacher: Path) -> Path:
    """From the zoo's digits teacher (`teacher` = its version folder with model.onnx and
    model.pt): digits (ONNX Runtime, the zoo's config), digits_pt (TorchScript), digits_ov
    (OpenVINO IR converted here), digits_nobatch (no dynamic batching), digits_x2 (two
    instances). Plus seqsum (variable length INT64) and slow (for queue and drain tests)."""
    zoo_config = json.loads((teacher.parent / "config.json").read_text())
    variants: dict[str, tuple[str, dict[str, Any]]] = {
        "digits": ("onnxruntime", {}),
        "digits_pt": ("pytorch", {}),
        "digits_ov": ("openvino", {}),
        "digits_nobatch": ("onnxruntime", {"dynamic_batching": None}),
        "digits_x2": (
            "onnxruntime",
            {"instance_group": {"count": 2, "kind": "cpu"}, "parameters": {"threads": "1"}},
        ),
    }
    for name, (backend, changes) in variants.items():
        config = dict(zoo_config, name=name, backend=backend, **changes)
        config = {k: v for k, v in config.items() if v is not None}
        write_config(root / name, config)
        (root / name / "1").mkdir(parents=True)
    for name in ("digits", "digits_nobatch", "digits_x2"):
        shutil.copyfile(teacher / "model.onnx", root / name / "1" / "model.onnx")
    shutil.copyfile(teacher / "model.pt", root / "digits_pt" / "1" / "model.pt")
    digits_openvino(teacher / "model.onnx", root / "digits_ov" / "1" / "model.xml")
    seqsum = digits_config("seqsum")
    seqsum["input"] = [{"name": "tokens", "datatype": "INT64", "dims": [-1]}]
    seqsum["output"] = [{"name": "total", "datatype": "FP32", "dims": [1]}]
    write_config(root / "seqsum", seqsum)
    seqsum_onnx(root / "seqsum" / "1" / "model.onnx")
    write_config(root / "slow", slow_config())
    slow_onnx(root / "slow" / "1" / "model.onnx")
    return root
