"""Label-free accuracy: the fleet's estimate from the devices' calibrated confidences.

The digits model the build ships (temperature-calibrated on its validation split) answers
the held-out test split through the SDK, whose telemetry is ingested by a real fleet
service; the estimate the rollout gate would use must land within 2 points of the accuracy
the labels give, on clean digits and on digits with noise added.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import create_engine, text

from tandem.cloud.fleet.service import FleetService, ServiceConfig
from tandem.sdk import Client, TelemetryConfig
from tandem.sdk.telemetry import read_spool_file
from tests.fleet.helpers import summary
from tests.support.examples import load_example

# Noise (standard deviation, on the 0..16 pixel scale) and the draws of it per image.
NOISE = (0.0, 3.0)
DRAWS = 3
DEVICES = 3


def _answer(zoo: Path, tmp: Path, device: str, x: np.ndarray[Any, Any]) -> tuple[list[int], Path]:
    """One device answering every row of `x` locally, one request each; (argmaxes, spool)."""
    spool = tmp / device / "spool"
    client = Client(
        artifacts=zoo / "artifacts",
        model="digits",
        policy="local_only",
        runtime="onnx",
        cache_dir=tmp / device / "cache",
        telemetry=TelemetryConfig(spool_dir=spool, device_id=device, interval_s=3600),
    )
    try:
        answers = [int(np.argmax(client.infer(x[i : i + 1]).output)) for i in range(len(x))]
    finally:
        client.close()
    return answers, spool


@pytest.mark.parametrize("sigma", NOISE)
def test_fleet_estimate_is_within_two_points_of_true_accuracy(
    digits_zoo: Path, tmp_path: Path, sigma: float
) -> None:
    split = load_example("digits").load_split()
    rng = np.random.default_rng(7)
    x = np.concatenate([split.x_test] * DRAWS).astype(np.float32)
    y = np.concatenate([split.y_test] * DRAWS)
    if sigma:
        x = np.clip(x + rng.normal(0.0, sigma, x.shape), 0.0, 16.0).astype(np.float32)
    service = FleetService(ServiceConfig(f"sqlite:///{tmp_path / 'fleet.db'}", tmp_path / "store"))
    try:
        correct = 0
        for device, rows in zip(
            [f"dev-{i}" for i in range(DEVICES)],
            np.array_split(np.arange(len(x)), DEVICES),
            strict=True,
        ):
            answers, spool = _answer(digits_zoo, tmp_path, device, x[rows])
            correct += sum(int(a == t) for a, t in zip(answers, y[rows], strict=True))
            summaries = [s for f in sorted(spool.iterdir()) for s in read_spool_file(f)]
            assert summaries and all(s.confidence_sum > 0 for s in summaries)
            service.ingest(summaries)
        stats = service.store.telemetry_stats("digits", 1)
        truth = correct / len(x)
        assert stats.requests == len(x) and sum(stats.confidence_buckets) == len(x)
        assert stats.estimated_accuracy is not None
        assert abs(stats.estimated_accuracy - truth) <= 0.02, (sigma, truth, stats)
        if sigma:
            assert truth < 0.97  # the noise is real: the model does visibly worse
    finally:
        service.close()


def test_estimate_falls_back_to_bucket_midpoints_for_older_agents(tmp_path: Path) -> None:
    """Summaries without a confidence sum (agents that predate it) still give an estimate,
    from the bucket midpoints; one device with a sum does not skew the others' midpoints."""
    service = FleetService(ServiceConfig(f"sqlite:///{tmp_path / 'f.db'}", tmp_path / "store"))
    try:
        old = summary("old", 1)
        old.confidence_buckets.extend([0] * 18 + [10, 0])  # 10 answers in [0.90, 0.95)
        new = summary("new", 1)
        new.confidence_buckets.extend([0] * 19 + [10])
        new.confidence_sum = 9.9
        service.ingest([old, new])
        stats = service.store.telemetry_stats(old.model, 1)
        assert stats.confidence_sum == 0.0  # not every device sent one: midpoints for all
        assert stats.estimated_accuracy == pytest.approx((10 * 0.925 + 10 * 0.975) / 20)
    finally:
        service.close()


def test_an_older_database_gains_the_new_column(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    FleetService(ServiceConfig(url, tmp_path / "store")).close()
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE telemetry DROP COLUMN confidence_sum"))
    engine.dispose()
    service = FleetService(ServiceConfig(url, tmp_path / "store"))
    try:
        s = summary("d", 1)
        s.confidence_buckets.extend([0] * 19 + [4])
        s.confidence_sum = 3.9
        service.ingest([s])
        assert service.store.telemetry_stats(s.model, 1).confidence_sum == pytest.approx(3.9)
    finally:
        service.close()
