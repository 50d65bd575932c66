-- Dovecote schema v1 (SQLite). Times are UNIX seconds (REAL).

-- Who asked for mediation and what they got.
CREATE TABLE mediations (
    did          TEXT PRIMARY KEY,
    state        TEXT NOT NULL CHECK (state IN ('granted', 'denied')),
    routing_did  TEXT NOT NULL,
    created_at   REAL NOT NULL,
    updated_at   REAL NOT NULL
);

-- Recipient DIDs (or keys) a mediatee registered; forwards to them are queued.
CREATE TABLE recipients (
    recipient    TEXT PRIMARY KEY,
    mediatee     TEXT NOT NULL REFERENCES mediations(did),
    created_at   REAL NOT NULL
);
CREATE INDEX recipients_by_mediatee ON recipients (mediatee, recipient);

-- Running totals per mailbox, so limit checks never scan the queue.
CREATE TABLE mailboxes (
    mediatee       TEXT PRIMARY KEY,
    message_count  INTEGER NOT NULL DEFAULT 0,
    total_bytes    INTEGER NOT NULL DEFAULT 0
);

-- Queued messages: opaque encrypted bytes, removed only by ack, expiry or an operator.
CREATE TABLE messages (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    id           TEXT NOT NULL UNIQUE,
    mediatee     TEXT NOT NULL,
    recipient    TEXT NOT NULL,
    body         BLOB NOT NULL,
    size         INTEGER NOT NULL,
    received_at  REAL NOT NULL,
    expires_at   REAL NOT NULL
);
CREATE INDEX messages_by_mailbox ON messages (mediatee, seq);
CREATE INDEX messages_by_expiry ON messages (expires_at);

-- Digests of accepted messages per recipient, kept for the dedup window even after ack.
CREATE TABLE dedup (
    recipient    TEXT NOT NULL,
    digest       TEXT NOT NULL,
    message_id   TEXT NOT NULL,
    created_at   REAL NOT NULL,
    PRIMARY KEY (recipient, digest)
);
CREATE INDEX dedup_by_age ON dedup (created_at);

-- Transactional outbox: written with the state change that caused it, drained by workers.
CREATE TABLE outbox (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    kind             TEXT NOT NULL,
    target           TEXT NOT NULL,
    payload          BLOB NOT NULL,
    headers          TEXT NOT NULL DEFAULT '{}',
    dedup_key        TEXT UNIQUE,
    created_at       REAL NOT NULL,
    next_attempt_at  REAL NOT NULL,
    attempts         INTEGER NOT NULL DEFAULT 0,
    history          TEXT NOT NULL DEFAULT '[]',
    lease_owner      TEXT,
    lease_until      REAL
);
CREATE INDEX outbox_due ON outbox (kind, next_attempt_at);

-- What could not be delivered, with the reason and every attempt.
CREATE TABLE dead_letters (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    kind         TEXT NOT NULL,
    target       TEXT NOT NULL,
    payload      BLOB NOT NULL,
    headers      TEXT NOT NULL DEFAULT '{}',
    reason       TEXT NOT NULL,
    history      TEXT NOT NULL DEFAULT '[]',
    created_at   REAL NOT NULL,
    dead_at      REAL NOT NULL
);
CREATE INDEX dead_letters_by_age ON dead_letters (dead_at);

-- Cluster view: every instance heartbeats here.
CREATE TABLE instances (
    id           TEXT PRIMARY KEY,
    host         TEXT NOT NULL,
    version      TEXT NOT NULL,
    started_at   REAL NOT NULL,
    last_beat    REAL NOT NULL,
    level        TEXT NOT NULL,
    connections  INTEGER NOT NULL DEFAULT 0
);
