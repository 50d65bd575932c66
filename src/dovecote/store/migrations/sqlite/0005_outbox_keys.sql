-- Dovecote schema v5 (sqlite): outbox dedup keys that outlive their item.
--
-- A dead letter keeps its item's dedup key, so a replayed notification still coalesces
-- with a pending one and a replayed relay cannot be queued beside an identical one.
ALTER TABLE dead_letters ADD COLUMN dedup_key TEXT;

-- Keys of relayed forwards, remembered for the dedup window after the item left the
-- outbox (delivered or dead), as the dedup table remembers a mailbox forward's digest.
CREATE TABLE outbox_keys (
    dedup_key    TEXT PRIMARY KEY,
    created_at   REAL NOT NULL
);
CREATE INDEX outbox_keys_by_age ON outbox_keys (created_at);
