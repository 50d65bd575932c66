"""Message Pickup 3.0: status, delivery, messages-received and live mode.

Delivery never removes a message; only messages-received (or expiry, or an operator)
does. Live mode pushes `delivery` messages, for messages that arrive after it was turned
on (what was queued before is fetched with delivery-request), whose attachment ids the
recipient acknowledges the same way, so a push to a dying socket loses nothing.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Sequence
from typing import Any

import structlog

from dovecote.didcomm.messages import Context, Handler, Inbound, did_field, field_of, reply
from dovecote.errors import LiveModeNotSupported, MalformedMessage
from dovecote.ops import metrics
from dovecote.ops.logging import Summary
from dovecote.store.base import Store, StoredMessage
from dovecote.util.jsonlimits import stored_json

log = structlog.get_logger("dovecote.pickup")
# Live mode acknowledges each push: one line per interval (exact: dovecote_messages_acknowledged).
ACKS = Summary(log, "pickup.acknowledged")

PIURI = "https://didcomm.org/messagepickup/3.0"
STATUS = f"{PIURI}/status"
DELIVERY = f"{PIURI}/delivery"
MAX_DELIVERY = 1000
MAX_ACK_IDS = 10_000
# Messages read per query by a bounded delivery (each may be up to MAX_BODY_BYTES).
FETCH_PAGE = 8


def attachment_for(message: StoredMessage) -> dict[str, Any]:
    """A queued message as a delivery attachment whose id is the queue id."""
    parsed, value = stored_json(message.body)
    data: dict[str, Any] = (
        {"json": value}
        if parsed
        else {"base64": base64.urlsafe_b64encode(message.body).decode().rstrip("=")}
    )
    return {"id": message.id, "media_type": "application/didcomm-encrypted+json", "data": data}


def delivery_body(recipient: str | None) -> dict[str, Any]:
    return {"recipient_did": recipient} if recipient else {}


async def fetch_bounded(
    store: Store, mediatee: str, limit: int, recipient: str | None, max_bytes: int
) -> list[StoredMessage]:
    """Up to `limit` queued messages, oldest first, stopping once they hold `max_bytes`
    (at least one). Read a page at a time: a reply (and the read behind it) must not grow
    with the mailbox, which may hold MAILBOX_MAX_BYTES (1,000 messages of 5 MiB made one
    delivery-request build a multi-GiB reply). Pickup's `limit` is a maximum; the recipient
    asks again for the rest."""
    messages: list[StoredMessage] = []
    size, after = 0, 0
    while len(messages) < limit and size < max_bytes:
        page = await store.fetch(
            mediatee, min(limit - len(messages), FETCH_PAGE), recipient, after_seq=after
        )
        for message in page:
            if messages and size + len(message.body) > max_bytes:
                return messages
            messages.append(message)
            size += len(message.body)
        if len(page) < FETCH_PAGE:
            break
        after = page[-1].seq
    return messages


async def status_message(
    ctx: Context, inbound: Inbound, mediatee: str, recipient: str | None
) -> dict[str, Any]:
    status = await ctx.store.status(mediatee, recipient)
    now = time.time()
    body: dict[str, Any] = {
        "message_count": status.message_count,
        "total_bytes": status.total_bytes,
        "live_delivery": ctx.live.is_live(inbound.session, mediatee),
    }
    if recipient:
        body["recipient_did"] = recipient
    if status.oldest_received_at is not None:
        body["longest_waited_seconds"] = int(now - status.oldest_received_at)
        body["oldest_received_time"] = int(status.oldest_received_at)
    if status.newest_received_at is not None:
        body["newest_received_time"] = int(status.newest_received_at)
    return reply(inbound, STATUS, body)


def _recipient(ctx: Context, inbound: Inbound) -> str | None:
    return did_field(ctx, inbound.body, "recipient_did", required=False)


async def status_request(ctx: Context, inbound: Inbound) -> list[dict[str, Any]]:
    mediatee = await ctx.require_grant(inbound)
    return [await status_message(ctx, inbound, mediatee, _recipient(ctx, inbound))]


async def delivery_request(ctx: Context, inbound: Inbound) -> list[dict[str, Any]]:
    mediatee = await ctx.require_grant(inbound)
    limit = field_of(inbound.body, "limit", int)
    if limit < 1:
        raise MalformedMessage("body.limit must be at least 1")
    recipient = _recipient(ctx, inbound)
    messages = await fetch_bounded(
        ctx.store, mediatee, min(limit, MAX_DELIVERY), recipient, ctx.settings.max_body_bytes
    )
    if not messages:
        return [await status_message(ctx, inbound, mediatee, recipient)]
    metrics.DELIVERED.labels("pickup").inc(len(messages))
    log.info("pickup.delivered", count=len(messages), request_id=inbound.request_id)
    return [
        reply(
            inbound,
            DELIVERY,
            delivery_body(recipient),
            attachments=[attachment_for(m) for m in messages],
        )
    ]


async def acknowledge(ctx: Context, mediatee: str, ids: Sequence[str]) -> int:
    """Remove acknowledged messages; shared by HTTP and live sessions."""
    removed = await ctx.store.ack(mediatee, ids)
    now = time.time()
    for message in removed:
        metrics.ACK_LATENCY.observe(max(0.0, now - message.received_at))
    metrics.ACKNOWLEDGED.inc(len(removed))
    ctx.live.acknowledged(mediatee, [m.id for m in removed])
    return len(removed)


async def messages_received(ctx: Context, inbound: Inbound) -> list[dict[str, Any]]:
    mediatee = await ctx.require_grant(inbound)
    ids = field_of(inbound.body, "message_id_list", list)
    limit = ctx.settings.max_message_id_bytes
    if len(ids) > MAX_ACK_IDS or not all(
        isinstance(i, str) and len(i) <= limit and "\x00" not in i for i in ids
    ):
        raise MalformedMessage("message_id_list must be a list of message ids")
    removed = await acknowledge(ctx, mediatee, ids)
    ACKS.add(requests=1, listed=len(ids), removed=removed)
    return [await status_message(ctx, inbound, mediatee, None)]


async def live_delivery_change(ctx: Context, inbound: Inbound) -> list[dict[str, Any]]:
    mediatee = await ctx.require_grant(inbound)
    live = field_of(inbound.body, "live_delivery", bool)
    if inbound.session is None:
        raise LiveModeNotSupported("Connection does not support Live Delivery")
    if live:
        await ctx.live.enable(inbound.session, mediatee)
    else:
        ctx.live.disable(inbound.session, mediatee)
    log.info("pickup.live_mode", live=live, request_id=inbound.request_id)
    return [await status_message(ctx, inbound, mediatee, None)]


HANDLERS: dict[str, Handler] = {
    f"{PIURI}/status-request": status_request,
    f"{PIURI}/delivery-request": delivery_request,
    f"{PIURI}/messages-received": messages_received,
    f"{PIURI}/live-delivery-change": live_delivery_change,
}
PROTOCOLS = {PIURI: ["mediator"]}
