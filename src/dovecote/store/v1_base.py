"""The store interface for DIDComm v1 connections (both engines implement it as a mixin)."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any

from dovecote.store.base import NewOutboxItem, RelayQuota


@dataclass(frozen=True, slots=True)
class V1Connection:
    """A DIDComm v1 peer that connected through DID Exchange (or Connections 1.0)."""

    their_verkey: str
    connection_id: str
    their_did: str
    protocol: str
    state: str
    endpoint: str = ""
    routing_keys: list[str] = field(default_factory=list)
    device: dict[str, Any] = field(default_factory=dict)
    created_at: float = 0.0


class V1Store(abc.ABC):
    """Durable v1 state beyond what `Store` already keeps (mediations, keylists, queues)."""

    @abc.abstractmethod
    async def v1_connection_save(self, conn: V1Connection) -> V1Connection:
        """Insert or update by verkey; a retried request keeps its first connection id."""

    @abc.abstractmethod
    async def v1_connection_get(self, their_verkey: str) -> V1Connection | None:
        """The connection whose peer uses this verkey."""

    @abc.abstractmethod
    async def v1_set_device(self, their_verkey: str, device: dict[str, Any]) -> bool:
        """Store push device info for a connection; False if there is none."""

    async def v1_device_for(self, mediatee: str) -> dict[str, Any]:
        """Push device info of a v1 mediatee (its did:key), {} when none is registered."""
        if not mediatee.startswith("did:key:"):
            return {}
        from didcomm_messaging.multiformats import multibase, multicodec
        from didcomm_messaging.multiformats.multibase import Base58BtcEncoder

        try:
            _codec, raw = multicodec.unwrap(multibase.decode(mediatee[len("did:key:") :]))
        except Exception:  # any parse failure: not a did:key we could have stored  # noqa: BLE001
            return {}
        connection = await self.v1_connection_get(Base58BtcEncoder().encode(raw))
        return dict(connection.device) if connection is not None else {}

    @abc.abstractmethod
    async def v1_relay_once(
        self, recipient: str, digest: str, item: NewOutboxItem, quota: RelayQuota | None = None
    ) -> bool:
        """Queue `item` unless (recipient, digest) was accepted in the dedup window.

        One transaction: the dedup row and the outbox item commit together, so a sender's
        retry after a lost answer is recognised and never sent twice. True if new.
        With `quota`, a new item past it raises as `outbox_add` does (nothing stored).
        """
