"""Dovecote's Python client: DIDComm mediation, pickup and sending through a durable
outbox, and the rooms API. Start at `dovecote.client.Client`; see docs/client.md."""

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
