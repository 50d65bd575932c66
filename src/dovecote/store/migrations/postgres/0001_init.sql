-- Dovecote schema v1 (PostgreSQL). Times are UNIX seconds (DOUBLE PRECISION).

-- Who asked for mediation and what they got.
CREATE TABLE mediations (
    did          TEXT PRIMARY KEY,
    state        TEXT NOT NULL CHECK (state IN ('granted', 'denied')),
    routing_did  TEXT NOT NULL,
    created_at   DOUBLE PRECISION NOT NULL,
    updated_at   DOUBLE PRECISION NOT NULL
);

-- Recipient DIDs (or keys) a mediatee registered; forwards to them are queued.
-- COLLATE "C": pages of recipients sort bytewise, exactly as on SQLite.
CREATE TABLE recipients (
    recipient    TEXT COLLATE "C" PRIMARY KEY,
    mediatee     TEXT NOT NULL REFERENCES mediations(did),
    created_at   DOUBLE PRECISION NOT NULL
);
CREATE INDEX recipients_by_mediatee ON recipients (mediatee, recipient);

-- Running totals per mailbox, so limit checks never scan the queue.
CREATE TABLE mailboxes (
    mediatee       TEXT PRIMARY KEY,
    message_count  BIGINT NOT NULL DEFAULT 0,
    total_bytes    BIGINT NOT NULL DEFAULT 0
);

-- Queued messages: opaque encrypted bytes, removed only by ack, expiry or an operator.
CREATE TABLE messages (
    seq          BIGSERIAL PRIMARY KEY,
    id           TEXT NOT NULL UNIQUE,
    mediatee     TEXT NOT NULL,
    recipient    TEXT NOT NULL,
    body         BYTEA NOT NULL,
    size         BIGINT NOT NULL,
    received_at  DOUBLE PRECISION NOT NULL,
    expires_at   DOUBLE PRECISION NOT NULL
);
CREATE INDEX messages_by_mailbox ON messages (mediatee, seq);
CREATE INDEX messages_by_expiry ON messages (expires_at);

-- Digests of accepted messages per recipient, kept for the dedup window even after ack.
CREATE TABLE dedup (
    recipient    TEXT NOT NULL,
    digest       TEXT NOT NULL,
    message_id   TEXT NOT NULL,
    created_at   DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (recipient, digest)
);
CREATE INDEX dedup_by_age ON dedup (created_at);

-- Transactional outbox: written with the state change that caused it, drained by workers.
CREATE TABLE outbox (
    id               BIGSERIAL PRIMARY KEY,
    kind             TEXT NOT NULL,
    target           TEXT NOT NULL,
    payload          BYTEA NOT NULL,
    headers          TEXT NOT NULL DEFAULT '{}',
    dedup_key        TEXT UNIQUE,
    created_at       DOUBLE PRECISION NOT NULL,
    next_attempt_at  DOUBLE PRECISION NOT NULL,
    attempts         BIGINT NOT NULL DEFAULT 0,
    history          TEXT NOT NULL DEFAULT '[]',
    lease_owner      TEXT,
    lease_until      DOUBLE PRECISION
);
CREATE INDEX outbox_due ON outbox (kind, next_attempt_at);

-- What could not be delivered, with the reason and every attempt.
CREATE TABLE dead_letters (
    id           BIGSERIAL PRIMARY KEY,
    kind         TEXT NOT NULL,
    target       TEXT NOT NULL,
    payload      BYTEA NOT NULL,
    headers      TEXT NOT NULL DEFAULT '{}',
    reason       TEXT NOT NULL,
    history      TEXT NOT NULL DEFAULT '[]',
    created_at   DOUBLE PRECISION NOT NULL,
    dead_at      DOUBLE PRECISION NOT NULL
);
CREATE INDEX dead_letters_by_age ON dead_letters (dead_at);

-- Cluster view: every instance heartbeats here.
CREATE TABLE instances (
    id           TEXT PRIMARY KEY,
    host         TEXT NOT NULL,
    version      TEXT NOT NULL,
    started_at   DOUBLE PRECISION NOT NULL,
    last_beat    DOUBLE PRECISION NOT NULL,
    level        TEXT NOT NULL,
    connections  BIGINT NOT NULL DEFAULT 0
);
