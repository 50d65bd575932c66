"""The kinds of outbound work, as stored in the `kind` column of `outbox` and `dead_letters`.

The values are the on-disk strings; a StrEnum member is a `str`, so it is stored, compared,
logged and used as a metric label exactly as the bare string was.
"""

from __future__ import annotations

from enum import StrEnum


class OutboxKind(StrEnum):
    """What an outbox item is; each kind has its own worker pool (bulkhead)."""

    FORWARD = "forward"  # a relayed forward or a reply to a sender's endpoint
    NOTIFY = "notify"  # a "message waiting" webhook or push notification


class DeadLetterKind(StrEnum):
    """What a dead letter is: a failed outbox item, or an expired mailbox's messages."""

    FORWARD = OutboxKind.FORWARD.value
    NOTIFY = OutboxKind.NOTIFY.value
    MAILBOX = "mailbox"  # written by the expiry sweep; has no target and is never replayed
