//! Multi-region failover scenarios on the two-region topology ([`crate::regions`]), shared by
//! the end-to-end tests and `cargo xtask bench region`: the agents' configurations (region A's
//! VIP lists regions ["a", "b"]; B accepts failed-over flows on its tunnel address), new
//! connections from A's client, and A's view of its regions from `xlb status --json`.

use std::time::{Duration, Instant};

use crate::{
    regions::{Region, RegionOptions, RegionTopology},
    topology::{VIP_V4, xlb_bin},
};

/// How region A's VIP fails over.
pub struct Policy {
    /// `"whole"` or `"proportional"`.
    pub mode: &'static str,
    /// `min_healthy`.
    pub min_healthy: f64,
    /// `hold_down_ms`.
    pub hold_down_ms: u32,
}

/// Two regions: one client in A, `backends_a` backends in A, two in B.
pub fn build(backends_a: usize) -> RegionTopology {
    RegionTopology::build(&RegionOptions {
        clients_a: 1,
        clients_b: 0,
        backends_a,
        backends_b: 2,
        xlb: xlb_bin(),
    })
}

/// The health check every VIP uses: fast, so a killed backend is down in about 0.5 s.
pub const CHECK: &str = "[vip.health_check]\ntype = \"http\"\npath = \"/\"\ninterval_ms = 200\n\
                     timeout_ms = 150\nrise = 2\nfall = 2\n";

/// Region A: VIP web4 over A's backends with regions ["a", "b"]; B reached at its tunnel
/// address, probed every 200 ms.
pub fn config_a(t: &RegionTopology, p: &Policy) -> String {
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
pub fn config_b(t: &RegionTopology) -> String {
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
pub fn new_connection(t: &RegionTopology) -> Result<String, String> {
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
pub fn region_state(t: &RegionTopology) -> (String, bool, serde_json::Value) {
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
pub fn poll<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
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
pub fn start(t: &mut RegionTopology, p: &Policy) {
    let b = config_b(t);
    t.start_agent(Region::B, &b);
    let a = config_a(t, p);
    t.start_agent(Region::A, &a);
    poll(Duration::from_secs(10), || region_state(t).1.then_some(()))
        .expect("region b becomes reachable through the tunnel");
}
