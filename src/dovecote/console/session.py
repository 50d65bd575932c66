"""Console logins: signed session cookies and CSRF tokens.

A session is a cookie signed (itsdangerous) with a key derived from ADMIN_TOKEN, so every
worker process accepts it without shared state, and changing the token ends every
session. It carries a random nonce and its issue time; the CSRF token of a session is an
HMAC of that nonce, sent in a hidden field with every action and compared in constant time.
Logout revokes the nonce in this process and deletes the cookie. Failed logins count in
the admin API's per-address throttle (ops/admin.py AuthThrottle).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass

from itsdangerous import BadSignature, URLSafeTimedSerializer

COOKIE = "dovecote_console"
COOKIE_PATH = "/console"
MAX_REVOKED = 10_000  # logged-out sessions remembered until they expire (bounded memory)


@dataclass(frozen=True)
class Session:
    nonce: str
    issued_at: float
    csrf: str


class ConsoleAuth:
    """Issues and checks sessions for one admin token."""

    def __init__(self, admin_token: str, max_age: float) -> None:
        key = hmac.new(
            admin_token.encode(), b"dovecote console session v1", hashlib.sha256
        ).digest()
        self._key = key
        self._serializer = URLSafeTimedSerializer(key, salt="dovecote-console")
        self.max_age = max_age
        self._revoked: OrderedDict[str, float] = OrderedDict()

    def _csrf(self, nonce: str) -> str:
        return hmac.new(self._key, b"csrf:" + nonce.encode(), hashlib.sha256).hexdigest()

    def issue(self) -> str:
        """A new session's cookie value."""
        return self._serializer.dumps({"n": secrets.token_urlsafe(18), "t": time.time()})

    def session(self, cookie: str | None) -> Session | None:
        """The session a cookie proves, or None (missing, forged, expired, logged out)."""
        if not cookie or len(cookie) > 512:
            return None
        try:
            data = self._serializer.loads(cookie, max_age=int(self.max_age))
        except BadSignature:  # includes SignatureExpired
            return None
        if not isinstance(data, dict) or not isinstance(data.get("n"), str):
            return None
        nonce = data["n"]
        if nonce in self._revoked:
            return None
        return Session(nonce, float(data.get("t", 0)), self._csrf(nonce))

    def csrf_ok(self, session: Session, token: str) -> bool:
        return hmac.compare_digest(session.csrf.encode(), token.encode())

    def revoke(self, session: Session) -> None:
        self._revoked[session.nonce] = time.time() + self.max_age
        now = time.time()
        while self._revoked and (
            len(self._revoked) > MAX_REVOKED or next(iter(self._revoked.values())) < now
        ):
            self._revoked.popitem(last=False)
