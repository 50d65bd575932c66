"""`Client`: the asyncio entry point tying identity, packing, outbox, pickup and rooms.

async with Client(ClientConfig(data_dir=...)) as client:
    await client.mediate(invitation_url)        # once
    await client.send(other_did, "hello")       # durable on return
    for message in await client.fetch():        # or: await client.live(handler)
        print(message.body)
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Sequence
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import httpx
import structlog

from dovecote.client import identity as identity_mod
from dovecote.client.config import DEFAULT_PICKUP_LIMIT, ClientConfig
from dovecote.client.errors import ClientFailure, NotMediated
from dovecote.client.identity import ClientIdentity, Mediation
from dovecote.client.mediation import (
    MediatorChannel,
    mediator_endpoints,
    message,
    read_invitation,
    request_mediation,
)
from dovecote.client.outbox import BackgroundSender, FailureCallback
from dovecote.client.packing import Packer, Route
from dovecote.client.pickup import Inbox, MessageHandler, PickupStatus, Received
from dovecote.client.rooms import RoomsClient
from dovecote.client.store import ClientOutboxKind, ClientStore, OutboxItem, State
from dovecote.client.wsbatch import WsBatcher, WsTarget

log = structlog.get_logger("dovecote.client")

BASIC_MESSAGE = "https://didcomm.org/basicmessage/2.0/message"
PING = "https://didcomm.org/trust-ping/2.0/ping"
ROUTE_CACHE_SIZE = 10_000
# recipient-update results after which the DID is (or is no longer) registered.
_KEPT = ("success", "no_change")
# Seconds the previous mediator gets to list its recipients during a switch.
OLD_MEDIATOR_TIMEOUT = 5.0


def _norm(url: str) -> str:
    return url.rstrip("/")


def _unique(items: Sequence[str]) -> list[str]:
    seen: dict[str, str] = {}
    for item in items:
        seen.setdefault(_norm(item), item)
    return list(seen.values())


class Client:
    """A Dovecote client over one data directory."""

    def __init__(
        self,
        config: ClientConfig | None = None,
        *,
        on_failed: FailureCallback | None = None,
        create: bool = False,
    ) -> None:
        self.config = config or ClientConfig()
        self.on_failed = on_failed
        self.create = create
        self.store = ClientStore(self.config.data_dir)
        self.http = httpx.AsyncClient(timeout=self.config.request_timeout)
        self._identity: ClientIdentity | None = None
        self._packer: Packer | None = None
        self._sender: BackgroundSender | None = None
        self._routes: dict[str, Route] = {}
        self._inbox: Inbox | None = None
        self._ws_targets: dict[str, WsTarget] = {}  # http endpoint -> its relay's WebSocket
        self.rooms = RoomsClient(self.config, self.store, self.http, self._enqueue_room)

    # ------------------------------------------------------------------ lifecycle
    async def __aenter__(self) -> Client:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def open(self) -> None:
        # 1. keys first: nothing works without them
        if self.create:
            self._identity = identity_mod.create(self.config.data_dir)
        else:
            self._identity = identity_mod.load(self.config.data_dir)
        self._packer = Packer(self._identity)
        await self._packer.start()
        # 2. the local store, then the sender that drains whatever a previous run left
        await self.store.open()
        batcher = WsBatcher(self._barrier, self._unpack_reply, self.config.request_timeout)
        self._sender = BackgroundSender(
            self.store,
            self.config,
            self.http,
            self.on_failed,
            self.rooms.headers_for,
            batcher,
            self._ws_targets.get,
        )
        if self._identity.mediation is not None:
            med = self._identity.mediation
            self._learn_ws(med.mediator_did, med.endpoints, med.ws_endpoints)
        self._sender.start()

    async def close(self) -> None:
        # Stop sending (the flush in flight is recorded), then release the store and HTTP.
        if self._sender is not None:
            await self._sender.stop()
        await self.store.close()
        await self.http.aclose()

    @property
    def identity(self) -> ClientIdentity:
        assert self._identity is not None, "use `async with Client(...)` first"
        return self._identity

    @property
    def packer(self) -> Packer:
        assert self._packer is not None, "use `async with Client(...)` first"
        return self._packer

    @property
    def sender(self) -> BackgroundSender:
        assert self._sender is not None, "use `async with Client(...)` first"
        return self._sender

    @property
    def did(self) -> str:
        """The DID to give to others (routed through the mediator once mediated)."""
        return self.identity.public_did

    # ------------------------------------------------------------------ mediation
    async def mediate(self, invitation_url: str) -> str:
        """Request mediation from the inviting mediator; register and return the routed DID.

        Always talks to the invitation's mediator, never to the current one: switching
        mediators re-registers the routed DID and every other registered DID there.
        """
        invitation = await read_invitation(self.http, invitation_url)
        mediator_did = invitation["from"]
        http, ws = await mediator_endpoints(self.packer, mediator_did)
        previous = self.identity.mediation
        # The invitation's own endpoints first; configured relays only as a fallback for a
        # connection failure (a 4xx from them never stands in for this mediator's answer).
        channel = MediatorChannel(
            self.packer, self.http, mediator_did, _unique([*http, *self.config.relays])
        )
        await request_mediation(channel)
        carried = await self._recipients_to_carry(previous, mediator_did)
        ident = self.identity
        service = identity_mod.routed_service(mediator_did, http[0], self.config.service_form)
        routed = identity_mod.make_did(ident.signing_key, ident.agreement_key, [service])
        await self.packer.add_did(routed)
        await channel.update_recipients(add=[routed, *carried])
        ident.mediation = Mediation(mediator_did, routed, http, ws, recipients=carried)
        self._learn_ws(mediator_did, http, ws)
        self._inbox = None
        identity_mod.save(self.config.data_dir, ident)
        log.info(
            "client.mediated",
            mediator=mediator_did[:40],
            switched=previous is not None and previous.mediator_did != mediator_did,
            recipients=len(carried) + 1,
        )
        return routed

    async def _recipients_to_carry(
        self, previous: Mediation | None, new_mediator: str
    ) -> list[str]:
        """The DIDs besides the routed one that were registered at the previous mediator.

        The local record is the source; the old mediator is asked too (best effort: it may
        be gone, which must not stop the switch).
        """
        if previous is None:
            return []
        dids = list(previous.recipients)
        if previous.mediator_did != new_mediator:
            old = MediatorChannel(self.packer, self.http, previous.mediator_did, previous.endpoints)
            with contextlib.suppress(ClientFailure, httpx.HTTPError, TimeoutError):
                dids += await asyncio.wait_for(old.list_recipients(), OLD_MEDIATOR_TIMEOUT)
        own = {previous.routed_did, *self.identity.dids}
        return [d for d in _unique(dids) if d not in own]

    def _relay_urls(self, extra: Sequence[str] = ()) -> list[str]:
        """Configured relays first, then the mediator's own endpoints, without repeats."""
        med = self.identity.mediation
        urls = [*self.config.relays, *(med.endpoints if med else []), *extra]
        unique: dict[str, str] = {}
        for url in urls:
            unique.setdefault(_norm(url), url)
        return list(unique.values())

    def channel(self) -> MediatorChannel:
        med = self.identity.mediation
        if med is None:
            raise NotMediated()
        return MediatorChannel(self.packer, self.http, med.mediator_did, self._relay_urls())

    async def add_recipients(self, dids: Sequence[str]) -> dict[str, str]:
        """Register more DIDs whose messages the mediator should hold for this client."""
        result = await self.channel().update_recipients(add=dids)
        self._record_recipients(added=[d for d, r in result.items() if r in _KEPT])
        return result

    async def remove_recipients(self, dids: Sequence[str]) -> dict[str, str]:
        result = await self.channel().update_recipients(remove=dids)
        self._record_recipients(removed=[d for d, r in result.items() if r in _KEPT])
        return result

    def _record_recipients(self, added: Sequence[str] = (), removed: Sequence[str] = ()) -> None:
        """Remember registered DIDs locally, so a switch of mediator can carry them over."""
        med = self.identity.mediation
        if med is None:
            return
        kept = [
            d
            for d in _unique([*med.recipients, *added])
            if d not in removed and d != med.routed_did
        ]
        if kept != med.recipients:
            med.recipients = kept
            identity_mod.save(self.config.data_dir, self.identity)

    async def recipients(self) -> list[str]:
        return await self.channel().list_recipients()

    # ------------------------------------------------------------------ sending
    async def route(self, to: str) -> tuple[Route, list[str]]:
        """The route to `to` and its endpoints in failover order.

        When the message's first hop is this client's own mediator (known by DID or by
        URL), every configured relay endpoint of that mediator is a valid alternative.
        """
        route = self._routes.get(to)
        if route is None:
            route = await self.packer.resolve_route(to)
            if len(self._routes) >= ROUTE_CACHE_SIZE:
                self._routes.pop(next(iter(self._routes)))
            self._routes[to] = route  # did:peer documents never change
            if route.first_hop != to and not route.ws_endpoints:
                with contextlib.suppress(ClientFailure):
                    route.ws_endpoints = await self.packer.ws_endpoints_of(route.first_hop)
            self._learn_ws(route.first_hop, route.endpoints, route.ws_endpoints)
        endpoints = list(route.endpoints)
        med = self.identity.mediation
        ours = {_norm(u) for u in self._relay_urls()}
        if (med is not None and route.first_hop == med.mediator_did) or any(
            _norm(e) in ours for e in endpoints
        ):
            endpoints = self._relay_urls(endpoints)
        return route, endpoints

    def _learn_ws(self, relay_did: str, http: Sequence[str], ws: Sequence[str]) -> None:
        """Pair a relay's http and ws endpoints by host and port."""
        by_host = {urlsplit(u).netloc: u for u in ws}
        for url in http:
            found = by_host.get(urlsplit(url).netloc)
            if found:
                self._ws_targets.setdefault(url, WsTarget(found, relay_did))

    async def _barrier(self, relay_did: str) -> tuple[str, bytes]:
        ping = message(PING, {"response_requested": True}, self.identity.did, relay_did)
        return ping["id"], await self.packer.pack(ping, relay_did, self.identity.did)

    async def _unpack_reply(self, raw: bytes) -> dict[str, Any]:
        return (await self.packer.unpack(raw)).message

    def plaintext(
        self,
        to: str,
        content: str | dict[str, Any],
        msg_type: str = BASIC_MESSAGE,
        anonymous: bool = False,
    ) -> dict[str, Any]:
        body = {"content": content} if isinstance(content, str) else content
        message: dict[str, Any] = {
            "id": str(uuid.uuid4()),
            "typ": "application/didcomm-plain+json",
            "type": msg_type,
            "to": [to],
            "created_time": int(time.time()),
            "body": body,
        }
        if not anonymous:
            message["from"] = self.did
        return message

    async def send(
        self,
        to: str,
        content: str | dict[str, Any],
        msg_type: str = BASIC_MESSAGE,
        anonymous: bool = False,
    ) -> str:
        """Queue a message for `to`; returns its id once it is durably in the outbox."""
        return (await self.send_many([(to, self.plaintext(to, content, msg_type, anonymous))]))[0]

    async def send_many(self, messages: Sequence[tuple[str, dict[str, Any]]]) -> list[str]:
        """Pack each (to, plaintext) and queue them all in one committed transaction."""
        rows = []
        for to, plaintext in messages:
            route, endpoints = await self.route(to)
            frm = plaintext.get("from")
            packed = await self.packer.pack_routed(plaintext, route, frm)
            rows.append((str(plaintext["id"]), ClientOutboxKind.DIDCOMM, to, packed, endpoints))
        await self.store.enqueue(rows, delay=self.config.flush_interval)
        self.sender.queued(len(rows))
        return [r[0] for r in rows]

    async def _enqueue_room(self, key: str, room: str, payload: bytes, url: str) -> None:
        await self.store.enqueue(
            [(key, ClientOutboxKind.ROOM, room, payload, [url])], delay=self.config.flush_interval
        )
        self.sender.queued()

    async def flush(self, wait: bool = True, max_wait: float | None = None) -> dict[str, int]:
        """Send queued messages now; with `wait`, until none is due (see BackgroundSender.flush)."""
        return await self.sender.flush(wait, max_wait)

    async def wait_sent(
        self, ids: Sequence[str], max_wait: float | None = None
    ) -> list[OutboxItem]:
        """Flush, then wait until each of `ids` is sent or failed (or `max_wait` passes)."""
        await self.sender.flush(wait=False)
        return await self.sender.wait_for(ids, max_wait)

    async def outbox(self, state: State | None = None, limit: int = 1000) -> list[OutboxItem]:
        return await self.store.items(state, limit)

    async def retry_failed(self, ids: Sequence[str] | None = None) -> int:
        count = await self.store.retry(ids)
        self.sender.queued(count)
        return count

    async def purge_outbox(
        self, states: Sequence[State] = ("sent",), older_than: float | None = None
    ) -> int:
        return await self.store.purge(states, older_than)

    # ------------------------------------------------------------------ receiving
    def inbox(self) -> Inbox:
        med = self.identity.mediation
        if med is None:
            raise NotMediated()
        if self._inbox is None:
            self._inbox = Inbox(
                self.packer, self.store, self.channel(), med.ws_endpoints, self.config
            )
        return self._inbox

    async def live(self, handler: MessageHandler, stop: asyncio.Event | None = None) -> None:
        """Receive pushed messages until `stop` is set (reconnects and resumes by itself)."""
        await self.inbox().live(handler, stop)

    async def status(self) -> PickupStatus:
        return await self.inbox().status()

    async def fetch(
        self, limit: int = DEFAULT_PICKUP_LIMIT, handler: MessageHandler | None = None
    ) -> list[Received]:
        """Pick up one batch (new messages only; duplicates are skipped and acknowledged)."""
        return await self.inbox().fetch(limit, handler)

    async def drain(self, handler: MessageHandler | None = None) -> list[Received]:
        """Pick up until the mailbox is empty."""
        return await self.inbox().drain(handler)
