"""Report Problem 2.0: problem reports sent to us are logged and counted, never answered."""

from __future__ import annotations

from typing import Any

import structlog

from dovecote.didcomm.messages import PROBLEM_REPORT, Context, Handler, Inbound

log = structlog.get_logger("dovecote.problem")

PIURI = "https://didcomm.org/report-problem/2.0"


async def problem_received(ctx: Context, inbound: Inbound) -> list[dict[str, Any]]:
    code = inbound.body.get("code")
    log.warning("problem_report.received", code=str(code)[:100], request_id=inbound.request_id)
    return []


HANDLERS: dict[str, Handler] = {PROBLEM_REPORT: problem_received}
PROTOCOLS = {PIURI: ["notified"]}
