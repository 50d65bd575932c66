"""Push Notifications FCM 1.0 (RFC 0734) and APNs 1.0 (RFC 0699): device registration.

The device info is kept with the connection (durable, both engines). When a message is
queued for that mediatee while it is offline, the push outbox (PUSH_URL) is fed with the
device token instead of the topic (delivery/notify.py).
"""

from __future__ import annotations

from typing import Any

import structlog

from dovecote.didcomm.v1.messages import (
    DIDCOMM_PREFIX,
    V1Context,
    V1Handler,
    V1Inbound,
    field,
    reply,
)
from dovecote.errors import MalformedMessage, NotMediated

log = structlog.get_logger("dovecote.v1.push")

FCM = f"{DIDCOMM_PREFIX}push-notifications-fcm/1.0"
APNS = f"{DIDCOMM_PREFIX}push-notifications-apns/1.0"
MAX_TOKEN = 4096


def _service(inbound: V1Inbound) -> tuple[str, str]:
    piuri = FCM if "push-notifications-fcm/" in inbound.type else APNS
    return piuri, "fcm" if piuri == FCM else "apns"


async def set_device_info(ctx: V1Context, inbound: V1Inbound) -> list[dict[str, Any]]:
    await ctx.require_grant(inbound)
    _piuri, service = _service(inbound)
    token = field(inbound.message, "device_token", str, required=False)
    if token is not None and len(token) > MAX_TOKEN:
        raise MalformedMessage("device_token is too long")
    info: dict[str, Any] = {}
    if token:
        info = {"service": service, "device_token": token}
        if service == "fcm":
            platform = field(inbound.message, "device_platform", str, required=False)
            if platform is not None:
                info["device_platform"] = platform[:64]
    assert inbound.sender is not None  # require_grant checked it
    if not await ctx.store.v1_set_device(inbound.sender, info):
        raise NotMediated("no DID Exchange connection for this key")
    log.info(
        "push.device_set", service=service, registered=bool(token), request_id=inbound.request_id
    )
    return []


async def get_device_info(ctx: V1Context, inbound: V1Inbound) -> list[dict[str, Any]]:
    await ctx.require_grant(inbound)
    piuri, service = _service(inbound)
    assert inbound.sender is not None
    connection = await ctx.store.v1_connection_get(inbound.sender)
    device = connection.device if connection is not None else {}
    body: dict[str, Any] = {"device_token": None}
    if device.get("service") == service:
        body["device_token"] = device.get("device_token")
        if service == "fcm":
            body["device_platform"] = device.get("device_platform")
    elif service == "fcm":
        body["device_platform"] = None
    return [reply(inbound, f"{piuri}/device-info", body)]


HANDLERS: dict[str, V1Handler] = {}
PROTOCOLS: dict[str, list[str]] = {}
for _piuri in (FCM, APNS):
    HANDLERS[f"{_piuri}/set-device-info"] = set_device_info
    HANDLERS[f"{_piuri}/get-device-info"] = get_device_info
    PROTOCOLS[_piuri] = ["notification-receiver"]
