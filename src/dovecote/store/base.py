"""The store interface every engine implements, and the plain records it returns.

Semantics every engine guarantees (tests in tests/store run against each):
- A write method returns only after its transaction has committed durably.
- `enqueue` is idempotent per (recipient, digest) within the dedup window.
- Messages leave a mailbox only through `ack`, `expire` (to dead letters) or an operator.
- Outbox items are leased; an expired lease makes the item available to any worker.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

MediationState = Literal["granted", "denied"]
UpdateResult = Literal["success", "no_change", "client_error", "server_error"]


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """A message waiting in a mailbox."""

    id: str
    seq: int
    mediatee: str
    recipient: str
    body: bytes
    received_at: float
    expires_at: float


@dataclass(frozen=True, slots=True)
class QueuedRef:
    """A queued message without its body: enough to choose what to read."""

    id: str
    seq: int
    size: int


@dataclass(frozen=True, slots=True)
class NewMessage:
    """A message to enqueue."""

    mediatee: str
    recipient: str
    body: bytes
    digest: str
    expires_at: float


@dataclass(frozen=True, slots=True)
class EnqueueResult:
    """Outcome of one enqueue: the message id and whether it was a duplicate."""

    id: str
    duplicate: bool


@dataclass(frozen=True, slots=True)
class MailboxStatus:
    """Pickup status numbers for one mailbox (optionally one recipient DID)."""

    message_count: int
    total_bytes: int
    oldest_received_at: float | None
    newest_received_at: float | None


@dataclass(frozen=True, slots=True)
class OutboxItem:
    """Something Dovecote must send out (forward, reply, notification)."""

    id: int
    kind: str
    target: str
    payload: bytes
    headers: dict[str, str]
    created_at: float
    next_attempt_at: float
    attempts: int
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class NewOutboxItem:
    """An outbox item to add in the same transaction as a state change."""

    kind: str
    target: str
    payload: bytes
    headers: dict[str, str] = field(default_factory=dict)
    dedup_key: str | None = None
    # Keep dedup_key for the dedup window after the item left the outbox (delivered or
    # dead): a second add within it is a no-op. Relayed forwards need this, notifications
    # must not (they coalesce only while one is pending).
    remember: bool = False


@dataclass(frozen=True, slots=True)
class RelayQuota:
    """Limits on pending `forward` outbox items, checked in the transaction that adds.

    `origin` is the target's `scheme://host[:port]/` (targets are stored canonical, see
    didcomm/endpoints.py): past its per-target share the add raises RateLimited (429), past
    the totals OutboxFull (507); both carry `retry_after`. Duplicates never count.
    """

    origin: str
    target_items: int
    target_bytes: int
    total_items: int
    total_bytes: int
    retry_after: float = 30.0

    def check(self, usage: tuple[int, int, int, int], items: int, size: int) -> None:
        """Raise when adding `items` of `size` bytes to `usage` (target n, bytes, total n,
        bytes) passes a limit."""
        from dovecote.errors import OutboxFull, RateLimited

        target_n, target_b, total_n, total_b = usage
        if total_n + items > self.total_items or total_b + size > self.total_bytes:
            raise OutboxFull("the relay outbox is full; retry later", retry_after=self.retry_after)
        if target_n + items > self.target_items or target_b + size > self.target_bytes:
            raise RateLimited(
                "relay quota for this target reached; retry later", retry_after=self.retry_after
            )


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An item that could not be delivered, with why and every attempt."""

    id: int
    kind: str
    target: str
    payload: bytes
    headers: dict[str, str]
    reason: str
    history: list[dict[str, Any]]
    created_at: float
    dead_at: float

    @property
    def attempts(self) -> int:
        """Send attempts in the history (replays are recorded there too, as events)."""
        return sum(1 for entry in self.history if "event" not in entry)


@dataclass(frozen=True, slots=True)
class InstanceInfo:
    """One Dovecote instance as it last reported itself."""

    id: str
    host: str
    version: str
    started_at: float
    last_beat: float
    level: str
    connections: int


@dataclass(frozen=True, slots=True)
class RecipientConflict:
    """A registration refused when recipients became one owner per base DID (migration
    0004): `mediatee` had registered `recipient`, a form of `base`, which `owner` keeps."""

    recipient: str
    base: str
    mediatee: str
    owner: str
    created_at: float
    found_at: float
    queued: int  # messages `mediatee` still holds that were forwarded to `recipient`


@dataclass(frozen=True, slots=True)
class QueueStats:
    """Sampled queue numbers for metrics and health."""

    queued: int
    oldest_received_at: float | None
    outbox: dict[str, int]
    outbox_oldest_due: dict[str, float]
    dead_letters: int


@dataclass(frozen=True, slots=True)
class MailboxUsage:
    """How full one mailbox is (for the operator views; no message content)."""

    mediatee: str
    message_count: int
    total_bytes: int
    oldest_received_at: float | None


@dataclass(frozen=True, slots=True)
class OutboxTarget:
    """Pending outbox items for one target URL."""

    target: str
    kind: str
    pending: int
    next_attempt_at: float
    max_attempts: int
    oldest_created_at: float


class Store(abc.ABC):
    """Durable state: mediations, mailboxes, dedup, outbox, dead letters, instances."""

    engine: str = "base"

    # --- lifecycle
    @abc.abstractmethod
    async def open(self) -> None:
        """Connect, apply migrations, be ready for use."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Finish pending writes and release connections."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Run a trivial query; raise StoreError when the store does not answer."""

    @abc.abstractmethod
    async def schema_version(self) -> int:
        """Highest applied migration number."""

    # --- mediation
    @abc.abstractmethod
    async def set_mediation(self, did: str, state: MediationState, routing_did: str) -> None:
        """Record a grant or denial for a DID."""

    @abc.abstractmethod
    async def get_mediation(self, did: str) -> MediationState | None:
        """The DID's mediation state, or None if it never asked."""

    @abc.abstractmethod
    async def update_recipients(
        self, mediatee: str, updates: Sequence[tuple[str, str]]
    ) -> list[UpdateResult]:
        """Apply (recipient_did, 'add'|'remove') updates in one transaction.

        A recipient is its base DID (any DID URL form registers or removes the base); one
        mediatee owns it, and adding it for another gives client_error."""

    @abc.abstractmethod
    async def list_recipients(
        self, mediatee: str, offset: int, limit: int
    ) -> tuple[list[str], int]:
        """One page of a mediatee's recipient DIDs and the total count."""

    @abc.abstractmethod
    async def find_mediatee(self, recipient: str) -> str | None:
        """Which mediatee owns this recipient: the owner of its base DID, if any."""

    @abc.abstractmethod
    async def recipient_conflicts(self) -> list[RecipientConflict]:
        """Registrations the one-owner-per-identity migration refused (for operators)."""

    # --- mailboxes
    @abc.abstractmethod
    async def enqueue(
        self,
        message: NewMessage,
        *,
        max_messages: int,
        max_bytes: int,
        outbox: Sequence[NewOutboxItem] = (),
    ) -> EnqueueResult:
        """Store a message (and its outbox items) once; raise MailboxFull past limits."""

    @abc.abstractmethod
    async def status(self, mediatee: str, recipient: str | None = None) -> MailboxStatus:
        """Counts and ages for a mailbox."""

    @abc.abstractmethod
    async def fetch(
        self,
        mediatee: str,
        limit: int,
        recipient: str | None = None,
        after_seq: int = 0,
    ) -> list[StoredMessage]:
        """Oldest queued messages first; nothing is removed."""

    @abc.abstractmethod
    async def queued(self, mediatee: str, limit: int, after_seq: int = 0) -> list[QueuedRef]:
        """Ids, seqs and sizes of the oldest queued messages after `after_seq`, no bodies."""

    @abc.abstractmethod
    async def fetch_ids(self, mediatee: str, ids: Sequence[str]) -> list[StoredMessage]:
        """The listed messages of this mediatee that are still queued, oldest first."""

    @abc.abstractmethod
    async def last_seq(self, mediatee: str) -> int:
        """The highest seq queued in the mailbox (0 when empty)."""

    @abc.abstractmethod
    async def ack(self, mediatee: str, ids: Sequence[str]) -> list[StoredMessage]:
        """Remove exactly the listed messages of this mediatee; return those removed."""

    @abc.abstractmethod
    async def expire(self, now: float, dedup_before: float, limit: int = 1000) -> int:
        """Move expired messages to dead letters, forget old digests; return messages moved."""

    # --- outbox and dead letters
    @abc.abstractmethod
    async def outbox_add(
        self, items: Sequence[NewOutboxItem], quota: RelayQuota | None = None
    ) -> list[int]:
        """Add outbox items (each dedup_key at most once while pending, or for the dedup
        window when `remember`), within `quota` if given; return the ids of those added."""

    @abc.abstractmethod
    async def outbox_lease(
        self,
        kinds: Sequence[str],
        owner: str,
        limit: int,
        lease_seconds: float,
        exclude_targets: Sequence[str] = (),
    ) -> list[OutboxItem]:
        """Lease due items no live worker holds."""

    @abc.abstractmethod
    async def outbox_done(self, item_id: int, owner: str) -> None:
        """Delete a delivered item."""

    @abc.abstractmethod
    async def outbox_retry(
        self,
        item_id: int,
        owner: str,
        next_attempt_at: float,
        attempt: dict[str, Any],
        count_attempt: bool = True,
    ) -> None:
        """Release an item for a later attempt, recording this attempt."""

    @abc.abstractmethod
    async def outbox_dead(
        self, item_id: int, owner: str, reason: str, attempt: dict[str, Any] | None
    ) -> None:
        """Move an item to the dead letters."""

    @abc.abstractmethod
    async def outbox_release(self, owner: str) -> int:
        """Drop every lease this owner holds (graceful shutdown)."""

    @abc.abstractmethod
    async def dlq_list(
        self,
        offset: int = 0,
        limit: int = 100,
        *,
        kind: str | None = None,
        target: str | None = None,
        reason: str | None = None,
    ) -> tuple[list[DeadLetter], int]:
        """One page of dead letters, newest first, and the total count.

        Filters: `kind` exactly; `target` and `reason` as substrings.
        """

    @abc.abstractmethod
    async def dlq_get(self, item_id: int) -> DeadLetter | None:
        """One dead letter."""

    @abc.abstractmethod
    async def dlq_replay(self, ids: Sequence[int] | None = None, target: str | None = None) -> int:
        """Move dead letters back to the outbox with fresh attempts; return how many."""

    @abc.abstractmethod
    async def dlq_purge(
        self, ids: Sequence[int] | None = None, older_than: float | None = None
    ) -> int:
        """Delete dead letters by id or age; return how many."""

    # --- cluster and stats
    @abc.abstractmethod
    async def heartbeat(self, info: InstanceInfo) -> None:
        """Register or refresh this instance."""

    @abc.abstractmethod
    async def instances(self) -> list[InstanceInfo]:
        """Every instance that ever registered (recent first)."""

    @abc.abstractmethod
    async def queue_stats(self) -> QueueStats:
        """Numbers for metrics; cheap enough to sample every few seconds."""

    @abc.abstractmethod
    async def mailbox_usage(self, order: str, limit: int) -> list[MailboxUsage]:
        """The largest (`order="bytes"`) or oldest (`order="oldest"`) non-empty mailboxes."""

    @abc.abstractmethod
    async def outbox_targets(self, limit: int) -> list[OutboxTarget]:
        """Pending outbox items grouped by target and kind, most pending first."""

    def add_listener(self, callback: Any) -> None:
        """Call `callback(mediatee)` after a message for `mediatee` commits (any instance)."""
        self._listeners.append(callback)

    def __init__(self) -> None:
        self._listeners: list[Any] = []

    def _notify(self, mediatee: str) -> None:
        for callback in list(self._listeners):
            try:
                callback(mediatee)
            except Exception:  # one broken listener must not starve the others  # noqa: BLE001
                import structlog

                structlog.get_logger("dovecote.store").exception("store.listener_failed")
