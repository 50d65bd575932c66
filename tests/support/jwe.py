"""Reading an envelope's protected header without decrypting it."""

from __future__ import annotations

import base64
import json
from typing import Any

ENCRYPTED = "application/didcomm-encrypted+json"


def protected_header(envelope: str | bytes | dict[str, Any]) -> dict[str, Any]:
    """The decoded `protected` member of a general-JSON JWE."""
    jwe = envelope if isinstance(envelope, dict) else json.loads(envelope)
    text = jwe["protected"]
    header: dict[str, Any] = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    return header


def assert_encrypted_typ(envelope: str | bytes | dict[str, Any], alg_prefix: str) -> None:
    """The envelope names the DIDComm v2 encrypted media type and the expected algorithm."""
    header = protected_header(envelope)
    assert header.get("typ") == ENCRYPTED, header
    assert str(header.get("alg", "")).startswith(alg_prefix), header
