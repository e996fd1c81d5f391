//! Per-key token-bucket rate limiting for gateway routes (keys: client IP, API key name, JWT
//! subject, a header value), and the values of the 429 response's headers.
//!
//! The bucket is kept in its GCRA form: one "theoretical arrival time" (TAT) per key instead of a
//! token count and a timestamp. It is the same token bucket (rate `r`, capacity `burst`), but the
//! arithmetic is on integer nanoseconds, so refill is exact and an idle key whose TAT has passed is
//! indistinguishable from an absent one (which makes eviction free of side effects).
//!
//! Response headers follow draft-ietf-httpapi-ratelimit-headers-06 (the separate `RateLimit-Limit`,
//! `RateLimit-Remaining`, `RateLimit-Reset` and `RateLimit-Policy` fields): it is the draft most
//! clients and libraries implement today; the later drafts' combined `RateLimit` field is not
//! emitted.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hash};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Number of independently locked shards: enough that 2-16 worker threads rarely contend, small
/// enough that the per-shard key bound stays meaningful for small `max_keys`.
const SHARDS: usize = 16;

/// Why a limiter could not be built: a route's limit must be usable, so bad numbers are refused
/// when the configuration is loaded rather than discovered per request.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LimiterError {
    /// The refill rate must be a positive, finite number of requests per second.
    #[error("rate must be a positive finite number of requests per second, got {0}")]
    Rate(f64),
    /// A burst of 0 would refuse every request; use no limit or a deny route instead.
    #[error("burst must be at least 1")]
    Burst,
    /// At least one key must fit, or no key could ever be limited.
    #[error("max_keys must be at least 1")]
    MaxKeys,
}

/// The outcome of one [`Limiter::check`]: whether to serve the request and what to tell the
/// client about its quota (the phase after this one turns it into headers or a 429).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Serve the request (`true`) or answer 429 (`false`).
    pub allowed: bool,
    /// Requests the key could still make right now, after this one.
    pub remaining: u32,
    /// How long until one more request would be allowed; zero when `allowed`.
    pub retry_after: Duration,
    /// How long until the bucket is full again (the whole burst available).
    pub reset: Duration,
}

/// One token bucket per key, shared by all of a route's connections (`&self`, internally locked).
///
/// Memory is bounded by `max_keys`: when a shard is full, buckets that have refilled completely
/// (identical to a new key) are dropped first; if none has, the bucket nearest to full is dropped,
/// which can only make the limiter more lenient for that one key, never stricter.
pub struct Limiter<K> {
    /// Nanoseconds to earn one token (`1 / rate`), at least 1.
    interval: Duration,
    /// The bucket's capacity.
    burst: u32,
    /// `interval * burst`: how far a key's TAT may run ahead of now and still be allowed.
    tolerance: Duration,
    /// The most keys kept by each shard (the sum over shards is `max_keys`).
    shard_caps: Vec<usize>,
    /// Shard selection; keyed at random per limiter so clients cannot aim at one shard.
    hasher: RandomState,
    shards: Vec<Mutex<HashMap<K, Instant>>>,
}

impl<K: Hash + Eq + Clone> Limiter<K> {
    /// A limiter that lets each key make `burst` requests at once and then `rate_per_sec` per
    /// second on average, remembering at most `max_keys` keys.
    pub fn new(rate_per_sec: f64, burst: u32, max_keys: usize) -> Result<Self, LimiterError> {
        Self::with_shards(rate_per_sec, burst, max_keys, SHARDS)
    }

    /// [`Limiter::new`] with a chosen shard count (tests use one shard to make eviction
    /// deterministic).
    fn with_shards(
        rate_per_sec: f64,
        burst: u32,
        max_keys: usize,
        shards: usize,
    ) -> Result<Self, LimiterError> {
        if !rate_per_sec.is_finite() || rate_per_sec <= 0.0 {
            return Err(LimiterError::Rate(rate_per_sec));
        }
        if burst == 0 {
            return Err(LimiterError::Burst);
        }
        if max_keys == 0 {
            return Err(LimiterError::MaxKeys);
        }
        let interval = Duration::from_secs_f64(1.0 / rate_per_sec).max(Duration::from_nanos(1));
        let shards = shards.clamp(1, max_keys);
        let shard_caps = (0..shards)
            .map(|i| max_keys / shards + usize::from(i < max_keys % shards))
            .collect();
        Ok(Self {
            interval,
            burst,
            tolerance: interval.saturating_mul(burst),
            shard_caps,
            hasher: RandomState::new(),
            shards: (0..shards).map(|_| Mutex::new(HashMap::new())).collect(),
        })
    }

    /// The bucket's capacity, for `RateLimit-Limit` and `RateLimit-Policy`.
    pub fn burst(&self) -> u32 {
        self.burst
    }

    /// The time the bucket takes to refill from empty: the policy's window.
    pub fn window(&self) -> Duration {
        self.tolerance
    }

    /// Take one token from `key`'s bucket at time `now`, if there is one.
    ///
    /// `now` is passed in so tests (and a caller that reads the clock once per request) control
    /// time; a `now` earlier than a previous call's is treated as that earlier call's time, so a
    /// non-monotonic caller cannot earn tokens.
    pub fn check(&self, key: &K, now: Instant) -> Decision {
        let index = (self.hasher.hash_one(key) as usize) % self.shards.len();
        // A poisoned shard only means another thread panicked mid-update of plain data; the map
        // is still consistent (every write is a single insert), so keep limiting.
        let mut shard = self.shards[index]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let stored = shard.get(key).copied();
        let tat = stored.map_or(now, |t| t.max(now));
        let new_tat = tat + self.interval;
        // Allowed when the new TAT is no more than `tolerance` ahead of now.
        let ahead = new_tat.saturating_duration_since(now);
        if ahead > self.tolerance {
            return Decision {
                allowed: false,
                remaining: 0,
                retry_after: ahead - self.tolerance,
                reset: tat.saturating_duration_since(now),
            };
        }
        if stored.is_none() && shard.len() >= self.shard_caps[index] {
            evict(&mut shard, now);
        }
        shard.insert(key.clone(), new_tat);
        let slack = self.tolerance - ahead;
        Decision {
            allowed: true,
            remaining: u32::try_from(slack.as_nanos() / self.interval.as_nanos())
                .unwrap_or(u32::MAX),
            retry_after: Duration::ZERO,
            reset: ahead,
        }
    }

    /// Keys currently remembered (for metrics and the eviction tests).
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }

    /// Whether no key is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Make room for one key in a full shard: drop every bucket that is full again (its TAT has
/// passed, so forgetting it changes nothing); if none is, drop the one closest to full.
fn evict<K: Hash + Eq + Clone>(shard: &mut HashMap<K, Instant>, now: Instant) {
    let before = shard.len();
    shard.retain(|_, tat| *tat > now);
    if shard.len() < before {
        return;
    }
    if let Some(key) = shard
        .iter()
        .min_by_key(|(_, tat)| **tat)
        .map(|(k, _)| k.clone())
    {
        shard.remove(&key);
    }
}

/// `Retry-After` in whole seconds (RFC 9110 §10.2.3 allows no fractions): rounded up so a client
/// that waits exactly that long is allowed, and at least 1 so a client never retries at once.
pub fn retry_after_secs(retry_after: Duration) -> u64 {
    ceil_secs(retry_after).max(1)
}

fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// The response headers for a decision (draft-ietf-httpapi-ratelimit-headers-06), to add to
/// every response of a limited route, and `Retry-After` on a 429.
///
/// `RateLimit-Limit` is the burst; `RateLimit-Policy` is `<burst>;w=<seconds to refill>`, the
/// bucket expressed as the draft's quota per window; `RateLimit-Reset` is the seconds until the
/// bucket is full, rounded up.
pub fn response_headers<K: Hash + Eq + Clone>(
    limiter: &Limiter<K>,
    decision: &Decision,
) -> Vec<(&'static str, String)> {
    let mut headers = vec![
        ("RateLimit-Limit", limiter.burst().to_string()),
        ("RateLimit-Remaining", decision.remaining.to_string()),
        ("RateLimit-Reset", ceil_secs(decision.reset).to_string()),
        (
            "RateLimit-Policy",
            format!(
                "{};w={}",
                limiter.burst(),
                ceil_secs(limiter.window()).max(1)
            ),
        ),
    ];
    if !decision.allowed {
        headers.push((
            "Retry-After",
            retry_after_secs(decision.retry_after).to_string(),
        ));
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn rejects_unusable_parameters() {
        assert_eq!(
            Limiter::<u32>::new(0.0, 1, 1).err(),
            Some(LimiterError::Rate(0.0))
        );
        assert!(matches!(
            Limiter::<u32>::new(f64::NAN, 1, 1),
            Err(LimiterError::Rate(_))
        ));
        assert!(matches!(
            Limiter::<u32>::new(f64::INFINITY, 1, 1),
            Err(LimiterError::Rate(_))
        ));
        assert_eq!(
            Limiter::<u32>::new(1.0, 0, 1).err(),
            Some(LimiterError::Burst)
        );
        assert_eq!(
            Limiter::<u32>::new(1.0, 1, 0).err(),
            Some(LimiterError::MaxKeys)
        );
    }

    #[test]
    fn burst_then_exact_refill() {
        // 10/s = one token per 100 ms, burst 3.
        let l = Limiter::new(10.0, 3, 100).unwrap();
        let t0 = Instant::now();
        let d = l.check(&"a", t0);
        assert_eq!((d.allowed, d.remaining, d.reset), (true, 2, 100 * MS));
        assert_eq!(l.check(&"a", t0).remaining, 1);
        let d = l.check(&"a", t0);
        assert_eq!((d.allowed, d.remaining, d.reset), (true, 0, 300 * MS));
        let d = l.check(&"a", t0);
        assert_eq!(
            (d.allowed, d.remaining, d.retry_after, d.reset),
            (false, 0, 100 * MS, 300 * MS)
        );
        // One nanosecond short of a token: still refused, and told exactly how long to wait.
        let d = l.check(&"a", t0 + 100 * MS - Duration::from_nanos(1));
        assert_eq!((d.allowed, d.retry_after), (false, Duration::from_nanos(1)));
        // Exactly one interval later: exactly one token.
        let d = l.check(&"a", t0 + 100 * MS);
        assert_eq!((d.allowed, d.remaining), (true, 0));
        assert!(!l.check(&"a", t0 + 100 * MS).allowed);
        // 250 ms later (t0+350): 2.5 tokens earned, 2 usable.
        let t = t0 + 350 * MS;
        assert_eq!(l.check(&"a", t).remaining, 1);
        assert_eq!(l.check(&"a", t).remaining, 0);
        let d = l.check(&"a", t);
        assert_eq!((d.allowed, d.retry_after), (false, 50 * MS));
        // Long idle: capped at the burst, never more.
        let t = t0 + Duration::from_secs(3600);
        assert_eq!(l.check(&"a", t).remaining, 2);
        // Other keys are independent.
        assert_eq!(l.check(&"b", t0).remaining, 2);
    }

    #[test]
    fn time_going_backwards_earns_nothing() {
        let l = Limiter::new(1.0, 1, 10).unwrap();
        let t0 = Instant::now() + Duration::from_secs(10);
        assert!(l.check(&1, t0).allowed);
        assert!(!l.check(&1, t0 - Duration::from_secs(5)).allowed);
        assert!(!l.check(&1, t0).allowed);
        assert!(l.check(&1, t0 + Duration::from_secs(1)).allowed);
    }

    #[test]
    fn fractional_rates() {
        // One request per 2 s.
        let l = Limiter::new(0.5, 1, 10).unwrap();
        let t0 = Instant::now();
        assert!(l.check(&(), t0).allowed);
        let d = l.check(&(), t0 + 500 * MS);
        assert_eq!((d.allowed, d.retry_after), (false, 1500 * MS));
        assert_eq!(retry_after_secs(d.retry_after), 2);
        assert!(l.check(&(), t0 + Duration::from_secs(2)).allowed);
    }

    #[test]
    fn concurrent_checks_never_exceed_burst_on_a_frozen_clock() {
        let burst = 50;
        let l = Arc::new(Limiter::new(1000.0, burst, 1000).unwrap());
        let now = Instant::now();
        let allowed = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (l, allowed) = (Arc::clone(&l), Arc::clone(&allowed));
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        if l.check(&"shared", now).allowed {
                            allowed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(allowed.load(Ordering::Relaxed), u64::from(burst));
    }

    #[test]
    fn concurrent_checks_with_advancing_time_stay_within_rate() {
        // Each thread reads a shared, advancing fake clock: total allowed must not exceed
        // burst + rate * elapsed.
        let (rate, burst) = (100.0, 10);
        let l = Arc::new(Limiter::new(rate, burst, 1000).unwrap());
        let t0 = Instant::now();
        let tick_us = Arc::new(AtomicU64::new(0));
        let allowed = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (l, allowed, tick) =
                    (Arc::clone(&l), Arc::clone(&allowed), Arc::clone(&tick_us));
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        // 10 us per call overall: 80,000 calls span 0.8 s.
                        let us = tick.fetch_add(10, Ordering::Relaxed);
                        if l.check(&7u8, t0 + Duration::from_micros(us)).allowed {
                            allowed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let elapsed = Duration::from_micros(tick_us.load(Ordering::Relaxed)).as_secs_f64();
        let bound = f64::from(burst) + rate * elapsed;
        let got = allowed.load(Ordering::Relaxed) as f64;
        assert!(got <= bound.floor(), "allowed {got} > bound {bound}");
        // And the limiter is not stingy either (threads may check out of clock order, so allow
        // a little slack below the ideal).
        assert!(
            got >= bound.floor() - 2.0,
            "allowed {got}, expected about {bound}"
        );
    }

    #[test]
    fn memory_is_bounded_and_full_buckets_go_first() {
        let max = 40;
        let l = Limiter::new(1.0, 2, max).unwrap();
        let t0 = Instant::now();
        for k in 0..10_000u32 {
            l.check(&k, t0);
            assert!(l.len() <= max);
        }
        assert!(
            l.len() >= max - SHARDS,
            "shards should be nearly full: {}",
            l.len()
        );
        // Every bucket above is part-used; once all have refilled, new keys replace them
        // without ever exceeding the bound.
        let later = t0 + Duration::from_secs(10);
        for k in 10_000..20_000u32 {
            assert!(l.check(&k, later).allowed);
            assert!(l.len() <= max);
        }
    }

    #[test]
    fn eviction_prefers_refilled_buckets_over_busy_ones() {
        let l = Limiter::new(1.0, 1, 1).unwrap();
        let t0 = Instant::now();
        assert!(l.check(&"busy", t0).allowed);
        assert!(!l.check(&"busy", t0).allowed);
        // A second key evicts the only (busy) bucket: the bound wins, leniency documented.
        assert!(l.check(&"other", t0).allowed);
        assert_eq!(l.len(), 1);
        // Refilled buckets are dropped without touching behaviour.
        // One shard of two keys, so both compete for the same room.
        let l = Limiter::with_shards(1.0, 1, 2, 1).unwrap();
        let t5 = t0 + Duration::from_secs(5);
        assert!(l.check(&"idle", t0).allowed);
        assert!(l.check(&"busy", t5).allowed);
        assert!(l.check(&"new", t5).allowed);
        // "idle" (refilled) made room, so "busy" is still remembered and still limited.
        assert!(!l.check(&"busy", t5).allowed);
        assert_eq!(l.len(), 2);
        // With no refilled bucket left, the one nearest to full goes ("busy" and "new" are
        // equally empty; a third key evicts one of them, never exceeding the bound).
        assert!(l.check(&"third", t5).allowed);
        assert_eq!(l.len(), 2);
    }

    #[test]
    fn header_values() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
        let l = Limiter::new(2.0, 4, 10).unwrap();
        let t0 = Instant::now();
        let d = l.check(&"k", t0);
        assert_eq!(
            response_headers(&l, &d),
            vec![
                ("RateLimit-Limit", "4".to_string()),
                ("RateLimit-Remaining", "3".to_string()),
                ("RateLimit-Reset", "1".to_string()),
                ("RateLimit-Policy", "4;w=2".to_string()),
            ]
        );
        for _ in 0..3 {
            l.check(&"k", t0);
        }
        let d = l.check(&"k", t0);
        let h = response_headers(&l, &d);
        assert_eq!(h[1], ("RateLimit-Remaining", "0".to_string()));
        assert_eq!(h[2], ("RateLimit-Reset", "2".to_string()));
        assert_eq!(h[4], ("Retry-After", "1".to_string()));
    }
}
