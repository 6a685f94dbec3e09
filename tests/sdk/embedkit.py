"""A tiny two-input embedding model (INT64 input_ids + attention_mask -> mean-pooled,
L2-normalised FP32 embedding), shaped like the zoo's minilm, as an onnx-fp32 variant: for
multi-input, INT64, dynamic-length and embedding-task tests that must not wait for the zoo.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from tests.sdk.modelkit import CACHE, _write_variant

VOCAB, DIM = 50, 8


def _net() -> Any:
    import torch
    from torch import nn

    class Embedder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table = nn.Embedding(VOCAB, DIM)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            mask = attention_mask.unsqueeze(-1).to(torch.float32)
            pooled = (self.table(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            return nn.functional.normalize(pooled, dim=-1)

    torch.manual_seed(0)
    return Embedder().eval()


def _build(out: Path) -> None:
    import torch
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from tandem.sdk.artifacts import TensorSpec

    net = _net()
    work = out / "work"
    work.mkdir(parents=True)
    ids = torch.ones(1, 4, dtype=torch.int64)
    torch.onnx.export(
        net,
        (ids, ids),
        str(work / "model.onnx"),
        input_names=["input_ids", "attention_mask"],
        output_names=["embedding"],
        dynamic_axes={
            "input_ids": {0: "b", 1: "t"},
            "attention_mask": {0: "b", 1: "t"},
            "embedding": {0: "b"},
        },
        opset_version=17,
        dynamo=False,
    )
    rng = np.random.default_rng(0)
    ref_ids = rng.integers(0, VOCAB, (3, 6)).astype(np.int64)
    ref_mask = np.ones_like(ref_ids)
    ref_mask[0, 4:] = 0
    with torch.no_grad():
        ref_out = net(torch.from_numpy(ref_ids), torch.from_numpy(ref_mask)).numpy()
    _write_variant(
        out / "artifacts" / "embedder" / "1" / "onnx-fp32",
        version=1,
        variant="onnx-fp32",
        runtime="onnx",
        payload={"model.onnx": work / "model.onnx"},
        entrypoint="model.onnx",
        reference={
            "input.input_ids": ref_ids,
            "input.attention_mask": ref_mask,
            "output.embedding": ref_out,
        },
        validation=None,
        temperature=1.0,
        signing_key=Ed25519PrivateKey.generate(),
        model="embedder",
        task="embedding",
        inputs=(
            TensorSpec("input_ids", "INT64", (-1, -1)),
            TensorSpec("attention_mask", "INT64", (-1, -1)),
        ),
        outputs=(TensorSpec("embedding", "FP32", (-1, DIM)),),
    )
    shutil.rmtree(work)


def build_embedder() -> Path:
    """A folder with artifacts/embedder/1/onnx-fp32 (cached)."""
    source = Path(__file__).read_bytes() + (Path(__file__).parent / "modelkit.py").read_bytes()
    out = CACHE / f"embedder-{hashlib.sha256(source).hexdigest()[:12]}"
    if (out / "done").exists():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    _build(tmp)
    (tmp / "done").write_text("ok")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
