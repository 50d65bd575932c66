"""Anonymous relay flood (issue 13 point 4): how much one client can park in the outbox.

One client sends anonymous forwards for a DID that is not registered here and names a
remote endpoint (a closed loopback port, so nothing drains), as fast as it can for
DURATION seconds, with CONCURRENCY requests in flight. Two payload kinds:

    base64   random bytes as a base64 attachment (the attack as reported)
    jwe      the same bytes inside a JWE-shaped attachment (passes the JWE-only rule,
             so the quotas are what stop it)

Prints the answers by status and what the outbox holds afterwards (items, bytes).

    PYTHONPATH=src .venv/bin/python -m bench.relay_flood --duration 20 --kind base64
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import sqlite3
import time
import uuid
from collections import Counter
from typing import Any

import httpx
from aries_askar import Key, KeyAlg

from bench.agents import _ANON, ENCRYPTED, FORWARD, PLAINTEXT
from bench.servers import Dovecote, free_port, workdir
from dovecote.didcomm.peer import peer_did


def remote_did(endpoint: str) -> str:
    """A did:peer:2 whose only DIDComm service is `endpoint`."""
    signing, agreement = Key.generate(KeyAlg.ED25519), Key.generate(KeyAlg.X25519)
    service = {
        "type": "DIDCommMessaging",
        "serviceEndpoint": {"uri": endpoint, "accept": ["didcomm/v2"]},
    }
    return peer_did(signing, agreement, [service])


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def attachment(kind: str, size: int) -> dict[str, Any]:
    noise = os.urandom(size)
    if kind == "base64":
        return {"id": uuid.uuid4().hex, "data": {"base64": _b64(noise)}}
    jwe = {
        "protected": _b64(json.dumps({"enc": "A256GCM", "alg": "ECDH-ES+A256KW"}).encode()),
        "recipients": [
            {"header": {"kid": "did:example:x#key-2"}, "encrypted_key": _b64(os.urandom(40))}
        ],
        "iv": _b64(os.urandom(12)),
        "ciphertext": _b64(noise),
        "tag": _b64(os.urandom(16)),
    }
    return {"id": uuid.uuid4().hex, "media_type": ENCRYPTED, "data": {"json": jwe}}


async def forward(mediator: str, next_did: str, kind: str, size: int) -> bytes:
    message = {
        "id": str(uuid.uuid4()),
        "typ": PLAINTEXT,
        "type": FORWARD,
        "to": [mediator],
        "body": {"next": next_did},
        "attachments": [attachment(kind, size)],
    }
    return await _ANON.pack(message, f"{mediator}#key-2")


async def flood(
    base_url: str,
    mediator: str,
    next_did: str,
    kind: str,
    size: int,
    duration: float,
    concurrency: int,
) -> Counter[int]:
    statuses: Counter[int] = Counter()
    deadline = time.monotonic() + duration

    async def worker(client: httpx.AsyncClient) -> None:
        while time.monotonic() < deadline:
            body = await forward(mediator, next_did, kind, size)
            response = await client.post(
                base_url + "/", content=body, headers={"content-type": ENCRYPTED}
            )
            statuses[response.status_code] += 1

    async with httpx.AsyncClient(timeout=30) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return statuses


def outbox(db: str) -> tuple[int, int]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        count, size = conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(length(payload)), 0) FROM outbox WHERE kind = 'forward'"
        ).fetchone()
    return int(count), int(size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--size", type=int, default=25_000, help="attachment bytes")
    parser.add_argument("--kind", choices=["base64", "jwe"], default="base64")
    args = parser.parse_args()
    with workdir("relay-flood") as work:
        # The "remote" endpoint is a closed port on loopback, allowed as if it were public.
        server = Dovecote(
            work,
            env={
                "DOVECOTE_OUTBOUND_ALLOW_PRIVATE": "true",
                "DOVECOTE_OUTBOUND_ALLOW_NETWORKS": "127.0.0.0/8",
            },
        )
        server.start()
        try:
            mediator = server.did()
            target = remote_did(f"http://127.0.0.1:{free_port()}/inbox")
            started = time.monotonic()
            statuses = asyncio.run(
                flood(
                    server.base_urls[0],
                    mediator,
                    target,
                    args.kind,
                    args.size,
                    args.duration,
                    args.concurrency,
                )
            )
            took = time.monotonic() - started
            items, size = outbox(str(server.db_path))
        finally:
            server.stop()
    print(
        json.dumps(
            {
                "kind": args.kind,
                "seconds": round(took, 1),
                "answers": dict(sorted(statuses.items())),
                "outbox_items": items,
                "outbox_mb": round(size / 1e6, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
