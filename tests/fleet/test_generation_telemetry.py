"""Text-generation telemetry in the fleet (issue 14): tokens/s, acceptance and escalation
rates per device, version and window, on SQLite and a real PostgreSQL, and through REST."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from tandem.cloud.fleet.config import ServiceConfig
from tandem.cloud.fleet.engine import Gate, GateMetric, VersionStats, evaluate_gates
from tandem.cloud.fleet.observe import version_stats
from tandem.cloud.fleet.service import FleetService
from tandem.cloud.fleet.store import Store
from tandem.errors import ConfigError
from tandem.protos.fleet.v1 import fleet_pb2
from tests.fleet.helpers import histogram, summary

T0 = 1_700_000_000_000
GENERATION_COLUMNS = (
    "generations",
    "generation_errors",
    "generated_tokens",
    "generation_seconds",
    "drafted",
    "accepted",
    "escalations",
    "ttft",
    "ms_per_token",
)


def generating(
    device_id: str,
    version: int,
    *,
    start_ms: int = T0,
    generations: int = 10,
    tokens: int = 200,
    seconds: float = 4.0,
    drafted: int = 100,
    accepted: int = 80,
    escalations: int = 1,
    ttft_ms: float = 30.0,
    ms_per_token: list[float] | None = None,
) -> fleet_pb2.TelemetrySummary:
    s = summary(device_id, version, start_ms=start_ms, model="tiny", requests=0, fallbacks=0)
    s.ClearField("latency_local_ms")
    s.generations, s.generation_errors = generations, 1
    s.generated_tokens, s.generation_seconds = tokens, seconds
    s.drafted, s.accepted, s.escalations = drafted, accepted, escalations
    s.ttft_ms.CopyFrom(histogram([ttft_ms] * generations))
    if ms_per_token is not None:
        s.ms_per_token.CopyFrom(histogram(ms_per_token))
    return s


def test_generation_totals_and_rates_per_device_and_window(store: Store) -> None:
    fast = generating("d1", 2, tokens=300, seconds=2.0, drafted=100, accepted=90, escalations=0)
    slow = generating("d2", 2, tokens=100, seconds=8.0, drafted=50, accepted=10, escalations=5)
    # d1 again, 20 s later: the same 60 s window, merged into the stored row by a later batch
    later = generating("d1", 2, start_ms=T0 + 20_000, tokens=100, seconds=2.0, ttft_ms=300.0)
    other_version = generating("d1", 1, tokens=1, seconds=1.0)
    assert store.ingest([fast, slow, other_version]).ingested == 3
    assert store.ingest([later, fast]).ingested == 1  # `fast` again is a duplicate
    assert store.telemetry_count() == (3, 4)

    stats = store.telemetry_stats("tiny", 2)
    assert (stats.generations, stats.generation_errors, stats.escalations) == (30, 3, 6)
    assert (stats.generated_tokens, stats.drafted, stats.accepted) == (500, 250, 180)
    # tokens / seconds summed over devices: 500 / 12, not the mean of 150, 12.5 and 50 tok/s
    assert stats.generation_seconds == pytest.approx(12.0)
    assert stats.tokens_per_s == pytest.approx(500 / 12)
    assert stats.acceptance_rate == pytest.approx(180 / 250)
    assert stats.escalation_rate == pytest.approx(6 / 30)
    assert stats.p50_ttft_ms == pytest.approx(30.0, rel=0.1)
    assert stats.p95_ttft_ms == pytest.approx(300.0, rel=0.1)
    assert stats.requests == 0 and stats.error_rate is None  # generation-only telemetry

    by_device = {d.device_id: d for d in stats.per_device}
    assert (by_device["d1"].drafted, by_device["d1"].accepted) == (200, 170)
    assert (by_device["d2"].generations, by_device["d2"].escalations) == (10, 5)
    assert by_device["d1"].generated_tokens == 400
    assert by_device["d1"].generation_seconds == pytest.approx(4.0)

    only_d2 = store.telemetry_stats("tiny", 2, device_ids=["d2"])
    assert only_d2.tokens_per_s == pytest.approx(100 / 8)
    assert only_d2.acceptance_rate == pytest.approx(0.2)
    assert store.telemetry_stats("tiny", 1).generated_tokens == 1
    # a summary from an agent that predates these fields: zeros, and no rate
    old = summary("d3", 4, model="tiny", start_ms=T0)
    store.ingest([old])
    empty = store.telemetry_stats("tiny", 4)
    assert empty.generations == 0 and empty.p95_ttft_ms is None
    assert (empty.tokens_per_s, empty.acceptance_rate, empty.escalation_rate) == (None,) * 3


def test_an_older_database_gains_the_generation_columns_and_rest_shows_them(
    tmp_path: Path,
) -> None:
    from fastapi.testclient import TestClient

    from tandem.cloud.fleet.rest import create_app

    url = f"sqlite:///{tmp_path / 'old.db'}"
    config = ServiceConfig(url, tmp_path / "store")
    service = FleetService(config)
    service.ingest([summary("d0", 2, model="tiny", start_ms=T0)])  # a row before the upgrade
    service.close()
    engine = create_engine(url)
    with engine.begin() as conn:
        for column in GENERATION_COLUMNS:
            conn.execute(text(f"ALTER TABLE telemetry DROP COLUMN {column}"))
    engine.dispose()

    service = FleetService(config)
    try:
        service.ingest([generating("d1", 2, tokens=120, seconds=3.0, drafted=40, accepted=30)])
        stats = service.store.telemetry_stats("tiny", 2)
        assert stats.devices == 2 and stats.requests == 100  # the old row is still read
        assert stats.tokens_per_s == pytest.approx(40.0)
        with TestClient(create_app(service, tokens={"tok": "alice"})) as http:
            got = http.get(
                "/api/v1/telemetry",
                params={"model": "tiny", "version": 2},
                headers={"Authorization": "Bearer tok"},
            )
        assert got.status_code == 200, got.text
        [shown] = got.json()
        assert shown["generated_tokens"] == 120 and shown["generations"] == 10
        assert shown["tokens_per_s"] == pytest.approx(40.0)
        assert shown["acceptance_rate"] == pytest.approx(0.75)
        assert shown["escalation_rate"] == pytest.approx(0.1)
        assert shown["p95_ttft_ms"] == pytest.approx(30.0, rel=0.1)
    finally:
        service.close()


def _version(store: Store, version: int, acceptance: float, escalation: float) -> VersionStats:
    """Eight devices of one version, each with its own spread around the rates."""
    batch = []
    for i in range(8):
        jitter = (i - 3.5) / 100  # per-device rates a few points apart
        drafted, generations = 400, 100
        batch.append(
            generating(
                f"d{i}",
                version,
                generations=generations,
                drafted=drafted,
                accepted=round(drafted * (acceptance + jitter)),
                escalations=round(generations * max(0.0, escalation + jitter / 2)),
            )
        )
    store.ingest(batch)
    return version_stats(store.telemetry_stats("tiny", version))


def test_acceptance_and_escalation_gates_fail_a_bad_cohort_and_pass_a_good_one(
    tmp_path: Path,
) -> None:
    store = Store(f"sqlite:///{tmp_path / 'fleet.db'}", telemetry_window_s=60)
    try:
        baseline = _version(store, 1, acceptance=0.80, escalation=0.05)
        good = _version(store, 2, acceptance=0.79, escalation=0.06)
        bad = _version(store, 3, acceptance=0.35, escalation=0.40)
    finally:
        store.close()
    assert good.acceptance_clusters is not None and good.escalation_clusters is not None
    gates = [
        Gate(GateMetric.ACCEPTANCE_RATE, 0.6, min_samples=200),
        Gate(GateMetric.ESCALATION_RATE, 0.2, min_samples=100),
        Gate(GateMetric.ACCEPTANCE_RATE, 0.1, relative=True, min_samples=200),
    ]
    passed = evaluate_gates(gates, good, baseline, 0.0, 8)
    failed = evaluate_gates(gates, bad, baseline, 0.0, 8)
    assert [r.passed for r in passed] == [True, True, True], passed
    assert [r.passed for r in failed] == [False, False, False], failed
    assert passed[0].value == pytest.approx(good.accepted / good.drafted)
    assert failed[1].value == pytest.approx(bad.escalations / bad.generations)
    assert failed[2].baseline == pytest.approx(baseline.accepted / baseline.drafted)
    # Below min_samples (drafted tokens) the gate waits instead of judging.
    few = evaluate_gates(
        [Gate(GateMetric.ACCEPTANCE_RATE, 0.6, min_samples=10_000)], bad, baseline, 0.0, 8
    )
    assert few[0].passed is None


def _speed(
    store: Store, version: int, ms: float, devices: int = 4, generations: int = 30
) -> VersionStats:
    """`devices` devices of one version, `generations` each, per-generation ms/token spread
    +-20% around `ms` (and each device a little faster or slower than the next)."""
    batch = []
    for i in range(devices):
        own = ms * (1 + (i - devices / 2) / 50)
        times = [own * (0.8 + 0.4 * k / max(1, generations - 1)) for k in range(generations)]
        batch.append(generating(f"d{i}", version, generations=generations, ms_per_token=times))
    store.ingest(batch)
    return version_stats(store.telemetry_stats("tiny", version))


def test_tokens_per_s_ratio_gate_fails_a_slower_cohort_and_passes_an_as_fast_one(
    tmp_path: Path,
) -> None:
    store = Store(f"sqlite:///{tmp_path / 'fleet.db'}", telemetry_window_s=60)
    try:
        baseline = _speed(store, 1, ms=50.0)
        same = _speed(store, 2, ms=51.0)
        slow = _speed(store, 3, ms=100.0)  # half the tokens/s
        slightly = _speed(store, 4, ms=60.0, devices=1, generations=3)  # 0.83x, 3 generations
    finally:
        store.close()
    assert slow.token_time_counts and slow.token_time_layout == baseline.token_time_layout
    gate = [Gate(GateMetric.TOKENS_PER_S_RATIO, 0.9, min_samples=20)]
    [passed] = evaluate_gates(gate, same, baseline, 0.0, 4)
    [failed] = evaluate_gates(gate, slow, baseline, 0.0, 4)
    assert passed.passed is True and passed.value == pytest.approx(50 / 51, rel=0.1)
    assert failed.passed is False and failed.value == pytest.approx(0.5, rel=0.1)
    assert "slower" in failed.reason
    # the baseline column shows the baseline's median tokens/s
    assert failed.baseline == pytest.approx(1000 / 50, rel=0.1)
    # below the floor but on little evidence: Mann-Whitney must show it slower first
    [unsure] = evaluate_gates(
        [Gate(GateMetric.TOKENS_PER_S_RATIO, 0.9)], slightly, baseline, 0.0, 1
    )
    assert unsure.value is not None and unsure.value < 0.9
    assert unsure.passed is None, unsure
    # too few generations: waits
    [few] = evaluate_gates(
        [Gate(GateMetric.TOKENS_PER_S_RATIO, 0.9, min_samples=1000)], slow, baseline, 0.0, 4
    )
    assert few.passed is None
    # a ratio to the baseline by definition: `relative` is refused
    with pytest.raises(ConfigError, match=r"gate\.relative"):
        Gate(GateMetric.TOKENS_PER_S_RATIO, 0.9, relative=True)
