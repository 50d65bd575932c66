"""Dovecote's errors: one tree, each class mapped to one HTTP status and one problem code.

    DovecoteError
    ├── ClientError                      400  e.m.msg        (the sender's fault)
    │   ├── MalformedMessage             400  e.m.msg.malformed
    │   ├── NotEncrypted                 400  e.m.trust.crypto.not-encrypted
    │   ├── UnpackFailed                 400  e.m.trust.crypto
    │   ├── UnresolvableDID              400  e.m.did.unresolvable
    │   ├── UnknownMessageType           400  e.m.msg.unsupported-type
    │   ├── Unauthenticated              401  e.m.trust.unauthenticated
    │   │   └── InvalidToken             401  e.m.trust.token       (rooms: bad/expired JWT)
    │   ├── NotMediated                  403  e.p.req.not-granted
    │   ├── Forbidden                    403  e.p.req.forbidden     (rooms: wrong room/role)
    │   ├── NotFound                     404  e.m.req.not-found
    │   ├── MethodNotAllowed             405  e.m.req.method
    │   ├── UnsupportedMediaType         415  e.m.msg.unsupported-media-type
    │   ├── UnknownRecipient             404  e.m.msg.unregistered-recipient
    │   ├── LiveModeNotSupported         400  e.m.live-mode-not-supported
    │   ├── PayloadTooLarge              413  e.m.me.res.storage.message_too_big
    │   ├── RequestTimeout               408  e.m.req.timeout
    │   ├── HeadersTooLarge              431  e.m.msg.headers-too-large
    │   ├── Conflict                     409  e.m.req.conflict
    │   ├── MailboxFull                  507  e.m.me.res.storage.mailbox-full
    │   ├── OutboxFull                   507  e.m.me.res.storage.outbox-full (relay quota)
    │   └── RateLimited                  429  e.m.me.res.rate-limited
    └── ServiceError                     503  e.m.me                 (ours; retry later)
        ├── Overloaded                   503  e.m.me.res.overloaded
        ├── Unavailable                  503  e.m.me.unavailable   (draining, read-only)
        └── StoreError                   503  e.m.me.res.storage
            └── StorageFull              507  e.m.me.res.storage.full

A `ServiceError` tells the sender nothing was stored and it must retry: it always carries
a Retry-After (the class default unless the raiser knows better).
"""

from __future__ import annotations

from typing import Any, ClassVar


class DovecoteError(Exception):
    """Base of every error Dovecote raises on purpose."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "e.m.me"
    default_retry_after: ClassVar[float | None] = None

    def __init__(self, detail: str = "", *, retry_after: float | None = None):
        super().__init__(detail or self.__doc__ or self.code)
        self.detail = detail or (self.__doc__ or self.code).strip()
        self.retry_after = retry_after if retry_after is not None else self.default_retry_after

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.status} {self.code}: {self.detail}>"

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.code, "detail": self.detail}
        if self.retry_after is not None:
            body["retry_after"] = self.retry_after
        return body


class ClientError(DovecoteError):
    """The request was wrong; retrying it unchanged will fail again."""

    status = 400
    code = "e.m.msg"


class MalformedMessage(ClientError):
    """The body is not a well-formed message."""

    code = "e.m.msg.malformed"


class InvalidDID(MalformedMessage):
    """A DID from the client is too long, not a DID, or has NUL or invalid Unicode."""

    code = "e.m.msg.invalid-did"


class LimitExceeded(MalformedMessage):
    """Input past a size limit (nesting depth, id length), refused before any work."""

    code = "e.m.msg.limit-exceeded"


class NotEncrypted(ClientError):
    """Only encrypted DIDComm messages are accepted."""

    code = "e.m.trust.crypto.not-encrypted"


class UnpackFailed(ClientError):
    """The message could not be decrypted by this mediator."""

    code = "e.m.trust.crypto"


class UnresolvableDID(ClientError):
    """A DID in the message could not be resolved."""

    code = "e.m.did.unresolvable"


class UnknownMessageType(ClientError):
    """The message type is not supported here."""

    code = "e.m.msg.unsupported-type"


class Unauthenticated(ClientError):
    """This message type needs an authenticated (authcrypt) sender."""

    status = 401
    code = "e.m.trust.unauthenticated"


class InvalidToken(Unauthenticated):
    """The bearer token is missing, malformed, expired, or not from the configured issuer."""

    code = "e.m.trust.token"


class NotMediated(ClientError):
    """The sender has no mediation grant."""

    status = 403
    code = "e.p.req.not-granted"


class Forbidden(ClientError):
    """The caller is authenticated but may not do this (room or role)."""

    status = 403
    code = "e.p.req.forbidden"


class NotFound(ClientError):
    """No such resource (room, participant, message)."""

    status = 404
    code = "e.m.req.not-found"


class RoomsDisabled(ClientError):
    """The rooms API is switched off on this server (DOVECOTE_ROOMS_ENABLED=false)."""

    status = 404
    code = "e.m.req.rooms-disabled"


class MethodNotAllowed(ClientError):
    """The resource does not support this HTTP method."""

    status = 405
    code = "e.m.req.method"


class UnsupportedMediaType(ClientError):
    """The request body has a content type this endpoint does not accept."""

    status = 415
    code = "e.m.msg.unsupported-media-type"


class UnknownRecipient(ClientError):
    """The forward's next hop is not a registered recipient."""

    status = 404
    code = "e.m.msg.unregistered-recipient"


class LiveModeNotSupported(ClientError):
    """Live delivery needs a WebSocket connection."""

    code = "e.m.live-mode-not-supported"


class PayloadTooLarge(ClientError):
    """The request body exceeds the size limit."""

    status = 413
    code = "e.m.me.res.storage.message_too_big"


class RequestTimeout(ClientError):
    """The client sent its request (headers or body) too slowly."""

    status = 408
    code = "e.m.req.timeout"


class HeadersTooLarge(ClientError):
    """A request line, header line or the header section exceeds its size limit."""

    status = 431
    code = "e.m.msg.headers-too-large"


class Conflict(ClientError):
    """The request conflicts with what is stored (e.g. reused idempotency key)."""

    status = 409
    code = "e.m.req.conflict"


class MailboxFull(ClientError):
    """The recipient's mailbox is at its limit; queued messages are untouched."""

    status = 507
    code = "e.m.me.res.storage.mailbox-full"


class OutboxFull(ClientError):
    """The relay's outbox is at its global quota; retry after it drains."""

    status = 507
    code = "e.m.me.res.storage.outbox-full"
    default_retry_after = 30.0


class RateLimited(ClientError):
    """Too many requests; slow down."""

    status = 429
    code = "e.m.me.res.rate-limited"


class ServiceError(DovecoteError):
    """Dovecote could not do it now; nothing was stored; retry later."""

    status = 503
    code = "e.m.me"
    default_retry_after = 1.0


class Overloaded(ServiceError):
    """Too much work in flight; retry later."""

    code = "e.m.me.res.overloaded"


class Unavailable(ServiceError):
    """The service is draining or degraded and does not accept this now."""

    code = "e.m.me.unavailable"


class StoreError(ServiceError):
    """The store failed or timed out; nothing was stored."""

    code = "e.m.me.res.storage"


class StorageFull(StoreError):
    """The store's disk is full; nothing was stored."""

    status = 507
    code = "e.m.me.res.storage.full"
    default_retry_after = 30.0
