"""Rooms authentication and authorisation against a real server: expired, wrong issuer,
wrong key, unusable algorithms, wrong room, wrong role; issuer key rotation without a
restart. Every refusal is 401/403 JSON and changes nothing."""

from __future__ import annotations

import base64
import http.server
import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import ECKey, OctKey, OKPKey

from support.rooms import Issuer, RoomsClient


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unsigned(claims: dict[str, object]) -> str:
    header = _b64(json.dumps({"alg": "none"}).encode())
    return f"{header}.{_b64(json.dumps(claims).encode())}."


def _claims(sub: str = "alice", **extra: object) -> dict[str, object]:
    now = int(time.time())
    return {"sub": sub, "iss": "https://issuer.test", "exp": now + 600, "rooms": "*", **extra}


def test_bad_tokens_get_401(rooms: RoomsClient, issuer: Issuer) -> None:
    room = rooms.create_room({"alice": "member"})
    url = f"{rooms.base_url}/v1/rooms/{room}/messages"
    stranger = OKPKey.generate_key("Ed25519", parameters={"kid": "ed-1"})  # same kid
    hmac = OctKey.generate_key(256, parameters={"kid": "ed-1"})
    tokens = {
        "expired": issuer.token("alice", ttl=-3600),
        "wrong issuer": issuer.token("alice", iss="https://evil.test"),
        "unknown key": jwt.encode(
            {"alg": "ES256", "kid": "nope"},
            _claims(),
            ECKey.generate_key("P-256"),
            algorithms=["ES256"],
        ),
        "forged with the same kid": jwt.encode(
            {"alg": "EdDSA", "kid": "ed-1"}, _claims(), stranger, algorithms=["EdDSA"]
        ),
        "alg none": _unsigned(_claims()),
        "hmac": jwt.encode({"alg": "HS256", "kid": "ed-1"}, _claims(), hmac, algorithms=["HS256"]),
        "no sub": issuer.token("", extra={"sub": None}),
        "rooms not a list": issuer.token("alice", extra={"rooms": 5}),
        "garbage": "a.b.c",
    }
    for name, token in tokens.items():
        r = rooms.http.post(url, json={"text": "x"}, headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 401, (name, r.text)
        assert r.json()["error"] == "e.m.trust.token", name
        assert r.headers["www-authenticate"].startswith("Bearer")
    for headers in ({}, {"Authorization": "Basic YTpi"}, {"Authorization": "Bearer"}):
        r = rooms.http.post(url, json={"text": "x"}, headers=headers)
        assert r.status_code == 401
    assert rooms.events(room)["last_seq"] == 2  # nothing stored


def test_both_key_types_verify(rooms: RoomsClient) -> None:
    room = rooms.create_room({"alice": "member"})
    for key in ("ed", "es"):
        r = rooms.http.post(
            f"{rooms.base_url}/v1/rooms/{room}/messages",
            json={"text": key},
            headers=rooms.as_("alice", key=key),
        )
        assert r.status_code == 201, r.text


def test_wrong_room_and_wrong_role_get_403(rooms: RoomsClient) -> None:
    room = rooms.create_room({"alice": "member", "bob": "moderator"})
    other = rooms.create_room({"alice": "member"})
    base = rooms.base_url
    narrow = rooms.as_("alice", rooms=[other])
    assert rooms.http.get(f"{base}/v1/rooms/{room}", headers=narrow).status_code == 403
    r = rooms.http.post(f"{base}/v1/rooms/{room}/messages", json={"text": "x"}, headers=narrow)
    assert r.status_code == 403 and r.json()["error"] == "e.p.req.forbidden"
    assert rooms.http.get(f"{base}/v1/rooms/{other}", headers=narrow).status_code == 200
    # Listing shows only what the token grants.
    listed = rooms.http.get(f"{base}/v1/rooms", headers=narrow).json()["rooms"]
    assert [r["id"] for r in listed] == [other]
    # Roles: creating rooms and managing participants need admin.
    r = rooms.http.post(
        f"{base}/v1/rooms", json={"name": "x"}, headers=rooms.as_("bob", roles=["moderator"])
    )
    assert r.status_code == 403
    r = rooms.http.put(
        f"{base}/v1/rooms/{room}/participants/eve", json={"role": "admin"}, headers=rooms.as_("bob")
    )
    assert r.status_code == 403
    r = rooms.http.delete(f"{base}/v1/rooms/{room}", headers=rooms.as_("alice"))
    assert r.status_code == 403
    assert rooms.events(room)["last_seq"] == 3  # nothing changed


def test_issuer_keys_rotate_without_restart(rooms: RoomsClient, issuer: Issuer) -> None:
    room = rooms.create_room({"alice": "member"})
    url = f"{rooms.base_url}/v1/rooms/{room}/messages"
    issuer.keys["rotated"] = ECKey.generate_key("P-256", parameters={"kid": "es-2"})
    try:
        token = issuer.token("alice", key="rotated")
        # Not yet published: unknown key.
        before = rooms.http.post(
            url, json={"text": "1"}, headers={"Authorization": f"Bearer {token}"}
        )
        assert before.status_code == 401
        issuer.publish()
        after = rooms.http.post(
            url, json={"text": "2"}, headers={"Authorization": f"Bearer {token}"}
        )
        assert after.status_code == 201, after.text
        # Retire the old Ed25519 key: its tokens stop working at once.
        issuer.publish(["es", "rotated"])
        r = rooms.http.post(url, json={"text": "3"}, headers=rooms.as_("alice", key="ed"))
        assert r.status_code == 401
    finally:
        issuer.keys.pop("rotated")
        issuer.publish()
    r = rooms.http.post(url, json={"text": "4"}, headers=rooms.as_("alice", key="ed"))
    assert r.status_code == 201


@pytest.mark.parametrize("header", ["Bearer " + "a" * 9000, "Bearer a.b", "Bearer ...."])
def test_malformed_tokens_never_500(rooms: RoomsClient, header: str) -> None:
    r = rooms.http.get(f"{rooms.base_url}/v1/rooms", headers={"Authorization": header})
    assert r.status_code == 401


def test_jwks_url_is_refetched(server_factory: Any, tmp_path: Path) -> None:
    """Keys from a JWKS URL: a key published there later is picked up by the periodic
    refetch (DOVECOTE_ROOMS_JWKS_REFRESH), without a restart."""
    issuer = Issuer(tmp_path / "served.json")
    issuer.publish(["ed"])

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = issuer.jwks_path.read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        server = server_factory(
            env={
                "DOVECOTE_ROOMS_JWKS_URL": f"http://127.0.0.1:{httpd.server_port}/jwks.json",
                "DOVECOTE_ROOMS_JWKS_REFRESH": "0.5",
                # An issuer on loopback: allowed by network, not by allowing everything private.
                "DOVECOTE_OUTBOUND_ALLOW_NETWORKS": "127.0.0.0/8",
                "DOVECOTE_ROOMS_JWT_ISSUER": issuer.iss,
            }
        )
        url = f"{server.base_url}/v1/rooms"
        assert httpx.get(url, headers=issuer.headers("a", key="ed")).status_code == 200
        assert httpx.get(url, headers=issuer.headers("a", key="es")).status_code == 401
        issuer.publish(["ed", "es"])
        deadline = time.monotonic() + 10
        status = 0
        while time.monotonic() < deadline and status != 200:
            time.sleep(0.3)
            status = httpx.get(url, headers=issuer.headers("a", key="es")).status_code
        assert status == 200
    finally:
        httpd.shutdown()
