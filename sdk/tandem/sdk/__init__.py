"""The on-device SDK: local runtimes, routing policies and the cloud fallback.

from tandem.sdk import Client
with Client(model="digits", artifacts="artifacts/", cloud="localhost:8001",
            policy="cascade", threshold=0.9) as client:
    result = client.infer(pixels)
"""

from __future__ import annotations

from tandem.sdk.cache import CacheConfig
from tandem.sdk.client import Client
from tandem.sdk.cloud import CloudConfig
from tandem.sdk.local import SelectionConfig
from tandem.sdk.policies import (
    POLICIES,
    Cascade,
    CloudOnly,
    Deadline,
    LocalOnly,
    Policy,
    PreferCloud,
    PreferLocal,
    make_policy,
)
from tandem.sdk.resilience import BreakerConfig, CircuitBreaker, Retry
from tandem.sdk.result import Result
from tandem.sdk.shadow import ShadowConfig
from tandem.sdk.telemetry import TelemetryConfig

__all__ = [
    "POLICIES",
    "BreakerConfig",
    "CacheConfig",
    "Cascade",
    "CircuitBreaker",
    "Client",
    "CloudConfig",
    "CloudOnly",
    "Deadline",
    "LocalOnly",
    "Policy",
    "PreferCloud",
    "PreferLocal",
    "Result",
    "Retry",
    "SelectionConfig",
    "ShadowConfig",
    "TelemetryConfig",
    "make_policy",
]
