"""The on-device model store: where the agent puts verified versions and the SDK finds them.

Layout (the agent writes, the SDK reads)::

    STORE/<model>/<version>/<variant>/   a variant folder (tandem.sdk.artifacts) with its
                                          payload files already decompressed beside the .zst
    STORE/<model>/active.json             {"version": 3, "variant": "onnx-int8",
                                           "previous": {"version": 2, "variant": "onnx-int8"},
                                           "max_accepted_version": 3}

`active.json` is replaced atomically (`tandem.sdk.atomic.write_atomic`), so a
reader sees the old pointer or the new one, never half of one. A build pipeline's
`artifacts/` folder has the same `<model>/<version>/<variant>/` layout and no active.json:
there the highest version counts as active, and all of its variants are offered.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tandem.errors import ArtifactError, NoLocalModelError
from tandem.sdk.artifacts import MANIFEST_FILE, Variant, load_variant
from tandem.sdk.atomic import write_atomic

ACTIVE_FILE = "active.json"


@dataclass(frozen=True)
class ActivePointer:
    version: int
    variant: str | None  # None: every variant of that version is offered
    previous_version: int | None = None
    previous_variant: str | None = None
    max_accepted_version: int = 0

    def to_json(self) -> dict[str, Any]:
        previous = (
            {"version": self.previous_version, "variant": self.previous_variant}
            if self.previous_version is not None
            else None
        )
        return {
            "version": self.version,
            "variant": self.variant,
            "previous": previous,
            "max_accepted_version": max(self.max_accepted_version, self.version),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ActivePointer:
        previous = data.get("previous") or {}
        return cls(
            version=int(data["version"]),
            variant=data.get("variant"),
            previous_version=previous.get("version"),
            previous_variant=previous.get("variant"),
            max_accepted_version=int(data.get("max_accepted_version", data["version"])),
        )


class ModelStore:
    """Reads (and, for the agent, writes) a model store or a build's artifacts folder."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def model_dir(self, model: str) -> Path:
        if not model or model != os.path.basename(model) or model in (".", ".."):
            raise ArtifactError(f"model name {model!r} is not a plain name")
        return self.root / model

    def versions(self, model: str) -> list[int]:
        folder = self.model_dir(model)
        if not folder.is_dir():
            return []
        return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())

    def variant_dirs(self, model: str, version: int) -> list[Path]:
        folder = self.model_dir(model) / str(version)
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.iterdir() if (p / MANIFEST_FILE).is_file())

    def read_active(self, model: str) -> ActivePointer | None:
        path = self.model_dir(model) / ACTIVE_FILE
        try:
            return ActivePointer.from_json(json.loads(path.read_bytes()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ArtifactError(f"unreadable {path}: {exc}") from exc

    def write_active(self, model: str, pointer: ActivePointer) -> None:
        data = json.dumps(pointer.to_json(), sort_keys=True).encode()
        write_atomic(self.model_dir(model) / ACTIVE_FILE, data)

    def active_token(self, model: str) -> tuple[int, int]:
        """A cheap fingerprint (mtime_ns, size) of the active pointer, to notice a swap."""
        try:
            st = (self.model_dir(model) / ACTIVE_FILE).stat()
        except FileNotFoundError:
            return (0, len(self.versions(model)))
        return (st.st_mtime_ns, st.st_size)

    def active_variants(self, model: str) -> tuple[int, list[Variant]]:
        """The active version and its variants (all of them where no variant is pinned)."""
        pointer = self.read_active(model)
        if pointer is None:
            versions = self.versions(model)
            if not versions:
                raise NoLocalModelError(f"no local versions of {model!r} in {self.root}")
            version, pinned = versions[-1], None
        else:
            version, pinned = pointer.version, pointer.variant
        variants = [load_variant(d) for d in self.variant_dirs(model, version)]
        if pinned is not None:
            variants = [v for v in variants if v.manifest.variant == pinned]
        if not variants:
            raise NoLocalModelError(f"{model!r} v{version} has no usable variant in {self.root}")
        return version, variants
