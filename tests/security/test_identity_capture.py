"""One owner per identity: another mediatee cannot capture someone's forwards by
registering a DID URL of their DID (R#key-2) or the bare DID (R) under a key id.

Each test drives a real server (SQLite and PostgreSQL) with real DIDComm agents: the
victim Y registers R in one form, the attacker X tries the other, and third parties send
forwards addressed to every form. X must get client_error and nothing; Y gets everything.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx
import pytest

from support.agent import BASIC, CM2, CM3, ENCRYPTED, PICKUP, Agent, plain_forward_message
from support.server import ServerProcess

FORMS = ("", "#key-1", "#key-2", "?service=x", "/some/path")


async def _update(
    agent: Agent, client: httpx.AsyncClient, version: str, did: str, action: str = "add"
) -> str:
    name = "recipient-update" if version == CM3 else "keylist-update"
    reply = await agent.request(
        client, f"{version}/{name}", {"updates": [{"recipient_did": did, "action": action}]}
    )
    return str(reply["body"]["updated"][0]["result"])


async def _granted(server: ServerProcess, client: httpx.AsyncClient, version: str) -> Agent:
    agent = Agent.create(server.base_url, server.did, via_mediator=True)
    grant = await agent.request(client, f"{version}/mediate-request")
    assert grant["type"].endswith("mediate-grant"), grant
    return agent


async def _forward(
    server: ServerProcess, client: httpx.AsyncClient, victim: Agent, next_did: str, text: str
) -> int:
    """A third party encrypts for the victim and forwards it with `next` = next_did."""
    from didcomm.message import Message
    from didcomm.pack_encrypted import PackEncryptedConfig, pack_encrypted

    sender = Agent.create(server.base_url, server.did)
    inner = await pack_encrypted(
        sender.resolvers,
        Message(id=str(uuid.uuid4()), type=BASIC, body={"content": text}),
        to=victim.did,
        pack_config=PackEncryptedConfig(forward=False),
    )
    wrapper = plain_forward_message(next_did, json.loads(inner.packed_msg))
    envelope = await sender.pack(wrapper, anonymous=True)
    response = await client.post(
        server.base_url + "/", content=envelope, headers={"content-type": ENCRYPTED}
    )
    return response.status_code


async def _mailbox(agent: Agent, client: httpx.AsyncClient) -> list[str]:
    """Every text queued for `agent` (it can decrypt them all: they are its own)."""
    status = await agent.request(client, f"{PICKUP}/status-request")
    delivery = await agent.request(client, f"{PICKUP}/delivery-request", {"limit": 100})
    texts: list[str] = []
    for attachment in delivery.get("attachments") or []:
        texts.append(await _text(agent, attachment))
    assert len(texts) == status["body"]["message_count"]
    return texts


async def _text(agent: Agent, attachment: dict[str, Any]) -> str:
    try:
        message = await agent.unpack(json.dumps(attachment["data"]["json"]))
    except Exception:  # not encrypted for this agent: counted, shown as such  # noqa: BLE001
        return "<not mine>"
    return str(message["body"]["content"])


async def _count(agent: Agent, client: httpx.AsyncClient) -> int:
    status = await agent.request(client, f"{PICKUP}/status-request")
    return int(status["body"]["message_count"])


async def _recipients(agent: Agent, client: httpx.AsyncClient, version: str) -> list[str]:
    name = "recipient-query" if version == CM3 else "keylist-query"
    reply = await agent.request(client, f"{version}/{name}", {})
    key = "dids" if version == CM3 else "keys"
    return [entry["recipient_did"] for entry in reply["body"][key]]


@pytest.mark.parametrize("version", [CM3, CM2], ids=["cm3", "cm2"])
@pytest.mark.parametrize(
    "victim_form,attacker_form",
    [
        ("", "#key-2"),  # Y registered R, X tries a key id of R
        ("#key-2", ""),  # Y registered a key id, X tries the bare DID
        ("#key-1", "#key-2"),  # both key ids of the same DID
    ],
    ids=["bare-then-key", "key-then-bare", "key-then-other-key"],
)
async def test_capture_attempt_gets_client_error_and_nothing(
    shared_server: ServerProcess,
    client: httpx.AsyncClient,
    version: str,
    victim_form: str,
    attacker_form: str,
) -> None:
    server = shared_server
    victim = await _granted(server, client, version)
    attacker = await _granted(server, client, version)
    r = victim.did
    assert await _update(victim, client, version, r + victim_form) == "success"

    assert await _update(attacker, client, version, r + attacker_form) == "client_error"
    # Every other form is refused too, and nothing was registered for the attacker.
    for form in FORMS:
        assert await _update(attacker, client, version, r + form) == "client_error", form
    assert await _recipients(attacker, client, version) == []
    # The attacker cannot remove the victim's registration either.
    assert await _update(attacker, client, version, r + victim_form, "remove") != "success"

    sent = []
    for form in FORMS:
        text = f"to R{form} {uuid.uuid4()}"
        assert await _forward(server, client, victim, r + form, text) == 202, form
        sent.append(text)

    assert await _count(attacker, client) == 0
    assert await _mailbox(attacker, client) == []
    assert sorted(await _mailbox(victim, client)) == sorted(sent)


async def test_owner_may_register_every_form_of_its_own_did(
    shared_server: ServerProcess, client: httpx.AsyncClient
) -> None:
    server = shared_server
    owner = await _granted(server, client, CM3)
    r = owner.did
    assert await _update(owner, client, CM3, r + "#key-2") == "success"
    # The identity is the base DID: later forms of it are the same recipient.
    for form in FORMS:
        assert await _update(owner, client, CM3, r + form) == "no_change", form
    assert await _recipients(owner, client, CM3) == [r]
    # Removing any form removes the identity; then another mediatee may take it.
    assert await _update(owner, client, CM3, r + "#key-1", "remove") == "success"
    assert await _recipients(owner, client, CM3) == []
    other = await _granted(server, client, CM3)
    assert await _update(other, client, CM3, r) == "success"


def _old_database(server: ServerProcess) -> None:
    """What a version-3 Dovecote left after the attack: X registered R#key-2 after Y
    registered R, and holds one message forwarded to R#key-2."""
    import subprocess

    from dovecote.store import migrations

    url = server.env.get("DOVECOTE_STORE", "")
    engine = "postgres" if url.startswith("postgres") else "sqlite"
    real = "REAL" if engine == "sqlite" else "DOUBLE PRECISION"
    blob = "X'6f6c64'" if engine == "sqlite" else "'\\x6f6c64'::bytea"
    applied = [m for m in migrations.load(engine) if m[0] <= 3]
    sql = (
        "\n".join(text + "\n;" for _, _, text in applied)
        + f"""
        CREATE TABLE schema_migrations
            (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at {real} NOT NULL);
        {
            " ".join(
                f"INSERT INTO schema_migrations VALUES ({v}, '{n}', 1.0);" for v, n, _ in applied
            )
        }
        INSERT INTO mediations VALUES ('did:example:x', 'granted', 'did:example:m', 1, 1);
        INSERT INTO mediations VALUES ('did:example:y', 'granted', 'did:example:m', 1, 1);
        INSERT INTO recipients VALUES ('did:example:r', 'did:example:y', 1);
        INSERT INTO recipients VALUES ('did:example:r#key-2', 'did:example:x', 2);
        INSERT INTO messages (id, mediatee, recipient, body, size, received_at, expires_at)
            VALUES ('captured', 'did:example:x', 'did:example:r#key-2', {blob}, 3, 1, 9e9);
    """
    )
    if engine == "sqlite":
        import sqlite3

        server.data_dir.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(server.data_dir / "dovecote.db")
        conn.executescript(sql)
        conn.close()
    else:
        subprocess.run(
            ["psql", url, "-v", "ON_ERROR_STOP=1", "-q"],
            input=sql,
            text=True,
            check=True,
            capture_output=True,
        )


def test_conflicts_from_before_are_reported_at_start_and_by_the_cli(
    store_engine: dict[str, str], server_factory: Any
) -> None:
    import os
    import subprocess
    import sys

    server = server_factory(env=dict(store_engine), start=False)
    _old_database(server)
    server.start()
    [event] = [e for e in server.log_events() if e.get("event") == "recipients.conflicts"]
    assert event["count"] == 1 and event["queued"] == 1
    assert event["level"] == "warning"

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dovecote",
            "recipients",
            "conflicts",
            "--json",
            "--data-dir",
            str(server.data_dir),
        ],
        env={**os.environ, **server.env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result.stderr
    [line] = result.stdout.splitlines()
    assert {k: v for k, v in json.loads(line).items() if k not in ("found_at",)} == {
        "recipient": "did:example:r#key-2",
        "base": "did:example:r",
        "mediatee": "did:example:x",
        "owner": "did:example:y",
        "registered_at": 2.0,
        "queued": 1,
    }


async def test_allowlist_policy_closes_registration_to_strangers(
    server_factory: Any, client: httpx.AsyncClient
) -> None:
    """MEDIATION_POLICY=allowlist: only listed DIDs (a DID URL stands for its DID) get a
    grant; a stranger cannot register anyone's DID, so nothing is first-come any more."""
    listed = Agent.create("http://placeholder")
    stranger = Agent.create("http://placeholder")
    server = server_factory(
        env={
            "DOVECOTE_MEDIATION_POLICY": "allowlist",
            "DOVECOTE_MEDIATION_ALLOWLIST": f"{listed.did}#key-1",
        }
    )
    for agent in (listed, stranger):
        agent.base_url, agent.mediator_did = server.base_url, server.did
    grant = await listed.request(client, f"{CM3}/mediate-request")
    assert grant["type"] == f"{CM3}/mediate-grant"
    deny = await stranger.request(client, f"{CM3}/mediate-request")
    assert deny["type"] == f"{CM3}/mediate-deny"
    _, reply = await stranger.send_http(
        client,
        stranger.message(
            f"{CM3}/recipient-update", {"updates": [{"recipient_did": listed.did, "action": "add"}]}
        ),
    )
    assert reply is not None and reply["body"]["code"] == "e.p.req.not-granted", reply
    assert await _update(listed, client, CM3, listed.did) == "success"
