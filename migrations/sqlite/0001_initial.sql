-- herald's tables on SQLite. Times are UTC text in one fixed format
-- (2026-12-04T15:26:07.123Z), so they sort and compare as text and read plainly in SQL.
-- Tables are STRICT: a producer or portal that writes a value of the wrong type (a BLOB
-- payload, active = 'yes') gets an error at once instead of leaving a row herald cannot read.

-- The outbox. A producer inserts kind, payload and, optionally, idempotency_key; a second
-- insert with a key already present is silently ignored (UNIQUE ... ON CONFLICT IGNORE), so
-- the producer sees no error and no second email is ever planned.
CREATE TABLE herald_outbox (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    kind            TEXT NOT NULL,
    payload         TEXT NOT NULL,
    idempotency_key TEXT UNIQUE ON CONFLICT IGNORE,
    created_at      TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    -- The daemon's part: pending (not yet expanded), dispatched (its deliveries are in
    -- herald_deliveries) or failed (the payload was refused; reason says why).
    state           TEXT NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'dispatched', 'failed')),
    processed_at    TEXT,
    recipients      INTEGER,
    reason          TEXT,
    -- Set while a daemon expands the row, so that daemons do not expand the same rows.
    lease_until     TEXT
) STRICT;

CREATE INDEX herald_outbox_pending ON herald_outbox (id) WHERE state = 'pending';

-- One row per (outbox row, notification, recipient address). The unique key makes a second
-- delivery of the same notification to the same address impossible, whoever plans it.
CREATE TABLE herald_deliveries (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    outbox_id       INTEGER NOT NULL REFERENCES herald_outbox (id),
    kind            TEXT NOT NULL,
    audience        TEXT NOT NULL CHECK (audience IN ('provider', 'customer')),
    contact_id      TEXT NOT NULL,
    recipient_name  TEXT NOT NULL,
    recipient_email TEXT NOT NULL COLLATE NOCASE,
    state           TEXT NOT NULL DEFAULT 'queued'
                    CHECK (state IN ('queued', 'sent', 'retrying', 'dead')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TEXT NOT NULL,
    -- Which daemon holds the delivery while sending it, and until when.
    lease_owner     TEXT,
    lease_until     TEXT,
    last_error      TEXT,
    smtp_reply      TEXT,
    -- Chosen when the delivery is planned, so every attempt carries the same Message-ID.
    message_id      TEXT NOT NULL UNIQUE,
    sent_at         TEXT,
    created_at      TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    updated_at      TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    UNIQUE (outbox_id, audience, recipient_email)
) STRICT;

CREATE INDEX herald_deliveries_due ON herald_deliveries (next_attempt_at)
    WHERE state IN ('queued', 'retrying');

-- The directory, written by the portal or by `herald directory import`.
CREATE TABLE herald_companies (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    updated_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
) STRICT;

CREATE TABLE herald_contacts (
    id         TEXT PRIMARY KEY,
    company_id TEXT NOT NULL REFERENCES herald_companies (id) ON DELETE CASCADE,
    name       TEXT NOT NULL,
    email      TEXT NOT NULL,
    role       TEXT NOT NULL,
    active     INTEGER NOT NULL DEFAULT 1 CHECK (active IN (0, 1)),
    updated_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
) STRICT;

CREATE INDEX herald_contacts_company ON herald_contacts (company_id);

CREATE TABLE herald_contact_groups (
    contact_id TEXT NOT NULL REFERENCES herald_contacts (id) ON DELETE CASCADE,
    group_name TEXT NOT NULL,
    PRIMARY KEY (contact_id, group_name)
) STRICT;

-- The daemons sharing this database, each refreshing its row; the global rate limit is
-- divided among those seen recently.
CREATE TABLE herald_daemons (
    owner        TEXT PRIMARY KEY,
    heartbeat_at TEXT NOT NULL
) STRICT;

-- Per outbox row, the whole story: pending, done or failed, and why.
CREATE VIEW herald_outbox_status AS
SELECT
    o.id,
    o.kind,
    o.created_at,
    CASE
        WHEN o.state = 'failed' THEN 'failed'
        WHEN o.state = 'pending' THEN 'pending'
        WHEN EXISTS (SELECT 1 FROM herald_deliveries d
                     WHERE d.outbox_id = o.id AND d.state IN ('queued', 'retrying')) THEN 'pending'
        WHEN EXISTS (SELECT 1 FROM herald_deliveries d
                     WHERE d.outbox_id = o.id AND d.state = 'dead') THEN 'failed'
        ELSE 'done'
    END AS status,
    CASE
        WHEN o.state = 'failed' THEN o.reason
        ELSE coalesce(
            (SELECT group_concat(d.recipient_email || ': ' || d.last_error, '; ')
             FROM herald_deliveries d WHERE d.outbox_id = o.id AND d.state = 'dead'),
            o.reason)
    END AS reason,
    (SELECT count(*) FROM herald_deliveries d WHERE d.outbox_id = o.id) AS deliveries,
    (SELECT count(*) FROM herald_deliveries d
     WHERE d.outbox_id = o.id AND d.state = 'sent') AS sent
FROM herald_outbox o;
