//! The embedded backend: one SQLite file in WAL mode. SQLite has no row locks, so every write
//! transaction starts with `BEGIN IMMEDIATE` (taking the write lock up front instead of failing
//! on upgrade), and claims are single `UPDATE … RETURNING` statements.

use std::str::FromStr;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};
use tokio::sync::Notify;

use super::{
    AttemptRecord, ClaimedDelivery, ImportSummary, OutboxDecision, PAYLOAD_READ_LIMIT,
    RECORD_ATTEMPTS_SET, RequeueRequest, RequeueSummary, StatusReport, Store, StoreError,
    format_timestamp, parse_audience, parse_timestamp, recorded_among,
};
use crate::directory::{Contact, DirectoryFile};
use crate::outbox::OutboxEvent;

/// How long a writer waits for another connection's write lock before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    /// Opens (creating if needed) the database at a `sqlite://PATH` URL.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::open(url, true).await
    }

    /// Opens the database at a `sqlite://PATH` URL, failing if the file does not exist.
    pub async fn connect_existing(url: &str) -> Result<Self, StoreError> {
        Self::open(url, false).await
    }

    async fn open(url: &str, create: bool) -> Result<Self, StoreError> {
        let connect_error = |source| StoreError::Connect {
            url: url.to_string(),
            source,
        };
        let options = SqliteConnectOptions::from_str(url)
            .map_err(connect_error)?
            .create_if_missing(create)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT);
        let folder = options
            .get_filename()
            .parent()
            .map(std::path::Path::to_path_buf);
        if let Some(folder) = folder.filter(|f| create && !f.as_os_str().is_empty()) {
            std::fs::create_dir_all(&folder).map_err(|err| connect_error(sqlx::Error::Io(err)))?;
        }
        // A connection to a local file cannot be closed from the other end: no check before
        // use, which would cost a trip to the database thread per statement.
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .test_before_acquire(false)
            .connect_with(options)
            .await
            .map_err(connect_error)?;
        Ok(Self { pool })
    }

    /// The pool, for tests and tools that inspect the tables directly.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }
}

/// A contact row as read: id, name, email and role as raw bytes, and whether it is active.
type StoredContact = (Vec<u8>, Vec<u8>, Vec<u8>, Vec<u8>, bool);

/// Text as stored, even if it is not valid UTF-8 (SQLite does not check): a bad byte must not
/// make a whole table unreadable. Callers validate what they read.
fn lossy(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes)
        .unwrap_or_else(|err| String::from_utf8_lossy(err.as_bytes()).into_owned())
}

impl Store for SqliteStore {
    async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::migrate!("migrations/sqlite").run(&self.pool).await?;
        Ok(())
    }

    async fn enqueue(
        &self,
        kind: &str,
        payload: &str,
        idempotency_key: Option<&str>,
    ) -> Result<Option<i64>, StoreError> {
        let row = sqlx::query(
            "INSERT INTO herald_outbox (kind, payload, idempotency_key) VALUES ($1, $2, $3)
             RETURNING id",
        )
        .bind(kind)
        .bind(payload)
        .bind(idempotency_key)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|row| row.get(0)))
    }

    async fn replace_directory(&self, file: &DirectoryFile) -> Result<ImportSummary, StoreError> {
        let now = format_timestamp(Utc::now());
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let mut summary = ImportSummary::default();
        let mut company_ids = Vec::new();
        let mut contact_ids = Vec::new();

        for company in &file.companies {
            sqlx::query(
                "INSERT INTO herald_companies (id, name, updated_at) VALUES ($1, $2, $3)
                 ON CONFLICT (id) DO UPDATE SET name = excluded.name, updated_at = excluded.updated_at",
            )
            .bind(&company.id)
            .bind(&company.name)
            .bind(&now)
            .execute(&mut *tx)
            .await?;
            company_ids.push(company.id.as_str());
            summary.companies += 1;

            for contact in &company.contacts {
                sqlx::query(
                    "INSERT INTO herald_contacts (id, company_id, name, email, role, active, updated_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7)
                     ON CONFLICT (id) DO UPDATE SET company_id = excluded.company_id,
                        name = excluded.name, email = excluded.email, role = excluded.role,
                        active = excluded.active, updated_at = excluded.updated_at",
                )
                .bind(&contact.id)
                .bind(&company.id)
                .bind(&contact.name)
                .bind(&contact.email)
                .bind(&contact.role)
                .bind(contact.active)
                .bind(&now)
                .execute(&mut *tx)
                .await?;
                sqlx::query("DELETE FROM herald_contact_groups WHERE contact_id = $1")
                    .bind(&contact.id)
                    .execute(&mut *tx)
                    .await?;
                for group in &contact.groups {
                    sqlx::query(
                        "INSERT OR IGNORE INTO herald_contact_groups (contact_id, group_name)
                         VALUES ($1, $2)",
                    )
                    .bind(&contact.id)
                    .bind(group)
                    .execute(&mut *tx)
                    .await?;
                }
                contact_ids.push(contact.id.as_str());
                summary.contacts += 1;
            }
        }

        let keep_contacts = serde_json::to_string(&contact_ids).expect("strings serialise");
        summary.contacts_removed = sqlx::query(
            "DELETE FROM herald_contacts WHERE id NOT IN (SELECT value FROM json_each($1))",
        )
        .bind(keep_contacts)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let keep_companies = serde_json::to_string(&company_ids).expect("strings serialise");
        summary.companies_removed = sqlx::query(
            "DELETE FROM herald_companies WHERE id NOT IN (SELECT value FROM json_each($1))",
        )
        .bind(keep_companies)
        .execute(&mut *tx)
        .await?
        .rows_affected();

        tx.commit().await?;
        Ok(summary)
    }

    async fn company_contacts(&self, company_id: &str) -> Result<Option<Vec<Contact>>, StoreError> {
        let known = sqlx::query("SELECT 1 FROM herald_companies WHERE id = $1")
            .bind(company_id)
            .fetch_optional(&self.pool)
            .await?;
        if known.is_none() {
            return Ok(None);
        }
        // Text is read as bytes and the flag as a comparison, so that one badly written
        // contact (invalid UTF-8, `active = 'yes'`) cannot make the company unreadable;
        // recipient selection then judges each contact on its own.
        let rows: Vec<StoredContact> = sqlx::query_as(
            "SELECT CAST(id AS BLOB), CAST(name AS BLOB), CAST(email AS BLOB),
                    CAST(role AS BLOB), active IS 1
             FROM herald_contacts WHERE company_id = $1 ORDER BY id",
        )
        .bind(company_id)
        .fetch_all(&self.pool)
        .await?;
        let memberships: Vec<(Vec<u8>, Vec<u8>)> = sqlx::query_as(
            "SELECT CAST(g.contact_id AS BLOB), CAST(g.group_name AS BLOB)
             FROM herald_contact_groups g JOIN herald_contacts c ON c.id = g.contact_id
             WHERE c.company_id = $1",
        )
        .bind(company_id)
        .fetch_all(&self.pool)
        .await?;
        let mut contacts: Vec<Contact> = rows
            .into_iter()
            .map(|(id, name, email, role, active)| Contact {
                id: lossy(id),
                name: lossy(name),
                email: lossy(email),
                role: lossy(role),
                active,
                groups: Default::default(),
            })
            .collect();
        let index: std::collections::HashMap<String, usize> = contacts
            .iter()
            .enumerate()
            .map(|(i, c)| (c.id.clone(), i))
            .collect();
        for (contact_id, group) in memberships {
            if let Some(&i) = index.get(&lossy(contact_id)) {
                contacts[i].groups.insert(lossy(group));
            }
        }
        Ok(Some(contacts))
    }

    async fn claim_outbox(
        &self,
        limit: u32,
        lease: Duration,
        now: DateTime<Utc>,
    ) -> Result<Vec<OutboxEvent>, StoreError> {
        let rows: Vec<(i64, Vec<u8>, Vec<u8>)> = sqlx::query_as(
            "UPDATE herald_outbox SET lease_until = $2
             WHERE id IN (
                SELECT id FROM herald_outbox
                WHERE state = 'pending' AND (lease_until IS NULL OR lease_until <= $1)
                ORDER BY id LIMIT $3)
             RETURNING id, CAST(kind AS BLOB), substr(CAST(payload AS BLOB), 1, $4)",
        )
        .bind(format_timestamp(now))
        .bind(format_timestamp(now + lease))
        .bind(limit)
        .bind(PAYLOAD_READ_LIMIT as i64)
        .fetch_all(&self.pool)
        .await?;
        let mut events: Vec<OutboxEvent> = rows
            .into_iter()
            .map(|(id, kind, payload)| OutboxEvent {
                id,
                kind: lossy(kind),
                payload,
            })
            .collect();
        events.sort_by_key(|event| event.id);
        Ok(events)
    }

    async fn record_decisions(
        &self,
        decisions: &[(i64, OutboxDecision)],
        now: DateTime<Utc>,
    ) -> Result<Vec<bool>, StoreError> {
        let now = format_timestamp(now);
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let mut recorded = Vec::with_capacity(decisions.len());
        for (outbox_id, decision) in decisions {
            let outbox_id = *outbox_id;
            let (state, recipients, reason) = decision.columns();
            let updated = sqlx::query(
                "UPDATE herald_outbox
             SET state = $1, processed_at = $2, recipients = $3, reason = $4, lease_until = NULL
             WHERE id = $5 AND state = 'pending'",
            )
            .bind(state)
            .bind(&now)
            .bind(recipients)
            .bind(reason)
            .bind(outbox_id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            recorded.push(updated == 1);
            if updated == 0 {
                continue;
            }

            if let OutboxDecision::Dispatched { deliveries, .. } = decision {
                for delivery in deliveries {
                    sqlx::query(
                        "INSERT INTO herald_deliveries (outbox_id, kind, audience, contact_id,
                        recipient_name, recipient_email, message_id, next_attempt_at,
                        created_at, updated_at, state, last_error)
                     SELECT id, kind, $2, $3, $4, $5, $6, $7, $7, $7,
                        CASE WHEN $8 IS NULL THEN 'queued' ELSE 'dead' END, $8
                     FROM herald_outbox WHERE id = $1
                     ON CONFLICT DO NOTHING",
                    )
                    .bind(outbox_id)
                    .bind(delivery.audience.as_str())
                    .bind(&delivery.contact_id)
                    .bind(&delivery.recipient_name)
                    .bind(&delivery.recipient_email)
                    .bind(&delivery.message_id)
                    .bind(&now)
                    .bind(&delivery.dead)
                    .execute(&mut *tx)
                    .await?;
                }
            }
        }
        tx.commit().await?;
        Ok(recorded)
    }

    async fn claim_deliveries(
        &self,
        owner: &str,
        limit: u32,
        lease: Duration,
        now: DateTime<Utc>,
    ) -> Result<Vec<ClaimedDelivery>, StoreError> {
        let lease_until = now + lease;
        let rows = sqlx::query(
            "UPDATE herald_deliveries
             SET lease_owner = $1, lease_until = $2, updated_at = $3
             WHERE id IN (
                SELECT id FROM herald_deliveries
                WHERE state IN ('queued', 'retrying') AND next_attempt_at <= $3
                  AND (lease_until IS NULL OR lease_until <= $3)
                ORDER BY next_attempt_at, id
                LIMIT $4)
             RETURNING id, outbox_id, kind, audience, contact_id, recipient_name,
                recipient_email, attempts, message_id,
                (SELECT substr(CAST(payload AS BLOB), 1, $5) FROM herald_outbox o
                 WHERE o.id = outbox_id),
                last_error, coalesce(queued_at, created_at)",
        )
        .bind(owner)
        .bind(format_timestamp(lease_until))
        .bind(format_timestamp(now))
        .bind(limit)
        .bind(PAYLOAD_READ_LIMIT as i64)
        .fetch_all(&self.pool)
        .await?;
        let mut claimed = rows
            .into_iter()
            .map(|row| {
                Ok(ClaimedDelivery {
                    id: row.try_get(0)?,
                    outbox_id: row.try_get(1)?,
                    kind: row.try_get(2)?,
                    audience: parse_audience(row.try_get(3)?)?,
                    contact_id: row.try_get(4)?,
                    recipient_name: row.try_get(5)?,
                    recipient_email: row.try_get(6)?,
                    attempts: row.try_get(7)?,
                    message_id: row.try_get(8)?,
                    payload: row.try_get(9)?,
                    last_error: row.try_get(10)?,
                    queued_at: parse_timestamp(row.try_get(11)?)?,
                    lease_until,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        // RETURNING gives rows in no promised order; send in the order they came due.
        claimed.sort_by_key(|delivery| delivery.id);
        Ok(claimed)
    }

    async fn record_attempts(
        &self,
        owner: &str,
        attempts: &[(i64, AttemptRecord)],
        now: DateTime<Utc>,
    ) -> Result<Vec<bool>, StoreError> {
        if attempts.is_empty() {
            return Ok(Vec::new());
        }
        // One statement for the batch (the records passed as a JSON array): a single trip to
        // the database thread and one commit however many there are.
        let records: Vec<serde_json::Value> = attempts
            .iter()
            .map(|(delivery_id, record)| {
                let columns = record.columns();
                serde_json::json!([
                    delivery_id,
                    columns.state,
                    columns.attempts_added,
                    columns.last_error,
                    columns.smtp_reply,
                    columns.sent_at.map(format_timestamp),
                    columns.next_attempt_at.map(format_timestamp),
                ])
            })
            .collect();
        static RECORD: LazyLock<String> = LazyLock::new(|| {
            format!(
                "UPDATE herald_deliveries AS d SET {RECORD_ATTEMPTS_SET}, updated_at = $3
                 FROM (SELECT value ->> 0 AS id, value ->> 1 AS state,
                              value ->> 2 AS attempts_added, value ->> 3 AS last_error,
                              value ->> 4 AS smtp_reply, value ->> 5 AS sent_at,
                              value ->> 6 AS next_attempt_at
                       FROM json_each($2)) AS a
                 WHERE d.id = a.id AND d.lease_owner = $1
                 RETURNING id"
            )
        });
        let updated: Vec<i64> = sqlx::query_scalar(RECORD.as_str())
            .bind(owner)
            .bind(serde_json::Value::Array(records).to_string())
            .bind(format_timestamp(now))
            .fetch_all(&self.pool)
            .await?;
        Ok(recorded_among(attempts, &updated))
    }

    async fn postpone(
        &self,
        owner: &str,
        deliveries: &[(i64, DateTime<Utc>)],
    ) -> Result<(), StoreError> {
        if deliveries.is_empty() {
            return Ok(());
        }
        let due: Vec<(i64, String)> = deliveries
            .iter()
            .map(|(id, at)| (*id, format_timestamp(*at)))
            .collect();
        sqlx::query(
            "UPDATE herald_deliveries
             SET next_attempt_at = due.value ->> 1, lease_owner = NULL, lease_until = NULL
             FROM json_each($2) AS due
             WHERE lease_owner = $1 AND herald_deliveries.id = due.value ->> 0",
        )
        .bind(owner)
        .bind(serde_json::to_string(&due).expect("pairs serialise"))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn requeue(
        &self,
        request: RequeueRequest,
        now: DateTime<Utc>,
    ) -> Result<RequeueSummary, StoreError> {
        let now = format_timestamp(now);
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let deliveries = if request.dead {
            sqlx::query(
                "UPDATE herald_deliveries
                 SET state = 'queued', attempts = 0, next_attempt_at = $1, queued_at = $1,
                     updated_at = $1
                 WHERE state = 'dead' AND ($2 IS NULL OR outbox_id = $2)
                   AND ($3 IS NULL OR id = $3)",
            )
        } else {
            sqlx::query(
                "UPDATE herald_deliveries SET next_attempt_at = $1, updated_at = $1
                 WHERE state = 'retrying' AND ($2 IS NULL OR outbox_id = $2)
                   AND ($3 IS NULL OR id = $3)",
            )
        }
        .bind(&now)
        .bind(request.event)
        .bind(request.delivery)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let events = if request.dead && request.delivery.is_none() {
            sqlx::query(
                "UPDATE herald_outbox
                 SET state = 'pending', processed_at = NULL, reason = NULL, lease_until = NULL
                 WHERE state = 'failed' AND ($1 IS NULL OR id = $1)",
            )
            .bind(request.event)
            .execute(&mut *tx)
            .await?
            .rows_affected()
        } else {
            0
        };
        tx.commit().await?;
        Ok(RequeueSummary { deliveries, events })
    }

    async fn release(&self, owner: &str, delivery_ids: &[i64]) -> Result<(), StoreError> {
        if delivery_ids.is_empty() {
            return Ok(());
        }
        let ids = serde_json::to_string(delivery_ids).expect("integers serialise");
        sqlx::query(
            "UPDATE herald_deliveries SET lease_owner = NULL, lease_until = NULL
             WHERE lease_owner = $1 AND id IN (SELECT value FROM json_each($2))",
        )
        .bind(owner)
        .bind(ids)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn delivery_state(&self, delivery_id: i64) -> Result<Option<String>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT state FROM herald_deliveries WHERE id = $1")
                .bind(delivery_id)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    async fn next_due(&self) -> Result<Option<DateTime<Utc>>, StoreError> {
        let next: Option<String> = sqlx::query_scalar(
            "SELECT min(max(next_attempt_at, coalesce(lease_until, '')))
             FROM herald_deliveries WHERE state IN ('queued', 'retrying')",
        )
        .fetch_one(&self.pool)
        .await?;
        next.as_deref().map(parse_timestamp).transpose()
    }

    async fn status(&self) -> Result<StatusReport, StoreError> {
        let outbox = sqlx::query_as(
            "SELECT state, count(*) FROM herald_outbox GROUP BY state ORDER BY state",
        )
        .fetch_all(&self.pool)
        .await?;
        let deliveries = sqlx::query_as(
            "SELECT state, count(*) FROM herald_deliveries GROUP BY state ORDER BY state",
        )
        .fetch_all(&self.pool)
        .await?;
        let oldest: Option<String> = sqlx::query_scalar(
            "SELECT min(created_at) FROM (
                SELECT created_at FROM herald_outbox WHERE state = 'pending'
                UNION ALL
                SELECT coalesce(queued_at, created_at) FROM herald_deliveries WHERE state IN ('queued', 'retrying'))",
        )
        .fetch_one(&self.pool)
        .await?;
        let recent_failures = sqlx::query_as(
            "SELECT what, reason FROM (
                SELECT 'outbox ' || id || ' (' || kind || ')' AS what, reason,
                       processed_at AS at
                FROM herald_outbox WHERE state = 'failed'
                UNION ALL
                SELECT 'delivery ' || id || ' to ' || recipient_email || ' (outbox ' || outbox_id || ')',
                       last_error, updated_at
                FROM herald_deliveries WHERE state = 'dead')
             ORDER BY at DESC, what DESC LIMIT 20",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(StatusReport {
            outbox,
            deliveries,
            oldest_pending: oldest.as_deref().map(parse_timestamp).transpose()?,
            recent_failures,
        })
    }

    async fn heartbeat(
        &self,
        owner: &str,
        now: DateTime<Utc>,
        live_within: Duration,
    ) -> Result<u32, StoreError> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        sqlx::query(
            "INSERT INTO herald_daemons (owner, heartbeat_at) VALUES ($1, $2)
             ON CONFLICT (owner) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
        )
        .bind(owner)
        .bind(format_timestamp(now))
        .execute(&mut *tx)
        .await?;
        // Rows of daemons that died without retiring are forgotten after a while.
        sqlx::query("DELETE FROM herald_daemons WHERE heartbeat_at < $1")
            .bind(format_timestamp(now - live_within * 10))
            .execute(&mut *tx)
            .await?;
        let live: i64 =
            sqlx::query_scalar("SELECT count(*) FROM herald_daemons WHERE heartbeat_at >= $1")
                .bind(format_timestamp(now - live_within))
                .fetch_one(&mut *tx)
                .await?;
        tx.commit().await?;
        Ok(u32::try_from(live).unwrap_or(u32::MAX).max(1))
    }

    async fn retire(&self, owner: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM herald_daemons WHERE owner = $1")
            .bind(owner)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    fn outbox_wakeups(&self) -> Option<Arc<Notify>> {
        None
    }
}
