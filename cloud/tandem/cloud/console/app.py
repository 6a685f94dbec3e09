"""The fleet service's web app as a process serves it: the fleet REST API plus the console.

`tandem.cloud.fleet.rest.create_app` builds the REST API alone, so the fleet package never
imports the console; this module, one layer up, assembles the two. `tandem fleet serve`
hands `create_fleet_app` to its `FleetNode` as the app factory.
"""

from __future__ import annotations

from collections.abc import Mapping

from fastapi import FastAPI

from tandem.cloud.fleet.rest import create_app
from tandem.cloud.fleet.service import FleetService

from .api import mount_console


def create_fleet_app(service: FleetService, tokens: Mapping[str, str] | None = None) -> FastAPI:
    """The REST API with the console mounted; `tokens` maps bearer token -> user name."""
    app = create_app(service, tokens)
    mount_console(app, service, tokens=app.state.tokens)
    return app
