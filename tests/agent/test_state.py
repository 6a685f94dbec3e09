"""The agent's persisted state (`tandem.agent.state`): round trip and corruption."""

from __future__ import annotations

from pathlib import Path

from tandem.agent.state import AgentState, PendingHealth


def test_state_round_trip_and_corruption(tmp_path: Path) -> None:
    state = AgentState(tmp_path)
    memory = state.model("digits")
    memory.max_accepted_version = 7
    memory.failed.add((6, "onnx-int8"))
    memory.health = PendingHealth(7, "onnx-int8", (5, "onnx-int8"), 123.5, "r9")
    state.remember_refusal("k" * 64, "expired: x")
    state.save()
    again = AgentState(tmp_path)
    again.load()
    loaded = again.model("digits")
    assert loaded.max_accepted_version == 7 and loaded.failed == {(6, "onnx-int8")}
    assert loaded.health == memory.health and again.refused == {"k" * 64: "expired: x"}
    (tmp_path / "state.json").write_text('{"models": {"digits": {"failed": 5}}}')
    broken = AgentState(tmp_path)
    broken.load()  # logged and ignored, never raised
    assert broken.models == {}
