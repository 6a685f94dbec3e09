"""The app beside each agent in the end-to-end fleet test: one SDK client per device store,
answering digits requests locally (cloud when there is no local model yet), shadowing half
of the local answers to the cloud tier, and spooling telemetry for its agent to ship.

    python -m tests.fleet.app_traffic CLOUD_ADDR TEST_SPLIT.npz DEVICE=STORE [DEVICE=STORE ...]

Runs until SIGTERM. Prints nothing; the fleet service's telemetry is what the test reads.
"""

from __future__ import annotations

import contextlib
import gc
import signal
import sys
import threading
from pathlib import Path

import numpy as np

from tandem.agent.simulator import Dataset
from tandem.sdk.client import Client
from tandem.sdk.shadow import ShadowConfig
from tandem.sdk.telemetry import TelemetryConfig

RATE_PER_DEVICE = 15.0  # requests per second


def run_device(
    device_id: str, store: Path, cloud: str, data: Dataset, stop: threading.Event
) -> None:
    client = Client(
        "digits",
        artifacts=store,
        cloud=cloud,
        policy="prefer_local",
        shadow=ShadowConfig(fraction=0.5),
        telemetry=TelemetryConfig(
            spool_dir=store / ".telemetry-spool",
            device_id=device_id,
            interval_s=0.5,
            drain_interval_s=0.1,
        ),
        cache_dir=store.parent / f"sdk-cache-{device_id}",
        watch_interval_s=0.2,
    )
    rng = np.random.default_rng(abs(hash(device_id)) % 2**32)
    try:
        while not stop.is_set():
            inputs, _ = data.row(int(rng.integers(len(data))))
            # The app keeps going whatever happens; the SDK's telemetry counts the errors.
            with contextlib.suppress(Exception):
                client.infer(inputs)
            stop.wait(1.0 / RATE_PER_DEVICE)
    finally:
        client.close()


def main(argv: list[str]) -> int:
    cloud, data = argv[0], Dataset.load(Path(argv[1]))  # the demo's data set format
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    threads = []
    for spec in argv[2:]:
        device_id, store = spec.split("=", 1)
        Path(store).mkdir(parents=True, exist_ok=True)
        t = threading.Thread(
            target=run_device, args=(device_id, Path(store), cloud, data, stop), daemon=True
        )
        t.start()
        threads.append(t)
    stop.wait()  # the handler sets it: no poll interval to sleep out after SIGTERM
    for t in threads:
        t.join(10)
    gc.freeze()  # the clients are closed: skip the final collections (see tandem.cli.main)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
