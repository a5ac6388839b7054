//! The pipeline that moves notifications: outbox rows are expanded into deliveries
//! ([`planner`]), due deliveries are rendered and sent ([`sender`]) and failures are scheduled
//! again ([`retry`]). The daemon runs planning and sending side by side, and so does `--drain`,
//! until nothing is due.

mod pass;
pub mod planner;
pub mod rate;
pub mod retry;
pub mod sender;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{Notify, watch};
use tracing::{error, info, warn};

use crate::config::Settings;
use crate::render::Renderer;
use crate::store::{Store, StoreError};
pub use sender::{SendError, SendSummary, Sender};

/// The first wait after the transport or the database fails; it doubles up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(500);
const MAX_PAUSE: Duration = Duration::from_secs(60);
/// See [`until_postponed_due`].
const POSTPONED_SLACK: chrono::TimeDelta = chrono::TimeDelta::seconds(1);

/// How often a daemon announces itself; a daemon unheard of for three periods no longer
/// counts towards the division of the global rate limit.
const HEARTBEAT: Duration = Duration::from_secs(5);
const LIVE_WITHIN: Duration = Duration::from_secs(15);

/// What one drain did: outbox rows expanded and delivery attempts made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainSummary {
    pub planned: usize,
    pub attempted: usize,
}

/// The dispatcher: one store, one renderer, one sender, under one lease owner name.
pub struct Dispatcher<S> {
    store: S,
    settings: Arc<Settings>,
    sender: Sender<S>,
    owner: String,
}

impl<S: Store> Dispatcher<S> {
    pub fn new(store: S, settings: Arc<Settings>, renderer: Arc<Renderer>) -> Self {
        let owner = lease_owner();
        let sender = Sender::new(store.clone(), settings.clone(), renderer, owner.clone());
        Self {
            store,
            settings,
            sender,
            owner,
        }
    }

    /// Processes everything that is due now, then returns. Retries scheduled for later are left
    /// for a later run. Fails when the transport is unavailable while deliveries are due.
    ///
    /// Planning runs as a task of its own, as in [`run`](Self::run), so that sending starts
    /// with the first planned batch instead of after the whole outbox is planned.
    pub async fn drain(
        mut self,
        shutdown: watch::Receiver<bool>,
    ) -> Result<DrainSummary, SendError> {
        let daemons = self
            .store
            .heartbeat(&self.owner, Utc::now(), LIVE_WITHIN)
            .await?;
        self.sender.share_rate_with(daemons);
        // The planner sets `planning_over` before its last notification, so that a sender that
        // saw it unset and then waits is always woken (the task's own completion may be
        // recorded only after that notification was taken).
        let planned = Arc::new(Notify::new());
        let planning_over = Arc::new(AtomicBool::new(false));
        let planning = tokio::spawn({
            let (store, settings, planned, over) = (
                self.store.clone(),
                self.settings.clone(),
                planned.clone(),
                planning_over.clone(),
            );
            let shutdown = shutdown.clone();
            async move {
                let mut decided = 0;
                let outcome = loop {
                    if *shutdown.borrow() {
                        break Ok(decided);
                    }
                    match planner::plan_pending(&store, &settings).await {
                        Ok(0) => break Ok(decided),
                        Ok(batch) => decided += batch,
                        Err(err) => break Err(err),
                    }
                    planned.notify_one();
                };
                over.store(true, Ordering::SeqCst);
                planned.notify_one();
                outcome
            }
        });

        let mut attempted = 0;
        // Deliveries put back for a domain's rate are due again within moments: wait for
        // them rather than stop, since they are not retries scheduled for later.
        let mut hold_until = None;
        let mut last_attempted = 0;
        let mut pause = FIRST_PAUSE;
        let sending = loop {
            // Read before the pass: a pass that finds nothing after planning ended means
            // nothing more is coming.
            let planning_over = planning_over.load(Ordering::SeqCst);
            // After a pass that sent something, more is likely due: claim again at once rather
            // than ask for the next due time, which reads every waiting delivery.
            let due = last_attempted > 0
                || self
                    .store
                    .next_due()
                    .await?
                    .is_some_and(|at| at <= Utc::now());
            let (sent, throttled) = if due && !*shutdown.borrow() {
                match self.sender.send_due(&shutdown).await {
                    Ok(sent) => (sent, None),
                    Err(SendError::Throttled { reply, sent }) => (sent, Some(reply)),
                    Err(err) => break Err(err),
                }
            } else {
                (SendSummary::default(), None)
            };
            last_attempted = sent.attempted;
            attempted += sent.attempted;
            hold_until = hold_until.max(sent.postponed_until);
            match throttled {
                Some(reply) => {
                    warn!(smtp_reply = %reply, pause = ?pause, "the relay is shedding load; pausing");
                    sleep_unless_stopping(next_pause(&mut pause), &shutdown).await;
                    continue;
                }
                None if due => pause = FIRST_PAUSE,
                None => {}
            }
            if *shutdown.borrow() {
                break Ok(());
            }
            if sent.attempted == 0 {
                if !planning_over {
                    let mut stop = shutdown.clone();
                    tokio::select! {
                        () = planned.notified() => {}
                        _ = stop.wait_for(|stop| *stop) => {}
                    }
                    continue;
                }
                match until_postponed_due(&self.store, hold_until).await? {
                    Some(wait) => {
                        sleep_unless_stopping(wait.max(Duration::from_millis(1)), &shutdown).await;
                    }
                    None => break Ok(()),
                }
            }
        };
        self.sender.close().await;
        let planning = planning.await;
        drop(self.store.retire(&self.owner).await);
        sending?;
        let planned = match planning {
            Ok(planned) => planned?,
            Err(err) => std::panic::resume_unwind(err.into_panic()),
        };
        Ok(DrainSummary { planned, attempted })
    }

    /// Runs until `shutdown` turns true: planning and sending as two tasks, plus a heartbeat
    /// that shares the rate limit with the other daemons on the database. Planning wakes on
    /// an insert (where the backend can say so) or every poll interval; sending wakes when
    /// planning made deliveries or a retry comes due. Errors are logged and retried with
    /// backoff; this only returns at shutdown, after in-flight sends are recorded and unsent
    /// claims released.
    pub async fn run(self, shutdown: watch::Receiver<bool>) {
        let Self {
            store,
            settings,
            mut sender,
            owner,
        } = self;
        let planned = Arc::new(Notify::new());
        let poll = settings.database.poll_interval;
        let (daemons_tx, mut daemons) = watch::channel(1);

        let heartbeat = tokio::spawn({
            let (store, owner, shutdown) = (store.clone(), owner.clone(), shutdown.clone());
            async move {
                while !*shutdown.borrow() {
                    match store.heartbeat(&owner, Utc::now(), LIVE_WITHIN).await {
                        Ok(live) => {
                            daemons_tx.send_if_modified(|current| {
                                std::mem::replace(current, live) != live
                            });
                        }
                        Err(err) => warn!(error = %err, "cannot record this daemon's heartbeat"),
                    }
                    sleep_unless_stopping(HEARTBEAT, &shutdown).await;
                }
            }
        });

        let planning = tokio::spawn({
            let (store, settings, planned) = (store.clone(), settings.clone(), planned.clone());
            let (inserted, shutdown) = (store.outbox_wakeups(), shutdown.clone());
            async move {
                let mut pause = FIRST_PAUSE;
                while !*shutdown.borrow() {
                    let wait = match planner::plan_pending(&store, &settings).await {
                        Ok(0) => poll,
                        Ok(_) => {
                            planned.notify_one();
                            pause = FIRST_PAUSE;
                            continue;
                        }
                        Err(err) => {
                            error!(error = %err, retry_in = ?pause, "cannot read the outbox; retrying");
                            next_pause(&mut pause)
                        }
                    };
                    let mut stop = shutdown.clone();
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = notified(inserted.as_deref()) => {}
                        _ = stop.wait_for(|stop| *stop) => {}
                    }
                }
            }
        });

        let mut pause = FIRST_PAUSE;
        let mut stop = shutdown.clone();
        while !*shutdown.borrow() {
            if daemons.has_changed().unwrap_or(false) {
                let live = *daemons.borrow_and_update();
                info!(
                    daemons = live,
                    "sharing the rate limit with the daemons on this database"
                );
                sender.share_rate_with(live);
            }
            let wait = match sender.send_due(&shutdown).await {
                Ok(sent) if sent.attempted == 0 => {
                    pause = FIRST_PAUSE;
                    wait_until_due(&store, poll).await
                }
                Ok(_) => {
                    pause = FIRST_PAUSE;
                    continue;
                }
                Err(SendError::Throttled { reply, .. }) => {
                    warn!(smtp_reply = %reply, retry_in = ?pause, "the relay is shedding load (421); sending pauses");
                    next_pause(&mut pause)
                }
                Err(SendError::Unavailable(unavailable)) => {
                    warn!(error = %unavailable, retry_in = ?pause, "transport unavailable; deliveries wait, none is charged an attempt");
                    next_pause(&mut pause)
                }
                Err(SendError::Store(err)) => {
                    error!(error = %err, retry_in = ?pause, "database error while sending; retrying");
                    next_pause(&mut pause)
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = planned.notified() => {}
                _ = stop.wait_for(|stop| *stop) => {}
            }
        }
        sender.close().await;
        for task in [planning, heartbeat] {
            if let Err(err) = task.await {
                error!(error = %err, "a background task ended abnormally");
            }
        }
        if let Err(err) = store.retire(&owner).await {
            warn!(error = %err, "cannot remove this daemon from the live daemons; it ages out");
        }
        info!("stopped: in-flight sends recorded, unsent claims released");
    }
}

async fn sleep_unless_stopping(wait: Duration, shutdown: &watch::Receiver<bool>) {
    let mut stop = shutdown.clone();
    tokio::select! {
        _ = tokio::time::sleep(wait) => {}
        _ = stop.wait_for(|stop| *stop) => {}
    }
}

/// Waits for the signal, or forever when there is none (the poll then wakes the caller).
async fn notified(signal: Option<&Notify>) {
    match signal {
        Some(signal) => signal.notified().await,
        None => std::future::pending().await,
    }
}

/// The current pause, doubling the next one up to [`MAX_PAUSE`].
fn next_pause(pause: &mut Duration) -> Duration {
    let current = *pause;
    *pause = (current * 2).min(MAX_PAUSE);
    current
}

/// How long to sleep before looking again: until the next retry comes due, at most `poll`.
async fn wait_until_due<S: Store>(store: &S, poll: Duration) -> Duration {
    match store.next_due().await {
        Ok(Some(at)) => (at - Utc::now())
            .to_std()
            .unwrap_or(Duration::ZERO)
            .min(poll),
        _ => poll,
    }
}

/// How long a drain waits for the next delivery it put back for a domain's rate, or `None`
/// when none is still queued. Deliveries come due a little after the time this daemon
/// chose for them (a redo of a claim that was early by the rate limiter's clock lands
/// just past it), so work due within [`POSTPONED_SLACK`] of the latest postponement counts
/// as postponed, not as a retry for later.
async fn until_postponed_due<S: Store>(
    store: &S,
    hold_until: Option<DateTime<Utc>>,
) -> Result<Option<Duration>, StoreError> {
    let Some(until) = hold_until else {
        return Ok(None);
    };
    Ok(store
        .next_due()
        .await?
        .filter(|at| *at <= until + POSTPONED_SLACK)
        .map(|at| (at - Utc::now()).to_std().unwrap_or_default()))
}

/// A name for this daemon's leases that no other process shares: host, process and a random
/// suffix (a restarted process may reuse its pid).
fn lease_owner() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".to_string());
    format!("{host}:{}:{:08x}", std::process::id(), fastrand::u32(..))
}
