//! Fixture packets through the backend-side decapsulator (`xlb_decap`), loaded by the real
//! loader. Tunnel packets are built by the same independent builders the balancer fixtures
//! use, so "decapsulate what the balancer sends" is checked for every outer/inner family pair.

use lb_common::{counters::Counter::*, types::proto};
use lb_userspace::loader::Decapsulator;
use xlb_tests::{
    fixture::{Case, run_all_decap},
    frames::{self, L3},
    world::{self, B1, B2, B3, B4},
};

const VIP: [u8; 4] = [203, 0, 113, 10];

/// What the decapsulator must hand to the stack: the frame's MACs and VLAN tags, the inner
/// packet's EtherType, then the inner packet (and any trailing bytes) unchanged.
fn stripped(outer: &[u8], vlans: usize) -> Vec<u8> {
    let l3 = 14 + 4 * vlans;
    let outer_len = if outer[l3] >> 4 == 4 {
        (outer[l3] & 0x0f) as usize * 4
    } else {
        40
    };
    let inner = &outer[l3 + outer_len..];
    let mut out = outer[..12 + 4 * vlans].to_vec();
    out.extend_from_slice(
        &if inner[0] >> 4 == 4 {
            0x0800u16
        } else {
            0x86dd
        }
        .to_be_bytes(),
    );
    out.extend_from_slice(inner);
    out
}

fn local(decap: &mut Decapsulator) {
    for b in [B1, B3, B4] {
        let addr: std::net::IpAddr = world::addr_string(&b).parse().unwrap();
        decap.add_local_addr(addr).expect("local address");
    }
}

#[test]
fn decapsulator_fixtures() {
    let tcp4 = frames::tcp4(VIP, 40000, 80, true, b"hello");
    let key4 = world::key_v4(VIP, 40000, 80, proto::TCP);
    let tcp6 = frames::tcp6(frames::VIP_V6, 40000, 80, true, b"hello6");
    let key6 = world::key_v6(frames::VIP_V6, 40000, 80, proto::TCP);

    let ipip = world::encapsulated(&tcp4, 0, &key4, &B1);
    let ip6ip6 = world::encapsulated(&tcp6, 0, &key6, &B4);
    let v4in6 = world::encapsulated(&tcp4, 0, &key4, &B3);
    let v6in4 = world::encapsulated(&tcp6, 0, &key6, &B1);
    let tagged_in = frames::with_vlan_tag(&tcp4, 42);
    let tagged = world::encapsulated(&tagged_in, 1, &key4, &B1);
    let padded_in = frames::pad_to_min(frames::udp4(VIP, 1, 53, b""));
    let padded = world::encapsulated(&padded_in, 0, &world::key_v4(VIP, 1, 53, proto::UDP), &B1);
    let not_local = world::encapsulated(&tcp4, 0, &key4, &B2);

    let mut wrong_version = ipip.clone();
    wrong_version[L3 + 20] = 0x65; // inner "IPv6" in an IPIP packet
    let mut short_inner = ipip[..L3 + 20 + 12].to_vec();
    short_inner[L3 + 2..L3 + 4].copy_from_slice(&32u16.to_be_bytes());
    frames::fix_ipv4_checksum(&mut short_inner);

    let cases: Vec<Case<Decapsulator>> = vec![
        Case::passes(
            "ipip to a local address is stripped",
            ipip.clone(),
            &[L3Ipv4, L4Other, DecapV4],
        ),
        Case::passes(
            "ip6ip6 to a local address is stripped",
            ip6ip6.clone(),
            &[L3Ipv6, L4Other, DecapV6],
        ),
        Case::passes(
            "ipv4-in-ipv6 is stripped",
            v4in6.clone(),
            &[L3Ipv6, L4Other, DecapV6],
        ),
        Case::passes(
            "ipv6-in-ipv4 is stripped",
            v6in4.clone(),
            &[L3Ipv4, L4Other, DecapV4],
        ),
        Case::passes(
            "a vlan tag is kept",
            tagged.clone(),
            &[Vlan1, L3Ipv4, L4Other, DecapV4],
        ),
        Case::passes(
            "ethernet padding stays behind the inner packet",
            padded.clone(),
            &[L3Ipv4, L4Other, DecapV4],
        ),
        Case::passes(
            "tunnel packet for another host passes untouched",
            not_local,
            &[L3Ipv4, L4Other, DecapNotLocal],
        ),
        Case::passes(
            "plain tcp passes untouched",
            tcp4.clone(),
            &[L3Ipv4, L4Tcp, DecapPassthrough],
        ),
        Case::passes("arp passes untouched", frames::arp_request(), &[L3Other]),
        Case::drops(
            "inner header of the wrong version is dropped",
            wrong_version,
            &[L3Ipv4, L4Other, DecapMalformed],
        ),
        Case::drops(
            "inner header cut short is dropped",
            short_inner,
            &[L3Ipv4, L4Other, DecapMalformed],
        ),
    ]
    .into_iter()
    .map(|mut c| {
        if c.name.contains("stripped") || c.name.contains("kept") || c.name.contains("padding") {
            let vlans = usize::from(c.name.contains("vlan"));
            c.output = xlb_tests::fixture::Output::Frame(stripped(&c.input, vlans));
        }
        c
    })
    .collect();
    run_all_decap(local, &cases);
}
