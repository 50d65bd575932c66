"""Load for chaos scenarios: senders that behave as clients are told to, and the count.

Senders POST pre-packed forwards and retry each one (same bytes, backoff 50 ms..1 s) until
it gets a 202, as the docs tell clients to. Every 202 is timestamped, so a scenario can
say how long the service took to accept again after a fault (recovery time). At the end
the mailboxes are drained with pickup and every message is counted: lost (accepted but
never delivered) and duplicates (one inner message stored or delivered twice) must be 0.
"""

from __future__ import annotations

import asyncio
import itertools
import ssl
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

from support.agent import ENCRYPTED


@dataclass
class Load:
    """Concurrent senders over a set of forwards (inner id -> envelope)."""

    url: str
    packed: dict[str, str]
    senders: int = 8
    verify: ssl.SSLContext | bool = True
    pace: float = 0.0  # seconds each sender waits between messages
    accepted: dict[str, float] = field(default_factory=dict)  # id -> time of its 202
    ok_times: list[float] = field(default_factory=list)
    failures: Counter[str] = field(default_factory=Counter)
    attempts: int = 0
    stop_at: float = 0.0

    async def run(self, within: float = 180.0) -> None:
        queue: asyncio.Queue[str] = asyncio.Queue()
        for mid in self.packed:
            queue.put_nowait(mid)
        self.stop_at = time.monotonic() + within

        async def sender() -> None:
            async with httpx.AsyncClient(timeout=10.0, verify=self.verify) as http:
                while time.monotonic() < self.stop_at:
                    try:
                        mid = queue.get_nowait()
                    except asyncio.QueueEmpty:
                        return
                    backoff = 0.05
                    while time.monotonic() < self.stop_at:
                        self.attempts += 1
                        try:
                            r = await http.post(
                                self.url,
                                content=self.packed[mid],
                                headers={"content-type": ENCRYPTED},
                            )
                            if r.status_code == 202:
                                now = time.monotonic()
                                self.accepted[mid] = now
                                self.ok_times.append(now)
                                break
                            self.failures[f"http {r.status_code}"] += 1
                        except httpx.HTTPError as exc:
                            self.failures[type(exc).__name__] += 1
                        await asyncio.sleep(backoff)
                        backoff = min(1.0, backoff * 2)
                    if self.pace:
                        await asyncio.sleep(self.pace)

        await asyncio.gather(*(sender() for _ in range(self.senders)))

    def recovery_after(self, fault_at: float) -> float | None:
        """Seconds from `fault_at` to the first 202 after it."""
        later = [t for t in self.ok_times if t > fault_at]
        return min(later) - fault_at if later else None

    def longest_gap(self, start: float, end: float) -> float:
        """Longest stretch without a 202 between two monotonic times."""
        end = min(end, max(self.ok_times, default=end))  # not the quiet after the load
        times = [start, *sorted(t for t in self.ok_times if start <= t <= end), end]
        return max(b - a for a, b in itertools.pairwise(times))


def outcome(
    name: str, load: Load, delivered: Counter[str], recovery: float | None, extra: str = ""
) -> dict[str, object]:
    """Print the scenario's line and return the counts (lost and duplicates: must be 0)."""
    accepted = set(load.accepted)
    lost = sorted(accepted - set(delivered))
    duplicates = sum(n - 1 for n in delivered.values() if n > 1)
    unexpected = sorted(set(delivered) - set(load.packed))
    rec = f"{recovery:.2f}s" if recovery is not None else "n/a"
    print(
        f"\nCHAOS {name}: sent={len(load.packed)} accepted={len(accepted)} "
        f"delivered={len(delivered)} lost={len(lost)} duplicates={duplicates} "
        f"recovery={rec} attempts={load.attempts} failures={dict(load.failures)}"
        f"{' ' + extra if extra else ''}",
        flush=True,
    )
    return {
        "sent": len(load.packed),
        "accepted": len(accepted),
        "delivered": len(delivered),
        "lost": lost,
        "duplicates": duplicates,
        "unexpected": unexpected,
        "recovery": recovery,
    }


def assert_clean(result: dict[str, Any], everything_accepted: bool = True) -> None:
    assert not result["lost"], f"lost {len(result['lost'])}: {result['lost'][:10]}"
    assert result["duplicates"] == 0, result
    assert not result["unexpected"], result
    if everything_accepted:
        assert result["accepted"] == result["sent"], result
