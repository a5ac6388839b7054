//! Sends due deliveries: claim a batch under a lease, then for each one check its domain's
//! rate, render, wait for the global rate limiter, hand it to the transport and record the
//! outcome before taking the next.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::future::join_all;
use tokio::sync::{oneshot, watch};
use tracing::{error, info, warn};

use super::rate::{RateLimits, recipient_domain};
use super::retry::{AfterFailure, RetryPolicy};
use crate::config::Settings;
use crate::directory::ascii_mailbox;
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
    /// stops and sending pauses, so that herald backs off instead of hammering it. `sent`
    /// says what the batch did before it stopped.
    #[error("the relay is shedding load: {reply}")]
    Throttled { reply: String, sent: SendSummary },
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
    context: Context<S>,
    /// One per SMTP session this daemon keeps (`transport.smtp.connections`).
    transports: Vec<Transport>,
}

/// What every connection's worker shares, read-only.
struct Context<S> {
    store: S,
    settings: Arc<Settings>,
    renderer: Arc<Renderer>,
    limits: RateLimits,
    retry: RetryPolicy,
    /// This daemon's name on the leases it takes.
    owner: String,
    /// The longest one send can take; a delivery whose lease ends sooner is given back.
    send_budget: Duration,
    /// Attempts waiting to be recorded, and the turn to commit them (see [`Context::record`]).
    unrecorded: Mutex<Vec<Unrecorded>>,
    committing: tokio::sync::Mutex<()>,
}

/// An attempt on its way to the database, and who waits to hear it was recorded.
type Unrecorded = (
    i64,
    AttemptRecord,
    oneshot::Sender<Result<(AttemptRecord, bool), StoreError>>,
);

/// How one attempt ended for the batch it belongs to.
enum Attempted {
    Recorded {
        throttled: Option<String>,
    },
    /// Shutdown's grace period ran out mid-send: the delivery was given back unrecorded.
    Abandoned,
}

/// How one connection's worker ended its part of a batch.
struct WorkerEnd {
    attempted: usize,
    /// Why it stopped the whole batch, if it did for a reason the dispatcher must act on.
    stop: Option<SendError>,
}

impl<S: Store> Sender<S> {
    pub fn new(store: S, settings: Arc<Settings>, renderer: Arc<Renderer>, owner: String) -> Self {
        let transports = (0..settings.transport.connections())
            .map(|_| Transport::from_settings(&settings.transport))
            .collect();
        Self {
            context: Context {
                store,
                retry: RetryPolicy::new(settings.retry),
                limits: RateLimits::new(settings.rate_limit.clone()),
                send_budget: settings.transport.send_budget(),
                unrecorded: Mutex::new(Vec::new()),
                committing: tokio::sync::Mutex::new(()),
                settings,
                renderer,
                owner,
            },
            transports,
        }
    }

    /// Divides the configured rates among `daemons` daemons (this one included), so that the
    /// rate limits hold for all of them together.
    pub fn share_rate_with(&mut self, daemons: u32) {
        self.context.limits.share_with(daemons);
    }

    /// Claims the due deliveries (one batch) and sends them over the daemon's connections, each
    /// taking the next delivery as soon as it is free. The first connection is checked before
    /// claiming, so while the relay is down nothing is claimed and no delivery is charged an
    /// attempt. Each outcome is recorded as soon as the server has answered.
    pub async fn send_due(
        &mut self,
        shutdown: &watch::Receiver<bool>,
    ) -> Result<SendSummary, SendError> {
        let context = &self.context;
        let mut summary = SendSummary::default();
        if !context
            .ready_unless_stopping(&mut self.transports[0], shutdown)
            .await?
        {
            return Ok(summary);
        }
        let claimed = context
            .store
            .claim_deliveries(
                &context.owner,
                context.settings.delivery.batch_size.get(),
                context.settings.delivery.lease,
                Utc::now(),
            )
            .await?;
        context.limits.forget_idle_domains();

        let mut later = Postponed::default();
        let mut queue = VecDeque::with_capacity(claimed.len());
        for delivery in claimed {
            let domain = recipient_domain(&delivery.recipient_email);
            match context.limits.take_domain_slot(&domain) {
                Ok(()) => queue.push_back(delivery),
                Err(wait) => later.push(delivery.id, domain, wait.first, wait.spacing),
            }
        }
        summary.postponed_until = later.due.iter().map(|(_, at)| *at).max();
        context.store.postpone(&context.owner, &later.due).await?;

        let queue = Mutex::new(queue);
        let halt = AtomicBool::new(false);
        let ends = join_all(
            self.transports
                .iter_mut()
                .map(|transport| context.work(transport, &queue, &halt, shutdown)),
        )
        .await;
        let unsent: Vec<i64> = queue.into_inner().map_or_else(
            |poisoned| poisoned.into_inner().iter().map(|d| d.id).collect(),
            |queue| queue.iter().map(|d| d.id).collect(),
        );
        context.store.release(&context.owner, &unsent).await?;

        let mut stop = None;
        for end in ends {
            let end = end?;
            summary.attempted += end.attempted;
            stop = stop.or(end.stop);
        }
        match stop {
            Some(SendError::Throttled { reply, .. }) => Err(SendError::Throttled {
                reply,
                sent: summary,
            }),
            Some(stop) => Err(stop),
            None => Ok(summary),
        }
    }

    /// Closes every connection politely.
    pub async fn close(&mut self) {
        for transport in &mut self.transports {
            transport.close().await;
        }
    }
}

impl<S: Store> Context<S> {
    /// One connection's share of a batch: takes deliveries from the queue until it is empty or
    /// the batch must stop (shutdown, the relay unavailable or shedding load, a lease running
    /// short), which `halt` tells the other connections. A delivery taken but not attempted
    /// goes back to the queue, to be released.
    async fn work(
        &self,
        transport: &mut Transport,
        queue: &Mutex<VecDeque<ClaimedDelivery>>,
        halt: &AtomicBool,
        shutdown: &watch::Receiver<bool>,
    ) -> Result<WorkerEnd, StoreError> {
        let mut end = WorkerEnd {
            attempted: 0,
            stop: None,
        };
        let take = || queue.lock().expect("queue lock").pop_front();
        let give_back = |delivery| queue.lock().expect("queue lock").push_front(delivery);
        while !halt.load(Ordering::Relaxed) {
            let Some(delivery) = take() else { break };
            match self.ready_to_send(transport, &delivery, shutdown).await {
                Ok(true) => {}
                Ok(false) => {
                    give_back(delivery);
                    halt.store(true, Ordering::Relaxed);
                    break;
                }
                Err(unavailable) => {
                    give_back(delivery);
                    halt.store(true, Ordering::Relaxed);
                    end.stop = Some(unavailable.into());
                    break;
                }
            }
            match self.attempt(transport, &delivery, shutdown).await? {
                Attempted::Recorded { throttled: None } => end.attempted += 1,
                Attempted::Recorded {
                    throttled: Some(reply),
                } => {
                    end.attempted += 1;
                    halt.store(true, Ordering::Relaxed);
                    end.stop = Some(SendError::Throttled {
                        reply,
                        sent: SendSummary::default(),
                    });
                }
                Attempted::Abandoned => halt.store(true, Ordering::Relaxed),
            }
        }
        Ok(end)
    }

    /// Records one attempt and returns once it is committed: whether the lease was still held.
    ///
    /// Attempts finished on several connections while a commit is under way are committed
    /// together by whichever connection gets the next turn (group commit), so a commit's cost
    /// (an fsync) is shared instead of paid per message. Each connection still waits for its
    /// own record before its next message, so at most one unrecorded message per connection
    /// can be resent after a crash.
    async fn record(
        &self,
        delivery_id: i64,
        record: AttemptRecord,
    ) -> Result<(AttemptRecord, bool), StoreError> {
        let (done, recorded) = oneshot::channel();
        self.unrecorded
            .lock()
            .expect("unrecorded lock")
            .push((delivery_id, record, done));
        {
            let _turn = self.committing.lock().await;
            let batch = std::mem::take(&mut *self.unrecorded.lock().expect("unrecorded lock"));
            if !batch.is_empty() {
                self.commit(batch).await;
            }
        }
        recorded.await.unwrap_or_else(|_| {
            unreachable!("every queued attempt is answered by the commit that takes it")
        })
    }

    /// Commits a batch of attempts and answers each waiter. If the batch fails, each attempt is
    /// tried on its own, so that every waiter hears its own outcome.
    async fn commit(&self, batch: Vec<Unrecorded>) {
        let (waiters, attempts): (Vec<_>, Vec<_>) = batch
            .into_iter()
            .map(|(id, record, done)| (done, (id, record)))
            .unzip();
        match self
            .store
            .record_attempts(&self.owner, &attempts, Utc::now())
            .await
        {
            Ok(recorded) => {
                for ((done, (_, record)), recorded) in
                    waiters.into_iter().zip(attempts).zip(recorded)
                {
                    drop(done.send(Ok((record, recorded))));
                }
            }
            Err(_) => {
                for (done, (id, record)) in waiters.into_iter().zip(attempts) {
                    let alone = [(id, record)];
                    let result = self
                        .store
                        .record_attempts(&self.owner, &alone, Utc::now())
                        .await
                        .map(|recorded| {
                            let [(_, record)] = alone;
                            (record, recorded[0])
                        });
                    drop(done.send(result));
                }
            }
        }
    }

    /// Waits for the global rate limiter, then says whether this delivery may be sent now: not
    /// at shutdown, not when its lease could run out mid-send (another daemon could take it
    /// over and send it too), and not when the transport cannot be reached.
    async fn ready_to_send(
        &self,
        transport: &mut Transport,
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
        self.ready_unless_stopping(transport, shutdown).await
    }

    /// Connects the transport if needed. A connection attempt (up to two timeouts against a
    /// silent server) is abandoned at shutdown: nothing is claimed yet, so nothing is lost.
    async fn ready_unless_stopping(
        &self,
        transport: &mut Transport,
        shutdown: &watch::Receiver<bool>,
    ) -> Result<bool, Unavailable> {
        let mut stop = shutdown.clone();
        tokio::select! {
            ready = transport.ready() => ready.map(|()| true),
            _ = stop.wait_for(|stop| *stop) => Ok(false),
        }
    }

    /// One attempt at one delivery, recorded before returning; or, when shutdown's grace
    /// period ends mid-send, given back unrecorded.
    async fn attempt(
        &self,
        transport: &mut Transport,
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
            let (record, recorded) = self.record(delivery.id, record).await?;
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
                    outcome = transport.send(outgoing) => Some(outcome),
                    () = grace_after_shutdown(shutdown, grace) => None,
                };
                let Some(outcome) = sent else {
                    transport.abandon();
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
        let (record, recorded) = self.record(delivery.id, record).await?;
        log_attempt(delivery, &reference, attempt, &record, recorded);
        Ok(Attempted::Recorded { throttled })
    }

    /// Validates, renders and builds the message. On failure, the reason and what is known of
    /// the reference.
    fn prepare(&self, delivery: &ClaimedDelivery) -> Result<(Vec<u8>, String), (String, String)> {
        if let Err(reason) = ascii_mailbox(&delivery.recipient_email) {
            return Err((format!("not a valid mailbox: {reason}"), String::new()));
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
