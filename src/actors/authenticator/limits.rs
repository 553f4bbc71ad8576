//! [`AuthLimits`]: the credential-attack limits the authenticators apply before
//! any password is hashed or verified:
//!
//! - SignIn attempts per client address (a GCRA token bucket, `governor`);
//! - failed SignIns per username, with exponential backoff: after
//!   `auth.sign_in_free_failures` attempts in a row without a success, each further
//!   attempt must wait `sign_in_backoff_base_ms`, doubling up to
//!   `sign_in_backoff_max_ms`;
//! - SignUps per client address.
//!
//! A refusal is `resource_exhausted` with the delay in its message and as the
//! error's retry hint. The state is in memory, per node: a restart forgets it, and
//! behind several nodes an attacker gets each node's allowance.
//!
//! The client address ([`ClientAddr`]) is decided by the HTTP layer when it builds
//! it (`crate::http::client_addr`): the TCP peer's, or the forwarded one when the
//! peer is one of `server.trusted_proxies`.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv6Addr},
    num::NonZeroU32,
    sync::{Mutex, PoisonError},
    time::{Duration, Instant},
};

use governor::{clock::Clock as _, DefaultKeyedRateLimiter, Quota};

use crate::{error::ApiError, settings::AuthSettings};

/// Usernames whose failures are tracked before expired entries are swept; past
/// twice this the oldest half is dropped (the per-address limit still applies).
const TRACKED_USERNAMES_SWEEP_AT: usize = 50_000;
/// Addresses the per-address limiters remember before idle ones are swept.
const TRACKED_ADDRESSES_SWEEP_AT: usize = 50_000;

/// The address a request came from, as far as the server can tell. Built by the
/// HTTP layer from the connection's peer address; `None` when unknown (e.g. a
/// Unix socket), which no per-address limit applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ClientAddr(pub Option<IpAddr>);

impl ClientAddr {
    /// The key the per-address limits count under: IPv4 addresses as they are
    /// (IPv4-mapped IPv6 ones too), IPv6 addresses by their /64, which is what one
    /// subscriber usually gets.
    fn limit_key(self) -> Option<IpAddr> {
        match self.0? {
            IpAddr::V4(v4) => Some(IpAddr::V4(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Some(IpAddr::V4(v4)),
                None => {
                    let mut segments = v6.segments();
                    segments[4..].fill(0);
                    Some(IpAddr::V6(Ipv6Addr::from(segments)))
                }
            },
        }
    }
}

/// The limits of one server (shared by its authenticators).
pub struct AuthLimits {
    sign_in_per_addr: Option<DefaultKeyedRateLimiter<IpAddr>>,
    sign_up_per_addr: Option<DefaultKeyedRateLimiter<IpAddr>>,
    accounts: Mutex<HashMap<String, Attempts>>,
    free_failures: u32,
    backoff_base: Duration,
    backoff_max: Duration,
    failure_memory: Duration,
}

/// The SignIn attempts of one username since its last success.
#[derive(Debug, Clone, Copy)]
struct Attempts {
    /// Attempts without a success (counted when they start, so concurrent guesses
    /// cannot all slip through before the first one fails).
    count: u32,
    last: Instant,
    /// No attempt before this.
    blocked_until: Option<Instant>,
}

impl AuthLimits {
    pub fn new(settings: &AuthSettings) -> Self {
        let limiter = |rate: u32, burst: u32, per: fn(NonZeroU32) -> Quota| {
            let rate = NonZeroU32::new(rate)?;
            let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
            Some(DefaultKeyedRateLimiter::keyed(per(rate).allow_burst(burst)))
        };
        Self {
            sign_in_per_addr: limiter(
                settings.sign_in_ip_per_minute,
                settings.sign_in_ip_burst,
                Quota::per_minute,
            ),
            sign_up_per_addr: limiter(
                settings.sign_up_ip_per_hour,
                settings.sign_up_ip_burst,
                Quota::per_hour,
            ),
            accounts: Mutex::new(HashMap::new()),
            free_failures: settings.sign_in_free_failures,
            backoff_base: Duration::from_millis(settings.sign_in_backoff_base_ms),
            backoff_max: Duration::from_millis(settings.sign_in_backoff_max_ms),
            failure_memory: Duration::from_secs(settings.sign_in_failure_memory_secs),
        }
    }

    /// Counts a SignIn attempt from `addr`; `resource_exhausted` past the rate.
    pub fn sign_in_from(&self, addr: ClientAddr) -> Result<(), ApiError> {
        check_addr(
            self.sign_in_per_addr.as_ref(),
            addr,
            "sign_in_per_ip",
            "too many sign-in attempts from your address",
        )
    }

    /// Counts a SignUp from `addr`; `resource_exhausted` past the rate.
    pub fn sign_up_from(&self, addr: ClientAddr) -> Result<(), ApiError> {
        check_addr(
            self.sign_up_per_addr.as_ref(),
            addr,
            "sign_up_per_ip",
            "too many accounts created from your address",
        )
    }

    /// Counts a SignIn attempt for `username` (normalised, whether it exists or
    /// not, so the answer does not tell); `resource_exhausted` while the username
    /// must wait. [`AuthLimits::signed_in`] clears the count.
    pub fn sign_in_as(&self, username: &str) -> Result<(), ApiError> {
        if self.free_failures == 0 {
            return Ok(());
        }
        let now = Instant::now();
        let mut accounts = self.accounts.lock().unwrap_or_else(PoisonError::into_inner);
        if accounts.len() >= TRACKED_USERNAMES_SWEEP_AT {
            self.sweep(&mut accounts, now);
        }
        let attempts = accounts.entry(username.to_owned()).or_insert(Attempts {
            count: 0,
            last: now,
            blocked_until: None,
        });
        if now.duration_since(attempts.last) > self.failure_memory {
            *attempts = Attempts {
                count: 0,
                last: now,
                blocked_until: None,
            };
        }
        if let Some(until) = attempts.blocked_until.filter(|until| *until > now) {
            return Err(exhausted(
                "sign_in_backoff",
                "too many failed sign-ins for this account",
                until - now,
            ));
        }
        attempts.count = attempts.count.saturating_add(1);
        attempts.last = now;
        if attempts.count >= self.free_failures {
            attempts.blocked_until = Some(now + self.backoff(attempts.count));
        }
        Ok(())
    }

    /// A successful sign-in: `username` starts from zero again.
    pub fn signed_in(&self, username: &str) {
        self.accounts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(username);
    }

    /// The wait after the `count`-th attempt without a success (`count` ≥ the free
    /// failures): base, 2 × base, 4 × base, ... at most the maximum.
    fn backoff(&self, count: u32) -> Duration {
        let doublings = count.saturating_sub(self.free_failures).min(30);
        self.backoff_base
            .saturating_mul(1u32 << doublings)
            .min(self.backoff_max)
    }

    /// Drops usernames whose failures are forgotten; if still too many, the
    /// oldest half.
    fn sweep(&self, accounts: &mut HashMap<String, Attempts>, now: Instant) {
        accounts.retain(|_, a| {
            now.duration_since(a.last) <= self.failure_memory
                || a.blocked_until.is_some_and(|until| until > now)
        });
        if accounts.len() >= 2 * TRACKED_USERNAMES_SWEEP_AT {
            let mut lasts: Vec<Instant> = accounts.values().map(|a| a.last).collect();
            lasts.sort_unstable();
            let cut = lasts[lasts.len() / 2];
            accounts.retain(|_, a| a.last > cut);
        }
    }
}

fn check_addr(
    limiter: Option<&DefaultKeyedRateLimiter<IpAddr>>,
    addr: ClientAddr,
    rule: &'static str,
    what: &str,
) -> Result<(), ApiError> {
    let (Some(limiter), Some(key)) = (limiter, addr.limit_key()) else {
        return Ok(());
    };
    if limiter.len() >= TRACKED_ADDRESSES_SWEEP_AT {
        limiter.retain_recent();
    }
    limiter.check_key(&key).map_err(|not_until| {
        let wait = not_until.wait_time_from(limiter.clock().now());
        exhausted(rule, what, wait)
    })
}

/// `resource_exhausted` saying how long to wait (rounded up to whole seconds),
/// counted under `rule` (`roomcast_rate_limited_total{rule}`).
fn exhausted(rule: &'static str, what: &str, wait: Duration) -> ApiError {
    crate::metrics::metrics().limited(rule);
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    let secs = secs.max(1);
    ApiError::exhausted(format!("{what}; retry in {secs} s"))
        .with_retry_after(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> AuthSettings {
        AuthSettings {
            sign_in_ip_per_minute: 2,
            sign_in_ip_burst: 2,
            sign_in_free_failures: 3,
            sign_in_backoff_base_ms: 1_000,
            sign_in_backoff_max_ms: 5_000,
            ..AuthSettings::default()
        }
    }

    #[test]
    fn ipv6_addresses_count_per_64_and_mapped_ipv4_as_ipv4() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().expect("ip");
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().expect("ip");
        let c: IpAddr = "2001:db8:1:3::1".parse().expect("ip");
        assert_eq!(
            ClientAddr(Some(a)).limit_key(),
            ClientAddr(Some(b)).limit_key()
        );
        assert_ne!(
            ClientAddr(Some(a)).limit_key(),
            ClientAddr(Some(c)).limit_key()
        );
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().expect("ip");
        assert_eq!(
            ClientAddr(Some(mapped)).limit_key(),
            Some("192.0.2.7".parse().expect("ip"))
        );
        assert_eq!(ClientAddr(None).limit_key(), None);
    }

    #[test]
    fn per_address_limit_answers_a_retry_delay() {
        let limits = AuthLimits::new(&settings());
        let addr = ClientAddr(Some("192.0.2.1".parse().expect("ip")));
        limits.sign_in_from(addr).expect("first");
        limits.sign_in_from(addr).expect("second (burst)");
        let refused = limits.sign_in_from(addr).expect_err("third");
        assert!(refused.message.contains("retry in"), "{}", refused.message);
        assert!(refused.retry_after.is_some());
        // Another address is not affected; an unknown one is not limited.
        limits
            .sign_in_from(ClientAddr(Some("192.0.2.2".parse().expect("ip"))))
            .expect("other address");
        for _ in 0..5 {
            limits
                .sign_in_from(ClientAddr(None))
                .expect("unknown address");
        }
    }

    #[test]
    fn account_backoff_doubles_up_to_the_maximum_and_a_success_resets_it() {
        let limits = AuthLimits::new(&settings());
        assert_eq!(limits.backoff(3), Duration::from_secs(1));
        assert_eq!(limits.backoff(4), Duration::from_secs(2));
        assert_eq!(limits.backoff(5), Duration::from_secs(4));
        assert_eq!(limits.backoff(6), Duration::from_secs(5));
        assert_eq!(limits.backoff(u32::MAX), Duration::from_secs(5));
        limits.sign_in_as("alice").expect("1");
        limits.sign_in_as("alice").expect("2");
        limits.sign_in_as("alice").expect("3");
        let refused = limits.sign_in_as("alice").expect_err("4th waits");
        assert_eq!(refused.retry_after, Some(Duration::from_secs(1)));
        limits.sign_in_as("bob").expect("another account");
        limits.signed_in("alice");
        limits.sign_in_as("alice").expect("after a success");
    }
}
