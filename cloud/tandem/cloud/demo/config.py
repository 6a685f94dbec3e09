"""The demo's settings: one frozen dataclass, checked at construction, each unit commented."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from tandem.errors import ConfigError

RUNTIMES = ("onnx", "tflite", "openvino", "torch")
BROKERS = ("auto", "mosquitto", "embedded")


@dataclass(frozen=True)
class DemoConfig:
    zoo: Path  # the model zoo (built here when missing)
    workdir: Path  # everything the run writes: fleet DB, device stores, broker config, logs
    devices: int = 20  # simulated devices, spread over RUNTIMES in turn
    duration_s: float = 60.0  # seconds of traffic at least; also paces the rollouts' soaks
    keep_running: bool = False  # after the story, keep everything up until Ctrl-C
    rate_per_s: float = 4.0  # requests per second per device
    shadow_fraction: float = 0.25  # share of local answers also asked of the cloud
    max_accuracy_loss: float = 0.01  # the cascade threshold is derived for this loss
    health_window_s: float = 3.0  # seconds an agent watches a new version before HEALTHY
    stage_timeout_s: float = 180.0  # seconds a rollout may take before the story gives up
    host: str = "127.0.0.1"  # every process binds to loopback
    broker: str = "auto"  # auto (Mosquitto when installed, else embedded), mosquitto, embedded

    def __post_init__(self) -> None:
        if not 1 <= self.devices <= 200:
            raise ConfigError("devices", f"must be 1..200, got {self.devices}")
        if not (math.isfinite(self.duration_s) and 5 <= self.duration_s <= 24 * 3600):
            raise ConfigError("duration", f"must be 5..86400 seconds, got {self.duration_s}")
        if not 0 < self.rate_per_s <= 100:
            raise ConfigError("rate", f"must be in (0, 100] requests/s, got {self.rate_per_s}")
        if not 0 < self.shadow_fraction <= 1:
            raise ConfigError("shadow_fraction", f"must be in (0, 1], got {self.shadow_fraction}")
        if self.health_window_s < 0:
            raise ConfigError("health_window_s", "must be >= 0")
        if self.broker not in BROKERS:
            raise ConfigError("broker", f"must be one of {', '.join(BROKERS)}, got {self.broker!r}")
        object.__setattr__(self, "zoo", Path(self.zoo).absolute())
        object.__setattr__(self, "workdir", Path(self.workdir).absolute())

    @property
    def soak_s(self) -> float:
        """Minimum soak of each rollout stage: a tenth of the duration, 2..60 seconds."""
        return min(60.0, max(2.0, self.duration_s / 10))

    @property
    def max_wait_s(self) -> float:
        """How long a soaked stage may wait for its gates' evidence before the rollout pauses:
        two thirds of the story's per-stage timeout, so a pause (which names the gates that
        lacked data) comes before the story gives up."""
        return max(10.0, self.stage_timeout_s * 2 / 3)

    def runtime_of(self, index: int) -> str:
        return RUNTIMES[index % len(RUNTIMES)]
