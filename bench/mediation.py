"""Talking to a mediator as its mediatee: mediation, pickup, live mode (client side)."""

from __future__ import annotations

import json
from typing import Any

import httpx

from bench.agents import CM3, ENCRYPTED, PICKUP, BenchAgent


async def call(
    client: httpx.AsyncClient,
    base_url: str,
    agent: BenchAgent,
    mediator: str,
    msg_type: str,
    body: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One return-routed request over HTTP; the unpacked reply."""
    packed = await agent.request(msg_type, mediator, body)
    response = await client.post(
        base_url + "/", content=packed, headers={"content-type": ENCRYPTED}
    )
    if response.status_code != 200:
        raise RuntimeError(f"{msg_type}: HTTP {response.status_code} {response.text[:300]}")
    return await agent.unpack(response.content)


async def mediate(
    client: httpx.AsyncClient, base_url: str, agent: BenchAgent, mediator: str
) -> None:
    """mediate-request, then register the agent's own DID as a recipient."""
    grant = await call(client, base_url, agent, mediator, f"{CM3}/mediate-request")
    assert grant["type"].endswith("mediate-grant"), grant
    update = await call(
        client,
        base_url,
        agent,
        mediator,
        f"{CM3}/recipient-update",
        {"updates": [{"recipient_did": agent.did, "action": "add"}]},
    )
    assert update["body"]["updated"][0]["result"] in ("success", "no_change"), update


def attachment_key(attachment: dict[str, Any]) -> str:
    """What identifies a delivered message on the client: its JWE's random IV."""
    data = attachment.get("data", {})
    if "json" in data:
        return str(data["json"].get("iv"))
    return str(data.get("base64", ""))[:64]


def forward_key(forward_plain_inner: bytes) -> str:
    return str(json.loads(forward_plain_inner).get("iv"))


async def status(
    client: httpx.AsyncClient, base_url: str, agent: BenchAgent, mediator: str
) -> dict[str, Any]:
    return await call(client, base_url, agent, mediator, f"{PICKUP}/status-request", {})
