"""DIDComm v1 over /ws: replies on the socket, implicit pickup, pickup 2.0 live mode."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import websockets
from aries_askar import Key, KeyAlg

from dovecote.didcomm.v1 import envelope
from support.server import ServerProcess
from support.v1agent import Special, V1Agent, forward_for, msg, post_raw


async def _recv(agent: V1Agent, ws: Any, within: float = 10.0) -> dict[str, Any]:
    frame = await asyncio.wait_for(ws.recv(), within)
    return agent.open(frame.encode() if isinstance(frame, str) else frame)


def _mediated(server: ServerProcess) -> tuple[V1Agent, str]:
    agent = V1Agent(server.base_url)
    agent.connect()
    agent.mediate()
    recipient = envelope.b58encode(Key.generate(KeyAlg.ED25519).get_public_bytes())
    agent.add_key(recipient)
    return agent, recipient


async def test_implicit_pickup_keeps_messages_until_acknowledged(v1_server: ServerProcess) -> None:
    agent, recipient = _mediated(v1_server)
    post_raw(v1_server.base_url, forward_for(agent.routing_key, recipient, "queued"))
    async with websockets.connect(v1_server.ws_url) as ws:
        ping = msg("trust_ping/1.0/ping", **{"~transport": {"return_route": "all"}})
        await ws.send(agent.pack(ping).decode())
        frames = [await asyncio.wait_for(ws.recv(), 10) for _ in range(2)]
        kinds = {}
        for frame in frames:
            parsed = json.loads(frame)
            kid = json.loads(envelope.unb64url(parsed["protected"]))["recipients"][0]["header"][
                "kid"
            ]
            kinds[kid] = parsed
        assert recipient in kinds  # the queued message, raw, for the recipient key
        assert agent.verkey in kinds  # the ping response
        # A message arriving while the socket is open is pushed at once.
        post_raw(v1_server.base_url, forward_for(agent.routing_key, recipient, "live"))
        pushed = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert pushed["tag"] != kinds[recipient]["tag"]
    # The socket is gone without an ack: both messages are still queued.
    status = agent.ask(msg("messagepickup/2.0/status-request"))
    assert status["message_count"] == 2
    async with websockets.connect(v1_server.ws_url) as ws:
        ack = msg(
            "messagepickup/2.0/messages-received",
            message_tag_list=[kinds[recipient]["tag"], pushed["tag"]],
            **{"~transport": {"return_route": "all"}},
        )
        await ws.send(agent.pack(ack).decode())
        for _ in range(5):
            frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
            kid = json.loads(envelope.unb64url(frame["protected"]))["recipients"][0]["header"]
            if kid["kid"] == agent.verkey:
                reply = agent.open(json.dumps(frame).encode())
                if reply["@type"].endswith("/status"):
                    break
        assert reply["message_count"] == 0


async def test_live_mode_delivers_wrapped_and_needs_messages_received(
    v1_server: ServerProcess,
) -> None:
    agent, recipient = _mediated(v1_server)
    async with websockets.connect(v1_server.ws_url) as ws:
        await ws.send(
            agent.pack(msg("messagepickup/2.0/live-delivery-change", live_delivery=True)).decode()
        )
        status = await _recv(agent, ws)
        assert status["@type"].endswith("/status") and status["live_delivery"] is True
        post_raw(v1_server.base_url, forward_for(agent.routing_key, recipient, "live"))
        delivery = await _recv(agent, ws)
        assert delivery["@type"] == "https://didcomm.org/messagepickup/2.0/delivery"
        attached = delivery["~attach"][0]
        await ws.send(
            agent.pack(
                msg("messagepickup/2.0/messages-received", message_id_list=[attached["@id"]])
            ).decode()
        )
        after = await _recv(agent, ws)
        assert after["message_count"] == 0
    # Live mode over HTTP is refused with a problem report.
    refused = agent.post(msg("messagepickup/2.0/live-delivery-change", live_delivery=True))
    assert refused.status_code == 400
    assert agent.open(refused.content)["@type"].endswith("/problem-report")


async def test_implicit_pickup_socket_is_not_closed_as_idle(v1_special: Special) -> None:
    server = v1_special.server
    agent, recipient = _mediated(server)
    async with websockets.connect(server.ws_url) as ws:
        await ws.send(
            agent.pack(
                msg(
                    "trust_ping/1.0/ping",
                    response_requested=False,
                    **{"~transport": {"return_route": "all"}},
                )
            ).decode()
        )
        await asyncio.sleep(2.5)  # past the idle timeout, the client silent
        post_raw(server.base_url, forward_for(agent.routing_key, recipient, "late"))
        pushed = json.loads(await asyncio.wait_for(ws.recv(), 10))
        kid = json.loads(envelope.unb64url(pushed["protected"]))["recipients"][0]["header"]
        assert kid["kid"] == recipient
    # A plain request/reply socket is still closed when idle.
    async with websockets.connect(server.ws_url) as ws:
        with contextlib.suppress(websockets.ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)
        assert ws.close_code == 1000
