-- herald's tables on PostgreSQL: the same contract as on SQLite (see migrations/sqlite).

-- The outbox. A producer inserts kind, payload and, optionally, idempotency_key, ideally in
-- the same transaction as its own business write:
--   INSERT INTO herald_outbox (kind, payload, idempotency_key) VALUES ($1, $2, $3)
--   ON CONFLICT (idempotency_key) DO NOTHING;
-- A plain INSERT with a key already present is also skipped silently (trigger below); only
-- two concurrent inserts of the same new key can still make one of them fail.
CREATE TABLE herald_outbox (
    id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind            TEXT NOT NULL,
    payload         TEXT NOT NULL,
    idempotency_key TEXT UNIQUE,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    state           TEXT NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'dispatched', 'failed')),
    processed_at    TIMESTAMPTZ,
    recipients      INTEGER,
    reason          TEXT,
    -- Set while a daemon expands the row, so that daemons do not expand the same rows.
    lease_until     TIMESTAMPTZ
);

CREATE INDEX herald_outbox_pending ON herald_outbox (id) WHERE state = 'pending';

CREATE FUNCTION herald_outbox_skip_duplicate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.idempotency_key IS NOT NULL AND EXISTS (
        SELECT 1 FROM herald_outbox WHERE idempotency_key = NEW.idempotency_key
    ) THEN
        RETURN NULL;
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER herald_outbox_skip_duplicate BEFORE INSERT ON herald_outbox
    FOR EACH ROW EXECUTE FUNCTION herald_outbox_skip_duplicate();

-- Wakes idle daemons (LISTEN herald_outbox) when rows are committed: one notification per
-- statement, so a bulk insert costs one.
CREATE FUNCTION herald_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('herald_outbox', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER herald_outbox_notify AFTER INSERT ON herald_outbox
    FOR EACH STATEMENT EXECUTE FUNCTION herald_outbox_notify();

CREATE TABLE herald_deliveries (
    id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    outbox_id       BIGINT NOT NULL REFERENCES herald_outbox (id),
    kind            TEXT NOT NULL,
    audience        TEXT NOT NULL CHECK (audience IN ('provider', 'customer')),
    contact_id      TEXT NOT NULL,
    recipient_name  TEXT NOT NULL,
    recipient_email TEXT NOT NULL,
    state           TEXT NOT NULL DEFAULT 'queued'
                    CHECK (state IN ('queued', 'sent', 'retrying', 'dead')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TIMESTAMPTZ NOT NULL,
    lease_owner     TEXT,
    lease_until     TIMESTAMPTZ,
    last_error      TEXT,
    smtp_reply      TEXT,
    message_id      TEXT NOT NULL UNIQUE,
    sent_at         TIMESTAMPTZ,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- One delivery per (outbox row, notification, address), addresses compared without case.
CREATE UNIQUE INDEX herald_deliveries_unique
    ON herald_deliveries (outbox_id, audience, lower(recipient_email));

CREATE INDEX herald_deliveries_due ON herald_deliveries (next_attempt_at)
    WHERE state IN ('queued', 'retrying');

CREATE TABLE herald_companies (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE herald_contacts (
    id         TEXT PRIMARY KEY,
    company_id TEXT NOT NULL REFERENCES herald_companies (id) ON DELETE CASCADE,
    name       TEXT NOT NULL,
    email      TEXT NOT NULL,
    role       TEXT NOT NULL,
    active     BOOLEAN NOT NULL DEFAULT TRUE,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX herald_contacts_company ON herald_contacts (company_id);

CREATE TABLE herald_contact_groups (
    contact_id TEXT NOT NULL REFERENCES herald_contacts (id) ON DELETE CASCADE,
    group_name TEXT NOT NULL,
    PRIMARY KEY (contact_id, group_name)
);

-- The daemons sharing this database, each refreshing its row; the global rate limit is
-- divided among those seen recently.
CREATE TABLE herald_daemons (
    owner        TEXT PRIMARY KEY,
    heartbeat_at TIMESTAMPTZ NOT NULL
);

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
            (SELECT string_agg(d.recipient_email || ': ' || d.last_error, '; ')
             FROM herald_deliveries d WHERE d.outbox_id = o.id AND d.state = 'dead'),
            o.reason)
    END AS reason,
    (SELECT count(*) FROM herald_deliveries d WHERE d.outbox_id = o.id) AS deliveries,
    (SELECT count(*) FROM herald_deliveries d
     WHERE d.outbox_id = o.id AND d.state = 'sent') AS sent
FROM herald_outbox o;
