"""Routing 2.0 `forward`: queue the attached message for a registered recipient.

The attachment is stored exactly as received (opaque ciphertext). Its SHA-256 is the
dedup key, so a sender retrying the same POST is answered with success and stored once.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import time
from typing import Any

import structlog

from dovecote.didcomm.messages import Context, Handler, Inbound, field_of
from dovecote.errors import MalformedMessage, UnknownRecipient
from dovecote.ops import metrics
from dovecote.store.base import NewMessage

log = structlog.get_logger("dovecote.routing")

PIURI = "https://didcomm.org/routing/2.0"
FORWARD = f"{PIURI}/forward"
MAX_ATTACHMENTS = 100


def attachment_bytes(attachment: Any) -> bytes:
    """The bytes of one forwarded message: a JWE as compact JSON, or decoded base64."""
    data = attachment.get("data") if isinstance(attachment, dict) else None
    if not isinstance(data, dict):
        raise MalformedMessage("forward attachment has no data")
    if isinstance(data.get("json"), dict):
        return json.dumps(data["json"], separators=(",", ":")).encode()
    if isinstance(data.get("base64"), str):
        text = data["base64"]
        try:
            return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        except (binascii.Error, ValueError) as exc:
            raise MalformedMessage("forward attachment base64 is invalid") from exc
    raise MalformedMessage("forward attachment needs data.json or data.base64")


async def forward(ctx: Context, inbound: Inbound) -> list[dict[str, Any]]:
    ctx.degradation.require_accepting()
    body = inbound.body
    next_hop = field_of(body, "next", str)
    attachments = inbound.message.get("attachments")
    if not isinstance(attachments, list) or not attachments:
        raise MalformedMessage("forward needs at least one attachment")
    if len(attachments) > MAX_ATTACHMENTS:
        raise MalformedMessage(f"at most {MAX_ATTACHMENTS} attachments per forward")
    payloads = [attachment_bytes(a) for a in attachments]

    mediatee = await ctx.store.find_mediatee(next_hop)
    if mediatee is None:
        metrics.UNROUTABLE.inc()
        log.warning("forward.unroutable", request_id=inbound.request_id)
        raise UnknownRecipient("next is not a recipient registered with this mediator")

    now = time.time()
    expires_at = now + ctx.settings.message_ttl
    requested = inbound.message.get("expires_time")
    if isinstance(requested, int | float) and not isinstance(requested, bool):
        expires_at = min(expires_at, float(requested))
    for payload in payloads:
        result = await ctx.store.enqueue(
            NewMessage(
                mediatee=mediatee,
                recipient=next_hop,
                body=payload,
                digest=hashlib.sha256(payload).hexdigest(),
                expires_at=expires_at,
            ),
            max_messages=ctx.settings.mailbox_max_messages,
            max_bytes=ctx.settings.mailbox_max_bytes,
        )
        if result.duplicate:
            metrics.DUPLICATES.inc()
        else:
            metrics.ACCEPTED.inc()
        log.info("forward.accepted", message_id=result.id, duplicate=result.duplicate,
                 size=len(payload), request_id=inbound.request_id)
    return []


HANDLERS: dict[str, Handler] = {FORWARD: forward}
PROTOCOLS = {PIURI: ["mediator"]}
