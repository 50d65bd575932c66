"""DIDComm v1 against a real server on both engines: invitation, DID Exchange, trust ping,
discover features, coordinate mediation 1.0, forward 1.0, pickup 2.0, push device info."""

from __future__ import annotations

import base64
import json
import signal
import time
from typing import Any

import httpx
from aries_askar import Key, KeyAlg

from dovecote.didcomm.v1 import envelope
from support.server import ServerProcess
from support.v1agent import V1, Special, V1Agent, forward_for, msg, post_raw


def _mediated(server: ServerProcess) -> tuple[V1Agent, str]:
    agent = V1Agent(server.base_url)
    agent.connect()
    agent.mediate()
    recipient = envelope.b58encode(Key.generate(KeyAlg.ED25519).get_public_bytes())
    update = agent.add_key(envelope.to_did_key(recipient))
    assert update["updated"][0]["result"] == "success", update
    return agent, recipient


def test_invitation_v1(v1_server: ServerProcess) -> None:
    invite = httpx.get(v1_server.base_url + "/invitation/v1").json()
    assert invite["@type"] == "https://didcomm.org/out-of-band/1.1/invitation"
    assert invite["handshake_protocols"][0] == "https://didcomm.org/didexchange/1.1"
    service = invite["services"][0]
    assert service["serviceEndpoint"] == v1_server.base_url
    assert service["recipientKeys"][0].startswith("did:key:z6Mk")
    ws = httpx.get(v1_server.base_url + "/invitation/v1?transport=ws").json()
    assert ws["services"][0]["serviceEndpoint"] == v1_server.ws_url
    url = httpx.get(v1_server.base_url + "/invitation/v1?format=url").text
    assert url.startswith(v1_server.base_url + "/?oob=")
    encoded = url.split("?oob=", 1)[1]
    decoded = json.loads(base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)))
    assert decoded["services"][0]["recipientKeys"] == service["recipientKeys"]
    svg = httpx.get(v1_server.base_url + "/invitation/v1?format=svg")
    assert svg.headers["content-type"] == "image/svg+xml" and b"<svg" in svg.content
    png = httpx.get(v1_server.base_url + "/invitation/v1?format=png")
    assert png.content.startswith(b"\x89PNG")
    assert httpx.get(v1_server.base_url + "/invitation/v1?format=gif").status_code == 400
    # Stable across requests, like the v2 invitation.
    assert httpx.get(v1_server.base_url + "/invitation/v1").json()["@id"] == invite["@id"]


def test_did_exchange_response_is_signed_by_the_invitation_key(v1_server: ServerProcess) -> None:
    agent = V1Agent(v1_server.base_url)
    response = agent.connect()
    assert response["@type"] == "https://didcomm.org/didexchange/1.1/response"
    data = response["did_doc~attach"]["data"]
    jws = data["jws"]
    signing_input = f"{jws['protected']}.{data['base64'].rstrip('=')}".encode()
    signature = envelope.unb64url(jws["signature"])
    invitation_key = Key.from_public_bytes(
        KeyAlg.ED25519, envelope.b58decode(agent.mediator_verkey)
    )
    assert invitation_key.verify_signature(signing_input, signature)
    doc = json.loads(envelope.unb64url(data["base64"]))
    assert doc["id"] == f"did:sov:{response['did']}"
    assert doc["service"][0]["recipientKeys"] == [agent.mediator_verkey]


def test_did_exchange_1_0_is_answered_in_1_0(v1_server: ServerProcess) -> None:
    agent = V1Agent(v1_server.base_url)
    invite = httpx.get(v1_server.base_url + "/invitation/v1").json()
    agent.mediator_verkey = envelope.to_verkey(invite["services"][0]["recipientKeys"][0])
    doc = base64.urlsafe_b64encode(json.dumps(agent.doc()).encode()).decode()
    response = agent.ask(
        msg(
            "didexchange/1.0/request",
            label="old",
            did=agent.did,
            **{
                "~thread": {"pthid": invite["@id"]},
                "did_doc~attach": {"@id": "d", "data": {"base64": doc}},
            },
        )
    )
    assert response["@type"] == "https://didcomm.org/didexchange/1.0/response"
    assert response["~thread"]["pthid"] == invite["@id"]
    # The request must be authcrypted by the key its document names.
    impostor = V1Agent(v1_server.base_url, mediator_verkey=agent.mediator_verkey)
    forged = impostor.post(
        msg(
            "didexchange/1.1/request",
            did=agent.did,
            **{"did_doc~attach": {"@id": "d", "data": {"base64": doc}}},
        )
    )
    assert forged.status_code == 401


def test_connections_1_0_fallback(v1_server: ServerProcess) -> None:
    invite = httpx.get(v1_server.base_url + "/invitation/v1?handshake=connections").json()
    assert invite["handshake_protocols"] == ["https://didcomm.org/connections/1.0"]
    legacy = httpx.get(v1_server.base_url + "/invitation/v1?handshake=legacy").json()
    assert legacy["@type"] == "https://didcomm.org/connections/1.0/invitation"
    url = httpx.get(v1_server.base_url + "/invitation/v1?handshake=legacy&format=url").text
    assert "/?c_i=" in url
    agent = V1Agent(v1_server.base_url)
    agent.mediator_verkey = legacy["recipientKeys"][0]
    response = agent.ask(
        msg(
            "connections/1.0/request",
            label="old wallet",
            connection={"DID": agent.did, "DIDDoc": agent.doc()},
        )
    )
    assert response["@type"] == "https://didcomm.org/connections/1.0/response"
    sig = response["connection~sig"]
    assert sig["signer"] == agent.mediator_verkey
    data = base64.urlsafe_b64decode(sig["sig_data"])
    signer = Key.from_public_bytes(KeyAlg.ED25519, envelope.b58decode(sig["signer"]))
    assert signer.verify_signature(data, base64.urlsafe_b64decode(sig["signature"]))
    connection = json.loads(data[8:])
    assert connection["DIDDoc"]["id"] == f"did:sov:{connection['DID']}"
    assert agent.mediate()["routing_keys"]


def test_trust_ping_and_discover_features(v1_server: ServerProcess) -> None:
    agent = V1Agent(v1_server.base_url)
    agent.connect()
    ping = msg("trust_ping/1.0/ping", response_requested=True)
    pong = agent.ask(ping)
    assert pong["@type"] == "https://didcomm.org/trust_ping/1.0/ping_response"
    assert pong["~thread"]["thid"] == ping["@id"]
    disclose = agent.ask(msg("discover-features/1.0/query", query="https://didcomm.org/*"))
    pids = {p["pid"] for p in disclose["protocols"]}
    assert {
        "https://didcomm.org/coordinate-mediation/1.0",
        "https://didcomm.org/routing/1.0",
        "https://didcomm.org/messagepickup/2.0",
        "https://didcomm.org/trust_ping/1.0",
        "https://didcomm.org/push-notifications-fcm/1.0",
    } <= pids
    # An unknown type is answered with a Report Problem 1.0 message, as a 400.
    response = agent.post(msg("nonsense/1.0/thing"))
    assert response.status_code == 400
    report = agent.open(response.content)
    assert report["@type"] == "https://didcomm.org/report-problem/1.0/problem-report"
    assert report["description"]["code"] == "e.m.msg.unsupported-type"


def test_ssi_agent_wire_media_type_and_v1_log_fields(v1_server: ServerProcess) -> None:
    """RFC 0044's older media type is accepted like application/didcomm-envelope-enc, and
    v1 traffic is told apart from v2 in the logs: `version` is always the DIDComm version
    ("v1"), the handshake protocol has a field of its own."""
    agent = V1Agent(v1_server.base_url)
    agent.connect()
    wire = {"content-type": "application/ssi-agent-wire"}
    ping = msg("trust_ping/1.0/ping", response_requested=True)
    ping["~transport"] = {"return_route": "all"}
    url = v1_server.base_url + "/"
    response = httpx.post(url, content=agent.pack(ping), headers=wire, timeout=30)
    assert response.status_code == 200, response.text[:300]
    assert agent.open(response.content)["~thread"]["thid"] == ping["@id"]
    nonsense = msg("nonsense/1.0/thing")
    nonsense["~transport"] = {"return_route": "all"}
    response = httpx.post(url, content=agent.pack(nonsense), headers=wire, timeout=30)
    assert response.status_code == 400
    request_id = response.headers["x-request-id"]
    deadline = time.monotonic() + 10
    while not (failed := [e for e in v1_server.log_events() if e.get("request_id") == request_id]):
        assert time.monotonic() < deadline, v1_server.logs()[-2000:]
        time.sleep(0.2)
    assert failed[0]["event"] == "message.failed" and failed[0]["version"] == "v1", failed
    responded = [e for e in v1_server.log_events() if e["event"] == "v1.connection.responded"]
    assert responded and {e["version"] for e in responded} == {"v1"}, responded
    assert {e["handshake"] for e in responded} <= {
        "didexchange/1.1",
        "didexchange/1.0",
        "connections/1.0",
    }


def test_mediation_forward_and_pickup(server: ServerProcess) -> None:
    agent, recipient = _mediated(server)
    keys = agent.ask(msg("coordinate-mediation/1.0/keylist-query", paginate={"limit": 10}))
    assert keys["keys"] == [{"recipient_key": envelope.to_did_key(recipient)}]
    assert keys["pagination"]["remaining"] == 0

    sent = forward_for(agent.routing_key, recipient, "hello", to_form="verkey")
    assert post_raw(server.base_url, sent).status_code == 202
    assert post_raw(server.base_url, sent).status_code == 202  # the sender's retry
    other = forward_for(agent.routing_key, recipient, "second")
    assert post_raw(server.base_url, other).status_code == 202
    # Connections, grants, keylists and mailboxes are durable: SIGKILL and restart.
    assert server.proc is not None
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait()
    server.start()
    status = agent.ask(msg("messagepickup/2.0/status-request"))
    assert status["message_count"] == 2, status  # the retry was stored once
    assert post_raw(server.base_url, sent).status_code == 202  # still a duplicate
    assert agent.ask(msg("messagepickup/2.0/status-request"))["message_count"] == 2

    delivery = agent.ask(msg("messagepickup/2.0/delivery-request", limit=10))
    assert delivery["@type"] == "https://didcomm.org/messagepickup/2.0/delivery"
    attached = delivery["~attach"]
    assert len(attached) == 2
    # Delivered is not removed: a second request returns the same messages.
    again = agent.ask(msg("messagepickup/2.0/delivery-request", limit=10))
    assert [a["@id"] for a in again["~attach"]] == [a["@id"] for a in attached]
    # Keylist pagination and removal (per-key results).
    extra = envelope.b58encode(Key.generate(KeyAlg.ED25519).get_public_bytes())
    agent.add_key(extra)
    page = agent.ask(
        msg("coordinate-mediation/1.0/keylist-query", paginate={"limit": 1, "offset": 1})
    )
    assert page["pagination"] == {"count": 1, "offset": 1, "remaining": 0}
    removed = agent.ask(
        msg(
            "coordinate-mediation/1.0/keylist-update",
            updates=[
                {"recipient_key": extra, "action": "remove"},
                {"recipient_key": extra, "action": "remove"},
                {"recipient_key": "not a key", "action": "add"},
            ],
        )
    )
    assert [u["result"] for u in removed["updated"]] == ["success", "no_change", "client_error"]
    first = attached[0]
    after = agent.ask(msg("messagepickup/2.0/messages-received", message_id_list=[first["@id"]]))
    assert after["message_count"] == 1
    # The other one acknowledged by its RFC 0685 tag (the JWE tag).
    tag = attached[1]["data"]["json"]["tag"]
    after = agent.ask(msg("messagepickup/2.0/messages-received", message_tag_list=[tag]))
    assert after["message_count"] == 0


def test_forward_to_unknown_key_and_unmediated_pickup(v1_server: ServerProcess) -> None:
    agent = V1Agent(v1_server.base_url)
    agent.connect()
    refused = agent.post(msg("messagepickup/2.0/status-request"))
    assert refused.status_code == 403
    assert agent.open(refused.content)["description"]["code"] == "e.p.req.not-granted"
    agent.mediate()
    stranger = envelope.b58encode(Key.generate(KeyAlg.ED25519).get_public_bytes())
    response = post_raw(v1_server.base_url, forward_for(agent.routing_key, stranger, "x"))
    assert response.status_code == 404
    assert response.json()["error"] == "e.m.msg.unregistered-recipient"


def test_hostile_v1_envelopes_get_4xx(v1_server: ServerProcess) -> None:
    protected = envelope.b64url(
        json.dumps(
            {
                "enc": envelope.ENC,
                "typ": "JWM/1.0",
                "alg": "Anoncrypt",
                "recipients": [{"encrypted_key": "AAAA", "header": {"kid": "nope"}}],
            }
        ).encode()
    )
    bodies = [
        json.dumps({"protected": protected, "iv": "AA", "ciphertext": "AA", "tag": "AA"}),
        json.dumps(
            {
                "protected": envelope.b64url(
                    json.dumps({"enc": envelope.ENC, "alg": "Weird"}).encode()
                ),
                "iv": "",
                "ciphertext": "",
            }
        ),
        json.dumps(
            {
                "protected": envelope.b64url(
                    json.dumps(
                        {"enc": envelope.ENC, "alg": "Anoncrypt", "recipients": [1] * 500}
                    ).encode()
                )
            }
        ),
        json.dumps({"protected": protected, "iv": "!!", "ciphertext": 5, "tag": None}),
        '{"protected": "x", "a": ' + "[" * 100_000 + "]" * 100_000 + "}",
        json.dumps({"protected": envelope.b64url(b"[" * 5000), "iv": "AA"}),
    ]
    for body in bodies:
        response = post_raw(v1_server.base_url, body.encode())
        assert 400 <= response.status_code < 500, (body[:80], response.status_code)
        assert "error" in response.json()
    # A correctly packed envelope with a nonsense plaintext.
    agent = V1Agent(v1_server.base_url)
    agent.connect()
    raw = envelope.pack(b"[1,2]", [agent.mediator_verkey], agent.key)
    assert post_raw(v1_server.base_url, raw).status_code == 400
    deep = envelope.pack(
        b'{"@type": "x", "a": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        [agent.mediator_verkey],
        agent.key,
    )
    refused = post_raw(v1_server.base_url, deep)
    assert refused.status_code == 400, refused.text
    # A DID document with an absurd endpoint or too many routing keys.
    for service in (
        {"serviceEndpoint": "http://x/" + "a" * 5000},
        {"routingKeys": [agent.verkey] * 5},
    ):
        doc = agent.doc()
        doc["service"][0].update(service)
        encoded = base64.urlsafe_b64encode(json.dumps(doc).encode()).decode()
        refused = agent.post(
            msg(
                "didexchange/1.1/request",
                did=agent.did,
                **{"did_doc~attach": {"@id": "d", "data": {"base64": encoded}}},
            )
        )
        assert refused.status_code == 400, refused.status_code
    # A forward with a bad `to`.
    agent.mediate()
    bad = envelope.pack(
        json.dumps(msg("routing/1.0/forward", to="did:key:zzz", msg={})).encode(),
        [agent.routing_key],
        None,
    )
    assert post_raw(v1_server.base_url, bad).status_code == 400


def test_push_device_info(v1_server: ServerProcess) -> None:
    agent = V1Agent(v1_server.base_url)
    agent.connect()
    agent.mediate()
    response = agent.post(
        msg(
            "push-notifications-fcm/1.0/set-device-info",
            device_token="tok-1",
            device_platform="android",
        ),
        return_route=False,
    )
    assert response.status_code == 202
    info = agent.ask(msg("push-notifications-fcm/1.0/get-device-info"))
    assert info["@type"] == "https://didcomm.org/push-notifications-fcm/1.0/device-info"
    assert (info["device_token"], info["device_platform"]) == ("tok-1", "android")
    agent.post(
        msg("push-notifications-apns/1.0/set-device-info", device_token="apns-1"),
        return_route=False,
    )
    apns = agent.ask(msg("push-notifications-apns/1.0/get-device-info"))
    assert apns["device_token"] == "apns-1"
    assert agent.ask(msg("push-notifications-fcm/1.0/get-device-info"))["device_token"] is None


def test_mediatee_with_endpoint_gets_forwards_through_the_outbox(
    v1_special: Special, endpoints: Any
) -> None:
    target = endpoints()
    server = v1_special.server
    agent = V1Agent(server.base_url, endpoint=target.url)
    agent.connect()
    agent.mediate()
    agent.add_key(agent.verkey)
    sent = forward_for(agent.routing_key, agent.verkey, "to my endpoint")
    assert post_raw(server.base_url, sent).status_code == 202
    assert post_raw(server.base_url, sent).status_code == 202  # a retry is not sent twice
    deadline = time.monotonic() + 20
    while not target.received and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)
    assert len(target.received) == 1
    got = target.received[0]
    assert got.headers["content-type"] == V1
    inner = agent.open(got.body)
    assert inner["content"] == "to my endpoint"
    # Replies without a return route go to the endpoint too.
    assert agent.post(msg("trust_ping/1.0/ping"), return_route=False).status_code == 202
    deadline = time.monotonic() + 20
    while len(target.received) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert agent.open(target.received[1].body)["@type"].endswith("/ping_response")


def test_registered_fcm_device_gets_the_push_for_an_offline_mailbox(v1_special: Special) -> None:
    server, push = v1_special.server, v1_special.push
    agent, recipient = _mediated(server)
    agent.post(
        msg(
            "push-notifications-fcm/1.0/set-device-info",
            device_token="phone-1",
            device_platform="ios",
        ),
        return_route=False,
    )
    sent = forward_for(agent.routing_key, recipient, "secret text")
    assert post_raw(server.base_url, sent).status_code == 202

    # Other tests' offline mailboxes notify the same push endpoint (by topic).
    def ours() -> list[Any]:
        return [r for r in list(push.received) if b"phone-1" in r.body]

    deadline = time.monotonic() + 20
    while not ours() and time.monotonic() < deadline:
        time.sleep(0.1)
    message = json.loads(ours()[0].body)["message"]
    assert message["token"] == "phone-1" and "topic" not in message
    assert message["data"]["count"] == "1"
    assert b"secret" not in ours()[0].body


def test_forward_expires_time_caps_the_ttl(v1_special: Special) -> None:
    v1_server = v1_special.server
    agent, recipient = _mediated(v1_server)
    inner = envelope.pack(b'{"@type": "x"}', [recipient], None)
    soon = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 2))
    fwd = msg(
        "routing/1.0/forward",
        to=recipient,
        msg=json.loads(inner),
        **{"~timing": {"expires_time": soon}},
    )
    sent = envelope.pack(json.dumps(fwd).encode(), [agent.routing_key], None)
    assert post_raw(v1_server.base_url, sent).status_code == 202
    status = agent.ask(msg("messagepickup/2.0/status-request"))
    assert status["message_count"] == 1
    # Expired messages leave the mailbox at the next sweep (dead letters), not delivered.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if agent.ask(msg("messagepickup/2.0/status-request"))["message_count"] == 0:
            break
        time.sleep(0.5)
    assert agent.ask(msg("messagepickup/2.0/status-request"))["message_count"] == 0


def test_v1_mailbox_limit_and_dead_letters(v1_special: Special, endpoints: Any) -> None:
    gone = endpoints(default="404")
    server = v1_special.server
    agent, recipient = _mediated(server)
    assert (
        post_raw(server.base_url, forward_for(agent.routing_key, recipient, "1")).status_code == 202
    )
    full = post_raw(server.base_url, forward_for(agent.routing_key, recipient, "2"))
    assert full.status_code == 507 and full.json()["error"].endswith("mailbox-full")
    # A mediatee whose endpoint refuses for good: the forward ends in the dead letters.
    routed = V1Agent(server.base_url, endpoint=gone.url)
    routed.connect()
    routed.mediate()
    routed.add_key(routed.verkey)
    assert (
        post_raw(server.base_url, forward_for(routed.routing_key, routed.verkey, "x")).status_code
        == 202
    )
    dead = 'dovecote_messages_dead_lettered_total{kind="forward"} 1.0'
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if dead in httpx.get(server.base_url + "/metrics").text:
            break
        time.sleep(0.5)
    assert gone.received
    assert dead in httpx.get(server.base_url + "/metrics").text
