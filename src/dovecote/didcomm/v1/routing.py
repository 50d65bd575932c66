"""Routing 1.0 `forward` (RFC 0094): `to` a did:key or raw verkey, `msg` the packed message.

The packed message is stored as received (compact JSON). A mediatee whose connection
has an http(s) endpoint gets it through the outbox (retries, breaker, dead letters); any
other mediatee (a phone: no endpoint, or `didcomm:transport/queue`) gets it in its
mailbox for pickup. Either way the forward is answered only after the commit, and a
retried forward with the same bytes for the same key is recognised (dedup window).
"""

from __future__ import annotations

import hashlib
import json
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import structlog

from dovecote.didcomm import routing as v2_routing
from dovecote.didcomm.endpoints import canonical_uri, is_private_host
from dovecote.didcomm.v1 import envelope
from dovecote.didcomm.v1.envelope import MEDIA_TYPE, pack, to_did_key, to_verkey
from dovecote.didcomm.v1.messages import DIDCOMM_PREFIX, V1Context, V1Handler, V1Inbound
from dovecote.errors import MalformedMessage, OutboxFull, RateLimited, UnknownRecipient
from dovecote.ops import metrics
from dovecote.store.base import NewOutboxItem
from dovecote.util.kinds import OutboxKind

log = structlog.get_logger("dovecote.v1.routing")

PIURI = f"{DIDCOMM_PREFIX}routing/1.0"
FORWARD = f"{PIURI}/forward"


def wrap(payload: bytes, to_verkey_: str, routing_keys: list[str]) -> bytes:
    """Wrap for each routing key in front of the recipient, last key innermost."""
    target = to_verkey_
    for key in reversed(routing_keys):
        forward = {
            "@type": FORWARD,
            "@id": hashlib.sha256(payload).hexdigest()[:32],
            "to": target,
            "msg": json.loads(payload),
        }
        payload = pack(json.dumps(forward, separators=(",", ":")).encode(), [key], None)
        target = key
    return payload


def deliverable_endpoint(ctx: V1Context, endpoint: str) -> str | None:
    """The endpoint, canonical (its origin keys the relay quotas), if the outbox may POST
    to it (http(s), not private unless allowed)."""
    canonical = canonical_uri(endpoint)
    if canonical is None:
        return None
    endpoint = canonical
    parts = urlsplit(endpoint)
    if not ctx.core.settings.outbound_allow_private and is_private_host(parts.hostname or ""):
        return None
    own = {ctx.core.settings.base_url.rstrip("/"), ctx.core.settings.ws_url.rstrip("/")}
    return None if endpoint.rstrip("/") in own else endpoint


def _expires_time(message: dict[str, Any]) -> float | None:
    """`~timing.expires_time` (RFC 0032, ISO 8601 UTC) as UNIX seconds, if valid."""
    timing = message.get("~timing")
    value = timing.get("expires_time") if isinstance(timing, dict) else None
    if not isinstance(value, str) or len(value) > 64:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


async def forward(ctx: V1Context, inbound: V1Inbound) -> list[dict[str, Any]]:
    ctx.core.degradation.require_accepting()
    recipient = to_did_key(inbound.message.get("to"))
    msg = inbound.message.get("msg")
    if isinstance(msg, dict):
        payload = json.dumps(msg, separators=(",", ":")).encode()
    elif isinstance(msg, str) and msg:
        payload = msg.encode()
    else:
        raise MalformedMessage("forward needs msg (the packed message)")
    mediatee = await ctx.core.store.find_mediatee(recipient)
    if mediatee is None:
        metrics.UNROUTABLE.inc()
        raise UnknownRecipient("to is not a key registered with this mediator")
    digest = hashlib.sha256(payload).hexdigest()
    connection = (
        await ctx.store.v1_connection_get(to_verkey(mediatee))
        if mediatee.startswith("did:key:")
        else None
    )
    endpoint = deliverable_endpoint(ctx, connection.endpoint) if connection else None
    if connection is not None and endpoint:
        # Anyone can be a mediatee with an endpoint of its choice (open mediation), and the
        # forwards are anonymous: the same rules as a v2 relay (issue 13 point 4), envelopes
        # only and the relay quotas.
        if not (
            envelope.parse(payload, ctx.core.settings.max_json_depth) or v2_routing.is_jwe(payload)
        ):
            metrics.RELAY_REFUSED.labels("not_jwe").inc()
            raise MalformedMessage("only encrypted messages are relayed to an endpoint")
        quota = v2_routing.relay_quota(ctx.core.settings, endpoint)
        item = NewOutboxItem(
            kind=OutboxKind.FORWARD,
            target=endpoint,
            payload=wrap(payload, to_verkey(recipient), connection.routing_keys),
            headers={"content-type": MEDIA_TYPE},
            dedup_key=f"v1forward:{recipient}:{digest}",
        )
        try:
            new = await ctx.store.v1_relay_once(recipient, digest, item, quota)
        except (RateLimited, OutboxFull) as exc:
            reason = "global_quota" if isinstance(exc, OutboxFull) else "target_quota"
            metrics.RELAY_REFUSED.labels(reason).inc()
            log.warning(
                "forward.relay_refused",
                reason=reason,
                target=quota.origin,
                version="v1",
                request_id=inbound.request_id,
            )
            raise
        if new:
            ctx.core.wake_outbox(OutboxKind.FORWARD)
            metrics.ACCEPTED.inc()
            metrics.RELAYED.inc()
        else:
            metrics.DUPLICATES.inc()
        v2_routing.RELAYS.add(forwards=1, items=1, new=int(new))
        return []
    expires_at = time.time() + ctx.core.settings.message_ttl
    requested = _expires_time(inbound.message)
    if requested is not None:
        expires_at = min(expires_at, requested)
    await v2_routing.store_for(
        ctx.core, mediatee, recipient, payload, expires_at, inbound.request_id
    )
    return []


HANDLERS: dict[str, V1Handler] = {FORWARD: forward}
PROTOCOLS = {PIURI: ["mediator"]}
