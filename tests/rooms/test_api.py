"""Rooms HTTP API against a real server: CRUD, participants, messages, history, reactions,
idempotent posts, permissions, validation."""

from __future__ import annotations

import time
from typing import Any

import pytest

from support.rooms import MAX_MESSAGE_BYTES, RoomsClient, new_key, query
from support.server import ServerProcess


def test_room_crud_and_participants(rooms: RoomsClient) -> None:
    # Names of its own: the listings below must not see rooms other tests made on the
    # shared server (with plain "bob" and "carol" it failed after test_notify).
    http, base = rooms.http, rooms.base_url
    room = rooms.create_room({"alice": "admin", "crud-bob": "member"}, room_id="crud-1")
    assert room == "crud-1"

    # Duplicate id -> 409; a non-admin token cannot create rooms.
    r = http.post(
        f"{base}/v1/rooms",
        json={"id": "crud-1", "name": "x"},
        headers=rooms.as_("root", roles=["admin"]),
    )
    assert r.status_code == 409 and r.json()["error"] == "e.m.req.conflict"
    r = http.post(f"{base}/v1/rooms", json={"name": "x"}, headers=rooms.as_("alice"))
    assert r.status_code == 403

    got = http.get(f"{base}/v1/rooms/{room}", headers=rooms.as_("crud-bob")).json()
    assert got["name"] == "test room" and got["last_seq"] == 3  # created + 2 participants

    listed = http.get(f"{base}/v1/rooms", headers=rooms.as_("crud-bob")).json()
    assert [r["id"] for r in listed["rooms"]] == [room]
    assert http.get(f"{base}/v1/rooms", headers=rooms.as_("crud-carol")).json()["rooms"] == []

    # Only room admins (or token admins) manage participants.
    r = http.put(
        f"{base}/v1/rooms/{room}/participants/crud-carol",
        json={"role": "member"},
        headers=rooms.as_("crud-bob"),
    )
    assert r.status_code == 403
    r = http.put(
        f"{base}/v1/rooms/{room}/participants/crud-carol",
        json={"role": "moderator"},
        headers=rooms.as_("alice"),
    )
    assert r.status_code == 200, r.text
    assert r.json()["participant"]["role"] == "moderator"
    assert r.json()["event"]["type"] == "participant.added"
    # Same role again: no event.
    r = http.put(
        f"{base}/v1/rooms/{room}/participants/crud-carol",
        json={"role": "moderator"},
        headers=rooms.as_("alice"),
    )
    assert r.status_code == 200 and r.json()["event"] is None

    people = http.get(f"{base}/v1/rooms/{room}/participants", headers=rooms.as_("crud-carol"))
    assert {p["id"]: p["role"] for p in people.json()["participants"]} == {
        "alice": "admin",
        "crud-bob": "member",
        "crud-carol": "moderator",
    }

    # A participant may leave on their own; removing twice is 404.
    r = http.delete(f"{base}/v1/rooms/{room}/participants/crud-bob", headers=rooms.as_("crud-bob"))
    assert r.status_code == 200 and r.json()["type"] == "participant.removed"
    r = http.delete(f"{base}/v1/rooms/{room}/participants/crud-bob", headers=rooms.as_("alice"))
    assert r.status_code == 404
    # Removal takes effect at once.
    assert http.get(f"{base}/v1/rooms/{room}", headers=rooms.as_("crud-bob")).status_code == 403
    assert rooms.post(room, "crud-bob", "still here?").status_code == 403

    r = http.delete(f"{base}/v1/rooms/{room}", headers=rooms.as_("crud-carol"))
    assert r.status_code == 403  # moderators do not delete rooms
    r = http.delete(f"{base}/v1/rooms/{room}", headers=rooms.as_("alice"))
    assert r.status_code == 204
    r = http.get(f"{base}/v1/rooms/{room}", headers=rooms.as_("root", roles=["admin"]))
    assert r.status_code == 404


def test_messages_edit_delete_and_moderation(rooms: RoomsClient) -> None:
    http, base = rooms.http, rooms.base_url
    room = rooms.create_room({"alice": "member", "bob": "member", "mod": "moderator"})
    r = rooms.post(room, "alice", "hello")
    assert r.status_code == 201, r.text
    msg = r.json()
    assert msg["text"] == "hello" and msg["author"] == "alice" and msg["seq"] == 5

    url = f"{base}/v1/rooms/{room}/messages/{msg['id']}"
    # Bob may not edit or delete Alice's message.
    assert (
        http.patch(url, json={"text": "bob was here"}, headers=rooms.as_("bob")).status_code == 403
    )
    assert http.delete(url, headers=rooms.as_("bob")).status_code == 403
    r = http.patch(url, json={"text": "hello, world", "data": {"k": 1}}, headers=rooms.as_("alice"))
    assert r.status_code == 200 and r.json()["type"] == "message.edited"
    got = http.get(url, headers=rooms.as_("bob")).json()
    assert got["text"] == "hello, world" and got["data"] == {"k": 1} and got["edited_at"]

    # A room moderator may delete it; a token moderator too (for another message).
    r = http.delete(url, headers=rooms.as_("mod"))
    assert r.status_code == 200 and r.json()["type"] == "message.deleted"
    assert http.delete(url, headers=rooms.as_("mod")).status_code == 409
    got = http.get(url, headers=rooms.as_("bob")).json()
    assert got["deleted"] is True and got["text"] is None
    second = rooms.post(room, "bob", "second").json()
    r = http.delete(
        f"{base}/v1/rooms/{room}/messages/{second['id']}",
        headers=rooms.as_("alice", roles=["moderator"]),
    )
    assert r.status_code == 200

    # History: a tombstone event, and the deleted content is not served.
    events = rooms.all_events(room)
    types = [e["type"] for e in events]
    assert types == [
        "room.created",
        "participant.added",
        "participant.added",
        "participant.added",
        "message.posted",
        "message.edited",
        "message.deleted",
        "message.posted",
        "message.deleted",
    ]
    assert [e["seq"] for e in events] == list(range(1, 10))
    assert events[4]["data"] == {"redacted": True}
    assert events[5]["data"] == {"redacted": True}


def test_history_pagination_both_directions(rooms: RoomsClient) -> None:
    room = rooms.create_room({"alice": "member"})
    for i in range(25):
        assert rooms.post(room, "alice", f"m{i}").status_code == 201
    # 2 setup events + 25 messages.
    newest = rooms.events(room, limit=10)
    assert [e["seq"] for e in newest["events"]] == list(range(18, 28))
    assert newest["has_more"] and newest["last_seq"] == 27
    older = rooms.events(room, before=newest["next_before"], limit=10)
    assert [e["seq"] for e in older["events"]] == list(range(8, 18))
    oldest = rooms.events(room, before=older["next_before"], limit=10)
    assert [e["seq"] for e in oldest["events"]] == list(range(1, 8))
    assert not oldest["has_more"]

    forward = rooms.events(room, after=0, limit=10)
    assert [e["seq"] for e in forward["events"]] == list(range(1, 11)) and forward["has_more"]
    rest = rooms.events(room, after=20, limit=100)
    assert [e["seq"] for e in rest["events"]] == list(range(21, 28))
    assert not rest["has_more"] and rest["next_after"] == 27
    window = rooms.events(room, after=5, before=9)
    assert [e["seq"] for e in window["events"]] == [6, 7, 8]


def test_idempotent_post(rooms: RoomsClient) -> None:
    http, base = rooms.http, rooms.base_url
    room = rooms.create_room({"alice": "member", "bob": "member"})
    key = new_key()
    first = rooms.post(room, "alice", "once", key=key)
    assert first.status_code == 201
    again = rooms.post(room, "alice", "once", key=key)
    assert again.status_code == 200
    assert (again.json()["id"], again.json()["seq"]) == (first.json()["id"], first.json()["seq"])
    # The key may come in the body too.
    body_retry = http.post(
        f"{base}/v1/rooms/{room}/messages",
        json={"text": "once", "idempotency_key": key},
        headers=rooms.as_("alice"),
    )
    assert body_retry.status_code == 200 and body_retry.json()["id"] == first.json()["id"]
    # Same key, different body: 409 and nothing stored.
    before = rooms.events(room)["last_seq"]
    conflict = rooms.post(room, "alice", "different", key=key)
    assert conflict.status_code == 409 and conflict.json()["error"] == "e.m.req.conflict"
    assert rooms.events(room)["last_seq"] == before
    # Keys are per participant: Bob's use of the same key is a new message.
    assert rooms.post(room, "bob", "once", key=key).status_code == 201
    # Header and body keys that differ are refused.
    r = http.post(
        f"{base}/v1/rooms/{room}/messages",
        json={"text": "x", "idempotency_key": new_key()},
        headers={**rooms.as_("alice"), "Idempotency-Key": new_key()},
    )
    assert r.status_code == 400


def test_reactions_are_a_set(rooms: RoomsClient) -> None:
    http, base = rooms.http, rooms.base_url
    room = rooms.create_room({"alice": "member", "bob": "member"})
    msg = rooms.post(room, "alice", "react to me").json()
    url = f"{base}/v1/rooms/{room}/messages/{msg['id']}/reactions"
    r = http.put(f"{url}/👍", headers=rooms.as_("bob"))
    assert r.status_code == 200 and r.json()["changed"] is True
    assert r.json()["event"]["type"] == "reaction.added"
    r = http.put(f"{url}/👍", headers=rooms.as_("bob"))
    assert r.json()["changed"] is False and r.json()["event"] is None
    http.put(f"{url}/👍", headers=rooms.as_("alice"))
    r = http.put(f"{url}/heart", headers=rooms.as_("alice"))
    assert r.json()["reactions"] == {"heart": ["alice"], "👍": ["bob", "alice"]}
    r = http.delete(f"{url}/👍", headers=rooms.as_("bob"))
    assert r.json()["changed"] is True and r.json()["reactions"]["👍"] == ["alice"]
    r = http.delete(f"{url}/👍", headers=rooms.as_("bob"))
    assert r.json()["changed"] is False
    # Non-participants cannot react.
    assert http.put(f"{url}/x", headers=rooms.as_("eve")).status_code == 403


@pytest.mark.parametrize(
    "body, status",
    [
        ({}, 400),
        ({"text": 5}, 400),
        ({"text": "ok", "extra": 1}, 400),
        ({"data": []}, 400),
        ({"text": "x" * (MAX_MESSAGE_BYTES + 1)}, 413),
        ({"text": "ok", "idempotency_key": ""}, 400),
    ],
    ids=["empty", "int-text", "extra-field", "list-data", "too-big", "empty-key"],
)
def test_invalid_posts_store_nothing(rooms: RoomsClient, body: dict[str, Any], status: int) -> None:
    room = rooms.create_room({"alice": "member"})
    before = rooms.events(room)["last_seq"]
    r = rooms.http.post(
        f"{rooms.base_url}/v1/rooms/{room}/messages", json=body, headers=rooms.as_("alice")
    )
    assert r.status_code == status, r.text
    assert set(r.json()) >= {"error", "detail"}
    assert rooms.events(room)["last_seq"] == before


@pytest.mark.parametrize(
    "raw, content_type, status",
    [
        (b"{", "application/json", 400),
        (b'{"text": NaN}', "application/json", 400),
        (b'{"text": 1e999}', "application/json", 400),
        (b'{"text": "\\ud800"}', "application/json", 400),
        (b"[" * 5000 + b"]" * 5000, "application/json", 400),
        (b"[" * 600_000 + b"]" * 600_000, "application/json", 413),
        (b'{"text": "x"}', "text/plain", 415),
        (b"", "application/json", 400),
    ],
    ids=["truncated", "nan", "infinite", "lone-surrogate", "deep", "huge", "text-plain", "empty"],
)
def test_malformed_bodies(rooms: RoomsClient, raw: bytes, content_type: str, status: int) -> None:
    room = rooms.create_room({"alice": "member"})
    r = rooms.http.post(
        f"{rooms.base_url}/v1/rooms/{room}/messages",
        content=raw,
        headers={**rooms.as_("alice"), "Content-Type": content_type},
    )
    assert r.status_code == status, r.text
    assert "error" in r.json()


def test_unknown_paths_and_methods_are_json(rooms: RoomsClient) -> None:
    http, base = rooms.http, rooms.base_url
    r = http.get(f"{base}/v1/rooms/x/nope", headers=rooms.as_("a"))
    assert r.status_code == 404 and r.json()["error"] == "e.m.req.not-found"
    r = http.patch(f"{base}/v1/rooms", headers=rooms.as_("a"))
    assert r.status_code == 405 and "GET" in r.headers["allow"]
    r = http.get(f"{base}/v1/rooms/bad%20id", headers=rooms.as_("a"))
    assert r.status_code == 404


def test_purge_erases_deleted_content(
    rooms: RoomsClient, rooms_server: ServerProcess, store_url: str
) -> None:
    """The servers here purge 0.5 s after a delete (DOVECOTE_ROOMS_PURGE_AFTER)."""
    http, base = rooms.http, rooms.base_url
    room = rooms.create_room({"alice": "member"})
    msg = rooms.post(room, "alice", "secret purge me").json()
    assert rooms.post(room, "alice", "kept").status_code == 201
    http.delete(f"{base}/v1/rooms/{room}/messages/{msg['id']}", headers=rooms.as_("alice"))
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        rows = query(
            store_url,
            rooms_server.data_dir,
            f"SELECT content, purged_at FROM room_messages WHERE id = '{msg['id']}'",
        )
        if rows[0][1] is not None:
            break
        time.sleep(0.2)
    assert rows[0][0] is None and rows[0][1] is not None
    data = [
        r[0]
        for r in query(
            store_url, rooms_server.data_dir, f"SELECT data FROM room_events WHERE room = '{room}'"
        )
    ]
    assert not any("secret purge me" in d for d in data)
    assert any('"kept"' in d for d in data)  # only the deleted message's content goes
