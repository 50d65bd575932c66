"""v1 plaintext messages (`@type`, `@id`, `~thread`, `~transport`) and the handler context."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from dataclasses import field as dc_field
from typing import TYPE_CHECKING, Any, cast

from dovecote.didcomm.v1.envelope import to_did_key
from dovecote.errors import MalformedMessage, NotMediated, Unauthenticated

if TYPE_CHECKING:
    from aries_askar import Key

    from dovecote.delivery.live import LiveSession
    from dovecote.didcomm.messages import Context, Transport
    from dovecote.didcomm.v1.implicit import ImplicitPickup
    from dovecote.store.v1_base import V1Store

DIDCOMM_PREFIX = "https://didcomm.org/"
# Older agents (and RFC examples) still use the Sovrin doc URI prefix for the same types.
LEGACY_PREFIX = "did:sov:BzCbsNYhMrjHiqZDTUASHg;spec/"
PROBLEM_REPORT = f"{DIDCOMM_PREFIX}report-problem/1.0/problem-report"
MAX_ID = 256


def normalize_type(value: Any) -> str:
    """`@type` with the legacy prefix rewritten and the minor version dropped (RFC 0003).

    Returns `<prefix><family>/<major>/<name>`; handlers are registered under that key so
    a 1.1 sender reaches a 1.0 handler, as semver minor compatibility demands.
    """
    if not isinstance(value, str) or len(value) > 512:
        raise MalformedMessage("@type must be a message type URI")
    text: str = value
    if text.startswith(LEGACY_PREFIX):
        text = DIDCOMM_PREFIX + text[len(LEGACY_PREFIX) :]
    head, _, name = text.rpartition("/")
    family, _, version = head.rpartition("/")
    major = version.split(".", 1)[0]
    if not family or not name or not major.isdigit():
        return text
    return f"{family}/{major}/{name}"


@dataclass
class V1Inbound:
    """A decrypted v1 message, its sender's verkey (None: anoncrypt) and how it came."""

    message: dict[str, Any]
    sender: str | None
    transport: Transport
    session: LiveSession | None = None
    request_id: str = ""

    @property
    def raw_type(self) -> str:
        return str(self.message.get("@type", ""))

    @property
    def type(self) -> str:
        return normalize_type(self.message.get("@type"))

    @property
    def version(self) -> str:
        """The minor-qualified version the sender used, e.g. '1.1'."""
        parts = self.raw_type.rsplit("/", 2)
        return parts[-2] if len(parts) == 3 else ""

    @property
    def id(self) -> str:
        value = self.message.get("@id")
        return value[:MAX_ID] if isinstance(value, str) else ""

    @property
    def thread(self) -> dict[str, Any]:
        thread = self.message.get("~thread")
        return thread if isinstance(thread, dict) else {}

    @property
    def thid(self) -> str:
        thid = self.thread.get("thid")
        return thid[:MAX_ID] if isinstance(thid, str) and thid else self.id

    @property
    def return_route(self) -> str:
        transport = self.message.get("~transport")
        value = transport.get("return_route") if isinstance(transport, dict) else None
        return value if value in ("all", "thread", "none") else "none"

    @property
    def sender_did_key(self) -> str:
        """The authenticated sender as did:key (the v1 mediatee id)."""
        if not self.sender:
            raise Unauthenticated(f"{self.raw_type[:100]} needs an authcrypted message")
        return to_did_key(self.sender)


@dataclass
class V1Context:
    """The shared handler context plus what only v1 needs."""

    core: Context
    key: Key
    verkey: str
    implicit: ImplicitPickup
    # PIURI -> roles of every supported v1 protocol (what discover-features discloses).
    protocols: dict[str, list[str]] = dc_field(default_factory=dict)

    @property
    def store(self) -> V1Store:
        return cast("V1Store", self.core.store)

    async def require_grant(self, inbound: V1Inbound) -> str:
        """The sender's did:key if it holds a mediation grant, else NotMediated."""
        mediatee = inbound.sender_did_key
        if await self.core.store.get_mediation(mediatee) != "granted":
            raise NotMediated("request mediation (coordinate-mediation/1.0) first")
        return mediatee


V1Handler = Callable[[V1Context, V1Inbound], Awaitable[list[dict[str, Any]]]]


def reply(inbound: V1Inbound, msg_type: str, body: dict[str, Any]) -> dict[str, Any]:
    """A reply in the sender's thread."""
    message: dict[str, Any] = {"@type": msg_type, "@id": str(uuid.uuid4()), **body}
    thread: dict[str, Any] = {"thid": inbound.thid}
    pthid = inbound.thread.get("pthid")
    if isinstance(pthid, str):
        thread["pthid"] = pthid[:MAX_ID]
    message["~thread"] = thread
    return message


def problem_report(code: str, detail: str, inbound: V1Inbound | None) -> dict[str, Any]:
    """A Report Problem 1.0 message (RFC 0035) about `inbound`."""
    message: dict[str, Any] = {
        "@type": PROBLEM_REPORT,
        "@id": str(uuid.uuid4()),
        "description": {"code": code, "en": detail},
    }
    if inbound is not None and inbound.id:
        message["~thread"] = {"thid": inbound.thid}
    return message


def field(
    message: dict[str, Any],
    name: str,
    kind: type | tuple[type, ...],
    required: bool = True,
    default: Any = None,
) -> Any:
    """A top-level field checked for presence and type (bool is not an int here)."""
    value = message.get(name)
    if value is None:
        if required:
            raise MalformedMessage(f"{name} is required")
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kind):
        raise MalformedMessage(f"{name} has the wrong type")
    return value
