"""minilm (examples/minilm, built by the spec build): data, quality gate, layout, signatures,
tokenizer, references.

The first tests run examples/minilm/embed.py on its own (seconds). The others read the test
zoo with minilm built (once, content-hash cached); the cosine similarity is both read from
the report and recomputed here from the shipped artifacts.
"""

from __future__ import annotations

import json
import math
import shutil
import sysconfig
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from tandem.cloud.build.checks import check_variant
from tandem.cloud.build.spec import ModelSpec, load_spec
from tandem.errors import SignatureError
from tandem.sdk.artifacts import (
    MANIFEST_FILE,
    TrustedKeys,
    load_npz,
    load_variant,
    split_reference,
    unpack_variant,
    verify_stored_files,
)
from tests.support.examples import load_example, spec_file

VARIANTS = {"onnx-int8": "onnx", "openvino-int8": "openvino"}
ENTRYPOINTS = {"onnx-int8": "model.onnx", "openvino-int8": "model.xml"}
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
# Every 8th validation sentence: ~100 sentences, enough to see a broken quantization.
SUBSET_STEP = 8

Array = np.ndarray[Any, Any]
Embed = Callable[[dict[str, Array]], Array]


@pytest.fixture(scope="module")
def embed() -> ModuleType:
    return load_example("minilm", "embed")


@pytest.fixture(scope="module")
def validation_sentences(embed: ModuleType) -> list[str]:
    sentences: list[str] = embed.split_sentences(embed.stdlib_sentences())[0]
    return sentences


# --- the example's code, without a build ------------------------------------------------------


def test_sentences_are_fixed_real_english_and_disjoint(embed: ModuleType) -> None:
    sentences = embed.stdlib_sentences()
    # Deterministic: a second parse gives the same list.
    assert sentences == embed.stdlib_sentences(Path(sysconfig.get_paths()["stdlib"]))
    validation, calibration = embed.split_sentences(sentences)
    assert len(validation) >= 500 and len(calibration) == embed.CALIBRATION_SENTENCES
    assert not set(validation) & set(calibration)
    assert len({s.lower() for s in sentences}) == len(sentences)
    for sentence in validation:
        assert sentence.isascii() and sentence[0].isupper() and sentence[-1] in ".!?"
        assert len(sentence.split()) >= 6
    with pytest.raises(ValueError, match="at least 500"):
        embed.split_sentences(sentences[:100])


def test_first_sentence_rules(embed: ModuleType) -> None:
    first = embed.first_sentence
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


def test_prepare_writes_the_tokenized_sentences_and_the_tokenizer(
    embed: ModuleType, tmp_path: Path, validation_sentences: list[str]
) -> None:
    facts = embed.prepare(tmp_path, 0)
    assert facts == {
        "evaluation_sentences": len(validation_sentences),
        "calibration_sentences": embed.CALIBRATION_SENTENCES,
    }
    assert {p.name for p in tmp_path.iterdir()} == {"calib.npz", "val.npz", *TOKENIZER_FILES}
    tokenizer = embed.load_tokenizer(tmp_path / "tokenizer.json")
    for name, rows in (("val.npz", facts["evaluation_sentences"]), ("calib.npz", 300)):
        with np.load(tmp_path / name) as data:
            assert set(data.files) == {"input_ids", "attention_mask"}
            ids, mask = data["input_ids"], data["attention_mask"]
        assert ids.dtype == mask.dtype == np.int64 and ids.shape == mask.shape
        # Padded to the file's own longest sentence, with [PAD] (0) where the mask is 0.
        assert ids.shape[0] == rows and mask.sum(1).max() == ids.shape[1]
        assert (ids[mask == 0] == 0).all() and (mask == 0).any()
    with np.load(tmp_path / "val.npz") as data:
        ids, mask = data["input_ids"], data["attention_mask"]
    # The shipped tokenizer.json gives each sentence exactly the ids the build was fed.
    for row in (0, 1, len(validation_sentences) - 1):
        alone = tokenizer.encode(validation_sentences[row]).ids
        assert ids[row][mask[row] == 1].tolist() == alone
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == embed.MAX_SEQ_LENGTH == 256


# --- the report ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def zoo() -> Path:
    """The test zoo with minilm built (cached by the pipeline), without needing digits."""
    from tandem.cloud.build.pipeline import build_zoo
    from tests.conftest import TEST_ZOO

    build_zoo(TEST_ZOO, models=("minilm",))
    return TEST_ZOO


@pytest.fixture(scope="module")
def entry(zoo: Path) -> dict[str, Any]:
    report = json.loads((zoo / "report.json").read_text())
    result: dict[str, Any] = report["models"]["minilm"]
    return result


@pytest.fixture(scope="module")
def spec(entry: dict[str, Any]) -> ModelSpec:
    loaded = load_spec(spec_file("minilm"), prepared_dir=Path(entry["prepared_dir"]))
    assert isinstance(loaded, ModelSpec)
    return loaded


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


def _cosines(a: Array, b: Array) -> Array:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return np.asarray(np.sum(a * b, axis=1), dtype=np.float64)


def test_report_holds_the_cosine_gate_latency_and_sizes(
    zoo: Path, entry: dict[str, Any], validation_sentences: list[str]
) -> None:
    assert entry["task"] == "embedding" and entry["source"] == "spec"
    metrics = entry["metrics"]
    assert metrics["evaluation_sentences"] == len(validation_sentences) >= 500
    assert metrics["validation_rows"] == len(validation_sentences)
    assert metrics["calibration_sentences"] == 300
    assert set(entry["variants"]) == set(VARIANTS)
    fp32_size = (zoo / "repository" / "minilm" / "1" / "model.onnx").stat().st_size
    for variant, runtime in VARIANTS.items():
        row = entry["variants"][variant]
        assert row["runtime"] == runtime and row["precision"] == "int8"
        assert 0.98 <= row["cosine_mean"] <= 1.0 + 1e-6, (variant, row["cosine_mean"])
        assert math.isfinite(row["latency_ms_batch1"]) and row["latency_ms_batch1"] > 0
        # An INT8 model is about a quarter of the FP32 one; a variant that did not quantize
        # its weights would be as large as FP32.
        assert 0 < row["size_bytes"] < 0.4 * fp32_size
        assert 0 < row["stored_bytes"] < fp32_size
    markdown = (zoo / "report.md").read_text()
    assert "## minilm v1" in markdown and "cosine_mean" in markdown


# --- the cloud repository ----------------------------------------------------------------


def test_repository_layout_and_config(zoo: Path, entry: dict[str, Any]) -> None:
    model_dir = zoo / "repository" / "minilm"
    config = json.loads((model_dir / "config.json").read_text())
    assert config["name"] == "minilm"
    assert config["backend"] == "onnxruntime"
    assert config["max_batch_size"] == 32
    assert config["dynamic_batching"]["preferred_batch_sizes"] == [8, 16, 32]
    # [serve] parameters, and the file the pytorch backend loads.
    assert config["parameters"] == {
        "max_sequence_length": 256,
        "pooling": "mean",
        "normalized": True,
        "pytorch_file": "model.pt",
    }
    assert config["input"] == [
        {"name": "input_ids", "datatype": "INT64", "dims": [-1]},
        {"name": "attention_mask", "datatype": "INT64", "dims": [-1]},
    ]
    assert config["output"] == [{"name": "embedding", "datatype": "FP32", "dims": [384]}]
    # ONNX Runtime and TorchScript (the pytorch backend); the folder carries the tokenizer too.
    assert entry["repository"]["files"] == sorted(["model.onnx", "model.pt", *TOKENIZER_FILES])
    for name in entry["repository"]["files"]:
        assert (model_dir / "1" / name).is_file()

    session = _onnx_session(model_dir / "1" / "model.onnx")
    inputs = {i.name: i for i in session.get_inputs()}
    assert set(inputs) == {"input_ids", "attention_mask"}
    assert all(i.type == "tensor(int64)" and len(i.shape) == 2 for i in inputs.values())
    (output,) = session.get_outputs()
    assert output.name == "embedding" and output.type == "tensor(float)"
    assert output.shape[1] == 384


def test_cloud_model_embeds_any_batch_and_length_normalised(
    zoo: Path, embed: ModuleType, validation_sentences: list[str]
) -> None:
    """Batch and sequence axes are dynamic, and padding does not change an embedding."""
    session = _onnx_session(zoo / "repository" / "minilm" / "1" / "model.onnx")
    tokenizer = embed.load_tokenizer()
    sentences = validation_sentences[:5]
    together = session.run(["embedding"], embed.tokenize(tokenizer, sentences))[0]
    assert together.shape == (5, 384)
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)
    for index, sentence in enumerate(sentences):
        alone = session.run(["embedding"], embed.tokenize(tokenizer, [sentence]))[0]
        np.testing.assert_allclose(alone[0], together[index], atol=1e-5)


def test_torchscript_matches_onnx(
    zoo: Path, embed: ModuleType, validation_sentences: list[str]
) -> None:
    import torch

    folder = zoo / "repository" / "minilm" / "1"
    batch = embed.tokenize(embed.load_tokenizer(), validation_sentences[10:17])
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
    assert set(TOKENIZER_FILES) <= names
    assert manifest.reference == "reference.npz" and "reference.npz" in names
    assert manifest.metrics["cosine_mean"] >= 0.98
    for item in manifest.files:
        assert (loaded.path / item.stored_as).is_file()
        assert item.stored_as.endswith(".zst")


def test_tampered_manifest_is_refused(zoo: Path, trusted: TrustedKeys, tmp_path: Path) -> None:
    copy = tmp_path / "onnx-int8"
    shutil.copytree(_variant_dir(zoo, "onnx-int8"), copy)
    signed = (copy / MANIFEST_FILE).read_bytes()
    (copy / MANIFEST_FILE).write_bytes(signed.replace(b'"precision":"int8"', b'"precision":"fp32"'))
    with pytest.raises(SignatureError):
        load_variant(copy, trusted)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_shipped_tokenizer_reproduces_reference_inputs(
    unpacked: Path, variant: str, validation_sentences: list[str]
) -> None:
    folder = unpacked / variant
    inputs, _ = split_reference(load_npz(folder / "reference.npz"))
    assert set(inputs) == {"input_ids", "attention_mask"}
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    count = ids.shape[0]
    assert count >= 2
    # The reference batch is padded: a runtime that ignored the mask would fail the check.
    assert (mask == 0).any()
    tokenizer = _shipped_tokenizer(folder)
    for row, sentence in enumerate(validation_sentences[:count]):
        assert ids[row][mask[row] == 1].tolist() == tokenizer.encode(sentence).ids
    # Without `tokenizers`, a device can still read the WordPiece vocabulary and the limits.
    vocabulary = (folder / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert len(vocabulary) == 30522 and vocabulary[0] == "[PAD]"
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == 256 and config["do_lower_case"]


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
def subset(validation_sentences: list[str]) -> list[str]:
    sentences = validation_sentences[::SUBSET_STEP]
    assert len(sentences) >= 60
    return sentences


@pytest.fixture(scope="module")
def fp32_subset(
    zoo: Path, embed: ModuleType, subset: list[str]
) -> tuple[list[dict[str, Array]], Array]:
    """The subset in batches of 16 (the package's own tokenizer) and its FP32 embeddings
    from the cloud repository's model.onnx."""
    tokenizer = embed.load_tokenizer()
    feeds = [embed.tokenize(tokenizer, subset[i : i + 16]) for i in range(0, len(subset), 16)]
    fp32 = _onnx_embedder(zoo / "repository" / "minilm" / "1" / "model.onnx")
    return feeds, np.concatenate([fp32(feed) for feed in feeds])


def test_cosine_recomputed_from_the_artifacts(
    unpacked: Path,
    entry: dict[str, Any],
    subset: list[str],
    fp32_subset: tuple[list[dict[str, Array]], Array],
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
            # The shipped tokenizer tokenizes exactly as the package's does.
            np.testing.assert_array_equal(feed["input_ids"], expected["input_ids"])
            parts.append(int8(feed))
        cosines = _cosines(np.concatenate(parts), fp32)
        assert cosines.mean() >= 0.98, (variant, cosines.mean())
        # The subset agrees with the figure the report quotes for the whole set.
        assert cosines.mean() == pytest.approx(entry["variants"][variant]["cosine_mean"], abs=0.01)


def test_gate_refuses_a_per_tensor_quantization(
    zoo: Path,
    tmp_path: Path,
    spec: ModelSpec,
    fp32_subset: tuple[list[dict[str, Array]], Array],
) -> None:
    """The gate can fail: per-tensor weight scales lose too much (mean cosine ~0.966)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    coarse = tmp_path / "per-tensor.onnx"
    quantize_dynamic(
        str(zoo / "repository" / "minilm" / "1" / "model.onnx"),
        str(coarse),
        per_channel=False,
        weight_type=QuantType.QInt8,
    )
    feeds, fp32 = fp32_subset
    int8 = np.concatenate([_onnx_embedder(coarse)(f) for f in feeds])
    assert spec.checks["min_cosine"] == 0.98
    metrics, misses = check_variant(spec, fp32, int8, None)
    assert metrics["cosine_mean"] < 0.98
    assert len(misses) == 1 and "< 0.98" in misses[0]
    assert check_variant(spec, fp32, fp32, None)[1] == []


def test_model_loads_with_the_network_switched_off(
    monkeypatch: pytest.MonkeyPatch,
    embed: ModuleType,
    fp32_subset: tuple[list[dict[str, Array]], Array],
) -> None:
    """The weights come from the package folder: no socket is needed to load them."""
    import socket

    import torch

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network access attempted while loading minilm")

    for name in ("socket", "create_connection", "getaddrinfo"):
        monkeypatch.setattr(socket, name, refuse)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)  # make_model must switch them on itself
    model = embed.make_model()
    feeds, fp32 = fp32_subset
    with torch.inference_mode():
        embedded = model(*(torch.from_numpy(feeds[0][k]) for k in ("input_ids", "attention_mask")))
    np.testing.assert_allclose(embedded.numpy(), fp32[: len(embedded)], atol=1e-4)


def test_unchanged_rebuild_comes_from_the_cache(zoo: Path) -> None:
    from tandem.cloud.build.pipeline import build_zoo

    result = build_zoo(zoo, models=("minilm",))
    assert result["run"]["cached"] == ["minilm"] and result["run"]["built"] == []
    assert result["run"]["seconds"] < 30
