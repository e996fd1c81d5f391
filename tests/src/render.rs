//! Human-readable views of frames for fixture failures: a layer-by-layer decode and a hex diff
//! that marks every differing byte.

use std::fmt::Write as _;

use etherparse::{LaxPacketHeaders, LinkExtHeader, LinkHeader, NetHeaders, TransportHeader};

/// Decodes `frame` layer by layer, one line per layer; where decoding stops, says why.
pub fn decode(frame: &[u8]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "    frame: {} bytes", frame.len());
    let headers = match LaxPacketHeaders::from_ethernet(frame) {
        Ok(h) => h,
        Err(e) => {
            let _ = writeln!(out, "    (not decodable as Ethernet: {e})");
            return out;
        }
    };
    if let Some(LinkHeader::Ethernet2(eth)) = &headers.link {
        let _ = writeln!(
            out,
            "    eth   {} -> {} type {:#06x}",
            mac(&eth.source),
            mac(&eth.destination),
            eth.ether_type.0
        );
    }
    for ext in &headers.link_exts {
        if let LinkExtHeader::Vlan(v) = ext {
            let _ = writeln!(
                out,
                "    vlan  id {} pcp {} type {:#06x}",
                v.vlan_id.value(),
                v.pcp.value(),
                v.ether_type.0
            );
        }
    }
    match &headers.net {
        Some(NetHeaders::Ipv4(ip, _)) => {
            let _ = writeln!(
                out,
                "    ipv4  {} -> {} ihl {} total {} id {} df {} mf {} frag {} ttl {} proto {} csum {:#06x} tos {:#04x}",
                std::net::Ipv4Addr::from(ip.source),
                std::net::Ipv4Addr::from(ip.destination),
                ip.ihl(),
                ip.total_len,
                ip.identification,
                ip.dont_fragment,
                ip.more_fragments,
                ip.fragment_offset.value(),
                ip.time_to_live,
                ip.protocol.0,
                ip.header_checksum,
                (ip.dscp.value() << 2) | ip.ecn.value()
            );
        }
        Some(NetHeaders::Ipv6(ip, _)) => {
            let _ = writeln!(
                out,
                "    ipv6  {} -> {} payload {} next {} hop {} tc {:#04x} flow {}",
                std::net::Ipv6Addr::from(ip.source),
                std::net::Ipv6Addr::from(ip.destination),
                ip.payload_length,
                ip.next_header.0,
                ip.hop_limit,
                ip.traffic_class,
                ip.flow_label.value()
            );
        }
        Some(NetHeaders::Arp(arp)) => {
            let _ = writeln!(out, "    arp   op {:?}", arp.operation);
        }
        None => {}
    }
    match &headers.transport {
        Some(TransportHeader::Tcp(t)) => {
            let _ = writeln!(
                out,
                "    tcp   {} -> {} seq {} ack {} flags {}{}{}{}{} win {} csum {:#06x}",
                t.source_port,
                t.destination_port,
                t.sequence_number,
                t.acknowledgment_number,
                if t.syn { "S" } else { "" },
                if t.ack { "A" } else { "" },
                if t.fin { "F" } else { "" },
                if t.rst { "R" } else { "" },
                if t.psh { "P" } else { "" },
                t.window_size,
                t.checksum
            );
        }
        Some(TransportHeader::Udp(u)) => {
            let _ = writeln!(
                out,
                "    udp   {} -> {} len {} csum {:#06x}",
                u.source_port, u.destination_port, u.length, u.checksum
            );
        }
        Some(TransportHeader::Icmpv4(i)) => {
            let _ = writeln!(out, "    icmp  {:?} csum {:#06x}", i.icmp_type, i.checksum);
        }
        Some(TransportHeader::Icmpv6(i)) => {
            let _ = writeln!(out, "    icmp6 {:?} csum {:#06x}", i.icmp_type, i.checksum);
        }
        Some(other) => {
            let _ = writeln!(out, "    l4    {other:?}");
        }
        None => {}
    }
    if let Some((err, layer)) = &headers.stop_err {
        let _ = writeln!(out, "    (decoding stopped at {layer:?}: {err})");
    }
    out
}

fn mac(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A hex diff of two frames, 16 bytes a row. Rows that agree are printed once; rows that differ
/// are printed as `-` (expected) and `+` (actual) with `^^` under each differing byte. Bytes
/// present in only one frame are shown as `..` in the other.
pub fn hex_diff(expected: &[u8], actual: &[u8]) -> String {
    let mut out = String::new();
    let rows = expected.len().max(actual.len()).div_ceil(16);
    for row in 0..rows {
        let start = row * 16;
        let cell = |frame: &[u8], i: usize| -> String {
            frame
                .get(i)
                .map_or_else(|| "..".to_string(), |b| format!("{b:02x}"))
        };
        let exp: Vec<String> = (start..start + 16)
            .filter(|&i| i < expected.len().max(actual.len()))
            .map(|i| cell(expected, i))
            .collect();
        let act: Vec<String> = (start..start + 16)
            .filter(|&i| i < expected.len().max(actual.len()))
            .map(|i| cell(actual, i))
            .collect();
        if exp == act {
            let _ = writeln!(out, "    {start:04x}   {}", exp.join(" "));
        } else {
            let marks: Vec<&str> = exp
                .iter()
                .zip(&act)
                .map(|(e, a)| if e == a { "  " } else { "^^" })
                .collect();
            let _ = writeln!(out, "    {start:04x} - {}", exp.join(" "));
            let _ = writeln!(out, "    {start:04x} + {}", act.join(" "));
            let _ = writeln!(out, "           {}", marks.join(" ").trim_end());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_diff_marks_each_differing_byte_and_length_changes() {
        let expected: Vec<u8> = (0u8..20).collect();
        let mut actual = expected.clone();
        actual[3] = 0xff;
        actual.push(0xaa);
        let diff = hex_diff(&expected, &actual);
        let lines: Vec<&str> = diff.lines().collect();
        assert_eq!(
            lines[0],
            "    0000 - 00 01 02 03 04 05 06 07 08 09 0a 0b 0c 0d 0e 0f"
        );
        assert_eq!(
            lines[1],
            "    0000 + 00 01 02 ff 04 05 06 07 08 09 0a 0b 0c 0d 0e 0f"
        );
        assert_eq!(lines[2], "                    ^^");
        assert_eq!(lines[3], "    0010 - 10 11 12 13 ..");
        assert_eq!(lines[4], "    0010 + 10 11 12 13 aa");
        assert_eq!(lines[5], "                       ^^");
    }

    #[test]
    fn hex_diff_of_equal_frames_has_no_markers() {
        let f: Vec<u8> = (0u8..40).collect();
        assert!(!hex_diff(&f, &f).contains('^'));
        assert!(!hex_diff(&f, &f).contains(" - "));
    }

    #[test]
    fn decode_names_each_layer_and_where_it_stopped() {
        let frame = crate::frames::tcp_v4(40000, 80, b"x");
        let text = decode(&frame);
        assert!(text.contains("eth   02:00:00:00:00:01 -> 02:00:00:00:00:02 type 0x0800"));
        assert!(text.contains("ipv4  198.51.100.7 -> 203.0.113.10 ihl 5"));
        assert!(text.contains("tcp   40000 -> 80"));

        let mut bad = frame.clone();
        crate::frames::set_ipv4_ihl(&mut bad, 3);
        assert!(decode(&bad).contains("decoding stopped"));
    }
}
