"""The outbox's promises against real servers: a client killed mid-send loses and
duplicates nothing; a dead endpoint is failed over; a message that cannot be delivered
is reported, never dropped; live delivery survives a server restart."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

from client.conftest import ClientFactory
from dovecote.client import Client, ClientConfig, OutboxItem, Received
from dovecote.client.identity import make_did
from support.server import ServerProcess, free_port

HERE = Path(__file__).parent


def _start_sender(data_dir: Path, to: str, start: int, count: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            str(HERE / "crash_sender.py"),
            str(data_dir),
            to,
            str(start),
            str(count),
            "crash",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def _read_until(proc: subprocess.Popen[str], printed: list[str], stop_at: int | None) -> None:
    """Collect printed ids; SIGKILL the process once `stop_at` ids were printed."""
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.strip()
        if line == "done":
            break
        if not line.startswith("crash-"):
            continue  # a log line
        printed.append(line)
        if stop_at is not None and len(printed) >= stop_at:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=30)


async def test_client_killed_mid_send_delivers_each_message_once(
    relay: ServerProcess, client_factory: ClientFactory, tmp_path: Path
) -> None:
    alice = await client_factory(relay)
    async with Client(ClientConfig(data_dir=tmp_path / "bob"), create=True):
        pass  # bob's keys; his process does the sending
    total = 200
    printed: list[str] = []
    # Kill twice while queueing and sending, then let a third run finish the job.
    for stop_at in (60, 130, None):
        proc = _start_sender(tmp_path / "bob", alice.did, len(printed), total)
        await asyncio.to_thread(_read_until, proc, printed, stop_at)
        if stop_at is not None:
            assert proc.returncode == -signal.SIGKILL
    expected = {f"crash-{i:05d}" for i in range(total)}
    assert set(printed) == expected

    # The relay stored each message once: retried POSTs carried identical bytes.
    accepted = [e for e in relay.log_events() if e.get("event") == "forward.accepted"]
    duplicates = sum(1 for e in accepted if e.get("duplicate"))
    print(f"relay: {duplicates} of {len(accepted)} accepted forwards were retries")
    status = await alice.status()
    assert status.message_count == total
    received = await alice.drain()
    ids = [m.id for m in received]
    assert len(ids) == len(set(ids)) == total
    assert set(ids) == expected


async def test_dead_endpoint_fails_over_after_three_attempts(
    relay: ServerProcess, client_factory: ClientFactory
) -> None:
    alice = await client_factory(relay)
    dead = f"http://127.0.0.1:{free_port()}/"
    bob = await client_factory(relay, relays=[dead])
    ids = [await bob.send(alice.did, f"m{i}") for i in range(20)]
    items = await bob.wait_sent(ids, max_wait=20)
    assert [i.state for i in items] == ["sent"] * 20
    assert all(i.attempts == 4 and i.endpoint_index == 1 for i in items)
    assert (await alice.status()).message_count == 20
    assert sorted(m.id for m in await alice.drain()) == sorted(ids)


async def test_undeliverable_message_is_reported_and_can_be_retried(
    client_factory: ClientFactory,
) -> None:
    failures: list[OutboxItem] = []
    bob = await client_factory(retention=1.0)
    bob.on_failed = failures.append
    bob.sender.on_failed = failures.append
    # A recipient whose only endpoint is a closed port.
    ident = bob.identity
    nowhere = make_did(
        ident.signing_key,
        ident.agreement_key,
        [
            {
                "type": "DIDCommMessaging",
                "serviceEndpoint": {
                    "uri": f"http://127.0.0.1:{free_port()}/",
                    "accept": ["didcomm/v2"],
                },
            }
        ],
    )
    message_id = await bob.send(nowhere, "into the void")
    [item] = await bob.wait_sent([message_id], max_wait=15)
    assert item.state == "failed"
    assert item.last_error and "retention exceeded" in item.last_error
    assert [f.id for f in failures] == [message_id]
    assert [i.id for i in await bob.outbox("failed")] == [message_id]
    assert await bob.retry_failed() == 1
    assert (await bob.store.get(message_id)).state == "pending"  # type: ignore[union-attr]


async def test_rejected_message_fails_at_once(
    relay: ServerProcess, client_factory: ClientFactory
) -> None:
    bob = await client_factory(relay)
    carol = await client_factory(relay)
    await carol.remove_recipients([carol.did])  # the relay no longer routes for carol
    [item] = await bob.wait_sent([await bob.send(carol.did, "hi")], max_wait=10)
    assert item.state == "failed" and item.attempts == 1
    assert "404" in (item.last_error or "")


async def test_live_receive_survives_server_restart(
    server: ServerProcess, client_factory: ClientFactory
) -> None:
    alice = await client_factory(server)
    bob = await client_factory(server)
    total = 60
    received: list[Received] = []
    stop, some_arrived, all_arrived = asyncio.Event(), asyncio.Event(), asyncio.Event()

    def handle(message: Received) -> None:
        received.append(message)
        if len(received) >= 15:
            some_arrived.set()
        if len(received) >= total:
            all_arrived.set()

    live = asyncio.create_task(alice.live(handle, stop))
    await asyncio.wait_for(alice.inbox().live_on.wait(), 10)

    async def produce() -> None:
        for i in range(total):
            await bob.send(alice.did, f"live {i}")
            await asyncio.sleep(0.03)

    producer = asyncio.create_task(produce())
    await asyncio.wait_for(some_arrived.wait(), 20)
    await asyncio.to_thread(server.restart)  # kill -9, then start on the same port
    await producer
    await bob.flush(max_wait=30)
    await asyncio.wait_for(all_arrived.wait(), 30)
    await asyncio.sleep(0.5)  # would a duplicate still arrive?
    stop.set()
    await asyncio.wait_for(live, 10)
    ids = [m.id for m in received]
    assert len(ids) == len(set(ids)), "the handler saw a message twice"
    assert {m.body["content"] for m in received} == {f"live {i}" for i in range(total)}
    assert alice.inbox().reconnects >= 1
    assert (await alice.status()).message_count == 0
