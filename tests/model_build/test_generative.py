"""The generative device build and the SDK's local generator, on a tiny random Llama.

The real SmolLM2 build takes minutes (bench/bench_generation_device.py); here a 2-layer
LlamaForCausalLM built from a config exercises the same code: KV-cache export, INT8
quantization, the agreement gate, signing and packing, and LocalGenerator's greedy decode and
draft/accept rollback against transformers' own greedy output, and the cascade threshold
calibrated on the held-out prompts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
pytest.importorskip("onnxruntime")

from tandem.cloud.build.context import BuildContext  # noqa: E402
from tandem.cloud.build.errors import QualityGateError  # noqa: E402
from tandem.cloud.build.generative import (  # noqa: E402
    Source,
    build_generative,
    chat_template_of,
    special_tokens_of,
)
from tandem.cloud.build.signing import Signer, generate_keypair  # noqa: E402
from tandem.errors import InputError, SignatureError, TandemError  # noqa: E402
from tandem.sdk.artifacts import TrustedKeys, load_public_key_raw  # noqa: E402
from tandem.sdk.generation import LocalGenerator  # noqa: E402
from tests.support.tiny_llm import (  # noqa: E402
    CHAT_TEMPLATE,
    EOS,
    VOCAB,
    save_folder,
    tiny_model,
    tiny_source,
    tiny_tokenizer_json,
)

PROMPTS = ("w5 w9 w3", "w10 w11", "w40 w2 w7 w7", "w33")
CASCADE_WINDOW = 3  # below the 8 tokens per prompt, so that the gate has windows to act on
CASCADE_TARGET = 1.0  # above the tiny INT8 model's agreement: the gate has to act


@pytest.fixture(scope="module")
def model() -> Any:
    return tiny_model()


@pytest.fixture(scope="module")
def source(model: Any) -> Source:
    return tiny_source(model)


def _context(root: Path, **options: Any) -> BuildContext:
    key, _pub = (
        generate_keypair(root / "keys")
        if not (root / "keys").exists()
        else (
            root / "keys" / "signing.key",
            None,
        )
    )
    work = root / "work"
    work.mkdir(parents=True, exist_ok=True)
    return BuildContext(
        out_dir=root,
        model="tiny",
        signer=Signer.from_file(key),
        work_dir=work,
        cache_dir=root / ".cache" / "tiny",
        options={
            "steps": 8,
            "timed_prompts": 1,
            "min_agreement": 0.5,
            "cascade_window": CASCADE_WINDOW,
            "cascade_target": CASCADE_TARGET,
            **options,
        },
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, source: Source) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("genzoo")
    entry = build_generative(_context(root), source, PROMPTS)
    return root, entry


def _trusted(root: Path) -> TrustedKeys:
    return TrustedKeys([load_public_key_raw(root / "keys" / "signing.pub")])


def _hf_greedy(model: Any, ids: list[int], steps: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            max_new_tokens=steps,
            do_sample=False,
        )
    return [int(t) for t in out[0, len(ids) :]]  # may stop early, at EOS


def _fp32_generator(root: Path, variant: Path) -> LocalGenerator:
    """The generator over the build's FP32 graph: must match transformers exactly."""
    (stage,) = (root / ".cache" / "tiny").glob("export-*")
    config = json.loads((variant / "generation.json").read_text())
    return LocalGenerator(stage / "model.onnx", variant / "tokenizer.json", config)


def test_build_packs_a_signed_variant_with_its_figures(built: tuple[Path, dict[str, Any]]) -> None:
    root, entry = built
    metrics = entry["metrics"]
    assert entry["task"] == "generation"
    assert metrics["fp32_greedy_agreement"] == 1.0  # the export is exact
    assert 0.5 <= metrics["greedy_agreement"] <= 1.0
    assert metrics["tokens_per_second"] > 0 and metrics["fp32_tokens_per_second"] > 0
    assert metrics["agreement_tokens"] == 8 * len(PROMPTS)
    row = entry["variants"]["onnx-int8"]
    assert row["size_bytes"] < metrics["fp32_size_bytes"]
    assert {"model.onnx", "tokenizer.json", "generation.json"} <= set(row["files"])

    variant = root / "artifacts" / "tiny" / "1" / "onnx-int8"
    generator = LocalGenerator.from_variant(variant, _trusted(root))
    # The packed reference: the INT8 variant's own greedy tokens, as the device must get them.
    reference = np.load(variant / "reference.npz")
    generator.start([int(t) for t in reference["input.input_ids"][0]])
    assert [generator.step()[0] for _ in range(16)] == list(reference["output.tokens"][0])

    # A key the build did not sign with is refused.
    other = root / "other"
    generate_keypair(other)
    with pytest.raises(SignatureError):
        LocalGenerator.from_variant(
            variant, TrustedKeys([load_public_key_raw(other / "signing.pub")])
        )


def test_local_greedy_matches_transformers(built: tuple[Path, dict[str, Any]], model: Any) -> None:
    root, _entry = built
    generator = _fp32_generator(root, root / "artifacts" / "tiny" / "1" / "onnx-int8")
    for text in PROMPTS:
        ids = generator.encode(text)
        expected = _hf_greedy(model, ids, 12)
        streamed = []
        generator.start(ids)
        for _ in range(len(expected)):
            token, confidence = generator.step()
            assert 0.0 < confidence <= 1.0
            streamed.append(token)
        assert streamed == expected, text


def test_draft_and_accept_roll_the_cache_back(built: tuple[Path, dict[str, Any]]) -> None:
    root, _entry = built
    variant = root / "artifacts" / "tiny" / "1" / "onnx-int8"
    generator = _fp32_generator(root, variant)
    prompt = generator.encode("w40 w2 w7 w7")
    generator.start(prompt)
    plain = [generator.step()[0] for _ in range(10)]

    # All accepted: the same as plain greedy.
    generator.start(prompt)
    assert generator.draft(4) == plain[:4]
    generator.accept(4)
    assert generator.draft(3) == plain[4:7]
    generator.accept(3)
    assert generator.tokens == [*prompt, *plain[:7]]
    assert len(generator.confidences) == 7

    # Two accepted, then a correction: the state equals a fresh start from that prefix.
    correction = (plain[2] + 1) % VOCAB
    generator.start(prompt)
    generator.draft(5)
    generator.accept(2, correction)
    assert generator.tokens == [*prompt, *plain[:2], correction]
    after = generator.draft(4)
    fresh = _fp32_generator(root, variant)
    fresh.start([*prompt, *plain[:2], correction])
    assert after == [fresh.step()[0] for _ in range(4)]

    # Nothing accepted, no correction: back to the prompt, greedy again.
    generator.start(prompt)
    generator.draft(3)
    generator.accept(0)
    assert generator.tokens == prompt
    assert generator.step()[0] == plain[0]

    generator.draft(2)
    with pytest.raises(InputError):
        generator.accept(3)  # more than drafted; the draft stays pending
    generator.accept(0)
    with pytest.raises(TandemError):
        generator.accept(0)  # no draft pending


def test_streaming_text_stops_at_eos(built: tuple[Path, dict[str, Any]]) -> None:
    root, _entry = built
    generator = LocalGenerator.from_variant(root / "artifacts" / "tiny" / "1" / "onnx-int8")
    pieces = list(generator.generate("w5 w9 w3", 6))
    assert 0 < len(pieces) <= 6
    assert all(p.id != EOS for p in pieces)
    joined = "".join(p.text for p in pieces).strip()
    assert joined == generator.decode([p.id for p in pieces])


def test_agreement_below_tolerance_is_refused_and_export_is_cached(
    built: tuple[Path, dict[str, Any]], source: Source
) -> None:
    root, entry = built
    (stage,) = (root / ".cache" / "tiny").glob("export-*")
    before = (stage / "model.int8.onnx").stat().st_mtime_ns
    with pytest.raises(QualityGateError, match=r"below the tolerance 101\.00% by"):
        build_generative(_context(root, min_agreement=1.01), source, PROMPTS)
    # The refused build reused the cached export (same weights digest, same code).
    assert (stage / "model.int8.onnx").stat().st_mtime_ns == before
    assert entry["metrics"]["greedy_agreement"] < 1.01


def _sdk_cascade_split(confidences: list[float], threshold: float, window: int) -> int:
    """Tokens the SDK's cascade keeps local, written out again from session.Run._local."""
    seen: list[float] = []
    for i, confidence in enumerate(confidences):
        seen.append(confidence)
        last = i == len(confidences) - 1
        recent = seen[-window:]
        if not last and len(recent) == window and sum(recent) / window < threshold:
            return i + 1
    return len(confidences)


def _local_figures(
    records: list[tuple[list[float], list[bool]]], threshold: float, window: int
) -> tuple[int, float]:
    kept = hits = 0
    for confidences, agrees in records:
        n = _sdk_cascade_split(confidences, threshold, window)
        kept += n
        hits += sum(agrees[:n])
    return kept, hits / kept


def test_cascade_threshold_is_calibrated_on_the_held_out_prompts(
    built: tuple[Path, dict[str, Any]], model: Any
) -> None:
    root, entry = built
    variant = root / "artifacts" / "tiny" / "1" / "onnx-int8"
    config = json.loads((variant / "generation.json").read_text())
    threshold, window, target = (
        config["cascade_threshold"],
        config["cascade_window"],
        config["cascade_target"],
    )
    assert window == CASCADE_WINDOW and target == CASCADE_TARGET and 0.0 <= threshold <= 1.0
    metrics = entry["metrics"]
    assert metrics["cascade_calibrated"] is True
    assert metrics["cascade_threshold"] == pytest.approx(threshold, abs=1e-6)
    rows = {row["target"]: row for row in metrics["cascade_by_target"]}
    assert rows[CASCADE_TARGET]["threshold"] == metrics["cascade_threshold"]
    shares = [rows[t]["local_share"] for t in sorted(rows)]
    assert shares == sorted(shares, reverse=True)  # a higher target keeps no more local

    # The records again, independently: the signed variant through the SDK's generator
    # (its confidences are what the cascade sees), each token judged by transformers.
    generator = LocalGenerator.from_variant(variant, _trusted(root))
    records = []
    for text in PROMPTS:
        ids = generator.encode(text)
        generator.start(ids)
        tokens, confidences = [], []
        while len(tokens) < 8 and (not tokens or tokens[-1] != EOS):
            token, confidence = generator.step()
            tokens.append(token)
            confidences.append(confidence)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([[*ids, *tokens[:-1]]])).logits[0]
        picks = logits[len(ids) - 1 :].argmax(-1).tolist()
        records.append((confidences, [p == t for p, t in zip(picks, tokens, strict=True)]))

    kept, local_agreement = _local_figures(records, threshold, window)
    total = sum(len(c) for c, _ in records)
    assert metrics["cascade_tokens"] == total
    assert metrics["cascade_local_share"] == pytest.approx(kept / total, abs=1e-4)
    assert metrics["cascade_local_agreement"] == pytest.approx(local_agreement, abs=1e-4)
    # The rule: the local tokens meet the target, and no threshold keeps more tokens local
    # while meeting it (every running mean that could trip the gate, and just above/below).
    assert metrics["cascade_target_met"] == (local_agreement >= target)
    means = {
        sum(c[i - window + 1 : i + 1]) / window
        for c, _ in records
        for i in range(window - 1, len(c) - 1)
    }
    probes = {0.0, 1.0} | {min(1.0, m + d) for m in means for d in (-1e-9, 1e-9)}
    if metrics["cascade_target_met"]:
        for probe in probes:
            more, agreement_at = _local_figures(records, probe, window)
            assert not (more > kept and agreement_at >= target), probe
    else:  # unreachable: the threshold closest to the target
        best = max(_local_figures(records, p, window)[1] for p in probes)
        assert local_agreement == pytest.approx(best)


def test_the_chat_template_goes_into_generation_json(
    built: tuple[Path, dict[str, Any]], model: Any, tmp_path: Path
) -> None:
    root, _entry = built
    variant = root / "artifacts" / "tiny" / "1" / "onnx-int8"
    config = json.loads((variant / "generation.json").read_text())
    assert config["chat_template"] == CHAT_TEMPLATE and config["eos_token"] == "<eos>"
    # smollm2_source reads them off the transformers tokenizer the same way
    served = transformers.AutoTokenizer.from_pretrained(str(save_folder(model, tmp_path)))
    assert chat_template_of(served) == CHAT_TEMPLATE
    assert special_tokens_of(served) == {"eos_token": "<eos>"}
    bare = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer.from_str(tiny_tokenizer_json())
    )
    assert chat_template_of(bare) is None and special_tokens_of(bare) == {}


def test_openvino_variant_generates_as_the_onnx_graph_does(
    built: tuple[Path, dict[str, Any]], model: Any
) -> None:
    """The `openvino-int8` variant: signed, gated, loaded by LocalGenerator through OpenVINO
    (as the agent's warm-up loads it), and the same decoder's FP32 IR decodes exactly the
    greedy tokens of the FP32 ONNX graph and of transformers, rollback included."""
    ov = pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    from tandem.agent.warmup import warm_up
    from tandem.sdk.artifacts import load_variant

    root, entry = built
    row = entry["variants"]["openvino-int8"]
    assert row["runtime"] == "openvino"
    assert 0.5 <= row["greedy_agreement"] <= 1.0 and row["tokens_per_second"] > 0
    assert {"model.xml", "model.bin", "generation.json", "tokenizer.json"} <= set(row["files"])
    variant = root / "artifacts" / "tiny" / "1" / "openvino-int8"
    generator = LocalGenerator.from_variant(variant, _trusted(root))
    reference = np.load(variant / "reference.npz")
    generator.start([int(t) for t in reference["input.input_ids"][0]])
    assert [generator.step()[0] for _ in range(16)] == list(reference["output.tokens"][0])
    assert type(generator._session).__name__ == "OpenVINODecoder"
    loaded = load_variant(variant, _trusted(root))
    warm_up(variant, loaded.manifest, 1e-3, 1e-3).check()  # raises on a token mismatch

    (stage,) = (root / ".cache" / "tiny").glob("export-*")
    fp32_xml = root / "fp32.xml"
    ov.save_model(ov.convert_model(str(stage / "model.onnx")), str(fp32_xml), False)
    config = json.loads((variant / "generation.json").read_text())
    on_ov = LocalGenerator(fp32_xml, variant / "tokenizer.json", config)  # .xml: OpenVINO
    on_ort = _fp32_generator(root, variant)
    for text in PROMPTS:
        ids = on_ov.encode(text)
        on_ov.start(ids)
        on_ort.start(ids)
        got = [on_ov.step()[0] for _ in range(10)]
        assert got == [on_ort.step()[0] for _ in range(10)], text
        expected = _hf_greedy(model, ids, 10)  # may stop early, at EOS
        assert got[: len(expected)] == expected, text
        # Rollback slices the cache OpenVINO returned: a fresh start from the prefix agrees.
        on_ov.start(ids)
        on_ov.draft(4)
        on_ov.accept(1, got[1])
        assert on_ov.draft(3) == got[2:5], text
