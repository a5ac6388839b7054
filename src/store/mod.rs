//! Storage: the outbox, the deliveries and the directory, behind one seam ([`Store`]) so that
//! the dispatch code does not know which database it runs on. [`sqlite`] is the embedded
//! default, [`postgres`] the production backend; [`Database`] is whichever the configured URL
//! names.

mod any;
pub mod postgres;
pub mod sqlite;
mod time;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use chrono::{DateTime, Utc};

use crate::directory::{Contact, DirectoryFile};
use crate::outbox::{Audience, OutboxEvent};

pub use any::{Database, is_supported_url};
pub use time::{format_timestamp, parse_timestamp};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open database {url}")]
    Connect { url: String, source: sqlx::Error },
    // These two print their cause in the message (log lines show only the message), so they
    // do not also report it as a `source`, which would print it twice.
    #[error("database migration failed: {0}")]
    Migrate(sqlx::migrate::MigrateError),
    #[error("database error: {0}")]
    Database(sqlx::Error),
    #[error("database holds a value herald cannot read: {0}")]
    Corrupt(String),
    /// Not tried: an earlier statement of the same group found the database unreachable.
    #[error("not recorded, the database is unreachable: {0}")]
    Unreachable(String),
}

impl StoreError {
    /// The database could not be reached (no connection, a connection lost, the pool's wait
    /// ran out), as opposed to a statement it refused: trying again at once is pointless.
    pub fn is_unreachable(&self) -> bool {
        match self {
            Self::Database(err) => !matches!(err, sqlx::Error::Database(_)),
            Self::Connect { .. } | Self::Unreachable(_) => true,
            Self::Migrate(_) | Self::Corrupt(_) => false,
        }
    }
}

/// Payloads are read up to one byte past the limit: enough to refuse an oversized one
/// without loading all of it.
const PAYLOAD_READ_LIMIT: usize = crate::outbox::schema::MAX_PAYLOAD_BYTES + 1;

fn parse_audience(text: &str) -> Result<Audience, StoreError> {
    Audience::parse(text).ok_or_else(|| StoreError::Corrupt(format!("audience {text:?}")))
}

/// A database URL without its password, for logs and messages.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => match url[scheme + 3..at].split_once(':') {
            Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
            None => url.to_string(),
        },
        _ => url.to_string(),
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(err: sqlx::Error) -> Self {
        Self::Database(err)
    }
}

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(err: sqlx::migrate::MigrateError) -> Self {
        Self::Migrate(err)
    }
}

/// A delivery to create when an outbox row is expanded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewDelivery {
    pub audience: Audience,
    pub contact_id: String,
    pub recipient_name: String,
    pub recipient_email: String,
    pub message_id: String,
    /// Set when the delivery can never be sent (the address is not a mailbox): it is recorded
    /// dead at once with this reason, so that `herald status` shows it.
    pub dead: Option<String>,
}

/// What became of an outbox row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutboxDecision {
    /// Expanded into these deliveries (possibly none; `note` then says why).
    Dispatched {
        deliveries: Vec<NewDelivery>,
        note: Option<String>,
    },
    /// Refused; nothing will be sent for it.
    Failed { reason: String },
}

impl OutboxDecision {
    /// The outbox row's new state, recipient count and reason, the same on every backend.
    pub(crate) fn columns(&self) -> (&'static str, Option<i32>, Option<&str>) {
        match self {
            Self::Dispatched { deliveries, note } => (
                "dispatched",
                Some(i32::try_from(deliveries.len()).unwrap_or(i32::MAX)),
                note.as_deref(),
            ),
            Self::Failed { reason } => ("failed", None, Some(reason.as_str())),
        }
    }
}

/// A delivery this daemon holds a lease on and may now send.
#[derive(Debug, Clone)]
pub struct ClaimedDelivery {
    pub id: i64,
    pub outbox_id: i64,
    pub kind: String,
    pub audience: Audience,
    pub contact_id: String,
    pub recipient_name: String,
    pub recipient_email: String,
    /// Attempts made before this one.
    pub attempts: u32,
    /// Why the previous attempt failed, if one did.
    pub last_error: Option<String>,
    /// When the delivery was queued (planned, or requeued by an operator); `retry.max_age`
    /// counts from here.
    pub queued_at: DateTime<Utc>,
    pub message_id: String,
    /// The outbox row's payload as stored (see [`OutboxEvent::payload`]).
    pub payload: Vec<u8>,
    pub lease_until: DateTime<Utc>,
}

/// The recorded result of one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttemptRecord {
    Sent {
        smtp_reply: String,
        at: DateTime<Utc>,
    },
    Retry {
        error: String,
        smtp_reply: Option<String>,
        next_attempt_at: DateTime<Utc>,
    },
    Dead {
        error: String,
        smtp_reply: Option<String>,
    },
    /// Dead without another attempt: it waited longer than `retry.max_age`.
    Expired { error: String },
}

impl AttemptRecord {
    /// The columns this record sets, the same on every backend, so that a backend can write a
    /// batch of records as one statement.
    pub(crate) fn columns(&self) -> AttemptColumns<'_> {
        let none = AttemptColumns {
            state: "dead",
            attempts_added: 1,
            last_error: None,
            smtp_reply: None,
            sent_at: None,
            next_attempt_at: None,
        };
        match self {
            Self::Sent { smtp_reply, at } => AttemptColumns {
                state: "sent",
                smtp_reply: Some(smtp_reply),
                sent_at: Some(*at),
                ..none
            },
            Self::Retry {
                error,
                smtp_reply,
                next_attempt_at,
            } => AttemptColumns {
                state: "retrying",
                last_error: Some(error),
                smtp_reply: smtp_reply.as_deref(),
                next_attempt_at: Some(*next_attempt_at),
                ..none
            },
            Self::Dead { error, smtp_reply } => AttemptColumns {
                last_error: Some(error),
                smtp_reply: smtp_reply.as_deref(),
                ..none
            },
            Self::Expired { error } => AttemptColumns {
                attempts_added: 0,
                last_error: Some(error),
                ..none
            },
        }
    }
}

/// How a batch of attempt records updates the deliveries, the same on every backend: `d` is
/// the delivery, `a` the batch as a table with the columns of [`AttemptColumns`] (and `id`).
pub(crate) const RECORD_ATTEMPTS_SET: &str = "state = a.state,
    attempts = d.attempts + a.attempts_added,
    last_error = a.last_error,
    smtp_reply = CASE WHEN a.attempts_added = 0 THEN d.smtp_reply ELSE a.smtp_reply END,
    sent_at = COALESCE(a.sent_at, d.sent_at),
    next_attempt_at = COALESCE(a.next_attempt_at, d.next_attempt_at),
    lease_owner = NULL, lease_until = NULL";

/// For each attempt, whether its delivery is among `updated`, those the statement changed (whose
/// lease was still held).
fn recorded_among(attempts: &[(i64, AttemptRecord)], updated: &[i64]) -> Vec<bool> {
    attempts
        .iter()
        .map(|(delivery_id, _)| updated.contains(delivery_id))
        .collect()
}

/// What one [`AttemptRecord`] writes to its delivery, besides giving up the lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AttemptColumns<'a> {
    pub state: &'static str,
    /// 1 for an attempt made; 0 for an expiry, which makes none and keeps the last reply.
    pub attempts_added: i32,
    pub last_error: Option<&'a str>,
    pub smtp_reply: Option<&'a str>,
    /// Set when sent; otherwise left as it is.
    pub sent_at: Option<DateTime<Utc>>,
    /// Set for a retry; otherwise left as it is.
    pub next_attempt_at: Option<DateTime<Utc>>,
}

/// What `herald retry` requeues: retrying deliveries (made due now), or with `dead` the dead
/// deliveries and failed outbox rows; narrowed to one outbox row or one delivery.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequeueRequest {
    pub dead: bool,
    pub event: Option<i64>,
    pub delivery: Option<i64>,
}

/// What `herald retry` changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequeueSummary {
    pub deliveries: u64,
    /// Failed outbox rows set back to pending, to be validated and expanded again.
    pub events: u64,
}

/// Counts for `herald status`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatusReport {
    /// Outbox rows per state: pending, dispatched, failed.
    pub outbox: Vec<(String, i64)>,
    /// Deliveries per state: queued, retrying, sent, dead.
    pub deliveries: Vec<(String, i64)>,
    /// When the oldest work still waiting (outbox row or delivery) was created.
    pub oldest_pending: Option<DateTime<Utc>>,
    /// The most recent failures, newest first: (what, reason).
    pub recent_failures: Vec<(String, String)>,
}

/// What `herald directory import` changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImportSummary {
    pub companies: usize,
    pub contacts: usize,
    pub companies_removed: u64,
    pub contacts_removed: u64,
}

/// The storage seam. Every method is one short transaction; a backend guarantees that
/// [`record_decisions`](Store::record_decisions) expands an outbox row at most once and that a
/// claimed delivery is held by one daemon at a time.
pub trait Store: Clone + Send + Sync + 'static {
    /// Creates or upgrades herald's tables.
    fn migrate(&self) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Inserts an outbox row as a producer would. `None` when the idempotency key was seen.
    fn enqueue(
        &self,
        kind: &str,
        payload: &str,
        idempotency_key: Option<&str>,
    ) -> impl Future<Output = Result<Option<i64>, StoreError>> + Send;

    /// Makes the directory tables match `file`: upserts what it lists, removes the rest.
    fn replace_directory(
        &self,
        file: &DirectoryFile,
    ) -> impl Future<Output = Result<ImportSummary, StoreError>> + Send;

    /// A company's contacts, or `None` when the company is not in the directory.
    fn company_contacts(
        &self,
        company_id: &str,
    ) -> impl Future<Output = Result<Option<Vec<Contact>>, StoreError>> + Send;

    /// Leases up to `limit` of the oldest outbox rows not yet expanded, so that several
    /// daemons expand different rows. The lease ends when the row's decision is recorded, or
    /// after `lease` if the daemon dies first.
    fn claim_outbox(
        &self,
        limit: u32,
        lease: Duration,
        now: DateTime<Utc>,
    ) -> impl Future<Output = Result<Vec<OutboxEvent>, StoreError>> + Send;

    /// Records the expansion of pending outbox rows, all in one transaction (one commit for a
    /// batch of rows). For each row, false when it was no longer pending (another daemon got
    /// there first); nothing is changed for that row.
    fn record_decisions(
        &self,
        decisions: &[(i64, OutboxDecision)],
        now: DateTime<Utc>,
    ) -> impl Future<Output = Result<Vec<bool>, StoreError>> + Send;

    /// Leases up to `limit` deliveries that are due at `now` to `owner` for `lease`.
    fn claim_deliveries(
        &self,
        owner: &str,
        limit: u32,
        lease: Duration,
        now: DateTime<Utc>,
    ) -> impl Future<Output = Result<Vec<ClaimedDelivery>, StoreError>> + Send;

    /// Records attempts on deliveries `owner` holds and ends their leases, all in one
    /// transaction (one commit for the attempts of several connections). For each, false when
    /// the lease had been lost, in which case nothing is written for it.
    fn record_attempts(
        &self,
        owner: &str,
        attempts: &[(i64, AttemptRecord)],
        now: DateTime<Utc>,
    ) -> impl Future<Output = Result<Vec<bool>, StoreError>> + Send;

    /// Gives leased deliveries back untouched (shutdown, lost connection): they are due again
    /// at once and no attempt is counted.
    fn release(
        &self,
        owner: &str,
        delivery_ids: &[i64],
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Gives leased deliveries back to be tried at the given times, without counting an attempt
    /// (a recipient domain's rate limit said "not yet").
    fn postpone(
        &self,
        owner: &str,
        deliveries: &[(i64, DateTime<Utc>)],
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Requeues what an operator chose (`herald retry`). A dead delivery starts afresh: no
    /// attempts counted, queued now, the same Message-ID.
    fn requeue(
        &self,
        request: RequeueRequest,
        now: DateTime<Utc>,
    ) -> impl Future<Output = Result<RequeueSummary, StoreError>> + Send;

    /// A delivery's state, or `None` when there is no such delivery: what `herald retry`
    /// reports when it finds nothing to requeue.
    fn delivery_state(
        &self,
        delivery_id: i64,
    ) -> impl Future<Output = Result<Option<String>, StoreError>> + Send;

    /// When the next queued or retrying delivery comes due, if any; `now` or earlier means
    /// work is due.
    fn next_due(&self) -> impl Future<Output = Result<Option<DateTime<Utc>>, StoreError>> + Send;

    fn status(&self) -> impl Future<Output = Result<StatusReport, StoreError>> + Send;

    /// Records that `owner` is alive and returns how many daemons (itself included) were seen
    /// within `live_within`: the global rate limit is divided by that number.
    fn heartbeat(
        &self,
        owner: &str,
        now: DateTime<Utc>,
        live_within: Duration,
    ) -> impl Future<Output = Result<u32, StoreError>> + Send;

    /// Removes `owner` from the live daemons (clean shutdown).
    fn retire(&self, owner: &str) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// A signal raised when rows are inserted into the outbox, for backends that can push
    /// (PostgreSQL's LISTEN/NOTIFY); `None` where the daemon must poll.
    fn outbox_wakeups(&self) -> Option<Arc<Notify>>;
}
