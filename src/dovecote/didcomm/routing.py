"""Routing 2.0 `forward`: queue the attached message for a registered recipient, or
relay it to the next hop's own endpoint.

The attachment is stored exactly as received (opaque ciphertext). Its SHA-256 is the
dedup key, so a sender retrying the same POST is answered with success and stored once.

When `next` is not registered here but resolves to a DID with an http(s) DIDComm
endpoint, the forward is accepted into the outbox (one transaction, dedup key = the
digest, remembered for the dedup window like a mailbox digest) and the outbox workers
POST it there. Queuing for a mediatee with no live session
on this instance also queues its notifications, in the same transaction.

Such an anonymous relay must not make this mediator an amplifier or a proxy: every
attachment must be a JWE (DIDComm encrypted message, JSON serialization; base64 data must
decode to one), the endpoint must resolve to allowed addresses (didcomm/endpoints.py), the
item goes only to the URL the DID document names, and the pending `forward` outbox is
bounded per target origin and in total, in count and bytes (RELAY_TARGET_MAX_ITEMS/_BYTES,
RELAY_MAX_ITEMS/_BYTES): past them 429 / 507 with Retry-After, nothing stored.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import time
from typing import Any
from urllib.parse import urlsplit

import structlog

from dovecote.delivery import notify
from dovecote.didcomm.endpoints import ENCRYPTED
from dovecote.didcomm.messages import Context, Handler, Inbound, MediatorSettings, did_field
from dovecote.errors import (
    MalformedMessage,
    OutboxFull,
    RateLimited,
    UnknownRecipient,
)
from dovecote.ops import metrics
from dovecote.ops.logging import Summary
from dovecote.store.base import (
    EnqueueResult,
    NewMessage,
    NewOutboxItem,
    RelayQuota,
    StoredMessage,
)
from dovecote.util.jsonlimits import dumps_compact
from dovecote.util.kinds import OutboxKind

log = structlog.get_logger("dovecote.routing")
# Whether debug lines would be written, asked of the stdlib logger structlog writes
# through: the bound logger's own is_enabled_for exists only in newer structlog releases.
_stdlib_log = logging.getLogger("dovecote.routing")
# One info line per interval, not per forward (exact counts: dovecote_messages_accepted,
# dovecote_messages_duplicate, dovecote_messages_relayed).
ACCEPTS = Summary(log, "forward.accepted")
RELAYS = Summary(log, "forward.relayed")

PIURI = "https://didcomm.org/routing/2.0"
FORWARD = f"{PIURI}/forward"
MAX_ATTACHMENTS = 100
MAX_UNIX_TIME = 2**53


def attachment_bytes(attachment: Any) -> bytes:
    """The bytes of one forwarded message: a JWE as compact JSON, or decoded base64."""
    data = attachment.get("data") if isinstance(attachment, dict) else None
    if not isinstance(data, dict):
        raise MalformedMessage("forward attachment has no data")
    if isinstance(data.get("json"), dict):
        return dumps_compact(data["json"])
    if isinstance(data.get("base64"), str):
        text = data["base64"]
        try:
            return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        except (binascii.Error, ValueError) as exc:
            raise MalformedMessage("forward attachment base64 is invalid") from exc
    raise MalformedMessage("forward attachment needs data.json or data.base64")


JWE_MEMBERS = ("protected", "iv", "ciphertext", "tag")


def is_jwe(payload: bytes) -> bool:
    """Whether `payload` is a JWE in JSON serialization with at least one recipient."""
    try:
        jwe = json.loads(payload)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return False
    if not isinstance(jwe, dict) or not all(isinstance(jwe.get(k), str) for k in JWE_MEMBERS):
        return False
    recipients = jwe.get("recipients")
    if (
        not isinstance(recipients, list)
        or not recipients
        or not all(
            isinstance(r, dict) and isinstance(r.get("encrypted_key"), str) for r in recipients
        )
    ):
        return False
    try:
        text = jwe["protected"]
        header = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    except (binascii.Error, ValueError, UnicodeDecodeError, RecursionError):
        return False
    return isinstance(header, dict) and isinstance(header.get("enc"), str)


async def forward(ctx: Context, inbound: Inbound) -> list[dict[str, Any]]:
    ctx.degradation.require_accepting()
    body = inbound.body
    next_hop = str(did_field(ctx, body, "next"))
    attachments = inbound.message.get("attachments")
    if not isinstance(attachments, list) or not attachments:
        raise MalformedMessage("forward needs at least one attachment")
    if len(attachments) > MAX_ATTACHMENTS:
        raise MalformedMessage(f"at most {MAX_ATTACHMENTS} attachments per forward")
    payloads = [attachment_bytes(a) for a in attachments]

    mediatee = await ctx.store.find_mediatee(next_hop)
    if mediatee is None:
        await relay(ctx, inbound, next_hop, payloads)
        return []

    expires_at = time.time() + ctx.settings.message_ttl
    requested = inbound.message.get("expires_time")
    if isinstance(requested, int | float) and not isinstance(requested, bool):
        # 10**400 parses (and float() of it raises); NaN fails both comparisons.
        if not -MAX_UNIX_TIME <= requested <= MAX_UNIX_TIME:
            raise MalformedMessage("expires_time must be a UNIX time in seconds")
        expires_at = min(expires_at, float(requested))
    for payload in payloads:
        await store_for(ctx, mediatee, next_hop, payload, expires_at, inbound.request_id)
    return []


async def store_for(
    ctx: Context, mediatee: str, recipient: str, payload: bytes, expires_at: float, request_id: str
) -> EnqueueResult:
    """Queue one message in a mailbox (with its notifications when the owner is offline)."""
    offline = ctx.live.by_mediatee.get(mediatee) is None
    notices = (
        notify.notification_items(ctx.settings.notify_webhook_url, ctx.settings.push_url, mediatee)
        if offline and not ctx.degradation.shedding
        else []
    )
    result = await ctx.store.enqueue(
        NewMessage(
            mediatee=mediatee,
            recipient=recipient,
            body=payload,
            digest=hashlib.sha256(payload).hexdigest(),
            expires_at=expires_at,
        ),
        max_messages=ctx.settings.mailbox_max_messages,
        max_bytes=ctx.settings.mailbox_max_bytes,
        outbox=notices,
    )
    if result.duplicate:
        metrics.DUPLICATES.inc()
    else:
        metrics.ACCEPTED.inc()
        if notices:
            ctx.wake_outbox(OutboxKind.NOTIFY)
        elif not offline:
            # Its live session's pump need not read back the body we hold.
            ctx.live.stored(
                StoredMessage(result.id, 0, mediatee, recipient, payload, time.time(), expires_at)
            )
    ACCEPTS.add(messages=1, duplicates=int(result.duplicate), bytes=len(payload))
    if _stdlib_log.isEnabledFor(logging.DEBUG):  # structlog would build the event to drop it
        log.debug(
            "forward.stored",
            message_id=result.id,
            duplicate=result.duplicate,
            size=len(payload),
            request_id=request_id,
        )
    return result


def relay_quota(settings: MediatorSettings, target: str) -> RelayQuota:
    """The relay quotas for POSTs to `target` (a canonical URL or its origin): relayed
    forwards and replies to a sender's endpoint alike (both go where a client says)."""
    parts = urlsplit(target)
    return RelayQuota(
        f"{parts.scheme}://{parts.netloc}/",
        settings.relay_target_max_items,
        settings.relay_target_max_bytes,
        settings.relay_max_items,
        settings.relay_max_bytes,
        settings.relay_retry_after,
    )


async def relay(ctx: Context, inbound: Inbound, next_hop: str, payloads: list[bytes]) -> None:
    """Accept a forward for a DID that is not ours into the outbox, for its endpoint."""
    if ctx.endpoints is None:
        metrics.UNROUTABLE.inc()
        raise UnknownRecipient("next is not a recipient registered with this mediator")
    items: list[NewOutboxItem] = []
    origin = ""
    try:
        for payload in payloads:
            route = await ctx.endpoints.route(next_hop, payload)
            origin = route.origin
            if route.local:
                raise UnknownRecipient(
                    "next is not registered here and its endpoint is this mediator"
                )
            items.append(
                NewOutboxItem(
                    kind=OutboxKind.FORWARD,
                    target=route.uri,
                    payload=route.payload,
                    headers={"content-type": ENCRYPTED},
                    dedup_key="forward:" + hashlib.sha256(payload).hexdigest(),
                    remember=True,
                )
            )
    except UnknownRecipient as exc:
        metrics.UNROUTABLE.inc()
        metrics.RELAY_REFUSED.labels("unroutable").inc()
        log.warning("forward.unroutable", reason=exc.detail, request_id=inbound.request_id)
        raise
    # After routing, so an unroutable next is told so (404) whatever it carries.
    if not all(is_jwe(p) for p in payloads):
        metrics.RELAY_REFUSED.labels("not_jwe").inc()
        raise MalformedMessage("only encrypted messages (JWE) are relayed to another mediator")
    quota = relay_quota(ctx.settings, origin)
    try:
        added = await ctx.store.outbox_add(items, quota=quota)
    except (RateLimited, OutboxFull) as exc:
        reason = "global_quota" if isinstance(exc, OutboxFull) else "target_quota"
        metrics.RELAY_REFUSED.labels(reason).inc()
        log.warning(
            "forward.relay_refused", reason=reason, target=origin, request_id=inbound.request_id
        )
        raise
    if added:
        ctx.wake_outbox(OutboxKind.FORWARD)
    metrics.RELAYED.inc(len(added))
    RELAYS.add(forwards=1, items=len(items), new=len(added))
    if _stdlib_log.isEnabledFor(logging.DEBUG):
        log.debug(
            "forward.relayed",
            items=len(items),
            new=len(added),
            target=items[0].target if items else "",
            request_id=inbound.request_id,
        )


HANDLERS: dict[str, Handler] = {FORWARD: forward}
PROTOCOLS = {PIURI: ["mediator"]}
