"""minilm in the built zoo: quality gate, speed figure, layout, signatures, tokenizer, references.

Every test reads the session's `full_zoo` (built once, content-hash cached); the cosine
similarity is both read from the report and recomputed here from the shipped artifacts.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tandem.cloud.build import minilm
from tandem.errors import ConfigError, SignatureError
from tandem.sdk.artifacts import (
    MANIFEST_FILE,
    TrustedKeys,
    load_npz,
    load_variant,
    split_reference,
    unpack_variant,
    verify_stored_files,
)

VARIANTS = {"onnx-int8": "onnx", "openvino-int8": "openvino"}
ENTRYPOINTS = {"onnx-int8": "model.onnx", "openvino-int8": "model.xml"}
# Every 8th evaluation sentence: ~100 sentences, enough to see a broken quantization.
SUBSET_STEP = 8


@pytest.fixture(scope="module")
def zoo(full_zoo: Path) -> Path:
    return full_zoo


@pytest.fixture(scope="module")
def entry(zoo: Path) -> dict[str, Any]:
    report = json.loads((zoo / "report.json").read_text())
    result: dict[str, Any] = report["models"]["minilm"]
    return result


@pytest.fixture(scope="module")
def trusted(zoo: Path) -> TrustedKeys:
    return TrustedKeys.from_files([zoo / "keys" / "signing.pub"])


@pytest.fixture(scope="module")
def unpacked(zoo: Path, trusted: TrustedKeys, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Each variant verified and decompressed into <tmp>/<variant>/, as a device would."""
    root = tmp_path_factory.mktemp("minilm-unpacked")
    for variant in VARIANTS:
        loaded = load_variant(_variant_dir(zoo, variant), trusted)
        unpack_variant(loaded, root / variant)
    return root


def _variant_dir(zoo: Path, variant: str) -> Path:
    return zoo / "artifacts" / "minilm" / "1" / variant


def _onnx_session(path: Path) -> Any:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


Embed = Callable[[dict[str, np.ndarray]], np.ndarray]


def _onnx_embedder(path: Path) -> Embed:
    session = _onnx_session(path)
    return lambda feed: np.asarray(session.run(["embedding"], feed)[0])


def _openvino_embedder(xml: Path) -> Embed:
    from tandem.sdk.runtimes.openvino import import_openvino

    ov = import_openvino()
    # f32 like the build's runner, the SDK and the server (bf16 CPUs default to bf16).
    compiled = ov.Core().compile_model(str(xml), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return lambda feed: np.asarray(compiled(feed)[compiled.output(0)])


def _variant_embedder(folder: Path, variant: str) -> Embed:
    """The variant's model on its own runtime, loaded from the unpacked files."""
    if VARIANTS[variant] == "onnx":
        return _onnx_embedder(folder / "model.onnx")
    return _openvino_embedder(folder / "model.xml")


def _shipped_tokenizer(folder: Path) -> Any:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(folder / "tokenizer.json"))


# --- the report --------------------------------------------------------------------------


def test_report_holds_cosine_gate_and_speedup(zoo: Path, entry: dict[str, Any]) -> None:
    assert entry["task"] == "embedding"
    metrics = entry["metrics"]
    assert metrics["evaluation_sentences"] >= 500
    assert metrics["evaluation_sentences"] == len(minilm.evaluation_sentences())
    assert metrics["onnx_fp32_vs_torch_max_abs_diff"] <= minilm.EXPORT_TOLERANCE
    assert set(entry["variants"]) == set(VARIANTS)
    for variant, runtime in VARIANTS.items():
        row = entry["variants"][variant]
        assert row["runtime"] == runtime and row["precision"] == "int8"
        assert row["cosine_sentences"] == metrics["evaluation_sentences"]
        assert row["cosine_mean"] >= 0.98, (variant, row["cosine_mean"])
        assert row["cosine_min"] <= row["cosine_mean"] <= 1.0 + 1e-6
        # The speedup is reported, positive, and is the ratio of the two medians it quotes.
        latency, baseline = row["latency_ms_batch1"], row["fp32_latency_ms_batch1"]
        assert latency > 0 and baseline > 0
        assert math.isfinite(row["speedup_vs_fp32"]) and row["speedup_vs_fp32"] > 0
        assert row["speedup_vs_fp32"] == pytest.approx(baseline / latency, rel=1e-3)
        # An INT8 model is about a quarter of the FP32 one; a variant that did not quantize
        # its weights would be as large as FP32.
        assert row["size_bytes"] < 0.4 * metrics["fp32_size_bytes"]
    markdown = (zoo / "report.md").read_text()
    assert "## minilm v1" in markdown
    assert "speedup_vs_fp32" in markdown and "cosine_mean" in markdown


def test_evaluation_sentences_are_fixed_real_english_and_disjoint_from_calibration() -> None:
    import sysconfig

    sentences = minilm.stdlib_sentences()
    # Deterministic: a second parse, bypassing the builder's cache, gives the same list.
    again = minilm._stdlib_sentences.__wrapped__(Path(sysconfig.get_paths()["stdlib"]))
    assert sentences == list(again)
    evaluation, calibration = minilm.split_sentences(sentences)
    assert len(evaluation) >= 500
    assert not set(evaluation) & set(calibration)
    assert len({s.lower() for s in sentences}) == len(sentences)
    for sentence in evaluation:
        assert sentence.isascii() and sentence[0].isupper() and sentence[-1] in ".!?"
        assert len(sentence.split()) >= 6
    with pytest.raises(minilm.QualityGateError):
        minilm.split_sentences(sentences[:100])


def test_first_sentence_rules() -> None:
    first = minilm._first_sentence
    assert first("Return the number of items in the queue. Not reliable.") == (
        "Return the number of items in the queue."
    )
    # Wrapped docstring lines are joined; only the first paragraph counts.
    assert first("Create a new\n    connection to the server now.\n\nMore.") == (
        "Create a new connection to the server now."
    )
    assert first("Too short.") is None
    assert first("foo(bar) -> int returns the value of the bar thing.") is None
    assert first(None) is None


def test_options_are_validated_by_name() -> None:
    with pytest.raises(ConfigError, match=r"minilm\.threads"):
        minilm.MiniLMOptions.from_mapping({"threads": 0})
    with pytest.raises(ConfigError, match=r"minilm\.colour"):
        minilm.MiniLMOptions.from_mapping({"colour": "blue"})
    with pytest.raises(ConfigError, match=r"minilm\.torchscript"):
        minilm.MiniLMOptions.from_mapping({"torchscript": 1})
    assert minilm.MiniLMOptions.from_mapping({"latency_sentences": 5}).latency_sentences == 5


# --- the cloud repository ----------------------------------------------------------------


def test_repository_layout_and_config(zoo: Path, entry: dict[str, Any]) -> None:
    model_dir = zoo / "repository" / "minilm"
    config = json.loads((model_dir / "config.json").read_text())
    assert config["name"] == "minilm"
    assert config["backend"] == "onnxruntime"
    assert config["max_batch_size"] >= 1
    assert config["input"] == [
        {"name": "input_ids", "datatype": "INT64", "dims": [-1]},
        {"name": "attention_mask", "datatype": "INT64", "dims": [-1]},
    ]
    assert config["output"] == [{"name": "embedding", "datatype": "FP32", "dims": [384]}]
    assert max(config["dynamic_batching"]["preferred_batch_sizes"]) <= config["max_batch_size"]
    assert entry["repository"]["files"] == ["model.onnx", "model.pt"]
    for name in entry["repository"]["files"]:
        assert (model_dir / "1" / name).is_file()

    session = _onnx_session(model_dir / "1" / "model.onnx")
    inputs = {i.name: i for i in session.get_inputs()}
    assert set(inputs) == {"input_ids", "attention_mask"}
    assert all(i.type == "tensor(int64)" and len(i.shape) == 2 for i in inputs.values())
    (output,) = session.get_outputs()
    assert output.name == "embedding" and output.type == "tensor(float)"
    assert output.shape[1] == 384


def test_cloud_model_embeds_any_batch_and_length_normalised(zoo: Path) -> None:
    """Batch and sequence axes are dynamic, and padding does not change an embedding."""
    folder = zoo / "repository" / "minilm" / "1"
    session = _onnx_session(folder / "model.onnx")
    tokenizer = minilm.load_tokenizer(minilm.model_dir() / "tokenizer.json")
    sentences = minilm.evaluation_sentences()[:5]
    batch = minilm.tokenize(tokenizer, sentences)
    together = session.run(["embedding"], batch)[0]
    assert together.shape == (5, 384)
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)
    for index, sentence in enumerate(sentences):
        alone = session.run(["embedding"], minilm.tokenize(tokenizer, [sentence]))[0]
        np.testing.assert_allclose(alone[0], together[index], atol=1e-5)


def test_torchscript_matches_onnx(zoo: Path) -> None:
    import torch

    folder = zoo / "repository" / "minilm" / "1"
    tokenizer = minilm.load_tokenizer(minilm.model_dir() / "tokenizer.json")
    batch = minilm.tokenize(tokenizer, minilm.evaluation_sentences()[10:17])
    module = torch.jit.load(str(folder / "model.pt"))
    with torch.inference_mode():
        traced = module(
            torch.from_numpy(batch["input_ids"]), torch.from_numpy(batch["attention_mask"])
        )
    onnx = _onnx_embedder(folder / "model.onnx")(batch)
    np.testing.assert_allclose(traced.numpy(), onnx, atol=1e-4)


# --- the edge variants -------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_manifest_verifies_and_describes_the_model(
    zoo: Path, trusted: TrustedKeys, variant: str
) -> None:
    loaded = load_variant(_variant_dir(zoo, variant), trusted)
    verify_stored_files(loaded)
    manifest = loaded.manifest
    assert (manifest.model, manifest.version, manifest.variant) == ("minilm", 1, variant)
    assert manifest.runtime == VARIANTS[variant]
    assert manifest.precision == "int8" and manifest.task == "embedding"
    assert manifest.entrypoint == ENTRYPOINTS[variant]
    assert [t.to_json() for t in manifest.inputs] == [
        {"name": "input_ids", "datatype": "INT64", "shape": [-1, -1]},
        {"name": "attention_mask", "datatype": "INT64", "shape": [-1, -1]},
    ]
    assert [t.to_json() for t in manifest.outputs] == [
        {"name": "embedding", "datatype": "FP32", "shape": [-1, 384]}
    ]
    names = {f.name for f in manifest.files}
    assert set(minilm.TOKENIZER_FILES) <= names
    assert manifest.reference == "reference.npz" and "reference.npz" in names
    assert manifest.metrics["cosine_mean"] >= 0.98
    for entry in manifest.files:
        assert (loaded.path / entry.stored_as).is_file()
        assert entry.stored_as.endswith(".zst")


def test_tampered_manifest_is_refused(zoo: Path, trusted: TrustedKeys, tmp_path: Path) -> None:
    copy = tmp_path / "onnx-int8"
    shutil.copytree(_variant_dir(zoo, "onnx-int8"), copy)
    signed = (copy / MANIFEST_FILE).read_bytes()
    (copy / MANIFEST_FILE).write_bytes(signed.replace(b'"precision":"int8"', b'"precision":"fp32"'))
    with pytest.raises(SignatureError):
        load_variant(copy, trusted)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_shipped_tokenizer_reproduces_reference_inputs(unpacked: Path, variant: str) -> None:
    folder = unpacked / variant
    inputs, _ = split_reference(load_npz(folder / "reference.npz"))
    assert set(inputs) == {"input_ids", "attention_mask"}
    count = inputs["input_ids"].shape[0]
    assert count >= 2
    # The reference batch is padded: a runtime that ignored the mask would fail the check.
    assert (inputs["attention_mask"] == 0).any()
    sentences = minilm.evaluation_sentences()[:count]
    encodings = _shipped_tokenizer(folder).encode_batch(sentences)
    np.testing.assert_array_equal(np.array([e.ids for e in encodings]), inputs["input_ids"])
    np.testing.assert_array_equal(
        np.array([e.attention_mask for e in encodings]), inputs["attention_mask"]
    )
    # Without `tokenizers`, a device can still read the WordPiece vocabulary and the limits.
    vocabulary = (folder / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert len(vocabulary) == 30522 and vocabulary[0] == "[PAD]"
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == minilm.MAX_SEQ_LENGTH and config["do_lower_case"]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_reference_outputs_reproduce_with_the_variants_runtime(
    unpacked: Path, variant: str
) -> None:
    folder = unpacked / variant
    inputs, outputs = split_reference(load_npz(folder / "reference.npz"))
    expected = outputs["embedding"]
    assert expected.dtype == np.float32 and expected.shape == (len(inputs["input_ids"]), 384)
    actual = _variant_embedder(folder, variant)(inputs)
    np.testing.assert_allclose(actual, expected, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(actual, axis=1), 1.0, atol=1e-3)


@pytest.fixture(scope="module")
def subset() -> list[str]:
    sentences = minilm.evaluation_sentences()[::SUBSET_STEP]
    assert len(sentences) >= 60
    return sentences


@pytest.fixture(scope="module")
def fp32_subset(zoo: Path, subset: list[str]) -> tuple[list[dict[str, np.ndarray]], np.ndarray]:
    """The subset in batches of 16 (raw tokenizer from the model package) and its FP32
    embeddings from the cloud repository's model.onnx."""
    tokenizer = minilm.load_tokenizer(minilm.model_dir() / "tokenizer.json")
    feeds = [minilm.tokenize(tokenizer, subset[i : i + 16]) for i in range(0, len(subset), 16)]
    fp32 = _onnx_embedder(zoo / "repository" / "minilm" / "1" / "model.onnx")
    return feeds, np.concatenate([fp32(feed) for feed in feeds])


def test_cosine_recomputed_from_the_artifacts(
    unpacked: Path,
    entry: dict[str, Any],
    subset: list[str],
    fp32_subset: tuple[list[dict[str, np.ndarray]], np.ndarray],
) -> None:
    """INT8 variants against the cloud FP32 model, tokenized with the shipped tokenizer."""
    feeds, fp32 = fp32_subset
    for variant in VARIANTS:
        folder = unpacked / variant
        tokenizer = _shipped_tokenizer(folder)
        int8 = _variant_embedder(folder, variant)
        parts = []
        for start, expected in zip(range(0, len(subset), 16), feeds, strict=True):
            encodings = tokenizer.encode_batch(subset[start : start + 16])
            feed = {
                "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
                "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
            }
            # The shipped tokenizer tokenizes exactly as the build did.
            np.testing.assert_array_equal(feed["input_ids"], expected["input_ids"])
            parts.append(int8(feed))
        cosines = minilm.cosine_similarities(np.concatenate(parts), fp32)
        assert cosines.mean() >= 0.98, (variant, cosines.mean())
        # The subset agrees with the figure the report quotes for the whole set.
        assert cosines.mean() == pytest.approx(entry["variants"][variant]["cosine_mean"], abs=0.01)


def test_gate_refuses_a_per_tensor_quantization(
    zoo: Path, tmp_path: Path, fp32_subset: tuple[list[dict[str, np.ndarray]], np.ndarray]
) -> None:
    """The gate can fail: per-tensor weight scales lose too much, and the build says so."""
    coarse = tmp_path / "per-tensor.onnx"
    minilm.quantize_onnx(
        zoo / "repository" / "minilm" / "1" / "model.onnx", coarse, tmp_path, per_channel=False
    )
    feeds, fp32 = fp32_subset
    int8 = _onnx_embedder(coarse)
    cosines = minilm.cosine_similarities(np.concatenate([int8(f) for f in feeds]), fp32)
    with pytest.raises(minilm.QualityGateError, match=r"below the 0\.98 gate"):
        minilm.check_cosine_gate("onnx-int8-per-tensor", cosines)
    with pytest.raises(minilm.QualityGateError):
        minilm.check_cosine_gate("empty", np.array([]))
    minilm.check_cosine_gate("identical", np.ones(10))


def test_model_loads_with_the_network_switched_off(
    monkeypatch: pytest.MonkeyPatch, fp32_subset: tuple[list[dict[str, np.ndarray]], np.ndarray]
) -> None:
    """The weights come from the package folder: no socket is needed to load them."""
    import socket

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network access attempted while loading minilm")

    for name in ("socket", "create_connection", "getaddrinfo"):
        monkeypatch.setattr(socket, name, refuse)
    embedder = minilm.load_embedder()
    feeds, fp32 = fp32_subset
    embedded = minilm.torch_embed(embedder, feeds[0])
    np.testing.assert_allclose(embedded, fp32[: len(embedded)], atol=1e-4)


def test_unchanged_rebuild_comes_from_the_cache(zoo: Path) -> None:
    from tandem.cloud.build.pipeline import build_zoo

    result = build_zoo(zoo, models=("minilm",))
    assert result["run"]["cached"] == ["minilm"] and result["run"]["built"] == []
    assert result["run"]["seconds"] < 30
