"""The client's keys and DIDs, kept in `DATA_DIR/identity.json` (mode 0600).

One Ed25519 + X25519 key pair serves two did:peer:2 DIDs:

- the *base* DID (no service) authenticates the client to its mediator;
- the *routed* DID, made once mediation is granted, carries a DIDCommMessaging service
  that sends everyone else's messages through the mediator. This is the DID to share.

Both DIDs name the same keys, so messages to either decrypt with the same secret.
"""

from __future__ import annotations

import base64
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aries_askar import Key, KeyAlg

from dovecote.client.errors import NotInitialised
from dovecote.didcomm.peer import peer_did
from dovecote.files import write_private

IDENTITY_FILE = "identity.json"


@dataclass
class Mediation:
    """A mediation grant: who mediates and how others reach this client through it."""

    mediator_did: str
    routed_did: str
    endpoints: list[str]  # the mediator's http(s) endpoints, from its DID document
    ws_endpoints: list[str]  # the mediator's ws(s) endpoints
    granted_at: float = field(default_factory=time.time)
    # DIDs registered there besides routed_did (add_recipients), re-registered on a switch.
    recipients: list[str] = field(default_factory=list)


@dataclass
class ClientIdentity:
    """Keys, the base DID, and the mediation grant (if any)."""

    signing_key: Key
    agreement_key: Key
    did: str
    mediation: Mediation | None = None

    @property
    def dids(self) -> list[str]:
        """Every DID whose messages this client can decrypt."""
        return [self.did] + ([self.mediation.routed_did] if self.mediation else [])

    @property
    def public_did(self) -> str:
        """The DID to hand out: the routed one once mediated, else the base one."""
        return self.mediation.routed_did if self.mediation else self.did


def make_did(signing_key: Key, agreement_key: Key, services: list[dict[str, Any]]) -> str:
    """A did:peer:2 with the two keys (#key-1 signing, #key-2 agreement) and `services`."""
    return peer_did(signing_key, agreement_key, services)


def routed_service(mediator_did: str, endpoint: str, form: str) -> dict[str, Any]:
    """The DIDCommMessaging service that sends messages through the mediator."""
    if form == "mediator-did":
        endpoint_obj: dict[str, Any] = {
            "uri": mediator_did,
            "accept": ["didcomm/v2"],
            "routingKeys": [],
        }
    else:
        endpoint_obj = {
            "uri": endpoint,
            "accept": ["didcomm/v2"],
            "routingKeys": [f"{mediator_did}#key-2"],
        }
    return {"type": "DIDCommMessaging", "serviceEndpoint": endpoint_obj}


def create(data_dir: Path, overwrite: bool = False) -> ClientIdentity:
    """New keys and base DID, written to `data_dir` (refuses to replace keys unless told)."""
    path = data_dir / IDENTITY_FILE
    if path.exists() and not overwrite:
        return load(data_dir)
    signing = Key.generate(KeyAlg.ED25519)
    agreement = Key.generate(KeyAlg.X25519)
    ident = ClientIdentity(signing, agreement, make_did(signing, agreement, []))
    save(data_dir, ident)
    return ident


def load(data_dir: Path) -> ClientIdentity:
    """The identity in `data_dir`; NotInitialised when there is none."""
    path = data_dir / IDENTITY_FILE
    if not path.exists():
        raise NotInitialised(f"no {IDENTITY_FILE} in {data_dir}; run `dovecote-client init`")
    stored = json.loads(path.read_text())
    mediation = Mediation(**stored["mediation"]) if stored.get("mediation") else None
    return ClientIdentity(
        Key.from_secret_bytes(KeyAlg.ED25519, base64.b64decode(stored["ed25519"])),
        Key.from_secret_bytes(KeyAlg.X25519, base64.b64decode(stored["x25519"])),
        stored["did"],
        mediation,
    )


def save(data_dir: Path, ident: ClientIdentity) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(data_dir, 0o700)
    stored: dict[str, Any] = {
        "did": ident.did,
        "ed25519": base64.b64encode(ident.signing_key.get_secret_bytes()).decode(),
        "x25519": base64.b64encode(ident.agreement_key.get_secret_bytes()).decode(),
        "mediation": ident.mediation.__dict__ if ident.mediation else None,
    }
    write_private(data_dir / IDENTITY_FILE, json.dumps(stored, indent=2))
