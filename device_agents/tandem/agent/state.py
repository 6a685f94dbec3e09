"""The agent's persisted memory, `STORE/.agent/state.json` (atomic replace on every change).

    {"models": {"digits": {"max_accepted_version": 3,
                           "failed": [[4, "onnx-int8"]],
                           "health": {"version": 3, "variant": "onnx-int8",
                                      "previous": [2, "onnx-int8"], "started": 1700000000.0}}},
     "refused": {"<manifest sha256>": "rollback: ..."},
     "desired": {"revision": 12, "digest": "<sha256 of its signed models>"},
     "outbox": ["<base64 DeviceReport>", ...]}

`desired` is the newest signed desired state the agent obeyed (tandem.agent.desired): kept
across restarts so that a replayed older state stays refused.

`outbox` holds the reports (every kind but PROGRESS) that the fleet service has not
acknowledged yet (its `ReportAck`, see outbox.py). A report enters it in the same atomic
write as the state change it describes, and leaves it after that ack, so a kill at any
point re-sends it after the restart (with the same `report_id`, which the fleet service
deduplicates on) instead of losing it.

`max_accepted_version` is also kept in the SDK's `active.json`; the agent trusts the larger
of the two, so deleting one file cannot reopen a rollback.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf.message import DecodeError

from tandem.agent.desired import Accepted
from tandem.protos.fleet.v1 import fleet_pb2
from tandem.sdk.atomic import write_atomic

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
MAX_REMEMBERED_REFUSALS = 256  # manifests; oldest forgotten first
MAX_OUTBOX_REPORTS = 256  # reports awaiting the fleet's ack; oldest dropped first


@dataclass
class PendingHealth:
    version: int
    variant: str
    previous: tuple[int, str | None] | None
    started: float  # unix seconds
    rollout_id: str = ""


@dataclass
class ModelMemory:
    max_accepted_version: int = 0
    failed: set[tuple[int, str]] = field(default_factory=set)
    health: PendingHealth | None = None


class AgentState:
    def __init__(self, folder: Path) -> None:
        self.path = folder / STATE_FILE
        self.models: dict[str, ModelMemory] = {}
        self.refused: dict[str, str] = {}
        self.desired: Accepted | None = None
        self.outbox: list[fleet_pb2.DeviceReport] = []

    def load(self) -> None:
        try:
            doc = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning(
                "agent state %s unreadable (%s); starting from the store alone", self.path, exc
            )
            return
        try:
            for name, item in doc.get("models", {}).items():
                health = item.get("health")
                self.models[str(name)] = ModelMemory(
                    max_accepted_version=int(item.get("max_accepted_version", 0)),
                    failed={(int(v), str(var)) for v, var in item.get("failed", [])},
                    health=_health_from_json(health) if health else None,
                )
            self.refused = {str(k): str(v) for k, v in doc.get("refused", {}).items()}
            desired = doc.get("desired")
            if desired:
                self.desired = Accepted(int(desired["revision"]), str(desired["digest"]))
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            log.warning("agent state %s malformed (%s); ignoring it", self.path, exc)
            self.models, self.refused, self.desired = {}, {}, None
        self.outbox = []
        queued = doc.get("outbox") if isinstance(doc, dict) else None
        for item in queued if isinstance(queued, list) else []:
            try:
                self.outbox.append(
                    fleet_pb2.DeviceReport.FromString(base64.b64decode(item, validate=True))
                )
            except (TypeError, ValueError, binascii.Error, DecodeError) as exc:
                log.warning("agent state: unreadable queued report dropped (%s)", exc)

    def save(self) -> None:
        doc: dict[str, Any] = {
            "models": {
                name: {
                    "max_accepted_version": memory.max_accepted_version,
                    "failed": sorted([v, var] for v, var in memory.failed),
                    "health": _health_to_json(memory.health) if memory.health else None,
                }
                for name, memory in self.models.items()
            },
            "refused": self.refused,
            "desired": (
                {"revision": self.desired.revision, "digest": self.desired.digest}
                if self.desired
                else None
            ),
            "outbox": [
                base64.b64encode(report.SerializeToString()).decode() for report in self.outbox
            ],
        }
        write_atomic(self.path, json.dumps(doc, sort_keys=True).encode())

    def model(self, name: str) -> ModelMemory:
        return self.models.setdefault(name, ModelMemory())

    def queue_report(self, report: fleet_pb2.DeviceReport) -> None:
        """Adds a report to the outbox (in memory: the next `save` makes it durable)."""
        self.outbox.append(report)
        while len(self.outbox) > MAX_OUTBOX_REPORTS:
            dropped = self.outbox.pop(0)
            log.warning(
                "report outbox full: oldest report %s (%s v%d) dropped unsent",
                dropped.report_id,
                fleet_pb2.DeviceReport.Kind.Name(dropped.kind),
                dropped.version,
            )

    def report_acknowledged(self, report_id: str) -> bool:
        """Removes a report from the outbox; False when it was not there."""
        before = len(self.outbox)
        self.outbox = [r for r in self.outbox if r.report_id != report_id]
        return len(self.outbox) != before

    def remember_refusal(self, digest: str, reason: str) -> None:
        self.refused[digest] = reason
        while len(self.refused) > MAX_REMEMBERED_REFUSALS:
            self.refused.pop(next(iter(self.refused)))


def _health_to_json(health: PendingHealth) -> dict[str, Any]:
    return {
        "version": health.version,
        "variant": health.variant,
        "previous": list(health.previous) if health.previous else None,
        "started": health.started,
        "rollout_id": health.rollout_id,
    }


def _health_from_json(data: dict[str, Any]) -> PendingHealth:
    previous = data.get("previous")
    return PendingHealth(
        version=int(data["version"]),
        variant=str(data["variant"]),
        previous=(int(previous[0]), previous[1]) if previous else None,
        started=float(data["started"]),
        rollout_id=str(data.get("rollout_id", "")),
    )
