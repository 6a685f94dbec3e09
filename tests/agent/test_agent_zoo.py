"""The real build pipeline's digits artifacts delivered to agents, one per runtime: each
verifies the pipeline's signature, warms up through the SDK runtime on its own reference
outputs, and reports healthy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tandem.agent import Agent, AgentConfig, BrokerAddress
from tandem.agent.detect import detect_runtimes
from tandem.sdk.artifacts import TrustedKeys, load_variant, parse_signatures
from tests.agent.artifacts import BuiltVariant
from tests.agent.conftest import USERS
from tests.agent.fleet_double import FleetDouble, Kind
from tests.support.processes import wait_until

VARIANTS = {
    "onnx-int8": "onnx",
    "openvino-int8": "openvino",
    "tflite-int8": "tflite",
    "torch-fp32": "torch",
}


def test_zoo_variants_install_on_their_runtimes(
    digits_zoo: Path, fleet: FleetDouble, tmp_path: Path
) -> None:
    public = digits_zoo / "keys" / "signing.pub"
    version_dir = max((digits_zoo / "artifacts" / "digits").iterdir(), key=lambda p: int(p.name))
    here = set(detect_runtimes())
    runnable = {v: r for v, r in VARIANTS.items() if r in here and (version_dir / v).is_dir()}
    if not runnable:
        pytest.skip(f"no digits variant for the runtimes here ({sorted(here)})")
    agents: list[Agent] = []
    devices = ["dev-1", "dev-2", "dev-3", "dev-4"]
    try:
        for device_id, (variant, runtime) in zip(devices, runnable.items(), strict=False):
            folder = version_dir / variant
            loaded = load_variant(folder, TrustedKeys.from_files([public]))
            signed = (folder / "manifest.json").read_bytes()
            sigs = parse_signatures((folder / "manifest.sig.json").read_bytes())
            agent = Agent(
                AgentConfig(
                    device_id=device_id,
                    broker=BrokerAddress.parse(fleet.broker.url),
                    store=tmp_path / device_id,
                    trusted_keys=(public,),
                    username=device_id,
                    password=USERS[device_id],
                    runtimes=(runtime,),
                    health_window_s=0.5,
                    health_probe_interval_s=0.2,
                )
            ).start()
            agents.append(agent)
            wait_until(lambda a=agent: a.connected, 10, message="connected")
            fleet.set_desired(device_id, BuiltVariant(folder, loaded.manifest, signed, sigs))
        for device_id, (variant, _) in zip(devices, runnable.items(), strict=False):
            version = int(version_dir.name)
            fleet.wait_report(device_id, Kind.HEALTHY, version, timeout=90)
            pointer = json.loads((tmp_path / device_id / "digits" / "active.json").read_text())
            assert (pointer["version"], pointer["variant"]) == (version, variant)
    finally:
        for agent in agents:
            agent.request_stop()  # all at once: their shutdowns overlap
        for agent in agents:
            agent.stop()
