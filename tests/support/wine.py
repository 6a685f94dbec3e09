"""The own-model guide's wine example (examples/wine: a scikit-learn classifier converted with
skl2onnx) built into a zoo of its own, as a user would build it: `make_model.py` writes the
model and data next to a copy of the spec, then the spec is built once per version.

The zoo lives under build/ so that the build's content-hash cache makes a second test session
quick; it is separate from build/test-zoo so that the built-in models' tests never see it.
"""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Sequence
from pathlib import Path

from tests.support.serve import ROOT

EXAMPLE = ROOT / "examples" / "wine"
WINE_ZOO = ROOT / "build" / "test-wine-zoo"
SOURCES = ("make_model.py", "model.toml")
MADE = ("wine.onnx", "calib.npz", "val.npz")


def wine_sources(folder: Path) -> Path:
    """The example's spec, model and data in `folder` (made again only when the example's
    files changed); returns the spec's path. OpenVINO is left out of the runtimes, as in
    test_spec_examples: it cannot convert skl2onnx's ai.onnx.ml operators and only costs
    time."""
    folder.mkdir(parents=True, exist_ok=True)
    stale = any(
        not (folder / name).exists()
        or (folder / name).read_bytes() != (EXAMPLE / name).read_bytes()
        for name in SOURCES
    ) or not all((folder / name).exists() for name in MADE)
    if stale:
        for name in MADE:
            (folder / name).unlink(missing_ok=True)
        loaded = importlib.util.spec_from_file_location(
            "wine_make_model", EXAMPLE / "make_model.py"
        )
        assert loaded is not None and loaded.loader is not None
        module = importlib.util.module_from_spec(loaded)
        loaded.loader.exec_module(module)
        module.main(folder)
        for name in SOURCES:
            shutil.copyfile(EXAMPLE / name, folder / name)
    spec = folder / "spec.toml"
    spec.write_text((folder / "model.toml").read_text().replace('"openvino", ', ""))
    return spec


def build_wine_zoo(zoo: Path = WINE_ZOO, versions: Sequence[int] = (1, 2)) -> Path:
    """Builds the wine spec into `zoo` as each of `versions` (signed with the zoo's key);
    returns the zoo."""
    from tandem.cloud.build.user import build_from_spec

    spec = wine_sources(zoo.parent / f"{zoo.name}-src")
    for version in versions:
        build_from_spec(spec, zoo, version=version)
    return zoo
