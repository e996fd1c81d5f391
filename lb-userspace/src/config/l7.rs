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
    /// `request_timeout_ms`: response headers not back by then give 504. Default 15000 ms.
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
