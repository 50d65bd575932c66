"""Trust Ping 1.0 (RFC 0048), Discover Features 1.0 (RFC 0031), Report Problem 1.0 (0035)."""

from __future__ import annotations

from typing import Any

import structlog

from dovecote.didcomm.v1.messages import (
    DIDCOMM_PREFIX,
    PROBLEM_REPORT,
    V1Context,
    V1Handler,
    V1Inbound,
    field,
    reply,
)

log = structlog.get_logger("dovecote.v1")

TRUST_PING = f"{DIDCOMM_PREFIX}trust_ping/1.0"
DISCOVER = f"{DIDCOMM_PREFIX}discover-features/1.0"
REPORT_PROBLEM = f"{DIDCOMM_PREFIX}report-problem/1.0"


async def ping(ctx: V1Context, inbound: V1Inbound) -> list[dict[str, Any]]:
    wanted = field(inbound.message, "response_requested", bool, required=False, default=True)
    if not wanted or not inbound.sender:
        return []  # an anonymous ping has nobody to answer to
    return [reply(inbound, f"{TRUST_PING}/ping_response", {})]


async def ignore(ctx: V1Context, inbound: V1Inbound) -> list[dict[str, Any]]:
    return []


async def query(ctx: V1Context, inbound: V1Inbound) -> list[dict[str, Any]]:
    pattern = field(inbound.message, "query", str)[:512]
    prefix = pattern[:-1] if pattern.endswith("*") else None
    protocols = [
        {"pid": pid, "roles": roles}
        for pid, roles in ctx.protocols.items()
        if (pid.startswith(prefix) if prefix is not None else pid == pattern)
    ]
    return [reply(inbound, f"{DISCOVER}/disclose", {"protocols": protocols})]


async def problem_received(ctx: V1Context, inbound: V1Inbound) -> list[dict[str, Any]]:
    description = inbound.message.get("description")
    code = description.get("code") if isinstance(description, dict) else None
    log.warning(
        "problem_report.received", code=str(code)[:100], version="v1", request_id=inbound.request_id
    )
    return []


HANDLERS: dict[str, V1Handler] = {
    f"{TRUST_PING}/ping": ping,
    f"{TRUST_PING}/ping_response": ignore,
    f"{DISCOVER}/query": query,
    PROBLEM_REPORT: problem_received,
    # RFC 0685 names this older type for live-mode problems; accept it from peers too.
    f"{DIDCOMM_PREFIX}notification/1/problem-report": problem_received,
}
PROTOCOLS = {
    TRUST_PING: ["receiver"],
    DISCOVER: ["responder"],
    REPORT_PROBLEM: ["notified"],
}
