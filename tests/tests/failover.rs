//! Multi-region failover end to end: two regions (`xlb_tests::regions`), each with its router,
//! xlb host (the real `xlb agent`) and nginx backends, joined by a WAN link. Region A's VIP lists
//! regions ["a", "b"]; B's agent accepts failed-over flows on its tunnel address and balances
//! them to its own backends, which answer A's client directly. Needs root; run serially.

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use xlb_tests::{
    regions::{Region, RegionOptions, RegionTopology},
    servers::HttpConn,
    topology::{VIP_V4, xlb_bin},
};

/// How region A's VIP fails over.
struct Policy {
    mode: &'static str,
    min_healthy: f64,
    hold_down_ms: u32,
}

fn build(backends_a: usize) -> RegionTopology {
    RegionTopology::build(&RegionOptions {
        clients_a: 1,
        clients_b: 0,
        backends_a,
        backends_b: 2,
        xlb: xlb_bin(),
    })
}

/// The health check every VIP uses: fast, so a killed backend is down in about 0.5 s.
const CHECK: &str = "[vip.health_check]\ntype = \"http\"\npath = \"/\"\ninterval_ms = 200\n\
                     timeout_ms = 150\nrise = 2\nfall = 2\n";

/// Region A: VIP web4 over A's backends with regions ["a", "b"]; B reached at its tunnel
/// address, probed every 200 ms.
fn config_a(t: &RegionTopology, p: &Policy) -> String {
    let a = t.region(Region::A);
    let mut text = a.agent_table();
    text.push_str(&format!(
        "region = \"a\"\ntunnel_addresses = [\"{}\"]\n\n[[region]]\nname = \"b\"\n\
         tunnel = \"{}\"\ncheck_interval_ms = 200\ntimeout_ms = 150\nrise = 2\nfall = 2\n",
        t.tunnel_v4(Region::A),
        t.tunnel_v4(Region::B)
    ));
    text.push_str(&format!(
        "\n[[vip]]\nname = \"web4\"\naddress = \"{VIP_V4}\"\nport = 80\nprotocol = \"tcp\"\n\
         mode = \"dsr-ipip\"\nregions = [\"a\", \"b\"]\n[vip.failover]\nmode = \"{}\"\n\
         min_healthy = {}\nhold_down_ms = {}\n{CHECK}",
        p.mode, p.min_healthy, p.hold_down_ms
    ));
    for b in &a.backends {
        text.push_str(&format!(
            "[[vip.backend]]\naddress = \"{}\"\nregion = \"a\"\n",
            b.v4
        ));
    }
    text
}

/// Region B: the same VIP over B's own backends; it accepts flows failed over to its tunnel
/// address.
fn config_b(t: &RegionTopology) -> String {
    let b = t.region(Region::B);
    let mut text = b.agent_table();
    text.push_str(&format!(
        "region = \"b\"\ntunnel_addresses = [\"{}\"]\n",
        t.tunnel_v4(Region::B)
    ));
    text.push_str(&format!(
        "\n[[vip]]\nname = \"web4\"\naddress = \"{VIP_V4}\"\nport = 80\nprotocol = \"tcp\"\n\
         mode = \"dsr-ipip\"\n{CHECK}"
    ));
    for be in &b.backends {
        text.push_str(&format!("[[vip.backend]]\naddress = \"{}\"\n", be.v4));
    }
    text
}

/// Which backend answered a new connection from A's client to the VIP (its name), or why none.
fn new_connection(t: &RegionTopology) -> Result<String, String> {
    match t.curl(
        Region::A,
        0,
        &["--max-time", "2", &format!("http://{VIP_V4}/")],
    ) {
        (0, body) => Ok(body.trim().to_string()),
        (code, body) => Err(format!("curl exited {code}: {body}")),
    }
}

/// Region A's `xlb status --json` regions of web4: (active region, B reachable).
fn region_state(t: &RegionTopology) -> (String, bool, serde_json::Value) {
    let (code, out, err) = t.cli(Region::A, &["status", "--json"]);
    assert_eq!(code, 0, "xlb status: {err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("status json");
    let r = v["vips"]
        .as_array()
        .expect("vips")
        .iter()
        .find(|v| v["name"] == "web4")
        .expect("web4")["regions"]
        .clone();
    let active = r["active"].as_str().unwrap_or_default().to_owned();
    let reachable = r["levels"][1]["reachable"].as_bool().unwrap_or(false);
    (active, reachable, r)
}

/// Polls `f` every 50 ms until it returns `Some`, at most `limit`.
fn poll<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if start.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts both agents and waits until A's probes of B pass.
fn start(t: &mut RegionTopology, p: &Policy) {
    let b = config_b(t);
    t.start_agent(Region::B, &b);
    let a = config_a(t, p);
    t.start_agent(Region::A, &a);
    poll(Duration::from_secs(10), || region_state(t).1.then_some(()))
        .expect("region b becomes reachable through the tunnel");
}

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
