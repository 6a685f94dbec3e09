"""Agent config validation (`tandem.agent.config`), and how `tandem agent run` reports it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tandem.agent.config import AgentConfig, BrokerAddress
from tandem.errors import ConfigError


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
