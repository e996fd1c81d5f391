//! Header parsing: Ethernet, IPv4, IPv6, TCP, UDP. Every read goes through
//! [`PacketReader`]; a header that does not fit is counted, never read.

use aya_ebpf::programs::XdpContext;
use aya_log_ebpf::warn;
use lb_common::{LogSite, counters::Counter};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::{IpProto, Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
};

use crate::{counters, log, reader::PacketReader};

/// Classifies one frame layer by layer and bumps the counter of each layer it reached.
#[inline(always)]
pub fn classify(ctx: &XdpContext, reader: &PacketReader) {
    let Some(eth) = reader.read::<EthHdr>(0) else {
        counters::add(Counter::L2Truncated, 1);
        return;
    };
    // `ether_type` is stored in network byte order; the enum's values are too.
    match eth.ether_type {
        t if t == EtherType::Ipv4 as u16 => classify_ipv4(ctx, reader, EthHdr::LEN),
        t if t == EtherType::Ipv6 as u16 => classify_ipv6(ctx, reader, EthHdr::LEN),
        _ => counters::add(Counter::L3Other, 1),
    }
}

/// IPv4: the L4 offset comes from IHL; IHL < 5 and a total length that is shorter than the
/// header or longer than the frame make the packet malformed.
#[inline(always)]
fn classify_ipv4(ctx: &XdpContext, reader: &PacketReader, l3: usize) {
    let Some(ip) = reader.read::<Ipv4Hdr>(l3) else {
        counters::add(Counter::L3Malformed, 1);
        return;
    };
    let version = ip.vihl >> 4;
    let ihl = (ip.vihl & 0x0f) as usize;
    let header_len = ihl * 4;
    let total_len = u16::from_be_bytes(ip.tot_len) as usize;
    if version != 4 || ihl < 5 || total_len < header_len || l3 + total_len > reader.len() {
        counters::add(Counter::L3Malformed, 1);
        if log::allowed(LogSite::MalformedIpv4) {
            warn!(
                ctx,
                "malformed IPv4 header: version {} ihl {} total length {} frame length {}",
                version,
                ihl,
                total_len,
                reader.len()
            );
        }
        return;
    }
    counters::add(Counter::L3Ipv4, 1);

    // Later fragments start mid-datagram: what follows the IP header is payload, not ports.
    let fragment_offset = u16::from_be_bytes(ip.frags) & 0x1fff;
    if fragment_offset != 0 {
        counters::add(Counter::L4Fragment, 1);
        return;
    }
    classify_l4(reader, ip.proto, l3 + header_len, l3 + total_len);
}

/// IPv6: the fixed header and its payload must fit the frame. Extension headers are counted as
/// "other" until the L4 fast path walks them.
#[inline(always)]
fn classify_ipv6(ctx: &XdpContext, reader: &PacketReader, l3: usize) {
    let Some(ip) = reader.read::<Ipv6Hdr>(l3) else {
        counters::add(Counter::L3Malformed, 1);
        return;
    };
    let version = ip.vcf[0] >> 4;
    let payload_len = u16::from_be_bytes(ip.payload_len) as usize;
    let end = l3 + Ipv6Hdr::LEN + payload_len;
    if version != 6 || end > reader.len() {
        counters::add(Counter::L3Malformed, 1);
        if log::allowed(LogSite::MalformedIpv6) {
            warn!(
                ctx,
                "malformed IPv6 header: version {} payload length {} frame length {}",
                version,
                payload_len,
                reader.len()
            );
        }
        return;
    }
    counters::add(Counter::L3Ipv6, 1);
    classify_l4(reader, ip.next_hdr, l3 + Ipv6Hdr::LEN, end);
}

/// TCP and UDP headers must lie inside both the frame and the IP packet (`l3_end`).
#[inline(always)]
fn classify_l4(reader: &PacketReader, proto: u8, l4: usize, l3_end: usize) {
    if proto == IpProto::Tcp as u8 {
        if l4 + TcpHdr::LEN > l3_end || reader.read::<TcpHdr>(l4).is_none() {
            counters::add(Counter::L4Truncated, 1);
        } else {
            counters::add(Counter::L4Tcp, 1);
        }
    } else if proto == IpProto::Udp as u8 {
        if l4 + UdpHdr::LEN > l3_end || reader.read::<UdpHdr>(l4).is_none() {
            counters::add(Counter::L4Truncated, 1);
        } else {
            counters::add(Counter::L4Udp, 1);
        }
    } else {
        counters::add(Counter::L4Other, 1);
    }
}
