//! When to try a failed delivery again, after Postfix's queue manager and RFC 5321 section
//! 4.5.4.1: exponential backoff with jitter up to a cap, and a maximum age after which the
//! delivery is dead, however many attempts that allowed. A count limit can be set as well.
//! The defaults live with the configuration (`retry.*`).

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::config::RetrySettings;

#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    settings: RetrySettings,
}

/// What to do after a temporary failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AfterFailure {
    RetryAt(DateTime<Utc>),
    /// Dead; the text says which limit ended it.
    GiveUp(String),
}

impl RetryPolicy {
    pub fn new(settings: RetrySettings) -> Self {
        Self { settings }
    }

    /// The last moment a delivery queued at `queued_at` may be sent.
    pub fn deadline(&self, queued_at: DateTime<Utc>) -> DateTime<Utc> {
        queued_at + self.settings.max_age
    }

    /// Why a delivery queued at `queued_at` may no longer be sent at `now`, if so: it was not
    /// even tried within one maximum backoff past its deadline (the relay was unreachable all
    /// along). The slack lets the last retry, which is placed at the deadline, still be made.
    pub fn expired(&self, queued_at: DateTime<Utc>, now: DateTime<Utc>) -> Option<String> {
        (now >= self.deadline(queued_at) + self.settings.max_backoff).then(|| self.too_old())
    }

    fn too_old(&self) -> String {
        format!(
            "not delivered within {} of being queued (retry.max_age)",
            describe(self.settings.max_age)
        )
    }

    /// Decides after a temporary failure, given how many attempts have now been made.
    ///
    /// The nominal delay doubles from `initial_backoff` up to `max_backoff`; the actual delay
    /// is drawn between half and all of it ("equal jitter"), so deliveries that failed together
    /// (a relay restart) do not all come back in the same second. The last retry is placed at
    /// the deadline rather than after it, so a delivery gets its final chance before it expires.
    pub fn after_failure(
        &self,
        attempts_made: u32,
        queued_at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> AfterFailure {
        if let Some(max) = self.settings.max_attempts
            && attempts_made >= max.get()
        {
            return AfterFailure::GiveUp(format!(
                "gave up after {attempts_made} attempts (retry.max_attempts)"
            ));
        }
        if now >= self.deadline(queued_at) {
            return AfterFailure::GiveUp(format!(
                "gave up after {attempts_made} attempts: {}",
                self.too_old()
            ));
        }
        let next = now + self.delay_after(attempts_made);
        AfterFailure::RetryAt(next.min(self.deadline(queued_at)))
    }

    fn delay_after(&self, attempts_made: u32) -> Duration {
        let doublings = attempts_made.saturating_sub(1).min(31);
        let nominal = self
            .settings
            .initial_backoff
            .saturating_mul(1 << doublings)
            .min(self.settings.max_backoff);
        let half = nominal / 2;
        half + Duration::from_nanos(fastrand::u64(..=(nominal - half).as_nanos() as u64))
    }
}

/// `5d`, `90m`, `30s`: the largest whole unit, as durations are written in the configuration.
fn describe(duration: Duration) -> String {
    let seconds = duration.as_secs();
    match seconds {
        0 => format!("{}ms", duration.as_millis()),
        s if s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;

    use chrono::TimeDelta;

    use super::*;

    fn policy(max_attempts: Option<u32>) -> RetryPolicy {
        RetryPolicy::new(RetrySettings {
            max_attempts: max_attempts.and_then(NonZeroU32::new),
            initial_backoff: Duration::from_secs(30),
            max_backoff: Duration::from_secs(100),
            max_age: Duration::from_secs(3600),
        })
    }

    fn retry_in(policy: &RetryPolicy, attempts: u32) -> Duration {
        let now = Utc::now();
        match policy.after_failure(attempts, now, now) {
            AfterFailure::RetryAt(at) => (at - now).to_std().unwrap(),
            AfterFailure::GiveUp(reason) => panic!("gave up: {reason}"),
        }
    }

    #[test]
    fn doubles_within_jitter_and_caps() {
        let policy = policy(None);
        for _ in 0..200 {
            let first = retry_in(&policy, 1);
            assert!((Duration::from_secs(15)..=Duration::from_secs(30)).contains(&first));
            let second = retry_in(&policy, 2);
            assert!((Duration::from_secs(30)..=Duration::from_secs(60)).contains(&second));
            let capped = retry_in(&policy, 40);
            assert!((Duration::from_secs(50)..=Duration::from_secs(100)).contains(&capped));
        }
    }

    #[test]
    fn gives_up_at_max_attempts_when_one_is_set() {
        let now = Utc::now();
        assert!(matches!(
            policy(Some(5)).after_failure(4, now, now),
            AfterFailure::RetryAt(_)
        ));
        assert_eq!(
            policy(Some(5)).after_failure(5, now, now),
            AfterFailure::GiveUp("gave up after 5 attempts (retry.max_attempts)".into())
        );
        assert!(matches!(
            policy(None).after_failure(500, now, now),
            AfterFailure::RetryAt(_)
        ));
    }

    #[test]
    fn the_last_retry_is_at_the_deadline_and_a_failure_after_it_is_final() {
        let policy = policy(None);
        let queued = Utc::now();
        let near_the_end = queued + TimeDelta::seconds(3590);
        assert_eq!(
            policy.after_failure(9, queued, near_the_end),
            AfterFailure::RetryAt(queued + TimeDelta::seconds(3600))
        );
        assert_eq!(
            policy.after_failure(10, queued, queued + TimeDelta::seconds(3600)),
            AfterFailure::GiveUp(
                "gave up after 10 attempts: not delivered within 1h of being queued \
                 (retry.max_age)"
                    .into()
            )
        );
        // The last retry, placed at the deadline, is still made a little after it; a delivery
        // not tried by one maximum backoff past the deadline has expired.
        assert_eq!(
            policy.expired(queued, queued + TimeDelta::seconds(3650)),
            None
        );
        assert!(
            policy
                .expired(queued, queued + TimeDelta::seconds(3700))
                .is_some()
        );
    }
}
