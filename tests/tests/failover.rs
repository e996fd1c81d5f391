//! Multi-region failover end to end: two regions (`xlb_tests::regions`), each with its router,
//! xlb host (the real `xlb agent`) and nginx backends, joined by a WAN link. Region A's VIP lists
//! regions ["a", "b"]; B's agent accepts failed-over flows on its tunnel address and balances
//! them to its own backends, which answer A's client directly. Needs root; run serially.

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use xlb_tests::{
    failover::{
        CHECK, Policy, build, config_a, config_b, new_connection, poll, region_state, start,
    },
    regions::{Region, RegionTopology},
    servers::HttpConn,
    topology::{VIP_V4, VIP_V6},
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
    assert!(
        failover <= FAILOVER_BOUND,
        "failover took {failover:?}, beyond the configured bound {FAILOVER_BOUND:?}"
    );
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

/// The configured bound on failover: the check's fall x interval (2 x 200 ms) to notice the
/// death, one more interval for the check in flight, plus 1 s of slack for a machine shared
/// with the whole topology (the bench measures the real figure: about 0.35 s).
const FAILOVER_BOUND: Duration = Duration::from_millis(2 * 200 + 200 + 1000);

/// Kills every backend of A and waits (bounded) until new connections are served by B.
fn fail_over_wholly(t: &mut RegionTopology) {
    t.stop_backend(Region::A, 0);
    t.stop_backend(Region::A, 1);
    poll(Duration::from_secs(5), || {
        new_connection(t).ok().filter(|w| w.starts_with("b-"))
    })
    .expect("failed over to b");
}

/// Which backend answers one new keep-alive-less connection (its name).
fn served_by(t: &RegionTopology) -> std::io::Result<String> {
    let vip = SocketAddr::new(IpAddr::V4(VIP_V4), 80);
    let mut c = HttpConn::open(&t.region(Region::A).clients[0].ns, vip)?;
    Ok(c.get("/")?.1.trim().to_string())
}

/// Proportional spill-over: half of A's weight down with min_healthy 0.7 -> A takes
/// 0.5 / 0.7 = 71.4 % of new connections (all on its healthy backend), B the other 28.6 %.
#[test]
fn proportional_spill_over_sends_the_expected_share_to_b() {
    let mut t = build(2);
    let p = Policy {
        mode: "proportional",
        min_healthy: 0.7,
        hold_down_ms: 2000,
    };
    start(&mut t, &p);
    t.stop_backend(Region::A, 0);
    poll(Duration::from_secs(5), || {
        let (_, _, r) = region_state(&t);
        (r["levels"][1]["load"].as_f64().unwrap_or(0.0) > 0.2).then_some(())
    })
    .expect("region b takes part of the load");
    let n = 1000;
    let (mut a, mut b) = (0, 0);
    for i in 0..n {
        let who = served_by(&t).unwrap_or_else(|e| panic!("new connection {i}: {e}"));
        match who.as_str() {
            "a-backend1" => a += 1,
            w if w.starts_with("b-") => b += 1,
            w => panic!("connection {i} served by {w}, which is down or unknown"),
        }
    }
    let share_b = f64::from(b) / f64::from(n);
    let expected = 1.0 - 0.5 / 0.7;
    eprintln!("proportional: a {a}, b {b} of {n}: b {share_b:.3} (expected {expected:.3})");
    assert!(
        (share_b - expected).abs() <= 0.05,
        "region b took {share_b:.3} of {n} new connections, expected {expected:.3} within 5 points"
    );
}

/// A backend flapping every second for 30 s: one failover at its first fall, no failback while
/// it flaps (the home region is never healthy for the hold-down), one failback once it is
/// stable for the hold-down.
#[test]
fn a_backend_flapping_every_second_for_30_s_causes_no_region_flap() {
    let mut t = build(2);
    let p = Policy {
        mode: "whole",
        min_healthy: 0.75,
        hold_down_ms: 5000,
    };
    start(&mut t, &p);
    let transitions = |t: &RegionTopology| region_state(t).2["transitions"].as_u64().unwrap_or(0);
    assert_eq!(transitions(&t), 0);
    let flapping = Instant::now();
    let mut active_seen = std::collections::BTreeSet::new();
    while flapping.elapsed() < Duration::from_secs(30) {
        t.stop_backend(Region::A, 0);
        std::thread::sleep(Duration::from_millis(1000));
        active_seen.insert(region_state(&t).0);
        t.start_backend(Region::A, 0);
        std::thread::sleep(Duration::from_millis(1000));
        active_seen.insert(region_state(&t).0);
    }
    let (active, _, r) = region_state(&t);
    assert_eq!(
        transitions(&t),
        1,
        "one failover and no failback during 30 s of flapping: {r}"
    );
    assert_eq!(active, "b", "{r}");
    // Stable now: home after the hold-down.
    let back = poll(Duration::from_secs(10), || {
        (region_state(&t).0 == "a").then_some(())
    });
    assert!(back.is_some(), "fails back once the backend is stable");
    assert_eq!(transitions(&t), 2);
    eprintln!("flapping: active regions seen {active_seen:?}");
}

/// The tunnel to B cut (IPIP dropped on the WAN, plain traffic still passing) -> B counts as
/// down; with A's backends dead too, the VIP is in the last resort: logged, shown, counted,
/// never a silent black hole. Restoring the tunnel sends new flows to B again.
#[test]
fn a_cut_tunnel_counts_b_down_and_every_region_down_is_the_counted_last_resort() {
    let mut t = build(2);
    let p = Policy {
        mode: "whole",
        min_healthy: 0.5,
        hold_down_ms: 2000,
    };
    start(&mut t, &p);
    t.block_tunnel();
    let down = poll(Duration::from_secs(5), || {
        let (_, reachable, r) = region_state(&t);
        (!reachable).then_some(r)
    })
    .expect("region b counts as down when the tunnel drops its probes");
    assert!(
        down["levels"][1]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("timeout")),
        "{down}"
    );
    assert!(t.tunnel_drops() > 0, "the probes went into the tunnel");

    // Every region down: last resort.
    t.stop_backend(Region::A, 0);
    t.stop_backend(Region::A, 1);
    let r = poll(Duration::from_secs(5), || {
        let (_, _, r) = region_state(&t);
        r["last_resort"].as_bool().unwrap_or(false).then_some(r)
    })
    .expect("the VIP goes to the last resort");
    assert_eq!(r["active"], "a", "last resort is this host's region: {r}");
    t.agent(Region::A)
        .wait_for("VIP in LAST RESORT", Duration::from_secs(2));
    let counted = |t: &RegionTopology| {
        let (code, out, err) = t.cli(Region::A, &["stats", "--json"]);
        assert_eq!(code, 0, "{err}");
        let v: serde_json::Value = serde_json::from_str(&out).expect("stats json");
        v["region_last_resort"].as_u64().unwrap_or(0)
    };
    let before = counted(&t);
    assert!(
        new_connection(&t).is_err(),
        "no backend anywhere can answer"
    );
    assert!(
        counted(&t) > before,
        "the last resort's new flows are counted"
    );

    // The tunnel back: B takes the new flows.
    t.unblock_tunnel();
    let who = poll(Duration::from_secs(10), || {
        new_connection(&t).ok().filter(|w| w.starts_with("b-"))
    });
    assert!(who.is_some(), "region b serves once its tunnel works again");
    let (active, _, r) = region_state(&t);
    assert_eq!(active, "b", "{r}");
    assert_eq!(r["last_resort"], false);
}

/// The tunnel over IPv6: region b's xlb host is reached at its IPv6 tunnel address, so the IPv4
/// VIP's flows cross as IPv4-in-IPv6 and the IPv6 VIP's as IP6IP6; both are served by B's
/// backends once every backend of A is dead.
#[test]
fn failover_through_an_ipv6_tunnel_serves_both_families() {
    use std::fmt::Write as _;
    let mut t = build(2);
    let vips = [("web4", IpAddr::V4(VIP_V4)), ("web6", IpAddr::V6(VIP_V6))];
    let vip_tables = |r: Region, regions: &str| {
        let mut text = String::new();
        for (name, address) in vips {
            let _ = write!(
                text,
                "\n[[vip]]\nname = \"{name}\"\naddress = \"{address}\"\nport = 80\n\
                 protocol = \"tcp\"\nmode = \"dsr-ipip\"\n{regions}{CHECK}"
            );
            for b in &t.region(r).backends {
                let a = if address.is_ipv4() {
                    IpAddr::V4(b.v4)
                } else {
                    IpAddr::V6(b.v6)
                };
                let _ = write!(
                    text,
                    "[[vip.backend]]\naddress = \"{a}\"\nregion = \"{}\"\n",
                    if r == Region::A { "a" } else { "b" }
                );
            }
        }
        text
    };
    let b = format!(
        "{}region = \"b\"\ntunnel_addresses = [\"{}\"]\n{}",
        t.region(Region::B).agent_table(),
        t.tunnel_v6(Region::B),
        vip_tables(Region::B, "")
    );
    let a = format!(
        "{}region = \"a\"\n\n[[region]]\nname = \"b\"\ntunnel = \"{}\"\n\
         check_interval_ms = 200\ntimeout_ms = 150\n{}",
        t.region(Region::A).agent_table(),
        t.tunnel_v6(Region::B),
        vip_tables(
            Region::A,
            "regions = [\"a\", \"b\"]\n[vip.failover]\nmin_healthy = 0.5\nhold_down_ms = 2000\n"
        )
    );
    t.start_agent(Region::B, &b);
    t.start_agent(Region::A, &a);
    poll(Duration::from_secs(10), || region_state(&t).1.then_some(()))
        .expect("region b reachable through the IPv6 tunnel");
    let killed = Instant::now();
    t.stop_backend(Region::A, 0);
    t.stop_backend(Region::A, 1);
    for (name, address) in vips {
        let url = match address {
            IpAddr::V4(a) => format!("http://{a}/"),
            IpAddr::V6(a) => format!("http://[{a}]/"),
        };
        let who = poll(Duration::from_secs(5), || {
            match t.curl(Region::A, 0, &["--max-time", "2", &url]) {
                (0, body) if body.trim().starts_with("b-") => Some(body.trim().to_string()),
                _ => None,
            }
        });
        assert!(
            who.is_some(),
            "{name} served by region b through the IPv6 tunnel"
        );
        if name == "web4" {
            let took = killed.elapsed();
            assert!(
                took <= FAILOVER_BOUND,
                "every backend of A killed: served by B after {took:?}, beyond {FAILOVER_BOUND:?}"
            );
        }
    }
    let (code, out, _) = t.cli(Region::B, &["stats", "--json"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).expect("stats json");
    assert!(
        v["region_decap"].as_u64() > Some(0),
        "B stripped the tunnel: {v}"
    );
    assert!(v["region_probe_passed"].as_u64() > Some(0), "{v}");
    assert_eq!(v["drop_region_not_vip"].as_u64(), Some(0), "{v}");
}

/// What one probe of the timeline saw: a new connection's answer and the established one's.
fn sample_flows(t: &RegionTopology, conn: &mut Option<HttpConn>) -> String {
    let new = match new_connection(t) {
        Ok(who) => who,
        Err(e) => format!("FAIL({})", e.lines().next().unwrap_or_default()),
    };
    let est = match conn.as_mut().map(|c| c.get("/")) {
        Some(Ok((200, body))) => body.trim().to_owned(),
        Some(Ok((status, _))) => format!("HTTP {status}"),
        Some(Err(e)) => {
            *conn = None;
            format!("BROKEN({e})")
        }
        None => "-".to_owned(),
    };
    format!("new {new} / established {est}")
}

/// Region A's VIP is wholly failed over to B (every A backend dead) and an established
/// connection runs through B; A's agent is killed (-9) and started again. The established
/// connection through B must survive, and no dead backend may answer.
/// Before the fixes a new agent started its remote region down until `rise` probes passed: it
/// wrote B's region entry down at once, which moved the established flow to a dead local
/// backend (reset), and sent new connections to the last resort (refused) meanwhile. A region
/// the adopted maps hold up now starts up, assumed healthy until its first probe answers, as
/// local backends do: no new connection is refused either.
#[test]
fn restarting_a_failed_over_agent_is_hitless() {
    let mut t = build(2);
    let p = Policy {
        mode: "whole",
        min_healthy: 0.5,
        hold_down_ms: 4000,
    };
    start(&mut t, &p);
    fail_over_wholly(&mut t);
    let vip = SocketAddr::new(IpAddr::V4(VIP_V4), 80);
    let mut conn = Some(HttpConn::open(&t.region(Region::A).clients[0].ns, vip).expect("connect"));
    let kept = sample_flows(&t, &mut conn);
    assert!(kept.contains("established b-"), "{kept}");

    let restart = Instant::now();
    t.agent(Region::A).kill();
    let config = config_a(&t, &p);
    t.start_agent(Region::A, &config);
    eprintln!("agent a restarted in {:?}", restart.elapsed());
    let mut timeline = Vec::new();
    while restart.elapsed() < Duration::from_secs(5) {
        let s = sample_flows(&t, &mut conn);
        timeline.push(format!("{:>6} ms  {s}", restart.elapsed().as_millis()));
        std::thread::sleep(Duration::from_millis(100));
    }
    let timeline = timeline.join("\n");
    eprintln!("after the restart:\n{timeline}");
    assert!(
        !timeline.contains("BROKEN") && !timeline.contains("established -"),
        "the established connection through B did not survive the restart:\n{timeline}"
    );
    assert!(
        !timeline.contains(" a-"),
        "no dead backend answers:\n{timeline}"
    );
    assert!(
        !timeline.contains("new FAIL"),
        "new connections refused after the restart:\n{timeline}"
    );
}

/// Each region fails over to the other (A: regions [a, b]; B: regions [b, a]) and every backend
/// of both dies: no packet may bounce between the regions; each side applies its last resort
/// (counted in `region_last_resort`), status says LAST RESORT and the metric is 1.
#[test]
fn mutual_failover_with_every_backend_dead_is_last_resort_without_a_loop() {
    let mut t = build(2);
    let p = Policy {
        mode: "whole",
        min_healthy: 0.5,
        hold_down_ms: 1000,
    };
    // B lists A as its fallback, probed like A probes B.
    let mut b = config_b(&t);
    b = b.replace(
        &format!("tunnel_addresses = [\"{}\"]\n", t.tunnel_v4(Region::B)),
        &format!(
            "tunnel_addresses = [\"{}\"]\n\n[[region]]\nname = \"a\"\ntunnel = \"{}\"\n\
             check_interval_ms = 200\ntimeout_ms = 150\nrise = 2\nfall = 2\n",
            t.tunnel_v4(Region::B),
            t.tunnel_v4(Region::A)
        ),
    );
    b = b.replace(
        "mode = \"dsr-ipip\"\n",
        "mode = \"dsr-ipip\"\nregions = [\"b\", \"a\"]\n[vip.failover]\nmode = \"whole\"\n\
         min_healthy = 0.5\nhold_down_ms = 1000\n",
    );
    b = b.replace(
        "[[vip.backend]]\naddress",
        "[[vip.backend]]\nregion = \"b\"\naddress",
    );
    t.start_agent(Region::B, &b);
    let a = config_a(&t, &p);
    t.start_agent(Region::A, &a);
    poll(Duration::from_secs(10), || region_state(&t).1.then_some(()))
        .expect("region b reachable from a");
    for r in Region::ALL {
        for i in 0..2 {
            t.stop_backend(r, i);
        }
    }
    let last_resort = |t: &RegionTopology, r: Region| {
        let (code, out, _) = t.cli(r, &["status"]);
        code == 0 && out.contains("LAST RESORT")
    };
    poll(Duration::from_secs(10), || {
        (last_resort(&t, Region::A) && last_resort(&t, Region::B)).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "both regions in last resort; a:\n{}\nb:\n{}",
            t.cli(Region::A, &["status"]).1,
            t.cli(Region::B, &["status"]).1
        )
    });
    let stats = |t: &RegionTopology, r: Region| {
        let (code, out, err) = t.cli(r, &["stats", "--json"]);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str::<serde_json::Value>(&out).expect("stats json")
    };
    let n = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap_or_else(|| panic!("{k}: {v}"));
    let (a0, b0) = (stats(&t, Region::A), stats(&t, Region::B));
    for _ in 0..5 {
        assert!(new_connection(&t).is_err(), "no backend is alive anywhere");
    }
    let (a1, b1) = (stats(&t, Region::A), stats(&t, Region::B));
    for k in ["region_forwarded", "region_decap"] {
        assert_eq!(n(&a1, k), n(&a0, k), "a {k}: nothing crosses a region");
        assert_eq!(n(&b1, k), n(&b0, k), "b {k}: nothing crosses a region");
    }
    assert!(
        n(&a1, "region_last_resort") > n(&a0, "region_last_resort"),
        "a counts its last resort: {a1}"
    );
    let metrics = t.region(Region::A).lb.ns.exec(&[
        "curl",
        "-s",
        "--max-time",
        "3",
        "http://127.0.0.1:9641/metrics",
    ]);
    let metrics = String::from_utf8_lossy(&metrics.stdout);
    assert!(
        metrics.contains("xlb_region_last_resort{vip=\"web4\"} 1"),
        "{metrics}"
    );
}

/// A restart does not cut a hold-down short: A is failed over to B, A's backends come back, and
/// A's agent is killed and restarted while the failback waits for its hold-down. The restarted
/// agent resumes from the pinned split: new connections stay with B after the restart and come
/// home only after a full hold-down.
#[test]
fn a_restart_during_the_hold_down_does_not_fail_back_early() {
    let mut t = build(2);
    let p = Policy {
        mode: "whole",
        min_healthy: 0.5,
        hold_down_ms: 5000,
    };
    start(&mut t, &p);
    fail_over_wholly(&mut t);
    t.start_backend(Region::A, 0);
    t.start_backend(Region::A, 1);
    std::thread::sleep(Duration::from_millis(1000));
    t.agent(Region::A).kill();
    let config = config_a(&t, &p);
    t.start_agent(Region::A, &config);
    let restarted = Instant::now();
    while restarted.elapsed() < Duration::from_secs(3) {
        let who = new_connection(&t).expect("new connection after the restart");
        assert!(
            who.starts_with("b-"),
            "failed back {:?} after the restart, within the hold-down: {who}",
            restarted.elapsed()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let home = poll(Duration::from_secs(8), || {
        new_connection(&t)
            .ok()
            .filter(|w| w.starts_with("a-"))
            .map(|_| restarted.elapsed())
    })
    .expect("fails back after the hold-down");
    eprintln!("failed back {home:?} after the restart (hold-down 5 s)");
    assert!(home >= Duration::from_millis(4500), "{home:?}");
}
