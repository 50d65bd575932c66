"""A DIDComm agent for tests, built on SICPA's `didcomm` library (not Dovecote's stack).

Dovecote packs and unpacks with didcomm-messaging/askar; driving it with an independent
implementation is what proves interoperability. The only glue here is a DID resolver
adapter: `didcomm` wants its own DIDDoc type, so did:peer:2 documents (resolved with the
`did_peer_2` reference library) are converted field by field.
"""

from __future__ import annotations

import base64
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx
from did_peer_2 import KeySpec, generate, resolve
from didcomm.common.resolvers import ResolversConfig
from didcomm.common.types import (
    VerificationMaterial,
    VerificationMaterialFormat,
    VerificationMethodType,
)
from didcomm.did_doc.did_doc import DIDCommService, DIDDoc, VerificationMethod
from didcomm.did_doc.did_resolver import DIDResolver
from didcomm.message import Attachment, AttachmentDataJson, Message
from didcomm.pack_encrypted import PackEncryptedConfig, pack_encrypted
from didcomm.protocols.routing.forward import wrap_in_forward
from didcomm.secrets.secrets_resolver import Secret
from didcomm.secrets.secrets_resolver_in_memory import SecretsResolverInMemory
from didcomm.secrets.secrets_util import (
    generate_ed25519_keys_as_jwk_dict,
    generate_x25519_keys_as_jwk_dict,
    jwk_to_secret,
)
from didcomm.unpack import unpack

CM2 = "https://didcomm.org/coordinate-mediation/2.0"
CM3 = "https://didcomm.org/coordinate-mediation/3.0"
PICKUP = "https://didcomm.org/messagepickup/3.0"
ROUTING = "https://didcomm.org/routing/2.0"
PING = "https://didcomm.org/trust-ping/2.0"
DISCOVER = "https://didcomm.org/discover-features/2.0"
BASIC = "https://didcomm.org/basicmessage/2.0/message"
ENCRYPTED = "application/didcomm-encrypted+json"


def _b58(data: bytes) -> str:
    import base58

    return str(base58.b58encode(data).decode())


def _multikey(prefix: bytes, jwk: dict[str, Any]) -> str:
    raw = base64.urlsafe_b64decode(jwk["x"] + "=" * (-len(jwk["x"]) % 4))
    return "z" + _b58(prefix + raw)


def _raw_from_multikey(multikey: str) -> tuple[str, bytes]:
    import base58

    data = base58.b58decode(multikey[1:])
    if data[:2] == b"\xed\x01":
        return "Ed25519", data[2:]
    if data[:2] == b"\xec\x01":
        return "X25519", data[2:]
    raise ValueError("unsupported multikey")


# didcomm (the reference implementation) ships no py.typed: to mypy its classes are Any.
class PeerResolver(DIDResolver):  # type: ignore[misc]
    """did:peer:2 -> didcomm.DIDDoc (JWK verification material)."""

    async def resolve(self, did: str) -> DIDDoc | None:
        if not did.startswith("did:peer:2"):
            return None
        doc = resolve(did)
        methods: list[VerificationMethod] = []
        for vm in doc["verificationMethod"]:
            crv, raw = _raw_from_multikey(vm["publicKeyMultibase"])
            jwk = {
                "kty": "OKP",
                "crv": crv,
                "x": base64.urlsafe_b64encode(raw).decode().rstrip("="),
            }
            vm_id = vm["id"] if vm["id"].startswith("did:") else did + vm["id"]
            jwk["kid"] = vm_id
            methods.append(
                VerificationMethod(
                    id=vm_id,
                    type=VerificationMethodType.JSON_WEB_KEY_2020,
                    controller=did,
                    verification_material=VerificationMaterial(
                        format=VerificationMaterialFormat.JWK, value=json.dumps(jwk)
                    ),
                )
            )

        def absolute(ref: str) -> str:
            return ref if ref.startswith("did:") else did + ref

        services = []
        for i, svc in enumerate(doc.get("service", [])):
            endpoint = svc["serviceEndpoint"]
            if isinstance(endpoint, list):
                endpoint = endpoint[0]
            uri = endpoint["uri"] if isinstance(endpoint, dict) else endpoint
            keys = endpoint.get("routingKeys", []) if isinstance(endpoint, dict) else []
            services.append(
                DIDCommService(
                    id=absolute(svc.get("id", f"#service-{i}")),
                    service_endpoint=uri,
                    routing_keys=keys,
                    accept=["didcomm/v2"],
                )
            )
        return DIDDoc(
            did=did,
            key_agreement_kids=[absolute(k) for k in doc.get("keyAgreement", [])],
            authentication_kids=[absolute(k) for k in doc.get("authentication", [])],
            verification_methods=methods,
            didcomm_services=services,
        )


@dataclass
class Agent:
    """An edge agent: keys, a did:peer:2, and helpers to talk to a mediator."""

    base_url: str
    mediator_did: str = ""
    did: str = ""
    secrets: list[Secret] = field(default_factory=list)
    routing_keys: list[str] = field(default_factory=list)
    service_uri: str = ""

    @classmethod
    def create(
        cls,
        base_url: str,
        mediator_did: str = "",
        via_mediator: bool = False,
        endpoint: str = "",
        endpoint_routing_keys: list[str] | None = None,
    ) -> Agent:
        """A new identity; with via_mediator its DID doc routes through the mediator, with
        `endpoint` it names its own DIDComm endpoint (behind `endpoint_routing_keys`)."""
        ed_priv, ed_pub = generate_ed25519_keys_as_jwk_dict()
        x_priv, x_pub = generate_x25519_keys_as_jwk_dict()
        services: list[dict[str, Any]] = []
        agent = cls(base_url=base_url, mediator_did=mediator_did)
        if endpoint:
            agent.service_uri = endpoint
            agent.routing_keys = list(endpoint_routing_keys or [])
            service: dict[str, Any] = {"uri": endpoint, "accept": ["didcomm/v2"]}
            if agent.routing_keys:
                service["routingKeys"] = agent.routing_keys
            services = [{"type": "DIDCommMessaging", "serviceEndpoint": service}]
        elif via_mediator:
            agent.service_uri = base_url + "/"
            agent.routing_keys = [f"{mediator_did}#key-2"]
            services = [
                {
                    "type": "DIDCommMessaging",
                    "serviceEndpoint": {
                        "uri": agent.service_uri,
                        "accept": ["didcomm/v2"],
                        "routingKeys": agent.routing_keys,
                    },
                }
            ]
        did = str(
            generate(
                [
                    KeySpec.verification(_multikey(b"\xed\x01", ed_pub)),
                    KeySpec.key_agreement(_multikey(b"\xec\x01", x_pub)),
                ],
                services,
            )
        )
        agent.did = did
        ed_priv["kid"] = f"{did}#key-1"
        x_priv["kid"] = f"{did}#key-2"
        agent.secrets = [jwk_to_secret(ed_priv), jwk_to_secret(x_priv)]
        return agent

    @property
    def resolvers(self) -> ResolversConfig:
        return ResolversConfig(
            secrets_resolver=SecretsResolverInMemory(self.secrets),
            did_resolver=PeerResolver(),
        )

    def message(
        self,
        msg_type: str,
        body: dict[str, Any] | None = None,
        return_route: bool = True,
        **extra: Any,
    ) -> Message:
        headers = [{"return_route": "all"}] if return_route else None
        return Message(
            id=str(uuid.uuid4()),
            type=msg_type,
            body=body or {},
            frm=self.did,
            to=[self.mediator_did],
            custom_headers=headers,
            **extra,
        )

    async def pack(self, message: Message, anonymous: bool = False) -> str:
        result = await pack_encrypted(
            self.resolvers,
            message,
            to=self.mediator_did,
            frm=None if anonymous else self.did,
            pack_config=PackEncryptedConfig(forward=False),
        )
        return str(result.packed_msg)

    async def unpack(self, packed: str | bytes) -> dict[str, Any]:
        if isinstance(packed, bytes):
            packed = packed.decode()
        result = await unpack(self.resolvers, packed)
        return dict(result.message.as_dict())

    async def send_http(
        self, client: httpx.AsyncClient, message: Message, anonymous: bool = False
    ) -> tuple[int, dict[str, Any] | None]:
        """POST a message; return the status and the unpacked reply (if any)."""
        packed = await self.pack(message, anonymous)
        response = await client.post(
            self.base_url + "/", content=packed, headers={"content-type": ENCRYPTED}
        )
        if response.status_code in (200, 202) and not response.content:
            return response.status_code, None
        if response.headers.get("content-type", "").startswith(ENCRYPTED):
            return response.status_code, await self.unpack(response.text)
        return response.status_code, response.json() if response.content else None

    async def request(
        self, client: httpx.AsyncClient, msg_type: str, body: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        status, reply = await self.send_http(client, self.message(msg_type, body))
        assert reply is not None, f"no reply to {msg_type} (HTTP {status})"
        return reply

    async def mediate(self, client: httpx.AsyncClient, version: str = CM3) -> dict[str, Any]:
        """mediate-request, then register this agent's own DID as a recipient."""
        grant = await self.request(client, f"{version}/mediate-request")
        assert grant["type"].endswith("mediate-grant"), grant
        name = "recipient-update" if version == CM3 else "keylist-update"
        update = await self.request(
            client, f"{version}/{name}", {"updates": [{"recipient_did": self.did, "action": "add"}]}
        )
        assert update["body"]["updated"][0]["result"] in ("success", "no_change"), update
        return grant


async def forward_to(
    sender_base_url: str, recipient: Agent, plaintext: dict[str, Any], sender: Agent | None = None
) -> str:
    """What any third party does: encrypt for the recipient, wrap in a forward for its
    mediator (via the recipient's routing keys), and return the packed envelope."""
    resolvers = (sender or Agent.create(sender_base_url)).resolvers
    message = Message(
        id=plaintext.get("id", str(uuid.uuid4())),
        type=plaintext["type"],
        body=plaintext.get("body", {}),
        to=[recipient.did],
        frm=sender.did if sender else None,
    )
    result = await pack_encrypted(
        resolvers, message, to=recipient.did, frm=sender.did if sender else None
    )
    return str(result.packed_msg)


async def manual_forward(
    resolvers: ResolversConfig, inner: dict[str, Any], next_did: str, mediator_kid: str
) -> str:
    """A forward built by the library's own wrap_in_forward (for custom inner payloads)."""
    wrapped = await wrap_in_forward(
        resolvers_config=resolvers, packed_msg=inner, to=next_did, routing_keys=[mediator_kid]
    )
    assert wrapped is not None
    return json.dumps(wrapped.msg_encrypted.msg)


def plain_forward_message(next_did: str, payload: dict[str, Any]) -> Message:
    """A forward plaintext carrying an arbitrary attachment (for bad-input tests)."""
    return Message(
        id=str(uuid.uuid4()),
        type=f"{ROUTING}/forward",
        body={"next": next_did},
        attachments=[Attachment(data=AttachmentDataJson(json=payload))],
    )
