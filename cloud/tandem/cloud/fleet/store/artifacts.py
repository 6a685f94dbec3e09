"""Models, versions and signed artifacts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import (
    select,
)

from ..errors import ConflictError, NotFoundError
from ..models import (
    ArtifactRow,
    ModelRow,
    VersionRow,
)
from .devices import DeviceStore
from .records import (
    Artifact,
)
from .rows import (
    _artifact,
)


class ArtifactStore(DeviceStore):
    # --- models, versions, artifacts -------------------------------------------------------

    def add_artifact(
        self,
        model: str,
        version: int,
        variant: str,
        *,
        runtime: str,
        hardware: str,
        task: str,
        manifest: bytes,
        signatures: Sequence[tuple[str, bytes]],
        path: str,
        stored_bytes: int,
        metrics: Mapping[str, Any] | None = None,
    ) -> bool:
        """Registers a signed variant; False when the identical one is there already."""
        now = self.clock()
        with self.session() as s:
            if s.get(ModelRow, model) is None:
                s.add(ModelRow(name=model, task=task, created_at=now))
                s.flush()
            vrow = s.get(VersionRow, (model, version))
            if vrow is None:
                s.add(
                    VersionRow(
                        model=model, version=version, metrics=dict(metrics or {}), created_at=now
                    )
                )
            elif metrics:
                vrow.metrics = {**(vrow.metrics or {}), **dict(metrics)}
            existing = s.get(ArtifactRow, (model, version, variant))
            if existing is not None:
                if bytes(existing.manifest) != manifest:
                    raise ConflictError(
                        f"{model} v{version} {variant} exists with a different manifest; "
                        "versions are immutable, build a new version"
                    )
                existing.path = path
                return False
            s.add(
                ArtifactRow(
                    model=model,
                    version=version,
                    variant=variant,
                    runtime=runtime,
                    hardware=hardware,
                    manifest=manifest,
                    signatures=[{"keyid": k, "sig": sig.hex()} for k, sig in signatures],
                    path=path,
                    stored_bytes=stored_bytes,
                    created_at=now,
                )
            )
            return True

    def models(self) -> list[dict[str, Any]]:
        with self.session(write=False) as s:
            out = []
            for m in s.scalars(select(ModelRow).order_by(ModelRow.name)):
                versions = s.scalars(
                    select(VersionRow)
                    .where(VersionRow.model == m.name)
                    .order_by(VersionRow.version)
                )
                out.append(
                    {"name": m.name, "task": m.task, "versions": [v.version for v in versions]}
                )
            return out

    def versions(self, model: str) -> list[dict[str, Any]]:
        with self.session(write=False) as s:
            if s.get(ModelRow, model) is None:
                raise NotFoundError(f"no model {model!r}")
            out = []
            for v in s.scalars(
                select(VersionRow).where(VersionRow.model == model).order_by(VersionRow.version)
            ):
                arts = s.scalars(
                    select(ArtifactRow)
                    .where(ArtifactRow.model == model, ArtifactRow.version == v.version)
                    .order_by(ArtifactRow.variant)
                )
                out.append(
                    {
                        "model": model,
                        "version": v.version,
                        "metrics": dict(v.metrics or {}),
                        "created_at": v.created_at,
                        "artifacts": [_artifact(a).to_json() for a in arts],
                    }
                )
            return out

    def artifact(self, model: str, version: int, variant: str) -> Artifact:
        with self.session(write=False) as s:
            row = s.get(ArtifactRow, (model, version, variant))
            if row is None:
                raise NotFoundError(f"no artifact {model} v{version} {variant}")
            return _artifact(row)

    def artifacts(self, model: str, version: int | None = None) -> list[Artifact]:
        with self.session(write=False) as s:
            q = select(ArtifactRow).where(ArtifactRow.model == model)
            if version is not None:
                q = q.where(ArtifactRow.version == version)
            return [
                _artifact(r)
                for r in s.scalars(q.order_by(ArtifactRow.version, ArtifactRow.variant))
            ]
