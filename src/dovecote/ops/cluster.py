"""This instance in the cluster view: its heartbeat row in the store, and everyone's state.

Each instance beats into `instances` every HEARTBEAT_INTERVAL; a clean stop writes the
level `stopped`; an instance that missed MISSED_BEATS_DEAD beats reads as dead.
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any

import structlog

from dovecote import __version__
from dovecote.ops import metrics
from dovecote.ops.health import Degradation
from dovecote.store.base import InstanceInfo, Store

log = structlog.get_logger("dovecote.cluster")

# An instance that missed this many heartbeats is reported dead.
MISSED_BEATS_DEAD = 3
# The level an instance reports as its last heartbeat when it shuts down cleanly.
STOPPED = "stopped"
# Dead instances older than this are history, not news (not counted in the metric).
RECENT_SECONDS = 3600


def new_instance_id() -> str:
    """host-random: unique per process start, readable in the cluster view."""
    return f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"


class Cluster:
    """The heartbeat of one instance and the cluster view built from all heartbeats."""

    def __init__(
        self,
        store: Store,
        degradation: Degradation,
        instance_id: str,
        interval: float,
        connections: Callable[[], int],
    ) -> None:
        self.store = store
        self.degradation = degradation
        self.instance_id = instance_id
        self.interval = interval
        self.connections = connections
        self.started_at = time.time()

    def info(self, level: str) -> InstanceInfo:
        return InstanceInfo(
            id=self.instance_id,
            host=socket.gethostname(),
            version=__version__,
            started_at=self.started_at,
            last_beat=time.time(),
            level=level,
            connections=self.connections(),
        )

    async def beat_forever(self) -> None:
        while True:
            try:
                level = "draining" if self.degradation.draining else self.degradation.level
                await self.store.heartbeat(self.info(level))
                view = await self.view()
                metrics.CLUSTER_INSTANCES.labels("alive").set(sum(i["alive"] for i in view))
                # Dead = stopped beating without saying goodbye (recently enough to matter).
                metrics.CLUSTER_INSTANCES.labels("dead").set(
                    sum(1 for i in view if i["state"] == "dead" and i["recent"])
                )
            except Exception as exc:  # noqa: BLE001 - the heartbeat must outlive any failure
                log.debug("heartbeat.failed", error=str(exc)[:200])
            await asyncio.sleep(self.interval)

    async def goodbye(self) -> None:
        """A clean exit says so in the cluster view: "stopped" is not a dead instance."""
        await self.store.heartbeat(self.info(STOPPED))

    async def view(self) -> list[dict[str, Any]]:
        """Every instance with version, heartbeat and level; dead ones marked."""
        now = time.time()
        limit = MISSED_BEATS_DEAD * self.interval
        return [
            {
                "id": i.id,
                "host": i.host,
                "version": i.version,
                "started_at": i.started_at,
                "last_beat": i.last_beat,
                "level": i.level,
                "connections": i.connections,
                "alive": i.level != STOPPED and now - i.last_beat < limit,
                "state": (
                    "stopped"
                    if i.level == STOPPED
                    else "alive"
                    if now - i.last_beat < limit
                    else "dead"
                ),
                "recent": now - i.last_beat < RECENT_SECONDS,
                "self": i.id == self.instance_id,
            }
            for i in await self.store.instances()
        ]
