"""Activation, health window and rollback.

warm-up against the reference -> switch active.json -> ACTIVATED -> health window ->
HEALTHY (older versions pruned), or switch back -> ROLLED_BACK. The verdict is the pure
`health.HealthWatch`; this module does the files and the timing.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time

from tandem.agent.core import AgentCore, Ref, Watch
from tandem.agent.errors import WarmupError
from tandem.agent.health import HealthWatch, Verdict
from tandem.agent.state import PendingHealth
from tandem.agent.warmup import Probe, warm_up
from tandem.errors import ArtifactError
from tandem.protos.fleet.v1 import fleet_pb2
from tandem.sdk.artifacts import read_manifest_unverified
from tandem.sdk.store import ActivePointer

log = logging.getLogger(__name__)

Kind = fleet_pb2.DeviceReport.Kind


class ActivationMixin(AgentCore):
    """Warms up, switches, watches the health window and rolls back."""

    async def _activate(
        self, model: str, version: int, variant: str, rollout_id: str, *, fresh: bool = False
    ) -> None:
        """Warms up an installed variant and switches to it (`fresh`: just installed)."""
        variant_dir = self.store.model_dir(model) / str(version) / variant
        offer_like = Ref(model, version, variant, rollout_id)
        try:
            manifest = read_manifest_unverified(variant_dir)
            probe = await asyncio.to_thread(
                warm_up, variant_dir, manifest, self.config.warmup_rtol, self.config.warmup_atol
            )
        except (WarmupError, ArtifactError) as exc:
            log.error("%s v%d %s failed warm-up: %s", model, version, variant, exc)
            memory = self.state.model(model)
            memory.failed.add((version, variant))
            self._report(Kind.FAILED, offer_like, reason=f"warmup: {exc}")
            if fresh:
                # Never used, never will be: do not keep it on the device's disk.
                shutil.rmtree(variant_dir, ignore_errors=True)
            return
        old_watch = self._watches.pop(model, None)
        if old_watch is not None:
            log.info(
                "%s: health watch of v%d ended by a new activation", model, old_watch.health.version
            )
        current = self.store.read_active(model)
        previous = (current.version, current.variant) if current else None
        if previous == (version, variant):
            previous = (
                (current.previous_version, current.previous_variant)
                if (current and current.previous_version is not None)
                else None
            )
        memory = self.state.model(model)
        accepted = max(memory.max_accepted_version, current.max_accepted_version if current else 0)
        # The health window is recorded BEFORE the pointer switch. The other order leaves,
        # for a kill between the two writes, a pointer on the new version with no window on
        # disk: the restarted agent then finds it active, plans nothing, and never reports
        # HEALTHY. In this order a kill between them leaves a window for a version that is
        # not active, which `_resume_health_watches` drops, and the desired state switches
        # to it again (REACTIVATE).
        started = time.time()
        pending = PendingHealth(version, variant, previous, started, rollout_id)
        memory.health = pending
        self.state.save()
        self.store.write_active(
            model,
            ActivePointer(
                version=version,
                variant=variant,
                previous_version=previous[0] if previous else None,
                previous_variant=previous[1] if previous else None,
                max_accepted_version=max(accepted, version),
            ),
        )
        log.info("%s: v%d %s active (previous %s)", model, version, variant, previous)
        self._report(Kind.ACTIVATED, offer_like)
        self._publish_presence()
        self._watch(model, pending, probe)

    def _watch(self, model: str, pending: PendingHealth, probe: Probe | None) -> None:
        self._watches[model] = Watch(
            health=HealthWatch(
                model=model,
                version=pending.version,
                variant=pending.variant,
                started=pending.started,
                window_s=self.config.health_window_s,
                max_error_rate=self.config.max_error_rate,
                min_requests=self.config.min_health_requests,
            ),
            probe=probe,
            pending=pending,
            next_probe=time.monotonic() + self.config.health_probe_interval_s,
        )

    def _resume_health_watches(self) -> None:
        """A restart inside a health window continues the window (probe reloaded lazily)."""
        for model, memory in self.state.models.items():
            pending = memory.health
            if pending is None:
                continue
            try:
                pointer = self.store.read_active(model)
            except ArtifactError:
                pointer = None
            if pointer is None or (pointer.version, pointer.variant) != (
                pending.version,
                pending.variant,
            ):
                memory.health = None
                if (pending.version, pending.variant) in memory.failed:
                    # Killed after a rollback moved the pointer back, before its report was
                    # queued: queue it now (saved with the window's end).
                    ref = Ref(model, pending.version, pending.variant, pending.rollout_id)
                    self._report(
                        Kind.ROLLED_BACK,
                        ref,
                        reason="failed its health window; rolled back before a restart",
                    )
                continue
            self._watch(model, pending, None)
            if (pending.version, pending.variant) in memory.failed:
                # Killed between marking it failed and switching back: finish the rollback.
                self._watches[model].health.failure = "failed its health window before a restart"

    async def _check_health(self, model: str, watch: Watch) -> None:
        now = time.monotonic()
        if watch.health.verdict(time.time()) is Verdict.PENDING and now >= watch.next_probe:
            watch.next_probe = now + self.config.health_probe_interval_s
            problem = await asyncio.to_thread(self._run_probe, model, watch)
            watch.health.observe_probe(problem)
        if self._watches.get(model) is not watch:
            return  # replaced while probing
        verdict = watch.health.verdict(time.time())
        if verdict is Verdict.PENDING:
            return
        del self._watches[model]
        pending = watch.pending
        memory = self.state.model(model)
        ref = Ref(model, pending.version, pending.variant, pending.rollout_id)
        if verdict is Verdict.HEALTHY:
            memory.health = None
            log.info("%s v%d %s healthy", model, pending.version, pending.variant)
            self._report(Kind.HEALTHY, ref)  # one write: the window ends, the report is queued
            await asyncio.to_thread(self._prune, model)
            return
        reason = watch.health.failure or "unhealthy"
        # The window stays on disk until the pointer is back: a kill between the two writes
        # then restarts into a window for a version already marked failed, which rolls back
        # at once (`_resume_health_watches`). Clearing it first would leave the failed
        # version active with nothing left to take it away.
        memory.failed.add((pending.version, pending.variant))
        self.state.save()
        where = self._roll_back(model, pending, reason)
        memory.health = None
        # The window ends and the report is queued in one write; a kill before it restarts
        # into the window with the pointer already back, which queues the report then.
        self._report(Kind.ROLLED_BACK, ref, reason=f"{reason}; {where}")
        self._publish_presence()

    def _prune(self, model: str) -> None:
        """Keeps the active version and the one a rollback would return to; deletes the rest.

        Runs only after a health window passed, so the SDK never loses what it uses, and a
        rollout abort still finds its baseline (the previous version) on the device.
        """
        pointer = self.store.read_active(model)
        if pointer is None:
            return
        keep = {(pointer.version, pointer.variant)}
        if pointer.previous_version is not None:
            keep.add((pointer.previous_version, pointer.previous_variant))
        # The version the fleet wants now may be installing or warming up while an older
        # version's health window ends: never delete what is about to become active.
        offer = self._desired.get(model)
        if offer is not None:
            keep.add((offer.version, offer.variant))
        delivery = self._delivery
        if delivery is not None and delivery.offer.model == model:
            keep.add((delivery.offer.version, delivery.offer.variant))
        for version in self.store.versions(model):
            version_dir = self.store.model_dir(model) / str(version)
            for variant_dir in self.store.variant_dirs(model, version):
                # An unpinned pointer (variant None) keeps every variant of its version.
                if (version, variant_dir.name) not in keep and (version, None) not in keep:
                    log.info(
                        "%s: removing v%d %s (neither active nor previous)",
                        model,
                        version,
                        variant_dir.name,
                    )
                    shutil.rmtree(variant_dir, ignore_errors=True)
            if version_dir.is_dir() and not any(version_dir.iterdir()):
                version_dir.rmdir()

    def _run_probe(self, model: str, watch: Watch) -> str | None:
        try:
            if watch.probe is None:
                folder = self.store.model_dir(model) / str(watch.pending.version)
                folder = folder / watch.pending.variant
                manifest = read_manifest_unverified(folder)
                watch.probe = Probe(
                    folder, manifest, self.config.warmup_rtol, self.config.warmup_atol
                )
            watch.probe.check()
        except (WarmupError, ArtifactError) as exc:
            return str(exc)
        return None

    def _roll_back(self, model: str, pending: PendingHealth, reason: str) -> str:
        """Moves the pointer off a failed version; returns where the device is now."""
        current = self.store.read_active(model)
        accepted = current.max_accepted_version if current else 0
        previous = pending.previous
        previous_dir = (
            self.store.model_dir(model) / str(previous[0]) / str(previous[1])
            if previous and previous[1]
            else None
        )
        if previous is not None and (previous_dir is None or previous_dir.is_dir()):
            self.store.write_active(
                model,
                ActivePointer(
                    version=previous[0],
                    variant=previous[1],
                    max_accepted_version=max(accepted, pending.version),
                ),
            )
            where = f"back on v{previous[0]} {previous[1] or ''}".rstrip()
        else:
            # Nothing to go back to: take the failing version away so the SDK asks the cloud.
            (self.store.model_dir(model) / "active.json").unlink(missing_ok=True)
            shutil.rmtree(
                self.store.model_dir(model) / str(pending.version) / pending.variant,
                ignore_errors=True,
            )
            where = "no previous version: local model removed"
        log.error(
            "%s v%d %s unhealthy (%s): %s", model, pending.version, pending.variant, reason, where
        )
        return where
