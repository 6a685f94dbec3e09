"""Speculative decoding over a slow link (issue 14): `speculative` against `cloud_only` (and
`local_only`, for time to first token on the device) with a real round-trip delay.

The real SmolLM2-135M-Instruct: its signed INT8 ONNX device variant (built by `build_zoo`
into --zoo, reused from there when it is up to date) on the client side, and a real
`tandem serve` with the full FP32 model behind tests.support.proxy in `latency` mode, which
delays every chunk in both directions by RTT/2, pipelined. The same prompts go through every
policy, interleaved prompt by prompt (the policy order alternates), greedy, so that a slower
phase of the shared machine hits every policy alike. Records per policy: median tokens/s,
time to first token, acceptance rate, mean accepted block, round trips and bytes per
generated token (the SDK's protobuf count, and the proxy's wire count with HTTP/2 framing);
checks that speculative's output equals cloud_only's on every prompt.

    .venv/bin/python bench/bench_generation_link.py [--prompts 8] [--tokens 64] [--rtt-ms 50]

Writes bench/results/generation-link.txt. Default run: ~5 minutes on 2 shared cores (the
first run also builds the device variant, ~3 minutes). `make bench` runs it through pytest.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.cloud.conftest import ServerProcess, http_get, start_server  # noqa: E402
from tests.support.processes import wait_until  # noqa: E402
from tests.support.proxy import FaultProxy  # noqa: E402

MODEL = "smollm2"
RESULTS = ROOT / "bench" / "results" / "generation-link.txt"
DEFAULT_ZOO = ROOT / "build" / "bench-zoo"  # /build/ is git-ignored: the cached device build
POLICIES = ("cloud_only", "speculative", "local_only")
DEFAULT_DRAFTS = (4, 8)  # the SDK's default first k, and a longer first draft
WHAT_IF_K = 8  # the 1t row: speculative from k = 8 with generation_threads=1
GOAL = 1.5  # speculative / cloud_only tokens/s
PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain how a bicycle stays upright.",
    "List some facts about the moon.",
    "Describe a walk through a forest in autumn.",
    "What makes bread rise?",
    "Tell me about the history of the printing press.",
    "How do bees make honey?",
    "Describe the water cycle.",
    "Explain why the sky is blue.",
    "Write a letter to a friend about a trip to the sea.",
    "What is photosynthesis?",
    "Give some tips for learning a new language.",
    "Describe how a train works.",
    "Why do cats purr?",
    "Explain what a computer program is to a child.",
    "Tell me a story about a dragon and a knight.",
]


@dataclass
class Row:
    """One generation: the SDK's GenerationResult plus what the proxy saw."""

    policy: str
    prompt: int
    result: Any
    wire_up: int = 0
    wire_down: int = 0


@dataclass
class Summary:
    rows: list[Row] = field(default_factory=list)

    def median(self, value: Callable[[Row], float | None]) -> float:
        values = [v for v in (value(r) for r in self.rows) if v is not None]
        return statistics.median(values) if values else float("nan")

    def total(self, value: Callable[[Row], float]) -> float:
        return float(sum(value(r) for r in self.rows))

    @property
    def tokens(self) -> int:
        return int(self.total(lambda r: len(r.result.token_ids)))


def build_variant(zoo: Path) -> tuple[Path, Path, str]:
    """(artifacts, signing public key, "built"/"cached") of the SmolLM2 device build."""
    from tandem.cloud.build.pipeline import build_zoo

    report = build_zoo(zoo, [MODEL])
    how = "built" if MODEL in report["run"]["built"] else "cached"
    return zoo / "artifacts", zoo / "keys" / "signing.pub", how


def chat_texts(prompts: Sequence[str]) -> tuple[list[str], list[list[int]]]:
    """Each prompt as one user turn rendered by the full model's own chat template, and the
    ids the server's tokenizer makes of it.

    The text goes to Client.generate, so that both sides provably start from the same ids
    (asserted against the device's tokenizer below)."""
    from transformers import AutoTokenizer

    from tandem.cloud.generation.model import cache_dir, gguf_path, load_full_model

    cached = cache_dir(gguf_path())
    tokenizer = (
        AutoTokenizer.from_pretrained(str(cached))
        if (cached / "tokenizer_config.json").is_file()
        else load_full_model()[1]
    )
    texts: list[str] = []
    ids: list[list[int]] = []
    for prompt in prompts:
        messages = [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        texts.append(str(text))
        ids.append([int(i) for i in tokenizer(texts[-1], add_special_tokens=False)["input_ids"]])
    return texts, ids


def serve(tmp: Path) -> ServerProcess:
    repository = tmp / "repository"
    (repository / MODEL).mkdir(parents=True)
    config = {"name": MODEL, "backend": "transformers", "max_sequences": 8}
    (repository / MODEL / "generation.json").write_text(json.dumps(config))
    server = start_server(repository, tmp / "logs", wait_ready=False)
    try:
        wait_until(lambda: _ready(server.http_url), timeout=300, interval=0.5, message="ready")
    except BaseException:
        server.stop()
        raise
    return server


def _ready(url: str) -> bool:
    try:
        return http_get(f"{url}/v2/health/ready")[0] == 200
    except OSError:
        return False


def measured_rtt_ms(address: str, calls: int = 20) -> float:
    """Median ServerLive round trip over a warm channel (ms)."""
    import grpc

    from tandem.protos.inference import grpc_predict_v2_pb2 as pb
    from tandem.protos.inference import grpc_predict_v2_pb2_grpc as pb_grpc

    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        stub.ServerLive(pb.ServerLiveRequest(), timeout=10)
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            stub.ServerLive(pb.ServerLiveRequest(), timeout=10)
            times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def local_step_ms(generator: Any, prompt: Sequence[int], steps: int = 32) -> float:
    """Median cost of one greedy step of the device variant (one drafted token), ms."""
    generator.start(list(prompt))
    generator.step()  # the prefill
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        generator.step()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def server_costs_ms(address: str, prompt: Sequence[int], k: int = 8) -> tuple[float, float]:
    """(one streamed decode step, one verify call of k drafted tokens) on the server, over a
    direct channel (no link delay): medians, ms."""
    import grpc

    from tandem.protos.inference import grpc_predict_v2_pb2_grpc as pb_grpc
    from tandem.sdk.generation.session import stream_request, verify_request

    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        arrivals, tokens = [], []
        for response in stub.ModelStreamInfer(iter([stream_request(MODEL, prompt, 32)])):
            arrivals.append(time.perf_counter())
            for out in response.infer_response.outputs:
                if out.name == "token_id":
                    tokens.append(int(out.contents.int64_contents[0]))
        step = statistics.median(b - a for a, b in itertools.pairwise(arrivals[:-1]))
        sequence = f"bench-link-{os.getpid()}"
        stub.ModelInfer(verify_request(MODEL, sequence, [], prompt=prompt, start=True))
        times = []
        for j in range(3):  # the server's own tokens: every draft is accepted
            draft = tokens[1 + j * (k + 1) : 1 + j * (k + 1) + k]
            started = time.perf_counter()
            stub.ModelInfer(verify_request(MODEL, sequence, draft))
            times.append(time.perf_counter() - started)
        stub.ModelInfer(verify_request(MODEL, sequence, [], end=True))
    return 1000 * step, 1000 * statistics.median(times)


def arms(draft_tokens: Sequence[int], what_if_k: int | None) -> list[tuple[str, str, int, int]]:
    """(label, policy, first k, device threads) of every configuration run side by side."""
    spec = [(f"spec k0={k}", "speculative", k, 2) for k in draft_tokens]
    if what_if_k is not None:
        spec.append((f"spec k0={what_if_k} 1t", "speculative", what_if_k, 1))
    return [("cloud_only", "cloud_only", 4, 2), *spec, ("local_only", "local_only", 4, 2)]


def run_bench(
    prompts: int,
    tokens: int,
    rtt_ms: float,
    zoo: Path,
    draft_tokens: Sequence[int],
    what_if_k: int | None = None,
) -> tuple[str, bool]:
    """(the results text, whether speculative's output equalled cloud_only's everywhere)."""
    from tandem.sdk import Client
    from tandem.sdk.generation.session import GenerationResult

    started = time.perf_counter()
    artifacts, public_key, how = build_variant(zoo)
    built_s = time.perf_counter() - started
    chosen, server_ids = chat_texts([PROMPTS[i % len(PROMPTS)] for i in range(prompts)])
    configurations = arms(draft_tokens, what_if_k)
    summaries = {label: Summary() for label, *_ in configurations}
    step_ms: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        server = serve(Path(tmp))
        proxy = FaultProxy(server.grpc_port)
        try:
            direct_ms = measured_rtt_ms(server.grpc_address)
            server_step_ms, verify_ms = server_costs_ms(server.grpc_address, server_ids[0])
            proxy.set_latency(rtt_s=rtt_ms / 1000)
            link_ms = measured_rtt_ms(proxy.address)
            clients: dict[int, Any] = {}
            with contextlib.ExitStack() as stack:
                for threads in sorted({t for *_, t in configurations}):
                    clients[threads] = stack.enter_context(
                        Client(
                            MODEL,
                            artifacts=artifacts,
                            cloud=proxy.address,
                            trusted_keys=[public_key],
                            cache_dir=Path(tmp) / "cache",
                            generation_threads=threads,
                        )
                    )
                    pool = clients[threads]._generator_pool()
                    assert pool is not None
                    for policy in POLICIES:  # warm up: sessions, channel, first-call costs
                        clients[threads].generate(
                            "Hello.", max_tokens=4, stream=False, policy=policy
                        )
                    for text, ids in zip(chosen, server_ids, strict=True):
                        # the device's tokenizer must see the prompt as the server's does
                        assert pool.tokenizer.encode(text) == ids, text
                    probe = pool.take()
                    step_ms[threads] = local_step_ms(probe, server_ids[0])
                    pool.give(probe)
                for i, prompt in enumerate(chosen):
                    order = configurations if i % 2 == 0 else configurations[::-1]
                    for label, policy, k, threads in order:
                        up, down = proxy.stats.bytes_up, proxy.stats.bytes_down
                        result = clients[threads].generate(
                            prompt, max_tokens=tokens, stream=False, policy=policy, draft_tokens=k
                        )
                        assert isinstance(result, GenerationResult)
                        wire = (proxy.stats.bytes_up - up, proxy.stats.bytes_down - down)
                        summaries[label].rows.append(Row(label, i, result, *wire))
                        print(
                            f"prompt {i} {label:>14}: {len(result.token_ids):3} tokens "
                            f"{result.tokens_per_s:5.1f} tok/s ttft {result.ttft_ms or 0:6.0f} ms "
                            f"accepted {result.accepted}/{result.drafted}",
                            file=sys.stderr,
                            flush=True,
                        )
        finally:
            proxy.close()
            server.stop()
    facts = {
        "prompts": prompts,
        "tokens": tokens,
        "rtt_ms": rtt_ms,
        "direct_ms": direct_ms,
        "link_ms": link_ms,
        "step_ms": step_ms,
        "server_step_ms": server_step_ms,
        "verify_ms": verify_ms,
        "build": f"{how} in {built_s:.0f} s",
        "seconds": time.perf_counter() - started,
        "load": os.getloadavg(),
    }
    return report(summaries, facts)


def _tokens_per_s(row: Row) -> float:
    return float(row.result.tokens_per_s)


def _ttft(row: Row) -> float | None:
    return row.result.ttft_ms  # type: ignore[no-any-return]


def report(summaries: dict[str, Summary], facts: dict[str, Any]) -> tuple[str, bool]:
    cloud, local = summaries["cloud_only"], summaries["local_only"]
    specs = {label: s for label, s in summaries.items() if label.startswith("spec")}
    commit = _git("rev-parse", "--short", "HEAD")
    changed = _git(
        "status",
        "--porcelain",
        "--",
        "sdk/tandem/sdk/generation",
        "cloud/tandem/cloud/generation",
        "tests/support/proxy.py",
    )
    dirty = " (generation code with uncommitted changes)" if changed else ""
    load = ", ".join(f"{x:.1f}" for x in facts["load"])
    lines = [
        "bench_generation_link: speculative vs cloud_only over a link with a round-trip delay",
        f"date {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, commit {commit}{dirty}, "
        f"{platform.machine()}, nproc {os.cpu_count()}, load average at the end {load} "
        "(shared machine: other people run tests and builds on it during the run)",
        "device: SmolLM2-135M-Instruct signed ONNX INT8 variant, ONNX Runtime CPU, 2 threads "
        f"(the SDK's GeneratorPool default; device build {facts['build']}); server: tandem "
        "serve, the full FP32 model, 1 torch thread; client, server and proxy share the cores",
        f"link: tests.support.proxy latency mode, {facts['rtt_ms']:.0f} ms RTT "
        f"({facts['rtt_ms'] / 2:.0f} ms each way, pipelined); gRPC ServerLive round trip "
        f"{facts['direct_ms']:.1f} ms direct, {facts['link_ms']:.1f} ms through the link",
        f"{facts['prompts']} chat prompts x up to {facts['tokens']} new tokens, greedy; "
        "configurations interleaved prompt by prompt, order reversed every other prompt; "
        "spec k0=K: speculative starting at k = K (then adaptive, 1..16); 1t: the same "
        "with Client(generation_threads=1) instead of the default 2; "
        f"run took {facts['seconds']:.0f} s",
        "costs, medians: device draft step "
        + ", ".join(f"{ms:.1f} ms on {t} thread(s)" for t, ms in sorted(facts["step_ms"].items()))
        + f"; server decode step "
        f"{facts['server_step_ms']:.1f} ms; server verify of 8 drafted tokens "
        f"{facts['verify_ms']:.1f} ms (both over a direct channel)",
        "",
        f"{'':>12} {'tokens':>6} {'tok/s':>6} {'ttft ms':>8} {'accept':>7} "
        f"{'block':>6} {'rt/tok':>7} {'sent/tok':>9} {'recv/tok':>9} {'wire up/tok':>12} "
        f"{'wire down/tok':>14}",
    ]
    for label, summary in summaries.items():
        n = max(summary.tokens, 1)
        drafted = summary.total(lambda r: r.result.drafted)
        accepted = summary.total(lambda r: r.result.accepted)
        blocks = summary.total(lambda r: r.result.round_trips)
        acceptance = f"{accepted / drafted:7.1%}" if drafted else f"{'-':>7}"
        block = f"{accepted / blocks:6.2f}" if drafted and blocks else f"{'-':>6}"
        lines.append(
            f"{label:>12} {summary.tokens:>6} {summary.median(_tokens_per_s):>6.1f} "
            f"{summary.median(_ttft):>8.0f} {acceptance} {block} {blocks / n:>7.3f} "
            f"{summary.total(lambda r: r.result.bytes_sent) / n:>9.1f} "
            f"{summary.total(lambda r: r.result.bytes_received) / n:>9.1f} "
            f"{summary.total(lambda r: r.wire_up) / n:>12.1f} "
            f"{summary.total(lambda r: r.wire_down) / n:>14.1f}"
        )
    lines += [
        "",
        "tok/s and ttft ms: medians over the prompts (tok/s = generated tokens / wall time "
        "of the call, first token included); accept = accepted / drafted; block = mean "
        "accepted draft tokens per verify round trip (each round trip also yields the "
        "server's own next token); rt/tok = round trips per generated token; sent/recv: "
        "protobuf bytes as the SDK counts them (GenerationResult.bytes_sent / "
        "bytes_received); wire: bytes through the proxy (gRPC + HTTP/2 framing).",
        "",
        f"time to first token, medians: local_only {local.median(_ttft):.0f} ms, "
        f"cloud_only {cloud.median(_ttft):.0f} ms, "
        + ", ".join(f"{label} {s.median(_ttft):.0f} ms" for label, s in specs.items()),
    ]
    lines += ["", "tokens/s per prompt (same order as above):"]
    for i in range(len(cloud.rows)):
        lines.append(
            f"  prompt {i:>2}: "
            + ", ".join(
                f"{label} {s.rows[i].result.tokens_per_s:.1f}" for label, s in summaries.items()
            )
        )
    lines.append("")
    all_same = True
    for label, spec in specs.items():
        pairs = list(zip(cloud.rows, spec.rows, strict=True))
        same = [
            c.result.token_ids == s.result.token_ids and c.result.text == s.result.text
            for c, s in pairs
        ]
        all_same = all_same and all(same)
        ratios = [s.result.tokens_per_s / c.result.tokens_per_s for c, s in pairs]
        ratio = spec.median(_tokens_per_s) / cloud.median(_tokens_per_s)
        rounds = spec.total(lambda r: r.result.round_trips)
        seconds = spec.total(lambda r: r.result.seconds)
        lines += [
            f"{label} / cloud_only tokens/s: {ratio:.3f}x on the medians (per prompt: "
            f"median {statistics.median(ratios):.2f}x, min {min(ratios):.2f}x, max "
            f"{max(ratios):.2f}x); goal >= {GOAL}x: {'met' if ratio >= GOAL else 'NOT met'}; "
            f"output == cloud_only's (token ids and text) on {sum(same)}/{len(same)} prompts; "
            f"{rounds:.0f} round trips in {seconds:.1f} s = "
            f"{1000 * seconds / max(rounds, 1):.0f} ms each for "
            f"{spec.tokens / max(rounds, 1):.2f} tokens",
        ]
    return "\n".join(lines) + "\n", all_same


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip()


def test_speculative_over_a_slow_link() -> None:
    """`make bench`: the default run; speculative must equal cloud_only on every prompt."""
    import pytest

    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    text, same = run_bench(8, 64, 50.0, DEFAULT_ZOO, DEFAULT_DRAFTS, WHAT_IF_K)
    RESULTS.write_text(text)
    print(text)
    assert same, text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=8, help="how many prompts (1..)")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per generation")
    parser.add_argument("--rtt-ms", type=float, default=50.0, help="injected round trip, ms")
    parser.add_argument(
        "--draft-tokens",
        type=int,
        nargs="+",
        default=list(DEFAULT_DRAFTS),
        help="speculative's first k; several values run side by side",
    )
    parser.add_argument(
        "--what-if-k",
        type=int,
        default=WHAT_IF_K,
        help="also run speculative from this k with the device generator on 1 thread "
        "(Client(generation_threads=1) beside the default 2); 0: not",
    )
    parser.add_argument("--zoo", type=Path, default=DEFAULT_ZOO, help="device build folder")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results file")
    args = parser.parse_args()
    if args.prompts < 1 or args.tokens < 1 or args.rtt_ms < 0:
        parser.error("--prompts and --tokens must be >= 1, --rtt-ms >= 0")
    if not all(1 <= k <= 16 for k in [*args.draft_tokens, args.what_if_k or 1]):
        parser.error("--draft-tokens must be in 1..16")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    text, same = run_bench(
        args.prompts,
        args.tokens,
        args.rtt_ms,
        args.zoo,
        args.draft_tokens,
        args.what_if_k or None,
    )
    args.out.write_text(text)
    sys.stdout.write(text)
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
