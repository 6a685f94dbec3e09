"""Chunk delivery: the MQTT and staging IO around `transfer.decide_chunk` and the pure
`delivery.DeliveryState`.

staging (persisted offsets) -> per-file digest -> VERIFIED -> install into the store ->
activation. A refused or interrupted delivery never touches `active.json` or the installed
versions.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time

from google.protobuf.message import DecodeError

from tandem.agent import errors
from tandem.agent.core import ActiveDelivery, AgentCore
from tandem.agent.delivery import Next, no_space
from tandem.agent.errors import RefusedError
from tandem.agent.transfer import Chunk, Decision, FileProgress, Step, decide_chunk
from tandem.errors import ArtifactError, DigestError
from tandem.protos.fleet.v1 import fleet_pb2, topics

log = logging.getLogger(__name__)

Kind = fleet_pb2.DeviceReport.Kind


class ChunksMixin(AgentCore):
    """Requests chunks, stages them and finishes the delivery."""

    def _request_next(self, delivery: ActiveDelivery, *, force: bool = False) -> None:
        progress = delivery.staging.next_needed()
        if progress is None or not self._connected.is_set():
            return
        if not delivery.state.should_request(
            progress.name, progress.offset, time.monotonic(), force=force
        ):
            return
        base = delivery.state.delta_base(progress.name)
        offer = delivery.offer
        request = fleet_pb2.ChunkRequest(
            transfer_id=offer.transfer_id,
            device_id=self.config.device_id,
            model=offer.model,
            version=offer.version,
            variant=offer.variant,
            file=progress.name,
            offset=progress.offset,
            accept_delta=base > 0,
            have_version=base,
        )
        log.debug("requesting %s from %d (delta base v%d)", progress.name, progress.offset, base)
        self._publish(topics.CHUNK_REQUEST, request.SerializeToString())

    async def _handle_chunk(self, payload: bytes) -> None:
        message = fleet_pb2.ArtifactChunk()
        try:
            message.ParseFromString(payload)
        except DecodeError as exc:
            log.warning("garbage on the chunk topic dropped: %s", exc)
            return
        delivery = self._delivery
        if delivery is None or message.transfer_id != delivery.offer.transfer_id:
            log.debug("chunk for transfer %r not in progress, ignored", message.transfer_id)
            return
        chunk = Chunk(
            transfer_id=message.transfer_id,
            file=message.file,
            offset=message.offset,
            data=bytes(message.data),
            total_size=message.total_size,
            sha256=message.sha256,
            is_delta=message.is_delta,
            delta_base_version=message.delta_base_version,
        )
        try:
            entry = delivery.manifest.file(chunk.file)
        except ArtifactError:
            log.warning("chunk for unknown file %r dropped", chunk.file)
            return
        staging = delivery.staging
        delivery.state.last_activity = time.monotonic()

        def decide() -> Decision:
            return decide_chunk(
                staging.progress[entry.name],
                chunk,
                entry,
                max_payload_bytes=self.config.max_payload_bytes,
                delta_bases=delivery.state.delta_bases(entry.name),
            )

        decision = decide()
        if decision.step is Step.RESTART:
            log.info("%s: %s; starting the file over", entry.name, decision.why)
            staging.restart_file(entry.name, FileProgress(entry.name))
            decision = decide()
        if decision.step is Step.DUPLICATE:
            return
        if decision.step is Step.GAP:
            self._request_next(delivery)
            return
        if decision.step is Step.REJECT:
            log.warning("%s: chunk rejected: %s", entry.name, decision.why)
            await self._file_failed(delivery, entry.name, decision.why, is_delta=chunk.is_delta)
            return
        try:
            progress = await asyncio.to_thread(staging.append, entry.name, chunk)
        except OSError as exc:
            await self._storage_failed(delivery, exc)
            return
        received = staging.bytes_received
        if delivery.state.progress_due(received, self.config.progress_every_bytes):
            self._report(
                Kind.PROGRESS,
                delivery.offer,
                bytes_received=received,
                bytes_total=staging.bytes_total,
            )
        if progress.offset < progress.total_size:
            return
        base_dir = (
            self.store.model_dir(delivery.offer.model)
            / str(progress.delta_base_version)
            / delivery.offer.variant
            if progress.is_delta
            else None
        )
        try:
            await asyncio.to_thread(staging.finish_file, entry, base_dir)
        except OSError as exc:
            await self._storage_failed(delivery, exc)
            return
        except DigestError as exc:
            await self._file_failed(delivery, entry.name, str(exc), is_delta=progress.is_delta)
            return
        await self._continue(delivery)

    async def _file_failed(
        self, delivery: ActiveDelivery, name: str, why: str, *, is_delta: bool
    ) -> None:
        step = delivery.state.file_failed(name, is_delta=is_delta)
        if step is Next.FETCH_FULL:
            log.warning("%s: delta failed (%s); fetching the full file", name, why)
            self._request_next(delivery, force=True)
            return
        if step is Next.REFUSE:
            delivery.staging.discard()
            self._delivery = None
            self._refuse(delivery.offer, delivery.state.refusal(name, why))
            await self._reconcile()
            return
        delivery.staging.restart_file(name, FileProgress(name))
        self._request_next(delivery, force=True)

    async def _storage_failed(self, delivery: ActiveDelivery, exc: OSError) -> None:
        """The device cannot hold the delivery (disk full, file size limit, read-only store):
        refuse it and keep the active model; retrying the same bytes would fail the same way."""
        delivery.staging.discard()
        self._delivery = None
        self._refuse(delivery.offer, no_space(exc))
        await self._reconcile()

    async def _continue(self, delivery: ActiveDelivery) -> None:
        """Requests the next file, or finishes the delivery when every file is staged."""
        if delivery.staging.next_needed() is not None:
            self._request_next(delivery, force=True)
            return
        offer = delivery.offer
        try:
            await asyncio.to_thread(delivery.staging.verify_complete)
        except OSError as exc:
            await self._storage_failed(delivery, exc)
            return
        except DigestError as exc:
            delivery.staging.discard()
            self._delivery = None
            self._refuse(offer, RefusedError(errors.DIGEST_MISMATCH, str(exc)))
            return
        memory = self.state.model(offer.model)
        memory.max_accepted_version = max(memory.max_accepted_version, offer.version)
        total = delivery.staging.bytes_total
        self._report(Kind.VERIFIED, offer, bytes_received=total, bytes_total=total)
        dest = self.store.model_dir(offer.model) / str(offer.version) / offer.variant
        try:
            await asyncio.to_thread(delivery.staging.install_into, dest)
        except OSError as exc:
            shutil.rmtree(dest, ignore_errors=True)
            await self._storage_failed(delivery, exc)
            return
        self._delivery = None
        await self._activate(
            offer.model, offer.version, offer.variant, offer.rollout_id, fresh=True
        )
        await self._reconcile()
