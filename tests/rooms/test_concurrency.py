"""Many writers at once: posts retried concurrently with the same idempotency keys,
conflicting key reuse, duplicate reactions racing each other. Exactly one message per
key, reaction sets exact, and the event stream has no gap and no duplicate."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from typing import Any

import httpx

from support.rooms import RoomsClient

WRITERS = 6
POSTS_EACH = 8
COPIES = 3  # each post is sent this many times at once
REACTED = 4  # messages every writer reacts to


async def test_many_writers_retrying_and_reacting(rooms: RoomsClient) -> None:
    writers = [f"w{i}" for i in range(WRITERS)]
    room = rooms.create_room(dict.fromkeys(writers, "member"))
    base = f"{rooms.base_url}/v1/rooms/{room}/messages"
    headers = {w: rooms.as_(w) for w in writers}
    limit = asyncio.Semaphore(32)

    async def call(http: httpx.AsyncClient, method: str, url: str, **kw: Any) -> httpx.Response:
        async with limit:
            return await http.request(method, url, **kw)

    async with httpx.AsyncClient(timeout=60) as http:
        # Phase 1: every post goes out COPIES times concurrently with one key.
        jobs = []
        for w in writers:
            for n in range(POSTS_EACH):
                key, text = str(uuid.uuid4()), f"{w} says {n}"
                for _ in range(COPIES):
                    jobs.append(
                        (
                            w,
                            key,
                            text,
                            call(
                                http,
                                "POST",
                                base,
                                json={"text": text},
                                headers={**headers[w], "Idempotency-Key": key},
                            ),
                        )
                    )
        responses = await asyncio.gather(*(job[3] for job in jobs))
        by_key: dict[str, set[tuple[str, int]]] = {}
        statuses: Counter[int] = Counter()
        for (w, key, text, _), r in zip(jobs, responses, strict=True):
            statuses[r.status_code] += 1
            assert r.status_code in (200, 201), r.text
            body = r.json()
            assert body["author"] == w and body["text"] == text
            by_key.setdefault(key, set()).add((body["id"], body["seq"]))
        assert all(len(v) == 1 for v in by_key.values())  # one message per key
        assert statuses[201] == WRITERS * POSTS_EACH  # exactly one original per key

        # Phase 2: late retries return the original; reuse with another body is 409.
        keyed = {key: (w, text) for (w, key, text, _) in jobs}
        retries = await asyncio.gather(
            *(
                call(
                    http,
                    "POST",
                    base,
                    json={"text": text},
                    headers={**headers[w], "Idempotency-Key": key},
                )
                for key, (w, text) in keyed.items()
            )
        )
        for (key, _), r in zip(keyed.items(), retries, strict=True):
            assert r.status_code == 200 and {(r.json()["id"], r.json()["seq"])} == by_key[key]
        conflicts = await asyncio.gather(
            *(
                call(
                    http,
                    "POST",
                    base,
                    json={"text": "something else"},
                    headers={**headers[w], "Idempotency-Key": key},
                )
                for key, (w, _) in list(keyed.items())[:WRITERS]
            )
        )
        assert all(r.status_code == 409 for r in conflicts)

        # Phase 3: everyone adds 👍 and ❤ to the same messages, each twice, at once.
        targets = sorted(next(iter(v))[0] for v in by_key.values())[:REACTED]
        adds = [
            call(http, "PUT", f"{base}/{m}/reactions/{emoji}", headers=headers[w])
            for m in targets
            for w in writers
            for emoji in ("👍", "❤")
            for _ in range(2)
        ]
        assert all(r.status_code == 200 for r in await asyncio.gather(*adds))
        # Phase 4: the even writers take back their 👍 (twice, at once).
        removes = [
            call(http, "DELETE", f"{base}/{m}/reactions/👍", headers=headers[w])
            for m in targets
            for w in writers[::2]
            for _ in range(2)
        ]
        assert all(r.status_code == 200 for r in await asyncio.gather(*removes))

        for m in targets:
            got = (await http.get(f"{base}/{m}", headers=headers[writers[0]])).json()
            assert sorted(got["reactions"]["👍"]) == sorted(writers[1::2])
            assert sorted(got["reactions"]["❤"]) == sorted(writers)

    events = rooms.all_events(room)
    setup = 1 + WRITERS
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert len({e["id"] for e in events}) == len(events)
    kinds = Counter(e["type"] for e in events)
    assert kinds["message.posted"] == WRITERS * POSTS_EACH
    assert kinds["reaction.added"] == REACTED * WRITERS * 2
    assert kinds["reaction.removed"] == REACTED * len(writers[::2])
    assert len(events) == setup + sum(
        kinds[k] for k in kinds if k.startswith(("message", "reaction"))
    )
