"""The decrypt worker pool (didcomm/decrypt.py) with real worker processes: batches per
loop turn, the same answers as the in-process unpack, and fallback when a worker is lost."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dovecote.didcomm.decrypt import DecryptPool
from dovecote.didcomm.identity import load_or_create
from dovecote.didcomm.packing import Packer
from dovecote.errors import Unavailable, UnpackFailed
from support.agent import Agent

PING = "https://didcomm.org/trust-ping/2.0/ping"


@pytest.fixture
async def packer(tmp_path: Path) -> Packer:
    packer = Packer(load_or_create(tmp_path, ["http://m.example"]))
    await packer.start()
    return packer


async def _pool(packer: Packer, size: int = 1, **options: float) -> DecryptPool:
    pool = DecryptPool(size, packer.secret_keys(), packer.secret_for, **options)  # type: ignore[arg-type]
    await pool.start()
    packer.anon_opener = pool
    return pool


@pytest.fixture
async def pool(packer: Packer) -> AsyncIterator[DecryptPool]:
    pool = await _pool(packer)
    yield pool
    await pool.stop()


async def _envelopes(packer: Packer, count: int) -> list[bytes]:
    agent = Agent.create("http://m.example", packer.identity.did)
    return [
        (await agent.pack(agent.message(PING, {"n": f"p{i}"}), anonymous=True)).encode()
        for i in range(count)
    ]


def _frames_sent(pool: DecryptPool) -> list[int]:
    """Spy on the frames the pool writes: the number of items in each."""
    sizes: list[int] = []
    send = pool._send

    def spy(worker: object, batch: list[object]) -> None:
        sizes.append(len(batch))
        send(worker, batch)  # type: ignore[arg-type]

    pool._send = spy  # type: ignore[method-assign,assignment]
    return sizes


async def test_one_loop_turn_is_one_batch(packer: Packer, pool: DecryptPool) -> None:
    envelopes = await _envelopes(packer, 40)
    sizes = _frames_sent(pool)
    unpacked = await asyncio.gather(*(packer.unpack(raw) for raw in envelopes))
    assert [u.message["body"]["n"] for u in unpacked] == [f"p{i}" for i in range(40)]
    assert all(u.recipient_kid.startswith(packer.identity.did) for u in unpacked)
    assert sizes == [32, 8]  # BATCH_MAX, then the rest; nothing waited for a timer
    # One at a time: each is sent on its own turn (no fixed wait at low rates).
    for raw in envelopes[:3]:
        await packer.unpack(raw)
    assert sizes[2:] == [1, 1, 1]
    assert pool.fallbacks == 0 and pool.queued_bytes == 0


async def test_a_busy_worker_gets_larger_batches(packer: Packer) -> None:
    # max_wait far above a frame's few milliseconds: a worker slowed by a busy machine
    # must not make this test open envelopes here.
    pool = await _pool(packer, max_wait=5.0, max_held_batches=2)
    try:
        await _busy_worker_batches(packer, pool)
    finally:
        await pool.stop()


async def _busy_worker_batches(packer: Packer, pool: DecryptPool) -> None:
    envelopes = await _envelopes(packer, 100)
    sizes = _frames_sent(pool)
    held: list[int] = []
    results = pool._results

    def spy(worker: object, frame: object) -> None:
        held.append(len(pool.workers[0].held))
        results(worker, frame)  # type: ignore[arg-type]

    pool._results = spy  # type: ignore[method-assign,assignment]
    unpacked = await asyncio.gather(*(packer.unpack(raw) for raw in envelopes))
    assert len(unpacked) == 100
    # Two frames held at most; the rest waited here for the first answers (well within
    # MAX_WAIT: a frame takes milliseconds) and went to the worker too, none opened here.
    assert sizes == [32, 32, 32, 4] and max(held) <= 2
    assert pool.fallbacks == 0


async def test_envelopes_that_waited_max_wait_are_opened_here_oldest_first(
    packer: Packer,
) -> None:
    """A worker that is behind: what waited max_wait for room is opened in this process
    (the oldest first), by the timer when nothing else happens; the rest still goes to
    the worker. Nothing is lost or answered twice."""
    pool = await _pool(packer, size=1, batch_max=4, max_held_batches=1, max_wait=0.2)
    try:
        envelopes = await _envelopes(packer, 20)
        sizes = _frames_sent(pool)
        opened_here: list[bytes] = []
        run_here = pool._run_in_process

        def spy(item: object) -> None:
            opened_here.append(item.raw)  # type: ignore[attr-defined]
            run_here(item)  # type: ignore[arg-type]

        pool._run_in_process = spy  # type: ignore[method-assign]
        # The worker is stopped (SIGSTOP): it holds one frame and answers nothing.
        os.kill(pool.workers[0].pid, signal.SIGSTOP)
        try:
            first = [asyncio.ensure_future(packer.unpack(raw)) for raw in envelopes[:10]]
            await asyncio.sleep(0.1)
            assert not opened_here  # younger than max_wait: still waiting for the worker
            later = [asyncio.ensure_future(packer.unpack(raw)) for raw in envelopes[10:]]
            # 0-3 are the frame the worker holds; the timer opens 4-9 here at 0.2 s.
            done = await asyncio.wait_for(asyncio.gather(*first[4:]), 5)
            assert [u.message["body"]["n"] for u in done] == [f"p{i}" for i in range(4, 10)]
            assert opened_here == envelopes[4:10]  # oldest first, the later ones not yet
            # Set again after it fired: 10-19 (queued at 0.1 s) are opened here at 0.3 s,
            # with nothing else happening meanwhile.
            rest = await asyncio.wait_for(asyncio.gather(*later), 5)
            assert opened_here == envelopes[4:20]
        finally:
            os.kill(pool.workers[0].pid, signal.SIGCONT)
        held = await asyncio.wait_for(asyncio.gather(*first[:4]), 5)
        assert sorted(u.message["body"]["n"] for u in [*held, *rest]) == sorted(
            f"p{i}" for i in [0, 1, 2, 3, *range(10, 20)]
        )
        assert sizes == [4] and pool.queued_bytes == 0 and pool.fallbacks == 16
    finally:
        await pool.stop()


async def test_items_of_a_lost_worker_wait_for_a_live_one_not_for_max_wait(
    packer: Packer,
) -> None:
    """An item that was in a lost worker's frame may be what killed it: while another
    worker lives it waits for that one, however long, and is never opened here."""
    pool = await _pool(packer, size=2, batch_max=4, max_held_batches=1, max_wait=0.05)
    try:
        envelopes = await _envelopes(packer, 4)
        for worker in pool.workers:
            os.kill(worker.pid, signal.SIGSTOP)
        a, b = pool.workers
        try:
            tasks = [asyncio.ensure_future(packer.unpack(raw)) for raw in envelopes]
            await asyncio.sleep(0.05)
            holder, other = (a, b) if a.held else (b, a)
            assert holder.held_items == 4
            os.kill(holder.pid, signal.SIGKILL)  # as a crash on a poison envelope would
            await asyncio.sleep(0.3)  # six times max_wait
            assert pool.fallbacks == 0 and not any(t.done() for t in tasks)
        finally:
            for worker in (a, b):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGCONT)
        unpacked = await asyncio.wait_for(asyncio.gather(*tasks), 10)
        assert sorted(u.message["body"]["n"] for u in unpacked) == [f"p{i}" for i in range(4)]
        assert pool.fallbacks == 0 and other.alive
    finally:
        await pool.stop()


async def test_worker_errors_are_the_in_process_errors(packer: Packer, pool: DecryptPool) -> None:
    (raw,) = await _envelopes(packer, 1)
    envelope = json.loads(raw)
    tampered = json.dumps(envelope | {"tag": envelope["tag"][:-4] + "AAAA"}).encode()
    with pytest.raises(UnpackFailed) as by_worker:
        await packer.unpack(tampered)
    packer.anon_opener = None
    with pytest.raises(UnpackFailed) as in_process:
        await packer.unpack(tampered)
    assert str(by_worker.value) == str(in_process.value)
    assert pool.fallbacks == 0


async def test_items_of_a_killed_worker_are_opened_anyway(packer: Packer) -> None:
    pool = await _pool(packer, size=2)
    try:
        envelopes = await _envelopes(packer, 64)
        victim = pool.workers[0].pid
        tasks = [asyncio.ensure_future(packer.unpack(raw)) for raw in envelopes]
        await asyncio.sleep(0)  # queued; the flush sends them on the next turn
        await asyncio.sleep(0)
        assert pool.workers[0].held_items > 0
        os.kill(victim, signal.SIGKILL)
        unpacked = await asyncio.gather(*tasks)
        assert sorted(u.message["body"]["n"] for u in unpacked) == sorted(
            f"p{i}" for i in range(64)
        )
        for _ in range(100):  # the replacement starts in the background
            if pool.restarts:
                break
            await asyncio.sleep(0.1)
        assert pool.restarts == 1
        assert victim not in [w.pid for w in pool.workers]
        assert len(pool.workers) == 2 and pool.queued_bytes == 0
        assert pool.snapshot()["alive"] == 2
    finally:
        await pool.stop()


async def test_no_live_worker_and_byte_bound_fall_back_in_process(packer: Packer) -> None:
    pool = await _pool(packer, size=1, max_queued_bytes=0)
    try:
        envelopes = await _envelopes(packer, 3)
        unpacked = await asyncio.gather(*(packer.unpack(raw) for raw in envelopes))
        assert len(unpacked) == 3 and pool.fallbacks == 3  # every one past the 0-byte bound
        pool.max_queued_bytes = 1 << 20
        await pool.stop()  # no worker left: in-process, no error
        assert (await packer.unpack(envelopes[0])).message["body"]["n"] == "p0"
        assert pool.fallbacks == 4
    finally:
        await pool.stop()


async def test_an_item_lost_twice_fails_instead_of_killing_every_worker(
    packer: Packer,
) -> None:
    pool = await _pool(packer, size=2, hang_seconds=0.5)
    try:
        (raw,) = await _envelopes(packer, 1)
        # Both workers stopped (SIGSTOP): each looks hung, is killed, and the item moves on.
        for worker in pool.workers:
            os.kill(worker.pid, signal.SIGSTOP)
        # A hang points at the envelope: 400, not a 503 that has the sender retry it.
        with pytest.raises(UnpackFailed):
            await asyncio.wait_for(packer.unpack(raw), 30)
        assert pool.failed == 1
    finally:
        await pool.stop()


async def test_an_item_whose_workers_were_killed_from_outside_is_a_503_not_a_400(
    packer: Packer,
) -> None:
    """Two SIGKILLs from outside (the OOM killer, an operator) say nothing against the
    envelope: the sender gets 503 with Retry-After (retry later), not 400 (do not)."""
    pool = await _pool(packer, size=2)
    try:
        (raw,) = await _envelopes(packer, 1)
        for worker in pool.workers:
            os.kill(worker.pid, signal.SIGSTOP)  # each holds the item until killed
        task = asyncio.ensure_future(packer.unpack(raw))
        for _ in range(2):
            for _ in range(200):
                holder = next((w for w in pool.workers if w.alive and w.held), None)
                if holder is not None:
                    break
                await asyncio.sleep(0.01)
            assert holder is not None
            os.kill(holder.pid, signal.SIGKILL)
            for _ in range(200):
                if not holder.alive:
                    break
                await asyncio.sleep(0.01)
        with pytest.raises(Unavailable) as lost:
            await asyncio.wait_for(task, 30)
        assert lost.value.status == 503 and lost.value.retry_after
        assert pool.failed == 1
    finally:
        await pool.stop()


async def test_items_waiting_for_room_are_answered_when_the_only_worker_dies(
    packer: Packer,
) -> None:
    pool = await _pool(packer, size=1, batch_max=2)
    try:
        envelopes = await _envelopes(packer, 10)
        (worker,) = pool.workers
        os.kill(worker.pid, signal.SIGSTOP)  # it holds what it can; the rest waits
        tasks = [asyncio.ensure_future(packer.unpack(raw)) for raw in envelopes]
        for _ in range(50):
            if worker.held and pool._pending:
                break
            await asyncio.sleep(0.01)
        assert len(worker.held) == pool.max_held_batches and pool._pending
        os.kill(worker.pid, signal.SIGKILL)
        # No request comes after the loss: the waiting ones must not wait for one.
        unpacked = await asyncio.wait_for(asyncio.gather(*tasks), 10)
        assert sorted(u.message["body"]["n"] for u in unpacked) == sorted(
            f"p{i}" for i in range(10)
        )
        assert pool.queued_bytes == 0 and not pool._pending
    finally:
        await pool.stop()


async def test_envelopes_that_shared_a_lost_batch_are_not_failed_for_it(
    packer: Packer,
) -> None:
    pool = await _pool(packer, size=2)
    try:
        envelopes = await _envelopes(packer, 10)  # all well-formed
        first, second = pool.workers
        for worker in pool.workers:
            os.kill(worker.pid, signal.SIGSTOP)
        tasks = [asyncio.ensure_future(packer.unpack(raw)) for raw in envelopes]
        for _ in range(50):
            if first.held or second.held:
                break
            await asyncio.sleep(0.01)
        victim, other = (first, second) if first.held else (second, first)
        os.kill(victim.pid, signal.SIGKILL)  # e.g. the OOM killer: its batch moves on
        for _ in range(100):
            if not victim.alive and other.held:
                break
            await asyncio.sleep(0.01)
        os.kill(other.pid, signal.SIGKILL)  # a second loss of the same envelopes
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
        failed = [r for r in results if isinstance(r, BaseException)]
        opened = [r.message["body"]["n"] for r in results if not isinstance(r, BaseException)]
        # Re-run items go one per frame, and only the frame a worker was opening counts
        # against its items: at most the one envelope being opened at the second loss
        # fails (before: all 10, which had shared the first lost batch).
        assert len(failed) <= 1 and pool.failed == len(failed), failed
        assert len(set(opened)) == len(opened) == 10 - len(failed)
    finally:
        await pool.stop()
