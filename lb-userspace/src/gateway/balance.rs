//! How an upstream pool picks a server for a request: smooth weighted round robin, least request
//! (power of two choices) and weighted rendezvous hashing. Pure decisions over a list of
//! [`Candidate`]s, with no sockets, clocks or global randomness, so each algorithm is tested with
//! exact expectations; [`super::upstream`] decides which servers are candidates (checker-healthy,
//! not ejected, weight above 0) and keeps the state between picks.

use http::HeaderMap;
use http::header::COOKIE;

/// A server that may take the next request, as the balancer sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    /// The server's position in its pool's server list: what a pick returns, and the index of
    /// the round-robin state kept per server.
    pub slot: usize,
    /// A stable identity of the server (see [`server_key`]): hashing is on it, not on `slot`, so
    /// that a key keeps its server when other servers are added or removed.
    pub key: u64,
    /// Relative share of requests, above 0 (drained servers are never candidates).
    pub weight: u32,
    /// Requests sent to the server whose response has not ended yet.
    pub in_flight: u32,
}

/// Smooth weighted round robin (nginx's `ngx_http_upstream_get_peer`): every pick adds each
/// candidate's weight to its current value, takes the largest, and subtracts the total from it.
/// Over any `sum(weights)` consecutive picks each server gets exactly its weight, and the picks
/// are interleaved (weights 5/1/1 give `a a b a c a a`, not `a a a a a b c`), so a heavy server
/// never receives a burst.
#[derive(Debug, Clone, Default)]
pub struct SmoothWeightedRoundRobin {
    /// Current weight per slot; slots that are not candidates keep theirs, as nginx does for
    /// peers that are down.
    current: Vec<i64>,
}

impl SmoothWeightedRoundRobin {
    /// State for a pool of `servers` slots, all at zero.
    pub fn new(servers: usize) -> Self {
        Self {
            current: vec![0; servers],
        }
    }

    /// The slot of the next server, or `None` when there is no candidate.
    pub fn pick(&mut self, candidates: &[Candidate]) -> Option<usize> {
        let mut total: i64 = 0;
        let mut best: Option<usize> = None;
        for c in candidates {
            if c.slot >= self.current.len() {
                self.current.resize(c.slot + 1, 0);
            }
            let weight = i64::from(c.weight);
            self.current[c.slot] += weight;
            total += weight;
            // Strictly greater: on a tie the earlier server wins, as in nginx.
            if best.is_none_or(|b| self.current[c.slot] > self.current[b]) {
                best = Some(c.slot);
            }
        }
        let best = best?;
        self.current[best] -= total;
        Some(best)
    }
}

/// A small, fast pseudo-random generator (SplitMix64) for least-request draws: the choice only
/// needs to be unpredictable enough to spread load, and a seedable generator makes the tests
/// exact without another dependency.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator starting from `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// A generator seeded from the process's random hasher keys, so that two gateways do not
    /// draw in lockstep.
    pub fn from_entropy() -> Self {
        use std::hash::BuildHasher;
        Self(std::collections::hash_map::RandomState::new().hash_one("xlb least request"))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix64(self.0)
    }

    /// A number in `0..bound` (`bound` above 0); the modulo bias is below 2^-32 for any weight
    /// sum a pool can have.
    fn below(&mut self, bound: u64) -> u64 {
        self.next_u64() % bound
    }
}

/// Least request by the power of two choices (as Envoy's `LEAST_REQUEST`): draw two distinct
/// candidates at random, each with probability proportional to its weight, and take the one with
/// fewer requests in flight per unit of weight; on a tie the first drawn. Checking two random
/// servers instead of all avoids herding every gateway onto the same momentarily idle server,
/// and still steers away from slow ones, which accumulate in-flight requests.
pub fn least_request(candidates: &[Candidate], rng: &mut Rng) -> Option<usize> {
    let total: u64 = candidates.iter().map(|c| u64::from(c.weight)).sum();
    let first = weighted_draw(candidates, total, None, rng)?;
    if candidates.len() == 1 {
        return Some(candidates[first].slot);
    }
    let rest = total - u64::from(candidates[first].weight);
    let second = weighted_draw(candidates, rest, Some(first), rng)?;
    let (a, b) = (&candidates[first], &candidates[second]);
    // a.in_flight / a.weight <= b.in_flight / b.weight, without division.
    let a_load = u64::from(a.in_flight) * u64::from(b.weight);
    let b_load = u64::from(b.in_flight) * u64::from(a.weight);
    Some(if b_load < a_load { b.slot } else { a.slot })
}

/// The index (into `candidates`) of a candidate drawn with probability proportional to weight,
/// leaving out index `skip`; `total` is the weight sum without it.
fn weighted_draw(
    candidates: &[Candidate],
    total: u64,
    skip: Option<usize>,
    rng: &mut Rng,
) -> Option<usize> {
    if total == 0 {
        return None;
    }
    let mut point = rng.below(total);
    for (i, c) in candidates.iter().enumerate() {
        if Some(i) == skip {
            continue;
        }
        let weight = u64::from(c.weight);
        if point < weight {
            return Some(i);
        }
        point -= weight;
    }
    None
}

/// Weighted rendezvous (highest random weight) hashing: every candidate scores
/// `weight / -ln(u)`, with `u` a uniform number derived from the request's key and the server's
/// identity, and the highest score wins. Each server wins a share of keys proportional to its
/// weight, and adding or removing a server moves only the keys that it gains or held (about
/// 1/n); unlike a lookup table there is nothing to rebuild when the candidates change (for
/// example while a server is ejected), which suits pools of tens of servers where O(n) per
/// request is cheap.
pub fn rendezvous(candidates: &[Candidate], key_hash: u64) -> Option<usize> {
    let mut best: Option<(f64, usize)> = None;
    for c in candidates {
        let h = mix64(key_hash ^ mix64(c.key));
        // 53 random bits mapped into (0, 1), never 0 or 1, so the logarithm is finite and < 0.
        let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        let score = f64::from(c.weight) / -u.ln();
        if best.is_none_or(|(s, _)| score > s) {
            best = Some((score, c.slot));
        }
    }
    best.map(|(_, slot)| slot)
}

/// The stable identity of a server for [`rendezvous`]: its address and port, hashed with a
/// fixed function so that every gateway (and every restart) sends a key to the same server.
pub fn server_key(addr: std::net::SocketAddr) -> u64 {
    let mut bytes = Vec::with_capacity(18);
    match addr.ip() {
        std::net::IpAddr::V4(v4) => bytes.extend_from_slice(&v4.octets()),
        std::net::IpAddr::V6(v6) => bytes.extend_from_slice(&v6.octets()),
    }
    bytes.extend_from_slice(&addr.port().to_be_bytes());
    hash_key(&bytes)
}

/// The hash of a request's affinity key (a header or cookie value): FNV-1a, finished with a
/// strong mixer. Fixed rather than `std`'s randomly keyed hasher, so affinity survives restarts
/// and agrees between gateways; hash flooding is no concern, as a key only selects a server.
pub fn hash_key(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix64(h)
}

/// The finaliser of MurmurHash3 / SplitMix64: every input bit affects every output bit.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The value of cookie `name` in a request's `Cookie` headers (HTTP/2 clients may send several),
/// per RFC 6265 section 5.4's `name=value; name=value` form; the first occurrence wins.
pub fn cookie_value<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h [u8]> {
    headers
        .get_all(COOKIE)
        .iter()
        .flat_map(|value| value.as_bytes().split(|&b| b == b';'))
        .find_map(|pair| {
            let pair = pair.trim_ascii();
            let eq = pair.iter().position(|&b| b == b'=')?;
            (pair[..eq].trim_ascii() == name.as_bytes()).then(|| pair[eq + 1..].trim_ascii())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cands(weights: &[u32]) -> Vec<Candidate> {
        weights
            .iter()
            .enumerate()
            .map(|(slot, &weight)| Candidate {
                slot,
                key: hash_key(&(slot as u64).to_be_bytes()),
                weight,
                in_flight: 0,
            })
            .collect()
    }

    #[test]
    fn smooth_wrr_matches_nginx_sequence() {
        let c = cands(&[5, 1, 1]);
        let mut wrr = SmoothWeightedRoundRobin::new(3);
        let picks: Vec<usize> = (0..14).map(|_| wrr.pick(&c).unwrap()).collect();
        // nginx's documented sequence for a=5, b=1, c=1, twice.
        assert_eq!(picks, [0, 0, 1, 0, 2, 0, 0, 0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn smooth_wrr_equal_weights_alternate_and_skip_non_candidates() {
        let c = cands(&[1, 1, 1]);
        let mut wrr = SmoothWeightedRoundRobin::new(3);
        let picks: Vec<usize> = (0..6).map(|_| wrr.pick(&c).unwrap()).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
        // Server 1 leaves the candidates (down, ejected or drained): never picked.
        let without: Vec<Candidate> = c.iter().copied().filter(|c| c.slot != 1).collect();
        let picks: Vec<usize> = (0..4).map(|_| wrr.pick(&without).unwrap()).collect();
        assert_eq!(picks, [0, 2, 0, 2]);
        assert_eq!(wrr.pick(&[]), None);
    }

    #[test]
    fn smooth_wrr_shares_follow_weights_exactly_per_cycle() {
        let c = cands(&[3, 2, 7]);
        let mut wrr = SmoothWeightedRoundRobin::new(3);
        let mut counts = [0; 3];
        for _ in 0..12 * 10 {
            counts[wrr.pick(&c).unwrap()] += 1;
        }
        assert_eq!(counts, [30, 20, 70]);
    }

    #[test]
    fn least_request_prefers_the_less_loaded() {
        let mut c = cands(&[1, 1]);
        c[0].in_flight = 5;
        c[1].in_flight = 2;
        let mut rng = Rng::new(7);
        // With two candidates both are always drawn: the less loaded always wins.
        for _ in 0..100 {
            assert_eq!(least_request(&c, &mut rng), Some(1));
        }
        // Load is per unit of weight: 5 in flight on weight 10 is lighter than 2 on weight 1.
        c[0].weight = 10;
        for _ in 0..100 {
            assert_eq!(least_request(&c, &mut rng), Some(0));
        }
    }

    #[test]
    fn least_request_picks_only_candidates_and_spreads_by_weight_when_idle() {
        // Slots 1 and 3 (down or drained) are not among the candidates.
        let all = cands(&[1, 1, 3, 1]);
        let c: Vec<Candidate> = all
            .iter()
            .copied()
            .filter(|c| c.slot == 0 || c.slot == 2)
            .collect();
        let mut rng = Rng::new(42);
        let mut counts = [0u32; 4];
        for _ in 0..4000 {
            counts[least_request(&c, &mut rng).unwrap()] += 1;
        }
        assert_eq!(counts[1] + counts[3], 0);
        // Idle servers tie, so the first (weighted) draw decides: about 1:3.
        assert!((800..1200).contains(&counts[0]), "{counts:?}");
        assert_eq!(least_request(&c[..1], &mut rng), Some(0));
        assert_eq!(least_request(&[], &mut rng), None);
    }

    #[test]
    fn least_request_never_draws_the_same_server_twice() {
        // Three candidates, one much heavier and loaded: when drawn first it must still be
        // compared with another server, so the idle ones get nearly everything.
        let mut c = cands(&[100, 1, 1]);
        c[0].in_flight = 50;
        let mut rng = Rng::new(1);
        let heavy = (0..1000)
            .filter(|_| least_request(&c, &mut rng) == Some(0))
            .count();
        assert_eq!(heavy, 0);
    }

    #[test]
    fn rendezvous_is_stable_and_moves_about_one_in_n_keys() {
        let ten = cands(&[1; 10]);
        let keys: Vec<u64> = (0..20_000u32)
            .map(|k| hash_key(format!("user-{k}").as_bytes()))
            .collect();
        let before: Vec<usize> = keys.iter().map(|&k| rendezvous(&ten, k).unwrap()).collect();
        // Stable: the same key, the same server.
        for (&k, &s) in keys.iter().zip(&before) {
            assert_eq!(rendezvous(&ten, k), Some(s));
        }
        // Even spread: each of 10 servers holds about 2000 keys.
        for slot in 0..10 {
            let n = before.iter().filter(|&&s| s == slot).count();
            assert!((1700..2300).contains(&n), "slot {slot}: {n}");
        }
        // Removing server 4 moves exactly its keys and no others.
        let nine: Vec<Candidate> = ten.iter().copied().filter(|c| c.slot != 4).collect();
        let mut moved = 0;
        for (&k, &s) in keys.iter().zip(&before) {
            let now = rendezvous(&nine, k).unwrap();
            if s == 4 {
                moved += 1;
            } else {
                assert_eq!(now, s);
            }
        }
        assert!((1700..2300).contains(&moved), "{moved}");
        // Adding an eleventh server takes about 1/11 of keys, only to itself.
        let eleven = cands(&[1; 11]);
        let mut gained = 0;
        for (&k, &s) in keys.iter().zip(&before) {
            let now = rendezvous(&eleven, k).unwrap();
            if now != s {
                assert_eq!(now, 10);
                gained += 1;
            }
        }
        assert!((1500..2100).contains(&gained), "{gained}");
        assert_eq!(rendezvous(&[], 1), None);
    }

    #[test]
    fn rendezvous_shares_follow_weights() {
        let c = cands(&[1, 3]);
        let heavy = (0..20_000u32)
            .filter(|k| rendezvous(&c, hash_key(&k.to_be_bytes())) == Some(1))
            .count();
        // Expect 3/4 of 20000.
        assert!((14_500..15_500).contains(&heavy), "{heavy}");
    }

    #[test]
    fn server_keys_differ_by_address_and_port_and_are_fixed() {
        let a: std::net::SocketAddr = "10.0.0.1:80".parse().unwrap();
        let b: std::net::SocketAddr = "10.0.0.1:81".parse().unwrap();
        let c: std::net::SocketAddr = "10.0.0.2:80".parse().unwrap();
        assert_ne!(server_key(a), server_key(b));
        assert_ne!(server_key(a), server_key(c));
        assert_eq!(server_key(a), server_key(a));
        // Fixed across builds and processes: affinity must agree between gateways.
        assert_eq!(hash_key(b""), 0xf52a_15e9_a9b5_e89b);
        assert_eq!(server_key(a), 0x0186_1fbf_7d07_dea9);
    }

    #[test]
    fn cookie_values_are_found_across_headers() {
        let mut h = HeaderMap::new();
        h.append(COOKIE, "a=1; session = abc ;b=2".parse().unwrap());
        h.append(COOKIE, "c=3".parse().unwrap());
        assert_eq!(cookie_value(&h, "session"), Some(&b"abc"[..]));
        assert_eq!(cookie_value(&h, "c"), Some(&b"3"[..]));
        assert_eq!(cookie_value(&h, "sess"), None);
        assert_eq!(cookie_value(&h, "missing"), None);
        h.insert(COOKIE, "flag; x=".parse().unwrap());
        assert_eq!(cookie_value(&h, "x"), Some(&b""[..]));
        assert_eq!(cookie_value(&h, "flag"), None);
    }
}
