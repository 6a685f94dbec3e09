"""Rollout gates as statistical tests, proven by simulation (issue 12): false aborts of good
versions, bad versions stopped, and the samples and time each needs to a decision, for the
engine's gates and, over the same simulated telemetry, the raw-ratio gates they replaced.

The simulation (`bench/gate_sim.py`) is seeded and pure: no broker, no store, simulated time.
It drives the real `tandem.cloud.fleet.engine.step` tick by tick over a fleet of 200 devices
whose request rates are lognormal (the median device 1.5 req/s, sigma 1), through 1% / 10% /
50% / 100% stages with 30-minute soaks, gates on the first three stages and `max_wait_s` one
hour, the default false_abort_rate (0.01) and min_effect (0.02).

    .venv/bin/python -m pytest bench/bench_gates.py -q -s
    TANDEM_BENCH_GATE_RUNS=100 ...   # fewer rollouts per scenario (the figures need >= 200)
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import gate_sim as sim  # noqa: E402

RUNS = int(os.environ.get("TANDEM_BENCH_GATE_RUNS", "200"))
RESULTS = ROOT / "bench" / "results" / "gates-simulation.txt"
WORLD = sim.World()


SPREAD = 0.3  # the devices-differ scenario: sigma of each device's logit shift of its rates


def _scenarios() -> list[sim.Result]:
    results = []
    for number, (label, boundary) in enumerate((("margin", False), ("boundary", True))):
        plan = sim.make_plan(boundary=boundary)
        results.append(sim.run(f"good, {label} plan", plan, WORLD, RUNS, seed=10 * number))
        bad = sim.bad_versions(plan)
        results.append(
            sim.run(f"bad, {label} plan", plan, WORLD, RUNS, seed=10 * number + 1, bad=bad)
        )
    # Devices whose inputs differ: requests on one device are correlated, which the
    # device-clustered intervals account for (asserted like the rest).
    differ = replace(WORLD, device_spread=SPREAD)
    plan = sim.make_plan()
    results.append(sim.run(EXTRA, plan, differ, RUNS, seed=20))
    results.append(sim.run(EXTRA_BAD, plan, differ, RUNS, seed=21, bad=sim.bad_versions(plan)))
    # An hour of baseline history on every device: the relative gates compare each device
    # with itself (gates.Change), on the same seeds as the scenarios without it.
    for number, (label, boundary, world) in enumerate(
        (
            ("margin", False, replace(WORLD, history_s=HISTORY_S)),
            ("boundary", True, replace(WORLD, history_s=HISTORY_S)),
            (f"margin, differ {SPREAD}", False, replace(differ, history_s=HISTORY_S)),
        )
    ):
        plan = sim.make_plan(boundary=boundary)
        seed = (0, 10, 20)[number]
        results.append(sim.run(f"good, {label}, history", plan, world, RUNS, seed=seed))
        bad = sim.bad_versions(plan)
        results.append(sim.run(f"bad, {label}, history", plan, world, RUNS, seed=seed + 1, bad=bad))
    return results


EXTRA = f"good, margin, differ {SPREAD}"
EXTRA_BAD = f"bad, margin, differ {SPREAD}"
HISTORY_S = 3600.0  # observe.HISTORY_S


def _history(r: sim.Result) -> bool:
    return r.name.endswith(", history")


def _describe(plan_label: str, boundary: bool) -> str:
    plan = sim.make_plan(boundary=boundary)
    gates = ", ".join(
        f"{g.metric.value}{' rel' if g.relative else ''} {g.threshold:g}"
        + (f" (n>={g.min_samples})" if g.min_samples > 1 else "")
        for g in plan.stages[0].gates
    )
    bad = sim.bad_versions(plan)
    worse = (
        f"error +{bad['error_rate'].error_rate - sim.BASE.error_rate:.3f}, "
        f"fallback +{bad['fallback_rate'].fallback_rate - sim.BASE.fallback_rate:.3f}, "
        f"agreement -{sim.BASE.agreement - bad['shadow_agreement'].agreement:.3f}, "
        f"estimated accuracy -{bad['estimated_accuracy'].accuracy_drop:.3f}, "
        f"p95 latency x{bad['p95_latency'].latency_median_ms / sim.BASE.latency_median_ms:.2f}, "
        "or 90% fallbacks (answers almost nothing locally)"
    )
    return f"{plan_label} plan gates: {gates}\n  bad versions (one each, in turn): {worse}"


def test_gates_simulation(benchmark: Any) -> None:
    started = time.perf_counter()
    results: list[sim.Result] = benchmark.pedantic(_scenarios, rounds=1, iterations=1)
    took = time.perf_counter() - started
    b = sim.BASE
    lines = [
        "rollout gates simulation (bench/bench_gates.py, bench/gate_sim.py)",
        f"date: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}  "
        f"(wall {took:.0f} s on a shared 2-core machine)",
        f"fleet: {WORLD.devices} devices, request rate lognormal (median {WORLD.median_rps} "
        f"req/s, sigma {WORLD.rps_sigma}), the same true rates on every device (first table); "
        f"install "
        f"{WORLD.install_s[0]:g}-{WORLD.install_s[1]:g} s; telemetry and an engine look every "
        f"{WORLD.tick_s:g} s",
        f"baseline (= good version): error {b.error_rate}, fallback {b.fallback_rate}, shadow "
        f"agreement {b.agreement} on {WORLD.shadow_rate:.0%} of local answers, estimated "
        f"accuracy {sim.true_accuracy(b):.3f} (20 confidence buckets), local latency "
        f"lognormal median {b.latency_median_ms} ms sigma {b.latency_sigma}",
        "stages: 1% / 10% / 50% (soak 1800 s, max_wait_s 3600, gates) / 100%; "
        "false_abort_rate 0.01, min_effect 0.02 (defaults), on_gate_failure abort",
        _describe("margin", False),
        _describe("boundary", True),
        "gates new = tandem.cloud.fleet.engine.step as it is; old = the same stages judged by "
        "the rule before issue 12 (point value vs threshold once min_samples are in, no "
        "deadline on a wait), over the same simulated telemetry",
        "done = completed; abort = aborted by a gate; pause = paused after max_wait_s for lack "
        "of evidence; stall = old gates still waiting after 24 h; stopped = not completed",
        "canary = the first stage's decision (advance, abort or pause): cohort requests, "
        "shadow samples and minutes since creation; rollout min = minutes to the final state",
        "",
        *sim.table([r for r in results if r.name not in (EXTRA, EXTRA_BAD) and not _history(r)]),
        "",
        f"devices differ (asserted like the above): each device's error, fallback and agreement "
        f"rates shifted by N(0, {SPREAD}) on the logit scale (the same shift for both versions: "
        "its inputs are easy or hard for any model), so requests on one device are correlated; "
        "the good version is still exactly as good as the baseline on every device. The gates "
        "judge device-clustered intervals (gates.Clusters: random-effects width with the "
        "fleet's between-device variance, sandwich CR1 + t from 20 cohort devices on)",
        *sim.table([r for r in results if r.name in (EXTRA, EXTRA_BAD)]),
        "",
        f"with history (asserted like the above): every device has {HISTORY_S:g} s of "
        "baseline telemetry from before the rollout, as the fleet store keeps it "
        "(observe.HISTORY_S), so the relative gates judge each cohort device against itself "
        "minus the baseline devices' drift (gates.Change, within-device); the same seeds as "
        "the rows without history. The old rule does not use history: its rows repeat.",
        *sim.table([r for r in results if _history(r)]),
        "",
        "bad rollouts by degradation:",
    ]
    for r in results:
        if not r.good:
            lines += [f"{r.name}:", *sim.by_kind(r)]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    for r in results:
        n = len(r.new)
        if r.good:
            aborted = sim.count(r.new, "aborted")
            assert aborted / n <= 0.01, f"{r.name}: {aborted} of {n} good versions aborted"
        else:
            done = sim.count(r.new, "completed")
            assert (n - done) / n >= 0.99, f"{r.name}: {done} of {n} bad versions completed"


if __name__ == "__main__":
    import pytest

    raise SystemExit(pytest.main([__file__, "-q", "-s"]))
