//! The L7 API gateway for VIPs in `l7` mode (issue 7): the XDP program passes their packets to
//! the host stack, where the agent terminates HTTP/1.1 and HTTP/2 (hyper on tokio, TLS with
//! rustls) and runs each request through named phases: check framing and normalise the path ->
//! match a route -> authenticate -> rate-limit -> pick an upstream -> forward -> log.
//!
//! Each phase that decides something is pure logic in its own module, with no sockets and no
//! runtime, so that the security-relevant decisions (which route a request reaches, which requests
//! are refused before routing) are unit-tested exhaustively and the server around them stays a
//! thin shell. So far:
//! - [`normalize`]: refuse ambiguous framing, normalise the path, strip hop-by-hop headers. It
//!   runs *before* routing so that `/public/../admin` is matched (and authenticated) as `/admin`.
//! - [`route`]: the route table and its documented precedence rule.
//! - [`auth`], [`ratelimit`]: credentials and token buckets.
//! - [`balance`]: how a pool picks a server (smooth weighted round robin, least request by two
//!   random choices, weighted rendezvous hashing for affinity).
//!
//! Around them, the shells that touch the network:
//! - [`server`]: listeners, connections, client timeouts, building a VIP's gateway and
//!   switching to it on reload; `proxy`, the per-request pipeline calling the phases;
//!   [`files`], certificates, key files and JWKS; `observe`, metrics and the access log.
//! - [`upstream`]: the upstream pools: per-server connection pools (HTTP/1.1 keep-alive on the
//!   gateway's own client, `h1`; multiplexed h2c and upgrades on hyper's low-level client),
//!   health and passive outlier ejection, timeouts, retries of requests that never left,
//!   protocol translation and upgrade pass-through.

pub mod auth;
pub mod balance;
pub mod files;
pub(crate) mod h1;
pub mod normalize;
mod observe;
mod proxy;
pub mod ratelimit;
pub mod route;
pub mod server;
pub mod upstream;
mod workers;

pub use workers::{count as worker_count, set_count as set_worker_count};

pub use server::{GatewayError, GatewayStatus, Gateways, RouteStatus, check};

/// The error type of request and response bodies: whatever hyper, a size limit or an upstream
/// reports, boxed.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A request or response body as it travels through the gateway: hyper's incoming bodies,
/// limited or generated bodies, boxed to one type so the phases compose.
pub type Body = http_body_util::combinators::BoxBody<bytes::Bytes, BoxError>;

#[cfg(test)]
mod tests;
