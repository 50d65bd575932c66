"""End-to-end live delivery, pickup, rooms and soak scenarios."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

import httpx
import websockets

from bench import fill, forwards, loadgen, report, servers
from bench.agents import _CRYPTO, _PACKAGING, _RESOLVER, PICKUP, BenchAgent
from bench.mediation import attachment_key, mediate
from bench.scenarios import Profile

ONE_MESSAGE_HEADERS = ["measure", "p50 ms", "p95 ms", "p99 ms", "max ms", "n"]


def _row(name: str, values: list[float]) -> list[Any]:
    p = loadgen.summarize(values)
    return [
        name,
        report.ms(p["p50"]),
        report.ms(p["p95"]),
        report.ms(p["p99"]),
        report.ms(p["max"]),
        int(p["n"]),
    ]


async def _inner_keys(payloads: list[bytes]) -> list[str]:
    """The inner JWE's IV of each packed forward (what the recipient will see)."""
    from dovecote.didcomm import identity as identity_mod
    from dovecote.didcomm.packing import IdentitySecrets

    identity = identity_mod.load_or_create(
        forwards.mediator_identity(), ["http://127.0.0.1:1", "ws://127.0.0.1:1/ws"]
    )
    secrets = IdentitySecrets(identity)
    keys = []
    for raw in payloads:
        data, _ = await _PACKAGING.unpack(_CRYPTO, _RESOLVER, secrets, raw)
        keys.append(str(json.loads(data)["attachments"][0]["data"]["json"]["iv"]))
    return keys


class LiveConsumer:
    """A mediatee on a WebSocket in live mode that acknowledges every push.

    Records, per delivered message (keyed by its inner IV), when it was pushed and when the
    acknowledgement's answer came back. Like a real client it reconnects (and turns live
    mode on again) when the socket closes; `reconnects` counts how often. Live mode pushes
    only what arrives after it is turned on, so, like dovecote.client, it then drains what
    was queued (pushed before a drop and never acknowledged) with delivery-request.
    """

    def __init__(self, agent: BenchAgent, ws_url: str, mediator: str) -> None:
        self.agent, self.ws_url, self.mediator = agent, ws_url, mediator
        self.pushed: dict[str, float] = {}
        self.acked: dict[str, float] = {}
        self.duplicates = 0
        self.deliveries = 0  # delivery messages received (pushes and drains)
        self.reconnects = 0
        self.closes: dict[str, int] = {}
        self._acks: dict[str, list[str]] = {}
        self._task: asyncio.Task[None] | None = None
        self._ws: Any = None
        self._live = asyncio.Event()
        self.answered = asyncio.Event()  # set by every status (e.g. an ack's answer)
        self._stopping = False
        self._draining = ""

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())
        await asyncio.wait_for(self._live.wait(), 30)

    async def _run(self) -> None:
        while not self._stopping:
            try:
                async with websockets.connect(self.ws_url, max_size=None, open_timeout=30) as ws:
                    self._ws = ws
                    self._draining = ""
                    await ws.send(
                        await self.agent.request(
                            f"{PICKUP}/live-delivery-change", self.mediator, {"live_delivery": True}
                        )
                    )
                    await self._read(ws)
                    reason = f"closed {ws.close_code}"
            except Exception as exc:  # a dropped socket: reconnect, as clients do  # noqa: BLE001
                reason = type(exc).__name__
            self.closes[reason] = self.closes.get(reason, 0) + 1
            if not self._stopping:
                self.reconnects += 1
                await asyncio.sleep(0.5)

    async def _read(self, ws: Any) -> None:
        async for frame in ws:
            now = time.perf_counter()
            message = await self.agent.unpack(frame)
            kind = message.get("type", "")
            if kind.endswith("/delivery"):
                self.deliveries += 1
                keys, ids = [], []
                for attachment in message.get("attachments", []):
                    key = attachment_key(attachment)
                    if key in self.pushed:
                        self.duplicates += 1
                    else:
                        self.pushed[key] = now
                    keys.append(key)
                    ids.append(attachment["id"])
                ack = self.agent.message(
                    f"{PICKUP}/messages-received", self.mediator, {"message_id_list": ids}
                )
                self._acks[ack["id"]] = keys
                await ws.send(await self.agent.pack(ack, self.mediator))
                if self._draining and message.get("thid") == self._draining:
                    await self._drain(ws)
            elif kind.endswith("/status"):
                if message.get("thid") == self._draining:
                    self._draining = ""
                elif (
                    (message.get("body") or {}).get("live_delivery")
                    and not self._draining
                    and message.get("thid") not in self._acks
                ):
                    await self._drain(ws)  # live mode is on: fetch what was queued
                self._live.set()
                for key in self._acks.pop(message.get("thid", ""), []):
                    self.acked.setdefault(key, now)
                self.answered.set()

    async def _drain(self, ws: Any) -> None:
        request = self.agent.message(f"{PICKUP}/delivery-request", self.mediator, {"limit": 100})
        self._draining = request["id"]
        await ws.send(await self.agent.pack(request, self.mediator))

    async def stop(self) -> None:
        self._stopping = True
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await self._ws.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task


async def e2e(
    profile: Profile, agent: BenchAgent, offline: BenchAgent, engine: str = "sqlite"
) -> dict[str, Any]:
    """Accept -> live WebSocket push -> acknowledged, beside the accept alone.

    Two mediatees on one server: `agent` stays on a WebSocket in live mode throughout,
    `offline` never connects. Phases alternate (accept alone, then live, `e2e_rounds`
    times) at the same offered rate and count, then one closed loop of the same count
    each (saturation). Each phase counts the server's own CPU (psutil, children
    included): an accept-alone phase from its first POST to its last 202, a live phase
    until the last of its messages was acknowledged and that acknowledgement answered.
    The consumer's decrypting and acknowledging run in this process and are not counted.
    Alternating keeps both sides of the ratio under the same machine load.
    """
    count = int(profile.e2e_rate * profile.e2e_seconds)
    rounds = max(1, profile.e2e_rounds)
    # Round-robin over the two recipients: even indices for the live one, odd for the
    # other; (rounds + 2) phases each (then a closed loop, then one at a time). All
    # distinct: Dovecote drops duplicates.
    both = await asyncio.to_thread(
        forwards.pool,
        [agent.did, offline.did],
        forwards.mediator_did(),
        2 * count * (rounds + 2),
    )
    live_payloads, alone_payloads = both[0::2], both[1::2]
    keys = await _inner_keys(live_payloads)
    phases: list[dict[str, Any]] = []
    accept: list[float] = []
    push: list[float] = []
    acked: list[float] = []
    with contextlib.ExitStack() as stack:
        work = stack.enter_context(servers.workdir("e2e"))
        store = stack.enter_context(servers.postgres_database()) if engine == "postgres" else ""
        server = servers.Dovecote(work, store=store, identity=forwards.mediator_identity()).start()
        try:
            did = server.did()
            async with httpx.AsyncClient(timeout=30) as client:
                await mediate(client, server.base_urls[0], agent, did)
                await mediate(client, server.base_urls[0], offline, did)
            consumer = LiveConsumer(agent, f"ws://127.0.0.1:{server.ports[0]}/ws", did)
            await consumer.start()
            await asyncio.sleep(1.0)  # live mode on, the drain of an empty queue done
            # (closed loop, one at a time, payload slice) per pair of phases. One at a time
            # runs long and slow, so it alternates in chunks: a load change on the shared
            # machine then falls on both kinds alike.
            schedule = [(False, False, slice(p * count, (p + 1) * count)) for p in range(rounds)]
            schedule.append((True, False, slice(rounds * count, (rounds + 1) * count)))
            chunk = min(count, SERIAL_COUNT) // SERIAL_CHUNKS
            serial_start = (rounds + 1) * count
            schedule += [
                (False, True, slice(serial_start + c * chunk, serial_start + (c + 1) * chunk))
                for c in range(SERIAL_CHUNKS)
            ]
            for closed, serial, part in schedule:
                size = part.stop - part.start
                for kind in ("alone", "live"):
                    payloads = (alone_payloads if kind == "alone" else live_payloads)[part]
                    cpu0 = servers.process_stats(server.pids)[2]
                    deliveries0 = consumer.deliveries
                    if serial:
                        run = await _one_at_a_time(
                            server.ports[0],
                            payloads,
                            None
                            if kind == "alone"
                            else (consumer, keys[part.start : part.start + size]),
                        )
                    elif closed:
                        run = await loadgen.closed_loop(
                            f"{kind} closed", server.ports, payloads, 600, 16, warmup=0
                        )
                    else:
                        run = await loadgen.open_loop(
                            kind, server.ports, payloads, profile.e2e_rate, profile.e2e_seconds, 32
                        )
                    wanted = (
                        {keys[part.start + s.index] for s in run.ok} if kind == "live" else set()
                    )
                    deadline = time.monotonic() + 60
                    while (  # noqa: ASYNC110
                        wanted - consumer.acked.keys() and time.monotonic() < deadline
                    ):
                        await asyncio.sleep(0.05)
                    cpu = servers.process_stats(server.pids)[2] - cpu0
                    done = len(run.ok) if kind == "alone" else len(wanted & consumer.acked.keys())
                    phases.append(
                        {
                            "kind": kind,
                            "closed_loop": closed,
                            "serial": serial,
                            "offered": None if closed or serial else profile.e2e_rate,
                            "sent": len(payloads),
                            "accepted": len(run.ok),
                            "done": done,
                            "rate": len(run.ok) / run.duration if run.duration else 0.0,
                            "cpu_seconds": cpu,
                            "cpu_us": cpu / done * 1e6 if done else None,
                            "load": os.getloadavg()[0],
                            "pushes": consumer.deliveries - deliveries0,
                        }
                    )
                    if kind == "live" and not closed and not serial:
                        for s in run.ok:
                            due = run.started_at + s.due
                            accept.append(s.latency)
                            key = keys[part.start + s.index]
                            if key in consumer.pushed:
                                push.append(consumer.pushed[key] - due)
                            if key in consumer.acked:
                                acked.append(consumer.acked[key] - due)
                    await asyncio.sleep(0.5)
            await consumer.stop()
        finally:
            server.stop()
    live_sent = sum(p["sent"] for p in phases if p["kind"] == "live")
    result: dict[str, Any] = {
        "engine": engine,
        "rate": profile.e2e_rate,
        "seconds": profile.e2e_seconds,
        "rounds": rounds,
        "count": count,
        "phases": phases,
        "sent": live_sent,
        "accepted": sum(p["accepted"] for p in phases if p["kind"] == "live"),
        "pushed": len(consumer.pushed),
        "acked": len(consumer.acked),
        "duplicate_pushes": consumer.duplicates,
        "reconnects": consumer.reconnects,
        "accept": accept,
        "push": push,
        "ack": acked,
    }
    for name in ("fixed", "closed", "serial"):
        sums = {}
        for kind in ("live", "alone"):
            chosen = [p for p in phases if p["kind"] == kind and _phase_name(p) == name]
            done = sum(p["done"] for p in chosen)
            cpu = sum(p["cpu_seconds"] for p in chosen)
            sums[kind] = cpu / done * 1e6 if done else None
            result[f"{name}_{kind}_rate"] = (
                sum(p["rate"] for p in chosen) / len(chosen) if chosen else 0.0
            )
            result[f"{name}_{kind}_load"] = max((p["load"] for p in chosen), default=0.0)
        result[f"{name}_live_cpu_us"] = sums["live"]
        result[f"{name}_accept_cpu_us"] = sums["alone"]
    # The names earlier results used (the fixed-rate figures).
    result["live_cpu_us"] = result["fixed_live_cpu_us"]
    result["accept_cpu_us"] = result["fixed_accept_cpu_us"]
    result["load_live"] = result["fixed_live_load"]
    result["load_alone"] = result["fixed_alone_load"]
    return result


# Messages sent one at a time (each acknowledged before the next is sent), in chunks
# alternating between the accept alone and live.
SERIAL_COUNT = 400
SERIAL_CHUNKS = 4


def _phase_name(phase: dict[str, Any]) -> str:
    return "serial" if phase["serial"] else "closed" if phase["closed_loop"] else "fixed"


async def _one_at_a_time(
    port: int, payloads: list[bytes], live: tuple[LiveConsumer, list[str]] | None
) -> loadgen.RunResult:
    """POST each forward only when the previous one was accepted (and, with `live`, pushed,
    acknowledged and that acknowledgement answered): every push carries one message, so
    the difference to the accept alone is what one delivery costs."""
    conn = loadgen.HTTPConnection("127.0.0.1", port)
    result = loadgen.RunResult("one at a time", None, 0.0)
    start = result.started_at = time.perf_counter()
    try:
        for index, payload in enumerate(payloads):
            sent = time.perf_counter()
            status, _ = await conn.request(payload)
            if live is not None and status == 202:
                consumer, keys = live
                deadline = time.monotonic() + 10
                while keys[index] not in consumer.acked and time.monotonic() < deadline:
                    consumer.answered.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(consumer.answered.wait(), 1.0)
            done = time.perf_counter()
            result.samples.append(
                loadgen.Sample(sent - start, done - sent, done - sent, status, index)
            )
    finally:
        conn.close()
    result.duration = time.perf_counter() - start
    return result


async def _drain_head(
    base_url: str,
    agent: BenchAgent,
    mediator: str,
    measure: int,
    pids: list[int],
    batch: int = 100,
    time_limit: float = 180.0,
) -> dict[str, Any]:
    """Pick up and acknowledge `measure` messages from the head of the queue (or as many
    as fit in `time_limit` seconds: when per-message cost grows with the queue, a 1M queue
    could otherwise take hours)."""
    delivery_t, ack_t, client_t = [], [], []
    got = 0
    cpu0 = servers.process_stats(pids)[2]
    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=60) as client:
        while got < measure and time.perf_counter() - started < time_limit:
            t0 = time.perf_counter()
            packed = await agent.request(
                f"{PICKUP}/delivery-request", mediator, {"limit": min(batch, measure - got)}
            )
            r = await client.post(
                base_url + "/",
                content=packed,
                headers={"content-type": "application/didcomm-encrypted+json"},
            )
            t1 = time.perf_counter()
            reply = await agent.unpack(r.content)
            ids = [a["id"] for a in reply.get("attachments", [])]
            if not ids:
                break
            t2 = time.perf_counter()
            packed = await agent.request(
                f"{PICKUP}/messages-received", mediator, {"message_id_list": ids}
            )
            r = await client.post(
                base_url + "/",
                content=packed,
                headers={"content-type": "application/didcomm-encrypted+json"},
            )
            t3 = time.perf_counter()
            await agent.unpack(r.content)
            t4 = time.perf_counter()
            delivery_t.append(t1 - t0)
            ack_t.append(t3 - t2)
            client_t.append((t2 - t1) + (t4 - t3))
            got += len(ids)
    wall = time.perf_counter() - started
    cpu = servers.process_stats(pids)[2] - cpu0
    return {
        "messages": got,
        "seconds": wall,
        "per_second": got / wall if wall else 0,
        "server_cpu_us_per_msg": cpu / got * 1e6 if got else float("nan"),
        "delivery": delivery_t,
        "ack": ack_t,
        "client": client_t,
        "batch": batch,
    }


# Accept at depth: forwards into the mailbox the pickup part then drains, first at a fixed
# rate (the cost per message at a steady load), then a closed loop (the rate it reaches).
ACCEPT_RATE = 200.0
ACCEPT_SECONDS = 10.0
ACCEPT_CLOSED = 2000


async def _accept_at_depth(
    server: servers.Dovecote, payloads: list[bytes], queued: int
) -> dict[str, Any]:
    """Server CPU per accepted forward and accept latency into a mailbox holding `queued`."""
    n_open = int(ACCEPT_RATE * ACCEPT_SECONDS)
    paced, closed = payloads[:n_open], payloads[n_open : n_open + ACCEPT_CLOSED]
    cpu0 = servers.process_stats(server.pids)[2]
    run = await loadgen.open_loop(
        "accept at depth", server.ports, paced, ACCEPT_RATE, ACCEPT_SECONDS, connections=32
    )
    paced_cpu = servers.process_stats(server.pids)[2] - cpu0
    paced_load = os.getloadavg()[0]
    cpu0 = servers.process_stats(server.pids)[2]
    loop = await loadgen.closed_loop(
        "accept at depth, closed", server.ports, closed, 600, 32, warmup=0
    )
    loop_cpu = servers.process_stats(server.pids)[2] - cpu0
    return {
        "queued": queued,
        "paced_rate": ACCEPT_RATE,
        "paced_accepted": len(run.ok),
        "paced_errors": run.errors,
        "paced_cpu_us": paced_cpu / len(run.ok) * 1e6 if run.ok else None,
        "paced_latency": run.percentiles(),
        "paced_load": paced_load,
        "closed_accepted": len(loop.ok),
        "closed_errors": loop.errors,
        "closed_rate": loop.throughput,
        "closed_cpu_us": loop_cpu / len(loop.ok) * 1e6 if loop.ok else None,
        "closed_latency": loop.percentiles(),
        "closed_load": os.getloadavg()[0],
    }


async def pickup(profile: Profile, agent: BenchAgent) -> list[dict[str, Any]]:
    """Accept and pickup cost per message at queues of different sizes (SQLite).

    For each size: fill the mediatee's mailbox, measure forwards into it (server CPU per
    forward and latency), then pick up at the head of the queue. Size 0 measures the
    accept into an empty mailbox only.
    """
    results = []
    extra = int(ACCEPT_RATE * ACCEPT_SECONDS) + ACCEPT_CLOSED
    over_http = max([s for s in profile.pickup_sizes if s <= 10_000], default=0)
    pool = await asyncio.to_thread(
        forwards.pool, [agent.did], forwards.mediator_did(), max(over_http, 1) + extra
    )
    # The accept-at-depth forwards are the pool's tail, distinct from every fill (dedup).
    accept_payloads = pool[-extra:]
    for size in profile.pickup_sizes:
        with servers.workdir("pickup") as work:
            server = servers.Dovecote(work, identity=forwards.mediator_identity()).start()
            fill_how = "empty"
            try:
                did = server.did()
                async with httpx.AsyncClient(timeout=30) as client:
                    await mediate(client, server.base_urls[0], agent, did)
                if 0 < size <= 10_000:
                    run = await loadgen.closed_loop(
                        "fill", server.ports, pool[:size], 600, 32, warmup=0
                    )
                    fill_how = f"{len(run.ok)} forwards over HTTP"
                elif size > 10_000:
                    inner = await _inner_body(pool[0])
                    server.stop()
                    took = await asyncio.to_thread(
                        fill.fill, server.db_path, agent.did, inner, size
                    )
                    fill_how = f"direct SQLite insert ({took:.0f}s)"
                    server.start()
                    did = server.did()
                accept = await _accept_at_depth(server, accept_payloads, size)
                print(
                    f"    accept with {size} queued: {accept['paced_cpu_us'] or 0:.0f} µs CPU/"
                    f"forward at {ACCEPT_RATE:g}/s, closed loop {accept['closed_rate']:.0f}/s "
                    f"at {accept['closed_cpu_us'] or 0:.0f} µs",
                    flush=True,
                )
                if size:
                    measured = await _drain_head(
                        server.base_urls[0],
                        agent,
                        did,
                        min(profile.pickup_measure, size),
                        server.pids,
                    )
                    measured["load"] = os.getloadavg()[0]
                else:
                    measured = {"messages": 0, "delivery": [], "ack": [], "client": []}
                measured.update(
                    queued=size,
                    fill=fill_how,
                    db_mib=server.db_path.stat().st_size / (1 << 20),
                    accept=accept,
                )
                results.append(measured)
                if size:
                    print(
                        f"    pickup with {size} queued: {measured['per_second']:.0f} msg/s, "
                        f"server {measured['server_cpu_us_per_msg']:.0f} µs CPU/msg",
                        flush=True,
                    )
            finally:
                server.stop()
    return results


async def _inner_body(forward: bytes) -> bytes:
    from dovecote.didcomm import identity as identity_mod
    from dovecote.didcomm.packing import IdentitySecrets

    identity = identity_mod.load_or_create(
        forwards.mediator_identity(), ["http://127.0.0.1:1", "ws://127.0.0.1:1/ws"]
    )
    data, _ = await _PACKAGING.unpack(_CRYPTO, _RESOLVER, IdentitySecrets(identity), forward)
    inner = json.loads(data)["attachments"][0]["data"]["json"]
    return json.dumps(inner, separators=(",", ":")).encode()


async def rooms(profile: Profile) -> list[dict[str, Any]]:
    """Post throughput and fan-out latency to N WebSocket subscribers of one room."""
    try:
        from joserfc import jwt
        from joserfc.jwk import KeySet, OKPKey
    except ImportError:
        return [{"skipped": "joserfc not installed"}]
    results = []
    for subscribers in profile.rooms_subscribers:
        with servers.workdir("rooms") as work:
            key = OKPKey.generate_key("Ed25519", parameters={"kid": "bench"})
            jwks = work / "jwks.json"
            jwks.write_text(json.dumps(KeySet([key]).as_dict(private=False)))

            def token(sub: str, roles: list[str] | None = None, key: Any = key) -> str:
                now = int(time.time())
                claims = {
                    "sub": sub,
                    "iss": "bench",
                    "iat": now,
                    "exp": now + 3600,
                    "rooms": "*",
                    "roles": roles or [],
                }
                return str(
                    jwt.encode({"alg": "EdDSA", "kid": "bench"}, claims, key, algorithms=["EdDSA"])
                )

            server = servers.Dovecote(
                work,
                identity=forwards.mediator_identity(),
                env={"DOVECOTE_ROOMS_JWKS_FILE": str(jwks)},
            ).start()
            try:
                results.append(await _rooms_run(server, subscribers, profile.rooms_posts, token))
            finally:
                server.stop()
    return results


async def _rooms_run(
    server: servers.Dovecote, subscribers: int, posts: int, token: Any
) -> dict[str, Any]:
    base = server.base_urls[0]
    names = [f"s{i}" for i in range(subscribers)]
    admin = {"Authorization": f"Bearer {token('admin', ['admin'])}"}
    async with httpx.AsyncClient(timeout=60) as client:
        members = ["poster", *names]
        r = await client.post(
            f"{base}/v1/rooms",
            headers=admin,
            json={
                "name": "bench",
                "participants": [{"id": n, "role": "member"} for n in members[:100]],
            },
        )
        if r.status_code != 201:
            return {
                "subscribers": subscribers,
                "skipped": f"create room: {r.status_code} {r.text[:200]}",
            }
        room = r.json()["id"]
        gate = asyncio.Semaphore(16)

        async def add(name: str) -> None:  # creation takes at most 100 participants
            async with gate:
                r = await client.put(
                    f"{base}/v1/rooms/{room}/participants/{name}",
                    headers=admin,
                    json={"role": "member"},
                )
                r.raise_for_status()

        await asyncio.gather(*(add(n) for n in members[100:]))
        since = 0
        while True:  # subscribe after the membership events: no replay of those
            page = (
                await client.get(
                    f"{base}/v1/rooms/{room}/events",
                    headers=admin,
                    params={"after": since, "limit": 1000},
                )
            ).json()
            since = page["next_after"]
            if not page["has_more"]:
                break
        received: dict[str, list[float]] = {}
        sockets = []
        ready = 0

        async def subscriber(name: str) -> None:
            nonlocal ready
            async with websockets.connect(
                f"ws://127.0.0.1:{server.ports[0]}/v1/rooms/ws",
                max_size=None,
                additional_headers={"Authorization": f"Bearer {token(name)}"},
                open_timeout=60,
            ) as ws:
                sockets.append(ws)
                await ws.send(json.dumps({"action": "subscribe", "room": room, "since": since}))
                async for message in ws:
                    now = time.perf_counter()
                    # The rooms socket sends text frames (bytes would be decoded the same).
                    frame = message if isinstance(message, str) else message.decode()
                    if '"subscribed"' in frame:
                        ready += 1
                    at = frame.find("bench-")
                    if at >= 0:
                        marker = frame[at : frame.find('"', at)]
                        received.setdefault(marker, []).append(now)

        tasks = []
        for name in names:  # connect in waves: a handshake storm is a different benchmark
            tasks.append(asyncio.create_task(subscriber(name)))
            if len(tasks) % 50 == 0:
                await asyncio.sleep(0.2)
        deadline = time.monotonic() + 120
        while ready < subscribers and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        poster = {"Authorization": f"Bearer {token('poster')}"}
        sent: dict[str, float] = {}
        post_latency: list[float] = []
        statuses: dict[int, int] = {}

        async def post(marker: str) -> None:
            t0 = time.perf_counter()
            sent[marker] = t0
            r = await client.post(
                f"{base}/v1/rooms/{room}/messages",
                headers={**poster, "Idempotency-Key": marker},
                json={"text": marker},
            )
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            post_latency.append(time.perf_counter() - t0)

        # Paced: fan-out latency at light load (10 posts/s).
        paced = min(50, posts)
        for i in range(paced):
            await post(f"bench-p{i}")
            await asyncio.sleep(0.1)
        await asyncio.sleep(2)
        # Closed loop: post throughput with every subscriber attached (8 posters).
        queue = [f"bench-c{i}" for i in range(posts)]
        cpu0 = servers.process_stats(server.pids)[2]
        started = time.perf_counter()

        async def poster_loop() -> None:
            while queue:
                await post(queue.pop())

        await asyncio.gather(*(poster_loop() for _ in range(8)))
        post_seconds = time.perf_counter() - started
        expected = (paced + posts) * subscribers
        deadline = time.monotonic() + 60
        while (  # noqa: ASYNC110
            sum(len(v) for v in received.values()) < expected and time.monotonic() < deadline
        ):
            await asyncio.sleep(0.2)
        # From the first post of the closed loop until its last delivery arrived.
        loop_cpu = servers.process_stats(server.pids)[2] - cpu0
        loop_load = os.getloadavg()[0]
        for ws in sockets:
            with contextlib.suppress(Exception):
                await ws.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def fanout(prefix: str) -> tuple[list[float], list[float]]:
        each, last = [], []
        for marker, t0 in sent.items():
            if marker.startswith(prefix) and marker in received:
                times = [t - t0 for t in received[marker]]
                each += times
                if len(times) == subscribers:
                    last.append(max(times))
        return each, last

    paced_each, paced_last = fanout("bench-p")
    loaded_each, loaded_last = fanout("bench-c")
    loop_deliveries = sum(len(v) for k, v in received.items() if k.startswith("bench-c"))
    return {
        "cpu_us_per_delivery": loop_cpu / loop_deliveries * 1e6 if loop_deliveries else None,
        "cpu_us_per_post": loop_cpu / posts * 1e6 if posts else None,
        "load": loop_load,
        "subscribers": subscribers,
        "connected": ready,
        "posts": posts + paced,
        "statuses": statuses,
        "post_rate": posts / post_seconds,
        "post_latency": post_latency,
        "deliveries": sum(len(v) for v in received.values()),
        "expected": expected,
        "paced_each": paced_each,
        "paced_last": paced_last,
        "loaded_each": loaded_each,
        "loaded_last": loaded_last,
    }


async def soak(
    profile: Profile,
    agents: list[BenchAgent],
    payloads: list[bytes],
    rate: float,
    seconds: float,
    live: bool = False,
) -> dict[str, Any]:
    """Forwards at `rate` for `seconds`; server RSS and file descriptors every 5 s.

    By default the mediatees are offline and their mailboxes grow (store-and-forward's
    normal case, and the accept path alone at the chosen share of its saturation). With
    `live`, each mediatee is on a WebSocket in live mode acknowledging every push: the
    server then also packs every push and unpacks every acknowledgement, which costs more
    than the accept (see docs/performance.md), so use a lower rate.
    """
    with servers.workdir("soak") as work:
        # Forwards are reused once the pool is spent: a short dedup window (swept every
        # 5 s) forgets their digests long before they come round again.
        server = servers.Dovecote(
            work,
            identity=forwards.mediator_identity(),
            env={"DOVECOTE_DEDUP_WINDOW": "30", "DOVECOTE_SWEEP_INTERVAL": "5"},
        ).start()
        consumers = []
        try:
            did = server.did()
            async with httpx.AsyncClient(timeout=30) as client:
                for agent in agents:
                    await mediate(client, server.base_urls[0], agent, did)
            for agent in agents if live else []:
                consumer = LiveConsumer(agent, f"ws://127.0.0.1:{server.ports[0]}/ws", did)
                await consumer.start()
                consumers.append(consumer)
            total = int(rate * seconds)
            cycled = [payloads[i % len(payloads)] for i in range(total)]
            window: list[loadgen.Sample] = []
            samples: list[dict[str, Any]] = []
            started = time.perf_counter()

            async def sampler() -> None:
                while True:
                    await asyncio.sleep(5)
                    rss, fds, cpu = servers.process_stats(server.pids)
                    lat = loadgen.summarize([s.latency for s in window if s.status == 202])
                    errors = sum(1 for s in window if s.status != 202)
                    window.clear()
                    samples.append(
                        {
                            "t": time.perf_counter() - started,
                            "rss_mib": rss,
                            "fds": fds,
                            "cpu": cpu,
                            "errors": errors,
                            "load1": os.getloadavg()[0],
                            **lat,
                        }
                    )

            task = asyncio.create_task(sampler())
            cpu0 = servers.process_stats(server.pids)[2]
            run = await loadgen.open_loop(
                "soak", server.ports, cycled, rate, seconds, connections=64, on_sample=window.append
            )
            soak_cpu = servers.process_stats(server.pids)[2] - cpu0
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await asyncio.sleep(3)
            metrics = (await httpx.AsyncClient().get(server.base_urls[0] + "/metrics")).text
        finally:
            for consumer in consumers:
                await consumer.stop()
            server.stop()
    duplicates = 0.0
    for line in metrics.splitlines():
        if line.startswith("dovecote_messages_duplicate_total"):
            duplicates = float(line.split()[-1])
    half = [s for s in samples if s["t"] >= samples[-1]["t"] / 2] if samples else []
    return {
        **rss_growth(samples),
        "server_cpu_us_per_msg": soak_cpu / len(run.ok) * 1e6 if run.ok else None,
        "rate": rate,
        "seconds": seconds,
        "sent": len(run.samples),
        "accepted": len(run.ok),
        "errors": run.errors,
        "statuses": dict(run.statuses),
        "server_duplicates": duplicates,
        "pushed": sum(len(c.pushed) for c in consumers),
        "acked": sum(len(c.acked) for c in consumers),
        "samples": samples,
        "reconnects": sum(c.reconnects for c in consumers),
        "closes": _merge([c.closes for c in consumers]),
        "rss_slope_mib_per_min": report.slope([s["t"] for s in half], [s["rss_mib"] for s in half])
        * 60,
        "fd_slope_per_min": report.slope([s["t"] for s in half], [s["fds"] for s in half]) * 60,
        "latency": run.percentiles(),
    }


def rss_growth(samples: list[dict[str, Any]]) -> dict[str, float]:
    """RSS first / last / max sample and growth in %, over the whole run and after warm-up.

    Warm-up is the first minute (or the first tenth of a shorter run): caches, the SQLite
    page cache and the allocator's arenas fill then, and the target (< 10 %) is about what
    comes after.
    """
    if not samples:
        return {}
    rss = [float(s["rss_mib"]) for s in samples]
    warm_t = min(60.0, samples[-1]["t"] / 10)
    warm = next((float(s["rss_mib"]) for s in samples if s["t"] >= warm_t), rss[0])
    return {
        "rss_first_mib": rss[0],
        "rss_last_mib": rss[-1],
        "rss_max_mib": max(rss),
        "rss_growth_pct": (rss[-1] - rss[0]) / rss[0] * 100,
        "rss_max_growth_pct": (max(rss) - rss[0]) / rss[0] * 100,
        "rss_warm_t": warm_t,
        "rss_warm_mib": warm,
        "rss_growth_after_warmup_pct": (rss[-1] - warm) / warm * 100,
    }


def _merge(counts: list[dict[str, int]]) -> dict[str, int]:
    merged: dict[str, int] = {}
    for count in counts:
        for key, n in count.items():
            merged[key] = merged.get(key, 0) + n
    return merged


async def run(
    parts: list[str],
    profile: Profile,
    agents: dict[str, Any],
    payloads: list[bytes],
    out: Any,
    plots: Path,
    data: dict[str, Any],
) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    if "e2e" in parts:
        rows = []
        cpu_rows = []
        engines = ["sqlite"] + (
            ["postgres"] if profile.name == "full" and servers.postgres_available() else []
        )
        extra["e2e"] = []
        for engine in engines:
            print(f"e2e: accept -> live push -> ack ({engine}) ...", flush=True)
            result = await e2e(profile, agents["live"], agents["offline"], engine)
            extra["e2e"].append({k: v for k, v in result.items() if not isinstance(v, list)})
            extra["e2e"][-1]["phases"] = result["phases"]
            rows += [
                _row(f"{engine}: POST -> 202 (accepted)", result["accept"]),
                _row(f"{engine}: POST -> pushed on WebSocket", result["push"]),
                _row(f"{engine}: POST -> acknowledgement answered", result["ack"]),
            ]
            lost = result["accepted"] - result["acked"]
            rows.append(
                [
                    f"{engine}: counts (live phases)",
                    f"sent {result['sent']}",
                    f"accepted {result['accepted']}",
                    f"pushed {result['pushed']}",
                    f"acked {result['acked']} (not acked: {lost})",
                    f"duplicate pushes {result['duplicate_pushes']}, "
                    f"reconnects {result['reconnects']}",
                ]
            )
            for p in result["phases"]:
                cpu_rows.append(
                    [
                        engine,
                        "accept alone (mediatee offline)"
                        if p["kind"] == "alone"
                        else "accept -> push -> ack",
                        "one at a time"
                        if p["serial"]
                        else "closed loop, 16 connections"
                        if p["closed_loop"]
                        else f"{p['offered']:g}/s offered",
                        f"{p['done']} of {p['sent']}",
                        f"{p['done'] / p['pushes']:.1f}" if p["pushes"] else "",
                        f"{p['rate']:.0f}",
                        f"{p['cpu_us'] or float('nan'):.0f}",
                        f"{p['load']:.1f}",
                    ]
                )
            for name, what in (
                ("fixed", f"{profile.e2e_rate:g}/s"),
                ("closed", "closed loop"),
                ("serial", "one at a time"),
            ):
                live, alone = result[f"{name}_live_cpu_us"], result[f"{name}_accept_cpu_us"]
                cpu_rows.append(
                    [
                        engine,
                        f"**ratio, {what}**: live ÷ alone",
                        "all phases of this kind",
                        "",
                        "",
                        "",
                        f"**{live / alone:.2f}** ({live:.0f} / {alone:.0f} µs)"
                        if live and alone
                        else "-",
                        f"{result[f'{name}_live_load']:.1f} / {result[f'{name}_alone_load']:.1f}",
                    ]
                )
        out.add(
            "## End to end: accept -> live WebSocket push -> acknowledge\n\n"
            "Two mediatees on one server: one on a WebSocket in live mode for the whole run "
            "(it decrypts each push and acknowledges it with messages-received), one never "
            f"connected. Phases alternate: accept alone (forwards to the offline one) then "
            f"live, {profile.e2e_rate:g} forwards/s for {profile.e2e_seconds:g} s each, "
            f"{profile.e2e_rounds} times, then one closed loop of the same count each, then "
            f"up to {SERIAL_COUNT} each one at a time (the next POST only once the previous "
            "message was accepted, or pushed and its acknowledgement answered: one message "
            f"per push), alternating in {SERIAL_CHUNKS} chunks. "
            "Server CPU (psutil over the server's processes) per message: accepted for "
            "the accept alone, acknowledged (and the acknowledgement answered) for live; "
            "the consumer's own CPU is not counted. Latencies from when each POST was due, "
            "over the fixed-rate live phases.\n\n"
            + report.table(ONE_MESSAGE_HEADERS, rows)
            + "\n\n"
            + report.table(
                [
                    "engine",
                    "phase",
                    "offered",
                    "messages",
                    "msgs per push",
                    "msg/s",
                    "server CPU µs/msg",
                    "load (1 min)",
                ],
                cpu_rows,
            )
        )
    if "pickup" in parts:
        print("pickup ...", flush=True)
        results = await pickup(profile, agents["pickup"])
        extra["pickup"] = [{k: v for k, v in r.items() if not isinstance(v, list)} for r in results]
        rows = []
        for r in results:
            if not r["messages"]:
                continue
            d = loadgen.summarize(r["delivery"])
            a = loadgen.summarize(r["ack"])
            per_msg_ms = r["seconds"] / r["messages"] * 1e3
            rows.append(
                [
                    f"{r['queued']:,}",
                    r["fill"],
                    f"{r['db_mib']:.0f}",
                    r["messages"],
                    f"{r['per_second']:.0f}",
                    f"{per_msg_ms:.2f}",
                    f"{r['server_cpu_us_per_msg']:.0f}",
                    report.ms(d["p50"]),
                    report.ms(d["p99"]),
                    report.ms(a["p50"]),
                    report.ms(a["p99"]),
                    f"{r['load']:.1f}",
                ]
            )
        accept_rows = []
        for r in results:
            a = r["accept"]
            pl, cl = a["paced_latency"], a["closed_latency"]
            accept_rows.append(
                [
                    f"{r['queued']:,}",
                    f"{a['paced_accepted']} / {a['paced_errors']}",
                    f"{a['paced_cpu_us'] or float('nan'):.0f}",
                    f"{report.ms(pl['p50'])} / {report.ms(pl['p99'])}",
                    f"{a['paced_load']:.1f}",
                    f"{a['closed_rate']:.0f}",
                    f"{a['closed_cpu_us'] or float('nan'):.0f}",
                    f"{report.ms(cl['p50'])} / {report.ms(cl['p99'])}",
                    f"{a['closed_load']:.1f}",
                ]
            )
        out.add(
            "## Pickup at the head of the queue\n\n"
            "One mediatee picks up in batches of 100 (delivery-request, decrypt, "
            "messages-received) until the measured count is done; SQLite.\n\n"
            + report.table(
                [
                    "queued",
                    "filled by",
                    "DB MiB",
                    "measured msgs",
                    "msg/s",
                    "wall ms/msg",
                    "server CPU µs/msg",
                    "delivery p50 ms",
                    "delivery p99 ms",
                    "received p50 ms",
                    "received p99 ms",
                    "load 1 min",
                ],
                rows,
            )
            + "\n\n## Accept into a deep mailbox\n\n"
            f"Before each pickup above, on the same server: {ACCEPT_RATE:g} forwards/s for "
            f"{ACCEPT_SECONDS:g} s to the same mediatee (whose mailbox holds `queued`), then "
            f"{ACCEPT_CLOSED} more in a closed loop (32 connections). Server CPU per "
            "accepted forward; latency from when each POST was due (paced) or sent.\n\n"
            + report.table(
                [
                    "queued",
                    "paced: accepted / errors",
                    "paced: server CPU µs/forward",
                    "paced: p50 / p99 ms",
                    "load",
                    "closed: forwards/s",
                    "closed: server CPU µs/forward",
                    "closed: p50 / p99 ms",
                    "load",
                ],
                accept_rows,
            )
        )
    if "rooms" in parts:
        print("rooms ...", flush=True)
        results = await rooms(profile)
        extra["rooms"] = [{k: v for k, v in r.items() if not isinstance(v, list)} for r in results]
        rows = []
        notes = []
        for r in results:
            if "skipped" in r:
                notes.append(
                    f"not measured ({r.get('subscribers', '')} subscribers): {r['skipped']}"
                )
                continue
            n = r["subscribers"]
            rows += [
                _row(f"{n} subscribers: POST latency (closed loop, 8 posters)", r["post_latency"]),
                _row(f"{n} subscribers: fan-out, each delivery (10 posts/s)", r["paced_each"]),
                _row(f"{n} subscribers: fan-out, last subscriber (10 posts/s)", r["paced_last"]),
                _row(f"{n} subscribers: fan-out, each delivery (closed loop)", r["loaded_each"]),
            ]
            notes.append(
                f"{n} subscribers: {r['connected']} connected, post throughput "
                f"{r['post_rate']:.0f} posts/s ({r['post_rate'] * n:.0f} "
                f"deliveries/s), delivered {r['deliveries']} of {r['expected']}, "
                f"statuses {r['statuses']}; server CPU {r['cpu_us_per_delivery'] or 0:.0f} µs "
                f"per delivery ({r['cpu_us_per_post'] or 0:.0f} µs per post) over the closed "
                f"loop, load {r['load']:.1f}"
            )
        out.add(
            "## Rooms: post throughput and fan-out\n\n"
            + "\n".join(f"- {n}" for n in notes)
            + ("\n\n" + report.table(ONE_MESSAGE_HEADERS, rows) if rows else "")
        )
    if "soak" in parts and profile.soak_seconds > 0:
        saturation = None
        for suite in data.get("forward", []):
            if suite["label"].startswith("sqlite") and suite["steps"]:
                saturation = suite["steps"][-1]["throughput"]
        rate = float(profile.extra.get("soak_rate") or (saturation or 200) / 2)
        rate_source = (
            "set with --soak-rate"
            if profile.extra.get("soak_rate")
            else "half of the SQLite saturation measured above"
            if saturation
            else "no saturation measured in this run: default 100"
        )
        print(f"soak: {rate:.0f} msg/s for {profile.soak_seconds:.0f} s ...", flush=True)
        recipients = [agents[f"r{i}"] for i in range(profile.recipients)]
        live = bool(profile.extra.get("soak_live"))
        result = await soak(profile, recipients, payloads, rate, profile.soak_seconds, live)
        report.plot_soak(result["samples"], plots / "soak.png")
        extra["soak"] = result
        s = result["samples"]
        lat = result["latency"]
        first, last = (s[0], s[-1]) if s else ({}, {})
        out.add(
            "## Soak\n\n"
            f"{rate:.0f} forwards/s ({rate_source}) for "
            f"{profile.soak_seconds / 60:.1f} min, SQLite, {len(recipients)} mediatees "
            + (
                "on WebSockets in live mode acknowledging every push"
                if live
                else "offline (their mailboxes grow; --soak-live puts them on live WebSockets)"
            )
            + "; server sampled every 5 s. Slopes are least-squares over the second half of "
            "the run (after warm-up).\n\n"
            + report.table(
                ["measure", "value"],
                [
                    [
                        "sent / accepted / errors",
                        f"{result['sent']} / {result['accepted']} / "
                        f"{result['errors']} {result['statuses']}",
                    ],
                    ["pushed / acked (live consumers)", f"{result['pushed']} / {result['acked']}"],
                    [
                        "live sockets dropped and reconnected",
                        f"{result['reconnects']} {result['closes']}",
                    ],
                    [
                        "accept latency p50 / p99 / max ms",
                        f"{report.ms(lat['p50'])} / {report.ms(lat['p99'])}"
                        f" / {report.ms(lat['max'])}",
                    ],
                    [
                        "RSS first / last / max sample MiB",
                        f"{result.get('rss_first_mib', 0):.1f} / "
                        f"{result.get('rss_last_mib', 0):.1f} / "
                        f"{result.get('rss_max_mib', 0):.1f}",
                    ],
                    [
                        "RSS growth last vs first (max vs first); target < 10 %",
                        f"{result.get('rss_growth_pct', 0):+.1f} % "
                        f"({result.get('rss_max_growth_pct', 0):+.1f} %): "
                        + ("met" if result.get("rss_max_growth_pct", 99) < 10 else "NOT met"),
                    ],
                    [
                        f"RSS growth after warm-up (last vs t={result.get('rss_warm_t', 0):.0f} s)",
                        f"{result.get('rss_warm_mib', 0):.1f} -> "
                        f"{result.get('rss_last_mib', 0):.1f} MiB, "
                        f"{result.get('rss_growth_after_warmup_pct', 0):+.1f} %",
                    ],
                    [
                        "server CPU per accepted forward (whole soak)",
                        f"{result.get('server_cpu_us_per_msg') or float('nan'):.0f} µs",
                    ],
                    [
                        "1-min load first / last sample / max",
                        f"{first.get('load1', 0):.2f} / {last.get('load1', 0):.2f} / "
                        f"{max((x.get('load1', 0) for x in s), default=0):.2f}",
                    ],
                    ["RSS slope (2nd half) MiB/min", f"{result['rss_slope_mib_per_min']:.2f}"],
                    ["open fds first / last", f"{first.get('fds', 0)} / {last.get('fds', 0)}"],
                    ["fd slope (2nd half) per min", f"{result['fd_slope_per_min']:.2f}"],
                ],
            )
            + f"\n\n![soak]({plots.name}/soak.png)"
        )
    return extra
