//! The production backend: PostgreSQL. Claims are `FOR UPDATE SKIP LOCKED` with a lease, so
//! several daemons share one outbox without ever holding the same row, and a dead daemon's
//! work is taken over when its lease runs out. Lease times use the database's clock, so the
//! daemons' own clocks need not agree. Inserts into the outbox wake idle daemons through
//! LISTEN/NOTIFY.

use std::collections::HashSet;
use std::str::FromStr;
use std::sync::{Arc, LazyLock, OnceLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use tokio::sync::Notify;
use tracing::{info, warn};

use super::{
    AttemptColumns, AttemptRecord, ClaimedDelivery, ImportSummary, OutboxDecision,
    PAYLOAD_READ_LIMIT, RECORD_ATTEMPTS_SET, RequeueRequest, RequeueSummary, StatusReport, Store,
    StoreError, parse_audience, recorded_among, redact_url,
};
use crate::directory::{Contact, DirectoryFile};
use crate::outbox::OutboxEvent;

/// The channel the outbox trigger notifies (see `migrations/postgres`).
const CHANNEL: &str = "herald_outbox";

/// How long to wait for a free connection before reporting the database as unavailable.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// A pooled connection idle this long is checked (one round trip) before it is used, since
/// the server may have closed it meanwhile (a restart, an idle timeout). One in steady use is
/// not: checking it before every statement would double the round trips of the hot path, and
/// a connection that breaks mid-use fails its statement, which is retried like any other
/// database error.
const IDLE_BEFORE_CHECK: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    wakeups: Arc<Notify>,
    listening: Arc<OnceLock<()>>,
}

impl PgStore {
    /// Connects to a `postgres://` URL.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let connect_error = |source| StoreError::Connect {
            url: redact_url(url),
            source,
        };
        // herald's tables grow from nothing to many thousand rows between two runs of
        // autovacuum. A plan PostgreSQL cached while the deliveries table was small (a
        // sequential scan to record outcomes, a sort of every due row to claim) stays in use
        // once it is large, and costs milliseconds per statement. Planning each statement
        // afresh sizes it to the table as it is now, for a fraction of that.
        let options = PgConnectOptions::from_str(url)
            .map_err(connect_error)?
            .options([("plan_cache_mode", "force_custom_plan")]);
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .test_before_acquire(false)
            .before_acquire(|connection, meta| {
                Box::pin(async move {
                    if meta.idle_for >= IDLE_BEFORE_CHECK {
                        sqlx::Connection::ping(connection).await?;
                    }
                    Ok(true)
                })
            })
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await
            .map_err(connect_error)?;
        Ok(Self {
            pool,
            wakeups: Arc::new(Notify::new()),
            listening: Arc::new(OnceLock::new()),
        })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Listens on the outbox channel for as long as the process runs. After a lost
    /// connection it reconnects with backoff and raises the signal once, since notifications
    /// sent meanwhile are lost: the planner then catches up by reading the table.
    fn spawn_listener(&self) {
        let (pool, wakeups) = (self.pool.clone(), self.wakeups.clone());
        tokio::spawn(async move {
            let mut pause = Duration::from_millis(200);
            loop {
                let listening = async {
                    let mut listener = PgListener::connect_with(&pool).await?;
                    listener.listen(CHANNEL).await?;
                    wakeups.notify_one();
                    Ok::<_, sqlx::Error>(listener)
                };
                let mut listener = match listening.await {
                    Ok(listener) => listener,
                    Err(err) => {
                        warn!(error = %err, retry_in = ?pause, "cannot LISTEN for new outbox rows; polling meanwhile");
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_secs(30));
                        continue;
                    }
                };
                pause = Duration::from_millis(200);
                loop {
                    match listener.try_recv().await {
                        Ok(Some(_)) => wakeups.notify_one(),
                        // The connection dropped: reconnect, and catch up with what came in.
                        Ok(None) => {
                            info!("LISTEN connection lost; reconnecting");
                            wakeups.notify_one();
                        }
                        Err(err) => {
                            warn!(error = %err, "LISTEN connection failed; reconnecting");
                            break;
                        }
                    }
                }
            }
        });
    }
}

fn seconds(duration: Duration) -> f64 {
    duration.as_secs_f64()
}

type ClaimedRow = (
    i64,
    i64,
    String,
    String,
    String,
    String,
    String,
    i32,
    String,
    Vec<u8>,
    Option<String>,
    DateTime<Utc>,
);

impl Store for PgStore {
    async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::migrate!("migrations/postgres")
            .run(&self.pool)
            .await?;
        Ok(())
    }

    async fn enqueue(
        &self,
        kind: &str,
        payload: &str,
        idempotency_key: Option<&str>,
    ) -> Result<Option<i64>, StoreError> {
        Ok(sqlx::query_scalar(
            "INSERT INTO herald_outbox (kind, payload, idempotency_key) VALUES ($1, $2, $3)
             ON CONFLICT (idempotency_key) DO NOTHING RETURNING id",
        )
        .bind(kind)
        .bind(payload)
        .bind(idempotency_key)
        .fetch_optional(&self.pool)
        .await?)
    }

    async fn replace_directory(&self, file: &DirectoryFile) -> Result<ImportSummary, StoreError> {
        let mut tx = self.pool.begin().await?;
        let mut summary = ImportSummary::default();
        let mut company_ids = Vec::new();
        let mut contact_ids = Vec::new();

        for company in &file.companies {
            sqlx::query(
                "INSERT INTO herald_companies (id, name, updated_at) VALUES ($1, $2, now())
                 ON CONFLICT (id) DO UPDATE SET name = excluded.name, updated_at = now()",
            )
            .bind(&company.id)
            .bind(&company.name)
            .execute(&mut *tx)
            .await?;
            company_ids.push(company.id.clone());
            summary.companies += 1;

            for contact in &company.contacts {
                sqlx::query(
                    "INSERT INTO herald_contacts (id, company_id, name, email, role, active, updated_at)
                     VALUES ($1, $2, $3, $4, $5, $6, now())
                     ON CONFLICT (id) DO UPDATE SET company_id = excluded.company_id,
                        name = excluded.name, email = excluded.email, role = excluded.role,
                        active = excluded.active, updated_at = now()",
                )
                .bind(&contact.id)
                .bind(&company.id)
                .bind(&contact.name)
                .bind(&contact.email)
                .bind(&contact.role)
                .bind(contact.active)
                .execute(&mut *tx)
                .await?;
                sqlx::query("DELETE FROM herald_contact_groups WHERE contact_id = $1")
                    .bind(&contact.id)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(
                    "INSERT INTO herald_contact_groups (contact_id, group_name)
                     SELECT $1, g FROM unnest($2::text[]) AS g ON CONFLICT DO NOTHING",
                )
                .bind(&contact.id)
                .bind(&contact.groups)
                .execute(&mut *tx)
                .await?;
                contact_ids.push(contact.id.clone());
                summary.contacts += 1;
            }
        }

        summary.contacts_removed =
            sqlx::query("DELETE FROM herald_contacts WHERE id <> ALL($1::text[])")
                .bind(&contact_ids)
                .execute(&mut *tx)
                .await?
                .rows_affected();
        summary.companies_removed =
            sqlx::query("DELETE FROM herald_companies WHERE id <> ALL($1::text[])")
                .bind(&company_ids)
                .execute(&mut *tx)
                .await?
                .rows_affected();
        tx.commit().await?;
        Ok(summary)
    }

    async fn company_contacts(&self, company_id: &str) -> Result<Option<Vec<Contact>>, StoreError> {
        let known: Option<i32> = sqlx::query_scalar("SELECT 1 FROM herald_companies WHERE id = $1")
            .bind(company_id)
            .fetch_optional(&self.pool)
            .await?;
        if known.is_none() {
            return Ok(None);
        }
        let rows: Vec<(String, String, String, String, bool, Vec<String>)> = sqlx::query_as(
            "SELECT c.id, c.name, c.email, c.role, c.active,
                    coalesce(array_agg(g.group_name) FILTER (WHERE g.group_name IS NOT NULL), '{}')
             FROM herald_contacts c
             LEFT JOIN herald_contact_groups g ON g.contact_id = c.id
             WHERE c.company_id = $1
             GROUP BY c.id ORDER BY c.id",
        )
        .bind(company_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(Some(
            rows.into_iter()
                .map(|(id, name, email, role, active, groups)| Contact {
                    id,
                    name,
                    email,
                    role,
                    active,
                    groups: groups.into_iter().collect(),
                })
                .collect(),
        ))
    }

    async fn claim_outbox(
        &self,
        limit: u32,
        lease: Duration,
        _now: DateTime<Utc>,
    ) -> Result<Vec<OutboxEvent>, StoreError> {
        let rows: Vec<(i64, String, Vec<u8>)> = sqlx::query_as(
            "WITH due AS (
                SELECT id FROM herald_outbox
                WHERE state = 'pending' AND (lease_until IS NULL OR lease_until <= now())
                ORDER BY id LIMIT $2
                FOR UPDATE SKIP LOCKED)
             UPDATE herald_outbox o SET lease_until = now() + make_interval(secs => $1)
             FROM due WHERE o.id = due.id
             RETURNING o.id, o.kind, substring(convert_to(o.payload, 'UTF8') FROM 1 FOR $3)",
        )
        .bind(seconds(lease))
        .bind(i64::from(limit))
        .bind(PAYLOAD_READ_LIMIT as i32)
        .fetch_all(&self.pool)
        .await?;
        let mut events: Vec<OutboxEvent> = rows
            .into_iter()
            .map(|(id, kind, payload)| OutboxEvent { id, kind, payload })
            .collect();
        events.sort_by_key(|event| event.id);
        Ok(events)
    }

    /// One statement for the whole batch: the outbox rows still pending are marked decided,
    /// and the deliveries of exactly those rows are inserted.
    ///
    /// The transaction commits without waiting for its WAL to reach disk
    /// (`synchronous_commit = off`). Nothing is lost that way: a delivery is only sent after a
    /// claim of it has committed with a flush, and that flush also makes the planning written
    /// before it durable. A server crash can only undo planning no claim has seen; its outbox
    /// rows are pending again and are planned anew.
    async fn record_decisions(
        &self,
        decisions: &[(i64, OutboxDecision)],
        _now: DateTime<Utc>,
    ) -> Result<Vec<bool>, StoreError> {
        let mut outbox = OutboxColumns::default();
        let mut planned = DeliveryColumns::default();
        for (outbox_id, decision) in decisions {
            let (state, recipients, reason) = decision.columns();
            outbox.ids.push(*outbox_id);
            outbox.states.push(state);
            outbox.recipients.push(recipients);
            outbox.reasons.push(reason);
            if let OutboxDecision::Dispatched { deliveries, .. } = decision {
                for delivery in deliveries {
                    planned.push(*outbox_id, delivery);
                }
            }
        }
        let mut tx = self.pool.begin().await?;
        sqlx::query("SET LOCAL synchronous_commit = off")
            .execute(&mut *tx)
            .await?;
        let decided: Vec<i64> = sqlx::query_scalar(
            "WITH decided AS (
                UPDATE herald_outbox o
                SET state = d.state, processed_at = now(), recipients = d.recipients,
                    reason = d.reason, lease_until = NULL
                FROM unnest($1::bigint[], $2::text[], $3::int[], $4::text[])
                    AS d(id, state, recipients, reason)
                WHERE o.id = d.id AND o.state = 'pending'
                RETURNING o.id, o.kind),
             planned AS (
                INSERT INTO herald_deliveries (outbox_id, kind, audience, contact_id,
                    recipient_name, recipient_email, message_id, next_attempt_at,
                    state, last_error)
                SELECT decided.id, decided.kind, t.audience, t.contact_id, t.name, t.email,
                    t.message_id, now(), CASE WHEN t.dead IS NULL THEN 'queued' ELSE 'dead' END,
                    t.dead
                FROM decided
                JOIN unnest($5::bigint[], $6::text[], $7::text[], $8::text[], $9::text[],
                            $10::text[], $11::text[])
                    AS t(outbox_id, audience, contact_id, name, email, message_id, dead)
                  ON t.outbox_id = decided.id
                ON CONFLICT DO NOTHING)
             SELECT id FROM decided",
        )
        .bind(&outbox.ids)
        .bind(&outbox.states)
        .bind(&outbox.recipients)
        .bind(&outbox.reasons)
        .bind(&planned.outbox_ids)
        .bind(&planned.audiences)
        .bind(&planned.contact_ids)
        .bind(&planned.names)
        .bind(&planned.emails)
        .bind(&planned.message_ids)
        .bind(&planned.dead)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        let decided: HashSet<i64> = decided.into_iter().collect();
        Ok(outbox.ids.iter().map(|id| decided.contains(id)).collect())
    }

    async fn claim_deliveries(
        &self,
        owner: &str,
        limit: u32,
        lease: Duration,
        now: DateTime<Utc>,
    ) -> Result<Vec<ClaimedDelivery>, StoreError> {
        // A claim must walk the due-order index: the first rows it meets are the ones to take.
        // Planned from stale statistics (a table that grew by thousands of rows since
        // autovacuum last analyzed it, which it does at most once a minute), PostgreSQL chose
        // a bitmap scan that reads every due row and sorts them: 16 ms per claim of 50 at
        // 36,000 rows, against well under 1 ms for the index walk.
        let mut tx = self.pool.begin().await?;
        sqlx::raw_sql("SET LOCAL enable_bitmapscan = off; SET LOCAL enable_seqscan = off")
            .execute(&mut *tx)
            .await?;
        let rows: Vec<ClaimedRow> = sqlx::query_as(
            "WITH due AS (
                SELECT id FROM herald_deliveries
                WHERE state IN ('queued', 'retrying') AND next_attempt_at <= now()
                  AND (lease_until IS NULL OR lease_until <= now())
                ORDER BY next_attempt_at, id LIMIT $3
                FOR UPDATE SKIP LOCKED)
             UPDATE herald_deliveries d
             SET lease_owner = $1, lease_until = now() + make_interval(secs => $2),
                 updated_at = now()
             FROM due, herald_outbox o
             WHERE d.id = due.id AND o.id = d.outbox_id
             RETURNING d.id, d.outbox_id, d.kind, d.audience, d.contact_id, d.recipient_name,
                d.recipient_email, d.attempts, d.message_id,
                substring(convert_to(o.payload, 'UTF8') FROM 1 FOR $4),
                d.last_error, coalesce(d.queued_at, d.created_at)",
        )
        .bind(owner)
        .bind(seconds(lease))
        .bind(i64::from(limit))
        .bind(PAYLOAD_READ_LIMIT as i32)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        // The database's lease started at or after `now`, so this local deadline is never
        // later than the real one, whatever the clocks say.
        let lease_until = now + lease;
        let mut claimed = rows
            .into_iter()
            .map(|row| {
                let (
                    id,
                    outbox_id,
                    kind,
                    audience,
                    contact_id,
                    name,
                    email,
                    attempts,
                    message_id,
                    payload,
                    last_error,
                    queued_at,
                ) = row;
                Ok(ClaimedDelivery {
                    id,
                    outbox_id,
                    kind,
                    audience: parse_audience(&audience)?,
                    contact_id,
                    recipient_name: name,
                    recipient_email: email,
                    attempts: u32::try_from(attempts).unwrap_or_default(),
                    message_id,
                    payload,
                    last_error,
                    queued_at,
                    lease_until,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        claimed.sort_by_key(|delivery| delivery.id);
        Ok(claimed)
    }

    async fn record_attempts(
        &self,
        owner: &str,
        attempts: &[(i64, AttemptRecord)],
        _now: DateTime<Utc>,
    ) -> Result<Vec<bool>, StoreError> {
        if attempts.is_empty() {
            return Ok(Vec::new());
        }
        // One statement for the batch: a single round trip and commit however many there are.
        let mut columns = AttemptArrays::default();
        for (delivery_id, record) in attempts {
            columns.push(*delivery_id, record.columns());
        }
        static RECORD: LazyLock<String> = LazyLock::new(|| {
            format!(
                "UPDATE herald_deliveries AS d SET {RECORD_ATTEMPTS_SET}, updated_at = now()
                 FROM unnest($2::bigint[], $3::text[], $4::int[], $5::text[], $6::text[],
                             $7::timestamptz[], $8::timestamptz[])
                      AS a(id, state, attempts_added, last_error, smtp_reply, sent_at,
                           next_attempt_at)
                 WHERE d.id = a.id AND d.lease_owner = $1
                 RETURNING d.id"
            )
        });
        let updated: Vec<i64> = sqlx::query_scalar(RECORD.as_str())
            .bind(owner)
            .bind(columns.ids)
            .bind(columns.states)
            .bind(columns.attempts_added)
            .bind(columns.last_errors)
            .bind(columns.smtp_replies)
            .bind(columns.sent_at)
            .bind(columns.next_attempt_at)
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
        let (ids, times): (Vec<i64>, Vec<DateTime<Utc>>) = deliveries.iter().copied().unzip();
        sqlx::query(
            "UPDATE herald_deliveries d
             SET next_attempt_at = due.at, lease_owner = NULL, lease_until = NULL
             FROM unnest($2::bigint[], $3::timestamptz[]) AS due(id, at)
             WHERE d.lease_owner = $1 AND d.id = due.id",
        )
        .bind(owner)
        .bind(ids)
        .bind(times)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn requeue(
        &self,
        request: RequeueRequest,
        _now: DateTime<Utc>,
    ) -> Result<RequeueSummary, StoreError> {
        let mut tx = self.pool.begin().await?;
        let deliveries = if request.dead {
            sqlx::query(
                "UPDATE herald_deliveries
                 SET state = 'queued', attempts = 0, next_attempt_at = now(), queued_at = now(),
                     updated_at = now()
                 WHERE state = 'dead' AND ($1::bigint IS NULL OR outbox_id = $1)
                   AND ($2::bigint IS NULL OR id = $2)",
            )
        } else {
            sqlx::query(
                "UPDATE herald_deliveries SET next_attempt_at = now(), updated_at = now()
                 WHERE state = 'retrying' AND ($1::bigint IS NULL OR outbox_id = $1)
                   AND ($2::bigint IS NULL OR id = $2)",
            )
        }
        .bind(request.event)
        .bind(request.delivery)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let events = if request.dead && request.delivery.is_none() {
            sqlx::query(
                "UPDATE herald_outbox
                 SET state = 'pending', processed_at = NULL, reason = NULL, lease_until = NULL
                 WHERE state = 'failed' AND ($1::bigint IS NULL OR id = $1)",
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
        sqlx::query(
            "UPDATE herald_deliveries SET lease_owner = NULL, lease_until = NULL
             WHERE lease_owner = $1 AND id = ANY($2)",
        )
        .bind(owner)
        .bind(delivery_ids)
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
        Ok(sqlx::query_scalar(
            "SELECT min(greatest(next_attempt_at, coalesce(lease_until, next_attempt_at)))
             FROM herald_deliveries WHERE state IN ('queued', 'retrying')",
        )
        .fetch_one(&self.pool)
        .await?)
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
        let oldest_pending = sqlx::query_scalar(
            "SELECT min(created_at) FROM (
                SELECT created_at FROM herald_outbox WHERE state = 'pending'
                UNION ALL
                SELECT coalesce(queued_at, created_at) FROM herald_deliveries WHERE state IN ('queued', 'retrying')) t",
        )
        .fetch_one(&self.pool)
        .await?;
        let recent_failures = sqlx::query_as(
            "SELECT what, reason FROM (
                SELECT 'outbox ' || id || ' (' || kind || ')' AS what, reason,
                       processed_at AS at, id
                FROM herald_outbox WHERE state = 'failed'
                UNION ALL
                SELECT 'delivery ' || id || ' to ' || recipient_email || ' (outbox ' || outbox_id || ')',
                       last_error, updated_at, id
                FROM herald_deliveries WHERE state = 'dead') t
             ORDER BY at DESC, id DESC LIMIT 20",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(StatusReport {
            outbox,
            deliveries,
            oldest_pending,
            recent_failures,
        })
    }

    async fn heartbeat(
        &self,
        owner: &str,
        _now: DateTime<Utc>,
        live_within: Duration,
    ) -> Result<u32, StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO herald_daemons (owner, heartbeat_at) VALUES ($1, now())
             ON CONFLICT (owner) DO UPDATE SET heartbeat_at = now()",
        )
        .bind(owner)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "DELETE FROM herald_daemons WHERE heartbeat_at < now() - make_interval(secs => $1)",
        )
        .bind(seconds(live_within * 10))
        .execute(&mut *tx)
        .await?;
        let live: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM herald_daemons WHERE heartbeat_at >= now() - make_interval(secs => $1)",
        )
        .bind(seconds(live_within))
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
        if self.listening.set(()).is_ok() {
            self.spawn_listener();
        }
        Some(self.wakeups.clone())
    }
}

/// A batch of [`AttemptColumns`] as one array per column, for `unnest`.
#[derive(Default)]
struct AttemptArrays<'a> {
    ids: Vec<i64>,
    states: Vec<&'static str>,
    attempts_added: Vec<i32>,
    last_errors: Vec<Option<&'a str>>,
    smtp_replies: Vec<Option<&'a str>>,
    sent_at: Vec<Option<DateTime<Utc>>>,
    next_attempt_at: Vec<Option<DateTime<Utc>>>,
}

impl<'a> AttemptArrays<'a> {
    fn push(&mut self, delivery_id: i64, columns: AttemptColumns<'a>) {
        self.ids.push(delivery_id);
        self.states.push(columns.state);
        self.attempts_added.push(columns.attempts_added);
        self.last_errors.push(columns.last_error);
        self.smtp_replies.push(columns.smtp_reply);
        self.sent_at.push(columns.sent_at);
        self.next_attempt_at.push(columns.next_attempt_at);
    }
}

/// The outbox side of a batch of planning decisions, column by column, for `unnest`.
#[derive(Default)]
struct OutboxColumns<'a> {
    ids: Vec<i64>,
    states: Vec<&'static str>,
    recipients: Vec<Option<i32>>,
    reasons: Vec<Option<&'a str>>,
}

/// The deliveries of a batch of planning decisions, column by column, for `unnest`.
#[derive(Default)]
struct DeliveryColumns<'a> {
    outbox_ids: Vec<i64>,
    audiences: Vec<&'static str>,
    contact_ids: Vec<&'a str>,
    names: Vec<&'a str>,
    emails: Vec<&'a str>,
    message_ids: Vec<&'a str>,
    dead: Vec<Option<&'a str>>,
}

impl<'a> DeliveryColumns<'a> {
    fn push(&mut self, outbox_id: i64, delivery: &'a super::NewDelivery) {
        self.outbox_ids.push(outbox_id);
        self.audiences.push(delivery.audience.as_str());
        self.contact_ids.push(&delivery.contact_id);
        self.names.push(&delivery.recipient_name);
        self.emails.push(&delivery.recipient_email);
        self.message_ids.push(&delivery.message_id);
        self.dead.push(delivery.dead.as_deref());
    }
}

#[cfg(test)]
mod tests {
    use crate::store::redact_url;

    #[test]
    fn passwords_never_reach_messages() {
        assert_eq!(
            redact_url("postgres://herald:s3cret@db:5432/x"),
            "postgres://herald:***@db:5432/x"
        );
        assert_eq!(
            redact_url("postgres://postgres@127.0.0.1/test"),
            "postgres://postgres@127.0.0.1/test"
        );
    }
}
