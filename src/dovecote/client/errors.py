"""The client's errors: one tree, lower-level errors translated at the boundary.

ClientFailure
├── NotInitialised          no identity in the data directory (run `init`)
├── NotMediated             no mediator yet (run `mediate <invitation-url>`)
├── InvalidInvitation       the invitation URL or its `_oob` payload is unusable
├── MediationDenied         the mediator answered mediate-deny
├── ProblemReported         the peer answered with a DIDComm problem report
├── Undeliverable           a DID has no usable DIDCommMessaging service / endpoint
├── CryptoFailure           packing or unpacking failed (keys, DID resolution)
├── StoreFailure            the local SQLite store failed (disk full, corrupt, locked)
├── TransportFailure        an endpoint could not be reached or answered 5xx/429
│   └── Rejected            an endpoint answered 4xx: retrying the same bytes is futile
└── RoomsFailure            the rooms API answered an error (status and body kept)
"""

from __future__ import annotations

from typing import Any


class ClientFailure(Exception):
    """Base of every error the Dovecote client raises on purpose."""

    def __init__(self, detail: str = "") -> None:
        super().__init__(detail or (self.__doc__ or "").strip())
        self.detail = detail or (self.__doc__ or "").strip()

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: {self.detail}>"


class NotInitialised(ClientFailure):
    """No client identity in the data directory; run `dovecote-client init`."""


class NotMediated(ClientFailure):
    """No mediator configured; run `dovecote-client mediate <invitation-url>`."""


class InvalidInvitation(ClientFailure):
    """The invitation URL or its `_oob` payload is unusable."""


class MediationDenied(ClientFailure):
    """The mediator refused mediation (mediate-deny)."""


class ProblemReported(ClientFailure):
    """The peer answered with a DIDComm problem report."""

    def __init__(self, code: str, comment: str = "") -> None:
        super().__init__(f"{code}: {comment}" if comment else code)
        self.code = code
        self.comment = comment


class Undeliverable(ClientFailure):
    """The DID has no usable DIDCommMessaging service or endpoint."""


class CryptoFailure(ClientFailure):
    """Packing or unpacking failed (keys, DID resolution, envelope)."""


class StoreFailure(ClientFailure):
    """The local SQLite store failed (disk full, corrupt file, locked too long)."""


class TransportFailure(ClientFailure):
    """An endpoint could not be reached, or answered 5xx / 429 (retry later)."""

    def __init__(
        self, detail: str = "", *, status: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.retry_after = retry_after


class Rejected(TransportFailure):
    """The endpoint answered 4xx: sending the same bytes again will fail again."""


class RoomsFailure(ClientFailure):
    """The rooms API answered an error."""

    def __init__(self, status: int, body: Any) -> None:
        detail = body.get("detail") or body.get("error") if isinstance(body, dict) else body
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.body = body
