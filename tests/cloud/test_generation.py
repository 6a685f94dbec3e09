"""The generation surfaces of `tandem serve` against the real SmolLM2 model, in a real server
process: OpenAI's own client, concurrent streams, a client going away mid-stream, the verify
call of speculative decoding, and bad input. Few tokens per test: the model loads once."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.cloud.conftest import ServerFactory, ServerProcess, http_get, start_server
from tests.support.processes import wait_until

pytest.importorskip("transformers")
pytest.importorskip("openai")

MODEL = "smollm2"
PROMPT = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 30]  # a fixed token prefix
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def gen_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("gen-repo")
    (root / MODEL).mkdir()
    config = {
        "name": MODEL,
        "backend": "transformers",
        "max_sequences": 4,
        "max_prompt_tokens": 64,
        "max_new_tokens": 48,
        "max_total_tokens": 1000,
        "idle_timeout_s": 30,
    }
    (root / MODEL / "generation.json").write_text(json.dumps(config))
    server = start_server(root, tmp_path_factory.mktemp("gen-logs"), wait_ready=False)
    try:
        wait_until(
            lambda: _ready(server), timeout=240, interval=0.5, message="generative server ready"
        )
    except TimeoutError as exc:
        server.stop()
        raise RuntimeError(f"server did not start:\n{server.log()}") from exc
    yield server
    assert server.stop() == 0


def _ready(server: ServerProcess) -> bool:
    if server.proc.poll() is not None:
        raise RuntimeError(server.log())
    try:
        return http_get(f"{server.http_url}/v2/health/ready")[0] == 200
    except OSError:
        return False


def _post(server: ServerProcess, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    # a generous timeout: 2 shared cores may run a few tokens/s per sequence under load
    response = httpx.post(server.http_url + path, json=body, timeout=180)
    return response.status_code, response.json()


def _stats(server: ServerProcess) -> dict[str, int]:
    status, raw = http_get(f"{server.http_url}/v2/models/{MODEL}/generation/stats")
    assert status == 200
    return dict(json.loads(raw))


def _greedy(server: ServerProcess, ids: list[int], n: int) -> list[int]:
    status, body = _post(
        server, f"/v2/models/{MODEL}/generate", {"input_ids": ids, "max_tokens": n}
    )
    assert status == 200, body
    return list(body["token_ids"])


def test_openai_client_streams_a_chat_completion(gen_server: ServerProcess) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{gen_server.http_url}/v1", api_key="unused", timeout=180)
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=QUESTION,
            max_tokens=6,
            stream=True,  # type: ignore[arg-type]
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    assert len(chunks) >= 2 and text.strip()
    whole = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=6)  # type: ignore[arg-type]
    assert whole.choices[0].message.content == text  # greedy: the same either way
    assert whole.usage is not None and whole.usage.completion_tokens == len(chunks) - 1
    completion = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=3)
    assert completion.choices[0].text


def test_concurrent_streams_are_batched_and_each_is_right(gen_server: ServerProcess) -> None:
    prompts = [PROMPT, PROMPT[:6], PROMPT[2:]]
    alone = [_greedy(gen_server, p, 8) for p in prompts]
    before = _stats(gen_server)
    results: list[list[int]] = [[] for _ in prompts]

    def run(i: int) -> None:
        results[i] = _greedy(gen_server, prompts[i], 8)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    after = _stats(gen_server)
    assert results == alone
    steps = after["decode_steps"] - before["decode_steps"]
    rows = after["decode_rows"] - before["decode_rows"]
    assert rows > steps, f"no step ran more than one sequence ({rows} rows in {steps} steps)"


def test_client_that_disconnects_frees_its_sequence(gen_server: ServerProcess) -> None:
    before = _stats(gen_server)
    body = {"model": MODEL, "prompt": "Count: one, two,", "max_tokens": 48, "stream": True}
    with (
        httpx.Client(timeout=30) as client,
        client.stream("POST", f"{gen_server.http_url}/v1/completions", json=body) as response,
    ):
        assert response.status_code == 200
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        assert _stats(gen_server)["active_sequences"] == 1
    # The connection is gone: the sequence must be freed long before its 48 tokens are done.
    wait_until(
        lambda: _stats(gen_server)["cancelled"] == before["cancelled"] + 1,
        timeout=10,
        message="sequence cancelled",
    )
    now = _stats(gen_server)
    assert now["active_sequences"] == 0 and now["reserved_tokens"] == 0
    assert now["decode_rows"] - before["decode_rows"] < 47


def test_verify_accepts_a_correct_draft_and_stops_at_the_first_wrong_token(
    gen_server: ServerProcess,
) -> None:
    greedy = _greedy(gen_server, PROMPT, 10)
    path = f"/v2/models/{MODEL}/verify"
    sid = "verify-1"
    status, r = _post(
        gen_server,
        path,
        {"sequence_id": sid, "sequence_start": True, "prompt_ids": PROMPT, "draft_ids": greedy[:4]},
    )
    assert status == 200, r
    assert (r["accepted"], r["next_token"]) == (4, greedy[4])
    wrong = (greedy[6] + 1) % 49152
    status, r = _post(gen_server, path, {"sequence_id": sid, "draft_ids": [greedy[5], wrong]})
    assert (r["accepted"], r["next_token"]) == (1, greedy[6])
    # the cache was cut back to the accepted prefix: the next call continues from greedy[6]
    status, r = _post(gen_server, path, {"sequence_id": sid, "draft_ids": [greedy[7]]})
    assert (r["accepted"], r["next_token"], r["length"]) == (1, greedy[8], len(PROMPT) + 8)
    status, r = _post(gen_server, path, {"sequence_id": sid, "draft_ids": [], "sequence_end": True})
    assert (status, r["next_token"]) == (200, greedy[9])
    status, r = _post(gen_server, path, {"sequence_id": sid, "draft_ids": [1]})
    assert status == 404 and "unknown sequence id" in r["error"]


def test_bad_input_gets_clear_errors_and_the_server_keeps_serving(
    gen_server: ServerProcess,
) -> None:
    import openai

    verify = f"/v2/models/{MODEL}/verify"
    status, r = _post(gen_server, verify, {"sequence_id": "nope", "draft_ids": [5]})
    assert status == 404 and "nope" in r["error"]
    start = {"sequence_id": "oov", "sequence_start": True, "prompt_ids": PROMPT}
    status, r = _post(gen_server, verify, {**start, "draft_ids": [49152]})
    assert status == 400 and "outside the vocabulary" in r["error"]
    status, r = _post(gen_server, verify, {**start, "draft_ids": [-1]})
    assert status == 400
    status, r = _post(gen_server, f"/v2/models/{MODEL}/generate", {"input_ids": [7] * 65})
    assert status == 400 and "max_prompt_tokens" in r["error"]
    status, r = _post(
        gen_server, f"/v2/models/{MODEL}/generate", {"input_ids": [7], "max_tokens": 999}
    )
    assert status == 400 and "max_tokens" in r["error"]
    client = openai.OpenAI(
        base_url=f"{gen_server.http_url}/v1", api_key="unused", max_retries=0, timeout=180
    )
    with pytest.raises(openai.BadRequestError, match="role"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "wizard", "content": "x"}])  # type: ignore[list-item]
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model=MODEL, messages="hello")  # type: ignore[arg-type]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=QUESTION)  # type: ignore[arg-type]
    status, r = _post(
        gen_server, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user"}]}
    )
    assert status == 400 and "content" in r["error"]["message"]
    # past max_sequences (4): RESOURCE_EXHAUSTED as 429, and the sessions free their slots
    for i in range(4):
        s, _ = _post(gen_server, verify, {**start, "sequence_id": f"hold-{i}", "draft_ids": []})
        assert s == 200
    status, r = _post(gen_server, f"/v2/models/{MODEL}/generate", {"input_ids": PROMPT})
    assert status == 429 and "max_sequences" in r["error"]
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2)  # type: ignore[arg-type]
    for i in range(4):
        s, _ = _post(gen_server, verify, {"sequence_id": f"hold-{i}", "sequence_end": True})
        assert s == 200
    assert _stats(gen_server)["verify_sessions"] == 0
    assert len(_greedy(gen_server, PROMPT, 2)) == 2


def test_grpc_stream_infer_and_verify(gen_server: ServerProcess) -> None:
    import grpc

    from tandem.protos.inference import grpc_predict_v2_pb2 as pb

    greedy = _greedy(gen_server, PROMPT, 4)
    stub = gen_server.stub()
    assert stub.ModelReady(pb.ModelReadyRequest(name=MODEL), timeout=10).ready
    assert http_get(f"{gen_server.http_url}/v2/models/{MODEL}/ready")[0] == 200

    def request(**ints: list[int]) -> pb.ModelInferRequest:
        req = pb.ModelInferRequest(model_name=MODEL)
        for name, values in ints.items():
            t = req.inputs.add(name=name, datatype="INT64", shape=[len(values)])
            t.contents.int64_contents.extend(values)
        return req

    gen = request(input_ids=PROMPT)
    gen.parameters["max_tokens"].int64_param = 4
    bad = request(input_ids=[10**6])
    responses = list(stub.ModelStreamInfer(iter([bad, gen]), timeout=60))
    assert "outside the vocabulary" in responses[0].error_message
    tokens = [
        r.infer_response.outputs[1].contents.int64_contents[0]
        for r in responses[1:]
        if not r.infer_response.parameters["triton_final_response"].bool_param
    ]
    assert tokens == greedy
    assert responses[-1].infer_response.parameters["triton_final_response"].bool_param

    verify = request(prompt_ids=PROMPT, draft_ids=greedy[:2])
    verify.parameters["sequence_id"].string_param = "grpc-1"
    verify.parameters["sequence_start"].bool_param = True
    verify.parameters["sequence_end"].bool_param = True
    out = stub.ModelInfer(verify, timeout=30)
    values = {o.name: o.contents.int64_contents[0] for o in out.outputs}
    assert values == {"accepted": 2, "next_token": greedy[2]}
    unknown = request(draft_ids=[1])
    unknown.parameters["sequence_id"].string_param = "grpc-1"  # ended above
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(unknown, timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_stream_infer_on_a_tensor_server_needs_the_token_and_is_unimplemented(
    test_repository: Path, server_factory: ServerFactory
) -> None:
    import grpc

    from tandem.protos.inference import grpc_predict_v2_pb2 as pb

    server = server_factory(test_repository, "--model", "digits", "--token", "s3cret")
    stub = server.stub()
    request = pb.ModelInferRequest(model_name="digits")
    for metadata, code in (
        ([("authorization", "Bearer wrong")], grpc.StatusCode.UNAUTHENTICATED),
        ([("authorization", "Bearer s3cret")], grpc.StatusCode.UNIMPLEMENTED),
    ):
        with pytest.raises(grpc.RpcError) as err:
            list(stub.ModelStreamInfer(iter([request]), metadata=metadata, timeout=30))
        assert err.value.code() == code


def test_grpc_stream_cancelled_mid_stream_frees_its_sequence(gen_server: ServerProcess) -> None:
    from tandem.protos.inference import grpc_predict_v2_pb2 as pb

    before = _stats(gen_server)
    request = pb.ModelInferRequest(model_name=MODEL)
    t = request.inputs.add(name="input_ids", datatype="INT64", shape=[len(PROMPT)])
    t.contents.int64_contents.extend(PROMPT)
    request.parameters["max_tokens"].int64_param = 48
    request.parameters["ignore_eos"].bool_param = True
    call = gen_server.stub().ModelStreamInfer(iter([request]), timeout=60)
    first = next(call)
    assert not first.error_message and first.infer_response.outputs
    call.cancel()
    wait_until(
        lambda: _stats(gen_server)["cancelled"] == before["cancelled"] + 1,
        timeout=10,
        message="sequence cancelled",
    )
    now = _stats(gen_server)
    assert now["active_sequences"] == 0
    assert now["decode_rows"] - before["decode_rows"] < 47
