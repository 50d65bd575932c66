"""Dovecote's Python client: DIDComm mediation, pickup and sending through a durable
outbox, and the rooms API. Start at `dovecote.client.Client`; see docs/client.md.

Names are imported on first use (PEP 562), so `dovecote-client --help` does not pay for
askar, httpx and the DIDComm stack.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dovecote.client.client import BASIC_MESSAGE, Client
    from dovecote.client.config import ClientConfig
    from dovecote.client.errors import (
        ClientFailure,
        CryptoFailure,
        InvalidInvitation,
        MediationDenied,
        NotInitialised,
        NotMediated,
        ProblemReported,
        Rejected,
        RoomsFailure,
        StoreFailure,
        TransportFailure,
        Undeliverable,
    )
    from dovecote.client.pickup import PickupStatus, Received
    from dovecote.client.store import OutboxItem

_WHERE = {
    "BASIC_MESSAGE": "client",
    "Client": "client",
    "ClientConfig": "config",
    "OutboxItem": "store",
    "PickupStatus": "pickup",
    "Received": "pickup",
    **{
        name: "errors"
        for name in (
            "ClientFailure",
            "CryptoFailure",
            "InvalidInvitation",
            "MediationDenied",
            "NotInitialised",
            "NotMediated",
            "ProblemReported",
            "Rejected",
            "RoomsFailure",
            "StoreFailure",
            "TransportFailure",
            "Undeliverable",
        )
    },
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'dovecote.client' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"dovecote.client.{module}"), name)
    globals()[name] = value
    return value


__all__ = [
    "BASIC_MESSAGE",
    "Client",
    "ClientConfig",
    "ClientFailure",
    "CryptoFailure",
    "InvalidInvitation",
    "MediationDenied",
    "NotInitialised",
    "NotMediated",
    "OutboxItem",
    "PickupStatus",
    "ProblemReported",
    "Received",
    "Rejected",
    "RoomsFailure",
    "StoreFailure",
    "TransportFailure",
    "Undeliverable",
]
