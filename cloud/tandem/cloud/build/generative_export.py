"""A Llama-family decoder as ONNX with a KV cache, and its weight-only INT8 form.

The graph (one sequence, batch 1)::

    inputs   input_ids            INT64 [1, S]
             past_key.<i>         FP32  [1, H_kv, P, D]   for each layer i (P may be 0)
             past_value.<i>       FP32  [1, H_kv, P, D]
    outputs  logits               FP32  [1, S, V]
             present_key.<i>      FP32  [1, H_kv, P + S, D]
             present_value.<i>    FP32  [1, H_kv, P + S, D]

Positions are P .. P+S-1, read from the past's shape, so a caller never sends them; the
attention is causal within the new tokens and sees the whole past. The forward is written
here from the Hugging Face model's weights (RMSNorm, rotary embedding, grouped-query
attention, SwiGLU), not traced through transformers' cache classes, whose tracing changes
between releases; the build checks the graph against transformers' own logits.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from tandem.cloud.build.errors import ExportError

log = logging.getLogger(__name__)

ONNX_OPSET = 17


def past_names(layers: int) -> list[str]:
    return [f"past_{kind}.{i}" for i in range(layers) for kind in ("key", "value")]


def present_names(layers: int) -> list[str]:
    return [f"present_{kind}.{i}" for i in range(layers) for kind in ("key", "value")]


def make_decoder(model: Any) -> Any:
    """A torch module computing the graph above from a `LlamaForCausalLM`'s weights."""
    import torch
    from torch import nn

    config = model.config
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    eps = float(config.rms_norm_eps)
    rope = getattr(config, "rope_parameters", None) or {}
    theta = float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default":
        raise ExportError(f"rope type {rope_type!r} is not supported by the decoder export")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ExportError("biased attention or MLP projections are not supported")

    class Decoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model.model
            self.lm_head = model.lm_head
            inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
            self.inv_freq: Any
            self.register_buffer("inv_freq", inv, persistent=False)

        @staticmethod
        def _norm(x: Any, weight: Any) -> Any:
            variance = x.pow(2).mean(-1, keepdim=True)
            return weight * (x * torch.rsqrt(variance + eps))

        @staticmethod
        def _rotate(x: Any, cos: Any, sin: Any) -> Any:
            half = x.shape[-1] // 2
            rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
            return x * cos + rotated * sin

        def forward(self, input_ids: Any, *past: Any) -> Any:
            seq = input_ids.shape[1]
            past_len = past[0].shape[2]
            positions = torch.arange(seq, dtype=torch.float32) + past_len
            freqs = positions[:, None] * self.inv_freq[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            cos, sin = emb.cos()[None, None], emb.sin()[None, None]
            total = past_len + seq
            # Query row r (absolute position past_len + r) sees keys 0 .. past_len + r.
            rows = torch.arange(seq)[:, None] + past_len
            cols = torch.arange(total)[None, :]
            mask = torch.where(cols <= rows, 0.0, float("-inf"))[None, None]
            hidden = self.inner.embed_tokens(input_ids)
            presents: list[Any] = []
            for i, layer in enumerate(self.inner.layers):
                attn = layer.self_attn
                x = self._norm(hidden, layer.input_layernorm.weight)
                q = attn.q_proj(x).view(1, seq, heads, head_dim).transpose(1, 2)
                k = attn.k_proj(x).view(1, seq, kv_heads, head_dim).transpose(1, 2)
                v = attn.v_proj(x).view(1, seq, kv_heads, head_dim).transpose(1, 2)
                q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
                k = torch.cat((past[2 * i], k), dim=2)
                v = torch.cat((past[2 * i + 1], v), dim=2)
                presents.extend((k, v))
                group = heads // kv_heads
                kk = k.repeat_interleave(group, dim=1) if group > 1 else k
                vv = v.repeat_interleave(group, dim=1) if group > 1 else v
                scores = torch.matmul(q, kk.transpose(2, 3)) * (head_dim**-0.5) + mask
                out = torch.matmul(torch.softmax(scores, dim=-1), vv)
                out = out.transpose(1, 2).reshape(1, seq, heads * head_dim)
                hidden = hidden + attn.o_proj(out)
                mlp = layer.mlp
                x = self._norm(hidden, layer.post_attention_layernorm.weight)
                hidden = hidden + mlp.down_proj(
                    nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x)
                )
            hidden = self._norm(hidden, self.inner.norm.weight)
            return (self.lm_head(hidden), *presents)

    decoder: Any = Decoder().eval()
    decoder.kv_shape = (kv_heads, head_dim)
    decoder.layers = len(model.model.layers)
    return decoder


def export_decoder(model: Any, path: Path) -> dict[str, Any]:
    """Writes the ONNX graph of `model` to `path`; returns its shape facts."""
    import torch

    decoder = make_decoder(model)
    layers = decoder.layers
    kv_heads, head_dim = decoder.kv_shape
    # A past of 3 and 2 new tokens: neither axis may be frozen at 1 or 0 by the trace.
    ids = torch.tensor([[1, 2]], dtype=torch.int64)
    past = [torch.zeros(1, kv_heads, 3, head_dim) for _ in range(2 * layers)]
    axes: dict[str, dict[int, str]] = {"input_ids": {1: "sequence"}, "logits": {1: "sequence"}}
    for name in past_names(layers):
        axes[name] = {2: "past"}
    for name in present_names(layers):
        axes[name] = {2: "total"}
    with torch.no_grad():
        torch.onnx.export(
            decoder,
            (ids, *past),
            str(path),
            input_names=["input_ids", *past_names(layers)],
            output_names=["logits", *present_names(layers)],
            dynamic_axes=axes,
            opset_version=ONNX_OPSET,
            dynamo=False,
        )
    return {
        "layers": layers,
        "kv_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": int(model.config.vocab_size),
    }


def quantize_int8(source: Path, target: Path, *, keep_lm_head: bool = False) -> str:
    """Weight-only INT8 (blocks of 32 along each output channel) via ONNX Runtime's MatMulNBits
    in place of every MatMul with a constant weight; the graph's activations stay FP32.
    Returns the method's name.
    """
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    model = onnx.load(str(source))
    excluded = []
    if keep_lm_head:
        excluded = [
            n.name for n in model.graph.node if n.op_type == "MatMul" and "lm_head" in n.name
        ]
    config = DefaultWeightOnlyQuantConfig(
        # accuracy level 4: int8 activations inside the kernel; without it ONNX Runtime
        # dequantizes the weights on every call and is ~10x slower than FP32 on CPU.
        block_size=32,
        is_symmetric=True,
        bits=8,
        accuracy_level=4,
    )
    quantizer = MatMulNBitsQuantizer(model, nodes_to_exclude=excluded, algo_config=config)
    quantizer.process()
    quantizer.model.save_model_to_file(str(target), use_external_data_format=False)
    return "onnxruntime MatMulNBits, 8-bit symmetric weights, block 32, int8 compute" + (
        ", LM head FP32" if keep_lm_head else ""
    )


def openvino_int8(source: Path, target: Path, *, keep_lm_head: bool = False) -> str:
    """The FP32 ONNX decoder at `source` as an OpenVINO IR (`target` .xml + .bin, the same
    input and output names and dynamic axes) with NNCF weight-only INT8 (asymmetric,
    per output channel) on every constant-weight MatMul and the embedding; activations stay
    FP32. Returns the method's name."""
    from tandem.sdk.runtimes.openvino import import_openvino

    ov = import_openvino()  # first: it keeps NNCF's telemetry off too
    import nncf

    model = ov.convert_model(str(source))
    scope = nncf.IgnoredScope(patterns=[".*lm_head.*"], validate=False) if keep_lm_head else None
    options: dict[str, Any] = {"mode": nncf.CompressWeightsMode.INT8_ASYM}
    if scope is not None:
        options["ignored_scope"] = scope
    compressed = nncf.compress_weights(model, **options)
    ov.save_model(compressed, str(target), compress_to_fp16=False)
    return "OpenVINO IR, NNCF compress_weights INT8_ASYM (8-bit per-channel weights)" + (
        ", LM head FP32" if keep_lm_head else ""
    )


def numpy_logits(value: Any) -> np.ndarray[Any, Any]:
    return np.asarray(value, dtype=np.float32)
