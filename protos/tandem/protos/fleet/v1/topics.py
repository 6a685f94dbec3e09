"""The MQTT topic tree of fleet protocol v1 (a wire contract, like the .proto beside it).

Every device has one subtree, ``tandem/v1/devices/<device_id>/``:

=================  =========  =========  =====================================================
topic              direction  retained   payload
=================  =========  =========  =====================================================
presence           device ->  yes        Presence; the last will publishes online=false
desired            -> device  yes        DesiredState; written only by the fleet service
reports            device ->  no         DeviceReport (install progress, activation, health)
reports/ack        -> device  no         ReportAck: these report ids are stored by the fleet
telemetry          device ->  no         zstd(TelemetryBatch)
chunks/request     device ->  no         ChunkRequest: send (the rest of) a file from offset
chunks             -> device  no         ArtifactChunk
=================  =========  =========  =====================================================

All publishes use MQTT 5 and QoS 1. Fleet-service replicas share the device->service load
through the shared subscriptions below. The broker's ACL (``tandem fleet broker-config``)
lets a device read only its own ``desired``, ``chunks`` and ``reports/ack``, write only its own
``presence``, ``reports``, ``telemetry`` and ``chunks/request``, and never write ``desired``,
``chunks`` or ``reports/ack``.
"""

from __future__ import annotations

import re

PREFIX = "tandem/v1/devices"
SHARE_GROUP = "tandem-fleet"
QOS = 1
# Device ids become topic levels and file names: keep them to a safe alphabet.
DEVICE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")

PRESENCE = "presence"
DESIRED = "desired"
REPORTS = "reports"
REPORT_ACKS = "reports/ack"
TELEMETRY = "telemetry"
CHUNK_REQUEST = "chunks/request"
CHUNKS = "chunks"


def is_valid_device_id(device_id: str) -> bool:
    return bool(DEVICE_ID_PATTERN.match(device_id))


def device_topic(device_id: str, leaf: str) -> str:
    if not is_valid_device_id(device_id):
        raise ValueError(f"invalid device id {device_id!r}: must match {DEVICE_ID_PATTERN.pattern}")
    return f"{PREFIX}/{device_id}/{leaf}"


def all_devices(leaf: str) -> str:
    """The wildcard filter for one leaf across every device."""
    return f"{PREFIX}/+/{leaf}"


def shared(filter_: str, group: str = SHARE_GROUP) -> str:
    """A shared-subscription filter, so several fleet-service replicas split the load."""
    return f"$share/{group}/{filter_}"


def parse_device_topic(topic: str) -> tuple[str, str] | None:
    """(device_id, leaf) for a topic in the tree, None for anything else."""
    head = PREFIX + "/"
    if not topic.startswith(head):
        return None
    device_id, _, leaf = topic[len(head) :].partition("/")
    if not leaf or not is_valid_device_id(device_id):
        return None
    return device_id, leaf
