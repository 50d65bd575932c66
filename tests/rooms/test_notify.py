"""Offline participants are notified through the outbox (kind notify, the mailboxes'
webhook, which the shared test servers point at `webhook`): a post notifies every other
participant nobody follows live, with no content."""

from __future__ import annotations

import asyncio
import json

from dovecote.store.rooms_base import participant_hash
from support.rooms import RoomsClient, Webhook, ws_connect, ws_recv


async def test_offline_participants_are_notified(rooms: RoomsClient, webhook: Webhook) -> None:
    room = rooms.create_room({"alice": "member", "bob": "member", "carol": "member"})
    ws = await ws_connect(rooms.base_url, rooms.issuer.token("bob"))
    await ws.send(json.dumps({"action": "subscribe", "room": room, "since": 0}))
    assert (await ws_recv(ws))["type"] == "subscribed"

    first = rooms.post(room, "alice", "secret words").json()
    bodies = await webhook.wait_for(room, 1)
    await asyncio.sleep(1.5)  # anything else would have arrived by now
    assert webhook.for_room(room) == bodies
    assert bodies == [
        {
            "event": "room_message",
            "room": room,
            "seq": first["seq"],
            "message_id": first["id"],
            "participant_hash": participant_hash(room, "carol"),
        }
    ]
    assert "secret" not in json.dumps(bodies)

    # Bob leaves the socket: now he is offline too.
    await ws.close()
    await asyncio.sleep(1.0)  # the server notices the close and clears his presence
    second = rooms.post(room, "alice", "more").json()
    bodies = await webhook.wait_for(room, 3)
    notified = {b["participant_hash"] for b in bodies if b["seq"] == second["seq"]}
    assert notified == {participant_hash(room, "bob"), participant_hash(room, "carol")}
