//! The schema of an `l7` VIP's gateway (issue 7): `[vip.gateway]` (listener settings: TLS,
//! HTTP/2, request limits and timeouts), `[[vip.pool]]` (upstream pools: balancing, protocol,
//! timeouts, retries, outlier ejection) and `[[vip.route]]` (matching, rewrites, auth, rate
//! limits). The VIP's `[[vip.backend]]` tables are the upstream servers; a backend's `pool`
//! names the pool it serves in and its `port` the port it listens on.
//!
//! Files the gateway reads (TLS certificate and key, API keys, JWKS) are named here as
//! [`FileRef`]s, not read: [`parse`](super::parse) stays pure, and the gateway loads them when
//! it is built (`xlb check`, agent start and every reload), reporting a bad file with the line
//! of the key that names it.

use std::path::PathBuf;
use std::time::Duration;

use http::{HeaderName, HeaderValue};

use crate::gateway::normalize::EncodedSlash;
use crate::gateway::route::Route;

/// Default of `vip.gateway.http2`.
pub const DEFAULT_HTTP2: bool = true;
/// Default of `vip.gateway.max_header_bytes`: the request line and headers together (nginx
/// accepts 4 × 8 KiB, Envoy 60 KiB).
pub const DEFAULT_MAX_HEADER_BYTES: u32 = 32 * 1024;
/// Valid `vip.gateway.max_header_bytes`.
pub const MAX_HEADER_BYTES_RANGE: std::ops::RangeInclusive<u32> = 1024..=1024 * 1024;
/// Default of `vip.gateway.max_headers` (Envoy's and HAProxy's default is 100).
pub const DEFAULT_MAX_HEADERS: u32 = 100;
/// Valid `vip.gateway.max_headers`.
pub const MAX_HEADERS_RANGE: std::ops::RangeInclusive<u32> = 8..=1000;
/// Default of `vip.gateway.max_body_bytes`: 10 MiB.
pub const DEFAULT_MAX_BODY_BYTES: u64 = 10 * 1024 * 1024;
/// Default of `vip.gateway.header_timeout_ms`: how long a client may take to send the request
/// line and headers (nginx's `client_header_timeout` is 60 s; 10 s defeats slow-header clients
/// sooner and is ample for any real client).
pub const DEFAULT_HEADER_TIMEOUT_MS: u32 = 10_000;
/// Default of `vip.gateway.idle_timeout_ms`: a client connection with no request in flight is
/// closed after this long (nginx's `keepalive_timeout` is 75 s).
pub const DEFAULT_CLIENT_IDLE_TIMEOUT_MS: u32 = 60_000;
/// Default of `vip.gateway.request_id_header`.
pub const DEFAULT_REQUEST_ID_HEADER: &str = "x-request-id";
/// The pool backends are in, and routes send to, when they name none.
pub const DEFAULT_POOL: &str = "default";
/// Default of `vip.pool.connect_timeout_ms`.
pub const DEFAULT_CONNECT_TIMEOUT_MS: u32 = 2_000;
/// Default of `vip.pool.request_timeout_ms`: from the request sent upstream to the response
/// headers back (Envoy's route timeout is 15 s).
pub const DEFAULT_REQUEST_TIMEOUT_MS: u32 = 15_000;
/// Default of `vip.pool.idle_timeout_ms`: an idle pooled upstream connection is closed after
/// this long.
pub const DEFAULT_UPSTREAM_IDLE_TIMEOUT_MS: u32 = 60_000;
/// Default of `vip.pool.retries`: extra attempts, on another server, of a request that could
/// not be sent (connect failure), for idempotent methods only.
pub const DEFAULT_RETRIES: u8 = 2;
/// Valid `vip.pool.retries`.
pub const RETRIES_RANGE: std::ops::RangeInclusive<u8> = 0..=5;
/// Default of `vip.pool.outlier_consecutive_5xx` (Envoy's default is 5).
pub const DEFAULT_OUTLIER_5XX: u32 = 5;
/// Default of `vip.pool.outlier_consecutive_failures`: connect failures and timeouts in a row.
pub const DEFAULT_OUTLIER_FAILURES: u32 = 3;
/// Default of `vip.pool.outlier_ejection_ms` (Envoy's base ejection time is 30 s).
pub const DEFAULT_OUTLIER_EJECTION_MS: u32 = 30_000;
/// Default of `vip.route.identity_header`.
pub const DEFAULT_IDENTITY_HEADER: &str = "x-xlb-identity";
/// Default of `vip.route.api_key_header`.
pub const DEFAULT_API_KEY_HEADER: &str = "x-api-key";
/// Most keys one rate limit tracks (`vip.route.rate_limit.max_keys` default): about 100 bytes
/// each.
pub const DEFAULT_RATE_LIMIT_KEYS: u32 = 100_000;

/// A file the gateway reads, with where the configuration names it, so that a problem inside
/// the file is reported as `xlb.toml:LINE: KEY: FILE:LINE: what`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRef {
    /// The file's absolute path.
    pub path: PathBuf,
    /// The configuration file that names it.
    pub config_file: String,
    /// The 1-based line of the key in the configuration file.
    pub line: usize,
    /// The key's full path, e.g. `vip[0].route[1].api_key_file`.
    pub key: String,
}

impl FileRef {
    /// `xlb.toml:LINE: KEY: message`, the form of every configuration error.
    pub fn error(&self, message: impl std::fmt::Display) -> String {
        format!(
            "{}:{}: {}: {message}",
            self.config_file, self.line, self.key
        )
    }
}

/// An l7 VIP's `[vip.gateway]` table with every default filled in, and its pools and routes.
#[derive(Debug, Clone, PartialEq)]
pub struct Gateway {
    /// `tls`: `[vip.gateway.tls]` with `cert_file` and `key_file` (PEM); with it the listener
    /// speaks TLS only, offering `h2` (when `http2`) and `http/1.1` by ALPN. Default: none
    /// (plain HTTP).
    pub tls: Option<Tls>,
    /// `http2`: accept HTTP/2: by ALPN over TLS, by prior knowledge (h2c) on plain listeners.
    /// Default true.
    pub http2: bool,
    /// `encoded_slash`: what a `%2F` or `%5C` in a path does: `"reject"` (400, default) or
    /// `"keep"` (left encoded, so it never splits a segment).
    pub encoded_slash: EncodedSlash,
    /// `max_header_bytes`: the largest request line plus headers; beyond it 431. Default 32768.
    pub max_header_bytes: u32,
    /// `max_headers`: the most request header fields; beyond it 431. Default 100.
    pub max_headers: u32,
    /// `max_body_bytes`: the largest request body; beyond it 413. Default 10485760.
    pub max_body_bytes: u64,
    /// `header_timeout_ms`: time a client has to send the request head. Default 10000 ms.
    pub header_timeout: Duration,
    /// `idle_timeout_ms`: an idle client connection is closed after this. Default 60000 ms.
    pub idle_timeout: Duration,
    /// `request_id_header`: the header carrying the request id to the upstream and back to the
    /// client; a client's own value is kept when it is a sane token, else replaced. Default
    /// `"x-request-id"`.
    pub request_id_header: HeaderName,
    /// The `[[vip.pool]]` tables, plus a `"default"` pool with default settings when backends
    /// or routes use it without a table. File order.
    pub pools: Vec<Pool>,
    /// The `[[vip.route]]` tables in file order; with none, one catch-all route to the
    /// `"default"` pool without authentication or limits.
    pub routes: Vec<GatewayRoute>,
}

impl Gateway {
    /// The gateway of an `l7` VIP that sets nothing: plain HTTP/1.1 and h2c, default limits,
    /// no pools but the default one, one catch-all route to it.
    pub fn defaults() -> Self {
        let ms = |v: u32| Duration::from_millis(u64::from(v));
        Self {
            tls: None,
            http2: DEFAULT_HTTP2,
            encoded_slash: EncodedSlash::default(),
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            max_headers: DEFAULT_MAX_HEADERS,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            header_timeout: ms(DEFAULT_HEADER_TIMEOUT_MS),
            idle_timeout: ms(DEFAULT_CLIENT_IDLE_TIMEOUT_MS),
            request_id_header: HeaderName::from_static(DEFAULT_REQUEST_ID_HEADER),
            pools: vec![Pool::with_defaults(DEFAULT_POOL)],
            routes: vec![GatewayRoute::catch_all()],
        }
    }

    /// The pool named `name`.
    pub fn pool(&self, name: &str) -> Option<&Pool> {
        self.pools.iter().find(|p| p.name == name)
    }
}

/// `[vip.gateway.tls]`: the certificate chain and private key (PEM files).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tls {
    /// `cert_file`: the certificate chain, leaf first. Required.
    pub cert_file: FileRef,
    /// `key_file`: the private key (PKCS#8, PKCS#1 or SEC1). Required.
    pub key_file: FileRef,
}

/// How a pool picks a server for a request (`vip.pool.balance`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Balance {
    /// `"round_robin"`: smooth weighted round robin (nginx's algorithm). Default.
    #[default]
    RoundRobin,
    /// `"least_request"`: two random servers (weighted), the one with fewer requests in flight.
    LeastRequest,
    /// `"hash"`: consistent hashing on `hash_header` or `hash_cookie`, for affinity; requests
    /// without it are spread by round robin.
    Hash(HashOn),
}

/// What a `"hash"` pool hashes on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashOn {
    /// `hash_header`: a request header's value.
    Header(HeaderName),
    /// `hash_cookie`: a cookie's value.
    Cookie(String),
}

/// The protocol spoken to a pool's servers (`vip.pool.protocol`), whatever the client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UpstreamProtocol {
    /// `"http1"`: HTTP/1.1 with keep-alive. Default.
    #[default]
    Http1,
    /// `"http2"`: HTTP/2 by prior knowledge (h2c), many requests over one connection.
    Http2,
}

/// One `[[vip.pool]]` table (or the implicit `"default"` pool), defaults filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    /// `name`: unique within the VIP, as VIP names are. Required.
    pub name: String,
    /// `balance` (+ `hash_header` / `hash_cookie`). Default `"round_robin"`.
    pub balance: Balance,
    /// `protocol`: `"http1"` or `"http2"`. Default `"http1"`.
    pub protocol: UpstreamProtocol,
    /// `connect_timeout_ms`: a connection not established by then is a connect failure (502,
    /// or a retry). Default 2000 ms.
    pub connect_timeout: Duration,
    /// `request_timeout_ms`: response headers not back by then give 504, and a response body
    /// quiet for this long is cut off (HTTP/1.1 upstreams, as nginx's `proxy_read_timeout`).
    /// Default 15000 ms.
    pub request_timeout: Duration,
    /// `idle_timeout_ms`: pooled idle connections are closed after this. Default 60000 ms.
    pub idle_timeout: Duration,
    /// `retries`: extra attempts of an idempotent request whose connection failed, each on
    /// another server when there is one; 0..=5. Default 2.
    pub retries: u8,
    /// `outlier_consecutive_5xx`: this many 5xx responses in a row eject a server; 0 disables.
    /// Default 5.
    pub outlier_consecutive_5xx: u32,
    /// `outlier_consecutive_failures`: this many connect failures or timeouts in a row eject a
    /// server; 0 disables. Default 3.
    pub outlier_consecutive_failures: u32,
    /// `outlier_ejection_ms`: how long an ejected server gets no requests. Default 30000 ms.
    pub outlier_ejection: Duration,
}

impl Pool {
    /// A pool named `name` with every default.
    pub fn with_defaults(name: &str) -> Self {
        let ms = |v: u32| Duration::from_millis(u64::from(v));
        Self {
            name: name.to_owned(),
            balance: Balance::default(),
            protocol: UpstreamProtocol::default(),
            connect_timeout: ms(DEFAULT_CONNECT_TIMEOUT_MS),
            request_timeout: ms(DEFAULT_REQUEST_TIMEOUT_MS),
            idle_timeout: ms(DEFAULT_UPSTREAM_IDLE_TIMEOUT_MS),
            retries: DEFAULT_RETRIES,
            outlier_consecutive_5xx: DEFAULT_OUTLIER_5XX,
            outlier_consecutive_failures: DEFAULT_OUTLIER_FAILURES,
            outlier_ejection: ms(DEFAULT_OUTLIER_EJECTION_MS),
        }
    }
}

/// How a route authenticates (`vip.route.auth`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum RouteAuth {
    /// `"none"`. Default.
    #[default]
    None,
    /// `"api_key"`: a key from `api_key_file` (lines `name sha256:<hex>`), presented in
    /// `api_key_header` (default `x-api-key`) or, when set, the query parameter
    /// `api_key_query`.
    ApiKey {
        /// `api_key_file`. Required.
        file: FileRef,
        /// `api_key_header`. Default `"x-api-key"`.
        header: HeaderName,
        /// `api_key_query`: also accept the key in this query parameter (removed before the
        /// request goes upstream). Default: none.
        query: Option<String>,
    },
    /// `"jwt"`: a bearer token signed by a key of `jwks_file` (HS256, RS256, ES256).
    Jwt {
        /// `jwks_file`. Required.
        jwks_file: FileRef,
        /// `jwt_issuer`: the required `iss`. Default: not checked.
        issuer: Option<String>,
        /// `jwt_audience`: the required `aud` (one of a list). Default: not checked.
        audience: Option<String>,
    },
}

/// What a rate limit counts requests by (`vip.route.rate_limit.key`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitKey {
    /// `"client_ip"`: the connecting client's address.
    ClientIp,
    /// `"api_key"`: the authenticated key's name (routes with `auth = "api_key"`).
    ApiKey,
    /// `"jwt_subject"`: the token's `sub` (routes with `auth = "jwt"`).
    JwtSubject,
    /// `"header:NAME"`: a request header's value; requests without it share one bucket.
    Header(HeaderName),
}

/// `[vip.route.rate_limit]`: a token bucket per key.
#[derive(Debug, Clone, PartialEq)]
pub struct RateLimit {
    /// `rate`: requests per second refilled (above 0, at most 1000000). Required.
    pub rate: f64,
    /// `burst`: bucket size, requests allowed at once. Default: `rate` rounded up, at least 1.
    pub burst: u32,
    /// `key`: what requests are counted by. Default `"client_ip"`.
    pub key: LimitKey,
    /// `max_keys`: the most keys tracked (the least recently refilled are forgotten first).
    /// Default 100000.
    pub max_keys: u32,
}

/// One `[[vip.route]]` table, defaults filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct GatewayRoute {
    /// What the route matches: `name` (required), `host` (exact or `*.suffix`; default any),
    /// `path` (exact) or `path_prefix` (by segments; default `/`), `methods` (default all),
    /// `headers` (a table: name = value to require, or name = true for presence).
    pub matcher: Route,
    /// `pool`: the pool requests go to. Default `"default"`.
    pub pool: String,
    /// `strip_prefix`: remove the matched `path_prefix` before forwarding (`/api/users` on
    /// prefix `/api` goes up as `/users`). Default false.
    pub strip_prefix: bool,
    /// `add_headers`: request headers set (replacing a client's) before forwarding.
    /// Default: none.
    pub add_headers: Vec<(HeaderName, HeaderValue)>,
    /// `remove_headers`: request headers removed before forwarding. Default: none.
    pub remove_headers: Vec<HeaderName>,
    /// `auth` and its keys. Default `"none"`.
    pub auth: RouteAuth,
    /// `identity_header`: carries the authenticated identity (key name or JWT subject)
    /// upstream; any copy the client sent is removed on every route of the VIP. Default
    /// `"x-xlb-identity"`.
    pub identity_header: HeaderName,
    /// `rate_limit`. Default: none.
    pub rate_limit: Option<RateLimit>,
}

impl GatewayRoute {
    /// The route used when an l7 VIP has no `[[vip.route]]`: every request to the default
    /// pool, without authentication or limits.
    pub fn catch_all() -> Self {
        Self {
            matcher: Route {
                name: "default".to_owned(),
                host: crate::gateway::route::HostMatch::Any,
                path: crate::gateway::route::PathMatch::Prefix("/".to_owned()),
                methods: None,
                headers: Vec::new(),
            },
            pool: DEFAULT_POOL.to_owned(),
            strip_prefix: false,
            add_headers: Vec::new(),
            remove_headers: Vec::new(),
            auth: RouteAuth::None,
            identity_header: HeaderName::from_static(DEFAULT_IDENTITY_HEADER),
            rate_limit: None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Reading `[vip.gateway]`, `[[vip.pool]]` and `[[vip.route]]`
// ---------------------------------------------------------------------------------------------

use std::ops::Range;

use http::Method;
use toml::Spanned;
use toml::de::DeValue;

use super::{
    Bad, ConfigErrorKind, Ctx, Field, Loc, Presence, TableRef, describe, parse_absolute_path,
    parse_name, range_of,
};
use crate::gateway::route::{HeaderMatch, HostMatch, PathMatch, RouteError, RouteTable};

const GATEWAY_KEYS: &[&str] = &[
    "tls",
    "http2",
    "encoded_slash",
    "max_header_bytes",
    "max_headers",
    "max_body_bytes",
    "header_timeout_ms",
    "idle_timeout_ms",
    "request_id_header",
];
const TLS_KEYS: &[&str] = &["cert_file", "key_file"];
const POOL_KEYS: &[&str] = &[
    "name",
    "balance",
    "hash_header",
    "hash_cookie",
    "protocol",
    "connect_timeout_ms",
    "request_timeout_ms",
    "idle_timeout_ms",
    "retries",
    "outlier_consecutive_5xx",
    "outlier_consecutive_failures",
    "outlier_ejection_ms",
];
const ROUTE_KEYS: &[&str] = &[
    "name",
    "host",
    "path",
    "path_prefix",
    "methods",
    "headers",
    "pool",
    "strip_prefix",
    "add_headers",
    "remove_headers",
    "auth",
    "api_key_file",
    "api_key_header",
    "api_key_query",
    "jwks_file",
    "jwt_issuer",
    "jwt_audience",
    "identity_header",
    "rate_limit",
];
const RATE_LIMIT_KEYS: &[&str] = &["rate", "burst", "key", "max_keys"];

/// Valid `vip.gateway.max_body_bytes`: up to 1 TiB.
pub const MAX_BODY_BYTES_RANGE: std::ops::RangeInclusive<u64> = 0..=(1 << 40);
/// Valid `vip.gateway.header_timeout_ms` and the pools' `connect_timeout_ms`.
pub const SHORT_TIMEOUT_MS_RANGE: std::ops::RangeInclusive<u32> = 10..=600_000;
/// Valid `vip.gateway.idle_timeout_ms`, `vip.pool.request_timeout_ms`, `idle_timeout_ms` and
/// `outlier_ejection_ms`: up to one day.
pub const LONG_TIMEOUT_MS_RANGE: std::ops::RangeInclusive<u32> = 10..=86_400_000;
/// Valid outlier thresholds (0 disables).
pub const OUTLIER_RANGE: std::ops::RangeInclusive<u32> = 0..=10_000;
/// Valid `vip.route.rate_limit.rate`, requests per second.
pub const RATE_RANGE: std::ops::RangeInclusive<f64> = 0.001..=1_000_000.0;
/// Valid `vip.route.rate_limit.burst`.
pub const BURST_RANGE: std::ops::RangeInclusive<u32> = 1..=1_000_000;
/// Valid `vip.route.rate_limit.max_keys`.
pub const RATE_LIMIT_KEYS_RANGE: std::ops::RangeInclusive<u32> = 1..=10_000_000;

/// Headers a route may not set or remove: the gateway owns framing, the connection and the
/// forwarding headers, and a route that changed them could desynchronise the upstream or spoof
/// the client's identity.
const RESERVED_HEADERS: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "upgrade",
    "te",
    "trailer",
    "proxy-connection",
    "x-forwarded-for",
    "x-forwarded-proto",
    "forwarded",
];

/// An l7 VIP's gateway tables as read: the built [`Gateway`] (`None` when any of its keys was
/// invalid, already reported), and where the tables were written, for the rules that need the
/// VIP's mode and backends.
pub(super) struct GatewayDraft {
    /// The first of `[vip.gateway]`, `[[vip.pool]]`, `[[vip.route]]` written, if any (its span
    /// and key): refused on a VIP that is not `l7`.
    pub written: Option<(Range<usize>, String)>,
    /// The pools' names, for the backends' `pool` keys.
    pub pool_names: Vec<String>,
    /// The result.
    pub gateway: Option<Gateway>,
}

/// Reads the gateway tables of the VIP table `t`.
pub(super) fn read(cx: &mut Ctx<'_>, t: &TableRef<'_, '_>) -> GatewayDraft {
    let written = ["gateway", "pool", "route"].iter().find_map(|name| {
        t.entries
            .iter()
            .find(|(k, _)| k.get_ref().as_ref() == *name)
            .map(|(k, _)| (k.span(), t.key(name)))
    });
    let mark = cx.errors.len();
    let mut gateway = Gateway::defaults();
    if let Some(value) = t.get("gateway") {
        read_settings(cx, value, t.key("gateway"), &mut gateway);
    }
    let mut pools: Vec<Pool> = Vec::new();
    for table in cx
        .tables(t, "pool", POOL_KEYS, "[[vip.pool]]")
        .into_iter()
        .flatten()
    {
        if let Some(pool) = read_pool(cx, &table) {
            if pools.iter().any(|p| p.name == pool.name) {
                cx.report(
                    ConfigErrorKind::Duplicate,
                    &table.span,
                    &table.key("name"),
                    format!(
                        "pool {:?} is defined twice; pool names are unique per VIP",
                        pool.name
                    ),
                );
            }
            pools.push(pool);
        }
    }
    if !pools.iter().any(|p| p.name == DEFAULT_POOL) {
        pools.insert(0, Pool::with_defaults(DEFAULT_POOL));
    }
    let pool_names: Vec<String> = pools.iter().map(|p| p.name.clone()).collect();
    gateway.pools = pools;
    let route_tables = cx.tables(t, "route", ROUTE_KEYS, "[[vip.route]]");
    if !route_tables.is_empty() {
        let mut routes = Vec::new();
        let mut spans = Vec::new();
        for table in route_tables.into_iter().flatten() {
            if let Some(route) = read_route(cx, &table, &pool_names) {
                spans.push((table.span.clone(), table.path.clone()));
                routes.push(route);
            }
        }
        let matchers = routes.iter().map(|r| r.matcher.clone()).collect();
        if let Err(e) = RouteTable::new(matchers) {
            let index = match &e {
                RouteError::InvalidHost { index, .. }
                | RouteError::InvalidPath { index, .. }
                | RouteError::EmptyMethods { index, .. }
                | RouteError::Duplicate { index, .. } => *index,
            };
            if let Some((span, path)) = spans.get(index) {
                let message = match &e {
                    RouteError::Duplicate { earlier, .. } => format!(
                        "this route has the same host, path, methods and headers as {} and can \
                         never match; change or remove one",
                        spans
                            .get(*earlier)
                            .map_or("another route", |(_, p)| p.as_str())
                    ),
                    other => other.to_string(),
                };
                cx.report(ConfigErrorKind::Conflict, span, path, message);
            }
        }
        gateway.routes = routes;
    }
    GatewayDraft {
        written,
        pool_names,
        gateway: (cx.errors.len() == mark).then_some(gateway),
    }
}

fn ms(v: u32) -> Duration {
    Duration::from_millis(u64::from(v))
}

/// A boolean key.
fn boolean(cx: &mut Ctx<'_>, t: &TableRef<'_, '_>, name: &str) -> Field<bool> {
    let Some(value) = t.get(name) else {
        return Field::Absent;
    };
    let key = t.key(name);
    match value.get_ref() {
        DeValue::Boolean(b) => Field::Valid(Loc {
            value: *b,
            span: value.span(),
            key,
        }),
        other => {
            let message = format!("expected true or false, found {}", describe(other));
            cx.report(ConfigErrorKind::WrongType, &value.span(), &key, message);
            Field::Invalid
        }
    }
}

/// A header name as written in the file: a valid field name, compared lowercase.
fn parse_header_name(s: &str) -> Result<HeaderName, Bad> {
    if s.starts_with(':') {
        return Err(Bad::value(format!(
            "{s:?} is an HTTP/2 pseudo-header; expected a header name such as \"x-tenant\""
        )));
    }
    HeaderName::from_bytes(s.as_bytes()).map_err(|_| {
        Bad::value(format!(
            "{s:?} is not a valid header name; expected letters, digits and !#$%&'*+-.^_`|~"
        ))
    })
}

/// A header value for `headers` and `add_headers`: visible ASCII and spaces, no line breaks.
fn parse_header_value(s: &str) -> Result<HeaderValue, Bad> {
    if s.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
        return Err(Bad::value("a header value cannot contain CR, LF or NUL"));
    }
    HeaderValue::from_str(s).map_err(|_| {
        Bad::value(format!(
            "{s:?} is not a valid header value; expected visible ASCII characters and spaces"
        ))
    })
}

/// A header name a route may set or remove (not one of [`RESERVED_HEADERS`]).
fn parse_route_header(s: &str) -> Result<HeaderName, Bad> {
    let name = parse_header_name(s)?;
    if RESERVED_HEADERS.contains(&name.as_str()) {
        return Err(Bad::value(format!(
            "{:?} is set by the gateway itself (framing, connection or forwarding); a route \
             cannot change it",
            name.as_str()
        )));
    }
    Ok(name)
}

/// A key naming a file the gateway reads.
fn file_ref(
    cx: &mut Ctx<'_>,
    t: &TableRef<'_, '_>,
    name: &str,
    presence: Presence,
) -> Field<FileRef> {
    let field = cx.parsed(
        t,
        name,
        presence,
        "an absolute path to a file",
        parse_absolute_path,
    );
    match field {
        Field::Valid(loc) => {
            let file = FileRef {
                path: loc.value,
                config_file: cx.file.to_owned(),
                line: cx.line_of(loc.span.start),
                key: loc.key.clone(),
            };
            Field::Valid(Loc {
                value: file,
                span: loc.span,
                key: loc.key,
            })
        }
        Field::Absent => Field::Absent,
        Field::Invalid => Field::Invalid,
    }
}

fn read_settings(cx: &mut Ctx<'_>, value: &Spanned<DeValue<'_>>, path: String, g: &mut Gateway) {
    use Presence::{Optional, Required};
    let Some(t) = cx.table(value, path, GATEWAY_KEYS, "a table of gateway settings") else {
        return;
    };
    if let Some(value) = t.get("tls")
        && let Some(tls) = cx.table(
            value,
            t.key("tls"),
            TLS_KEYS,
            "a table with cert_file and key_file",
        )
    {
        let cert = file_ref(cx, &tls, "cert_file", Required);
        let key = file_ref(cx, &tls, "key_file", Required);
        if let (Some(cert_file), Some(key_file)) = (cert.value(), key.value()) {
            g.tls = Some(Tls {
                cert_file: cert_file.clone(),
                key_file: key_file.clone(),
            });
        }
    }
    if let Some(v) = boolean(cx, &t, "http2").value() {
        g.http2 = *v;
    }
    let slash = cx.parsed(
        &t,
        "encoded_slash",
        Optional,
        "\"reject\" or \"keep\"",
        |s| match s {
            "reject" => Ok(EncodedSlash::Reject),
            "keep" => Ok(EncodedSlash::Keep),
            other => Err(Bad::value(format!(
                "{other:?} is not a choice; expected \"reject\" or \"keep\""
            ))),
        },
    );
    if let Some(v) = slash.value() {
        g.encoded_slash = *v;
    }
    if let Some(v) = cx
        .int::<u32>(
            &t,
            "max_header_bytes",
            Optional,
            range_of(MAX_HEADER_BYTES_RANGE),
        )
        .value()
    {
        g.max_header_bytes = *v;
    }
    if let Some(v) = cx
        .int::<u32>(&t, "max_headers", Optional, range_of(MAX_HEADERS_RANGE))
        .value()
    {
        g.max_headers = *v;
    }
    let body = i128::from(*MAX_BODY_BYTES_RANGE.start())..=i128::from(*MAX_BODY_BYTES_RANGE.end());
    if let Some(v) = cx.int::<u64>(&t, "max_body_bytes", Optional, body).value() {
        g.max_body_bytes = *v;
    }
    if let Some(v) = cx
        .int::<u32>(
            &t,
            "header_timeout_ms",
            Optional,
            range_of(SHORT_TIMEOUT_MS_RANGE),
        )
        .value()
    {
        g.header_timeout = ms(*v);
    }
    if let Some(v) = cx
        .int::<u32>(
            &t,
            "idle_timeout_ms",
            Optional,
            range_of(LONG_TIMEOUT_MS_RANGE),
        )
        .value()
    {
        g.idle_timeout = ms(*v);
    }
    let id = cx.parsed(
        &t,
        "request_id_header",
        Optional,
        "a header name such as \"x-request-id\"",
        parse_route_header,
    );
    if let Some(v) = id.value() {
        g.request_id_header = v.clone();
    }
}

fn read_pool(cx: &mut Ctx<'_>, t: &TableRef<'_, '_>) -> Option<Pool> {
    use Presence::{Optional, Required};
    let mark = cx.errors.len();
    let name = cx.parsed(t, "name", Required, super::NAME_EXPECTED, parse_name);
    let mut pool = Pool::with_defaults(name.value().map_or("", String::as_str));
    let balance = cx.parsed(
        t,
        "balance",
        Optional,
        "\"round_robin\", \"least_request\" or \"hash\"",
        |s| match s {
            "round_robin" | "least_request" | "hash" => Ok(s.to_owned()),
            other => Err(Bad::value(format!(
                "{other:?} is not a choice; expected \"round_robin\", \"least_request\" or \"hash\""
            ))),
        },
    );
    let hash_header = cx.parsed(
        t,
        "hash_header",
        Optional,
        "a header name",
        parse_header_name,
    );
    let hash_cookie = cx.parsed(t, "hash_cookie", Optional, "a cookie name", |s| {
        if s.is_empty()
            || s.bytes()
                .any(|b| !b.is_ascii_graphic() || b"()<>@,;:\\\"/[]?={}".contains(&b))
        {
            Err(Bad::value(format!("{s:?} is not a valid cookie name")))
        } else {
            Ok(s.to_owned())
        }
    });
    match balance.value().map(String::as_str) {
        Some("hash") => match (hash_header.value(), hash_cookie.value()) {
            (Some(h), None) => pool.balance = Balance::Hash(HashOn::Header(h.clone())),
            (None, Some(c)) => pool.balance = Balance::Hash(HashOn::Cookie(c.clone())),
            (Some(_), Some(_)) => {
                if let Some(loc) = hash_cookie.loc() {
                    cx.report(
                        ConfigErrorKind::Conflict,
                        &loc.span,
                        &loc.key,
                        "set one of hash_header and hash_cookie, not both",
                    );
                }
            }
            (None, None) => {
                if hash_header.is_absent() && hash_cookie.is_absent() {
                    let loc = balance.loc().expect("balance was read");
                    cx.report(
                        ConfigErrorKind::MissingKey,
                        &loc.span,
                        &loc.key,
                        "balance = \"hash\" needs hash_header or hash_cookie: what to hash for \
                         affinity",
                    );
                }
            }
        },
        other => {
            if other == Some("least_request") {
                pool.balance = Balance::LeastRequest;
            }
            for field in [span_of(&hash_header), span_of(&hash_cookie)]
                .into_iter()
                .flatten()
            {
                cx.report(
                    ConfigErrorKind::Conflict,
                    &field.0,
                    &field.1,
                    "only a pool with balance = \"hash\" hashes on a header or cookie",
                );
            }
        }
    }
    let protocol = cx.parsed(
        t,
        "protocol",
        Optional,
        "\"http1\" or \"http2\"",
        |s| match s {
            "http1" => Ok(UpstreamProtocol::Http1),
            "http2" => Ok(UpstreamProtocol::Http2),
            other => Err(Bad::value(format!(
                "{other:?} is not a choice; expected \"http1\" or \"http2\""
            ))),
        },
    );
    if let Some(p) = protocol.value() {
        pool.protocol = *p;
    }
    let short = range_of(SHORT_TIMEOUT_MS_RANGE);
    let long = range_of(LONG_TIMEOUT_MS_RANGE);
    if let Some(v) = cx
        .int::<u32>(t, "connect_timeout_ms", Optional, short)
        .value()
    {
        pool.connect_timeout = ms(*v);
    }
    if let Some(v) = cx
        .int::<u32>(t, "request_timeout_ms", Optional, long.clone())
        .value()
    {
        pool.request_timeout = ms(*v);
    }
    if let Some(v) = cx
        .int::<u32>(t, "idle_timeout_ms", Optional, long.clone())
        .value()
    {
        pool.idle_timeout = ms(*v);
    }
    let retries = i128::from(*RETRIES_RANGE.start())..=i128::from(*RETRIES_RANGE.end());
    if let Some(v) = cx.int::<u8>(t, "retries", Optional, retries).value() {
        pool.retries = *v;
    }
    let outlier = range_of(OUTLIER_RANGE);
    if let Some(v) = cx
        .int::<u32>(t, "outlier_consecutive_5xx", Optional, outlier.clone())
        .value()
    {
        pool.outlier_consecutive_5xx = *v;
    }
    if let Some(v) = cx
        .int::<u32>(t, "outlier_consecutive_failures", Optional, outlier)
        .value()
    {
        pool.outlier_consecutive_failures = *v;
    }
    if let Some(v) = cx
        .int::<u32>(t, "outlier_ejection_ms", Optional, long)
        .value()
    {
        pool.outlier_ejection = ms(*v);
    }
    (cx.errors.len() == mark).then_some(pool)
}

fn span_of<T>(field: &Field<T>) -> Option<(Range<usize>, String)> {
    field.loc().map(|l| (l.span.clone(), l.key.clone()))
}

/// `methods = ["GET", "POST"]`: standard or extension method tokens, each once.
fn read_methods(cx: &mut Ctx<'_>, t: &TableRef<'_, '_>) -> Field<Vec<Method>> {
    let Some(value) = t.get("methods") else {
        return Field::Absent;
    };
    let key = t.key("methods");
    let DeValue::Array(items) = value.get_ref() else {
        let message = format!(
            "expected a list of methods such as [\"GET\", \"HEAD\"], found {}",
            describe(value.get_ref())
        );
        cx.report(ConfigErrorKind::WrongType, &value.span(), &key, message);
        return Field::Invalid;
    };
    let mut out: Vec<Method> = Vec::new();
    let mut valid = true;
    for (i, item) in items.iter().enumerate() {
        let item_key = format!("{key}[{i}]");
        let DeValue::String(s) = item.get_ref() else {
            let message = format!("expected a method name, found {}", describe(item.get_ref()));
            cx.report(ConfigErrorKind::WrongType, &item.span(), &item_key, message);
            valid = false;
            continue;
        };
        // Methods are case-sensitive (RFC 9110 9.1); a lowercase "get" is a different,
        // almost certainly unintended, method.
        let is_token = !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        match Method::from_bytes(s.as_bytes()) {
            Ok(m) if is_token => {
                if out.contains(&m) {
                    cx.report(
                        ConfigErrorKind::Duplicate,
                        &item.span(),
                        &item_key,
                        format!("{s} is listed twice"),
                    );
                    valid = false;
                } else {
                    out.push(m);
                }
            }
            _ => {
                cx.report(
                    ConfigErrorKind::InvalidValue,
                    &item.span(),
                    &item_key,
                    format!("{s:?} is not a method; expected an uppercase token such as \"GET\""),
                );
                valid = false;
            }
        }
    }
    if out.is_empty() && valid {
        cx.report(
            ConfigErrorKind::InvalidValue,
            &value.span(),
            &key,
            "an empty list matches nothing; leave `methods` out to accept every method",
        );
        valid = false;
    }
    if valid {
        Field::Valid(Loc {
            value: out,
            span: value.span(),
            key,
        })
    } else {
        Field::Invalid
    }
}

/// A table of header name -> value entries (`headers`, `add_headers`). `allow_presence`: a
/// value of `true` means "present with any value" (route matching only).
fn read_header_table(
    cx: &mut Ctx<'_>,
    t: &TableRef<'_, '_>,
    name: &str,
    allow_presence: bool,
    parse_name: fn(&str) -> Result<HeaderName, Bad>,
) -> Option<Vec<(HeaderName, Option<HeaderValue>)>> {
    let Some(value) = t.get(name) else {
        return Some(Vec::new());
    };
    let key = t.key(name);
    let DeValue::Table(entries) = value.get_ref() else {
        let example = if allow_presence {
            "{ \"x-canary\" = \"1\", \"x-debug\" = true }"
        } else {
            "{ \"x-via\" = \"xlb\" }"
        };
        let message = format!(
            "expected a table of header names and values such as {example}, found {}",
            describe(value.get_ref())
        );
        cx.report(ConfigErrorKind::WrongType, &value.span(), &key, message);
        return None;
    };
    let mut out: Vec<(HeaderName, Option<HeaderValue>)> = Vec::new();
    let mut valid = true;
    for (k, v) in entries.iter() {
        let entry_key = format!("{key}.{}", k.get_ref());
        let header = match parse_name(k.get_ref()) {
            Ok(h) => h,
            Err(bad) => {
                cx.report(bad.kind, &k.span(), &entry_key, bad.message);
                valid = false;
                continue;
            }
        };
        if out.iter().any(|(h, _)| *h == header) {
            cx.report(
                ConfigErrorKind::Duplicate,
                &k.span(),
                &entry_key,
                "the same header (names are case-insensitive) is listed twice",
            );
            valid = false;
            continue;
        }
        match v.get_ref() {
            DeValue::String(s) => match parse_header_value(s) {
                Ok(hv) => out.push((header, Some(hv))),
                Err(bad) => {
                    cx.report(bad.kind, &v.span(), &entry_key, bad.message);
                    valid = false;
                }
            },
            DeValue::Boolean(true) if allow_presence => out.push((header, None)),
            other => {
                let expected = if allow_presence {
                    "a value to require, or true to require presence"
                } else {
                    "the value to set, a string"
                };
                let message = format!("expected {expected}, found {}", describe(other));
                cx.report(ConfigErrorKind::WrongType, &v.span(), &entry_key, message);
                valid = false;
            }
        }
    }
    valid.then_some(out)
}

/// `remove_headers = ["x-internal"]`.
fn read_header_list(cx: &mut Ctx<'_>, t: &TableRef<'_, '_>, name: &str) -> Option<Vec<HeaderName>> {
    let Some(value) = t.get(name) else {
        return Some(Vec::new());
    };
    let key = t.key(name);
    let DeValue::Array(items) = value.get_ref() else {
        let message = format!(
            "expected a list of header names such as [\"x-internal\"], found {}",
            describe(value.get_ref())
        );
        cx.report(ConfigErrorKind::WrongType, &value.span(), &key, message);
        return None;
    };
    let mut out = Vec::new();
    let mut valid = true;
    for (i, item) in items.iter().enumerate() {
        let item_key = format!("{key}[{i}]");
        let parsed = match item.get_ref() {
            DeValue::String(s) => parse_route_header(s),
            other => Err(Bad {
                kind: ConfigErrorKind::WrongType,
                message: format!("expected a header name, found {}", describe(other)),
            }),
        };
        match parsed {
            Ok(h) => out.push(h),
            Err(bad) => {
                cx.report(bad.kind, &item.span(), &item_key, bad.message);
                valid = false;
            }
        }
    }
    valid.then_some(out)
}

fn parse_host(s: &str) -> Result<HostMatch, Bad> {
    if s == "*" {
        return Ok(HostMatch::Any);
    }
    match s.strip_prefix("*.") {
        Some(domain) => Ok(HostMatch::Wildcard(domain.to_owned())),
        None => Ok(HostMatch::Exact(s.to_owned())),
    }
}

fn read_route(cx: &mut Ctx<'_>, t: &TableRef<'_, '_>, pools: &[String]) -> Option<GatewayRoute> {
    use Presence::{Optional, Required};
    let mark = cx.errors.len();
    let name = cx.parsed(t, "name", Required, super::NAME_EXPECTED, parse_name);
    let host = cx.parsed(
        t,
        "host",
        Optional,
        "a host name such as \"api.example.com\" or \"*.example.com\"",
        parse_host,
    );
    let exact = cx.string(t, "path", Optional, "a path such as \"/login\"");
    let prefix = cx.string(t, "path_prefix", Optional, "a path prefix such as \"/api\"");
    let path = match (exact.value(), prefix.value()) {
        (Some(_), Some(_)) => {
            let loc = prefix.loc().expect("read");
            cx.report(
                ConfigErrorKind::Conflict,
                &loc.span,
                &loc.key,
                "set one of path (exact) and path_prefix, not both",
            );
            None
        }
        (Some(p), None) => Some(PathMatch::Exact(p.clone())),
        (None, Some(p)) => Some(PathMatch::Prefix(p.clone())),
        (None, None) => Some(PathMatch::Prefix("/".to_owned())),
    };
    let methods = read_methods(cx, t);
    let headers = read_header_table(cx, t, "headers", true, parse_header_name);
    let pool = cx.parsed(t, "pool", Optional, super::NAME_EXPECTED, parse_name);
    if let Some(loc) = pool.loc()
        && !pools.contains(&loc.value)
    {
        cx.report(
            ConfigErrorKind::InvalidValue,
            &loc.span,
            &loc.key,
            format!(
                "no pool {:?} in this VIP; pools here: {}",
                loc.value,
                pools
                    .iter()
                    .map(|p| format!("{p:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        );
    }
    let strip = boolean(cx, t, "strip_prefix");
    if let Some(loc) = strip.loc()
        && loc.value
        && prefix.loc().is_none()
    {
        cx.report(
            ConfigErrorKind::Conflict,
            &loc.span,
            &loc.key,
            "strip_prefix needs a path_prefix to strip",
        );
    }
    let add = read_header_table(cx, t, "add_headers", false, parse_route_header);
    let remove = read_header_list(cx, t, "remove_headers");
    let identity = cx.parsed(
        t,
        "identity_header",
        Optional,
        "a header name such as \"x-xlb-identity\"",
        parse_route_header,
    );
    let auth_kind = cx.parsed(
        t,
        "auth",
        Optional,
        "\"none\", \"api_key\" or \"jwt\"",
        |s| match s {
            "none" | "api_key" | "jwt" => Ok(s.to_owned()),
            other => Err(Bad::value(format!(
                "{other:?} is not a choice; expected \"none\", \"api_key\" or \"jwt\""
            ))),
        },
    );
    let kind = auth_kind.value().map_or("none", String::as_str).to_owned();
    let key_file = file_ref(
        cx,
        t,
        "api_key_file",
        if kind == "api_key" {
            Required
        } else {
            Optional
        },
    );
    let key_header = cx.parsed(
        t,
        "api_key_header",
        Optional,
        "a header name",
        parse_route_header,
    );
    let key_query = cx.parsed(t, "api_key_query", Optional, "a query parameter name", |s| {
        if s.is_empty() || s.bytes().any(|b| !(b.is_ascii_alphanumeric() || b"-_.~".contains(&b))) {
            Err(Bad::value(format!(
                "{s:?} is not a plain query parameter name; expected letters, digits, -, _, ., ~"
            )))
        } else {
            Ok(s.to_owned())
        }
    });
    let jwks = file_ref(
        cx,
        t,
        "jwks_file",
        if kind == "jwt" { Required } else { Optional },
    );
    let issuer = cx.string(t, "jwt_issuer", Optional, "the required iss, a string");
    let audience = cx.string(t, "jwt_audience", Optional, "the required aud, a string");
    let foreign: Vec<(Range<usize>, String, &str)> = match kind.as_str() {
        "api_key" => [span_of(&jwks), span_of(&issuer), span_of(&audience)]
            .into_iter()
            .flatten()
            .map(|(s, k)| (s, k, "api_key"))
            .collect(),
        "jwt" => [
            span_of(&key_file),
            span_of(&key_header),
            span_of(&key_query),
        ]
        .into_iter()
        .flatten()
        .map(|(s, k)| (s, k, "jwt"))
        .collect(),
        _ => [
            span_of(&key_file),
            span_of(&key_header),
            span_of(&key_query),
            span_of(&jwks),
            span_of(&issuer),
            span_of(&audience),
        ]
        .into_iter()
        .flatten()
        .map(|(s, k)| (s, k, "none"))
        .collect(),
    };
    for (span, key, kind) in foreign {
        cx.report(
            ConfigErrorKind::Conflict,
            &span,
            &key,
            format!(
                "this key does not apply to auth = {kind:?}; set auth to the scheme it belongs to"
            ),
        );
    }
    let auth = match kind.as_str() {
        "api_key" => key_file.value().map(|file| RouteAuth::ApiKey {
            file: file.clone(),
            header: key_header
                .value()
                .cloned()
                .unwrap_or(HeaderName::from_static(DEFAULT_API_KEY_HEADER)),
            query: key_query.value().cloned(),
        }),
        "jwt" => jwks.value().map(|file| RouteAuth::Jwt {
            jwks_file: file.clone(),
            issuer: issuer.value().cloned(),
            audience: audience.value().cloned(),
        }),
        _ => Some(RouteAuth::None),
    };
    let rate_limit = match t.get("rate_limit") {
        Some(value) => read_rate_limit(cx, value, t.key("rate_limit"), &kind),
        None => None,
    };
    if cx.errors.len() != mark {
        return None;
    }
    let headers = headers?
        .into_iter()
        .map(|(name, value)| match value {
            Some(v) => HeaderMatch::Equals(name, v),
            None => HeaderMatch::Present(name),
        })
        .collect();
    Some(GatewayRoute {
        matcher: Route {
            name: name.value()?.clone(),
            host: host.or(HostMatch::Any)?,
            path: path?,
            methods: methods.value().cloned(),
            headers,
        },
        pool: pool.or(DEFAULT_POOL.to_owned())?,
        strip_prefix: strip.or(false)?,
        add_headers: add?
            .into_iter()
            .filter_map(|(n, v)| Some((n, v?)))
            .collect(),
        remove_headers: remove?,
        auth: auth?,
        identity_header: identity.or(HeaderName::from_static(DEFAULT_IDENTITY_HEADER))?,
        rate_limit,
    })
}

fn read_rate_limit(
    cx: &mut Ctx<'_>,
    value: &Spanned<DeValue<'_>>,
    path: String,
    auth: &str,
) -> Option<RateLimit> {
    use Presence::Optional;
    let t = cx.table(
        value,
        path,
        RATE_LIMIT_KEYS,
        "a table with rate, burst and key",
    )?;
    let mark = cx.errors.len();
    let rate = cx.number(
        &t,
        "rate",
        |n| RATE_RANGE.contains(&n),
        "requests per second, a number",
        "0.001..=1000000",
    );
    if rate.is_absent() {
        cx.missing(&t, "rate", "requests per second, a number");
    }
    let burst = cx.int::<u32>(&t, "burst", Optional, range_of(BURST_RANGE));
    let key = cx.parsed(
        &t,
        "key",
        Optional,
        "\"client_ip\", \"api_key\", \"jwt_subject\" or \"header:NAME\"",
        |s| match s {
            "client_ip" => Ok(LimitKey::ClientIp),
            "api_key" => Ok(LimitKey::ApiKey),
            "jwt_subject" => Ok(LimitKey::JwtSubject),
            other => match other.strip_prefix("header:") {
                Some(h) => parse_header_name(h).map(LimitKey::Header),
                None => Err(Bad::value(format!(
                    "{other:?} is not a choice; expected \"client_ip\", \"api_key\", \
                     \"jwt_subject\" or \"header:NAME\""
                ))),
            },
        },
    );
    let needs = match key.value() {
        Some(LimitKey::ApiKey) => Some("api_key"),
        Some(LimitKey::JwtSubject) => Some("jwt"),
        _ => None,
    };
    if let (Some(needs), Some(loc)) = (needs, key.loc())
        && needs != auth
    {
        cx.report(
            ConfigErrorKind::Conflict,
            &loc.span,
            &loc.key,
            format!("this key needs the route's auth = {needs:?} (it is {auth:?})"),
        );
    }
    let max_keys = cx.int::<u32>(&t, "max_keys", Optional, range_of(RATE_LIMIT_KEYS_RANGE));
    if cx.errors.len() != mark {
        return None;
    }
    let rate = *rate.value()?;
    Some(RateLimit {
        rate,
        // A burst below one request per second of rate would refuse requests the rate allows.
        burst: burst.or((rate.ceil() as u32).max(1))?,
        key: key.or(LimitKey::ClientIp)?,
        max_keys: max_keys.or(DEFAULT_RATE_LIMIT_KEYS)?,
    })
}

#[cfg(test)]
mod tests {
    use super::super::VipMode;
    use super::super::tests::{assert_only_error as only_error, errors, ok};
    use super::*;

    /// Lines 1-2: the agent; 3-8: an l7 VIP; tests append from line 9.
    const BASE: &str = r#"[agent]
interface = "eth0"
[[vip]]
name = "api"
address = "192.0.2.10"
port = 80
protocol = "tcp"
mode = "l7"
"#;

    #[test]
    fn an_l7_vip_without_tables_gets_the_default_gateway() {
        let c = ok(&format!("{BASE}[[vip.backend]]\naddress = \"10.0.0.1\"\n"));
        let vip = &c.vips[0];
        assert_eq!(vip.gateway, Some(Gateway::defaults()));
        assert_eq!(vip.backends[0].port, Some(80));
        assert_eq!(vip.backends[0].pool, "default");
        // L4 VIPs have none of it.
        let l4 = ok(&format!(
            "{}[[vip.backend]]\naddress = \"10.0.0.1\"\n",
            BASE.replace("mode = \"l7\"\n", "").replace(
                "[agent]\ninterface = \"eth0\"\n",
                "[agent]\ninterface = \"eth0\"\nencap_source_v4 = \"10.255.0.1\"\n"
            )
        ));
        assert_eq!(l4.vips[0].mode, VipMode::DsrIpip);
        assert_eq!(l4.vips[0].gateway, None);
        assert_eq!(l4.vips[0].backends[0].port, None);
    }

    #[test]
    fn every_key_is_read() {
        let text = format!(
            r#"{BASE}[vip.gateway]
http2 = false
encoded_slash = "keep"
max_header_bytes = 16384
max_headers = 50
max_body_bytes = 1000
header_timeout_ms = 3000
idle_timeout_ms = 5000
request_id_header = "x-trace"
[vip.gateway.tls]
cert_file = "/etc/xlb/c.pem"
key_file = "/etc/xlb/k.pem"
[[vip.pool]]
name = "users"
balance = "hash"
hash_cookie = "session"
protocol = "http2"
connect_timeout_ms = 100
request_timeout_ms = 200
idle_timeout_ms = 300
retries = 0
outlier_consecutive_5xx = 0
outlier_consecutive_failures = 7
outlier_ejection_ms = 400
[[vip.route]]
name = "users"
host = "*.example.com"
path_prefix = "/users"
methods = ["GET", "POST"]
headers = {{ "X-Canary" = "1", "x-debug" = true }}
pool = "users"
strip_prefix = true
add_headers = {{ "x-via" = "xlb" }}
remove_headers = ["x-internal"]
auth = "api_key"
api_key_file = "/etc/xlb/keys"
api_key_query = "key"
identity_header = "x-user"
rate_limit = {{ rate = 2.5, key = "api_key" }}
[[vip.route]]
name = "login"
host = "api.example.com"
path = "/login"
auth = "jwt"
jwks_file = "/etc/xlb/jwks.json"
jwt_issuer = "https://id.example.com"
jwt_audience = "api"
[vip.route.rate_limit]
rate = 10
burst = 20
key = "header:x-tenant"
max_keys = 1000
[[vip.backend]]
address = "10.0.0.1"
port = 8080
pool = "users"
[[vip.backend]]
address = "10.0.0.1"
port = 8081
"#
        );
        let c = ok(&text);
        let g = c.vips[0].gateway.as_ref().unwrap();
        assert!(!g.http2);
        assert_eq!(g.encoded_slash, EncodedSlash::Keep);
        assert_eq!(
            (g.max_header_bytes, g.max_headers, g.max_body_bytes),
            (16384, 50, 1000)
        );
        assert_eq!(g.header_timeout, Duration::from_secs(3));
        assert_eq!(g.idle_timeout, Duration::from_secs(5));
        assert_eq!(g.request_id_header, "x-trace");
        let tls = g.tls.as_ref().unwrap();
        assert_eq!(tls.cert_file.path, PathBuf::from("/etc/xlb/c.pem"));
        assert_eq!(
            tls.key_file.error("bad"),
            "xlb.toml:20: vip[0].gateway.tls.key_file: bad"
        );
        // The implicit default pool first, then the file's.
        assert_eq!(g.pools.len(), 2);
        assert_eq!(g.pools[0], Pool::with_defaults("default"));
        let users = g.pool("users").unwrap();
        assert_eq!(
            users.balance,
            Balance::Hash(HashOn::Cookie("session".into()))
        );
        assert_eq!(users.protocol, UpstreamProtocol::Http2);
        assert_eq!(users.connect_timeout, Duration::from_millis(100));
        assert_eq!(users.request_timeout, Duration::from_millis(200));
        assert_eq!(users.idle_timeout, Duration::from_millis(300));
        assert_eq!(users.retries, 0);
        assert_eq!(users.outlier_consecutive_5xx, 0);
        assert_eq!(users.outlier_consecutive_failures, 7);
        assert_eq!(users.outlier_ejection, Duration::from_millis(400));
        let r = &g.routes[0];
        assert_eq!(r.matcher.host, HostMatch::Wildcard("example.com".into()));
        assert_eq!(r.matcher.path, PathMatch::Prefix("/users".into()));
        assert_eq!(r.matcher.methods, Some(vec![Method::GET, Method::POST]));
        assert_eq!(r.matcher.headers.len(), 2);
        assert!(
            r.matcher
                .headers
                .contains(&HeaderMatch::Present(HeaderName::from_static("x-debug")))
        );
        assert_eq!(r.pool, "users");
        assert!(r.strip_prefix);
        assert_eq!(
            r.add_headers,
            vec![(
                HeaderName::from_static("x-via"),
                HeaderValue::from_static("xlb")
            )]
        );
        assert_eq!(
            r.remove_headers,
            vec![HeaderName::from_static("x-internal")]
        );
        match &r.auth {
            RouteAuth::ApiKey {
                file,
                header,
                query,
            } => {
                assert_eq!(file.path, PathBuf::from("/etc/xlb/keys"));
                assert_eq!(file.line, 44);
                assert_eq!(header, "x-api-key");
                assert_eq!(query.as_deref(), Some("key"));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(r.identity_header, "x-user");
        let limit = r.rate_limit.as_ref().unwrap();
        assert_eq!(
            (limit.rate, limit.burst, &limit.key),
            (2.5, 3, &LimitKey::ApiKey)
        );
        let login = &g.routes[1];
        assert_eq!(login.matcher.path, PathMatch::Exact("/login".into()));
        assert_eq!(login.pool, "default");
        assert_eq!(login.identity_header, DEFAULT_IDENTITY_HEADER);
        assert_eq!(
            login.auth,
            RouteAuth::Jwt {
                jwks_file: FileRef {
                    path: "/etc/xlb/jwks.json".into(),
                    config_file: "xlb.toml".into(),
                    line: 53,
                    key: "vip[0].route[1].jwks_file".into(),
                },
                issuer: Some("https://id.example.com".into()),
                audience: Some("api".into()),
            }
        );
        let limit = login.rate_limit.as_ref().unwrap();
        assert_eq!((limit.burst, limit.max_keys), (20, 1000));
        assert_eq!(
            limit.key,
            LimitKey::Header(HeaderName::from_static("x-tenant"))
        );
        let b = &c.vips[0].backends;
        assert_eq!((b[0].port, b[0].pool.as_str()), (Some(8080), "users"));
        assert_eq!((b[1].port, b[1].pool.as_str()), (Some(8081), "default"));
    }

    #[test]
    fn l7_backends_are_checked_on_their_own_port_unless_the_check_names_one() {
        let text = format!(
            "{BASE}[vip.health_check]\ntype = \"http\"\npath = \"/healthz\"\n\
             [[vip.backend]]\naddress = \"10.0.0.1\"\nport = 8080\n\
             [[vip.backend]]\naddress = \"10.0.0.2\"\n\
             [[vip.backend]]\naddress = \"10.0.0.3\"\nport = 8082\n\
             [vip.backend.health_check]\nport = 9000\n"
        );
        let c = ok(&text);
        let ports: Vec<u16> = c.vips[0]
            .backends
            .iter()
            .map(|b| b.health_check.as_ref().unwrap().port)
            .collect();
        assert_eq!(ports, [8080, 80, 9000]);
        let named = ok(&text.replace("path = \"/healthz\"", "path = \"/healthz\"\nport = 7000"));
        let ports: Vec<u16> = named.vips[0]
            .backends
            .iter()
            .map(|b| b.health_check.as_ref().unwrap().port)
            .collect();
        assert_eq!(ports, [7000, 7000, 9000]);
    }

    #[test]
    fn the_same_server_twice_is_refused_but_one_host_may_serve_several_ports() {
        let two = format!(
            "{BASE}[[vip.backend]]\naddress = \"10.0.0.1\"\nport = 8080\n\
             [[vip.backend]]\naddress = \"10.0.0.1\"\nport = 8081\n"
        );
        ok(&two);
        let same = two.replace("8081", "8080");
        let all = errors(&same);
        assert_eq!(all.len(), 1, "{all:?}");
        assert!(
            all[0].starts_with("xlb.toml:13: vip[0].backend[1].address"),
            "{all:?}"
        );
    }

    #[test]
    fn mistakes_name_file_line_and_key() {
        let cases: &[(&str, &str)] = &[
            // Gateway tables on an L4 VIP.
            (
                "[[vip.route]]\nname = \"r\"\n",
                "xlb.toml:9: vip[0].route: only an l7 VIP",
            ),
            (
                "[[vip.backend]]\naddress = \"10.0.0.1\"\nport = 8080\n",
                "xlb.toml:11: vip[0].backend[0].port: only an l7 VIP's backends",
            ),
        ];
        for (tail, start) in cases {
            let l4 = BASE.replace("mode = \"l7\"\n", "").replace(
                "interface = \"eth0\"\n",
                "interface = \"eth0\"\nencap_source_v4 = \"10.255.0.1\"\n",
            );
            only_error(&format!("{l4}{tail}"), start);
        }
        let cases: &[(&str, &str)] = &[
            (
                "[[vip.backend]]\naddress = \"10.0.0.1\"\npool = \"nope\"\n",
                "xlb.toml:11: vip[0].backend[0].pool: no pool \"nope\" in this VIP; pools here: \"default\"",
            ),
            (
                "[[vip.route]]\nname = \"r\"\npool = \"nope\"\n",
                "xlb.toml:11: vip[0].route[0].pool: no pool \"nope\"",
            ),
            (
                "[[vip.route]]\nname = \"r\"\npath = \"/a\"\npath_prefix = \"/b\"\n",
                "xlb.toml:12: vip[0].route[0].path_prefix: set one of path",
            ),
            (
                "[[vip.route]]\nname = \"r\"\nstrip_prefix = true\n",
                "xlb.toml:11: vip[0].route[0].strip_prefix: strip_prefix needs a path_prefix",
            ),
            (
                "[[vip.route]]\nname = \"r\"\nauth = \"api_key\"\n",
                "xlb.toml:9: vip[0].route[0].api_key_file: required key is missing",
            ),
            (
                "[[vip.route]]\nname = \"r\"\nauth = \"jwt\"\njwks_file = \"/j\"\napi_key_header = \"x-k\"\n",
                "xlb.toml:13: vip[0].route[0].api_key_header: this key does not apply to auth = \"jwt\"",
            ),
            (
                "[[vip.route]]\nname = \"r\"\njwt_issuer = \"x\"\n",
                "xlb.toml:11: vip[0].route[0].jwt_issuer: this key does not apply to auth = \"none\"",
            ),
            (
                "[[vip.route]]\nname = \"r\"\nauth = \"jwt\"\njwks_file = \"jwks.json\"\n",
                "xlb.toml:12: vip[0].route[0].jwks_file: \"jwks.json\" is not an absolute path",
            ),
            (
                "[[vip.route]]\nname = \"r\"\nrate_limit = { rate = 1, key = \"api_key\" }\n",
                "xlb.toml:11: vip[0].route[0].rate_limit.key: this key needs the route's auth = \"api_key\"",
            ),
            (
                "[[vip.route]]\nname = \"r\"\nrate_limit = { burst = 1 }\n",
                "xlb.toml:11: vip[0].route[0].rate_limit.rate: required key is missing",
            ),
            (
                "[[vip.route]]\nname = \"r\"\nrate_limit = { rate = 0 }\n",
                "xlb.toml:11: vip[0].route[0].rate_limit.rate: 0 is out of range",
            ),
            (
                "[[vip.route]]\nname = \"r\"\nrate_limit = { rate = 1, key = \"cookie\" }\n",
                "xlb.toml:11: vip[0].route[0].rate_limit.key: \"cookie\" is not a choice",
            ),
            (
                "[[vip.route]]\nname = \"r\"\nadd_headers = { host = \"evil\" }\n",
                "xlb.toml:11: vip[0].route[0].add_headers.host: \"host\" is set by the gateway",
            ),
            (
                "[[vip.route]]\nname = \"r\"\nremove_headers = [\"x-forwarded-for\"]\n",
                "xlb.toml:11: vip[0].route[0].remove_headers[0]: \"x-forwarded-for\" is set by the gateway",
            ),
            (
                "[[vip.route]]\nname = \"r\"\nheaders = { \"x a\" = \"1\" }\n",
                "xlb.toml:11: vip[0].route[0].headers.x a: \"x a\" is not a valid header name",
            ),
            (
                "[[vip.route]]\nname = \"r\"\nheaders = { \"x-a\" = false }\n",
                "xlb.toml:11: vip[0].route[0].headers.x-a: expected a value to require, or true",
            ),
            (
                "[[vip.route]]\nname = \"r\"\nmethods = [\"get\"]\n",
                "xlb.toml:11: vip[0].route[0].methods[0]: \"get\" is not a method",
            ),
            (
                "[[vip.route]]\nname = \"r\"\nmethods = []\n",
                "xlb.toml:11: vip[0].route[0].methods: an empty list matches nothing",
            ),
            (
                "[[vip.route]]\nname = \"r\"\nhost = \"a.*.com\"\n",
                "xlb.toml:9: vip[0].route[0]: route 0 (r): invalid host",
            ),
            (
                "[[vip.route]]\nname = \"r\"\npath_prefix = \"/a/\"\n",
                "xlb.toml:9: vip[0].route[0]: route 0 (r): invalid path",
            ),
            (
                "[[vip.route]]\nname = \"a\"\npath = \"/x\"\n[[vip.route]]\nname = \"b\"\npath = \"/x\"\n",
                "xlb.toml:12: vip[0].route[1]: this route has the same host, path, methods and headers as vip[0].route[0]",
            ),
            (
                "[[vip.route]]\npath = \"/x\"\n",
                "xlb.toml:9: vip[0].route[0].name: required key is missing",
            ),
            (
                "[[vip.route]]\nname = \"r\"\nbody = 1\n",
                "xlb.toml:11: vip[0].route[0].body: unknown key",
            ),
            (
                "[[vip.pool]]\nname = \"p\"\nbalance = \"hash\"\n",
                "xlb.toml:11: vip[0].pool[0].balance: balance = \"hash\" needs hash_header or hash_cookie",
            ),
            (
                "[[vip.pool]]\nname = \"p\"\nhash_header = \"x-user\"\n",
                "xlb.toml:11: vip[0].pool[0].hash_header: only a pool with balance = \"hash\"",
            ),
            (
                "[[vip.pool]]\nname = \"p\"\nbalance = \"hash\"\nhash_header = \"x\"\nhash_cookie = \"c\"\n",
                "xlb.toml:13: vip[0].pool[0].hash_cookie: set one of hash_header and hash_cookie",
            ),
            (
                "[[vip.pool]]\nname = \"p\"\nbalance = \"random\"\n",
                "xlb.toml:11: vip[0].pool[0].balance: \"random\" is not a choice",
            ),
            (
                "[[vip.pool]]\nname = \"p\"\nprotocol = \"h3\"\n",
                "xlb.toml:11: vip[0].pool[0].protocol: \"h3\" is not a choice",
            ),
            (
                "[[vip.pool]]\nname = \"p\"\nretries = 9\n",
                "xlb.toml:11: vip[0].pool[0].retries: 9 is out of range; expected 0..=5",
            ),
            (
                "[[vip.pool]]\nname = \"p\"\n[[vip.pool]]\nname = \"p\"\n",
                "xlb.toml:11: vip[0].pool[1].name: pool \"p\" is defined twice",
            ),
            (
                "[vip.gateway]\nhttp2 = \"yes\"\n",
                "xlb.toml:10: vip[0].gateway.http2: expected true or false",
            ),
            (
                "[vip.gateway]\nencoded_slash = \"decode\"\n",
                "xlb.toml:10: vip[0].gateway.encoded_slash: \"decode\" is not a choice",
            ),
            (
                "[vip.gateway]\nmax_headers = 2\n",
                "xlb.toml:10: vip[0].gateway.max_headers: 2 is out of range",
            ),
            (
                "[vip.gateway.tls]\ncert_file = \"/c\"\n",
                "xlb.toml:9: vip[0].gateway.tls.key_file: required key is missing",
            ),
            (
                "[vip.gateway]\nrequest_id_header = \"connection\"\n",
                "xlb.toml:10: vip[0].gateway.request_id_header: \"connection\" is set by the gateway",
            ),
        ];
        for (tail, start) in cases {
            only_error(&format!("{BASE}{tail}"), start);
        }
    }
}
