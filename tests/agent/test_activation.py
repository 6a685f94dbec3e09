"""Activation's pruning (`tandem.agent.activation`), without a broker."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from tandem.agent.activation import ActivationMixin
from tandem.agent.verify import Offer
from tandem.sdk.artifacts import MANIFEST_FILE
from tandem.sdk.store import ActivePointer, ModelStore


def _variant(store: ModelStore, version: int, variant: str = "onnx-int8") -> Path:
    folder = store.model_dir("digits") / str(version) / variant
    folder.mkdir(parents=True)
    (folder / MANIFEST_FILE).write_text("{}")
    return folder


def test_prune_keeps_the_version_being_installed(tmp_path: Path) -> None:
    """v1's health window can end while v2 is already installing (a quick next rollout
    stage): pruning then keeps v2 as well as the active and previous versions. It used to
    delete v2's files under the warm-up, leaving the SDK an active version it could not load."""
    store = ModelStore(tmp_path)
    old, previous, active, installing = (_variant(store, v) for v in (1, 2, 3, 4))
    store.write_active("digits", ActivePointer(3, "onnx-int8", 2, "onnx-int8"))
    offer = Offer("digits", 4, "onnx-int8", b"", ())
    agent = SimpleNamespace(store=store, _desired={"digits": offer}, _delivery=None)
    ActivationMixin._prune(agent, "digits")  # type: ignore[arg-type]
    assert not old.exists()
    assert previous.exists() and active.exists() and installing.exists()
    agent._desired = {}
    ActivationMixin._prune(agent, "digits")  # type: ignore[arg-type]
    assert not installing.exists() and active.exists() and previous.exists()
