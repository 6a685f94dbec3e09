"""The command line of a real device agent (`tandem agent run`), shared by every test that
starts one: the agent, fleet, end-to-end and reliability suites differ only in the values."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tests.support.serve import TANDEM


def agent_argv(
    device_id: str,
    broker_url: str,
    password: str,
    store: Path,
    trusted_key: Path,
    *,
    runtimes: Sequence[str] = (),
    tags: Sequence[str] = ("site=lab",),
    health_window: float = 1.5,
    health_probe_interval: float = 0.5,
    telemetry_interval: float = 0.5,
    stall_timeout: float | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """`tandem agent run` for `device_id`, logging in to the broker as itself, with short
    health windows and telemetry intervals so that a test sees a rollout through quickly."""
    argv = [
        str(TANDEM), "agent", "run",
        "--device-id", device_id,
        "--broker", broker_url,
        "--username", device_id,
        "--password", password,
        "--store", str(store),
        "--trusted-key", str(trusted_key),
    ]  # fmt: skip
    for tag in tags:
        argv += ["--tag", tag]
    for runtime in runtimes:
        argv += ["--runtime", runtime]
    argv += [
        "--health-window", f"{health_window:g}",
        "--health-probe-interval", f"{health_probe_interval:g}",
        "--telemetry-interval", f"{telemetry_interval:g}",
    ]  # fmt: skip
    if stall_timeout is not None:
        argv += ["--stall-timeout", f"{stall_timeout:g}"]
    return argv + list(extra)
