//! Sends due deliveries: claim a batch under a lease, then for each one check its domain's
//! rate, render, wait for the global rate limiter, hand it to the transport and record the
//! outcome before taking the next.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::watch;
use tracing::{error, info, warn};

use super::rate::{RateLimits, recipient_domain};
use super::retry::{AfterFailure, RetryPolicy};
use crate::config::Settings;
use crate::directory::is_plausible_email;
use crate::render::message::{Envelope, build_message};
use crate::render::{RecipientView, Renderer};
use crate::store::{AttemptRecord, ClaimedDelivery, Store, StoreError};
use crate::transport::{Outcome, Outgoing, Transport, Unavailable};

/// Why a sending pass stopped early.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error(transparent)]
    Unavailable(#[from] Unavailable),
    /// The relay answered 421 (it is closing the session, usually from overload): the batch
    /// stops and sending pauses, so that herald backs off instead of hammering it.
    #[error("the relay is shedding load: {0}")]
    Throttled(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What one sending pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SendSummary {
    /// Deliveries attempted (sent, rescheduled or dead).
    pub attempted: usize,
    /// When the last of the deliveries put back because their domain's rate was used up
    /// comes due, if any was.
    pub postponed_until: Option<DateTime<Utc>>,
}

pub struct Sender<S> {
    store: S,
    settings: Arc<Settings>,
    renderer: Arc<Renderer>,
    transport: Transport,
    limits: RateLimits,
    retry: RetryPolicy,
    /// This daemon's name on the leases it takes.
    owner: String,
    /// The longest one send can take; a delivery whose lease ends sooner is given back.
    send_budget: Duration,
}

/// How one attempt ended for the batch it belongs to.
enum Attempted {
    Recorded {
        throttled: Option<String>,
    },
    /// Shutdown's grace period ran out mid-send: the delivery was given back unrecorded.
    Abandoned,
}

impl<S: Store> Sender<S> {
    pub fn new(store: S, settings: Arc<Settings>, renderer: Arc<Renderer>, owner: String) -> Self {
        let send_budget = settings.transport.send_budget();
        Self {
            store,
            transport: Transport::from_settings(&settings.transport),
            retry: RetryPolicy::new(settings.retry),
            limits: RateLimits::new(settings.rate_limit.clone()),
            settings,
            renderer,
            owner,
            send_budget,
        }
    }

    /// Divides the configured rates among `daemons` daemons (this one included), so that the
    /// rate limits hold for all of them together.
    pub fn share_rate_with(&mut self, daemons: u32) {
        self.limits.share_with(daemons);
    }

    /// Claims the due deliveries (one batch) and sends them. The transport is checked before
    /// claiming, so while it is down nothing is claimed and no delivery is charged an attempt.
    pub async fn send_due(
        &mut self,
        shutdown: &watch::Receiver<bool>,
    ) -> Result<SendSummary, SendError> {
        let mut summary = SendSummary::default();
        if !self.ready_unless_stopping(shutdown).await? {
            return Ok(summary);
        }
        let claimed = self
            .store
            .claim_deliveries(
                &self.owner,
                self.settings.delivery.batch_size.get(),
                self.settings.delivery.lease,
                Utc::now(),
            )
            .await?;
        self.limits.forget_idle_domains();

        let mut later = Postponed::default();
        let mut outcome = Ok(());
        for (index, delivery) in claimed.iter().enumerate() {
            let domain = recipient_domain(&delivery.recipient_email);
            if let Err(wait) = self.limits.take_domain_slot(&domain) {
                later.push(delivery.id, domain, wait.first, wait.spacing);
                continue;
            }
            let go = self.ready_to_send(delivery, shutdown).await;
            // Past a delivery that was attempted, the rest of the batch is given back.
            let rest = if matches!(go, Ok(true)) {
                index + 1
            } else {
                index
            };
            let stop = match go {
                Ok(true) => match self.attempt(delivery, shutdown).await? {
                    Attempted::Recorded { throttled: None } => {
                        summary.attempted += 1;
                        continue;
                    }
                    Attempted::Recorded {
                        throttled: Some(reply),
                    } => {
                        summary.attempted += 1;
                        Err(SendError::Throttled(reply))
                    }
                    Attempted::Abandoned => Ok(()),
                },
                Ok(false) => Ok(()),
                Err(unavailable) => Err(unavailable.into()),
            };
            let unsent: Vec<i64> = claimed[rest..].iter().map(|d| d.id).collect();
            self.store.release(&self.owner, &unsent).await?;
            outcome = stop;
            break;
        }
        summary.postponed_until = later.due.iter().map(|(_, at)| *at).max();
        self.store.postpone(&self.owner, &later.due).await?;
        outcome.map(|()| summary)
    }

    /// Waits for the global rate limiter, then says whether this delivery may be sent now: not
    /// at shutdown, not when its lease could run out mid-send (another daemon could take it
    /// over and send it too), and not when the transport cannot be reached.
    async fn ready_to_send(
        &mut self,
        delivery: &ClaimedDelivery,
        shutdown: &watch::Receiver<bool>,
    ) -> Result<bool, Unavailable> {
        let mut stop = shutdown.clone();
        tokio::select! {
            () = self.limits.until_global_ready() => {}
            _ = stop.wait_for(|stop| *stop) => {}
        }
        if *shutdown.borrow() || Utc::now() + self.send_budget >= delivery.lease_until {
            return Ok(false);
        }
        self.ready_unless_stopping(shutdown).await
    }

    /// Connects the transport if needed. A connection attempt (up to two timeouts against a
    /// silent server) is abandoned at shutdown: nothing is claimed yet, so nothing is lost.
    async fn ready_unless_stopping(
        &mut self,
        shutdown: &watch::Receiver<bool>,
    ) -> Result<bool, Unavailable> {
        let mut stop = shutdown.clone();
        tokio::select! {
            ready = self.transport.ready() => ready.map(|()| true),
            _ = stop.wait_for(|stop| *stop) => Ok(false),
        }
    }

    /// One attempt at one delivery, recorded before returning; or, when shutdown's grace
    /// period ends mid-send, given back unrecorded.
    async fn attempt(
        &mut self,
        delivery: &ClaimedDelivery,
        shutdown: &watch::Receiver<bool>,
    ) -> Result<Attempted, StoreError> {
        let attempt = delivery.attempts + 1;
        let now = Utc::now();
        if let Some(expired) = self.retry.expired(delivery.queued_at, now) {
            let error = match &delivery.last_error {
                Some(last) => format!("{expired}; last error: {last}"),
                None => expired,
            };
            let record = AttemptRecord::Expired { error };
            let recorded = self
                .store
                .record_attempt(delivery.id, &self.owner, &record, now)
                .await?;
            log_attempt(delivery, "", delivery.attempts, &record, recorded);
            return Ok(Attempted::Recorded { throttled: None });
        }

        let (outcome, reference) = match self.prepare(delivery) {
            Ok((bytes, reference)) => {
                let outgoing = Outgoing {
                    from: &self.settings.brand.sender_email,
                    to: &delivery.recipient_email,
                    message_id: &delivery.message_id,
                    bytes: &bytes,
                };
                let grace = self.settings.delivery.shutdown_grace;
                let sent = tokio::select! {
                    outcome = self.transport.send(outgoing) => Some(outcome),
                    () = grace_after_shutdown(shutdown, grace) => None,
                };
                let Some(outcome) = sent else {
                    self.transport.abandon();
                    self.store.release(&self.owner, &[delivery.id]).await?;
                    warn!(
                        outbox_id = delivery.outbox_id,
                        delivery_id = delivery.id,
                        recipient = %delivery.recipient_email,
                        grace = ?grace,
                        "send abandoned at shutdown after the grace period; the delivery will be \
                         sent again with the same Message-ID (the relay may already have it)"
                    );
                    return Ok(Attempted::Abandoned);
                };
                (outcome, reference)
            }
            // A message that cannot be built never will be by retrying: dead at once.
            Err((error, reference)) => (Outcome::Permanent { error, reply: None }, reference),
        };

        let now = Utc::now();
        let mut throttled = None;
        let record = match outcome {
            Outcome::Sent { reply } => AttemptRecord::Sent {
                smtp_reply: reply,
                at: now,
            },
            Outcome::Permanent { error, reply } => AttemptRecord::Dead {
                error,
                smtp_reply: reply,
            },
            Outcome::Transient { error, reply } => {
                if let Some(reply) = reply.as_deref().filter(|r| r.starts_with("421")) {
                    throttled = Some(reply.to_string());
                }
                match self.retry.after_failure(attempt, delivery.queued_at, now) {
                    AfterFailure::RetryAt(next_attempt_at) => AttemptRecord::Retry {
                        error,
                        smtp_reply: reply,
                        next_attempt_at,
                    },
                    AfterFailure::GiveUp(why) => AttemptRecord::Dead {
                        error: format!("{why}; last error: {error}"),
                        smtp_reply: reply,
                    },
                }
            }
        };
        let recorded = self
            .store
            .record_attempt(delivery.id, &self.owner, &record, now)
            .await?;
        log_attempt(delivery, &reference, attempt, &record, recorded);
        Ok(Attempted::Recorded { throttled })
    }

    /// Validates, renders and builds the message. On failure, the reason and what is known of
    /// the reference.
    fn prepare(&self, delivery: &ClaimedDelivery) -> Result<(Vec<u8>, String), (String, String)> {
        if !is_plausible_email(&delivery.recipient_email) {
            return Err((
                format!("not a valid mailbox: {:?}", delivery.recipient_email),
                String::new(),
            ));
        }
        let (_, payload) = self
            .settings
            .catalog
            .validate(&delivery.kind, &delivery.payload)
            .map_err(|err| (format!("payload no longer valid: {err}"), String::new()))?;
        let reference = payload.reference().to_string();
        let recipient = RecipientView {
            contact_id: &delivery.contact_id,
            name: &delivery.recipient_name,
            email: &delivery.recipient_email,
        };
        let now = Utc::now();
        let rendered = self
            .renderer
            .render(&delivery.kind, delivery.audience, &payload, recipient, now)
            .map_err(|err| (format!("template error: {err}"), reference.clone()))?;
        let envelope = Envelope {
            to_name: &delivery.recipient_name,
            to_email: &delivery.recipient_email,
            message_id: &delivery.message_id,
            date: now,
        };
        Ok((
            build_message(&self.settings.brand, envelope, &rendered),
            reference,
        ))
    }

    /// Closes the transport politely.
    pub async fn close(&mut self) {
        self.transport.close().await;
    }
}

/// Deliveries put back because their domain's rate was used up, each at the time its slot
/// frees up: the n-th one of a domain in a batch waits n slots more, so that a large batch to
/// one domain is spread over its rate instead of coming back all at once.
#[derive(Default)]
struct Postponed {
    due: Vec<(i64, DateTime<Utc>)>,
    per_domain: HashMap<String, u32>,
}

impl Postponed {
    fn push(&mut self, delivery_id: i64, domain: String, first: Duration, spacing: Duration) {
        let waiting = self.per_domain.entry(domain).or_default();
        let at = Utc::now() + first + spacing * *waiting;
        *waiting += 1;
        self.due.push((delivery_id, at));
    }
}

/// Completes `grace` after shutdown was asked for; never before.
async fn grace_after_shutdown(shutdown: &watch::Receiver<bool>, grace: Duration) {
    let mut stop = shutdown.clone();
    if stop.wait_for(|stop| *stop).await.is_err() {
        // The sender of the shutdown signal is gone: no shutdown will come.
        std::future::pending::<()>().await;
    }
    tokio::time::sleep(grace).await;
}

fn log_attempt(
    delivery: &ClaimedDelivery,
    reference: &str,
    attempt: u32,
    record: &AttemptRecord,
    recorded: bool,
) {
    if !recorded {
        warn!(
            outbox_id = delivery.outbox_id,
            delivery_id = delivery.id,
            recipient = %delivery.recipient_email,
            "delivery attempted after its lease was lost; another daemon owns it now"
        );
    }
    match record {
        AttemptRecord::Sent { smtp_reply, .. } => info!(
            outbox_id = delivery.outbox_id,
            delivery_id = delivery.id,
            kind = %delivery.kind,
            reference,
            recipient = %delivery.recipient_email,
            attempt,
            outcome = "sent",
            smtp_reply = %smtp_reply,
            "delivered"
        ),
        AttemptRecord::Retry {
            error,
            smtp_reply,
            next_attempt_at,
        } => warn!(
            outbox_id = delivery.outbox_id,
            delivery_id = delivery.id,
            kind = %delivery.kind,
            reference,
            recipient = %delivery.recipient_email,
            attempt,
            outcome = "retrying",
            smtp_reply = smtp_reply.as_deref().unwrap_or(""),
            error = %error,
            next_attempt_at = %next_attempt_at.to_rfc3339(),
            "delivery failed, will retry"
        ),
        AttemptRecord::Expired { error } => error!(
            outbox_id = delivery.outbox_id,
            delivery_id = delivery.id,
            kind = %delivery.kind,
            recipient = %delivery.recipient_email,
            attempts = attempt,
            outcome = "dead",
            error = %error,
            "delivery expired: it will not be sent; `herald retry --dead --delivery ID` sends it anyway"
        ),
        AttemptRecord::Dead { error, smtp_reply } => error!(
            outbox_id = delivery.outbox_id,
            delivery_id = delivery.id,
            kind = %delivery.kind,
            reference,
            recipient = %delivery.recipient_email,
            attempt,
            outcome = "dead",
            smtp_reply = smtp_reply.as_deref().unwrap_or(""),
            error = %error,
            "delivery is dead: it will not be retried"
        ),
    }
}
