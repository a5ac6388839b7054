//! The pipeline that moves notifications: outbox rows are expanded into deliveries
//! ([`planner`]), due deliveries are rendered and sent ([`sender`]) and failures are scheduled
//! again ([`retry`]). The daemon runs planning and sending side by side; `--drain` runs them in
//! turn until nothing is due.

pub mod planner;
pub mod retry;
pub mod sender;

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::{Notify, watch};
use tracing::{error, info, warn};

use crate::config::Settings;
use crate::render::Renderer;
use crate::store::Store;
pub use sender::{SendError, Sender};

/// The first wait after the transport or the database fails; it doubles up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(500);
const MAX_PAUSE: Duration = Duration::from_secs(60);

/// What one drain did: outbox rows expanded and delivery attempts made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainSummary {
    pub planned: usize,
    pub attempted: usize,
}

/// The dispatcher: one store, one renderer, one sender.
pub struct Dispatcher<S> {
    store: S,
    settings: Arc<Settings>,
    sender: Sender<S>,
}

impl<S: Store> Dispatcher<S> {
    pub fn new(store: S, settings: Arc<Settings>, renderer: Arc<Renderer>) -> Self {
        let sender = Sender::new(store.clone(), settings.clone(), renderer, lease_owner());
        Self {
            store,
            settings,
            sender,
        }
    }

    /// Processes everything that is due now, then returns. Retries scheduled for later are left
    /// for a later run. Fails when the transport is unavailable while deliveries are due.
    pub async fn drain(
        mut self,
        shutdown: watch::Receiver<bool>,
    ) -> Result<DrainSummary, SendError> {
        let mut summary = DrainSummary {
            planned: 0,
            attempted: 0,
        };
        loop {
            let mut planned = 0;
            while !*shutdown.borrow() {
                let decided = planner::plan_pending(&self.store, &self.settings).await?;
                if decided == 0 {
                    break;
                }
                planned += decided;
            }
            let due = self
                .store
                .next_due()
                .await?
                .is_some_and(|at| at <= Utc::now());
            let attempted = if due && !*shutdown.borrow() {
                self.sender.send_due(&shutdown).await?
            } else {
                0
            };
            summary.planned += planned;
            summary.attempted += attempted;
            if (planned == 0 && attempted == 0) || *shutdown.borrow() {
                break;
            }
        }
        self.sender.close().await;
        Ok(summary)
    }

    /// Runs until `shutdown` turns true: planning and sending as two tasks, each waking on
    /// new work or every poll interval. Errors are logged and retried with backoff; this only
    /// returns at shutdown, after in-flight sends are recorded and unsent claims released.
    pub async fn run(self, shutdown: watch::Receiver<bool>) {
        let Self {
            store,
            settings,
            mut sender,
        } = self;
        let planned = Arc::new(Notify::new());
        let poll = settings.database.poll_interval;

        let planning = {
            let (store, settings, planned, mut shutdown) = (
                store.clone(),
                settings.clone(),
                planned.clone(),
                shutdown.clone(),
            );
            tokio::spawn(async move {
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
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = shutdown.wait_for(|stop| *stop) => {}
                    }
                }
            })
        };

        let mut pause = FIRST_PAUSE;
        let mut shutdown_signal = shutdown.clone();
        while !*shutdown.borrow() {
            let wait = match sender.send_due(&shutdown).await {
                Ok(0) => {
                    pause = FIRST_PAUSE;
                    wait_until_due(&store, poll).await
                }
                Ok(_) => {
                    pause = FIRST_PAUSE;
                    continue;
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
                _ = shutdown_signal.wait_for(|stop| *stop) => {}
            }
        }
        sender.close().await;
        if let Err(err) = planning.await {
            error!(error = %err, "planning task ended abnormally");
        }
        info!("stopped: in-flight sends recorded, unsent claims released");
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

/// A name for this daemon's leases that no other process shares: host, process and a random
/// suffix (a restarted process may reuse its pid).
fn lease_owner() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".to_string());
    format!("{host}:{}:{:08x}", std::process::id(), fastrand::u32(..))
}
