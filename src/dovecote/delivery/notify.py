"""Notifications that a mailbox received a message while its owner is offline.

Two channels, each enabled by its setting:

- webhook (NOTIFY_WEBHOOK_URL): POST application/json
  `{"event": "message_waiting", "mediatee_hash": ..., "message_id": ..., "count": N}`
- push (PUSH_URL, bearer PUSH_TOKEN): the FCM HTTP v1 `messages:send` shape with data only,
  `{"message": {"topic": "dovecote-<mediatee_hash>", "data": {...the same, as strings}}}`;
  an app subscribes its device to that topic.

A DIDComm v1 mediatee that registered an FCM device token (push-notifications-fcm 1.0,
RFC 0734) is addressed by `"token"` instead of the topic.

`mediatee_hash` is the SHA-256 of the mediatee's DID; neither the DID nor any message
content leaves the mediator. Notifications coalesce: at most one is pending per mailbox
and channel (its dedup key), so a burst for an offline mediatee costs one call. The count
and message id are read from the store when the notification is sent, not when queued.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING

from dovecote.store.base import NewOutboxItem, OutboxItem
from dovecote.store.rooms_base import ROOM_HEADER
from dovecote.store.v1_base import V1Store
from dovecote.util.kinds import OutboxKind

if TYPE_CHECKING:
    from dovecote.store.base import Store

EVENT = "message_waiting"
# Outbox headers starting with "_" are for the worker and are never sent.
CHANNEL = "_channel"
MEDIATEE = "_mediatee"
TOPIC_PREFIX = "dovecote-"


def mediatee_hash(did: str) -> str:
    return hashlib.sha256(did.encode()).hexdigest()


def notification_items(webhook_url: str, push_url: str, mediatee: str) -> list[NewOutboxItem]:
    """The notifications to queue with a message for an offline mediatee."""
    digest = mediatee_hash(mediatee)
    channels = [("webhook", webhook_url), ("push", push_url)]
    return [
        NewOutboxItem(
            kind=OutboxKind.NOTIFY,
            target=url,
            payload=b"",
            headers={"content-type": "application/json", CHANNEL: channel, MEDIATEE: mediatee},
            dedup_key=f"notify:{channel}:{digest}",
        )
        for channel, url in channels
        if url
    ]


async def render(item: OutboxItem, store: Store) -> bytes | None:
    """The body to send now, or None when the mailbox has been emptied meanwhile."""
    if item.headers.get(ROOM_HEADER):
        return item.payload  # room notifications are rendered when queued (rooms_base)
    mediatee = item.headers.get(MEDIATEE, "")
    status = await store.status(mediatee)
    if status.message_count == 0:
        return None
    head = await store.fetch(mediatee, 1)
    digest = mediatee_hash(mediatee)
    fields: dict[str, object] = {
        "event": EVENT,
        "mediatee_hash": digest,
        "message_id": head[0].id if head else "",
        "count": status.message_count,
    }
    if item.headers.get(CHANNEL) == "push":
        data = {key: str(value) for key, value in fields.items()}
        target: dict[str, object] = {"topic": TOPIC_PREFIX + digest}
        if isinstance(store, V1Store):
            # A DIDComm v1 wallet registered its FCM token (RFC 0734): address the device.
            device = await store.v1_device_for(mediatee)
            if device.get("service") == "fcm" and device.get("device_token"):
                target = {"token": device["device_token"]}
        body: dict[str, object] = {"message": {**target, "data": data}}
    else:
        body = fields
    return json.dumps(body, separators=(",", ":")).encode()
