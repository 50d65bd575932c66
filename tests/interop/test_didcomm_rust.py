"""The whole mediation flow driven by a second independent stack: SICPA's didcomm-rust
(wasm, npm `didcomm-node`), through tests/interop/node/driver.mjs.

Covers Coordinate Mediation 3.0 and 2.0, forward (wrapped by didcomm-rust's own
wrap_in_forward), Pickup 3.0 status / delivery / messages-received, live mode over
WebSocket with acknowledgement, trust ping, discover features and problem reports, and
issue 12's spec points: every envelope's `typ` (12.1), live mode leaving the queue alone
(12.2), replies without return_route never queued (12.3), problem reports as HTTP 200 (12.4).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from interop.rust_agent import RustDriver
from support.server import ServerProcess, running_server

CM2 = "https://didcomm.org/coordinate-mediation/2.0"
CM3 = "https://didcomm.org/coordinate-mediation/3.0"
PICKUP = "https://didcomm.org/messagepickup/3.0"
PING = "https://didcomm.org/trust-ping/2.0"
DISCOVER = "https://didcomm.org/discover-features/2.0"
PROBLEM = "https://didcomm.org/report-problem/2.0/problem-report"
BASIC = "https://didcomm.org/basicmessage/2.0/message"
ENCRYPTED = "application/didcomm-encrypted+json"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_server(tmp_path_factory.mktemp("rust")) as server:
        yield server


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RustDriver]:
    driver = RustDriver(tmp_path_factory.mktemp("node") / "driver.log")
    yield driver
    driver.close()


class Peer:
    """One didcomm-rust agent inside the driver, talking to one mediator."""

    count = 0

    def __init__(self, driver: RustDriver, server: ServerProcess, routed: bool = True) -> None:
        Peer.count += 1
        self.name = f"agent{Peer.count}"
        self.driver, self.server = driver, server
        self.url = server.base_url + "/"
        self.routing_keys = [f"{server.did}#key-2"]
        services = [{"uri": self.url, "routing_keys": self.routing_keys}] if routed else []
        self.did: str = driver.call("agent", name=self.name, services=services)["did"]

    def request(
        self, msg_type: str, body: dict[str, Any] | None = None, return_route: bool = True
    ) -> dict[str, Any]:
        answer = self.driver.call(
            "request",
            agent=self.name,
            to=self.server.did,
            url=self.url,
            type=msg_type,
            body=body or {},
            return_route=return_route,
        )
        if "message" in answer:
            assert answer["content_type"].startswith(ENCRYPTED)
            _check_envelope(answer, self.server.did)
        return answer

    def reply(self, msg_type: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        answer = self.request(msg_type, body)
        assert answer["status"] == 200, answer
        message: dict[str, Any] = answer["message"]
        assert message.get("thid") == answer["id"] or message.get("pthid") == answer["id"]
        return message

    def forward_to(self, recipient: Peer, content: str, sender: Peer | None = None) -> str:
        answer = self.driver.call(
            "forward",
            url=self.url,
            sender=sender.name if sender else None,
            recipient=recipient.did,
            routing_keys=recipient.routing_keys,
            type=BASIC,
            body={"content": content},
        )
        assert answer["status"] == 202, answer
        assert answer["protected"]["typ"] == ENCRYPTED  # what didcomm-rust itself writes
        return str(answer["id"])

    def open_attachments(self, delivery: dict[str, Any]) -> dict[str, str]:
        """attachment id -> inner content, decrypted by didcomm-rust."""
        opened = {}
        for attachment in delivery.get("attachments") or []:
            inner = self.driver.call("open_attachment", attachment=attachment)
            opened[attachment["id"]] = inner["message"]["body"]["content"]
        return opened

    # WebSocket
    def ws_open(self) -> str:
        socket = f"{self.name}-ws{Peer.count}"
        Peer.count += 1
        self.driver.call("ws_open", id=socket, url=self.server.ws_url)
        return socket

    def ws_send(self, socket: str, msg_type: str, body: dict[str, Any] | None = None) -> str:
        return str(
            self.driver.call(
                "ws_send",
                id=socket,
                agent=self.name,
                to=self.server.did,
                type=msg_type,
                body=body or {},
            )["id"]
        )

    def ws_recv(self, socket: str, timeout: float = 10) -> dict[str, Any] | None:
        frame = self.driver.call("ws_recv", id=socket, timeout=timeout)
        if frame.get("timeout"):
            return None
        _check_envelope(frame, self.server.did)
        message: dict[str, Any] = frame["message"]
        return message


def _check_envelope(answer: dict[str, Any], mediator: str) -> None:
    """Issue 12.1, as didcomm-rust sees it: authcrypt from the mediator, spec media type."""
    assert answer["protected"]["typ"] == ENCRYPTED, answer["protected"]
    assert answer["protected"]["alg"].startswith("ECDH-1PU"), answer["protected"]
    metadata = answer["metadata"]
    assert metadata["encrypted"] and metadata["authenticated"], metadata
    assert answer["message"]["from"] == mediator


def _mediate(peer: Peer, version: str) -> dict[str, Any]:
    grant = peer.reply(f"{version}/mediate-request")
    assert grant["type"] == f"{version}/mediate-grant", grant
    name = "recipient-update" if version == CM3 else "keylist-update"
    update = peer.reply(
        f"{version}/{name}", {"updates": [{"recipient_did": peer.did, "action": "add"}]}
    )
    assert update["type"] == f"{version}/{name}-response"
    assert update["body"]["updated"] == [
        {"recipient_did": peer.did, "action": "add", "result": "success"}
    ]
    return grant


@pytest.mark.parametrize("version", [CM3, CM2], ids=["cm3", "cm2"])
def test_mediate_forward_status_delivery_ack(
    server: ServerProcess, driver: RustDriver, version: str
) -> None:
    alice = Peer(driver, server)
    grant = _mediate(alice, version)
    routing = grant["body"]["routing_did"]
    assert routing == (server.did if version == CM2 else [server.did])
    listed = alice.reply(f"{CM3}/recipient-query" if version == CM3 else f"{CM2}/keylist-query", {})
    assert alice.did in json.dumps(listed["body"])

    bob = Peer(driver, server, routed=False)
    texts = [f"hello {i} via {version}" for i in range(3)]
    for text in texts:
        bob.forward_to(alice, text, sender=bob)
    status = alice.reply(f"{PICKUP}/status-request")
    assert status["type"] == f"{PICKUP}/status"
    assert status["body"]["message_count"] == 3 and status["body"]["live_delivery"] is False

    delivery = alice.reply(f"{PICKUP}/delivery-request", {"limit": 10})
    assert delivery["type"] == f"{PICKUP}/delivery"
    opened = alice.open_attachments(delivery)
    assert sorted(opened.values()) == sorted(texts)
    ack = alice.reply(f"{PICKUP}/messages-received", {"message_id_list": list(opened)})
    assert ack["type"] == f"{PICKUP}/status" and ack["body"]["message_count"] == 0
    empty = alice.reply(f"{PICKUP}/delivery-request", {"limit": 10})
    assert empty["type"] == f"{PICKUP}/status" and empty["body"]["message_count"] == 0


def test_trust_ping_and_discover_features(server: ServerProcess, driver: RustDriver) -> None:
    carol = Peer(driver, server, routed=False)
    pong = carol.reply(f"{PING}/ping", {"response_requested": True})
    assert pong["type"] == f"{PING}/ping-response"
    disclose = carol.reply(
        f"{DISCOVER}/queries",
        {"queries": [{"feature-type": "protocol", "match": "https://didcomm.org/*"}]},
    )
    assert disclose["type"] == f"{DISCOVER}/disclose"
    ids = {d["id"] for d in disclose["body"]["disclosures"]}
    assert {
        CM2,
        CM3,
        PICKUP,
        PING,
        DISCOVER,
        "https://didcomm.org/routing/2.0",
        "https://didcomm.org/report-problem/2.0",
    } <= ids


def test_problem_reports_are_http_200_with_the_packed_report(
    server: ServerProcess, driver: RustDriver
) -> None:
    # Issue 12.4: with return_route the problem report is delivered with HTTP 200.
    mallory = Peer(driver, server)
    answer = mallory.request(f"{PICKUP}/status-request")
    assert answer["status"] == 200, answer
    report = answer["message"]
    assert report["type"] == PROBLEM and report["pthid"] == answer["id"]
    assert report["body"]["code"] == "e.p.req.not-granted"

    alice = Peer(driver, server)
    _mediate(alice, CM3)
    bad = alice.request(f"{PICKUP}/delivery-request", {"limit": "ten"})
    assert bad["status"] == 200 and bad["message"]["body"]["code"] == "e.m.msg.malformed"
    unknown = alice.request("https://didcomm.org/nonsense/9.0/explode")
    assert unknown["status"] == 200
    assert unknown["message"]["body"]["code"] == "e.m.msg.unsupported-type"
    # Live mode over HTTP: the spec's problem report, delivered.
    live = alice.request(f"{PICKUP}/live-delivery-change", {"live_delivery": True})
    assert live["status"] == 200
    assert live["message"]["body"]["code"] == "e.m.live-mode-not-supported"
    # Nothing was queued by any of this.
    assert alice.reply(f"{PICKUP}/status-request")["body"]["message_count"] == 0


def test_live_mode_over_websocket_leaves_the_queue_to_delivery_request(
    server: ServerProcess, driver: RustDriver
) -> None:
    # Issue 12.2: messages queued before live mode are not pushed; later ones are.
    alice = Peer(driver, server)
    _mediate(alice, CM3)
    bob = Peer(driver, server, routed=False)
    bob.forward_to(alice, "queued before")

    socket = alice.ws_open()
    try:
        request = alice.ws_send(socket, f"{PICKUP}/live-delivery-change", {"live_delivery": True})
        status = alice.ws_recv(socket)
        assert status is not None and status["thid"] == request
        assert status["body"]["live_delivery"] is True and status["body"]["message_count"] == 1
        assert alice.ws_recv(socket, timeout=1) is None  # the queued one is not pushed

        bob.forward_to(alice, "arrived live")
        push = alice.ws_recv(socket)
        assert push is not None and push["type"] == f"{PICKUP}/delivery"
        assert list(alice.open_attachments(push).values()) == ["arrived live"]

        asked = alice.ws_send(socket, f"{PICKUP}/delivery-request", {"limit": 10})
        fetched = alice.ws_recv(socket)
        assert fetched is not None and fetched["thid"] == asked
        contents = alice.open_attachments(fetched)
        assert "queued before" in contents.values()

        ids = sorted(set(contents) | set(alice.open_attachments(push)))
        acked = alice.ws_send(socket, f"{PICKUP}/messages-received", {"message_id_list": ids})
        after = alice.ws_recv(socket)
        assert after is not None and after["thid"] == acked
        assert after["body"]["message_count"] == 0
    finally:
        driver.call("ws_close", id=socket)


def test_status_without_return_route_is_never_queued(
    server: ServerProcess, driver: RustDriver
) -> None:
    # Issue 12.3: no return_route, endpoint is this mediator: live session or nothing.
    alice = Peer(driver, server)
    _mediate(alice, CM3)
    quiet = alice.request(f"{PICKUP}/status-request", return_route=False)
    assert quiet["status"] == 202 and "message" not in quiet
    ping = alice.request(f"{PING}/ping", {"response_requested": True}, return_route=False)
    assert ping["status"] == 202
    assert alice.reply(f"{PICKUP}/status-request")["body"]["message_count"] == 0

    socket = alice.ws_open()
    try:
        alice.ws_send(socket, f"{PICKUP}/live-delivery-change", {"live_delivery": True})
        assert alice.ws_recv(socket) is not None
        again = alice.request(f"{PICKUP}/status-request", return_route=False)
        assert again["status"] == 202
        on_socket = alice.ws_recv(socket)
        assert on_socket is not None and on_socket["thid"] == again["id"]
        assert on_socket["type"] == f"{PICKUP}/status"
    finally:
        driver.call("ws_close", id=socket)
    assert alice.reply(f"{PICKUP}/status-request")["body"]["message_count"] == 0


def test_tampered_and_misaddressed_input_keeps_its_json_error(
    server: ServerProcess, driver: RustDriver, tmp_path: Path
) -> None:
    # Nothing here loosens validation: undecryptable input is a 4xx JSON error.
    import httpx

    alice = Peer(driver, server)
    _mediate(alice, CM3)
    stranger = Peer(driver, server, routed=False)
    # A forward wrapped for the wrong key (the stranger's own) reaches the mediator.
    answer = driver.call(
        "forward",
        url=alice.url,
        sender=None,
        recipient=alice.did,
        routing_keys=[f"{stranger.did}#key-2"],
        type=BASIC,
        body={"content": "not for you"},
    )
    assert answer["status"] == 400 and answer["json"]["error"].startswith("e.m.trust.crypto")
    body = httpx.post(
        alice.url,
        content=b'{"protected": "x", "recipients": [], "ciphertext": "y"}',
        headers={"content-type": ENCRYPTED},
    )
    assert body.status_code == 400 and body.json()["error"]
    assert alice.reply(f"{PICKUP}/status-request")["body"]["message_count"] == 0
