"""Online backups of the SQLite store: make, verify, restore.

A backup is three files side by side:

    FILE                  the database (a plain SQLite file, journal_mode=DELETE), 0600
    FILE.identity.json    the mediator's keys, 0600: without them a restored relay could
                          not decrypt forwards addressed to it
    FILE.manifest.json    format, schema version, row count per table, SHA-256 and size
                          of both files, when the snapshot was taken, Dovecote version, 0600

The manifest is written last, so a backup without one is incomplete.

With a key file (BACKUP_KEY_FILE, an age X25519 identity made by `dovecote backup-keygen`)
FILE and FILE.identity.json are age-encrypted to that key (pyrage, streaming); the
manifest then records the digests of both the stored (encrypted) and the plain files, and
`verify`/`restore` decrypt with the same key file and check the plain digests, the
integrity check and the row counts before anything is installed.

Consistency while the server writes: the copy runs in steps (`Connection.backup` with a
page count) inside ONE read transaction held on the source connection. In WAL mode that
read snapshot does not block the writer, every step copies the same snapshot, and the
row counts are taken in that same snapshot. Without the held transaction SQLite restarts
a stepped backup whenever another connection commits, which under steady load means it
never finishes. Short sleeps between steps leave disk bandwidth to the writer. The cost of
a long backup is WAL growth: the WAL cannot be checkpointed past the snapshot until the
copy ends.

PostgreSQL is backed up with PostgreSQL's own tools (pg_basebackup + WAL archiving); see
docs/runbook.md.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import sqlite3
import stat
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyrage
import structlog

from dovecote import __version__
from dovecote.files import PRIVATE, write_atomic, write_private
from dovecote.ops.lock import DataDirLock

log = structlog.get_logger("dovecote.backup")

FORMAT = 1
STEP_PAGES = 1024  # 4 MiB per step at SQLite's default 4 KiB page size
STEP_SLEEP = 0.005  # seconds between steps, for the writer's sake
MANIFEST_SUFFIX = ".manifest.json"
IDENTITY_SUFFIX = ".identity.json"
PARTIAL_SUFFIX = ".partial"
ENCRYPTION = "age-x25519"


class BackupError(RuntimeError):
    """A backup could not be made, verified or restored; the message says why."""


@dataclass(frozen=True)
class FileDigest:
    """One file of a backup as the manifest records it."""

    name: str
    bytes: int
    sha256: str


@dataclass
class Manifest:
    """What a backup holds, written next to it as FILE.manifest.json."""

    created_at: float
    schema_version: int
    tables: dict[str, int]
    database: FileDigest
    identity: FileDigest
    source: str
    seconds: float = 0.0
    engine: str = "sqlite"
    format: int = FORMAT
    dovecote_version: str = __version__
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        data = asdict(self)
        data["created_at_utc"] = _utc(self.created_at)
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        data = json.loads(text)
        data.pop("created_at_utc", None)
        data["database"] = FileDigest(**data["database"])
        data["identity"] = FileDigest(**data["identity"])
        return cls(**data)


@dataclass(frozen=True)
class BackupFiles:
    """The three paths of one backup."""

    database: Path
    identity: Path
    manifest: Path

    @classmethod
    def of(cls, file: Path) -> BackupFiles:
        file = Path(file)
        return cls(file, Path(f"{file}{IDENTITY_SUFFIX}"), Path(f"{file}{MANIFEST_SUFFIX}"))


def sqlite_path(store_url: str) -> Path:
    """The database file behind a sqlite:// store URL."""
    if not store_url.startswith("sqlite:"):
        raise BackupError(
            "dovecote backup/restore handle the SQLite store; back up PostgreSQL with "
            "pg_basebackup and WAL archiving (docs/runbook.md)"
        )
    return Path(store_url.removeprefix("sqlite:///").removeprefix("sqlite://"))


# ---------------------------------------------------------------------- make
def keygen(path: Path) -> str:
    """Write a new age identity to `path` (0600, refusing to overwrite); its public key."""
    from dovecote.files import write_private

    if path.exists():
        raise BackupError(f"{path} already exists; refusing to overwrite a backup key")
    identity = pyrage.x25519.Identity.generate()
    public = str(identity.to_public())
    write_private(path, f"# public key: {public}\n{identity}\n")
    return public


def load_key(path: Path) -> pyrage.x25519.Identity:
    """The age identity in a key file; refused when others may read it."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        text = path.read_text()
    except OSError as exc:
        raise BackupError(f"cannot read the backup key file {path}: {exc}") from exc
    if mode & 0o077:
        raise BackupError(f"backup key file {path} has mode {mode:o}; make it 600")
    for line in text.splitlines():
        if line.strip().startswith("AGE-SECRET-KEY-"):
            try:
                return pyrage.x25519.Identity.from_str(line.strip())
            except Exception as exc:  # pyrage raises its own IdentityError types
                raise BackupError(f"{path} holds an invalid age key: {exc}") from exc
    raise BackupError(f"{path} has no AGE-SECRET-KEY line (make one: dovecote backup-keygen)")


def _encrypt(plain: Path, out: Path, key: pyrage.x25519.Identity) -> None:
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE)
    os.close(fd)
    try:
        pyrage.encrypt_file(str(plain), str(out), [key.to_public()])
    except Exception as exc:  # pyrage.EncryptError and I/O errors
        raise BackupError(f"cannot encrypt {plain}: {exc}") from exc
    os.chmod(out, PRIVATE)


def _decrypt(stored: Path, out: Path, key: pyrage.x25519.Identity) -> None:
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE)
    os.close(fd)
    try:
        pyrage.decrypt_file(str(stored), str(out), [key])
    except Exception as exc:  # wrong key, truncated or altered ciphertext
        raise BackupError(f"cannot decrypt {stored.name} with this key: {exc}") from exc
    os.chmod(out, PRIVATE)


def make_backup(
    db: Path,
    identity: Path,
    file: Path,
    *,
    step_pages: int = STEP_PAGES,
    step_sleep: float = STEP_SLEEP,
    key_file: Path | None = None,
) -> Manifest:
    """Copy a live SQLite store and the mediator keys to FILE; return the manifest.

    Safe while a server writes to `db`. The copy is checked (integrity_check, row counts)
    before the manifest is written. With `key_file` both files are stored age-encrypted.
    """
    key = load_key(key_file) if key_file else None
    out = BackupFiles.of(file)
    if out.database.exists() or out.manifest.exists():
        raise BackupError(f"{out.database} already exists; choose a new name")
    if not db.is_file():
        raise BackupError(f"no database at {db}")
    if not identity.is_file():
        raise BackupError(f"no mediator identity at {identity}")
    out.database.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(f"{out.database}{PARTIAL_SUFFIX}")
    partial_identity = Path(f"{out.identity}{PARTIAL_SUFFIX}")
    started = time.monotonic()
    try:
        snapshot_at, schema, counts = _copy_database(db, partial, step_pages, step_sleep)
        problems = _check_database(partial, schema, counts)
        if problems:
            raise BackupError("the copy failed its check: " + "; ".join(problems))
        write_private(partial_identity, identity.read_bytes())
        extra: dict[str, Any] = {}
        if key is not None:
            extra = {
                "encryption": ENCRYPTION,
                "plain": {
                    "database": asdict(_digest(partial, out.database.name)),
                    "identity": asdict(_digest(partial_identity, out.identity.name)),
                },
            }
            for plain in (partial, partial_identity):
                sealed = Path(f"{plain}.age")
                _encrypt(plain, sealed, key)
                os.replace(sealed, plain)
        manifest = Manifest(
            created_at=snapshot_at,
            schema_version=schema,
            tables=counts,
            database=_digest(partial, out.database.name),
            identity=_digest(partial_identity, out.identity.name),
            source=str(db.resolve()),
            seconds=round(time.monotonic() - started, 3),
            extra=extra,
        )
        _fsync(partial)
        os.replace(partial, out.database)
        os.replace(partial_identity, out.identity)
        # The manifest last: its presence is what says "this backup is complete".
        write_atomic(out.manifest, manifest.to_json().encode(), PRIVATE)
        _fsync_dir(out.database.parent)
    finally:
        for leftover in (
            partial,
            partial_identity,
            Path(f"{partial}-journal"),
            Path(f"{partial}.age"),
            Path(f"{partial_identity}.age"),
        ):
            leftover.unlink(missing_ok=True)
    log.info(
        "backup.made",
        file=str(out.database),
        seconds=manifest.seconds,
        bytes=manifest.database.bytes,
        schema=schema,
        rows=sum(counts.values()),
    )
    return manifest


def _copy_database(
    db: Path, target: Path, step_pages: int, step_sleep: float
) -> tuple[float, int, dict[str, int]]:
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE)
    os.close(fd)
    src = sqlite3.connect(db, isolation_level=None, timeout=30.0)
    dst = sqlite3.connect(target, isolation_level=None)
    try:
        src.execute("PRAGMA query_only=ON")
        # One read snapshot for counts and every copy step (see the module docstring).
        src.execute("BEGIN")
        snapshot_at = time.time()
        schema = _schema_version(src)
        counts = _count_rows(src)

        def pause(status: int, remaining: int, total: int) -> None:
            if remaining and step_sleep > 0:
                time.sleep(step_sleep)

        src.backup(dst, pages=step_pages, progress=pause)
        src.execute("COMMIT")
        # The copy carries the WAL flag of its source; a backup is one self-contained file.
        dst.execute("PRAGMA journal_mode=DELETE")
    except sqlite3.Error as exc:
        raise BackupError(f"backup of {db} failed: {exc}") from exc
    finally:
        dst.close()
        src.close()
    return snapshot_at, schema, counts


def _schema_version(conn: sqlite3.Connection) -> int:
    try:
        row = conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetchone()
    except sqlite3.OperationalError:
        return 0
    return int(row[0])


def _count_rows(conn: sqlite3.Connection) -> dict[str, int]:
    names = [
        r[0]
        for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' "
            "ORDER BY name"
        )
    ]
    return {
        name: int(conn.execute(f'SELECT COUNT(*) FROM "{name}"').fetchone()[0]) for name in names
    }


def _check_database(path: Path, schema: int, counts: dict[str, int]) -> list[str]:
    """Problems with a database copy: integrity, schema version, row counts."""
    problems: list[str] = []
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)
    except sqlite3.Error as exc:
        return [f"cannot open the database: {exc}"]
    try:
        result = [r[0] for r in conn.execute("PRAGMA integrity_check").fetchall()]
        if result != ["ok"]:
            problems.append("integrity_check: " + "; ".join(result[:5]))
            return problems
        found_schema = _schema_version(conn)
        if found_schema != schema:
            problems.append(f"schema version {found_schema}, manifest says {schema}")
        found = _count_rows(conn)
        for table in sorted(set(found) | set(counts)):
            if found.get(table) != counts.get(table):
                problems.append(
                    f"table {table}: {found.get(table)} rows, manifest says {counts.get(table)}"
                )
    except sqlite3.Error as exc:
        problems.append(f"cannot read the database: {exc}")
    finally:
        conn.close()
    return problems


# ---------------------------------------------------------------------- verify
def verify_backup(file: Path, key_file: Path | None = None) -> tuple[Manifest | None, list[str]]:
    """Check a backup against its manifest: checksums, integrity_check, counts, keys.

    Returns the manifest (None when unreadable) and the problems found (empty: good).
    An encrypted backup needs `key_file` (the one it was made with).
    """
    with _verified(file, key_file) as (manifest, problems, _, _):
        return manifest, problems


@contextmanager
def _verified(
    file: Path, key_file: Path | None
) -> Iterator[tuple[Manifest | None, list[str], Path | None, Path | None]]:
    """Verify FILE; yield (manifest, problems, plain database, plain identity).

    The plain files of an encrypted backup live in a private temporary directory next to
    FILE for the duration of the `with` block (a restore copies from them).
    """
    files = BackupFiles.of(file)
    try:
        manifest = Manifest.from_json(files.manifest.read_text())
    except FileNotFoundError:
        yield None, [f"no manifest {files.manifest} (incomplete backup?)"], None, None
        return
    except (OSError, ValueError, TypeError, KeyError) as exc:
        yield None, [f"unreadable manifest {files.manifest}: {exc}"], None, None
        return
    if manifest.format != FORMAT or manifest.engine != "sqlite":
        problems = [f"unsupported backup format {manifest.format}/{manifest.engine}"]
        yield manifest, problems, None, None
        return
    problems = _stored_checksum_problems(files, manifest)
    encryption = manifest.extra.get("encryption")
    if problems:
        yield manifest, problems, None, None
        return
    if encryption is None:
        problems += _check_database(files.database, manifest.schema_version, manifest.tables)
        problems += _check_identity(files.identity)
        yield manifest, problems, files.database, files.identity
        return
    if encryption != ENCRYPTION:
        yield manifest, [f"unsupported backup encryption {encryption!r}"], None, None
        return
    if key_file is None:
        yield manifest, ["the backup is encrypted: give its key file (BACKUP_KEY_FILE)"], None, None
        return
    try:
        key = load_key(key_file)
    except BackupError as exc:
        yield manifest, [str(exc)], None, None
        return
    with tempfile.TemporaryDirectory(
        dir=files.database.parent, prefix=".verify-"
    ) as scratch:  # created 0700
        plain_db = Path(scratch) / files.database.name
        plain_identity = Path(scratch) / files.identity.name
        try:
            _decrypt(files.database, plain_db, key)
            _decrypt(files.identity, plain_identity, key)
        except BackupError as exc:
            yield manifest, [str(exc)], None, None
            return
        problems += _plain_checksum_problems(manifest, plain_db, plain_identity)
        if not problems:
            problems += _check_database(plain_db, manifest.schema_version, manifest.tables)
            problems += _check_identity(plain_identity)
        yield manifest, problems, plain_db, plain_identity


def _stored_checksum_problems(files: BackupFiles, manifest: Manifest) -> list[str]:
    """The backup's files (as stored: encrypted or not) against the manifest's checksums."""
    problems: list[str] = []
    for path, expected in (
        (files.database, manifest.database),
        (files.identity, manifest.identity),
    ):
        if not path.is_file():
            problems.append(f"missing {path}")
            continue
        actual = _digest(path, expected.name)
        if actual.bytes != expected.bytes or actual.sha256 != expected.sha256:
            problems.append(
                f"{path.name}: checksum mismatch (sha256 {actual.sha256[:16]}..., "
                f"manifest {expected.sha256[:16]}...)"
            )
    return problems


def _plain_checksum_problems(manifest: Manifest, plain_db: Path, plain_identity: Path) -> list[str]:
    """An encrypted backup's decrypted files against the manifest's plain checksums."""
    problems = []
    plain = manifest.extra.get("plain") or {}
    for path, name in ((plain_db, "database"), (plain_identity, "identity")):
        want = plain.get(name) or {}
        actual = _digest(path, "")
        if (actual.sha256, actual.bytes) != (want.get("sha256"), want.get("bytes")):
            problems.append(f"decrypted {name} does not match the manifest checksum")
    return problems


def _check_identity(path: Path) -> list[str]:
    problems = []
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        problems.append(f"{path.name} holds private keys but has mode {mode:o} (want 600)")
    try:
        data = json.loads(path.read_text())
        if not (data.get("ed25519") and data.get("x25519")):
            problems.append(f"{path.name} lacks the mediator keys")
    except (OSError, ValueError, AttributeError) as exc:
        problems.append(f"{path.name} is not readable JSON: {exc}")
    return problems


# ---------------------------------------------------------------------- restore
@dataclass(frozen=True)
class Restored:
    """What a restore did."""

    manifest: Manifest
    database: Path
    identity: Path
    moved_aside: Path | None


def restore_backup(
    file: Path,
    db: Path,
    identity: Path,
    data_dir: Path,
    *,
    force: bool = False,
    key_file: Path | None = None,
) -> Restored:
    """Verify FILE (decrypting with `key_file`), then install it as `db` and `identity`.

    Refuses while a server holds `data_dir`, and holds the directory itself meanwhile so
    no server starts half-way. Existing files are never deleted: with `force` they move to
    DATA_DIR/pre-restore-<UTC time>/; without it their presence is an error.
    """
    with _verified(file, key_file) as (manifest, problems, plain_db, plain_identity):
        if manifest is None or problems or plain_db is None or plain_identity is None:
            raise BackupError("backup failed verification: " + "; ".join(problems))
        aside = _install(manifest, plain_db, plain_identity, db, identity, data_dir, force)
    log.info(
        "backup.restored",
        file=str(file),
        database=str(db),
        identity=str(identity),
        moved_aside=str(aside) if aside else None,
        created_at=_utc(manifest.created_at),
    )
    return Restored(manifest, db, identity, aside)


def _install(
    manifest: Manifest,
    plain_db: Path,
    plain_identity: Path,
    db: Path,
    identity: Path,
    data_dir: Path,
    force: bool,
) -> Path | None:
    files = BackupFiles(plain_db, plain_identity, Path())
    expected_db = (
        (manifest.extra.get("plain") or {})
        .get("database", {})
        .get("sha256", manifest.database.sha256)
    )
    with DataDirLock(data_dir).acquire("restore"):
        existing = [p for p in (db, Path(f"{db}-wal"), Path(f"{db}-shm")) if p.exists()]
        same_keys = identity.exists() and _same_keys(identity, files.identity)
        if identity.exists() and not same_keys:
            existing.append(identity)
        if existing and not force:
            raise BackupError(
                "the target already has "
                + ", ".join(str(p) for p in existing)
                + "; stop using it or pass --force to move it aside"
            )
        aside = None
        if existing:
            aside = data_dir / f"pre-restore-{_stamp(time.time())}"
            aside.mkdir(parents=True)
            for path in existing:
                shutil.move(path, aside / path.name)
        db.parent.mkdir(parents=True, exist_ok=True)
        incoming = Path(f"{db}.restoring")
        try:
            shutil.copyfile(files.database, incoming)
            os.chmod(incoming, PRIVATE)
            if _digest(incoming, "").sha256 != expected_db:
                raise BackupError(f"copy to {incoming} does not match the manifest checksum")
            _fsync(incoming)
            os.replace(incoming, db)
        finally:
            incoming.unlink(missing_ok=True)
        if not same_keys:
            write_private(identity, files.identity.read_bytes())
        _fsync_dir(db.parent)
        _fsync_dir(identity.parent)
    return aside


def _same_keys(a: Path, b: Path) -> bool:
    try:
        one, two = json.loads(a.read_text()), json.loads(b.read_text())
    except (OSError, ValueError):
        return False
    return bool(one.get("ed25519")) and all(one.get(k) == two.get(k) for k in ("ed25519", "x25519"))


# ---------------------------------------------------------------------- files
def _digest(path: Path, name: str) -> FileDigest:
    sha = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            sha.update(chunk)
            size += len(chunk)
    return FileDigest(name=name, bytes=size, sha256=sha.hexdigest())


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _utc(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _stamp(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y%m%dT%H%M%SZ")
