"""POST / answered on the connection (web/direct.py, the default) and through ASGI
(DIRECT_POST=false) give the same answers, over raw sockets to two real servers.

For accepted, refused and broken requests the status, the JSON body (request ids aside,
unless the client chose one) and the headers a client acts on are equal. The connection
behaviour uvicorn gave the ASGI path holds on the direct one: keep-alive, pipelined
requests answered in order, Expect: 100-continue, a refusal by Content-Length before the
body is sent, a client leaving mid-body (no 5xx, the server serves on).
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from support.agent import BASIC, ENCRYPTED, Agent, forward_to
from support.inspect import metric_value
from support.server import ServerProcess

LIMIT = 65536
ENV = {
    "DOVECOTE_MAX_BODY_BYTES": str(LIMIT),
    # 127.0.0.3 is the rate-limited client; everyone else stays far below the burst.
    "DOVECOTE_RATE_LIMIT_IP": "1",
    "DOVECOTE_RATE_LIMIT_IP_BURST": "40",
}
# Headers that differ between any two answers (the clock) or by design (request ids).
UNCOMPARED = {"date", "x-request-id"}


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict[str, Any]:
        return dict(json.loads(self.body))

    def comparable(self) -> tuple[int, dict[str, str], Any]:
        body: Any = self.body
        if self.headers.get("content-type") == "application/json":
            body = self.json()
            if "request_id" in body and body["request_id"] == self.headers.get("x-request-id"):
                body.pop("request_id")
        headers = {k: v for k, v in self.headers.items() if k not in UNCOMPARED}
        return self.status, headers, body


async def read_answer(reader: asyncio.StreamReader) -> Answer:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    if status == 100:
        return Answer(status, headers, b"")
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return Answer(status, headers, body)


def post(
    body: bytes, content_type: str = ENCRYPTED, extra: str = "", length: int | None = None
) -> bytes:
    size = len(body) if length is None else length
    head = f"POST / HTTP/1.1\r\nHost: t\r\nContent-Type: {content_type}\r\n"
    return (head + f"Content-Length: {size}\r\n{extra}\r\n").encode() + body


async def exchange(
    server: ServerProcess, data: bytes, answers: int = 1, source: str = "127.0.0.1"
) -> list[Answer]:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port, local_addr=(source, 0))
    try:
        writer.write(data)
        await writer.drain()
        return [await asyncio.wait_for(read_answer(reader), 10) for _ in range(answers)]
    finally:
        writer.close()


@pytest.fixture
def pair(server_factory: Callable[..., ServerProcess]) -> tuple[ServerProcess, ServerProcess]:
    direct = server_factory(env=ENV)
    asgi = server_factory(env={**ENV, "DOVECOTE_DIRECT_POST": "false"})
    return direct, asgi


CASES: dict[str, bytes] = {
    "unsupported media type": post(b"{}", content_type="text/plain"),
    "empty body": post(b""),
    "not JSON": post(b"hello"),
    "JSON but no envelope": post(b'{"protected": 1}'),
    "nested too deep": post(b"[" * 5000 + b"]" * 5000),
    "request id echoed": post(b"hello", extra="X-Request-Id: client-chosen.1\r\n"),
    "unusable request id replaced": post(b"hello", extra="X-Request-Id: no spaces here\r\n"),
    "media type parameters": post(b"hello", content_type=f"{ENCRYPTED}; charset=utf-8"),
}


async def test_both_paths_give_the_same_answers(
    pair: tuple[ServerProcess, ServerProcess], client: httpx.AsyncClient
) -> None:
    direct, asgi = pair
    seen = {}
    for name, request in CASES.items():
        [a] = await exchange(direct, request)
        [b] = await exchange(asgi, request)
        assert a.comparable() == b.comparable(), name
        assert a.status < 500, name
        assert a.headers["x-request-id"], name
        seen[name] = a
    assert seen["unsupported media type"].status == 415
    assert seen["empty body"].json()["detail"] == "empty body"
    assert seen["request id echoed"].headers["x-request-id"] == "client-chosen.1"
    assert seen["request id echoed"].json()["request_id"] == "client-chosen.1"
    assert seen["unusable request id replaced"].headers["x-request-id"] != "no spaces here"

    # Accepted forwards: 202, empty, the same headers; each server stores its own.
    for server in pair:
        alice = Agent.create(server.base_url, server.did, via_mediator=True)
        await alice.mediate(client)
        packed = await forward_to(server.base_url, alice, {"type": BASIC, "body": {"n": 1}})
        [answer] = await exchange(server, post(packed.encode()))
        seen[server.base_url] = answer
    a, b = seen[direct.base_url], seen[asgi.base_url]
    assert a.status == 202 and a.body == b""
    assert a.comparable() == b.comparable()


async def test_bodies_past_the_limit_are_refused_alike(
    pair: tuple[ServerProcess, ServerProcess],
) -> None:
    answers = []
    for server in pair:
        # Refused by its Content-Length, before the client sends any of the body.
        [declared] = await exchange(server, post(b"", length=10**9))
        # Chunked, no length: refused once the body passes the limit.
        chunk = b"x" * 16384
        chunked = (
            (
                f"POST / HTTP/1.1\r\nHost: t\r\nContent-Type: {ENCRYPTED}\r\n"
                "Transfer-Encoding: chunked\r\n\r\n"
            ).encode()
            + (b"4000\r\n" + chunk + b"\r\n") * 5
            + b"0\r\n\r\n"
        )
        [streamed] = await exchange(server, chunked)
        answers.append((declared, streamed))
    for declared, streamed in answers:
        assert declared.status == 413 and streamed.status == 413
    (d1, s1), (d2, s2) = answers
    assert d1.comparable() == d2.comparable()
    assert s1.comparable() == s2.comparable()


async def test_rate_limited_clients_get_the_same_429(
    pair: tuple[ServerProcess, ServerProcess],
) -> None:
    last = []
    for server in pair:
        answers = await exchange(server, post(b"hello") * 41, answers=41, source="127.0.0.3")
        assert [a.status for a in answers[:40]] == [400] * 40
        last.append(answers[40])
    assert last[0].status == 429 and last[0].headers["retry-after"] == "1"
    # The body says how long to wait, to the microsecond: not the same twice.
    assert all(0 < a.json()["retry_after"] <= 1 for a in last)
    for answer in last:
        answer.body = json.dumps({**answer.json(), "retry_after": 1}).encode()
        answer.headers["content-length"] = str(len(answer.body))
    assert last[0].comparable() == last[1].comparable()


async def test_keep_alive_pipelining_and_100_continue(
    pair: tuple[ServerProcess, ServerProcess],
) -> None:
    for server in pair:
        # Three requests in one write: three answers, in order, on one connection.
        batch = post(b"{}", content_type="text/plain") + post(b"") + post(b"hello")
        answers = await exchange(server, batch, answers=3)
        assert [a.status for a in answers] == [415, 400, 400]
        assert all("connection" not in a.headers for a in answers)
        # A client that asks first gets 100 Continue, then the answer to its body.
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            writer.write(post(b"", extra="Expect: 100-continue\r\n", length=5))
            interim = await asyncio.wait_for(read_answer(reader), 10)
            assert interim.status == 100
            writer.write(b"hello")
            final = await asyncio.wait_for(read_answer(reader), 10)
            assert final.status == 400
            # Connection: close from the client: answered, then closed by the server.
            writer.write(post(b"hello", extra="Connection: close\r\n"))
            closing = await asyncio.wait_for(read_answer(reader), 10)
            assert closing.status == 400 and closing.headers["connection"] == "close"
            assert await asyncio.wait_for(reader.read(), 10) == b""
        finally:
            writer.close()


async def test_a_client_leaving_mid_body_costs_nothing(
    pair: tuple[ServerProcess, ServerProcess], client: httpx.AsyncClient
) -> None:
    for server in pair:
        for _ in range(5):
            _, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(post(b"{" * 100, length=5000))
            await writer.drain()
            writer.close()
        await asyncio.sleep(0.5)
        [answer] = await exchange(server, post(b"hello"))
        assert answer.status == 400
        metrics = (await client.get(server.base_url + "/metrics")).text
        for status in ("500", "503"):
            assert (
                metric_value(
                    metrics, "dovecote_http_requests_total", route="/", method="POST", status=status
                )
                == 0
            )


def _rss_mib(server: ServerProcess) -> float:
    assert server.proc is not None
    for line in open(f"/proc/{server.proc.pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def test_answered_bodies_are_not_kept(pair: tuple[ServerProcess, ServerProcess]) -> None:
    """A body is freed once answered: not held by its kept-alive connection until the next
    request, nor, once the connection closed, until a full garbage collection (the direct
    path kept both, ~1 MiB per connection here, until the second reading of 2168076)."""
    body = b"x" * (LIMIT - 1)
    for server in pair:
        before = _rss_mib(server)
        open_ones = []
        for n in range(300):
            # From ten addresses: each stays within the rate limit's burst of 40.
            source = f"127.0.1.{n % 10 + 1}"
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", server.port, local_addr=(source, 0)
            )
            close = "Connection: close\r\n" if n % 2 else ""
            writer.write(post(body, extra=close))
            assert (await asyncio.wait_for(read_answer(reader), 10)).status == 400
            if close:
                writer.close()
            else:
                open_ones.append(writer)
        await asyncio.sleep(0.5)
        grown = _rss_mib(server) - before
        for writer in open_ones:
            writer.close()
        # 300 bodies of 64 KiB: ~19 MiB if each were kept.
        assert grown < 8, f"{server.base_url}: RSS grew {grown:.1f} MiB"


async def test_a_request_cut_short_by_shutdown_is_told_to_come_back(
    server_factory: Callable[..., ServerProcess],
) -> None:
    """Past SHUTDOWN_TIMEOUT the requests still running are cancelled: the direct path
    answers 503 with Retry-After (uvicorn's ASGI path gives a 500), then closes."""
    server = server_factory(
        env={
            **ENV,
            "DOVECOTE_SHUTDOWN_TIMEOUT": "1",
            "DOVECOTE_DRAIN_DELAY": "0",
            "DOVECOTE_BODY_READ_TIMEOUT": "30",
        }
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(post(b"{" * 10, length=5000))  # the rest never comes
        await writer.drain()
        await asyncio.sleep(0.3)
        assert server.proc is not None
        server.proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        answer = await asyncio.wait_for(read_answer(reader), 20)
        assert answer.status == 503 and answer.headers["retry-after"] == "1"
        assert answer.headers["connection"] == "close"
        assert answer.json()["error"] == "e.m.me.unavailable", answer.body
        assert await asyncio.wait_for(reader.read(), 10) == b""
        assert time.monotonic() - started < 15
    finally:
        writer.close()
