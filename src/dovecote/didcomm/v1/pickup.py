"""Message Pickup 2.0 (RFC 0685): explicit pickup, live mode, and implicit pickup.

Nothing leaves a mailbox until the recipient acknowledges it with messages-received:
by `message_id_list` (the attachment ids of a delivery, which are the queue ids) or by
`message_tag_list` (the JWE `tag` of each message, RFC 0685's own form, which is how a
message delivered raw by implicit pickup is acknowledged).

Implicit pickup (RFC 0685's motivation, RFC 0092) is v1/implicit.py.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import structlog

from dovecote.didcomm.pickup import MAX_ACK_IDS, MAX_DELIVERY, acknowledge, fetch_bounded
from dovecote.didcomm.v1.envelope import to_did_key
from dovecote.didcomm.v1.implicit import tag_of
from dovecote.didcomm.v1.messages import (
    DIDCOMM_PREFIX,
    V1Context,
    V1Handler,
    V1Inbound,
    field,
    reply,
)
from dovecote.errors import LiveModeNotSupported, MalformedMessage
from dovecote.ops import metrics
from dovecote.util.jsonlimits import stored_json

if TYPE_CHECKING:
    from dovecote.delivery.live import LiveSession
    from dovecote.store.base import StoredMessage

log = structlog.get_logger("dovecote.v1.pickup")

PIURI = f"{DIDCOMM_PREFIX}messagepickup/2.0"
DELIVERY = f"{PIURI}/delivery"
STATUS = f"{PIURI}/status"
# How many queued messages an ack by tag looks through when the tag was not pushed here.
TAG_SCAN = 1000
TAG_PAGE = 8


def _json_or_text(body: bytes) -> Any:
    parsed, value = stored_json(body)
    return value if parsed else body.decode(errors="replace")


def delivery(
    thid: str | None, recipient: str | None, messages: Sequence[StoredMessage]
) -> dict[str, Any]:
    message: dict[str, Any] = {
        "@type": DELIVERY,
        "@id": str(uuid.uuid4()),
        "~attach": [{"@id": m.id, "data": {"json": _json_or_text(m.body)}} for m in messages],
    }
    if thid:
        message["~thread"] = {"thid": thid}
    if recipient:
        message["recipient_key"] = recipient
    return message


def _recipient(inbound: V1Inbound) -> tuple[str | None, str | None]:
    """(as sent, normalised did:key) of the optional recipient_key filter."""
    sent = field(inbound.message, "recipient_key", str, required=False)
    return (sent, to_did_key(sent)) if sent else (None, None)


async def status_message(
    ctx: V1Context, inbound: V1Inbound, mediatee: str, recipient: tuple[str | None, str | None]
) -> dict[str, Any]:
    status = await ctx.core.store.status(mediatee, recipient[1])
    now = time.time()
    body: dict[str, Any] = {
        "message_count": status.message_count,
        "total_bytes": status.total_bytes,
        "live_delivery": ctx.core.live.is_live(inbound.session, mediatee),
    }
    if recipient[0]:
        body["recipient_key"] = recipient[0]
    if status.oldest_received_at is not None:
        body["longest_waited_seconds"] = int(now - status.oldest_received_at)
        body["oldest_received_time"] = _iso(status.oldest_received_at)
    if status.newest_received_at is not None:
        body["newest_received_time"] = _iso(status.newest_received_at)
    return reply(inbound, STATUS, body)


def _iso(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


async def status_request(ctx: V1Context, inbound: V1Inbound) -> list[dict[str, Any]]:
    mediatee = await ctx.require_grant(inbound)
    return [await status_message(ctx, inbound, mediatee, _recipient(inbound))]


async def delivery_request(ctx: V1Context, inbound: V1Inbound) -> list[dict[str, Any]]:
    mediatee = await ctx.require_grant(inbound)
    limit = field(inbound.message, "limit", int)
    if limit < 1:
        raise MalformedMessage("limit must be at least 1")
    recipient = _recipient(inbound)
    messages = await fetch_bounded(
        ctx.core.store,
        mediatee,
        min(limit, MAX_DELIVERY),
        recipient[1],
        ctx.core.settings.max_body_bytes,
    )
    if not messages:
        return [await status_message(ctx, inbound, mediatee, recipient)]
    metrics.DELIVERED.labels("pickup").inc(len(messages))
    log.info("pickup.delivered", count=len(messages), version="v1", request_id=inbound.request_id)
    return [delivery(inbound.thid, recipient[0], messages)]


async def _ids_for_tags(
    ctx: V1Context, mediatee: str, session: LiveSession | None, tags: list[str]
) -> list[str]:
    wanted = set(tags)
    ids: list[str] = []
    pushed = ctx.implicit.tags_for(session, mediatee) if session is not None else {}
    for tag in list(wanted):
        if tag in pushed:
            ids.append(pushed[tag])
            wanted.discard(tag)
    after, scanned = 0, 0
    while wanted and scanned < TAG_SCAN:
        # A page at a time: the tag is inside each body, and bodies may be large.
        page = await ctx.core.store.fetch(mediatee, TAG_PAGE, after_seq=after)
        for message in page:
            if tag_of(message.body) in wanted:
                ids.append(message.id)
        scanned += len(page)
        if len(page) < TAG_PAGE:
            break
        after = page[-1].seq
    return ids


async def messages_received(ctx: V1Context, inbound: V1Inbound) -> list[dict[str, Any]]:
    mediatee = await ctx.require_grant(inbound)
    ids = field(inbound.message, "message_id_list", list, required=False, default=[])
    tags = field(inbound.message, "message_tag_list", list, required=False, default=[])
    if len(ids) + len(tags) > MAX_ACK_IDS or not all(
        isinstance(i, str) and len(i) <= 256 for i in [*ids, *tags]
    ):
        raise MalformedMessage("message_id_list / message_tag_list must list strings")
    if tags:
        ids = [*ids, *await _ids_for_tags(ctx, mediatee, inbound.session, tags)]
    removed = await acknowledge(ctx.core, mediatee, ids)
    ctx.implicit.acknowledged(mediatee, ids)
    log.info(
        "pickup.acknowledged",
        listed=len(ids),
        removed=removed,
        version="v1",
        request_id=inbound.request_id,
    )
    return [await status_message(ctx, inbound, mediatee, (None, None))]


async def live_delivery_change(ctx: V1Context, inbound: V1Inbound) -> list[dict[str, Any]]:
    mediatee = await ctx.require_grant(inbound)
    live = field(inbound.message, "live_delivery", bool)
    if inbound.session is None:
        raise LiveModeNotSupported("Connection does not support Live Delivery")
    if live:
        await ctx.core.live.enable(inbound.session, mediatee)
    else:
        ctx.core.live.disable(inbound.session, mediatee)
    log.info("pickup.live_mode", live=live, version="v1", request_id=inbound.request_id)
    return [await status_message(ctx, inbound, mediatee, (None, None))]


HANDLERS: dict[str, V1Handler] = {
    f"{PIURI}/status-request": status_request,
    f"{PIURI}/delivery-request": delivery_request,
    f"{PIURI}/messages-received": messages_received,
    f"{PIURI}/live-delivery-change": live_delivery_change,
}
PROTOCOLS = {PIURI: ["mediator"]}
