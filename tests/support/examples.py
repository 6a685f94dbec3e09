"""The example specs' own code (examples/<name>/*.py), imported for tests and benches.

Each module is imported from its file under a name of its own (`examples.<name>.<module>`
would need packages; two examples both have a `train.py`), once per process.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def spec_file(name: str) -> Path:
    """examples/<name>/model.toml."""
    return EXAMPLES / name / "model.toml"


@functools.cache
def load_example(name: str, module: str = "train") -> ModuleType:
    """examples/<name>/<module>.py as a module (registered in sys.modules, so pickling and
    dataclasses work as in any imported module)."""
    path = EXAMPLES / name / f"{module}.py"
    qualified = f"tandem_example_{name}_{module}"
    loaded = importlib.util.spec_from_file_location(qualified, path)
    if loaded is None or loaded.loader is None:
        raise ImportError(f"cannot import {path}")
    imported = importlib.util.module_from_spec(loaded)
    sys.modules[qualified] = imported
    try:
        loaded.loader.exec_module(imported)
    except BaseException:
        del sys.modules[qualified]
        raise
    return imported
