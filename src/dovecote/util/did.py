"""DIDs as identities: the base DID of a DID URL, and the checks every DID from a client
passes before anything resolves, parses, stores or caches it.

DID Core (section 3.2) defines a DID URL as `did path-abempty [ "?" query ] [ "#" fragment ]`,
and a DID's method-specific id may contain none of "/", "?" or "#". So the DID a DID URL
names is everything before the first of them, whatever the method; the rest only selects
a part of that DID's document (a key, a service) and never makes another identity.
"""

from __future__ import annotations

import re

DEFAULT_MAX_DID_BYTES = 4096

_URL_PART = re.compile(r"[/?#]")


def base_did(value: str) -> str:
    """The DID a DID URL names (`did:x:y#key-1` -> `did:x:y`); other strings unchanged."""
    if not value.startswith("did:"):
        return value  # a raw key (DIDComm v1 verkey): no DID URL syntax to strip
    match = _URL_PART.search(value, 4)
    return value if match is None else value[: match.start()]


def did_problem(value: object, max_bytes: int = DEFAULT_MAX_DID_BYTES) -> str | None:
    """Why `value` cannot be a DID from a client, or None when it may be one.

    Checked in this order so the cheap length test runs first on multi-megabyte input;
    NUL (PostgreSQL text refuses it) and lone surrogates (not encodable as UTF-8) are
    refused here so that no store ever sees them.
    """
    if not isinstance(value, str):
        return "is not a string"
    if len(value) > max_bytes:  # characters <= UTF-8 bytes: a quick upper check first
        return f"is longer than {max_bytes} bytes"
    try:
        encoded = value.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid Unicode (lone surrogate)"
    if len(encoded) > max_bytes:
        return f"is longer than {max_bytes} bytes"
    if "\x00" in value:
        return "contains NUL"
    if not value.startswith("did:") or value.count(":") < 2:
        return "is not a DID"
    return None


def storable(text: str) -> bool:
    """True when every store can hold `text` as is: no NUL (PostgreSQL text refuses it)
    and no lone surrogate (not encodable as UTF-8). Callers validate first; the stores
    check again so that an unvalidated path answers "unknown" rather than a driver error.
    """
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
