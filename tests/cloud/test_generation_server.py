"""The generation surfaces' operations on a tiny random Llama in a real `tandem serve`: the
Prometheus metrics move by what was generated, ModelMetadata describes a generative model,
and SIGTERM drains the streams and verify sessions (new work refused with UNAVAILABLE)."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.cloud.conftest import ServerProcess, http_get, start_server
from tests.support.processes import wait_until

pytest.importorskip("transformers")

MODEL = "tiny"
PROMPT = [5, 9, 17, 33, 2, 41]
LIMITS = {
    "max_sequences": 3,
    "max_prompt_tokens": 32,
    "max_new_tokens": 4000,
    "max_total_tokens": 8000,
    "max_draft_tokens": 8,
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    from tests.support.tiny_llm import repository_entry, save_folder, tiny_model

    root = tmp_path_factory.mktemp("gen-ops")
    save_folder(tiny_model(), root / "weights")
    repository_entry(root / "repository", MODEL, root / "weights", **LIMITS)
    proc = start_server(root / "repository", root / "logs", "--drain-timeout", "2")
    yield proc
    proc.stop()


def _post(server: ServerProcess, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    response = httpx.post(server.http_url + path, json=body, timeout=60)
    return response.status_code, response.json()


def _generate(server: ServerProcess, ids: list[int], n: int) -> list[int]:
    body = {"input_ids": ids, "parameters": {"max_tokens": n, "ignore_eos": True}}
    status, answer = _post(server, f"/v2/models/{MODEL}/generate", body)
    assert status == 200, answer
    return list(answer["token_ids"])


def _stream_request(ids: list[int], n: int) -> Any:
    from tandem.protos.inference import grpc_predict_v2_pb2 as pb

    request = pb.ModelInferRequest(model_name=MODEL)
    tensor = request.inputs.add(name="input_ids", datatype="INT64", shape=[len(ids)])
    tensor.contents.int64_contents.extend(ids)
    request.parameters["max_tokens"].int64_param = n
    request.parameters["ignore_eos"].bool_param = True
    return request


def _verify_request(sid: str, draft: list[int], prompt: list[int] | None = None) -> Any:
    from tandem.protos.inference import grpc_predict_v2_pb2 as pb

    request = pb.ModelInferRequest(model_name=MODEL)
    for name, values in (("prompt_ids", prompt), ("draft_ids", draft)):
        if values is not None:
            t = request.inputs.add(name=name, datatype="INT64", shape=[len(values)])
            t.contents.int64_contents.extend(values)
    request.parameters["sequence_id"].string_param = sid
    request.parameters["sequence_start"].bool_param = prompt is not None
    return request


Key = tuple[str, frozenset[tuple[str, str]]]


def _key(name: str, labels: dict[str, str]) -> Key:
    return name, frozenset(labels.items())


class Scrape:
    """Metric values before and after, by name and labels (in any order)."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.before = self._read()
        self.after: dict[Key, float] = {}

    def _read(self) -> dict[Key, float]:
        out = {}
        for line in self.server.metrics_text().splitlines():
            if line.startswith("tandem_generation_"):
                sample, _, value = line.rpartition(" ")
                name, _, rest = sample.partition("{")
                pairs = [p.split("=", 1) for p in rest.rstrip("}").split(",") if p]
                out[_key(name, {k: v.strip('"') for k, v in pairs})] = float(value)
        return out

    def delta(self, name: str, **labels: str) -> float:
        key = _key(name, labels)
        return self.after.get(key, 0.0) - self.before.get(key, 0.0)

    def now(self, name: str, **labels: str) -> float:
        return self._read().get(_key(name, labels), 0.0)

    def done(self) -> None:
        self.after = self._read()


def test_metrics_count_tokens_latencies_verify_and_refusals(server: ServerProcess) -> None:
    scrape = Scrape(server)
    tiny = {"model": MODEL}
    greedy = _generate(server, PROMPT, 5)  # HTTP V2 generate: 5 tokens
    stub = server.stub()
    streamed = list(stub.ModelStreamInfer(iter([_stream_request(PROMPT, 3)]), timeout=30))
    assert len(streamed) == 4 and not streamed[0].error_message  # 3 tokens, then the final
    status, _ = _post(
        server, "/v1/completions", {"prompt": "w3 w4", "max_tokens": 2, "ignore_eos": True}
    )
    assert status == 200
    out = stub.ModelInfer(_verify_request("m-1", greedy[:2], PROMPT), timeout=30)
    assert {o.name: o.contents.int64_contents[0] for o in out.outputs} == {
        "accepted": 2,
        "next_token": greedy[2],
    }
    wrong = [greedy[3], (greedy[4] + 1) % 64, 7]
    out = stub.ModelInfer(_verify_request("m-1", wrong), timeout=30)
    assert out.outputs[0].contents.int64_contents[0] == 1
    status, _ = _post(
        server, f"/v2/models/{MODEL}/generate", {"input_ids": [7], "max_tokens": 9999}
    )
    assert status == 400
    for sid in ("m-2", "m-3"):  # with m-1, max_sequences (3) are alive
        stub.ModelInfer(_verify_request(sid, [], PROMPT), timeout=30)
    assert scrape.now("tandem_generation_verify_sessions", **tiny) == 3
    assert scrape.now("tandem_generation_reserved_tokens", **tiny) > 0
    status, _ = _post(
        server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "w5"}]}
    )
    assert status == 429
    for sid in ("m-1", "m-2", "m-3"):
        end = _verify_request(sid, [])
        end.parameters["sequence_end"].bool_param = True
        stub.ModelInfer(end, timeout=30)
    call = stub.ModelStreamInfer(iter([_stream_request(PROMPT, 3000)]), timeout=30)
    assert next(call).infer_response.outputs  # one token, then the client goes away
    call.cancel()
    cancelled = {"model": MODEL, "kind": "stream", "reason": "cancelled"}
    finished = "tandem_generation_sequences_finished_total"
    before = scrape.before.get(_key(finished, cancelled), 0.0)
    wait_until(
        lambda: scrape.now(finished, **cancelled) > before,
        timeout=10,
        message="the cancelled stream counted",
    )
    scrape.done()

    tokens = "tandem_generation_tokens_total"
    assert scrape.delta(tokens, **tiny, kind="generate") == 5
    assert scrape.delta(tokens, **tiny, kind="openai") == 2
    # accepted + the next token per call: m-1's two calls (2 + 1, 1 + 1), then 5 empty drafts
    assert scrape.delta(tokens, **tiny, kind="verify") == 3 + 2 + 5
    streamed_tokens = scrape.delta(tokens, **tiny, kind="stream")
    assert 3 + 1 <= streamed_tokens < 3 + 3000  # the cancelled one stopped early
    prompts = "tandem_generation_prompt_tokens_total"
    assert scrape.delta(prompts, **tiny, kind="generate") == len(PROMPT)
    assert scrape.delta(prompts, **tiny, kind="stream") == 2 * len(PROMPT)
    assert scrape.delta(prompts, **tiny, kind="verify") == 3 * len(PROMPT)
    assert scrape.delta(prompts, **tiny, kind="openai") == 2  # "w3 w4"
    ttft = "tandem_generation_time_to_first_token_seconds_count"
    assert scrape.delta(ttft, **tiny, kind="generate") == 1
    assert scrape.delta(ttft, **tiny, kind="stream") == 2
    assert (
        scrape.delta("tandem_generation_inter_token_latency_seconds_count", **tiny, kind="generate")
        == 4
    )
    assert (
        scrape.delta("tandem_generation_time_to_first_token_seconds_sum", **tiny, kind="generate")
        > 0
    )
    assert scrape.delta("tandem_generation_verify_calls_total", **tiny) == 7
    assert scrape.delta("tandem_generation_drafted_tokens_total", **tiny) == 2 + 3
    assert scrape.delta("tandem_generation_accepted_tokens_total", **tiny) == 2 + 1
    assert scrape.delta(finished, **tiny, kind="generate", reason="length") == 1
    assert scrape.delta(finished, **tiny, kind="stream", reason="length") == 1
    assert scrape.delta(finished, **tiny, kind="stream", reason="cancelled") == 1
    assert scrape.delta(finished, **tiny, kind="openai", reason="length") == 1
    rejected = "tandem_generation_requests_rejected_total"
    assert scrape.delta(rejected, **tiny, kind="generate", reason="INVALID_ARGUMENT") == 1
    assert scrape.delta(rejected, **tiny, kind="openai", reason="RESOURCE_EXHAUSTED") == 1
    assert scrape.after[_key("tandem_generation_active_sequences", tiny)] == 0
    assert scrape.after[_key("tandem_generation_verify_sessions", tiny)] == 0
    assert scrape.delta("tandem_generation_decode_steps_total", **tiny) >= 4 + 2 + 1


def test_model_metadata_describes_the_generative_model(server: ServerProcess) -> None:
    import grpc

    from tandem.protos.inference import grpc_predict_v2_pb2 as pb

    status, raw = http_get(f"{server.http_url}/v2/models/{MODEL}")
    assert status == 200, raw
    meta = json.loads(raw)
    tensors = {t["name"]: (t["datatype"], t["shape"]) for t in meta["inputs"]}
    assert tensors["text_input"] == ("BYTES", [1])
    assert tensors["input_ids"] == ("INT64", [-1])
    assert tensors["max_tokens"] == ("INT32", [1])
    assert tensors["draft_ids"] == ("INT64", [-1])
    outputs = {t["name"]: (t["datatype"], t["shape"]) for t in meta["outputs"]}
    assert outputs["text_output"] == ("BYTES", [1])
    assert (meta["name"], meta["versions"], meta["platform"]) == (
        MODEL,
        ["1"],
        "transformers_generative",
    )
    params = meta["parameters"]
    assert params["generative"] is True
    for name in ("max_sequences", "max_prompt_tokens", "max_new_tokens", "max_total_tokens"):
        assert params[name] == LIMITS[name]
    assert params["max_sequence_tokens"] == LIMITS["max_prompt_tokens"] + LIMITS["max_new_tokens"]
    assert params["context_length"] == 128  # tiny_model's max_position_embeddings
    assert params["vocab_size"] == 64 and params["stop_token_ids"] == [1]
    assert http_get(f"{server.http_url}/v2/models/{MODEL}/versions/1")[0] == 200
    assert http_get(f"{server.http_url}/v2/models/{MODEL}/versions/2")[0] == 404

    stub = server.stub()
    answer = stub.ModelMetadata(pb.ModelMetadataRequest(name=MODEL), timeout=10)
    assert (answer.name, list(answer.versions), answer.platform) == (
        MODEL,
        ["1"],
        "transformers_generative",
    )
    assert [(t.name, t.datatype, list(t.shape)) for t in answer.inputs] == [
        (t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in answer.outputs] == [
        (t["name"], t["datatype"], t["shape"]) for t in meta["outputs"]
    ]
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelMetadata(pb.ModelMetadataRequest(name=MODEL, version="7"), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND

    # The sampling inputs the metadata names are taken as tensors, as Triton's models take them
    request = pb.ModelInferRequest(model_name=MODEL)
    text = request.inputs.add(name="text_input", datatype="BYTES", shape=[1])
    text.contents.bytes_contents.append(b"w5 w9 w17")
    limit = request.inputs.add(name="max_tokens", datatype="INT32", shape=[1])
    limit.contents.int_contents.append(4)
    eos = request.inputs.add(name="ignore_eos", datatype="BOOL", shape=[1])
    eos.contents.bool_contents.append(True)
    responses = list(stub.ModelStreamInfer(iter([request]), timeout=30))
    assert [r.error_message for r in responses] == [""] * 5  # 4 tokens, then the final one
    assert responses[-1].infer_response.parameters["finish_reason"].string_param == "length"


def test_sigterm_drains_streams_and_sessions_and_refuses_new_work(server: ServerProcess) -> None:
    """Last in this module: it stops the server. The drain timeout is 2 s (the fixture)."""
    import grpc

    stub = server.stub()
    greedy = _generate(server, PROMPT, 3)
    session = stub.ModelInfer(_verify_request("d-1", [], PROMPT), timeout=30)
    assert session.outputs[1].contents.int64_contents[0] == greedy[0]
    arrivals: list[float] = []
    ended: list[Any] = []

    def consume() -> None:  # a stream far longer than the grace
        call = stub.ModelStreamInfer(iter([_stream_request(PROMPT, 3900)]), timeout=60)
        try:
            for _ in call:
                arrivals.append(time.monotonic())
        except grpc.RpcError as exc:
            ended.append(exc)
        else:
            ended.append(None)

    reader = threading.Thread(target=consume)
    reader.start()
    wait_until(lambda: len(arrivals) > 0, timeout=20, message="the long stream started")
    server.proc.send_signal(signal.SIGTERM)
    stopped = time.monotonic()
    wait_until(
        lambda: http_get(f"{server.http_url}/v2/health/ready")[0] == 503,
        timeout=5,
        message="readiness off while draining",
    )
    # new work is refused with UNAVAILABLE / 503 ...
    status, answer = _post(server, f"/v2/models/{MODEL}/generate", {"input_ids": PROMPT})
    assert status == 503 and "shutting down" in answer["error"]
    with pytest.raises(grpc.RpcError) as err:
        list(stub.ModelStreamInfer(iter([_stream_request(PROMPT, 2)]), timeout=10))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(_verify_request("d-2", [], PROMPT), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "shutting down" in str(err.value.details())
    # ... while the live verify session goes on to its end
    step = stub.ModelInfer(_verify_request("d-1", [greedy[1]]), timeout=10)
    assert [o.contents.int64_contents[0] for o in step.outputs] == [1, greedy[2]]
    end = _verify_request("d-1", [])
    end.parameters["sequence_end"].bool_param = True
    stub.ModelInfer(end, timeout=10)
    # and the stream keeps streaming through the grace, then ends with UNAVAILABLE
    reader.join(timeout=20)
    assert ended and isinstance(ended[0], grpc.RpcError), ended
    assert ended[0].code() == grpc.StatusCode.UNAVAILABLE
    assert ended[0].details() == "server shutting down"
    during = [t for t in arrivals if t > stopped]
    assert during and during[-1] - stopped > 1.0, "the stream did not go on through the grace"
    assert len(arrivals) < 3900
    assert server.proc.wait(timeout=15) == 0
    assert time.monotonic() - stopped < 2 + 5
