"""A send that fails below httpx, or a bug in one send, must not wedge a target.

Found by the chaos suite's connection cut: anyio raised AttributeError on a socket the peer
had reset, the outbox logged `outbox.crashed`, and the half-open breaker's trial slot was
never given back, so no later forward to that endpoint was ever tried (36 of 150 delivered).
Pure logic: the real breaker, outbox workers and sender, with the failure injected where
the network stack raised it.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from dovecote.delivery.breaker import Breakers
from dovecote.delivery.outbox import OutboxWorkers
from dovecote.delivery.sender import OutboxSender, OutboxSettings
from dovecote.ops.settings import Settings
from dovecote.store.base import OutboxItem
from dovecote.util.kinds import OutboxKind

URL = "http://203.0.113.7/inbox"


def _item() -> OutboxItem:
    now = time.time()
    return OutboxItem(1, "forward", URL, b"{}", {}, now, now, 0)


def _half_open() -> Breakers:
    clock = [0.0]
    breakers = Breakers(threshold=1, reset=1.0, trials=1, clock=lambda: clock[0])
    breakers.failure(URL)
    clock[0] = 2.0
    assert breakers.state(URL) == "half-open"
    return breakers


class _Bug:
    async def send(self, item: OutboxItem) -> None:
        raise RuntimeError("a bug in one send")

    async def aclose(self) -> None:
        pass


async def test_a_crashed_send_gives_back_the_half_open_trial(tmp_path: Path) -> None:
    breakers = _half_open()
    workers = OutboxWorkers(
        None,  # type: ignore[arg-type]  # no store: the send crashes first
        OutboxSettings.of(Settings(data_dir=tmp_path)),
        "i1",
        breakers,
        sender=_Bug(),  # type: ignore[arg-type]  # an OutboxSender stand-in whose send() raises
    )
    await workers._deliver(workers.pools[OutboxKind.FORWARD], _item())
    # Before the fix the only trial slot stayed taken: the target was blocked for good.
    assert breakers.acquire(URL)


async def test_an_error_below_httpx_is_a_failed_attempt(tmp_path: Path) -> None:
    def reset(request: httpx.Request) -> httpx.Response:
        raise AttributeError("'NoneType' object has no attribute 'getpeername'")

    sender = OutboxSender(OutboxSettings.of(Settings(data_dir=tmp_path)), None)  # type: ignore[arg-type]
    sender._clients["forward"] = httpx.AsyncClient(transport=httpx.MockTransport(reset))
    attempt = await sender.send(_item())
    await sender.aclose()
    assert attempt.outcome == "transient" and "AttributeError" in (attempt.error or "")
