"""Local runtimes behind one interface, registered by name."""

from __future__ import annotations

from tandem.sdk.runtimes.base import (
    ENTRY_POINT_GROUP,
    Runtime,
    get_runtime,
    register_runtime,
    runtime_names,
)

__all__ = ["ENTRY_POINT_GROUP", "Runtime", "get_runtime", "register_runtime", "runtime_names"]
