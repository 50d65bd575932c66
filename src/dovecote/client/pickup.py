"""Message Pickup 3.0 from the recipient's side: status, delivery, acknowledgement, and
live mode over WebSocket with reconnect.

Live mode pushes only messages that arrive after it was turned on (Pickup 3.0: queued
messages "must still be requested with delivery-request"), so every live session first
turns live mode on, then drains the queue with delivery-request on the same socket.
Delivery is at-least-once (a message pushed while the drain runs is also in the queue, and
an unacknowledged one is fetched again after a reconnect), so each message is handed to
the application once by remembering the ids of the most recent ones in the local store.
The order per batch is: decrypt, skip the ids already seen, call the handler, remember the
ids, then acknowledge. A crash before the acknowledgement only causes a redelivery that
the remembered ids absorb.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
import websockets

from dovecote.client import transport
from dovecote.client.config import ClientConfig
from dovecote.client.errors import (
    ClientFailure,
    CryptoFailure,
    ProblemReported,
    TransportFailure,
)
from dovecote.client.mediation import MediatorChannel, message, raise_for_problem
from dovecote.client.packing import Packer, attachment_payload
from dovecote.client.store import ClientStore
from dovecote.util import backoff
from dovecote.util.aio import wait_at_most

log = structlog.get_logger("dovecote.client.pickup")

PICKUP = "https://didcomm.org/messagepickup/3.0"
# Messages per delivery-request while a live session drains what was queued before.
DRAIN_BATCH = 100
# On stop, how long to wait for the mediator to confirm our last acknowledgement.
ACK_DRAIN_SECONDS = 2.0


@dataclass
class Received:
    """One message picked up from the mediator, decrypted."""

    id: str
    type: str
    body: dict[str, Any]
    sender: str | None  # authenticated sender DID (None for anoncrypt)
    message: dict[str, Any] = field(repr=False)  # the whole plaintext
    attachment_id: str = ""  # the mediator's queue id


@dataclass
class PickupStatus:
    """The mediator's `status` for this client's mailbox."""

    message_count: int
    total_bytes: int = 0
    live_delivery: bool = False
    longest_waited_seconds: int | None = None
    body: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> PickupStatus:
        return cls(
            int(body.get("message_count", 0)),
            int(body.get("total_bytes", 0)),
            bool(body.get("live_delivery", False)),
            body.get("longest_waited_seconds"),
            body,
        )


MessageHandler = Callable[[Received], Awaitable[None] | None]


class Inbox:
    """Picks up this client's messages from its mediator."""

    def __init__(
        self,
        packer: Packer,
        store: ClientStore,
        channel: MediatorChannel,
        ws_endpoints: Sequence[str],
        config: ClientConfig,
    ) -> None:
        self.packer = packer
        self.store = store
        self.channel = channel
        self.ws_endpoints = list(ws_endpoints)
        self.config = config
        self.live_on = asyncio.Event()  # set while a live session is established
        self.reconnects = 0

    async def status(self, recipient_did: str | None = None) -> PickupStatus:
        body = {"recipient_did": recipient_did} if recipient_did else {}
        reply = await self.channel.request(f"{PICKUP}/status-request", body)
        return PickupStatus.from_body(reply.get("body") or {})

    async def fetch(self, limit: int, handler: MessageHandler | None = None) -> list[Received]:
        """One delivery-request: new messages are handled, remembered, then acknowledged."""
        reply = await self.channel.request(f"{PICKUP}/delivery-request", {"limit": limit})
        if not reply.get("type", "").endswith("/delivery"):
            return []
        fresh, ack_ids = await self._accept(reply.get("attachments") or [], handler)
        if ack_ids:
            await self.channel.request(f"{PICKUP}/messages-received", {"message_id_list": ack_ids})
        return fresh

    async def drain(
        self, handler: MessageHandler | None = None, limit: int = 100
    ) -> list[Received]:
        """Fetch until the mailbox is empty."""
        received: list[Received] = []
        while True:
            reply = await self.channel.request(f"{PICKUP}/delivery-request", {"limit": limit})
            attachments = reply.get("attachments") or []
            if not reply.get("type", "").endswith("/delivery") or not attachments:
                return received
            fresh, ack_ids = await self._accept(attachments, handler)
            received += fresh
            await self.channel.request(f"{PICKUP}/messages-received", {"message_id_list": ack_ids})

    async def _accept(
        self, attachments: list[dict[str, Any]], handler: MessageHandler | None
    ) -> tuple[list[Received], list[str]]:
        """Decrypt and dedup; hand new messages to `handler`; return them and the ack ids."""
        decrypted: list[Received] = []
        ack_ids: list[str] = []
        for attachment in attachments:
            attachment_id = str(attachment.get("id", ""))
            ack_ids.append(attachment_id)
            try:
                unpacked = await self.packer.unpack(attachment_payload(attachment))
            except CryptoFailure as exc:
                # It can never be decrypted here; keeping it would block the queue head.
                log.warning(
                    "pickup.undecryptable", attachment_id=attachment_id, error=exc.detail[:200]
                )
                continue
            plain = unpacked.message
            body = plain.get("body")
            decrypted.append(
                Received(
                    id=str(plain.get("id") or attachment_id),
                    type=str(plain.get("type", "")),
                    body=body if isinstance(body, dict) else {},
                    sender=unpacked.sender or plain.get("from"),
                    message=plain,
                    attachment_id=attachment_id,
                )
            )
        seen = await self.store.seen([r.id for r in decrypted])
        fresh: list[Received] = []
        for item in decrypted:
            if item.id in seen:
                continue
            seen.add(item.id)
            fresh.append(item)
        for item in fresh:
            if handler is not None:
                result = handler(item)
                if result is not None:
                    await result
        await self.store.remember([r.id for r in fresh], self.config.seen_ids)
        if len(fresh) < len(decrypted):
            log.debug("pickup.duplicates_skipped", count=len(decrypted) - len(fresh))
        return fresh, ack_ids

    # ------------------------------------------------------------------ live mode
    async def live(self, handler: MessageHandler, stop: asyncio.Event | None = None) -> None:
        """Receive pushes over WebSocket until `stop` is set, reconnecting as needed.

        On every (re)connection live mode is enabled again and then what is queued is
        fetched with delivery-request (the mediator pushes only what arrives after the
        switch); the remembered ids drop what was handled already.
        """
        stop = stop or asyncio.Event()
        failures = 0
        index = 0
        while not stop.is_set():
            url = self.ws_endpoints[index % len(self.ws_endpoints)]
            try:
                await self._live_session(url, handler, stop)
                failures = 0
            except (ClientFailure, websockets.ConnectionClosed, OSError, TimeoutError) as exc:
                if _fatal(exc):
                    raise
                # A session that got as far as live mode counts as a fresh start.
                failures = 1 if self.live_on.is_set() else failures + 1
                index += 1 if failures % self.config.attempts_per_endpoint == 0 else 0
                log.info("pickup.live_disconnected", url=url, error=str(exc)[:200])
            self.live_on.clear()
            if stop.is_set():
                break
            self.reconnects += 1
            # At once after a session that ended cleanly, else equal jitter.
            delay = (
                backoff.delay(
                    failures, self.config.backoff_base, self.config.reconnect_max, jitter="equal"
                )
                if failures
                else 0.0
            )
            await wait_at_most(stop.wait(), delay)

    async def _live_session(self, url: str, handler: MessageHandler, stop: asyncio.Event) -> None:
        ws = await transport.connect_ws(url, self.config.request_timeout)
        me, mediator = self.packer.identity.did, self.channel.mediator_did
        unanswered: set[str] = set()  # ids of our messages-received awaiting a status
        draining = ""  # id of our delivery-request awaiting its answer

        async def send(msg_type: str, body: dict[str, Any]) -> str:
            request = message(msg_type, body, me, mediator)
            await ws.send((await self.packer.pack(request, mediator, me)).decode())
            return str(request["id"])

        try:
            await send(f"{PICKUP}/live-delivery-change", {"live_delivery": True})
            while True:
                if self.live_on.is_set():
                    frame = await self._next_frame(ws, stop, bool(unanswered))
                else:  # the mediator must confirm live mode in time, or we reconnect
                    frame = await asyncio.wait_for(
                        self._next_frame(ws, stop, bool(unanswered)), self.config.request_timeout
                    )
                if frame is None:
                    return
                reply = await self._decode(frame)
                kind = reply.get("type", "")
                thid = str(reply.get("thid", ""))
                if kind.endswith("/status"):
                    unanswered.discard(thid)
                    if draining and thid == draining:
                        draining = ""  # the queue held nothing more for us
                        log.info("pickup.live_drained", url=url)
                    if (reply.get("body") or {}).get("live_delivery") and not self.live_on.is_set():
                        log.info("pickup.live_enabled", url=url)
                        self.live_on.set()
                        # What was queued before the switch is not pushed: fetch it.
                        draining = await send(f"{PICKUP}/delivery-request", {"limit": DRAIN_BATCH})
                elif kind.endswith("/delivery"):
                    _, ack_ids = await self._accept(reply.get("attachments") or [], handler)
                    unanswered.add(
                        await send(f"{PICKUP}/messages-received", {"message_id_list": ack_ids})
                    )
                    if draining and thid == draining:
                        # The socket is read in order: the ack is applied before this.
                        draining = await send(f"{PICKUP}/delivery-request", {"limit": DRAIN_BATCH})
        finally:
            with contextlib.suppress(Exception):
                await ws.close()

    @staticmethod
    async def _next_frame(
        ws: websockets.ClientConnection, stop: asyncio.Event, acks_pending: bool
    ) -> str | bytes | None:
        """The next frame, or None once stopped. Stopping first waits (briefly) for the
        answers to our acknowledgements, so the mediator has removed what was handled."""
        if stop.is_set():
            if not acks_pending:
                return None
            with contextlib.suppress(TimeoutError):
                return await asyncio.wait_for(ws.recv(), ACK_DRAIN_SECONDS)
            return None
        receiver = asyncio.ensure_future(ws.recv())
        stopper = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({receiver, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
        if receiver.done():
            return receiver.result()
        receiver.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await receiver
        if not acks_pending:
            return None
        with contextlib.suppress(TimeoutError):
            return await asyncio.wait_for(ws.recv(), ACK_DRAIN_SECONDS)
        return None

    async def _decode(self, frame: str | bytes) -> dict[str, Any]:
        data = frame.encode() if isinstance(frame, str) else frame
        try:
            parsed = json.loads(data)
        except ValueError as exc:
            raise TransportFailure("mediator sent a frame that is not JSON") from exc
        try:
            if isinstance(parsed, dict) and "error" in parsed and "ciphertext" not in parsed:
                # A plain JSON error: the mediator could not read our envelope.
                raise ProblemReported(str(parsed["error"]), str(parsed.get("detail", "")))
            return raise_for_problem((await self.packer.unpack(data)).message)
        except ProblemReported as exc:
            if exc.code.startswith("e.m.me") or ".me." in exc.code:
                raise TransportFailure(f"mediator problem {exc.code}") from exc
            raise


def _fatal(exc: BaseException) -> bool:
    """Errors no reconnect can fix (no grant, a refused request, a broken local store);
    the mediator's own trouble (e.m.me.*) arrives here as TransportFailure."""
    return isinstance(exc, ClientFailure) and not isinstance(exc, TransportFailure | CryptoFailure)
