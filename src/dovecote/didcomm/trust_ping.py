"""Trust Ping 2.0."""

from __future__ import annotations

from typing import Any

from dovecote.didcomm.messages import Context, Handler, Inbound, field_of, reply

PIURI = "https://didcomm.org/trust-ping/2.0"


async def ping(ctx: Context, inbound: Inbound) -> list[dict[str, Any]]:
    wanted = field_of(inbound.body, "response_requested", bool, required=False, default=True)
    if not wanted or not inbound.sender:
        # An anonymous ping cannot be answered: there is nobody to encrypt for.
        return []
    return [reply(inbound, f"{PIURI}/ping-response", {})]


async def ping_response(ctx: Context, inbound: Inbound) -> list[dict[str, Any]]:
    return []


HANDLERS: dict[str, Handler] = {f"{PIURI}/ping": ping, f"{PIURI}/ping-response": ping_response}
PROTOCOLS = {PIURI: ["receiver"]}
