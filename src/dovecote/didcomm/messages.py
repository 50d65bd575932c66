"""Plain types shared by the protocol handlers: the inbound message, the handler context,
and helpers to build replies. Handlers never see HTTP, WebSocket or SQL objects.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Literal

from dovecote.errors import InvalidDID, MalformedMessage, NotMediated, Unauthenticated
from dovecote.util.did import did_problem
from dovecote.util.kinds import OutboxKind

if TYPE_CHECKING:
    from dovecote.delivery.live import LiveRegistry, LiveSession
    from dovecote.didcomm.endpoints import Endpoints
    from dovecote.didcomm.identity import Identity
    from dovecote.ops.health import Degradation
    from dovecote.ops.settings import Settings
    from dovecote.store.base import Store

Transport = Literal["http", "ws"]
PROBLEM_REPORT = "https://didcomm.org/report-problem/2.0/problem-report"
PLAINTEXT = "application/didcomm-plain+json"


@dataclass
class Inbound:
    """A decrypted message and what we know about how it arrived."""

    message: dict[str, Any]
    sender: str | None
    transport: Transport
    session: LiveSession | None = None
    request_id: str = ""

    @property
    def type(self) -> str:
        return str(self.message["type"])

    @property
    def id(self) -> str:
        return str(self.message.get("id", ""))

    @property
    def thid(self) -> str:
        return str(self.message.get("thid") or self.message.get("id", ""))

    @property
    def body(self) -> dict[str, Any]:
        body = self.message.get("body", {})
        if not isinstance(body, dict):
            raise MalformedMessage("body must be a JSON object")
        return body

    @property
    def return_route(self) -> str:
        """The return_route header ("none" when absent).

        SICPA's didcomm-python (0.3) serialises custom headers as a `custom_headers` list
        instead of top-level keys; accepting that form lets its users be answered.
        """
        value = self.message.get("return_route")
        if value is None:
            for header in self.message.get("custom_headers") or []:
                if isinstance(header, dict) and "return_route" in header:
                    value = header["return_route"]
        return value if value in ("all", "thread", "none") else "none"

    def require_sender(self) -> str:
        """The authenticated sender's DID; protocols that act for a DID need one."""
        if not self.sender:
            raise Unauthenticated(f"{self.type} needs an authcrypt message with 'from'")
        return self.sender


@dataclass(frozen=True, slots=True)
class MediatorSettings:
    """The part of the settings the protocol handlers (v2 and v1) read, and only that."""

    base_url: str
    ws_url: str
    max_body_bytes: int
    max_did_bytes: int
    max_json_depth: int
    max_message_id_bytes: int
    message_ttl: float
    mailbox_max_messages: int
    mailbox_max_bytes: int
    mediation_policy: str
    mediation_allowlist: tuple[str, ...]
    rate_limit_did: float
    rate_limit_did_burst: int
    rate_limit_memory_bytes: int
    outbound_allow_private: bool
    relay_target_max_items: int
    relay_target_max_bytes: int
    relay_max_items: int
    relay_max_bytes: int
    relay_retry_after: float
    notify_webhook_url: str
    push_url: str

    @classmethod
    def of(cls, settings: Settings) -> MediatorSettings:
        """Copied from the one settings object (fields by name)."""
        values = {f.name: getattr(settings, f.name) for f in fields(cls)}
        values["mediation_allowlist"] = tuple(values["mediation_allowlist"])
        return cls(**values)


@dataclass
class Context:
    """Services a handler may use."""

    settings: MediatorSettings
    store: Store
    identity: Identity
    live: LiveRegistry
    degradation: Degradation
    extra: dict[str, Any] = field(default_factory=dict)
    # Outbound routes (multi-hop forwards, replies) and the outbox wake-up; the server
    # wires both, a bare Context (tests) has neither.
    endpoints: Endpoints | None = None
    wake_outbox: Callable[[OutboxKind], None] = field(default=lambda kind: None)
    # PIURI -> roles of every supported protocol, for discover-features; the Mediator
    # that owns the handler table fills it in.
    protocols: dict[str, list[str]] = field(default_factory=dict)

    async def require_grant(self, inbound: Inbound) -> str:
        """The sender's DID if it holds a mediation grant, else NotMediated."""
        sender = inbound.require_sender()
        if await self.store.get_mediation(sender) != "granted":
            raise NotMediated("request mediation (mediate-request) first")
        return sender


Handler = Callable[[Context, Inbound], Awaitable[list[dict[str, Any]]]]


def did_field(ctx: Context, body: dict[str, Any], name: str, required: bool = True) -> str | None:
    """A body field holding a DID, checked (length, NUL, Unicode) before any lookup."""
    value = field_of(body, name, str, required=required)
    if value is None:
        return None
    problem = did_problem(value, ctx.settings.max_did_bytes)
    if problem is not None:
        raise InvalidDID(f"body.{name} {problem}")
    return str(value)


def reply(inbound: Inbound, msg_type: str, body: dict[str, Any], **headers: Any) -> dict[str, Any]:
    """A reply in the sender's thread."""
    message: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "typ": PLAINTEXT,
        "type": msg_type,
        "thid": inbound.thid,
        "created_time": int(time.time()),
        "body": body,
    }
    if inbound.sender:
        message["to"] = [inbound.sender]
    message.update(headers)
    return message


def problem_report(
    code: str, comment: str, pthid: str | None = None, ack: str | None = None
) -> dict[str, Any]:
    """A Report Problem 2.0 message."""
    message: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "typ": PLAINTEXT,
        "type": PROBLEM_REPORT,
        "created_time": int(time.time()),
        "body": {"code": code, "comment": comment},
    }
    if pthid:
        message["pthid"] = pthid
    if ack:
        message["ack"] = [ack]
    return message


def field_of(
    body: dict[str, Any],
    name: str,
    kind: type | tuple[type, ...],
    required: bool = True,
    default: Any = None,
) -> Any:
    """A body field checked for presence and type (bool is not an int here)."""
    if name not in body or body[name] is None:
        if required:
            raise MalformedMessage(f"body.{name} is required")
        return default
    value = body[name]
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise MalformedMessage(f"body.{name} has the wrong type")
    if not isinstance(value, kind):
        raise MalformedMessage(f"body.{name} has the wrong type")
    return value
