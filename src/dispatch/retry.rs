//! When to try a failed delivery again: exponential backoff with jitter, capped, for a bounded
//! number of attempts. The defaults live with the configuration (`retry.*`).

use std::time::Duration;

use crate::config::RetrySettings;

#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    settings: RetrySettings,
}

impl RetryPolicy {
    pub fn new(settings: RetrySettings) -> Self {
        Self { settings }
    }

    /// The wait before the next attempt, given how many attempts have now been made; `None`
    /// once `max_attempts` is reached.
    ///
    /// The nominal delay doubles from `initial_backoff` up to `max_backoff`; the actual delay
    /// is drawn between half and all of it ("equal jitter"), so deliveries that failed together
    /// (a relay restart) do not all come back in the same second.
    pub fn delay_after(&self, attempts_made: u32) -> Option<Duration> {
        if attempts_made >= self.settings.max_attempts.get() {
            return None;
        }
        let doublings = attempts_made.saturating_sub(1).min(32);
        let nominal = self
            .settings
            .initial_backoff
            .saturating_mul(1 << doublings)
            .min(self.settings.max_backoff);
        let half = nominal / 2;
        let jitter = Duration::from_nanos(fastrand::u64(..=(nominal - half).as_nanos() as u64));
        Some(half + jitter)
    }

    pub fn max_attempts(&self) -> u32 {
        self.settings.max_attempts.get()
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;

    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy::new(RetrySettings {
            max_attempts: NonZeroU32::new(5).unwrap(),
            initial_backoff: Duration::from_secs(30),
            max_backoff: Duration::from_secs(100),
        })
    }

    #[test]
    fn doubles_within_jitter_and_caps() {
        let policy = policy();
        for _ in 0..200 {
            let first = policy.delay_after(1).unwrap();
            assert!((Duration::from_secs(15)..=Duration::from_secs(30)).contains(&first));
            let second = policy.delay_after(2).unwrap();
            assert!((Duration::from_secs(30)..=Duration::from_secs(60)).contains(&second));
            let capped = policy.delay_after(4).unwrap();
            assert!((Duration::from_secs(50)..=Duration::from_secs(100)).contains(&capped));
        }
    }

    #[test]
    fn gives_up_at_max_attempts() {
        assert!(policy().delay_after(4).is_some());
        assert_eq!(policy().delay_after(5), None);
    }
}
