//! The gateway's metrics and access log. Counters are atomics in per-route and per-VIP structs
//! shared by `Arc` with the requests that count into them (no lock on the request path); they
//! survive reloads (a route or VIP keeps its counters while its name stays), and are rendered
//! in the Prometheus text format on scrape.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crate::metrics::{Histogram, header, label, write_histogram};

/// Bucket bounds of the request and upstream duration histograms: 0.5 ms to 30 s (beyond the
/// default 15 s request timeout), 1-2.5-5 per decade as the health-check histogram.
pub const REQUEST_BUCKETS: [Duration; 15] = [
    Duration::from_micros(500),
    Duration::from_millis(1),
    Duration::from_micros(2500),
    Duration::from_millis(5),
    Duration::from_millis(10),
    Duration::from_millis(25),
    Duration::from_millis(50),
    Duration::from_millis(100),
    Duration::from_millis(250),
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_millis(2500),
    Duration::from_secs(5),
    Duration::from_secs(10),
    Duration::from_secs(30),
];

/// A duration histogram counted into atomics, turned into a [`Histogram`] on scrape. A scrape
/// racing requests may see the sum and the buckets a few observations apart, which Prometheus
/// tolerates (the counters are each monotonic).
pub(crate) struct AtomicHistogram {
    counts: Vec<AtomicU64>,
    sum_nanos: AtomicU64,
}

impl AtomicHistogram {
    fn new() -> Self {
        Self {
            counts: (0..=REQUEST_BUCKETS.len())
                .map(|_| AtomicU64::new(0))
                .collect(),
            sum_nanos: AtomicU64::new(0),
        }
    }

    pub(crate) fn observe(&self, value: Duration) {
        let bucket = Histogram::bucket_of(&REQUEST_BUCKETS, value);
        self.counts[bucket].fetch_add(1, Relaxed);
        let nanos = u64::try_from(value.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Relaxed);
    }

    fn snapshot(&self) -> Histogram {
        Histogram::from_counts(
            &REQUEST_BUCKETS,
            self.counts.iter().map(|c| c.load(Relaxed)).collect(),
            Duration::from_nanos(self.sum_nanos.load(Relaxed)),
        )
    }
}

/// The counters of one route (or of the requests of a VIP that reached no route).
pub(crate) struct RouteMetrics {
    /// Responses by status class, 1xx..5xx.
    classes: [AtomicU64; 5],
    pub(crate) duration: AtomicHistogram,
    pub(crate) upstream: AtomicHistogram,
    auth_401: AtomicU64,
    auth_403: AtomicU64,
    rate_limited: AtomicU64,
}

impl RouteMetrics {
    pub(crate) fn new() -> Self {
        Self {
            classes: Default::default(),
            duration: AtomicHistogram::new(),
            upstream: AtomicHistogram::new(),
            auth_401: AtomicU64::new(0),
            auth_403: AtomicU64::new(0),
            rate_limited: AtomicU64::new(0),
        }
    }

    /// One finished request with its status and total duration.
    pub(crate) fn request(&self, status: u16, duration: Duration) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.classes[class].fetch_add(1, Relaxed);
        self.duration.observe(duration);
    }

    pub(crate) fn auth_rejected(&self, status: u16) {
        if status == 403 {
            &self.auth_403
        } else {
            &self.auth_401
        }
        .fetch_add(1, Relaxed);
    }

    pub(crate) fn rate_limited(&self) {
        self.rate_limited.fetch_add(1, Relaxed);
    }
}

/// Why the gateway answered a request itself before it reached a route's upstream (the
/// `reason` label of `xlb_gateway_refused_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Ambiguous framing (Content-Length with Transfer-Encoding, ...): 400.
    Framing,
    /// A path that cannot be normalised or an encoded slash: 400.
    Path,
    /// No usable Host (HTTP/1.1 without one, several): 400.
    Host,
    /// No route matches: 404.
    NoRoute,
    /// Body above `max_body_bytes`: 413.
    TooLarge,
    /// A request body that made no progress for the idle timeout: 408.
    BodyTimeout,
}

impl Refusal {
    const ALL: [Refusal; 6] = [
        Refusal::Framing,
        Refusal::Path,
        Refusal::Host,
        Refusal::NoRoute,
        Refusal::TooLarge,
        Refusal::BodyTimeout,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Refusal::Framing => "framing",
            Refusal::Path => "path",
            Refusal::Host => "host",
            Refusal::NoRoute => "no_route",
            Refusal::TooLarge => "too_large",
            Refusal::BodyTimeout => "body_timeout",
        }
    }
}

/// The counters of one VIP's gateway.
pub(crate) struct VipMetrics {
    refused: [AtomicU64; Refusal::ALL.len()],
    /// Requests that reached no route (refused before routing, or 404).
    pub(crate) unrouted: RouteMetrics,
}

impl VipMetrics {
    pub(crate) fn new() -> Self {
        Self {
            refused: Default::default(),
            unrouted: RouteMetrics::new(),
        }
    }

    pub(crate) fn refused(&self, reason: Refusal) {
        self.refused[reason as usize].fetch_add(1, Relaxed);
    }
}

/// The route label of requests that reached no route.
pub(crate) const NO_ROUTE_LABEL: &str = "(none)";

/// What one VIP contributes to a scrape.
pub(crate) struct VipScrape<'a> {
    pub(crate) vip: &'a str,
    pub(crate) metrics: &'a VipMetrics,
    pub(crate) routes: Vec<(&'a str, &'a RouteMetrics)>,
    pub(crate) pools: Vec<super::upstream::PoolStatus>,
}

impl VipScrape<'_> {
    /// The VIP's routes followed by the unrouted requests' pseudo-route.
    fn all_routes(&self) -> impl Iterator<Item = (&str, &RouteMetrics)> {
        self.routes
            .iter()
            .copied()
            .chain([(NO_ROUTE_LABEL, &self.metrics.unrouted)])
    }
}

/// Renders every gateway family, each with one `# HELP` / `# TYPE`, over all VIPs.
pub(crate) fn render(out: &mut String, vips: &[VipScrape<'_>]) {
    const REQUESTS: &str = "xlb_gateway_requests_total";
    header(
        out,
        REQUESTS,
        "counter",
        "Requests answered by the gateway, by VIP, route and status class (route \"(none)\": \
         refused before a route was found).",
    );
    for v in vips {
        for (route, m) in v.all_routes() {
            for (i, c) in m.classes.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "{REQUESTS}{{vip=\"{}\",route=\"{}\",class=\"{}xx\"}} {}",
                    label(v.vip),
                    label(route),
                    i + 1,
                    c.load(Relaxed)
                );
            }
        }
    }
    for (name, help, upstream) in [
        (
            "xlb_gateway_request_duration_seconds",
            "Time from the request head to the end of the response, by VIP and route.",
            false,
        ),
        (
            "xlb_gateway_upstream_duration_seconds",
            "Time from sending a request upstream to the response head, by VIP and route.",
            true,
        ),
    ] {
        header(out, name, "histogram", help);
        for v in vips {
            for (route, m) in v.all_routes() {
                if upstream && std::ptr::eq(m, &v.metrics.unrouted) {
                    continue;
                }
                let labels = format!("vip=\"{}\",route=\"{}\"", label(v.vip), label(route));
                let h = if upstream { &m.upstream } else { &m.duration };
                write_histogram(out, name, &labels, &h.snapshot());
            }
        }
    }
    const AUTH: &str = "xlb_gateway_auth_rejected_total";
    header(
        out,
        AUTH,
        "counter",
        "Requests refused by a route's authentication, by status (401 missing or invalid \
         credential, 403 refused).",
    );
    for v in vips {
        for (route, m) in &v.routes {
            for (status, c) in [("401", &m.auth_401), ("403", &m.auth_403)] {
                let _ = writeln!(
                    out,
                    "{AUTH}{{vip=\"{}\",route=\"{}\",status=\"{status}\"}} {}",
                    label(v.vip),
                    label(route),
                    c.load(Relaxed)
                );
            }
        }
    }
    const LIMITED: &str = "xlb_gateway_rate_limited_total";
    header(
        out,
        LIMITED,
        "counter",
        "Requests refused with 429 by a route's rate limit.",
    );
    for v in vips {
        for (route, m) in &v.routes {
            let _ = writeln!(
                out,
                "{LIMITED}{{vip=\"{}\",route=\"{}\"}} {}",
                label(v.vip),
                label(route),
                m.rate_limited.load(Relaxed)
            );
        }
    }
    const REFUSED: &str = "xlb_gateway_refused_total";
    header(
        out,
        REFUSED,
        "counter",
        "Requests the gateway answered itself before forwarding, by reason (framing, path, \
         host: 400; no_route: 404; too_large: 413). Requests hyper refuses while parsing \
         (431, malformed) never reach the gateway and are not counted.",
    );
    for v in vips {
        for r in Refusal::ALL {
            let _ = writeln!(
                out,
                "{REFUSED}{{vip=\"{}\",reason=\"{}\"}} {}",
                label(v.vip),
                r.name(),
                v.metrics.refused[r as usize].load(Relaxed)
            );
        }
    }
    type ServerValue = fn(&super::upstream::ServerStatus) -> u64;
    let servers: [(&str, &str, ServerValue); 3] = [
        (
            "xlb_gateway_upstream_healthy",
            "1 when the upstream server passes the agent's health checks.",
            |s| u64::from(s.healthy),
        ),
        (
            "xlb_gateway_upstream_ejected",
            "1 while the upstream server is ejected by outlier detection.",
            |s| u64::from(s.ejected),
        ),
        (
            "xlb_gateway_upstream_in_flight",
            "Requests in flight to the upstream server.",
            |s| u64::from(s.in_flight),
        ),
    ];
    for (name, help, value) in servers {
        header(out, name, "gauge", help);
        for v in vips {
            for p in &v.pools {
                for s in &p.servers {
                    let _ = writeln!(
                        out,
                        "{name}{{vip=\"{}\",pool=\"{}\",server=\"{}\"}} {}",
                        label(v.vip),
                        label(&p.name),
                        std::net::SocketAddr::new(s.address, s.port),
                        value(s)
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_class_and_renders_every_family_once() {
        let vm = VipMetrics::new();
        let rm = RouteMetrics::new();
        rm.request(204, Duration::from_millis(3));
        rm.request(101, Duration::from_millis(1));
        rm.request(503, Duration::from_secs(60));
        rm.auth_rejected(403);
        vm.refused(Refusal::NoRoute);
        let mut out = String::new();
        render(
            &mut out,
            &[VipScrape {
                vip: "web",
                metrics: &vm,
                routes: vec![("api", &rm)],
                pools: Vec::new(),
            }],
        );
        for line in [
            "xlb_gateway_requests_total{vip=\"web\",route=\"api\",class=\"2xx\"} 1",
            "xlb_gateway_requests_total{vip=\"web\",route=\"api\",class=\"1xx\"} 1",
            "xlb_gateway_requests_total{vip=\"web\",route=\"api\",class=\"5xx\"} 1",
            "xlb_gateway_request_duration_seconds_count{vip=\"web\",route=\"api\"} 3",
            "xlb_gateway_request_duration_seconds_bucket{vip=\"web\",route=\"api\",le=\"+Inf\"} 3",
            "xlb_gateway_request_duration_seconds_bucket{vip=\"web\",route=\"api\",le=\"30\"} 2",
            "xlb_gateway_auth_rejected_total{vip=\"web\",route=\"api\",status=\"403\"} 1",
            "xlb_gateway_refused_total{vip=\"web\",reason=\"no_route\"} 1",
        ] {
            assert!(out.contains(line), "missing {line} in\n{out}");
        }
        assert_eq!(out.matches("# TYPE xlb_gateway_requests_total").count(), 1);
    }
}
