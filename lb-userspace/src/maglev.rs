//! The Maglev consistent-hash table builder (Eisenbud et al., NSDI '16, §3.4), with weights the
//! way Envoy's `MaglevTable` does them.
//!
//! The XDP program picks a new flow's backend by indexing a VIP's table with the flow hash, so
//! this table *is* the load-balancing decision. Two properties matter more than speed:
//!
//! - **Agreement between hosts.** Several xlb hosts behind one ECMP route must send a flow to the
//!   same backend whichever host receives it. The table therefore depends only on the set of
//!   `(key, weight)` pairs: backends are sorted by key before building, and the hashes are a
//!   SipHash-2-4 written out here with fixed keys, so neither insertion order, the Rust release
//!   nor the CPU changes a slot. Changing [`build`] or the hash keys changes every table in a
//!   fleet at once; the golden test exists to make that a deliberate act.
//! - **Minimal disruption.** Removing, adding or draining one backend moves only a little more
//!   than that backend's own share of slots, so most established-but-untracked flows (e.g. after
//!   an LRU eviction or on another host) keep their backend.
//!
//! Pure logic: no maps, no I/O. The agent writes the returned `Vec<u32>` into the VIP's map.

use thiserror::Error;

/// The table size used when the configuration names none. Backends' slot counts differ by about
/// one slot from their exact weighted share, which the paper keeps under 1% by choosing
/// size > 100 x backends: this size serves that up to ~650 backends while one table stays at
/// 256 KiB of map memory.
pub const DEFAULT_TABLE_SIZE: u32 = 65537;

/// The value of every slot when no backend can take new flows (none configured, or all drained).
/// The data path reads it as "no backend" and counts the packet instead of forwarding it; it is
/// never a valid backend id (see [`MaglevError::ReservedId`]).
pub const EMPTY_SLOT: u32 = u32::MAX;

/// One backend as the table builder sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaglevBackend {
    /// The value written into the slots this backend owns: the agent's backend id, which the data
    /// path resolves to an address. Ids are host-local, so hosts that number their backends
    /// differently produce tables with different numbers that still agree on *which backend*
    /// owns each slot. Must be unique and must not be [`EMPTY_SLOT`].
    pub id: u32,
    /// The backend's stable identity, and the only input to its permutation: typically its
    /// address bytes (4 or 16), optionally followed by its port. Keep it independent of ids and
    /// configuration order so every host derives the same permutation. Must be unique.
    pub key: Vec<u8>,
    /// Relative share of slots. Only ratios matter (1:2 equals 50:100). Zero means drained: the
    /// backend gets no slots, so it receives no new flows while its established ones continue.
    pub weight: u32,
}

/// Why a table could not be built. Every variant is a configuration mistake the operator can fix;
/// the message says what would be valid.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum MaglevError {
    /// The size is not prime. A prime size makes every `skip` coprime with it, so each backend's
    /// permutation visits every slot; without that the fill loop could starve or never finish.
    #[error(
        "Maglev table size {size} is not prime (each backend's permutation must visit every \
         slot); {}",
        nearest_primes_hint(*.below, *.above)
    )]
    SizeNotPrime {
        /// The size that was asked for.
        size: u32,
        /// The largest prime below `size`, if any.
        below: Option<u32>,
        /// The smallest prime above `size` that fits in a `u32`, if any.
        above: Option<u32>,
    },
    /// Fewer slots than backends with weight > 0: some weighted backend would get no slot at
    /// all, silently behaving as drained.
    #[error(
        "Maglev table size {size} is too small for {weighted} backends with weight > 0: Maglev \
         needs a size of at least the number of weighted backends (and about 100 times that \
         for even shares); use a larger prime, such as the default {DEFAULT_TABLE_SIZE}"
    )]
    SizeTooSmall {
        /// The size that was asked for.
        size: u32,
        /// How many backends have weight > 0.
        weighted: usize,
    },
    /// Two backends share a key. They would have identical permutations, and hosts could not
    /// agree on which of the two owns a slot, so the configuration is ambiguous.
    #[error(
        "backends {first_id} and {second_id} have the same key {key:02x?}; each backend needs \
         its own key (its address, optionally with its port)"
    )]
    DuplicateKey {
        /// The shared key.
        key: Vec<u8>,
        /// The id of one backend with that key.
        first_id: u32,
        /// The id of another backend with that key.
        second_id: u32,
    },
    /// Two backends share an id, so the data path could not tell their slots apart.
    #[error("two backends have id {id}; backend ids must be unique")]
    DuplicateId {
        /// The shared id.
        id: u32,
    },
    /// A backend uses the id reserved for [`EMPTY_SLOT`]; its slots would read as "no backend".
    #[error(
        "backend with key {key:02x?} has id {EMPTY_SLOT} (u32::MAX), which is reserved to mark \
         empty slots; use a smaller id"
    )]
    ReservedId {
        /// The key of the backend with the reserved id.
        key: Vec<u8>,
    },
}

fn nearest_primes_hint(below: Option<u32>, above: Option<u32>) -> String {
    match (below, above) {
        (Some(b), Some(a)) => format!("the nearest primes are {b} and {a}"),
        (None, Some(a)) => format!("the smallest valid size is {a}"),
        (Some(b), None) => format!("the largest valid size is {b}"),
        (None, None) => "no valid size exists".to_owned(),
    }
}

/// Whether `n` is prime. Deterministic trial division by 2, 3 and 6k ± 1: at most ~22,000
/// divisions for any `u32`, which is plenty fast for validating a configured table size.
pub fn is_prime(n: u32) -> bool {
    if n < 4 {
        return n >= 2;
    }
    if n.is_multiple_of(2) || n.is_multiple_of(3) {
        return false;
    }
    // u64 so `i * i` cannot overflow near u32::MAX.
    let n = u64::from(n);
    let mut i = 5u64;
    while i * i <= n {
        if n.is_multiple_of(i) || n.is_multiple_of(i + 2) {
            return false;
        }
        i += 6;
    }
    true
}

/// SipHash keys for the two hashes. Part of the on-wire contract between xlb hosts and versions:
/// changing either changes every table. Distinct keys make `offset` and `skip` independent.
const OFFSET_HASH_KEY: [u8; 16] = *b"xlb maglev h1 v1";
const SKIP_HASH_KEY: [u8; 16] = *b"xlb maglev h2 v1";

/// SipHash-2-4 (Aumasson and Bernstein, 2012) of `msg` under `key`, written out rather than
/// taken from std because std's hashers promise no stability across releases, and the table must
/// not change when the toolchain does.
fn siphash24(key: &[u8; 16], msg: &[u8]) -> u64 {
    #[inline(always)]
    fn round(v: &mut [u64; 4]) {
        v[0] = v[0].wrapping_add(v[1]);
        v[1] = v[1].rotate_left(13) ^ v[0];
        v[0] = v[0].rotate_left(32);
        v[2] = v[2].wrapping_add(v[3]);
        v[3] = v[3].rotate_left(16) ^ v[2];
        v[0] = v[0].wrapping_add(v[3]);
        v[3] = v[3].rotate_left(21) ^ v[0];
        v[2] = v[2].wrapping_add(v[1]);
        v[1] = v[1].rotate_left(17) ^ v[2];
        v[2] = v[2].rotate_left(32);
    }
    fn le64(b: &[u8]) -> u64 {
        let mut word = [0u8; 8];
        word[..b.len()].copy_from_slice(b);
        u64::from_le_bytes(word)
    }

    let k0 = le64(&key[..8]);
    let k1 = le64(&key[8..]);
    let mut v = [
        k0 ^ 0x736f_6d65_7073_6575,
        k1 ^ 0x646f_7261_6e64_6f6d,
        k0 ^ 0x6c79_6765_6e65_7261,
        k1 ^ 0x7465_6462_7974_6573,
    ];
    let mut blocks = msg.chunks_exact(8);
    for block in &mut blocks {
        let m = le64(block);
        v[3] ^= m;
        round(&mut v);
        round(&mut v);
        v[0] ^= m;
    }
    // The last word carries the message length (mod 256) in its top byte, so messages that differ
    // only by trailing zeros hash differently.
    let last = le64(blocks.remainder()) | ((msg.len() as u64) << 56);
    v[3] ^= last;
    round(&mut v);
    round(&mut v);
    v[0] ^= last;
    v[2] ^= 0xff;
    for _ in 0..4 {
        round(&mut v);
    }
    v[0] ^ v[1] ^ v[2] ^ v[3]
}

/// Builds the lookup table for one VIP: `size` slots, each holding the id of the backend that
/// new flows hashing to that slot go to.
///
/// Backends with weight 0 get no slots; with no weighted backends at all (including an empty
/// list) every slot is [`EMPTY_SLOT`], because "nothing can take traffic" is a state the data
/// path handles, not a configuration error. Each weighted backend gets at least one slot, and
/// otherwise slots in proportion to its weight.
///
/// The result depends only on the set of `(key, weight)` pairs and the ids attached to them:
/// the order of `backends` does not matter.
///
/// # Errors
///
/// [`MaglevError`] if `size` is not prime, is smaller than the number of weighted backends, or
/// if keys or ids repeat or an id is [`EMPTY_SLOT`].
pub fn build(backends: &[MaglevBackend], size: u32) -> Result<Vec<u32>, MaglevError> {
    if !is_prime(size) {
        return Err(MaglevError::SizeNotPrime {
            size,
            below: (2..size).rev().find(|&n| is_prime(n)),
            above: size
                .checked_add(1)
                .and_then(|start| (start..=u32::MAX).find(|&n| is_prime(n))),
        });
    }

    // Sorting by key is what makes insertion order irrelevant: within a round, backends take
    // turns in this order, and an earlier turn can claim a slot a later one wanted.
    let mut sorted: Vec<&MaglevBackend> = backends.iter().collect();
    sorted.sort_unstable_by(|a, b| a.key.cmp(&b.key));
    if let Some(pair) = sorted.windows(2).find(|p| p[0].key == p[1].key) {
        return Err(MaglevError::DuplicateKey {
            key: pair[0].key.clone(),
            first_id: pair[0].id.min(pair[1].id),
            second_id: pair[0].id.max(pair[1].id),
        });
    }
    if let Some(b) = sorted.iter().find(|b| b.id == EMPTY_SLOT) {
        return Err(MaglevError::ReservedId { key: b.key.clone() });
    }
    let mut ids: Vec<u32> = sorted.iter().map(|b| b.id).collect();
    ids.sort_unstable();
    if let Some(pair) = ids.windows(2).find(|p| p[0] == p[1]) {
        return Err(MaglevError::DuplicateId { id: pair[0] });
    }

    sorted.retain(|b| b.weight > 0);
    let slots = size as usize;
    if sorted.is_empty() {
        return Ok(vec![EMPTY_SLOT; slots]);
    }
    if sorted.len() > slots {
        return Err(MaglevError::SizeTooSmall {
            size,
            weighted: sorted.len(),
        });
    }

    struct Cursor {
        id: u32,
        weight: u64,
        /// Current element of this backend's permutation, `(offset + j * skip) % size`, kept
        /// incrementally so advancing needs no multiplication or division.
        pos: u32,
        skip: u32,
        /// Turns earned but not yet taken, in units of `1 / max_weight` turns. Integers keep the
        /// schedule bit-identical on every host, unlike Envoy's doubles.
        credit: u64,
    }
    let max_weight = sorted
        .iter()
        .map(|b| u64::from(b.weight))
        .max()
        .unwrap_or(1);
    let mut cursors: Vec<Cursor> = sorted
        .iter()
        .map(|b| Cursor {
            id: b.id,
            weight: u64::from(b.weight),
            pos: (siphash24(&OFFSET_HASH_KEY, &b.key) % u64::from(size)) as u32,
            // In 1..size: never 0, so with a prime size the walk visits every slot.
            skip: (siphash24(&SKIP_HASH_KEY, &b.key) % u64::from(size - 1)) as u32 + 1,
            // One whole turn up front, as in Envoy: every weighted backend takes a slot in the
            // first round, however small its weight, so none is starved.
            credit: max_weight,
        })
        .collect();

    let mut table = vec![EMPTY_SLOT; slots];
    let mut filled = 0usize;
    // Each round, a backend earns `weight / max_weight` of a turn; the heaviest one takes a turn
    // every round, so the loop ends after at most `size` rounds.
    loop {
        for c in &mut cursors {
            c.credit += c.weight;
            if c.credit < max_weight {
                continue;
            }
            c.credit -= max_weight;
            // Terminates: the walk visits every slot and at least one is still empty.
            while table[c.pos as usize] != EMPTY_SLOT {
                c.pos = advance(c.pos, c.skip, size);
            }
            table[c.pos as usize] = c.id;
            c.pos = advance(c.pos, c.skip, size);
            filled += 1;
            if filled == slots {
                return Ok(table);
            }
        }
    }
}

/// `(pos + skip) % size` for `pos, skip < size`, without the overflow `pos + skip` could hit for
/// sizes near `u32::MAX`.
#[inline(always)]
fn advance(pos: u32, skip: u32, size: u32) -> u32 {
    let room = size - skip;
    if pos >= room { pos - room } else { pos + skip }
}

/// A digest of a table's contents (64-bit FNV-1a over the slots, little-endian). Stable across
/// builds and processes: it is stored beside each published table, and an agent adopting pinned
/// maps compares it with the table it would build to decide whether to republish.
pub fn table_digest(table: &[u32]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for slot in table {
        for b in slot.to_le_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h ^ table.len() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(id: u32, weight: u32) -> MaglevBackend {
        // An IPv4 address in 10.0.0.0/8 plus a port: the shape the agent uses.
        let ip = 0x0a00_0000u32 + id;
        let mut key = ip.to_be_bytes().to_vec();
        key.extend_from_slice(&8080u16.to_be_bytes());
        MaglevBackend { id, key, weight }
    }

    fn equal(n: u32) -> Vec<MaglevBackend> {
        (1..=n).map(|id| backend(id, 1)).collect()
    }

    /// Slots per id, indexed by id (ids in tests are small).
    fn counts(table: &[u32], max_id: u32) -> Vec<usize> {
        let mut c = vec![0usize; max_id as usize + 1];
        for &id in table {
            assert_ne!(id, EMPTY_SLOT, "a weighted table has an empty slot");
            c[id as usize] += 1;
        }
        c
    }

    fn changed(a: &[u32], b: &[u32]) -> usize {
        a.iter().zip(b).filter(|(x, y)| x != y).count()
    }

    /// SplitMix64: a deterministic stand-in for `rand` in shuffle tests.
    struct SplitMix(u64);
    impl SplitMix {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
        fn shuffle<T>(&mut self, v: &mut [T]) {
            for i in (1..v.len()).rev() {
                let j = (self.next() % (i as u64 + 1)) as usize;
                v.swap(i, j);
            }
        }
    }

    #[test]
    fn siphash_matches_reference_vectors() {
        let key: [u8; 16] = core::array::from_fn(|i| i as u8);
        let msg: [u8; 15] = core::array::from_fn(|i| i as u8);
        // Appendix A of the SipHash paper: one full block plus a 7-byte tail.
        assert_eq!(siphash24(&key, &msg), 0xa129_ca61_49be_45e5);
        // From the reference implementation's vectors.h: empty, tail only, one block no tail.
        assert_eq!(siphash24(&key, &msg[..0]), 0x726f_db47_dd0e_0e31);
        assert_eq!(siphash24(&key, &msg[..1]), 0x74f8_39c5_93dc_67fd);
        assert_eq!(siphash24(&key, &msg[..8]), 0x93f5_f579_9a93_2462);
    }

    #[test]
    fn is_prime_known_values() {
        for p in [2, 3, 5, 7, 13, 65521, 65537, 2_147_483_647, 4_294_967_291] {
            assert!(is_prime(p), "{p} is prime");
        }
        // Squares of primes catch an off-by-one in the `i * i <= n` bound, both 6k - 1 (5, 11) and
        // 6k + 1 (7, 13, 65521) kinds; 65521^2 is the largest such square that fits in a u32.
        for c in [
            0,
            1,
            4,
            9,
            25,
            49,
            121,
            169,
            65535,
            65536,
            65521 * 65521,
            u32::MAX,
        ] {
            assert!(!is_prime(c), "{c} is not prime");
        }
    }

    #[test]
    fn empty_and_all_drained_give_empty_slots() {
        let table = build(&[], DEFAULT_TABLE_SIZE).unwrap();
        assert_eq!(table.len(), DEFAULT_TABLE_SIZE as usize);
        assert!(table.iter().all(|&s| s == EMPTY_SLOT));

        let drained: Vec<_> = (1..=5).map(|id| backend(id, 0)).collect();
        let table = build(&drained, 251).unwrap();
        assert_eq!(table.len(), 251);
        assert!(table.iter().all(|&s| s == EMPTY_SLOT));
    }

    #[test]
    fn single_backend_owns_every_slot() {
        let table = build(&[backend(7, 3)], DEFAULT_TABLE_SIZE).unwrap();
        assert_eq!(table.len(), DEFAULT_TABLE_SIZE as usize);
        assert!(table.iter().all(|&s| s == 7));
        // A drained neighbour changes nothing.
        let with_drained = build(&[backend(9, 0), backend(7, 3)], DEFAULT_TABLE_SIZE).unwrap();
        assert_eq!(with_drained, table);
    }

    #[test]
    fn smallest_tables_fill_completely() {
        assert_eq!(build(&[backend(1, 1), backend(2, 1)], 2).unwrap().len(), 2);
        let t = build(&equal(3), 3).unwrap();
        let mut sorted = t.clone();
        sorted.sort_unstable();
        assert_eq!(
            sorted,
            [1, 2, 3],
            "with size == backends each gets exactly one slot"
        );
    }

    /// With equal weights every backend takes exactly one turn per round and every turn claims a
    /// slot, so shares differ by at most the last, partial round: one slot. That is far inside
    /// the ±1.5% (N <= 10) and ±20% (N = 100) one might expect from hashing alone.
    fn assert_equal_shares(n: u32) {
        let table = build(&equal(n), DEFAULT_TABLE_SIZE).unwrap();
        let floor = (DEFAULT_TABLE_SIZE / n) as usize;
        let c = counts(&table, n);
        for (id, &k) in c.iter().enumerate().skip(1) {
            assert!(
                k == floor || k == floor + 1,
                "N = {n}: backend {id} has {k} slots, expected {floor} or {}",
                floor + 1
            );
        }
    }

    #[test]
    fn equal_weights_share_evenly() {
        assert_equal_shares(3);
        assert_equal_shares(10);
        assert_equal_shares(100);
    }

    fn shares(weights: &[u32]) -> Vec<f64> {
        let backends: Vec<_> = weights
            .iter()
            .zip(1..)
            .map(|(&w, id)| backend(id, w))
            .collect();
        let table = build(&backends, DEFAULT_TABLE_SIZE).unwrap();
        counts(&table, weights.len() as u32)[1..]
            .iter()
            .map(|&k| k as f64 / f64::from(DEFAULT_TABLE_SIZE))
            .collect()
    }

    fn assert_shares(weights: &[u32], expected: &[f64]) {
        let got = shares(weights);
        for (g, e) in got.iter().zip(expected) {
            // Measured: within 0.002 points (one slot); the bound, 0.01 points, is ~6 slots.
            assert!(
                (g - e).abs() <= 0.0001,
                "weights {weights:?}: shares {got:?}, expected {expected:?} within 0.01 points"
            );
        }
    }

    #[test]
    fn weights_set_shares() {
        assert_shares(&[1, 1, 2], &[0.25, 0.25, 0.50]);
        assert_shares(&[1, 3], &[0.25, 0.75]);
        // Only ratios matter.
        assert_eq!(shares(&[100, 300]), shares(&[1, 3]));
    }

    #[test]
    fn tiny_weight_still_gets_a_slot() {
        let table = build(&[backend(1, u32::MAX - 1), backend(2, 1)], 101).unwrap();
        let c = counts(&table, 2);
        assert_eq!(
            c[2], 1,
            "the first round gives every weighted backend one slot"
        );
        assert_eq!(c[1], 100);
    }

    #[test]
    fn order_does_not_matter() {
        let mut backends: Vec<_> = (1..=50).map(|id| backend(id, 1 + id % 4)).collect();
        backends.push(backend(99, 0));
        let reference = build(&backends, DEFAULT_TABLE_SIZE).unwrap();
        let mut rng = SplitMix(0x5eed);
        for _ in 0..10 {
            rng.shuffle(&mut backends);
            assert_eq!(build(&backends, DEFAULT_TABLE_SIZE).unwrap(), reference);
        }
    }

    #[test]
    fn ids_do_not_change_ownership() {
        // Another host numbers the same backends differently: slots map to the same keys.
        let a: Vec<_> = (1..=20).map(|id| backend(id, 1)).collect();
        let b: Vec<_> = a
            .iter()
            .map(|x| MaglevBackend {
                id: 1000 - x.id,
                ..x.clone()
            })
            .collect();
        let ta = build(&a, DEFAULT_TABLE_SIZE).unwrap();
        let tb = build(&b, DEFAULT_TABLE_SIZE).unwrap();
        assert!(ta.iter().zip(&tb).all(|(&x, &y)| y == 1000 - x));
    }

    /// Removes each backend in turn and checks how much of the table moved. Bounds are the
    /// measured worst case over every choice plus a small margin, not theory: Maglev promises
    /// only that disruption is "minimal in practice". Measured at size 65537 (worst over every
    /// removal and five key sets): total moved 1.04/N (N = 10) and 1.34/N (N = 50); slots of the
    /// remaining backends that changed owner 0.47% and 0.69%.
    fn assert_removal_disruption(n: u32, total_bound: f64, others_bound: f64) {
        let all = equal(n);
        let full = build(&all, DEFAULT_TABLE_SIZE).unwrap();
        let size = f64::from(DEFAULT_TABLE_SIZE);
        for removed in 1..=n {
            let rest: Vec<_> = all.iter().filter(|b| b.id != removed).cloned().collect();
            let less = build(&rest, DEFAULT_TABLE_SIZE).unwrap();
            assert!(!less.contains(&removed));

            let owned = full.iter().filter(|&&s| s == removed).count();
            let moved = changed(&full, &less);
            let total = moved as f64 / size;
            let others = (moved - owned) as f64 / (size - owned as f64);
            assert!(
                total <= total_bound / f64::from(n) && others <= others_bound,
                "N = {n}, removing {removed}: {:.3}% of slots moved (bound {:.3}%), {:.3}% of \
                 the others' slots (bound {:.3}%)",
                total * 100.0,
                total_bound / f64::from(n) * 100.0,
                others * 100.0,
                others_bound * 100.0,
            );

            // Adding it back restores the table exactly: no history, no hysteresis.
            let mut again = rest;
            again.push(all[removed as usize - 1].clone());
            assert_eq!(build(&again, DEFAULT_TABLE_SIZE).unwrap(), full);
        }
    }

    #[test]
    fn removing_a_backend_moves_little() {
        assert_removal_disruption(10, 1.1, 0.006);
        assert_removal_disruption(50, 1.4, 0.008);
    }

    /// Drains each backend in turn. Measured worst over every choice and five key sets: at
    /// N = 10 every other backend keeps >= 98.2% of its slots. At N = 50 the 1st percentile is
    /// 98.9%, but one pair here (10.0.0.10 and 10.0.0.50) has skips related by small factors
    /// (5 * skip_50 = 2 * skip_10 mod size), so their permutations chase the same slots and
    /// draining 10 takes 11% of 50's. Maglev does not rule that out, so the per-backend bound
    /// at N = 50 is looser than `1 - 1.5 / N`, while the aggregate bound stays tight.
    fn assert_drain_keeps_others(n: u32, per_backend_bound: f64) {
        let all = equal(n);
        let full = build(&all, DEFAULT_TABLE_SIZE).unwrap();
        let before = counts(&full, n);
        for drained_id in 1..=n {
            let mut with_drained = all.clone();
            with_drained[drained_id as usize - 1].weight = 0;
            let drained = build(&with_drained, DEFAULT_TABLE_SIZE).unwrap();
            assert!(
                !drained.contains(&drained_id),
                "a drained backend gets no slots"
            );
            // Drained and removed are the same table: weight 0 takes no part in the build.
            let removed: Vec<_> = all.iter().filter(|b| b.id != drained_id).cloned().collect();
            assert_eq!(drained, build(&removed, DEFAULT_TABLE_SIZE).unwrap());

            let mut kept_total = 0;
            for id in (1..=n).filter(|&id| id != drained_id) {
                let kept = full
                    .iter()
                    .zip(&drained)
                    .filter(|(f, d)| **f == id && **d == id)
                    .count();
                kept_total += kept;
                let frac = kept as f64 / before[id as usize] as f64;
                assert!(
                    frac >= per_backend_bound,
                    "N = {n}, draining {drained_id}: backend {id} kept only {:.2}% of its slots",
                    frac * 100.0
                );
            }
            let others = DEFAULT_TABLE_SIZE as usize - before[drained_id as usize];
            let frac = kept_total as f64 / others as f64;
            assert!(
                frac >= 0.99,
                "N = {n}, draining {drained_id}: the others kept only {:.2}% of their slots",
                frac * 100.0
            );
        }
    }

    #[test]
    fn draining_a_backend_keeps_others_in_place() {
        assert_drain_keeps_others(10, 1.0 - 1.5 / 10.0);
        assert_drain_keeps_others(50, 0.85);
    }

    #[test]
    fn errors_say_what_is_valid() {
        let err = build(&equal(3), 65536).unwrap_err();
        assert_eq!(
            err,
            MaglevError::SizeNotPrime {
                size: 65536,
                below: Some(65521),
                above: Some(65537)
            }
        );
        let msg = err.to_string();
        assert!(msg.contains("65521") && msg.contains("65537"), "{msg}");
        assert_eq!(
            build(&[], 1).unwrap_err(),
            MaglevError::SizeNotPrime {
                size: 1,
                below: None,
                above: Some(2)
            }
        );
        assert_eq!(
            build(&[], u32::MAX).unwrap_err(),
            MaglevError::SizeNotPrime {
                size: u32::MAX,
                below: Some(4_294_967_291),
                above: None
            }
        );

        let err = build(&equal(12), 11).unwrap_err();
        assert_eq!(
            err,
            MaglevError::SizeTooSmall {
                size: 11,
                weighted: 12
            }
        );
        assert!(err.to_string().contains("at least the number of weighted"));
        // Drained backends need no slot, so they do not count against the size.
        let mut mixed = equal(12);
        mixed[0].weight = 0;
        assert_eq!(build(&mixed, 11).unwrap().len(), 11);

        let mut dup_key = equal(3);
        dup_key[2].key = dup_key[0].key.clone();
        assert_eq!(
            build(&dup_key, DEFAULT_TABLE_SIZE).unwrap_err(),
            MaglevError::DuplicateKey {
                key: dup_key[0].key.clone(),
                first_id: 1,
                second_id: 3
            }
        );

        let mut dup_id = equal(3);
        dup_id[2].id = 2;
        dup_id[2].weight = 0; // drained backends still need a unique id
        assert_eq!(
            build(&dup_id, DEFAULT_TABLE_SIZE).unwrap_err(),
            MaglevError::DuplicateId { id: 2 }
        );

        let mut reserved = equal(2);
        reserved[1].id = EMPTY_SLOT;
        assert_eq!(
            build(&reserved, DEFAULT_TABLE_SIZE).unwrap_err(),
            MaglevError::ReservedId {
                key: reserved[1].key.clone()
            }
        );
    }

    #[test]
    fn golden_table_is_pinned() {
        // If this fails, every xlb host running the new code disagrees with every host running
        // the old one. Change it only on purpose, and say so in the release notes.
        let backends: Vec<_> = (1..=3u8)
            .map(|i| MaglevBackend {
                id: u32::from(i),
                key: vec![10, 0, 0, i],
                weight: 1,
            })
            .collect();
        let table = build(&backends, DEFAULT_TABLE_SIZE).unwrap();
        assert_eq!(table[..16], GOLDEN_FIRST_16);
    }

    const GOLDEN_FIRST_16: [u32; 16] = [1, 3, 3, 3, 3, 1, 1, 1, 1, 3, 3, 2, 2, 2, 1, 1];

    #[test]
    fn thousand_backends_share_within_bounds() {
        // The classic loop at scale: every backend gets a share, within one slot of ideal
        // (65.5), which is well inside the ±35% hashing alone would allow.
        assert_equal_shares(1000);
    }
}
