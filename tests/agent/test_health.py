"""Health verdicts of a new version (`tandem.agent.health`), without a broker."""

from __future__ import annotations

from tandem.agent.health import HealthWatch, Verdict


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
