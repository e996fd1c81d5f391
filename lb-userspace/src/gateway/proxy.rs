//! The per-request pipeline: check framing -> normalise the path -> find the route ->
//! authenticate -> rate-limit -> build the upstream request -> forward -> log. Each decision is
//! a call into a pure module ([`normalize`](super::normalize), [`route`](super::route),
//! [`auth`](super::auth), [`ratelimit`](super::ratelimit)); this module only moves the request
//! between them and turns their verdicts into responses.

use std::convert::Infallible;
use std::future::Future as _;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt as _, Full, LengthLimitError, Limited};
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;

use super::Body;
use super::auth::{ApiKeys, AuthError, JwtVerifier};
use super::normalize::{check_framing, normalize_path, routing_path, strip_hop_by_hop};
use super::observe::{Refusal, RouteMetrics, VipMetrics};
use super::ratelimit::{Limiter, response_headers};
use super::route::{PathMatch, RouteTable};
use super::server::{ConnWatch, InFlight, RawFraming};
use super::upstream::{ClientBodyWait, Upstreams};
use crate::config::l7::{self, GatewayRoute, LimitKey, RouteAuth};

/// A route's credential check, built from its files when the gateway is built.
pub(crate) enum Authenticator {
    /// `auth = "none"`.
    None,
    /// `auth = "api_key"`.
    ApiKey(ApiKeys),
    /// `auth = "jwt"`.
    Jwt(JwtVerifier),
}

/// A route's rate limiter, keyed by the bytes of its [`LimitKey`] value.
pub(crate) type RouteLimiter = Limiter<Vec<u8>>;

/// What a route needs at request time besides its configuration.
pub(crate) struct RouteRuntime {
    /// The route's name, shared with every request's access-log record.
    pub(crate) name: Arc<str>,
    pub(crate) auth: Authenticator,
    pub(crate) limiter: Option<Arc<RouteLimiter>>,
    pub(crate) metrics: Arc<RouteMetrics>,
}

/// One l7 VIP's gateway, built and validated: what a listener serves requests with. Replaced
/// as a whole on reload, so a request sees one consistent configuration.
pub(crate) struct VipGateway {
    /// The VIP's name, shared with every request's access-log record.
    pub(crate) vip: Arc<str>,
    pub(crate) listen: SocketAddr,
    pub(crate) settings: l7::Gateway,
    pub(crate) table: RouteTable,
    /// Indexed as `settings.routes` and the table's answers.
    pub(crate) routes: Vec<RouteRuntime>,
    /// Every route's identity header name, removed from every request.
    pub(crate) identity_headers: Vec<HeaderName>,
    pub(crate) upstreams: Arc<Upstreams>,
    pub(crate) tls: Option<Arc<rustls::ServerConfig>>,
    pub(crate) metrics: Arc<VipMetrics>,
    pub(crate) h1: hyper::server::conn::http1::Builder,
    pub(crate) h2: hyper::server::conn::http2::Builder<hyper_util::rt::TokioExecutor>,
}

/// The client connection a request arrived on.
pub(crate) struct ClientConn {
    pub(crate) peer: SocketAddr,
    pub(crate) watch: Arc<ConnWatch>,
    /// The forwarding headers' client parts, made once per connection (a keep-alive client
    /// sends many requests).
    pub(crate) forwarded: ForwardedClient,
}

/// The client's address as `X-Forwarded-For` and `Forwarded` spell it, with the protocol.
pub(crate) struct ForwardedClient {
    /// The address, as an `X-Forwarded-For` element.
    address: HeaderValue,
    /// `for=...;proto=...`, the start of this hop's `Forwarded` element.
    element: String,
    /// `http` or `https`.
    proto: &'static str,
}

impl ForwardedClient {
    /// The parts for a client at `client`, over TLS when `tls`.
    pub(crate) fn new(client: IpAddr, tls: bool) -> Self {
        let proto = if tls { "https" } else { "http" };
        let node = match client {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => format!("\"[{v6}]\""),
        };
        Self {
            address: HeaderValue::try_from(client.to_string())
                .unwrap_or_else(|_| HeaderValue::from_static("unknown")),
            element: format!("for={node};proto={proto}"),
            proto,
        }
    }
}

/// What the access log and the metrics record about one request, filled in as it goes.
struct Record {
    vip_metrics: Arc<VipMetrics>,
    route_metrics: Option<Arc<RouteMetrics>>,
    vip: Arc<str>,
    route: Option<Arc<str>>,
    method: Method,
    /// The path as sent, without the query (it may carry an API key), shortened.
    path: String,
    client: SocketAddr,
    request_id: HeaderValue,
    status: u16,
    upstream: Option<SocketAddr>,
    attempts: u32,
    upstream_latency: Option<Duration>,
    start: Instant,
}

impl Record {
    /// Counts and logs the finished request, `bytes` of response body sent.
    fn finish(self, bytes: u64) {
        let duration = self.start.elapsed();
        let metrics = self
            .route_metrics
            .as_deref()
            .unwrap_or(&self.vip_metrics.unrouted);
        metrics.request(self.status, duration);
        tracing::info!(
            target: "xlb::access",
            vip = %self.vip,
            route = %self.route.as_deref().unwrap_or(super::observe::NO_ROUTE_LABEL),
            method = %self.method,
            path = %self.path,
            status = self.status,
            client = %self.client.ip(),
            upstream = %self.upstream.map(|a| a.to_string()).unwrap_or_default(),
            attempts = self.attempts,
            // Microseconds, in milliseconds: no float noise in the log.
            duration_ms = duration.as_micros() as f64 / 1e3,
            upstream_ms = self.upstream_latency.map_or(-1.0, |d| d.as_micros() as f64 / 1e3),
            request_id = %String::from_utf8_lossy(self.request_id.as_bytes()),
            bytes,
        );
    }
}

/// The response body handed to hyper: the upstream's (or the gateway's own) body, counted, and
/// holding the request's in-flight mark; dropping it (sent or abandoned) ends the request for
/// the metrics, the access log and the connection's idle timer.
pub(crate) struct ResponseBody {
    inner: Body,
    bytes: u64,
    record: Option<Box<Record>>,
    _in_flight: InFlight,
}

impl hyper::body::Body for ResponseBody {
    type Data = Bytes;
    type Error = super::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.bytes += data.len() as u64;
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

impl Drop for ResponseBody {
    fn drop(&mut self) {
        if let Some(record) = self.record.take() {
            record.finish(self.bytes);
        }
    }
}

/// Serves one request: the hyper service of every client connection.
pub(crate) async fn handle(
    gw: Arc<VipGateway>,
    conn: Arc<ClientConn>,
    req: Request<Incoming>,
) -> Result<Response<ResponseBody>, Infallible> {
    let framed = req.headers().contains_key(header::CONTENT_LENGTH)
        || req.headers().contains_key(header::TRANSFER_ENCODING);
    let (in_flight, raw_framing) = conn.watch.request_started();
    let request_id = request_id(req.headers(), &gw.settings.request_id_header);
    let path = req.uri().path();
    let path = match path.char_indices().nth(256) {
        Some((cut, _)) => format!("{}...", &path[..cut]),
        None => path.to_owned(),
    };
    let mut record = Box::new(Record {
        vip_metrics: gw.metrics.clone(),
        route_metrics: None,
        vip: gw.vip.clone(),
        route: None,
        method: req.method().clone(),
        path,
        client: conn.peer,
        request_id: request_id.clone(),
        status: 0,
        upstream: None,
        attempts: 0,
        upstream_latency: None,
        start: Instant::now(),
    });
    let mut extra: Vec<(HeaderName, HeaderValue)> = Vec::new();
    // Only a request with a body can be framed ambiguously.
    let mut response = if framed && raw_framing.is_some_and(RawFraming::ambiguous) {
        refuse(
            &gw,
            Refusal::Framing,
            StatusCode::BAD_REQUEST,
            "Content-Length with Transfer-Encoding, or repeated",
        )
    } else {
        pipeline(&gw, &conn, req, &request_id, &mut record, &mut extra).await
    };
    let headers = response.headers_mut();
    headers.insert(gw.settings.request_id_header.clone(), request_id);
    for (name, value) in extra {
        headers.insert(name, value);
    }
    *response.version_mut() = Version::HTTP_11;
    record.status = response.status().as_u16();
    Ok(response.map(|inner| ResponseBody {
        inner,
        bytes: 0,
        record: Some(record),
        _in_flight: in_flight,
    }))
}

/// The phases; returns the response to send (the upstream's or the gateway's own).
async fn pipeline(
    gw: &VipGateway,
    conn: &ClientConn,
    mut req: Request<Incoming>,
    request_id: &HeaderValue,
    record: &mut Record,
    extra: &mut Vec<(HeaderName, HeaderValue)>,
) -> Response<Body> {
    let settings = &gw.settings;
    // 1. Framing, and a declared body above the limit.
    if let Err(e) = check_framing(req.headers()) {
        return refuse(
            gw,
            Refusal::Framing,
            StatusCode::BAD_REQUEST,
            &e.to_string(),
        );
    }
    if content_length(req.headers()).is_some_and(|len| len > settings.max_body_bytes) {
        return refuse(
            gw,
            Refusal::TooLarge,
            StatusCode::PAYLOAD_TOO_LARGE,
            "request body too large",
        );
    }
    // 2. The normalised path is what routing, auth and the upstream see.
    let raw = req.uri().path_and_query().map_or("", |pq| pq.as_str());
    let mut path = match normalize_path(raw, settings.encoded_slash) {
        Ok(path) => path,
        Err(e) => return refuse(gw, Refusal::Path, StatusCode::BAD_REQUEST, &e.to_string()),
    };
    let host = match request_host(&req) {
        Ok(host) => host,
        Err(why) => return refuse(gw, Refusal::Host, StatusCode::BAD_REQUEST, why),
    };
    // Before routing: a client must not be able to forge an identity, nor steer routing with
    // a header only the gateway may set.
    // CGI-style upstreams (PHP, WSGI, Rack) read `X_Id` and `X-Id` as one variable
    // (`HTTP_X_ID`), so every spelling that differs only in `-`/`_` goes too.
    let forged: Vec<HeaderName> = req
        .headers()
        .keys()
        .filter(|name| {
            gw.identity_headers
                .iter()
                .any(|id| same_but_underscores(name, id))
        })
        .cloned()
        .collect();
    for name in forged {
        req.headers_mut().remove(name);
    }
    // 3. Route.
    let routed = routing_path(&path);
    let Some(index) = gw.table.find(&host, req.method(), &routed, req.headers()) else {
        return refuse(gw, Refusal::NoRoute, StatusCode::NOT_FOUND, "no route");
    };
    let route = &settings.routes[index];
    let runtime = &gw.routes[index];
    record.route = Some(runtime.name.clone());
    record.route_metrics = Some(runtime.metrics.clone());
    // 4. Authenticate.
    let identity = match authenticate(route, runtime, req.headers(), &mut path) {
        Ok(identity) => identity,
        Err(e) => {
            runtime.metrics.auth_rejected(e.status());
            tracing::debug!(vip = %gw.vip, route = %route.matcher.name, reason = %e, "auth refused");
            return auth_refusal(&e);
        }
    };
    // 5. Rate-limit.
    if let Some(limiter) = &runtime.limiter {
        // Upstreams differ on which of repeated fields they read (first, last, joined): a
        // bucket keyed on one of them could be dodged by varying another.
        if let Some(LimitKey::Header(name)) = route.rate_limit.as_ref().map(|l| &l.key)
            && req.headers().get_all(name).iter().nth(1).is_some()
        {
            runtime.metrics.rate_limited();
            return text(StatusCode::BAD_REQUEST, "repeated rate limit key header");
        }
        let key = limit_key(route, conn.peer.ip(), identity.as_deref(), req.headers());
        let decision = limiter.check(&key, Instant::now());
        for (name, value) in response_headers(limiter, &decision) {
            if let Ok(value) = HeaderValue::try_from(value) {
                extra.push((HeaderName::from_static(lower(name)), value));
            }
        }
        if !decision.allowed {
            runtime.metrics.rate_limited();
            return text(StatusCode::TOO_MANY_REQUESTS, "rate limit exceeded");
        }
    }
    // 6. The upstream request.
    let upgrade = websocket_upgrade(&req);
    let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    let authority = parts.uri.authority().map(|a| a.as_str().to_owned());
    let accepts_trailers = accepts_trailers(&parts.headers);
    strip_hop_by_hop(&mut parts.headers);
    // `TE: trailers` is the one TE an HTTP/2 hop allows, and gRPC servers require it; the
    // gateway passes trailers through, so the client's acceptance holds for it too.
    if accepts_trailers {
        parts
            .headers
            .insert(header::TE, HeaderValue::from_static("trailers"));
    }
    // IIS and some frameworks take the path from these instead of the request line: a route's
    // auth would be decided on one path and the upstream serve another.
    for name in &PATH_OVERRIDE_HEADERS {
        parts.headers.remove(name);
    }
    if parts.version == Version::HTTP_2 {
        join_cookies(&mut parts.headers);
    }
    if let Some(protocol) = &upgrade {
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(header::UPGRADE, protocol.clone());
    }
    if route.strip_prefix
        && let PathMatch::Prefix(prefix) = &route.matcher.path
    {
        path = strip_prefix(&path, prefix);
    }
    parts.uri = match path.parse::<Uri>() {
        Ok(uri) => uri,
        Err(_) => return refuse(gw, Refusal::Path, StatusCode::BAD_REQUEST, "invalid path"),
    };
    // An absolute-form or HTTP/2 target names the host; it replaces any Host field.
    if let Some(authority) = authority
        && let Ok(value) = HeaderValue::from_str(&authority)
    {
        parts.headers.insert(header::HOST, value);
    }
    for name in &route.remove_headers {
        parts.headers.remove(name);
    }
    for (name, value) in &route.add_headers {
        parts.headers.insert(name.clone(), value.clone());
    }
    forwarding_headers(&mut parts.headers, &conn.forwarded, &host);
    parts
        .headers
        .insert(settings.request_id_header.clone(), request_id.clone());
    if let Some(identity) = &identity {
        match HeaderValue::from_str(identity) {
            Ok(value) => {
                parts.headers.insert(route.identity_header.clone(), value);
            }
            Err(_) => {
                let e = AuthError::Invalid("identity not valid in a header".into());
                runtime.metrics.auth_rejected(e.status());
                return auth_refusal(&e);
            }
        }
    }
    // The body is limited to max_body_bytes; a client body that fails (bad chunking, too
    // large, stalled) is told apart from an upstream failure by these flags.
    let faults = Arc::new(BodyFaults::default());
    let body_timeout = || {
        refuse(
            gw,
            Refusal::BodyTimeout,
            StatusCode::REQUEST_TIMEOUT,
            "request body timeout",
        )
    };
    let body: Body = if body.is_end_stream() {
        // No body (a GET, `Content-Length: 0`): nothing to limit, time or check.
        Body::default()
    } else {
        let limit = usize::try_from(settings.max_body_bytes).unwrap_or(usize::MAX);
        // A client that stops sending its body is cut off after the idle timeout (no other
        // client timeout runs while a request is in flight), and the upstream learns when the
        // body waits for the client (a request timeout then is the client's delay).
        let wait = ClientBodyWait::default();
        parts.extensions.insert(wait.clone());
        let body = ClientBody {
            inner: body,
            timeout: settings.idle_timeout,
            sleep: Box::pin(tokio::time::sleep(Duration::ZERO)),
            armed: false,
            wait,
            faults: faults.clone(),
        };
        let seen = faults.clone();
        let mut body: Body = Limited::new(body, limit)
            .map_err(move |e| {
                if e.is::<LengthLimitError>() {
                    seen.too_large.store(true, Ordering::Relaxed);
                } else {
                    seen.client_fault.store(true, Ordering::Relaxed);
                }
                e
            })
            .boxed();
        // Nothing goes upstream until the body's first frame is in: a body that is broken or
        // too large from its start (an invalid first chunk size, the classic smuggling
        // attempt) is refused without the upstream ever seeing the request. Later failures
        // abort the upstream request mid-body; the upstream never parses the client's framing
        // either way (the gateway frames the upstream request itself).
        if !body.is_end_stream() {
            body = match body.frame().await {
                None => Body::default(),
                Some(Ok(first)) => Prepend {
                    first: Some(first),
                    rest: body,
                }
                .boxed(),
                Some(Err(_)) if faults.timed_out.load(Ordering::Relaxed) => {
                    return body_timeout();
                }
                Some(Err(_)) if faults.too_large.load(Ordering::Relaxed) => {
                    return refuse(
                        gw,
                        Refusal::TooLarge,
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "request body too large",
                    );
                }
                Some(Err(_)) => {
                    return refuse(
                        gw,
                        Refusal::Framing,
                        StatusCode::BAD_REQUEST,
                        "invalid request body",
                    );
                }
            };
        }
        body
    };
    let upstream_req = Request::from_parts(parts, body);
    // 7. Forward.
    let Some(pool) = gw.upstreams.pool(&route.pool) else {
        return text(StatusCode::SERVICE_UNAVAILABLE, "no upstream pool");
    };
    let forwarded = match pool.send(upstream_req).await {
        Ok(forwarded) => forwarded,
        Err(e) => {
            record.attempts = e.attempts;
            record.upstream = e.server;
            if faults.too_large.load(Ordering::Relaxed) {
                return refuse(
                    gw,
                    Refusal::TooLarge,
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "request body too large",
                );
            }
            if faults.timed_out.load(Ordering::Relaxed) || e.status() == StatusCode::REQUEST_TIMEOUT
            {
                return body_timeout();
            }
            if faults.client_fault.load(Ordering::Relaxed) {
                return refuse(
                    gw,
                    Refusal::Framing,
                    StatusCode::BAD_REQUEST,
                    "invalid request body",
                );
            }
            tracing::debug!(vip = %gw.vip, route = %route.matcher.name, error = %e, "upstream failed");
            let status = e.status();
            return text(
                status,
                status.canonical_reason().unwrap_or("upstream error"),
            );
        }
    };
    record.upstream = Some(forwarded.server);
    record.attempts = forwarded.attempts;
    record.upstream_latency = Some(forwarded.upstream_latency);
    runtime.metrics.upstream.observe(forwarded.upstream_latency);
    let mut response = forwarded.response;
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        let (Some(client_upgrade), Some(protocol)) = (client_upgrade, upgrade) else {
            return text(StatusCode::BAD_GATEWAY, "unexpected upgrade from upstream");
        };
        let upstream_upgrade = hyper::upgrade::on(&mut response);
        strip_hop_by_hop(response.headers_mut());
        let headers = response.headers_mut();
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, protocol);
        conn.watch.tunnel();
        tokio::spawn(tunnel(
            client_upgrade,
            upstream_upgrade,
            gw.settings.idle_timeout,
        ));
        return response;
    }
    strip_hop_by_hop(response.headers_mut());
    response
}

/// How the client's request body failed, if it did: set by the body as it is read, read when
/// the upstream exchange fails, to answer the client's fault as such (not as a 502).
#[derive(Default)]
struct BodyFaults {
    /// Over `max_body_bytes`: 413.
    too_large: AtomicBool,
    /// Broken (invalid chunking, shorter than declared): 400.
    client_fault: AtomicBool,
    /// Stalled for `idle_timeout_ms`: 408.
    timed_out: AtomicBool,
}

/// A body whose first frame was already read (to check it before forwarding).
struct Prepend {
    first: Option<Frame<Bytes>>,
    rest: Body,
}

impl hyper::body::Body for Prepend {
    type Data = Bytes;
    type Error = super::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.first.take() {
            Some(first) => Poll::Ready(Some(Ok(first))),
            None => Pin::new(&mut self.rest).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let mut hint = self.rest.size_hint();
        if let Some(data) = self.first.as_ref().and_then(Frame::data_ref) {
            let n = data.len() as u64;
            if let Some(upper) = hint.upper() {
                hint.set_upper(upper + n);
            }
            hint.set_lower(hint.lower() + n);
        }
        hint
    }
}

/// The client's request body, failing when the client sends nothing for `timeout` while the
/// gateway waits for it (only then: a body not polled because the upstream is slow to read is
/// not the client's delay). `wait` is set while it waits. The client's trailer fields are
/// dropped: nothing checks them, and upstreams that merge trailers into the headers would take
/// a forged identity header (or anything else the gateway removes) from them.
struct ClientBody {
    inner: Incoming,
    timeout: Duration,
    sleep: Pin<Box<tokio::time::Sleep>>,
    armed: bool,
    wait: ClientBodyWait,
    faults: Arc<BodyFaults>,
}

impl hyper::body::Body for ClientBody {
    type Data = Bytes;
    type Error = super::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let mut polled = Pin::new(&mut this.inner).poll_frame(cx);
        while let Poll::Ready(Some(Ok(frame))) = &polled
            && frame.is_trailers()
        {
            polled = Pin::new(&mut this.inner).poll_frame(cx);
        }
        match polled {
            Poll::Pending => {
                if !this.armed {
                    this.armed = true;
                    let deadline = tokio::time::Instant::now() + this.timeout;
                    this.sleep.as_mut().reset(deadline);
                    this.wait.0.store(true, Ordering::SeqCst);
                }
                match this.sleep.as_mut().poll(cx) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(()) => {
                        this.faults.timed_out.store(true, Ordering::SeqCst);
                        Poll::Ready(Some(Err("client request body timeout".into())))
                    }
                }
            }
            Poll::Ready(frame) => {
                this.armed = false;
                this.wait.0.store(false, Ordering::SeqCst);
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Joins the client's and the upstream's upgraded connections (WebSocket) until either ends,
/// or until no byte has gone either way for `idle` (the VIP's `idle_timeout_ms`, as nginx's
/// `proxy_read_timeout` ends a quiet WebSocket): a tunnel nobody uses must not hold two sockets
/// and a task forever.
async fn tunnel(
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    idle: Duration,
) {
    let (client, upstream) = match tokio::join!(client, upstream) {
        (Ok(client), Ok(upstream)) => (client, upstream),
        (client, upstream) => {
            tracing::debug!(client = ?client.err(), upstream = ?upstream.err(), "upgrade failed");
            return;
        }
    };
    let start = Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let mut client = Active::new(TokioIo::new(client), &last, start);
    let mut upstream = Active::new(TokioIo::new(upstream), &last, start);
    let copy = tokio::io::copy_bidirectional(&mut client, &mut upstream);
    tokio::pin!(copy);
    loop {
        let quiet = start
            .elapsed()
            .saturating_sub(Duration::from_millis(last.load(Ordering::Relaxed)));
        if quiet >= idle {
            tracing::debug!(
                idle_ms = idle.as_millis() as u64,
                "idle upgraded connection closed"
            );
            return;
        }
        tokio::select! {
            ended = &mut copy => {
                if let Err(e) = ended {
                    tracing::debug!(error = %e, "upgraded connection ended");
                }
                return;
            }
            () = tokio::time::sleep(idle - quiet) => {}
        }
    }
}

/// An upgraded connection that notes when it last carried a byte (milliseconds after `start`,
/// shared by both sides of a tunnel).
struct Active<T> {
    inner: T,
    last: Arc<AtomicU64>,
    start: Instant,
}

impl<T> Active<T> {
    fn new(inner: T, last: &Arc<AtomicU64>, start: Instant) -> Self {
        Self {
            inner,
            last: last.clone(),
            start,
        }
    }

    fn touch(&self) {
        let now = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(now, Ordering::Relaxed);
    }
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Active<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.touch();
        }
        polled
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Active<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A response the gateway makes itself, counted by reason. After a malformed or oversized
/// request the connection is closed (as nginx does): its unread body cannot be trusted to
/// end where the client says, and draining it only serves the client.
fn refuse(gw: &VipGateway, reason: Refusal, status: StatusCode, message: &str) -> Response<Body> {
    gw.metrics.refused(reason);
    let mut response = text(status, message);
    if reason != Refusal::NoRoute {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// A small text/plain response.
fn text(status: StatusCode, message: &str) -> Response<Body> {
    let mut response = Response::new(
        Full::new(Bytes::from(format!("{message}\n")))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn auth_refusal(e: &AuthError) -> Response<Body> {
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::UNAUTHORIZED);
    let mut response = text(
        status,
        if status == StatusCode::FORBIDDEN {
            "forbidden"
        } else {
            "unauthorized"
        },
    );
    if let Some(challenge) = e.www_authenticate()
        && let Ok(value) = HeaderValue::try_from(challenge)
    {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, value);
    }
    response
}

/// The declared body length, when there is exactly one valid Content-Length (framing was
/// checked before).
fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The host the request is for: the target's authority (HTTP/2 `:authority`, or an
/// absolute-form HTTP/1 target, which RFC 9112 3.2.2 says wins over Host), else the one Host
/// field. Refused when HTTP/1.1 has no Host or there are several (RFC 9112 3.2: 400), and when
/// it is not a plain `host[:port]` (see [`valid_host`]); HTTP/1.0 without one gets the empty
/// host (only host-less routes match).
fn request_host(req: &Request<Incoming>) -> Result<String, &'static str> {
    let host = if let Some(authority) = req.uri().authority() {
        authority.as_str()
    } else {
        let mut hosts = req.headers().get_all(header::HOST).iter();
        match (hosts.next(), hosts.next()) {
            (Some(host), None) => host.to_str().map_err(|_| "invalid Host")?,
            (None, None) if req.version() < Version::HTTP_11 => return Ok(String::new()),
            _ => return Err("missing or ambiguous Host"),
        }
    };
    if valid_host(host) {
        Ok(host.to_owned())
    } else {
        Err("invalid Host")
    }
}

/// Whether `host` is a plain `name[:port]`: a DNS-style name (letters, digits, `-`, `_`, `.`),
/// an IPv4 address or a bracketed IPv6 address, with an optional port of 1 to 5 digits. No
/// userinfo, percent-encoding, path, second port or whitespace: upstreams parse those each their
/// own way (nginx takes `a.example` out of `a.example:80:80`), and would then serve another
/// host's content under the route the gateway picked for this one.
fn valid_host(host: &str) -> bool {
    let (name, port) = if let Some(rest) = host.strip_prefix('[') {
        let Some((v6, after)) = rest.split_once(']') else {
            return false;
        };
        if v6.parse::<std::net::Ipv6Addr>().is_err() {
            return false;
        }
        match after {
            "" => return true,
            _ => match after.strip_prefix(':') {
                Some(port) => ("", Some(port)),
                None => return false,
            },
        }
    } else {
        match host.split_once(':') {
            Some((name, port)) => (name, Some(port)),
            None => (host, None),
        }
    };
    let port_ok =
        port.is_none_or(|p| (1..=5).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()));
    let name_ok = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    port_ok && name_ok && (host.starts_with('[') || !name.is_empty())
}

/// The identity (key name or JWT subject) of an authenticated request, `None` on routes without
/// auth. Removes the route's API key query parameter from `path` in every case, so a key never
/// travels upstream.
fn authenticate(
    route: &GatewayRoute,
    runtime: &RouteRuntime,
    headers: &HeaderMap,
    path: &mut String,
) -> Result<Option<String>, AuthError> {
    match (&route.auth, &runtime.auth) {
        (RouteAuth::ApiKey { header, query, .. }, Authenticator::ApiKey(keys)) => {
            let from_query = query
                .as_deref()
                .and_then(|name| take_query_param(path, name));
            let mut values = headers.get_all(header).iter();
            let presented = match (values.next(), values.next()) {
                (Some(_), Some(_)) => return Err(AuthError::Refused("several API keys".into())),
                (Some(value), None) => Some(
                    value
                        .to_str()
                        .map_err(|_| AuthError::Refused("API key not ASCII".into()))?
                        .to_owned(),
                ),
                (None, _) => from_query,
            };
            keys.verify(presented.as_deref())
                .map(|name| Some(name.to_owned()))
        }
        (RouteAuth::Jwt { .. }, Authenticator::Jwt(verifier)) => {
            let mut values = headers.get_all(header::AUTHORIZATION).iter();
            let token = match (values.next(), values.next()) {
                (Some(_), Some(_)) => {
                    return Err(AuthError::Invalid("several Authorization fields".into()));
                }
                (Some(value), None) => bearer_token(value)?,
                (None, _) => None,
            };
            verifier.verify(token).map(Some)
        }
        _ => Ok(None),
    }
}

/// The token of `Authorization: Bearer <token>` (scheme case-insensitive); another scheme
/// counts as no credential (RFC 6750 3.1).
fn bearer_token(value: &HeaderValue) -> Result<Option<&str>, AuthError> {
    let value = value
        .to_str()
        .map_err(|_| AuthError::Invalid("Authorization not ASCII".into()))?;
    Ok(match value.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => Some(token.trim()),
        _ => None,
    })
}

/// Removes every `name=value` parameter named `name` from the query of `path` and returns the
/// first value, percent-decoded.
fn take_query_param(path: &mut String, name: &str) -> Option<String> {
    let (base, query) = path.split_once('?')?;
    let mut found = None;
    let kept: Vec<&str> = query
        .split('&')
        .filter(|param| {
            let (key, value) = param.split_once('=').unwrap_or((param, ""));
            // `api%5Fkey` is `api_key` to the upstream: found (and removed) either way.
            if key == name || (key.contains('%') && percent_decode(key) == name) {
                found.get_or_insert_with(|| percent_decode(value));
                false
            } else {
                true
            }
        })
        .collect();
    found.as_ref()?;
    *path = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    found
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&h), Some(&l)) if hex(h).is_some() && hex(l).is_some() => {
                out.push((hex(h).unwrap_or(0) * 16 + hex(l).unwrap_or(0)) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The bucket key of a request for the route's limit.
fn limit_key(
    route: &GatewayRoute,
    client: IpAddr,
    identity: Option<&str>,
    headers: &HeaderMap,
) -> Vec<u8> {
    let by_client = || client.to_string().into_bytes();
    let key = match &route.rate_limit.as_ref().map(|l| &l.key) {
        Some(LimitKey::ApiKey | LimitKey::JwtSubject) => {
            identity.map_or_else(by_client, |i| i.as_bytes().to_vec())
        }
        Some(LimitKey::Header(name)) => headers
            .get(name)
            .map(|v| v.as_bytes().to_vec())
            .unwrap_or_default(),
        Some(LimitKey::ClientIp) | None => by_client(),
    };
    compact_key(key)
}

/// Longest limiter key kept as sent; longer ones are replaced by a digest.
const MAX_RAW_KEY: usize = 31;

/// `key` in at most 32 bytes, so that a limiter's `max_keys` bound its memory whatever clients
/// send (a header value may be `max_header_bytes` long): short keys are kept with a 0 tag, longer
/// ones become a 1 tag and 31 bytes of their SHA-256, which no client can make collide with
/// another's.
fn compact_key(mut key: Vec<u8>) -> Vec<u8> {
    if key.len() <= MAX_RAW_KEY {
        key.insert(0, 0);
        return key;
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, &key);
    let mut out = Vec::with_capacity(MAX_RAW_KEY + 1);
    out.push(1);
    out.extend_from_slice(&digest.as_ref()[..MAX_RAW_KEY]);
    out
}

/// Whether two header names are equal once `_` is read as `-` (names are lowercase).
fn same_but_underscores(a: &HeaderName, b: &HeaderName) -> bool {
    let dash = |c: &u8| if *c == b'_' { b'-' } else { *c };
    a.as_str().len() == b.as_str().len()
        && a.as_str()
            .as_bytes()
            .iter()
            .map(dash)
            .eq(b.as_str().as_bytes().iter().map(dash))
}

/// The `Upgrade` value of an HTTP/1.1 WebSocket upgrade request: `Connection` lists `upgrade`
/// and there is one `Upgrade` field, `websocket`. No other protocol is tunnelled: after an
/// `h2c` upgrade the client would speak HTTP/2 to the upstream directly, every later request
/// past routing, auth and limits (h2c smuggling); other upgrades go up as plain requests
/// (`Upgrade` is hop-by-hop).
fn websocket_upgrade(req: &Request<Incoming>) -> Option<HeaderValue> {
    if req.version() != Version::HTTP_11 {
        return None;
    }
    let asks = req
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    let mut upgrades = req.headers().get_all(header::UPGRADE).iter();
    match (upgrades.next(), upgrades.next()) {
        (Some(value), None)
            if asks
                && value
                    .to_str()
                    .is_ok_and(|v| v.trim().eq_ignore_ascii_case("websocket")) =>
        {
            Some(value.clone())
        }
        _ => None,
    }
}

/// Whether the client's `TE` lists `trailers` (RFC 9110 10.1.4).
fn accepts_trailers(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|coding| {
            let name = coding.split(';').next().unwrap_or("").trim();
            name.eq_ignore_ascii_case("trailers")
        })
}

/// Client headers that some upstreams read as the request's path (`X-Original-URL`,
/// `X-Rewrite-URL`); never forwarded.
static PATH_OVERRIDE_HEADERS: [HeaderName; 2] = [
    HeaderName::from_static("x-original-url"),
    HeaderName::from_static("x-rewrite-url"),
];

/// An HTTP/2 client may split `cookie` into several fields (RFC 9113 8.2.3); they are joined
/// with `"; "` into one, as that RFC requires before an HTTP/1.1 hop, where several Cookie
/// lines are not allowed and upstreams would read only one.
fn join_cookies(headers: &mut HeaderMap) {
    let mut values = headers.get_all(header::COOKIE).iter();
    if values.nth(1).is_none() {
        return;
    }
    let joined: Vec<u8> = headers
        .get_all(header::COOKIE)
        .iter()
        .map(HeaderValue::as_bytes)
        .collect::<Vec<_>>()
        .join(&b"; "[..]);
    if let Ok(value) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, value);
    }
}

/// `path` (normalised, with query) without the route's prefix, segment by segment as routing
/// matched it (see [`routing_path`]: `;parameters` do not count, and a segment that is only
/// parameters is not one), so `/api;v=1/users` on `/api` goes up as `/users`; the rest keeps its
/// leading slash (`/api` on `/api` goes up as `/`).
fn strip_prefix(path: &str, prefix: &str) -> String {
    if prefix == "/" {
        return path.to_owned();
    }
    let (base, query) = match path.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (path, None),
    };
    let mut to_skip = prefix[1..].split('/').count();
    let mut rest = base[1..].split('/').skip_while(|segment| {
        if to_skip == 0 {
            return false;
        }
        let name = segment.split_once(';').map_or(*segment, |(name, _)| name);
        if !name.is_empty() {
            to_skip -= 1;
        }
        true
    });
    let mut out = String::with_capacity(path.len());
    out.push('/');
    if let Some(first) = rest.next() {
        out.push_str(first);
        for segment in rest {
            out.push('/');
            out.push_str(segment);
        }
    }
    if let Some(query) = query {
        out.push('?');
        out.push_str(query);
    }
    out
}

/// X-Forwarded-For (the client appended), X-Forwarded-Proto and X-Forwarded-Host (replaced:
/// upstreams that trust the gateway's forwarding headers build links on them) and Forwarded
/// (RFC 7239, an element appended).
fn forwarding_headers(headers: &mut HeaderMap, client: &ForwardedClient, host: &str) {
    // Appends `element` to the field `name`, or sets it when the field is absent.
    let append = |headers: &mut HeaderMap, name: &HeaderName, element: &[u8]| {
        if !headers.contains_key(name) {
            if let Ok(value) = HeaderValue::from_bytes(element) {
                headers.insert(name.clone(), value);
            }
            return;
        }
        let mut joined: Vec<u8> = Vec::new();
        for value in headers.get_all(name) {
            joined.extend_from_slice(value.as_bytes());
            joined.extend_from_slice(b", ");
        }
        joined.extend_from_slice(element);
        if let Ok(value) = HeaderValue::from_bytes(&joined) {
            headers.insert(name.clone(), value);
        }
    };
    if headers.contains_key(&X_FORWARDED_FOR) {
        append(headers, &X_FORWARDED_FOR, client.address.as_bytes());
    } else {
        headers.insert(X_FORWARDED_FOR.clone(), client.address.clone());
    }
    headers.insert(
        X_FORWARDED_PROTO.clone(),
        HeaderValue::from_static(client.proto),
    );
    match HeaderValue::from_str(host) {
        Ok(value) if !host.is_empty() => {
            headers.insert(X_FORWARDED_HOST.clone(), value);
        }
        _ => {
            headers.remove(&X_FORWARDED_HOST);
        }
    }
    let mut element = String::with_capacity(client.element.len() + 6 + host.len() + 2);
    element.push_str(&client.element);
    if !host.is_empty() {
        element.push_str(";host=");
        element.push_str(&forwarded_value(host));
    }
    append(headers, &header::FORWARDED, element.as_bytes());
}

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// A Forwarded parameter value: a token as is, anything else as a quoted-string.
fn forwarded_value(v: &str) -> std::borrow::Cow<'_, str> {
    let token = v
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    if token && !v.is_empty() {
        v.into()
    } else {
        format!("\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"")).into()
    }
}

/// The request id: the client's, when it is one sane token (at most 128 of `A-Za-z0-9._-`),
/// else a new one unique to this process run.
fn request_id(headers: &HeaderMap, name: &HeaderName) -> HeaderValue {
    let mut values = headers.get_all(name).iter();
    if let (Some(value), None) = (values.next(), values.next())
        && (1..=128).contains(&value.len())
        && value
            .as_bytes()
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(b))
    {
        return value.clone();
    }
    static PREFIX: OnceLock<u64> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let prefix = PREFIX.get_or_init(|| {
        let mut bytes = [0u8; 8];
        // Without randomness ids are still unique within the run; the prefix only keeps them
        // apart across restarts and hosts.
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes);
        u64::from_le_bytes(bytes)
    });
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    // `{prefix:016x}-{n:x}`, without the formatting machinery (this runs per request).
    let mut id = [0u8; 16 + 1 + 16];
    hex_into(&mut id[..16], *prefix);
    id[16] = b'-';
    let digits = (64 - n.leading_zeros()).div_ceil(4).max(1) as usize;
    hex_into(&mut id[17..17 + digits], n);
    HeaderValue::from_bytes(&id[..17 + digits]).unwrap_or_else(|_| HeaderValue::from_static("-"))
}

/// Writes the low `out.len()` hex digits of `n` into `out`, most significant first.
fn hex_into(out: &mut [u8], mut n: u64) {
    for byte in out.iter_mut().rev() {
        *byte = b"0123456789abcdef"[(n & 0xf) as usize];
        n >>= 4;
    }
}

/// The lowercase spelling of the rate-limit header names (HeaderName wants lowercase).
fn lower(name: &'static str) -> &'static str {
    match name {
        "RateLimit-Limit" => "ratelimit-limit",
        "RateLimit-Remaining" => "ratelimit-remaining",
        "RateLimit-Reset" => "ratelimit-reset",
        "RateLimit-Policy" => "ratelimit-policy",
        "Retry-After" => "retry-after",
        _ => "x-ratelimit-unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parameter_is_taken_and_removed() {
        let mut p = "/a?x=1&api_key=s%33cret&y=2&api_key=other".to_owned();
        assert_eq!(
            take_query_param(&mut p, "api_key").as_deref(),
            Some("s3cret")
        );
        assert_eq!(p, "/a?x=1&y=2");
        let mut p = "/a?api_key=k".to_owned();
        assert_eq!(take_query_param(&mut p, "api_key").as_deref(), Some("k"));
        assert_eq!(p, "/a");
        let mut p = "/a?x=1".to_owned();
        assert_eq!(take_query_param(&mut p, "api_key"), None);
        assert_eq!(p, "/a?x=1");
        // An encoded spelling of the name is the same parameter to the upstream.
        for spelled in ["api%5Fkey", "api%5fkey", "%61pi_key"] {
            let mut p = format!("/a?{spelled}=k1&x=1");
            assert_eq!(take_query_param(&mut p, "api_key").as_deref(), Some("k1"));
            assert_eq!(p, "/a?x=1", "{spelled}");
        }
    }

    #[test]
    fn prefix_stripping_keeps_a_leading_slash() {
        assert_eq!(strip_prefix("/api/users?x", "/api"), "/users?x");
        assert_eq!(strip_prefix("/api", "/api"), "/");
        assert_eq!(strip_prefix("/api?q", "/api"), "/?q");
        assert_eq!(strip_prefix("/x", "/"), "/x");
        assert_eq!(strip_prefix("/api/", "/api"), "/");
        assert_eq!(strip_prefix("/api/v1/a/b/", "/api/v1"), "/a/b/");
    }

    #[test]
    fn prefix_stripping_follows_segments_as_routed() {
        // Parameters on a prefix segment go with it; elsewhere they stay.
        assert_eq!(strip_prefix("/api;v=1/users", "/api"), "/users");
        assert_eq!(strip_prefix("/api;v=1", "/api"), "/");
        assert_eq!(strip_prefix("/api;v=1?q", "/api"), "/?q");
        assert_eq!(strip_prefix("/api;x/v1;y/a;z", "/api/v1"), "/a;z");
        // A segment of parameters only is not one (routing merged it away).
        assert_eq!(strip_prefix("/;x/api/users", "/api"), "/users");
    }

    #[test]
    fn http2_cookie_fields_are_joined() {
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("a=1"));
        h.append(header::COOKIE, HeaderValue::from_static("b=2"));
        h.append(header::COOKIE, HeaderValue::from_static("c=3"));
        join_cookies(&mut h);
        let all: Vec<_> = h.get_all(header::COOKIE).iter().collect();
        assert_eq!(all, ["a=1; b=2; c=3"]);
        let mut one = HeaderMap::new();
        one.insert(header::COOKIE, HeaderValue::from_static("a=1"));
        join_cookies(&mut one);
        assert_eq!(one[header::COOKIE], "a=1");
    }

    #[test]
    fn forwarded_headers() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        let client = ForwardedClient::new("2001:db8::1".parse().unwrap(), true);
        forwarding_headers(&mut h, &client, "a.example:8443");
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 2001:db8::1");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "a.example:8443");
        assert_eq!(
            h["forwarded"],
            "for=\"[2001:db8::1]\";proto=https;host=\"a.example:8443\""
        );
        // Without earlier hops the fields are this hop's alone.
        let mut fresh = HeaderMap::new();
        let client = ForwardedClient::new("192.0.2.7".parse().unwrap(), false);
        forwarding_headers(&mut fresh, &client, "api");
        assert_eq!(fresh["x-forwarded-for"], "192.0.2.7");
        assert_eq!(fresh["x-forwarded-proto"], "http");
        assert_eq!(fresh["forwarded"], "for=192.0.2.7;proto=http;host=api");
        forwarding_headers(&mut fresh, &client, "");
        assert_eq!(fresh["x-forwarded-for"], "192.0.2.7, 192.0.2.7");
        assert_eq!(
            fresh["forwarded"],
            "for=192.0.2.7;proto=http;host=api, for=192.0.2.7;proto=http"
        );
        assert!(!fresh.contains_key("x-forwarded-host"));
    }

    #[test]
    fn header_limit_keys_are_small_whatever_the_header() {
        // Each remembered key costs its size: with the value itself as key, max_keys (100000
        // by default) values of max_header_bytes (32 KiB) would hold gigabytes.
        let mut route = GatewayRoute::catch_all();
        route.rate_limit = Some(l7::RateLimit {
            rate: 1.0,
            burst: 1,
            key: LimitKey::Header(HeaderName::from_static("x-tenant")),
            max_keys: 10,
        });
        let client: IpAddr = "192.0.2.1".parse().unwrap();
        let key = |value: &str| {
            let mut h = HeaderMap::new();
            h.insert("x-tenant", HeaderValue::try_from(value).unwrap());
            limit_key(&route, client, None, &h)
        };
        let big = "a".repeat(32 * 1024);
        assert!(key(&big).len() <= 32, "{}", key(&big).len());
        assert_ne!(key(&big), key(&format!("{big}b")));
        assert_ne!(key("t1"), key("t2"));
        assert_eq!(key("t1"), key("t1"));
    }

    #[test]
    fn generated_request_ids_are_prefix_dash_counter_in_hex() {
        for n in [0u64, 1, 15, 16, 255, 4096, u64::from(u32::MAX), u64::MAX] {
            let digits = (64 - n.leading_zeros()).div_ceil(4).max(1) as usize;
            let mut out = vec![0u8; digits];
            hex_into(&mut out, n);
            assert_eq!(String::from_utf8(out).unwrap(), format!("{n:x}"));
        }
        let mut out = [0u8; 16];
        hex_into(&mut out, 0xab);
        assert_eq!(&out, b"00000000000000ab");
        let name = HeaderName::from_static("x-request-id");
        let a = request_id(&HeaderMap::new(), &name);
        let b = request_id(&HeaderMap::new(), &name);
        let (pa, na) = a.to_str().unwrap().split_once('-').unwrap();
        let (pb, nb) = b.to_str().unwrap().split_once('-').unwrap();
        assert_eq!((pa.len(), pa), (16, pb));
        let (na, nb) = (
            u64::from_str_radix(na, 16).unwrap(),
            u64::from_str_radix(nb, 16).unwrap(),
        );
        assert!(nb > na, "{na} then {nb}");
    }

    #[test]
    fn request_ids_keep_sane_client_values_only() {
        let name = HeaderName::from_static("x-request-id");
        let mut h = HeaderMap::new();
        h.insert(&name, HeaderValue::from_static("abc-123.X_y"));
        assert_eq!(request_id(&h, &name), "abc-123.X_y");
        h.insert(&name, HeaderValue::from_static("bad value"));
        let generated = request_id(&h, &name);
        assert_ne!(generated, "bad value");
        assert_ne!(request_id(&h, &name), generated, "unique");
        h.insert(&name, HeaderValue::try_from("a".repeat(129)).unwrap());
        assert_eq!(request_id(&h, &name).len(), generated.len());
    }
}
