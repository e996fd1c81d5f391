//! The gateway's upstream pools (issue 7 items 2 and 3): for each `[[vip.pool]]`, its servers,
//! a connection pool per server (HTTP/1.1 on the gateway's own client, [`super::h1`]; HTTP/2
//! and upgrades on hyper's low-level client), the balancing decision of
//! [`super::balance`], passive outlier ejection, timeouts and retries of requests that never
//! left the gateway.
//!
//! Connections are our own rather than hyper-util's pooling client because a retry is only safe
//! when the request provably never reached a server: a failed connect still holds the request,
//! and both clients hand back a request that a dying keep-alive connection never took.
//!
//! - HTTP/1.1 pools keep a stack of idle keep-alive connections per server and gateway worker;
//!   the most recently used is reused first (it is the least likely to have been closed by the
//!   server), and a connection is returned as soon as its response body has ended. The request
//!   is written and the response read by the request's own task ([`super::h1`]).
//! - HTTP/2 pools (h2c by prior knowledge) share one multiplexed connection per server and open
//!   another only when it is closed or at the server's stream limit.
//! - Requests with `Upgrade` (WebSocket) always get a fresh HTTP/1.1 connection that is never
//!   pooled, since after the 101 it belongs to the tunnel.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{CONNECTION, HOST, TE, TRANSFER_ENCODING, UPGRADE};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use crate::config::l7::{self, Balance, HashOn, UpstreamProtocol};
use crate::gateway::Body;
use crate::gateway::balance::{self, Candidate, Rng, SmoothWeightedRoundRobin};
use crate::gateway::{h1, workers};

/// Most idle HTTP/1.1 connections kept per server: enough for a burst's worth of reuse, bounded
/// so that a spike does not leave thousands of sockets open on both sides afterwards (the
/// oldest are closed first); shared equally by the gateway workers' stacks.
pub const MAX_IDLE_PER_SERVER: usize = 256;

/// Most HTTP/2 connections per server. One is normal; more are opened only while all are at the
/// server's stream limit, and beyond this many a request queues on the least loaded one instead
/// (hyper waits for a free stream) rather than multiplying connections without bound.
pub const MAX_H2_CONNECTIONS_PER_SERVER: usize = 8;

/// How often an idle HTTP/2 connection is pinged: a peer that vanished without closing (host
/// down, NAT state expired) is noticed before a request is sent into it.
const H2_PING_INTERVAL: Duration = Duration::from_secs(20);

/// How long a ping may go unanswered before the HTTP/2 connection is closed.
const H2_PING_TIMEOUT: Duration = Duration::from_secs(10);

/// Bounds of the interval at which idle connections are swept: half the idle timeout, but not
/// so often that short test timeouts spin, nor so rarely that sockets outlive their timeout by
/// much.
const SWEEP_INTERVAL: (Duration, Duration) = (Duration::from_millis(25), Duration::from_secs(5));

/// Why a request could not be forwarded; [`UpstreamError::status`] is the response the client
/// gets, so the server side maps errors without knowing their causes.
#[derive(thiserror::Error, Debug)]
pub enum UpstreamError {
    /// No server is healthy, weighted above 0 and (unless all are) not ejected: 503.
    #[error("no upstream server available (all down or drained)")]
    NoServer,
    /// No connection could be made to the chosen servers (refused, unreachable, connect timeout,
    /// handshake failed), after the retries allowed: 502.
    #[error("cannot connect to upstream: {0}")]
    Connect(String),
    /// The response head did not arrive within the pool's `request_timeout`: 504.
    #[error("upstream did not answer within the request timeout")]
    Timeout,
    /// The upstream broke the exchange (reset, closed early, malformed response), or the request
    /// could not be expressed to it: 502.
    #[error("upstream exchange failed: {0}")]
    Protocol(String),
    /// The request timeout ran out while the request body was waiting for the client's bytes
    /// (see [`ClientBodyWait`]): the client's delay, not the server's; 408, and the server is
    /// not charged a timeout.
    #[error("the client's request body stalled")]
    ClientTimeout,
}

/// Put in a request's extensions by the gateway: set while the request body is waiting for the
/// client's next bytes. An upstream that waits for the whole body cannot answer before the
/// client sends it, so a request timeout that runs out then must not count against the server
/// (slow clients would otherwise eject healthy servers).
#[derive(Clone, Debug, Default)]
pub(crate) struct ClientBodyWait(pub(crate) Arc<AtomicBool>);

impl ClientBodyWait {
    fn waiting(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

impl UpstreamError {
    /// The status the gateway answers the client with.
    pub fn status(&self) -> StatusCode {
        match self {
            UpstreamError::NoServer => StatusCode::SERVICE_UNAVAILABLE,
            UpstreamError::Connect(_) | UpstreamError::Protocol(_) => StatusCode::BAD_GATEWAY,
            UpstreamError::Timeout => StatusCode::GATEWAY_TIMEOUT,
            UpstreamError::ClientTimeout => StatusCode::REQUEST_TIMEOUT,
        }
    }
}

/// Why a request got no upstream response, with the attempts made (for the access log): the
/// client's answer is [`Unforwarded::status`].
#[derive(thiserror::Error, Debug)]
#[error("{error} (after {attempts} attempts)")]
pub struct Unforwarded {
    /// The last attempt's error ([`UpstreamError::NoServer`] when none could be made).
    pub error: UpstreamError,
    /// Attempts made: 0 when no server was eligible.
    pub attempts: u32,
    /// The server of the last attempt.
    pub server: Option<SocketAddr>,
}

impl Unforwarded {
    /// The status the gateway answers the client with.
    pub fn status(&self) -> StatusCode {
        self.error.status()
    }
}

/// A response from an upstream server, with what the access log and metrics need to know about
/// how it was obtained.
#[derive(Debug)]
pub struct Forwarded {
    /// The server's response. Its body streams from the server; its version is the client's
    /// request version (so the server side writes it as is) except on a 101, which keeps its
    /// upgrade so that `hyper::upgrade::on` yields the upstream connection.
    pub response: Response<Body>,
    /// The server that answered.
    pub server: SocketAddr,
    /// Attempts made: 1 plus the retries used.
    pub attempts: u32,
    /// From the request handed to the connection to the response head (last attempt).
    pub upstream_latency: Duration,
}

/// A pool's state for `xlb status` and metrics.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PoolStatus {
    /// The pool's name.
    pub name: String,
    /// `"round_robin"`, `"least_request"` or `"hash"`.
    pub balance: String,
    /// For `"hash"` pools, what is hashed: `"header:NAME"` or `"cookie:NAME"`.
    pub hash_on: Option<String>,
    /// `"http1"` or `"http2"`.
    pub protocol: String,
    /// Its servers, in configuration order.
    pub servers: Vec<ServerStatus>,
}

/// One server's state in [`PoolStatus`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ServerStatus {
    /// The server's address.
    pub address: IpAddr,
    /// The port it is reached on.
    pub port: u16,
    /// Its configured weight; 0 is drained.
    pub weight: u16,
    /// Whether the health checker passes it.
    pub healthy: bool,
    /// Whether passive outlier detection has ejected it.
    pub ejected: bool,
    /// Seconds until the ejection ends (0 when not ejected).
    pub ejection_seconds_left: f64,
    /// Requests sent whose response has not ended.
    pub in_flight: u32,
    /// Requests sent to it (attempts that got a connection).
    pub requests_total: u64,
    /// Responses with a 5xx status.
    pub responses_5xx_total: u64,
    /// Connections that could not be established (refused, timed out, handshake failed).
    pub connect_failures_total: u64,
    /// Requests whose response head did not arrive within the request timeout.
    pub timeouts_total: u64,
    /// Exchanges the server broke (reset, closed early, malformed response).
    pub errors_total: u64,
    /// Open connections without a request: idle HTTP/1.1 keep-alive connections plus HTTP/2
    /// connections without an active stream.
    pub idle_connections: usize,
}

/// The upstream pools of one l7 VIP. Long-lived: [`Upstreams::configure`] applies each
/// configuration reload in place, so that servers keep their connections, counters and
/// ejections across reloads that do not change them.
#[derive(Default)]
pub struct Upstreams {
    /// The pools in configuration order.
    pools: RwLock<Vec<Arc<Pool>>>,
}

impl Upstreams {
    /// No pools until [`Upstreams::configure`].
    pub fn new() -> Self {
        Self::default()
    }

    /// (Re)configures from the VIP: one [`Pool`] per `vip.gateway.pools` entry, whose servers
    /// are the VIP's backends with `b.pool == pool.name` at `(b.address, b.port, b.weight)`;
    /// weight 0 drains a server (no new requests). `healthy(i)` says whether backend index `i`
    /// passes the agent's health checks; call this again whenever that changes (it is cheap and
    /// keeps all state).
    ///
    /// A server keeps its outlier state, counters and idle connections while its pool name,
    /// address, port and the pool's protocol are unchanged; the idle connections of servers and
    /// pools that are gone are closed (requests in flight on them finish).
    pub fn configure(&self, vip: &crate::config::Vip, healthy: &dyn Fn(usize) -> bool) {
        let mut pools = write(&self.pools);
        let mut next = Vec::new();
        for config in vip.gateway.iter().flat_map(|g| &g.pools) {
            let servers: Vec<(SocketAddr, u16, bool)> = vip
                .backends
                .iter()
                .enumerate()
                .filter(|(_, b)| b.pool == config.name)
                .map(|(i, b)| {
                    let port = b.port.unwrap_or(vip.port);
                    (SocketAddr::new(b.address, port), b.weight, healthy(i))
                })
                .collect();
            let pool = pools
                .iter()
                .find(|p| p.name == config.name)
                .cloned()
                .unwrap_or_else(|| Arc::new(Pool::new(config)));
            pool.reconfigure(config, &servers);
            next.push(pool);
        }
        for old in pools.iter() {
            if !next.iter().any(|p| Arc::ptr_eq(p, old)) {
                old.retire();
            }
        }
        *pools = next;
    }

    /// The pool named `name` (routes name pools; configuration validation guarantees it
    /// exists).
    pub fn pool(&self, name: &str) -> Option<Arc<Pool>> {
        read(&self.pools).iter().find(|p| p.name == name).cloned()
    }

    /// For `xlb status` and metrics: per pool, per server.
    pub fn status(&self) -> Vec<PoolStatus> {
        read(&self.pools).iter().map(|p| p.status()).collect()
    }
}

/// One upstream pool: its settings, servers and their connections. Shared (`Arc`) between the
/// request handlers and [`Upstreams`]; a reload updates it in place.
pub struct Pool {
    /// The pool's name, fixed for its life (a renamed pool is a new pool).
    name: String,
    /// Everything else, behind an `Arc` so that the idle-connection sweeper can hold a `Weak`
    /// and end when the pool is dropped.
    inner: Arc<PoolInner>,
}

/// The mutable part of a [`Pool`].
struct PoolInner {
    /// The current settings and servers; each request works on one snapshot, so a reload never
    /// changes the rules in the middle of a request's retries.
    state: RwLock<Arc<PoolState>>,
    /// Whether the idle-connection sweeper task runs (started by the first request, when a
    /// runtime is sure to exist).
    sweeper: AtomicBool,
}

/// One configuration of a pool.
struct PoolState {
    /// The pool's settings.
    config: l7::Pool,
    /// The servers, in configuration order; a [`Candidate::slot`] indexes this.
    servers: Vec<Arc<Server>>,
    /// State carried between picks.
    picker: Mutex<Picker>,
}

/// What balancing remembers between requests.
struct Picker {
    /// Round-robin positions (also used by hash pools for requests without the key).
    wrr: SmoothWeightedRoundRobin,
    /// Draws for least request.
    rng: Rng,
}

impl Pool {
    /// An empty pool with `config`'s settings.
    fn new(config: &l7::Pool) -> Self {
        Self {
            name: config.name.clone(),
            inner: Arc::new(PoolInner {
                state: RwLock::new(Arc::new(PoolState {
                    config: config.clone(),
                    servers: Vec::new(),
                    picker: Mutex::new(Picker {
                        wrr: SmoothWeightedRoundRobin::new(0),
                        rng: Rng::from_entropy(),
                    }),
                })),
                sweeper: AtomicBool::new(false),
            }),
        }
    }

    /// The pool's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Applies new settings and servers, keeping [`Server`]s whose address, port and protocol
    /// are unchanged.
    fn reconfigure(&self, config: &l7::Pool, servers: &[(SocketAddr, u16, bool)]) {
        let mut state = write(&self.inner.state);
        let same_protocol = state.config.protocol == config.protocol;
        let kept: Vec<Arc<Server>> = servers
            .iter()
            .map(|&(addr, weight, healthy)| {
                let server = state
                    .servers
                    .iter()
                    .find(|s| same_protocol && s.addr == addr)
                    .cloned()
                    .unwrap_or_else(|| Arc::new(Server::new(addr)));
                server.weight.store(u32::from(weight), Ordering::Relaxed);
                server.healthy.store(healthy, Ordering::Relaxed);
                server
            })
            .collect();
        for old in &state.servers {
            if !kept.iter().any(|s| Arc::ptr_eq(s, old)) {
                old.retire();
            }
        }
        // Round-robin positions carry over while the server list is the same (the agent
        // reconfigures on every health change; restarting the cycle each time would favour the
        // first servers), and restart, as nginx's do, when it changes.
        let same_servers = kept.len() == state.servers.len()
            && kept
                .iter()
                .zip(&state.servers)
                .all(|(a, b)| Arc::ptr_eq(a, b));
        let picker = {
            let old = lock(&state.picker);
            Picker {
                wrr: if same_servers {
                    old.wrr.clone()
                } else {
                    SmoothWeightedRoundRobin::new(kept.len())
                },
                rng: old.rng.clone(),
            }
        };
        *state = Arc::new(PoolState {
            config: config.clone(),
            picker: Mutex::new(picker),
            servers: kept,
        });
    }

    /// Closes the idle connections of a pool that left the configuration.
    fn retire(&self) {
        for server in &self.state().servers {
            server.retire();
        }
    }

    /// The current configuration snapshot.
    fn state(&self) -> Arc<PoolState> {
        read(&self.inner.state).clone()
    }

    /// The pool's state for `xlb status`.
    fn status(&self) -> PoolStatus {
        let state = self.state();
        let (balance, hash_on) = match &state.config.balance {
            Balance::RoundRobin => ("round_robin", None),
            Balance::LeastRequest => ("least_request", None),
            Balance::Hash(HashOn::Header(h)) => ("hash", Some(format!("header:{h}"))),
            Balance::Hash(HashOn::Cookie(c)) => ("hash", Some(format!("cookie:{c}"))),
        };
        let now = Instant::now();
        PoolStatus {
            name: self.name.clone(),
            balance: balance.to_owned(),
            hash_on,
            protocol: match state.config.protocol {
                UpstreamProtocol::Http1 => "http1",
                UpstreamProtocol::Http2 => "http2",
            }
            .to_owned(),
            servers: state.servers.iter().map(|s| s.status(now)).collect(),
        }
    }

    /// Forwards `req` to a server chosen by the pool's balance.
    ///
    /// `req` arrives with an origin-form URI (`path?query`) or an absolute one (from HTTP/2) and
    /// a `Host` header set by the caller; its version may be HTTP/1.1 or HTTP/2, and it is
    /// translated to the pool's protocol either way (origin-form and `Host` over HTTP/1.1,
    /// `:authority` from `Host` over HTTP/2). A request with `Upgrade` goes over a fresh
    /// HTTP/1.1 connection with its `Connection`/`Upgrade` headers kept, and a 101 response can
    /// be upgraded with `hyper::upgrade::on`.
    ///
    /// Retries: up to the pool's `retries` further attempts, each on a server not tried yet
    /// when there is one, but only for idempotent methods (GET, HEAD, OPTIONS, TRACE, PUT,
    /// DELETE) and only when the request provably never left: the connection could not be made,
    /// or hyper handed the request back unwritten. A 5xx response is returned as is.
    pub async fn send(&self, req: Request<Body>) -> Result<Forwarded, Unforwarded> {
        self.start_sweeper();
        let state = self.state();
        let config = &state.config;
        let client_version = req.version();
        let upgrade = is_upgrade(&req);
        let retryable = is_idempotent(req.method());
        let affinity = affinity_hash(&config.balance, req.headers());
        let protocol = if upgrade {
            UpstreamProtocol::Http1
        } else {
            config.protocol
        };
        let mut next = Some(
            translate_request(req, protocol).map_err(|error| Unforwarded {
                error,
                attempts: 0,
                server: None,
            })?,
        );
        let mut tried: Vec<usize> = Vec::new();
        let mut attempts = 0u32;
        let mut last_error = None;
        let mut last_server = None;
        while let Some(req) = next.take() {
            let Some(slot) = state.pick(affinity, &tried) else {
                break;
            };
            tried.push(slot);
            attempts += 1;
            let server = &state.servers[slot];
            match attempt(&self.name, config, server, req, upgrade).await {
                Ok((response, upstream_latency)) => {
                    return Ok(Forwarded {
                        response: finish_response(response, client_version),
                        server: server.addr,
                        attempts,
                        upstream_latency,
                    });
                }
                Err(failed) => {
                    if retryable && attempts <= u32::from(config.retries) {
                        next = failed.request;
                    }
                    if next.is_some() {
                        tracing::debug!(
                            pool = %self.name,
                            server = %server.addr,
                            attempt = attempts,
                            error = %failed.error,
                            "upstream attempt failed before the request was sent; retrying"
                        );
                    }
                    last_error = Some(failed.error);
                    last_server = Some(server.addr);
                }
            }
        }
        Err(Unforwarded {
            error: last_error.unwrap_or(UpstreamError::NoServer),
            attempts,
            server: last_server,
        })
    }

    /// Starts the task that closes idle connections past the pool's idle timeout, once.
    fn start_sweeper(&self) {
        if self.inner.sweeper.swap(true, Ordering::Relaxed) {
            return;
        }
        let pool: Weak<PoolInner> = Arc::downgrade(&self.inner);
        // The task runs on the worker that sent first; should that worker's runtime end (its
        // listeners removed), the next request starts it again.
        let restart = SweeperRunning(pool.clone());
        tokio::spawn(async move {
            let _restart = restart;
            loop {
                let every = match pool.upgrade() {
                    Some(inner) => {
                        let idle = read(&inner.state).config.idle_timeout;
                        (idle / 2).clamp(SWEEP_INTERVAL.0, SWEEP_INTERVAL.1)
                    }
                    None => return,
                };
                tokio::time::sleep(every).await;
                let Some(inner) = pool.upgrade() else { return };
                let state = read(&inner.state).clone();
                for server in &state.servers {
                    server.sweep(state.config.idle_timeout);
                }
            }
        });
    }
}

/// Clears the pool's sweeper flag when its task ends or is dropped.
struct SweeperRunning(Weak<PoolInner>);

impl Drop for SweeperRunning {
    fn drop(&mut self) {
        if let Some(inner) = self.0.upgrade() {
            inner.sweeper.store(false, Ordering::Relaxed);
        }
    }
}

impl PoolState {
    /// The slot of the server for the next attempt: among servers that pass health checks and
    /// are weighted above 0, those not ejected (or, when every one of them is ejected, all of
    /// them: refusing everything would turn a partial outage into a total one), preferring
    /// servers not `tried` yet.
    fn pick(&self, affinity: Option<u64>, tried: &[usize]) -> Option<usize> {
        let now = Instant::now();
        let mut eligible = Vec::with_capacity(self.servers.len());
        let mut ejected = Vec::new();
        for (slot, server) in self.servers.iter().enumerate() {
            let weight = server.weight.load(Ordering::Relaxed);
            if weight == 0 || !server.healthy.load(Ordering::Relaxed) {
                continue;
            }
            let candidate = Candidate {
                slot,
                key: server.key,
                weight,
                in_flight: server.in_flight.load(Ordering::Relaxed),
            };
            if server.is_ejected(now, &self.config.name) {
                ejected.push(candidate);
            } else {
                eligible.push(candidate);
            }
        }
        let mut candidates = if eligible.is_empty() {
            ejected
        } else {
            eligible
        };
        if candidates.iter().any(|c| !tried.contains(&c.slot)) {
            candidates.retain(|c| !tried.contains(&c.slot));
        }
        let mut picker = lock(&self.picker);
        match (&self.config.balance, affinity) {
            (Balance::Hash(_), Some(key)) => balance::rendezvous(&candidates, key),
            (Balance::LeastRequest, _) => balance::least_request(&candidates, &mut picker.rng),
            _ => picker.wrr.pick(&candidates),
        }
    }
}

/// One upstream server and its connections.
struct Server {
    /// Where it listens.
    addr: SocketAddr,
    /// Its identity for hashing.
    key: u64,
    /// Configured weight (0 drains).
    weight: AtomicU32,
    /// The health checker's verdict.
    healthy: AtomicBool,
    /// Set when the server left the configuration: connections finishing later are closed
    /// rather than pooled.
    retired: AtomicBool,
    /// Requests whose response has not ended (least request's measure of load).
    in_flight: AtomicU32,
    /// Event counters for [`ServerStatus`].
    requests_total: AtomicU64,
    /// See [`ServerStatus::responses_5xx_total`].
    responses_5xx_total: AtomicU64,
    /// See [`ServerStatus::connect_failures_total`].
    connect_failures_total: AtomicU64,
    /// See [`ServerStatus::timeouts_total`].
    timeouts_total: AtomicU64,
    /// See [`ServerStatus::errors_total`].
    errors_total: AtomicU64,
    /// Passive outlier detection.
    outlier: Mutex<Outlier>,
    /// Idle HTTP/1.1 connections, most recently used last, one stack per gateway worker: a
    /// socket is registered with the event loop of the worker that opened it, so a request
    /// taking it from another worker would wake that thread for every read and write.
    idle: Box<[Mutex<VecDeque<IdleConnection>>]>,
    /// Open HTTP/2 connections, oldest first.
    h2: Mutex<Vec<H2Connection>>,
    /// Held while an HTTP/2 connection is being opened, so that a burst of requests opens one
    /// connection rather than one each; holds the time and error of the last failed attempt so
    /// that requests that queued behind it fail with it instead of each trying again in turn.
    h2_connecting: tokio::sync::Mutex<Option<(Instant, String)>>,
}

/// Consecutive-failure counters and the current ejection.
#[derive(Debug, Default)]
struct Outlier {
    /// 5xx responses in a row.
    consecutive_5xx: u32,
    /// Connect failures, timeouts and broken exchanges in a row.
    consecutive_failures: u32,
    /// When the current ejection ends.
    ejected_until: Option<Instant>,
}

/// How one attempt ended, for outlier detection.
#[derive(Debug, Clone, Copy)]
enum Outcome {
    /// A response head with this status.
    Response(StatusCode),
    /// No response: connect failure, timeout or broken exchange.
    Failure,
}

/// A pooled HTTP/1.1 connection waiting for a request.
struct IdleConnection {
    /// The connection (dropping it closes the socket).
    conn: h1::Connection,
    /// When it became idle.
    since: Instant,
}

/// An open HTTP/2 connection.
#[derive(Clone)]
struct H2Connection {
    /// The request handle, cloned per request.
    sender: http2::SendRequest<Body>,
    /// Its stream accounting.
    streams: Arc<H2Streams>,
}

/// Streams of one HTTP/2 connection: ours in use, and the server's limit.
struct H2Streams {
    /// Requests on it whose response has not ended.
    active: AtomicUsize,
    /// hyper's connection future, driven by its [`DriveH2`] task (`None` once it has ended).
    /// It is here rather than in the task because it is the only handle that reads the
    /// server's current `SETTINGS_MAX_CONCURRENT_STREAMS`: a copy published after each poll
    /// goes stale, as hyper polls it only when a request is queued, not when SETTINGS arrive
    /// (a burst at connection start then queued on a full connection instead of opening one).
    conn: Mutex<Option<Pin<Box<H2Conn>>>>,
    /// When the last stream ended (for the idle timeout).
    idle_since: Mutex<Instant>,
}

impl H2Streams {
    /// Whether the server allows another stream now.
    fn has_room(&self) -> bool {
        let max = lock(&self.conn)
            .as_ref()
            .map_or(0, |c| c.current_max_send_streams());
        self.active.load(Ordering::Relaxed) < max
    }
}

impl Server {
    /// A server with no history.
    fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            key: balance::server_key(addr),
            weight: AtomicU32::new(0),
            healthy: AtomicBool::new(false),
            retired: AtomicBool::new(false),
            in_flight: AtomicU32::new(0),
            requests_total: AtomicU64::new(0),
            responses_5xx_total: AtomicU64::new(0),
            connect_failures_total: AtomicU64::new(0),
            timeouts_total: AtomicU64::new(0),
            errors_total: AtomicU64::new(0),
            outlier: Mutex::new(Outlier::default()),
            idle: (0..workers::count())
                .map(|_| Mutex::new(VecDeque::new()))
                .collect(),
            h2: Mutex::new(Vec::new()),
            h2_connecting: tokio::sync::Mutex::new(None),
        }
    }

    /// Closes idle connections and stops pooling: the server left the configuration.
    fn retire(&self) {
        self.retired.store(true, Ordering::Relaxed);
        for idle in &self.idle {
            lock(idle).clear();
        }
        lock(&self.h2).clear();
    }

    /// Whether the server is ejected at `now`.
    fn is_ejected(&self, now: Instant, pool: &str) -> bool {
        let mut outlier = lock(&self.outlier);
        match outlier.ejected_until {
            Some(until) if until > now => true,
            Some(_) => {
                outlier.ejected_until = None;
                tracing::info!(
                    pool,
                    server = %self.addr,
                    "outlier ejection over; the server takes requests again"
                );
                false
            }
            None => false,
        }
    }

    /// Counts an attempt's outcome towards ejection, and ejects the server when a threshold is
    /// reached (logging it once).
    fn record(&self, outcome: Outcome, pool: &str, config: &l7::Pool) {
        let mut outlier = lock(&self.outlier);
        let reason = match outcome {
            Outcome::Response(status) if status.is_server_error() => {
                outlier.consecutive_5xx += 1;
                outlier.consecutive_failures = 0;
                (config.outlier_consecutive_5xx > 0
                    && outlier.consecutive_5xx >= config.outlier_consecutive_5xx)
                    .then_some(("consecutive 5xx responses", outlier.consecutive_5xx))
            }
            Outcome::Response(_) => {
                outlier.consecutive_5xx = 0;
                outlier.consecutive_failures = 0;
                None
            }
            Outcome::Failure => {
                outlier.consecutive_failures += 1;
                (config.outlier_consecutive_failures > 0
                    && outlier.consecutive_failures >= config.outlier_consecutive_failures)
                    .then_some((
                        "consecutive connect failures or timeouts",
                        outlier.consecutive_failures,
                    ))
            }
        };
        // Most responses move no counter to its threshold: the clock only when one does.
        let Some((reason, count)) = reason else {
            return;
        };
        let now = Instant::now();
        if outlier.ejected_until.is_none_or(|until| until <= now) {
            outlier.ejected_until = Some(now + config.outlier_ejection);
            outlier.consecutive_5xx = 0;
            outlier.consecutive_failures = 0;
            tracing::warn!(
                pool,
                server = %self.addr,
                reason,
                count,
                ejection_ms = config.outlier_ejection.as_millis() as u64,
                "upstream server ejected by outlier detection"
            );
        }
    }

    /// The most recently idle pooled HTTP/1.1 connection that is still usable, dropping (and
    /// so closing) expired and closed ones on the way.
    fn checkout_h1(&self, config: &l7::Pool) -> Option<h1::Connection> {
        let mut idle = lock(self.my_idle());
        loop {
            let IdleConnection { conn, since } = idle.pop_back()?;
            if since.elapsed() < config.idle_timeout && conn.is_reusable() {
                return Some(conn);
            }
        }
    }

    /// The calling worker's idle HTTP/1.1 connections.
    fn my_idle(&self) -> &Mutex<VecDeque<IdleConnection>> {
        &self.idle[workers::current() % self.idle.len()]
    }

    /// Pools an HTTP/1.1 connection whose exchange has ended.
    fn park_h1(&self, conn: h1::Connection) {
        if self.retired.load(Ordering::Relaxed) {
            return;
        }
        let mut idle = lock(self.my_idle());
        idle.push_back(IdleConnection {
            conn,
            since: Instant::now(),
        });
        while idle.len() > MAX_IDLE_PER_SERVER.div_ceil(self.idle.len()) {
            idle.pop_front();
        }
    }

    /// An HTTP/2 connection with a free stream, reserved (its `active` count includes the
    /// caller's request), without opening one.
    fn find_h2(&self) -> Option<H2Connection> {
        let mut conns = lock(&self.h2);
        conns.retain(|c| !c.sender.is_closed());
        let free = conns.iter().find(|c| c.streams.has_room());
        let chosen = match free {
            Some(c) => c,
            None if conns.len() >= MAX_H2_CONNECTIONS_PER_SERVER => conns
                .iter()
                .min_by_key(|c| c.streams.active.load(Ordering::Relaxed))?,
            None => return None,
        };
        chosen.streams.active.fetch_add(1, Ordering::Relaxed);
        Some(chosen.clone())
    }

    /// An HTTP/2 connection with a stream reserved, opening one when none has a free stream;
    /// `Err` is the connect failure.
    async fn checkout_h2(&self, config: &l7::Pool) -> Result<H2Connection, String> {
        if let Some(c) = self.find_h2() {
            return Ok(c);
        }
        let arrived = Instant::now();
        let mut connecting = self.h2_connecting.lock().await;
        if let Some(c) = self.find_h2() {
            return Ok(c);
        }
        if let Some((failed_at, error)) = connecting.as_ref()
            && *failed_at >= arrived
        {
            return Err(error.clone());
        }
        match connect_h2(self.addr, config.connect_timeout).await {
            Ok(c) => {
                *connecting = None;
                c.streams.active.fetch_add(1, Ordering::Relaxed);
                if !self.retired.load(Ordering::Relaxed) {
                    lock(&self.h2).push(c.clone());
                }
                Ok(c)
            }
            Err(e) => {
                *connecting = Some((Instant::now(), e.clone()));
                Err(e)
            }
        }
    }

    /// Closes idle connections older than `idle_timeout` (and forgets closed ones).
    fn sweep(&self, idle_timeout: Duration) {
        for idle in &self.idle {
            lock(idle).retain(|c| c.since.elapsed() < idle_timeout && c.conn.is_reusable());
        }
        lock(&self.h2).retain(|c| {
            !c.sender.is_closed()
                && (c.streams.active.load(Ordering::Relaxed) > 0
                    || lock(&c.streams.idle_since).elapsed() < idle_timeout)
        });
    }

    /// The server's state for `xlb status`.
    fn status(&self, now: Instant) -> ServerStatus {
        let ejected_until = lock(&self.outlier).ejected_until.filter(|&u| u > now);
        let idle_h1: usize = self
            .idle
            .iter()
            .map(|idle| lock(idle).iter().filter(|c| c.conn.is_reusable()).count())
            .sum();
        let idle_h2 = lock(&self.h2)
            .iter()
            .filter(|c| !c.sender.is_closed() && c.streams.active.load(Ordering::Relaxed) == 0)
            .count();
        ServerStatus {
            address: self.addr.ip(),
            port: self.addr.port(),
            weight: u16::try_from(self.weight.load(Ordering::Relaxed)).unwrap_or(u16::MAX),
            healthy: self.healthy.load(Ordering::Relaxed),
            ejected: ejected_until.is_some(),
            ejection_seconds_left: ejected_until.map_or(0.0, |u| (u - now).as_secs_f64()),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            requests_total: self.requests_total.load(Ordering::Relaxed),
            responses_5xx_total: self.responses_5xx_total.load(Ordering::Relaxed),
            connect_failures_total: self.connect_failures_total.load(Ordering::Relaxed),
            timeouts_total: self.timeouts_total.load(Ordering::Relaxed),
            errors_total: self.errors_total.load(Ordering::Relaxed),
            idle_connections: idle_h1 + idle_h2,
        }
    }
}

/// Why one attempt failed, before it is counted.
#[derive(Debug)]
enum AttemptError {
    /// No connection (refused, unreachable, connect timeout, handshake).
    Connect(String),
    /// No response head within the request timeout.
    Timeout,
    /// The server broke the exchange.
    Upstream(String),
    /// The client's side broke it (its request body failed): not the server's fault, so not
    /// counted towards ejection.
    Client(String),
}

/// A failed attempt: the error, and the request when it provably never left (so it may be
/// retried).
struct Failed {
    /// What the client gets if this was the last attempt.
    error: UpstreamError,
    /// The untouched request, when nothing of it was written.
    request: Option<Request<Body>>,
}

/// What a successful exchange yields before it is counted.
struct Exchange {
    /// The response head and streaming body.
    response: Response<ExchangeBody>,
    /// From the send to the response head.
    latency: Duration,
}

/// A response body as the connection that carries it gives it.
enum ExchangeBody {
    /// From hyper (HTTP/2, with the stream it occupies; upgrades).
    Hyper(Incoming, Option<Arc<H2Streams>>),
    /// From the gateway's own HTTP/1.1 client, which pools its connection at the body's end.
    H1(h1::ResponseBody),
}

/// One attempt on `server`: connect or reuse, send, wait for the response head; counts the
/// outcome.
async fn attempt(
    pool: &str,
    config: &l7::Pool,
    server: &Arc<Server>,
    req: Request<Body>,
    upgrade: bool,
) -> Result<(Response<Body>, Duration), Failed> {
    let flight = Flight::start(server.clone());
    let client_wait = req.extensions().get::<ClientBodyWait>().cloned();
    let result = if upgrade {
        send_upgrade(config, server, req).await
    } else {
        match config.protocol {
            UpstreamProtocol::Http1 => send_h1(config, server, req).await,
            UpstreamProtocol::Http2 => send_h2(config, server, req).await,
        }
    };
    match result {
        Ok(exchange) => {
            let status = exchange.response.status();
            server.requests_total.fetch_add(1, Ordering::Relaxed);
            if status.is_server_error() {
                server.responses_5xx_total.fetch_add(1, Ordering::Relaxed);
            }
            server.record(Outcome::Response(status), pool, config);
            let latency = exchange.latency;
            let (parts, body) = exchange.response.into_parts();
            let mut flight = flight;
            let body = match body {
                ExchangeBody::Hyper(incoming, stream) => {
                    flight.stream = stream;
                    TrackedBody {
                        inner: incoming,
                        _flight: Some(flight),
                    }
                    .map_err(Into::into)
                    .boxed()
                }
                ExchangeBody::H1(mut body) => {
                    let server = server.clone();
                    body.on_end(Box::new(move |conn| {
                        if let Some(conn) = conn {
                            server.park_h1(conn);
                        }
                        drop(flight);
                    }));
                    body.boxed()
                }
            };
            Ok((Response::from_parts(parts, body), latency))
        }
        Err((error, request)) => {
            let error = match error {
                AttemptError::Connect(e) => {
                    server
                        .connect_failures_total
                        .fetch_add(1, Ordering::Relaxed);
                    server.record(Outcome::Failure, pool, config);
                    UpstreamError::Connect(e)
                }
                AttemptError::Timeout
                    if client_wait.as_ref().is_some_and(ClientBodyWait::waiting) =>
                {
                    server.requests_total.fetch_add(1, Ordering::Relaxed);
                    UpstreamError::ClientTimeout
                }
                AttemptError::Timeout => {
                    server.requests_total.fetch_add(1, Ordering::Relaxed);
                    server.timeouts_total.fetch_add(1, Ordering::Relaxed);
                    server.record(Outcome::Failure, pool, config);
                    UpstreamError::Timeout
                }
                AttemptError::Upstream(e) => {
                    server.requests_total.fetch_add(1, Ordering::Relaxed);
                    server.errors_total.fetch_add(1, Ordering::Relaxed);
                    server.record(Outcome::Failure, pool, config);
                    UpstreamError::Protocol(e)
                }
                AttemptError::Client(e) => {
                    server.requests_total.fetch_add(1, Ordering::Relaxed);
                    UpstreamError::Protocol(e)
                }
            };
            Err(Failed { error, request })
        }
    }
}

/// The result of one protocol's send: the exchange, or the error with the request when it was
/// never written.
type SendResult = Result<Exchange, (AttemptError, Option<Request<Body>>)>;

/// Sends over a pooled or new HTTP/1.1 keep-alive connection.
async fn send_h1(config: &l7::Pool, server: &Server, req: Request<Body>) -> SendResult {
    let mut req = req;
    loop {
        let (conn, reused) = match server.checkout_h1(config) {
            Some(conn) => (conn, true),
            None => match h1::Connection::connect(server.addr, config.connect_timeout).await {
                Ok(conn) => (conn, false),
                Err(e) => return Err((AttemptError::Connect(e), Some(req))),
            },
        };
        let started = Instant::now();
        match tokio::time::timeout(
            config.request_timeout,
            h1::exchange(conn, req, reused, config.request_timeout),
        )
        .await
        {
            Err(_) => return Err((AttemptError::Timeout, None)),
            Ok(Ok(response)) => {
                return Ok(Exchange {
                    response: response.map(ExchangeBody::H1),
                    latency: started.elapsed(),
                });
            }
            // A pooled connection the server had closed: the request did not reach it, so it
            // goes on the next connection as if this one had not been there (this is
            // connection reuse, not a retry).
            Ok(Err(h1::ExchangeError::NotSent(unsent, _))) if reused => req = *unsent,
            Ok(Err(h1::ExchangeError::NotSent(unsent, e))) => {
                return Err((AttemptError::Connect(e), Some(*unsent)));
            }
            Ok(Err(h1::ExchangeError::Upstream(e))) => {
                return Err((AttemptError::Upstream(e), None));
            }
            Ok(Err(h1::ExchangeError::Client(e))) => return Err((AttemptError::Client(e), None)),
        }
    }
}

/// Sends as a stream of a shared HTTP/2 connection.
async fn send_h2(config: &l7::Pool, server: &Server, mut req: Request<Body>) -> SendResult {
    // Bounded: each pass either sends or finds the connection closed (and so forgotten).
    for _ in 0..=MAX_H2_CONNECTIONS_PER_SERVER {
        let conn = match server.checkout_h2(config).await {
            Ok(conn) => conn,
            Err(e) => return Err((AttemptError::Connect(e), Some(req))),
        };
        let stream = StreamReservation(Some(conn.streams.clone()));
        let mut sender = conn.sender.clone();
        let started = Instant::now();
        match tokio::time::timeout(config.request_timeout, sender.try_send_request(req)).await {
            Err(_) => return Err((AttemptError::Timeout, None)),
            Ok(Ok(response)) => {
                let stream = stream.keep();
                return Ok(Exchange {
                    response: response.map(|incoming| ExchangeBody::Hyper(incoming, stream)),
                    latency: started.elapsed(),
                });
            }
            Ok(Err(mut e)) => match e.take_message() {
                Some(unsent) => req = unsent,
                None => return Err((classify(&e.into_error()), None)),
            },
        }
    }
    Err((
        AttemptError::Connect("HTTP/2 connections kept closing".to_owned()),
        Some(req),
    ))
}

/// Sends an upgrade request over a fresh HTTP/1.1 connection that supports upgrades and is
/// never pooled: after a 101 it belongs to the tunnel, and otherwise it is not worth keeping.
async fn send_upgrade(config: &l7::Pool, server: &Server, req: Request<Body>) -> SendResult {
    let mut sender = match connect_upgradable(server.addr, config.connect_timeout).await {
        Ok(sender) => sender,
        Err(e) => return Err((AttemptError::Connect(e), Some(req))),
    };
    let started = Instant::now();
    match tokio::time::timeout(config.request_timeout, sender.try_send_request(req)).await {
        Err(_) => Err((AttemptError::Timeout, None)),
        Ok(Ok(response)) => Ok(Exchange {
            response: response.map(|incoming| ExchangeBody::Hyper(incoming, None)),
            latency: started.elapsed(),
        }),
        Ok(Err(mut e)) => match e.take_message() {
            Some(unsent) => Err((
                AttemptError::Connect(e.into_error().to_string()),
                Some(unsent),
            )),
            None => Err((classify(&e.into_error()), None)),
        },
    }
}

/// Whose fault a failed exchange is.
fn classify(error: &hyper::Error) -> AttemptError {
    if error.is_user() {
        AttemptError::Client(error.to_string())
    } else {
        AttemptError::Upstream(error.to_string())
    }
}

/// A TCP connection to `addr` for hyper (see [`h1::connect_nodelay`]).
async fn connect_tcp(addr: SocketAddr) -> Result<TcpIo, String> {
    h1::connect_nodelay(addr).await.map(TokioIo::new)
}

/// The I/O type of upstream connections.
type TcpIo = TokioIo<TcpStream>;

/// A new HTTP/1.1 connection on hyper with upgrade support (for WebSocket), its task spawned;
/// the whole of it within `connect_timeout`.
async fn connect_upgradable(
    addr: SocketAddr,
    connect_timeout: Duration,
) -> Result<http1::SendRequest<Body>, String> {
    let connect = async {
        let io = connect_tcp(addr).await?;
        let (sender, conn) = http1::Builder::new()
            .handshake::<_, Body>(io)
            .await
            .map_err(|e| format!("HTTP/1.1 handshake with {addr}: {e}"))?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(server = %addr, error = %e, "upstream connection ended");
            }
        });
        Ok(sender)
    };
    tokio::time::timeout(connect_timeout, connect)
        .await
        .map_err(|_| h1::connect_timed_out(addr, connect_timeout))?
}

/// A new h2c (prior knowledge) connection, its task spawned; within `connect_timeout`.
async fn connect_h2(addr: SocketAddr, connect_timeout: Duration) -> Result<H2Connection, String> {
    let connect = async {
        let io = connect_tcp(addr).await?;
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(H2_PING_INTERVAL)
            .keep_alive_timeout(H2_PING_TIMEOUT)
            .handshake::<_, Body>(io)
            .await
            .map_err(|e| format!("HTTP/2 handshake with {addr}: {e}"))?;
        let streams = Arc::new(H2Streams {
            active: AtomicUsize::new(0),
            conn: Mutex::new(Some(Box::pin(conn))),
            idle_since: Mutex::new(Instant::now()),
        });
        tokio::spawn(DriveH2 {
            streams: streams.clone(),
            addr,
        });
        Ok(H2Connection { sender, streams })
    };
    tokio::time::timeout(connect_timeout, connect)
        .await
        .map_err(|_| h1::connect_timed_out(addr, connect_timeout))?
}

/// hyper's HTTP/2 client connection type.
type H2Conn = http2::Connection<TcpIo, Body, TokioExecutor>;

/// Runs an HTTP/2 connection kept in [`H2Streams::conn`] (so the pool can read its stream
/// limit), and drops it when it ends.
struct DriveH2 {
    /// Holds the connection.
    streams: Arc<H2Streams>,
    /// For the log line when it ends.
    addr: SocketAddr,
}

impl std::future::Future for DriveH2 {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut conn = lock(&self.streams.conn);
        let Some(running) = conn.as_mut() else {
            return Poll::Ready(());
        };
        match running.as_mut().poll(cx) {
            Poll::Ready(result) => {
                *conn = None;
                if let Err(e) = result {
                    tracing::debug!(server = %self.addr, error = %e, "upstream HTTP/2 connection ended");
                }
                Poll::Ready(())
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// A stream reserved on an HTTP/2 connection, released on drop unless kept for the response.
struct StreamReservation(Option<Arc<H2Streams>>);

impl StreamReservation {
    /// Hands the reservation to the response, which releases it when its body ends.
    fn keep(mut self) -> Option<Arc<H2Streams>> {
        self.0.take()
    }
}

impl Drop for StreamReservation {
    fn drop(&mut self) {
        if let Some(streams) = self.0.take() {
            release_stream(&streams);
        }
    }
}

/// Ends one stream's use of an HTTP/2 connection.
fn release_stream(streams: &H2Streams) {
    streams.active.fetch_sub(1, Ordering::Relaxed);
    *lock(&streams.idle_since) = Instant::now();
}

/// A request in flight to a server: counted from the pick until the response body ends or is
/// dropped, so that least request sees long downloads and slow connects.
struct Flight {
    /// The server it is counted on.
    server: Arc<Server>,
    /// The HTTP/2 stream it occupies, if any.
    stream: Option<Arc<H2Streams>>,
}

impl Flight {
    /// Counts a request on `server`.
    fn start(server: Arc<Server>) -> Self {
        server.in_flight.fetch_add(1, Ordering::Relaxed);
        Self {
            server,
            stream: None,
        }
    }
}

impl Drop for Flight {
    fn drop(&mut self) {
        self.server.in_flight.fetch_sub(1, Ordering::Relaxed);
        if let Some(streams) = self.stream.take() {
            release_stream(&streams);
        }
    }
}

/// A hyper response body that ends its request's accounting (in-flight count, HTTP/2
/// stream) when it ends or is dropped.
struct TrackedBody {
    /// The upstream's body.
    inner: Incoming,
    /// Dropped when the body ends.
    _flight: Option<Flight>,
}

impl hyper::body::Body for TrackedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(None | Some(Err(_))) = &polled {
            this._flight = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Whether the request asks for a protocol upgrade (WebSocket): HTTP/1.1 with `Upgrade`.
fn is_upgrade(req: &Request<Body>) -> bool {
    req.version() == Version::HTTP_11 && req.headers().contains_key(UPGRADE)
}

/// Methods that RFC 9110 section 9.2.2 defines as idempotent: the only ones retried, and the
/// only ones [`h1::exchange`] sends again when a pooled connection was closed under them.
pub(crate) fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// The hash of the request's affinity key, for `"hash"` pools that find it; `None` sends the
/// request round robin. An empty value counts as absent, or every client without a session
/// would land on one server.
fn affinity_hash(balance: &Balance, headers: &HeaderMap) -> Option<u64> {
    let value = match balance {
        Balance::Hash(HashOn::Header(name)) => headers.get(name).map(HeaderValue::as_bytes),
        Balance::Hash(HashOn::Cookie(name)) => balance::cookie_value(headers, name),
        _ => None,
    }?;
    (!value.is_empty()).then(|| balance::hash_key(value))
}

/// Headers HTTP/2 forbids (RFC 9113 section 8.2.2): they describe an HTTP/1.1 connection.
const H2_FORBIDDEN: [http::HeaderName; 4] = [
    CONNECTION,
    TRANSFER_ENCODING,
    UPGRADE,
    http::HeaderName::from_static("keep-alive"),
];

/// Removes what HTTP/2 forbids: connection-specific headers, those `Connection` names, and
/// `TE` except `trailers` (requests only; responses must not carry `TE` at all). hyper would
/// strip them too, but with a warning per message.
fn strip_for_h2(headers: &mut HeaderMap, request: bool) {
    let named: Vec<http::HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| http::HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .filter(|name| *name != HOST && *name != http::header::CONTENT_LENGTH)
        .collect();
    for name in named.iter().chain(&H2_FORBIDDEN) {
        headers.remove(name);
    }
    headers.remove("proxy-connection");
    let te_trailers = headers
        .get_all(TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("trailers"));
    headers.remove(TE);
    if request && te_trailers {
        headers.insert(TE, HeaderValue::from_static("trailers"));
    }
}

/// Puts the request into the form the upstream connection speaks: HTTP/1.1 gets an origin-form
/// target and `Host`; HTTP/2 gets an absolute URI whose authority (hyper's `:authority`) is the
/// `Host` header, without `Host` itself or connection-specific headers.
fn translate_request(
    req: Request<Body>,
    protocol: UpstreamProtocol,
) -> Result<Request<Body>, UpstreamError> {
    let (mut parts, body) = req.into_parts();
    let host = parts.headers.get(HOST).cloned().or_else(|| {
        parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });
    let target = match parts.uri.path_and_query() {
        Some(pq) if !pq.as_str().is_empty() => pq.clone(),
        _ => http::uri::PathAndQuery::from_static("/"),
    };
    match protocol {
        UpstreamProtocol::Http1 => {
            parts.version = Version::HTTP_11;
            parts.uri = Uri::from(target);
            if let Some(host) = host {
                parts.headers.entry(HOST).or_insert(host);
            }
        }
        UpstreamProtocol::Http2 => {
            let authority = host
                .as_ref()
                .and_then(|h| h.to_str().ok())
                .ok_or_else(|| UpstreamError::Protocol("request without a usable Host".into()))?;
            parts.version = Version::HTTP_2;
            parts.uri = Uri::builder()
                .scheme(http::uri::Scheme::HTTP)
                .authority(authority)
                .path_and_query(target)
                .build()
                .map_err(|e| UpstreamError::Protocol(format!("Host as :authority: {e}")))?;
            parts.headers.remove(HOST);
            strip_for_h2(&mut parts.headers, true);
        }
    }
    Ok(Request::from_parts(parts, body))
}

/// Puts the response into the client's version (a 101 keeps everything, including the upgrade
/// hyper attached to it), stripping what HTTP/2 forbids when the client speaks it.
fn finish_response(mut response: Response<Body>, client_version: Version) -> Response<Body> {
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        *response.version_mut() = client_version;
        if client_version == Version::HTTP_2 {
            strip_for_h2(response.headers_mut(), false);
        }
    }
    response
}

/// Reads a lock, ignoring poisoning: every critical section here leaves the data consistent.
fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

/// Writes a lock, ignoring poisoning (see [`read`]).
fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

/// Locks a mutex, ignoring poisoning (see [`read`]).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Backend, Failover, Protocol, Vip, VipMode};
    use http_body_util::{Empty, Full};
    use hyper::service::service_fn;
    use hyper_util::server::conn::auto;
    use std::convert::Infallible;
    use std::future::Future;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    const MS: Duration = Duration::from_millis(1);

    type Reply = Response<Full<Bytes>>;
    type Handler =
        Arc<dyn Fn(Request<Incoming>) -> Pin<Box<dyn Future<Output = Reply> + Send>> + Send + Sync>;

    /// A tiny upstream (HTTP/1.1 and h2c, with upgrades) on 127.0.0.1 that counts connections.
    struct TestServer {
        addr: SocketAddr,
        /// Connections accepted.
        accepted: Arc<AtomicUsize>,
        /// Connections still open (the client has not closed them).
        open: Arc<AtomicUsize>,
        /// Requests received.
        hits: Arc<AtomicUsize>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Drop for TestServer {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    async fn serve(handler: Handler) -> TestServer {
        serve_with(handler, None).await
    }

    /// [`serve`], announcing at most `max_streams` concurrent HTTP/2 streams.
    async fn serve_with(handler: Handler, max_streams: Option<u32>) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let open = Arc::new(AtomicUsize::new(0));
        let hits = Arc::new(AtomicUsize::new(0));
        let (a, o, h) = (accepted.clone(), open.clone(), hits.clone());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                o.fetch_add(1, Ordering::SeqCst);
                let (handler, open, hits) = (handler.clone(), o.clone(), h.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        hits.fetch_add(1, Ordering::SeqCst);
                        let reply = handler(req);
                        async move { Ok::<_, Infallible>(reply.await) }
                    });
                    let mut builder = auto::Builder::new(TokioExecutor::new());
                    if let Some(max) = max_streams {
                        builder.http2().max_concurrent_streams(max);
                    }
                    let _ = builder
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .await;
                    open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        TestServer {
            addr,
            accepted,
            open,
            hits,
            task,
        }
    }

    /// Answers `status` after `delay`, describing the request it saw in headers.
    fn reply(status: u16, delay: Duration) -> Handler {
        Arc::new(move |req: Request<Incoming>| {
            Box::pin(async move {
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                let host = req
                    .headers()
                    .get(HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_owned)
                    .or_else(|| req.uri().authority().map(|a| a.to_string()))
                    .unwrap_or_default();
                Response::builder()
                    .status(status)
                    .header("x-version", format!("{:?}", req.version()))
                    .header("x-uri", req.uri().to_string())
                    .header("x-host", host)
                    .header(
                        "x-had-host-header",
                        req.headers().contains_key(HOST).to_string(),
                    )
                    .header("keep-alive", "timeout=5")
                    .body(Full::new(Bytes::from_static(b"ok")))
                    .unwrap()
            })
        })
    }

    fn ok() -> Handler {
        reply(200, Duration::ZERO)
    }

    /// A closed port: connecting is refused.
    async fn closed_port() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    }

    fn pool_config(name: &str, tune: impl FnOnce(&mut l7::Pool)) -> l7::Pool {
        let mut pool = l7::Pool::with_defaults(name);
        pool.connect_timeout = 500 * MS;
        pool.request_timeout = 2000 * MS;
        tune(&mut pool);
        pool
    }

    /// An l7 VIP with `pools` and backends `(pool, address, weight)`.
    fn vip(pools: Vec<l7::Pool>, backends: &[(&str, SocketAddr, u16)]) -> Vip {
        let mut gateway = l7::Gateway::defaults();
        gateway.pools = pools;
        Vip {
            name: "web".to_owned(),
            address: "192.0.2.1".parse().unwrap(),
            port: 80,
            protocol: Protocol::Tcp,
            mode: VipMode::L7,
            table_size: 65537,
            health_check: None,
            panic_threshold: 0.5,
            regions: Vec::new(),
            failover: Failover::default(),
            backends: backends
                .iter()
                .map(|&(pool, addr, weight)| Backend {
                    address: addr.ip(),
                    weight,
                    region: "local".to_owned(),
                    mac: None,
                    port: Some(addr.port()),
                    pool: pool.to_owned(),
                    health_check: None,
                })
                .collect(),
            gateway: Some(gateway),
        }
    }

    /// Upstreams with one pool `"p"` over `servers` (weight 1, all healthy).
    fn upstreams(config: l7::Pool, servers: &[SocketAddr]) -> (Upstreams, Arc<Pool>) {
        let backends: Vec<(&str, SocketAddr, u16)> = servers.iter().map(|&a| ("p", a, 1)).collect();
        let up = Upstreams::new();
        up.configure(&vip(vec![config], &backends), &|_| true);
        let pool = up.pool("p").unwrap();
        (up, pool)
    }

    fn empty() -> Body {
        Empty::<Bytes>::new().map_err(Into::into).boxed()
    }

    fn get(target: &str) -> Request<Body> {
        Request::get(target)
            .header(HOST, "app.test")
            .body(empty())
            .unwrap()
    }

    fn header<'r>(fwd: &'r Forwarded, name: &str) -> &'r str {
        fwd.response.headers()[name].to_str().unwrap()
    }

    async fn body(fwd: Forwarded) -> Bytes {
        fwd.response.into_body().collect().await.unwrap().to_bytes()
    }

    fn server_status(up: &Upstreams, addr: SocketAddr) -> ServerStatus {
        up.status()
            .into_iter()
            .flat_map(|p| p.servers)
            .find(|s| s.address == addr.ip() && s.port == addr.port())
            .unwrap()
    }

    /// Waits (bounded) until `cond` holds.
    async fn eventually(what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(2);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(5 * MS).await;
        }
    }

    #[test]
    fn public_types_are_thread_safe() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Upstreams>();
        send_sync::<Pool>();
        fn send<T: Send>(_: &T) {}
        let pool = Pool::new(&l7::Pool::with_defaults("p"));
        send(&pool.send(get("/")));
    }

    #[test]
    fn errors_map_to_gateway_statuses() {
        assert_eq!(UpstreamError::NoServer.status(), 503);
        assert_eq!(UpstreamError::Connect("x".into()).status(), 502);
        assert_eq!(UpstreamError::Timeout.status(), 504);
        assert_eq!(UpstreamError::Protocol("x".into()).status(), 502);
    }

    #[tokio::test]
    async fn http1_pool_reuses_one_connection_and_counts_in_flight_until_the_body_ends() {
        let server = serve(ok()).await;
        let (up, pool) = upstreams(pool_config("p", |_| {}), &[server.addr]);
        for i in 0..100 {
            let fwd = pool.send(get(&format!("/a?i={i}"))).await.unwrap();
            assert_eq!(fwd.attempts, 1);
            assert_eq!(fwd.server, server.addr);
            assert_eq!(header(&fwd, "x-uri"), format!("/a?i={i}"));
            assert_eq!(header(&fwd, "x-host"), "app.test");
            assert_eq!(header(&fwd, "x-version"), "HTTP/1.1");
            if i == 0 {
                // The body is still upstream: the request is in flight.
                assert_eq!(server_status(&up, server.addr).in_flight, 1);
            }
            assert_eq!(body(fwd).await, "ok");
        }
        assert_eq!(server.accepted.load(Ordering::SeqCst), 1);
        let status = server_status(&up, server.addr);
        assert_eq!(status.in_flight, 0);
        assert_eq!(status.requests_total, 100);
        assert_eq!(status.idle_connections, 1);
        // A response dropped unread ends the count too (and its connection is not reused).
        let fwd = pool.send(get("/")).await.unwrap();
        assert_eq!(server_status(&up, server.addr).in_flight, 1);
        drop(fwd);
        assert_eq!(server_status(&up, server.addr).in_flight, 0);
    }

    /// Answers with the request body it read (to the end) as its own.
    fn echo_body() -> Handler {
        Arc::new(|req: Request<Incoming>| {
            Box::pin(async move {
                let body = req.into_body().collect().await.unwrap().to_bytes();
                Response::new(Full::new(body))
            })
        })
    }

    fn put(target: &str, data: &'static [u8]) -> Request<Body> {
        Request::put(target)
            .header(HOST, "app.test")
            .body(
                Full::new(Bytes::from_static(data))
                    .map_err(Into::into)
                    .boxed(),
            )
            .unwrap()
    }

    #[tokio::test]
    async fn request_bodies_reach_the_server_and_keep_the_connection_pooled() {
        let server = serve(echo_body()).await;
        for protocol in [UpstreamProtocol::Http1, UpstreamProtocol::Http2] {
            let (_up, pool) =
                upstreams(pool_config("p", |p| p.protocol = protocol), &[server.addr]);
            let before = server.accepted.load(Ordering::SeqCst);
            for _ in 0..10 {
                let fwd = pool.send(put("/u", b"payload")).await.unwrap();
                assert_eq!(body(fwd).await, "payload");
            }
            assert_eq!(
                server.accepted.load(Ordering::SeqCst),
                before + 1,
                "{protocol:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_pooled_connection_the_server_closed_is_not_used() {
        // A server that answers once per connection and then closes it without saying so
        // (no `Connection: close`), as servers with a short keep-alive timeout do.
        fn script(_: usize, _: usize) -> Act {
            Act::ReplyAndClose(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        }
        let (addr, accepted, task) = scripted(script).await;
        let (up, pool) = upstreams(pool_config("p", |_| {}), &[addr]);
        for i in 1..=3 {
            let fwd = pool.send(get("/")).await.unwrap();
            assert_eq!(fwd.attempts, 1);
            assert_eq!(body(fwd).await, "ok");
            assert_eq!(accepted.load(Ordering::SeqCst), i);
            // Pooled, then closed by the server.
            eventually("server close noticed", || {
                server_status(&up, addr).idle_connections == 0
            })
            .await;
        }
        task.abort();
    }

    /// What a scripted upstream does with one request.
    enum Act {
        /// Writes these bytes and reads the next request.
        Reply(&'static [u8]),
        /// Closes the connection without answering.
        Close,
        /// Writes these bytes, then closes the connection.
        ReplyAndClose(&'static [u8]),
    }

    /// A raw HTTP/1.1 upstream: for the `r`th request head (0-based) on its `c`th connection
    /// (0-based) it does `script(c, r)`; it never reads request bodies. Returns its address
    /// and its count of accepted connections.
    async fn scripted(
        script: fn(usize, usize) -> Act,
    ) -> (SocketAddr, Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let c = count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut pending = Vec::new();
                    let mut buf = [0u8; 4096];
                    for r in 0.. {
                        let end = loop {
                            if let Some(at) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                                break at + 4;
                            }
                            match stream.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => pending.extend_from_slice(&buf[..n]),
                            }
                        };
                        pending.drain(..end);
                        match script(c, r) {
                            Act::Reply(bytes) => {
                                if stream.write_all(bytes).await.is_err() {
                                    return;
                                }
                            }
                            Act::Close => return,
                            Act::ReplyAndClose(bytes) => {
                                let _ = stream.write_all(bytes).await;
                                return;
                            }
                        }
                    }
                });
            }
        });
        (addr, accepted, task)
    }

    /// A raw HTTP/1.1 upstream that reads `Content-Length` request bodies and answers each
    /// request `200` with the body it read and its request line in `x-seen`, except that it
    /// refuses every `Expect: 100-continue` with a final `417` and, having never said `100`,
    /// takes the bytes that follow as the next request (as servers that trust the client to
    /// wait for the `100` do). Returns its address, the request lines it read, and its task.
    async fn refusing_expectations() -> (
        SocketAddr,
        Arc<Mutex<Vec<String>>>,
        tokio::task::JoinHandle<()>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let log = log.clone();
                tokio::spawn(async move {
                    let mut pending = Vec::new();
                    let mut buf = [0u8; 4096];
                    // Reads until `pending` holds `n` bytes; false at the close.
                    macro_rules! fill {
                        ($n:expr) => {
                            let want = $n;
                            while pending.len() < want {
                                match stream.read(&mut buf).await {
                                    Ok(0) | Err(_) => return,
                                    Ok(n) => pending.extend_from_slice(&buf[..n]),
                                }
                            }
                        };
                    }
                    loop {
                        let end = loop {
                            if let Some(at) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                                break at + 4;
                            }
                            fill!(pending.len() + 1);
                        };
                        let head = String::from_utf8_lossy(&pending[..end]).to_ascii_lowercase();
                        pending.drain(..end);
                        let line = head.lines().next().unwrap_or_default().to_owned();
                        log.lock().unwrap().push(line.clone());
                        let field = |name: &str| {
                            head.lines()
                                .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_owned()))
                        };
                        if field("expect:").as_deref() == Some("100-continue") {
                            let refused =
                                b"HTTP/1.1 417 Expectation Failed\r\ncontent-length: 0\r\n\r\n";
                            if stream.write_all(refused).await.is_err() {
                                return;
                            }
                            continue;
                        }
                        let len: usize = field("content-length:").map_or(0, |v| v.parse().unwrap());
                        fill!(len);
                        let body: Vec<u8> = pending.drain(..len).collect();
                        let mut reply = format!(
                            "HTTP/1.1 200 OK\r\nx-seen: {line}\r\ncontent-length: {}\r\n\r\n",
                            body.len()
                        )
                        .into_bytes();
                        reply.extend_from_slice(&body);
                        if stream.write_all(&reply).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (addr, seen, task)
    }

    #[tokio::test]
    async fn a_client_expect_is_not_forwarded_as_the_body_goes_up_without_waiting() {
        // The gateway sends the body at once (the client already had its 100 from the
        // gateway); an upstream that believed the expectation would take the body for a
        // request of its own: one the gateway never routed, authenticated or rate limited.
        let smuggled = b"GET /smuggled HTTP/1.1\r\nhost: app.test\r\n\r\n";
        let mut large = smuggled.to_vec();
        large.resize(3 * h1::COALESCE_BODY, b'x');
        let (addr, seen, task) = refusing_expectations().await;
        let (_up, pool) = upstreams(pool_config("p", |_| {}), &[addr]);
        // A body small enough to go with the head, and one written after it.
        for (i, data) in [smuggled.to_vec(), large].into_iter().enumerate() {
            for expect in ["100-continue", "100-Continue"] {
                seen.lock().unwrap().clear();
                let req = Request::post("/upload")
                    .header(HOST, "app.test")
                    .header("expect", expect)
                    .body(
                        Full::new(Bytes::from(data.clone()))
                            .map_err(Into::into)
                            .boxed(),
                    )
                    .unwrap();
                let fwd = pool.send(req).await.unwrap();
                assert_eq!(fwd.response.status(), StatusCode::OK, "body {i}, {expect}");
                assert_eq!(body(fwd).await, data, "body {i}, {expect}");
                // The next request on the pool gets its own answer.
                let fwd = pool.send(get("/next")).await.unwrap();
                assert_eq!(header(&fwd, "x-seen"), "get /next http/1.1");
                body(fwd).await;
                assert_eq!(
                    *seen.lock().unwrap(),
                    ["post /upload http/1.1", "get /next http/1.1"],
                    "body {i}, {expect}"
                );
            }
        }
        task.abort();
    }

    #[tokio::test]
    async fn a_declared_length_the_body_does_not_fill_never_goes_up() {
        // A request declaring more than its (already ended) body holds: sent as declared, the
        // server would take the next request's first bytes on the connection as the rest of
        // this body. It fails as the client's fault, before anything is written.
        let server = serve(ok()).await;
        let (up, pool) = upstreams(pool_config("p", |_| {}), &[server.addr]);
        for method in [Method::POST, Method::PUT, Method::GET] {
            for declared in ["1", "5", "4096", "4097", "1000000"] {
                let req = Request::builder()
                    .method(method.clone())
                    .uri("/")
                    .header(HOST, "app.test")
                    .header(http::header::CONTENT_LENGTH, declared)
                    .body(empty())
                    .unwrap();
                let e = pool.send(req).await.unwrap_err();
                assert!(
                    matches!(e.error, UpstreamError::Protocol(_)),
                    "{method} {declared}: {e}"
                );
                // What follows on the pool is read as sent.
                let fwd = pool.send(get("/after")).await.unwrap();
                assert_eq!(header(&fwd, "x-uri"), "/after", "{method} {declared}");
                assert_eq!(body(fwd).await, "ok");
            }
        }
        assert_eq!(server.hits.load(Ordering::SeqCst), 15);
        let status = server_status(&up, server.addr);
        assert_eq!((status.in_flight, status.errors_total), (0, 0));
    }

    #[tokio::test]
    async fn ambiguously_framed_responses_are_refused_and_their_connection_dropped() {
        fn script(_: usize, r: usize) -> Act {
            Act::Reply(match r {
                0 => {
                    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ntransfer-encoding: chunked\r\n\r\nok"
                }
                1 => b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nok",
                2 => b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, identity\r\n\r\n",
                _ => b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
            })
        }
        let (addr, accepted, task) = scripted(script).await;
        let (up, pool) = upstreams(
            pool_config("p", |p| p.outlier_consecutive_failures = 0),
            &[addr],
        );
        for i in 1..=3 {
            let e = pool.send(get("/")).await.unwrap_err();
            assert!(matches!(e.error, UpstreamError::Protocol(_)), "{e}");
            assert_eq!(e.status(), StatusCode::BAD_GATEWAY);
            // Not pooled: the next request needs a new connection (each of which the script
            // starts at its first answer again).
            assert_eq!(accepted.load(Ordering::SeqCst), i);
            assert_eq!(server_status(&up, addr).idle_connections, 0);
        }
        assert_eq!(server_status(&up, addr).errors_total, 3);
        task.abort();
    }

    #[tokio::test]
    async fn chunked_responses_keep_their_trailers_and_their_connection() {
        fn script(_: usize, r: usize) -> Act {
            Act::Reply(match r {
                0 => b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\ngrpc-status: 0\r\n\r\n",
                _ => b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n",
            })
        }
        let (addr, accepted, task) = scripted(script).await;
        let (up, pool) = upstreams(pool_config("p", |_| {}), &[addr]);
        let fwd = pool.send(get("/")).await.unwrap();
        let collected = fwd.response.into_body().collect().await.unwrap();
        assert_eq!(collected.trailers().unwrap()["grpc-status"], "0");
        assert_eq!(collected.to_bytes(), "abcde");
        assert_eq!(server_status(&up, addr).idle_connections, 1);
        // A HEAD's response has no body whatever its Content-Length says, and the connection
        // stays usable.
        let head = Request::head("/")
            .header(HOST, "app.test")
            .body(empty())
            .unwrap();
        let fwd = pool.send(head).await.unwrap();
        assert_eq!(fwd.response.headers()["content-length"], "9");
        assert!(body(fwd).await.is_empty());
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(server_status(&up, addr).idle_connections, 1);
        task.abort();
    }

    #[tokio::test]
    async fn a_pooled_connection_closed_as_a_request_went_out_resends_only_idempotent_ones() {
        // The first two connections answer once, then close when the next request arrives
        // (an idle timeout racing it); later ones answer everything.
        fn script(c: usize, r: usize) -> Act {
            if c < 2 && r == 1 {
                Act::Close
            } else {
                Act::Reply(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            }
        }
        let (addr, accepted, task) = scripted(script).await;
        let (_up, pool) = upstreams(pool_config("p", |p| p.retries = 0), &[addr]);
        assert_eq!(body(pool.send(get("/")).await.unwrap()).await, "ok");
        // The GET goes out again on a new connection: not a retry, the same attempt.
        let fwd = pool.send(get("/")).await.unwrap();
        assert_eq!(fwd.attempts, 1);
        assert_eq!(body(fwd).await, "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        // A POST may have been acted on before the close: it is not sent again.
        let post = Request::post("/")
            .header(HOST, "app.test")
            .body(empty())
            .unwrap();
        let e = pool.send(post).await.unwrap_err();
        assert_eq!(e.status(), StatusCode::BAD_GATEWAY, "{e}");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        task.abort();
    }

    #[tokio::test]
    async fn a_response_body_that_stalls_fails_after_the_request_timeout_and_ends_its_flight() {
        // Two of ten bytes, then nothing: the connection stays open, waiting.
        fn script(_: usize, _: usize) -> Act {
            Act::Reply(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nab")
        }
        let (addr, _accepted, task) = scripted(script).await;
        let (up, pool) = upstreams(pool_config("p", |p| p.request_timeout = 300 * MS), &[addr]);
        let fwd = pool.send(get("/")).await.unwrap();
        assert_eq!(server_status(&up, addr).in_flight, 1);
        let started = Instant::now();
        let mut body = fwd.response.into_body();
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "ab");
        let stalled = tokio::time::timeout(3000 * MS, body.frame())
            .await
            .expect("the stalled body was not cut off")
            .unwrap();
        let waited = started.elapsed();
        assert!(stalled.is_err(), "{stalled:?}");
        assert!(waited >= 250 * MS && waited < 3000 * MS, "{waited:?}");
        drop(body);
        let status = server_status(&up, addr);
        assert_eq!((status.in_flight, status.idle_connections), (0, 0));
        task.abort();
    }

    #[tokio::test]
    async fn a_response_before_the_request_body_ends_is_passed_on_and_not_pooled() {
        fn script(_: usize, _: usize) -> Act {
            Act::Reply(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 3\r\n\r\nbig")
        }
        let (addr, _accepted, task) = scripted(script).await;
        let (up, pool) = upstreams(pool_config("p", |_| {}), &[addr]);
        // A body that never ends: the server answers without reading it.
        use futures_util::StreamExt as _;
        let frames = futures_util::stream::iter([Ok::<_, crate::gateway::BoxError>(Frame::data(
            Bytes::from_static(b"first"),
        ))])
        .chain(futures_util::stream::pending());
        let req = Request::post("/upload")
            .header(HOST, "app.test")
            .body(BodyExt::boxed(http_body_util::StreamBody::new(frames)))
            .unwrap();
        let fwd = pool.send(req).await.unwrap();
        assert_eq!(fwd.response.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(body(fwd).await, "big");
        assert_eq!(server_status(&up, addr).idle_connections, 0);
        task.abort();
    }

    #[tokio::test]
    async fn an_idempotent_request_with_a_body_is_retried_when_it_never_left() {
        // The body was never polled when the connect failed, so it is sent whole elsewhere.
        let live = serve(echo_body()).await;
        let dead = closed_port().await;
        let (_up, pool) = upstreams(pool_config("p", |_| {}), &[dead, live.addr]);
        let fwd = pool.send(put("/", b"all of it")).await.unwrap();
        assert_eq!((fwd.attempts, fwd.server), (2, live.addr));
        assert_eq!(body(fwd).await, "all of it");
    }

    #[tokio::test]
    async fn http2_pool_multiplexes_and_translates_from_http1() {
        let server = serve(reply(200, 50 * MS)).await;
        let (up, pool) = upstreams(
            pool_config("p", |p| p.protocol = UpstreamProtocol::Http2),
            &[server.addr],
        );
        let requests = (0..100).map(|i| {
            let pool = pool.clone();
            async move { pool.send(get(&format!("/m?i={i}"))).await }
        });
        let results = futures_util::future::join_all(requests).await;
        for (i, result) in results.into_iter().enumerate() {
            let fwd = result.unwrap();
            assert_eq!(header(&fwd, "x-version"), "HTTP/2.0");
            // hyper's server puts :authority into the URI; Host itself is not sent.
            assert_eq!(header(&fwd, "x-uri"), format!("http://app.test/m?i={i}"));
            assert_eq!(header(&fwd, "x-had-host-header"), "false");
            // Back in the client's version.
            assert_eq!(fwd.response.version(), Version::HTTP_11);
            assert_eq!(body(fwd).await, "ok");
        }
        let accepted = server.accepted.load(Ordering::SeqCst);
        assert!((1..=2).contains(&accepted), "{accepted} connections");
        let status = server_status(&up, server.addr);
        assert_eq!((status.requests_total, status.in_flight), (100, 0));
        assert_eq!(status.idle_connections, accepted);
    }

    #[tokio::test]
    async fn http2_pool_opens_another_connection_at_the_stream_limit() {
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let held: Handler = Arc::new({
            let gate = gate.clone();
            move |_req| {
                let gate = gate.clone();
                Box::pin(async move {
                    gate.acquire().await.unwrap().forget();
                    Response::new(Full::new(Bytes::from_static(b"ok")))
                })
            }
        });
        let server = serve_with(held, Some(4)).await;
        let (_up, pool) = upstreams(
            pool_config("p", |p| p.protocol = UpstreamProtocol::Http2),
            &[server.addr],
        );
        let spawn = |n: usize| -> Vec<_> {
            (0..n)
                .map(|_| {
                    let pool = pool.clone();
                    tokio::spawn(async move { pool.send(get("/")).await.unwrap().attempts })
                })
                .collect()
        };
        // Four streams fill the first connection (the server's SETTINGS are in by the time
        // they reach its handler); the next four need a second connection.
        let mut requests = spawn(4);
        eventually("4 streams", || server.hits.load(Ordering::SeqCst) == 4).await;
        requests.extend(spawn(4));
        eventually("8 streams", || server.hits.load(Ordering::SeqCst) == 8).await;
        assert_eq!(server.accepted.load(Ordering::SeqCst), 2);
        gate.add_permits(8);
        for request in requests {
            assert_eq!(request.await.unwrap(), 1);
        }
    }

    #[tokio::test]
    async fn http2_client_to_http1_pool_is_translated_both_ways() {
        let server = serve(ok()).await;
        let (_up, pool) = upstreams(pool_config("p", |_| {}), &[server.addr]);
        let req = Request::get("http://app.test/x/y?z=1")
            .version(Version::HTTP_2)
            .header(HOST, "app.test")
            .header(TE, "trailers")
            .body(empty())
            .unwrap();
        let fwd = pool.send(req).await.unwrap();
        assert_eq!(header(&fwd, "x-version"), "HTTP/1.1");
        assert_eq!(header(&fwd, "x-uri"), "/x/y?z=1");
        assert_eq!(header(&fwd, "x-host"), "app.test");
        assert_eq!(fwd.response.version(), Version::HTTP_2);
        // HTTP/1.1's connection-specific response headers do not reach an HTTP/2 client.
        assert!(!fwd.response.headers().contains_key("keep-alive"));
        // A request without Host (HTTP/2 client, authority only) still gets one.
        let req = Request::get("http://other.test/")
            .version(Version::HTTP_2)
            .body(empty())
            .unwrap();
        let fwd = pool.send(req).await.unwrap();
        assert_eq!(header(&fwd, "x-host"), "other.test");
        assert_eq!(header(&fwd, "x-uri"), "/");
    }

    #[test]
    fn requests_for_http2_lose_connection_specific_headers() {
        let req = Request::post("/u?q")
            .header(HOST, "app.test:8080")
            .header(CONNECTION, "keep-alive, x-hop")
            .header("x-hop", "1")
            .header("keep-alive", "timeout=5")
            .header("proxy-connection", "keep-alive")
            .header(TRANSFER_ENCODING, "chunked")
            .header(TE, "gzip, trailers")
            .header("x-keep", "1")
            .body(empty())
            .unwrap();
        let req = translate_request(req, UpstreamProtocol::Http2).unwrap();
        assert_eq!(req.version(), Version::HTTP_2);
        assert_eq!(req.uri(), "http://app.test:8080/u?q");
        let mut names: Vec<&str> = req.headers().keys().map(|k| k.as_str()).collect();
        names.sort();
        assert_eq!(names, ["te", "x-keep"]);
        assert_eq!(req.headers()[TE], "trailers");
        // No Host at all cannot become an :authority.
        let req = Request::get("/").body(empty()).unwrap();
        assert!(matches!(
            translate_request(req, UpstreamProtocol::Http2),
            Err(UpstreamError::Protocol(_))
        ));
    }

    #[tokio::test]
    async fn connect_failure_is_retried_on_another_server_for_get_only() {
        let live = serve(ok()).await;
        let dead = closed_port().await;
        // Round robin starts with the first server: the closed port.
        let (up, pool) = upstreams(pool_config("p", |_| {}), &[dead, live.addr]);
        let fwd = pool.send(get("/")).await.unwrap();
        assert_eq!((fwd.attempts, fwd.server), (2, live.addr));
        assert_eq!(server_status(&up, dead).connect_failures_total, 1);
        drop(fwd);

        // A POST with a body is never retried: 502, and the live server saw nothing.
        let (up, pool) = upstreams(pool_config("p", |_| {}), &[dead, live.addr]);
        let before = live.hits.load(Ordering::SeqCst);
        let post = Request::post("/")
            .header(HOST, "app.test")
            .body(
                Full::new(Bytes::from_static(b"data"))
                    .map_err(Into::into)
                    .boxed(),
            )
            .unwrap();
        let err = pool.send(post).await.unwrap_err();
        assert!(matches!(err.error, UpstreamError::Connect(_)), "{err}");
        assert_eq!(err.status(), 502);
        // What the access log records of it: one attempt, on the dead server.
        assert_eq!((err.attempts, err.server), (1, Some(dead)));
        assert_eq!(live.hits.load(Ordering::SeqCst), before);
        assert_eq!(server_status(&up, dead).connect_failures_total, 1);

        // retries = 0: no second attempt even for GET.
        let (_up, pool) = upstreams(pool_config("p", |p| p.retries = 0), &[dead, live.addr]);
        assert!(matches!(
            pool.send(get("/")).await,
            Err(Unforwarded {
                error: UpstreamError::Connect(_),
                attempts: 1,
                ..
            })
        ));
    }

    #[tokio::test]
    async fn request_timeout_gives_504() {
        let slow = serve(reply(200, 2000 * MS)).await;
        let (up, pool) = upstreams(
            pool_config("p", |p| p.request_timeout = 100 * MS),
            &[slow.addr],
        );
        let started = Instant::now();
        let err = pool.send(get("/")).await.unwrap_err();
        assert!(matches!(err.error, UpstreamError::Timeout), "{err}");
        assert_eq!(err.status(), 504);
        assert!(started.elapsed() < 1000 * MS);
        let status = server_status(&up, slow.addr);
        assert_eq!((status.timeouts_total, status.in_flight), (1, 0));
    }

    #[tokio::test]
    async fn consecutive_5xx_eject_a_server_until_the_ejection_ends() {
        let bad = serve(reply(500, Duration::ZERO)).await;
        let good = serve(ok()).await;
        let (up, pool) = upstreams(
            pool_config("p", |p| {
                p.outlier_consecutive_5xx = 3;
                p.outlier_ejection = 300 * MS;
            }),
            &[bad.addr, good.addr],
        );
        // Round robin alternates; the third 500 ejects. 5xx responses are returned as they are.
        for _ in 0..6 {
            let fwd = pool.send(get("/")).await.unwrap();
            let expected = if fwd.server == bad.addr { 500 } else { 200 };
            assert_eq!(fwd.response.status(), expected);
            assert_eq!(fwd.attempts, 1);
        }
        assert_eq!(bad.hits.load(Ordering::SeqCst), 3);
        let status = server_status(&up, bad.addr);
        assert!(status.ejected);
        assert!(status.ejection_seconds_left > 0.0 && status.ejection_seconds_left <= 0.3);
        assert_eq!(status.responses_5xx_total, 3);
        for _ in 0..6 {
            assert_eq!(pool.send(get("/")).await.unwrap().server, good.addr);
        }
        assert_eq!(bad.hits.load(Ordering::SeqCst), 3);
        tokio::time::sleep(320 * MS).await;
        assert!(!server_status(&up, bad.addr).ejected);
        let mut back = 0;
        for _ in 0..4 {
            if pool.send(get("/")).await.unwrap().server == bad.addr {
                back += 1;
            }
        }
        assert_eq!(back, 2);
    }

    #[tokio::test]
    async fn connect_failures_eject_and_an_all_ejected_pool_still_serves() {
        let live = serve(reply(503, Duration::ZERO)).await;
        let dead = closed_port().await;
        let (up, pool) = upstreams(
            pool_config("p", |p| {
                p.outlier_consecutive_failures = 1;
                p.outlier_consecutive_5xx = 1;
            }),
            &[dead, live.addr],
        );
        // The dead server is ejected by its first failure and then left alone; the live one is
        // ejected by its first 503, and then everything is ejected: it is served anyway.
        // With both ejected, both are candidates again: a pick of the dead one fails to
        // connect and is retried on the live one.
        for _ in 0..5 {
            let fwd = pool.send(get("/")).await.unwrap();
            assert_eq!(
                (fwd.server, fwd.response.status().as_u16()),
                (live.addr, 503)
            );
            assert!(fwd.attempts <= 2);
        }
        assert!(server_status(&up, dead).ejected);
        assert!(server_status(&up, live.addr).ejected);
        assert_eq!(live.hits.load(Ordering::SeqCst), 5);
    }

    #[tokio::test]
    async fn down_and_drained_servers_get_nothing_and_none_left_is_503() {
        let up_server = serve(ok()).await;
        let drained = serve(ok()).await;
        let down = serve(ok()).await;
        for balance in [Balance::RoundRobin, Balance::LeastRequest] {
            let config = pool_config("p", |p| p.balance = balance.clone());
            let backends = [
                ("p", drained.addr, 0),
                ("p", down.addr, 5),
                ("p", up_server.addr, 1),
            ];
            let up = Upstreams::new();
            up.configure(&vip(vec![config.clone()], &backends), &|i| i != 1);
            let pool = up.pool("p").unwrap();
            for _ in 0..20 {
                assert_eq!(pool.send(get("/")).await.unwrap().server, up_server.addr);
            }
            // The last eligible server goes down.
            up.configure(&vip(vec![config], &backends), &|i| i == 0);
            let err = pool.send(get("/")).await.unwrap_err();
            assert!(matches!(err.error, UpstreamError::NoServer));
            assert_eq!((err.attempts, err.server), (0, None));
            assert_eq!(err.status(), 503);
        }
        assert_eq!(drained.hits.load(Ordering::SeqCst), 0);
        assert_eq!(down.hits.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn least_request_sends_to_the_server_without_requests_in_flight() {
        // Both servers hold requests until released.
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let held = |gate: Arc<tokio::sync::Semaphore>| -> Handler {
            Arc::new(move |_req| {
                let gate = gate.clone();
                Box::pin(async move {
                    // Each release lets exactly one request through.
                    gate.acquire().await.unwrap().forget();
                    Response::new(Full::new(Bytes::from_static(b"ok")))
                })
            })
        };
        let a = serve(held(gate.clone())).await;
        let b = serve(held(gate.clone())).await;
        let (_up, pool) = upstreams(
            pool_config("p", |p| p.balance = Balance::LeastRequest),
            &[a.addr, b.addr],
        );
        for round in 0..5 {
            let first = tokio::spawn({
                let pool = pool.clone();
                async move { pool.send(get("/")).await.unwrap().server }
            });
            let total = || a.hits.load(Ordering::SeqCst) + b.hits.load(Ordering::SeqCst);
            eventually("first request", || total() == 2 * round + 1).await;
            let second = tokio::spawn({
                let pool = pool.clone();
                async move { pool.send(get("/")).await.unwrap().server }
            });
            eventually("second request", || total() == 2 * round + 2).await;
            gate.add_permits(2);
            let (first, second) = (first.await.unwrap(), second.await.unwrap());
            assert_ne!(first, second);
        }
    }

    #[tokio::test]
    async fn reconfiguring_the_same_servers_keeps_the_round_robin_cycle() {
        let a = serve(ok()).await;
        let b = serve(ok()).await;
        let config = pool_config("p", |_| {});
        let backends = [("p", a.addr, 1), ("p", b.addr, 1)];
        let up = Upstreams::new();
        up.configure(&vip(vec![config.clone()], &backends), &|_| true);
        let pool = up.pool("p").unwrap();
        let mut seen = Vec::new();
        for _ in 0..6 {
            // A health report between every request must not restart the cycle at `a`.
            up.configure(&vip(vec![config.clone()], &backends), &|_| true);
            seen.push(pool.send(get("/")).await.unwrap().server);
        }
        assert_eq!(seen, [a.addr, b.addr, a.addr, b.addr, a.addr, b.addr]);
    }

    #[tokio::test]
    async fn hash_pool_keeps_affinity_and_spreads_requests_without_the_key() {
        let a = serve(ok()).await;
        let b = serve(ok()).await;
        let c = serve(ok()).await;
        let config = pool_config("p", |p| {
            p.balance = Balance::Hash(HashOn::Cookie("session".to_owned()))
        });
        let (_up, pool) = upstreams(config, &[a.addr, b.addr, c.addr]);
        let with_cookie = |value: &str| {
            let mut req = get("/");
            req.headers_mut().insert(
                http::header::COOKIE,
                format!("x=1; session={value}").parse().unwrap(),
            );
            req
        };
        let mut seen = std::collections::HashSet::new();
        for user in 0..30 {
            let first = pool
                .send(with_cookie(&format!("u{user}")))
                .await
                .unwrap()
                .server;
            for _ in 0..3 {
                let again = pool.send(with_cookie(&format!("u{user}"))).await.unwrap();
                assert_eq!(again.server, first);
            }
            seen.insert(first);
        }
        assert_eq!(seen.len(), 3, "30 users should reach all 3 servers");
        // Without the cookie: round robin.
        let mut servers = Vec::new();
        for _ in 0..3 {
            servers.push(pool.send(get("/")).await.unwrap().server);
        }
        servers.sort();
        servers.dedup();
        assert_eq!(servers.len(), 3);
    }

    #[tokio::test]
    async fn idle_connections_expire() {
        for protocol in [UpstreamProtocol::Http1, UpstreamProtocol::Http2] {
            let server = serve(ok()).await;
            let (up, pool) = upstreams(
                pool_config("p", |p| {
                    p.idle_timeout = 100 * MS;
                    p.protocol = protocol;
                }),
                &[server.addr],
            );
            body(pool.send(get("/")).await.unwrap()).await;
            assert_eq!(server_status(&up, server.addr).idle_connections, 1);
            assert_eq!(server.open.load(Ordering::SeqCst), 1);
            // Closed by the sweeper, not merely skipped at the next checkout: the server sees
            // the close.
            eventually("idle connection closed", || {
                server.open.load(Ordering::SeqCst) == 0
            })
            .await;
            assert_eq!(server_status(&up, server.addr).idle_connections, 0);
            body(pool.send(get("/")).await.unwrap()).await;
            assert_eq!(server.accepted.load(Ordering::SeqCst), 2, "{protocol:?}");
        }
    }

    #[tokio::test]
    async fn upgrade_passes_bytes_both_ways_even_for_http2_pools() {
        let echo: Handler = Arc::new(|mut req: Request<Incoming>| {
            Box::pin(async move {
                if req.headers().get(UPGRADE).is_none_or(|u| u != "echo") {
                    return Response::builder()
                        .status(400)
                        .body(Full::new(Bytes::new()))
                        .unwrap();
                }
                let on_upgrade = hyper::upgrade::on(&mut req);
                tokio::spawn(async move {
                    let mut io = TokioIo::new(on_upgrade.await.unwrap());
                    let mut buf = [0u8; 64];
                    loop {
                        let n = io.read(&mut buf).await.unwrap();
                        if n == 0 {
                            return;
                        }
                        io.write_all(&buf[..n]).await.unwrap();
                    }
                });
                Response::builder()
                    .status(101)
                    .header(CONNECTION, "upgrade")
                    .header(UPGRADE, "echo")
                    .body(Full::new(Bytes::new()))
                    .unwrap()
            })
        });
        let server = serve(echo).await;
        let (up, pool) = upstreams(
            pool_config("p", |p| p.protocol = UpstreamProtocol::Http2),
            &[server.addr],
        );
        let req = Request::get("/ws")
            .header(HOST, "app.test")
            .header(CONNECTION, "upgrade")
            .header(UPGRADE, "echo")
            .body(empty())
            .unwrap();
        let mut fwd = pool.send(req).await.unwrap();
        assert_eq!(fwd.response.status(), StatusCode::SWITCHING_PROTOCOLS);
        assert_eq!(fwd.response.headers()[UPGRADE], "echo");
        let mut io = TokioIo::new(hyper::upgrade::on(&mut fwd.response).await.unwrap());
        for message in [&b"ping"[..], b"hello, upstream"] {
            io.write_all(message).await.unwrap();
            let mut back = vec![0u8; message.len()];
            io.read_exact(&mut back).await.unwrap();
            assert_eq!(back, message);
        }
        drop(io);
        drop(fwd);
        // The tunnel's connection was never pooled.
        assert_eq!(server_status(&up, server.addr).idle_connections, 0);
        eventually("tunnel closed", || server.open.load(Ordering::SeqCst) == 0).await;
    }

    #[tokio::test]
    async fn configure_keeps_unchanged_servers_and_closes_removed_ones() {
        let a = serve(ok()).await;
        let b = serve(ok()).await;
        let c = serve(ok()).await;
        let config = pool_config("p", |_| {});
        let up = Upstreams::new();
        up.configure(
            &vip(vec![config.clone()], &[("p", a.addr, 1), ("p", b.addr, 1)]),
            &|_| true,
        );
        let pool = up.pool("p").unwrap();
        for _ in 0..4 {
            body(pool.send(get("/")).await.unwrap()).await;
        }
        assert_eq!(server_status(&up, a.addr).requests_total, 2);
        assert_eq!(b.open.load(Ordering::SeqCst), 1);

        // a stays (new weight), b leaves, c joins; the pool handle stays valid.
        up.configure(
            &vip(vec![config.clone()], &[("p", a.addr, 3), ("p", c.addr, 1)]),
            &|_| true,
        );
        assert!(Arc::ptr_eq(&pool, &up.pool("p").unwrap()));
        let kept = server_status(&up, a.addr);
        assert_eq!(
            (kept.requests_total, kept.weight, kept.idle_connections),
            (2, 3, 1)
        );
        assert_eq!(up.status()[0].servers.len(), 2);
        eventually("removed server's idle connection closed", || {
            b.open.load(Ordering::SeqCst) == 0
        })
        .await;
        body(pool.send(get("/")).await.unwrap()).await;
        assert_eq!(a.accepted.load(Ordering::SeqCst), 1);

        // Changing the pool's protocol replaces its servers.
        let h2 = pool_config("p", |p| p.protocol = UpstreamProtocol::Http2);
        up.configure(&vip(vec![h2], &[("p", a.addr, 3)]), &|_| true);
        let fresh = server_status(&up, a.addr);
        assert_eq!((fresh.requests_total, fresh.idle_connections), (0, 0));
        assert_eq!(up.status()[0].protocol, "http2");

        // A pool that leaves the configuration is gone.
        let other = pool_config("q", |_| {});
        up.configure(&vip(vec![other], &[("q", a.addr, 1)]), &|_| true);
        assert!(up.pool("p").is_none());
        assert_eq!(up.status().len(), 1);
    }

    #[test]
    fn status_reads_well_as_json() {
        let up = Upstreams::new();
        let config = pool_config("api", |p| {
            p.balance = Balance::Hash(HashOn::Header(http::HeaderName::from_static("x-user")))
        });
        up.configure(
            &vip(
                vec![config],
                &[("api", "10.0.0.1:8080".parse().unwrap(), 7)],
            ),
            &|_| false,
        );
        let json = serde_json::to_value(up.status()).unwrap();
        assert_eq!(
            json,
            serde_json::json!([{
                "name": "api",
                "balance": "hash",
                "hash_on": "header:x-user",
                "protocol": "http1",
                "servers": [{
                    "address": "10.0.0.1",
                    "port": 8080,
                    "weight": 7,
                    "healthy": false,
                    "ejected": false,
                    "ejection_seconds_left": 0.0,
                    "in_flight": 0,
                    "requests_total": 0,
                    "responses_5xx_total": 0,
                    "connect_failures_total": 0,
                    "timeouts_total": 0,
                    "errors_total": 0,
                    "idle_connections": 0
                }]
            }])
        );
    }
}
