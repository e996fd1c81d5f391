//! PROVISIONAL stand-in for the upstream pools (`gateway/upstream.rs` is being written on its
//! own branch with this exact API and replaces this file at merge): one fresh HTTP/1.1
//! connection per request to the first healthy server of the pool, no pooling, no retries, no
//! ejection. Just enough for the server side and its tests.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use http_body_util::BodyExt as _;
use hyper_util::rt::TokioIo;

use crate::config::Vip;
use crate::gateway::Body;

/// Every pool of one l7 VIP.
#[derive(Default)]
pub struct Upstreams {
    pools: RwLock<HashMap<String, Arc<Pool>>>,
}

/// One pool's servers.
pub struct Pool {
    name: String,
    servers: Vec<(SocketAddr, bool)>,
    connect_timeout: Duration,
    request_timeout: Duration,
}

/// A response from a pool's server, with how it was obtained.
pub struct Forwarded {
    /// The upstream's response (upgradeable when it is a 101).
    pub response: http::Response<Body>,
    /// The server that answered.
    pub server: SocketAddr,
    /// Tries made (1 without retries).
    pub attempts: u32,
    /// From sending the request to the response head.
    pub upstream_latency: Duration,
}

/// Why a request got no upstream response.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No eligible server (503).
    #[error("no server available")]
    NoServer,
    /// Could not connect (502).
    #[error("connect failed: {0}")]
    Connect(String),
    /// No response head in time (504).
    #[error("upstream timed out")]
    Timeout,
    /// The exchange failed (502).
    #[error("upstream protocol error: {0}")]
    Protocol(String),
}

impl UpstreamError {
    /// The status the gateway answers with.
    pub fn status(&self) -> http::StatusCode {
        match self {
            UpstreamError::NoServer => http::StatusCode::SERVICE_UNAVAILABLE,
            UpstreamError::Timeout => http::StatusCode::GATEWAY_TIMEOUT,
            UpstreamError::Connect(_) | UpstreamError::Protocol(_) => http::StatusCode::BAD_GATEWAY,
        }
    }
}

/// A pool's state for `xlb status` and metrics.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PoolStatus {
    /// The pool's name.
    pub name: String,
    /// Its servers.
    pub servers: Vec<ServerStatus>,
}

/// One server's state.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ServerStatus {
    /// The server's address.
    pub address: std::net::IpAddr,
    /// The port it is reached on.
    pub port: u16,
    /// Passing the agent's health checks.
    pub healthy: bool,
    /// Ejected by outlier detection.
    pub ejected: bool,
    /// Requests in flight.
    pub in_flight: u32,
}

impl Upstreams {
    /// No pools yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// (Re)build the pools from the VIP's gateway and backends.
    pub fn configure(&self, vip: &Vip, healthy: &dyn Fn(usize) -> bool) {
        let Some(gw) = &vip.gateway else { return };
        let pools = gw
            .pools
            .iter()
            .map(|p| {
                let servers = vip
                    .backends
                    .iter()
                    .enumerate()
                    .filter(|(_, b)| b.pool == p.name)
                    .map(|(i, b)| {
                        let addr = SocketAddr::new(b.address, b.port.unwrap_or(vip.port));
                        (addr, healthy(i))
                    })
                    .collect();
                let pool = Pool {
                    name: p.name.clone(),
                    servers,
                    connect_timeout: p.connect_timeout,
                    request_timeout: p.request_timeout,
                };
                (p.name.clone(), Arc::new(pool))
            })
            .collect();
        *self.pools.write().unwrap_or_else(|e| e.into_inner()) = pools;
    }

    /// The pool named `name`.
    pub fn pool(&self, name: &str) -> Option<Arc<Pool>> {
        self.pools
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    /// Every pool's state.
    pub fn status(&self) -> Vec<PoolStatus> {
        let pools = self.pools.read().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<PoolStatus> = pools
            .values()
            .map(|p| PoolStatus {
                name: p.name.clone(),
                servers: p
                    .servers
                    .iter()
                    .map(|&(address, healthy)| ServerStatus {
                        address: address.ip(),
                        port: address.port(),
                        healthy,
                        ejected: false,
                        in_flight: 0,
                    })
                    .collect(),
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }
}

impl Pool {
    /// Send `req` to the first healthy server over a fresh HTTP/1.1 connection.
    pub async fn send(&self, mut req: http::Request<Body>) -> Result<Forwarded, UpstreamError> {
        let server = self
            .servers
            .iter()
            .find(|(_, up)| *up)
            .map(|(a, _)| *a)
            .ok_or(UpstreamError::NoServer)?;
        let stream =
            tokio::time::timeout(self.connect_timeout, tokio::net::TcpStream::connect(server))
                .await
                .map_err(|_| UpstreamError::Connect("timeout".into()))?
                .map_err(|e| UpstreamError::Connect(e.to_string()))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| UpstreamError::Protocol(e.to_string()))?;
        tokio::spawn(conn.with_upgrades());
        if req.headers().get(http::header::HOST).is_none()
            && let Some(a) = req.uri().authority()
        {
            let host = http::HeaderValue::from_str(a.as_str())
                .map_err(|e| UpstreamError::Protocol(e.to_string()))?;
            req.headers_mut().insert(http::header::HOST, host);
        }
        let origin = req
            .uri()
            .path_and_query()
            .map_or("/", |pq| pq.as_str())
            .parse()
            .map_err(|e: http::uri::InvalidUri| UpstreamError::Protocol(e.to_string()))?;
        *req.uri_mut() = origin;
        *req.version_mut() = http::Version::HTTP_11;
        let start = Instant::now();
        let response = tokio::time::timeout(self.request_timeout, sender.send_request(req))
            .await
            .map_err(|_| UpstreamError::Timeout)?
            .map_err(|e| UpstreamError::Protocol(e.to_string()))?;
        Ok(Forwarded {
            response: response.map(|b| b.map_err(Into::into).boxed()),
            server,
            attempts: 1,
            upstream_latency: start.elapsed(),
        })
    }
}
