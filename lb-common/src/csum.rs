//! Internet checksums (RFC 1071) that the XDP program writes and userspace verifies.

/// Checksum of a 20-byte IPv4 header whose checksum field (bytes 10..12) is zero. Folds carries
/// until none remain: ten 16-bit words sum below 2^20, so two folds always suffice, and they are
/// written out so the BPF verifier sees no loop.
#[inline(always)]
pub fn ipv4_header_checksum(h: &[u8; 20]) -> u16 {
    let mut sum: u32 = 0;
    sum += u16::from_be_bytes([h[0], h[1]]) as u32;
    sum += u16::from_be_bytes([h[2], h[3]]) as u32;
    sum += u16::from_be_bytes([h[4], h[5]]) as u32;
    sum += u16::from_be_bytes([h[6], h[7]]) as u32;
    sum += u16::from_be_bytes([h[8], h[9]]) as u32;
    sum += u16::from_be_bytes([h[10], h[11]]) as u32;
    sum += u16::from_be_bytes([h[12], h[13]]) as u32;
    sum += u16::from_be_bytes([h[14], h[15]]) as u32;
    sum += u16::from_be_bytes([h[16], h[17]]) as u32;
    sum += u16::from_be_bytes([h[18], h[19]]) as u32;
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 1071, section 4.1, done the slow way: add 16-bit words in a wide accumulator, fold
    /// until no carry remains, complement.
    fn reference(data: &[u8]) -> u16 {
        let mut sum: u64 = 0;
        for pair in data.chunks(2) {
            let hi = pair[0] as u64;
            let lo = *pair.get(1).unwrap_or(&0) as u64;
            sum += (hi << 8) | lo;
        }
        while sum >> 16 != 0 {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    fn header(src: [u8; 4], dst: [u8; 4], len: u16, tos: u8, ttl: u8) -> [u8; 20] {
        let mut h = [0u8; 20];
        h[0] = 0x45;
        h[1] = tos;
        h[2..4].copy_from_slice(&len.to_be_bytes());
        h[8] = ttl;
        h[9] = 4;
        h[12..16].copy_from_slice(&src);
        h[16..20].copy_from_slice(&dst);
        h
    }

    #[test]
    fn matches_rfc1071_over_many_outer_sources() {
        // Walk sources across the whole space (and the carry-heavy 0xff.. corner), with lengths
        // and TOS values that push the sum through several carries.
        let mut n = 0u32;
        let mut x: u32 = 0x1234_5678;
        for i in 0..200_000u32 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let src = if i % 7 == 0 {
                [0xff, 0xff, 0xff, (i & 0xff) as u8]
            } else {
                x.to_be_bytes()
            };
            let dst = (x.rotate_left(11) | 0xf000_0000).to_be_bytes();
            let h = header(src, dst, (x >> 16) as u16 | 0xff00, (i & 0xff) as u8, 64);
            let got = ipv4_header_checksum(&h);
            assert_eq!(got, reference(&h), "header {h:02x?}");
            // And a header carrying it verifies to zero, as a receiver checks it.
            let mut with = h;
            with[10..12].copy_from_slice(&got.to_be_bytes());
            assert_eq!(reference(&with), 0);
            n += 1;
        }
        assert_eq!(n, 200_000);
    }

    #[test]
    fn all_ones_header_folds_completely() {
        let mut h = [0xffu8; 20];
        h[10] = 0;
        h[11] = 0;
        assert_eq!(ipv4_header_checksum(&h), reference(&h));
    }
}
