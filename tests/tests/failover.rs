//! Multi-region failover end to end: two regions (`xlb_tests::regions`), each with its router,
//! xlb host (the real `xlb agent`) and nginx backends, joined by a WAN link. Region A's VIP lists
//! regions ["a", "b"]; B's agent accepts failed-over flows on its tunnel address and balances
//! them to its own backends, which answer A's client directly. Needs root; run serially.

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use xlb_tests::{
    failover::{Policy, build, new_connection, poll, region_state, start},
    regions::Region,
    servers::HttpConn,
    topology::VIP_V4,
};

/// Whole failover: A's healthy share falls below min_healthy -> new connections are served by
/// B's backends (through B's xlb host, answering A's client directly) while an established
/// connection to A's surviving backend continues; A back -> new connections return only after
/// the hold-down.
#[test]
fn whole_failover_to_b_and_back_after_the_hold_down() {
    let mut t = build(2);
    let p = Policy {
        mode: "whole",
        min_healthy: 0.75,
        hold_down_ms: 4000,
    };
    start(&mut t, &p);
    // Home: A's backends answer.
    for _ in 0..10 {
        let who = new_connection(&t).expect("new connection at home");
        assert!(who.starts_with("a-"), "served at home, got {who}");
    }
    // An established keep-alive connection, on whichever A backend it lands.
    let vip = SocketAddr::new(IpAddr::V4(VIP_V4), 80);
    let mut conn = HttpConn::open(&t.region(Region::A).clients[0].ns, vip).expect("connect");
    let (status, first) = conn.get("/").expect("first request");
    assert_eq!(status, 200);
    let kept = first.trim().to_string();
    let survivor: usize = kept
        .trim_start_matches("a-backend")
        .parse()
        .expect("a backend");
    let victim = 1 - survivor;

    // Kill the other A backend: share 0.5 < 0.75 -> whole failover to B.
    let killed = Instant::now();
    t.stop_backend(Region::A, victim);
    let via_b = poll(Duration::from_secs(5), || {
        new_connection(&t).ok().filter(|w| w.starts_with("b-"))
    })
    .expect("new connections served by region b");
    let failover = killed.elapsed();
    eprintln!("failover: first new connection via B ({via_b}) {failover:?} after the kill");
    let (active, _, r) = region_state(&t);
    assert_eq!(active, "b", "{r}");
    for i in 0..20 {
        let who = new_connection(&t).unwrap_or_else(|e| panic!("new connection {i}: {e}"));
        assert!(who.starts_with("b-"), "new connection {i} served by {who}");
        let (status, body) = conn.get("/").expect("established request");
        assert_eq!(
            (status, body.trim()),
            (200, kept.as_str()),
            "the established connection stays on its healthy backend"
        );
    }

    // Back home: not before the hold-down.
    let revived = Instant::now();
    t.start_backend(Region::A, victim);
    let back = poll(Duration::from_secs(12), || {
        new_connection(&t)
            .ok()
            .filter(|w| w.starts_with("a-"))
            .map(|_| revived.elapsed())
    })
    .expect("new connections return to region a");
    eprintln!("failback: first new connection at home {back:?} after the backend came back");
    assert!(
        back >= Duration::from_millis(u64::from(p.hold_down_ms)),
        "failed back after {back:?}, before the hold-down of {} ms",
        p.hold_down_ms
    );
    let (active, _, r) = region_state(&t);
    assert_eq!(active, "a", "{r}");
    assert!(r["transitions"].as_u64() >= Some(2), "{r}");
}
