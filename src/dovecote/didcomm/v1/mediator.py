"""The v1 data path: open the envelope -> rate limit -> handler -> pack replies.

Mirrors `dispatch.Mediator` for Aries messages: replies go back on the same connection
when the sender asked for `~transport.return_route` (or it is a WebSocket); otherwise
to the connection's endpoint through the outbox, committed before the HTTP answer.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import structlog

from dovecote.didcomm import routing as v2_routing
from dovecote.didcomm.outcome import Outcome
from dovecote.didcomm.packing import parse_json
from dovecote.didcomm.v1 import basic, connections, coordinate, implicit, pickup, push, routing
from dovecote.didcomm.v1.envelope import (
    MEDIA_TYPE,
    Envelope,
    Opened,
    open_envelope,
    pack,
    to_verkey,
)
from dovecote.didcomm.v1.messages import (
    V1Context,
    V1Handler,
    V1Inbound,
    normalize_type,
    problem_report,
)
from dovecote.errors import (
    ClientError,
    DovecoteError,
    MalformedMessage,
    RateLimited,
    ServiceError,
    UnknownMessageType,
)
from dovecote.ops import metrics
from dovecote.store.base import NewOutboxItem
from dovecote.util.kinds import OutboxKind

if TYPE_CHECKING:
    from aries_askar import Key

    from dovecote.delivery.live import LiveSession
    from dovecote.didcomm.messages import Context, Transport
    from dovecote.store.base import StoredMessage
    from dovecote.util.limits import TokenBuckets

log = structlog.get_logger("dovecote.v1")

_MODULES = (connections, coordinate, routing, pickup, push, basic)
HANDLERS: dict[str, V1Handler] = {}
# Normalised type -> (protocol, name) metric labels, "v1/" first and the version as
# registered, so each protocol version is counted apart.
LABELS: dict[str, tuple[str, str]] = {}
for _module in _MODULES:
    for _type, _handler in _module.HANDLERS.items():
        HANDLERS[normalize_type(_type)] = _handler
        _piuri, _name = _type.rsplit("/", 1)
        _family = _piuri.rsplit("/", 2)
        LABELS[normalize_type(_type)] = (f"v1/{_family[-2]}/{_family[-1]}", _name)
REPLY_HINT = connections.REPLY_TO


def supported_protocols() -> dict[str, list[str]]:
    protocols: dict[str, list[str]] = {}
    for module in _MODULES:
        protocols.update(module.PROTOCOLS)
    return protocols


def _labels(msg_type: str) -> tuple[str, str]:
    return LABELS.get(msg_type, ("v1/unknown", "unknown"))


class V1Mediator:
    """Turns one inbound v1 envelope into replies."""

    def __init__(self, ctx: Context, key: Key, did_limits: TokenBuckets) -> None:
        from dovecote.didcomm.v1.envelope import b58encode

        self.core = ctx
        self.key = key
        self.verkey = b58encode(key.get_public_bytes())
        self.keys = {self.verkey: key}
        # One per mediator (not per process): in-process test instances each have theirs.
        self.implicit = implicit.ImplicitPickup(ctx.store)
        self.ctx = V1Context(ctx, key, self.verkey, self.implicit, supported_protocols())
        self.did_limits = did_limits

    async def receive(
        self, envelope: Envelope, transport: Transport, session: LiveSession | None, request_id: str
    ) -> Outcome:
        try:
            opened = open_envelope(envelope, self.keys)
            inbound = self._inbound(opened, transport, session, request_id)
        except ClientError as exc:
            metrics.BAD_INPUT.labels(exc.code, transport).inc()
            log.info(
                "message.rejected",
                code=exc.code,
                detail=exc.detail,
                version="v1",
                transport=transport,
                request_id=request_id,
            )
            return Outcome(status=exc.status, error=exc)
        wants_return = inbound.return_route in ("all", "thread")
        replies, error = await self._handle(inbound, transport, session, request_id)

        status = error.status if error is not None else 202
        packed: list[bytes] = []
        if replies and transport == "ws" and not wants_return:
            # RFC 0092: without return_route the sender did not offer this socket for
            # replies (ACA-Py's WebSocket transport closes it right after sending), so
            # replies go to the peer's endpoint when it has one, else on the socket.
            if await self._has_endpoint(replies[0], inbound):
                wants_later = True
            else:
                wants_return, wants_later = True, False
        else:
            wants_later = not wants_return
        if replies and wants_return:
            for message in replies:
                target = self._target(message, inbound)
                if target is not None:
                    packed.append(self._pack(message, target[0]))
        elif replies and wants_later and not isinstance(error, RateLimited | ServiceError):
            try:
                await self._reply_later(inbound, replies)
            except DovecoteError as exc:
                return Outcome(status=exc.status, error=exc, return_route=wants_return)
        if packed and transport == "http" and error is None:
            status = 200
        return Outcome(
            status=status,
            replies=packed,
            error=error,
            return_route=wants_return,
            media_type=MEDIA_TYPE,
        )

    async def _handle(
        self,
        inbound: V1Inbound,
        transport: Transport,
        session: LiveSession | None,
        request_id: str,
    ) -> tuple[list[dict[str, Any]], DovecoteError | None]:
        """Run the message's handler: (replies, error); a failure's reply is a problem
        report when the sender is known."""
        protocol, name = _labels(inbound.type)
        started = time.perf_counter()
        try:
            sender_key = inbound.sender_did_key if inbound.sender else None
            if sender_key and (wait := self.did_limits.take(sender_key)):
                raise RateLimited("rate limit per sender key", retry_after=wait)
            handler = HANDLERS.get(inbound.type)
            if handler is None:
                raise UnknownMessageType(f"unsupported message type {inbound.raw_type[:200]!r}")
            replies = await handler(self.ctx, inbound)
            metrics.DIDCOMM_MESSAGES.labels(protocol, name, "ok").inc()
            if (
                transport == "ws"
                and session is not None
                and inbound.return_route == "all"
                and sender_key
                and await self.core.store.get_mediation(sender_key) == "granted"
            ):
                self.implicit.enable(session, sender_key)
            return replies, None
        except DovecoteError as exc:
            metrics.DIDCOMM_MESSAGES.labels(protocol, name, "error").inc()
            if isinstance(exc, ClientError):
                metrics.BAD_INPUT.labels(exc.code, transport).inc()
            log.info(
                "message.failed",
                type=inbound.raw_type[:200],
                code=exc.code,
                detail=exc.detail,
                version="v1",
                transport=transport,
                request_id=request_id,
            )
            return [problem_report(exc.code, exc.detail, inbound)] if inbound.sender else [], exc
        finally:
            metrics.DIDCOMM_DURATION.labels(protocol, name).observe(time.perf_counter() - started)

    def _inbound(
        self, opened: Opened, transport: Transport, session: LiveSession | None, request_id: str
    ) -> V1Inbound:
        message = parse_json(opened.plaintext, self.core.settings.max_json_depth, "plaintext")
        if not isinstance(message, dict) or not isinstance(message.get("@type"), str):
            raise MalformedMessage("v1 plaintext has no @type")
        return V1Inbound(message, opened.sender, transport, session, request_id)

    async def _has_endpoint(self, message: dict[str, Any], inbound: V1Inbound) -> bool:
        hint = message.get(REPLY_HINT)
        endpoint = hint.get("endpoint", "") if isinstance(hint, dict) else ""
        if not endpoint and inbound.sender:
            connection = await self.ctx.store.v1_connection_get(inbound.sender)
            endpoint = connection.endpoint if connection is not None else ""
        return bool(endpoint) and routing.deliverable_endpoint(self.ctx, endpoint) is not None

    def _target(
        self, message: dict[str, Any], inbound: V1Inbound
    ) -> tuple[str, str, list[str]] | None:
        """(verkey, endpoint, routing keys) a reply goes to; endpoint '' when unknown."""
        hint = message.pop(REPLY_HINT, None)
        if isinstance(hint, dict):
            return hint["verkey"], hint.get("endpoint", ""), list(hint.get("routing", []))
        if inbound.sender:
            return inbound.sender, "", []
        return None

    def _pack(self, message: dict[str, Any], verkey: str) -> bytes:
        return pack(json.dumps(message, separators=(",", ":")).encode(), [verkey], self.key)

    async def _reply_later(self, inbound: V1Inbound, replies: list[dict[str, Any]]) -> None:
        """Queue replies for a sender that asked for no return route, via its endpoint."""
        items: list[NewOutboxItem] = []
        for index, message in enumerate(replies):
            target = self._target(message, inbound)
            if target is None:
                continue
            verkey, endpoint, routing_keys = target
            if not endpoint:
                connection = await self.ctx.store.v1_connection_get(verkey)
                if connection is not None:
                    endpoint, routing_keys = connection.endpoint, connection.routing_keys
            uri = routing.deliverable_endpoint(self.ctx, endpoint) if endpoint else None
            if uri is None:
                log.info(
                    "reply.not_returned",
                    reason="no deliverable endpoint",
                    version="v1",
                    request_id=inbound.request_id,
                )
                continue
            payload = routing.wrap(self._pack(message, verkey), verkey, routing_keys)
            key = hashlib.sha256(f"{verkey} {inbound.id} {index}".encode()).hexdigest()
            items.append(
                NewOutboxItem(
                    kind=OutboxKind.FORWARD,
                    target=uri,
                    payload=payload,
                    headers={"content-type": MEDIA_TYPE},
                    dedup_key=f"v1reply:{key}",
                )
            )
        if items:
            quota = v2_routing.relay_quota(self.core.settings, items[0].target)
            try:
                added = await self.core.store.outbox_add(items, quota=quota)
            except DovecoteError as exc:  # quotas: 429/507, the client retries later
                metrics.RELAY_REFUSED.labels("reply_quota").inc()
                log.warning(
                    "reply.refused",
                    code=exc.code,
                    target=quota.origin,
                    version="v1",
                    request_id=inbound.request_id,
                )
                raise
            if added:
                self.core.wake_outbox(OutboxKind.FORWARD)
            log.info("reply.queued", count=len(added), version="v1", request_id=inbound.request_id)

    async def build_delivery(self, mediatee: str, messages: Sequence[StoredMessage]) -> bytes:
        """A live-mode pickup 2.0 `delivery` for a v1 mailbox owner, packed for it."""
        return self._pack(pickup.delivery(None, None, messages), to_verkey(mediatee))
