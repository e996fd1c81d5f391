//! Fixture packets through BPF_PROG_TEST_RUN against the real balancer object, loaded by the
//! real loader, with the standard world (`xlb_tests::world`) installed through the typed map
//! layer. Every case states its input, verdict, exact output bytes and counter deltas. Needs
//! root (CAP_BPF).

use std::sync::{Arc, Mutex};

use aya::programs::{TestRun as _, TestRunOptions};
use lb_common::{
    counters::Counter::{self, *},
    flow::flow_hash,
    types::{BACKEND_F_UP, FlowKey, proto},
};
use lb_userspace::loader::Balancer;
use xlb_tests::{
    fixture::{Case, XdpAction, run_all, send},
    frames::{self, L3},
    world::{
        self, B1, B2, B3, B4, V_ALLPORTS, V_EMPTY, V_L2, V_L7, V_PAIR, V_TCP, V_UDP, V6_TCP, V6_UDP,
    },
};

const VIP: [u8; 4] = [203, 0, 113, 10];
const NOT_VIP: [u8; 4] = [198, 51, 100, 99];

fn v4(k: &lb_common::types::VipKey) -> [u8; 4] {
    [k.addr[0], k.addr[1], k.addr[2], k.addr[3]]
}

/// A TCP frame to V_TCP forwarded by IPIP to B1.
fn ipip_case(name: impl Into<String>, input: Vec<u8>, vlans: usize, layers: &[Counter]) -> Case {
    let l3 = 14 + 4 * vlans;
    let sport = u16::from_be_bytes([input[l3 + 20], input[l3 + 21]]);
    let ihl = (input[l3] & 0xf) as usize * 4;
    let sport = if ihl == 20 {
        sport
    } else {
        u16::from_be_bytes([input[l3 + ihl], input[l3 + ihl + 1]])
    };
    let key = world::key_v4(VIP, sport, 80, proto::TCP);
    let out = world::encapsulated(&input, vlans, &key, &B1);
    let mut all = vec![L3Ipv4, L4Tcp, FwdEncapV4];
    // Each case starts with an empty connection table: SYN or not, the flow is new.
    all.push(CtMiss);
    all.extend_from_slice(layers);
    Case::forwards(name, input, out, &all)
}

fn ipv4_parse_cases() -> Vec<Case> {
    let mut cases = vec![
        ipip_case(
            "ipv4 tcp syn to a vip",
            frames::tcp4(VIP, 40000, 80, true, b""),
            0,
            &[],
        ),
        Case::passes(
            "ipv4 tcp to a non-vip address",
            frames::tcp4(NOT_VIP, 40000, 22, true, b""),
            &[L3Ipv4, L4Tcp, PassNotVip],
        ),
        Case::passes(
            "ipv4 tcp to a vip address on another port",
            frames::tcp4(VIP, 40000, 22, true, b""),
            &[L3Ipv4, L4Tcp, PassNotVip],
        ),
        Case::passes(
            "ipv4 udp to a non-vip address",
            frames::udp4(NOT_VIP, 5353, 53, b"query"),
            &[L3Ipv4, L4Udp, PassNotVip],
        ),
    ];
    // Every legal IHL: the ports are read after the options, never inside them.
    for words in 0..=10 {
        let mut f = frames::tcp_v4_with_options(words, 40000, 80);
        frames::fix_ipv4_checksum(&mut f);
        cases.push(ipip_case(
            format!("ipv4 ihl {} tcp to a vip", 5 + words),
            f,
            0,
            &[],
        ));
    }
    // Every illegal IHL.
    for ihl in 0..5 {
        let mut f = frames::tcp4(VIP, 40000, 80, true, b"");
        frames::set_ipv4_ihl(&mut f, ihl);
        cases.push(Case::drops(
            format!("ipv4 ihl {ihl} is malformed"),
            f,
            &[L3Malformed],
        ));
    }
    {
        // Total length 28: IHL 6 leaves 4 bytes for an 8-byte UDP header (L4 truncated);
        // IHL 8 and up put the header's end past the total length (malformed).
        let mut f = frames::udp_v4(1, 2, b"");
        frames::set_ipv4_ihl(&mut f, 6);
        cases.push(Case::drops(
            "ipv4 ihl 6 leaves udp header truncated",
            f,
            &[L3Ipv4, L4Truncated],
        ));
    }
    for ihl in [8, 15] {
        let mut f = frames::udp_v4(1, 2, b"");
        frames::set_ipv4_ihl(&mut f, ihl);
        cases.push(Case::drops(
            format!("ipv4 ihl {ihl} beyond total length 28 is malformed"),
            f,
            &[L3Malformed],
        ));
    }
    let base = frames::tcp4(VIP, 40000, 80, false, b"abcd");
    let frame_ip_len = (base.len() - L3) as u16;
    for (name, total) in [
        ("ipv4 total length one past the frame", frame_ip_len + 1),
        ("ipv4 total length 65535", 65535),
        ("ipv4 total length shorter than the header", 19),
        ("ipv4 total length 0", 0),
    ] {
        let mut f = base.clone();
        frames::set_ipv4_total_len(&mut f, total);
        cases.push(Case::drops(name, f, &[L3Malformed]));
    }
    {
        let mut f = base.clone();
        frames::set_ip_version(&mut f, 6);
        cases.push(Case::drops(
            "ipv4 ethertype with version 6 is malformed",
            f,
            &[L3Malformed],
        ));
    }
    // Truncated inside every layer: the IPv4 header, the TCP header (inside Ethernet: see the
    // VLAN cases; the kernel refuses test frames under 14 bytes).
    for keep in 0..20 {
        cases.push(Case::drops(
            format!("ipv4 header truncated to {keep} bytes"),
            base[..L3 + keep].to_vec(),
            &[L3Malformed],
        ));
    }
    {
        let mut f = base.clone();
        frames::set_ipv4_total_len(&mut f, 20 + 19);
        cases.push(Case::drops(
            "ipv4 tcp header past total length",
            f,
            &[L3Ipv4, L4Truncated],
        ));
    }
    for keep in 0..20 {
        let mut f = base[..L3 + 20 + keep].to_vec();
        frames::set_ipv4_total_len(&mut f, (20 + keep) as u16);
        cases.push(Case::drops(
            format!("ipv4 tcp header truncated to {keep} bytes"),
            f,
            &[L3Ipv4, L4Truncated],
        ));
    }
    for keep in 0..8 {
        let full = frames::udp4(VIP, 1, 53, b"");
        let mut f = full[..L3 + 20 + keep].to_vec();
        frames::set_ipv4_total_len(&mut f, (20 + keep) as u16);
        cases.push(Case::drops(
            format!("ipv4 udp header truncated to {keep} bytes"),
            f,
            &[L3Ipv4, L4Truncated],
        ));
    }
    {
        let full = frames::icmp_echo_v4();
        let mut f = full[..L3 + 20 + 7].to_vec();
        frames::set_ipv4_total_len(&mut f, 27);
        cases.push(Case::drops(
            "ipv4 icmp header truncated",
            f,
            &[L3Ipv4, L4Truncated],
        ));
    }
    // Fragments: the first carries the ports; later ones are never read as if they did.
    {
        // A first fragment is tracked and encapsulated with its datagram's hash (addresses, id,
        // protocol), so every fragment gets the same outer source.
        let mut f = base.clone();
        frames::set_ipv4_fragment(&mut f, true, 0);
        let key = frag_key(world::key_v4(VIP, 0, 0, proto::TCP), 0);
        cases.push(Case::forwards(
            "ipv4 first fragment to a vip",
            f.clone(),
            world::encapsulated(&f, 0, &key, &B1),
            &[L3Ipv4, L4Tcp, CtMiss, FragTracked, FwdEncapV4],
        ));
        for offset in [1, 185, 0x1fff] {
            let mut f = frames::tcp4(v4(&V_ALLPORTS.key), 40000, 80, false, b"abcd");
            frames::set_ipv4_fragment(&mut f, offset != 0x1fff, offset);
            cases.push(Case::drops(
                format!("ipv4 later fragment at offset {offset} to an every-port vip"),
                f,
                &[L3Ipv4, L4Fragment, DropFragUnknown],
            ));
        }
    }
    cases
}

fn ipv6_parse_cases() -> Vec<Case> {
    let vip6 = V6_TCP.key.addr;
    let base = frames::tcp6(vip6, 40000, 80, false, b"abcd");
    let fwd6 = |name: String, input: Vec<u8>, layers: &[Counter]| {
        let key = world::key_v6(vip6, 40000, 80, proto::TCP);
        let out = world::encapsulated(&input, 0, &key, &B4);
        let mut all = vec![L3Ipv6, L4Tcp, CtMiss, FwdEncapV6];
        all.extend_from_slice(layers);
        Case::forwards(name, input, out, &all)
    };
    let mut cases = vec![
        fwd6("ipv6 tcp to a vip".into(), base.clone(), &[]),
        Case::passes(
            "ipv6 udp to a non-vip address",
            frames::udp6(
                [0x20, 1, 0xd, 0xb8, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
                5353,
                53,
                b"query",
            ),
            &[L3Ipv6, L4Udp, PassNotVip],
        ),
    ];
    // Extension-header chains of 1..=8 headers of every kind, each with its own length rule.
    let kinds: [(u8, Vec<u8>, &str); 6] = [
        (0, frames::ext_8n(0), "hop-by-hop"),
        (60, frames::ext_8n(2), "destination options (24 bytes)"),
        (43, frames::ext_8n(1), "routing (16 bytes)"),
        (51, frames::ext_ah(4), "ah (24 bytes)"),
        (51, frames::ext_ah(1), "ah (12 bytes)"),
        (44, frames::ext_fragment(0, true, 7), "first fragment"),
    ];
    for (t, e, what) in &kinds[..5] {
        cases.push(fwd6(
            format!("ipv6 with {what} then tcp"),
            frames::with_ipv6_ext(&base, *t, e),
            &[],
        ));
    }
    {
        // A first fragment is tracked and encapsulated with its datagram's hash.
        let f = frames::with_ipv6_ext(&base, 44, &kinds[5].1);
        let key = frag_key(world::key_v6(vip6, 0, 0, proto::TCP), 7);
        cases.push(Case::forwards(
            "ipv6 with first fragment then tcp",
            f.clone(),
            world::encapsulated(&f, 0, &key, &B4),
            &[L3Ipv6, L4Tcp, CtMiss, FragTracked, FwdEncapV6],
        ));
    }
    for n in 2..=8 {
        let mut f = base.clone();
        for i in 0..n {
            let (t, e, _) = &kinds[i % 5];
            f = frames::with_ipv6_ext(&f, *t, e);
        }
        cases.push(fwd6(
            format!("ipv6 with a chain of {n} extension headers"),
            f,
            &[],
        ));
    }
    {
        let mut f = base.clone();
        for _ in 0..9 {
            f = frames::with_ipv6_ext(&f, 60, &frames::ext_8n(0));
        }
        cases.push(Case::drops(
            "ipv6 chain of 9 extension headers is malformed",
            f,
            &[L3Malformed],
        ));
    }
    {
        // An extension header whose length runs past the payload.
        let mut f = frames::with_ipv6_ext(&base, 60, &frames::ext_8n(0));
        f[L3 + 40 + 1] = 200;
        cases.push(Case::drops(
            "ipv6 extension header past the payload",
            f,
            &[L3Malformed],
        ));
        // Truncated inside an extension header.
        let f = frames::with_ipv6_ext(&base, 44, &frames::ext_fragment(0, true, 1));
        let mut t = f[..L3 + 40 + 4].to_vec();
        frames::set_ipv6_payload_len(&mut t, 4);
        cases.push(Case::drops(
            "ipv6 truncated inside a fragment header",
            t,
            &[L3Malformed],
        ));
    }
    {
        let f = frames::with_ipv6_ext(&base, 44, &frames::ext_fragment(3, false, 9));
        cases.push(Case::drops(
            "ipv6 later fragment to a vip address without its first is dropped",
            f,
            &[L3Ipv6, L4Fragment, DropFragUnknown],
        ));
    }
    let payload = (base.len() - L3 - 40) as u16;
    for (name, len) in [
        ("ipv6 payload length one past the frame", payload + 1),
        ("ipv6 payload length 65535", 65535),
    ] {
        let mut f = base.clone();
        frames::set_ipv6_payload_len(&mut f, len);
        cases.push(Case::drops(name, f, &[L3Malformed]));
    }
    {
        let mut f = base.clone();
        frames::set_ipv6_payload_len(&mut f, 10);
        cases.push(Case::drops(
            "ipv6 tcp header past payload length",
            f,
            &[L3Ipv6, L4Truncated],
        ));
    }
    {
        let mut f = base.clone();
        frames::set_ip_version(&mut f, 4);
        cases.push(Case::drops(
            "ipv6 ethertype with version 4 is malformed",
            f,
            &[L3Malformed],
        ));
    }
    for keep in [0, 1, 20, 39] {
        cases.push(Case::drops(
            format!("ipv6 header truncated to {keep} bytes"),
            base[..L3 + keep].to_vec(),
            &[L3Malformed],
        ));
    }
    cases
}

fn l2_cases() -> Vec<Case> {
    let tcp = frames::tcp4(VIP, 40000, 80, true, b"");
    let key = world::key_v4(VIP, 40000, 80, proto::TCP);
    let one = frames::with_vlan_tag(&tcp, 100);
    let mut qinq = frames::with_vlan_tag(&one, 200);
    qinq[12..14].copy_from_slice(&0x88a8u16.to_be_bytes());
    let three = frames::with_vlan_tag(&qinq, 300);
    vec![
        Case::passes("arp request", frames::arp_request(), &[L3Other]),
        Case::forwards(
            "one 802.1q tag: kept on the encapsulated frame",
            one.clone(),
            world::encapsulated(&one, 1, &key, &B1),
            &[Vlan1, L3Ipv4, L4Tcp, CtMiss, FwdEncapV4],
        ),
        Case::forwards(
            "802.1ad + 802.1q tags: both kept",
            qinq.clone(),
            world::encapsulated(&qinq, 2, &key, &B1),
            &[Vlan2, L3Ipv4, L4Tcp, CtMiss, FwdEncapV4],
        ),
        Case::passes(
            "three vlan tags are passed untouched",
            three,
            &[VlanTooMany],
        ),
        Case::drops(
            "one vlan tag, truncated before the inner ethertype",
            one[..17].to_vec(),
            &[L2Truncated],
        ),
        Case::drops(
            "ethernet header only, ethertype ipv4",
            tcp[..14].to_vec(),
            &[L3Malformed],
        ),
    ]
}

fn forwarding_cases() -> Vec<Case> {
    let mut cases = Vec::new();
    {
        let f = frames::udp4(v4(&V_UDP.key), 5353, 53, b"query");
        let key = world::key_v4(v4(&V_UDP.key), 5353, 53, proto::UDP);
        cases.push(Case::forwards(
            "udp vip: ipip to an ipv4 backend",
            f.clone(),
            world::encapsulated(&f, 0, &key, &B2),
            &[L3Ipv4, L4Udp, CtMiss, FwdEncapV4],
        ));
        let p = frames::pad_to_min(frames::udp4(v4(&V_UDP.key), 5353, 53, b""));
        cases.push(Case::forwards(
            "udp vip: ethernet padding travels behind the inner packet",
            p.clone(),
            world::encapsulated(&p, 0, &key, &B2),
            &[L3Ipv4, L4Udp, CtMiss, FwdEncapV4],
        ));
    }
    for tos in [0x00, 0xb8, 0x03, 0xff] {
        let mut f = frames::tcp4(VIP, 40000, 80, true, b"");
        frames::set_ipv4_tos(&mut f, tos);
        cases.push(ipip_case(
            format!("dscp/ecn {tos:#04x} copied to the outer header"),
            f,
            0,
            &[],
        ));
    }
    for port in [1, 80, 8443, 65535] {
        let dst = v4(&V_ALLPORTS.key);
        let f = frames::tcp4(dst, 40000, port, true, b"");
        let key = world::key_v4(dst, 40000, port, proto::TCP);
        cases.push(Case::forwards(
            format!("every-port vip, port {port}: ipv4-in-ipv6 to an ipv6 backend"),
            f.clone(),
            world::encapsulated(&f, 0, &key, &B3),
            &[L3Ipv4, L4Tcp, CtMiss, FwdEncapV6],
        ));
    }
    {
        let f = frames::udp6(V6_UDP.key.addr, 5353, 53, b"q6");
        let key = world::key_v6(V6_UDP.key.addr, 5353, 53, proto::UDP);
        cases.push(Case::forwards(
            "ipv6 udp vip: ipv6-in-ipv4 to an ipv4 backend",
            f.clone(),
            world::encapsulated(&f, 0, &key, &B1),
            &[L3Ipv6, L4Udp, CtMiss, FwdEncapV4],
        ));
    }
    {
        let f = frames::tcp4(v4(&V_L2.key), 40000, 80, true, b"");
        cases.push(Case::forwards(
            "l2 dsr vip: only the macs change",
            f.clone(),
            world::l2_rewritten(&f, &B2),
            &[L3Ipv4, L4Tcp, CtMiss, FwdL2],
        ));
        cases.push(Case::passes(
            "l7 vip: passed to the host stack",
            frames::tcp4(v4(&V_L7.key), 40000, 443, true, b""),
            &[L3Ipv4, L4Tcp, PassL7],
        ));
        cases.push(Case::drops(
            "vip without backends: dropped and counted",
            frames::tcp4(v4(&V_EMPTY.key), 40000, 80, true, b""),
            &[L3Ipv4, L4Tcp, CtMiss, DropNoBackend],
        ));
    }
    // MTU: 1500 - 20 for IPIP, 1500 - 40 for an IPv6 outer header; exactly at and one past.
    // One past: DF set -> ICMP frag-needed (MTU - 20); DF clear -> drop; IPv6 -> packet too
    // big (MTU - 40), never larger than 1280 bytes.
    {
        let f = frames::tcp4_sized(VIP, 80, 1480);
        let key = world::key_v4(VIP, 40000, 80, proto::TCP);
        cases.push(Case::forwards(
            "ipip at exactly mtu - 20 (1480 bytes)",
            f.clone(),
            world::encapsulated(&f, 0, &key, &B1),
            &[L3Ipv4, L4Tcp, CtMiss, FwdEncapV4],
        ));
        let big = frames::tcp4_sized(VIP, 80, 1481);
        cases.push(Case::forwards(
            "ipip one byte past mtu - 20 with DF: icmp frag-needed with mtu 1480",
            big.clone(),
            world::frag_needed(&big, 0, 1480),
            &[L3Ipv4, L4Tcp, CtMiss, IcmpTooBigSent],
        ));
        let mut no_df = big.clone();
        frames::set_ipv4_fragment(&mut no_df, false, 0);
        frames::fix_ipv4_checksum(&mut no_df);
        cases.push(Case::drops(
            "ipip one byte past mtu - 20 without DF: dropped",
            no_df,
            &[L3Ipv4, L4Tcp, CtMiss, DropTooBig],
        ));
        for words in [1, 10] {
            let mut opt = frames::tcp_v4_with_options(words, 40000, 80);
            let pad = 1481 - (opt.len() - L3);
            opt = {
                let mut f = frames::tcp_v4_with_options(words, 40000, 80);
                f.extend(std::iter::repeat_n(0x5a, pad));
                let total = (f.len() - L3) as u16;
                frames::set_ipv4_total_len(&mut f, total);
                frames::fix_ipv4_checksum(&mut f);
                f
            };
            cases.push(Case::forwards(
                format!(
                    "frag-needed quotes the whole ihl {} header plus 8 bytes",
                    5 + words
                ),
                opt.clone(),
                world::frag_needed(&opt, 0, 1480),
                &[L3Ipv4, L4Tcp, CtMiss, IcmpTooBigSent],
            ));
        }
        let tagged = frames::with_vlan_tag(&big, 7);
        cases.push(Case::forwards(
            "frag-needed keeps the vlan tag",
            tagged.clone(),
            world::frag_needed(&tagged, 1, 1480),
            &[Vlan1, L3Ipv4, L4Tcp, CtMiss, IcmpTooBigSent],
        ));
        let dst = v4(&V_ALLPORTS.key);
        let to_v6 = frames::tcp4_sized(dst, 80, 1461);
        cases.push(Case::forwards(
            "ipv4-in-ipv6 one byte past mtu - 40: frag-needed with mtu 1460",
            to_v6.clone(),
            world::frag_needed(&to_v6, 0, 1460),
            &[L3Ipv4, L4Tcp, CtMiss, IcmpTooBigSent],
        ));
    }
    {
        let f = frames::tcp6_sized(V6_TCP.key.addr, 80, 1460);
        let key = world::key_v6(V6_TCP.key.addr, 40000, 80, proto::TCP);
        cases.push(Case::forwards(
            "ip6ip6 at exactly mtu - 40 (1460 bytes)",
            f.clone(),
            world::encapsulated(&f, 0, &key, &B4),
            &[L3Ipv6, L4Tcp, CtMiss, FwdEncapV6],
        ));
        let big = frames::tcp6_sized(V6_TCP.key.addr, 80, 1461);
        let reply = world::packet_too_big(&big, 0, 1460);
        assert!(reply.len() - L3 <= 1280);
        cases.push(Case::forwards(
            "ip6ip6 one byte past mtu - 40: packet too big (at most 1280 bytes) with mtu 1460",
            big,
            reply,
            &[L3Ipv6, L4Tcp, CtMiss, IcmpTooBigSent],
        ));
        let f = frames::udp6(V6_UDP.key.addr, 5353, 53, &[1; 1481 - 48]);
        cases.push(Case::forwards(
            "ipv6-in-ipv4 one byte past mtu - 20: packet too big with mtu 1480",
            f.clone(),
            world::packet_too_big(&f, 0, 1480),
            &[L3Ipv6, L4Udp, CtMiss, IcmpTooBigSent],
        ));
    }
    cases
}

/// The backend Maglev gives a flow of V_PAIR, from the same table the agent installs.
fn pair_choice(key: &FlowKey) -> u32 {
    let table = world::table(V_PAIR.backends);
    table[(flow_hash(key) % world::TABLE_SIZE) as usize]
}

fn backend_by_id(id: u32) -> world::WorldBackend {
    *world::BACKENDS
        .iter()
        .find(|b| b.id == id)
        .expect("world backend")
}

fn other_of_pair(id: u32) -> world::WorldBackend {
    if id == B1.id { B2 } else { B1 }
}

fn conntrack_cases() -> Vec<Case> {
    let dst = v4(&V_PAIR.key);
    let key = world::key_v4(dst, 41000, 80, proto::TCP);
    let first = backend_by_id(pair_choice(&key));
    let other = other_of_pair(first.id);
    let syn = frames::tcp4(dst, 41000, 80, true, b"");
    let ack = frames::tcp4(dst, 41000, 80, false, b"data");
    let only_other = move |b: &mut Balancer| {
        b.publish_vip(&V_PAIR.key, V_PAIR.id, 0, &world::table(&[other]))
            .expect("republish");
    };
    let syn_first = {
        let syn = syn.clone();
        move |b: &Balancer| {
            let (a, _) = send(b, &syn);
            assert_eq!(a, XdpAction::Tx, "the flow's SYN must be forwarded");
        }
    };
    let mut cases = Vec::new();
    {
        let s = syn_first.clone();
        cases.push(
            Case::forwards(
                "established flow keeps its backend when the table changes",
                ack.clone(),
                world::encapsulated(&ack, 0, &key, &first),
                &[L3Ipv4, L4Tcp, CtHit, FwdEncapV4],
            )
            .with_setup(move |b: &mut Balancer| {
                s(b);
                only_other(b);
            }),
        );
    }
    {
        let s = syn_first.clone();
        cases.push(
            Case::forwards(
                "a new SYN on a known tuple is re-selected from the current table",
                syn.clone(),
                world::encapsulated(&syn, 0, &key, &other),
                &[L3Ipv4, L4Tcp, CtMiss, FwdEncapV4],
            )
            .with_setup(move |b: &mut Balancer| {
                s(b);
                only_other(b);
            }),
        );
    }
    {
        let s = syn_first.clone();
        cases.push(
            Case::forwards(
                "a flow whose backend went down is re-selected",
                ack.clone(),
                world::encapsulated(&ack, 0, &key, &other),
                &[L3Ipv4, L4Tcp, CtReselect, FwdEncapV4],
            )
            .with_setup(move |b: &mut Balancer| {
                s(b);
                let mut down = world::backend_entry(&first);
                down.flags &= !BACKEND_F_UP;
                b.set_backend(first.id, &down).expect("mark down");
                only_other(b);
            }),
        );
    }
    {
        // Drained: out of the table (weight 0) but still up: established flows stay.
        let s = syn_first.clone();
        cases.push(
            Case::forwards(
                "a drained backend keeps its established flow",
                ack.clone(),
                world::encapsulated(&ack, 0, &key, &first),
                &[L3Ipv4, L4Tcp, CtHit, FwdEncapV4],
            )
            .with_setup(move |b: &mut Balancer| {
                s(b);
                only_other(b);
            }),
        );
        let key2 = world::key_v4(dst, 41001, 80, proto::TCP);
        let syn2 = frames::tcp4(dst, 41001, 80, true, b"");
        cases.push(
            Case::forwards(
                "a drained backend gets no new flow",
                syn2.clone(),
                world::encapsulated(&syn2, 0, &key2, &other),
                &[L3Ipv4, L4Tcp, CtMiss, FwdEncapV4],
            )
            .with_setup(only_other),
        );
    }
    {
        cases.push(Case::forwards(
            "a non-SYN packet without a connection-table entry selects from the table",
            ack.clone(),
            world::encapsulated(&ack, 0, &key, &first),
            &[L3Ipv4, L4Tcp, CtMiss, FwdEncapV4],
        ));
    }
    cases
}

/// The packet the VIP side (a backend, by DSR) sent to the client for flow `key` of an IPv4 VIP:
/// what a router quotes in an ICMP error. `len` bytes of it.
fn reply_v4(vip: [u8; 4], client_port: u16, vip_port: u16, p: u8, len: usize) -> Vec<u8> {
    let f = if p == proto::TCP {
        let b = etherparse::PacketBuilder::ipv4(vip, frames::CLIENT_V4, 63).tcp(
            vip_port,
            client_port,
            7,
            1000,
        );
        let mut out = Vec::new();
        b.write(&mut out, &[0x42; 200]).unwrap();
        out
    } else {
        let b =
            etherparse::PacketBuilder::ipv4(vip, frames::CLIENT_V4, 63).udp(vip_port, client_port);
        let mut out = Vec::new();
        b.write(&mut out, &[0x42; 200]).unwrap();
        out
    };
    f[..len].to_vec()
}

fn reply_v6(vip: [u8; 16], client_port: u16, vip_port: u16, len: usize) -> Vec<u8> {
    let b = etherparse::PacketBuilder::ipv6(vip, frames::CLIENT_V6, 63).tcp(
        vip_port,
        client_port,
        7,
        1000,
    );
    let mut out = Vec::new();
    b.write(&mut out, &[0x42; 200]).unwrap();
    out[..len].to_vec()
}

const ROUTER_V4: [u8; 4] = [192, 0, 2, 1];
const ROUTER_V6: [u8; 16] = [0x20, 1, 0xd, 0xb8, 0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

fn icmp_cases() -> Vec<Case> {
    let mut cases = Vec::new();
    // Echo requests to VIP addresses are answered by the balancer; to other addresses, passed.
    for (name, dst) in [
        ("ipv4 echo to a tcp vip address is answered", VIP),
        ("ipv4 echo to an l7 vip address is answered", v4(&V_L7.key)),
    ] {
        let f = frames::icmp4_echo(dst);
        cases.push(Case::forwards(
            name,
            f.clone(),
            frames::echo_reply_for(&f),
            &[L3Ipv4, L4Other, IcmpEchoReplied],
        ));
    }
    {
        let f = frames::icmp6_echo(V6_TCP.key.addr);
        cases.push(Case::forwards(
            "ipv6 echo to a vip address is answered",
            f.clone(),
            frames::echo_reply_for(&f),
            &[L3Ipv6, L4Other, IcmpEchoReplied],
        ));
        cases.push(Case::passes(
            "ipv4 echo to a non-vip address passes",
            frames::icmp4_echo(NOT_VIP),
            &[L3Ipv4, L4Other, PassNotVip],
        ));
    }
    // Errors quoting a VIP flow go to that flow's backend, encapsulated like its data.
    let key = world::key_v4(VIP, 40000, 80, proto::TCP);
    for (name, t, code, rest) in [
        ("frag-needed", 3u8, 4u8, [0, 0, 0x05, 0x78]),
        ("port unreachable", 3, 3, [0; 4]),
        ("host unreachable", 3, 1, [0; 4]),
        ("time exceeded", 11, 0, [0; 4]),
    ] {
        let f = frames::icmp4_error(
            ROUTER_V4,
            VIP,
            t,
            code,
            rest,
            &reply_v4(VIP, 40000, 80, proto::TCP, 28),
        );
        cases.push(Case::forwards(
            format!("ipv4 {name} quoting a vip flow goes to its backend"),
            f.clone(),
            world::encapsulated(&f, 0, &key, &B1),
            &[L3Ipv4, L4Other, CtMiss, IcmpErrorForwarded, FwdEncapV4],
        ));
    }
    {
        let full = frames::icmp4_error(
            ROUTER_V4,
            VIP,
            3,
            4,
            [0, 0, 5, 0x78],
            &reply_v4(VIP, 40000, 80, proto::TCP, 68),
        );
        cases.push(Case::forwards(
            "ipv4 error with a long quote goes to its backend",
            full.clone(),
            world::encapsulated(&full, 0, &key, &B1),
            &[L3Ipv4, L4Other, CtMiss, IcmpErrorForwarded, FwdEncapV4],
        ));
        let udp_key = world::key_v4(VIP, 5353, 53, proto::UDP);
        let u = frames::icmp4_error(
            ROUTER_V4,
            VIP,
            3,
            3,
            [0; 4],
            &reply_v4(VIP, 5353, 53, proto::UDP, 28),
        );
        cases.push(Case::forwards(
            "ipv4 error quoting a udp vip flow goes to its backend",
            u.clone(),
            world::encapsulated(&u, 0, &udp_key, &B2),
            &[L3Ipv4, L4Other, CtMiss, IcmpErrorForwarded, FwdEncapV4],
        ));
    }
    // Every quote length short of IP header + 8 bytes is dropped and counted.
    for len in 0..28 {
        let f = frames::icmp4_error(
            ROUTER_V4,
            VIP,
            3,
            4,
            [0, 0, 5, 0x78],
            &reply_v4(VIP, 40000, 80, proto::TCP, len),
        );
        cases.push(Case::drops(
            format!("ipv4 error with a {len}-byte quote is dropped"),
            f,
            &[L3Ipv4, L4Other, DropIcmpQuoteShort],
        ));
    }
    {
        let f = frames::icmp4_error(
            ROUTER_V4,
            VIP,
            3,
            3,
            [0; 4],
            &reply_v4(VIP, 40000, 9999, proto::TCP, 28),
        );
        cases.push(Case::passes(
            "ipv4 error quoting a non-vip port of a vip address passes",
            f,
            &[L3Ipv4, L4Other, PassNotVip],
        ));
        let f = frames::icmp4_error(
            ROUTER_V4,
            NOT_VIP,
            3,
            3,
            [0; 4],
            &reply_v4(NOT_VIP, 40000, 80, proto::TCP, 28),
        );
        cases.push(Case::passes(
            "ipv4 error to a non-vip address passes",
            f,
            &[L3Ipv4, L4Other, PassNotVip],
        ));
    }
    {
        // The connection table decides, exactly as for the flow's data packets.
        let dst = v4(&V_PAIR.key);
        let key = world::key_v4(dst, 41000, 80, proto::TCP);
        let first = backend_by_id(pair_choice(&key));
        let other = other_of_pair(first.id);
        let syn = frames::tcp4(dst, 41000, 80, true, b"");
        let f = frames::icmp4_error(
            ROUTER_V4,
            dst,
            3,
            4,
            [0, 0, 5, 0x78],
            &reply_v4(dst, 41000, 80, proto::TCP, 28),
        );
        cases.push(
            Case::forwards(
                "ipv4 error follows the connection table after a table change",
                f.clone(),
                world::encapsulated(&f, 0, &key, &first),
                &[L3Ipv4, L4Other, CtHit, IcmpErrorForwarded, FwdEncapV4],
            )
            .with_setup(move |b: &mut Balancer| {
                assert_eq!(send(b, &syn).0, XdpAction::Tx);
                b.publish_vip(&V_PAIR.key, V_PAIR.id, 0, &world::table(&[other]))
                    .unwrap();
            }),
        );
    }
    {
        let key6 = world::key_v6(V6_TCP.key.addr, 40000, 80, proto::TCP);
        for (name, t, code, rest) in [
            ("packet too big", 2u8, 0u8, [0, 0, 0x05, 0x00]),
            ("unreachable", 1, 4, [0; 4]),
            ("time exceeded", 3, 0, [0; 4]),
        ] {
            let f = frames::icmp6_error(
                ROUTER_V6,
                V6_TCP.key.addr,
                t,
                code,
                rest,
                &reply_v6(V6_TCP.key.addr, 40000, 80, 48),
            );
            cases.push(Case::forwards(
                format!("ipv6 {name} quoting a vip flow goes to its backend"),
                f.clone(),
                world::encapsulated(&f, 0, &key6, &B4),
                &[L3Ipv6, L4Other, CtMiss, IcmpErrorForwarded, FwdEncapV6],
            ));
        }
        for len in [0, 40, 47] {
            let f = frames::icmp6_error(
                ROUTER_V6,
                V6_TCP.key.addr,
                2,
                0,
                [0, 0, 5, 0],
                &reply_v6(V6_TCP.key.addr, 40000, 80, len),
            );
            cases.push(Case::drops(
                format!("ipv6 error with a {len}-byte quote is dropped"),
                f,
                &[L3Ipv6, L4Other, DropIcmpQuoteShort],
            ));
        }
    }
    cases
}

/// The hash every fragment of a datagram is encapsulated with (addresses, id, protocol).
fn frag_key(mut key: FlowKey, id: u32) -> FlowKey {
    key.sport_be = id as u16;
    key.dport_be = (id >> 16) as u16;
    key
}

fn fragment_cases() -> Vec<Case> {
    let mut cases = Vec::new();
    let dst = v4(&V_UDP.key);
    let id = 0x4242u16;
    let first = {
        let mut f = frames::udp4(dst, 5353, 53, &[1; 64]);
        frames::set_ipv4_id(&mut f, id);
        frames::set_ipv4_fragment(&mut f, true, 0);
        frames::fix_ipv4_checksum(&mut f);
        f
    };
    let later = |offset: u16, more: bool| {
        let mut f = frames::udp4(dst, 0x0102, 0x0304, &[2; 64]);
        frames::set_ipv4_id(&mut f, id);
        frames::set_ipv4_fragment(&mut f, more, offset);
        frames::fix_ipv4_checksum(&mut f);
        f
    };
    let fkey = frag_key(world::key_v4(dst, 0, 0, proto::UDP), id as u32);
    cases.push(Case::forwards(
        "ipv4 first fragment selects by its ports and is recorded",
        first.clone(),
        world::encapsulated(&first, 0, &fkey, &B2),
        &[L3Ipv4, L4Udp, CtMiss, FragTracked, FwdEncapV4],
    ));
    for (offset, more) in [(9u16, true), (18, false)] {
        let f = later(offset, more);
        let first = first.clone();
        cases.push(
            Case::forwards(
                format!("ipv4 later fragment at offset {offset} follows the first (in order)"),
                f.clone(),
                world::encapsulated(&f, 0, &fkey, &B2),
                &[L3Ipv4, L4Fragment, FragForwarded, FwdEncapV4],
            )
            .with_setup(move |b: &mut Balancer| {
                assert_eq!(send(b, &first).0, XdpAction::Tx);
            }),
        );
    }
    {
        // Out of order: the last fragment arrives before the first is seen.
        cases.push(Case::drops(
            "ipv4 later fragment before its first (out of order) is dropped, not guessed",
            later(18, false),
            &[L3Ipv4, L4Fragment, DropFragUnknown],
        ));
        let (last, first2) = (later(18, false), first.clone());
        let f = later(9, true);
        cases.push(
            Case::forwards(
                "ipv4 fragments after a late first fragment follow it",
                f.clone(),
                world::encapsulated(&f, 0, &fkey, &B2),
                &[L3Ipv4, L4Fragment, FragForwarded, FwdEncapV4],
            )
            .with_setup(move |b: &mut Balancer| {
                assert_eq!(send(b, &last).0, XdpAction::Drop);
                assert_eq!(send(b, &first2).0, XdpAction::Tx);
            }),
        );
        let mut other_id = later(9, true);
        frames::set_ipv4_id(&mut other_id, id + 1);
        frames::fix_ipv4_checksum(&mut other_id);
        let first3 = first.clone();
        cases.push(
            Case::drops(
                "ipv4 later fragment of another datagram does not follow",
                other_id,
                &[L3Ipv4, L4Fragment, DropFragUnknown],
            )
            .with_setup(move |b: &mut Balancer| {
                assert_eq!(send(b, &first3).0, XdpAction::Tx);
            }),
        );
    }
    {
        let mut f = frames::udp4(NOT_VIP, 1, 2, &[3; 64]);
        frames::set_ipv4_fragment(&mut f, false, 9);
        frames::fix_ipv4_checksum(&mut f);
        cases.push(Case::passes(
            "ipv4 later fragment to a non-vip address passes",
            f,
            &[L3Ipv4, L4Fragment, PassNotVip],
        ));
        let mut f = frames::tcp4(v4(&V_L7.key), 40000, 443, false, &[3; 64]);
        frames::set_ipv4_fragment(&mut f, true, 0);
        frames::fix_ipv4_checksum(&mut f);
        cases.push(Case::passes(
            "ipv4 first fragment to an l7 vip passes",
            f,
            &[L3Ipv4, L4Tcp, PassL7],
        ));
    }
    {
        let dst6 = V6_UDP.key.addr;
        let id6 = 0xdead_beef_u32;
        let first = frames::with_ipv6_ext(
            &frames::udp6(dst6, 5353, 53, &[1; 64]),
            44,
            &frames::ext_fragment(0, true, id6),
        );
        let fkey6 = frag_key(world::key_v6(dst6, 0, 0, proto::UDP), id6);
        cases.push(Case::forwards(
            "ipv6 first fragment selects by its ports and is recorded",
            first.clone(),
            world::encapsulated(&first, 0, &fkey6, &B1),
            &[L3Ipv6, L4Udp, CtMiss, FragTracked, FwdEncapV4],
        ));
        let later6 = frames::with_ipv6_ext(
            &frames::udp6(dst6, 9, 9, &[2; 64]),
            44,
            &frames::ext_fragment(9, false, id6),
        );
        let f1 = first.clone();
        cases.push(
            Case::forwards(
                "ipv6 later fragment follows the first",
                later6.clone(),
                world::encapsulated(&later6, 0, &fkey6, &B1),
                &[L3Ipv6, L4Fragment, FragForwarded, FwdEncapV4],
            )
            .with_setup(move |b: &mut Balancer| {
                assert_eq!(send(b, &f1).0, XdpAction::Tx);
            }),
        );
        cases.push(Case::drops(
            "ipv6 later fragment without its first is dropped",
            later6,
            &[L3Ipv6, L4Fragment, DropFragUnknown],
        ));
    }
    cases
}

#[test]
fn every_fixture_case() {
    let mut cases = ipv4_parse_cases();
    cases.extend(ipv6_parse_cases());
    cases.extend(l2_cases());
    cases.extend(forwarding_cases());
    cases.extend(conntrack_cases());
    cases.extend(icmp_cases());
    cases.extend(fragment_cases());
    run_all(world::install, world::reset, &cases);
}

/// Across many flows of the two-backend VIP, the data path agrees with the userspace Maglev
/// table on every flow, and both backends get flows.
#[test]
fn maglev_selection_matches_the_installed_table() {
    let mut b = Balancer::load().expect("load");
    let _world = world::install(&mut b);
    let dst = v4(&V_PAIR.key);
    let mut per_backend = [0u32; 3];
    for sport in 20000..20400u16 {
        let f = frames::tcp4(dst, sport, 80, true, b"");
        let key = world::key_v4(dst, sport, 80, proto::TCP);
        let want = backend_by_id(pair_choice(&key));
        let (action, out) = send(&b, &f);
        assert_eq!(action, XdpAction::Tx);
        assert_eq!(
            out,
            world::encapsulated(&f, 0, &key, &want),
            "sport {sport}"
        );
        assert_eq!(b.flow_backend(&key).unwrap(), Some(want.id));
        per_backend[want.id as usize] += 1;
    }
    assert!(
        per_backend[1] > 120 && per_backend[2] > 120,
        "{per_backend:?}"
    );
    let vip = b.vip_stats(V_PAIR.id).unwrap();
    assert_eq!(vip.packets, 400);
    assert_eq!(vip.new_flows, 400);
    let s1 = b.backend_stats(B1.id).unwrap();
    let s2 = b.backend_stats(B2.id).unwrap();
    assert_eq!(s1.packets + s2.packets, 400);
    assert_eq!(s1.new_flows, per_backend[1] as u64);
}

/// Publishing a VIP twice alternates between its two table slots, and packets follow the
/// newest table.
#[test]
fn table_swaps_alternate_slots_and_take_effect_at_once() {
    let mut b = Balancer::load().expect("load");
    let _world = world::install(&mut b);
    let first = b.vip(&V_TCP.key).unwrap().expect("vip").table_index;
    let meta = b
        .publish_vip(&V_TCP.key, V_TCP.id, 0, &world::table(&[B2]))
        .unwrap();
    assert_ne!(meta.table_index, first);
    let f = frames::tcp4(VIP, 42000, 80, true, b"");
    let key = world::key_v4(VIP, 42000, 80, proto::TCP);
    assert_eq!(send(&b, &f).1, world::encapsulated(&f, 0, &key, &B2));
    let meta2 = b
        .publish_vip(&V_TCP.key, V_TCP.id, 0, &world::table(&[B1]))
        .unwrap();
    assert_eq!(meta2.table_index, first);
    let f = frames::tcp4(VIP, 42001, 80, true, b"");
    let key = world::key_v4(VIP, 42001, 80, proto::TCP);
    assert_eq!(send(&b, &f).1, world::encapsulated(&f, 0, &key, &B1));
    let _ = B3;
}

/// Frames shorter than an Ethernet header cannot go through BPF_PROG_TEST_RUN (the kernel
/// refuses inputs below 14 bytes); the program's bounds check covers them on real devices.
#[test]
fn frames_below_ethernet_header_are_refused_by_test_run() {
    let balancer = Balancer::load().expect("load");
    let mut out = [0u8; 64];
    let err = balancer.program().test_run(TestRunOptions {
        data_in: Some(&[0u8; 13]),
        data_out: Some(&mut out),
        ..Default::default()
    });
    assert!(err.is_err(), "the kernel accepted a 13-byte XDP test frame");
}

/// A captured `log` record stream, standing in for the agent's tracing subscriber.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<(log::Level, String)>>>);

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        self.0
            .lock()
            .unwrap()
            .push((record.level(), record.args().to_string()));
    }
    fn flush(&self) {}
}

/// The malformed-packet log travels from the XDP program through aya-log, and is rate-limited:
/// a burst of malformed packets on one CPU yields one record, not one per packet.
#[test]
fn malformed_packets_log_once_per_interval_through_aya_log() {
    let mut balancer = Balancer::load().expect("load");
    let capture = Capture::default();
    let mut logger = balancer.take_logger(capture.clone()).expect("logger");

    let mut bad = frames::tcp_v4(40000, 80, b"");
    frames::set_ipv4_ihl(&mut bad, 3);
    let mut out = vec![0u8; bad.len() + 64];
    let before = balancer.counters().unwrap();
    let result = balancer
        .program()
        .test_run(TestRunOptions {
            data_in: Some(&bad),
            data_out: Some(&mut out),
            repeat: 1000,
            ..Default::default()
        })
        .expect("test run");
    assert_eq!(XdpAction::from(result.return_value), XdpAction::Drop);
    let delta = balancer.counters().unwrap().since(&before);
    assert_eq!(delta.get(Counter::L3Malformed), 1000);

    logger.flush();
    let records = capture.0.lock().unwrap().clone();
    let malformed: Vec<_> = records
        .iter()
        .filter(|(_, m)| m.contains("malformed IPv4 header"))
        .collect();
    assert_eq!(
        malformed.len(),
        1,
        "expected exactly one rate-limited record for 1000 malformed packets, got {records:?}"
    );
    let (level, message) = malformed[0];
    assert_eq!(*level, log::Level::Warn);
    assert!(message.contains("ihl 3"), "{message}");
}

/// ICMP errors are sent where the flow's data goes, but never create connection-table state;
/// removing the last VIP of an address stops the balancer answering for it.
#[test]
fn icmp_errors_create_no_state_and_vip_addresses_follow_vips() {
    let mut b = Balancer::load().expect("load");
    let _world = world::install(&mut b);
    let err = frames::icmp4_error(
        ROUTER_V4,
        VIP,
        3,
        4,
        [0, 0, 5, 0x78],
        &reply_v4(VIP, 40000, 80, proto::TCP, 28),
    );
    assert_eq!(send(&b, &err).0, XdpAction::Tx);
    let key = world::key_v4(VIP, 40000, 80, proto::TCP);
    assert_eq!(b.flow_backend(&key).unwrap(), None);

    let l7 = v4(&V_L7.key);
    assert_eq!(send(&b, &frames::icmp4_echo(l7)).0, XdpAction::Tx);
    b.remove_vip(&V_L7.key).unwrap();
    assert_eq!(send(&b, &frames::icmp4_echo(l7)).0, XdpAction::Pass);
    // 203.0.113.10 still has two VIPs: removing one keeps the address answered.
    b.remove_vip(&V_TCP.key).unwrap();
    assert_eq!(send(&b, &frames::icmp4_echo(VIP)).0, XdpAction::Tx);
    b.remove_vip(&V_UDP.key).unwrap();
    assert_eq!(send(&b, &frames::icmp4_echo(VIP)).0, XdpAction::Pass);
}

/// A table the maps cannot take (not prime, empty, naming a backend id out of range) is refused
/// before anything is written: the VIP keeps its live table and traffic is unchanged.
#[test]
fn a_refused_table_changes_nothing() {
    let mut b = Balancer::load().expect("load");
    let _world = world::install(&mut b);
    let before = b.vip(&V_TCP.key).unwrap();
    for bad in [
        vec![B2.id; 250],
        Vec::new(),
        vec![B2.id; 65536],
        vec![lb_common::types::MAX_BACKENDS; 251],
    ] {
        let err = b.publish_vip(&V_TCP.key, V_TCP.id, 0, &bad);
        assert!(err.is_err(), "a table of {} slots was accepted", bad.len());
        assert_eq!(b.vip(&V_TCP.key).unwrap(), before);
    }
    let f = frames::tcp4(VIP, 43000, 80, true, b"");
    let key = world::key_v4(VIP, 43000, 80, proto::TCP);
    assert_eq!(send(&b, &f).1, world::encapsulated(&f, 0, &key, &B1));
}
