"""Shipping the SDK's spooled telemetry summaries: read, batch, publish, delete after PUBACK.

The spool is a folder (default `STORE/.telemetry-spool/`) where the SDK's recorder drops one
file per summary: a serialized `TelemetrySummary` (`*.pb`, or zstd-compressed `*.pb.zst`),
written to a temporary name first and renamed, so a file that has its final name is whole.
Names starting with "." and ending in ".tmp" are in flight and skipped. Delivery is
at-least-once: files are deleted only after the broker acknowledged the batch, and the
fleet service deduplicates by `summary_id`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from tandem.protos.fleet.v1 import fleet_pb2

log = logging.getLogger(__name__)

_MAX_SUMMARY_BYTES = 1 << 20  # bytes: a summary file larger than this is garbage


@dataclass(frozen=True)
class SpoolBatch:
    files: tuple[Path, ...]  # every file consumed by this batch (garbage included)
    summaries: tuple[fleet_pb2.TelemetrySummary, ...]

    def payload(self) -> bytes:
        import zstandard

        batch = fleet_pb2.TelemetryBatch(summaries=list(self.summaries))
        return bytes(zstandard.ZstdCompressor(level=3).compress(batch.SerializeToString()))


def spool_files(spool: Path) -> list[Path]:
    try:
        entries = sorted(spool.iterdir())
    except FileNotFoundError:
        return []
    return [
        p
        for p in entries
        if p.is_file()
        and not p.name.startswith(".")
        and not p.name.endswith(".tmp")
        and (p.name.endswith(".pb") or p.name.endswith(".pb.zst"))
    ]


def parse_summary(data: bytes, compressed: bool) -> fleet_pb2.TelemetrySummary:
    """Raises ValueError for anything that is not one summary."""
    import zstandard
    from google.protobuf.message import DecodeError

    if compressed:
        try:
            data = zstandard.ZstdDecompressor().decompress(data, max_output_size=_MAX_SUMMARY_BYTES)
        except zstandard.ZstdError as exc:
            raise ValueError(f"not zstd: {exc}") from exc
    summary = fleet_pb2.TelemetrySummary()
    try:
        summary.ParseFromString(data)
    except DecodeError as exc:
        raise ValueError(f"not a TelemetrySummary: {exc}") from exc
    if not summary.summary_id or not summary.model:
        raise ValueError("summary without summary_id or model")
    return summary


def read_batch(spool: Path, device_id: str, limit: int) -> SpoolBatch:
    """Up to `limit` summaries from the spool; garbage files are logged and consumed too."""
    files: list[Path] = []
    summaries: list[fleet_pb2.TelemetrySummary] = []
    for path in spool_files(spool):
        if len(summaries) >= limit:
            break
        try:
            if path.stat().st_size > _MAX_SUMMARY_BYTES:
                raise ValueError("file too large")
            summary = parse_summary(path.read_bytes(), path.name.endswith(".zst"))
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as exc:
            log.warning("telemetry spool: dropping %s: %s", path.name, exc)
            files.append(path)
            continue
        if not summary.device_id:
            summary.device_id = device_id
        files.append(path)
        summaries.append(summary)
    return SpoolBatch(tuple(files), tuple(summaries))


def delete_files(files: tuple[Path, ...]) -> None:
    for path in files:
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("telemetry spool: cannot delete %s: %s", path, exc)
