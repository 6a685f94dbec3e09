"""A bounded LRU prediction cache, by entries and by bytes.

Keys hash the model version with every input's name, dtype, shape and bytes (BLAKE2b,
16 bytes), so equal requests to the same version hit and anything else misses. Values are
the outputs and where they came from; arrays are stored read-only so a caller cannot change
a cached answer in place.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from tandem.errors import ConfigError


@dataclass(frozen=True)
class CacheConfig:
    max_entries: int = 1024  # entries kept (0 disables the cache)
    max_bytes: int = 16 << 20  # bytes of output arrays kept

    def __post_init__(self) -> None:
        if self.max_entries < 0:
            raise ConfigError("max_entries", f"must be >= 0, got {self.max_entries}")
        if self.max_bytes < 0:
            raise ConfigError("max_bytes", f"must be >= 0 bytes, got {self.max_bytes}")


def cache_key(version: int, feeds: Mapping[str, np.ndarray[Any, Any]]) -> bytes:
    digest = hashlib.blake2b(digest_size=16)
    digest.update(version.to_bytes(8, "little", signed=True))
    for name in sorted(feeds):
        array = feeds[name]
        digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(np.ascontiguousarray(array).data.cast("B"))
    return digest.digest()


@dataclass(frozen=True)
class CachedAnswer:
    outputs: Mapping[str, np.ndarray[Any, Any]]
    source: str
    runtime: str | None
    model_version: int | str | None
    confidence: float | None
    nbytes: int


class PredictionCache:
    def __init__(self, config: CacheConfig) -> None:
        self.config = config
        self._entries: OrderedDict[bytes, CachedAnswer] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.config.max_entries > 0 and self.config.max_bytes > 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get(self, key: bytes) -> CachedAnswer | None:
        with self._lock:
            answer = self._entries.get(key)
            if answer is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return answer

    def put(
        self,
        key: bytes,
        outputs: Mapping[str, np.ndarray[Any, Any]],
        *,
        source: str,
        runtime: str | None,
        model_version: int | str | None,
        confidence: float | None,
    ) -> None:
        frozen = {}
        nbytes = len(key)
        for name, array in outputs.items():
            copy = np.array(array, copy=True)
            copy.flags.writeable = False
            frozen[name] = copy
            nbytes += copy.nbytes
        if nbytes > self.config.max_bytes:
            return  # larger than the whole cache: never stored
        answer = CachedAnswer(frozen, source, runtime, model_version, confidence, nbytes)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._entries[key] = answer
            self._bytes += nbytes
            while (
                len(self._entries) > self.config.max_entries or self._bytes > self.config.max_bytes
            ):
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.nbytes

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0
