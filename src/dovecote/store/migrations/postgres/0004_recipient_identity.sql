-- One owner per identity: a recipient is its base DID (the DID URL before any '/', '?'
-- or '#'). Rows registered as DID URLs become their base DID; where several mediatees
-- registered forms of one DID, the first registration (oldest, then smallest form) keeps
-- it and the others move to recipient_conflicts for the operator
-- (`dovecote recipients conflicts`, and a warning at every start while any remain).

CREATE TABLE recipient_conflicts (
    recipient    TEXT COLLATE "C" PRIMARY KEY,
    base         TEXT COLLATE "C" NOT NULL,
    mediatee     TEXT NOT NULL,
    owner        TEXT NOT NULL,
    created_at   DOUBLE PRECISION NOT NULL,
    found_at     DOUBLE PRECISION NOT NULL
);

CREATE TEMPORARY TABLE recipient_forms ON COMMIT DROP AS
SELECT recipient AS form,
       CASE WHEN recipient LIKE 'did:%' THEN substring(recipient FROM '^[^/?#]*')
            ELSE recipient END AS base,
       mediatee, created_at,
       row_number() OVER (
           PARTITION BY CASE WHEN recipient LIKE 'did:%'
                             THEN substring(recipient FROM '^[^/?#]*') ELSE recipient END
           ORDER BY created_at, recipient) AS rank
FROM recipients;

DELETE FROM recipients;

INSERT INTO recipients (recipient, mediatee, created_at)
SELECT base, mediatee, created_at FROM recipient_forms WHERE rank = 1;

INSERT INTO recipient_conflicts (recipient, base, mediatee, owner, created_at, found_at)
SELECT f.form, f.base, f.mediatee, n.mediatee, f.created_at, extract(epoch FROM now())
FROM recipient_forms f JOIN recipients n ON n.recipient = f.base
WHERE f.mediatee <> n.mediatee;
