//! [`Database`]: the backend the configured URL names, behind the same [`Store`] seam.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::Notify;

use super::postgres::PgStore;
use super::sqlite::SqliteStore;
use super::{
    AttemptRecord, ClaimedDelivery, ImportSummary, OutboxDecision, RequeueRequest, RequeueSummary,
    StatusReport, Store, StoreError,
};
use crate::directory::{Contact, DirectoryFile};
use crate::outbox::OutboxEvent;

#[derive(Debug, Clone)]
pub enum Database {
    Sqlite(SqliteStore),
    Postgres(PgStore),
}

/// Whether a URL names a backend herald supports.
pub fn is_supported_url(url: &str) -> bool {
    url.starts_with("sqlite:") || url.starts_with("postgres://") || url.starts_with("postgresql://")
}

impl Database {
    /// Opens the database a URL names, creating a missing SQLite file only when `create`.
    pub async fn connect(url: &str, create: bool) -> Result<Self, StoreError> {
        if url.starts_with("sqlite:") {
            let store = if create {
                SqliteStore::connect(url).await?
            } else {
                SqliteStore::connect_existing(url).await?
            };
            Ok(Self::Sqlite(store))
        } else {
            Ok(Self::Postgres(PgStore::connect(url).await?))
        }
    }
}

/// Forwards each call to the backend in use.
macro_rules! forward {
    ($self:ident, $store:ident => $call:expr) => {
        match $self {
            Database::Sqlite($store) => $call,
            Database::Postgres($store) => $call,
        }
    };
}

impl Store for Database {
    async fn migrate(&self) -> Result<(), StoreError> {
        forward!(self, s => s.migrate().await)
    }

    async fn enqueue(
        &self,
        kind: &str,
        payload: &str,
        idempotency_key: Option<&str>,
    ) -> Result<Option<i64>, StoreError> {
        forward!(self, s => s.enqueue(kind, payload, idempotency_key).await)
    }

    async fn replace_directory(&self, file: &DirectoryFile) -> Result<ImportSummary, StoreError> {
        forward!(self, s => s.replace_directory(file).await)
    }

    async fn company_contacts(&self, company_id: &str) -> Result<Option<Vec<Contact>>, StoreError> {
        forward!(self, s => s.company_contacts(company_id).await)
    }

    async fn claim_outbox(
        &self,
        limit: u32,
        lease: Duration,
        now: DateTime<Utc>,
    ) -> Result<Vec<OutboxEvent>, StoreError> {
        forward!(self, s => s.claim_outbox(limit, lease, now).await)
    }

    async fn record_decisions(
        &self,
        decisions: &[(i64, OutboxDecision)],
        now: DateTime<Utc>,
    ) -> Result<Vec<bool>, StoreError> {
        forward!(self, s => s.record_decisions(decisions, now).await)
    }

    async fn claim_deliveries(
        &self,
        owner: &str,
        limit: u32,
        lease: Duration,
        now: DateTime<Utc>,
    ) -> Result<Vec<ClaimedDelivery>, StoreError> {
        forward!(self, s => s.claim_deliveries(owner, limit, lease, now).await)
    }

    async fn record_attempts(
        &self,
        owner: &str,
        attempts: &[(i64, AttemptRecord)],
        now: DateTime<Utc>,
    ) -> Result<Vec<bool>, StoreError> {
        forward!(self, s => s.record_attempts(owner, attempts, now).await)
    }

    async fn release(&self, owner: &str, delivery_ids: &[i64]) -> Result<(), StoreError> {
        forward!(self, s => s.release(owner, delivery_ids).await)
    }

    async fn postpone(
        &self,
        owner: &str,
        deliveries: &[(i64, DateTime<Utc>)],
    ) -> Result<(), StoreError> {
        forward!(self, s => s.postpone(owner, deliveries).await)
    }

    async fn requeue(
        &self,
        request: RequeueRequest,
        now: DateTime<Utc>,
    ) -> Result<RequeueSummary, StoreError> {
        forward!(self, s => s.requeue(request, now).await)
    }

    async fn delivery_state(&self, delivery_id: i64) -> Result<Option<String>, StoreError> {
        forward!(self, s => s.delivery_state(delivery_id).await)
    }

    async fn next_due(&self) -> Result<Option<DateTime<Utc>>, StoreError> {
        forward!(self, s => s.next_due().await)
    }

    async fn status(&self) -> Result<StatusReport, StoreError> {
        forward!(self, s => s.status().await)
    }

    async fn heartbeat(
        &self,
        owner: &str,
        now: DateTime<Utc>,
        live_within: Duration,
    ) -> Result<u32, StoreError> {
        forward!(self, s => s.heartbeat(owner, now, live_within).await)
    }

    async fn retire(&self, owner: &str) -> Result<(), StoreError> {
        forward!(self, s => s.retire(owner).await)
    }

    fn outbox_wakeups(&self) -> Option<Arc<Notify>> {
        forward!(self, s => s.outbox_wakeups())
    }
}
