"""Test-side helpers for the fleet: telemetry summaries and signed artifact variants (packed
and signed by tests/support/variants.py)."""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tandem.protos.fleet.v1 import fleet_pb2
from tandem.sdk.artifacts import Manifest, TensorSpec
from tests.support.variants import Signer, pack, write_signed_variant


def histogram(
    values: list[float], min_value: float = 0.01, growth: float = 1.1
) -> fleet_pb2.LogHistogram:
    import math

    counts: list[int] = []
    under = 0
    for v in values:
        if v < min_value:
            under += 1
            continue
        i = int(math.log(v / min_value) / math.log(growth))
        counts.extend([0] * (i + 1 - len(counts)))
        counts[i] += 1
    return fleet_pb2.LogHistogram(
        min_value=min_value,
        growth=growth,
        counts=counts,
        underflow=under,
        count=len(values),
        sum=sum(values),
        max=max(values) if values else 0.0,
    )


def summary(
    device_id: str,
    version: int,
    *,
    model: str = "digits",
    start_ms: int = 0,
    requests: int = 100,
    errors: int = 0,
    fallbacks: int = 10,
    latency_ms: float = 2.0,
    shadow: int = 10,
    agreed: int = 10,
    summary_id: str | None = None,
) -> fleet_pb2.TelemetrySummary:
    return fleet_pb2.TelemetrySummary(
        summary_id=summary_id or uuid.uuid4().hex,
        device_id=device_id,
        model=model,
        version=version,
        interval_start_ms=start_ms,
        interval_end_ms=start_ms + 10_000,
        counts={"local/ok": requests - fallbacks, "cloud/ok": fallbacks},
        latency_local_ms=histogram([latency_ms] * requests),
        requests=requests,
        errors=errors,
        fallbacks=fallbacks,
        shadow_sampled=shadow,
        shadow_agreed=agreed,
        runtime="onnx",
    )


def new_signing_key(keys_dir: Path) -> Ed25519PrivateKey:
    """A new zoo key: `keys_dir/signing.key` (PKCS#8 PEM) and `keys_dir/signing.pub`."""
    return Signer.create(keys_dir, private=True).key


def write_variant(
    root: Path,
    key: Ed25519PrivateKey,
    model: str,
    version: int,
    variant: str,
    runtime: str,
    payload: bytes,
    *,
    hardware: str = "any",
) -> Path:
    """A signed variant folder in the zoo layout: artifacts/<model>/<version>/<variant>/."""
    name = {
        "onnx": "model.onnx",
        "tflite": "model.tflite",
        "openvino": "model.xml",
        "torch": "model.pt",
    }[runtime]
    entry, stored = pack(name, payload, level=19)
    now = datetime.now(UTC).replace(microsecond=0)
    manifest = Manifest(
        model=model,
        version=version,
        variant=variant,
        runtime=runtime,
        hardware=hardware,
        precision="int8",
        task="classification",
        created=now,
        expires=now + timedelta(days=30),
        entrypoint=name,
        files=(entry,),
        inputs=(TensorSpec("pixels", "FP32", (-1, 64)),),
        outputs=(TensorSpec("logits", "FP32", (-1, 10)),),
        reference=None,
        metrics={"accuracy": 0.95},
    )
    folder = root / "artifacts" / model / str(version) / variant
    return write_signed_variant(folder, key, manifest, {entry.stored_as: stored}).path


def fake_zoo(
    root: Path,
    versions: tuple[int, ...] = (1, 2, 3),
    size: int = 200_000,
    runtimes: tuple[str, ...] = ("onnx", "tflite"),
) -> Path:
    """A zoo with a pseudo 'digits' model whose versions share most bytes (like a retrained
    head on an unchanged backbone), so deltas are small."""
    import random

    key = new_signing_key(root / "keys")
    rng = random.Random(7)
    backbone = bytes(rng.getrandbits(8) for _ in range(size))
    for v in versions:
        head = hashlib.sha256(f"head-{v}".encode()).digest() * 64
        for rt in runtimes:
            write_variant(root, key, "digits", v, f"{rt}-int8", rt, backbone + head)
    (root / "report.json").write_text(json.dumps({"models": {"digits": {"accuracy": 0.95}}}))
    return root
