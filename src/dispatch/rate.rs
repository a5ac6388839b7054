//! Rate limits: one over everything the daemons on a database send, and one per recipient
//! domain, because large mailbox providers throttle per domain. Both are divided among the
//! live daemons, so that the configured figures hold for all of them together.
//!
//! The global limit is waited for. A domain's limit is not: a delivery whose domain has no
//! slot free is put back with the time one frees up, and the sender goes on with the next, so
//! a throttled domain never holds up the others.

use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::config::{Rate, RateLimitSettings};

pub struct RateLimits {
    settings: RateLimitSettings,
    sharing_with: u32,
    global: DefaultDirectRateLimiter,
    /// Domains without a rate of their own, when `rate_limit.per_domain` is set.
    per_domain: Option<DefaultKeyedRateLimiter<String>>,
    /// Domains listed in `rate_limit.domains`.
    listed: HashMap<String, DefaultDirectRateLimiter>,
    clock: DefaultClock,
}

impl RateLimits {
    pub fn new(settings: RateLimitSettings) -> Self {
        let mut limits = Self {
            global: RateLimiter::direct(share_of(settings.global, 1)),
            per_domain: None,
            listed: HashMap::new(),
            sharing_with: 1,
            settings,
            clock: DefaultClock::default(),
        };
        limits.build_domain_limits();
        limits
    }

    /// Divides every rate among `daemons` daemons (this one included). Changing the division
    /// starts the limiters afresh.
    pub fn share_with(&mut self, daemons: u32) {
        let daemons = daemons.max(1);
        if daemons != self.sharing_with {
            self.sharing_with = daemons;
            self.global = RateLimiter::direct(share_of(self.settings.global, daemons));
            self.build_domain_limits();
        }
    }

    fn build_domain_limits(&mut self) {
        let daemons = self.sharing_with;
        self.per_domain = self
            .settings
            .per_domain
            .map(|rate| RateLimiter::keyed(share_of(rate, daemons)));
        self.listed = share_each(&self.settings.domains, daemons);
    }

    /// Waits until the global rate allows one more message.
    pub async fn until_global_ready(&self) {
        self.global.until_ready().await;
    }

    /// Takes one of `domain`'s slots now; or, when none is free, how long until one is and
    /// how far apart the following slots are.
    pub fn take_domain_slot(&self, domain: &str) -> Result<(), DomainWait> {
        let (checked, rate) = if let Some(limiter) = self.listed.get(domain) {
            (limiter.check(), self.settings.domains[domain])
        } else if let (Some(keyed), Some(rate)) = (&self.per_domain, self.settings.per_domain) {
            (keyed.check_key(&domain.to_string()), rate)
        } else {
            return Ok(());
        };
        checked.map_err(|until| DomainWait {
            first: until.wait_time_from(self.clock.now()),
            spacing: share_of(rate, self.sharing_with).replenish_interval(),
        })
    }

    /// Forgets domains not seen lately, so that the table of domains stays small.
    pub fn forget_idle_domains(&self) {
        if let Some(keyed) = &self.per_domain {
            keyed.retain_recent();
        }
    }
}

/// When a domain's next slots free up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DomainWait {
    /// Until the first free slot.
    pub first: Duration,
    /// Between the slots after it.
    pub spacing: Duration,
}

fn share_each(
    domains: &BTreeMap<String, Rate>,
    daemons: u32,
) -> HashMap<String, DefaultDirectRateLimiter> {
    domains
        .iter()
        .map(|(domain, rate)| {
            (
                domain.clone(),
                RateLimiter::direct(share_of(*rate, daemons)),
            )
        })
        .collect()
}

/// One daemon's share of a rate: `per_second / daemons` (one message every
/// `daemons / per_second` seconds) and `burst / daemons`, at least one.
pub fn share_of(rate: Rate, daemons: u32) -> Quota {
    let period = Duration::from_secs_f64(f64::from(daemons) / f64::from(rate.per_second.get()));
    let burst = NonZeroU32::new(rate.burst.get() / daemons).unwrap_or(NonZeroU32::MIN);
    Quota::with_period(period.max(Duration::from_nanos(1)))
        .expect("a positive period")
        .allow_burst(burst)
}

/// The domain of an address, as rate limits are keyed: lower-case ASCII.
pub fn recipient_domain(address: &str) -> String {
    address
        .rsplit_once('@')
        .map_or(address, |(_, domain)| domain)
        .to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(per_second: u32, burst: u32) -> Rate {
        Rate {
            per_second: NonZeroU32::new(per_second).unwrap(),
            burst: NonZeroU32::new(burst).unwrap(),
        }
    }

    #[test]
    fn a_rate_is_divided_among_the_daemons() {
        let alone = share_of(rate(30, 9), 1);
        assert_eq!(alone.replenish_interval(), Duration::from_secs(1) / 30);
        assert_eq!(alone.burst_size().get(), 9);

        let one_of_three = share_of(rate(30, 9), 3);
        assert_eq!(
            one_of_three.replenish_interval(),
            Duration::from_secs(1) / 10
        );
        assert_eq!(one_of_three.burst_size().get(), 3);

        // Fewer messages per second than daemons: one message every few seconds each.
        let sparse = share_of(rate(1, 1), 4);
        assert_eq!(sparse.replenish_interval(), Duration::from_secs(4));
        assert_eq!(sparse.burst_size().get(), 1);
    }

    #[test]
    fn each_domain_has_its_own_slots_and_a_full_domain_says_when() {
        let limits = RateLimits::new(RateLimitSettings {
            global: rate(1000, 1000),
            per_domain: Some(rate(2, 2)),
            domains: [("big.example".to_string(), rate(1, 1))].into(),
        });
        // The default per-domain rate: a burst of two, then a wait of about half a second.
        assert_eq!(limits.take_domain_slot("a.example"), Ok(()));
        assert_eq!(limits.take_domain_slot("a.example"), Ok(()));
        let wait = limits.take_domain_slot("a.example").unwrap_err();
        assert!(wait.first <= Duration::from_millis(500), "{wait:?}");
        assert_eq!(wait.spacing, Duration::from_millis(500));
        // Another domain is not affected.
        assert_eq!(limits.take_domain_slot("b.example"), Ok(()));
        // A listed domain has its own rate.
        assert_eq!(limits.take_domain_slot("big.example"), Ok(()));
        let wait = limits.take_domain_slot("big.example").unwrap_err();
        assert_eq!(wait.spacing, Duration::from_secs(1));
    }

    #[test]
    fn without_a_per_domain_rate_only_listed_domains_are_limited() {
        let limits = RateLimits::new(RateLimitSettings {
            global: rate(1000, 1000),
            per_domain: None,
            domains: [("big.example".to_string(), rate(1, 1))].into(),
        });
        for _ in 0..100 {
            assert_eq!(limits.take_domain_slot("a.example"), Ok(()));
        }
        assert_eq!(limits.take_domain_slot("big.example"), Ok(()));
        assert!(limits.take_domain_slot("big.example").is_err());
    }

    #[test]
    fn the_domain_is_the_lower_case_part_after_the_last_at() {
        assert_eq!(recipient_domain("Dana@Acme.Example"), "acme.example");
        assert_eq!(recipient_domain("\"a@b\"@x.example"), "x.example");
    }
}
