//! Multi-region failover scenarios on the two-region topology ([`crate::regions`]), shared by
//! the end-to-end tests and `cargo xtask bench region`: the agents' configurations (region A's
//! VIPs list regions ["a", "b"]; B accepts failed-over flows on its tunnel address), new
//! connections from A's client, and A's view of its regions from `xlb status --json`.
//!
//! The scenario's VIPs are [`Service`]s: [`WEB`] (TCP port 80, the backends' nginx) always,
//! and [`ECHO`] (UDP port 7000, a [`UdpEcho`] per backend, [`udp_echo`]) where a test or bench
//! needs packet-level traffic.

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use crate::{
    regions::{Region, RegionOptions, RegionTopology},
    servers::UdpEcho,
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

/// One VIP of the scenario, at [`VIP_V4`] in both regions, each over its own backends.
pub struct Service {
    /// The VIP's name.
    pub name: &'static str,
    /// Its port.
    pub port: u16,
    /// `"tcp"` or `"udp"`.
    pub protocol: &'static str,
    /// Its `[vip.health_check]` table.
    pub check: &'static str,
}

/// The web VIP: TCP port 80 on the backends' nginx.
pub const WEB: Service = Service {
    name: "web4",
    port: 80,
    protocol: "tcp",
    check: CHECK,
};

/// The echo VIP: UDP port 7000 on the backends' [`udp_echo`] responders.
pub const ECHO: Service = Service {
    name: "echo4",
    port: 7000,
    protocol: "udp",
    check: UDP_CHECK,
};

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

/// The same timing for [`ECHO`]: a datagram to the backend's own address, answered by its
/// [`UdpEcho`].
pub const UDP_CHECK: &str = "[vip.health_check]\ntype = \"udp\"\nsend = \"ping\"\n\
                     expect = \"ping\"\ninterval_ms = 200\ntimeout_ms = 150\nrise = 2\nfall = 2\n";

/// Region B as A's agent probes it: every 200 ms, timeout 150 ms, rise 2, fall 2.
pub const REGION_PROBE: &str = "check_interval_ms = 200\ntimeout_ms = 150\nrise = 2\nfall = 2\n";

/// The `[[vip]]` table of `s` in region `r` (its `[[vip.backend]]`s included), with `extra`
/// (regions, failover) before the health check.
fn vip_table(t: &RegionTopology, r: Region, s: &Service, extra: &str) -> String {
    let mut text = format!(
        "\n[[vip]]\nname = \"{}\"\naddress = \"{VIP_V4}\"\nport = {}\nprotocol = \"{}\"\n\
         mode = \"dsr-ipip\"\n{extra}{}",
        s.name, s.port, s.protocol, s.check
    );
    let region = if r == Region::A {
        "region = \"a\"\n"
    } else {
        ""
    };
    for b in &t.region(r).backends {
        text.push_str(&format!(
            "[[vip.backend]]\naddress = \"{}\"\n{region}",
            b.v4
        ));
    }
    text
}

/// Region A: VIP web4 over A's backends with regions ["a", "b"]; B reached at its tunnel
/// address, probed every 200 ms.
pub fn config_a(t: &RegionTopology, p: &Policy) -> String {
    config_a_for(t, p, &[WEB])
}

/// Region A with `services`, each over A's backends with regions ["a", "b"] and policy `p`.
pub fn config_a_for(t: &RegionTopology, p: &Policy, services: &[Service]) -> String {
    let mut text = t.region(Region::A).agent_table();
    text.push_str(&format!(
        "region = \"a\"\ntunnel_addresses = [\"{}\"]\n\n[[region]]\nname = \"b\"\n\
         tunnel = \"{}\"\n{REGION_PROBE}",
        t.tunnel_v4(Region::A),
        t.tunnel_v4(Region::B)
    ));
    let failover = format!(
        "regions = [\"a\", \"b\"]\n[vip.failover]\nmode = \"{}\"\nmin_healthy = {}\n\
         hold_down_ms = {}\n",
        p.mode, p.min_healthy, p.hold_down_ms
    );
    for s in services {
        text.push_str(&vip_table(t, Region::A, s, &failover));
    }
    text
}

/// Region B: the same VIP over B's own backends; it accepts flows failed over to its tunnel
/// address.
pub fn config_b(t: &RegionTopology) -> String {
    config_b_for(t, &[WEB])
}

/// Region B with `services` over B's own backends.
pub fn config_b_for(t: &RegionTopology, services: &[Service]) -> String {
    let mut text = t.region(Region::B).agent_table();
    text.push_str(&format!(
        "region = \"b\"\ntunnel_addresses = [\"{}\"]\n",
        t.tunnel_v4(Region::B)
    ));
    for s in services {
        text.push_str(&vip_table(t, Region::B, s, ""));
    }
    text
}

/// A [`UdpEcho`] on region `r`'s backend `i` for [`ECHO`]: on the VIP (the traffic) and on the
/// backend's own address (the health check), answering `<backend name> <datagram>`.
pub fn udp_echo(t: &RegionTopology, r: Region, i: usize) -> UdpEcho {
    let b = &t.region(r).backends[i];
    UdpEcho::start(
        &b.ns,
        &t.backend_name(r, i),
        &[
            SocketAddr::new(IpAddr::V4(VIP_V4), ECHO.port),
            SocketAddr::new(IpAddr::V4(b.v4), ECHO.port),
        ],
    )
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
    vip_region_state(t, WEB.name)
}

/// Region A's `xlb status --json` regions of VIP `name`: (active region, B reachable).
pub fn vip_region_state(t: &RegionTopology, name: &str) -> (String, bool, serde_json::Value) {
    region_states(t, &[name]).remove(0)
}

/// Region A's regions of each VIP of `names`, from one `xlb status --json`: (active region, B
/// reachable, the regions object).
pub fn region_states(t: &RegionTopology, names: &[&str]) -> Vec<(String, bool, serde_json::Value)> {
    let (code, out, err) = t.cli(Region::A, &["status", "--json"]);
    assert_eq!(code, 0, "xlb status: {err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("status json");
    let vips = v["vips"].as_array().expect("vips");
    names
        .iter()
        .map(|name| {
            let r = vips
                .iter()
                .find(|v| v["name"] == *name)
                .unwrap_or_else(|| panic!("{name} in status"))["regions"]
                .clone();
            let active = r["active"].as_str().unwrap_or_default().to_owned();
            let reachable = r["levels"][1]["reachable"].as_bool().unwrap_or(false);
            (active, reachable, r)
        })
        .collect()
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
    start_for(t, p, &[WEB]);
}

/// Starts both agents with `services` and waits until A's probes of B pass and B reports
/// every service fully healthy.
pub fn start_for(t: &mut RegionTopology, p: &Policy, services: &[Service]) {
    let b = config_b_for(t, services);
    t.start_agent(Region::B, &b);
    let a = config_a_for(t, p, services);
    t.start_agent(Region::A, &a);
    for s in services {
        poll(Duration::from_secs(10), || {
            let (_, reachable, r) = vip_region_state(t, s.name);
            (reachable && r["levels"][1]["healthy_share"].as_f64() == Some(1.0)).then_some(())
        })
        .unwrap_or_else(|| panic!("region b becomes reachable and healthy for {}", s.name));
    }
}
