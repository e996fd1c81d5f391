//! Fixture packets through BPF_PROG_TEST_RUN against the real balancer object, loaded by the
//! real loader. Needs root (CAP_BPF).

use std::sync::{Arc, Mutex};

use aya::programs::{TestRun as _, TestRunOptions};
use lb_common::counters::Counter::{self, *};
use lb_userspace::loader::Balancer;
use xlb_tests::{
    fixture::{Case, run_all},
    frames::{self, L3},
};

fn ipv4_cases() -> Vec<Case> {
    let mut cases = vec![
        Case::passes(
            "ipv4 tcp syn",
            frames::tcp_v4(40000, 80, b""),
            &[L3Ipv4, L4Tcp],
        ),
        Case::passes(
            "ipv4 tcp with payload",
            frames::tcp_v4(40001, 443, &[7; 300]),
            &[L3Ipv4, L4Tcp],
        ),
        Case::passes(
            "ipv4 udp",
            frames::udp_v4(5353, 53, b"query"),
            &[L3Ipv4, L4Udp],
        ),
        Case::passes("ipv4 icmp echo", frames::icmp_echo_v4(), &[L3Ipv4, L4Other]),
        Case::passes(
            "ipv4 udp padded to 60 bytes (total length < frame)",
            frames::pad_to_min(frames::udp_v4(1, 2, b"")),
            &[L3Ipv4, L4Udp],
        ),
    ];

    // Every legal IHL: the L4 header is found after the options, never inside them.
    for words in 0..=10 {
        cases.push(Case::passes(
            format!("ipv4 ihl {} tcp", 5 + words),
            frames::tcp_v4_with_options(words, 40000, 80),
            &[L3Ipv4, L4Tcp],
        ));
    }
    // Every illegal IHL.
    for ihl in 0..5 {
        let mut f = frames::tcp_v4(40000, 80, b"");
        frames::set_ipv4_ihl(&mut f, ihl);
        cases.push(Case::passes(
            format!("ipv4 ihl {ihl} is malformed"),
            f,
            &[L3Malformed],
        ));
    }
    // A UDP packet of total length 28: IHL 6 leaves 4 bytes for an 8-byte UDP header (L4
    // truncated); IHL 8 and up put the header end past the total length (malformed).
    {
        let mut f = frames::udp_v4(1, 2, b"");
        frames::set_ipv4_ihl(&mut f, 6);
        cases.push(Case::passes(
            "ipv4 ihl 6 leaves udp header truncated",
            f,
            &[L3Ipv4, L4Truncated],
        ));
    }
    for ihl in [8, 15] {
        let mut f = frames::udp_v4(1, 2, b"");
        frames::set_ipv4_ihl(&mut f, ihl);
        cases.push(Case::passes(
            format!("ipv4 ihl {ihl} beyond total length 28 is malformed"),
            f,
            &[L3Malformed],
        ));
    }

    let base = frames::tcp_v4(40000, 80, b"abcd");
    let frame_ip_len = (base.len() - L3) as u16;
    for (name, total) in [
        ("ipv4 total length one past the frame", frame_ip_len + 1),
        ("ipv4 total length 65535", 65535),
        ("ipv4 total length shorter than the header", 19),
        ("ipv4 total length 0", 0),
    ] {
        let mut f = base.clone();
        frames::set_ipv4_total_len(&mut f, total);
        cases.push(Case::passes(name, f, &[L3Malformed]));
    }
    {
        let mut f = base.clone();
        frames::set_ip_version(&mut f, 6);
        cases.push(Case::passes(
            "ipv4 ethertype with version 6 is malformed",
            f,
            &[L3Malformed],
        ));
    }
    // The IPv4 header itself cut short: every length from 0 to 19 bytes of it.
    for keep in 0..20 {
        let f = base[..L3 + keep].to_vec();
        cases.push(Case::passes(
            format!("ipv4 header truncated to {keep} bytes"),
            f,
            &[L3Malformed],
        ));
    }
    // TCP header cut short by the IP total length (frame still long enough) and by the frame.
    {
        let mut f = base.clone();
        frames::set_ipv4_total_len(&mut f, 20 + 19);
        cases.push(Case::passes(
            "ipv4 tcp header past total length",
            f,
            &[L3Ipv4, L4Truncated],
        ));
    }
    for keep in 0..20 {
        let mut f = base[..L3 + 20 + keep].to_vec();
        frames::set_ipv4_total_len(&mut f, (20 + keep) as u16);
        cases.push(Case::passes(
            format!("ipv4 tcp header truncated to {keep} bytes"),
            f,
            &[L3Ipv4, L4Truncated],
        ));
    }
    for keep in 0..8 {
        let full = frames::udp_v4(1, 2, b"");
        let mut f = full[..L3 + 20 + keep].to_vec();
        frames::set_ipv4_total_len(&mut f, (20 + keep) as u16);
        cases.push(Case::passes(
            format!("ipv4 udp header truncated to {keep} bytes"),
            f,
            &[L3Ipv4, L4Truncated],
        ));
    }
    // Fragments: the first carries the L4 header, later ones must not be read as if they did.
    {
        let mut f = base.clone();
        frames::set_ipv4_fragment(&mut f, true, 0);
        cases.push(Case::passes("ipv4 first fragment", f, &[L3Ipv4, L4Tcp]));
        for offset in [1, 185, 0x1fff] {
            let mut f = base.clone();
            frames::set_ipv4_fragment(&mut f, offset != 0x1fff, offset);
            cases.push(Case::passes(
                format!("ipv4 later fragment at offset {offset}"),
                f,
                &[L3Ipv4, L4Fragment],
            ));
        }
    }
    cases
}

fn ipv6_cases() -> Vec<Case> {
    let mut cases = vec![
        Case::passes(
            "ipv6 tcp syn",
            frames::tcp_v6(40000, 80, b""),
            &[L3Ipv6, L4Tcp],
        ),
        Case::passes(
            "ipv6 udp",
            frames::udp_v6(5353, 53, b"query"),
            &[L3Ipv6, L4Udp],
        ),
    ];
    let base = frames::tcp_v6(40000, 80, b"abcd");
    let payload = (base.len() - L3 - 40) as u16;
    for (name, len) in [
        ("ipv6 payload length one past the frame", payload + 1),
        ("ipv6 payload length 65535", 65535),
    ] {
        let mut f = base.clone();
        frames::set_ipv6_payload_len(&mut f, len);
        cases.push(Case::passes(name, f, &[L3Malformed]));
    }
    {
        let mut f = base.clone();
        frames::set_ipv6_payload_len(&mut f, 10);
        cases.push(Case::passes(
            "ipv6 tcp header past payload length",
            f,
            &[L3Ipv6, L4Truncated],
        ));
    }
    {
        let mut f = base.clone();
        frames::set_ip_version(&mut f, 4);
        cases.push(Case::passes(
            "ipv6 ethertype with version 4 is malformed",
            f,
            &[L3Malformed],
        ));
    }
    for keep in [0, 1, 20, 39] {
        cases.push(Case::passes(
            format!("ipv6 header truncated to {keep} bytes"),
            base[..L3 + keep].to_vec(),
            &[L3Malformed],
        ));
    }
    {
        // Next header 0 (hop-by-hop): extension headers are walked by the L4 fast path; until
        // then the packet counts as "other".
        let mut f = base.clone();
        f[L3 + 6] = 0;
        cases.push(Case::passes(
            "ipv6 hop-by-hop next header",
            f,
            &[L3Ipv6, L4Other],
        ));
    }
    cases
}

fn l2_cases() -> Vec<Case> {
    vec![
        Case::passes("arp request", frames::arp_request(), &[L3Other]),
        Case::passes(
            "802.1q tagged ipv4 (vlan parsing arrives with the fast path)",
            frames::with_vlan_tag(&frames::tcp_v4(1, 80, b""), 100),
            &[L3Other],
        ),
        Case::passes(
            "ethernet header only, ethertype ipv4",
            frames::tcp_v4(1, 80, b"")[..14].to_vec(),
            &[L3Malformed],
        ),
    ]
}

#[test]
fn every_fixture_case() {
    let mut cases = ipv4_cases();
    cases.extend(ipv6_cases());
    cases.extend(l2_cases());
    run_all(&cases);
}

/// Frames shorter than an Ethernet header cannot go through BPF_PROG_TEST_RUN (the kernel
/// refuses inputs below 14 bytes), so the L2-truncation counter is proven by the kernel's
/// refusal here and by the program's bounds check. This keeps the limitation visible.
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
    assert_eq!(result.return_value, 2, "XDP_PASS");
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
