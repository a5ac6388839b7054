//! Expands outbox rows into deliveries: validates the payload, finds each audience's company
//! in the directory and picks its recipients. A bad row is marked failed with its reason and
//! never holds up the others.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tracing::{error, info, warn};

use crate::config::Settings;
use crate::directory::{Contact, select_recipients};
use crate::outbox::{Audience, OutboxEvent};
use crate::render::message::new_message_id;
use crate::store::{NewDelivery, OutboxDecision, Store, StoreError};

/// How many outbox rows one planning pass claims.
const PLAN_BATCH: u32 = 100;

/// How long a planning claim holds its rows: far longer than a batch takes, and short enough
/// that the rows of a daemon that died while planning are soon expanded by another.
const PLAN_LEASE: Duration = Duration::from_secs(60);

/// Expands pending outbox rows until none is left or `PLAN_BATCH` rows were handled; returns
/// how many rows were decided by this daemon. The batch is recorded in one transaction, and
/// each company's contacts are read once per batch.
pub async fn plan_pending<S: Store>(store: &S, settings: &Settings) -> Result<usize, StoreError> {
    let events = store
        .claim_outbox(PLAN_BATCH, PLAN_LEASE, Utc::now())
        .await?;
    let mut directory = DirectoryCache::default();
    let mut decisions = Vec::with_capacity(events.len());
    for event in &events {
        decisions.push((
            event.id,
            decide(store, settings, event, &mut directory).await?,
        ));
    }
    let recorded = store.record_decisions(&decisions, Utc::now()).await?;
    let mut decided = 0;
    for ((event, (_, decision)), recorded) in events.iter().zip(&decisions).zip(recorded) {
        if recorded {
            decided += 1;
            log_decision(event, decision);
        }
    }
    Ok(decided)
}

/// Companies' contacts as read during one planning batch: a batch of rows for the same
/// companies reads each once.
#[derive(Default)]
pub struct DirectoryCache {
    /// Shared, so that each row of the batch takes the contacts without copying them.
    companies: HashMap<String, Option<Arc<[Contact]>>>,
}

impl DirectoryCache {
    async fn contacts<S: Store>(
        &mut self,
        store: &S,
        company_id: &str,
    ) -> Result<Option<Arc<[Contact]>>, StoreError> {
        if !self.companies.contains_key(company_id) {
            let contacts = store.company_contacts(company_id).await?;
            self.companies
                .insert(company_id.to_string(), contacts.map(Arc::from));
        }
        Ok(self.companies[company_id].clone())
    }
}

/// Works out what an outbox row becomes. Only database errors are errors here; everything
/// wrong with the row itself is a [`OutboxDecision::Failed`].
pub async fn decide<S: Store>(
    store: &S,
    settings: &Settings,
    event: &OutboxEvent,
    directory: &mut DirectoryCache,
) -> Result<OutboxDecision, StoreError> {
    let (spec, payload) = match settings.catalog.validate(&event.kind, &event.payload) {
        Ok(valid) => valid,
        Err(err) => {
            return Ok(OutboxDecision::Failed {
                reason: err.to_string(),
            });
        }
    };
    let group = &settings.recipients.groups[&spec.kind];

    // Every company the payload names must be in the directory, addressed or not.
    let mut contacts_by_audience = Vec::new();
    for audience in Audience::ALL {
        let company_id = payload.company_id(audience);
        let Some(contacts) = directory.contacts(store, company_id).await? else {
            return Ok(OutboxDecision::Failed {
                reason: format!(
                    "payload field \"{audience}.company_id\": company {company_id:?} is not in the directory"
                ),
            });
        };
        contacts_by_audience.push((audience, company_id, contacts));
    }

    let mut deliveries = Vec::new();
    let mut notes = Vec::new();
    for (audience, company_id, contacts) in contacts_by_audience {
        if !spec.audiences.contains(&audience) {
            continue;
        }
        let selection = select_recipients(&contacts, group, &settings.recipients);
        if selection.recipients.is_empty() && selection.unusable.is_empty() {
            notes.push(format!(
                "no {audience} recipient: no active, eligible contact of {company_id:?} subscribes to {group:?}"
            ));
        }
        // A contact whose address is not a mailbox gets a delivery that is dead from the
        // start, so that the operator sees whom the notification did not reach, and why.
        let usable = selection.recipients.into_iter().map(|r| (r, None));
        let unusable = selection
            .unusable
            .into_iter()
            .map(|(r, reason)| (r, Some(format!("not a valid mailbox: {reason}"))));
        deliveries.extend(usable.chain(unusable).map(|(recipient, dead)| NewDelivery {
            audience,
            contact_id: recipient.contact_id,
            recipient_name: recipient.name,
            recipient_email: recipient.email,
            message_id: new_message_id(event.id, &settings.brand.sender_email),
            dead,
        }));
    }
    let note = (!notes.is_empty()).then(|| notes.join("; "));
    Ok(OutboxDecision::Dispatched { deliveries, note })
}

/// The outbox kind is logged in Debug form (quoted, control characters escaped): it is
/// whatever a producer wrote, and must not be able to forge log lines.
fn log_decision(event: &OutboxEvent, decision: &OutboxDecision) {
    if let OutboxDecision::Dispatched { deliveries, .. } = decision {
        for (delivery, reason) in deliveries
            .iter()
            .filter_map(|d| d.dead.as_ref().map(|reason| (d, reason)))
        {
            error!(
                outbox_id = event.id,
                kind = ?event.kind,
                contact_id = ?delivery.contact_id,
                reason = %reason,
                "delivery recorded dead: the contact's address is not a mailbox; fix it in the directory for later notifications"
            );
        }
    }
    match decision {
        OutboxDecision::Dispatched {
            deliveries,
            note: None,
        } => info!(
            outbox_id = event.id,
            kind = ?event.kind,
            deliveries = deliveries.len(),
            "outbox row dispatched"
        ),
        OutboxDecision::Dispatched {
            deliveries,
            note: Some(note),
        } => warn!(
            outbox_id = event.id,
            kind = ?event.kind,
            deliveries = deliveries.len(),
            note = %note,
            "outbox row dispatched, but some notifications have no recipient"
        ),
        OutboxDecision::Failed { reason } => error!(
            outbox_id = event.id,
            kind = ?event.kind,
            reason = %reason,
            "outbox row failed: nothing will be sent for it; fix the producer and insert a corrected row"
        ),
    }
}
