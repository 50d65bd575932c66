"""Rooms authentication: `Authorization: Bearer <JWT>` checked against the issuer's JWKS.

Keys come from a JWKS file (re-read when its mtime/size change) or a URL (refetched every
ROOMS_JWKS_REFRESH seconds, and sooner when a token names an unknown key id), so issuer
key rotation needs no restart. A failed reload keeps the last good keys.

Claims: `sub` is the participant id; `rooms` lists the room ids the token may touch
("*" for all); `roles` may hold "admin" (create/delete rooms, manage participants anywhere)
and "moderator" (edit/delete anyone's messages). Membership itself lives in the store.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import structlog
from joserfc import errors as jose_errors
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from dovecote.delivery import outbound
from dovecote.errors import InvalidToken, RoomsDisabled, Unavailable
from dovecote.rooms.models import PARTICIPANT_PATTERN

log = structlog.get_logger("dovecote.rooms.auth")

# Asymmetric algorithms only: a JWKS holds public keys, and "none"/HMAC must never verify.
ALGORITHMS = ("EdDSA", "Ed25519", "ES256", "ES384", "ES512", "RS256", "PS256")
KEY_TYPES = {
    "EdDSA": "OKP",
    "Ed25519": "OKP",
    "ES256": "EC",
    "ES384": "EC",
    "ES512": "EC",
    "RS256": "RSA",
    "PS256": "RSA",
}
# Seconds of clock skew tolerated for exp/nbf/iat.
LEEWAY = 10
MAX_TOKEN_BYTES = 8192
# An unknown `kid` refetches the JWKS URL at most this often.
MIN_REFETCH_SECONDS = 10.0
FETCH_TIMEOUT = 5.0
ADMIN = "admin"
MODERATOR = "moderator"

# RFC 9864 deprecates the "EdDSA" name in favour of "Ed25519"; issuers still use it.
warnings.filterwarnings(
    "ignore",
    message="EdDSA is deprecated",
    category=getattr(jose_errors, "SecurityWarning", Warning),
)

_PARTICIPANT = re.compile(PARTICIPANT_PATTERN)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling, as the token says."""

    sub: str
    rooms: frozenset[str] | None  # None: every room
    roles: frozenset[str]
    expires_at: float

    def may_enter(self, room: str) -> bool:
        return self.rooms is None or room in self.rooms

    @property
    def is_admin(self) -> bool:
        return ADMIN in self.roles

    @property
    def moderates(self) -> bool:
        return ADMIN in self.roles or MODERATOR in self.roles


class KeySource:
    """The issuer's current public keys, reloaded from a file or URL without restart."""

    def __init__(
        self, file: Path | None, url: str, refresh: float, policy: outbound.Policy | None = None
    ) -> None:
        # The URL is fetched like every outbound call: checked address, no redirects.
        self.policy = policy or outbound.Policy()
        self.file = file
        self.url = url
        self.refresh = refresh
        self.keys: KeySet | None = None
        self._file_stamp: tuple[int, int, int] | None = None
        self._fetched_at = 0.0
        self._lock = asyncio.Lock()
        self._client: httpx.AsyncClient | None = None
        # Rooms switched off on purpose: a definite 4xx, unlike missing keys (503).
        self.disabled = False
        # Keys given once (the development issuer, rooms/devkey.py), never reloaded.
        self.fixed = False

    @property
    def configured(self) -> bool:
        return self.file is not None or bool(self.url)

    async def current(self, unknown_kid: bool = False) -> KeySet:
        """The key set, reloaded first when the file changed or the URL copy is stale."""
        if self.disabled:
            raise RoomsDisabled("rooms are switched off on this server")
        if self.file is not None:
            self._reload_file()
        elif self.url:
            age = time.monotonic() - self._fetched_at
            if (
                self.keys is None
                or age > self.refresh
                or (unknown_kid and age > MIN_REFETCH_SECONDS)
            ):
                await self._refetch()
        if self.keys is None:
            raise Unavailable("rooms token keys are not available (check the JWKS setting)")
        return self.keys

    def _reload_file(self) -> None:
        assert self.file is not None
        try:
            st = os.stat(self.file)
        except OSError as exc:
            if self.keys is None:
                log.warning("rooms.jwks_unreadable", file=str(self.file), error=str(exc))
            return
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp == self._file_stamp:
            return
        self._file_stamp = stamp
        try:
            self.keys = _key_set(json.loads(self.file.read_bytes()))
            log.info("rooms.jwks_loaded", source="file", keys=len(self.keys.keys))
        except (OSError, ValueError, JoseError) as exc:
            log.warning("rooms.jwks_invalid", file=str(self.file), error=str(exc)[:200])

    async def _refetch(self) -> None:
        async with self._lock:
            if self.keys is not None and time.monotonic() - self._fetched_at < 1.0:
                return  # another caller just refetched
            self._fetched_at = time.monotonic()
            if self._client is None:
                self._client = outbound.client(self.policy, httpx.Timeout(FETCH_TIMEOUT))
            try:
                response = await self._client.get(self.url)
                response.raise_for_status()
                self.keys = _key_set(response.json())
                log.info("rooms.jwks_loaded", source="url", keys=len(self.keys.keys))
            except (httpx.HTTPError, ValueError, JoseError, outbound.OutboundRefused) as exc:
                log.warning("rooms.jwks_fetch_failed", url=self.url, error=str(exc)[:200])

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


class Authenticator:
    """Turns an Authorization header into a Principal, or raises InvalidToken (401)."""

    def __init__(self, keys: KeySource, issuer: str = "", audience: str = "") -> None:
        self.keys = keys
        claims: dict[str, Any] = {"sub": {"essential": True}, "exp": {"essential": True}}
        if issuer:
            claims["iss"] = {"essential": True, "value": issuer}
        if audience:
            claims["aud"] = {"essential": True, "value": audience}
        self._claims = jwt.JWTClaimsRegistry(leeway=LEEWAY, **claims)

    async def from_header(self, value: str | None) -> Principal:
        if self.keys.disabled:  # before any token check: nothing a client sends can help
            raise RoomsDisabled("rooms are switched off on this server")
        if not value:
            raise InvalidToken("send Authorization: Bearer <token>")
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise InvalidToken("send Authorization: Bearer <token>")
        return await self.verify(token.strip())

    async def verify(self, token: str) -> Principal:
        if self.keys.disabled:
            raise RoomsDisabled("rooms are switched off on this server")
        if len(token) > MAX_TOKEN_BYTES:
            raise InvalidToken("token too large")
        header = _unverified_header(token)
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in ALGORITHMS:
            raise InvalidToken(f"token algorithm {alg!r} is not accepted")
        if kid is not None and not isinstance(kid, str):
            raise InvalidToken("token kid must be a string")
        keys = await self.keys.current()
        candidates = _candidates(keys, alg, kid)
        if not candidates and kid is not None:
            keys = await self.keys.current(unknown_kid=True)
            candidates = _candidates(keys, alg, kid)
        if not candidates:
            raise InvalidToken("no issuer key matches the token")
        decoded = None
        for key in candidates:
            try:
                decoded = jwt.decode(token, key, algorithms=[alg])
                break
            except JoseError:
                continue
        if decoded is None:
            raise InvalidToken("token signature does not verify")
        try:
            self._claims.validate(decoded.claims)
        except JoseError as exc:
            raise InvalidToken(f"token rejected: {exc.description or exc.error}") from exc
        return _principal(decoded.claims)


def _key_set(document: Any) -> KeySet:
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("a JWKS is an object with a keys list")
    public = [k for k in document["keys"] if isinstance(k, dict) and "d" not in k]
    return KeySet.import_key_set({"keys": public})


def _unverified_header(token: str) -> dict[str, Any]:
    parts = token.split(".")
    if len(parts) != 3:
        raise InvalidToken("token is not a compact JWS")
    try:
        padded = parts[0] + "=" * (-len(parts[0]) % 4)
        header = json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
    except (ValueError, UnicodeError, RecursionError) as exc:  # 6 KB of "[" recurses
        raise InvalidToken("token header is not valid") from exc
    if not isinstance(header, dict):
        raise InvalidToken("token header is not valid")
    return header


def _candidates(keys: KeySet, alg: str, kid: str | None) -> list[Any]:
    kty = KEY_TYPES[alg]
    return [k for k in keys.keys if k.key_type == kty and (kid is None or k.kid == kid)]


def _principal(claims: dict[str, Any]) -> Principal:
    sub = claims.get("sub")
    if not isinstance(sub, str) or not _PARTICIPANT.match(sub):
        raise InvalidToken("token sub is not a valid participant id")
    rooms_claim = claims.get("rooms", [])
    rooms: frozenset[str] | None
    if rooms_claim == "*" or (isinstance(rooms_claim, list) and "*" in rooms_claim):
        rooms = None
    elif isinstance(rooms_claim, list) and all(isinstance(r, str) for r in rooms_claim):
        rooms = frozenset(rooms_claim)
    else:
        raise InvalidToken('token "rooms" must be a list of room ids or "*"')
    roles_claim = claims.get("roles", [])
    if not isinstance(roles_claim, list) or not all(isinstance(r, str) for r in roles_claim):
        raise InvalidToken('token "roles" must be a list of strings')
    exp = claims.get("exp")
    try:
        expires_at = float(exp) if isinstance(exp, int | float) else 0.0
    except OverflowError as exc:  # an int past float range, which joserfc accepts
        raise InvalidToken("token exp is out of range") from exc
    return Principal(sub, rooms, frozenset(roles_claim), expires_at)
