//! Sends due deliveries: claim a batch under a lease, then for each one render, wait for the
//! rate limiter, hand it to the transport and record the outcome before taking the next.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::watch;
use tracing::{error, info, warn};

use super::retry::RetryPolicy;
use crate::config::{RateLimitSettings, Settings};
use crate::render::message::{Envelope, build_message};
use crate::render::{RecipientView, Renderer};
use crate::store::{AttemptRecord, ClaimedDelivery, Store, StoreError};
use crate::transport::{Outcome, Outgoing, Transport, Unavailable};

/// Why a sending pass stopped early.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error(transparent)]
    Unavailable(#[from] Unavailable),
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub struct Sender<S> {
    store: S,
    settings: Arc<Settings>,
    renderer: Arc<Renderer>,
    transport: Transport,
    limiter: DefaultDirectRateLimiter,
    /// How many daemons the configured rate is divided among (this one included).
    sharing_with: u32,
    retry: RetryPolicy,
    /// This daemon's name on the leases it takes.
    owner: String,
    /// The longest one send can take; a delivery whose lease ends sooner is given back.
    send_budget: Duration,
}

impl<S: Store> Sender<S> {
    pub fn new(store: S, settings: Arc<Settings>, renderer: Arc<Renderer>, owner: String) -> Self {
        let send_budget = settings.transport.send_budget();
        Self {
            store,
            transport: Transport::from_settings(&settings.transport),
            retry: RetryPolicy::new(settings.retry),
            limiter: RateLimiter::direct(share_of(&settings.rate_limit, 1)),
            sharing_with: 1,
            settings,
            renderer,
            owner,
            send_budget,
        }
    }

    /// Divides the configured rate among `daemons` daemons (this one included), so that the
    /// rate limit holds for all of them together.
    pub fn share_rate_with(&mut self, daemons: u32) {
        let daemons = daemons.max(1);
        if daemons != self.sharing_with {
            self.sharing_with = daemons;
            self.limiter = RateLimiter::direct(share_of(&self.settings.rate_limit, daemons));
        }
    }

    /// Claims the due deliveries (one batch) and sends them. Returns how many were attempted.
    /// The transport is checked before claiming, so while it is down nothing is claimed and no
    /// delivery is charged an attempt.
    pub async fn send_due(&mut self, shutdown: &watch::Receiver<bool>) -> Result<usize, SendError> {
        if !self.ready_unless_stopping(shutdown).await? {
            return Ok(0);
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

        let mut attempted = 0;
        for (index, delivery) in claimed.iter().enumerate() {
            let go = self.ready_to_send(delivery, shutdown).await;
            if !matches!(go, Ok(true)) {
                let rest: Vec<i64> = claimed[index..].iter().map(|d| d.id).collect();
                self.store.release(&self.owner, &rest).await?;
                go?;
                return Ok(attempted);
            }
            self.attempt(delivery).await?;
            attempted += 1;
        }
        Ok(attempted)
    }

    /// Waits for the rate limiter, then says whether this delivery may be sent now: not at
    /// shutdown, not when its lease could run out mid-send (another daemon could take it over
    /// and send it too), and not when the transport cannot be reached.
    async fn ready_to_send(
        &mut self,
        delivery: &ClaimedDelivery,
        shutdown: &watch::Receiver<bool>,
    ) -> Result<bool, Unavailable> {
        let mut stop = shutdown.clone();
        tokio::select! {
            _ = self.limiter.until_ready() => {}
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

    /// One attempt at one delivery, recorded before returning.
    async fn attempt(&mut self, delivery: &ClaimedDelivery) -> Result<(), StoreError> {
        let attempt = delivery.attempts + 1;
        let (outcome, reference) = match self.prepare(delivery) {
            Ok((bytes, reference)) => {
                let outgoing = Outgoing {
                    from: &self.settings.brand.sender_email,
                    to: &delivery.recipient_email,
                    message_id: &delivery.message_id,
                    bytes: &bytes,
                };
                (self.transport.send(outgoing).await, reference)
            }
            // A message that cannot be rendered never will be by retrying: dead at once.
            Err((error, reference)) => (Outcome::Permanent { error, reply: None }, reference),
        };

        let now = Utc::now();
        let record = match outcome {
            Outcome::Sent { reply } => AttemptRecord::Sent {
                smtp_reply: reply,
                at: now,
            },
            Outcome::Permanent { error, reply } => AttemptRecord::Dead {
                error,
                smtp_reply: reply,
            },
            Outcome::Transient { error, reply } => match self.retry.delay_after(attempt) {
                Some(delay) => AttemptRecord::Retry {
                    error,
                    smtp_reply: reply,
                    next_attempt_at: now + delay,
                },
                None => AttemptRecord::Dead {
                    error: format!("gave up after {attempt} attempts; last error: {error}"),
                    smtp_reply: reply,
                },
            },
        };
        let recorded = self
            .store
            .record_attempt(delivery.id, &self.owner, &record, now)
            .await?;
        log_attempt(delivery, &reference, attempt, &record, recorded);
        Ok(())
    }

    /// Validates, renders and builds the message. On failure, the reason and what is known of
    /// the reference.
    fn prepare(&self, delivery: &ClaimedDelivery) -> Result<(Vec<u8>, String), (String, String)> {
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

/// One daemon's share of the global rate: `per_second / daemons` (one message every
/// `daemons / per_second` seconds) and `burst / daemons`, at least one.
fn share_of(rate: &RateLimitSettings, daemons: u32) -> Quota {
    let period = Duration::from_secs_f64(f64::from(daemons) / f64::from(rate.per_second.get()));
    let burst = NonZeroU32::new(rate.burst.get() / daemons).unwrap_or(NonZeroU32::MIN);
    Quota::with_period(period.max(Duration::from_nanos(1)))
        .expect("a positive period")
        .allow_burst(burst)
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

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;
    use std::time::Duration;

    use super::share_of;
    use crate::config::RateLimitSettings;

    fn rate(per_second: u32, burst: u32) -> RateLimitSettings {
        RateLimitSettings {
            per_second: NonZeroU32::new(per_second).unwrap(),
            burst: NonZeroU32::new(burst).unwrap(),
        }
    }

    #[test]
    fn the_global_rate_is_divided_among_the_daemons() {
        let alone = share_of(&rate(30, 9), 1);
        assert_eq!(alone.replenish_interval(), Duration::from_secs(1) / 30);
        assert_eq!(alone.burst_size().get(), 9);

        let one_of_three = share_of(&rate(30, 9), 3);
        assert_eq!(
            one_of_three.replenish_interval(),
            Duration::from_secs(1) / 10
        );
        assert_eq!(one_of_three.burst_size().get(), 3);

        // Fewer messages per second than daemons: one message every few seconds each.
        let sparse = share_of(&rate(1, 1), 4);
        assert_eq!(sparse.replenish_interval(), Duration::from_secs(4));
        assert_eq!(sparse.burst_size().get(), 1);
    }
}
