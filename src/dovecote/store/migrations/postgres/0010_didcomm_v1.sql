-- DIDComm v1 (Aries) connections: one row per peer verkey that completed DID Exchange.
-- Mediation grants and keylists of v1 peers live in `mediations` / `recipients` under
-- the peer's did:key, so v1 mailboxes share limits, TTL, dedup and dead letters with v2.
CREATE TABLE v1_connections (
    their_verkey     TEXT PRIMARY KEY,
    connection_id    TEXT NOT NULL UNIQUE,
    their_did        TEXT NOT NULL,
    protocol         TEXT NOT NULL,
    state            TEXT NOT NULL,
    endpoint         TEXT NOT NULL DEFAULT '',
    routing_keys     TEXT NOT NULL DEFAULT '[]',
    device           TEXT NOT NULL DEFAULT '{}',
    created_at       DOUBLE PRECISION NOT NULL,
    updated_at       DOUBLE PRECISION NOT NULL
);
