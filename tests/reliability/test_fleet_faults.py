"""The fleet under faults, end to end: real `tandem agent run` processes, the real fleet
service (`tandem fleet serve`) and a Mosquitto configured by `tandem fleet broker-config`.

- The fleet service is SIGKILLed mid-rollout (a stage's deliveries in flight) and restarted
  on the same database: the rollout resumes from its stored state and the event history shows
  every stage settled once, in order.
- The broker is restarted (twice, no persistence) while the SDK keeps spooling telemetry on
  every device: every summary the SDK produced is ingested exactly once (ids compared with the
  fleet store, request totals compared with the aggregates), and the agents reconnect by
  themselves.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tandem.cloud.fleet.models import SeenSummaryRow, TelemetryRow
from tandem.sdk.telemetry import TelemetryConfig, TelemetryRecorder
from tests.fleet.conftest import GeneratedBroker, ServiceProcess, wait_devices
from tests.reliability.conftest import FleetAgent, FleetAgents
from tests.support.figures import Figures
from tests.support.processes import wait_until

DEVICES = ["dev-a", "dev-b", "dev-c"]


@pytest.fixture
def fleet_agents(
    fleet_agents_factory: FleetAgents,
) -> tuple[GeneratedBroker, dict[str, FleetAgent]]:
    return fleet_agents_factory(DEVICES)


class SpoolWriter:
    """What each device's app does: the SDK records calls and flushes summaries into the
    agent's spool, here every `every_s` seconds, for as long as it runs."""

    def __init__(self, stores: dict[str, Path], every_s: float = 0.2) -> None:
        self.recorders = {
            d: TelemetryRecorder(TelemetryConfig(spool_dir=s / ".telemetry-spool", interval_s=3600))
            for d, s in stores.items()
        }
        self.every_s = every_s
        self.produced: dict[str, int] = {}  # summary id -> requests
        self.when: dict[str, float] = {}  # summary id -> time.monotonic() it was spooled
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            for recorder in self.recorders.values():
                n += 1
                requests = 3 + n % 5
                for i in range(requests):
                    recorder.record(
                        "digits", 1, "onnx", "local", "ok", 0.2 + i / 10, None, 0.9, False, False
                    )
                for summary in recorder.flush():
                    self.produced[str(summary.summary_id)] = int(summary.requests)
                    self.when[str(summary.summary_id)] = time.monotonic()
            time.sleep(self.every_s)

    def __enter__(self) -> SpoolWriter:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def ingested(db: Path) -> tuple[set[str], int]:
    """(summary ids in the fleet store, total requests over every aggregate)."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as conn:
        ids = {r[0] for r in conn.execute(f"SELECT summary_id FROM {SeenSummaryRow.__tablename__}")}
        (total,) = conn.execute(
            f"SELECT COALESCE(SUM(requests), 0) FROM {TelemetryRow.__tablename__}"
        ).fetchone()
    return ids, int(total)


def test_fleet_service_killed_mid_rollout_and_broker_restarted_during_telemetry(
    fleet_agents: tuple[GeneratedBroker, dict[str, FleetAgent]],
    fleet_service: Callable[..., ServiceProcess],
    zoo: Path,
    tmp_path: Path,
    figures: Figures,
) -> None:
    broker, agents = fleet_agents
    svc = fleet_service(broker, zoo, "--trusted-key", str(zoo / "keys" / "signing.pub"))
    wait_devices(svc, len(DEVICES))
    db = tmp_path / "fleet.db"
    stores = {d: a.store for d, a in agents.items()}

    with SpoolWriter(stores) as spool:
        # --- the fleet service killed while a stage's deliveries are in flight
        created = svc.post(
            "/rollouts",
            {
                "model": "digits",
                "version": 1,
                "selector": {"site": "lab"},
                "stages": [
                    {"percent": 34, "min_soak_s": 0.5},
                    {"percent": 67, "min_soak_s": 0.5},
                    {"percent": 100, "min_soak_s": 0.5},
                ],
            },
        )
        assert isinstance(created, dict)
        rid = str(created["rollout_id"])
        wait_until(
            lambda: svc.rollout(rid)["stage_index"] == 1,
            timeout=60,
            interval=0.05,
            message=f"stage 1 started: {svc.log_tail()}",
        )
        state_at_kill = svc.rollout(rid)
        marks = {"service killed": time.monotonic()}
        svc.stop(kill=True)
        time.sleep(0.5)
        svc.start()
        marks["service back"] = time.monotonic()
        done = svc.wait_rollout(rid, "completed", timeout=90)
        assert done["device_states"] == {"succeeded": len(DEVICES)}, done
        events = svc.get(f"/rollouts/{rid}/events")
        assert isinstance(events, list)
        kinds = [e["kind"] for e in events]
        advanced = [e["stage_index"] for e in events if e["kind"] == "stage_advanced"]
        settled = [e["stage_index"] for e in events if e["kind"] == "stage_settled"]
        assert advanced == [1, 2], kinds
        assert settled == [0, 1, 2], kinds
        assert kinds.count("completed") == 1, kinds
        for agent in agents.values():
            active = json.loads((agent.store / "digits" / "active.json").read_text())
            assert active["version"] == 1
            assert "ACTIVATED" in agent.log() or "active" in agent.log()

        # --- the broker restarted twice while telemetry keeps flowing
        for _ in range(2):
            time.sleep(1.0)
            marks[f"broker stopped {len(marks)}"] = time.monotonic()
            broker.stop()
            time.sleep(0.5)
            broker.start()
        wait_devices(svc, len(DEVICES), timeout=30)
        time.sleep(1.0)
    produced = dict(spool.produced)
    assert produced

    def all_in() -> bool:
        return set(produced) <= ingested(db)[0]

    try:
        wait_until(all_in, 30, interval=0.2, message="every spooled summary ingested")
    except TimeoutError:
        missing = set(produced) - ingested(db)[0]
        spooled = {
            d: sorted(p.name for p in (a.store / ".telemetry-spool").iterdir())[:5]
            for d, a in agents.items()
        }
        logs = {d: a.log()[-1500:] for d, a in agents.items()}
        t0 = marks["service killed"]
        raise AssertionError(
            f"{len(missing)} of {len(produced)} summaries never ingested, spooled at "
            f"{sorted(round(spool.when[m] - t0, 2) for m in missing)} s after the kill "
            f"(events: { {k: round(v - t0, 2) for k, v in marks.items()} }); still spooled: "
            f"{spooled}\nagents: {logs}\nservice: {svc.log_tail()}"
        ) from None
    ids, total_requests = ingested(db)
    lost = set(produced) - ids
    extra = ids - set(produced)
    assert not lost and not extra, (len(lost), len(extra))
    assert total_requests == sum(produced.values()), (total_requests, sum(produced.values()))
    for agent in agents.values():
        assert agent.alive
        assert not any((agent.store / ".telemetry-spool").glob("*.pb*"))  # all shipped
    figures.record(
        "fleet service SIGKILLed mid-rollout (3 real agents)",
        killed_at=f"stage {state_at_kill['stage_index']} ({state_at_kill['status']})",
        stage_settled_events=settled,
        stage_advanced_events=advanced,
        devices_succeeded=done["device_states"].get("succeeded"),
        stages_repeated_or_skipped=0,
        summaries_spooled_in_the_second_before_the_kill=sum(
            1 for m in produced if -1.0 < spool.when[m] - marks["service killed"] < 0
        ),
        of_those_lost=sum(1 for m in lost if -1.0 < spool.when[m] - marks["service killed"] < 0),
    )
    figures.record(
        "broker restarted twice during telemetry (3 real agents, SDK spool)",
        summaries_produced=len(produced),
        summaries_ingested=len(ids),
        lost=len(lost),
        counted_twice=total_requests - sum(produced.values()),
        requests_produced=sum(produced.values()),
        requests_in_aggregates=total_requests,
        agents_reconnected=len(DEVICES),
    )
