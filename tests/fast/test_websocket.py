"""/ws (DIDComm) and /v1/rooms/ws, in-process through httpx-ws, bad frames included (fast
twins of the socket cases in tests/integration/test_mediator_flow.py and
tests/rooms/test_websocket.py; uvicorn's frame limit stays in test_bad_input.py)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from httpx_ws import WebSocketDisconnect, aconnect_ws
from httpx_ws._api import AsyncWebSocketSession
from prometheus_client import REGISTRY

from dovecote.delivery import live as live_module
from dovecote.rooms.auth import Principal
from dovecote.rooms.hub import Feed
from dovecote.store.base import StoredMessage
from fast.instance import Fast
from support.agent import BASIC, CM3, PICKUP, Agent, forward_to
from support.jwe import assert_encrypted_typ

WITHIN = 10.0


async def _ask(
    ws: AsyncWebSocketSession, agent: Agent, msg_type: str, body: dict[str, Any] | None = None
) -> dict[str, Any]:
    await ws.send_text(await agent.pack(agent.message(msg_type, body)))
    return await agent.unpack(await ws.receive_text(timeout=WITHIN))


async def test_mediation_and_live_delivery_over_websocket(fast: Fast) -> None:
    alice = fast.agent()
    bob = fast.agent(via_mediator=False)
    async with aconnect_ws("/ws", fast.client, session_class=AsyncWebSocketSession) as ws:
        grant = await _ask(ws, alice, f"{CM3}/mediate-request")
        assert grant["type"] == f"{CM3}/mediate-grant"
        await _ask(
            ws,
            alice,
            f"{CM3}/recipient-update",
            {"updates": [{"recipient_did": alice.did, "action": "add"}]},
        )

        # Queued before live mode: not pushed when it starts (Pickup 3.0).
        first = await forward_to(
            fast.settings.base_url, alice, {"type": BASIC, "body": {"content": "queued"}}, bob
        )
        assert (await fast.post(first)).status_code == 202
        status = await _ask(ws, alice, f"{PICKUP}/live-delivery-change", {"live_delivery": True})
        assert status["type"] == f"{PICKUP}/status"
        assert status["body"]["live_delivery"] is True
        assert status["body"]["message_count"] == 1

        # Arriving while connected: pushed at once, and only it.
        second = await forward_to(
            fast.settings.base_url, alice, {"type": BASIC, "body": {"content": "live"}}, bob
        )
        assert (await fast.post(second)).status_code == 202
        frame = await ws.receive_text(timeout=WITHIN)
        assert_encrypted_typ(frame, "ECDH-1PU")
        pushed = await alice.unpack(frame)
        assert pushed["type"] == f"{PICKUP}/delivery" and "thid" not in pushed
        inner = [await alice.unpack(json.dumps(a["data"]["json"])) for a in pushed["attachments"]]
        assert [m["body"]["content"] for m in inner] == ["live"]

        fetched = await _ask(ws, alice, f"{PICKUP}/delivery-request", {"limit": 10})
        by_content = {}
        for attachment in fetched["attachments"]:
            message = await alice.unpack(json.dumps(attachment["data"]["json"]))
            by_content[message["body"]["content"]] = attachment["id"]
        assert "queued" in by_content
        ack = await _ask(
            ws,
            alice,
            f"{PICKUP}/messages-received",
            {"message_id_list": [by_content["queued"], pushed["attachments"][0]["id"]]},
        )
        assert ack["body"]["message_count"] == 0
        with pytest.raises(TimeoutError):
            await ws.receive_text(timeout=0.5)
    assert fast.query("SELECT COUNT(*) FROM messages") == [(0,)]


async def test_unacknowledged_push_stays_queued(fast: Fast) -> None:
    alice = fast.agent()
    await alice.mediate(fast.client)
    async with aconnect_ws("/ws", fast.client, session_class=AsyncWebSocketSession) as ws:
        await _ask(ws, alice, f"{PICKUP}/live-delivery-change", {"live_delivery": True})
        packed = await forward_to(
            fast.settings.base_url, alice, {"type": BASIC, "body": {"content": "x"}}
        )
        assert (await fast.post(packed)).status_code == 202
        pushed = await alice.unpack(await ws.receive_text(timeout=WITHIN))
        assert pushed["type"] == f"{PICKUP}/delivery"
    # The socket closed before an acknowledgement: still queued, and fetched again.
    status = await alice.request(fast.client, f"{PICKUP}/status-request")
    assert status["body"]["message_count"] == 1
    again = await alice.request(fast.client, f"{PICKUP}/delivery-request", {"limit": 5})
    assert [a["id"] for a in again["attachments"]] == [pushed["attachments"][0]["id"]]


async def test_bad_frames_answer_on_the_socket_which_stays_usable(fast: Fast) -> None:
    agent = fast.agent(via_mediator=False)
    before = fast.snapshot()
    async with aconnect_ws("/ws", fast.client, session_class=AsyncWebSocketSession) as ws:
        await ws.send_text("not json at all")
        assert json.loads(await ws.receive_text(timeout=WITHIN))["error"] == "e.m.msg.malformed"
        await ws.send_text(json.dumps({"hello": "world"}))
        answer = json.loads(await ws.receive_text(timeout=WITHIN))
        assert answer["error"] == "e.m.trust.crypto.not-encrypted"
        # Still usable: a real request gets its reply.
        pong = await _ask(
            ws, agent, "https://didcomm.org/trust-ping/2.0/ping", {"response_requested": True}
        )
        assert pong["type"].endswith("/ping-response")
    assert fast.snapshot() == before


@pytest.mark.fast_settings(max_websockets=1)
async def test_websockets_past_the_limit_are_closed_with_1013(fast: Fast) -> None:
    async with aconnect_ws("/ws", fast.client, session_class=AsyncWebSocketSession) as first:
        async with aconnect_ws("/ws", fast.client, session_class=AsyncWebSocketSession) as second:
            with pytest.raises(WebSocketDisconnect) as closed:
                await second.receive_text(timeout=WITHIN)
        assert closed.value.code == 1013
        # The first is untouched.
        await first.send_text("not json")
        assert json.loads(await first.receive_text(timeout=WITHIN))["error"]


async def test_rooms_socket_replays_then_streams_live(fast: Fast) -> None:
    room = await fast.create_room("alice")
    alice = {"authorization": f"Bearer {fast.issuer.token('alice')}"}
    posted = await fast.client.post(
        f"/v1/rooms/{room}/messages", headers=alice, json={"text": "before"}
    )
    assert posted.status_code == 201, posted.text

    # A copy: httpx-ws adds its upgrade headers to the dict it is given.
    async with aconnect_ws(
        "/v1/rooms/ws", fast.client, headers=dict(alice), session_class=AsyncWebSocketSession
    ) as ws:
        await ws.send_json({"action": "subscribe", "room": room, "since": 0})
        ack = await ws.receive_json(timeout=WITHIN)
        assert ack["type"] == "subscribed" and ack["last_seq"] == 3
        replayed = [(await ws.receive_json(timeout=WITHIN))["event"] for _ in range(3)]
        assert [e["seq"] for e in replayed] == [1, 2, 3]
        assert replayed[-1]["data"]["text"] == "before"
        live = await fast.client.post(
            f"/v1/rooms/{room}/messages", headers=alice, json={"text": "live"}
        )
        assert live.status_code == 201
        event = (await ws.receive_json(timeout=WITHIN))["event"]
        assert event["seq"] == 4 and event["data"]["text"] == "live"
        await ws.send_text("not json")
        assert (await ws.receive_json(timeout=WITHIN))["type"] == "error"
        await ws.send_json({"action": "ping"})
        assert await ws.receive_json(timeout=WITHIN) == {"type": "pong"}


async def test_rooms_socket_refuses_a_room_the_token_does_not_name(fast: Fast) -> None:
    room = await fast.create_room("alice")
    token = fast.issuer.token("alice", rooms=["other"])
    async with aconnect_ws(
        "/v1/rooms/ws",
        fast.client,
        headers={"authorization": f"Bearer {token}"},
        session_class=AsyncWebSocketSession,
    ) as ws:
        await ws.send_json({"action": "subscribe", "room": room, "since": 0})
        refused = await ws.receive_json(timeout=WITHIN)
        assert refused["type"] == "error" and refused["error"] == "e.p.req.forbidden"


@pytest.mark.fast_settings(max_body_bytes=64 * 1024)
async def test_live_pushes_stop_at_the_byte_budget(fast: Fast) -> None:
    """A push frame holds at most MAX_BODY_BYTES of messages (at least one), like a
    delivery-request reply: six ~20 KB messages arriving together go out in frames of at
    most three, each exactly once."""
    alice = fast.agent()
    await alice.mediate(fast.client)
    packed = [
        await forward_to(
            fast.settings.base_url, alice, {"type": BASIC, "body": {"content": f"{n}" * 15_000}}
        )
        for n in range(6)
    ]
    async with aconnect_ws("/ws", fast.client, session_class=AsyncWebSocketSession) as ws:
        await _ask(ws, alice, f"{PICKUP}/live-delivery-change", {"live_delivery": True})
        answers = await asyncio.gather(*(fast.post(p) for p in packed))
        assert [a.status_code for a in answers] == [202] * 6
        seen: list[str] = []
        acks = answered = 0
        while len(seen) < 6 or answered < acks:
            pushed = await alice.unpack(await ws.receive_text(timeout=WITHIN))
            if pushed["type"] == f"{PICKUP}/status":  # the answer to an ack
                answered += 1
                continue
            assert pushed["type"] == f"{PICKUP}/delivery", pushed
            batch = pushed["attachments"]
            assert 1 <= len(batch) <= 3, len(batch)
            seen += [a["id"] for a in batch]
            ids = {"message_id_list": [a["id"] for a in batch]}
            await ws.send_text(await alice.pack(alice.message(f"{PICKUP}/messages-received", ids)))
            acks += 1
        assert len(set(seen)) == 6
    assert fast.query("SELECT COUNT(*) FROM messages") == [(0,)]


async def test_rooms_feeds_at_one_position_share_a_read_and_its_encoding(fast: Fast) -> None:
    """Feeds asking for a room's events after the same seq at once cost one store read,
    and each event is encoded once for all of them; a wake-up (a new commit) after that
    read began means a new one, or the event that woke a feed could be missed."""
    room = await fast.create_room("alice")
    alice = {"authorization": f"Bearer {fast.issuer.token('alice')}"}
    posted = await fast.client.post(f"/v1/rooms/{room}/messages", headers=alice, json={"text": "a"})
    assert posted.status_code == 201
    hub = fast.dovecote.rooms.hub
    feed = Feed(Principal("watcher", None, frozenset(), 0.0), queue_size=10)
    store = hub.store
    reads: list[int] = []
    real = store.room_events

    async def counted(room: str, **kwargs: Any) -> Any:
        reads.append(kwargs["after"])
        return await real(room, **kwargs)

    store.room_events = counted  # type: ignore[method-assign]
    try:
        pages = await asyncio.gather(*(hub._read(room, 0, 200) for _ in range(5)))
        assert reads == [0]
        assert all(page is pages[0] for page in pages) and pages[0] is not None
        assert pages[0].frame(0) is pages[0].frame(0)
        body, text = pages[0].frame(0)
        assert json.loads(text) == json.loads(json.dumps(body)) and body["type"] == "event"

        # A commit wakes the room while a read is in flight: later askers read again.
        hub.subscribe(feed, room, 10**9)  # a subscriber, so the room's wake-ups count
        first = asyncio.ensure_future(hub._read(room, 0, 200))
        await asyncio.sleep(0)
        hub.notify(room)
        second = await hub._read(room, 0, 200)
        await first
        assert reads == [0, 0, 0] and second is not None
    finally:
        del store.room_events
        hub.unsubscribe(feed, room)


def _bodies(source: str) -> float:
    return REGISTRY.get_sample_value("dovecote_live_push_bodies_total", {"source": source}) or 0.0


async def test_live_push_uses_the_body_the_accept_handed_over_and_only_queued_ones(
    fast: Fast,
) -> None:
    """A forward accepted here is pushed with the body the accept holds (no read back);
    a handed-over body whose message is not queued (acknowledged or expired meanwhile)
    is never pushed, and is dropped once the queue shows it gone."""
    alice = fast.agent()
    await alice.mediate(fast.client)
    live = fast.dovecote.live
    async with aconnect_ws("/ws", fast.client, session_class=AsyncWebSocketSession) as ws:
        await _ask(ws, alice, f"{PICKUP}/live-delivery-change", {"live_delivery": True})
        session = live.by_mediatee[alice.did]
        now = time.time()
        live.stored(StoredMessage("gone", 0, alice.did, alice.did, b"{}", now, now + 60))
        assert "gone" in session.handed
        handed, read = _bodies("handed"), _bodies("read")
        packed = await forward_to(
            fast.settings.base_url, alice, {"type": BASIC, "body": {"content": "live"}}
        )
        assert (await fast.post(packed)).status_code == 202
        pushed = await alice.unpack(await ws.receive_text(timeout=WITHIN))
        assert pushed["type"] == f"{PICKUP}/delivery"
        ids = [a["id"] for a in pushed["attachments"]]
        assert "gone" not in ids and len(ids) == 1
        assert (_bodies("handed") - handed, _bodies("read") - read) == (1.0, 0.0)
        assert session.handed == {} and live.handed_bytes == 0
        ack = await _ask(ws, alice, f"{PICKUP}/messages-received", {"message_id_list": ids})
        assert ack["body"]["message_count"] == 0


async def test_live_pushes_pause_at_the_in_flight_limit_until_acknowledged(
    fast: Fast, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At MAX_IN_FLIGHT unacknowledged pushes the pump waits; the acknowledgement that
    makes room wakes it, and the rest follows, each message once."""
    monkeypatch.setattr(live_module, "MAX_IN_FLIGHT", 2)
    # Past the test's WITHIN: only the acknowledgement's wake-up can bring the next push.
    monkeypatch.setattr(live_module, "SAFETY_POLL_SECONDS", 60.0)
    alice = fast.agent()
    await alice.mediate(fast.client)
    async with aconnect_ws("/ws", fast.client, session_class=AsyncWebSocketSession) as ws:
        await _ask(ws, alice, f"{PICKUP}/live-delivery-change", {"live_delivery": True})
        for n in range(3):
            packed = await forward_to(
                fast.settings.base_url, alice, {"type": BASIC, "body": {"content": f"m{n}"}}
            )
            assert (await fast.post(packed)).status_code == 202
        seen: list[str] = []
        while len(seen) < 2:
            pushed = await alice.unpack(await ws.receive_text(timeout=WITHIN))
            seen += [a["id"] for a in pushed["attachments"]]
        assert len(seen) == 2
        with pytest.raises(TimeoutError):  # two in flight: nothing more until an ack
            await ws.receive_text(timeout=0.5)
        ids = {"message_id_list": seen[:1]}
        await ws.send_text(await alice.pack(alice.message(f"{PICKUP}/messages-received", ids)))
        # The acknowledgement's status and the push it made room for, in either order.
        frames = [await alice.unpack(await ws.receive_text(timeout=WITHIN)) for _ in range(2)]
        kinds = sorted(f["type"].rsplit("/", 1)[1] for f in frames)
        assert kinds == ["delivery", "status"], kinds
        pushed = next(f for f in frames if f["type"] == f"{PICKUP}/delivery")
        rest = [a["id"] for a in pushed["attachments"]]
        assert len(rest) == 1 and rest[0] not in seen
