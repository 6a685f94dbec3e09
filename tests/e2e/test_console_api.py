"""The fleet REST API with the console mounted: the OpenAPI schema is served, a schema-driven
fuzzer (schemathesis) finds no server error on any operation, every operation refuses a
missing or wrong bearer token, and the console's views and event stream say what the page
shows.

The app runs in process over a real SQLite store with a small signed zoo, devices that
announced themselves and telemetry ingested; no broker (desired-state publishes are no-ops).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from tandem.cloud.console.app import create_fleet_app
from tandem.cloud.fleet.service import FleetService, RolloutRequest, ServiceConfig
from tandem.protos.fleet.v1 import fleet_pb2
from tests.fleet.helpers import fake_zoo, summary

TOKEN = "api-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PUBLIC = {"/api/v1/health"}  # liveness answers without a token, like the inference server's


def _fleet(tmp: Path) -> tuple[FleetService, FastAPI, str]:
    service = FleetService(
        ServiceConfig(
            db_url=f"sqlite:///{tmp / 'fleet.db'}",
            artifacts_dir=tmp / "artifacts",
            api_tokens={TOKEN: "alice"},
            telemetry_window_s=1.0,
        )
    )
    service.import_zoo(fake_zoo(tmp / "zoo", versions=(1, 2), size=4000))
    now = time.time()
    for i in range(4):
        service.store.upsert_presence(
            fleet_pb2.Presence(
                device_id=f"d{i}",
                online=i != 3,
                runtimes=["onnx"],
                hardware="x86_64",
                tags={"ring": "canary" if i == 0 else "main"},
                active_versions={"digits": 1},
                timestamp_ms=int(now * 1000),
            ),
            now,
        )
    start = int((now - 3) * 1000)
    service.ingest(
        [summary(f"d{i}", 1, start_ms=start + k * 1000) for i in range(3) for k in range(3)]
    )
    plan = {"model": "digits", "version": 2, "stages": [{"percent": 50}, {"percent": 100}]}
    r = service.create_rollout(RolloutRequest.from_json(plan), "alice")
    return service, create_fleet_app(service), r.rollout_id


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FleetService, FastAPI, str]]:
    service, app, rollout_id = _fleet(tmp_path_factory.mktemp("fleet-api"))
    yield service, app, rollout_id
    service.close()


@pytest.fixture(scope="module")
def client(fleet: tuple[FleetService, FastAPI, str]) -> Iterator[TestClient]:
    with TestClient(fleet[1]) as c:
        yield c


def _operations(app: FastAPI) -> list[tuple[str, str]]:
    schema = app.openapi()
    return [
        (method.upper(), path)
        for path, ops in schema["paths"].items()
        for method in ops
        if path not in PUBLIC
    ]


def test_openapi_schema_is_served_with_the_console_routes(client: TestClient) -> None:
    r = client.get("/openapi.json")
    assert r.status_code == 200
    paths = r.json()["paths"]
    for path in (
        "/api/v1/devices",
        "/api/v1/rollouts",
        "/api/v1/rollouts/{rollout_id}/abort",
        "/api/v1/telemetry",
        "/console/api/fleet",
        "/console/api/rollouts/{rollout_id}/series",
        "/console/api/telemetry",
        "/console/api/artifacts",
    ):
        assert path in paths, path


@pytest.mark.parametrize("auth", [None, "Bearer wrong-token", "Basic YWxpY2U6eA==", "Bearer "])
def test_every_operation_refuses_a_missing_or_wrong_token(
    client: TestClient, fleet: tuple[FleetService, FastAPI, str], auth: str | None
) -> None:
    ops = _operations(fleet[1])
    assert len(ops) >= 20
    headers = {"Authorization": auth} if auth else {}
    for method, path in ops:
        url = path.format(rollout_id=fleet[2], device_id="d0", model="digits", name="digits")
        r = client.request(method, url, headers=headers, params={"model": "digits", "version": 1})
        assert r.status_code == 401, (method, path, r.status_code, r.text)
        assert r.headers.get("www-authenticate", "").lower().startswith("bearer")


def test_the_stream_refuses_a_wrong_token(client: TestClient) -> None:
    assert client.get("/console/api/stream").status_code == 401
    assert client.get("/console/api/stream", params={"token": "nope"}).status_code == 401
    # The page itself carries no data and loads without a token.
    page = client.get("/console/")
    assert page.status_code == 200 and "console.js" in page.text


def test_the_stream_sends_new_events_and_what_changed(
    fleet: tuple[FleetService, FastAPI, str], client: TestClient
) -> None:
    service, _app, rollout_id = fleet
    first = service.store.events(rollout_id=rollout_id)[0].id
    # Resume from an event id, as a reconnecting browser does with Last-Event-ID.
    with client.stream(
        "GET",
        "/console/api/stream",
        params={"token": TOKEN},
        headers={"Last-Event-ID": str(first - 1)},
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = []
        for line in r.iter_lines():
            lines.append(line)
            if line.startswith("event: change"):
                break
    text = "\n".join(lines)
    assert "event: hello" in text
    assert f"id: {first}" in text and "event: fleet-event" in text
    assert '"kind":"created"' in text


def test_console_views_match_the_store(
    fleet: tuple[FleetService, FastAPI, str], client: TestClient
) -> None:
    _service, _app, rollout_id = fleet
    f = client.get("/console/api/fleet", headers=AUTH).json()
    assert (f["total"], f["online"]) == (4, 3)
    assert f["tags"] == {"ring": ["canary", "main"]}
    d0 = next(d for d in f["devices"] if d["device_id"] == "d0")
    assert d0["last_telemetry"]["model"] == "digits" and d0["last_telemetry"]["version"] == 1
    assert d0["last_telemetry"]["p95_latency_ms"] == pytest.approx(2.0, rel=0.1)
    assert (
        client.get("/console/api/fleet", headers=AUTH, params={"tag": "ring=canary"}).json()[
            "total"
        ]
        == 1
    )
    assert client.get("/console/api/fleet", headers=AUTH, params={"tag": "nope"}).status_code == 422

    m = client.get("/console/api/models/digits", headers=AUTH).json()
    assert [v["version"] for v in m["versions"]] == [1, 2]
    v1 = m["versions"][0]
    # d3 announced itself offline: the store keeps no versions from such a presence.
    assert v1["accuracy"] == pytest.approx(0.95) and v1["devices"] == 3
    assert {a["variant"] for a in v1["variants"]} == {"onnx-int8", "tflite-int8"}
    assert all(a["size_bytes"] > a["stored_bytes"] > 0 for a in v1["variants"])
    assert client.get("/console/api/models/nope", headers=AUTH).status_code == 404

    d = client.get(f"/console/api/rollouts/{rollout_id}", headers=AUTH).json()
    assert d["targeted_devices"] == 3  # online devices with a variant
    assert [s["cumulative_target"] for s in d["stages"]] == [2, 3]
    assert d["stages"][0]["assigned"] == 2 and d["stages"][0]["states"]["assigned"] == 2
    assert d["events"][-1]["kind"] == "created"

    s = client.get(f"/console/api/rollouts/{rollout_id}/series", headers=AUTH).json()
    assert s["baseline_version"] == 1 and s["new"] == []
    assert sum(p["requests"] for p in s["baseline"]) == 900
    assert all(p["fallback_rate"] == pytest.approx(0.1) for p in s["baseline"])

    t = client.get(
        "/console/api/telemetry",
        headers=AUTH,
        params={"model": "digits", "version": 1, "per_window": True, "device": ["d0", "d1"]},
    ).json()
    assert t["requests"] == 600 and t["devices"] == 2
    assert t["error_rate"] == 0 and t["agreement"] == 1.0
    assert len(t["series"]) == 3


schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed")


def test_schema_driven_requests_find_no_server_error(
    fleet: tuple[FleetService, FastAPI, str],
) -> None:
    """Every operation of the served schema, fuzzed with valid and edge-case inputs over real
    HTTP (uvicorn on loopback): no response may be a 5xx."""
    import threading

    import uvicorn
    from hypothesis import HealthCheck, given, settings

    from tests.support.processes import free_port, wait_for_port

    app = fleet[1]
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for_port(port)
    base_url = f"http://127.0.0.1:{port}"
    schema = schemathesis.openapi.from_dict(app.openapi())
    failures: dict[str, str] = {}
    calls = 0
    try:
        for operation in schema.get_all_operations():
            op = operation.ok()

            @settings(
                max_examples=8,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            @given(op.as_strategy())
            def run(case: Any) -> None:
                nonlocal calls
                calls += 1
                key = f"{case.method} {case.path}"
                if key in failures:
                    return
                response = case.call(base_url=base_url, headers=AUTH, timeout=10)
                if response.status_code >= 500:
                    failures[key] = (
                        f"{key} query={case.query} body={case.body!r}: "
                        f"{response.status_code} {response.text[:200]}"
                    )

            run()
    finally:
        server.should_exit = True
        thread.join(10)
    assert calls > 100
    assert not failures, "server errors:\n" + "\n".join(failures.values())


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/api/v1/telemetry?model=digits&version=1&since=9223372036854778.0", None),
        ("GET", "/console/api/telemetry?model=digits&version=1&since=1e11", None),
        ("GET", "/console/api/artifacts?model=digits&version=9223372036854775807", None),
        (
            "POST",
            "/api/v1/rollouts",
            {"model": "digits", "version": 2**64, "stages": [{"percent": 50}]},
        ),
        ("PUT", "/api/v1/devices/d0/desired", {"model": "digits", "version": 2**64}),
    ],
)
def test_out_of_range_numbers_are_refused_not_server_errors(
    client: TestClient, method: str, path: str, body: Any
) -> None:
    """Boundary values the fuzzer finds only sometimes, checked every time: a number the
    database cannot hold is the caller's mistake (4xx), never a 500."""
    with TestClient(client.app, raise_server_exceptions=False) as c:
        r = c.request(method, path, headers=AUTH, json=body)
    assert r.status_code < 500, (method, path, r.status_code, r.text[:200])


def test_rollout_knobs_reach_the_plan_and_unknown_ones_are_refused(tmp_path: Path) -> None:
    """Every knob of the plan set over REST reaches the engine; a field the API does not know
    (a typo, or a client newer than the service) is a 422 naming it, never silently dropped."""
    service, app, rid = _fleet(tmp_path)
    try:
        service.command(rid, "abort", "alice")
        gate = {"metric": "error_rate", "threshold": 0.1, "min_samples": 30, "min_effect": 0.05}
        body = {
            "model": "digits",
            "version": 2,
            "stages": [{"percent": 50, "min_soak_s": 5, "gates": [gate], "max_wait_s": 40}],
            "false_abort_rate": 0.002,
        }
        with TestClient(app) as c:
            typo = {**body, "stages": [{**body["stages"][0], "max_wait": 40}]}
            r = c.post("/api/v1/rollouts", headers=AUTH, json=typo)
            assert r.status_code == 422 and "max_wait" in r.text
            r = c.post("/api/v1/rollouts", headers=AUTH, json=body)
            assert r.status_code in (200, 201), r.text
        plan = service.store.rollout(r.json()["rollout_id"]).plan
        assert plan.false_abort_rate == 0.002
        assert plan.stages[0].max_wait_s == 40
        assert plan.stages[0].gates[0].min_effect == 0.05
    finally:
        service.close()
