//! The L7 gateway end to end, in the namespaces of `xlb_tests::l7`: the harness itself (the
//! nginx upstreams answer the client directly over HTTP/1.1, h2c and TLS, and identify
//! themselves and echo what they were sent), then the real agent serving `l7` VIPs to curl
//! (HTTP/1.1 over IPv4 and IPv6, h2c and HTTP/2 upstreams both ways, TLS with ALPN).
//! Needs root; run serially.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use xlb_tests::{
    l7::{
        Curl, FIXED_BODY, L7_VIP_V4, L7_VIP_V6, L7Options, L7Topology, UPSTREAM_H2C_PORT,
        UPSTREAM_HTTP_PORT, UPSTREAM_TLS_PORT, self_signed_cert,
    },
    topology::xlb_bin,
};

/// The harness: every upstream answers the client directly (through the xlb host's routing)
/// on HTTP/1.1 over IPv4 and IPv6, h2c with prior knowledge and HTTP/2 over TLS with the
/// generated certificate; says who it is; echoes the headers; serves the fixed body; and
/// stops and starts again on demand.
#[test]
fn upstreams_answer_the_client_directly() {
    let mut t = L7Topology::build(&L7Options {
        upstreams: 2,
        echo_headers: vec!["x-tenant".into()],
        ..L7Options::default()
    });
    for u in &t.upstreams {
        let r = t.curl(
            &Curl::http1(&format!("http://{}/echo/a?b=c", u.http()))
                .header("X-Forwarded-For: 192.0.2.7")
                .header("X-Request-Id: req-1")
                .header("X-Tenant: t1"),
        );
        assert_eq!((r.exit, r.status), (0, 200), "{r:?}");
        assert_eq!(r.version, "1.1");
        assert_eq!(r.upstream(), Some(u.name.as_str()));
        assert_eq!(r.echo("upstream"), Some(u.name.as_str()));
        assert_eq!(r.echo("protocol"), Some("HTTP/1.1"));
        assert_eq!(r.echo("uri"), Some("/echo/a?b=c"));
        assert_eq!(r.echo("x-forwarded-for"), Some("192.0.2.7"));
        assert_eq!(r.echo("x-request-id"), Some("req-1"));
        assert_eq!(r.echo("x-tenant"), Some("t1"));
        assert_eq!(r.echo("remote-addr"), Some("10.97.1.2"));
        assert_eq!(r.echo("forwarded"), Some(""));

        let r = t.curl(&Curl::http1(&format!(
            "http://[{}]:{UPSTREAM_HTTP_PORT}/fixed",
            u.v6
        )));
        assert_eq!((r.exit, r.status, r.body.as_str()), (0, 200, FIXED_BODY));

        let r = t.curl(&Curl::h2c(&format!("http://{}:{UPSTREAM_H2C_PORT}/", u.v4)));
        assert_eq!((r.exit, r.status), (0, 200), "{r:?}");
        assert_eq!(
            (r.version.as_str(), r.echo("protocol")),
            ("2", Some("HTTP/2.0"))
        );

        let host = format!("{}.test", u.name);
        let r = t.curl(&Curl::h2_tls(
            &host,
            UPSTREAM_TLS_PORT,
            "/",
            IpAddr::V6(u.v6),
            &t.upstream_cert.cert,
        ));
        assert_eq!((r.exit, r.status), (0, 200), "{r:?}");
        assert_eq!(r.version, "2");
        assert_eq!(r.upstream(), Some(u.name.as_str()));

        let r = t.curl(&Curl::http1(&format!("http://{}/status/503", u.http())));
        assert_eq!(r.status, 503);
        let r = t.curl(&Curl::http1(&format!("http://{}/upload", u.http())).data("0123456789"));
        assert_eq!((r.status, r.echo("received")), (200, Some("10")), "{r:?}");
    }
    // A certificate that does not name the host is refused.
    let r = t.curl(&Curl::h2_tls(
        "elsewhere.test",
        UPSTREAM_TLS_PORT,
        "/",
        IpAddr::V4(t.upstreams[0].v4),
        &t.upstream_cert.cert,
    ));
    assert_eq!(r.exit, 60, "curl should refuse the certificate: {r:?}");

    let url = format!("http://{}/", t.upstreams[1].http());
    t.upstreams[1].server.stop();
    let r = t.curl(&Curl::http1(&url));
    assert_eq!(r.exit, 7, "a stopped upstream refuses connections: {r:?}");
    t.upstreams[1].server.start_again(&t.upstream_host);
    assert_eq!(t.curl(&Curl::http1(&url)).status, 200);
}

/// Starts the agent with `vips` and waits until the gateway accepts on `addr`.
fn gateway(t: &L7Topology, vips: &str, addr: SocketAddr) -> xlb_tests::topology::Daemon {
    let mut agent = t.start_agent(&xlb_bin(), vips, &[]);
    if let Err(e) = t.wait_gateway(&mut agent, addr, Duration::from_secs(10)) {
        panic!("{e}");
    }
    agent
}

/// HTTP/1.1 through an l7 VIP on IPv4 and IPv6: both upstreams answer (round robin) and see
/// the client in X-Forwarded-For and a request id.
#[test]
fn gateway_proxies_http1_over_ipv4_and_ipv6() {
    let t = L7Topology::build(&L7Options::default());
    let vips = format!(
        "{}\n{}",
        t.basic_vip("web4", IpAddr::V4(L7_VIP_V4), 80, UPSTREAM_HTTP_PORT),
        t.basic_vip("web6", IpAddr::V6(L7_VIP_V6), 80, UPSTREAM_HTTP_PORT)
    );
    let _agent = gateway(&t, &vips, SocketAddr::from((L7_VIP_V4, 80)));
    for url in [t.vip_url(80, "/hello?x=1"), t.vip6_url(80, "/hello?x=1")] {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..4 {
            let r = t.curl(&Curl::http1(&url));
            assert_eq!((r.exit, r.status), (0, 200), "{url}: {r:?}");
            assert_eq!(r.echo("uri"), Some("/hello?x=1"));
            assert!(
                r.echo("x-forwarded-for")
                    .is_some_and(|x| x.contains("10.97.1.2") || x.contains("fd00:97:1::2")),
                "{r:?}"
            );
            assert!(
                r.echo("x-request-id").is_some_and(|id| !id.is_empty()),
                "{r:?}"
            );
            seen.insert(r.upstream().unwrap_or_default().to_string());
        }
        assert_eq!(seen.len(), 2, "round robin over both upstreams: {seen:?}");
    }
}

/// h2c with prior knowledge from the client, HTTP/1.1 to the upstream; and an HTTP/2 pool
/// (h2c upstreams) for an HTTP/1.1 client: translation both ways.
#[test]
fn gateway_translates_between_http1_and_http2() {
    let t = L7Topology::build(&L7Options::default());
    let vips = format!(
        "{}\n{}",
        t.basic_vip("h1up", IpAddr::V4(L7_VIP_V4), 80, UPSTREAM_HTTP_PORT),
        t.vip_toml(
            "h2up",
            IpAddr::V4(L7_VIP_V4),
            8000,
            "",
            "http2",
            UPSTREAM_H2C_PORT
        )
    );
    let _agent = gateway(&t, &vips, SocketAddr::from((L7_VIP_V4, 80)));
    let r = t.curl(&Curl::h2c(&t.vip_url(80, "/")));
    assert_eq!(
        (r.exit, r.status, r.version.as_str()),
        (0, 200, "2"),
        "{r:?}"
    );
    assert_eq!(r.echo("protocol"), Some("HTTP/1.1"));
    let r = t.curl(&Curl::http1(&t.vip_url(8000, "/")));
    assert_eq!(
        (r.exit, r.status, r.version.as_str()),
        (0, 200, "1.1"),
        "{r:?}"
    );
    assert_eq!(r.echo("protocol"), Some("HTTP/2.0"));
}

/// TLS termination with a certificate file: HTTP/2 by ALPN, and HTTP/1.1 when asked.
#[test]
fn gateway_terminates_tls_with_alpn() {
    let t = L7Topology::build(&L7Options::default());
    let cert = self_signed_cert(
        &t.scratch.path.join("gateway-tls"),
        "api.test",
        &["DNS:api.test", &format!("IP:{L7_VIP_V4}")],
    );
    let tls = format!(
        "[vip.gateway.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        cert.cert.display(),
        cert.key.display()
    );
    let vips = t.vip_toml(
        "api",
        IpAddr::V4(L7_VIP_V4),
        443,
        &tls,
        "http1",
        UPSTREAM_HTTP_PORT,
    );
    let _agent = gateway(&t, &vips, SocketAddr::from((L7_VIP_V4, 443)));
    let vip = IpAddr::V4(L7_VIP_V4);
    let r = t.curl(&Curl::h2_tls("api.test", 443, "/", vip, &cert.cert));
    assert_eq!(
        (r.exit, r.status, r.version.as_str()),
        (0, 200, "2"),
        "{r:?}"
    );
    assert_eq!(r.echo("x-forwarded-proto"), Some("https"));
    let r = t.curl(&Curl::http1_tls("api.test", 443, "/", vip, &cert.cert));
    assert_eq!(
        (r.exit, r.status, r.version.as_str()),
        (0, 200, "1.1"),
        "{r:?}"
    );
}

/// A host whose VIPs are all l7 forwards nothing in XDP, so it needs no router: the agent
/// starts and serves without a default route (with `next_hop_mac = "auto"`, which would
/// otherwise refuse to start), over IPv4 and IPv6.
#[test]
fn a_gateway_only_host_needs_no_default_route() {
    let t = L7Topology::build(&L7Options::default());
    t.lb.run(&["ip", "-4", "route", "del", "default"]);
    t.lb.run(&["ip", "-6", "route", "del", "default"]);
    let vips = format!(
        "{}\n{}",
        t.basic_vip("web4", IpAddr::V4(L7_VIP_V4), 80, UPSTREAM_HTTP_PORT),
        t.basic_vip("web6", IpAddr::V6(L7_VIP_V6), 80, UPSTREAM_HTTP_PORT)
    );
    let _agent = gateway(&t, &vips, SocketAddr::from((L7_VIP_V4, 80)));
    for url in [t.vip_url(80, "/"), t.vip6_url(80, "/")] {
        let r = t.curl(&Curl::http1(&url));
        assert_eq!((r.exit, r.status), (0, 200), "{url}: {r:?}");
    }
}
