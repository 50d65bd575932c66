"""/v1/rooms/ws under the limits of issue 13 (points 2, 3, 8) and issue 12 point 5: token
narrowing on re-auth, re-added participants, the subscription cap, idle sockets, the
per-address frame limit, and admission closing with 1013/1012 instead of HTTP 403."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from rooms.conftest import env_for
from support.rooms import Issuer, RoomsClient, Webhook, ws_connect, ws_recv
from support.server import ServerProcess


def _sqlite_env(issuer: Issuer, webhook: Webhook, **extra: str) -> dict[str, str]:
    """Settings of the shared rooms servers on SQLite, plus `extra` (these limits do not
    depend on the store engine: one server, not one per engine)."""
    return {**env_for(issuer, "", webhook), **extra}


async def _frames_until(ws: Any, kind: str, within: float = 10.0) -> list[dict[str, Any]]:
    """Frames up to and including the first of type `kind`."""
    frames: list[dict[str, Any]] = []
    while not frames or frames[-1]["type"] != kind:
        frames.append(await ws_recv(ws, within))
    return frames


async def test_reauth_with_narrower_token_drops_rooms_it_does_not_grant(
    rooms: RoomsClient,
) -> None:
    kept = rooms.create_room({"alice": "member"})
    dropped = rooms.create_room({"alice": "member"})
    ws = await ws_connect(rooms.base_url, rooms.issuer.token("alice"))
    try:
        for room in (kept, dropped):
            await ws.send(json.dumps({"action": "subscribe", "room": room, "since": 0}))
            await _frames_until(ws, "subscribed")
        await ws.send(
            json.dumps({"action": "auth", "token": rooms.issuer.token("alice", rooms=[kept])})
        )
        frames = await _frames_until(ws, "authenticated")
        assert {
            "type": "unsubscribed",
            "room": dropped,
            "reason": "not granted by the new token",
        } in frames
        # Nothing of the dropped room after the acknowledgement; the kept one goes on.
        assert rooms.post(dropped, "alice", "not for this socket").status_code == 201
        assert rooms.post(kept, "alice", "still here").status_code == 201
        live = [f for f in await _frames_until(ws, "event") if f["type"] == "event"]
        assert live[-1]["event"]["room"] == kept, live
        assert live[-1]["event"]["data"]["text"] == "still here"
        with pytest.raises(TimeoutError):
            await ws_recv(ws, within=0.5)
        # And the narrower token cannot subscribe to it again.
        await ws.send(json.dumps({"action": "subscribe", "room": dropped, "since": 0}))
        assert (await ws_recv(ws))["error"] == "e.p.req.forbidden"
    finally:
        await ws.close()


async def test_reauth_from_admin_to_outsider_drops_the_room(rooms: RoomsClient) -> None:
    room = rooms.create_room({"alice": "member"})
    ws = await ws_connect(rooms.base_url, rooms.issuer.token("carol", roles=["admin"]))
    try:
        await ws.send(json.dumps({"action": "subscribe", "room": room, "since": 0}))
        await _frames_until(ws, "subscribed")
        # Same participant, no admin role any more, and not a participant of the room.
        await ws.send(json.dumps({"action": "auth", "token": rooms.issuer.token("carol")}))
        frames = await _frames_until(ws, "authenticated")
        assert {
            "type": "unsubscribed",
            "room": room,
            "reason": "not granted by the new token",
        } in frames
    finally:
        await ws.close()


async def test_removed_and_readded_participant_replays_from_zero(rooms: RoomsClient) -> None:
    room = rooms.create_room({"alice": "admin", "bob": "member"})
    assert rooms.post(room, "alice", "first").status_code == 201
    base = f"{rooms.base_url}/v1/rooms/{room}/participants/bob"
    assert rooms.http.delete(base, headers=rooms.as_("alice")).status_code == 200
    assert rooms.post(room, "alice", "while away").status_code == 201
    readded = rooms.http.put(base, json={"role": "member"}, headers=rooms.as_("alice"))
    assert readded.status_code == 200, readded.text
    last = rooms.events(room)["last_seq"]

    ws = await ws_connect(rooms.base_url, rooms.issuer.token("bob"))
    try:
        await ws.send(json.dumps({"action": "subscribe", "room": room, "since": 0}))
        assert (await ws_recv(ws))["type"] == "subscribed"
        frames = [await ws_recv(ws) for _ in range(last)]
        assert [f["type"] for f in frames] == ["event"] * last, frames
        assert [f["event"]["seq"] for f in frames] == list(range(1, last + 1))
        # Still subscribed after replaying its own removal: live events arrive.
        assert rooms.post(room, "alice", "welcome back").status_code == 201
        live = await ws_recv(ws)
        assert live["type"] == "event" and live["event"]["data"]["text"] == "welcome back"
    finally:
        await ws.close()


async def test_subscriptions_per_socket_are_capped(
    server_factory: Callable[..., ServerProcess],
    issuer: Issuer,
    webhook: Webhook,
) -> None:
    server = server_factory(
        env=_sqlite_env(issuer, webhook, DOVECOTE_ROOMS_WS_MAX_SUBSCRIPTIONS="3")
    )
    with httpx.Client(timeout=30.0) as http:
        client = RoomsClient(server.base_url, issuer, http)
        made = [client.create_room({"alice": "member"}) for _ in range(4)]
    ws = await ws_connect(server.base_url, issuer.token("alice"))
    try:
        for room in made[:3]:
            await ws.send(json.dumps({"action": "subscribe", "room": room, "since": 0}))
            await _frames_until(ws, "subscribed")
        await ws.send(json.dumps({"action": "subscribe", "room": made[3], "since": 0}))
        refused = (await _frames_until(ws, "error"))[-1]
        assert refused["error"] == "e.m.msg.malformed" and "at most 3" in refused["detail"]
        # Unsubscribing frees the place.
        await ws.send(json.dumps({"action": "unsubscribe", "room": made[0]}))
        await _frames_until(ws, "unsubscribed")
        await ws.send(json.dumps({"action": "subscribe", "room": made[3], "since": 0}))
        await _frames_until(ws, "subscribed")
    finally:
        await ws.close()


async def test_idle_socket_closes_and_frames_count_against_the_ip_limit(
    server_factory: Callable[..., ServerProcess],
    issuer: Issuer,
    webhook: Webhook,
) -> None:
    server = server_factory(
        env=_sqlite_env(
            issuer,
            webhook,
            DOVECOTE_WS_IDLE_TIMEOUT="1",
            DOVECOTE_RATE_LIMIT_IP="1",
            DOVECOTE_RATE_LIMIT_IP_BURST="8",
        )
    )
    token = issuer.token("alice")
    # Authenticated but subscribed to nothing: closed after a second of silence.
    idle = await ws_connect(server.base_url, token)
    with pytest.raises(ConnectionClosed):
        await ws_recv(idle, within=5)
    assert idle.close_code == 1000 and idle.close_reason == "idle timeout"

    # Frames on a socket take tokens from the same bucket as HTTP requests.
    busy = await ws_connect(server.base_url, token)
    try:
        answers = []
        for _ in range(12):
            await busy.send(json.dumps({"action": "ping"}))
            answers.append(await ws_recv(busy))
        limited = [a for a in answers if a["type"] == "error"]
        assert limited and limited[0]["error"] == "e.m.me.res.rate-limited", answers
        assert limited[0]["retry_after"] > 0
    finally:
        await busy.close()


async def test_admission_over_the_limit_or_draining_closes_1013_or_1012(
    server_factory: Callable[..., ServerProcess],
    issuer: Issuer,
    webhook: Webhook,
) -> None:
    server = server_factory(
        env=_sqlite_env(issuer, webhook, DOVECOTE_MAX_WEBSOCKETS="1", DOVECOTE_DRAIN_DELAY="5")
    )
    token = issuer.token("alice")
    first = await ws_connect(server.base_url, token)
    try:
        # Before: HTTP 403 (websockets.InvalidStatus), which the rooms client takes as final.
        second = await ws_connect(server.base_url, token)
        with pytest.raises(ConnectionClosed):
            await ws_recv(second)
        assert second.close_code == 1013
    finally:
        await first.close()
    assert server.proc is not None
    server.proc.send_signal(signal.SIGTERM)
    await asyncio.sleep(0.5)  # draining, still listening for DRAIN_DELAY
    late = await ws_connect(server.base_url, token)
    with pytest.raises(ConnectionClosed):
        await ws_recv(late)
    assert late.close_code == 1012
