"""The mediator's data path: unpack -> rate limit -> protocol handler -> pack replies.

Transports hand raw bytes in and get an `Outcome` back (status, packed replies or an error
body); they know nothing of protocols, and handlers know nothing of transports.

Replies go back on the same connection when the sender asked for a return route (or it
is a WebSocket). Otherwise, if the sender's DID has an http(s) endpoint, the packed reply
goes to the outbox and the HTTP answer (202) is sent only after that commit; a client
that saw no answer retries, and the handlers' state changes are idempotent, so the reply
is produced again rather than lost. When that endpoint is this mediator, the reply goes on
the sender's live session or is dropped: never into its own mailbox.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from collections.abc import Sequence
from typing import Any

import structlog

from dovecote.delivery.live import LiveSession
from dovecote.didcomm import coordinate, discover, pickup, problem, routing, trust_ping
from dovecote.didcomm.endpoints import ENCRYPTED
from dovecote.didcomm.messages import (
    PLAINTEXT,
    Context,
    Handler,
    Inbound,
    Transport,
    problem_report,
)
from dovecote.didcomm.outcome import Outcome
from dovecote.didcomm.packing import Packer
from dovecote.didcomm.v1 import envelope as v1_envelope
from dovecote.didcomm.v1.mediator import V1Mediator
from dovecote.errors import (
    ClientError,
    DovecoteError,
    RateLimited,
    ServiceError,
    UnknownMessageType,
    UnknownRecipient,
)
from dovecote.ops import metrics
from dovecote.store.base import NewOutboxItem, StoredMessage
from dovecote.util.kinds import OutboxKind
from dovecote.util.limits import TokenBuckets

log = structlog.get_logger("dovecote.dispatch")

# v1 mailboxes are keyed by the did:key of the connection verkey; v2 senders are
# did:peer DIDs (the only methods the v2 resolver accepts), so the prefix tells them apart.
V1_MEDIATEE = "did:key:"
_MODULES = (coordinate, routing, pickup, trust_ping, discover, problem)
HANDLERS: dict[str, Handler] = {}
for _module in _MODULES:
    HANDLERS.update(_module.HANDLERS)


def supported_protocols() -> dict[str, list[str]]:
    """PIURI -> roles, for discover-features (handed to handlers as `Context.protocols`)."""
    protocols: dict[str, list[str]] = {}
    for module in _MODULES:
        protocols.update(module.PROTOCOLS)
    return protocols


def _labels(msg_type: str) -> tuple[str, str]:
    """(protocol, message name) for metrics; unknown types collapse to one label."""
    if msg_type in HANDLERS:
        piuri, name = msg_type.rsplit("/", 1)
        parts = piuri.rsplit("/", 2)
        return f"{parts[-2]}/{parts[-1]}", name
    return "unknown", "unknown"


class _Counted:
    """One message type's metric children (prometheus_client's labels() locks and
    validates on each call); the labels are bounded by HANDLERS (see _labels)."""

    __slots__ = ("duration", "labels", "ok")

    def __init__(self, protocol: str, name: str) -> None:
        self.labels = (protocol, name)
        self.ok = metrics.DIDCOMM_MESSAGES.labels(protocol, name, "ok")
        self.duration = metrics.DIDCOMM_DURATION.labels(protocol, name)

    def error(self) -> None:
        metrics.DIDCOMM_MESSAGES.labels(*self.labels, "error").inc()


_COUNTED: dict[tuple[str, str], _Counted] = {}


def _counted(labels: tuple[str, str]) -> _Counted:
    counted = _COUNTED.get(labels)
    if counted is None:
        counted = _COUNTED[labels] = _Counted(*labels)
    return counted


def _not_returned(reason: str, detail: str, request_id: str, count: int = 1) -> None:
    metrics.REPLIES_NOT_RETURNED.labels(reason).inc(count)
    log.info("reply.not_returned", reason=reason, detail=detail, count=count, request_id=request_id)


def _server_failure(error: DovecoteError | None) -> bool:
    """5xx: the server, not the message, failed. That status stays even with a problem
    report in the body, because proxies and load balancers act on it (nginx moves to the
    next instance on 503) and they read no DIDComm. A rate limit is about the sender's
    message, so it is answered like any other problem report: 200 with the report (and
    its Retry-After header as a hint)."""
    return error is not None and error.status >= 500


class Mediator:
    """Turns one inbound envelope into replies."""

    def __init__(self, ctx: Context, packer: Packer) -> None:
        self.ctx = ctx
        self.packer = packer
        self.did_limits = TokenBuckets(
            ctx.settings.rate_limit_did,
            ctx.settings.rate_limit_did_burst,
            ctx.settings.rate_limit_memory_bytes,
            on_size=metrics.RATE_LIMIT_BYTES.labels("did").set,
        )
        ctx.live.build_delivery = self.build_delivery
        ctx.protocols = supported_protocols()
        self.v1: V1Mediator | None = None
        if ctx.identity.v1_key is not None:
            self.v1 = V1Mediator(ctx, ctx.identity.v1_key, self.did_limits)

    async def receive(
        self,
        raw: bytes,
        transport: Transport,
        session: LiveSession | None = None,
        request_id: str | None = None,
    ) -> Outcome:
        request_id = request_id or os.urandom(8).hex()
        if self.v1 is not None and v1_envelope.looks_like_v1(raw):
            v1_outcome = await self._receive_v1(self.v1, raw, transport, session, request_id)
            if v1_outcome is not None:
                return v1_outcome
        try:
            unpacked = await self.packer.unpack(raw)
        except ClientError as exc:
            metrics.BAD_INPUT.labels(exc.code, transport).inc()
            log.info(
                "message.rejected",
                code=exc.code,
                detail=exc.detail,
                transport=transport,
                request_id=request_id,
            )
            return Outcome(status=exc.status, error=exc)

        inbound = Inbound(unpacked.message, unpacked.sender, transport, session, request_id)
        wants_return = inbound.return_route in ("all", "thread")
        replies, status, error = await self._handle(inbound)

        packed: list[bytes] = []
        if inbound.sender and replies and (wants_return or transport == "ws"):
            for message in replies:
                message.setdefault("from", self.packer.identity.did)
                packed.append(await self.packer.pack_for(message, inbound.sender))
        elif inbound.sender and replies and not isinstance(error, RateLimited | ServiceError):
            try:
                await self._reply_later(inbound, inbound.sender, replies)
            except DovecoteError as exc:
                # Not queued: answer with the error so that the client retries.
                return Outcome(status=exc.status, error=exc, return_route=wants_return)
        elif replies:
            _not_returned("anonymous-sender", "anonymous sender", request_id, len(replies))
        if packed and transport == "http" and not _server_failure(error):
            # The transport worked; a failure is in the (problem report) message, and
            # stacks such as Veramo read no body from a non-2xx answer.
            status = 200
        return Outcome(status=status, replies=packed, error=error, return_route=wants_return)

    async def _receive_v1(
        self,
        v1: V1Mediator,
        raw: bytes,
        transport: Transport,
        session: LiveSession | None,
        request_id: str,
    ) -> Outcome | None:
        """A DIDComm v1 envelope's outcome, or None when `raw` is not one after all."""
        try:
            envelope = v1_envelope.parse(raw, self.packer.max_json_depth)
        except ClientError as exc:
            metrics.BAD_INPUT.labels(exc.code, transport).inc()
            return Outcome(status=exc.status, error=exc)
        if envelope is None:
            return None
        outcome: Outcome = await v1.receive(envelope, transport, session, request_id)
        return outcome

    async def _handle(
        self, inbound: Inbound
    ) -> tuple[list[dict[str, Any]], int, DovecoteError | None]:
        """Run the message's handler: (replies, status, error); a failure's reply is a
        problem report when the sender is known."""
        msg_type = inbound.type
        counted = _counted(_labels(msg_type))
        started = time.perf_counter()
        try:
            if inbound.sender and (wait := self.did_limits.take(inbound.sender)):
                raise RateLimited("rate limit per sender DID", retry_after=wait)
            handler = HANDLERS.get(msg_type)
            if handler is None:
                raise UnknownMessageType(f"unsupported message type {msg_type[:200]!r}")
            replies = await handler(self.ctx, inbound)
            counted.ok.inc()
            return replies, 202, None
        except DovecoteError as exc:
            counted.error()
            if isinstance(exc, ClientError):
                metrics.BAD_INPUT.labels(exc.code, inbound.transport).inc()
            log.info(
                "message.failed",
                type=msg_type[:200],
                code=exc.code,
                detail=exc.detail,
                transport=inbound.transport,
                request_id=inbound.request_id,
            )
            if not inbound.sender:
                return [], exc.status, exc
            # No `ack` header: the spec makes it optional and SICPA's didcomm-python
            # rejects the list form the current spec uses.
            report = problem_report(exc.code, exc.detail, pthid=inbound.thid)
            report["to"] = [inbound.sender]
            return [report], exc.status, exc
        finally:
            counted.duration.observe(time.perf_counter() - started)

    async def _reply_later(
        self, inbound: Inbound, sender: str, replies: list[dict[str, Any]]
    ) -> None:
        """Queue replies for a sender that asked for no return route, via its endpoint."""
        endpoints = self.ctx.endpoints
        if endpoints is None:
            return
        items: list[NewOutboxItem] = []
        for index, message in enumerate(replies):
            message.setdefault("from", self.packer.identity.did)
            packed = await self.packer.pack_for(message, sender)
            try:
                route = await endpoints.route(sender, packed)
            except UnknownRecipient as exc:
                _not_returned("no-endpoint", exc.detail, inbound.request_id)
                return
            if route.local:
                # The sender's endpoint is this mediator. A reply (a status above all) must
                # never be queued as a message in its own mailbox (Pickup 3.0): it goes on
                # the sender's live session here, or nowhere.
                if not await self._send_live(sender, packed, inbound.request_id):
                    return
                continue
            key = hashlib.sha256(f"{sender} {inbound.id} {index}".encode()).hexdigest()
            items.append(
                NewOutboxItem(
                    kind=OutboxKind.FORWARD,
                    target=route.uri,
                    payload=route.payload,
                    headers={"content-type": ENCRYPTED},
                    dedup_key=f"reply:{key}",
                )
            )
        if items:
            quota = routing.relay_quota(self.ctx.settings, items[0].target)
            try:
                added = await self.ctx.store.outbox_add(items, quota=quota)
            except DovecoteError as exc:  # quotas: 429/507, the client retries later
                metrics.RELAY_REFUSED.labels("reply_quota").inc()
                log.warning(
                    "reply.refused",
                    code=exc.code,
                    target=quota.origin,
                    request_id=inbound.request_id,
                )
                raise
            if added:
                self.ctx.wake_outbox(OutboxKind.FORWARD)
            log.info(
                "reply.queued",
                count=len(added),
                target=items[0].target,
                request_id=inbound.request_id,
            )

    async def _send_live(self, sender: str, packed: bytes, request_id: str) -> bool:
        """Send a reply on the sender's live session on this instance; False if dropped."""
        live = self.ctx.live
        session = live.by_mediatee.get(sender)
        if session is None:
            mediatee = await self.ctx.store.find_mediatee(sender)
            session = live.by_mediatee.get(mediatee) if mediatee else None
        if session is None or session.closed:
            _not_returned("no-live-session", "no return route and no live session", request_id)
            return False
        try:
            await session.send(packed)
        except Exception as exc:  # noqa: BLE001 - a dying socket loses the reply, as any transport
            _not_returned("live-session-failed", str(exc)[:200], request_id)
            return False
        log.info("reply.sent_live", session=session.id, request_id=request_id)
        return True

    async def build_delivery(self, mediatee: str, messages: Sequence[StoredMessage]) -> bytes:
        """A live-mode `delivery` message for a mailbox owner, packed for it."""
        if self.v1 is not None and mediatee.startswith(V1_MEDIATEE):
            packed: bytes = await self.v1.build_delivery(mediatee, messages)
            return packed
        message: dict[str, Any] = {
            "id": str(uuid.uuid4()),
            "typ": PLAINTEXT,
            "type": pickup.DELIVERY,
            "from": self.packer.identity.did,
            "to": [mediatee],
            "created_time": int(time.time()),
            "body": {},
            "attachments": [pickup.attachment_for(m) for m in messages],
        }
        return await self.packer.pack_for(message, mediatee)
