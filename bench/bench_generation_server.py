"""Aggregate tokens/s of `tandem serve`'s generation engine: 1 stream against 8 concurrent
streams (continuous batching; goal >= 2.5x), over /v1/chat/completions with stream (SSE) and
ignore_eos, so that every stream generates its max_tokens.

    .venv/bin/python bench/bench_generation_server.py [--tokens 48] [--streams 8]

Writes bench/results/generation-server.txt. Not part of `make test`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from tests.cloud.conftest import http_get, start_server  # noqa: E402
from tests.support.processes import wait_until  # noqa: E402

MODEL = "smollm2"
RESULTS = ROOT / "bench" / "results" / "generation-server.txt"
PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain how a bicycle stays upright.",
    "List some facts about the moon.",
    "Describe a walk through a forest in autumn.",
    "What makes bread rise?",
    "Tell me about the history of the printing press.",
    "How do bees make honey?",
    "Describe the water cycle.",
]


def stream_once(url: str, prompt: str, tokens: int) -> tuple[int, float]:
    """(tokens received, seconds to the first one)."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": tokens,
        "ignore_eos": True,  # every stream runs its max_tokens: the same work at 1 and 8 streams
        "stream": True,
    }
    start = time.perf_counter()
    first = 0.0
    count = 0
    seen: list[str] = []
    with (
        httpx.Client(timeout=600) as client,
        client.stream("POST", f"{url}/v1/chat/completions", json=body) as r,
    ):
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data:"):
                continue
            seen.append(line)
            if line == "data: [DONE]":
                break
            event = json.loads(line[5:])
            if event["choices"][0]["finish_reason"] is None:
                count += 1
                if count == 1:
                    first = time.perf_counter() - start
    if count == 0:
        raise RuntimeError(f"no tokens streamed: {seen[:3]}")
    return count, first


def run(url: str, streams: int, tokens: int) -> tuple[float, int, float, float]:
    """(aggregate tokens/s, tokens, wall seconds, mean time to first token)."""
    results: list[tuple[int, float]] = [(0, 0.0)] * streams

    def one(i: int) -> None:
        results[i] = stream_once(url, PROMPTS[i % len(PROMPTS)], tokens)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    total = sum(n for n, _ in results)
    return total / wall, total, wall, sum(f for _, f in results) / streams


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "repo"
        (root / MODEL).mkdir(parents=True)
        config = {"name": MODEL, "backend": "transformers", "max_sequences": 32}
        (root / MODEL / "generation.json").write_text(json.dumps(config))
        server = start_server(root, Path(tmp) / "logs", wait_ready=False)
        try:
            wait_until(lambda: _ready(server.http_url), timeout=300, interval=0.5, message="ready")
            run(server.http_url, 1, 4)  # warm up
            rows = []
            for streams in (1, args.streams):
                best = max(
                    (run(server.http_url, streams, args.tokens) for _ in range(args.repeat)),
                    key=lambda r: r[0],
                )
                rows.append((streams, *best))
        finally:
            server.stop()
    single = rows[0][1]
    lines = [
        "bench_generation_server: aggregate tokens/s, tandem serve generation engine",
        f"model SmolLM2-135M-Instruct FP32 (transformers), CPU {platform.machine()}, "
        f"{os.cpu_count()} cores (shared), max_tokens {args.tokens}, best of {args.repeat}",
        "",
        f"{'streams':>8} {'tokens':>7} {'wall s':>7} {'tok/s':>7} {'ttft s':>7} {'speedup':>8}",
    ]
    for streams, rate, total, wall, ttft in rows:
        lines.append(
            f"{streams:>8} {total:>7} {wall:>7.2f} {rate:>7.1f} {ttft:>7.2f} {rate / single:>7.2f}x"
        )
    ratio = rows[-1][1] / single
    lines += ["", f"{args.streams} streams / 1 stream: {ratio:.2f}x (goal >= 2.5x)"]
    text = "\n".join(lines) + "\n"
    RESULTS.write_text(text)
    sys.stdout.write(text)
    return 0


def _ready(url: str) -> bool:
    try:
        return http_get(f"{url}/v2/health/ready")[0] == 200
    except OSError:
        return False


if __name__ == "__main__":
    raise SystemExit(main())
