"""Delivery payloads (full and delta, resumable chunks) and telemetry maths, without a broker."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from tandem.cloud.fleet.delivery import Delivery, apply_delta
from tandem.cloud.fleet.service import FleetService, ServiceConfig
from tandem.cloud.fleet.telemetry import TelemetryDecodeError, decode_batch, encode_batch
from tandem.protos.fleet.v1 import fleet_pb2
from tandem.sdk.histogram import LogHistogram, merge_histograms
from tests.fleet.helpers import fake_zoo, histogram, summary, write_variant


@pytest.fixture
def service(tmp_path: Path) -> FleetService:
    svc = FleetService(ServiceConfig(f"sqlite:///{tmp_path / 'f.db'}", tmp_path / "store"))
    svc.import_zoo(fake_zoo(tmp_path / "zoo"))
    return svc


def request(offset: int = 0, have: int = 0, version: int = 2) -> fleet_pb2.ChunkRequest:
    return fleet_pb2.ChunkRequest(
        transfer_id="t",
        device_id="d",
        model="digits",
        version=version,
        variant="onnx-int8",
        file="model.onnx",
        offset=offset,
        accept_delta=bool(have),
        have_version=have,
    )


def assemble(chunks: list[fleet_pb2.ArtifactChunk]) -> bytes:
    return b"".join(c.data for c in chunks)


def test_full_and_delta_payloads_reconstruct_the_file(service: FleetService) -> None:
    d = Delivery(chunk_size=4096)
    v1 = service.store.artifact("digits", 1, "onnx-int8")
    v2 = service.store.artifact("digits", 2, "onnx-int8")
    full = d.payload(v2, "model.onnx")
    assert not full.is_delta
    stored = (Path(v2.path) / "model.onnx.zst").read_bytes()
    assert full.data == stored and full.sha256 == hashlib.sha256(stored).hexdigest()
    delta = d.payload(v2, "model.onnx", base=v1)
    assert delta.is_delta and delta.base_version == 1
    assert len(delta.data) < len(stored) / 10, (len(delta.data), len(stored))
    old = zstandard.ZstdDecompressor().decompress((Path(v1.path) / "model.onnx.zst").read_bytes())
    new = zstandard.ZstdDecompressor().decompress(stored)
    assert apply_delta(old, delta.data, len(new) + 10) == new
    assert d.payload(v2, "model.onnx", base=v1) is delta, "cached"


def test_chunks_resume_from_any_offset(service: FleetService) -> None:
    d = Delivery(chunk_size=4096)
    v2 = service.store.artifact("digits", 2, "onnx-int8")
    p = d.payload(v2, "model.onnx")
    chunks = list(d.chunks(request(), p))
    assert assemble(chunks) == p.data
    assert all(c.total_size == len(p.data) and c.sha256 == p.sha256 for c in chunks)
    assert len(chunks) == -(-len(p.data) // 4096)
    resumed = list(d.chunks(request(offset=10_000), p))
    assert resumed[0].offset == 10_000
    assert p.data[:10_000] + assemble(resumed) == p.data
    end = list(d.chunks(request(offset=len(p.data) + 5), p))
    assert len(end) == 1 and end[0].data == b"" and end[0].offset == len(p.data)


def test_delta_not_used_when_it_is_not_smaller(tmp_path: Path, service: FleetService) -> None:
    key_dir = tmp_path / "zoo" / "keys"
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = serialization.load_pem_private_key((key_dir / "signing.key").read_bytes(), None)
    assert isinstance(key, Ed25519PrivateKey)
    unrelated = write_variant(
        tmp_path / "zoo2", key, "digits", 7, "onnx-int8", "onnx", os.urandom(50_000)
    )
    from tandem.sdk.artifacts import TrustedKeys, load_public_key_raw

    service.import_variant(unrelated, TrustedKeys([load_public_key_raw(key_dir / "signing.pub")]))
    d = Delivery()
    v7 = service.store.artifact("digits", 7, "onnx-int8")
    v1 = service.store.artifact("digits", 1, "onnx-int8")
    p = d.payload(v7, "model.onnx", base=v1)
    assert not p.is_delta and p.data == (Path(v7.path) / "model.onnx.zst").read_bytes()


def test_chunks_only_for_the_devices_desired_state(service: FleetService) -> None:
    service.store.upsert_presence(
        fleet_pb2.Presence(
            device_id="d",
            online=True,
            runtimes=["onnx"],
            hardware="x86_64",
            active_versions={"digits": 1},
        )
    )
    assert list(service.chunks_for("d", request().SerializeToString())) == []
    service.set_desired("d", "digits", 2, "alice")
    desired = service.desired_state("d")
    assert desired.models[0].variant == "onnx-int8" and desired.models[0].delta_base_version == 1
    chunks = list(service.chunks_for("d", request(have=1).SerializeToString()))
    assert chunks and chunks[0].is_delta
    assert list(service.chunks_for("other", request().SerializeToString())) == []


def test_import_refuses_unsigned_or_tampered_variants(tmp_path: Path) -> None:
    from tandem.cloud.fleet.errors import ImportRefusedError

    zoo = fake_zoo(tmp_path / "zoo", versions=(1,))
    svc = FleetService(ServiceConfig(f"sqlite:///{tmp_path / 'f.db'}", tmp_path / "store"))
    stored = zoo / "artifacts/digits/1/onnx-int8/model.onnx.zst"
    stored.write_bytes(stored.read_bytes()[:-3] + b"abc")
    with pytest.raises(ImportRefusedError, match="onnx-int8"):
        svc.import_zoo(zoo)
    other = fake_zoo(tmp_path / "zoo-other", versions=(1,))
    trusted_elsewhere = FleetService(
        ServiceConfig(
            f"sqlite:///{tmp_path / 'g.db'}",
            tmp_path / "store2",
            trusted_keys=(other / "keys" / "signing.pub",),
        )
    )
    with pytest.raises(ImportRefusedError, match="trusted"):
        trusted_elsewhere.import_zoo(fake_zoo(tmp_path / "zoo3", versions=(1,)))


# --- telemetry ------------------------------------------------------------------------------


def test_histogram_quantiles_track_numpy_within_bucket_width() -> None:
    rng = np.random.default_rng(3)
    values = rng.lognormal(mean=1.0, sigma=0.6, size=20_000)
    parts = np.array_split(values, 7)
    merged = merge_histograms(LogHistogram.from_proto(histogram(list(p))) for p in parts)
    assert merged is not None and merged.count == 20_000
    for q in (0.5, 0.95, 0.99):
        assert merged.quantile(q) == pytest.approx(float(np.quantile(values, q)), rel=0.1)


def test_histograms_with_other_layouts_merge_by_rebucketing() -> None:
    a = LogHistogram.from_proto(histogram([1.0] * 100, min_value=0.01, growth=1.1))
    b = LogHistogram.from_proto(histogram([50.0] * 100, min_value=0.1, growth=1.5))
    assert a is not None and b is not None
    a.merge(b)
    assert a.count == 200
    assert a.quantile(0.25) == pytest.approx(1.0, rel=0.1)
    assert a.quantile(0.9) == pytest.approx(50.0, rel=0.3)


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.floats(min_value=0.001, max_value=1e4), min_size=1, max_size=200),
    st.lists(st.floats(min_value=0.001, max_value=1e4), min_size=1, max_size=200),
)
def test_merge_is_order_independent(xs: list[float], ys: list[float]) -> None:
    hx, hy = LogHistogram.from_proto(histogram(xs)), LogHistogram.from_proto(histogram(ys))
    ab = merge_histograms([hx, hy])
    ba = merge_histograms([hy, hx])
    assert ab is not None and ba is not None
    assert ab.counts == ba.counts and ab.count == len(xs) + len(ys)
    assert ab.quantile(0.95) == pytest.approx(ba.quantile(0.95))


def test_decode_batch_round_trip_and_refusals() -> None:
    batch = [summary("d", 1), summary("d", 2)]
    out = decode_batch(encode_batch(batch))
    assert [s.summary_id for s in out] == [s.summary_id for s in batch]
    with pytest.raises(TelemetryDecodeError):
        decode_batch(b"not zstd at all")
    with pytest.raises(TelemetryDecodeError):
        decode_batch(zstandard.ZstdCompressor().compress(b"\xff\xff\xff garbage"))
    bomb = zstandard.ZstdCompressor().compress(b"\x00" * (2 << 20))
    with pytest.raises(TelemetryDecodeError, match="inflates"):
        decode_batch(bomb, max_bytes=1 << 20)


def test_a_large_file_gets_a_block_delta_that_rebuilds_it() -> None:
    from tandem.cloud.fleet.delivery import DICT_DELTA_MAX, make_delta
    from tandem.sdk.delta import MAGIC

    assert DICT_DELTA_MAX == 8 << 20  # level 19's window: the dictionary delta's reach
    old = os.urandom(24 << 20)  # incompressible, like weights
    new = bytearray(old)
    new[1000:5096] = os.urandom(4096)  # a tensor changed in place
    new[len(old) // 2] ^= 1
    delta = make_delta(old, bytes(new))
    assert delta[:4] == MAGIC
    assert len(delta) < 16 << 10, len(delta)  # ~4 KiB changed: a delta of about that
    assert apply_delta(old, delta, len(new)) == new
    grown = old[:100] + os.urandom(70_000) + old[100:]  # shifted: correct, if not small
    assert apply_delta(old, make_delta(old, grown), len(grown)) == grown
