//! The L7 gateway end to end (issue 7): the real `xlb agent` serving `l7` VIPs in the
//! namespaces of `xlb_tests::l7`, real nginx upstreams, curl clients, and raw `TcpStream`
//! clients for what curl will not send (smuggling attempts, slow headers, WebSocket frames,
//! dot segments). Each test builds its own topology and agent; guards remove both when it ends,
//! also on failure. Every wait is bounded. Needs root; run serially.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use xlb_tests::{
    l7::{
        Curl, HttpResponse, L7_VIP_V4, L7_VIP_V6, L7Options, L7Topology, METRICS_LISTEN,
        NginxServer, RawExchange, RecordingUpstream, UPSTREAM_H2C_PORT, UPSTREAM_HTTP_PORT, base64,
        parse_responses, parse_ws_frame, raw_exchange, self_signed_cert, sha256_hex, ws_frame,
    },
    netns::{Netns, in_netns, spawn_in_netns},
    topology::{Daemon, run_cli, xlb_bin},
};

/// The upstream host's own address: where the tests' extra servers (recorder, failing nginx)
/// listen, and where nothing listens on other ports.
const UPSTREAM_HOST: &str = "10.97.2.2";

/// Starts the agent with `vips` and waits until the gateway accepts on `addr`.
fn start_gateway(t: &L7Topology, vips: &str, addr: SocketAddr) -> Daemon {
    let mut agent = t.start_agent(&xlb_bin(), vips, &[]);
    if let Err(e) = t.wait_gateway(&mut agent, addr, Duration::from_secs(10)) {
        panic!("{e}");
    }
    agent
}

/// An `l7` VIP's head (`[[vip]]` and its keys); the caller appends its tables.
fn vip(name: &str, address: IpAddr, port: u16) -> String {
    format!(
        "[[vip]]\nname = \"{name}\"\naddress = \"{address}\"\nport = {port}\n\
         protocol = \"tcp\"\nmode = \"l7\"\n\n"
    )
}

/// `[[vip.backend]]` tables for every nginx upstream's `port`, in `pool`.
fn nginx_backends(t: &L7Topology, port: u16, pool: &str) -> String {
    t.upstreams
        .iter()
        .map(|u| format!("{}pool = \"{pool}\"\n", u.backend_toml(port)))
        .collect()
}

/// Writes an API key file (`name sha256:<hex>` lines, the digest computed here) and returns
/// its path.
fn key_file(t: &L7Topology, file: &str, keys: &[(&str, &str)]) -> PathBuf {
    let text: String = keys
        .iter()
        .map(|(name, key)| format!("{name} sha256:{}\n", sha256_hex(key.as_bytes())))
        .collect();
    let path = t.scratch.path.join(file);
    std::fs::write(&path, text).expect("writing the key file");
    path
}

/// The agent's admin socket.
fn admin_socket(t: &L7Topology) -> PathBuf {
    t.dirs.tmp.join("admin.sock")
}

/// `xlb <args>` against the agent's admin socket, from the xlb host.
fn xlb(t: &L7Topology, args: &[&str]) -> (i32, String, String) {
    run_cli(&t.lb, &xlb_bin(), &admin_socket(t), args)
}

/// A raw HTTP/1.1 request with `Connection: close` (so the exchange ends with the response).
fn raw_get(host: &str, target: &str, headers: &[&str]) -> Vec<u8> {
    let mut r = format!("GET {target} HTTP/1.1\r\nHost: {host}\r\n");
    for h in headers {
        r.push_str(h);
        r.push_str("\r\n");
    }
    r.push_str("Connection: close\r\n\r\n");
    r.into_bytes()
}

/// Sends `request` from the client to `addr` and reads until the gateway closes (3 s at most).
fn exchange(t: &L7Topology, addr: SocketAddr, request: &[u8]) -> RawExchange {
    raw_exchange(&t.client, addr, request, Duration::from_secs(3))
}

fn vip4(port: u16) -> SocketAddr {
    SocketAddr::from((L7_VIP_V4, port))
}

/// Asserts `r` is 200 from an upstream, and returns it.
fn ok(r: HttpResponse, what: &str) -> HttpResponse {
    assert_eq!((r.exit, r.status), (0, 200), "{what}: {r:?}");
    assert!(
        r.upstream().is_some(),
        "{what}: not from an upstream: {r:?}"
    );
    r
}

/// Retries `probe` every 50 ms until it returns true, at most `timeout`; returns how long it
/// took, or panics with `what`.
fn wait_until(what: &str, timeout: Duration, mut probe: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    loop {
        if probe() {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < timeout,
            "{what}: not within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---- 1. protocols ---------------------------------------------------------------------------

/// HTTP/1.1, h2c with prior knowledge, and TLS with ALPN h2 and http/1.1, each on the IPv4 and
/// the IPv6 VIP, answered by the nginx upstreams over HTTP/1.1; and an `http2` pool (nginx's
/// h2c listener) reached by HTTP/1.1 and h2c clients, bodies included: translation both ways.
#[test]
fn every_protocol_on_both_families() {
    let t = L7Topology::build(&L7Options::default());
    let cert = self_signed_cert(
        &t.scratch.path.join("gateway-tls"),
        "api.test",
        &[
            "DNS:api.test",
            &format!("IP:{L7_VIP_V4}"),
            &format!("IP:{L7_VIP_V6}"),
        ],
    );
    let tls = format!(
        "[vip.gateway.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n\n",
        cert.cert.display(),
        cert.key.display()
    );
    let mut vips = String::new();
    for (name, address) in [("v4", IpAddr::V4(L7_VIP_V4)), ("v6", IpAddr::V6(L7_VIP_V6))] {
        vips += &vip(&format!("plain-{name}"), address, 80);
        vips += &nginx_backends(&t, UPSTREAM_HTTP_PORT, "default");
        vips += &vip(&format!("tls-{name}"), address, 443);
        vips += &tls;
        vips += &nginx_backends(&t, UPSTREAM_HTTP_PORT, "default");
    }
    vips += &vip("h2pool", IpAddr::V4(L7_VIP_V4), 8000);
    vips += "[[vip.pool]]\nname = \"default\"\nprotocol = \"http2\"\n\n";
    vips += &nginx_backends(&t, UPSTREAM_H2C_PORT, "default");
    let _agent = start_gateway(&t, &vips, vip4(80));
    for addr in [vip4(443), vip4(8000), SocketAddr::from((L7_VIP_V6, 80))] {
        assert!(
            xlb_tests::l7::accepts(&t.client, addr, Duration::from_secs(2)),
            "{addr}"
        );
    }

    for (family, address, url) in [
        ("IPv4", IpAddr::V4(L7_VIP_V4), t.vip_url(80, "/proto?x=1")),
        ("IPv6", IpAddr::V6(L7_VIP_V6), t.vip6_url(80, "/proto?x=1")),
    ] {
        let client = if address.is_ipv4() {
            "10.97.1.2"
        } else {
            "fd00:97:1::2"
        };
        let r = ok(t.curl(&Curl::http1(&url)), family);
        assert_eq!(r.version, "1.1");
        assert_eq!(r.echo("protocol"), Some("HTTP/1.1"));
        assert_eq!(r.echo("uri"), Some("/proto?x=1"));
        assert_eq!(r.echo("x-forwarded-for"), Some(client), "{r:?}");
        assert_eq!(r.echo("x-forwarded-proto"), Some("http"));

        let r = ok(t.curl(&Curl::h2c(&url)), family);
        assert_eq!(r.version, "2", "{family} h2c: {r:?}");
        assert_eq!(
            r.echo("protocol"),
            Some("HTTP/1.1"),
            "translated to HTTP/1.1"
        );
        assert_eq!(r.echo("uri"), Some("/proto?x=1"));
        // h2c bodies reach an HTTP/1.1 upstream whole.
        let r = ok(
            t.curl(&Curl::h2c(&url.replace("/proto?x=1", "/upload")).data("0123456789")),
            family,
        );
        assert_eq!(r.echo("received"), Some("10"), "{r:?}");

        let r = ok(
            t.curl(&Curl::h2_tls("api.test", 443, "/tls", address, &cert.cert)),
            family,
        );
        assert_eq!(r.version, "2", "{family} TLS ALPN h2: {r:?}");
        assert_eq!(r.echo("protocol"), Some("HTTP/1.1"));
        assert_eq!(r.echo("x-forwarded-proto"), Some("https"));
        assert_eq!(r.echo("host"), Some("api.test"), "{r:?}");
        let r = ok(
            t.curl(&Curl::http1_tls(
                "api.test", 443, "/tls", address, &cert.cert,
            )),
            family,
        );
        assert_eq!(r.version, "1.1", "{family} TLS ALPN http/1.1: {r:?}");
        assert_eq!(r.echo("x-forwarded-proto"), Some("https"));
        // A name the certificate does not carry is refused by the client.
        let r = t.curl(&Curl::h2_tls("other.test", 443, "/", address, &cert.cert));
        assert_eq!(r.exit, 60, "{family}: {r:?}");
    }

    // The http2 pool: an HTTP/1.1 client and an h2c client, both HTTP/2 upstream.
    let r = ok(
        t.curl(&Curl::http1(&t.vip_url(8000, "/h2up"))),
        "h1 to h2 pool",
    );
    assert_eq!(
        (r.version.as_str(), r.echo("protocol")),
        ("1.1", Some("HTTP/2.0")),
        "{r:?}"
    );
    assert_eq!(r.echo("uri"), Some("/h2up"));
    let r = ok(
        t.curl(&Curl::http1(&t.vip_url(8000, "/upload")).data("abcdefghijklmnopqrst")),
        "h1 body to h2 pool",
    );
    assert_eq!(r.echo("received"), Some("20"), "{r:?}");
    let r = ok(
        t.curl(&Curl::h2c(&t.vip_url(8000, "/h2up"))),
        "h2c to h2 pool",
    );
    assert_eq!(r.version, "2");
    // Round robin reached both upstreams over both protocols.
    let seen: std::collections::BTreeSet<String> = (0..4)
        .map(|_| {
            ok(t.curl(&Curl::http1(&t.vip_url(8000, "/"))), "rr")
                .upstream()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    assert_eq!(seen.len(), 2, "{seen:?}");
}

// ---- 2. routing -----------------------------------------------------------------------------

/// The documented precedence (lb-userspace/src/gateway/route.rs): exact host over wildcard over
/// any; exact path over a longer prefix over a shorter one; more conditions (methods, headers)
/// over fewer; file order last. The routes are written in the file in the *opposite* order, so
/// file order cannot be what picks them. No route: 404. strip_prefix and add/remove_headers as
/// the upstream sees them.
#[test]
fn routes_follow_the_documented_precedence() {
    let t = L7Topology::build(&L7Options {
        echo_headers: vec![
            "x-route".into(),
            "x-added".into(),
            "x-remove-me".into(),
            "x-kept".into(),
        ],
        ..L7Options::default()
    });
    let route = |name: &str, keys: &str| {
        format!(
            "[[vip.route]]\nname = \"{name}\"\n{keys}\nadd_headers = {{ \"x-route\" = \"{name}\" }}\n\n"
        )
    };
    let mut vips = vip("routes", IpAddr::V4(L7_VIP_V4), 80);
    for (name, keys) in [
        ("any-host", "path_prefix = \"/r\""),
        ("wild-host", "host = \"*.test\"\npath_prefix = \"/r\""),
        (
            "wild-deeper",
            "host = \"*.deep.test\"\npath_prefix = \"/r\"",
        ),
        ("exact-host", "host = \"api.test\"\npath_prefix = \"/r\""),
        ("short-prefix", "path_prefix = \"/p\""),
        ("long-prefix", "path_prefix = \"/p/long\""),
        ("exact-path", "path = \"/p/exact\""),
        ("m-any", "path_prefix = \"/m\""),
        (
            "m-write",
            "path_prefix = \"/m\"\nmethods = [\"POST\", \"PUT\"]",
        ),
        ("h-any", "path_prefix = \"/h\""),
        (
            "canary",
            "path_prefix = \"/h\"\nheaders = { \"x-canary\" = \"1\" }",
        ),
        (
            "debug",
            "path_prefix = \"/h\"\nheaders = { \"x-debug\" = true }",
        ),
        ("strip", "path_prefix = \"/strip\"\nstrip_prefix = true"),
    ] {
        vips += &route(name, keys);
    }
    vips += "[[vip.route]]\nname = \"rewrite\"\npath_prefix = \"/hdr\"\n\
             add_headers = { \"x-added\" = \"by-xlb\", \"x-route\" = \"rewrite\" }\n\
             remove_headers = [\"x-remove-me\"]\n\n";
    vips += &nginx_backends(&t, UPSTREAM_HTTP_PORT, "default");
    let _agent = start_gateway(&t, &vips, vip4(80));

    let url = |path: &str| t.vip_url(80, path);
    let routed = |curl: Curl| -> String {
        let r = ok(t.curl(&curl), "routed");
        r.echo("x-route").unwrap_or_default().to_string()
    };
    let cases: &[(&str, &str, &str, &[&str], &str)] = &[
        // (method, host, path, headers, route)
        ("GET", "api.test", "/r/x", &[], "exact-host"),
        ("GET", "API.Test:80", "/r/x", &[], "exact-host"),
        ("GET", "a.test", "/r/x", &[], "wild-host"),
        ("GET", "a.b.test", "/r", &[], "wild-host"),
        ("GET", "x.deep.test", "/r/x", &[], "wild-deeper"),
        ("GET", "test", "/r/x", &[], "any-host"),
        ("GET", "other.example", "/r/x", &[], "any-host"),
        ("GET", "api.test", "/p/exact", &[], "exact-path"),
        ("GET", "api.test", "/p/exact/more", &[], "short-prefix"),
        ("GET", "api.test", "/p/long/x", &[], "long-prefix"),
        ("GET", "api.test", "/p/long", &[], "long-prefix"),
        ("GET", "api.test", "/p/longer", &[], "short-prefix"),
        ("GET", "api.test", "/p", &[], "short-prefix"),
        ("GET", "api.test", "/m/1", &[], "m-any"),
        ("POST", "api.test", "/m/1", &[], "m-write"),
        ("PUT", "api.test", "/m/1", &[], "m-write"),
        ("DELETE", "api.test", "/m/1", &[], "m-any"),
        ("GET", "api.test", "/h", &[], "h-any"),
        ("GET", "api.test", "/h", &["X-Canary: 1"], "canary"),
        ("GET", "api.test", "/h", &["X-Canary: 2"], "h-any"),
        ("GET", "api.test", "/h", &["X-Debug: anything"], "debug"),
        // As specific as each other: file order decides.
        (
            "GET",
            "api.test",
            "/h",
            &["X-Canary: 1", "X-Debug: 1"],
            "canary",
        ),
    ];
    for (method, host, path, headers, want) in cases {
        let mut c = Curl::http1(&url(path))
            .method(method)
            .header(&format!("Host: {host}"));
        for h in *headers {
            c = c.header(h);
        }
        assert_eq!(
            routed(c),
            *want,
            "{method} {host} {path} {headers:?} went to the wrong route"
        );
    }

    // No route: 404 from the gateway itself, the upstream never asked.
    for (host, path) in [
        ("api.test", "/"),
        ("api.test", "/nothing"),
        ("a.test", "/rx"),
    ] {
        let r = t.curl(&Curl::http1(&url(path)).header(&format!("Host: {host}")));
        assert_eq!(r.status, 404, "{host}{path}: {r:?}");
        assert_eq!(r.upstream(), None, "{r:?}");
    }

    // strip_prefix: the upstream sees the rest, query kept.
    let r = ok(t.curl(&Curl::http1(&url("/strip/a/b?q=1"))), "strip");
    assert_eq!(r.echo("uri"), Some("/a/b?q=1"), "{r:?}");
    let r = ok(t.curl(&Curl::http1(&url("/strip"))), "strip");
    assert_eq!(r.echo("uri"), Some("/"), "{r:?}");

    // add_headers replaces a client's value; remove_headers removes it; others pass.
    let r = ok(
        t.curl(
            &Curl::http1(&url("/hdr"))
                .header("X-Added: from-client")
                .header("X-Remove-Me: secret")
                .header("X-Kept: yes"),
        ),
        "rewrite",
    );
    assert_eq!(r.echo("x-route"), Some("rewrite"));
    assert_eq!(r.echo("x-added"), Some("by-xlb"), "{r:?}");
    assert_eq!(r.echo("x-remove-me"), Some(""), "{r:?}");
    assert_eq!(r.echo("x-kept"), Some("yes"), "{r:?}");
}

// ---- 3. authentication ----------------------------------------------------------------------

/// The HS256 secret of the tests' JWKS.
const JWT_SECRET: &[u8] = b"xlb-gateway-e2e-hs256-secret-0123456789";

/// A JWKS file with one HS256 key (`kid` `k1`), and its path.
fn jwks_file(t: &L7Topology) -> PathBuf {
    let path = t.scratch.path.join("jwks.json");
    let jwks = format!(
        "{{\"keys\": [{{\"kty\": \"oct\", \"kid\": \"k1\", \"alg\": \"HS256\", \"k\": \"{}\"}}]}}",
        base64(JWT_SECRET, true)
    );
    std::fs::write(&path, jwks).expect("writing the JWKS file");
    path
}

/// An HS256 JWT over `claims` signed with `secret` (`kid` `k1`).
fn jwt(claims: &serde_json::Value, secret: &[u8]) -> String {
    let header = jsonwebtoken::Header {
        kid: Some("k1".into()),
        ..jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256)
    };
    jsonwebtoken::encode(
        &header,
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret),
    )
    .expect("signing a JWT")
}

/// An unsigned token (`alg: none`, empty signature) over `claims`.
fn jwt_alg_none(claims: &serde_json::Value) -> String {
    let header = serde_json::json!({"alg": "none", "typ": "JWT", "kid": "k1"});
    format!(
        "{}.{}.",
        base64(header.to_string().as_bytes(), true),
        base64(claims.to_string().as_bytes(), true)
    )
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// API keys in a header and in a query parameter (removed before forwarding), JWTs (HS256 from
/// a JWKS file, issuer and audience checked): 200 with the identity upstream; missing -> 401
/// with a challenge; an unknown key or a genuine token for another audience or issuer -> 403;
/// expired, not yet valid, badly signed or `alg: none` -> 401 `invalid_token`. A client's own
/// identity header never reaches the upstream, on any route.
#[test]
fn api_keys_and_jwts_guard_their_routes() {
    let t = L7Topology::build(&L7Options::default());
    let keys = key_file(
        &t,
        "api-keys",
        &[("alice", "k-alice-0001"), ("bob", "k-bob-0002")],
    );
    let jwks = jwks_file(&t);
    let mut vips = vip("auth", IpAddr::V4(L7_VIP_V4), 80);
    vips += &format!(
        "[[vip.route]]\nname = \"keyed\"\npath_prefix = \"/key\"\nauth = \"api_key\"\n\
         api_key_file = \"{}\"\napi_key_query = \"api_key\"\n\n\
         [[vip.route]]\nname = \"jwt\"\npath_prefix = \"/jwt\"\nauth = \"jwt\"\n\
         jwks_file = \"{}\"\njwt_issuer = \"https://id.test\"\njwt_audience = \"api\"\n\n\
         [[vip.route]]\nname = \"open\"\npath_prefix = \"/open\"\n\n",
        keys.display(),
        jwks.display()
    );
    vips += &nginx_backends(&t, UPSTREAM_HTTP_PORT, "default");
    let _agent = start_gateway(&t, &vips, vip4(80));
    let url = |path: &str| t.vip_url(80, path);

    // API key in the header; a forged identity header is replaced by the verified one.
    let r = ok(
        t.curl(
            &Curl::http1(&url("/key/a"))
                .header("X-Api-Key: k-alice-0001")
                .header("X-Xlb-Identity: root"),
        ),
        "header key",
    );
    assert_eq!(r.echo("x-xlb-identity"), Some("alice"), "{r:?}");
    // In the query: verified, and the parameter does not travel upstream.
    let r = ok(
        t.curl(&Curl::http1(&url("/key/a?x=1&api_key=k-bob-0002&y=2"))),
        "query key",
    );
    assert_eq!(r.echo("x-xlb-identity"), Some("bob"), "{r:?}");
    assert_eq!(r.echo("uri"), Some("/key/a?x=1&y=2"), "{r:?}");
    let r = ok(
        t.curl(&Curl::http1(&url("/key/a?api_key=k-bob-0002"))),
        "query key",
    );
    assert_eq!(r.echo("uri"), Some("/key/a"), "{r:?}");

    // Missing: 401 with a challenge. Unknown or empty: 403 without one.
    for curl in [
        Curl::http1(&url("/key/a")),
        Curl::http1(&url("/key/a")).header("X-Xlb-Identity: alice"),
    ] {
        let r = t.curl(&curl);
        assert_eq!(r.status, 401, "{r:?}");
        assert!(
            r.header("www-authenticate")
                .is_some_and(|c| c.contains("realm=\"xlb\"")),
            "{r:?}"
        );
        assert_eq!(r.upstream(), None);
    }
    for curl in [
        Curl::http1(&url("/key/a")).header("X-Api-Key: k-alice-0002"),
        Curl::http1(&url("/key/a?api_key=nope")),
        Curl::http1(&url("/key/a?api_key=")),
        // The header wins over the query parameter: a wrong header is not rescued.
        Curl::http1(&url("/key/a?api_key=k-bob-0002")).header("X-Api-Key: wrong"),
    ] {
        let r = t.curl(&curl);
        assert_eq!(r.status, 403, "{curl:?}: {r:?}");
        assert_eq!(r.header("www-authenticate"), None, "{r:?}");
        assert_eq!(r.upstream(), None);
    }
    // A route without auth: the client's identity header is removed all the same.
    let r = ok(
        t.curl(&Curl::http1(&url("/open")).header("X-Xlb-Identity: alice")),
        "open",
    );
    assert_eq!(r.echo("x-xlb-identity"), Some(""), "{r:?}");

    // JWT.
    let now = now_secs();
    let claims = |sub: &str, iss: &str, aud: &str, exp: u64| serde_json::json!({"sub": sub, "iss": iss, "aud": aud, "exp": exp, "iat": now});
    let bearer = |token: &str| {
        Curl::http1(&url("/jwt/me")).header(&format!("Authorization: Bearer {token}"))
    };
    let valid = jwt(
        &claims("user-7", "https://id.test", "api", now + 600),
        JWT_SECRET,
    );
    let r = ok(
        t.curl(&bearer(&valid).header("X-Xlb-Identity: admin")),
        "valid JWT",
    );
    assert_eq!(r.echo("x-xlb-identity"), Some("user-7"), "{r:?}");
    let r = t.curl(&Curl::http1(&url("/jwt/me")));
    assert_eq!(r.status, 401, "no token: {r:?}");
    assert!(
        r.header("www-authenticate")
            .is_some_and(|c| c.starts_with("Bearer") && !c.contains("invalid_token")),
        "{r:?}"
    );
    let invalid = [
        (
            "expired an hour ago",
            jwt(
                &claims("user-7", "https://id.test", "api", now - 3600),
                JWT_SECRET,
            ),
        ),
        (
            "not valid for 10 minutes",
            jwt(
                &serde_json::json!({"sub": "user-7", "iss": "https://id.test", "aud": "api",
                    "exp": now + 1200, "nbf": now + 600}),
                JWT_SECRET,
            ),
        ),
        (
            "signed with another secret",
            jwt(
                &claims("user-7", "https://id.test", "api", now + 600),
                b"some-other-secret-of-the-same-length-000",
            ),
        ),
        (
            "alg none",
            jwt_alg_none(&claims("user-7", "https://id.test", "api", now + 600)),
        ),
        ("not a JWT", "abc.def".to_string()),
    ];
    for (what, token) in &invalid {
        let r = t.curl(&bearer(token));
        assert_eq!(r.status, 401, "{what}: {r:?}");
        assert!(
            r.header("www-authenticate")
                .is_some_and(|c| c.contains("invalid_token")),
            "{what}: {r:?}"
        );
        assert_eq!(r.upstream(), None, "{what}");
    }
    for (what, token) in [
        (
            "another audience",
            jwt(
                &claims("user-7", "https://id.test", "billing", now + 600),
                JWT_SECRET,
            ),
        ),
        (
            "another issuer",
            jwt(
                &claims("user-7", "https://evil.test", "api", now + 600),
                JWT_SECRET,
            ),
        ),
    ] {
        let r = t.curl(&bearer(&token));
        assert_eq!(r.status, 403, "{what}: {r:?}");
        assert_eq!(r.upstream(), None, "{what}");
    }
}

// ---- 4. rate limits -------------------------------------------------------------------------

/// Sends every request in `requests` at once from its own thread in the client namespace (each
/// its own connection, started together at a barrier) and returns the responses in order.
fn concurrently(t: &L7Topology, addr: SocketAddr, requests: Vec<Vec<u8>>) -> Vec<RawExchange> {
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(requests.len()));
    let threads: Vec<_> = requests
        .into_iter()
        .map(|request| {
            let barrier = barrier.clone();
            spawn_in_netns(&t.client, move || {
                use std::io::{Read as _, Write as _};
                let mut stream =
                    std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3))
                        .expect("connecting to the VIP");
                stream
                    .set_read_timeout(Some(Duration::from_secs(5)))
                    .expect("read timeout");
                barrier.wait();
                let started = Instant::now();
                stream.write_all(&request).expect("sending");
                let mut raw = Vec::new();
                let _ = stream.read_to_end(&mut raw);
                RawExchange {
                    responses: parse_responses(&raw),
                    raw: String::from_utf8_lossy(&raw).into_owned(),
                    closed: true,
                    elapsed: started.elapsed(),
                }
            })
        })
        .collect();
    threads
        .into_iter()
        .map(|h| h.join().expect("client thread"))
        .collect()
}

/// Token buckets under concurrency: 40 clients at once against burst 10 (refill one per
/// 1000 s): exactly 10 pass (each told a distinct number of requests left), 30 get 429 with
/// Retry-After and the RateLimit headers; keyed by API key, two keys have separate buckets of
/// 3 while 10 concurrent requests with a wrong key are refused by auth (403) before the limit.
#[test]
fn rate_limits_hold_under_concurrent_clients() {
    let t = L7Topology::build(&L7Options::default());
    let keys = key_file(&t, "api-keys", &[("alice", "k-alice"), ("bob", "k-bob")]);
    let mut vips = vip("limits", IpAddr::V4(L7_VIP_V4), 80);
    vips += &format!(
        "[[vip.route]]\nname = \"by-ip\"\npath_prefix = \"/ip\"\n\
         rate_limit = {{ rate = 0.001, burst = 10, key = \"client_ip\" }}\n\n\
         [[vip.route]]\nname = \"by-key\"\npath_prefix = \"/key\"\nauth = \"api_key\"\n\
         api_key_file = \"{}\"\nrate_limit = {{ rate = 0.001, burst = 3, key = \"api_key\" }}\n\n",
        keys.display()
    );
    vips += &nginx_backends(&t, UPSTREAM_HTTP_PORT, "default");
    let _agent = start_gateway(&t, &vips, vip4(80));

    let results = concurrently(
        &t,
        vip4(80),
        (0..40).map(|_| raw_get("api.test", "/ip", &[])).collect(),
    );
    let mut by_status: BTreeMap<u16, usize> = BTreeMap::new();
    let mut remaining = Vec::new();
    for x in &results {
        let r = x.response();
        *by_status.entry(r.status).or_default() += 1;
        assert_eq!(r.header("ratelimit-limit"), Some("10"), "{r:?}");
        assert!(
            r.header("ratelimit-policy")
                .is_some_and(|p| p.starts_with("10;w=")),
            "{r:?}"
        );
        assert!(r.header("ratelimit-reset").is_some(), "{r:?}");
        match r.status {
            200 => {
                assert_eq!(
                    r.header("x-upstream").map(|u| u.starts_with("upstream")),
                    Some(true)
                );
                assert_eq!(r.header("retry-after"), None);
                remaining.push(
                    r.header("ratelimit-remaining")
                        .and_then(|v| v.parse::<u32>().ok())
                        .expect("RateLimit-Remaining"),
                );
            }
            429 => {
                assert_eq!(r.header("x-upstream"), None, "a 429 is the gateway's");
                assert_eq!(r.header("ratelimit-remaining"), Some("0"), "{r:?}");
                let retry: u64 = r
                    .header("retry-after")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("429 without a numeric Retry-After: {r:?}"));
                assert!((1..=1000).contains(&retry), "Retry-After {retry}");
            }
            other => panic!("unexpected {other}: {r:?}"),
        }
    }
    assert_eq!(
        by_status,
        BTreeMap::from([(200, 10), (429, 30)]),
        "exactly the burst passes"
    );
    remaining.sort_unstable();
    assert_eq!(remaining, (0..10).collect::<Vec<_>>(), "one token each");

    // Keyed by API key: separate buckets, and refused keys never touch one.
    let mut requests = Vec::new();
    for _ in 0..10 {
        requests.push(raw_get("api.test", "/key", &["X-Api-Key: k-alice"]));
        requests.push(raw_get("api.test", "/key", &["X-Api-Key: k-bob"]));
        requests.push(raw_get("api.test", "/key", &["X-Api-Key: k-mallory"]));
    }
    let results = concurrently(&t, vip4(80), requests);
    let mut counts: BTreeMap<(&str, u16), usize> = BTreeMap::new();
    for (i, x) in results.iter().enumerate() {
        let who = ["alice", "bob", "mallory"][i % 3];
        *counts.entry((who, x.status())).or_default() += 1;
    }
    assert_eq!(
        counts,
        BTreeMap::from([
            (("alice", 200), 3),
            (("alice", 429), 7),
            (("bob", 200), 3),
            (("bob", 429), 7),
            (("mallory", 403), 10),
        ]),
    );
    // The client IP's bucket for /ip is untouched by /key, and still empty.
    assert_eq!(
        exchange(&t, vip4(80), &raw_get("api.test", "/ip", &[])).status(),
        429
    );
}

// ---- 5. normalisation and safety: attacks ---------------------------------------------------

/// A recorder on the upstream host's port `port`.
fn recorder(t: &L7Topology, port: u16, status: u16) -> RecordingUpstream {
    let addr = SocketAddr::new(UPSTREAM_HOST.parse().expect("address"), port);
    RecordingUpstream::start(&t.upstream_host, addr, status)
}

/// A client that sends a request head one byte every 200 ms, for at most `limit`; returns
/// when the server closed the connection (or the limit passed) and what it sent back.
fn slow_header_client(ns: &Netns, addr: SocketAddr, limit: Duration) -> (Duration, bool, String) {
    in_netns(ns, move || {
        use std::io::{Read as _, Write as _};
        let started = Instant::now();
        let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            .expect("connecting to the VIP");
        stream
            .set_read_timeout(Some(Duration::from_millis(200)))
            .expect("read timeout");
        let head = b"GET /public/slow HTTP/1.1\r\nHost: api.test\r\nX-Trickle: ";
        let mut got = Vec::new();
        let mut sent = 0usize;
        let mut buf = [0u8; 4096];
        while started.elapsed() < limit {
            let byte = head.get(sent).copied().unwrap_or(b'a');
            if stream.write_all(&[byte]).is_err() {
                return (
                    started.elapsed(),
                    true,
                    String::from_utf8_lossy(&got).into_owned(),
                );
            }
            sent += 1;
            match stream.read(&mut buf) {
                Ok(0) => {
                    return (
                        started.elapsed(),
                        true,
                        String::from_utf8_lossy(&got).into_owned(),
                    );
                }
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => {
                    return (
                        started.elapsed(),
                        true,
                        String::from_utf8_lossy(&got).into_owned(),
                    );
                }
            }
        }
        (
            started.elapsed(),
            false,
            String::from_utf8_lossy(&got).into_owned(),
        )
    })
}

/// Every item of issue 7 item 6 as an attack from a raw client, against a gateway in front of
/// a recording upstream that shows exactly what was forwarded: ambiguous framing (CL + TE,
/// duplicate CL, bad chunk size, a non-chunked final coding) -> 400 and nothing forwarded (and
/// nothing smuggled after it); `/public/../admin` and `/public/%2e%2e/admin` are the admin
/// route (401 without its key) and forwarded normalised with it; `%2F` -> 400 (kept encoded
/// on a VIP with `encoded_slash = "keep"`); NUL and Host problems -> 400; a head too large or
/// with too many fields -> 431; a body too large (declared or chunked) -> 413; a slow-header
/// client is cut off after `header_timeout_ms`; hop-by-hop headers are stripped;
/// X-Forwarded-For (the client's kept, the peer appended), X-Forwarded-Proto (replaced),
/// Forwarded (appended) and a request id (the client's sane one kept, else generated) reach
/// the upstream, the id echoed to the client.
#[test]
fn attacks_are_refused_or_neutralised() {
    let t = L7Topology::build(&L7Options {
        upstreams: 1,
        ..L7Options::default()
    });
    let rec = recorder(&t, 9000, 200);
    let keys = key_file(&t, "api-keys", &[("ops", "k-ops")]);
    let mut vips = vip("guard", IpAddr::V4(L7_VIP_V4), 80);
    vips += &format!(
        "[vip.gateway]\nheader_timeout_ms = 1000\nmax_header_bytes = 4096\nmax_headers = 20\n\
         max_body_bytes = 1024\n\n\
         [[vip.route]]\nname = \"admin\"\npath_prefix = \"/admin\"\nauth = \"api_key\"\n\
         api_key_file = \"{}\"\npool = \"rec\"\n\n\
         [[vip.route]]\nname = \"public\"\npath_prefix = \"/public\"\npool = \"rec\"\n\n\
         [[vip.pool]]\nname = \"rec\"\n\n{}\n",
        keys.display(),
        rec.backend_toml("rec")
    );
    vips += &vip("keep", IpAddr::V4(L7_VIP_V4), 8080);
    vips += &format!(
        "[vip.gateway]\nencoded_slash = \"keep\"\n\n{}",
        rec.backend_toml("default")
    );
    let _agent = start_gateway(&t, &vips, vip4(80));
    let guard = vip4(80);

    // Each refused request: its status, the connection closed, nothing forwarded.
    let refused = |what: &str, request: &[u8], status: u16| {
        let before = rec.count();
        let x = exchange(&t, guard, request);
        assert_eq!(x.status(), status, "{what}: {x:?}");
        assert_eq!(x.responses.len(), 1, "{what}: one response only: {x:?}");
        assert!(x.closed, "{what}: the connection stays open: {x:?}");
        assert_eq!(
            rec.count(),
            before,
            "{what} reached the upstream: {:?}",
            rec.requests()
        );
        x
    };
    let smuggled = "GET /admin/smuggled HTTP/1.1\r\nHost: api.test\r\n\r\n";
    // Pipelined: an ambiguous request behind an innocent one is refused like a first one
    // (hyper reads it while the first is in flight; the gateway follows every raw head).
    let before = rec.count();
    let x = exchange(
        &t,
        guard,
        format!(
            "GET /public/first HTTP/1.1\r\nHost: api.test\r\n\r\n\
             POST /public/a HTTP/1.1\r\nHost: api.test\r\nContent-Length: 40\r\n\r\n\
             GET /admin/in-a-body HTTP/1.1\r\n\r\n\
             POST /public/a HTTP/1.1\r\nHost: api.test\r\nContent-Length: {}\r\n\
             Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}",
            5 + smuggled.len()
        )
        .as_bytes(),
    );
    let statuses: Vec<u16> = x.responses.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [200, 200, 400], "pipelined CL + TE: {x:?}");
    assert_eq!(rec.count(), before + 2, "pipelined: {:?}", rec.requests());
    let mut forwarded = rec.count();
    // Each accepted request: 200 from the recorder, returns what it received.
    let mut passed = |what: &str, addr: SocketAddr, request: &[u8]| {
        let x = exchange(&t, addr, request);
        assert_eq!(x.status(), 200, "{what}: {x:?}");
        assert_eq!(
            x.response().header("x-upstream"),
            Some("recorder"),
            "{what}"
        );
        forwarded += 1;
        let requests = rec.requests();
        assert_eq!(requests.len(), forwarded, "{what}: {requests:?}");
        (x, requests.last().cloned().expect("recorded"))
    };

    // Ambiguous framing, with a smuggled request behind it.
    refused(
        "CL + TE",
        format!(
            "POST /public/a HTTP/1.1\r\nHost: api.test\r\nContent-Length: {}\r\n\
             Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}",
            5 + smuggled.len()
        )
        .as_bytes(),
        400,
    );
    refused(
        "TE + CL",
        format!(
            "POST /public/a HTTP/1.1\r\nHost: api.test\r\nTransfer-Encoding: chunked\r\n\
             Content-Length: 3\r\n\r\n0\r\n\r\n{smuggled}"
        )
        .as_bytes(),
        400,
    );
    refused(
        "duplicate equal CL",
        b"POST /public/a HTTP/1.1\r\nHost: api.test\r\nContent-Length: 5\r\n\
          Content-Length: 5\r\n\r\nhello",
        400,
    );
    refused(
        "duplicate different CL",
        b"POST /public/a HTTP/1.1\r\nHost: api.test\r\nContent-Length: 5\r\n\
          Content-Length: 50\r\n\r\nhello",
        400,
    );
    refused(
        "CL list",
        b"POST /public/a HTTP/1.1\r\nHost: api.test\r\nContent-Length: 5, 5\r\n\r\nhello",
        400,
    );
    refused(
        "invalid chunk size",
        b"POST /public/a HTTP/1.1\r\nHost: api.test\r\nTransfer-Encoding: chunked\r\n\r\n\
          zz\r\nhello\r\n0\r\n\r\n",
        400,
    );
    refused(
        "chunked not last",
        b"POST /public/a HTTP/1.1\r\nHost: api.test\r\nTransfer-Encoding: chunked, gzip\r\n\r\n\
          5\r\nhello\r\n0\r\n\r\n",
        400,
    );

    // Paths: normalised before routing, so dot segments cannot dodge the admin route's auth.
    for target in [
        "/public/../admin/x",
        "/public/%2e%2e/admin/x",
        "/public/%2E%2E/admin/x",
        "/public/./.././admin/x",
        "/public/x/../../admin/x",
        "/%61dmin/x",
        "/admin;jsessionid=1/x",
        "/;x/admin/x",
    ] {
        let before = rec.count();
        let x = exchange(&t, guard, &raw_get("api.test", target, &[]));
        assert_eq!(
            x.status(),
            401,
            "{target} must reach the admin route's auth: {x:?}"
        );
        assert_eq!(rec.count(), before, "{target} reached the upstream");
    }
    let (_, seen) = passed(
        "dot segments with the key",
        guard,
        &raw_get(
            "api.test",
            "/public/%2e%2e/admin/x?q=1",
            &["X-Api-Key: k-ops"],
        ),
    );
    assert_eq!(seen.target(), "/admin/x?q=1", "forwarded as routed");
    assert_eq!(seen.header("x-xlb-identity"), Some("ops"));
    let (_, seen) = passed(
        "unreserved characters decoded",
        guard,
        &raw_get("api.test", "/%70ublic/%7Euser/a%2db", &[]),
    );
    assert_eq!(seen.target(), "/public/~user/a-b");
    refused(
        "encoded slash",
        &raw_get("api.test", "/public/a%2Fb", &[]),
        400,
    );
    refused(
        "encoded backslash",
        &raw_get("api.test", "/public/..%5Cadmin", &[]),
        400,
    );
    refused("NUL", &raw_get("api.test", "/public/a%00.png", &[]), 400);
    for target in [
        "/public/..;/admin/x",
        "/public/%2e%2e;x=1/admin/x",
        "/public/.;/a",
    ] {
        refused(target, &raw_get("api.test", target, &[]), 400);
    }
    for host in [
        "api.test:80:80",
        "user@api.test",
        "api.test/admin",
        "api.test%2f",
        "api.test:8o",
        "[::1",
    ] {
        refused(host, &raw_get(host, "/public/a", &[]), 400);
    }
    refused(
        "userinfo in an absolute-form target",
        b"GET http://user@api.test/public/a HTTP/1.1\r\nHost: api.test\r\n\r\n",
        400,
    );
    refused(
        "no Host",
        b"GET /public/a HTTP/1.1\r\nConnection: close\r\n\r\n",
        400,
    );
    refused(
        "two Hosts",
        b"GET /public/a HTTP/1.1\r\nHost: api.test\r\nHost: other.test\r\nConnection: close\r\n\r\n",
        400,
    );
    // encoded_slash = "keep": left encoded, one segment, never a separator.
    let (_, seen) = passed(
        "encoded slash kept",
        vip4(8080),
        &raw_get("api.test", "/files/a%2fb/..%2F..%2Fc", &[]),
    );
    assert_eq!(seen.target(), "/files/a%2Fb/..%2F..%2Fc");

    // Limits: head size and field count (431), body size (413).
    let big = format!("X-Big: {}", "a".repeat(6000));
    refused(
        "head too large",
        &raw_get("api.test", "/public/a", &[&big]),
        431,
    );
    let many: Vec<String> = (0..30).map(|i| format!("X-Field-{i}: v")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    refused(
        "too many fields",
        &raw_get("api.test", "/public/a", &many),
        431,
    );
    let body = "b".repeat(2000);
    refused(
        "declared body too large",
        format!("POST /public/up HTTP/1.1\r\nHost: api.test\r\nContent-Length: 2000\r\n\r\n{body}")
            .as_bytes(),
        413,
    );
    refused(
        "chunked body too large",
        format!(
            "POST /public/up HTTP/1.1\r\nHost: api.test\r\nTransfer-Encoding: chunked\r\n\r\n\
             7d0\r\n{body}\r\n0\r\n\r\n"
        )
        .as_bytes(),
        413,
    );
    // Bodies within the limit go through, however framed.
    let (_, seen) = passed(
        "chunked body within the limit",
        guard,
        b"POST /public/up HTTP/1.1\r\nHost: api.test\r\nTransfer-Encoding: chunked\r\n\
          Connection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    );
    assert_eq!(seen.body, b"hello world");

    // Slow headers: cut off after header_timeout_ms (1 s), never answered 200.
    let (took, closed, got) = slow_header_client(&t.client, guard, Duration::from_secs(6));
    assert!(
        closed,
        "a trickling client kept its connection for {took:?}"
    );
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(2500),
        "cut off after {took:?}, header_timeout_ms is 1000"
    );
    assert!(!got.contains(" 200 "), "{got:?}");

    // Hop-by-hop headers, including those the client's Connection names, stay here.
    let (_, seen) = passed(
        "hop-by-hop",
        guard,
        &raw_get(
            "api.test",
            "/public/hop",
            &[
                "Connection: keep-alive, X-Secret",
                "X-Secret: s3cr3t",
                "Keep-Alive: timeout=5",
                "Proxy-Connection: keep-alive",
                "X-Normal: stays",
            ],
        ),
    );
    for name in ["x-secret", "keep-alive", "proxy-connection"] {
        assert_eq!(seen.header(name), None, "{name} forwarded: {}", seen.head);
    }
    assert!(!seen.head.contains("s3cr3t"), "{}", seen.head);
    assert_eq!(seen.header("x-normal"), Some("stays"));

    // Forwarding headers and the request id.
    let (x, seen) = passed(
        "forwarding headers",
        guard,
        &raw_get(
            "api.test",
            "/public/fwd",
            &[
                "X-Forwarded-For: 192.0.2.7",
                "X-Forwarded-Proto: https",
                "Forwarded: for=192.0.2.7",
                "X-Request-Id: client-req-1",
            ],
        ),
    );
    assert_eq!(
        seen.header("x-forwarded-for"),
        Some("192.0.2.7, 10.97.1.2"),
        "{}",
        seen.head
    );
    assert_eq!(
        seen.header_all("x-forwarded-proto"),
        ["http"],
        "{}",
        seen.head
    );
    assert_eq!(
        seen.header("forwarded"),
        Some("for=192.0.2.7, for=10.97.1.2;proto=http;host=api.test"),
        "{}",
        seen.head
    );
    assert_eq!(seen.header("x-request-id"), Some("client-req-1"));
    assert_eq!(x.response().header("x-request-id"), Some("client-req-1"));
    let (x, seen) = passed(
        "generated request id",
        guard,
        &raw_get("api.test", "/public/id", &["X-Request-Id: not a sane id"]),
    );
    let id = seen.header("x-request-id").expect("a request id upstream");
    assert!(!id.is_empty() && id != "not a sane id", "{id:?}");
    assert_eq!(x.response().header("x-request-id"), Some(id));
    assert_eq!(seen.header_all("x-request-id").len(), 1);

    // Nothing else ever arrived.
    let targets: Vec<String> = rec
        .requests()
        .iter()
        .map(|r| r.target().to_string())
        .collect();
    assert_eq!(
        targets,
        [
            "/public/first",
            "/public/a",
            "/admin/x?q=1",
            "/public/~user/a-b",
            "/files/a%2Fb/..%2F..%2Fc",
            "/public/up",
            "/public/hop",
            "/public/fwd",
            "/public/id"
        ]
    );
}

// ---- 6. WebSocket ---------------------------------------------------------------------------

/// A WebSocket upgrade passes through to an upstream that speaks it: 101 with the upstream's
/// accept key (the RFC 6455 example), then frames echoed both ways, also after a pause longer
/// than the client header timeout (an upgraded connection has none; only a tunnel quiet for the
/// whole `idle_timeout_ms` is closed, see the in-process tests), and a close.
#[test]
fn websocket_upgrades_pass_through() {
    let t = L7Topology::build(&L7Options {
        upstreams: 1,
        ..L7Options::default()
    });
    let rec = recorder(&t, 9000, 200);
    let mut vips = vip("ws", IpAddr::V4(L7_VIP_V4), 80);
    vips += "[vip.gateway]\nheader_timeout_ms = 1000\nidle_timeout_ms = 4000\n\n";
    vips += &rec.backend_toml("default");
    let _agent = start_gateway(&t, &vips, vip4(80));

    let addr = vip4(80);
    let (head, frames) = in_netns(&t.client, move || {
        use std::io::{Read as _, Write as _};
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            .expect("connecting");
        s.set_read_timeout(Some(Duration::from_secs(3)))
            .expect("timeout");
        s.write_all(
            b"GET /ws/chat?room=1 HTTP/1.1\r\nHost: ws.test\r\nUpgrade: websocket\r\n\
              Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
              Sec-WebSocket-Version: 13\r\n\r\n",
        )
        .expect("handshake");
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let n = s.read(&mut chunk).expect("reading the handshake");
            assert!(n > 0, "closed during the handshake: {buf:?}");
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        buf.drain(..head_end);
        let mut frames = Vec::new();
        let long = vec![b'z'; 300];
        for (i, (opcode, payload)) in [
            (1u8, b"hello through xlb".to_vec()),
            (2, long),
            (8, vec![0x03, 0xe8]),
        ]
        .into_iter()
        .enumerate()
        {
            if i == 1 {
                // Longer than both client timeouts.
                std::thread::sleep(Duration::from_millis(1500));
            }
            s.write_all(&ws_frame(opcode, &payload, Some([0x12, 0x34, 0x56, 0x78])))
                .expect("sending a frame");
            let frame = loop {
                if let Some((op, p, used)) = parse_ws_frame(&buf) {
                    buf.drain(..used);
                    break (op, p);
                }
                match s.read(&mut chunk) {
                    Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                    other => panic!("no echo of frame {i}: {other:?}"),
                }
            };
            frames.push(((opcode, payload), frame));
        }
        (head, frames)
    });
    let response = &parse_responses(head.as_bytes())[0];
    assert_eq!(response.status, 101, "{head}");
    assert_eq!(response.header("upgrade"), Some("websocket"), "{head}");
    assert!(
        response
            .header("connection")
            .is_some_and(|c| c.eq_ignore_ascii_case("upgrade")),
        "{head}"
    );
    assert_eq!(
        response.header("sec-websocket-accept"),
        Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        "{head}"
    );
    for (sent, echoed) in &frames {
        assert_eq!(sent, echoed, "frame not echoed");
    }
    let seen = &rec.requests()[0];
    assert_eq!(seen.target(), "/ws/chat?room=1");
    assert_eq!(seen.header("upgrade"), Some("websocket"));
    assert_eq!(
        seen.header("sec-websocket-key"),
        Some("dGhlIHNhbXBsZSBub25jZQ==")
    );
    assert_eq!(seen.header("sec-websocket-version"), Some("13"));
    assert_eq!(seen.header("x-forwarded-for"), Some("10.97.1.2"));
    // Ordinary requests on the same VIP are unaffected.
    let x = exchange(&t, addr, &raw_get("ws.test", "/plain", &[]));
    assert_eq!(x.status(), 200, "{x:?}");
}

// ---- 7. upstream health, outliers, retries --------------------------------------------------

/// The `xlb status` row of upstream server `server` (`address:port`), split into columns:
/// pool, server, weight, health, ejected, in flight, requests, 5xx, connect failures,
/// timeouts.
fn status_row(t: &L7Topology, server: &str) -> Vec<String> {
    let (code, out, _) = xlb(t, &["status"]);
    assert_eq!(code, 0, "xlb status failed: {out}");
    let mut cols = out
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(server))
        .unwrap_or_else(|| panic!("no row for {server} in xlb status:\n{out}"))
        .split_whitespace()
        .map(str::to_string)
        .collect::<Vec<_>>();
    // EJECTED is `no` or `N s left`: one column either way.
    if cols.get(5).map(String::as_str) == Some("s")
        && cols.get(6).map(String::as_str) == Some("left")
    {
        let ejected = cols[4..7].join(" ");
        cols.splice(4..7, [ejected]);
    }
    cols
}

/// The agent's HTTP health checks steer the gateway's pool: one nginx stopped -> after
/// detection (checks every 200 ms, fall 2) every request goes to the other; both stopped ->
/// 503 from the gateway; both started again -> served by both again. `xlb status` shows the
/// servers' health.
#[test]
fn health_checks_steer_the_upstream_pool() {
    let mut t = L7Topology::build(&L7Options::default());
    let mut vips = vip("health", IpAddr::V4(L7_VIP_V4), 80);
    vips += "[vip.health_check]\ntype = \"http\"\npath = \"/fixed\"\ninterval_ms = 200\n\
             timeout_ms = 150\nrise = 2\nfall = 2\n\n";
    // Health checks alone steer here: no ejection, no retries to hide a down server.
    vips += "[[vip.pool]]\nname = \"default\"\nretries = 0\noutlier_consecutive_failures = 0\n\
             outlier_consecutive_5xx = 0\n\n";
    vips += &nginx_backends(&t, UPSTREAM_HTTP_PORT, "default");
    let mut agent = start_gateway(&t, &vips, vip4(80));
    let url = t.vip_url(80, "/who");
    let names: Vec<String> = t.upstreams.iter().map(|u| u.name.clone()).collect();
    let servers: Vec<String> = t.upstreams.iter().map(|u| u.http().to_string()).collect();
    let answer = |t: &L7Topology| {
        let r = t.curl(&Curl::http1(&url));
        (r.status, r.upstream().unwrap_or_default().to_string())
    };
    // Both serve.
    wait_until(
        "both upstreams up and serving",
        Duration::from_secs(5),
        || {
            let seen: std::collections::BTreeSet<_> = (0..4).map(|_| answer(&t)).collect();
            seen.len() == 2 && seen.iter().all(|(s, _)| *s == 200)
        },
    );

    t.upstreams[1].server.stop();
    let took = wait_until("upstream1 checked down", Duration::from_secs(5), || {
        status_row(&t, &servers[1])[3] == "down"
    });
    eprintln!("    upstream1 checked down after {took:?}");
    // The log names the server with its port: servers of one host differ only by it.
    agent.wait_for(
        &format!("backend down vip=health backend={} ", servers[1]),
        Duration::from_secs(5),
    );
    assert_eq!(status_row(&t, &servers[0])[3], "up");
    // Out of the pool: not even tried (its connect failures stop counting), not merely
    // retried around.
    let failures = status_row(&t, &servers[1])[8].clone();
    for _ in 0..10 {
        assert_eq!(
            answer(&t),
            (200, names[0].clone()),
            "a request went to the stopped upstream"
        );
    }
    assert_eq!(
        status_row(&t, &servers[1])[8],
        failures,
        "the down server was tried"
    );
    t.upstreams[0].server.stop();
    wait_until(
        "503 with every upstream down",
        Duration::from_secs(5),
        || answer(&t).0 == 503,
    );
    for _ in 0..3 {
        let r = t.curl(&Curl::http1(&url));
        assert_eq!((r.status, r.upstream()), (503, None), "{r:?}");
    }

    for u in &mut t.upstreams {
        u.server.start_again(&t.upstream_host);
    }
    let took = wait_until("both upstreams back", Duration::from_secs(5), || {
        let seen: std::collections::BTreeSet<_> = (0..4).map(|_| answer(&t)).collect();
        seen.len() == 2 && seen.iter().all(|(s, _)| *s == 200)
    });
    eprintln!("    both upstreams serving again after {took:?}");
    assert_eq!(status_row(&t, &servers[1])[3], "up");
}

/// Passive outlier ejection: a server answering 500 (an nginx of its own, counting requests in
/// its access log) is ejected after `outlier_consecutive_5xx = 3` and gets no request for
/// `outlier_ejection_ms`, then gets requests again; `xlb status` shows the ejection. A server
/// nothing listens on: GETs are retried on the other server (all 200), POSTs with a body are
/// not (502), and its connect failures show in `xlb status` with the routes.
#[test]
fn outliers_are_ejected_and_connect_failures_retried() {
    let t = L7Topology::build(&L7Options {
        upstreams: 1,
        ..L7Options::default()
    });
    let failing_addr: SocketAddr = format!("{UPSTREAM_HOST}:9500").parse().expect("address");
    let failing = NginxServer::start(
        &t.upstream_host,
        "failing",
        &move |dir: &Path| {
            let dir = dir.display();
            format!(
                "daemon off;\nworker_processes 1;\npid {dir}/nginx.pid;\n\
                 error_log {dir}/error.log warn;\nevents {{ worker_connections 64; }}\n\
                 http {{\n  access_log {dir}/access.log;\n  client_body_temp_path {dir}/body;\n\
                 proxy_temp_path {dir}/proxy;\n  fastcgi_temp_path {dir}/fastcgi;\n\
                 uwsgi_temp_path {dir}/uwsgi;\n  scgi_temp_path {dir}/scgi;\n\
                 server {{\n    listen {failing_addr};\n\
                 add_header X-Upstream failing always;\n\
                 location / {{ return 500 \"failing\\n\"; }}\n  }}\n}}\n"
            )
        },
        failing_addr,
    );
    let failing_requests = || {
        std::fs::read_to_string(failing.dir.join("access.log"))
            .unwrap_or_default()
            .lines()
            .count()
    };
    let good = t.upstreams[0].http();
    // A server is in one pool of a VIP (unique by address and port): two VIPs.
    let mut vips = vip("outliers", IpAddr::V4(L7_VIP_V4), 80);
    vips += &format!(
        "[[vip.route]]\nname = \"flaky\"\npath_prefix = \"/flaky\"\npool = \"flaky\"\n\
         strip_prefix = true\n\n\
         [[vip.pool]]\nname = \"flaky\"\noutlier_consecutive_5xx = 3\n\
         outlier_ejection_ms = 2000\n\n\
         [[vip.backend]]\naddress = \"{}\"\nport = {}\npool = \"flaky\"\n\n\
         [[vip.backend]]\naddress = \"{UPSTREAM_HOST}\"\nport = 9500\npool = \"flaky\"\n\n",
        good.ip(),
        good.port(),
    );
    vips += &vip("retries", IpAddr::V4(L7_VIP_V4), 8080);
    vips += &format!(
        "[[vip.route]]\nname = \"retry\"\npath_prefix = \"/retry\"\n\n\
         [[vip.pool]]\nname = \"default\"\nretries = 2\noutlier_consecutive_failures = 0\n\
         connect_timeout_ms = 500\n\n\
         [[vip.backend]]\naddress = \"{}\"\nport = {}\n\n\
         [[vip.backend]]\naddress = \"{UPSTREAM_HOST}\"\nport = 9999\n",
        good.ip(),
        good.port()
    );
    let _agent = start_gateway(&t, &vips, vip4(80));
    let flaky = t.vip_url(80, "/flaky/fixed");

    // Round robin over both until the failing one has answered 500 three times in a row.
    let mut fives = 0;
    for _ in 0..10 {
        let r = t.curl(&Curl::http1(&flaky));
        match (r.status, r.upstream()) {
            (200, Some("upstream0")) => {}
            (500, Some("failing")) => fives += 1,
            other => panic!("unexpected {other:?}: {r:?}"),
        }
        if fives == 3 {
            break;
        }
    }
    assert_eq!((fives, failing_requests()), (3, 3));
    let ejected_at = Instant::now();
    let row = status_row(&t, &failing_addr.to_string());
    assert!(row[4].ends_with(" s left"), "not ejected: {row:?}");
    assert_eq!(
        row[6..9],
        ["3", "3", "0"],
        "requests, 5xx, connect failures: {row:?}"
    );
    // Ejected: every request goes to the good server while the ejection lasts.
    let mut during = 0;
    while ejected_at.elapsed() < Duration::from_millis(1500) {
        let r = ok(t.curl(&Curl::http1(&flaky)), "while ejected");
        assert_eq!(r.upstream(), Some("upstream0"));
        during += 1;
    }
    assert!(during >= 5, "only {during} requests while ejected");
    assert_eq!(failing_requests(), 3, "the ejected server got requests");
    // After the ejection it is tried again.
    std::thread::sleep(Duration::from_millis(2000).saturating_sub(ejected_at.elapsed()));
    wait_until(
        "the failing server tried again",
        Duration::from_secs(3),
        || {
            let _ = t.curl(&Curl::http1(&flaky));
            failing_requests() > 3
        },
    );
    assert_eq!(status_row(&t, &failing_addr.to_string())[4], "no");

    // Connect failures: GETs retried on the other server, POSTs with a body not.
    for i in 0..8 {
        let r = ok(
            t.curl(&Curl::http1(&t.vip_url(8080, "/retry/get"))),
            "GET retried",
        );
        assert_eq!(r.upstream(), Some("upstream0"), "GET {i}");
    }
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(
            t.curl(&Curl::http1(&t.vip_url(8080, "/retry/upload")).data("body"))
                .status,
        );
    }
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 502),
        "{statuses:?}"
    );
    assert!(
        statuses.contains(&502),
        "a POST went to the dead server and was not retried: {statuses:?}"
    );
    let dead = format!("{UPSTREAM_HOST}:9999");
    let row = status_row(&t, &dead);
    let connect_failures: u32 = row[8].parse().expect("CONNECT FAIL column");
    assert!(connect_failures >= 4, "{row:?}");
    assert_eq!(
        row[4], "no",
        "outlier_consecutive_failures = 0 never ejects: {row:?}"
    );
    // The routes are in the status too.
    let (_, out, _) = xlb(&t, &["status"]);
    assert!(
        out.contains("outliers gateway: listening on 198.51.100.80:80 "),
        "{out}"
    );
    assert!(
        out.contains("retries gateway: listening on 198.51.100.80:8080 "),
        "{out}"
    );
    for route in ["flaky", "retry"] {
        assert!(
            out.lines()
                .any(|l| l.split_whitespace().next() == Some(route)
                    && l.contains(&format!("path=/{route}/*"))),
            "route {route} missing:\n{out}"
        );
    }
}

// ---- 8. reload ------------------------------------------------------------------------------

/// The subject of the certificate a new TLS connection to the VIP shows (curl -v), with the
/// response status.
fn served_certificate(t: &L7Topology, ca: &Path) -> (u16, String) {
    let r = t.curl(&Curl::h2_tls("api.test", 443, "/cert", IpAddr::V4(L7_VIP_V4), ca).arg("-v"));
    let subject = r
        .stderr
        .lines()
        .find_map(|l| l.trim_start_matches(['*', ' ']).strip_prefix("subject: "))
        .unwrap_or_default()
        .to_string();
    (r.status, subject)
}

/// The inode of the socket listening on the VIP's port 443 (`ss -e`): the same inode means the
/// same socket, not a rebind.
fn listener_inode(t: &L7Topology) -> String {
    let out = t.lb.run(&["ss", "-Hltne", "sport = :443"]);
    out.split_whitespace()
        .find_map(|w| w.strip_prefix("ino:"))
        .unwrap_or_else(|| panic!("no listener on :443: {out:?}"))
        .to_string()
}

/// TLS certificates are re-read on reload: swapping the files and `xlb reload` makes new
/// connections see the new certificate, on the same listening socket. A reload with a garbage
/// key file is refused with `FILE:LINE: vip[0].gateway.tls.key_file: ...`, the old certificate
/// keeps serving, and `xlb check` on that file exits 2 with the same line.
#[test]
fn reload_swaps_certificates_and_refuses_broken_keys() {
    let t = L7Topology::build(&L7Options {
        upstreams: 1,
        ..L7Options::default()
    });
    let sans = ["DNS:api.test", &format!("IP:{L7_VIP_V4}")];
    let one = self_signed_cert(&t.scratch.path.join("one"), "gw-one", &sans);
    let two = self_signed_cert(&t.scratch.path.join("two"), "gw-two", &sans);
    let live = t.scratch.path.join("live");
    std::fs::create_dir_all(&live).expect("live directory");
    let (cert, key) = (live.join("cert.pem"), live.join("key.pem"));
    let install = |from: &xlb_tests::l7::SelfSigned| {
        std::fs::copy(&from.cert, &cert).expect("copying the certificate");
        std::fs::copy(&from.key, &key).expect("copying the key");
    };
    install(&one);
    let mut vips = vip("tls", IpAddr::V4(L7_VIP_V4), 443);
    vips += &format!(
        "[vip.gateway.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n\n",
        cert.display(),
        key.display()
    );
    vips += &nginx_backends(&t, UPSTREAM_HTTP_PORT, "default");
    let mut agent = start_gateway(&t, &vips, vip4(443));
    assert_eq!(
        served_certificate(&t, &one.cert),
        (200, "CN=gw-one".to_string())
    );
    let inode = listener_inode(&t);

    install(&two);
    let (code, out, err) = xlb(&t, &["reload"]);
    assert_eq!(code, 0, "reload: {out}{err}");
    assert_eq!(
        served_certificate(&t, &two.cert),
        (200, "CN=gw-two".to_string())
    );
    // The old certificate is no longer served to anyone.
    assert_eq!(served_certificate(&t, &one.cert).0, 0);
    assert_eq!(listener_inode(&t), inode, "the listener was rebound");
    let listening = agent
        .lines()
        .iter()
        .filter(|l| l.contains("gateway listening") && l.contains("198.51.100.80:443"))
        .count();
    assert_eq!(listening, 1, "one bind only");

    std::fs::write(
        &key,
        "-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5IGF0IGFsbCwganVzdCB0ZXh0\n-----END PRIVATE KEY-----\n",
    )
    .expect("breaking the key");
    let config = t.dirs.tmp.join("agent.toml");
    let text = std::fs::read_to_string(&config).expect("reading the configuration");
    let line = 1 + text
        .lines()
        .position(|l| l.starts_with("key_file"))
        .expect("key_file line");
    let expected = format!("{}:{line}: vip[0].gateway.tls.key_file: ", config.display());
    let (code, out, err) = xlb(&t, &["reload"]);
    assert_ne!(code, 0, "a broken key was accepted: {out}{err}");
    assert!(
        format!("{out}{err}").contains(&expected),
        "want {expected:?} in:\n{out}{err}"
    );
    assert_eq!(
        served_certificate(&t, &two.cert),
        (200, "CN=gw-two".to_string()),
        "the previous gateway stopped serving"
    );
    assert_eq!(listener_inode(&t), inode);

    let out =
        t.lb.command(xlb_bin().to_str().expect("utf-8 path"))
            .args(["check", "--config"])
            .arg(&config)
            .env("NO_COLOR", "1")
            .output()
            .expect("running xlb check");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(2), "xlb check: {said}");
    assert!(said.contains(&expected), "want {expected:?} in:\n{said}");
}

// ---- 9. metrics -----------------------------------------------------------------------------

/// After a known mix of requests, the agent's `/metrics` counts them per route: requests by
/// status class, auth rejections by status, rate-limited requests, refusals before routing,
/// latency histogram counts, upstream health.
#[test]
fn metrics_count_requests_per_route() {
    let t = L7Topology::build(&L7Options {
        upstreams: 1,
        ..L7Options::default()
    });
    let keys = key_file(&t, "api-keys", &[("alice", "k-alice")]);
    let mut vips = vip("metered", IpAddr::V4(L7_VIP_V4), 80);
    vips += &format!(
        "[[vip.route]]\nname = \"open\"\npath_prefix = \"/open\"\n\n\
         [[vip.route]]\nname = \"keyed\"\npath_prefix = \"/keyed\"\nauth = \"api_key\"\n\
         api_key_file = \"{}\"\n\n\
         [[vip.route]]\nname = \"limited\"\npath_prefix = \"/limited\"\n\
         rate_limit = {{ rate = 0.001, burst = 2 }}\n\n",
        keys.display()
    );
    vips += &nginx_backends(&t, UPSTREAM_HTTP_PORT, "default");
    let _agent = start_gateway(&t, &vips, vip4(80));
    let url = |path: &str| Curl::http1(&t.vip_url(80, path));
    let mut sent: BTreeMap<u16, usize> = BTreeMap::new();
    let mut send = |curl: Curl| {
        *sent.entry(t.curl(&curl).status).or_default() += 1;
    };
    for _ in 0..5 {
        send(url("/open/x"));
        send(url("/limited"));
    }
    for _ in 0..3 {
        send(url("/keyed"));
    }
    for _ in 0..2 {
        send(url("/keyed").header("X-Api-Key: wrong"));
        send(url("/nothing"));
    }
    send(url("/keyed").header("X-Api-Key: k-alice"));
    send(url("/open/a%2Fb"));
    assert_eq!(
        sent,
        BTreeMap::from([(200, 8), (400, 1), (401, 3), (403, 2), (404, 2), (429, 3)])
    );

    let v = "vip=\"metered\"";
    let want = [
        format!("xlb_gateway_requests_total{{{v},route=\"open\",class=\"2xx\"}} 5"),
        format!("xlb_gateway_requests_total{{{v},route=\"open\",class=\"4xx\"}} 0"),
        format!("xlb_gateway_requests_total{{{v},route=\"keyed\",class=\"2xx\"}} 1"),
        format!("xlb_gateway_requests_total{{{v},route=\"keyed\",class=\"4xx\"}} 5"),
        format!("xlb_gateway_requests_total{{{v},route=\"limited\",class=\"2xx\"}} 2"),
        format!("xlb_gateway_requests_total{{{v},route=\"limited\",class=\"4xx\"}} 3"),
        format!("xlb_gateway_requests_total{{{v},route=\"(none)\",class=\"4xx\"}} 3"),
        format!("xlb_gateway_auth_rejected_total{{{v},route=\"keyed\",status=\"401\"}} 3"),
        format!("xlb_gateway_auth_rejected_total{{{v},route=\"keyed\",status=\"403\"}} 2"),
        format!("xlb_gateway_auth_rejected_total{{{v},route=\"open\",status=\"401\"}} 0"),
        format!("xlb_gateway_rate_limited_total{{{v},route=\"limited\"}} 3"),
        format!("xlb_gateway_rate_limited_total{{{v},route=\"open\"}} 0"),
        format!("xlb_gateway_refused_total{{{v},reason=\"no_route\"}} 2"),
        format!("xlb_gateway_refused_total{{{v},reason=\"path\"}} 1"),
        format!("xlb_gateway_request_duration_seconds_count{{{v},route=\"open\"}} 5"),
        format!("xlb_gateway_upstream_duration_seconds_count{{{v},route=\"open\"}} 5"),
        format!("xlb_gateway_upstream_duration_seconds_count{{{v},route=\"keyed\"}} 1"),
        format!(
            "xlb_gateway_upstream_healthy{{{v},pool=\"default\",server=\"{}\"}} 1",
            t.upstreams[0].http()
        ),
    ];
    let scrape = || {
        let out =
            t.lb.command("curl")
                .args(["-sS", "--max-time", "5"])
                .arg(format!("http://{METRICS_LISTEN}/metrics"))
                .output()
                .expect("running curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let mut text = String::new();
    // The counters move when each response body is dropped, just after the client has it.
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_until("the metrics", Duration::from_secs(3), || {
            text = scrape();
            want.iter().all(|w| text.lines().any(|l| l == w))
        })
    }));
    let missing: Vec<&String> = want
        .iter()
        .filter(|w| !text.lines().any(|l| l == w.as_str()))
        .collect();
    let ours: Vec<&str> = text.lines().filter(|l| l.contains(v)).collect();
    assert!(
        missing.is_empty(),
        "missing {missing:#?}\nin:\n{}",
        ours.join("\n")
    );
}

/// Run-time changes through the real CLI on an `l7` VIP whose servers share one address on
/// different ports: the address alone is refused as ambiguous, `--port` names one server (a
/// drained one gets no requests), and `backend add --port` adds another server on that host.
#[test]
fn the_cli_tells_servers_on_one_host_apart_by_port() {
    let t = L7Topology::build(&L7Options {
        upstreams: 1,
        ..L7Options::default()
    });
    let (a, b, c) = (
        recorder(&t, 9000, 200),
        recorder(&t, 9001, 200),
        recorder(&t, 9002, 200),
    );
    let mut vips = vip("multi", IpAddr::V4(L7_VIP_V4), 80);
    vips += &a.backend_toml("default");
    vips += &b.backend_toml("default");
    let _agent = start_gateway(&t, &vips, vip4(80));
    let host = UPSTREAM_HOST;
    let send = |n: usize| {
        for _ in 0..n {
            let x = exchange(&t, vip4(80), &raw_get("api.test", "/x", &[]));
            assert_eq!(x.status(), 200, "{x:?}");
        }
    };
    send(4);
    assert!(a.count() > 0 && b.count() > 0, "both serve");

    let (code, out, err) = xlb(&t, &["backend", "drain", "multi", host]);
    assert_ne!(code, 0, "the address alone must be refused: {out}");
    assert!(
        err.contains("several backends at") && err.contains("give the port"),
        "{err}"
    );
    let (code, out, err) = xlb(&t, &["backend", "drain", "multi", host, "--port", "9001"]);
    assert_eq!(code, 0, "{out}{err}");
    let (before_a, before_b) = (a.count(), b.count());
    send(6);
    assert_eq!(b.count(), before_b, "the drained server got requests");
    assert_eq!(a.count(), before_a + 6);

    let (code, out, err) = xlb(&t, &["backend", "add", "multi", host, "--port", "9002"]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, list, _) = xlb(&t, &["backend", "list", "multi"]);
    assert_eq!(code, 0);
    for server in ["9000", "9001", "9002"] {
        assert!(list.contains(&format!("{host}:{server}")), "{list}");
    }
    send(6);
    assert!(c.count() > 0, "the added server gets requests");
    assert_eq!(b.count(), before_b);
}
