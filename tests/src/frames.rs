//! Frame builders for fixtures. Well-formed frames come from etherparse; malformed ones are made
//! by editing a well-formed frame at a named offset, so every byte that matters is explained.

use etherparse::{IpNumber, Ipv4Header, PacketBuilder};

/// MAC of the simulated client-side router.
pub const ROUTER_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
/// MAC of the LB host's NIC.
pub const LB_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x02];
/// A client address.
pub const CLIENT_V4: [u8; 4] = [198, 51, 100, 7];
/// A VIP address.
pub const VIP_V4: [u8; 4] = [203, 0, 113, 10];
/// A client address (IPv6).
pub const CLIENT_V6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7];
/// A VIP address (IPv6).
pub const VIP_V6: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
];

/// Offset of the IPv4/IPv6 header in an untagged Ethernet frame.
pub const L3: usize = 14;

/// IPv4 TCP segment from the client to the VIP.
pub fn tcp_v4(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    tcp4(VIP_V4, sport, dport, true, payload)
}

/// IPv4 UDP datagram from the client to the VIP.
pub fn udp_v4(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    udp4(VIP_V4, sport, dport, payload)
}

/// IPv6 TCP segment from the client to the VIP.
pub fn tcp_v6(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    tcp6(VIP_V6, sport, dport, true, payload)
}

/// IPv6 UDP datagram from the client to the VIP.
pub fn udp_v6(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    udp6(VIP_V6, sport, dport, payload)
}

/// IPv4 ICMP echo request from the client to the VIP.
pub fn icmp_echo_v4() -> Vec<u8> {
    icmp4_echo(VIP_V4)
}

/// IPv4 TCP segment whose header carries `options_words` 32-bit words of options
/// (IHL = 5 + options_words), filled with NOP options ending in End-of-List.
pub fn tcp_v4_with_options(options_words: usize, sport: u16, dport: u16) -> Vec<u8> {
    assert!(options_words <= 10, "IPv4 options are at most 40 bytes");
    let mut ip =
        Ipv4Header::new(0, 64, IpNumber::TCP, CLIENT_V4, VIP_V4).expect("valid IPv4 header");
    let mut options = vec![1u8; options_words * 4]; // NOP
    if let Some(last) = options.last_mut() {
        *last = 0; // End of options list
    }
    ip.options = etherparse::Ipv4Options::try_from(options.as_slice())
        .expect("options length is a multiple of 4");
    let b = PacketBuilder::ethernet2(ROUTER_MAC, LB_MAC)
        .ip(etherparse::IpHeaders::Ipv4(ip, Default::default()))
        .tcp(sport, dport, 1000, 65535)
        .syn();
    let mut out = Vec::new();
    b.write(&mut out, b"opt")
        .expect("building tcp_v4_with_options");
    out
}

/// An ARP request (who-has the VIP), built as raw bytes: etherparse's builder starts at IP.
pub fn arp_request() -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&[0xff; 6]); // broadcast
    f.extend_from_slice(&ROUTER_MAC);
    f.extend_from_slice(&0x0806u16.to_be_bytes()); // ARP
    f.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]); // Ethernet/IPv4, request
    f.extend_from_slice(&ROUTER_MAC);
    f.extend_from_slice(&CLIENT_V4);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&VIP_V4);
    f
}

/// Inserts one 802.1Q tag (VLAN `vid`) after the MAC addresses.
pub fn with_vlan_tag(frame: &[u8], vid: u16) -> Vec<u8> {
    let mut f = frame[..12].to_vec();
    f.extend_from_slice(&0x8100u16.to_be_bytes());
    f.extend_from_slice(&(vid & 0x0fff).to_be_bytes());
    f.extend_from_slice(&frame[12..]);
    f
}

/// Sets the IPv4 IHL nibble (keeping the version) and nothing else; the checksum is left stale
/// on purpose (the program must not rely on it).
pub fn set_ipv4_ihl(frame: &mut [u8], ihl: u8) {
    frame[L3] = (frame[L3] & 0xf0) | (ihl & 0x0f);
}

/// Sets the IPv4 total-length field.
pub fn set_ipv4_total_len(frame: &mut [u8], len: u16) {
    frame[L3 + 2..L3 + 4].copy_from_slice(&len.to_be_bytes());
}

/// Sets the IPv4 flags + fragment-offset field (offset in 8-byte units).
pub fn set_ipv4_fragment(frame: &mut [u8], more_fragments: bool, offset_units: u16) {
    let v = (if more_fragments { 0x2000 } else { 0 }) | (offset_units & 0x1fff);
    frame[L3 + 6..L3 + 8].copy_from_slice(&v.to_be_bytes());
}

/// Sets the IPv6 payload-length field.
pub fn set_ipv6_payload_len(frame: &mut [u8], len: u16) {
    frame[L3 + 4..L3 + 6].copy_from_slice(&len.to_be_bytes());
}

/// Sets the IP version nibble of the frame's network header.
pub fn set_ip_version(frame: &mut [u8], version: u8) {
    frame[L3] = (version << 4) | (frame[L3] & 0x0f);
}

/// Pads a frame with zeros to the Ethernet minimum of 60 bytes (without FCS), as NICs do.
pub fn pad_to_min(mut frame: Vec<u8>) -> Vec<u8> {
    if frame.len() < 60 {
        frame.resize(60, 0);
    }
    frame
}

/// IPv4 TCP segment from the client to `dst`, with SYN (and no ACK) when `syn`, else ACK.
pub fn tcp4(dst: [u8; 4], sport: u16, dport: u16, syn: bool, payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(ROUTER_MAC, LB_MAC)
        .ipv4(CLIENT_V4, dst, 64)
        .tcp(sport, dport, 1000, 65535);
    let b = if syn { b.syn() } else { b.ack(1) };
    let mut out = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut out, payload).expect("building tcp4");
    out
}

/// IPv4 UDP datagram from the client to `dst`.
pub fn udp4(dst: [u8; 4], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(ROUTER_MAC, LB_MAC)
        .ipv4(CLIENT_V4, dst, 64)
        .udp(sport, dport);
    let mut out = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut out, payload).expect("building udp4");
    out
}

/// IPv6 TCP segment from the client to `dst` (SYN when `syn`, else ACK).
pub fn tcp6(dst: [u8; 16], sport: u16, dport: u16, syn: bool, payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(ROUTER_MAC, LB_MAC)
        .ipv6(CLIENT_V6, dst, 64)
        .tcp(sport, dport, 1000, 65535);
    let b = if syn { b.syn() } else { b.ack(1) };
    let mut out = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut out, payload).expect("building tcp6");
    out
}

/// IPv6 UDP datagram from the client to `dst`.
pub fn udp6(dst: [u8; 16], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(ROUTER_MAC, LB_MAC)
        .ipv6(CLIENT_V6, dst, 64)
        .udp(sport, dport);
    let mut out = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut out, payload).expect("building udp6");
    out
}

/// Inserts an IPv6 extension header right after the fixed header of an untagged IPv6 frame,
/// fixing the chain and the payload length. `ext` is the header's bytes; its first byte (next
/// header) is overwritten with the previous next-header value.
pub fn with_ipv6_ext(frame: &[u8], ext_type: u8, ext: &[u8]) -> Vec<u8> {
    let mut f = frame[..L3 + 40].to_vec();
    let old_next = f[L3 + 6];
    f[L3 + 6] = ext_type;
    let mut e = ext.to_vec();
    e[0] = old_next;
    f.extend_from_slice(&e);
    f.extend_from_slice(&frame[L3 + 40..]);
    let payload = u16::from_be_bytes([frame[L3 + 4], frame[L3 + 5]]) + ext.len() as u16;
    f[L3 + 4..L3 + 6].copy_from_slice(&payload.to_be_bytes());
    f
}

/// A hop-by-hop / destination-options / routing style extension of `8 * (len_units + 1)` bytes
/// (PadN filled).
pub fn ext_8n(len_units: u8) -> Vec<u8> {
    let total = 8 * (len_units as usize + 1);
    let mut e = vec![0u8; total];
    e[1] = len_units;
    // PadN option covering the rest: type 1, length total - 4.
    e[2] = 1;
    e[3] = (total - 4) as u8;
    e
}

/// An authentication header with `payload_len` (AH length rule: `(payload_len + 2) * 4` bytes).
pub fn ext_ah(payload_len: u8) -> Vec<u8> {
    let total = (payload_len as usize + 2) * 4;
    let mut e = vec![0u8; total];
    e[1] = payload_len;
    e[4..8].copy_from_slice(&0x100u32.to_be_bytes()); // SPI
    e
}

/// An IPv6 fragment header at `offset_units` (8-byte units) with the M flag.
pub fn ext_fragment(offset_units: u16, more: bool, id: u32) -> Vec<u8> {
    let mut e = vec![0u8; 8];
    let v = (offset_units << 3) | more as u16;
    e[2..4].copy_from_slice(&v.to_be_bytes());
    e[4..8].copy_from_slice(&id.to_be_bytes());
    e
}

/// Sets the IPv4 TOS byte and fixes the header checksum.
pub fn set_ipv4_tos(frame: &mut [u8], tos: u8) {
    frame[L3 + 1] = tos;
    fix_ipv4_checksum(frame);
}

/// Recomputes the IPv4 header checksum of an untagged frame.
pub fn fix_ipv4_checksum(frame: &mut [u8]) {
    let ihl = (frame[L3] & 0x0f) as usize * 4;
    frame[L3 + 10] = 0;
    frame[L3 + 11] = 0;
    let h = etherparse::Ipv4HeaderSlice::from_slice(&frame[L3..L3 + ihl]).expect("ipv4 header");
    let c = h.to_header().calc_header_checksum();
    frame[L3 + 10..L3 + 12].copy_from_slice(&c.to_be_bytes());
}

/// A frame of `ip_len` bytes of IPv4 TCP to `dst:dport` (payload filled to reach the size).
pub fn tcp4_sized(dst: [u8; 4], dport: u16, ip_len: usize) -> Vec<u8> {
    tcp4(dst, 40000, dport, false, &vec![0x5a; ip_len - 40])
}

/// A frame of `ip_len` bytes (40 + payload) of IPv6 TCP to `dst:dport`.
pub fn tcp6_sized(dst: [u8; 16], dport: u16, ip_len: usize) -> Vec<u8> {
    tcp6(dst, 40000, dport, false, &vec![0x5a; ip_len - 60])
}

/// Sets the IPv4 identification field.
pub fn set_ipv4_id(frame: &mut [u8], id: u16) {
    frame[L3 + 4..L3 + 6].copy_from_slice(&id.to_be_bytes());
}

/// RFC 1071 checksum of `data` (reference implementation for expected frames).
pub fn rfc1071(data: &[u8]) -> u16 {
    let mut sum: u64 = 0;
    for pair in data.chunks(2) {
        sum += ((pair[0] as u64) << 8) | *pair.get(1).unwrap_or(&0) as u64;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An ICMPv4 error of `icmp_type`/`code` from `router` to `to`, quoting `quote` (the packet the
/// VIP side sent, from its IP header on), with valid checksums.
pub fn icmp4_error(
    router: [u8; 4],
    to: [u8; 4],
    icmp_type: u8,
    code: u8,
    rest: [u8; 4],
    quote: &[u8],
) -> Vec<u8> {
    let mut icmp = vec![icmp_type, code, 0, 0, rest[0], rest[1], rest[2], rest[3]];
    icmp.extend_from_slice(quote);
    let c = rfc1071(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let ip = Ipv4Header::new(icmp.len() as u16, 60, IpNumber::ICMP, router, to).expect("ip");
    let mut out = Vec::new();
    out.extend_from_slice(&LB_MAC);
    out.extend_from_slice(&ROUTER_MAC);
    out.extend_from_slice(&0x0800u16.to_be_bytes());
    let mut ip = ip;
    ip.header_checksum = ip.calc_header_checksum();
    out.extend_from_slice(&ip.to_bytes());
    out.extend_from_slice(&icmp);
    out
}

/// An ICMPv6 error of `icmp_type`/`code` from `router` to `to`, quoting `quote`.
pub fn icmp6_error(
    router: [u8; 16],
    to: [u8; 16],
    icmp_type: u8,
    code: u8,
    rest: [u8; 4],
    quote: &[u8],
) -> Vec<u8> {
    let mut icmp = vec![icmp_type, code, 0, 0, rest[0], rest[1], rest[2], rest[3]];
    icmp.extend_from_slice(quote);
    let c = icmp6_checksum(&router, &to, &icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut out = Vec::new();
    out.extend_from_slice(&LB_MAC);
    out.extend_from_slice(&ROUTER_MAC);
    out.extend_from_slice(&0x86ddu16.to_be_bytes());
    out.extend_from_slice(&[0x60, 0, 0, 0]);
    out.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
    out.push(58);
    out.push(60);
    out.extend_from_slice(&router);
    out.extend_from_slice(&to);
    out.extend_from_slice(&icmp);
    out
}

/// ICMPv6 checksum (pseudo-header + message), reference implementation.
pub fn icmp6_checksum(src: &[u8; 16], dst: &[u8; 16], msg: &[u8]) -> u16 {
    let mut data = Vec::new();
    data.extend_from_slice(src);
    data.extend_from_slice(dst);
    data.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    data.extend_from_slice(&[0, 0, 0, 58]);
    let mut m = msg.to_vec();
    m[2] = 0;
    m[3] = 0;
    data.extend_from_slice(&m);
    rfc1071(&data)
}

/// An ICMPv6 echo request from the client to `dst`.
pub fn icmp6_echo(dst: [u8; 16]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(ROUTER_MAC, LB_MAC)
        .ipv6(CLIENT_V6, dst, 64)
        .icmpv6_echo_request(7, 1);
    let mut out = Vec::new();
    b.write(&mut out, b"ping6").expect("building icmp6_echo");
    out
}

/// An ICMPv4 echo request from the client to `dst`.
pub fn icmp4_echo(dst: [u8; 4]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(ROUTER_MAC, LB_MAC)
        .ipv4(CLIENT_V4, dst, 64)
        .icmpv4_echo_request(7, 1);
    let mut out = Vec::new();
    b.write(&mut out, b"ping").expect("building icmp4_echo");
    out
}

/// The echo reply the balancer must send for an untagged echo request: MACs back to the
/// sender, addresses swapped, TTL / hop limit 64, type reply, checksums recomputed from scratch.
pub fn echo_reply_for(request: &[u8]) -> Vec<u8> {
    let mut f = request.to_vec();
    f[..6].copy_from_slice(&request[6..12]);
    f[6..12].copy_from_slice(&LB_MAC);
    if f[L3] >> 4 == 4 {
        let ihl = (f[L3] & 0x0f) as usize * 4;
        let (a, b) = (
            request[L3 + 12..L3 + 16].to_vec(),
            request[L3 + 16..L3 + 20].to_vec(),
        );
        f[L3 + 12..L3 + 16].copy_from_slice(&b);
        f[L3 + 16..L3 + 20].copy_from_slice(&a);
        f[L3 + 8] = 64;
        fix_ipv4_checksum(&mut f);
        let icmp = L3 + ihl;
        f[icmp] = 0;
        f[icmp + 2] = 0;
        f[icmp + 3] = 0;
        let total = u16::from_be_bytes([f[L3 + 2], f[L3 + 3]]) as usize;
        let c = rfc1071(&f[icmp..L3 + total]);
        f[icmp + 2..icmp + 4].copy_from_slice(&c.to_be_bytes());
    } else {
        let (a, b) = (
            request[L3 + 8..L3 + 24].to_vec(),
            request[L3 + 24..L3 + 40].to_vec(),
        );
        f[L3 + 8..L3 + 24].copy_from_slice(&b);
        f[L3 + 24..L3 + 40].copy_from_slice(&a);
        f[L3 + 7] = 64;
        let icmp = L3 + 40;
        f[icmp] = 129;
        let src: [u8; 16] = f[L3 + 8..L3 + 24].try_into().unwrap();
        let dst: [u8; 16] = f[L3 + 24..L3 + 40].try_into().unwrap();
        let c = icmp6_checksum(&src, &dst, &f[icmp..]);
        f[icmp + 2..icmp + 4].copy_from_slice(&c.to_be_bytes());
    }
    f
}
