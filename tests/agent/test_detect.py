"""Hardware and runtime detection (`tandem.agent.detect`)."""

from __future__ import annotations

import pytest


def test_detection_reports_hardware_and_importable_runtimes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tandem.agent import detect

    found = detect.detect_runtimes()
    assert "onnx" in found and found == detect._detect_from_table()
    monkeypatch.setattr(detect.platform, "machine", lambda: "AMD64")
    assert detect.detect_hardware() == "x86_64"
    monkeypatch.setattr(detect.platform, "machine", lambda: "arm64")
    assert detect.detect_hardware() == "aarch64"
