"""Coordinate Mediation 2.0 and 3.0 on one store.

2.0 names the list messages keylist-*, 3.0 recipient-*; 2.0's grant carries routing_did
as a string, 3.0's as a list. Everything else is the same, so one handler serves both.
"""

from __future__ import annotations

from typing import Any

import structlog

from dovecote.didcomm.messages import Context, Handler, Inbound, field_of, reply
from dovecote.errors import InvalidDID, MalformedMessage
from dovecote.ops import metrics
from dovecote.util.did import base_did, did_problem

log = structlog.get_logger("dovecote.coordinate")

V2 = "https://didcomm.org/coordinate-mediation/2.0"
V3 = "https://didcomm.org/coordinate-mediation/3.0"
MAX_UPDATES = 1000
MAX_PAGE = 1000


def _names(version: str) -> dict[str, str]:
    if version == V2:
        return {"update_response": "keylist-update-response", "list": "keylist", "key": "keys"}
    return {"update_response": "recipient-update-response", "list": "recipient", "key": "dids"}


def _version(inbound: Inbound) -> str:
    return inbound.type.rsplit("/", 1)[0]


async def mediate_request(ctx: Context, inbound: Inbound) -> list[dict[str, Any]]:
    sender = inbound.require_sender()
    version = _version(inbound)
    allowed = ctx.settings.mediation_policy == "open" or sender in {
        base_did(entry) for entry in ctx.settings.mediation_allowlist
    }
    routing_did = ctx.identity.did
    await ctx.store.set_mediation(sender, "granted" if allowed else "denied", routing_did)
    log.info(
        "mediation.decided", granted=allowed, version=version[-3:], request_id=inbound.request_id
    )
    if not allowed:
        return [reply(inbound, f"{version}/mediate-deny", {})]
    grant: Any = routing_did if version == V2 else [routing_did]
    return [reply(inbound, f"{version}/mediate-grant", {"routing_did": grant})]


def _echo(value: Any) -> Any:
    """A refused value as the update response may repeat it: short printable text only
    (echoing a 4 KiB or NUL-laden value would return what we refuse to keep)."""
    if isinstance(value, str) and len(value) <= 256 and value.isprintable():
        return value
    return None


async def recipient_update(ctx: Context, inbound: Inbound) -> list[dict[str, Any]]:
    mediatee = await ctx.require_grant(inbound)
    version = _version(inbound)
    updates = field_of(inbound.body, "updates", list)
    if len(updates) > MAX_UPDATES:
        raise MalformedMessage(f"at most {MAX_UPDATES} updates per message")
    valid: list[tuple[int, str, str]] = []
    results: list[dict[str, Any]] = []
    for index, update in enumerate(updates):
        did = update.get("recipient_did") if isinstance(update, dict) else None
        action = update.get("action") if isinstance(update, dict) else None
        problem = did_problem(did, ctx.settings.max_did_bytes)
        results.append(
            {
                "recipient_did": did if problem is None else _echo(did),
                "action": _echo(action),
                "result": "client_error",
            }
        )
        if problem is None and isinstance(did, str) and action in ("add", "remove"):
            valid.append((index, did, str(action)))
        elif problem is not None:
            metrics.BAD_INPUT.labels(InvalidDID.code, inbound.transport).inc()
    if valid:
        outcomes = await ctx.store.update_recipients(
            mediatee, [(did, action) for _, did, action in valid]
        )
        for (index, _, _), outcome in zip(valid, outcomes, strict=True):
            results[index]["result"] = outcome
    log.info("mediation.recipients_updated", count=len(results), request_id=inbound.request_id)
    return [reply(inbound, f"{version}/{_names(version)['update_response']}", {"updated": results})]


async def recipient_query(ctx: Context, inbound: Inbound) -> list[dict[str, Any]]:
    mediatee = await ctx.require_grant(inbound)
    version = _version(inbound)
    paginate = field_of(inbound.body, "paginate", dict, required=False, default={})
    limit = paginate.get("limit", 100)
    offset = paginate.get("offset", 0)
    if (
        not isinstance(limit, int)
        or not isinstance(offset, int)
        or isinstance(limit, bool)
        or limit < 0
        or offset < 0
    ):
        raise MalformedMessage("paginate.limit and paginate.offset must be non-negative ints")
    limit = min(limit, MAX_PAGE)
    dids, total = await ctx.store.list_recipients(mediatee, offset, limit)
    names = _names(version)
    return [
        reply(
            inbound,
            f"{version}/{names['list']}",
            {
                names["key"]: [{"recipient_did": did} for did in dids],
                "pagination": {
                    "count": len(dids),
                    "offset": offset,
                    "remaining": max(0, total - offset - len(dids)),
                },
            },
        )
    ]


HANDLERS: dict[str, Handler] = {}
for _v in (V2, V3):
    HANDLERS[f"{_v}/mediate-request"] = mediate_request
HANDLERS[f"{V2}/keylist-update"] = recipient_update
HANDLERS[f"{V2}/keylist-query"] = recipient_query
HANDLERS[f"{V3}/recipient-update"] = recipient_update
HANDLERS[f"{V3}/recipient-query"] = recipient_query
PROTOCOLS = {V2: ["mediator"], V3: ["mediator"]}
