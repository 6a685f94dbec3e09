"""The telemetry recorder: histograms, summaries, the spool, and its cost on the hot path."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tandem.protos.fleet.v1 import fleet_pb2
from tandem.sdk import Client, TelemetryConfig
from tandem.sdk.telemetry import LogHistogram, TelemetryRecorder, read_spool_file

Factory = Callable[..., Client]


def test_log_histogram_buckets_merge_and_quantiles() -> None:
    h = LogHistogram(min_value=0.01, growth=2.0, buckets=20)
    for v in (0.005, 0.01, 0.015, 0.02, 1.0, 100.0):
        h.add(v)
    assert h.underflow == 1 and h.count == 6 and h.max == 100.0
    assert h.counts[0] == 2 and h.counts[1] == 1  # [0.01, 0.02) and [0.02, 0.04)
    other = LogHistogram(min_value=0.01, growth=2.0, buckets=20)
    for v in [0.5] * 10:
        other.add(v)
    h.merge(other)
    assert h.count == 16 and sum(h.counts) + h.underflow == 16
    assert 0.32 <= h.quantile(0.5) <= 0.64
    roundtrip = LogHistogram.from_proto(h.to_proto())
    assert roundtrip is not None
    assert roundtrip.counts == h.counts and roundtrip.sum == pytest.approx(h.sum)
    assert LogHistogram.from_json(h.to_json()).bucket_counts() == h.bucket_counts()  # type: ignore[union-attr]
    # Another layout (a device configured differently) is re-bucketed, not refused.
    odd = LogHistogram(min_value=0.02, growth=1.5, buckets=30)
    odd.add(0.5)
    h.merge(odd)
    assert h.count == 17 and sum(h.counts) + h.underflow == 17
    # An empty or invalid wire histogram is no histogram; an invalid layout is refused.
    assert LogHistogram.from_proto(LogHistogram().to_proto()) is None
    with pytest.raises(ValueError, match="growth > 1"):
        LogHistogram(min_value=0.01, growth=1.0)


def test_recorder_summaries_and_spool(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    rec = TelemetryRecorder(
        TelemetryConfig(spool_dir=spool, device_id="dev-1", interval_s=3600, confidence_buckets=10)
    )
    for i in range(10):
        rec.record("digits", 3, "onnx", "local", "ok", 0.5 + i * 0.01, None, 0.95, False, False)
    rec.record("digits", 3, "onnx", "cloud", "ok", 0.4, 12.0, lambda: 0.35, True, False)
    rec.record("digits", 3, "onnx", "cache", "hit", None, None, 0.9, False, True)
    rec.record(
        "digits", 3, "onnx", "cloud", "CloudUnavailableError", None, None, None, False, False
    )
    rec.record_shadow("digits", 3, 4, 3)
    rec.record("digits", 2, "onnx", "local", "ok", 0.7, None, None, False, False)
    summaries = {s.version: s for s in rec.flush()}
    s = summaries[3]
    assert s.device_id == "dev-1" and s.model == "digits" and s.runtime == "onnx"
    assert s.requests == 13 and s.fallbacks == 1 and s.cache_hits == 1 and s.errors == 1
    assert dict(s.counts) == {
        "local/ok": 10,
        "cloud/ok": 1,
        "cache/hit": 1,
        "cloud/CloudUnavailableError": 1,
    }
    assert s.latency_local_ms.count == 11 and s.latency_cloud_ms.count == 1
    assert list(s.confidence_buckets)[9] == 11 and list(s.confidence_buckets)[3] == 1
    assert (s.shadow_sampled, s.shadow_agreed) == (4, 3)
    assert s.interval_end_ms >= s.interval_start_ms
    assert summaries[2].requests == 1
    files = sorted(spool.iterdir())
    assert len(files) == 2 and all(f.name.endswith(".pb.zst") for f in files)
    on_disk = {x.summary_id for f in files for x in read_spool_file(f)}
    assert on_disk == {x.summary_id for x in summaries.values()}
    assert not list(spool.glob(".*"))  # no temporary files left behind
    assert isinstance(read_spool_file(files[0])[0], fleet_pb2.TelemetrySummary)
    assert rec.flush() == []  # a new interval with nothing in it writes nothing


def test_generations_go_into_the_same_summary(tmp_path: Path) -> None:
    rec = TelemetryRecorder(TelemetryConfig(spool_dir=tmp_path, device_id="dev-1", interval_s=3600))
    rec.record("tiny", 1, "onnx", "local", "ok", 0.5, None, None, False, False)
    # speculative: 8 drafted, 6 accepted; cascade handed over; a local run with no drafts
    rec.record_generation(
        "tiny", 1, finished=True, tokens=10, seconds=0.5, drafted=8, accepted=6, ttft_ms=20.0
    )
    rec.record_generation(
        "tiny", 1, finished=True, tokens=30, seconds=1.5, escalated=True, ttft_ms=80.0
    )
    rec.record_generation("tiny", 1, finished=True, tokens=0, seconds=0.1)  # no first token
    # one that raised or was abandoned: an error, and none of its partial figures
    rec.record_generation("tiny", 1, finished=False, tokens=5, seconds=9.0, drafted=4)
    rec.record_generation("tiny", 2, finished=True, tokens=4, seconds=1.0)
    by_version = {s.version: s for s in rec.flush()}
    s = by_version[1]
    assert s.requests == 1  # infer() and generate() share the model version's summary
    assert (s.generations, s.generation_errors) == (3, 1)
    assert s.generated_tokens == 40 and s.generation_seconds == pytest.approx(2.1)
    assert (s.drafted, s.accepted, s.escalations) == (8, 6, 1)
    assert s.ttft_ms.count == 2 and s.ttft_ms.sum == pytest.approx(100.0)
    ttft = LogHistogram.from_proto(s.ttft_ms)
    assert ttft is not None and ttft.quantile(0.99) == pytest.approx(80.0, rel=0.2)
    # milliseconds per token of the two generations with tokens: 50 and 50; none for tokens=0
    assert s.ms_per_token.count == 2 and s.ms_per_token.sum == pytest.approx(100.0)
    other = by_version[2]
    assert (other.generations, other.generated_tokens, other.requests) == (1, 4, 0)
    assert not other.HasField("ttft_ms")
    # what the agent reads from the spool carries them unchanged
    spooled = {x.version: x for f in tmp_path.iterdir() for x in read_spool_file(f)}
    assert spooled[1] == s and spooled[2] == other


def test_spool_is_bounded_and_failures_are_caught(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    rec = TelemetryRecorder(TelemetryConfig(spool_dir=spool, interval_s=3600, max_spool_files=3))
    for _ in range(5):
        rec.record("digits", 1, "onnx", "local", "ok", 1.0, None, None, False, False)
        rec.flush()
    assert len(list(spool.iterdir())) == 3
    blocked = tmp_path / "file-not-dir"
    blocked.write_text("x")
    bad = TelemetryRecorder(TelemetryConfig(spool_dir=blocked / "spool", interval_s=3600))
    bad.record("digits", 1, "onnx", "local", "ok", 1.0, None, None, False, False)
    assert len(bad.flush()) == 1  # the summary is still produced ...
    assert bad.failures == 1  # ... and the spool failure counted, not raised


def test_recording_is_cheap_and_never_blocks(tmp_path: Path) -> None:
    rec = TelemetryRecorder(TelemetryConfig(max_pending_events=1000, interval_s=3600))
    event = ("req", "digits", 1, "onnx", "local", "ok", 0.1, None, 0.9, False, False)
    record = rec.record_event
    n = 20000
    samples = []
    for _ in range(5):  # the best of five: a busy machine can pause any one loop
        start = time.perf_counter()
        for _ in range(n):
            record(event)
        samples.append((time.perf_counter() - start) / n * 1e6)
    per_call_us = min(samples)
    assert per_call_us < 2.0, per_call_us
    assert len(rec._events) == 1000  # bounded: the oldest were dropped, nothing blocked
    assert rec.flush()[0].requests == 1000


def test_client_telemetry_end_to_end(
    clients: Factory, artifacts: Path, tmp_path: Path, test_set: tuple[np.ndarray, np.ndarray]
) -> None:
    spool = tmp_path / "spool"
    c = clients(
        artifacts=artifacts,
        policy="local_only",
        runtime="onnx",
        cache=4,
        telemetry=TelemetryConfig(spool_dir=spool, device_id="d", interval_s=3600),
    )
    x = test_set[0][:1]
    for _ in range(3):
        c.infer(x)
    with pytest.raises(Exception, match="pixels"):
        c.infer({"nope": x})
    c.close()
    summaries = [s for f in spool.iterdir() for s in read_spool_file(f)]
    assert len(summaries) == 1
    s = summaries[0]
    assert s.version == 2 and s.runtime == "onnx"
    # Input errors are the caller's, raised before any path runs: not counted as requests.
    assert dict(s.counts) == {"local/ok": 1, "cache/hit": 2}
    assert s.cache_hits == 2 and sum(s.confidence_buckets) == 3
