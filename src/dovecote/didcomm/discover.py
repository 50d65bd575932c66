"""Discover Features 2.0: disclose every supported protocol, goal code and header."""

from __future__ import annotations

from typing import Any

from dovecote.didcomm.identity import GOAL_REQUEST_MEDIATE
from dovecote.didcomm.messages import Context, Handler, Inbound, field_of, reply
from dovecote.errors import MalformedMessage

PIURI = "https://didcomm.org/discover-features/2.0"
HEADERS = ["return_route", "expires_time"]


def _matches(pattern: str, value: str) -> bool:
    if pattern.endswith("*"):
        return value.startswith(pattern[:-1])
    return value == pattern


async def queries(ctx: Context, inbound: Inbound) -> list[dict[str, Any]]:
    items = field_of(inbound.body, "queries", list)
    disclosures: list[dict[str, Any]] = []
    for query in items[:100]:
        if not isinstance(query, dict) or not isinstance(query.get("match"), str):
            raise MalformedMessage("each query needs feature-type and match")
        kind, match = query.get("feature-type"), query["match"]
        if kind == "protocol":
            disclosures += [
                {"feature-type": "protocol", "id": piuri, "roles": roles}
                for piuri, roles in ctx.protocols.items()
                if _matches(match, piuri)
            ]
        elif kind == "goal-code" and _matches(match, GOAL_REQUEST_MEDIATE):
            disclosures.append({"feature-type": "goal-code", "id": GOAL_REQUEST_MEDIATE})
        elif kind == "header":
            disclosures += [
                {"feature-type": "header", "id": h} for h in HEADERS if _matches(match, h)
            ]
    return [reply(inbound, f"{PIURI}/disclose", {"disclosures": disclosures})]


HANDLERS: dict[str, Handler] = {f"{PIURI}/queries": queries}
PROTOCOLS = {PIURI: ["responder"]}
