"""The one direction of dependency (DESIGN.md): protos <- sdk <- agent; protos, sdk <- cloud.

Checked statically on every module, including imports inside functions, so a lazy import
cannot sneak the cloud side onto a device or the device agent into the cloud.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# component folder -> the tandem packages it must never import
FORBIDDEN = {
    "protos": ("tandem.sdk", "tandem.agent", "tandem.cloud"),
    "sdk": ("tandem.agent", "tandem.cloud"),
    "device_agents": ("tandem.cloud",),
    "cloud": ("tandem.agent",),
}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("component", sorted(FORBIDDEN))
def test_component_imports_point_one_way(component: str) -> None:
    files = [p for p in (ROOT / component).rglob("*.py") if "_pb2" not in p.name]
    assert files, f"no modules found under {component}/"
    offences = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in files
        for name in sorted(_imports(path))
        if any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN[component])
    ]
    assert not offences, "\n".join(offences)
