"""A small client of the fleet service's REST API (and the console's views), for the CLI.

httpx errors never leave this module: a refused or failed call raises `ApiError` (with the
HTTP status, 0 when the service could not be reached at all).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote

import httpx

from tandem.errors import FleetError

API = "/api/v1"
CONSOLE = "/console/api"


class ApiError(FleetError):
    """The fleet service refused the request, or could not be reached (status 0)."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(f"{status}: {message}" if status else message)


class FleetClient:
    """Blocking client; one connection pool, closed with `close()` or a `with` block."""

    def __init__(self, url: str, token: str | None, *, timeout_s: float = 15.0) -> None:
        headers = {"Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s)

    def __enter__(self) -> FleetClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(
        self,
        method: str,
        path: str,
        *,
        params: Sequence[tuple[str, str | int | float | bool | None]] | None = None,
        body: Mapping[str, Any] | None = None,
    ) -> Any:
        try:
            response = self._http.request(method, path, params=list(params or ()), json=body)
        except httpx.HTTPError as exc:
            raise ApiError(0, f"cannot reach the fleet service at {self.url}: {exc}") from exc
        if response.status_code >= 400:
            raise ApiError(response.status_code, _message(response))
        try:
            return response.json()
        except ValueError as exc:
            raise ApiError(response.status_code, "the service answered with no JSON") from exc

    # --- reads -----------------------------------------------------------------------------

    def fleet(self, tags: Mapping[str, str] | None = None, online: bool | None = None) -> Any:
        params = [("tag", f"{k}={v}") for k, v in (tags or {}).items()]
        if online is not None:
            params.append(("online", "true" if online else "false"))
        return self._call("GET", f"{CONSOLE}/fleet", params=params)

    def models(self) -> Any:
        return self._call("GET", f"{API}/models")

    def model(self, name: str) -> Any:
        return self._call("GET", f"{CONSOLE}/models/{_q(name)}")

    def rollouts(self, status: Sequence[str] = ()) -> Any:
        return self._call("GET", f"{API}/rollouts", params=[("status", s) for s in status])

    def rollout_detail(self, rollout_id: str) -> Any:
        return self._call("GET", f"{CONSOLE}/rollouts/{_q(rollout_id)}")

    # --- actions ---------------------------------------------------------------------------

    def create_rollout(self, body: Mapping[str, Any]) -> Any:
        return self._call("POST", f"{API}/rollouts", body=body)

    def command(self, rollout_id: str, cmd: str) -> Any:
        return self._call("POST", f"{API}/rollouts/{_q(rollout_id)}/{cmd}")


def _q(part: str) -> str:
    return quote(part, safe="")


def _message(response: httpx.Response) -> str:
    try:
        data = response.json()
    except ValueError:
        return response.text.strip() or response.reason_phrase
    detail = data.get("detail") if isinstance(data, dict) else None
    if isinstance(detail, list):
        return "; ".join(
            ".".join(str(x) for x in d.get("loc", ())) + ": " + str(d.get("msg", ""))
            for d in detail
            if isinstance(d, dict)
        )
    return str(detail or data)
