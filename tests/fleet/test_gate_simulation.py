"""The rollout gates over simulated rollouts (bench/gate_sim.py, small sizes; the 200 + 200
rollout figures are bench/bench_gates.py): the engine's statistical gates do not abort good
versions, stop every clearly bad one, and the raw-ratio gates they replaced abort good
versions on small samples (the regression of issue 12); when devices' rates differ, the
device-clustered intervals keep good versions from aborting (the binomial width alone aborted
3 of these 30)."""

from __future__ import annotations

from dataclasses import replace

from bench import gate_sim as sim
from tandem.cloud.fleet import engine as eng

WORLD = sim.World(devices=40, median_rps=3.0)
PLAN = sim.make_plan(
    soak_s=600, max_wait_s=1200, min_requests=100, min_shadow=30, percents=(5, 50, 100)
)
RUNS = 20


def test_good_versions_pass_the_new_gates_and_trip_the_old_ones() -> None:
    r = sim.run("good", PLAN, WORLD, RUNS, seed=101)
    # A false-abort rate of at most 1% gives 3 or more in 20 with probability 0.1%.
    assert sim.count(r.new, "aborted") <= 2, sim.table([r])
    # Not by refusing to decide: most complete, the others pause for lack of evidence.
    assert sim.count(r.new, "completed") >= 15, sim.table([r])
    assert {o.status for o in r.new} <= {"completed", "paused", "aborted"}
    # The point value against the threshold, once min_samples are in, aborts good versions.
    assert sim.count(r.old, "aborted") >= 5, sim.table([r])


def test_clearly_bad_versions_are_all_stopped() -> None:
    bad = sim.bad_versions(PLAN, factor=2.0)
    r = sim.run("bad", PLAN, WORLD, RUNS, seed=102, bad=bad)
    assert sim.count(r.new, "completed") == 0, "\n".join(sim.by_kind(r))
    # Stopped by the gate that sees it, in the first stage, nearly always without waiting out
    # max_wait_s (a canary of two devices on 30 shadow samples may lack the evidence).
    assert sim.count(r.new, "aborted") >= RUNS - 2, "\n".join(sim.by_kind(r))
    assert {o.stage for o in r.new} == {0}
    mute = [o for o, k in zip(r.new, r.kinds, strict=True) if k.startswith("mute")]
    assert mute and all(o.reason == "fallback_rate" for o in mute)


def test_old_rule_aborts_on_the_issues_small_sample_and_runs_are_seeded() -> None:
    gate = eng.Gate(eng.GateMetric.SHADOW_AGREEMENT, 0.9, min_samples=10)
    cohort = eng.VersionStats(requests=20, shadow_sampled=13, shadow_agreed=11)
    assert sim.old_gate_verdicts([gate], cohort, eng.VersionStats(), 0.0, 1) == [
        (gate.metric, False)
    ]
    once = sim.simulate((7, 0), PLAN, sim.BASE, sim.BASE, WORLD)
    assert sim.simulate((7, 0), PLAN, sim.BASE, sim.BASE, WORLD) == once


def test_good_versions_do_not_abort_when_device_rates_differ() -> None:
    # Each device's error, fallback and agreement rates shifted by N(0, 0.3) on the logit
    # scale, the same under both versions: requests on one device are correlated.
    world = replace(WORLD, device_spread=0.3)
    r = sim.run("good, devices differ", PLAN, world, 30, seed=103)
    # At most 1% false aborts gives 2 or more in 30 with probability 4%; the binomial
    # intervals abort 3 of these 30 rollouts.
    assert sim.count(r.new, "aborted") <= 1, sim.table([r])
    assert {o.status for o in r.new} <= {"completed", "paused", "aborted"}


def test_with_history_heterogeneous_fleets_complete_and_bad_versions_still_stop() -> None:
    # The same heterogeneous fleet with an hour of baseline history on every device: each
    # cohort device is compared with itself (gates.Change). Without history all 30 good
    # versions of this seed pause at the 2-device canary, and 7 of 20 bad ones pause.
    world = replace(WORLD, device_spread=0.3, history_s=3600.0)
    good = sim.run("good, devices differ, history", PLAN, world, 30, seed=103)
    assert sim.count(good.new, "aborted") <= 1, sim.table([good])
    assert sim.count(good.new, "completed") >= 15, sim.table([good])
    bad = sim.run("bad, history", PLAN, world, 20, seed=102, bad=sim.bad_versions(PLAN, 2.0))
    assert sim.count(bad.new, "completed") == 0, "\n".join(sim.by_kind(bad))
    assert sim.count(bad.new, "aborted") >= 18, "\n".join(sim.by_kind(bad))
    without = sim.run("good, devices differ", PLAN, replace(world, history_s=0.0), 30, seed=103)
    assert sim.count(without.new, "completed") < 5, sim.table([without])
