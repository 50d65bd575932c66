"""The HTTP routes besides POST /: invitation, /oob, landing page, health, metrics, admin,
rooms API basics (fast twins of tests/integration/test_invitation.py, test_metrics.py,
tests/security/test_operator_files.py and tests/rooms/test_api.py)."""

from __future__ import annotations

import base64
import json
import re
import uuid
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from fast.instance import ADMIN_TOKEN, BASE_URL, Fast
from support.agent import BASIC, PICKUP, forward_to
from support.inspect import metric_value

ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}


def decoded_oob(url: str) -> dict[str, Any]:
    encoded = parse_qs(urlsplit(url).query)["_oob"][0]
    return dict(json.loads(base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))))


async def test_invitation_formats_short_url_and_landing_page(fast: Fast) -> None:
    first = (await fast.client.get("/invitation")).json()
    assert first["type"] == "https://didcomm.org/out-of-band/2.0/invitation"
    assert first["from"] == fast.did
    assert first["body"]["goal_code"] == "request-mediate"
    assert (await fast.client.get("/invitation")).json()["id"] == first["id"], "stable id"

    as_json = await fast.client.get("/oob", headers={"accept": "application/json"})
    assert as_json.status_code == 200 and as_json.json() == first
    browser = await fast.client.get("/oob", headers={"accept": "text/html"})
    assert browser.status_code == 302
    target = browser.headers["location"]
    assert target.startswith(BASE_URL + "/?_oob=") and decoded_oob(target) == first
    assert (await fast.client.get("/invitation?format=url")).text == target

    svg = await fast.client.get("/invitation?format=svg")
    assert svg.status_code == 200 and svg.headers["content-type"] == "image/svg+xml"
    assert svg.content.lstrip().startswith(b"<?xml") or b"<svg" in svg.content[:200]
    png = await fast.client.get("/invitation?format=png")
    assert png.headers["content-type"] == "image/png"
    assert png.content.startswith(b"\x89PNG")
    bad = await fast.client.get("/invitation?format=gif")
    assert bad.status_code == 400 and bad.json()["error"] == "e.m.msg.malformed"

    page = await fast.client.get(target, headers={"accept": "text/html"})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert fast.did in page.text and f"{BASE_URL}/oob" in page.text and "<svg" in page.text
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert not re.search(r"<(script|link|img|iframe)\b", page.text)
    assert "Dovecote DIDComm v2 mediator" in (await fast.client.get("/")).text


async def test_v1_invitation(fast: Fast) -> None:
    response = await fast.client.get("/invitation/v1")
    assert response.status_code == 200, response.text
    assert response.json()["@type"].endswith("/invitation")


async def test_health_endpoints(fast: Fast) -> None:
    live = await fast.client.get("/health/live")
    assert live.status_code == 200 and live.json() == {"status": "ok"}
    ready = await fast.client.get("/health/ready")
    assert ready.status_code == 200
    assert ready.json() == {
        "ready": True,
        "draining": False,
        "degradation": "normal",
        "store": {"ok": True},
    }
    # Without the token: status and level only; with it: the details.
    public = await fast.client.get("/health")
    assert public.status_code == 200
    assert public.json() == {"status": "ok", "degradation": "normal"}
    detailed = await fast.client.get("/health", headers=ADMIN)
    assert detailed.status_code == 200
    assert {"instance", "checks", "version", "ready"} <= set(detailed.json())
    assert detailed.json()["instance"] == fast.dovecote.instance_id
    wrong = await fast.client.get("/health", headers={"authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"] == "admin_unauthorized"


async def test_ready_turns_503_while_draining(fast: Fast) -> None:
    fast.dovecote.begin_drain()
    ready = await fast.client.get("/health/ready")
    assert ready.status_code == 503 and ready.headers["retry-after"] == "5"
    assert ready.json()["draining"] is True
    alice = fast.agent()
    refused = await fast.post(await alice.pack(alice.message(f"{PICKUP}/status-request")))
    assert refused.status_code == 503 and refused.json()["error"] == "e.m.me.res.overloaded"
    assert int(refused.headers["retry-after"]) >= 1


async def test_metrics_move_by_exactly_the_workload(fast: Fast) -> None:
    alice = fast.agent()
    await alice.mediate(fast.client)
    before = await fast.scrape()
    packed = [
        await forward_to(BASE_URL, alice, {"type": BASIC, "body": {"n": i}}) for i in range(3)
    ]
    for body in packed:
        assert (await fast.post(body)).status_code == 202
    assert (await fast.post(packed[0])).status_code == 202  # a retry: a duplicate
    delivery = await alice.request(fast.client, f"{PICKUP}/delivery-request", {"limit": 10})
    ids = [a["id"] for a in delivery["attachments"]]
    await alice.request(fast.client, f"{PICKUP}/messages-received", {"message_id_list": ids[:2]})
    response = await fast.client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    after = response.text

    def delta(name: str, **labels: str) -> float:
        return metric_value(after, name, **labels) - metric_value(before, name, **labels)

    assert delta("dovecote_messages_accepted_total") == 3
    assert delta("dovecote_messages_duplicate_total") == 1
    assert delta("dovecote_messages_delivered_total", mode="pickup") == 3
    assert delta("dovecote_messages_acknowledged_total") == 2
    assert delta("dovecote_message_ack_latency_seconds_count") == 2
    assert (
        delta(
            "dovecote_didcomm_messages_total",
            protocol="routing/2.0",
            message_type="forward",
            outcome="ok",
        )
        == 4
    )
    assert (
        delta(
            "dovecote_didcomm_messages_total",
            protocol="messagepickup/3.0",
            message_type="delivery-request",
            outcome="ok",
        )
        == 1
    )
    # The scrape itself is not in `before`; 4 forwards and 2 pickup calls are.
    assert delta("dovecote_http_requests_total", route="/", method="POST", status="202") == 4
    assert delta("dovecote_http_requests_total", route="/", method="POST", status="200") == 2
    assert delta("dovecote_http_request_duration_seconds_count", route="/", method="POST") == 6
    assert delta("dovecote_store_transaction_duration_seconds_count", op="commit") >= 3


async def test_metric_labels_stay_bounded(fast: Fast) -> None:
    for _ in range(5):
        stranger = fast.agent(via_mediator=False)
        await stranger.send_http(
            fast.client, stranger.message(f"https://example.org/{uuid.uuid4()}/1.0/x")
        )
        assert (await fast.client.get(f"/no/such/{uuid.uuid4()}")).status_code == 404
    text = await fast.scrape()
    series: dict[str, int] = {}
    for line in text.splitlines():
        if line.startswith("#") or "{" not in line:
            continue
        name, labels = line.split("{", 1)
        assert "did:" not in labels, line
        assert not re.search(r"[0-9a-f]{8}-[0-9a-f]{4}-", labels), line
        series[name] = series.get(name, 0) + 1
    assert max(series.values()) < 300, series
    assert metric_value(text, "dovecote_http_requests_total", route="other") >= 5
    assert metric_value(text, "dovecote_didcomm_messages_total", protocol="unknown") >= 5


@pytest.mark.fast_settings(metrics_allow=["127.0.0.2/32"])
async def test_metrics_allowlist(fast: Fast) -> None:
    refused = await fast.client.get("/metrics")
    assert refused.status_code == 403 and refused.json()["error"] == "metrics_forbidden"
    scraper = await fast.client_from("127.0.0.2")
    assert (await scraper.get("/metrics")).status_code == 200


async def test_admin_needs_the_token(fast: Fast) -> None:
    missing = await fast.client.get("/admin/dlq")
    assert missing.status_code == 401 and missing.json()["error"] == "admin_unauthorized"
    ok = await fast.client.get("/admin/dlq", headers=ADMIN)
    assert ok.status_code == 200, ok.text
    cluster = await fast.client.get("/admin/cluster", headers=ADMIN)
    assert cluster.status_code == 200, cluster.text
    level = await fast.client.get("/admin/degradation", headers=ADMIN)
    assert level.json()["level"] == "normal"
    # Outside ADMIN_ALLOW, even the right token is refused.
    outsider = await fast.client_from("10.1.2.3")
    assert (await outsider.get("/admin/dlq", headers=ADMIN)).status_code == 403


@pytest.mark.fast_settings(admin_allow=["127.0.0.0/8"])
async def test_failed_admin_auth_is_throttled_per_address(fast: Fast) -> None:
    attacker = await fast.client_from("127.0.0.1")
    operator = await fast.client_from("127.0.0.2")
    answers = [
        await attacker.get("/admin/dlq", headers={"authorization": f"Bearer guess-{i}"})
        for i in range(5)
    ]
    assert [a.status_code for a in answers] == [401] * 5
    throttled = await attacker.get("/admin/dlq", headers=ADMIN)
    assert throttled.status_code == 429 and throttled.json()["error"] == "admin_throttled"
    assert 1 <= int(throttled.headers["retry-after"]) <= 60
    assert (await operator.get("/admin/dlq", headers=ADMIN)).status_code == 200


async def test_read_only_degradation_refuses_forwards_and_keeps_pickup(fast: Fast) -> None:
    alice = fast.agent()
    await alice.mediate(fast.client)
    forced = await fast.client.post(
        "/admin/degradation", headers=ADMIN, json={"level": "read-only"}
    )
    assert forced.json() == {"level": "read-only", "forced": True}
    packed = await forward_to(BASE_URL, alice, {"type": BASIC, "body": {}})
    before = fast.snapshot()
    refused = await fast.post(packed)
    assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"] == "e.m.me.unavailable"
    assert fast.snapshot() == before
    status = await alice.request(fast.client, f"{PICKUP}/status-request")
    assert status["body"]["message_count"] == 0
    health = (await fast.client.get("/health", headers=ADMIN)).json()
    assert health["degradation"] == "read-only" and health["degradation_forced"] is True
    await fast.client.post("/admin/degradation", headers=ADMIN, json={"level": "auto"})
    assert (await fast.post(packed)).status_code == 202


async def test_rooms_api_basics(fast: Fast) -> None:
    def as_(sub: str, **kwargs: Any) -> dict[str, str]:
        return {"authorization": f"Bearer {fast.issuer.token(sub, **kwargs)}"}

    assert (await fast.client.get("/v1/rooms")).status_code == 401
    created = await fast.client.post(
        "/v1/rooms",
        headers=as_("root", roles=["admin"]),
        json={
            "id": "fast-1",
            "name": "fast room",
            "participants": [{"id": "alice", "role": "admin"}, {"id": "bob", "role": "member"}],
        },
    )
    assert created.status_code == 201, created.text
    again = await fast.client.post(
        "/v1/rooms", headers=as_("root", roles=["admin"]), json={"id": "fast-1", "name": "x"}
    )
    assert again.status_code == 409 and again.json()["error"] == "e.m.req.conflict"
    assert (
        await fast.client.post("/v1/rooms", headers=as_("alice"), json={"name": "x"})
    ).status_code == 403

    listed = (await fast.client.get("/v1/rooms", headers=as_("bob"))).json()
    assert [r["id"] for r in listed["rooms"]] == ["fast-1"]
    assert (await fast.client.get("/v1/rooms", headers=as_("carol"))).json()["rooms"] == []

    posted = await fast.client.post(
        "/v1/rooms/fast-1/messages", headers=as_("bob"), json={"text": "hi"}
    )
    assert posted.status_code == 201, posted.text
    history = await fast.client.get(
        "/v1/rooms/fast-1/events", headers=as_("alice"), params={"after": 0}
    )
    events = history.json()["events"]
    assert [e["type"] for e in events][-1] == "message.posted", events
    assert events[-1]["data"]["text"] == "hi" and history.json()["last_seq"] == 4
    stranger = await fast.client.post(
        "/v1/rooms/fast-1/messages", headers=as_("carol"), json={"text": "let me in"}
    )
    assert stranger.status_code == 403
    assert fast.query("SELECT COUNT(*) FROM room_messages") == [(1,)]

    missing = await fast.client.get("/v1/rooms/x/nope", headers=as_("a"))
    assert missing.status_code == 404 and missing.json()["error"] == "e.m.req.not-found"
    wrong = await fast.client.patch("/v1/rooms", headers=as_("a"))
    assert wrong.status_code == 405 and "GET" in wrong.headers["allow"]
    openapi = await fast.client.get("/openapi.json")
    assert openapi.status_code == 200 and "/v1/rooms" in openapi.json()["paths"]


@pytest.mark.parametrize(
    ("raw", "content_type", "status"),
    [
        (b"{", "application/json", 400),
        (b'{"text": NaN}', "application/json", 400),
        (b"[" * 5000 + b"]" * 5000, "application/json", 400),
        (b'{"text": "x"}', "text/plain", 415),
        (b"", "application/json", 400),
        (b"{}", "application/json", 400),
    ],
    ids=["truncated", "nan", "deep", "text-plain", "empty", "no-text"],
)
async def test_rooms_bad_bodies_store_nothing(
    fast: Fast, raw: bytes, content_type: str, status: int
) -> None:
    room = await fast.create_room("alice")
    token = fast.issuer.token("alice")
    response = await fast.client.post(
        f"/v1/rooms/{room}/messages",
        content=raw,
        headers={"authorization": f"Bearer {token}", "content-type": content_type},
    )
    assert response.status_code == status, response.text
    assert {"error", "detail"} <= set(response.json())
    assert fast.query("SELECT COUNT(*) FROM room_messages") == [(0,)]


async def test_console_login_session_and_csrf(fast: Fast) -> None:
    page = await fast.client.get("/console/mailboxes")
    assert page.status_code == 401 and 'name="token"' in page.text
    assert "default-src 'none'" in page.headers["content-security-policy"]
    wrong = await fast.client.post("/console/login", data={"token": "nope", "next": "/console/"})
    assert wrong.status_code in (401, 403) and "Sign out" not in wrong.text
    login = await fast.client.post(
        "/console/login", data={"token": ADMIN_TOKEN, "next": "/console/"}
    )
    assert login.status_code in (302, 303), login.text
    assert login.headers["location"].endswith("/console/")
    inside = await fast.client.get("/console/mailboxes")
    assert inside.status_code == 200 and "Sign out" in inside.text
    # A state change without the page's CSRF token is refused and changes nothing.
    forged = await fast.client.post("/console/degradation", data={"level": "read-only"})
    assert forged.status_code == 403
    assert fast.dovecote.degradation.level == "normal"


async def test_rooms_edit_delete_reactions_and_idempotent_posts(fast: Fast) -> None:
    def as_(sub: str, **kwargs: Any) -> dict[str, str]:
        return {"authorization": f"Bearer {fast.issuer.token(sub, **kwargs)}"}

    created = await fast.client.post(
        "/v1/rooms",
        headers=as_("root", roles=["admin"]),
        json={
            "name": "r",
            "participants": [
                {"id": "alice", "role": "member"},
                {"id": "bob", "role": "member"},
                {"id": "mod", "role": "moderator"},
            ],
        },
    )
    room = created.json()["id"]
    key = str(uuid.uuid4())
    first = await fast.client.post(
        f"/v1/rooms/{room}/messages",
        json={"text": "once"},
        headers={**as_("alice"), "Idempotency-Key": key},
    )
    assert first.status_code == 201, first.text
    again = await fast.client.post(
        f"/v1/rooms/{room}/messages",
        json={"text": "once"},
        headers={**as_("alice"), "Idempotency-Key": key},
    )
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    conflict = await fast.client.post(
        f"/v1/rooms/{room}/messages",
        json={"text": "other"},
        headers={**as_("alice"), "Idempotency-Key": key},
    )
    assert conflict.status_code == 409 and conflict.json()["error"] == "e.m.req.conflict"
    assert fast.query("SELECT COUNT(*) FROM room_messages") == [(1,)]

    url = f"/v1/rooms/{room}/messages/{first.json()['id']}"
    assert (
        await fast.client.patch(url, json={"text": "bob was here"}, headers=as_("bob"))
    ).status_code == 403
    edited = await fast.client.patch(url, json={"text": "edited"}, headers=as_("alice"))
    assert edited.status_code == 200 and edited.json()["type"] == "message.edited"
    liked = await fast.client.put(f"{url}/reactions/heart", headers=as_("bob"))
    assert liked.json()["changed"] is True and liked.json()["reactions"] == {"heart": ["bob"]}
    twice = await fast.client.put(f"{url}/reactions/heart", headers=as_("bob"))
    assert twice.json()["changed"] is False
    assert (await fast.client.put(f"{url}/reactions/x", headers=as_("eve"))).status_code == 403
    deleted = await fast.client.delete(url, headers=as_("mod"))
    assert deleted.status_code == 200 and deleted.json()["type"] == "message.deleted"
    assert (await fast.client.delete(url, headers=as_("mod"))).status_code == 409
    got = (await fast.client.get(url, headers=as_("bob"))).json()
    assert got["deleted"] is True and got["text"] is None
