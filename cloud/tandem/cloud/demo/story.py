"""The demo's story, step by step, against real processes.

1. the models: digits v1 in the zoo, a retrained v2 and a deliberately bad v3 (cached);
2. the processes: an MQTT 5 broker (Mosquitto when installed, else the embedded one in
   `broker`; both with the password file and ACL `tandem fleet broker-config` writes), the
   cloud tier (`tandem serve`), the fleet service (`tandem fleet serve`, SQLite in the work
   dir) and one device-simulator process per runtime hosting real agents and SDK clients;
3. every device is given v1 through the fleet (signed, chunked over MQTT, verified, warmed
   up, health-checked), while the apps send traffic with the cascade policy;
4. v2 is rolled out in stages to every device;
5. v3 is rolled out with the same gates: they stop it at the first stage and the devices it
   touched go back to v2;
6. the summary, checked against what the devices themselves saw.

Everything talks over loopback on ports the OS picks. Every child process is supervised
(`processes.Supervisor`): Ctrl-C, SIGTERM, an error or a normal end stop them all. Starting
the processes (step 2) is `launch.Launcher`'s part; this module tells the rest.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn

from .config import DemoConfig
from .errors import StoryError
from .launch import MODEL, Launcher, prepare_workdir
from .processes import Interrupted, Supervisor
from .summary import (
    RolloutSummary,
    Summary,
    gate_text,
    render,
    rollout_summary,
    traffic_summary,
)
from .zoo import StoryZoo
from .zoo import accuracy as zoo_accuracy

# What the fleet should hold of v1 from each device (on average) before the first rollout: at
# 8 requests a second and 25% shadow sampling, about 10 s of traffic. With it the one-device
# canary passes its gates on its own evidence (about 450 requests, 100 shadow samples).
HISTORY_REQUESTS = 80
HISTORY_SHADOW = 20

log = logging.getLogger(__name__)


def stage_plan(config: DemoConfig) -> list[dict[str, Any]]:
    """10% / 50% / 100%, each soaking `config.soak_s`, every stage under the same gates.

    The gates judge the new version's telemetry in the stage's cohort: shadow agreement with
    the cloud model (field accuracy without labels), the share of requests the cascade had to
    send to the cloud compared with the baseline version, and the error rate.
    """
    # Each gate is a statistical test against the baseline (fleet/gates.py): it passes once
    # the confidence bound shows the new version within threshold + min_effect, fails once it
    # shows it worse than the threshold, and otherwise waits for more data, for at most
    # `max_wait_s` after the soak before the rollout pauses. A handful of shadow samples is
    # never enough to abort a good version, and a version that sends nearly every request to
    # the cloud fails the fallback gate on its request counts alone.
    gates = [
        {
            "metric": "shadow_agreement",
            "threshold": 0.15,
            "min_effect": 0.1,
            "min_samples": 12,
            "relative": True,
        },
        {
            "metric": "fallback_rate",
            "threshold": 0.25,
            "min_effect": 0.05,
            "min_samples": 30,
            "relative": True,
        },
        {"metric": "error_rate", "threshold": 0.1, "min_effect": 0.1, "min_samples": 30},
    ]
    return [
        {
            "percent": percent,
            "min_soak_s": config.soak_s,
            "max_wait_s": config.max_wait_s,
            "gates": gates,
        }
        for percent in (10, 50, 100)
    ]


class Story(Launcher):
    """Runs the demo once; `run()` returns the summary (and writes summary.json)."""

    def __init__(self, config: DemoConfig, console: Console) -> None:
        super().__init__(config, console)
        self.started = time.monotonic()
        self.traffic_started: float | None = None
        self.rollouts: list[RolloutSummary] = []
        self.problems: list[str] = []

    # --- helpers ---------------------------------------------------------------------------

    def wait(
        self,
        what: str,
        done: Callable[[], tuple[int, int] | bool],
        timeout_s: float,
        interval_s: float = 0.5,
    ) -> None:
        """Polls `done` (True, or (completed, total)) under a progress bar."""
        assert self.supervisor is not None
        deadline = time.monotonic() + timeout_s
        with Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            console=self.console,
            transient=True,
        ) as progress:
            task = progress.add_task(what, total=None)
            while True:
                self.supervisor.check()
                state = done()
                if isinstance(state, tuple):
                    progress.update(task, completed=state[0], total=state[1])
                    if state[0] >= state[1]:
                        return
                elif state:
                    return
                if time.monotonic() > deadline:
                    raise StoryError(f"{what}: not done after {timeout_s:.0f}s")
                time.sleep(interval_s)

    def device_stats(self) -> dict[str, dict[str, Any]]:
        devices: dict[str, dict[str, Any]] = {}
        for path in sorted((self.work / "sim").glob("*.json")):
            try:
                doc = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            devices.update(doc.get("devices") or {})
        return devices

    # --- steps -----------------------------------------------------------------------------

    def build(self, dataset: Path) -> StoryZoo:
        """Builds the story's models in a child process (torch and JAX stay out of this one)."""
        self.say(f"[bold]1. models[/] in {self.config.zoo} (built once, then cached)")
        assert self.supervisor is not None
        child = self.supervisor.start(
            "build",
            [sys.executable, "-m", "tandem.cloud.demo.zoo", str(self.config.zoo), str(dataset)],
            capture_stdout=True,
        )
        self.children["build"] = child
        self._record_children()
        story: StoryZoo | None = None
        assert child.proc.stdout is not None
        with Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            console=self.console,
            transient=True,
        ) as progress:
            task = progress.add_task("checking the build cache", total=None)
            for line in child.proc.stdout:
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if event.get("event") == "progress":
                    progress.update(
                        task,
                        description=f"{event['model']}: {event['step']}",
                        completed=event["completed"],
                        total=event["total"] or None,
                    )
                elif event.get("event") == "done":
                    story = StoryZoo.from_json(event["story"])
        code = child.proc.wait()
        self.supervisor.finished(child)
        if code != 0 or story is None:
            raise StoryError(
                f"building the models failed (status {code}); log {child.log_path}:\n"
                f"{child.log_tail(3000)}"
            )
        built = ", ".join(story.built) if story.built else "nothing (all cached)"
        self.say(f"   built {built}")
        labels = {1: "the first student", 2: "a retrained student", 3: "a bad student"}
        for version, entry in sorted(story.reports.items()):
            metrics = entry.get("metrics") or {}
            acc = zoo_accuracy(entry)
            shown = f"{100 * acc:.1f}%" if acc is not None else "?"
            self.say(
                f"   digits v{version}: {labels.get(version, '')} "
                f"({metrics.get('student_variant', 'normal')}), validation accuracy {shown}"
            )
        return story

    def wait_online(self) -> None:
        def online() -> tuple[int, int]:
            devices = self.api("GET", "/devices", online="true")
            return len(devices), len(self.device_ids)

        self.wait("devices connecting to the broker", online, timeout_s=180)
        self.traffic_started = time.monotonic()
        self.say(
            f"   {len(self.device_ids)} devices online; apps calling client.infer with "
            f"policy=cascade, shadow {100 * self.config.shadow_fraction:.0f}%, "
            f"{self.config.rate_per_s:g} req/s each"
        )

    def provision(self) -> None:
        self.say("[bold]3. provisioning[/]: every device gets digits v1 from the fleet")
        for device_id in self.device_ids:
            self.api("PUT", f"/devices/{device_id}/desired", {"model": MODEL, "version": 1})

        def installed() -> tuple[int, int]:
            devices = self.api("GET", "/devices")
            on_v1 = sum(1 for d in devices if (d.get("active_versions") or {}).get(MODEL) == 1)
            return on_v1, len(self.device_ids)

        self.wait("v1: download, verify, warm up, health window", installed, timeout_s=180)
        self.say(f"   all {len(self.device_ids)} devices run v1 (signed, verified, healthy)")
        self.wait_history(1)

    def wait_history(self, version: int) -> None:
        """Until the fleet holds some telemetry of `version` from every device: the gates
        compare each canary device with its own numbers from before the rollout, and a
        device with none is judged against the others, whose runtimes differ."""
        n = len(self.device_ids)
        want = (HISTORY_REQUESTS * n, HISTORY_SHADOW * n)

        def enough() -> tuple[int, int]:
            [stats] = self.api("GET", "/telemetry", model=MODEL, version=version) or [{}]
            if int(stats.get("devices") or 0) < n:
                return 0, 1
            got = (int(stats["requests"]), int(stats["shadow_sampled"]))
            share = min(min(g / w for g, w in zip(got, want, strict=True)), 1.0)
            return int(100 * share), 100

        self.wait(f"v{version} telemetry from every device, for the gates", enough, timeout_s=120)
        self.say(
            f"   v{version} history: at least {HISTORY_REQUESTS} requests and "
            f"{HISTORY_SHADOW} shadow samples a device on average, for the within-device gates"
        )

    def rollout(self, version: int, expect: str) -> RolloutSummary:
        body = {
            "model": MODEL,
            "version": version,
            "selector": {"site": "demo"},
            "stages": stage_plan(self.config),
            "device_timeout_s": 120,
        }
        started = time.monotonic()
        created = self.api("POST", "/rollouts", body)
        rid = str(created["rollout_id"])
        stages = created["stages"]
        self.say(
            f"   rollout {rid}: v{version} over v{created['baseline_version']}, stages "
            + " / ".join(f"{s['percent']:g}%" for s in stages)
            + f", soak {self.config.soak_s:g}s each; expected: {expect}"
        )
        final: dict[str, Any] = created
        deadline = time.monotonic() + self.config.stage_timeout_s * len(stages)
        assert self.supervisor is not None
        with Progress(
            TextColumn("   {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[note]}"),
            console=self.console,
        ) as progress:
            tasks = [
                progress.add_task(f"stage {i + 1} ({s['percent']:g}%)", total=None, note="")
                for i, s in enumerate(stages)
            ]
            while True:
                self.supervisor.check()
                final = self.api("GET", f"/rollouts/{rid}")
                devices = self.api("GET", f"/rollouts/{rid}/devices")
                for i, task in enumerate(tasks):
                    mine = [d for d in devices if d.get("stage_index") == i]
                    ok = sum(1 for d in mine if d.get("state") == "succeeded")
                    back = sum(1 for d in mine if d.get("state") in ("rolled_back", "failed"))
                    note = f"rolled back {back}" if back else ""
                    if i == final["stage_index"] and final["status"] == "running":
                        gates = final.get("gates") or []
                        note = ", ".join(
                            f"{g['metric']}="
                            + ("…" if g.get("value") is None else f"{float(g['value']):.2f}")
                            for g in gates
                        )
                    if not mine and final["status"] == "completed":
                        note, ok = "no devices left for this stage", 1
                    elif not mine and i > final["stage_index"]:
                        note = "not reached"
                    progress.update(task, completed=ok, total=max(len(mine), 1), note=note)
                if final["status"] in ("completed", "aborted", "paused"):
                    break
                if time.monotonic() > deadline:
                    waiting = [
                        f"{g['metric']} ({g.get('reason') or 'no data'})"
                        for g in final.get("gates") or []
                        if g.get("passed") is not True
                    ]
                    raise StoryError(
                        f"rollout {rid} still {final['status']} at stage "
                        f"{int(final['stage_index']) + 1} after {deadline - started:.0f}s, "
                        + (
                            "waiting for " + "; ".join(waiting)
                            if waiting
                            else "waiting for its devices to report"
                        )
                    )
                time.sleep(0.5)
        events = self.api("GET", f"/rollouts/{rid}/events")
        if final["status"] == "paused":
            # A paused rollout moves no device back: nothing to wait for.
            raise StoryError(
                f"rollout {rid} paused at stage {int(final['stage_index']) + 1}: "
                f"{final.get('paused_reason') or 'no reason given'}; gates: "
                + "; ".join(
                    f"{g['metric']} ({g.get('reason') or 'no data'})"
                    for g in final.get("gates") or []
                )
            )
        if final["status"] != "completed":
            self.wait_rolled_back(rid, int(final["baseline_version"]))
            final = self.api("GET", f"/rollouts/{rid}")
        devices = self.api("GET", f"/rollouts/{rid}/devices")
        summary = rollout_summary(
            final, devices, events, self.device_stats(), time.monotonic() - started
        )
        self.say(self.describe(summary))
        return summary

    def wait_rolled_back(self, rid: str, baseline: int) -> None:
        """Until every device the rollout touched runs the baseline again (fleet and device)."""

        def back() -> tuple[int, int]:
            touched = [d["device_id"] for d in self.api("GET", f"/rollouts/{rid}/devices")]
            stats = self.device_stats()
            fleet = {d["device_id"]: d for d in self.api("GET", "/devices")}
            ok = sum(
                1
                for d in touched
                if (fleet.get(d, {}).get("active_versions") or {}).get(MODEL) == baseline
                and stats.get(d, {}).get("active_version") == baseline
            )
            return ok, len(touched)

        self.wait(f"touched devices back on v{baseline}", back, timeout_s=120)

    def describe(self, r: RolloutSummary) -> str:
        if r.status == "completed":
            return (
                f"   [green]v{r.version} completed[/]: {r.stages_reached}/{r.stages_total} stages, "
                f"{r.device_states.get('succeeded', 0)} devices healthy on v{r.version} "
                f"in {r.seconds:.0f}s"
            )
        gates = "; ".join(gate_text(g) for g in r.failed_gates)
        return (
            f"   [red]v{r.version} {r.status}[/] at stage {r.stages_reached}/{r.stages_total} "
            f"by {r.stopped_by or 'the engine'} ({gates}); {r.rolled_back} device(s) rolled back "
            f"to v{r.baseline_version}; devices outside the first cohort that got "
            f"v{r.version}: {len(r.outside_first_cohort_with_version)}"
        )

    def check(self) -> None:
        """What the story promises; anything else is reported, and the exit status is 1."""
        good, bad = self.rollouts
        if good.status != "completed":
            self.problems.append(f"v{good.version} did not complete: {good.status}")
        elif good.device_states.get("succeeded", 0) != len(self.device_ids):
            self.problems.append(f"v{good.version} is not healthy on every device")
        if bad.status not in ("aborted", "paused") or bad.stages_reached != 1:
            self.problems.append(
                f"v{bad.version} was not stopped at the first stage "
                f"({bad.status}, stage {bad.stages_reached})"
            )
        if bad.outside_first_cohort_with_version:
            self.problems.append(
                f"devices outside the first cohort got v{bad.version}: "
                f"{bad.outside_first_cohort_with_version}"
            )
        if sorted(bad.back_on_baseline) != sorted(bad.first_cohort):
            self.problems.append(f"first cohort not back on v{bad.baseline_version}")

    # --- the whole story -------------------------------------------------------------------

    def run(self, wait_forever: Callable[[], None]) -> Summary:
        config = self.config
        prepare_workdir(self.work)
        self.supervisor = Supervisor(self.work / "logs")
        self.say(f"[bold]tandem demo[/]: {config.devices} devices, work dir {self.work}")
        try:
            dataset = self.work / "digits-test.npz"
            story = self.build(dataset)
            self.say("[bold]2. processes[/] (loopback, ports picked by the OS)")
            passwords = self.start_broker()
            self.start_cloud()
            self.start_fleet(story)
            self.start_devices(passwords, dataset, story)
            self.wait_online()
            self.provision()
            self.say("[bold]4. rollout of v2[/] (a retrained student) through every stage")
            self.rollouts.append(self.rollout(2, "completes"))
            self.say("[bold]5. rollout of v3[/] (a bad student) under the same gates")
            self.rollouts.append(self.rollout(3, "the gates stop it at stage 1"))
            self.check()
            remaining = config.duration_s - (time.monotonic() - (self.traffic_started or 0.0))
            if remaining > 0:
                self.wait(
                    f"traffic until {config.duration_s:g}s",
                    lambda: time.monotonic() - (self.traffic_started or 0.0) >= config.duration_s,
                    timeout_s=remaining + 30,
                )
            if not config.keep_running:
                self.stop_devices()
            summary = self.summary()
            self.console.print(render(summary))
            if config.keep_running:
                self.say(
                    f"\neverything stays up, traffic included; console: {self.console_url}\n"
                    "Ctrl-C stops every process the demo started."
                )
                try:
                    wait_forever()
                except Interrupted:
                    self.say("stopping every process the demo started")
            return summary
        finally:
            if self.http is not None:
                self.http.close()
            self.supervisor.stop_all()

    def stop_devices(self) -> None:
        """Stops the simulators first, so their final stats include every request."""
        assert self.supervisor is not None
        for name, child in self.children.items():
            if name.startswith("devices-"):
                self.supervisor.stop(child, timeout_s=20)

    def summary(self) -> Summary:
        summary = Summary(
            broker=self.broker_name,
            console_url=self.console_url,
            traffic=traffic_summary(self.device_stats()),
            rollouts=self.rollouts,
            elapsed_s=round(time.monotonic() - self.started, 1),
        )
        doc = summary.to_json()
        doc["problems"] = self.problems
        (self.work / "summary.json").write_text(json.dumps(doc, indent=2))
        return summary
