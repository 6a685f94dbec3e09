"""Importing a spec's own Python code: `"module:function"` references relative to its folder.

`[full] factory`, `[prepare] function`, `[edge.distill] student` and `augment` each name a
function in a module beside the spec. The module is imported from its file under a name of
its own (two specs may both have a `train.py`), with the spec's folder on `sys.path` while it
is imported and while the function runs, so it can import its siblings.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

from tandem.cloud.build.errors import SpecError


@contextlib.contextmanager
def on_path(folder: Path) -> Iterator[None]:
    """`folder` first on sys.path for the duration (the spec's code imports its siblings)."""
    entry = str(folder)
    sys.path.insert(0, entry)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(entry)


@functools.lru_cache(maxsize=32)
def _import(module_file: Path, module_name: str, stamp: tuple[int, int]) -> ModuleType:
    # `stamp` (mtime, size) keys the cache: an edited file is imported afresh.
    loaded = importlib.util.spec_from_file_location(
        f"tandem_spec_code_{abs(hash((str(module_file), stamp)))}.{module_name}", module_file
    )
    if loaded is None or loaded.loader is None:
        raise ImportError(f"cannot import {module_file}")
    module = importlib.util.module_from_spec(loaded)
    # Registered first, as importlib's own recipe does: dataclasses, pickle and torch.save
    # look a class's module up in sys.modules.
    sys.modules[loaded.name] = module
    try:
        with on_path(_root(module_file, module_name)):
            loaded.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(loaded.name, None)
        raise
    return module


def _root(module_file: Path, module_name: str) -> Path:
    """The folder a dotted module name is relative to (the spec's folder)."""
    depth = module_name.count(".") + (1 if module_file.name == "__init__.py" else 0)
    return module_file.parents[depth]


def import_callable(reference: str, module_file: Path, where: str) -> Callable[..., Any]:
    """The function `reference` ("module:function") names, from `module_file`.

    A module is imported once per process (the build calls a prepare function, a factory
    and an augmentation from the same file); every failure is a `SpecError` naming `where`.
    """
    module_name, attribute = reference.split(":", 1)
    try:
        info = module_file.stat()
        module = _import(module_file, module_name, (info.st_mtime_ns, info.st_size))
    except SpecError:
        raise
    except Exception as exc:
        raise SpecError(
            f"{where}: importing {module_file.name} failed: {type(exc).__name__}: {exc}"
        ) from exc
    function = getattr(module, attribute, None)
    if function is None:
        raise SpecError(f"{where}: {module_name} has no attribute {attribute!r}")
    if not callable(function):
        raise SpecError(f"{where}: {reference} is a {type(function).__name__}, not callable")
    return function  # type: ignore[no-any-return]


def call(reference: str, module_file: Path, where: str, *args: Any) -> Any:
    """Calls the function with the spec's folder on sys.path; its errors name `where`."""
    function = import_callable(reference, module_file, where)
    with on_path(_root(module_file, reference.split(":", 1)[0])):
        try:
            return function(*args)
        except SpecError:
            raise
        except Exception as exc:
            raise SpecError(f"{where}: {reference}() raised {type(exc).__name__}: {exc}") from exc
