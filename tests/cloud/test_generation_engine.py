"""The generation engine in-process on a tiny random Llama (no weights to load): batched
decode over different-length sequences equals decoding each alone, verify sessions expire,
limits refuse, seeded sampling repeats."""

from __future__ import annotations

import asyncio
import time

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tandem.cloud.generation.engine import (  # noqa: E402
    Done,
    Engine,
    EngineLimits,
    SamplingParams,
)
from tandem.cloud.server.errors import (  # noqa: E402
    InvalidInputError,
    ModelNotFoundError,
    QueueFullError,
)

VOCAB = 97


@pytest.fixture(scope="module")
def tiny() -> object:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return transformers.LlamaForCausalLM(config).eval()


def _alone(model: object, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))  # type: ignore[operator]
    return ids[len(prompt) :]


async def _collect(engine: Engine, prompt: list[int], params: SamplingParams) -> list[int]:
    seq = engine.submit(prompt, params)
    return [t async for t in engine.stream(seq) if not isinstance(t, Done)]


def test_batched_decode_equals_each_sequence_alone(tiny: object) -> None:
    engine = Engine(tiny, VOCAB, EngineLimits())
    prompts = [[5, 6, 7], [9] * 11, [1, 2, 3, 4, 5, 6, 7], [40]]
    params = SamplingParams(max_tokens=6)

    async def run() -> list[list[int]]:
        return list(await asyncio.gather(*(_collect(engine, p, params) for p in prompts)))

    try:
        got = asyncio.run(run())
        assert got == [_alone(tiny, p, 6) for p in prompts]
        assert engine.step_rows > engine.steps  # rows shared steps: they were batched
    finally:
        engine.close()


def test_seeded_sampling_repeats_and_limits_refuse(tiny: object) -> None:
    engine = Engine(tiny, VOCAB, EngineLimits(max_sequences=2, max_total_tokens=40))
    params = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    try:
        first = asyncio.run(_collect(engine, [3, 4], params))
        assert asyncio.run(_collect(engine, [3, 4], params)) == first
        with pytest.raises(QueueFullError, match="max_total_tokens"):
            asyncio.run(_collect(engine, [1] * 10, SamplingParams(max_tokens=31)))
        with pytest.raises(InvalidInputError, match="vocabulary"):
            asyncio.run(_collect(engine, [VOCAB], SamplingParams(max_tokens=1)))
        engine.verify("a", [], start=True, prompt=[1, 2])
        engine.verify("b", [], start=True, prompt=[1, 2])
        with pytest.raises(QueueFullError, match="max_sequences"):
            engine.verify("c", [], start=True, prompt=[1, 2])
    finally:
        engine.close()


def test_verify_sessions_expire_after_the_idle_timeout(tiny: object) -> None:
    engine = Engine(tiny, VOCAB, EngineLimits(idle_timeout_s=0.2))
    try:
        first = engine.verify("s", [], start=True, prompt=[7, 8, 9])
        assert first.next_token == _alone(tiny, [7, 8, 9], 1)[0]
        time.sleep(0.3)
        with pytest.raises(ModelNotFoundError, match="expired"):
            engine.verify("s", [first.next_token])
        assert engine.stats()["verify_sessions"] == 0
    finally:
        engine.close()
