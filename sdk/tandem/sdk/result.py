"""`Result`: what one `infer` call returns."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from tandem.sdk.signature import Signature

_UNSET: Any = object()


class Result:
    """The outputs of one call and where they came from.

    `source` is "local" or "cloud"; `runtime` is the local runtime ("onnx", "tflite", ...) or
    "cloud"; `model_version` the local version, or the version the server reported.
    `confidence` is the calibrated confidence (max softmax(logits / temperature)) of the least
    confident row, for classifiers; None otherwise. Timings are in milliseconds.
    """

    __slots__ = (
        "_confidence",
        "_signature",
        "cached",
        "cloud_error",
        "cloud_ms",
        "endpoint",
        "escalated",
        "fallback",
        "hedged",
        "local_ms",
        "model_version",
        "outputs",
        "runtime",
        "source",
        "total_ms",
    )

    def __init__(
        self,
        outputs: Mapping[str, np.ndarray[Any, Any]],
        source: str,
        runtime: str,
        model_version: int | str | None,
        signature: Signature | None,
        local_ms: float | None = None,
        *,
        cloud_ms: float | None = None,
        endpoint: str | None = None,
        confidence: float | None = _UNSET,
    ) -> None:
        self.outputs = outputs
        self.source = source
        self.runtime = runtime
        self.model_version = model_version
        self._signature = signature
        self._confidence = confidence
        self.local_ms = local_ms
        self.cloud_ms = cloud_ms
        self.total_ms = 0.0
        self.endpoint = endpoint
        self.cached = False  # answered from the prediction cache
        self.fallback = False  # answered by the policy's second choice of path
        self.escalated = False  # cascade: the local answer was not confident enough
        self.hedged = False  # deadline: the other path was started too
        self.cloud_error: str | None = None  # cascade kept the local answer: the cloud failed

    def compute_confidence(self) -> float | None:
        if self._confidence is _UNSET:
            sig = self._signature
            self._confidence = sig.confidence(self.outputs) if sig is not None else None
        result: float | None = self._confidence
        return result

    @property
    def confidence(self) -> float | None:
        return self.compute_confidence()

    @property
    def confidences(self) -> np.ndarray[Any, Any] | None:
        """Per-row calibrated confidence (classifiers)."""
        return self._signature.confidences(self.outputs) if self._signature is not None else None

    @property
    def timings(self) -> dict[str, float]:
        timings = {"total_ms": self.total_ms}
        if self.local_ms is not None:
            timings["local_ms"] = self.local_ms
        if self.cloud_ms is not None:
            timings["cloud_ms"] = self.cloud_ms
        return timings

    @property
    def output(self) -> np.ndarray[Any, Any]:
        """The only output (raises KeyError naming them when there are several)."""
        if len(self.outputs) != 1:
            raise KeyError(f"the model has {len(self.outputs)} outputs: {list(self.outputs)}")
        return next(iter(self.outputs.values()))

    def __getitem__(self, name: str) -> np.ndarray[Any, Any]:
        return self.outputs[name]

    def __repr__(self) -> str:
        shapes = {k: tuple(v.shape) for k, v in self.outputs.items()}
        return (
            f"Result(source={self.source!r}, runtime={self.runtime!r}, "
            f"model_version={self.model_version!r}, outputs={shapes}, "
            f"total_ms={self.total_ms:.3f})"
        )
