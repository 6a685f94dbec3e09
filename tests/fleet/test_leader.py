"""One replica at a time turns the rollout engine: the PostgreSQL advisory-lock election,
as electors on one real database and as real service processes on one database."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from tandem.agent.resend import ResendPolicy
from tandem.cloud.fleet import engine as eng
from tandem.cloud.fleet.leader import APPLICATION_PREFIX, LeaderElector
from tests.fleet.conftest import GeneratedBroker, ServiceProcess, fleet_serve_argv, wait_devices
from tests.fleet.sim import SimFleet
from tests.support.processes import free_port, stop_processes, wait_until


@pytest.fixture
def electors(postgres_url: str) -> Iterator[Callable[..., LeaderElector]]:
    made: list[LeaderElector] = []

    def make(replica_id: str, lease_s: float = 10.0) -> LeaderElector:
        e = LeaderElector(postgres_url, replica_id=replica_id, lease_s=lease_s)
        made.append(e)
        return e

    yield make
    for e in made:
        e.close()


def terminate_sessions_of(postgres_url: str, replica_id: str) -> None:
    """What a crash or a dropped connection does to the holder: its session ends."""
    admin = sa.create_engine(postgres_url, poolclass=sa.pool.NullPool)
    with admin.begin() as c:
        ended = c.execute(
            sa.text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE application_name = :name"
            ),
            {"name": APPLICATION_PREFIX + replica_id},
        ).scalar_one()
    admin.dispose()
    assert ended == 1


def test_sqlite_is_the_single_replica_mode(tmp_path: Path) -> None:
    e = LeaderElector(f"sqlite:///{tmp_path / 'fleet.db'}", replica_id="solo")
    assert e.is_leader and e.check() and e.check()
    assert e.status()["mode"] == "single-replica" and e.status()["leader"] == "solo"
    e.close()


@pytest.mark.postgres
def test_one_leader_and_the_other_takes_over_when_its_session_dies(
    electors: Callable[..., LeaderElector], postgres_url: str
) -> None:
    a, b = electors("a"), electors("b")
    assert a.check() and not b.check()
    for _ in range(3):  # the holder keeps it, the other keeps trying, and still only one
        assert a.check() and not b.check()
    assert b.status()["leader"] == "a" and not b.is_leader
    terminate_sessions_of(postgres_url, "a")
    # The backend exits (and the lock goes) shortly after pg_terminate_backend returns.
    wait_until(b.check, timeout=5, interval=0.02, message="b takes the lock")
    assert not a.check(), "a notices its dead session, steps down, and finds b holding it"
    assert a.status()["leader"] == "b" and not a.is_leader
    assert b.status()["takeovers"] == 1 and b.status()["is_leader"]
    # A clean stop hands over at the other's next try.
    b.step_down()
    assert a.check() and not b.check()


@pytest.mark.postgres
def test_a_silent_leader_loses_the_lock_after_its_lease(
    electors: Callable[..., LeaderElector],
) -> None:
    """A frozen or cut-off holder stops querying: the server ends its session after the
    lease (idle_session_timeout), and with it the lock."""
    a, b = electors("a", lease_s=1.0), electors("b", lease_s=1.0)
    assert a.check()
    start = time.monotonic()
    wait_until(b.check, timeout=5, interval=0.05, message="b takes the lock after a's lease")
    waited = time.monotonic() - start
    assert 0.8 <= waited < 4.0, waited
    assert not a.check() and a.status()["leader"] == "b"


@pytest.mark.postgres
def test_replicas_writing_rows_in_another_order_get_a_retryable_conflict(
    postgres_url: str,
) -> None:
    """Two replicas' batches touching the same devices in another order deadlock; the one
    PostgreSQL aborts surfaces as ConflictError, which the store's writers retry."""
    import threading

    from tandem.cloud.fleet.errors import ConflictError, StoreError
    from tandem.cloud.fleet.store import Store

    store = Store(postgres_url)
    try:
        with store.engine.begin() as c:
            c.execute(sa.text("CREATE TABLE race (id int PRIMARY KEY, n int)"))
            c.execute(sa.text("INSERT INTO race VALUES (1, 0), (2, 0)"))
        both_locked_one = threading.Barrier(2, timeout=10)
        errors: list[BaseException] = []

        def batch(first: int, second: int) -> None:
            try:
                with store.session() as s:
                    update = sa.text("UPDATE race SET n = n + 1 WHERE id = :id")
                    s.execute(update, {"id": first})
                    both_locked_one.wait()
                    s.execute(update, {"id": second})
            except (ConflictError, StoreError) as exc:
                errors.append(exc)

        threads = [threading.Thread(target=batch, args=ab) for ab in ((1, 2), (2, 1))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert len(errors) == 1 and isinstance(errors[0], ConflictError), errors
        assert "another transaction" in str(errors[0])
    finally:
        store.close()


def first_stage_sizes(n: int, percents: list[float]) -> list[int]:
    sizes = [eng.cohort_size(p, n) for p in percents]
    return [s - prev for s, prev in zip(sizes, [0, *sizes[:-1]], strict=True)]


@pytest.mark.postgres
def test_killed_leader_hands_the_rollout_over_without_repeating_or_skipping_a_stage(
    generated_broker: Callable[[list[str]], GeneratedBroker],
    zoo: Path,
    postgres_url: str,
    tmp_path: Path,
) -> None:
    """SIGKILL of the leader mid-rollout, and it never comes back: the other replica takes
    over the engine, and the reports the broker had queued in the dead replica's session
    (its share of the shared subscription) reach it anyway, because the devices send every
    report the fleet has not acknowledged again, and the dead session expires after
    `--session-expiry` (3 s here) instead of holding the group's share."""
    devices = [f"dev-{i:03d}" for i in range(10)]
    broker = generated_broker(devices)
    session_expiry_s = 3

    def replica(name: str, *extra: str) -> ServiceProcess:
        port = free_port()
        args = fleet_serve_argv(
            broker,
            client_id=f"fleet-{name}",
            db=postgres_url,
            artifacts=tmp_path / "fleet-artifacts",
            rest_port=port,
            extra=[
                "--tick",
                "0.1",
                "--telemetry-window",
                "1",
                "--replica-id",
                name,
                "--session-expiry",
                str(session_expiry_s),
                *extra,
            ],
        )
        return ServiceProcess(args, port, tmp_path / f"fleet-{name}.log")

    def leader_of(svc: ServiceProcess) -> dict[str, object]:
        status = svc.get("/leader")
        assert isinstance(status, dict)
        return status

    a = replica("a", "--zoo", str(zoo))
    b = replica("b")
    sim = SimFleet(
        broker.host,
        broker.port,
        broker.written.device_passwords,
        active={"digits": 1},
        resend=ResendPolicy(first_s=0.5, max_s=1.0),  # the agent's schedule, in short
    )
    try:
        a.start()
        wait_until(lambda: leader_of(a)["is_leader"], timeout=10, message="a leads")
        b.start()
        wait_until(lambda: leader_of(b)["leader"] == "a", timeout=10, message="b follows a")
        assert not leader_of(b)["is_leader"]
        sim.start()
        wait_devices(a, 10)
        percents = [10.0, 50.0, 100.0]
        body = {
            "model": "digits",
            "version": 2,
            "stages": [
                {"percent": percents[0], "min_soak_s": 0.3},
                {"percent": percents[1], "min_soak_s": 1},
                {"percent": percents[2], "min_soak_s": 0.3},
            ],
        }
        created = b.post("/rollouts", body)  # through the follower: the leader steps it
        assert isinstance(created, dict)
        rid = str(created["rollout_id"])
        wait_until(
            lambda: (r := b.rollout(rid))["stage_index"] == 1 and r["stage_settled_at"] is not None,
            timeout=30,
            interval=0.05,
            message="stage 1 settled",
        )
        killed_at = time.monotonic()
        a.stop(kill=True)  # SIGKILL mid-soak of stage 1: no clean hand-over
        wait_until(
            lambda: leader_of(b)["is_leader"], timeout=10, interval=0.05, message="b takes over"
        )
        takeover_s = time.monotonic() - killed_at
        assert takeover_s < 10, takeover_s
        # a stays dead: b alone finishes, with what the devices send it again.
        done = b.wait_rollout(rid, "completed", timeout=30)
        completed_s = time.monotonic() - killed_at
        assert leader_of(b)["is_leader"] and leader_of(b)["takeovers"] == 1
        assert done["device_states"] == {"succeeded": 10}
        stages = done["stages"]
        assert isinstance(stages, list)
        assert [s["devices"] for s in stages] == first_stage_sizes(10, percents)
        events = b.get(f"/rollouts/{rid}/events")
        assert isinstance(events, list)
        advanced = [e["stage_index"] for e in events if e["kind"] == "stage_advanced"]
        settled = [e["stage_index"] for e in events if e["kind"] == "stage_settled"]
        assert advanced == [1, 2] and settled == [0, 1, 2]
        assert [e["kind"] for e in events].count("completed") == 1
        # Resent copies counted once: one HEALTHY event per device, not one per copy.
        healthy = sorted(str(e["device_id"]) for e in events if e["kind"] == "report:healthy")
        assert healthy == devices, healthy
        for dev in sim.devices.values():
            assert dev.received.count(("digits", 2)) == 1, dev.received
        assert "took over the rollout engine from a" in (tmp_path / "fleet-b.log").read_text()
        # Stage 2 began within the dead session's expiry, so some of its reports went to a's
        # queue and reached b only as resends: the path under test was taken.
        resent = sum(d.resent for d in sim.devices.values())
        assert resent > 0, "no report was sent again: the dead session took none"
        wait_until(
            lambda: all(not d.unacked for d in sim.devices.values()),
            timeout=5,
            message="every report acknowledged",
        )
        print(
            f"takeover after SIGKILL: {takeover_s:.2f} s; rollout completed "
            f"{completed_s:.1f} s after the kill; {resent} reports re-sent"
        )
    finally:
        sim.stop()
        stop_processes(svc.proc for svc in (a, b) if svc.proc is not None)
        for svc in (a, b):
            svc.stop()
            svc.http.close()
