"""Health verdicts, spool reading, persisted state and config validation, without a broker."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import zstandard

from tandem.agent.config import AgentConfig, BrokerAddress
from tandem.agent.health import HealthWatch, Verdict
from tandem.agent.state import AgentState, PendingHealth
from tandem.agent.telemetry import read_batch
from tandem.errors import ConfigError
from tandem.protos.fleet.v1 import fleet_pb2
from tandem.sdk.telemetry import TelemetryConfig, TelemetryRecorder


def watch(**changes: object) -> HealthWatch:
    values: dict[str, object] = dict(
        model="digits",
        version=3,
        variant="onnx-int8",
        started=100.0,
        window_s=10.0,
        max_error_rate=0.1,
        min_requests=20,
    )
    values.update(changes)
    return HealthWatch(**values)  # type: ignore[arg-type]


def test_health_passes_after_a_clean_window() -> None:
    w = watch()
    w.observe_summary("digits", 3, requests=100, errors=5)
    w.observe_probe(None)
    assert w.verdict(109.9) is Verdict.PENDING
    assert w.verdict(110.0) is Verdict.HEALTHY


def test_health_fails_on_error_rate_once_enough_requests_arrived() -> None:
    w = watch()
    w.observe_summary("digits", 3, requests=5, errors=5)  # too few to judge
    assert w.verdict(101) is Verdict.PENDING
    w.observe_summary("digits", 2, requests=100, errors=100)  # another version: not ours
    w.observe_summary("minilm", 3, requests=100, errors=100)
    assert w.verdict(101) is Verdict.PENDING
    w.observe_summary("digits", 3, requests=20, errors=0)  # 5/25 = 0.2 > 0.1
    assert w.verdict(101) is Verdict.UNHEALTHY
    assert w.failure is not None and "error rate 0.200" in w.failure


def test_health_fails_on_a_failed_probe() -> None:
    w = watch()
    w.observe_probe("output 'logits' differs")
    assert w.verdict(100.5) is Verdict.UNHEALTHY and "probe" in (w.failure or "")


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


def test_state_round_trip_and_corruption(tmp_path: Path) -> None:
    state = AgentState(tmp_path)
    memory = state.model("digits")
    memory.max_accepted_version = 7
    memory.failed.add((6, "onnx-int8"))
    memory.health = PendingHealth(7, "onnx-int8", (5, "onnx-int8"), 123.5, "r9")
    state.remember_refusal("k" * 64, "expired: x")
    state.save()
    again = AgentState(tmp_path)
    again.load()
    loaded = again.model("digits")
    assert loaded.max_accepted_version == 7 and loaded.failed == {(6, "onnx-int8")}
    assert loaded.health == memory.health and again.refused == {"k" * 64: "expired: x"}
    (tmp_path / "state.json").write_text('{"models": {"digits": {"failed": 5}}}')
    broken = AgentState(tmp_path)
    broken.load()  # logged and ignored, never raised
    assert broken.models == {}


def config(tmp_path: Path, **changes: object) -> AgentConfig:
    values: dict[str, object] = dict(
        device_id="dev-1",
        broker=BrokerAddress.parse("mqtt://127.0.0.1:1883"),
        store=tmp_path,
        trusted_keys=(tmp_path / "k.pub",),
    )
    values.update(changes)
    return AgentConfig(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("device_id", "../etc"),
        ("device_id", "a/b"),
        ("trusted_keys", ()),
        ("max_payload_bytes", 0),
        ("stall_timeout_s", -1.0),
        ("health_window_s", float("nan")),
        ("max_error_rate", 1.5),
        ("reconnect_min_s", 60.0),
        ("tags", {"a=b": "c"}),
        ("runtimes", ("onnx", "coreml")),
    ],
)
def test_config_names_the_wrong_field(tmp_path: Path, field: str, value: object) -> None:
    with pytest.raises(ConfigError) as caught:
        config(tmp_path, **{field: value})
    assert caught.value.field == field


def test_config_defaults_and_broker_urls(tmp_path: Path) -> None:
    c = config(tmp_path, tags={"site": "lab"})
    assert c.spool_dir == tmp_path / ".telemetry-spool"
    assert c.topic("desired") == "tandem/v1/devices/dev-1/desired"
    assert BrokerAddress.parse("mqtt://broker") == BrokerAddress("broker", 1883)
    for bad in ("http://x:1", "mqtt://", "mqtt://h:notaport"):
        with pytest.raises(ConfigError):
            BrokerAddress.parse(bad)
    assert os.fspath(c.agent_dir).endswith(".agent")


def test_cli_reports_a_bad_config_by_field(tmp_path: Path) -> None:
    import subprocess
    import sys

    tandem = str(Path(sys.executable).with_name("tandem"))
    done = subprocess.run(
        [
            tandem,
            "agent",
            "run",
            "--device-id",
            "../x",
            "--broker",
            "mqtt://127.0.0.1:1",
            "--store",
            str(tmp_path),
            "--trusted-key",
            str(tmp_path / "k.pub"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1 and "device_id" in done.stderr


def test_detection_reports_hardware_and_importable_runtimes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tandem.agent import detect

    found = detect.detect_runtimes()
    assert "onnx" in found and found == detect._detect_from_table()
    monkeypatch.setattr(detect.platform, "machine", lambda: "AMD64")
    assert detect.detect_hardware() == "x86_64"
    monkeypatch.setattr(detect.platform, "machine", lambda: "arm64")
    assert detect.detect_hardware() == "aarch64"


def test_warm_up_checks_outputs_against_the_reference(tmp_path: Path) -> None:
    import numpy as np

    from tandem.agent.errors import WarmupError
    from tandem.agent.warmup import compare_outputs, warm_up
    from tandem.sdk.artifacts import load_variant, unpack_variant
    from tests.agent.artifacts import Signer, build_variant

    signer = Signer.create(tmp_path / "keys")
    good = build_variant(tmp_path / "zoo", signer, version=1)
    unpack_variant(load_variant(good.path))
    probe = warm_up(good.path, good.manifest, 1e-3, 1e-3)
    probe.check()  # and again, as the health probe does

    wrong = build_variant(tmp_path / "zoo", signer, version=2, wrong_reference=True)
    unpack_variant(load_variant(wrong.path))
    with pytest.raises(WarmupError, match="differs from the reference"):
        warm_up(wrong.path, wrong.manifest, 1e-3, 1e-3)

    (good.path / "model.onnx").write_bytes(b"not an onnx model")
    with pytest.raises(WarmupError, match="could not load"):
        warm_up(good.path, good.manifest, 1e-3, 1e-3)

    ref = {"logits": np.zeros((2, 3), np.float32)}
    with pytest.raises(WarmupError, match="missing"):
        compare_outputs({}, ref, 1e-3, 1e-3)
    with pytest.raises(WarmupError, match="shape"):
        compare_outputs({"logits": np.zeros((3, 2), np.float32)}, ref, 1e-3, 1e-3)
    compare_outputs({"logits": np.full((2, 3), 1e-4, np.float32)}, ref, 1e-3, 1e-3)
