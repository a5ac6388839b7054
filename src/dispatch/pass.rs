//! The two hand-offs inside one sending pass: claimed deliveries go from the claimer to the
//! connections through a [`Queue`], and outcomes go from the connections to the committer
//! through a [`Recorder`]. Both let each side work while the other waits on the database.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use chrono::{DateTime, Utc};
use tokio::sync::{Notify, Semaphore, oneshot};

use crate::store::{AttemptRecord, ClaimedDelivery, StoreError};

/// What the committer answers a connection for one attempt: whether it was recorded.
pub(super) type Committed = Result<(), StoreError>;

/// What the committer does as soon as an attempt is recorded, told whether the lease was
/// still held: log it, so that the log line never waits for the connection's next message.
pub(super) type OnCommit = Box<dyn FnOnce(&AttemptRecord, bool) + Send>;

/// An attempt on its way to the database, and who waits to hear it was recorded.
pub(super) type Unrecorded = (i64, AttemptRecord, OnCommit, oneshot::Sender<Committed>);

/// Attempts waiting for the committer, each with the channel its connection waits on.
#[derive(Default)]
pub(super) struct Recorder {
    unrecorded: Mutex<Vec<Unrecorded>>,
    arrived: Notify,
    /// The connections have stopped: the committer commits what is left and ends.
    closed: AtomicBool,
}

impl Recorder {
    pub(super) fn record(
        &self,
        delivery_id: i64,
        record: AttemptRecord,
        on_commit: OnCommit,
    ) -> oneshot::Receiver<Committed> {
        let (done, committed) = oneshot::channel();
        self.lock().push((delivery_id, record, on_commit, done));
        self.arrived.notify_one();
        committed
    }

    pub(super) fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.arrived.notify_one();
    }

    /// The attempts recorded since the last call, waiting while there are none; `None` once
    /// the connections have stopped and every attempt was taken.
    pub(super) async fn next_batch(&self) -> Option<Vec<Unrecorded>> {
        loop {
            // Read before taking: nothing is recorded after closing, so a take that follows
            // a close it saw gets everything that is left.
            let closed = self.closed.load(Ordering::SeqCst);
            let batch = std::mem::take(&mut *self.lock());
            if !batch.is_empty() {
                return Some(batch);
            }
            if closed {
                return None;
            }
            self.arrived.notified().await;
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Unrecorded>> {
        self.unrecorded
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// The most claims one sending pass makes before it returns to its caller, which between
/// passes takes in changes such as the number of daemons sharing the rate limit.
pub(super) const CLAIMS_PER_PASS: u32 = 20;

/// One claimed batch, less the deliveries put back for their domain's rate.
pub(super) struct ClaimedBatch {
    pub(super) deliveries: VecDeque<ClaimedDelivery>,
    /// The claim returned as many as it asked for: more may be due.
    pub(super) full: bool,
    pub(super) postponed_until: Option<DateTime<Utc>>,
}

/// The deliveries claimed in one pass and not yet taken, shared by the connections that send
/// them and the claimer that refills it.
pub(super) struct Queue {
    state: Mutex<QueueState>,
    /// One permit per queued delivery. Closed once no more will be claimed, so that a
    /// connection waiting for work then takes what is left and stops.
    ready: Semaphore,
    /// Wakes the claimer when fewer than `low_water` deliveries wait.
    running_low: Notify,
    low_water: usize,
    /// The batch stops: nothing more is taken or claimed.
    halted: AtomicBool,
}

struct QueueState {
    deliveries: VecDeque<ClaimedDelivery>,
    /// The last claim was full and not all put back: another claim is worth making.
    more_due: bool,
}

impl Queue {
    pub(super) fn new(first: ClaimedBatch, batch_size: u32) -> Self {
        let queue = Self {
            state: Mutex::new(QueueState {
                deliveries: VecDeque::new(),
                more_due: false,
            }),
            ready: Semaphore::new(0),
            running_low: Notify::new(),
            low_water: (batch_size as usize).div_ceil(2),
            halted: AtomicBool::new(false),
        };
        queue.refill(first);
        queue
    }

    pub(super) fn refill(&self, batch: ClaimedBatch) {
        let mut state = self.state();
        state.more_due = batch.full && !batch.deliveries.is_empty();
        self.ready.add_permits(batch.deliveries.len());
        state.deliveries.extend(batch.deliveries);
    }

    /// Waits until fewer than half a batch are queued, or the batch halts.
    pub(super) async fn until_running_low(&self) {
        self.running_low.notified().await;
    }

    pub(super) fn wants_more(&self) -> bool {
        self.state().more_due
    }

    /// The next delivery to send, waiting while a claim is under way; `None` once the queue is
    /// empty and no more will be claimed.
    pub(super) async fn next(&self) -> Option<ClaimedDelivery> {
        // A closed semaphore still leaves the deliveries queued before it closed to take.
        if let Ok(permit) = self.ready.acquire().await {
            permit.forget();
        }
        let mut state = self.state();
        let next = state.deliveries.pop_front();
        if state.deliveries.len() < self.low_water {
            self.running_low.notify_one();
        }
        next
    }

    /// Puts back a delivery taken but not attempted; only when the batch stops.
    pub(super) fn give_back(&self, delivery: ClaimedDelivery) {
        self.state().deliveries.push_front(delivery);
    }

    /// No more claims: connections take what is left, then stop.
    pub(super) fn no_more_claims(&self) {
        self.ready.close();
    }

    /// The batch stops: the claimer claims no more and waiting connections wake up.
    pub(super) fn halt(&self) {
        self.halted.store(true, Ordering::Relaxed);
        self.ready.close();
        self.running_low.notify_one();
    }

    fn state(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn halted(&self) -> bool {
        self.halted.load(Ordering::Relaxed)
    }

    /// The deliveries claimed but not taken, to release.
    pub(super) fn unsent(&self) -> Vec<i64> {
        let state = self.state();
        state.deliveries.iter().map(|d| d.id).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::Audience;

    fn delivery(id: i64) -> ClaimedDelivery {
        ClaimedDelivery {
            id,
            outbox_id: 1,
            kind: "vxc.approved".into(),
            audience: Audience::Customer,
            contact_id: "acme-dana".into(),
            recipient_name: "Dana".into(),
            recipient_email: "dana@acme.example".into(),
            attempts: 0,
            last_error: None,
            queued_at: Utc::now(),
            message_id: format!("m{id}"),
            payload: Vec::new(),
            lease_until: Utc::now(),
        }
    }

    fn batch(ids: &[i64], full: bool) -> ClaimedBatch {
        ClaimedBatch {
            deliveries: ids.iter().copied().map(delivery).collect(),
            full,
            postponed_until: None,
        }
    }

    async fn ids(queue: &Queue, n: usize) -> Vec<i64> {
        let mut taken = Vec::new();
        for _ in 0..n {
            taken.push(queue.next().await.expect("a delivery").id);
        }
        taken
    }

    #[tokio::test]
    async fn a_refill_wakes_a_connection_waiting_for_work() {
        let queue = Queue::new(batch(&[1, 2], true), 2);
        assert!(queue.wants_more());
        assert_eq!(ids(&queue, 2).await, [1, 2]);
        // The queue ran low, so the claimer is let through at once.
        tokio::time::timeout(std::time::Duration::from_secs(1), queue.until_running_low())
            .await
            .expect("the claimer is woken");
        let (taken, ()) = tokio::join!(queue.next(), async {
            tokio::task::yield_now().await;
            queue.refill(batch(&[3], false));
        });
        assert_eq!(taken.map(|d| d.id), Some(3));
        assert!(
            !queue.wants_more(),
            "a short claim means nothing more is due"
        );
    }

    #[tokio::test]
    async fn after_the_last_claim_what_is_queued_is_taken_then_nothing() {
        let queue = Queue::new(batch(&[1, 2, 3], true), 3);
        queue.no_more_claims();
        assert_eq!(ids(&queue, 3).await, [1, 2, 3]);
        assert!(queue.next().await.is_none());
    }

    #[tokio::test]
    async fn a_halt_leaves_what_was_not_taken_to_release() {
        let queue = Queue::new(batch(&[1, 2, 3], true), 3);
        let first = queue.next().await.unwrap();
        queue.halt();
        assert!(queue.halted());
        queue.give_back(first);
        assert_eq!(queue.unsent(), [1, 2, 3]);
    }

    #[tokio::test]
    async fn every_attempt_recorded_before_closing_reaches_the_committer() {
        let recorder = Recorder::default();
        let record = || AttemptRecord::Expired {
            error: "too old".into(),
        };
        let _first = recorder.record(1, record(), Box::new(|_, _| {}));
        let _second = recorder.record(2, record(), Box::new(|_, _| {}));
        let batch = recorder.next_batch().await.expect("two attempts");
        assert_eq!(batch.iter().map(|(id, ..)| *id).collect::<Vec<_>>(), [1, 2]);
        let _third = recorder.record(3, record(), Box::new(|_, _| {}));
        recorder.close();
        let last = recorder.next_batch().await.expect("the one before closing");
        assert_eq!(last.len(), 1);
        assert!(recorder.next_batch().await.is_none());
    }
}
