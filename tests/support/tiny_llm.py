"""A tiny random Llama and its word-level tokenizer, for generation tests that must not load
SmolLM2: the device build (tests/model_build/test_generative.py), the SDK's generation
policies against a real `tandem serve` (tests/sdk/test_generate*.py).

Words are `w2`..`w63`; id 1 is EOS. `save_folder` writes it as a transformers folder
(config, safetensors, tokenizer.json with a chat template) that a repository's
generation.json names with `"model": "<folder>"`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

VOCAB = 64
EOS = 1
# Roles become words, so a rendered chat stays inside the vocabulary.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}w60 {% elif m['role'] == 'user' %}w61 {% else %}w62 {% endif %}"
    "{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}w62 {% endif %}"
)


def tiny_model(seed: int = 0) -> Any:
    """A 2-layer LlamaForCausalLM with peaked random logits (eval mode, FP32)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        initializer_range=0.3,  # peaked logits: greedy picks that random init leaves clear
        rope_theta=10000.0,
        bos_token_id=None,
        eos_token_id=EOS,
        pad_token_id=0,
    )
    return transformers.LlamaForCausalLM(config).eval()


def tiny_tokenizer_json() -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<eos>": EOS, **{f"w{i}": i for i in range(2, VOCAB)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return str(tokenizer.to_str())


def tiny_source(model: Any) -> Any:
    """The generative build's `Source` over `model` (imported here: tandem.cloud needs torch)."""
    from tandem.cloud.build.generative import Source

    return Source(
        name="tiny random Llama",
        digest="tiny-0",
        load_model=lambda: model,
        tokenizer_json=tiny_tokenizer_json(),
        bos_token_id=None,
        eos_token_ids=(EOS,),
        max_context=128,
        chat_template=CHAT_TEMPLATE,  # the one save_folder gives the server's tokenizer
        special_tokens={"eos_token": "<eos>"},
    )


def save_folder(model: Any, folder: Path) -> Path:
    """`model` (from tiny_model) and the tokenizer as a transformers folder, loadable offline
    by AutoModelForCausalLM / AutoTokenizer.from_pretrained(folder)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tiny_tokenizer_json()),
        unk_token="<unk>",
        eos_token="<eos>",
        pad_token="<unk>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(folder))
    return folder


def repository_entry(repository: Path, name: str, folder: Path, **limits: Any) -> Path:
    """`repository/<name>/generation.json` serving the tiny model saved in `folder`."""
    (repository / name).mkdir(parents=True, exist_ok=True)
    path = repository / name / "generation.json"
    path.write_text(json.dumps({"name": name, "model": str(folder), **limits}) + "\n")
    return path
