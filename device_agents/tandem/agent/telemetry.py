"""Shipping the SDK's spooled telemetry summaries: read, batch, publish, delete after PUBACK.

The spool is a folder (default `STORE/.telemetry-spool/`) where the SDK's recorder
(`tandem.sdk.telemetry`, `TelemetryConfig.spool_dir`) drops one file per interval:
`<end_ms>-<summary_id>.pb.zst` = zstd(TelemetryBatch) (a plain `.pb` TelemetryBatch is read
too), written to a temporary name first and renamed, so a file with its final name is whole.
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

_MAX_FILE_BYTES = 16 << 20  # bytes: a spool file larger than this (unpacked) is garbage


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


def parse_spool_file(data: bytes, compressed: bool) -> list[fleet_pb2.TelemetrySummary]:
    """The summaries in one spool file; raises ValueError for anything else."""
    import zstandard
    from google.protobuf.message import DecodeError

    if compressed:
        try:
            data = zstandard.ZstdDecompressor().decompress(data, max_output_size=_MAX_FILE_BYTES)
        except zstandard.ZstdError as exc:
            raise ValueError(f"not zstd: {exc}") from exc
    batch = fleet_pb2.TelemetryBatch()
    try:
        batch.ParseFromString(data)
    except DecodeError as exc:
        raise ValueError(f"not a TelemetryBatch: {exc}") from exc
    if not batch.summaries:
        raise ValueError("no summaries")
    for summary in batch.summaries:
        if not summary.summary_id or not summary.model:
            raise ValueError("summary without summary_id or model")
    return list(batch.summaries)


def read_batch(spool: Path, device_id: str, limit: int) -> SpoolBatch:
    """Whole spool files until `limit` summaries; garbage files are logged and consumed too."""
    files: list[Path] = []
    summaries: list[fleet_pb2.TelemetrySummary] = []
    for path in spool_files(spool):
        if len(summaries) >= limit:
            break
        try:
            if path.stat().st_size > _MAX_FILE_BYTES:
                raise ValueError("file too large")
            found = parse_spool_file(path.read_bytes(), path.name.endswith(".zst"))
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as exc:
            log.warning("telemetry spool: dropping %s: %s", path.name, exc)
            files.append(path)
            continue
        for summary in found:
            if not summary.device_id:
                summary.device_id = device_id
        files.append(path)
        summaries.extend(found)
    return SpoolBatch(tuple(files), tuple(summaries))


def delete_files(files: tuple[Path, ...]) -> None:
    for path in files:
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("telemetry spool: cannot delete %s: %s", path, exc)
