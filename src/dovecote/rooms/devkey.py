"""A development token issuer for rooms, so that rooms work before a real issuer exists.

When no issuer JWKS is configured, the server keeps an Ed25519 key in
DATA_DIR/rooms-dev-key.json (mode 0600, created once, like the mediator's keys) and
accepts tokens it signs; `dovecote rooms token` signs them. Anyone who can read the data
directory can mint tokens, which is no more than they could do to the store itself.
Configuring DOVECOTE_ROOMS_JWKS_FILE or _URL turns this off.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from joserfc import jwt
from joserfc.jwk import KeySet, OKPKey

from dovecote.files import write_private

DEV_KEY_FILE = "rooms-dev-key.json"
ALGORITHM = "Ed25519"
DEFAULT_TTL = 24 * 3600.0


def key_path(data_dir: Path) -> Path:
    return data_dir / DEV_KEY_FILE


def load_or_create(data_dir: Path) -> OKPKey:
    """The development signing key, created on first use (O_EXCL: one writer wins)."""
    path = key_path(data_dir)
    if not path.exists():
        key = OKPKey.generate_key("Ed25519", private=True)
        document = {**key.as_dict(private=True), "kid": "dev-" + key.thumbprint()[:16]}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        write_private(tmp, json.dumps(document, indent=2))
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    return OKPKey.import_key(json.loads(path.read_text()))


def public_keys(key: OKPKey) -> KeySet:
    return KeySet.import_key_set({"keys": [{**key.as_dict(private=False), "kid": str(key.kid)}]})


def issue(
    key: OKPKey,
    user: str,
    rooms: list[str],
    roles: list[str] | None = None,
    ttl: float = DEFAULT_TTL,
    issuer: str = "",
    audience: str = "",
) -> str:
    """A compact JWT the server's rooms API accepts while it uses this key."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": user,
        "rooms": rooms,
        "roles": roles or [],
        "iat": now,
        "exp": now + int(ttl),
    }
    if issuer:
        claims["iss"] = issuer
    if audience:
        claims["aud"] = audience
    return jwt.encode(
        {"alg": ALGORITHM, "kid": key.kid, "typ": "JWT"}, claims, key, algorithms=[ALGORITHM]
    )
