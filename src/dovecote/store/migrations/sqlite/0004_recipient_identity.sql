-- One owner per identity: a recipient is its base DID (the DID URL before any '/', '?'
-- or '#'). Rows registered as DID URLs become their base DID; where several mediatees
-- registered forms of one DID, the first registration (oldest, then earliest row) keeps
-- it and the others move to recipient_conflicts for the operator
-- (`dovecote recipients conflicts`, and a warning at every start while any remain).

CREATE TABLE recipient_conflicts (
    recipient    TEXT PRIMARY KEY,
    base         TEXT NOT NULL,
    mediatee     TEXT NOT NULL,
    owner        TEXT NOT NULL,
    created_at   REAL NOT NULL,
    found_at     REAL NOT NULL
);

CREATE TABLE recipient_forms AS
SELECT recipient AS form,
       CASE WHEN recipient LIKE 'did:%' THEN substr(recipient, 1, min(
           coalesce(nullif(instr(recipient, '/'), 0), length(recipient) + 1),
           coalesce(nullif(instr(recipient, '?'), 0), length(recipient) + 1),
           coalesce(nullif(instr(recipient, '#'), 0), length(recipient) + 1)) - 1)
       ELSE recipient END AS base,
       mediatee, created_at, rowid AS ord
FROM recipients;

CREATE TABLE recipients_v4 (
    recipient    TEXT PRIMARY KEY,
    mediatee     TEXT NOT NULL REFERENCES mediations(did),
    created_at   REAL NOT NULL
);

INSERT INTO recipients_v4 (recipient, mediatee, created_at)
SELECT f.base, f.mediatee, f.created_at FROM recipient_forms f
WHERE NOT EXISTS (
    SELECT 1 FROM recipient_forms g
    WHERE g.base = f.base
      AND (g.created_at < f.created_at OR (g.created_at = f.created_at AND g.ord < f.ord))
);

INSERT INTO recipient_conflicts (recipient, base, mediatee, owner, created_at, found_at)
SELECT f.form, f.base, f.mediatee, n.mediatee, f.created_at,
       (julianday('now') - 2440587.5) * 86400.0
FROM recipient_forms f JOIN recipients_v4 n ON n.recipient = f.base
WHERE f.mediatee <> n.mediatee;

DROP TABLE recipients;
ALTER TABLE recipients_v4 RENAME TO recipients;
CREATE INDEX recipients_by_mediatee ON recipients (mediatee, recipient);
DROP TABLE recipient_forms;
