"""Desired state against the store: admit the fleet's desired state (its signature, device
and revision), plan each model, and start (or refuse) one install at a time.

The decisions are `desired.admit`, `verify.plan` and `verify.check_offer`; this module reads
the store and the agent's memory into their values and acts on the answer.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path

from google.protobuf.message import DecodeError

from tandem.agent import errors
from tandem.agent.core import ActiveDelivery, AgentCore, Ref
from tandem.agent.delivery import DeliveryState, no_space
from tandem.agent.desired import admit
from tandem.agent.errors import RefusedError
from tandem.agent.transfer import Staging
from tandem.agent.verify import Action, LocalModelState, Offer, check_offer, delta_base, plan
from tandem.errors import ArtifactError
from tandem.protos.fleet.v1 import fleet_pb2, topics
from tandem.sdk.artifacts import SignatureEntry, signatures_to_bytes

log = logging.getLogger(__name__)

Kind = fleet_pb2.DeviceReport.Kind

_MAX_DESIRED_REFUSALS_REMEMBERED = 1024  # refused desired states reported; then forgotten


class ReconcileMixin(AgentCore):
    """Reconciles the desired state with the store and starts installs."""

    async def _handle_desired(self, payload: bytes) -> None:
        desired = fleet_pb2.DesiredState()
        try:
            desired.ParseFromString(payload)
        except DecodeError as exc:
            log.warning("garbage on the desired-state topic dropped: %s", exc)
            return
        if self.fleet_keys is None:
            await self._handle_unsigned(desired)
            return
        try:
            admitted = admit(desired, self.fleet_keys, self.config.device_id, self.state.desired)
        except RefusedError as exc:
            self._refuse_desired(exc, desired)
            return
        if admitted.fresh:
            # Durable before anything is acted on: after a crash, only this state or a newer
            # one is obeyed again.
            self.state.desired = admitted.accepted
            self.state.save()
            log.info(
                "desired state r%d accepted (fleet key %s, signed at %d ms)",
                admitted.accepted.revision,
                admitted.keyid,
                admitted.issued_at_ms,
            )
        self._revision = admitted.accepted.revision
        self._desired = self._offers(admitted.models)
        await self._reconcile()

    async def _handle_unsigned(self, desired: fleet_pb2.DesiredState) -> None:
        """No fleet key configured: the desired state as it was before it was signed."""
        if not self._unsigned_warned:
            self._unsigned_warned = True
            log.warning(
                "no fleet key configured: desired states are obeyed unsigned, so whoever can "
                "publish on %s can roll this device back; pass --fleet-key",
                self.config.topic(topics.DESIRED),
            )
        if desired.device_id and desired.device_id != self.config.device_id:
            log.warning("desired state for device %r dropped", desired.device_id)
            return
        if desired.revision < self._revision:
            log.info("stale desired state r%d < r%d ignored", desired.revision, self._revision)
            return
        offers = self._offers(tuple(desired.models))
        # The revision is not signed: only a state carrying a manifest signed by a trusted
        # key may raise it. Otherwise one garbled or forged state with a huge revision would
        # make the agent ignore its fleet's real desired states until it restarts.
        if any(self._authentic(offer) for offer in offers.values()):
            self._revision = desired.revision
        elif desired.models:
            log.warning(
                "desired state r%d carries no trusted manifest: its revision is not adopted",
                desired.revision,
            )
        self._desired = offers
        await self._reconcile()

    def _offers(self, models: tuple[fleet_pb2.DesiredModel, ...]) -> dict[str, Offer]:
        offers: dict[str, Offer] = {}
        limit = self.config.max_desired_models
        if len(models) > limit:
            log.warning(
                "desired state names %d models; only the first %d are considered",
                len(models),
                limit,
            )
        for item in models[:limit]:
            try:
                offers[item.model] = offer_from_proto(item)
            except (ValueError, ArtifactError) as exc:
                log.warning("desired model %r malformed, dropped: %s", item.model, exc)
        return offers

    def _refuse_desired(self, exc: RefusedError, desired: fleet_pb2.DesiredState) -> None:
        """Nothing of a refused state is obeyed; the fleet hears of it once per cause.

        A replay is reported once per signed payload (there are only as many as the fleet
        ever signed), anything else once per code: a flood of forgeries cannot fill the
        report outbox, and the broker re-delivering a retained copy is not news.
        """
        log.warning("desired state refused, nothing changed: %s", exc)
        key = exc.code
        if exc.code == errors.DESIRED_REPLAY:
            key += ":" + hashlib.sha256(desired.signed.payload).hexdigest()
        if key in self._desired_refusals_reported:
            return
        if len(self._desired_refusals_reported) >= _MAX_DESIRED_REFUSALS_REMEMBERED:
            self._desired_refusals_reported.clear()
        self._desired_refusals_reported.add(key)
        try:
            self._report(Kind.REFUSED, Ref(model="", version=0, variant=""), reason=str(exc))
        except OSError as save_exc:  # a full disk: the report still goes out from memory
            log.warning("could not save the refusal: %s", save_exc)

    def _authentic(self, offer: Offer) -> bool:
        try:
            self.trusted.verify(offer.signed, offer.signatures)
        except ArtifactError:
            return False
        return True

    def _local_state(self, model: str) -> LocalModelState:
        pointer = self.store.read_active(model)
        installed = frozenset(
            (version, path.name)
            for version in self.store.versions(model)
            for path in self.store.variant_dirs(model, version)
        )
        memory = self.state.model(model)
        accepted = max(memory.max_accepted_version, pointer.max_accepted_version if pointer else 0)
        return LocalModelState(
            active=(pointer.version, pointer.variant) if pointer else None,
            installed=installed,
            max_accepted_version=accepted,
            failed=frozenset(memory.failed),
        )

    async def _reconcile(self) -> None:
        delivery = self._delivery
        if delivery is not None:
            wanted = self._desired.get(delivery.offer.model)
            if wanted is None or wanted.digest != delivery.offer.digest:
                log.info(
                    "desired state moved away from %s v%d: abandoning its transfer",
                    delivery.offer.model,
                    delivery.offer.version,
                )
                delivery.staging.discard()
                self._delivery = None
            else:
                delivery.offer = wanted  # same manifest; the rollout id may be new
                return  # one delivery at a time; the rest follow when it ends
        for model in sorted(self._desired):
            offer = self._desired[model]
            try:
                local = self._local_state(model)
            except ArtifactError as exc:
                log.error("store for %s unreadable: %s", model, exc)
                continue
            decision = plan(offer, local)
            if decision.action is Action.NOTHING:
                log.debug("%s: %s", model, decision.why)
                continue
            if decision.action is Action.REACTIVATE:
                await self._activate(model, offer.version, offer.variant, offer.rollout_id)
                continue
            if offer.offer_key in self.state.refused:
                # Refused before: no new verification, but a new revision of the desired
                # state hears the answer again (the service may have missed the first one).
                if self._refusals_reported.get(offer.offer_key) != self._revision:
                    self._refusals_reported[offer.offer_key] = self._revision
                    self._report(Kind.REFUSED, offer, reason=self.state.refused[offer.offer_key])
                continue
            if await self._begin_install(offer, local):
                return

    async def _begin_install(self, offer: Offer, local: LocalModelState) -> bool:
        """Verifies the offer and starts its transfer; False when it was refused."""
        try:
            manifest = check_offer(offer, self.trusted, self.facts, local, datetime.now(UTC))
        except RefusedError as exc:
            self._refuse(offer, exc)
            return False
        self._drop_other_staging(offer.transfer_id)
        staging = Staging(
            self._staging_root,
            offer.transfer_id,
            manifest,
            sync_every_bytes=self.config.sync_every_bytes,
        )
        try:
            staging.open(offer.signed, signatures_to_bytes(offer.signatures))
        except OSError as exc:
            staging.discard()
            self._refuse(offer, no_space(exc))
            return False
        base = delta_base(offer, local)
        decisions = DeliveryState(
            base_version=base,
            attempts=self.config.delivery_attempts,
            last_activity=time.monotonic(),
        )
        delivery = ActiveDelivery(offer, manifest, staging, decisions)
        self._delivery = delivery
        log.info(
            "installing %s v%d %s (%d bytes, delta base v%d, resuming at %d)",
            offer.model,
            offer.version,
            offer.variant,
            staging.bytes_total,
            base,
            staging.bytes_received,
        )
        self._report(
            Kind.PROGRESS,
            offer,
            bytes_received=staging.bytes_received,
            bytes_total=staging.bytes_total,
        )
        await self._continue(delivery)
        return True

    def _drop_other_staging(self, keep: str) -> None:
        """One delivery at a time: leftovers of abandoned ones only take disk space."""
        if not self._staging_root.is_dir():
            return
        for folder in self._staging_root.iterdir():
            if folder.name != keep:
                shutil.rmtree(folder, ignore_errors=True)

    def _refuse(self, offer: Offer, exc: RefusedError) -> None:
        log.warning("refused %s v%d %s: %s", offer.model, offer.version, offer.variant, exc)
        self.state.remember_refusal(offer.offer_key, str(exc))
        self._refusals_reported[offer.offer_key] = self._revision
        try:
            self._report(Kind.REFUSED, offer, reason=str(exc))
        except OSError as save_exc:  # a full disk: the report still goes out from memory
            log.warning("could not save the refusal: %s", save_exc)


def offer_from_proto(item: fleet_pb2.DesiredModel) -> Offer:
    if not item.model or item.version < 1 or not item.variant:
        raise ValueError("model, version and variant are required")
    # Names from outside become folder names: refuse anything but a plain name.
    for name in (item.model, item.variant):
        if name != Path(name).name or name in (".", "..") or name.startswith("."):
            raise ValueError(f"{name!r} is not a plain name")
    return Offer(
        model=item.model,
        version=item.version,
        variant=item.variant,
        signed=bytes(item.manifest.signed),
        signatures=tuple(SignatureEntry(s.keyid, bytes(s.sig)) for s in item.manifest.signatures),
        rollout_id=item.rollout_id,
        delta_base_version=item.delta_base_version,
    )
