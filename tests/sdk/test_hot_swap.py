"""Hot swap: the active pointer flips under concurrent load and no call fails."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np

from tandem.sdk import Client
from tandem.sdk.store import ActivePointer
from tests.sdk.conftest import make_store
from tests.support.processes import wait_until


def test_swap_under_concurrent_load(
    clients: Callable[..., Client],
    artifacts: Path,
    tmp_path: Path,
    test_set: tuple[np.ndarray, np.ndarray],
) -> None:
    store = make_store(artifacts, tmp_path / "store", versions=(1, 2), active=1)
    client = clients(artifacts=store.root, policy="local_only", watch_interval_s=0.02)
    assert client.current is not None and client.current.version == 1
    x = test_set[0][:8]
    stop = threading.Event()
    errors: list[BaseException] = []
    seen: list[list[int]] = [[] for _ in range(4)]

    def hammer(i: int) -> None:
        while not stop.is_set():
            try:
                seen[i].append(int(client.infer(x).model_version))  # type: ignore[arg-type]
            except BaseException as exc:  # noqa: BLE001 - any failure fails the test
                errors.append(exc)
                return

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()

    def calls() -> int:
        return sum(len(v) for v in seen)

    def more_calls(than: int) -> None:  # every hammer thread is running calls
        wait_until(lambda: all(seen) and calls() >= than + 8, timeout=10, message="load")

    try:
        more_calls(0)
        for target in (2, 1, 2):
            store.write_active("digits", ActivePointer(version=target, variant=None))
            wait_until(
                lambda t=target: client.current is not None and client.current.version == t,
                timeout=10,
                message=f"swap to v{target}",
            )
            # Every call started after the swap uses the new version.
            assert client.infer(x).model_version == target
            more_calls(calls())  # load on the new version before the next swap
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert not errors, errors[:3]
    assert all(v in (1, 2) for s in seen for v in s)
    assert sum(len(s) for s in seen) > 40
    assert {1, 2} <= {v for s in seen for v in s}
    assert client.local_models is not None and client.local_models.swaps == 3
    # Each thread saw versions change in runs (no interleaving noise within a thread beyond the
    # three flips): count the changes.
    for s in seen:
        changes = sum(1 for a, b in itertools.pairwise(s) if a != b)
        assert changes <= 3


def test_in_flight_calls_finish_on_the_old_version(
    clients: Callable[..., Client],
    artifacts: Path,
    tmp_path: Path,
    test_set: tuple[np.ndarray, np.ndarray],
) -> None:
    store = make_store(artifacts, tmp_path / "store", versions=(1, 2), active=1)
    client = clients(artifacts=store.root, policy="local_only", watch_interval_s=0)
    old = client.current
    assert old is not None
    started, release = threading.Event(), threading.Event()
    run = old.run

    def slow(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        started.set()
        release.wait(10)
        return run(feeds)

    old.run = slow  # type: ignore[method-assign]
    out: list[object] = []
    worker = threading.Thread(target=lambda: out.append(client.infer(test_set[0][:2])))
    worker.start()
    assert started.wait(10)
    store.write_active("digits", ActivePointer(version=2, variant=None))
    assert client.refresh()
    assert client.infer(test_set[0][:2]).model_version == 2  # new calls: new version
    release.set()
    worker.join(10)
    assert out and out[0].model_version == 1  # type: ignore[attr-defined]


def test_a_broken_new_version_keeps_the_old_one(
    clients: Callable[..., Client],
    artifacts: Path,
    tmp_path: Path,
    test_set: tuple[np.ndarray, np.ndarray],
) -> None:
    store = make_store(artifacts, tmp_path / "store", versions=(1, 2), active=1)
    broken = store.root / "digits" / "2" / "onnx-int8" / "model.onnx.zst"
    broken.write_bytes(b"not zstd at all")
    client = clients(artifacts=store.root, policy="local_only", watch_interval_s=0)
    store.write_active("digits", ActivePointer(version=2, variant=None))
    assert not client.refresh()
    assert client.infer(test_set[0][:2]).model_version == 1
    assert client.local_models is not None and client.local_models.error is not None


def test_artifacts_folder_without_active_pointer_uses_the_highest_version(
    clients: Callable[..., Client],
    artifacts: Path,
    tmp_path: Path,
    test_set: tuple[np.ndarray, np.ndarray],
) -> None:
    store = make_store(artifacts, tmp_path / "store", versions=(1,), active=None)
    client = clients(artifacts=store.root, policy="local_only", watch_interval_s=0.02)
    assert client.infer(test_set[0][:1]).model_version == 1
    make_store(artifacts, tmp_path / "store", versions=(2,), active=None)
    wait_until(lambda: client.current is not None and client.current.version == 2, timeout=10)
