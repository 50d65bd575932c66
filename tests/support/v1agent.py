"""A minimal DIDComm v1 agent for tests: its own ed25519 key, DID Exchange, packing.

Packing uses Dovecote's own v1 envelope module; the ACA-Py interop tests
(tests/interop/test_acapy_*.py) check those envelopes against code we did not write.
"""

from __future__ import annotations

import base64
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx
from aries_askar import Key, KeyAlg

from dovecote.didcomm.v1 import envelope

V1 = "application/didcomm-envelope-enc"


@dataclass
class Special:
    """The v1 tests' server with non-default settings (tests/v1/conftest.py)."""

    server: Any
    push: Any


def msg(type_: str, **body: Any) -> dict[str, Any]:
    return {"@type": f"https://didcomm.org/{type_}", "@id": str(uuid.uuid4()), **body}


@dataclass
class V1Agent:
    base_url: str
    endpoint: str = ""
    key: Key = field(default_factory=lambda: Key.generate(KeyAlg.ED25519))
    mediator_verkey: str = ""
    routing_key: str = ""

    @property
    def verkey(self) -> str:
        return envelope.b58encode(self.key.get_public_bytes())

    @property
    def did(self) -> str:
        return envelope.b58encode(self.key.get_public_bytes()[:16])

    def doc(self) -> dict[str, Any]:
        did = f"did:sov:{self.did}"
        return {
            "@context": "https://w3id.org/did/v1",
            "id": did,
            "publicKey": [
                {
                    "id": f"{did}#1",
                    "type": "Ed25519VerificationKey2018",
                    "controller": did,
                    "publicKeyBase58": self.verkey,
                }
            ],
            "service": [
                {
                    "id": f"{did};indy",
                    "type": "IndyAgent",
                    "priority": 0,
                    "recipientKeys": [self.verkey],
                    "routingKeys": [],
                    "serviceEndpoint": self.endpoint or "didcomm:transport/queue",
                }
            ],
        }

    def pack(self, message: dict[str, Any], to: str | None = None, anon: bool = False) -> bytes:
        return envelope.pack(
            json.dumps(message).encode(), [to or self.mediator_verkey], None if anon else self.key
        )

    def open(self, raw: bytes) -> dict[str, Any]:
        env = envelope.parse(raw)
        assert env is not None, raw[:200]
        opened = envelope.open_envelope(env, {self.verkey: self.key})
        result: dict[str, Any] = json.loads(opened.plaintext)
        return result

    def post(self, message: dict[str, Any], return_route: bool = True, **kw: Any) -> httpx.Response:
        if return_route:
            message["~transport"] = {"return_route": "all"}
        return httpx.post(
            self.base_url + "/",
            content=self.pack(message, **kw),
            headers={"content-type": V1},
            timeout=30,
        )

    def ask(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send with return_route all and open the reply."""
        response = self.post(message)
        assert response.status_code == 200, (response.status_code, response.text[:300])
        assert response.headers["content-type"].startswith(V1)
        return self.open(response.content)

    def connect(self) -> dict[str, Any]:
        """DID Exchange 1.1 with the mediator from its v1 invitation; returns the response."""
        invite = httpx.get(self.base_url + "/invitation/v1", timeout=10).json()
        return self.ask(self.exchange_request(invite))

    def exchange_request(self, invite: dict[str, Any]) -> dict[str, Any]:
        """The DID Exchange 1.1 request answering `invite` (and the mediator's key noted)."""
        key = invite["services"][0]["recipientKeys"][0]
        self.mediator_verkey = envelope.to_verkey(key)
        doc = json.dumps(self.doc()).encode()
        request = msg(
            "didexchange/1.1/request",
            label="test",
            did=self.did,
            **{
                "~thread": {"pthid": invite["@id"]},
                "did_doc~attach": {
                    "@id": "d",
                    "mime-type": "application/json",
                    "data": {"base64": base64.urlsafe_b64encode(doc).decode()},
                },
            },
        )
        return request

    def mediate(self) -> dict[str, Any]:
        grant = self.ask(msg("coordinate-mediation/1.0/mediate-request"))
        assert grant["@type"].endswith("/mediate-grant"), grant
        self.routing_key = envelope.to_verkey(grant["routing_keys"][0])
        return grant

    def add_key(self, key: str) -> dict[str, Any]:
        return self.ask(
            msg(
                "coordinate-mediation/1.0/keylist-update",
                updates=[{"recipient_key": key, "action": "add"}],
            )
        )


def forward_for(
    routing_verkey: str, recipient_verkey: str, text: str, to_form: str = "did:key"
) -> bytes:
    """What a third party sends: an anoncrypted basic message inside an anoncrypted forward."""
    inner = envelope.pack(
        json.dumps(msg("basicmessage/1.0/message", content=text)).encode(), [recipient_verkey], None
    )
    to = envelope.to_did_key(recipient_verkey) if to_form == "did:key" else recipient_verkey
    fwd = msg("routing/1.0/forward", to=to, msg=json.loads(inner))
    return envelope.pack(json.dumps(fwd).encode(), [routing_verkey], None)


def post_raw(base_url: str, body: bytes) -> httpx.Response:
    return httpx.post(base_url + "/", content=body, headers={"content-type": V1}, timeout=30)
