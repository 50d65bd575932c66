"""`dovecote-client`: parse, set up logging, hand off to `dovecote.client.Client`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from dovecote.client.config import DEFAULT_BATCH_SIZE, DEFAULT_FLUSH_INTERVAL, ClientConfig
from dovecote.client.errors import ClientFailure

if TYPE_CHECKING:
    from dovecote.client.client import Client
    from dovecote.client.pickup import Received
    from dovecote.client.store import OutboxItem

# The client stack (askar, httpx, websockets) is imported when a command runs, not for
# `--help`: see _client().

T = TypeVar("T")


def _run(make: Callable[[], Awaitable[T]]) -> T:
    try:
        return asyncio.run(make())  # type: ignore[arg-type]
    except ClientFailure as exc:
        click.echo(f"error: {exc.detail}", err=True)
        sys.exit(1)


def _text(value: str) -> str:
    """`@path` reads the file; anything else is the text itself."""
    return Path(value[1:]).read_text() if value.startswith("@") else value


def _when(ts: float | None) -> str:
    import datetime as dt

    return "-" if ts is None else dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


@click.group()
@click.option(
    "--data-dir",
    envvar="DOVECOTE_CLIENT_DATA_DIR",
    type=click.Path(path_type=Path),
    default=Path.home() / ".dovecote-client",
    show_default=True,
    help="Keys, outbox and received ids [env DOVECOTE_CLIENT_DATA_DIR].",
)
@click.option(
    "--relay",
    "relays",
    multiple=True,
    envvar="DOVECOTE_CLIENT_RELAYS",
    help="Extra endpoint of your mediator, tried in order (repeatable) "
    "[env DOVECOTE_CLIENT_RELAYS, space-separated].",
)
@click.option("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, show_default=True)
@click.option(
    "--flush-interval",
    type=float,
    default=DEFAULT_FLUSH_INTERVAL,
    show_default=True,
    help="Seconds a message may wait for its batch to fill.",
)
@click.option(
    "--rooms-url",
    envvar="DOVECOTE_ROOMS_URL",
    default="",
    help="Base URL of the rooms API [env DOVECOTE_ROOMS_URL].",
)
@click.option(
    "--rooms-token",
    envvar="DOVECOTE_ROOMS_TOKEN",
    default="",
    help="Bearer JWT for the rooms API [env DOVECOTE_ROOMS_TOKEN].",
)
@click.option("-v", "--verbose", is_flag=True, help="Log what the client does (stderr).")
@click.pass_context
def main(
    ctx: click.Context,
    data_dir: Path,
    relays: tuple[str, ...],
    batch_size: int,
    flush_interval: float,
    rooms_url: str,
    rooms_token: str,
    verbose: bool,
) -> None:
    """Dovecote client: a DIDComm agent with a durable outbox, and a rooms client."""
    ctx.meta["dovecote.verbose"] = verbose  # logging is set up in _client(), when needed
    relay_list = [r for value in relays for r in value.split()]
    ctx.obj = ClientConfig(
        data_dir=data_dir,
        relays=relay_list,
        batch_size=batch_size,
        flush_interval=flush_interval,
        rooms_url=rooms_url,
        rooms_token=rooms_token,
    )


def _client(ctx: click.Context, create: bool = False) -> Client:
    from dovecote.client.client import Client
    from dovecote.ops.logging import configure

    configure("console", "info" if ctx.meta.get("dovecote.verbose") else "warning")

    def report(item: OutboxItem) -> None:
        click.echo(f"failed: {item.id} to {item.target[:60]}: {item.last_error}", err=True)

    return Client(ctx.obj, on_failed=report, create=create)


@main.command()
@click.pass_context
def init(ctx: click.Context) -> None:
    """Create keys and a DID in the data directory (keeps existing ones)."""

    async def go() -> str:
        async with _client(ctx, create=True) as client:
            return client.did

    click.echo(_run(go))


@main.command()
@click.pass_context
def did(ctx: click.Context) -> None:
    """Print the DID to give to others."""

    async def go() -> str:
        async with _client(ctx) as client:
            return client.did

    click.echo(_run(go))


@main.command()
@click.argument("invitation_url")
@click.pass_context
def mediate(ctx: click.Context, invitation_url: str) -> None:
    """Request mediation from a Dovecote invitation URL; print the routed DID."""

    async def go() -> str:
        async with _client(ctx, create=True) as client:
            return await client.mediate(invitation_url)

    click.echo(_run(go))


@main.group()
def recipients() -> None:
    """List, add or remove the DIDs your mediator holds messages for."""


@recipients.command("list")
@click.pass_context
def recipients_list(ctx: click.Context) -> None:
    async def go() -> list[str]:
        async with _client(ctx) as client:
            return await client.recipients()

    for did_ in _run(go):
        click.echo(did_)


@recipients.command("add")
@click.argument("dids", nargs=-1, required=True)
@click.pass_context
def recipients_add(ctx: click.Context, dids: tuple[str, ...]) -> None:
    async def go() -> dict[str, str]:
        async with _client(ctx) as client:
            return await client.add_recipients(dids)

    for did_, result in _run(go).items():
        click.echo(f"{result} {did_}")


@recipients.command("remove")
@click.argument("dids", nargs=-1, required=True)
@click.pass_context
def recipients_remove(ctx: click.Context, dids: tuple[str, ...]) -> None:
    async def go() -> dict[str, str]:
        async with _client(ctx) as client:
            return await client.remove_recipients(dids)

    for did_, result in _run(go).items():
        click.echo(f"{result} {did_}")


@main.command()
@click.argument("to")
@click.argument("text")
@click.option(
    "--wait",
    type=float,
    default=30.0,
    show_default=True,
    help="Seconds to wait for delivery before leaving it to a later run.",
)
@click.pass_context
def send(ctx: click.Context, to: str, text: str, wait: float) -> None:
    """Send TEXT (or @FILE) to the DID TO through the outbox."""

    async def go() -> OutboxItem:
        async with _client(ctx) as client:
            message_id = await client.send(to, _text(text))
            [item] = await client.wait_sent([message_id], max_wait=wait)
            return item

    item = _run(go)
    state = "queued (a later run retries)" if item.state == "pending" else item.state
    click.echo(f"{item.id} {state}")
    if item.state == "failed":
        sys.exit(2)


def _print(message: Received) -> None:
    click.echo(
        json.dumps(
            {"id": message.id, "from": message.sender, "type": message.type, "body": message.body}
        )
    )


@main.command()
@click.option("--live", is_flag=True, help="Stay connected and print messages as they come.")
@click.pass_context
def receive(ctx: click.Context, live: bool) -> None:
    """Pick up messages (one JSON line each); --live keeps receiving until Ctrl-C."""

    async def go() -> None:
        async with _client(ctx) as client:
            if not live:
                await client.drain(_print)
                return
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError):
                    loop.add_signal_handler(sig, stop.set)
            await client.live(_print, stop)

    _run(go)


@main.group()
def outbox() -> None:
    """List, retry or purge the local outbox."""


@outbox.command("list")
@click.option("--state", type=click.Choice(["pending", "sent", "failed"]), default=None)
@click.option("--limit", type=int, default=100, show_default=True)
@click.pass_context
def outbox_list(ctx: click.Context, state: str | None, limit: int) -> None:
    """Show outbox rows (oldest first) and the count per state."""

    async def go() -> tuple[list[OutboxItem], dict[str, int]]:
        async with _client(ctx) as client:
            return await client.outbox(state, limit), await client.store.counts()  # type: ignore[arg-type]

    items, counts = _run(go)
    for item in items:
        click.echo(
            f"{item.id}  {item.state:<7} {_when(item.created_at)}  "
            f"attempts={item.attempts:<3} {item.kind:<7} {item.target[:48]}  "
            f"{(item.last_error or '')[:80]}"
        )
    click.echo(" ".join(f"{k}={v}" for k, v in counts.items()))


@outbox.command("retry")
@click.argument("ids", nargs=-1)
@click.option("--wait", type=float, default=30.0, show_default=True)
@click.pass_context
def outbox_retry(ctx: click.Context, ids: tuple[str, ...], wait: float) -> None:
    """Queue failed messages again (all, or the IDS given) and try to send them."""

    async def go() -> tuple[int, dict[str, int], int]:
        async with _client(ctx) as client:
            wanted = set(ids)
            requeued = {
                i.id
                for i in await client.outbox("failed", 1_000_000)
                if not wanted or i.id in wanted
            }
            count = await client.retry_failed(list(ids) or None)
            counts = await client.flush(max_wait=wait)
            again = sum(1 for i in await client.outbox("failed", 1_000_000) if i.id in requeued)
            return count, counts, again

    count, counts, again = _run(go)
    click.echo(f"requeued {count}; " + " ".join(f"{k}={v}" for k, v in counts.items()))
    if again:  # documented: 2 when a message is (still) failed
        click.echo(f"{again} failed again", err=True)
        sys.exit(2)


@outbox.command("purge")
@click.option(
    "--state",
    "states",
    multiple=True,
    type=click.Choice(["sent", "failed"]),
    default=("sent",),
    show_default=True,
)
@click.option("--older-than", type=float, default=None, help="Seconds since done.")
@click.pass_context
def outbox_purge(ctx: click.Context, states: tuple[str, ...], older_than: float | None) -> None:
    """Delete sent (and, if asked, failed) rows; pending rows are never purged."""

    async def go() -> int:
        async with _client(ctx) as client:
            return await client.purge_outbox(states, older_than)  # type: ignore[arg-type]

    click.echo(f"purged {_run(go)}")


@main.group()
def rooms() -> None:
    """Post to and follow rooms (needs --rooms-url and --rooms-token; keeps its outbox and
    cursors in the data directory, created on first use)."""


def _require_rooms(ctx: click.Context) -> None:
    """Refuse before queueing: a post without a URL or token could only fail later."""
    config: ClientConfig = ctx.obj
    if not config.rooms_url:
        raise click.ClickException("give --rooms-url (or DOVECOTE_ROOMS_URL)")
    if not config.rooms_token:
        raise click.ClickException(
            "give --rooms-token (or DOVECOTE_ROOMS_TOKEN); for a "
            "development server: dovecote rooms token --user NAME --room ROOM"
        )


@rooms.command("post")
@click.argument("room")
@click.argument("text")
@click.option("--wait", type=float, default=30.0, show_default=True)
@click.pass_context
def rooms_post(ctx: click.Context, room: str, text: str, wait: float) -> None:
    """Post TEXT (or @FILE) to ROOM through the outbox (with an Idempotency-Key)."""
    _require_rooms(ctx)

    async def go() -> OutboxItem:
        async with _client(ctx, create=True) as client:
            key = await client.rooms.post(room, _text(text))
            [item] = await client.wait_sent([key], max_wait=wait)
            return item

    item = _run(go)
    click.echo(f"{item.id} {item.state}")
    if item.state == "failed":
        sys.exit(2)


@rooms.command("tail")
@click.argument("room")
@click.option(
    "--since",
    type=int,
    default=None,
    help="Start after this seq (default: where the last tail stopped).",
)
@click.pass_context
def rooms_tail(ctx: click.Context, room: str, since: int | None) -> None:
    """Print ROOM's events as JSON lines, live, resuming where the last run stopped."""
    _require_rooms(ctx)

    async def go() -> None:
        async with _client(ctx, create=True) as client:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError):
                    loop.add_signal_handler(sig, stop.set)

            def show(event: dict[str, Any]) -> None:
                click.echo(json.dumps(event))

            await client.rooms.subscribe(room, show, since, stop)

    _run(go)


if __name__ == "__main__":
    main()
