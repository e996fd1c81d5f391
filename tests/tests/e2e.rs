//! End to end: the real `xlb` agent on the xlb host of the namespace topology
//! (`xlb_tests::topology`), real nginx backends, real curl clients. Needs root; run serially.

use std::{path::PathBuf, time::Duration};

use xlb_tests::{
    servers::{Nginx, curl},
    topology::{Daemon, Options, Topology, VIP_V4, VIP_V6},
};

/// The `xlb` binary under test: `$XLB_BIN`, else the workspace's debug build.
fn xlb_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("XLB_BIN") {
        return PathBuf::from(p);
    }
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/xlb");
    assert!(p.is_file(), "{} not found; build it first", p.display());
    p
}

/// A configuration with one IPv4 and one IPv6 VIP on port 80, each over every backend.
fn config(t: &Topology) -> String {
    let mut text = t.agent_table();
    for (name, vip, family) in [
        ("web4", VIP_V4.to_string(), 4),
        ("web6", VIP_V6.to_string(), 6),
    ] {
        text.push_str(&format!(
            "\n[[vip]]\nname = \"{name}\"\naddress = \"{vip}\"\nport = 80\nprotocol = \"tcp\"\n"
        ));
        for b in &t.backends {
            let addr = if family == 4 {
                b.v4.to_string()
            } else {
                b.v6.to_string()
            };
            text.push_str(&format!("[[vip.backend]]\naddress = \"{addr}\"\n"));
        }
    }
    text
}

/// curl to the IPv4 and the IPv6 VIP reach nginx on every backend, and the replies come
/// straight back (direct server return).
#[test]
fn curl_reaches_nginx_through_ipv4_and_ipv6_vips() {
    let xlb = xlb_bin();
    let t = Topology::build(&Options {
        clients: 1,
        backends: 2,
        xlb: xlb.clone(),
    });
    let _nginx: Vec<Nginx> = t
        .backends
        .iter()
        .enumerate()
        .map(|(i, b)| Nginx::start(&b.ns, &format!("backend{i}")))
        .collect();
    let file = t.dirs.tmp.join("xlb.toml");
    std::fs::write(&file, config(&t)).unwrap();
    let mut agent = Daemon::start(
        &t.lb.ns,
        &xlb,
        &["agent", "--config", file.to_str().unwrap()],
    );
    agent.wait_for("xlb_balancer attached", Duration::from_secs(20));
    for url in [format!("http://{VIP_V4}/"), format!("http://[{VIP_V6}]/")] {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..20 {
            let (code, body) = curl(&t.clients[0].ns, &[&url]);
            assert_eq!(code, 0, "curl {url}: {body}");
            seen.insert(body.trim().to_string());
        }
        assert_eq!(seen.len(), 2, "{url}: {seen:?}");
    }
    assert!(agent.terminate().success());
}
