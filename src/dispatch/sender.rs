//! Sends due deliveries. A sending pass claims batches under a lease (the next one while the
//! last is being sent), checks each delivery's domain rate, and shares the deliveries among
//! the daemon's SMTP connections. Each connection renders, waits for the global rate limiter,
//! hands the message to the relay and passes the outcome to the committer, which records the
//! outcomes of all connections in one statement per round.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::future::join_all;
use tokio::sync::{oneshot, watch};
use tracing::{error, info, warn};

use super::pass::{
    CLAIMS_PER_PASS, ClaimedBatch, Committed, OnCommit, Queue, Recorder, Unrecorded,
};
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
}

/// How one attempt ended, before its outcome is recorded.
enum Attempted {
    Made(Attempt),
    /// Shutdown's grace period ran out mid-send: the delivery was given back unrecorded.
    Abandoned,
}

/// An attempt's outcome, to be recorded, and what its log line needs.
struct Attempt {
    record: AttemptRecord,
    /// The attempt's number (for an expired delivery, the attempts made before).
    number: u32,
    reference: String,
    /// The relay's 421 reply, when it is shedding load.
    throttled: Option<String>,
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

    /// Claims due deliveries and sends them over the daemon's connections, each taking the
    /// next delivery as soon as it is free. The first connection is checked before claiming,
    /// so while the relay is down nothing is claimed and no delivery is charged an attempt.
    /// Each outcome is recorded as soon as the server has answered.
    ///
    /// While the claimed deliveries are being sent, the next batch is claimed once fewer than
    /// half a batch wait, so that no connection idles while a claim runs. A pass ends when a
    /// claim comes back short (nothing more is due), after [`CLAIMS_PER_PASS`] claims, or when
    /// the batch must stop (shutdown, the relay unavailable or shedding load, a lease running
    /// short).
    pub async fn send_due(
        &mut self,
        shutdown: &watch::Receiver<bool>,
    ) -> Result<SendSummary, SendError> {
        let context = &self.context;
        if !context
            .ready_unless_stopping(&mut self.transports[0], shutdown)
            .await?
        {
            return Ok(SendSummary::default());
        }
        let first = context.claim_batch().await?;
        let mut summary = SendSummary {
            attempted: 0,
            postponed_until: first.postponed_until,
        };
        if first.deliveries.is_empty() {
            return Ok(summary);
        }

        let queue = Queue::new(first, context.settings.delivery.batch_size.get());
        let recorder = Recorder::default();
        let sending = async {
            let ends = join_all(
                self.transports
                    .iter_mut()
                    .map(|transport| context.work(transport, &queue, &recorder, shutdown)),
            )
            .await;
            // However the connections stopped, the claimer and the committer stop with them.
            queue.halt();
            recorder.close();
            ends
        };
        let (claimed_ahead, (), ends) = tokio::join!(
            context.claim_ahead(&queue),
            context.commit_as_recorded(&recorder),
            sending
        );
        context
            .store
            .release(&context.owner, &queue.unsent())
            .await?;

        let postponed_until = claimed_ahead?;
        summary.postponed_until = summary.postponed_until.max(postponed_until);
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
    /// Claims one batch and puts back, for later, the deliveries whose domain's rate is used
    /// up.
    async fn claim_batch(&self) -> Result<ClaimedBatch, StoreError> {
        let limit = self.settings.delivery.batch_size.get();
        let claimed = self
            .store
            .claim_deliveries(&self.owner, limit, self.settings.delivery.lease, Utc::now())
            .await?;
        self.limits.forget_idle_domains();
        let full = claimed.len() >= limit as usize;
        let mut later = Postponed::default();
        let mut deliveries = VecDeque::with_capacity(claimed.len());
        for delivery in claimed {
            let domain = recipient_domain(&delivery.recipient_email);
            match self.limits.take_domain_slot(&domain) {
                Ok(()) => deliveries.push_back(delivery),
                Err(wait) => later.push(delivery.id, domain, wait.first, wait.spacing),
            }
        }
        self.store.postpone(&self.owner, &later.due).await?;
        Ok(ClaimedBatch {
            deliveries,
            full,
            postponed_until: later.due.iter().map(|(_, at)| *at).max(),
        })
    }

    /// Claims the next batch whenever the queue runs low, until a claim says nothing more is
    /// due, the pass has made its share of claims, or the batch halts. The result says when
    /// the last of the deliveries it put back for their domain's rate come due. On a database
    /// error it stops claiming; the deliveries already queued are still sent.
    async fn claim_ahead(&self, queue: &Queue) -> Result<Option<DateTime<Utc>>, StoreError> {
        let mut postponed_until = None;
        let mut claims = 1;
        let outcome = loop {
            if !queue.wants_more() || claims >= CLAIMS_PER_PASS {
                break Ok(postponed_until);
            }
            queue.until_running_low().await;
            if queue.halted() {
                break Ok(postponed_until);
            }
            match self.claim_batch().await {
                Ok(batch) => {
                    claims += 1;
                    postponed_until = postponed_until.max(batch.postponed_until);
                    queue.refill(batch);
                }
                Err(err) => break Err(err),
            }
        };
        queue.no_more_claims();
        outcome
    }

    /// One connection's share of a pass: takes deliveries from the queue until it is empty and
    /// no more will be claimed, or the batch must stop (shutdown, the relay unavailable or
    /// shedding load, a lease running short, a database error), which halting the queue tells
    /// the other connections and the claimer. A delivery taken but not attempted goes back to
    /// the queue, to be released.
    ///
    /// Each outcome goes to the committer as soon as the relay has answered, and the next
    /// message is sent while it is being committed; the one after waits until it is. So at
    /// most two messages per connection are accepted by the relay and not yet recorded, which
    /// bounds what a crash can resend.
    async fn work(
        &self,
        transport: &mut Transport,
        queue: &Queue,
        recorder: &Recorder,
        shutdown: &watch::Receiver<bool>,
    ) -> Result<WorkerEnd, StoreError> {
        let mut end = WorkerEnd {
            attempted: 0,
            stop: None,
        };
        let mut unconfirmed = None;
        let mut failed = None;
        while !queue.halted() {
            let Some(delivery) = queue.next().await else {
                break;
            };
            if queue.halted() {
                queue.give_back(delivery);
                break;
            }
            match self.ready_to_send(transport, &delivery, shutdown).await {
                // The batch may have stopped (a 421 on another session) while this one
                // waited for the rate limiter.
                Ok(true) if queue.halted() => {
                    queue.give_back(delivery);
                    break;
                }
                Ok(true) => {}
                Ok(false) => {
                    queue.give_back(delivery);
                    queue.halt();
                    break;
                }
                Err(unavailable) => {
                    queue.give_back(delivery);
                    queue.halt();
                    end.stop = Some(unavailable.into());
                    break;
                }
            }
            let attempt = match self.attempt(transport, &delivery, shutdown).await {
                Ok(Attempted::Made(attempt)) => attempt,
                Ok(Attempted::Abandoned) => {
                    queue.halt();
                    break;
                }
                Err(err) => {
                    queue.halt();
                    failed = Some(err);
                    break;
                }
            };
            end.attempted += 1;
            let Attempt {
                record,
                number,
                reference,
                throttled,
            } = attempt;
            let delivery_id = delivery.id;
            let log: OnCommit = Box::new(move |record, recorded| {
                log_attempt(&delivery, &reference, number, record, recorded);
            });
            let committed = recorder.record(delivery_id, record, log);
            if let Some(previous) = unconfirmed.replace(committed)
                && let Err(err) = self.confirm(previous).await
            {
                queue.halt();
                failed = Some(err);
                break;
            }
            if let Some(reply) = throttled {
                queue.halt();
                end.stop = Some(SendError::Throttled {
                    reply,
                    sent: SendSummary::default(),
                });
            }
        }
        // The last outcome is waited for however the loop ended.
        if let Some(last) = unconfirmed
            && let Err(err) = self.confirm(last).await
        {
            failed = failed.or(Some(err));
        }
        match failed {
            Some(err) => Err(err),
            None => Ok(end),
        }
    }

    /// Waits until an attempt's outcome is committed (the committer has logged it then).
    async fn confirm(&self, committed: oneshot::Receiver<Committed>) -> Result<(), StoreError> {
        committed.await.unwrap_or_else(|_| {
            unreachable!("every recorded attempt is answered by the commit that takes it")
        })
    }

    /// Commits the attempts as they come in, all those that arrived during one commit together
    /// in the next (group commit), so that a commit's cost (a round trip and an fsync) is
    /// shared instead of paid per message. Returns once the connections have stopped and
    /// every attempt is committed.
    async fn commit_as_recorded(&self, recorder: &Recorder) {
        while let Some(batch) = recorder.next_batch().await {
            self.commit(batch).await;
        }
    }

    /// Commits a batch of attempts and answers each waiter. If the batch fails, each attempt is
    /// tried on its own, so that one the database refuses does not keep the others from being
    /// recorded.
    async fn commit(&self, batch: Vec<Unrecorded>) {
        let (waiters, attempts): (Vec<_>, Vec<_>) = batch
            .into_iter()
            .map(|(id, record, on_commit, done)| ((on_commit, done), (id, record)))
            .unzip();
        match self
            .store
            .record_attempts(&self.owner, &attempts, Utc::now())
            .await
        {
            Ok(recorded) => {
                for (((on_commit, done), (_, record)), recorded) in
                    waiters.into_iter().zip(attempts).zip(recorded)
                {
                    on_commit(&record, recorded);
                    drop(done.send(Ok(())));
                }
            }
            Err(_) => {
                // Once the database proves unreachable, the attempts left are answered with
                // that at once, rather than each waiting out its own connection timeout.
                let mut unreachable = None;
                for ((on_commit, done), (id, record)) in waiters.into_iter().zip(attempts) {
                    if let Some(reason) = &unreachable {
                        drop(done.send(Err(StoreError::Unreachable(String::clone(reason)))));
                        continue;
                    }
                    let alone = [(id, record)];
                    let result = self
                        .store
                        .record_attempts(&self.owner, &alone, Utc::now())
                        .await
                        .map(|recorded| {
                            let [(_, record)] = &alone;
                            on_commit(record, recorded[0]);
                        });
                    if let Err(err) = &result
                        && err.is_unreachable()
                    {
                        unreachable = Some(err.to_string());
                    }
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

    /// One attempt at one delivery, whose outcome the caller records; or, when shutdown's
    /// grace period ends mid-send, given back unrecorded.
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
            return Ok(Attempted::Made(Attempt {
                record: AttemptRecord::Expired { error },
                number: delivery.attempts,
                reference: String::new(),
                throttled: None,
            }));
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
        Ok(Attempted::Made(Attempt {
            record,
            number: attempt,
            reference,
            throttled,
        }))
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
