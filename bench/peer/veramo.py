"""Veramo 7 as a DIDComm v2 comparison mediator (bench/peer/veramo/server.mjs).

The mediator is Veramo's own agent (key manager, did:peer provider and resolver,
DIDComm plugin, mediation manager) with Veramo's own message handlers for Coordinate
Mediation 3.0 (`CoordinateMediationV3MediatorMessageHandler`), Routing 2.0
(`RoutingMessageHandler`) and Pickup 3.0 (`PickupMediatorMessageHandler`), behind a
node:http server on loopback. Set-up:

1. `node server.mjs 0` with a fixed mediator key (bench/.cache/veramo-mediator.json, so
   forwards packed for it are cached like Dovecote's);
2. each bench recipient sends mediate-request and recipient-update over HTTP with
   return_route, as it does with Dovecote;
3. the recipients are offline; the load generator sends anoncrypt Routing 2.0 forwards
   (bench/agents.make_forward, the same code and size as Dovecote's) for the mediator's
   key-agreement key.

Veramo's authcrypt does not interoperate with the DIDComm v2 spec as askar, didcomm-rust
and didcomm-messaging implement it (found while building this): did-jwt 8's ECDH-1PU
leaves the content tag out of the key-wrapping KDF (ECDH-1PU draft 3; DIDComm v2 requires
draft 4, whose KDF includes it), and Veramo authcrypts its replies with A256GCM, which
DIDComm v2 does not allow with ECDH-1PU (askar refuses it). So the mediation messages
(authcrypted both ways) go through `VeramoDialect`, which speaks Veramo's variant with
askar's primitives; the forwards are anoncrypt (ECDH-ES), where both agree.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
from aries_askar import AskarError, Key, KeyAlg, ecdh
from didcomm_messaging.crypto.backend.askar import AskarKey, AskarSecretKey
from didcomm_messaging.crypto.base import CryptoServiceError
from didcomm_messaging.crypto.jwe import JweBuilder, JweEnvelope, JweRecipient, b64url
from didcomm_messaging.multiformats import multibase, multicodec

from bench import servers
from bench.agents import _PACKAGING, _RESOLVER, CM3, ENCRYPTED, BenchAgent
from bench.forwards import CACHE
from dovecote.didcomm.packing import DIDCommCrypto

HERE = Path(__file__).resolve().parent / "veramo"
SERVER = HERE / "server.mjs"
MODULES = HERE / "node_modules"
NODE_ARGS: list[str] = []  # e.g. ["--cpu-prof"] to profile the peer


def installed() -> str:
    """Empty when node and the Veramo packages are there, else why not."""
    if shutil.which("node") is None:
        return "node not found (Node.js 20 is needed for the Veramo peer)"
    if not (MODULES / "@veramo" / "did-comm" / "package.json").exists():
        return "Veramo not installed: run `sh bench/peer/install-veramo.sh`"
    return ""


def version() -> str:
    try:
        meta = json.loads((MODULES / "@veramo" / "did-comm" / "package.json").read_text())
        return str(meta["version"])
    except (OSError, ValueError, KeyError):
        return "?"


class VeramoDialect(DIDCommCrypto):
    """Authcrypt as Veramo 7 does it: ECDH-1PU without the tag in the KDF, A256GCM or
    A256CBC-HS512 content. Only for the set-up messages exchanged with the Veramo peer."""

    async def ecdh_1pu_encrypt(
        self, to_keys: Sequence[AskarKey], sender_key: AskarSecretKey, message: bytes
    ) -> bytes:
        builder = JweBuilder(with_flatten_recipients=False)
        alg_id, enc_id = "ECDH-1PU+A256KW", "A256CBC-HS512"
        cek = Key.generate(KeyAlg.A256CBC_HS512)
        epk = Key.generate(sender_key.key.algorithm, ephemeral=True)
        apu = sender_key.kid
        apv = hashlib.sha256(".".join(sorted(k.kid for k in to_keys)).encode()).digest()
        builder.set_protected(
            OrderedDict(
                [
                    ("typ", ENCRYPTED),
                    ("alg", alg_id),
                    ("enc", enc_id),
                    ("apu", b64url(apu)),
                    ("apv", b64url(apv)),
                    ("epk", json.loads(epk.get_jwk_public())),
                    ("skid", sender_key.kid),
                ]
            )
        )
        payload = cek.aead_encrypt(message, aad=builder.protected_bytes)
        builder.set_payload(payload.ciphertext, payload.nonce, payload.tag)
        for recip_key in to_keys:
            wrapped = ecdh.Ecdh1PU(alg_id, apu, apv).sender_wrap_key(
                KeyAlg.A256KW, epk, sender_key.key, recip_key.key, cek, cc_tag=b""
            )
            builder.add_recipient(
                JweRecipient(encrypted_key=wrapped.ciphertext, header={"kid": recip_key.kid})
            )
        return bytes(builder.build().to_json().encode())

    async def ecdh_1pu_decrypt(
        self, enc_message: str | bytes, recip_key: AskarSecretKey, sender_key: AskarKey
    ) -> bytes:
        wrapper = JweEnvelope.from_json(enc_message)
        alg_id = str(wrapper.protected.get("alg"))
        enc_alg = {"A256GCM": KeyAlg.A256GCM, "A256CBC-HS512": KeyAlg.A256CBC_HS512}.get(
            str(wrapper.protected.get("enc"))
        )
        recip = wrapper.get_recipient(recip_key.kid)
        if enc_alg is None or recip is None or not alg_id.startswith("ECDH-1PU+"):
            raise CryptoServiceError(f"not a Veramo authcrypt for {recip_key.kid}")
        epk = Key.from_jwk(recip.header.get("epk") or wrapper.protected["epk"])
        try:
            cek = ecdh.Ecdh1PU(
                alg_id, _header(wrapper, "apu"), _header(wrapper, "apv")
            ).receiver_unwrap_key(
                alg_id[9:],
                enc_alg,
                epk,
                sender_key.key,
                recip_key.key,
                recip.encrypted_key,
                cc_tag=b"",
            )
            plain = cek.aead_decrypt(
                wrapper.ciphertext, nonce=wrapper.iv, tag=wrapper.tag, aad=wrapper.combined_aad
            )
        except AskarError as exc:
            raise CryptoServiceError("Veramo authcrypt did not decrypt") from exc
        return bytes(plain)


def _header(wrapper: JweEnvelope, name: str) -> bytes:
    """apu/apv: optional in Veramo's envelopes (absent means empty in the KDF)."""
    value = wrapper.protected.get(name)
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)) if value else b""


_DIALECT = VeramoDialect()


async def _call(
    client: httpx.AsyncClient,
    url: str,
    agent: BenchAgent,
    mediator: str,
    msg_type: str,
    body: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One return-routed request, authcrypted in Veramo's dialect; the unpacked reply."""
    plain = json.dumps(agent.message(msg_type, mediator, body), separators=(",", ":")).encode()
    packed = await _PACKAGING.pack(_DIALECT, _RESOLVER, agent.secrets, plain, [mediator], agent.did)
    response = await client.post(url, content=bytes(packed), headers={"content-type": ENCRYPTED})
    if response.status_code != 200:
        raise RuntimeError(f"{msg_type}: HTTP {response.status_code} {response.text[:300]}")
    reply: dict[str, Any] = json.loads(await _unpack(agent, response.content))
    return reply


async def _unpack(agent: BenchAgent, raw: bytes) -> bytes:
    """A Veramo authcrypt reply (its protected header has no apv, which didcomm-messaging's
    unpack requires, so the envelope is opened here)."""
    wrapper = JweEnvelope.from_json(raw)
    skid = str(wrapper.protected["skid"])
    did, _, fragment = skid.partition("#")
    doc = await _RESOLVER.resolve(did)
    method = next(vm for vm in doc["verificationMethod"] if vm["id"] in (f"#{fragment}", skid))
    _codec, public = multicodec.unwrap(multibase.decode(method["publicKeyMultibase"]))
    sender = AskarKey(Key.from_public_bytes(KeyAlg.X25519, public), skid)
    for recipient in wrapper.recipients:
        secret = await agent.secrets.get_secret_by_kid(recipient.header["kid"])
        if secret is not None:
            return await _DIALECT.ecdh_1pu_decrypt(raw, secret, sender)
    raise CryptoServiceError("no recipient key of ours in the Veramo reply")


async def mediate(
    client: httpx.AsyncClient, url: str, agent: BenchAgent, mediator: str
) -> dict[str, Any]:
    """CM 3.0 with Veramo: mediate-request, then recipient-update adding the agent's DID."""
    grant = await _call(client, url, agent, mediator, f"{CM3}/mediate-request")
    if not grant.get("type", "").endswith("/mediate-grant"):
        raise RuntimeError(f"mediation not granted: {grant}")
    update = await _call(
        client,
        url,
        agent,
        mediator,
        f"{CM3}/recipient-update",
        {"updates": [{"recipient_did": agent.did, "action": "add"}]},
    )
    # CM 3.0 names the list `updated`; Veramo 7 answers with `updates`.
    results = (update.get("body") or {}).get("updated") or (update.get("body") or {}).get(
        "updates", []
    )
    if not results or results[0].get("result") not in ("success", "no_change"):
        raise RuntimeError(f"recipient-update failed: {update}")
    return update


def _seeds() -> dict[str, str]:
    CACHE.mkdir(exist_ok=True)
    path = CACHE / "veramo-mediator.json"
    if not path.exists():
        path.write_text(
            json.dumps({"auth": secrets.token_hex(32), "agreement": secrets.token_hex(32)})
        )
    seeds: dict[str, str] = json.loads(path.read_text())
    return seeds


class VeramoMediator:
    """`node server.mjs` on a free loopback port; stopped by stop()."""

    def __init__(self, work: Path, store: str = "memory") -> None:
        self.work, self.store = work, store
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.did = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 60.0) -> VeramoMediator:
        seeds = _seeds()
        self.port = servers.free_port()
        log = self.work / "veramo.log"
        self.proc = subprocess.Popen(
            ["node", *NODE_ARGS, str(SERVER), str(self.port)],
            env={
                **os.environ,
                "VERAMO_AUTH_KEY": seeds["auth"],
                "VERAMO_AGREEMENT_KEY": seeds["agreement"],
                "VERAMO_STORE": self.store,
            },
            stdout=open(log, "ab"),
            stderr=subprocess.STDOUT,
            cwd=HERE,
            preexec_fn=servers.server_preexec,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"Veramo exited {self.proc.returncode}: {log.read_text()[-2000:]}"
                )
            try:
                self.did = str(httpx.get(self.url, timeout=1).json()["did"])
                return self
            except (httpx.HTTPError, ValueError, KeyError):
                time.sleep(0.2)
        raise RuntimeError(f"Veramo not ready in {timeout:.0f}s")

    def state(self) -> dict[str, Any]:
        """What the server counts: forwards queued (Veramo's queue-message records)."""
        data: dict[str, Any] = httpx.get(self.url, timeout=10).json()
        return data

    def stop(self) -> None:
        servers.stop_process(self.proc)


async def agreement_kid(did: str) -> str:
    """The key id a sender encrypts to: the first keyAgreement entry of the resolved doc."""
    doc = await _RESOLVER.resolve(did)
    kid = str(doc["keyAgreement"][0])
    return did + kid if kid.startswith("#") else kid
