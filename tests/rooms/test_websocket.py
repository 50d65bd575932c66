"""/v1/rooms/ws against real servers: replay then live, resume at random points (across
instances on PostgreSQL), slow consumers disconnected with a resume hint."""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from dovecote.rooms.auth import LEEWAY
from dovecote.rooms.hub import SAFETY_POLL_SECONDS
from support.rooms import Issuer, RoomsClient, ws_connect, ws_recv
from support.server import ServerProcess


async def test_replay_then_live_and_removal(rooms: RoomsClient) -> None:
    room = rooms.create_room({"alice": "admin", "bob": "member"})
    for i in range(3):
        assert rooms.post(room, "alice", f"before {i}").status_code == 201
    # Authenticating with a first frame instead of a header.
    ws = await ws_connect(rooms.base_url)
    try:
        await ws.send(json.dumps({"action": "auth", "token": rooms.issuer.token("bob")}))
        assert (await ws_recv(ws))["type"] == "authenticated"
        await ws.send(json.dumps({"action": "subscribe", "room": room, "since": 2}))
        ack = await ws_recv(ws)
        assert ack == {"type": "subscribed", "room": room, "since": 2, "last_seq": 6}
        replayed = [(await ws_recv(ws))["event"] for _ in range(4)]
        assert [e["seq"] for e in replayed] == [3, 4, 5, 6]
        assert replayed[0]["type"] == "participant.added"
        assert [e["data"]["text"] for e in replayed[1:]] == ["before 0", "before 1", "before 2"]

        assert rooms.post(room, "alice", "live").status_code == 201
        live = await ws_recv(ws)
        assert live["event"]["seq"] == 7 and live["event"]["data"]["text"] == "live"

        # Bad frames get an error frame; the connection stays.
        await ws.send(json.dumps({"action": "subscribe", "room": room}))
        assert (await ws_recv(ws))["type"] == "error"
        await ws.send("not json")
        assert (await ws_recv(ws))["type"] == "error"
        await ws.send(json.dumps({"action": "ping"}))
        assert (await ws_recv(ws)) == {"type": "pong"}

        # Removed from the room: the removal event, then the subscription ends.
        r = rooms.http.delete(
            f"{rooms.base_url}/v1/rooms/{room}/participants/bob", headers=rooms.as_("alice")
        )
        assert r.status_code == 200
        removed = await ws_recv(ws)
        assert removed["event"]["type"] == "participant.removed"
        assert await ws_recv(ws) == {
            "type": "unsubscribed",
            "room": room,
            "reason": "removed from the room",
        }
        rooms.post(room, "alice", "after removal")
        with pytest.raises(TimeoutError):
            await ws_recv(ws, within=0.5)
        # And may not subscribe again.
        await ws.send(json.dumps({"action": "subscribe", "room": room, "since": 0}))
        refused = await ws_recv(ws)
        assert refused["type"] == "error" and refused["error"] == "e.p.req.forbidden"
    finally:
        await ws.close()


async def test_subscribe_needs_token_room_and_membership(rooms: RoomsClient) -> None:
    room = rooms.create_room({"alice": "member"})
    ws = await ws_connect(rooms.base_url, rooms.issuer.token("alice", rooms=["other"]))
    try:
        await ws.send(json.dumps({"action": "subscribe", "room": room, "since": 0}))
        assert (await ws_recv(ws))["error"] == "e.p.req.forbidden"
    finally:
        await ws.close()
    ws = await ws_connect(rooms.base_url, rooms.issuer.token("mallory"))
    try:
        await ws.send(json.dumps({"action": "subscribe", "room": room, "since": 0}))
        assert (await ws_recv(ws))["error"] == "e.p.req.forbidden"
    finally:
        await ws.close()
    # A bad token: error frame and close 4001.
    ws = await ws_connect(rooms.base_url, rooms.issuer.token("alice", ttl=-3600))
    frame = await ws_recv(ws)
    assert frame["type"] == "error" and frame["error"] == "e.m.trust.token"
    with pytest.raises(ConnectionClosed) as closed:
        await ws_recv(ws)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4001


async def test_token_expiry_closes_the_socket(rooms: RoomsClient) -> None:
    room = rooms.create_room({"alice": "member"})
    # Tokens get LEEWAY seconds of clock skew: this one is accepted and runs out in ~2 s.
    ws = await ws_connect(rooms.base_url, rooms.issuer.token("alice", ttl=2 - LEEWAY))
    await ws.send(json.dumps({"action": "subscribe", "room": room, "since": 0}))
    frames = []
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            frames.append(await ws_recv(ws, within=20))
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4001
    assert frames[-1]["error"] == "e.m.trust.token"
    assert frames[-1]["resume_from"] == {room: 2}
    assert json.loads(closed.value.rcvd.reason) == {"resume_from": {room: 2}}


async def _post_many(
    base_url: str, issuer: Issuer, room: str, count: int, concurrency: int = 8, size: int = 0
) -> None:
    headers = issuer.headers("writer")
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(count):
        queue.put_nowait(i)

    async def worker(http: httpx.AsyncClient) -> None:
        while not queue.empty():
            i = queue.get_nowait()
            text = f"m{i} " + (os.urandom(size // 2).hex() if size else "")
            r = await http.post(
                f"{base_url}/v1/rooms/{room}/messages", json={"text": text}, headers=headers
            )
            assert r.status_code == 201, r.text
            await asyncio.sleep(random.uniform(0, 0.01))

    async with httpx.AsyncClient(timeout=30) as http:
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))


POSTS = 100


async def test_resume_at_random_points_sees_each_event_once(
    rooms: RoomsClient,
    rooms_server: ServerProcess,
    rooms_env: dict[str, str],
    store_url: str,
    server_factory: Callable[..., ServerProcess],
) -> None:
    """A subscriber killed at random points and resumed from its last seen seq gets every
    event exactly once, in order. On PostgreSQL it alternates between two instances."""
    servers = [rooms_server.base_url]
    extra: ServerProcess | None = None
    if store_url:
        extra = server_factory(env=rooms_env)
        servers.append(extra.base_url)
    room = rooms.create_room({"writer": "member", "reader": "member"})
    rng = random.Random(int.from_bytes(os.urandom(4), "big"))
    writer = asyncio.create_task(_post_many(rooms.base_url, rooms.issuer, room, POSTS))
    seen: list[dict[str, Any]] = []
    reconnects = 0
    final: int | None = None
    while final is None or (seen and seen[-1]["seq"] < final) or not seen:
        since = seen[-1]["seq"] if seen else 0
        ws = await ws_connect(servers[reconnects % len(servers)], rooms.issuer.token("reader"))
        reconnects += 1
        await ws.send(json.dumps({"action": "subscribe", "room": room, "since": since}))
        assert (await ws_recv(ws))["type"] == "subscribed"
        take = rng.randint(1, 20)  # so at least POSTS / 20 connections
        try:
            for _ in range(take):
                frame = await ws_recv(ws, within=1)
                assert frame["type"] == "event", frame
                seen.append(frame["event"])
        except TimeoutError:
            pass  # caught up; loop to check whether the writer is done
        # Kill the connection without a closing handshake (a crash, a lost network).
        ws.transport.abort()
        if writer.done() and final is None:
            writer.result()
            final = rooms.events(room)["last_seq"]
    seqs = [e["seq"] for e in seen]
    assert seqs == list(range(1, final + 1))
    assert len({e["id"] for e in seen}) == len(seen)
    assert sum(e["type"] == "message.posted" for e in seen) == POSTS
    assert reconnects >= POSTS // 20

    if extra is not None:
        # Live fan-out across instances comes from NOTIFY, well before the 5 s poll.
        ws = await ws_connect(servers[1], rooms.issuer.token("reader"))
        await ws.send(json.dumps({"action": "subscribe", "room": room, "since": final}))
        assert (await ws_recv(ws))["type"] == "subscribed"
        started = time.monotonic()
        assert rooms.post(room, "writer", "across").status_code == 201
        frame = await ws_recv(ws, within=SAFETY_POLL_SECONDS - 1)
        assert frame["event"]["seq"] == final + 1
        assert time.monotonic() - started < SAFETY_POLL_SECONDS - 1
        await ws.close()


# Messages (of SLOW_SIZE characters) posted per step until a stalled reader's socket
# buffers and send queue are full, and at most.
SLOW_STEP = 10
SLOW_MAX = 400
SLOW_SIZE = 200_000


def _gave_up_on(server: ServerProcess, room: str) -> bool:
    return any(
        e.get("event") == "rooms.slow_consumer_closed" and room in (e.get("resume_from") or {})
        for e in server.log_events()
    )


def _slow_socket(base_url: str) -> socket.socket:
    """A connected client socket with a tiny receive buffer, so the server's sends block."""
    host, port = base_url.removeprefix("http://").split(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    return sock


async def test_slow_consumer_is_disconnected_with_resume_hint(
    rooms: RoomsClient,
    rooms_server: ServerProcess,
    issuer: Issuer,
) -> None:
    """The servers here allow a full send queue 1 s (DOVECOTE_ROOMS_WS_STALL)."""
    server = rooms_server
    room = rooms.create_room({"writer": "member", "slow": "member", "fast": "member"})
    target = {"events": 10**9}  # set once we know how many were posted

    fast = await ws_connect(server.base_url, issuer.token("fast"))
    await fast.send(json.dumps({"action": "subscribe", "room": room, "since": 0}))
    assert (await ws_recv(fast))["type"] == "subscribed"
    fast_seen: list[int] = []

    async def read_fast() -> None:
        while len(fast_seen) < target["events"]:
            try:  # short waits: `target` is only known once the posting is over
                fast_seen.append((await ws_recv(fast, within=1))["event"]["seq"])
            except TimeoutError:
                continue

    fast_reader = asyncio.create_task(read_fast())
    slow = await ws_connect(
        server.base_url, issuer.token("slow"), max_queue=1, sock=_slow_socket(server.base_url)
    )
    await slow.send(json.dumps({"action": "subscribe", "room": room, "since": 0}))
    assert (await ws_recv(slow))["type"] == "subscribed"

    # The slow reader reads nothing while messages go out until its socket and queue are
    # full and the server gives up on it (stall 1 s; how many that takes depends on the
    # kernel's socket buffers); the server then waits for it to take the close frame.
    count = 0
    while count < SLOW_MAX and not _gave_up_on(server, room):
        await _post_many(server.base_url, issuer, room, SLOW_STEP, size=SLOW_SIZE, concurrency=4)
        count += SLOW_STEP
        await asyncio.sleep(0.2)
    assert _gave_up_on(server, room), f"no slow-consumer close after {count} messages"
    target["events"] = count + 4
    slow_seen: list[int] = []
    hint = None
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            frame = await ws_recv(slow, within=30)
            if frame["type"] == "overflow":
                hint = frame["resume_from"][room]
            else:
                slow_seen.append(frame["event"]["seq"])
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4008
    assert slow_seen == list(range(1, len(slow_seen) + 1))
    assert len(slow_seen) < count + 4
    # The hint comes in a frame when the socket takes it, always in the close reason.
    reason_hint = json.loads(closed.value.rcvd.reason)["resume_from"][room]
    assert reason_hint == slow_seen[-1] and hint in (None, reason_hint)
    hint = reason_hint

    await asyncio.wait_for(fast_reader, 60)
    assert fast_seen == list(range(1, count + 5))  # the fast one got everything, at once

    # Resuming from the hint delivers the rest, no gap, no duplicate.
    again = await ws_connect(server.base_url, issuer.token("slow"))
    await again.send(json.dumps({"action": "subscribe", "room": room, "since": hint}))
    assert (await ws_recv(again))["type"] == "subscribed"
    rest = [(await ws_recv(again))["event"]["seq"] for _ in range(count + 4 - hint)]
    assert rest == list(range(hint + 1, count + 5))
    await again.close()
    await fast.close()


async def test_resubscribe_with_new_since_drops_stale_queue(rooms: RoomsClient) -> None:
    room = rooms.create_room({"alice": "member"})
    for i in range(40):
        assert rooms.post(room, "alice", f"m{i}").status_code == 201
    last = rooms.events(room)["last_seq"]
    ws = await ws_connect(rooms.base_url, rooms.issuer.token("alice"))
    try:
        await ws.send(json.dumps({"action": "subscribe", "room": room, "since": 0}))
        assert (await ws_recv(ws))["type"] == "subscribed"
        assert (await ws_recv(ws))["event"]["seq"] == 1
        await ws.send(json.dumps({"action": "unsubscribe", "room": room}))
        await ws.send(json.dumps({"action": "subscribe", "room": room, "since": 30}))
        frames: list[dict[str, Any]] = []
        resubscribed = False
        while not (resubscribed and frames[-1].get("event", {}).get("seq") == last):
            frames.append(await ws_recv(ws))
            resubscribed = resubscribed or frames[-1]["type"] == "subscribed"
        kinds = [f["type"] for f in frames]
        first_ack = kinds.index("unsubscribed")
        # Events of the first subscription may precede its end; after it, only the new one.
        before = [f["event"]["seq"] for f in frames[:first_ack]]
        assert before == list(range(2, 2 + len(before)))
        assert kinds[first_ack + 1] == "subscribed"
        after = [f["event"]["seq"] for f in frames[first_ack + 2 :]]
        assert after == list(range(31, last + 1))
    finally:
        await ws.close()
