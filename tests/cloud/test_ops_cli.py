"""`tandem rollout ...` and `tandem devices list` as real processes against a running fleet
(real Mosquitto, a `tandem fleet serve` process, simulated devices)."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tandem.cloud.console.cli import parse_gate, parse_stage, parse_tags
from tandem.errors import ConfigError
from tests.e2e.test_console_support import TANDEM, TOKEN, ConsoleFleet
from tests.support.mosquitto import Broker

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def fleet(tmp_path: Path, mosquitto_factory: Callable[..., Broker]) -> Iterator[ConsoleFleet]:
    f = ConsoleFleet(tmp_path, mosquitto_factory, devices=4)
    yield f
    f.stop()


def tandem(
    fleet: ConsoleFleet, *args: str, token: str | None = TOKEN, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TANDEM_URL": fleet.url, "COLUMNS": "200", "NO_COLOR": "1"}
    env.pop("TANDEM_TOKEN", None)
    if token is not None:
        env["TANDEM_TOKEN"] = token
    return subprocess.run(
        [TANDEM, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_spec_parsing_names_the_wrong_option() -> None:
    assert parse_stage("10:60") == {"percent": 10.0, "min_soak_s": 60.0}
    assert parse_stage("100") == {"percent": 100.0, "min_soak_s": 0.0}
    assert parse_gate("error_rate:0.02:50") == {
        "metric": "error_rate",
        "threshold": 0.02,
        "min_samples": 50,
    }
    assert parse_gate("error_rate:+0.01") == {
        "metric": "error_rate",
        "threshold": 0.01,
        "relative": True,
    }
    assert parse_tags(["ring=canary"]) == {"ring": "canary"}
    for bad, fn in (("x", parse_stage), ("latency:1", parse_gate), ("a:b", parse_gate)):
        with pytest.raises(ConfigError):
            fn(bad)


def test_rollout_lifecycle_from_the_command_line(fleet: ConsoleFleet) -> None:
    devices = tandem(fleet, "devices", "list")
    assert devices.returncode == 0, devices.stderr
    assert "4 online of 4" in devices.stdout
    for i in range(4):
        assert f"dev-{i:02d}" in devices.stdout
    assert "digits v1" in devices.stdout
    canary = tandem(fleet, "devices", "list", "--tag", "ring=canary")
    assert "2 online of 2" in canary.stdout and "dev-02" not in canary.stdout

    created = tandem(
        fleet, "rollout", "create", "digits", "2",
        "--stage", "25:600", "--stage", "50:600", "--stage", "100",
        "--gate", "error_rate:0.05:10", "--device-timeout", "30",
        "--false-abort-rate", "0.005",
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    match = re.search(r"created rollout (r-[0-9a-f]+)", created.stdout)
    assert match, created.stdout
    rid = match.group(1)
    r = fleet.rollout(rid)
    assert [s["percent"] for s in r["stages"]] == [25.0, 50.0, 100.0]
    assert r["stages"][0]["gates"][0]["metric"] == "error_rate"
    assert r["created_by"] == "alice"
    assert r["false_abort_rate"] == 0.005

    listed = tandem(fleet, "rollout", "list")
    assert rid in listed.stdout and "running" in listed.stdout

    assert "paused" in tandem(fleet, "rollout", "pause", rid).stdout
    assert fleet.rollout(rid)["status"] == "paused"
    # Pausing twice is a conflict: a clear error and a failing exit code.
    again = tandem(fleet, "rollout", "pause", rid)
    assert again.returncode == 1 and "409" in again.stderr
    assert "running" in tandem(fleet, "rollout", "resume", rid).stdout
    tandem(fleet, "rollout", "promote", rid)
    assert fleet.rollout(rid)["stage_index"] == 1

    status = tandem(fleet, "rollout", "status", rid)
    assert status.returncode == 0, status.stderr
    assert "Stages" in status.stdout and "resumed" in status.stdout

    # --watch follows it live; a promote from elsewhere moves it to the end.
    watch = subprocess.Popen(
        [TANDEM, "rollout", "status", rid, "--watch", "--interval", "0.3"],
        env={**os.environ, "TANDEM_URL": fleet.url, "TANDEM_TOKEN": TOKEN, "COLUMNS": "200"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        tandem(fleet, "rollout", "promote", rid)
        out, err = watch.communicate(timeout=60)
    finally:
        if watch.poll() is None:
            watch.kill()
    assert watch.returncode == 0, err
    assert f"rollout {rid} completed" in out
    assert fleet.rollout(rid)["status"] == "completed"

    # Abort asks for confirmation; "n" leaves the rollout alone.
    second = fleet.post(
        "/api/v1/rollouts",
        {"model": "digits", "version": 3, "stages": [{"percent": 50, "min_soak_s": 600}]},
    )["rollout_id"]
    env = {**os.environ, "TANDEM_URL": fleet.url, "TANDEM_TOKEN": TOKEN}
    no = subprocess.run(
        [TANDEM, "rollout", "abort", second], input="n\n", env=env,
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert no.returncode == 1 and fleet.rollout(second)["status"] == "running"
    yes = tandem(fleet, "rollout", "abort", second, "--yes")
    assert yes.returncode == 0 and "aborted" in yes.stdout
    assert fleet.rollout(second)["status"] == "aborted"


def test_a_missing_or_wrong_token_is_refused(fleet: ConsoleFleet) -> None:
    for token in (None, "wrong"):
        r = tandem(fleet, "rollout", "list", token=token)
        assert r.returncode == 1
        assert "401" in r.stderr
    down = subprocess.run(
        [TANDEM, "devices", "list", "--url", "http://127.0.0.1:9", "--token", TOKEN],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert down.returncode == 1 and "cannot reach" in down.stderr


def test_the_gate_table_shows_bounds_samples_and_reasons() -> None:
    """`tandem rollout status` renders each gate's value, interval, samples and why."""
    from rich.console import Console

    from tandem.cloud.console.cli import rollout_view

    gate = {
        "metric": "error_rate", "value": 0.012, "threshold": 0.05, "passed": None,
        "samples": 340, "baseline": 0.01, "low": -0.004, "high": 0.031,
        "reason": "interval [-0.004, 0.031] straddles 0.05",
    }  # fmt: skip
    accuracy = {**gate, "metric": "estimated_accuracy", "value": 0.93, "threshold": 0.02,
                "passed": True, "low": 0.91, "high": 0.95, "reason": "within 0.02"}  # fmt: skip
    detail = {
        "rollout": {
            "rollout_id": "r-1", "model": "digits", "version": 2, "baseline_version": 1,
            "status": "running", "stage_index": 0, "paused_reason": None,
        },
        "targeted_devices": 4, "stages": [], "events": [], "gates": [gate, accuracy],
    }  # fmt: skip
    out = Console(record=True, width=200)
    out.print(rollout_view(detail))
    text = out.export_text()
    assert "interval" in text and "why" in text
    row = next(line for line in text.splitlines() if "error_rate" in line)
    assert "1.2%" in row and "[-0.004, 0.031]" in row and "340" in row and "waiting" in row
    assert "straddles" in row
    row = next(line for line in text.splitlines() if "estimated_accuracy" in line)
    assert ">= 2.0%" in row and "pass" in row


def test_the_cli_and_the_console_offer_every_gate_the_engine_judges() -> None:
    # Both keep their own lists (they talk REST, not to the engine); this keeps them in step.
    from tandem.cloud.console import cli
    from tandem.cloud.fleet.plan import HIGHER_IS_BETTER, GateMetric

    engine = {m.value for m in GateMetric}
    assert set(cli.GATE_METRICS) == engine
    assert {m.value for m in HIGHER_IS_BETTER} == cli.HIGHER_IS_BETTER
    js = (Path(cli.__file__).parent / "static" / "console.js").read_text()
    listed = re.search(r"const METRICS = \[([^\]]*)\]", js)
    higher = re.search(r"const HIGHER_IS_BETTER = new Set\(\[([^\]]*)\]\)", js)
    assert listed and higher
    assert set(re.findall(r'"(\w+)"', listed.group(1))) == engine
    assert set(re.findall(r'"(\w+)"', higher.group(1))) == cli.HIGHER_IS_BETTER
    assert parse_gate("acceptance_rate:0.6:100")["metric"] == "acceptance_rate"
