"""Client.generate / agenerate under every generation policy, against a REAL `tandem serve`
serving the tiny random Llama (tests/support/tiny_llm.py) and a tiny signed INT8 device
variant of the same weights built by build_generative.

The INT8 variant disagrees with the FP32 server now and then: speculative decoding sees
rejections as well as acceptances, and its greedy output must still equal cloud_only's.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")

from tandem.cloud.build.context import BuildContext
from tandem.cloud.build.generative import build_generative
from tandem.cloud.build.signing import Signer, generate_keypair
from tandem.errors import CloudError, ConfigError, InputError
from tandem.sdk import Client
from tandem.sdk.generation import LocalGenerator
from tandem.sdk.generation.api import prompt_ids
from tests.cloud.conftest import ServerProcess, http_post, start_server
from tests.support.proxy import FaultProxy
from tests.support.tiny_llm import (
    repository_entry,
    save_folder,
    tiny_model,
    tiny_source,
)

MODEL = "tiny"
MAX_NEW = 48


def _prompt(rng: random.Random) -> str:
    return " ".join(f"w{rng.randrange(2, 60)}" for _ in range(rng.randrange(1, 6)))


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """artifacts/tiny/1/onnx-int8 (signed) and repository/tiny serving the same weights."""
    root = tmp_path_factory.mktemp("gen-sdk")
    model = tiny_model()
    save_folder(model, root / "weights")
    repository_entry(
        root / "repository",
        MODEL,
        Path("../../weights"),
        max_new_tokens=MAX_NEW,
        max_prompt_tokens=24,
        max_total_tokens=4000,
        max_sequences=8,
    )
    key, _pub = generate_keypair(root / "keys")
    work = root / "work"
    work.mkdir()
    ctx = BuildContext(
        out_dir=root,
        model=MODEL,
        signer=Signer.from_file(key),
        work_dir=work,
        cache_dir=root / ".cache",
        options={"steps": 8, "timed_prompts": 1, "min_agreement": 0.5},
    )
    source = tiny_source(model)
    build_generative(ctx, source, ("w5 w9 w3", "w10 w11", "w40 w2 w7 w7"))
    return root


@pytest.fixture(scope="module")
def server(zoo: Path) -> Iterator[ServerProcess]:
    proc = start_server(zoo / "repository", zoo / "logs")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(zoo: Path, server: ServerProcess) -> Iterator[Client]:
    with Client(MODEL, artifacts=zoo / "artifacts", cloud=server.grpc_address) as c:
        yield c


def _variant(zoo: Path) -> LocalGenerator:
    return LocalGenerator.from_variant(zoo / "artifacts" / MODEL / "1" / "onnx-int8")


def test_speculative_equals_cloud_only_on_100_prompts(client: Client) -> None:
    rng = random.Random(7)
    drafted = accepted = 0
    rejected_rounds = 0
    before = client.stats()["generation"]
    mark_ms = int(time.time() * 1000)
    client.telemetry.flush()  # the summaries from here on cover this loop only
    for i in range(100):
        prompt = _prompt(rng)
        cloud = client.generate(prompt, max_tokens=10, stream=False, policy="cloud_only")
        spec = client.generate(prompt, max_tokens=10, stream=False, policy="speculative")
        assert spec.token_ids == cloud.token_ids, (i, prompt)
        assert spec.text == cloud.text and spec.stop_reason == cloud.stop_reason
        assert cloud.tokens_by_source == {"local": 0, "cloud": len(cloud.token_ids)}
        assert spec.round_trips >= 1 and spec.bytes_sent > 0 and spec.bytes_received > 0
        assert spec.accepted <= spec.drafted
        drafted += spec.drafted
        accepted += spec.accepted
        rejected_rounds += spec.accepted < spec.drafted
    assert 0 < accepted < drafted  # the INT8 drafts were accepted and rejected
    assert rejected_rounds > 0
    after = client.stats()["generation"]  # the client's own counters saw every generation
    assert after["generations"] - before["generations"] == 200
    assert after["drafted"] - before["drafted"] == drafted
    assert after["accepted"] - before["accepted"] == accepted
    assert 0 < after["acceptance_rate"] < 1 and after["tokens_per_s"] > 0
    # ... and so did the telemetry summaries the agent forwards to the fleet (issue 14)
    client.telemetry.flush()
    sent = [x for x in client.telemetry.summaries if x.interval_start_ms >= mark_ms]
    assert sum(x.generations for x in sent) == 200
    assert sum(x.generation_errors for x in sent) == 0
    assert sum(x.drafted for x in sent) == drafted
    assert sum(x.accepted for x in sent) == accepted
    assert sum(x.generated_tokens for x in sent) == (
        after["tokens_local"]
        + after["tokens_cloud"]
        - before["tokens_local"]
        - before["tokens_cloud"]
    )
    seconds = sum(x.generation_seconds for x in sent)
    assert seconds == pytest.approx(after["seconds"] - before["seconds"])
    assert sum(x.ttft_ms.count for x in sent) == 200


def test_local_only_streams_the_device_greedy(client: Client, zoo: Path) -> None:
    stream = client.generate("w5 w9 w3", max_tokens=12, policy="local_only")
    tokens = list(stream)  # type: ignore[arg-type]
    result = stream.result  # type: ignore[union-attr]
    assert result is not None and result.policy == "local_only"
    expected = [t.id for t in _variant(zoo).generate("w5 w9 w3", 12)]
    assert [t.id for t in tokens] == expected == result.token_ids
    assert {t.source for t in tokens} == {"local"}
    assert result.tokens_by_source == {"local": len(expected), "cloud": 0}
    assert "".join(t.text for t in tokens).split() == result.text.split()
    assert result.ttft_ms is not None and result.tokens_per_s > 0
    assert result.stop_reason == ("length" if len(expected) == 12 else "stop")


def test_a_stream_closed_early_is_abandoned_not_an_error(client: Client) -> None:
    before = client.stats()["generation"]
    mark_ms = int(time.time() * 1000)
    client.telemetry.flush()
    stream = client.generate("w5 w9 w3", max_tokens=12, policy="local_only")
    next(iter(stream))  # type: ignore[call-overload]
    stream.close()  # type: ignore[union-attr]
    after = client.stats()["generation"]
    assert after["abandoned"] - before["abandoned"] == 1
    assert after["errors"] == before["errors"]
    assert after["generations"] - before["generations"] == 1
    client.telemetry.flush()
    sent = [x for x in client.telemetry.summaries if x.interval_start_ms >= mark_ms]
    assert sum(x.generation_errors for x in sent) == 0  # rollout gates see no failure
    assert sum(x.generations for x in sent) == 0


def test_prefer_local_uses_the_device_and_cloud_only_the_server(client: Client) -> None:
    local = client.generate("w10 w11", max_tokens=8, stream=False, policy="prefer_local")
    assert local.tokens_by_source["cloud"] == 0 and local.tokens_by_source["local"] > 0
    cloud = client.generate("w10 w11", max_tokens=8, stream=False, policy="cloud_only")
    assert cloud.tokens_by_source["local"] == 0 and cloud.tokens_by_source["cloud"] > 0


def test_cascade_escalates_on_low_confidence(client: Client, zoo: Path) -> None:
    gen = _variant(zoo)
    # Threshold 1.0: no window is that confident, so the cloud takes over after 3 tokens
    # and continues the same sequence.
    result = client.generate(
        "w40 w2 w7 w7",
        max_tokens=10,
        stream=False,
        policy="cascade",
        cascade_threshold=1.0,
        cascade_window=3,
    )
    head = result.token_ids[:3]
    assert head == [t.id for t in gen.generate("w40 w2 w7 w7", 3)]
    assert result.tokens_by_source["local"] == 3 and result.escalated
    rest = client.generate(
        "w40 w2 w7 w7 " + gen.decode(head), max_tokens=7, stream=False, policy="cloud_only"
    )
    assert result.token_ids[3:] == rest.token_ids
    assert result.tokens_by_source["cloud"] == len(rest.token_ids)
    # Threshold 0: never escalates.
    calm = client.generate(
        "w40 w2 w7 w7", max_tokens=10, stream=False, policy="cascade", cascade_threshold=0.0
    )
    assert calm.tokens_by_source["cloud"] == 0 and not calm.escalated


def test_prefer_cloud_falls_back_mid_stream(zoo: Path, server: ServerProcess) -> None:
    proxy = FaultProxy(server.grpc_port)
    try:
        with Client(MODEL, artifacts=zoo / "artifacts", cloud=proxy.address) as c:
            rng = random.Random(3)
            prompt = next(  # a prompt the server answers at full length (no early EOS)
                p
                for p in (_prompt(rng) for _ in range(200))
                if len(c.generate(p, MAX_NEW, stream=False, policy="cloud_only").token_ids)
                == MAX_NEW
            )
            full = c.generate(prompt, MAX_NEW, stream=False, policy="cloud_only")
            stream = c.generate(prompt, MAX_NEW, policy="prefer_cloud")
            tokens = [next(stream)]  # type: ignore[call-overload]
            proxy.set_mode("drop")  # the connection goes: mid-stream
            tokens += list(stream)  # type: ignore[arg-type]
            result = stream.result  # type: ignore[union-attr]
            assert result is not None and result.escalated
            n_cloud = result.tokens_by_source["cloud"]
            assert 1 <= n_cloud < MAX_NEW and result.tokens_by_source["local"] > 0
            assert result.token_ids[:n_cloud] == full.token_ids[:n_cloud]
            # the device continued from the tokens already produced
            gen = _variant(zoo)
            gen.start([*gen.encode(prompt), *result.token_ids[:n_cloud]])
            following = []
            for _ in range(len(result.token_ids) - n_cloud):
                following.append(gen.step()[0])
            assert result.token_ids[n_cloud:] == following
            assert [t.source for t in tokens][n_cloud:] == ["local"] * (len(tokens) - n_cloud)
    finally:
        proxy.close()


def test_bad_input_is_refused_clearly(client: Client, zoo: Path) -> None:
    with pytest.raises(InputError, match="non-empty"):
        client.generate("", max_tokens=4)
    with pytest.raises(InputError, match="max_tokens"):
        client.generate("w5", max_tokens=0)
    with pytest.raises(InputError, match="max_tokens"):
        client.generate("w5", max_tokens=-3, stream=False)
    with pytest.raises(InputError, match="prompt of 200 tokens"):
        client.generate(" ".join(["w5"] * 200), max_tokens=4)
    with pytest.raises(InputError, match=r"messages\[0\]"):
        client.generate([{"role": "robot", "content": "w5"}], max_tokens=4)
    with pytest.raises(InputError, match="messages must be"):
        client.generate([], max_tokens=4)
    gen = _variant(zoo)  # a variant whose generation.json has no chat template:
    with pytest.raises(InputError, match="chat template"):
        prompt_ids([{"role": "user", "content": "w5"}], gen, {})
    # a template that refuses the messages (raise_exception, as transformers gives it)
    refusing = {"chat_template": "{{ raise_exception('no system role here') }}"}
    with pytest.raises(InputError, match="no system role here"):
        prompt_ids([{"role": "system", "content": "w5"}], gen, refusing)
    with pytest.raises(ConfigError, match="unknown generation policy"):
        client.generate("w5", max_tokens=4, policy="sometimes")
    # A prompt the server refuses (past its max_prompt_tokens): one clear cloud error.
    with pytest.raises(CloudError, match="prompt"):
        client.generate(" ".join(["w5"] * 60), max_tokens=4, stream=False, policy="cloud_only")
    # The client still serves.
    assert client.generate("w5", max_tokens=3, stream=False, policy="cloud_only").token_ids
    with Client(MODEL, artifacts=zoo / "artifacts") as local:
        for policy in ("cloud_only", "prefer_cloud", "speculative"):
            with pytest.raises(ConfigError, match="needs a cloud endpoint"):
                local.generate("w5", max_tokens=3, policy=policy)


def test_agenerate_matches_generate(client: Client) -> None:
    async def both(policy: str, prompt: str) -> tuple[list[int], list[int], Any]:
        stream = await client.agenerate(prompt, max_tokens=8, policy=policy)
        streamed = [t.id async for t in stream]  # type: ignore[union-attr]
        whole = await client.agenerate(prompt, max_tokens=8, stream=False, policy=policy)
        return streamed, whole.token_ids, whole  # type: ignore[union-attr]

    for policy in ("local_only", "cloud_only", "speculative", "prefer_cloud"):
        for prompt in ("w5 w9 w3", "w33", "w12 w13 w14"):
            streamed, whole, result = asyncio.run(both(policy, prompt))
            sync = client.generate(prompt, max_tokens=8, stream=False, policy=policy)
            assert streamed == whole == sync.token_ids, (policy, prompt)  # type: ignore[union-attr]
            assert result.tokens_by_source == sync.tokens_by_source  # type: ignore[union-attr]


def test_generation_threads_is_a_client_setting(zoo: Path) -> None:
    def threads(c: Client) -> set[int]:
        pool = c._generator_pool()
        assert pool is not None
        first, second = pool.take(), pool.take()  # the pool's own and a new one
        try:  # the ONNX Runtime sessions they decode with
            return {
                int(g._session.get_session_options().intra_op_num_threads) for g in (first, second)
            }
        finally:
            pool.give(first)
            pool.give(second)

    with Client(MODEL, artifacts=zoo / "artifacts", generation_threads=1) as one:
        assert threads(one) == {1}
        assert one.generate("w5 w9", max_tokens=4, stream=False, policy="local_only").token_ids
    with Client(MODEL, artifacts=zoo / "artifacts") as default:
        assert threads(default) == {2}  # unchanged default
    for bad in (0, -1, 1.5, "2", True):
        with pytest.raises(ConfigError, match="generation_threads"):
            Client(MODEL, artifacts=zoo / "artifacts", generation_threads=bad)  # type: ignore[arg-type]


def test_a_generative_variant_is_not_loaded_as_a_tensor_model(
    zoo: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.DEBUG, logger="tandem"),
        Client(MODEL, artifacts=zoo / "artifacts") as c,
    ):
        assert c.current is None  # nothing for infer: the store holds a generative variant
        result = c.generate("w5 w9 w3", max_tokens=6, stream=False, policy="local_only")
    assert result.tokens_by_source == {"local": len(result.token_ids), "cloud": 0}
    assert result.token_ids == [t.id for t in _variant(zoo).generate("w5 w9 w3", 6)]
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warned == []  # no "variant onnx-int8 rejected", no "cannot load"
    assert "no tensor variant (only generative ones)" in caplog.text


def test_chat_messages_render_as_the_server_renders_them(
    client: Client, zoo: Path, server: ServerProcess
) -> None:
    from transformers import AutoTokenizer

    messages = [
        {"role": "system", "content": "w3 w4"},
        {"role": "user", "content": "w5 w9"},
        {"role": "assistant", "content": "w20"},
        {"role": "user", "content": "w7"},
    ]
    # the server's rendering: transformers' apply_chat_template over the served folder
    served = AutoTokenizer.from_pretrained(str(zoo / "weights"))
    rendered = served.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    server_ids = list(served(rendered, add_special_tokens=False)["input_ids"])
    local = client.generate(messages, max_tokens=8, stream=False, policy="local_only")
    assert local.token_ids == [t.id for t in _variant(zoo).generate(server_ids, 8)]
    cloud = client.generate(messages, max_tokens=8, stream=False, policy="cloud_only")
    body = {"model": MODEL, "messages": messages, "max_tokens": 8, "temperature": 0}
    status, raw = http_post(server.http_url + "/v1/chat/completions", json.dumps(body).encode())
    assert status == 200, raw
    answer = json.loads(raw)
    assert answer["usage"]["prompt_tokens"] == len(server_ids)
    assert cloud.text == answer["choices"][0]["message"]["content"]
    assert cloud.token_ids  # the same messages, rendered on the device, sent as ids


def test_speculative_first_token_is_the_servers_after_one_prompt_only_verify(
    client: Client,
) -> None:
    for prompt in ("w5 w9 w3", "w10 w11", "w33"):
        cloud = client.generate(prompt, max_tokens=8, stream=False, policy="cloud_only")
        stream = client.generate(prompt, max_tokens=8, policy="speculative")
        first = next(stream)  # type: ignore[call-overload]
        state = stream._run.state  # type: ignore[union-attr]
        # one round trip, nothing drafted yet: the device prefilled beside the server's call
        assert (state.round_trips, state.drafted) == (1, 0)
        assert first.source == "cloud" and first.id == cloud.token_ids[0]
        rest = [t.id for t in stream]  # type: ignore[union-attr]
        assert [first.id, *rest] == cloud.token_ids
        assert stream.result.drafted > 0  # type: ignore[union-attr]
    one = client.generate("w5 w9 w3", max_tokens=1, stream=False, policy="speculative")
    assert one.round_trips == 1 and one.drafted == 0
    assert (
        one.token_ids == client.generate("w5 w9 w3", 1, stream=False, policy="cloud_only").token_ids
    )
