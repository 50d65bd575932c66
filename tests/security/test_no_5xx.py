"""No 5xx from any input (issue 13.6), on both store engines.

Deep JSON, non-UTF-8 header bytes, NUL and lone surrogates in DIDs, malformed admin
parameters: each gets a 4xx with the usual JSON body (or, for an authenticated DIDComm
request, a problem report), a log line, a metric, and nothing stored. PostgreSQL refuses
NUL in text; its error text must never reach a client.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from security.flood import (
    AnonPacker,
    authcrypt,
    forward_message,
    peer_did,
    unpack_reply,
)
from support.agent import CM2, CM3, PICKUP
from support.inspect import metric_value, snapshot
from support.postgres import ENGINES
from support.server import ServerProcess, running_server

TOKEN = "t" * 40
ENCRYPTED = "application/didcomm-encrypted+json"
# Text that must never appear in an answer: driver and database error vocabulary.
LEAKS = (
    "asyncpg",
    "sqlite",
    "postgres",
    "syntax error",
    "invalid byte sequence",
    "null character",
    "0x00",
    "Traceback",
    "UnicodeEncodeError",
    "RecursionError",
)
NUL_DIDS = ["did:example:nul\x00inside", "did:example:\udc80lone", "did:\x00:x"]


@pytest.fixture(scope="module", params=ENGINES)
def hostile(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    env = {
        "DOVECOTE_ADMIN_TOKEN": TOKEN,
        "DOVECOTE_RATE_LIMIT_IP": "100000",
        "DOVECOTE_RATE_LIMIT_IP_BURST": "100000",
    }
    with running_server(tmp_path_factory.mktemp("no5xx"), request.param, env) as server:
        yield server


def _no_leak(text: str) -> None:
    lowered = text.lower()
    for word in LEAKS:
        assert word.lower() not in lowered, (word, text[:300])


async def _raw(server: ServerProcess, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
    """One HTTP/1.1 request written byte for byte (httpx refuses non-ASCII headers)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(
            head.replace(b"\n", b"\r\n")
            + b"\r\n"
            + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()
    status = int(data.split(b" ", 2)[1])
    return status, data.split(b"\r\n\r\n", 1)[1]


HEADER_CASES = {
    "request-id-not-utf8": b"POST / HTTP/1.1\nHost: x\nX-Request-Id: \xff\xfe\x80\n"
    b"Content-Type: application/didcomm-encrypted+json",
    "content-type-not-utf8": b"POST / HTTP/1.1\nHost: x\nContent-Type: \xff\xfeplain",
    "admin-token-not-utf8": b"GET /admin/dlq HTTP/1.1\nHost: x\nAuthorization: Bearer \xff\xfe",
    "health-auth-not-utf8": b"GET /health HTTP/1.1\nHost: x\nAuthorization: Bearer \xc3\x28",
    "rooms-token-not-utf8": b"GET /v1/rooms HTTP/1.1\nHost: x\nAuthorization: Bearer \xff",
    "forwarded-for-not-utf8": b"POST / HTTP/1.1\nHost: x\nX-Forwarded-For: \xff\xfe\n"
    b"Content-Type: application/didcomm-encrypted+json",
}


@pytest.mark.parametrize("case", list(HEADER_CASES))
async def test_non_utf8_headers_get_4xx_json(hostile: ServerProcess, case: str) -> None:
    before = snapshot(hostile)
    status, body = await _raw(hostile, HEADER_CASES[case], b'{"not": "a jwe"}')
    assert 400 <= status < 500, (status, body[:300])
    payload = json.loads(body)
    assert isinstance(payload.get("error"), str) and payload.get("detail"), payload
    _no_leak(body.decode("utf-8", "replace"))
    assert snapshot(hostile) == before


async def test_deep_json_everywhere_gets_4xx(hostile: ServerProcess) -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    async with httpx.AsyncClient(timeout=60) as client:
        before = snapshot(hostile)
        posts = [
            (hostile.base_url + "/", {"content-type": ENCRYPTED}),
            (hostile.base_url + "/admin/dlq/replay", {"authorization": f"Bearer {TOKEN}"}),
            (hostile.base_url + "/admin/degradation", {"authorization": f"Bearer {TOKEN}"}),
        ]
        for url, headers in posts:
            response = await client.post(url, content=deep, headers=headers)
            assert 400 <= response.status_code < 500, (url, response.status_code)
            assert response.json()["error"], url
            _no_leak(response.text)
        assert snapshot(hostile) == before


# (path, status): 200 where the parameter is harmless (clamped, ignored, or decoded by
# the URL parser into replacement characters, which are ordinary text).
ADMIN_GETS = [
    ("/admin/dlq?limit=%C2%B2", 400),
    ("/admin/dlq?limit=abc", 400),
    ("/admin/dlq?offset=-1", 400),
    ("/admin/dlq?offset=99999999999999999999999999", 200),
    ("/admin/dlq?kind=%00", 400),
    ("/admin/dlq?target=a%00b", 400),
    ("/admin/dlq?reason=%ED%A0%80", 200),
    ("/admin/dlq?target=%FF%FE", 200),
    ("/admin/dlq?limit=" + "9" * 40, 400),
    ("/admin/dlq/99999999999999999999999999", 404),
    ("/admin/mailboxes?limit=%00", 200),
    ("/admin/targets?x=%00", 200),
]
ADMIN_POSTS = [
    ("/admin/dlq/replay", b'{"ids": [100000000000000000000000000000]}', 400),
    ("/admin/dlq/replay", b'{"ids": [1], "target": "a\\u0000b"}', 400),
    ("/admin/dlq/replay", b'{"all": true, "target": "\\ud800"}', 400),
    ("/admin/dlq/purge", b'{"ids": [-100000000000000000000000000000]}', 400),
    ("/admin/dlq/purge", b'{"older_than_seconds": 1e400}', 400),
    ("/admin/dlq/purge", b'{"older_than_seconds": NaN}', 400),
    ("/admin/dlq/replay", b"\xff\xfe\x00", 400),
    ("/admin/dlq/replay", b"[" * 50 + b"]" * 50, 400),
    ("/admin/degradation", b'{"level": "\\u0000"}', 400),
]


async def test_malformed_admin_parameters_never_5xx(hostile: ServerProcess) -> None:
    headers = {"authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(timeout=60, headers=headers) as client:
        before = snapshot(hostile)
        metrics_before = (await client.get(hostile.base_url + "/metrics")).text
        answers = []
        for path, expected in ADMIN_GETS:
            answers.append((path, expected, await client.get(hostile.base_url + path)))
        for path, body, expected in ADMIN_POSTS:
            answers.append(
                (path, expected, await client.post(hostile.base_url + path, content=body))
            )
        for path, expected, response in answers:
            assert response.status_code == expected, (path, response.status_code, response.text)
            _no_leak(response.text)
            if expected >= 400:
                assert response.json()["error"], path
        assert snapshot(hostile) == before
        metrics_after = (await client.get(hostile.base_url + "/metrics")).text
        refused = sum(1 for _, expected, _ in answers if expected == 400)
        assert (
            metric_value(metrics_after, "dovecote_http_requests_total", status="400")
            - metric_value(metrics_before, "dovecote_http_requests_total", status="400")
            == refused
        )
    audited = [e for e in hostile.log_events() if e.get("status") == 400]
    assert len(audited) >= refused  # each refused admin request is an audit log line


async def _ask(
    client: httpx.AsyncClient, server: ServerProcess, sender: str, message: dict[str, Any]
) -> tuple[int, dict[str, Any]]:
    response = await client.post(
        server.base_url + "/",
        content=await authcrypt(server.did, sender, message),
        headers={"content-type": ENCRYPTED},
    )
    _no_leak(response.text)
    assert response.headers["content-type"].startswith(ENCRYPTED), response.text
    return response.status_code, await unpack_reply(response.content)


async def test_nul_and_lone_surrogates_in_dids(hostile: ServerProcess) -> None:
    """A granted mediatee registers, queries and filters with broken DIDs; anonymous
    forwards name them as `next`. Every one refused, nothing stored, no 5xx."""
    sender = peer_did(600).did
    async with httpx.AsyncClient(timeout=60) as client:
        _, grant = await _ask(
            client, hostile, sender, {"type": f"{CM3}/mediate-request", "body": {}}
        )
        assert grant["type"].endswith("mediate-grant"), grant
        before = snapshot(hostile)
        metrics_before = (await client.get(hostile.base_url + "/metrics")).text
        for version, name in ((CM3, "recipient-update"), (CM2, "keylist-update")):
            _, reply = await _ask(
                client,
                hostile,
                sender,
                {
                    "type": f"{version}/{name}",
                    "body": {
                        "updates": [
                            {"recipient_did": did, "action": action}
                            for did in NUL_DIDS
                            for action in ("add", "remove")
                        ]
                    },
                },
            )
            assert [u["result"] for u in reply["body"]["updated"]] == ["client_error"] * 2 * len(
                NUL_DIDS
            ), reply
        for did in NUL_DIDS:
            for msg_type, body in (
                (f"{PICKUP}/status-request", {"recipient_did": did}),
                (f"{PICKUP}/delivery-request", {"recipient_did": did, "limit": 1}),
            ):
                status, reply = await _ask(
                    client, hostile, sender, {"type": msg_type, "body": body}
                )
                assert status == 200  # return_route: the problem report is the answer
                assert reply["body"]["code"] == "e.m.msg.invalid-did", reply
        packer = await AnonPacker.for_mediator(hostile.did)
        for did in NUL_DIDS:
            message = forward_message(hostile.did, did)
            response = await client.post(
                hostile.base_url + "/",
                content=packer.pack(message),
                headers={"content-type": ENCRYPTED},
            )
            assert response.status_code == 400, response.text
            assert response.json()["error"] == "e.m.msg.invalid-did"
            _no_leak(response.text)
        # A message type, id and thread with NUL and lone surrogates: refused.
        for header in ("type", "id", "thid"):
            message = forward_message(hostile.did, "did:example:x")
            message[header] = "x\x00\udc80" + uuid.uuid4().hex
            response = await client.post(
                hostile.base_url + "/",
                content=packer.pack(message),
                headers={"content-type": ENCRYPTED},
            )
            assert 400 <= response.status_code < 500, (header, response.text)
            assert response.json()["error"]
            _no_leak(response.text)
        assert snapshot(hostile) == before
        metrics_after = (await client.get(hostile.base_url + "/metrics")).text
        code = "e.m.msg.invalid-did"
        assert metric_value(metrics_after, "dovecote_bad_input_total", code=code) >= metric_value(
            metrics_before, "dovecote_bad_input_total", code=code
        ) + 5 * len(NUL_DIDS)
    logged = [e for e in hostile.log_events() if e.get("code") == "e.m.msg.invalid-did"]
    assert len(logged) >= 3 * len(NUL_DIDS)
