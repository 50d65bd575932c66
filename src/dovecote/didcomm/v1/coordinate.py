"""Coordinate Mediation 1.0 (RFC 0211) on the shared mediation and recipient tables.

A v1 mediatee is the did:key of its connection verkey; its keylist entries are stored
as did:key too, whichever form (raw verkey or did:key) the client sent, and answered in
the form it sent, so v1 and v2 forwards meet the same `recipients` rows.
"""

from __future__ import annotations

from typing import Any

import structlog

from dovecote.didcomm.v1.envelope import to_did_key, verkey_to_did_key
from dovecote.didcomm.v1.messages import (
    DIDCOMM_PREFIX,
    V1Context,
    V1Handler,
    V1Inbound,
    field,
    reply,
)
from dovecote.errors import MalformedMessage

log = structlog.get_logger("dovecote.v1.coordinate")

PIURI = f"{DIDCOMM_PREFIX}coordinate-mediation/1.0"
MAX_UPDATES = 1000
MAX_PAGE = 1000


async def mediate_request(ctx: V1Context, inbound: V1Inbound) -> list[dict[str, Any]]:
    mediatee = inbound.sender_did_key
    settings = ctx.core.settings
    allowed = (
        settings.mediation_policy == "open"
        or mediatee in settings.mediation_allowlist
        or (inbound.sender or "") in settings.mediation_allowlist
    )
    routing_key = verkey_to_did_key(ctx.verkey)
    await ctx.core.store.set_mediation(mediatee, "granted" if allowed else "denied", routing_key)
    log.info("mediation.decided", granted=allowed, version="v1/1.0", request_id=inbound.request_id)
    if not allowed:
        return [reply(inbound, f"{PIURI}/mediate-deny", {})]
    endpoint = settings.ws_url if inbound.transport == "ws" else settings.base_url
    return [
        reply(
            inbound, f"{PIURI}/mediate-grant", {"endpoint": endpoint, "routing_keys": [routing_key]}
        )
    ]


async def keylist_update(ctx: V1Context, inbound: V1Inbound) -> list[dict[str, Any]]:
    mediatee = await ctx.require_grant(inbound)
    updates = field(inbound.message, "updates", list)
    if len(updates) > MAX_UPDATES:
        raise MalformedMessage(f"at most {MAX_UPDATES} updates per message")
    results: list[dict[str, Any]] = []
    valid: list[tuple[int, str, str]] = []
    for index, update in enumerate(updates):
        key = update.get("recipient_key") if isinstance(update, dict) else None
        action = update.get("action") if isinstance(update, dict) else None
        results.append(
            {
                "recipient_key": key if isinstance(key, str) else None,
                "action": action if action in ("add", "remove") else None,
                "result": "client_error",
            }
        )
        try:
            normal = to_did_key(key)
        except MalformedMessage:
            continue
        if action in ("add", "remove"):
            valid.append((index, normal, action))
    if valid:
        outcomes = await ctx.core.store.update_recipients(
            mediatee, [(key, action) for _, key, action in valid]
        )
        for (index, _, _), outcome in zip(valid, outcomes, strict=True):
            results[index]["result"] = outcome
    log.info("mediation.keylist_updated", count=len(results), request_id=inbound.request_id)
    return [reply(inbound, f"{PIURI}/keylist-update-response", {"updated": results})]


async def keylist_query(ctx: V1Context, inbound: V1Inbound) -> list[dict[str, Any]]:
    mediatee = await ctx.require_grant(inbound)
    paginate = field(inbound.message, "paginate", dict, required=False, default={})
    limit = paginate.get("limit", 100)
    offset = paginate.get("offset", 0)
    if (
        not isinstance(limit, int)
        or not isinstance(offset, int)
        or isinstance(limit, bool)
        or isinstance(offset, bool)
        or limit < 0
        or offset < 0
    ):
        raise MalformedMessage("paginate.limit and paginate.offset must be non-negative ints")
    keys, total = await ctx.core.store.list_recipients(mediatee, offset, min(limit, MAX_PAGE))
    return [
        reply(
            inbound,
            f"{PIURI}/keylist",
            {
                "keys": [{"recipient_key": key} for key in keys],
                "pagination": {
                    "count": len(keys),
                    "offset": offset,
                    "remaining": max(0, total - offset - len(keys)),
                },
            },
        )
    ]


HANDLERS: dict[str, V1Handler] = {
    f"{PIURI}/mediate-request": mediate_request,
    f"{PIURI}/keylist-update": keylist_update,
    f"{PIURI}/keylist-query": keylist_query,
}
PROTOCOLS = {PIURI: ["mediator"]}
