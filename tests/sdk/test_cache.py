"""The prediction cache: its key, its LRU bounds, and hits through the client."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tandem.errors import ConfigError
from tandem.sdk import CacheConfig, Client
from tandem.sdk.cache import PredictionCache, cache_key

Factory = Callable[..., Client]


def _out(n: int, value: float = 1.0) -> dict[str, np.ndarray]:
    return {"logits": np.full((n, 10), value, np.float32)}


def test_cache_key_covers_version_dtype_shape_and_bytes() -> None:
    a = np.arange(8, dtype=np.float32).reshape(2, 4)
    base = cache_key(1, {"x": a})
    assert base == cache_key(1, {"x": a.copy()})
    assert base != cache_key(2, {"x": a})
    assert base != cache_key(1, {"x": a.reshape(4, 2)})
    assert base != cache_key(1, {"x": a.view(np.int32)})
    b = a.copy()
    b[0, 0] = 99
    assert base != cache_key(1, {"x": b})
    assert base != cache_key(1, {"y": a})


def test_cache_is_lru_and_bounded_by_entries_and_bytes() -> None:
    cache = PredictionCache(CacheConfig(max_entries=3, max_bytes=1 << 20))
    for i in range(5):
        cache.put(
            bytes([i]), _out(1), source="local", runtime="onnx", model_version=1, confidence=None
        )
    assert len(cache) == 3
    assert cache.get(bytes([0])) is None and cache.get(bytes([1])) is None
    assert cache.get(bytes([2])) is not None  # now most recent
    cache.put(bytes([9]), _out(1), source="local", runtime="onnx", model_version=1, confidence=None)
    assert cache.get(bytes([3])) is None and cache.get(bytes([2])) is not None

    per_entry = 10 * 4 * 4 + 1  # a 4x10 float32 output plus a 1-byte key
    small = PredictionCache(CacheConfig(max_entries=100, max_bytes=3 * per_entry))
    for i in range(6):
        small.put(
            bytes([i]), _out(4), source="local", runtime="onnx", model_version=1, confidence=None
        )
        assert small.nbytes <= 3 * per_entry
    assert len(small) == 3
    small.put(b"huge", _out(1000), source="local", runtime="onnx", model_version=1, confidence=None)
    assert small.get(b"huge") is None and len(small) == 3  # bigger than the cache: not kept
    hit = small.get(bytes([5]))
    assert hit is not None
    with pytest.raises(ValueError):
        hit.outputs["logits"][0, 0] = 5  # cached arrays are read-only
    with pytest.raises(ConfigError):
        CacheConfig(max_entries=-1)


def test_client_cache_hits_skip_the_runtime(
    clients: Factory, artifacts: Path, test_set: tuple[np.ndarray, np.ndarray]
) -> None:
    c = clients(artifacts=artifacts, policy="local_only", runtime="onnx", cache=8)
    x = test_set[0][:2]
    first = c.infer(x)
    second = c.infer(x.copy())
    assert not first.cached and second.cached
    assert second.source == "local" and second.model_version == first.model_version
    np.testing.assert_array_equal(first.output, second.output)
    assert second.confidence == first.confidence
    assert c.cache.hits == 1 and c.cache.misses == 1
    assert not c.infer(test_set[0][2:4]).cached
