"""`LocalGenerator`: greedy decoding with a KV cache over the decoder graph of
`tandem.cloud.build.generative_export` (input_ids + past_key/value.<i> -> logits + present).

State: `tokens` is the committed context (prompt + generated). The cache holds the keys and
values of `tokens[:cached]`, and `cached < len(tokens)` always holds once a prompt is set,
so the next step feeds `tokens[cached:]` (one token while decoding, the whole prompt at
first, a few after a rollback) and reads the next token's logits from the last position.
Keys and values at position p depend only on tokens 0..p, so rolling back is slicing.

The decoder runs in ONNX Runtime (`model.onnx`, the default) or, for a variant whose runtime is
"openvino", as an OpenVINO IR (`model.xml` + `model.bin`, the same input and output names)
through one compiled model's infer request (`OpenVINODecoder`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tandem.errors import InputError, MissingDependencyError, SDKError
from tandem.sdk.artifacts import TrustedKeys, Variant, load_variant, unpack_variant

log = logging.getLogger(__name__)

GENERATION_FILE = "generation.json"  # layers, kv shape, eos ids, max context
TOKENIZER_FILE = "tokenizer.json"
Array = np.ndarray[Any, Any]


@dataclass(frozen=True)
class GeneratedToken:
    id: int
    text: str  # the text this token adds to the decoded output (may be "" mid-character)
    confidence: float  # max softmax probability of the distribution it was picked from


def _softmax_max(logits: Array) -> float:
    values = logits.astype(np.float64)
    values = values - values.max()
    weights = np.exp(values)
    return float(weights.max() / weights.sum())


class OpenVINODecoder:
    """An OpenVINO IR decoder behind ONNX Runtime's `run(output_names, feed)`: one compiled
    model (CPU, FP32 activations: no silent bf16) and its infer request, outputs copied out
    so that the next call cannot overwrite the cache they hold."""

    def __init__(self, model_path: Path, threads: int = 2) -> None:
        from tandem.sdk.runtimes import openvino as ov_runtime

        try:
            ov = ov_runtime.import_openvino()
        except ImportError as exc:
            raise MissingDependencyError("openvino", "openvino", "OpenVINO generation") from exc
        self._compiled = ov_runtime.compile_model(ov, model_path, threads=threads)
        self._request = self._compiled.create_infer_request()
        self._ports = {port.get_any_name(): port for port in self._compiled.outputs}

    def run(self, output_names: Sequence[str] | None, feed: dict[str, Array]) -> list[Array]:
        results = self._request.infer(feed)
        names = list(self._ports) if output_names is None else list(output_names)
        return [np.array(results[self._ports[name]], copy=True) for name in names]


def decoder_session(model_path: Path, runtime: str = "onnx", *, threads: int = 2) -> Any:
    """An object with ONNX Runtime's `run(output_names, feed)` over the decoder at
    `model_path`: an ONNX Runtime session, or for runtime "openvino" an `OpenVINODecoder`."""
    if runtime == "openvino":
        return OpenVINODecoder(model_path, threads)
    if runtime != "onnx":
        raise InputError(f"no local generation backend for runtime {runtime!r}")
    from tandem.sdk.runtimes.onnx import cpu_session

    return cpu_session(model_path, threads)


class LocalGenerator:
    """Greedy decoder over one decoder graph with a KV cache (batch 1); `runtime` "onnx"
    (ONNX Runtime, the default) or "openvino" (an IR with the same names); None: "openvino"
    for a `.xml` model file, else "onnx" (so callers that pass only the variant's entrypoint
    get the right backend)."""

    def __init__(
        self,
        model_path: Path,
        tokenizer_path: Path,
        config: dict[str, Any],
        *,
        threads: int = 2,
        runtime: str | None = None,
    ) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise MissingDependencyError(
                exc.name or "tokenizers", "generation", "local text generation"
            ) from exc
        self.layers = int(config["layers"])
        if runtime is None:
            runtime = "openvino" if Path(model_path).suffix == ".xml" else "onnx"
        self._session = decoder_session(model_path, runtime, threads=threads)
        self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
        self.kv_heads = int(config["kv_heads"])
        self.head_dim = int(config["head_dim"])
        self.eos_ids = frozenset(int(i) for i in config.get("eos_token_ids") or ())
        self.max_context = int(config.get("max_context") or 2048)
        self.bos_id = config.get("bos_token_id")
        self._names = [f"past_{k}.{i}" for i in range(self.layers) for k in ("key", "value")]
        self._outputs = ["logits", *(n.replace("past_", "present_", 1) for n in self._names)]
        self.tokens: list[int] = []
        self.confidences: list[float] = []  # per generated token, in order
        self._cache: list[Array] = []
        self._cached = 0
        self._draft_start: int | None = None

    @classmethod
    def from_variant(
        cls, variant_dir: Path, trusted: TrustedKeys | None = None, *, threads: int = 2
    ) -> LocalGenerator:
        """Loads a generative variant folder; with `trusted`, checks its signature first."""
        variant: Variant = load_variant(Path(variant_dir), trusted)
        if variant.manifest.task != "generation":
            raise InputError(f"{variant_dir}: task {variant.manifest.task!r} is not generation")
        folder = unpack_variant(variant, verify=trusted is not None)
        config = json.loads((folder / GENERATION_FILE).read_text(encoding="utf-8"))
        return cls(
            folder / variant.manifest.entrypoint,
            folder / TOKENIZER_FILE,
            config,
            threads=threads,
            runtime=variant.manifest.runtime,
        )

    # --- text ---------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        ids = list(self.tokenizer.encode(text, add_special_tokens=False).ids)
        if self.bos_id is not None and (not ids or ids[0] != int(self.bos_id)):
            ids.insert(0, int(self.bos_id))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    # --- state --------------------------------------------------------------------------

    def start(self, prompt: str | Sequence[int]) -> None:
        """Sets a new context (text or token ids) and drops the cache."""
        ids = self.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not ids:
            raise InputError("the prompt has no tokens")
        if len(ids) >= self.max_context:
            raise InputError(f"prompt of {len(ids)} tokens; the model takes {self.max_context}")
        self.tokens = ids
        self.confidences = []
        self._cache = [np.zeros((1, self.kv_heads, 0, self.head_dim), np.float32)] * (
            2 * self.layers
        )
        self._cached = 0
        self._draft_start = None

    def _next_logits(self) -> Array:
        if not self.tokens:
            raise SDKError("no context: call start(prompt) first")
        if len(self.tokens) >= self.max_context:
            raise InputError(f"the context is full ({self.max_context} tokens)")
        fresh = np.asarray([self.tokens[self._cached :]], dtype=np.int64)
        feed = {"input_ids": fresh, **dict(zip(self._names, self._cache, strict=True))}
        outputs = self._session.run(self._outputs, feed)
        self._cache = list(outputs[1:])
        self._cached = len(self.tokens)
        return np.asarray(outputs[0][0, -1])

    def step(self) -> tuple[int, float]:
        """Picks the next token greedily and appends it; returns it and its confidence."""
        logits = self._next_logits()
        token = int(logits.argmax())
        confidence = _softmax_max(logits)
        self.tokens.append(token)
        self.confidences.append(confidence)
        return token, confidence

    def generate(self, prompt: str | Sequence[int], max_tokens: int) -> Iterator[GeneratedToken]:
        """Streams up to `max_tokens` greedy tokens after `prompt`, stopping at an EOS token."""
        self.start(prompt)
        generated: list[int] = []
        shown = ""
        for _ in range(max_tokens):
            token, confidence = self.step()
            if token in self.eos_ids:
                return
            generated.append(token)
            text = self.decode(generated)
            # A multi-byte character spread over tokens shows once it is whole.
            piece = text[len(shown) :] if text.startswith(shown) else ""
            if "\ufffd" in piece:
                piece = ""
            else:
                shown = text
            yield GeneratedToken(token, piece, confidence)

    # --- speculative decoding ------------------------------------------------------------

    def draft(self, k: int) -> list[int]:
        """Proposes `k` tokens from the current state (appended to `tokens` until `accept`).

        Their confidences are the last `k` of `confidences`. Drafting stops early after an
        EOS token.
        """
        if k < 1:
            raise InputError(f"draft length must be >= 1, got {k}")
        self._draft_start = len(self.tokens)
        drafted: list[int] = []
        for _ in range(k):
            token, _confidence = self.step()
            drafted.append(token)
            if token in self.eos_ids:
                break
        return drafted

    def accept(self, n_accepted: int, correction_token: int | None = None) -> None:
        """Keeps the first `n_accepted` drafted tokens, then `correction_token` if given
        (the verifier's token at the first rejected position, or its bonus token), and rolls
        the cache back to the kept prefix."""
        if self._draft_start is None:
            raise SDKError("accept() without a draft() before it")
        drafted = len(self.tokens) - self._draft_start
        if not 0 <= n_accepted <= drafted:
            raise InputError(f"n_accepted {n_accepted} is outside 0..{drafted}")
        keep = self._draft_start + n_accepted
        del self.tokens[keep:]
        del self.confidences[len(self.confidences) - (drafted - n_accepted) :]
        if correction_token is not None:
            self.tokens.append(int(correction_token))
            self.confidences.append(float("nan"))  # chosen by the verifier, not by us
        # Keys and values of the kept tokens stay valid; the cache must leave at least the
        # last token to feed.
        self._cached = min(self._cached, len(self.tokens) - 1)
        self._cache = [layer[:, :, : self._cached] for layer in self._cache]
        self._draft_start = None
