"""Reading the SDK's telemetry spool (`tandem.agent.telemetry`), without a broker."""

from __future__ import annotations

from pathlib import Path

import zstandard

from tandem.agent.telemetry import read_batch
from tandem.protos.fleet.v1 import fleet_pb2
from tandem.sdk.telemetry import TelemetryConfig, TelemetryRecorder


def sdk_spool(folder: Path, version: int, requests: int) -> None:
    recorder = TelemetryRecorder(TelemetryConfig(spool_dir=folder, interval_s=3600))
    for _ in range(requests):
        recorder.record("digits", version, "onnx", "local", "ok", 0.3, None, 0.8, False, False)
    recorder.flush()


def test_spool_reads_the_sdk_format_and_consumes_garbage(tmp_path: Path) -> None:
    for version in (1, 2, 3):
        sdk_spool(tmp_path, version, 4)
    (tmp_path / "bad.pb.zst").write_bytes(b"not zstd at all")
    (tmp_path / "bad2.pb").write_bytes(b"\xff\xff\xff")
    (tmp_path / ".in-flight.pb.zst.tmp").write_bytes(b"partial")
    (tmp_path / "notes.txt").write_text("not ours")
    empty = zstandard.ZstdCompressor().compress(fleet_pb2.TelemetryBatch().SerializeToString())
    (tmp_path / "empty.pb.zst").write_bytes(empty)
    batch = read_batch(tmp_path, "dev-9", limit=2)
    assert len(batch.summaries) == 2  # whole files until the limit
    assert all(s.device_id == "dev-9" and s.requests == 4 for s in batch.summaries)
    rest = read_batch(tmp_path, "dev-9", limit=100)
    assert {p.name for p in rest.files} >= {"bad.pb.zst", "bad2.pb", "empty.pb.zst"}
    assert len(rest.summaries) == 3  # the first two files were not deleted yet
    assert not any(p.name in (".in-flight.pb.zst.tmp", "notes.txt") for p in rest.files)
    decoded = fleet_pb2.TelemetryBatch.FromString(
        zstandard.ZstdDecompressor().decompress(batch.payload())
    )
    assert [s.summary_id for s in decoded.summaries] == [s.summary_id for s in batch.summaries]


def test_generation_fields_are_forwarded_unchanged(tmp_path: Path) -> None:
    """The agent ships the SDK's summaries as they are: the generation fields (issue 14)
    reach the fleet without the agent knowing them."""
    recorder = TelemetryRecorder(TelemetryConfig(spool_dir=tmp_path, interval_s=3600))
    recorder.record_generation(
        "tiny", 3, finished=True, tokens=12, seconds=0.25, drafted=8, accepted=5, ttft_ms=9.0
    )
    recorder.record_generation("tiny", 3, finished=True, tokens=4, seconds=0.5, escalated=True)
    recorder.record_generation("tiny", 3, finished=False)
    [written] = recorder.flush()
    batch = read_batch(tmp_path, "dev-7", limit=10)
    decoded = fleet_pb2.TelemetryBatch.FromString(
        zstandard.ZstdDecompressor().decompress(batch.payload())
    )
    [shipped] = decoded.summaries
    assert shipped.device_id == "dev-7"  # the one field the agent fills in
    assert (shipped.generations, shipped.generation_errors, shipped.escalations) == (2, 1, 1)
    assert (shipped.generated_tokens, shipped.drafted, shipped.accepted) == (16, 8, 5)
    assert shipped.generation_seconds == 0.75 and shipped.ttft_ms.count == 1
    shipped.device_id = written.device_id
    assert shipped == written
