-- Dovecote schema v3 (PostgreSQL): who is following a room live, per instance.
--
-- A row says "this participant has a WebSocket subscribed to this room on this instance"
-- until `until`; instances refresh their rows while the subscription lasts and delete
-- them when it ends, and a crashed instance's rows simply expire. Participants without
-- a live row are offline: a post queues a notification for them in its transaction.
CREATE TABLE room_presence (
    room         TEXT NOT NULL REFERENCES rooms(id) ON DELETE CASCADE,
    participant  TEXT NOT NULL,
    instance     TEXT NOT NULL,
    until        DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (room, participant, instance)
);
CREATE INDEX room_presence_by_age ON room_presence (until);
