"""The operators' audit trail: one log line per admin action or refused admin request.

Every line is the structlog event `audit` on the logger `dovecote.audit` with

    who      the client address, plus ` cert=<subject>` when a client certificate was shown
    action   what was attempted, e.g. `dlq.replay`, `degradation.set`, `auth`
    target   what it acted on (ids, a level, a path); never a token, key or message content
    outcome  `ok`, or why it was refused (`unauthorized`, `forbidden`, `throttled`, ...)

Anything else that helps (counts, HTTP status) goes in extra fields. Used by the admin API
(ops/admin.py) and the web console; call `audit(request, ...)` from any Starlette handler.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import structlog
from starlette.requests import HTTPConnection

log = structlog.get_logger("dovecote.audit")

MAX_TARGET = 200


@functools.lru_cache(maxsize=64)
def _subject(pem: str) -> str:
    """The RFC 4514 subject of a PEM certificate ('' when it cannot be parsed)."""
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm

    try:
        return x509.load_pem_x509_certificate(pem.encode()).subject.rfc4514_string()
    # What cryptography raises for a certificate it cannot read: its caller still gets
    # an audit line, without the subject.
    except (ValueError, UnsupportedAlgorithm):
        return ""


def client_cert(conn: HTTPConnection) -> str | None:
    """The verified client certificate (PEM) of this connection, if it presented one."""
    tls = (conn.scope.get("extensions") or {}).get("tls") or {}
    chain = tls.get("client_cert_chain") or []
    return str(chain[0]) if chain else None


def who(conn: HTTPConnection) -> str:
    """The caller as the audit log names it: address, and certificate subject if any."""
    address = conn.client.host if conn.client else "?"
    pem = client_cert(conn)
    subject = _subject(pem) if pem else ""
    return f"{address} cert={subject}" if subject else address


def cli_caller() -> str:
    """`cli:<user>`: who runs an operator command on this host."""
    import getpass

    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no passwd entry (containers with arbitrary uids)
        return f"cli:uid={os.getuid()}"


def audit(
    conn: HTTPConnection | None,
    action: str,
    target: Any = "",
    outcome: str = "ok",
    *,
    caller: str | None = None,
    level: str = "info",
    **fields: Any,
) -> None:
    """Write one audit line. `caller` overrides `who(conn)` (e.g. `cli_caller()`); the CLI
    logs at `warning` so the line passes its quieter log level."""
    text = target if isinstance(target, str) else repr(target)
    getattr(log, level)(
        "audit",
        who=caller if caller is not None else (who(conn) if conn is not None else "?"),
        action=action,
        target=text[:MAX_TARGET],
        outcome=outcome,
        **fields,
    )
