"""The pure delivery decisions (`tandem.agent.delivery`), without a broker or a disk."""

from __future__ import annotations

import pytest

from tandem.agent import errors
from tandem.agent.delivery import REREQUEST_MIN_S, DeliveryState, Next, no_space


def state(**changes: int) -> DeliveryState:
    values = {"base_version": 2, "attempts": 3}
    values.update(changes)
    return DeliveryState(**values)


def test_a_file_is_asked_for_as_a_delta_until_its_delta_fails() -> None:
    s = state()
    assert s.delta_base("model.onnx.zst") == 2
    assert s.delta_bases("model.onnx.zst") == frozenset({2})
    assert s.file_failed("model.onnx.zst", is_delta=True) is Next.FETCH_FULL
    assert s.delta_base("model.onnx.zst") == 0
    assert s.delta_bases("model.onnx.zst") == frozenset()
    assert s.delta_base("labels.json.zst") == 2  # the other files keep their delta


def test_no_delta_base_means_full_files() -> None:
    s = state(base_version=0)
    assert s.delta_base("model.onnx.zst") == 0
    assert s.delta_bases("model.onnx.zst") == frozenset()


def test_delta_failures_cost_no_attempt() -> None:
    s = state(attempts=1)
    for _ in range(5):
        assert s.file_failed("model.onnx.zst", is_delta=True) is Next.FETCH_FULL
    assert s.failures == 0


@pytest.mark.parametrize("attempts", [1, 2, 3])
def test_n_full_file_digest_failures_refuse(attempts: int) -> None:
    s = state(attempts=attempts)
    answers = [s.file_failed("model.onnx.zst", is_delta=False) for _ in range(attempts)]
    assert answers == [Next.RETRY_FILE] * (attempts - 1) + [Next.REFUSE]
    refusal = s.refusal("model.onnx.zst", "sha256 mismatch")
    assert refusal.code == errors.DIGEST_MISMATCH
    assert f"({attempts} attempts)" in str(refusal)
    assert "model.onnx.zst: sha256 mismatch" in str(refusal)


def test_failures_count_over_the_whole_delivery() -> None:
    s = state(attempts=2)
    assert s.file_failed("a.zst", is_delta=False) is Next.RETRY_FILE
    assert s.file_failed("b.zst", is_delta=False) is Next.REFUSE


def test_the_same_gap_is_asked_for_once_per_interval_unless_forced() -> None:
    s = state()
    assert s.should_request("a.zst", 100, now=10.0, force=False)
    assert s.last_activity == 10.0
    assert not s.should_request("a.zst", 100, now=10.0 + REREQUEST_MIN_S / 2, force=False)
    assert s.should_request("a.zst", 100, now=10.0 + REREQUEST_MIN_S / 2, force=True)
    assert s.should_request("a.zst", 200, now=10.6, force=False)  # a new offset: at once
    assert s.should_request("b.zst", 200, now=10.7, force=False)  # a new file: at once
    assert s.should_request("b.zst", 200, now=10.7 + REREQUEST_MIN_S, force=False)


def test_progress_is_due_every_so_many_bytes() -> None:
    s = state()
    assert not s.progress_due(999, every_bytes=1000)
    assert s.progress_due(1000, every_bytes=1000)
    assert not s.progress_due(1999, every_bytes=1000)
    assert s.progress_due(2500, every_bytes=1000)
    assert s.reported_bytes == 2500


def test_idle_time_counts_from_the_last_activity() -> None:
    s = DeliveryState(base_version=0, attempts=3, last_activity=5.0)
    assert s.idle_for(7.5) == 2.5


def test_a_store_that_cannot_hold_the_delivery_is_a_no_space_refusal() -> None:
    refusal = no_space(OSError(28, "No space left on device"))
    assert refusal.code == errors.NO_SPACE
    assert "No space left" in str(refusal)
