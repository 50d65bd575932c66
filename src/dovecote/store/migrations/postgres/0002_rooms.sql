-- Dovecote schema v2 (PostgreSQL): rooms. Times are UNIX seconds (DOUBLE PRECISION).
--
-- Every change to a room is a row in room_events with the next per-room seq, taken from
-- rooms.last_seq in the same transaction that stores the event, so history and live
-- delivery are one gap-free ordered stream. room_messages and room_reactions hold the
-- current state that the events describe.

-- One room; last_seq is the per-room event counter.
CREATE TABLE rooms (
    id           TEXT PRIMARY KEY,
    name         TEXT NOT NULL,
    metadata     TEXT NOT NULL DEFAULT '{}',
    created_by   TEXT NOT NULL,
    created_at   DOUBLE PRECISION NOT NULL,
    last_seq     BIGINT NOT NULL DEFAULT 0
);

-- Who is in a room and with which role; read on every call, so changes apply at once.
CREATE TABLE room_participants (
    room         TEXT NOT NULL REFERENCES rooms(id) ON DELETE CASCADE,
    participant  TEXT NOT NULL,
    role         TEXT NOT NULL CHECK (role IN ('member', 'moderator', 'admin')),
    added_at     DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (room, participant)
);
CREATE INDEX room_participants_by_participant ON room_participants (participant, room);

-- The ordered event stream of each room (messages, edits, deletes, reactions, members).
CREATE TABLE room_events (
    room         TEXT NOT NULL REFERENCES rooms(id) ON DELETE CASCADE,
    seq          BIGINT NOT NULL,
    id           TEXT NOT NULL UNIQUE,
    type         TEXT NOT NULL,
    actor        TEXT NOT NULL,
    message_id   TEXT,
    data         TEXT NOT NULL DEFAULT '{}',
    created_at   DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (room, seq)
);
CREATE INDEX room_events_by_message ON room_events (message_id);

-- Current state of each message; content becomes NULL when a deleted message is purged.
CREATE TABLE room_messages (
    id           TEXT PRIMARY KEY,
    room         TEXT NOT NULL REFERENCES rooms(id) ON DELETE CASCADE,
    seq          BIGINT NOT NULL,
    author       TEXT NOT NULL,
    content      TEXT,
    created_at   DOUBLE PRECISION NOT NULL,
    edited_at    DOUBLE PRECISION,
    deleted_at   DOUBLE PRECISION,
    purged_at    DOUBLE PRECISION
);
CREATE INDEX room_messages_by_room ON room_messages (room, seq);
CREATE INDEX room_messages_to_purge ON room_messages (deleted_at)
    WHERE deleted_at IS NOT NULL AND purged_at IS NULL;

-- Reactions are a set: one row per (message, participant, emoji), added or removed in one
-- statement, so concurrent updates never lose one.
CREATE TABLE room_reactions (
    message_id   TEXT NOT NULL REFERENCES room_messages(id) ON DELETE CASCADE,
    participant  TEXT NOT NULL,
    emoji        TEXT NOT NULL,
    created_at   DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (message_id, participant, emoji)
);

-- Idempotency keys of posts, kept 24 h: a retry returns the original message.
CREATE TABLE room_idempotency (
    room          TEXT NOT NULL REFERENCES rooms(id) ON DELETE CASCADE,
    participant   TEXT NOT NULL,
    key           TEXT NOT NULL,
    request_hash  TEXT NOT NULL,
    message_id    TEXT NOT NULL,
    created_at    DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (room, participant, key)
);
CREATE INDEX room_idempotency_by_age ON room_idempotency (created_at);
