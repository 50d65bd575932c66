"""`dovecote` command line: parse, set up logging, hand off.

`serve` gets one option per Settings field, so `dovecote serve --help` always documents
every setting and its DOVECOTE_* variable.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, overload

import click

from dovecote import __version__
from dovecote.ops.settings_fields import FIELDS

if TYPE_CHECKING:
    from dovecote.ops.settings import Settings

# Start-up time matters (`dovecote --version`, `--help`, shell completion): heavy modules
# (pydantic, structlog, asyncio, the server) are imported inside the commands that use them.

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


def configure(log_format: Any, level: str) -> None:
    from dovecote.ops.logging import configure as configure_logging

    configure_logging(log_format, level)


# The settings each operator command uses (the rest still come from DOVECOTE_* and TOML):
# `dlq --help` lists these, not every server option.
URL_FIELDS = ("config", "host", "port", "public_url", "tls_cert", "tls_key")
IDENTITY_FIELDS = (*URL_FIELDS, "data_dir", "identity_file")
STORE_FIELDS = ("config", "data_dir", "store", "store_timeout")
BACKUP_FIELDS = (*STORE_FIELDS, "identity_file", "backup_key_file")
ROOMS_TOKEN_FIELDS = (
    *STORE_FIELDS,
    "rooms_jwks_file",
    "rooms_jwks_url",
    "rooms_jwt_issuer",
    "rooms_jwt_audience",
)


@overload
def _settings_options(func: F, *, only: tuple[str, ...] | None = None) -> F: ...
@overload
def _settings_options(
    func: None = None, *, only: tuple[str, ...] | None = None
) -> Callable[[F], F]: ...
def _settings_options(
    func: F | None = None, *, only: tuple[str, ...] | None = None
) -> F | Callable[[F], F]:
    """Decorate a command with one --option per Settings field (or the fields in `only`)."""
    if func is None:
        return lambda f: _add_settings_options(f, only)
    return _add_settings_options(func, only)


def _add_settings_options(func: F, only: tuple[str, ...] | None) -> F:
    # From the generated table (ops/settings_fields.py), not the pydantic model: building
    # the options must not cost pydantic's import on every `--help`.
    for name, kind, choices, shown, description in reversed(FIELDS):
        if only is not None and name not in only:
            continue
        flag = "--" + name.replace("_", "-")
        env = f"DOVECOTE_{name.upper()}"
        help_text = f"{description} [env {env}; default: {shown}]"
        if kind == "bool":
            option = click.option(f"{flag}/--no-{flag[2:]}", name, default=None, help=help_text)
        elif kind in ("int", "float"):
            option = click.option(
                flag, name, type=int if kind == "int" else float, default=None, help=help_text
            )
        elif kind == "choice":
            option = click.option(
                flag, name, type=click.Choice(list(choices)), default=None, help=help_text
            )
        else:
            option = click.option(flag, name, type=str, default=None, help=help_text)
        func = option(func)
    return func


def _settings(overrides: dict[str, Any]) -> Settings:
    from pydantic import ValidationError

    from dovecote.ops.settings import Settings

    given = {k: v for k, v in overrides.items() if v is not None}
    if "config" in given:
        import os

        os.environ["DOVECOTE_CONFIG"] = str(given["config"])
    try:
        return Settings(**given)
    except ValidationError as exc:
        # One line per bad setting, not a traceback: the operator fixes a value.
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: "
            f"{err['msg'].removeprefix('Value error, ')}"
            for err in exc.errors()
        )
        raise click.UsageError(f"invalid settings: {problems}") from None


def _run(coro: Awaitable[T]) -> T:
    import asyncio

    return asyncio.run(coro)  # type: ignore[arg-type]


@click.group()
@click.version_option(__version__, prog_name="dovecote")
def main() -> None:
    """Dovecote: a store-and-forward message relay (DIDComm v2 mediator)."""


@main.command()
@_settings_options
def serve(**options: Any) -> None:
    """Run the relay (HTTP + WebSocket) until SIGTERM."""
    settings = _settings(options)
    if settings.advertises_unspecified_address:
        # did:peer:2 embeds the URL: fixing it later changes the DID clients already hold.
        raise click.ClickException(
            f"the mediator would advertise {settings.base_url}, which no client can reach: "
            "set DOVECOTE_PUBLIC_URL (or --public-url) to the URL clients use, e.g. "
            "https://relay.example.com (the DID and invitation embed it)"
        )
    if settings.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Must be set before prometheus_client is first imported (by dovecote.server).
        import tempfile

        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="dovecote-metrics-")
    from dovecote.ops.lock import DataDirInUse
    from dovecote.server import run

    configure(settings.log_format, settings.log_level)
    try:
        run(settings)
    except DataDirInUse as exc:
        raise click.ClickException(str(exc)) from exc


def _mediator(settings: Settings, create: bool = False) -> tuple[Any, str]:
    """The mediator's identity and base URL, without writing anything unless `create`.

    With a URL setting given (--public-url, --host, --port, TLS, or their DOVECOTE_*
    variables), the DID is the one the server makes for that URL; otherwise it is the DID
    the server last advertised (recorded in identity.json), so the answer matches the
    running server whatever port it was started on.
    """
    from dovecote.didcomm import identity as ids

    explicit = bool(settings.model_fields_set & {"public_url", "host", "port", "tls_cert"})
    endpoints = [settings.base_url, settings.ws_url]
    if create:
        ident = ids.load_or_create(settings.identity_path, endpoints)
        return ident, settings.base_url
    try:
        ident = ids.load(settings.identity_path, endpoints if explicit else None)
    except ids.IdentityMissing as exc:
        raise click.ClickException(
            f"{exc}: start the server once (dovecote serve), or create the keys with "
            "`dovecote did --create` and the production DOVECOTE_PUBLIC_URL"
        ) from exc
    if explicit:
        return ident, settings.base_url
    http = [u for u in ids.service_urls(ident.did) if u.startswith(("http://", "https://"))]
    return ident, (http[0] if http else settings.base_url).rstrip("/")


@main.command()
@click.option(
    "--create",
    is_flag=True,
    help="Create the keys if there are none yet (for a cluster's shared identity).",
)
@_settings_options(only=IDENTITY_FIELDS)
def did(create: bool, **options: Any) -> None:
    """Print the mediator's DID (read-only unless --create)."""
    ident, _ = _mediator(_settings(options), create=create)
    click.echo(ident.did)


@main.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print the invitation JSON.")
@click.option("--full", is_flag=True, help="Print the long ?_oob= URL instead of the short one.")
@click.option("--qr", is_flag=True, help="Print a QR code of the short URL (terminal).")
@_settings_options(only=IDENTITY_FIELDS)
@click.pass_context
def invitation(ctx: click.Context, /, as_json: bool, full: bool, qr: bool, **options: Any) -> None:
    """Print the Out-of-Band invitation (goal_code request-mediate); read-only.

    The invitation keeps its id until `dovecote invitation rotate`. Its short URL,
    <public url>/oob, answers the JSON to agents and redirects browsers.
    """
    if ctx.invoked_subcommand is not None:
        ctx.obj = options
        return
    from dovecote.web.invitation import qr_code, short_url

    ident, base = _mediator(_settings(options))
    if as_json:
        click.echo(json.dumps(ident.invitation(), indent=2))
        return
    if qr:
        qr_code(short_url(base)).terminal(compact=True)
    click.echo(ident.invitation_url(base) if full else short_url(base))


@invitation.command("rotate")
@_settings_options(only=("config", "data_dir", "identity_file"))
@click.pass_context
def invitation_rotate(ctx: click.Context, /, **options: Any) -> None:
    """Give the invitation a new id (running servers answer with it at once)."""
    from dovecote.didcomm import identity as ids

    given = {k: v for k, v in {**(ctx.obj or {}), **options}.items() if v is not None}
    settings = _settings(given)
    try:
        new_id = ids.rotate_invitation(settings.identity_path)
    except ids.IdentityMissing as exc:
        raise click.ClickException(str(exc)) from exc
    except OSError as exc:
        raise click.ClickException(
            f"cannot write {settings.identity_path}: {exc} (a "
            "read-only secret: update the secret instead)"
        ) from exc
    click.echo(f"invitation id {new_id}")


# ---------------------------------------------------------------------- dead letters
async def _with_store(settings: Settings, fn: Callable[[Any], Awaitable[T]]) -> T:
    from dovecote.store import open_store

    # Logs go to stderr and only when they matter: stdout is the command's answer
    # (`dovecote dlq show` prints JSON meant for other tools).
    configure(settings.log_format, "warning")
    store = open_store(settings.store_url, timeout=settings.store_timeout)
    await store.open()
    try:
        return await fn(store)
    finally:
        await store.close()


def _when(ts: float) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


@main.group()
def recipients() -> None:
    """Recipient registrations (works on the store directly, like dlq)."""


@recipients.command("conflicts")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@_settings_options(only=STORE_FIELDS)
def recipients_conflicts(as_json: bool, **options: Any) -> None:
    """Registrations refused when recipients became one owner per base DID.

    Each names the form a mediatee had registered, the base DID it belongs to, and the
    mediatee that kept it (the first to register). Exit status 1 when there are any.
    """
    settings = _settings(options)
    found = _run(_with_store(settings, lambda s: s.recipient_conflicts()))
    for c in found:
        if as_json:
            click.echo(
                json.dumps(
                    {
                        "recipient": c.recipient,
                        "base": c.base,
                        "mediatee": c.mediatee,
                        "owner": c.owner,
                        "registered_at": c.created_at,
                        "found_at": c.found_at,
                        "queued": c.queued,
                    }
                )
            )
        else:
            click.echo(
                f"{_when(c.created_at)}  {c.recipient[:80]}  mediatee={c.mediatee[:60]}"
                f"  kept-by={c.owner[:60]}  queued={c.queued}"
            )
    if not as_json:
        click.echo(f"{len(found)} conflicting registration(s)")
    sys.exit(1 if found else 0)


@main.group()
def dlq() -> None:
    """Inspect, replay and purge dead letters (works on the store directly).

    Give the same --data-dir / --store (or DOVECOTE_* environment) as the server.
    """


@dlq.command("list")
@click.option("--limit", default=50, show_default=True)
@click.option("--offset", default=0, show_default=True)
@click.option("--kind", default=None, help="Only this kind (forward, notify, mailbox).")
@click.option("--target-contains", "target", default=None, help="Target URL substring.")
@click.option("--reason-contains", "reason", default=None, help="Reason substring.")
@_settings_options(only=STORE_FIELDS)
def dlq_list(
    limit: int,
    offset: int,
    kind: str | None,
    target: str | None,
    reason: str | None,
    **options: Any,
) -> None:
    """List dead letters, newest first."""
    from dovecote.ops import admin

    settings = _settings(options)
    items, total = _run(
        _with_store(
            settings,
            lambda s: admin.dead_letters(s, offset, limit, kind=kind, target=target, reason=reason),
        )
    )
    click.echo(f"{total} dead letter(s)")
    for item in items:
        click.echo(
            f"{item.id:>8}  {_when(item.dead_at)}  {item.kind:<8} {item.reason:<24} "
            f"attempts={item.attempts:<3} target={item.target[:60]}"
        )


@dlq.command("show")
@click.argument("item_id", type=int)
@_settings_options(only=STORE_FIELDS)
def dlq_show(item_id: int, **options: Any) -> None:
    """Show one dead letter with its attempt history."""
    import base64

    from dovecote.ops import admin

    settings = _settings(options)
    item = _run(_with_store(settings, lambda s: admin.dead_letter(s, item_id)))
    if item is None:
        click.echo(f"no dead letter {item_id}", err=True)
        sys.exit(1)
    click.echo(
        json.dumps(
            {
                "id": item.id,
                "kind": item.kind,
                "target": item.target,
                "reason": item.reason,
                "created_at": _when(item.created_at),
                "dead_at": _when(item.dead_at),
                "headers": item.headers,
                "history": item.history,
                "size": len(item.payload),
                "payload_base64": base64.b64encode(item.payload[:4096]).decode(),
            },
            indent=2,
        )
    )


@dlq.command("replay")
@click.argument("item_id", type=int, required=False)
@click.option("--all", "replay_all", is_flag=True, help="Replay every dead letter.")
@click.option("--target", default=None, help="Only dead letters for this target.")
@_settings_options(only=STORE_FIELDS)
def dlq_replay(item_id: int | None, replay_all: bool, target: str | None, **options: Any) -> None:
    """Put dead letters back in the outbox with fresh attempts."""
    if item_id is None and not replay_all:
        raise click.UsageError("give an ID or --all")
    from dovecote.ops import admin
    from dovecote.util.kinds import DeadLetterKind

    settings = _settings(options)

    async def replay(store: Any) -> int:
        if item_id is not None and not replay_all:
            item = await admin.dead_letter(store, item_id)
            if item is None:
                raise click.ClickException(f"no dead letter {item_id}")
            if item.kind == DeadLetterKind.MAILBOX:
                # An expired message has no outbound target; it can be shown or purged.
                raise click.ClickException(
                    f"dead letter {item_id} is an expired mailbox message: not replayable"
                )
            return await admin.replay(store, [item_id], target)
        return await admin.replay(store, None, target)

    count = _run(_with_store(settings, replay))
    from dovecote.ops.audit import audit, cli_caller

    audit(
        None,
        "dlq.replay",
        f"ids={[item_id] if item_id is not None else 'all'} target={target}",
        caller=cli_caller(),
        level="warning",
        count=count,
    )
    # A running server picks replayed items up at its next outbox poll (about 1 s).
    click.echo(f"replayed {count}")


@dlq.command("purge")
@click.argument("item_id", type=int, required=False)
@click.option("--older-than", type=float, default=None, help="Seconds; purge older items.")
@_settings_options(only=STORE_FIELDS)
def dlq_purge(item_id: int | None, older_than: float | None, **options: Any) -> None:
    """Delete dead letters by id or age."""
    from dovecote.ops import admin

    if item_id is None and older_than is None:
        raise click.UsageError("give an ID or --older-than")
    settings = _settings(options)
    ids = [item_id] if item_id is not None else None
    count = _run(_with_store(settings, lambda s: admin.purge(s, ids, older_than)))
    from dovecote.ops.audit import audit, cli_caller

    audit(
        None,
        "dlq.purge",
        f"ids={ids} older_than={older_than}",
        caller=cli_caller(),
        level="warning",
        count=count,
    )
    click.echo(f"purged {count}")


def _server_url(url: str | None, options: dict[str, Any]) -> str:
    """Where this instance answers: --url, else the server's own settings (env, TOML, flags)
    with an unspecified listen address (0.0.0.0, ::) reached on loopback."""
    if url:
        return url.rstrip("/")
    settings = _settings(options)
    if settings.public_url:
        return settings.base_url
    if settings.advertises_unspecified_address:
        host = "[::1]" if ":" in settings.host else "127.0.0.1"
        return f"{'https' if settings.tls_cert else 'http'}://{host}:{settings.port}"
    return settings.base_url


@main.command()
@click.option(
    "--url",
    default=None,
    help="Instance base URL (default: from the server's "
    "settings: DOVECOTE_PUBLIC_URL, else HOST:PORT).",
)
@click.option("--interval", default=2.0, show_default=True, help="Seconds between scrapes.")
@click.option("--watch", is_flag=True, help="Refresh until Ctrl-C.")
@click.option(
    "--token",
    envvar="DOVECOTE_ADMIN_TOKEN",
    default="",
    help="Admin token, to include the cluster view [env DOVECOTE_ADMIN_TOKEN].",
)
@_settings_options(only=URL_FIELDS)
def status(url: str | None, interval: float, watch: bool, token: str, **options: Any) -> None:
    """Health, degradation, rates, latency percentiles, queues, breakers, cluster."""
    import httpx

    from dovecote.ops.status import show

    base = _server_url(url, options)
    try:
        show(base, interval, watch, token)
    except KeyboardInterrupt:
        pass
    # Unreachable, or not answering JSON and a metrics text: say so plainly. Anything
    # else is a bug in show() and keeps its traceback.
    except (httpx.HTTPError, ValueError) as exc:
        click.echo(f"cannot read {base}: {exc}", err=True)
        sys.exit(2)


@main.group()
def cluster() -> None:
    """The cluster view kept in the store."""


@cluster.command("status")
@_settings_options(only=(*STORE_FIELDS, "heartbeat_interval"))
def cluster_status(**options: Any) -> None:
    """List instances with their last heartbeat."""
    import time

    settings = _settings(options)
    instances = _run(_with_store(settings, lambda s: s.instances()))
    now = time.time()
    for i in instances:
        age = now - i.last_beat
        state = (
            "stopped"
            if i.level == "stopped"
            else "alive"
            if age < 3 * settings.heartbeat_interval
            else "dead"
        )
        click.echo(
            f"{i.id:<40} {state:<6} {i.level:<12} v{i.version:<8} "
            f"conns={i.connections:<5} last_beat={age:.0f}s ago host={i.host}"
        )


# ---------------------------------------------------------------------- probe
@main.command()
@click.argument("url")
@click.option(
    "--timeout",
    type=click.FloatRange(min=1),
    default=30.0,
    show_default=True,
    help="Seconds one run may take before it counts as failed.",
)
@click.option(
    "--every",
    default=None,
    metavar="INTERVAL",
    help="Repeat every INTERVAL (30s, 2m, ...) until stopped, exporting dovecote_probe_* metrics.",
)
@click.option(
    "--metrics-host",
    default="127.0.0.1",
    show_default=True,
    help="With --every: address of the metrics endpoint.",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=9109,
    show_default=True,
    help="With --every: port of the metrics endpoint (0: none).",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per run.")
def probe(
    url: str, timeout: float, every: str | None, metrics_host: str, metrics_port: int, as_json: bool
) -> None:
    """Check a deployment end to end, as a user would: exit 0 if it works.

    A throwaway identity mediates at URL (the base URL or an invitation URL), sends itself a
    message through the mediator, picks it up and acknowledges it. Prints the result and
    the latency of each step.
    """
    from dovecote.ops import probe as probes

    def show(result: probes.ProbeResult) -> None:
        click.echo(
            json.dumps(result.as_dict()) if as_json else result.line(),
            err=not result.ok and not as_json,
        )

    configure("auto", "error")
    if every is None:
        result = _run(probes.run_once(url, timeout))
        show(result)
        sys.exit(0 if result.ok else 1)
    try:
        interval = probes.parse_interval(every)
    except ValueError as exc:
        raise click.BadParameter("e.g. 30s, 2m or 60", param_hint="--every") from exc
    exported = probes.ProbeMetrics(probes.invitation_url(url).removesuffix("/oob"))
    if metrics_port:
        exported.serve(metrics_host, metrics_port)
    import signal
    import threading
    import time

    # Ctrl-C / SIGTERM end the loop after the current run (bounded by --timeout). An
    # interrupt in the middle of a run left the client's store thread unjoined and the
    # process hanging at exit (seen in CI).
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.is_set():
        begun = time.monotonic()
        result = _run(probes.run_once(url, timeout))
        exported.record(result)
        show(result)
        stop.wait(max(0.0, interval - (time.monotonic() - begun)))


# ---------------------------------------------------------------------- rooms
@main.group()
def rooms() -> None:
    """Rooms helpers for development (tokens from the built-in development issuer)."""


@rooms.command("token")
@click.option("--user", required=True, help="Participant id (the token's sub).")
@click.option(
    "--room",
    "room_ids",
    multiple=True,
    help="Room the token grants (repeatable); '*' for every room.",
)
@click.option(
    "--role",
    "roles",
    multiple=True,
    type=click.Choice(["admin", "moderator"]),
    help="Token role (repeatable).",
)
@click.option(
    "--ttl",
    type=click.FloatRange(min=1),
    default=86400.0,
    show_default=True,
    help="Seconds the token is valid.",
)
@click.option(
    "--join/--no-join",
    default=True,
    show_default=True,
    help="Create each --room if missing and make --user a participant (in the store).",
)
@_settings_options(only=ROOMS_TOKEN_FIELDS)
def rooms_token(
    user: str,
    room_ids: tuple[str, ...],
    roles: tuple[str, ...],
    ttl: float,
    join: bool,
    **options: Any,
) -> None:
    """Print a rooms token signed by the development key in DATA_DIR.

    The server accepts these while no issuer JWKS is configured (DOVECOTE_ROOMS_JWKS_FILE /
    _URL); with one configured, get tokens from that issuer instead.
    """
    import re

    from dovecote.rooms import devkey
    from dovecote.rooms.models import PARTICIPANT_PATTERN, ROOM_ID_PATTERN

    if not re.match(PARTICIPANT_PATTERN, user):
        raise click.BadParameter("1-256 printable ASCII characters, no '/'", param_hint="--user")
    for room in room_ids:
        if room != "*" and not re.match(ROOM_ID_PATTERN, room):
            raise click.BadParameter(f"{room!r} is not a room id", param_hint="--room")
    settings = _settings(options)
    if settings.rooms_jwks_file or settings.rooms_jwks_url:
        raise click.ClickException(
            "an issuer JWKS is configured (DOVECOTE_ROOMS_JWKS_FILE/_URL): the server does not "
            "accept development tokens; get one from that issuer"
        )
    key = devkey.load_or_create(settings.data_dir)
    if join and room_ids:
        _run(
            _with_store(settings, lambda s: _join_rooms(s, user, [r for r in room_ids if r != "*"]))
        )
    click.echo(
        devkey.issue(
            key,
            user,
            list(room_ids),
            list(roles),
            ttl,
            settings.rooms_jwt_issuer,
            settings.rooms_jwt_audience,
        )
    )


async def _join_rooms(store: Any, user: str, room_ids: list[str]) -> None:
    from dovecote.errors import Conflict
    from dovecote.store.rooms_base import NewRoom

    for room in room_ids:
        if await store.rooms.room_get(room) is None:
            try:
                await store.rooms.room_create(
                    NewRoom(
                        id=room,
                        name=room,
                        metadata={},
                        created_by=user,
                        participants=[(user, "admin")],
                    )
                )
                continue
            except Conflict:
                pass  # created meanwhile by someone else: join it below
        members = await store.rooms.participants(room) or []
        if not any(p.participant == user for p in members):
            await store.rooms.participant_set(room, user, "member", user, manage=True)


# ---------------------------------------------------------------------- backups
@main.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--step-pages",
    type=click.IntRange(min=1),
    default=None,
    help="Database pages copied per step [default: 1024 pages].",
)
@click.option(
    "--step-sleep",
    type=click.FloatRange(min=0),
    default=None,
    help="Seconds to pause between steps (leaves the disk to the server) [default: 0.005 s].",
)
@_settings_options(only=BACKUP_FIELDS)
def backup(file: Path, step_pages: int | None, step_sleep: float | None, **options: Any) -> None:
    """Back up the SQLite store and the mediator keys to FILE (safe while serving).

    Writes FILE, FILE.identity.json (0600) and FILE.manifest.json.
    """
    from dovecote.ops import backup as backups

    settings = _settings(options)
    try:
        manifest = backups.make_backup(
            backups.sqlite_path(settings.store_url),
            settings.identity_path,
            file,
            step_pages=step_pages or backups.STEP_PAGES,
            step_sleep=(backups.STEP_SLEEP if step_sleep is None else step_sleep),
            key_file=settings.backup_key_file,
        )
    except (backups.BackupError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(
        f"backup {file}: schema v{manifest.schema_version}, "
        f"{sum(manifest.tables.values())} rows, {manifest.database.bytes} bytes, "
        f"sha256 {manifest.database.sha256[:16]}..., {manifest.seconds:.2f}s"
    )


@main.command("backup-keygen")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def backup_keygen(file: Path) -> None:
    """Create an age key file (0600) for encrypted backups; keep a copy off this host."""
    from dovecote.ops import backup as backups

    try:
        public = backups.keygen(file)
    except (backups.BackupError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"wrote {file} (public key {public}); set DOVECOTE_BACKUP_KEY_FILE={file}")


@main.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--key-file",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="DOVECOTE_BACKUP_KEY_FILE",
    default=None,
    help="Key file of an encrypted backup [env DOVECOTE_BACKUP_KEY_FILE].",
)
def verify(file: Path, key_file: Path | None) -> None:
    """Check a backup: checksums, PRAGMA integrity_check, row counts, keys. Exit 1 if bad."""
    from dovecote.ops.backup import verify_backup

    manifest, problems = verify_backup(file, key_file)
    for problem in problems:
        click.echo(f"BAD  {problem}", err=True)
    if manifest is None or problems:
        sys.exit(1)
    click.echo(
        f"OK   {file}: taken {_when(manifest.created_at)} UTC by dovecote "
        f"{manifest.dovecote_version}, schema v{manifest.schema_version}, "
        + ", ".join(f"{t}={n}" for t, n in manifest.tables.items())
    )


@main.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--force",
    is_flag=True,
    help="Move an existing store/keys aside (DATA_DIR/pre-restore-*) instead of refusing.",
)
@_settings_options(only=BACKUP_FIELDS)
def restore(file: Path, force: bool, **options: Any) -> None:
    """Verify FILE, then restore it into a STOPPED data directory (--data-dir)."""
    from dovecote.ops import backup as backups
    from dovecote.ops.lock import DataDirInUse

    settings = _settings(options)
    try:
        done = backups.restore_backup(
            file,
            backups.sqlite_path(settings.store_url),
            settings.identity_path,
            settings.data_dir,
            force=force,
            key_file=settings.backup_key_file,
        )
    except (backups.BackupError, DataDirInUse, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(
        f"restored {file} (taken {_when(done.manifest.created_at)} UTC) into "
        f"{done.database}; keys in {done.identity}"
    )
    if done.moved_aside:
        click.echo(f"previous files moved to {done.moved_aside}")


if __name__ == "__main__":
    main()
