//! The gateway's server side: building every l7 VIP's gateway from the configuration (files,
//! route tables, limiters), its listeners (bound with `IP_FREEBIND` so the agent can start
//! before the VIP is on the host), client connections (HTTP/1.1, h2c, TLS with ALPN) and their
//! timeouts, and the atomic switch to a new configuration on reload.
//!
//! # Client timeouts
//! hyper's own HTTP/1 `header_read_timeout` also runs while a keep-alive connection waits for
//! its next request, so it cannot give an idle timeout longer than the header timeout. The
//! connection's I/O is therefore wrapped ([`ConnIo`]) and timed here, as nginx does it:
//! - from accept, or from the first byte of a later request, the head must be complete within
//!   `header_timeout` (a slow-header client is cut off however it trickles bytes);
//! - with no request in flight and no byte of a new one, the connection is closed after
//!   `idle_timeout`;
//! - while a request is in flight there is no client timeout (the upstream's timeouts apply),
//!   and an upgraded (WebSocket) connection has none.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd as _, FromRawFd as _, IntoRawFd as _};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::task::AtomicWaker;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::{Instant, Sleep};

use super::auth::ApiKeys;
use super::files;
use super::observe::{self, RouteMetrics, VipMetrics, VipScrape};
use super::proxy::{self, Authenticator, ClientConn, RouteLimiter, RouteRuntime, VipGateway};
use super::ratelimit::Limiter;
use super::route::{HeaderMatch, HostMatch, PathMatch, RouteTable};
use super::upstream::{PoolStatus, Upstreams};
use super::workers::{self, Workers};
use crate::config::l7::{self, LimitKey, RateLimit, RouteAuth};
use crate::config::{Config, Protocol, Vip};

/// How long a removed listener's connections may take to finish their requests before they
/// are dropped.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Pending connections a listener's kernel queue holds (nginx's default on Linux is 511).
const LISTEN_BACKLOG: u32 = 1024;

/// The HTTP/2 connection preface: a plain connection starting with it is h2c (prior knowledge).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Most concurrent streams per HTTP/2 client connection (Envoy's and nginx's default is 100;
/// hyper's 200).
const H2_MAX_STREAMS: u32 = 100;

/// Why [`Gateways::apply`] changed nothing: every problem found, one line each.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .lines.join("\n"))]
pub struct GatewayError {
    /// `xlb.toml:LINE: KEY: what` for problems in a file the configuration names, `vip[I]
    /// (NAME): what` for the others.
    pub lines: Vec<String>,
}

/// One l7 VIP as `xlb status` shows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GatewayStatus {
    /// The VIP's name.
    pub vip: String,
    /// `address:port` the gateway listens on.
    pub listen: String,
    /// Whether the listener speaks TLS.
    pub tls: bool,
    /// Whether HTTP/2 is offered.
    pub http2: bool,
    /// The routes, in configuration order.
    pub routes: Vec<RouteStatus>,
    /// The upstream pools and their servers.
    pub pools: Vec<PoolStatus>,
}

/// One route as `xlb status` shows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RouteStatus {
    /// The route's name.
    pub name: String,
    /// What it matches, e.g. `host=*.example.com path=/api/* methods=GET,POST`.
    pub matches: String,
    /// The pool it sends to.
    pub pool: String,
    /// `none`, `api_key` or `jwt`.
    pub auth: String,
    /// The rate limit, e.g. `10/s burst 20 by client_ip`; none without.
    pub limit: Option<String>,
}

/// (VIP name, route name): what identifies a route across reloads.
type RouteKey = (String, String);

/// State that outlives one configuration, keyed by VIP (and route) name: counters, upstream
/// pools (connections, ejections) and rate-limit buckets carry over a reload.
#[derive(Default)]
struct Carried {
    upstreams: HashMap<String, Arc<Upstreams>>,
    vip_metrics: HashMap<String, Arc<VipMetrics>>,
    route_metrics: HashMap<RouteKey, Arc<RouteMetrics>>,
    limiters: HashMap<RouteKey, (RateLimit, Arc<RouteLimiter>)>,
}

/// A bound listener (one socket per worker) and the gateway its connections use; replaced in
/// place on reload.
struct Listener {
    /// One per worker, so that a request reads the gateway from its own thread's copy.
    shared: Vec<Arc<ListenerShared>>,
    stop: watch::Sender<bool>,
}

struct ListenerShared {
    current: RwLock<Arc<VipGateway>>,
}

impl ListenerShared {
    fn current(&self) -> Arc<VipGateway> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// All l7 VIPs' gateways of one agent: the listeners and the configuration they serve.
#[derive(Default)]
pub struct Gateways {
    listeners: HashMap<SocketAddr, Listener>,
    /// The serving gateways, in configuration order.
    current: Vec<Arc<VipGateway>>,
    carried: Carried,
    /// The serving threads, while there are listeners (their accept loops hold them too, until
    /// drained).
    workers: Option<Arc<Workers>>,
}

impl Gateways {
    /// The serving threads, to watch them stop (tests).
    #[cfg(test)]
    pub(crate) fn workers(&self) -> Option<std::sync::Weak<Workers>> {
        self.workers.as_ref().map(Arc::downgrade)
    }

    /// No gateways, no listeners.
    pub fn new() -> Self {
        Self::default()
    }

    /// Builds every l7 VIP's gateway from `cfg` (TLS cert/key, API key files, JWKS, route
    /// tables, limiters), binds listeners for new VIP address:port pairs, and switches to the
    /// new gateways at once. On any error nothing changes: new listeners are dropped, the old
    /// gateways keep serving, and the error lists every problem. Listeners of an address:port
    /// that stays are kept (no rebind) and serve the new routes and certificate from the next
    /// request or connection on; listeners of removed VIPs stop accepting and their
    /// connections finish the requests in flight (at most [`DRAIN_TIMEOUT`]).
    /// `healthy(vip_index, backend_index)` is the agent's health verdict.
    pub fn apply(
        &mut self,
        cfg: &Config,
        healthy: &dyn Fn(usize, usize) -> bool,
    ) -> Result<(), GatewayError> {
        let (built, carried) = build(cfg, &self.carried).map_err(|lines| GatewayError { lines })?;
        let workers = match (&self.workers, built.is_empty()) {
            (Some(workers), _) => Some(workers.clone()),
            (None, true) => None,
            (None, false) => match Workers::start(workers::count()) {
                Ok(workers) => Some(workers),
                Err(e) => {
                    return Err(GatewayError {
                        lines: vec![format!("cannot start the gateway's worker threads: {e}")],
                    });
                }
            },
        };
        let sockets = workers.as_ref().map_or(0, |w| w.len());
        let mut bound = HashMap::new();
        let mut lines = Vec::new();
        for (vi, gw) in &built {
            if self.listeners.contains_key(&gw.listen) {
                continue;
            }
            // Every worker's socket is bound before anything changes.
            match (0..sockets).map(|_| bind(gw.listen)).collect() {
                Ok(listeners) => {
                    bound.insert(gw.listen, listeners);
                }
                Err(e) => lines.push(format!(
                    "vip[{vi}] ({}): cannot listen on {}: {e}",
                    gw.vip, gw.listen
                )),
            }
        }
        if !lines.is_empty() {
            return Err(GatewayError { lines });
        }
        // Committed from here on: nothing below fails.
        for (vi, gw) in &built {
            gw.upstreams.configure(&cfg.vips[*vi], &|b| healthy(*vi, b));
        }
        let mut listeners = HashMap::new();
        for (_, gw) in &built {
            let listener = match self.listeners.remove(&gw.listen) {
                Some(existing) => {
                    for shared in &existing.shared {
                        *shared.current.write().unwrap_or_else(|e| e.into_inner()) = gw.clone();
                    }
                    existing
                }
                None => {
                    let sockets: Vec<std::net::TcpListener> =
                        bound.remove(&gw.listen).expect("bound above");
                    let workers = workers.as_ref().expect("started with the first listener");
                    let (stop, stopped) = watch::channel(false);
                    let mut shared = Vec::new();
                    for (socket, runtime) in sockets.into_iter().zip(workers.handles()) {
                        let mine = Arc::new(ListenerShared {
                            current: RwLock::new(gw.clone()),
                        });
                        runtime.spawn(accept_loop(
                            socket,
                            mine.clone(),
                            stopped.clone(),
                            workers.clone(),
                        ));
                        shared.push(mine);
                    }
                    tracing::info!(vip = %gw.vip, listen = %gw.listen, "gateway listening");
                    Listener { shared, stop }
                }
            };
            listeners.insert(gw.listen, listener);
        }
        for (addr, removed) in self.listeners.drain() {
            tracing::info!(listen = %addr, "gateway listener closing");
            let _ = removed.stop.send(true);
        }
        // Without listeners the threads stop once the removed ones have drained.
        self.workers = workers.filter(|_| !listeners.is_empty());
        self.listeners = listeners;
        self.current = built.into_iter().map(|(_, gw)| gw).collect();
        self.carried = carried;
        Ok(())
    }

    /// Backend health changed: every gateway's upstreams take the new verdicts (no rebuild,
    /// no rebind).
    pub fn set_health(&self, cfg: &Config, healthy: &dyn Fn(usize, usize) -> bool) {
        for (vi, vip) in cfg.vips.iter().enumerate() {
            if vip.gateway.is_some()
                && let Some(upstreams) = self.carried.upstreams.get(&vip.name)
            {
                upstreams.configure(vip, &|b| healthy(vi, b));
            }
        }
    }

    /// Every l7 VIP's listener, routes and pools, for `xlb status`.
    pub fn status(&self) -> Vec<GatewayStatus> {
        self.current
            .iter()
            .map(|gw| GatewayStatus {
                vip: gw.vip.to_string(),
                listen: gw.listen.to_string(),
                tls: gw.tls.is_some(),
                http2: gw.settings.http2,
                routes: gw.settings.routes.iter().map(route_status).collect(),
                pools: gw.upstreams.status(),
            })
            .collect()
    }

    /// Appends the gateway's Prometheus families (text format, `# HELP` / `# TYPE`) to `out`.
    pub fn render_metrics(&self, out: &mut String) {
        let scrapes: Vec<VipScrape<'_>> = self
            .current
            .iter()
            .map(|gw| VipScrape {
                vip: &gw.vip,
                metrics: &gw.metrics,
                routes: gw
                    .settings
                    .routes
                    .iter()
                    .zip(&gw.routes)
                    .map(|(r, rt)| (r.matcher.name.as_str(), &*rt.metrics))
                    .collect(),
                pools: gw.upstreams.status(),
            })
            .collect();
        observe::render(out, &scrapes);
    }
}

/// For `xlb check` (no sockets): everything [`Gateways::apply`] validates except binding:
/// every file loaded and parsed, every route table and limiter built. The lines are those
/// `apply` would return.
pub fn check(cfg: &Config) -> Result<(), Vec<String>> {
    build(cfg, &Carried::default()).map(|_| ())
}

fn route_status(route: &l7::GatewayRoute) -> RouteStatus {
    let m = &route.matcher;
    let mut matches = Vec::new();
    match &m.host {
        HostMatch::Any => {}
        HostMatch::Exact(h) => matches.push(format!("host={h}")),
        HostMatch::Wildcard(d) => matches.push(format!("host=*.{d}")),
    }
    matches.push(match &m.path {
        PathMatch::Exact(p) => format!("path={p}"),
        PathMatch::Prefix(p) if p == "/" => "path=/*".to_owned(),
        PathMatch::Prefix(p) => format!("path={p}/*"),
    });
    if let Some(methods) = &m.methods {
        let methods: Vec<&str> = methods.iter().map(|m| m.as_str()).collect();
        matches.push(format!("methods={}", methods.join(",")));
    }
    for h in &m.headers {
        matches.push(match h {
            HeaderMatch::Present(n) => format!("header={n}"),
            HeaderMatch::Equals(n, v) => {
                format!("header={n}:{}", String::from_utf8_lossy(v.as_bytes()))
            }
        });
    }
    RouteStatus {
        name: m.name.clone(),
        matches: matches.join(" "),
        pool: route.pool.clone(),
        auth: match route.auth {
            RouteAuth::None => "none",
            RouteAuth::ApiKey { .. } => "api_key",
            RouteAuth::Jwt { .. } => "jwt",
        }
        .to_owned(),
        limit: route.rate_limit.as_ref().map(|l| {
            let key = match &l.key {
                LimitKey::ClientIp => "client_ip".to_owned(),
                LimitKey::ApiKey => "api_key".to_owned(),
                LimitKey::JwtSubject => "jwt_subject".to_owned(),
                LimitKey::Header(h) => format!("header:{h}"),
            };
            format!("{}/s burst {} by {key}", l.rate, l.burst)
        }),
    }
}

/// Every l7 VIP's gateway (with its index in `cfg.vips`) and the carried state it uses, or
/// every problem found.
#[expect(
    clippy::type_complexity,
    reason = "a private pair of results, named at its two call sites"
)]
fn build(
    cfg: &Config,
    previous: &Carried,
) -> Result<(Vec<(usize, Arc<VipGateway>)>, Carried), Vec<String>> {
    let mut errors = Vec::new();
    let mut carried = Carried::default();
    let mut built = Vec::new();
    let mut listens: BTreeMap<SocketAddr, usize> = BTreeMap::new();
    for (vi, vip) in cfg.vips.iter().enumerate() {
        let Some(settings) = &vip.gateway else {
            continue;
        };
        let at = |what: String| format!("vip[{vi}] ({}): {what}", vip.name);
        let listen = SocketAddr::new(vip.address, vip.port);
        if vip.port == 0 {
            errors.push(at("an l7 VIP needs a port to listen on, not 0".into()));
        }
        if vip.protocol != Protocol::Tcp {
            errors.push(at("an l7 VIP must be tcp".into()));
        }
        if let Some(first) = listens.insert(listen, vi) {
            errors.push(at(format!("listens on {listen} as vip[{first}] does")));
        }
        match build_vip(vip, settings, listen, previous, &mut carried) {
            Ok(gw) => built.push((vi, Arc::new(gw))),
            Err(lines) => errors.extend(lines.into_iter().map(|l| {
                if l.starts_with("route ") || l.starts_with("cannot ") {
                    at(l)
                } else {
                    l
                }
            })),
        }
    }
    if errors.is_empty() {
        Ok((built, carried))
    } else {
        Err(errors)
    }
}

/// One VIP's gateway. Errors from files come as `xlb.toml:LINE: KEY: ...`; the others start
/// with `route ` and get the VIP prefixed by the caller.
fn build_vip(
    vip: &Vip,
    settings: &l7::Gateway,
    listen: SocketAddr,
    previous: &Carried,
    carried: &mut Carried,
) -> Result<VipGateway, Vec<String>> {
    let mut errors = Vec::new();
    let tls = match &settings.tls {
        Some(tls) => match files::load_tls(tls, settings.http2) {
            Ok(config) => Some(config),
            Err(lines) => {
                errors.extend(lines);
                None
            }
        },
        None => None,
    };
    let table = RouteTable::new(settings.routes.iter().map(|r| r.matcher.clone()).collect())
        .map_err(|e| errors.push(e.to_string()))
        .ok();
    let mut routes = Vec::new();
    for (ri, route) in settings.routes.iter().enumerate() {
        let name = &route.matcher.name;
        let here = |what: &str| format!("route {ri} ({name}): {what}");
        if settings.pool(&route.pool).is_none() {
            errors.push(here(&format!("pool {:?} is not defined", route.pool)));
        }
        let auth = match &route.auth {
            RouteAuth::None => Authenticator::None,
            RouteAuth::ApiKey { file, .. } => match files::load_api_keys(file) {
                Ok(keys) => Authenticator::ApiKey(keys),
                Err(e) => {
                    errors.push(e);
                    Authenticator::ApiKey(ApiKeys::default())
                }
            },
            RouteAuth::Jwt {
                jwks_file,
                issuer,
                audience,
            } => match files::load_jwks(jwks_file, issuer.as_deref(), audience.as_deref()) {
                Ok(verifier) => Authenticator::Jwt(verifier),
                Err(e) => {
                    errors.push(e);
                    Authenticator::None
                }
            },
        };
        let key = (vip.name.clone(), name.clone());
        let limiter = match &route.rate_limit {
            None => None,
            Some(limit) => {
                match (&limit.key, &route.auth) {
                    (LimitKey::ApiKey, RouteAuth::ApiKey { .. })
                    | (LimitKey::JwtSubject, RouteAuth::Jwt { .. })
                    | (LimitKey::ClientIp | LimitKey::Header(_), _) => {}
                    (LimitKey::ApiKey, _) => errors.push(here(
                        "rate_limit.key = \"api_key\" needs auth = \"api_key\"",
                    )),
                    (LimitKey::JwtSubject, _) => errors.push(here(
                        "rate_limit.key = \"jwt_subject\" needs auth = \"jwt\"",
                    )),
                }
                match previous.limiters.get(&key) {
                    Some((same, limiter)) if same == limit => Some(limiter.clone()),
                    _ => match Limiter::new(
                        limit.rate,
                        limit.burst,
                        usize::try_from(limit.max_keys).unwrap_or(usize::MAX),
                    ) {
                        Ok(limiter) => Some(Arc::new(limiter)),
                        Err(e) => {
                            errors.push(here(&format!("rate_limit: {e}")));
                            None
                        }
                    },
                }
            }
        };
        if let (Some(limit), Some(limiter)) = (&route.rate_limit, &limiter) {
            carried
                .limiters
                .insert(key.clone(), (limit.clone(), limiter.clone()));
        }
        let metrics = previous
            .route_metrics
            .get(&key)
            .cloned()
            .unwrap_or_else(|| Arc::new(RouteMetrics::new()));
        carried.route_metrics.insert(key, metrics.clone());
        routes.push(RouteRuntime {
            name: Arc::from(route.matcher.name.as_str()),
            auth,
            limiter,
            metrics,
        });
    }
    let (Some(table), true) = (table, errors.is_empty()) else {
        return Err(errors);
    };
    let mut seen = HashSet::new();
    let identity_headers = settings
        .routes
        .iter()
        .map(|r| r.identity_header.clone())
        .filter(|h| seen.insert(h.clone()))
        .collect();
    let upstreams = previous
        .upstreams
        .get(&vip.name)
        .cloned()
        .unwrap_or_else(|| Arc::new(Upstreams::new()));
    carried
        .upstreams
        .insert(vip.name.clone(), upstreams.clone());
    let metrics = previous
        .vip_metrics
        .get(&vip.name)
        .cloned()
        .unwrap_or_else(|| Arc::new(VipMetrics::new()));
    carried
        .vip_metrics
        .insert(vip.name.clone(), metrics.clone());
    let (h1, h2) = http_builders(settings);
    Ok(VipGateway {
        vip: Arc::from(vip.name.as_str()),
        listen,
        settings: settings.clone(),
        table,
        routes,
        identity_headers,
        upstreams,
        tls,
        metrics,
        h1,
        h2,
    })
}

/// hyper's HTTP/1 and HTTP/2 connection settings from the gateway's limits. Client timeouts
/// are [`ConnIo`]'s, so hyper's header timer is off.
fn http_builders(
    settings: &l7::Gateway,
) -> (
    hyper::server::conn::http1::Builder,
    hyper::server::conn::http2::Builder<TokioExecutor>,
) {
    let header_bytes = usize::try_from(settings.max_header_bytes).unwrap_or(usize::MAX);
    let mut h1 = hyper::server::conn::http1::Builder::new();
    h1.timer(TokioTimer::new())
        .header_read_timeout(None)
        .max_header_size(header_bytes)
        // hyper's read buffer must hold the whole head; its floor is 8 KiB.
        .max_buf_size(header_bytes.max(8192) + 1024)
        .max_headers(usize::try_from(settings.max_headers).unwrap_or(usize::MAX));
    let mut h2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    h2.timer(TokioTimer::new())
        .max_header_list_size(settings.max_header_bytes)
        .max_concurrent_streams(H2_MAX_STREAMS);
    (h1, h2)
}

/// A listening socket on `addr` that may be bound before the address exists on the host
/// (`IP_FREEBIND` / `IPV6_FREEBIND`: the operator adds the VIP to lo or the NIC, possibly
/// after the agent starts), rebound at once after a restart (`SO_REUSEADDR`), and bound once
/// per worker (`SO_REUSEPORT`: the kernel spreads connections over the workers' sockets). A
/// std socket, registered with its worker's runtime there.
fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    let (level, name) = if addr.is_ipv4() {
        (libc::SOL_IP, libc::IP_FREEBIND)
    } else {
        (libc::SOL_IPV6, libc::IPV6_FREEBIND)
    };
    let one: libc::c_int = 1;
    // SAFETY: the fd is the open socket owned by `socket`, and the option value is a valid
    // c_int of the length passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&raw const one).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    socket.bind(addr)?;
    let fd = socket.into_raw_fd();
    // SAFETY: `fd` is the bound socket just released by `socket`; the std listener owns it
    // from here on (and closes it if `listen` fails).
    let listener = unsafe { std::net::TcpListener::from_raw_fd(fd) };
    // SAFETY: a valid socket fd and a backlog in range.
    if unsafe { libc::listen(fd, LISTEN_BACKLOG as libc::c_int) } != 0 {
        return Err(io::Error::last_os_error());
    }
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Accepts until told to stop, then lets the connections finish their requests.
async fn accept_loop(
    listener: std::net::TcpListener,
    shared: Arc<ListenerShared>,
    mut stop: watch::Receiver<bool>,
    _workers: Arc<Workers>,
) {
    let listener = match TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(e) => {
            tracing::error!(error = %e, "gateway listener cannot join its worker's runtime");
            return;
        }
    };
    let (drain, draining) = watch::channel(false);
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            () = until_set(&mut stop) => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    conns.spawn(serve_conn(stream, peer, shared.clone(), draining.clone()));
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "gateway accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
    drop(listener);
    let _ = drain.send(true);
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            connections = conns.len(),
            "gateway connections still open after the drain timeout; closing them"
        );
    }
}

/// Resolves once the flag is set, or its sender is gone (the owner went away: stop too).
async fn until_set(flag: &mut watch::Receiver<bool>) {
    let _ = flag.wait_for(|set| *set).await;
}

/// One client connection: TLS handshake or h2c detection, then hyper until it ends or the
/// listener drains.
async fn serve_conn(
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<ListenerShared>,
    draining: watch::Receiver<bool>,
) {
    let gw = shared.current();
    let _ = stream.set_nodelay(true);
    let deadline = Instant::now() + gw.settings.header_timeout;
    if let Some(tls) = gw.tls.clone() {
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let stream = match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                tracing::debug!(client = %peer, error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => return,
        };
        let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
        serve_http(stream, Bytes::new(), h2, true, peer, &gw, shared, draining).await;
    } else {
        let mut stream = stream;
        let (prefix, h2) = if gw.settings.http2 {
            match tokio::time::timeout_at(deadline, sniff_h2c(&mut stream)).await {
                Ok(Ok(sniffed)) => sniffed,
                _ => return,
            }
        } else {
            (Bytes::new(), false)
        };
        serve_http(stream, prefix, h2, false, peer, &gw, shared, draining).await;
    }
}

/// Reads until the bytes are known to start (or not) with the HTTP/2 preface; returns them, to
/// be replayed to hyper, and the verdict.
async fn sniff_h2c(stream: &mut TcpStream) -> io::Result<(Bytes, bool)> {
    let mut buf = BytesMut::with_capacity(H2_PREFACE.len());
    while buf.len() < H2_PREFACE.len() {
        if stream.read_buf(&mut buf).await? == 0 || !H2_PREFACE.starts_with(&buf) {
            return Ok((buf.freeze(), false));
        }
    }
    let h2 = buf.starts_with(H2_PREFACE);
    Ok((buf.freeze(), h2))
}

#[expect(
    clippy::too_many_arguments,
    reason = "one connection's facts, passed once from serve_conn"
)]
async fn serve_http<T>(
    io: T,
    prefix: Bytes,
    h2: bool,
    tls: bool,
    peer: SocketAddr,
    gw: &VipGateway,
    shared: Arc<ListenerShared>,
    mut draining: watch::Receiver<bool>,
) where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let watch = Arc::new(ConnWatch::new(
        gw.settings.header_timeout,
        gw.settings.idle_timeout,
        h2,
        usize::try_from(gw.settings.max_header_bytes).unwrap_or(usize::MAX),
    ));
    let io = TokioIo::new(ConnIo::new(io, prefix, watch.clone()));
    let client = Arc::new(ClientConn {
        peer,
        watch,
        forwarded: proxy::ForwardedClient::new(peer.ip(), tls),
    });
    let service = service_fn(move |req| proxy::handle(shared.current(), client.clone(), req));
    let result = if h2 {
        let conn = gw.h2.serve_connection(io, service);
        drive(conn, &mut draining, |c| c.graceful_shutdown()).await
    } else {
        let conn = gw.h1.serve_connection(io, service).with_upgrades();
        drive(conn, &mut draining, |c| c.graceful_shutdown()).await
    };
    if let Err(e) = result {
        tracing::debug!(client = %peer, error = %e, "client connection ended");
    }
}

/// Runs a connection to its end; when the listener drains, asks it to finish gracefully
/// (HTTP/1: close after the response in flight; HTTP/2: GOAWAY) and waits for that.
async fn drive<C, E>(
    conn: C,
    draining: &mut watch::Receiver<bool>,
    shutdown: impl FnOnce(Pin<&mut C>),
) -> Result<(), E>
where
    C: Future<Output = Result<(), E>>,
{
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => return result,
        () = until_set(draining) => {}
    }
    shutdown(conn.as_mut());
    conn.await
}

/// The timing state of one client connection, shared by its I/O ([`ConnIo`]) and its requests
/// ([`InFlight`]). Times are milliseconds since the connection was accepted.
pub(crate) struct ConnWatch {
    epoch: Instant,
    header_timeout: Duration,
    idle_timeout: Duration,
    /// HTTP/2: a new request's first byte cannot be told from other frames, so only the first
    /// request is held to the header timeout (from accept), later ones to the idle timeout.
    h2: bool,
    in_flight: AtomicU32,
    /// When the last request ended.
    idle_since: AtomicU64,
    /// When the first byte of a request head arrived; [`NO_HEAD`] when none is being read.
    head_since: AtomicU64,
    /// Upgraded (WebSocket): no client timeouts.
    tunnel: AtomicBool,
    /// The reader waiting with a deadline that a request's end changes.
    reader: AtomicWaker,
    /// HTTP/1: every byte hyper reads, followed from message to message, so each request's
    /// raw head is seen, pipelined ones included: hyper drops a Content-Length sent with
    /// Transfer-Encoding, and repeated equal ones, before the gateway sees the headers. Only
    /// ever locked by this connection's one task.
    heads: Mutex<HeadScanner>,
}

const NO_HEAD: u64 = u64::MAX;

impl ConnWatch {
    fn new(header_timeout: Duration, idle_timeout: Duration, h2: bool, head_limit: usize) -> Self {
        Self {
            epoch: Instant::now(),
            header_timeout,
            idle_timeout,
            h2,
            in_flight: AtomicU32::new(0),
            idle_since: AtomicU64::new(0),
            // The first request's head is timed from accept, so a client that connects and
            // sends nothing (or trickles) is cut off after the header timeout.
            head_since: AtomicU64::new(0),
            tunnel: AtomicBool::new(false),
            reader: AtomicWaker::new(),
            heads: Mutex::new(HeadScanner::new(head_limit)),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(NO_HEAD - 1)
    }

    /// A request head has been received: no client timeout until its response is done.
    /// Also returns how its raw head framed the body (HTTP/1; `None` for HTTP/2).
    pub(crate) fn request_started(self: &Arc<Self>) -> (InFlight, Option<RawFraming>) {
        self.head_since.store(NO_HEAD, SeqCst);
        self.in_flight.fetch_add(1, SeqCst);
        let framing = if self.h2 {
            None
        } else {
            // Every request takes its own head off the queue, in order, whatever it carries.
            Some(
                self.heads
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .next_head(),
            )
        };
        (InFlight(self.clone()), framing)
    }

    /// The connection was upgraded (101): it becomes a tunnel without client timeouts.
    pub(crate) fn tunnel(&self) {
        self.tunnel.store(true, SeqCst);
    }

    /// Bytes arrived (HTTP/1): the scanner follows them; on an idle connection they start (or
    /// continue) a new request's head.
    fn bytes_read(&self, bytes: &[u8]) {
        if self.h2 || self.tunnel.load(SeqCst) {
            return;
        }
        self.heads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .feed(bytes);
        if self.in_flight.load(SeqCst) == 0 && self.head_since.load(SeqCst) == NO_HEAD {
            self.head_since.store(self.now_ms(), SeqCst);
        }
    }

    /// When the connection is to be closed if nothing else happens; `None` while a request
    /// is in flight or the connection is a tunnel.
    fn deadline(&self) -> Option<Instant> {
        if self.tunnel.load(SeqCst) || self.in_flight.load(SeqCst) > 0 {
            return None;
        }
        let ms = Duration::from_millis;
        Some(match self.head_since.load(SeqCst) {
            NO_HEAD => self.epoch + ms(self.idle_since.load(SeqCst)) + self.idle_timeout,
            head => self.epoch + ms(head) + self.header_timeout,
        })
    }
}

/// How a raw HTTP/1 request head framed its body, as sent (before hyper's parser merged or
/// dropped anything).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RawFraming {
    /// Content-Length fields.
    pub(crate) content_lengths: usize,
    /// Whether a Transfer-Encoding field was present.
    pub(crate) transfer_encoding: bool,
    /// The first Content-Length's value, when it is a plain number.
    pub(crate) content_length: Option<u64>,
    /// The head was not seen (see [`HeadScanner`]).
    pub(crate) unknown: bool,
}

impl RawFraming {
    /// A head the scanner did not see.
    pub(crate) const UNKNOWN: RawFraming = RawFraming {
        content_lengths: 0,
        transfer_encoding: false,
        content_length: None,
        unknown: true,
    };

    /// Whether the head was ambiguous: Content-Length with Transfer-Encoding, or more than one
    /// Content-Length (hyper keeps one of equal duplicates and drops CL next to TE); or not
    /// seen, which cannot be shown unambiguous.
    pub(crate) fn ambiguous(self) -> bool {
        self.unknown
            || self.content_lengths > 1
            || (self.content_lengths > 0 && self.transfer_encoding)
    }
}

/// Follows an HTTP/1 connection's bytes from message to message (head, then the body as the
/// head frames it: chunked when Transfer-Encoding is present, as hyper reads it, else
/// Content-Length, else none) and queues each request head's [`RawFraming`], so that a request
/// pipelined behind another is inspected like the first. It only needs to agree with hyper on
/// requests hyper accepts; on anything it cannot follow (a head above the limit, a bad chunk
/// size) it stops, and hyper fails the connection on the same bytes; should hyper serve a
/// request the scanner did not follow after all, its framing is [`RawFraming::UNKNOWN`], which
/// counts as ambiguous: the check fails closed.
#[derive(Debug)]
pub(crate) struct HeadScanner {
    state: Scan,
    /// The head being read, or the chunk-size / trailer line being read.
    line: Vec<u8>,
    /// Framing of heads read whose requests hyper has not started yet.
    heads: std::collections::VecDeque<RawFraming>,
    head_limit: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scan {
    /// Reading a request head (leading empty lines skipped, as hyper does).
    Head,
    /// Skipping this many bytes of a Content-Length body.
    Body(u64),
    /// Reading a chunk-size line.
    ChunkSize,
    /// Skipping this many bytes of chunk data plus its CRLF.
    ChunkData(u64),
    /// Reading trailer lines up to the empty one.
    Trailers,
    /// Lost: no more heads are queued.
    Lost,
}

/// Most queued heads: hyper reads at most its buffer ahead, so this is never reached by heads
/// hyper will serve; beyond it the scanner gives up rather than grow.
const MAX_QUEUED_HEADS: usize = 4096;

impl HeadScanner {
    pub(crate) fn new(head_limit: usize) -> Self {
        Self {
            state: Scan::Head,
            line: Vec::new(),
            heads: std::collections::VecDeque::new(),
            head_limit,
        }
    }

    /// The framing of the next request's head, in the order hyper parses them.
    pub(crate) fn next_head(&mut self) -> RawFraming {
        self.heads.pop_front().unwrap_or(RawFraming::UNKNOWN)
    }

    /// Follows `bytes`, the next ones read from the client.
    pub(crate) fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            match self.state {
                Scan::Lost => return,
                Scan::Head => {
                    if self.line.is_empty() {
                        let skip = bytes
                            .iter()
                            .position(|&b| b != b'\r' && b != b'\n')
                            .unwrap_or(bytes.len());
                        bytes = &bytes[skip..];
                        if bytes.is_empty() {
                            return;
                        }
                    }
                    // Look for the end in what is new, with 3 bytes of overlap.
                    let from = self.line.len().saturating_sub(3);
                    let room = (self.head_limit + 4).saturating_sub(self.line.len());
                    let take = bytes.len().min(room);
                    self.line.extend_from_slice(&bytes[..take]);
                    match head_end(&self.line[from..]) {
                        Some(end) => {
                            let end = from + end;
                            let used = take - (self.line.len() - end);
                            self.line.truncate(end);
                            bytes = &bytes[used..];
                            self.head_done();
                        }
                        None if take == bytes.len() => return,
                        None => self.state = Scan::Lost,
                    }
                }
                Scan::Body(left) => {
                    let n = left.min(bytes.len() as u64);
                    bytes = &bytes[n as usize..];
                    self.state = if n == left {
                        Scan::Head
                    } else {
                        Scan::Body(left - n)
                    };
                }
                Scan::ChunkData(left) => {
                    let n = left.min(bytes.len() as u64);
                    bytes = &bytes[n as usize..];
                    self.state = if n == left {
                        Scan::ChunkSize
                    } else {
                        Scan::ChunkData(left - n)
                    };
                }
                Scan::ChunkSize | Scan::Trailers => {
                    let Some(eol) = bytes.iter().position(|&b| b == b'\n') else {
                        self.line.extend_from_slice(bytes);
                        if self.line.len() > self.head_limit {
                            self.state = Scan::Lost;
                        }
                        return;
                    };
                    self.line.extend_from_slice(&bytes[..eol]);
                    bytes = &bytes[eol + 1..];
                    let line = std::mem::take(&mut self.line);
                    let line = line.strip_suffix(b"\r").unwrap_or(&line);
                    self.state = match self.state {
                        Scan::Trailers if line.is_empty() => Scan::Head,
                        Scan::Trailers => Scan::Trailers,
                        _ => match chunk_size(line) {
                            Some(0) => Scan::Trailers,
                            Some(size) => Scan::ChunkData(size.saturating_add(2)),
                            None => Scan::Lost,
                        },
                    };
                }
            }
        }
    }

    /// A whole head is in `line`: queue its framing and follow its body.
    fn head_done(&mut self) {
        let head = std::mem::take(&mut self.line);
        let framing = raw_framing(&head);
        self.state = match framing {
            Some(f) if f.transfer_encoding => Scan::ChunkSize,
            Some(f) if f.content_lengths > 0 => match f.content_length {
                Some(0) => Scan::Head,
                Some(n) => Scan::Body(n),
                // An unparsable length: hyper refuses it.
                None => Scan::Lost,
            },
            _ => Scan::Head,
        };
        if framing.is_none() {
            self.state = Scan::Lost;
        }
        if self.heads.len() >= MAX_QUEUED_HEADS {
            self.state = Scan::Lost;
            return;
        }
        self.heads.push_back(framing.unwrap_or(RawFraming::UNKNOWN));
    }
}

/// Where a head ends in `buf` (the index after its blank line, CRLF or bare LF).
fn head_end(buf: &[u8]) -> Option<usize> {
    (0..buf.len()).find_map(|i| match &buf[i..] {
        [b'\n', b'\n', ..] => Some(i + 2),
        [b'\n', b'\r', b'\n', ..] => Some(i + 3),
        _ => None,
    })
}

/// The size of a chunk-size line (`1a;ext=1`).
fn chunk_size(line: &[u8]) -> Option<u64> {
    let digits = line.split(|&b| b == b';').next()?.trim_ascii();
    if digits.is_empty() || digits.len() > 16 {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(digits).ok()?, 16).ok()
}

/// Counts the framing fields of the request head at the start of `head`; `None` when it does
/// not start with a request line or its end was not captured.
fn raw_framing(head: &[u8]) -> Option<RawFraming> {
    let end = head.windows(2).position(|w| w == b"\n\n" || w == b"\n\r")?;
    let mut lines = head[..end + 1].split(|&b| b == b'\n');
    let request_line = lines.next()?;
    if !request_line.trim_ascii_end().ends_with(b"HTTP/1.1")
        && !request_line.trim_ascii_end().ends_with(b"HTTP/1.0")
    {
        return None;
    }
    let mut framing = RawFraming {
        content_lengths: 0,
        transfer_encoding: false,
        content_length: None,
        unknown: false,
    };
    for line in lines {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let name = &line[..colon];
        if name.eq_ignore_ascii_case(b"content-length") {
            if framing.content_lengths == 0 {
                framing.content_length = std::str::from_utf8(line[colon + 1..].trim_ascii())
                    .ok()
                    .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|v| v.parse().ok());
            }
            framing.content_lengths += 1;
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            framing.transfer_encoding = true;
        }
    }
    Some(framing)
}

/// A request in flight on a connection; dropping it (with the response body) starts the
/// connection's idle time.
pub(crate) struct InFlight(Arc<ConnWatch>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let watch = &self.0;
        if watch.in_flight.fetch_sub(1, SeqCst) == 1 {
            watch.idle_since.store(watch.now_ms(), SeqCst);
            watch.reader.wake();
        }
    }
}

/// A client connection's I/O: replays the bytes read to detect h2c, and fails reads with
/// `TimedOut` when [`ConnWatch::deadline`] passes while hyper waits for bytes (hyper then
/// closes the connection).
struct ConnIo<T> {
    inner: T,
    prefix: Bytes,
    watch: Arc<ConnWatch>,
    sleep: Pin<Box<Sleep>>,
    armed: Option<Instant>,
}

impl<T> ConnIo<T> {
    fn new(inner: T, prefix: Bytes, watch: Arc<ConnWatch>) -> Self {
        Self {
            inner,
            prefix,
            watch,
            sleep: Box::pin(tokio::time::sleep(Duration::ZERO)),
            armed: None,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ConnIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            let replayed = this.prefix.split_to(n);
            this.watch.bytes_read(&replayed);
            buf.put_slice(&replayed);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.watch.bytes_read(&buf.filled()[before..]);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                // Registered before the deadline is read, so a request ending in between
                // wakes this task to re-arm.
                this.watch.reader.register(cx.waker());
                let Some(deadline) = this.watch.deadline() else {
                    return Poll::Pending;
                };
                if this.armed != Some(deadline) {
                    this.sleep.as_mut().reset(deadline);
                    this.armed = Some(deadline);
                }
                match this.sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "client header or idle timeout",
                    ))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ConnIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The scanner's verdicts for a connection's bytes fed in pieces of `step` bytes, one per
    /// request hyper would start (`None`: unknown), ending with the next one (the scanner's
    /// queue is then empty, so unknown).
    fn scan(bytes: &[u8], step: usize, requests: usize) -> Vec<Option<bool>> {
        let mut scanner = HeadScanner::new(1024);
        for piece in bytes.chunks(step) {
            scanner.feed(piece);
        }
        (0..=requests)
            .map(|_| {
                let f = scanner.next_head();
                (!f.unknown).then(|| f.ambiguous())
            })
            .collect()
    }

    #[test]
    fn the_scanner_sees_every_pipelined_head() {
        let conn: &[u8] = b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n\
            POST /b HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello\
            POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n\
            6;ext=\"a;b\"\r\nGET /x\r\n10\r\n0123456789abcdef\r\n0\r\nX-Trailer: 1\r\n\r\n\
            \r\nPOST /d HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\
            Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n\
            POST /e HTTP/1.1\nHost: a\nContent-Length: 2\nContent-Length: 2\n\nhi\
            GET /f HTTP/1.1\r\nHost: a\r\n\r\n";
        // Body bytes that look like a head (`GET /x`) are skipped as body; a blank line
        // before a request line is skipped as hyper skips it.
        let want = vec![
            Some(false),
            Some(false),
            Some(false),
            Some(true),
            Some(true),
            Some(false),
            None,
        ];
        for step in [1, 2, 3, 7, 64, conn.len()] {
            assert_eq!(scan(conn, step, 6), want, "fed {step} bytes at a time");
        }
    }

    #[test]
    fn the_scanner_fails_closed_when_it_cannot_follow() {
        // A bad chunk size: lost; what follows is unknown (hyper fails the connection).
        let lost = scan(
            b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n\
              POST /b HTTP/1.1\r\nContent-Length: 1\r\n\r\nx",
            5,
            1,
        );
        assert_eq!(lost, vec![Some(false), None]);
        // A head longer than the limit.
        let long = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(2000));
        assert_eq!(scan(long.as_bytes(), 100, 0), vec![None]);
        let mut scanner = HeadScanner::new(1024);
        scanner.feed(long.as_bytes());
        assert!(
            scanner.next_head().ambiguous(),
            "an unseen head is never trusted"
        );
        // Not a request line.
        assert_eq!(scan(b"hello\r\n\r\n", 3, 0), vec![None]);
    }

    #[test]
    fn raw_framing_sees_what_hyper_merges() {
        let f = |head: &[u8]| raw_framing(head).map(RawFraming::ambiguous);
        assert_eq!(
            f(b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0"),
            Some(true)
        );
        assert_eq!(
            f(b"POST / HTTP/1.1\r\ncontent-length: 5\r\nCONTENT-LENGTH: 5\r\n\r\nhello"),
            Some(true)
        );
        assert_eq!(
            f(b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nContent-Length: 5\r\n"),
            Some(false),
            "the body is not the head"
        );
        assert_eq!(
            f(b"POST / HTTP/1.1\nTransfer-Encoding: chunked\n\n"),
            Some(false)
        );
        assert_eq!(
            f(b"POST / HTTP/1.1\r\nContent-Length: 5\r\n"),
            None,
            "incomplete"
        );
        assert_eq!(
            f(b"hello\r\nContent-Length: 5\r\n\r\n"),
            None,
            "not a request line"
        );
    }
}
