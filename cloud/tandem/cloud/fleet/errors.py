"""Errors of the fleet service, under `tandem.errors.FleetError`::

FleetError
├── StoreError            the database failed (the SQLAlchemy error is chained)
├── NotFoundError         no such device, model, version, artifact or rollout
├── ConflictError         the request contradicts the current state (e.g. resume a
│                         completed rollout, import a version that exists with other bytes)
├── ImportRefusedError    an artifact to import is malformed or badly signed
└── BrokerError           the MQTT broker refused or dropped the service's session
"""

from __future__ import annotations

from tandem.errors import FleetError


class StoreError(FleetError):
    """The database failed."""


class NotFoundError(FleetError, LookupError):
    """No such device, model, version, artifact or rollout."""


class ConflictError(FleetError):
    """The request contradicts the current state."""


class ImportRefusedError(FleetError):
    """An artifact to import is malformed or badly signed."""


class BrokerError(FleetError):
    """The MQTT broker refused or dropped the service's session."""
