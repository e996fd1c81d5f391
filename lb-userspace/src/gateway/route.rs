//! Route matching (issue 7, item 2): which route a request belongs to, by host, path, method and
//! headers, with one precedence rule so that the answer never depends on how routes happen to be
//! ordered in the file, except as the last tie-break.
//!
//! # Precedence
//! Among the routes that match a request, the first by these keys wins (like Envoy's virtual
//! hosts and nginx's `server_name` / `location` rules, so operators' intuitions carry over):
//! 1. Host specificity: [`HostMatch::Exact`] before [`HostMatch::Wildcard`] (a longer suffix
//!    before a shorter one: `*.api.example.com` before `*.example.com`) before [`HostMatch::Any`].
//! 2. Path specificity: [`PathMatch::Exact`] before [`PathMatch::Prefix`], and a longer prefix
//!    before a shorter one.
//! 3. More constraints before fewer: a method list counts one, each header match counts one.
//! 4. Order in the configuration.
//!
//! Host is decided before path on purpose: a host names a tenant or service, and a route for
//! `admin.example.com` must never lose a request to a longer path on a catch-all host.
//!
//! The table expects the path already normalised by
//! [`normalize_path`](super::normalize::normalize_path); it refuses routes whose own path is not
//! normalised, since such a route could never match.

use super::normalize::{EncodedSlash, normalize_path};
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use std::cmp::Reverse;

/// Which `Host` (or HTTP/2 `:authority`) values a route accepts. Hosts compare
/// case-insensitively (DNS names are), without the port and without a trailing dot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMatch {
    /// Every host, including a request without one: the fallback routes.
    Any,
    /// One host name, e.g. `api.example.com`.
    Exact(String),
    /// The domain after `*.`: `Wildcard("example.com".into())` is written `*.example.com` and
    /// matches one or more labels before `.example.com` (`a.example.com`, `a.b.example.com`)
    /// but not the apex `example.com` itself, as in TLS certificates and nginx, so that the
    /// apex can have its own route.
    Wildcard(String),
}

/// Which paths a route accepts. Paths compare case-sensitively (RFC 3986: only the host is
/// case-insensitive), on the normalised path without the query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathMatch {
    /// Exactly this path.
    Exact(String),
    /// This path and everything below it, by whole segments: `/api` matches `/api`, `/api/` and
    /// `/api/x`, but not `/apix` (a plain string prefix would let `/api-internal` ride on the
    /// `/api` route's policy). Written without a trailing slash; `/` matches every path.
    Prefix(String),
}

/// A condition on one request header. Header names are case-insensitive (the `HeaderName` type
/// lowercases them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderMatch {
    /// The header is present, with any value (also empty).
    Present(HeaderName),
    /// The header's value equals this value exactly (bytes, case-sensitive). A header sent in
    /// several fields is compared as its fields joined with `,` (RFC 9110 5.3), as Envoy does,
    /// so sending the expected value twice does not match `Equals`.
    Equals(HeaderName, HeaderValue),
}

/// One route's matching conditions; a request matches when every condition holds. What the
/// route then does (upstream pool, auth, limits, rewrites) is added by later phases.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The route's name, for errors, logs and metrics.
    pub name: String,
    /// Which hosts the route serves.
    pub host: HostMatch,
    /// Which paths the route serves.
    pub path: PathMatch,
    /// The methods the route serves; `None` for all. `Some` with an empty list is refused (it
    /// could never match, which is always a configuration mistake).
    pub methods: Option<Vec<Method>>,
    /// Header conditions, all of which must hold.
    pub headers: Vec<HeaderMatch>,
}

/// Why a set of routes was refused. Each names the route (by its position and name) so the
/// config layer can point at the file and line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// An empty, port-carrying, wildcard-in-the-wrong-place or otherwise malformed host.
    #[error("route {index} ({name}): invalid host {host:?}: {reason}")]
    InvalidHost {
        /// Position of the route in the list given to [`RouteTable::new`].
        index: usize,
        /// The route's name.
        name: String,
        /// The host as written.
        host: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A path that is not already in normalised form (requests are normalised before matching,
    /// so it could never match), or a prefix written with a trailing slash.
    #[error("route {index} ({name}): invalid path {path:?}: {reason}")]
    InvalidPath {
        /// Position of the route.
        index: usize,
        /// The route's name.
        name: String,
        /// The path as written.
        path: String,
        /// What is wrong with it, and what to write instead.
        reason: &'static str,
    },
    /// `methods = []`: the route could never match.
    #[error(
        "route {index} ({name}): an empty method list matches nothing; omit it for all methods"
    )]
    EmptyMethods {
        /// Position of the route.
        index: usize,
        /// The route's name.
        name: String,
    },
    /// Two routes with the same conditions: the later one could never match.
    #[error(
        "route {index} ({name}) has the same conditions as route {earlier} and can never match"
    )]
    Duplicate {
        /// Position of the route that can never match.
        index: usize,
        /// Its name.
        name: String,
        /// Position of the route that always wins over it.
        earlier: usize,
    },
}

/// The routes of one listener, checked and ordered by the precedence rule (see the module
/// doc), so that [`RouteTable::find`] is a first-match scan.
#[derive(Debug, Clone)]
pub struct RouteTable {
    routes: Vec<Route>,
    /// Indices into `routes`, in precedence order.
    order: Vec<usize>,
}

/// Lowercases a request's host and removes the port and one trailing dot, so that
/// `API.Example.com.:8443` and `api.example.com` reach the same routes (otherwise a client could
/// step around an exact-host route by spelling the host differently). IPv6 literals keep their
/// brackets: `[::1]:80` -> `[::1]`.
pub fn normalize_host(raw: &str) -> String {
    let without_port = if raw.starts_with('[') {
        match raw.find(']') {
            Some(end) => &raw[..=end],
            None => raw,
        }
    } else {
        match raw.rsplit_once(':') {
            Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
            _ => raw,
        }
    };
    let host = without_port.strip_suffix('.').unwrap_or(without_port);
    host.to_ascii_lowercase()
}

/// Checks a configured host name (exact, or the domain of a wildcard).
fn check_host(host: &str) -> Result<(), &'static str> {
    if host.is_empty() {
        return Err("empty");
    }
    if host.contains('*') {
        return Err("'*' is only allowed as the whole first label, as in \"*.example.com\"");
    }
    if host.starts_with('.') || host.ends_with('.') || host.contains("..") {
        return Err("empty label");
    }
    if !host.starts_with('[') && host.contains(':') {
        return Err("hosts are matched without the port; remove \":port\"");
    }
    if host
        .bytes()
        .any(|b| !(b.is_ascii_alphanumeric() || b"-._[]:".contains(&b)))
    {
        return Err("only letters, digits, '-', '.' (and an IPv6 literal in brackets) are allowed");
    }
    Ok(())
}

/// Checks a configured path and returns the reason it is refused.
fn check_path(path: &PathMatch) -> Result<(), &'static str> {
    let p = match path {
        PathMatch::Exact(p) | PathMatch::Prefix(p) => p,
    };
    if p.contains('?') {
        return Err("routes match the path only; remove the query");
    }
    match normalize_path(p, EncodedSlash::Keep) {
        Ok(n) if n == *p => {}
        Ok(_) => {
            return Err(
                "not in normalised form (dot segments, lowercase or needless percent-encodings); \
                 requests are normalised before matching, so this could never match",
            );
        }
        Err(_) => return Err("not a valid absolute path"),
    }
    if matches!(path, PathMatch::Prefix(p) if p.len() > 1 && p.ends_with('/')) {
        return Err("write a prefix without the trailing slash (\"/api\" also matches \"/api/x\")");
    }
    Ok(())
}

/// (host rank, host length, path rank, path length, constraint count); see [`precedence`].
type PrecedenceKey = (u8, Reverse<usize>, u8, Reverse<usize>, Reverse<usize>);

/// The precedence key: smaller sorts first. Ties are broken by configuration order by the
/// stable sort.
fn precedence(route: &Route) -> PrecedenceKey {
    let (host_rank, host_len) = match &route.host {
        HostMatch::Exact(h) => (0, h.len()),
        HostMatch::Wildcard(d) => (1, d.len()),
        HostMatch::Any => (2, 0),
    };
    let (path_rank, path_len) = match &route.path {
        PathMatch::Exact(p) => (0, p.len()),
        PathMatch::Prefix(p) => (1, p.len()),
    };
    let constraints = usize::from(route.methods.is_some()) + route.headers.len();
    (
        host_rank,
        Reverse(host_len),
        path_rank,
        Reverse(path_len),
        Reverse(constraints),
    )
}

/// Route conditions in a canonical form (sorted methods and headers), for duplicate detection.
fn canonical(route: &Route) -> (HostMatch, PathMatch, Option<Vec<String>>, Vec<String>) {
    let methods = route.methods.as_ref().map(|m| {
        let mut m: Vec<String> = m.iter().map(|m| m.as_str().to_owned()).collect();
        m.sort();
        m.dedup();
        m
    });
    let mut headers: Vec<String> = route
        .headers
        .iter()
        .map(|h| match h {
            HeaderMatch::Present(n) => format!("{n}"),
            HeaderMatch::Equals(n, v) => format!("{n}={v:?}"),
        })
        .collect();
    headers.sort();
    headers.dedup();
    (route.host.clone(), route.path.clone(), methods, headers)
}

impl RouteTable {
    /// Checks the routes and orders them by precedence. Hosts are lowercased here so matching
    /// compares bytes. Refuses malformed hosts and paths, empty method lists, and routes that
    /// duplicate an earlier route's conditions (the later one would be dead configuration).
    pub fn new(routes: Vec<Route>) -> Result<Self, RouteError> {
        let mut routes = routes;
        for (index, route) in routes.iter_mut().enumerate() {
            if let HostMatch::Exact(h) | HostMatch::Wildcard(h) = &mut route.host {
                check_host(h).map_err(|reason| RouteError::InvalidHost {
                    index,
                    name: route.name.clone(),
                    host: h.clone(),
                    reason,
                })?;
                h.make_ascii_lowercase();
            }
            check_path(&route.path).map_err(|reason| RouteError::InvalidPath {
                index,
                name: route.name.clone(),
                path: match &route.path {
                    PathMatch::Exact(p) | PathMatch::Prefix(p) => p.clone(),
                },
                reason,
            })?;
            if route.methods.as_ref().is_some_and(Vec::is_empty) {
                return Err(RouteError::EmptyMethods {
                    index,
                    name: route.name.clone(),
                });
            }
        }
        let canon: Vec<_> = routes.iter().map(canonical).collect();
        for (index, c) in canon.iter().enumerate() {
            if let Some(earlier) = canon[..index].iter().position(|e| e == c) {
                return Err(RouteError::Duplicate {
                    index,
                    name: routes[index].name.clone(),
                    earlier,
                });
            }
        }
        let mut order: Vec<usize> = (0..routes.len()).collect();
        order.sort_by_key(|&i| precedence(&routes[i]));
        Ok(Self { routes, order })
    }

    /// The routes as given (hosts lowercased), indexed as [`RouteTable::find`] answers.
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// The index (into the list given to [`RouteTable::new`]) of the route that serves this
    /// request, or `None` (the gateway answers 404).
    ///
    /// `host` is the raw `Host` / `:authority` value (normalised here with [`normalize_host`]),
    /// `path` the output of [`normalize_path`](super::normalize::normalize_path); a query, if
    /// present, is ignored.
    pub fn find(
        &self,
        host: &str,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
    ) -> Option<usize> {
        let host = normalize_host(host);
        let path = path.split_once('?').map_or(path, |(p, _)| p);
        self.order.iter().copied().find(|&i| {
            let route = &self.routes[i];
            host_matches(&route.host, &host)
                && path_matches(&route.path, path)
                && route.methods.as_ref().is_none_or(|m| m.contains(method))
                && route.headers.iter().all(|h| header_matches(h, headers))
        })
    }
}

/// `host` is already normalised; configured hosts were lowercased by [`RouteTable::new`].
fn host_matches(matcher: &HostMatch, host: &str) -> bool {
    match matcher {
        HostMatch::Any => true,
        HostMatch::Exact(h) => host == h,
        HostMatch::Wildcard(domain) => host
            .strip_suffix(domain.as_str())
            .and_then(|labels| labels.strip_suffix('.'))
            // One or more non-empty labels before the domain: not the apex, not ".example.com",
            // not "a..example.com".
            .is_some_and(|labels| !labels.split('.').any(str::is_empty)),
    }
}

fn path_matches(matcher: &PathMatch, path: &str) -> bool {
    match matcher {
        PathMatch::Exact(p) => path == p,
        PathMatch::Prefix(p) if p == "/" => true,
        PathMatch::Prefix(p) => path
            .strip_prefix(p.as_str())
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/')),
    }
}

fn header_matches(matcher: &HeaderMatch, headers: &HeaderMap) -> bool {
    match matcher {
        HeaderMatch::Present(name) => headers.contains_key(name),
        HeaderMatch::Equals(name, expected) => {
            let mut values = headers.get_all(name).iter();
            match (values.next(), values.next()) {
                (None, _) => false,
                (Some(only), None) => only == expected,
                (Some(first), Some(second)) => {
                    let mut joined = first.as_bytes().to_vec();
                    for v in std::iter::once(second).chain(values) {
                        joined.push(b',');
                        joined.extend_from_slice(v.as_bytes());
                    }
                    joined == expected.as_bytes()
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::normalize::normalize_path;

    fn route(name: &str, host: HostMatch, path: PathMatch) -> Route {
        Route {
            name: name.to_owned(),
            host,
            path,
            methods: None,
            headers: Vec::new(),
        }
    }

    fn exact_host(h: &str) -> HostMatch {
        HostMatch::Exact(h.to_owned())
    }

    fn wild(d: &str) -> HostMatch {
        HostMatch::Wildcard(d.to_owned())
    }

    fn prefix(p: &str) -> PathMatch {
        PathMatch::Prefix(p.to_owned())
    }

    fn exact(p: &str) -> PathMatch {
        PathMatch::Exact(p.to_owned())
    }

    fn get<'t>(table: &'t RouteTable, host: &str, path: &str) -> Option<&'t str> {
        find(table, host, &Method::GET, path, &HeaderMap::new())
    }

    fn find<'t>(
        table: &'t RouteTable,
        host: &str,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
    ) -> Option<&'t str> {
        table
            .find(host, method, path, headers)
            .map(|i| table.routes()[i].name.as_str())
    }

    #[test]
    fn empty_table_matches_nothing() {
        let t = RouteTable::new(Vec::new()).unwrap();
        assert_eq!(get(&t, "x", "/"), None);
    }

    #[test]
    fn prefix_is_segment_aware() {
        let t = RouteTable::new(vec![route("api", HostMatch::Any, prefix("/api"))]).unwrap();
        assert_eq!(get(&t, "h", "/api"), Some("api"));
        assert_eq!(get(&t, "h", "/api/"), Some("api"));
        assert_eq!(get(&t, "h", "/api/x/y"), Some("api"));
        assert_eq!(get(&t, "h", "/apix"), None);
        assert_eq!(get(&t, "h", "/api-internal"), None);
        assert_eq!(get(&t, "h", "/ap"), None);
        assert_eq!(get(&t, "h", "/API"), None, "paths are case-sensitive");
        assert_eq!(get(&t, "h", "/api?x=1"), Some("api"));
        assert_eq!(get(&t, "h", "/apix?/api"), None);
    }

    #[test]
    fn root_prefix_matches_everything_exact_matches_one_path() {
        let t = RouteTable::new(vec![
            route("root", HostMatch::Any, prefix("/")),
            route("health", HostMatch::Any, exact("/healthz")),
        ])
        .unwrap();
        assert_eq!(get(&t, "h", "/"), Some("root"));
        assert_eq!(get(&t, "h", "/anything/x"), Some("root"));
        assert_eq!(get(&t, "h", "/healthz"), Some("health"));
        assert_eq!(get(&t, "h", "/healthz/"), Some("root"));
        assert_eq!(get(&t, "h", "/healthz/x"), Some("root"));
    }

    #[test]
    fn hosts_are_case_insensitive_without_port_or_trailing_dot() {
        let t =
            RouteTable::new(vec![route("a", exact_host("API.Example.com"), prefix("/"))]).unwrap();
        for h in [
            "api.example.com",
            "API.EXAMPLE.COM",
            "api.example.com:8443",
            "api.example.com.",
            "Api.Example.Com.:80",
        ] {
            assert_eq!(get(&t, h, "/"), Some("a"), "{h}");
        }
        for h in [
            "example.com",
            "xapi.example.com",
            "api.example.com.evil",
            "",
            "api.example.com:x",
        ] {
            assert_eq!(get(&t, h, "/"), None, "{h}");
        }
    }

    #[test]
    fn normalize_host_cases() {
        assert_eq!(normalize_host("A.B:1"), "a.b");
        assert_eq!(normalize_host("[::1]:8080"), "[::1]");
        assert_eq!(normalize_host("[::1]"), "[::1]");
        assert_eq!(normalize_host("10.0.0.1:80"), "10.0.0.1");
        assert_eq!(normalize_host("a.b."), "a.b");
        assert_eq!(normalize_host(""), "");
    }

    #[test]
    fn wildcard_edge_cases() {
        let t = RouteTable::new(vec![route("w", wild("example.com"), prefix("/"))]).unwrap();
        for h in [
            "a.example.com",
            "a.b.example.com",
            "A.Example.COM:443",
            "a-b.example.com.",
        ] {
            assert_eq!(get(&t, h, "/"), Some("w"), "{h}");
        }
        for h in [
            "example.com",
            ".example.com",
            "aexample.com",
            "a.example.com.evil.net",
            "example.com.a",
            "a..example.com",
            "",
        ] {
            assert_eq!(get(&t, h, "/"), None, "{h}");
        }
    }

    #[test]
    fn apex_and_wildcard_can_have_separate_routes() {
        let t = RouteTable::new(vec![
            route("sub", wild("example.com"), prefix("/")),
            route("apex", exact_host("example.com"), prefix("/")),
        ])
        .unwrap();
        assert_eq!(get(&t, "example.com", "/"), Some("apex"));
        assert_eq!(get(&t, "www.example.com", "/"), Some("sub"));
    }

    /// The precedence rule, one row per decision: (request host, path) -> winning route.
    #[test]
    fn precedence_table() {
        let t = RouteTable::new(vec![
            route("any-root", HostMatch::Any, prefix("/")),
            route("any-long", HostMatch::Any, prefix("/admin/users/list")),
            route("wild-short", wild("example.com"), prefix("/")),
            route("wild-long", wild("api.example.com"), prefix("/")),
            route(
                "exact-host-root",
                exact_host("v1.api.example.com"),
                prefix("/"),
            ),
            route(
                "exact-host-prefix",
                exact_host("v1.api.example.com"),
                prefix("/admin"),
            ),
            route(
                "exact-host-longer",
                exact_host("v1.api.example.com"),
                prefix("/admin/users"),
            ),
            route(
                "exact-host-exact",
                exact_host("v1.api.example.com"),
                exact("/admin"),
            ),
        ])
        .unwrap();
        for (host, path, want) in [
            // Host first: any exact-host route beats a longer path on a catch-all host.
            (
                "v1.api.example.com",
                "/admin/users/list",
                "exact-host-longer",
            ),
            // Exact path before any prefix, even a prefix of the same text.
            ("v1.api.example.com", "/admin", "exact-host-exact"),
            // Longest prefix.
            ("v1.api.example.com", "/admin/x", "exact-host-prefix"),
            ("v1.api.example.com", "/admin/users/7", "exact-host-longer"),
            ("v1.api.example.com", "/other", "exact-host-root"),
            // Longer wildcard suffix before shorter.
            ("v2.api.example.com", "/", "wild-long"),
            ("www.example.com", "/", "wild-short"),
            // The apex of a wildcard is not matched by it.
            ("api.example.com", "/", "wild-short"),
            ("example.com", "/", "any-root"),
            // Wildcard host beats a longer path on Any.
            ("www.example.com", "/admin/users/list", "wild-short"),
            ("other.net", "/admin/users/list", "any-long"),
            ("other.net", "/admin/users", "any-root"),
        ] {
            assert_eq!(get(&t, host, path), Some(want), "{host} {path}");
        }
    }

    #[test]
    fn precedence_does_not_depend_on_file_order() {
        let mut routes = vec![
            route("root", HostMatch::Any, prefix("/")),
            route("api", HostMatch::Any, prefix("/api")),
            route("login", HostMatch::Any, exact("/api/login")),
            route("host", exact_host("a.example"), prefix("/")),
            route("wild", wild("example"), prefix("/api")),
        ];
        let cases = [
            ("x", "/api/login", "login"),
            ("x", "/api/x", "api"),
            ("x", "/", "root"),
            ("a.example", "/api/login", "host"),
            ("b.example", "/api/login", "wild"),
            ("b.example", "/", "root"),
        ];
        for _ in 0..routes.len() {
            routes.rotate_left(1);
            let t = RouteTable::new(routes.clone()).unwrap();
            for (host, path, want) in cases {
                assert_eq!(get(&t, host, path), Some(want), "{host} {path}");
            }
        }
    }

    #[test]
    fn more_constraints_first_then_file_order() {
        let mut post_json = route("post-json", HostMatch::Any, prefix("/api"));
        post_json.methods = Some(vec![Method::POST]);
        post_json.headers = vec![HeaderMatch::Equals(
            HeaderName::from_static("content-type"),
            HeaderValue::from_static("application/json"),
        )];
        let mut post = route("post", HostMatch::Any, prefix("/api"));
        post.methods = Some(vec![Method::POST, Method::PUT]);
        let mut canary = route("canary", HostMatch::Any, prefix("/api"));
        canary.headers = vec![HeaderMatch::Present(HeaderName::from_static("x-canary"))];
        let plain = route("plain", HostMatch::Any, prefix("/api"));
        // `plain` first in the file, yet the constrained routes still win when they match;
        // `post` and `canary` tie on one constraint each, so file order decides between them.
        let t = RouteTable::new(vec![plain, post, canary, post_json]).unwrap();

        let json = header_map(&[("content-type", "application/json")]);
        let canary_h = header_map(&[("x-canary", "")]);
        let both = header_map(&[("x-canary", "1"), ("content-type", "application/json")]);
        let none = HeaderMap::new();
        for (method, headers, want) in [
            (Method::POST, &json, "post-json"),
            (Method::POST, &both, "post-json"),
            (Method::POST, &none, "post"),
            (Method::PUT, &json, "post"),
            (Method::POST, &canary_h, "post"),
            (Method::GET, &canary_h, "canary"),
            (Method::GET, &json, "plain"),
            (Method::DELETE, &none, "plain"),
        ] {
            assert_eq!(
                find(&t, "h", &method, "/api/x", headers),
                Some(want),
                "{method} {headers:?}"
            );
        }
    }

    fn header_map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (n, v) in pairs {
            m.append(*n, HeaderValue::from_static(v));
        }
        m
    }

    #[test]
    fn method_must_be_listed() {
        let mut r = route("ro", HostMatch::Any, prefix("/"));
        r.methods = Some(vec![Method::GET, Method::HEAD]);
        let t = RouteTable::new(vec![r]).unwrap();
        let none = HeaderMap::new();
        assert_eq!(find(&t, "h", &Method::HEAD, "/", &none), Some("ro"));
        assert_eq!(find(&t, "h", &Method::POST, "/", &none), None);
        let custom = Method::from_bytes(b"PURGE").unwrap();
        assert_eq!(find(&t, "h", &custom, "/", &none), None);
    }

    #[test]
    fn header_equals_compares_exactly_and_joins_repeated_fields() {
        let mut r = route("v2", HostMatch::Any, prefix("/"));
        r.headers = vec![HeaderMatch::Equals(
            HeaderName::from_static("x-version"),
            HeaderValue::from_static("2"),
        )];
        let t = RouteTable::new(vec![r]).unwrap();
        let m = Method::GET;
        assert_eq!(
            find(&t, "h", &m, "/", &header_map(&[("x-version", "2")])),
            Some("v2")
        );
        assert_eq!(
            find(&t, "h", &m, "/", &header_map(&[("x-version", "20")])),
            None
        );
        assert_eq!(
            find(&t, "h", &m, "/", &header_map(&[("x-version", " 2")])),
            None
        );
        assert_eq!(
            find(&t, "h", &m, "/", &header_map(&[("x-version", "")])),
            None
        );
        assert_eq!(find(&t, "h", &m, "/", &HeaderMap::new()), None);
        assert_eq!(
            find(
                &t,
                "h",
                &m,
                "/",
                &header_map(&[("x-version", "2"), ("x-version", "2")])
            ),
            None
        );

        let mut r = route("pair", HostMatch::Any, prefix("/"));
        r.headers = vec![HeaderMatch::Equals(
            HeaderName::from_static("x-v"),
            HeaderValue::from_static("a,b"),
        )];
        let t = RouteTable::new(vec![r]).unwrap();
        assert_eq!(
            find(&t, "h", &m, "/", &header_map(&[("x-v", "a"), ("x-v", "b")])),
            Some("pair")
        );
    }

    /// Item 6 end to end at the matching layer: the normalised path reaches the admin route.
    #[test]
    fn dot_segment_attacks_reach_the_protected_route() {
        let t = RouteTable::new(vec![
            route("public", HostMatch::Any, prefix("/public")),
            route("admin", HostMatch::Any, prefix("/admin")),
            route("root", HostMatch::Any, prefix("/")),
        ])
        .unwrap();
        for raw in [
            "/public/../admin",
            "/public/%2e%2e/admin",
            "/public/%2E%2E/admin/x",
            "/%2E%2E/admin",
            "/public/./../admin",
            "/../../admin",
            "/public/.%2e/admin?x=/public",
            "/%61dmin",
        ] {
            let path = normalize_path(raw, EncodedSlash::Reject).unwrap();
            assert_eq!(get(&t, "h", &path), Some("admin"), "{raw} -> {path}");
        }
        // Refused before routing with the default option.
        assert!(normalize_path("/public%2F..%2Fadmin", EncodedSlash::Reject).is_err());
        // Kept as data: stays inside /public, where an upstream that keeps it as data serves it.
        let kept = normalize_path("/public%2F..%2Fadmin", EncodedSlash::Keep).unwrap();
        assert_eq!(get(&t, "h", &kept), Some("root"));
        let kept = normalize_path("/public/%2F..%2Fadmin", EncodedSlash::Keep).unwrap();
        assert_eq!(get(&t, "h", &kept), Some("public"));
        // Double encoding is not decoded twice, so it is not the admin route either.
        let double = normalize_path("/public/%252e%252e/admin", EncodedSlash::Reject).unwrap();
        assert_eq!(get(&t, "h", &double), Some("public"));
        // Slashes are merged (as nginx upstreams do): `//admin` is `/admin` and meets its route.
        for raw in ["//admin", "///admin", "/public//..//admin", "//admin//x"] {
            let slashes = normalize_path(raw, EncodedSlash::Reject).unwrap();
            assert_eq!(get(&t, "h", &slashes), Some("admin"), "{raw}");
        }
    }

    #[test]
    fn invalid_routes_are_refused() {
        let bad_hosts = [
            exact_host(""),
            exact_host("a.example.com:80"),
            exact_host("*.example.com"),
            exact_host("a.*.com"),
            exact_host("a..com"),
            exact_host(".a.com"),
            exact_host("a b"),
            wild("*.example.com"),
            wild(""),
            wild(".example.com"),
        ];
        for host in bad_hosts {
            let r = route("r", host.clone(), prefix("/"));
            assert!(
                matches!(
                    RouteTable::new(vec![r]),
                    Err(RouteError::InvalidHost { index: 0, .. })
                ),
                "{host:?}"
            );
        }
        let bad_paths = [
            prefix(""),
            prefix("api"),
            prefix("/api/"),
            prefix("/a/../b"),
            prefix("/a/./b"),
            prefix("/%61pi"),
            prefix("/a%2fb"),
            exact("/a?x=1"),
            exact("/a b"),
            exact("/a%zz"),
            // Never matches: requests have their slashes merged.
            exact("//x"),
            prefix("/a//b"),
        ];
        for path in bad_paths {
            let r = route("r", HostMatch::Any, path.clone());
            assert!(
                matches!(
                    RouteTable::new(vec![r]),
                    Err(RouteError::InvalidPath { index: 0, .. })
                ),
                "{path:?}"
            );
        }
        // Accepted spellings of the same ideas.
        let ok = [
            prefix("/"),
            prefix("/api"),
            exact("/api/"),
            prefix("/a%2Fb"),
        ];
        for path in ok {
            assert!(
                RouteTable::new(vec![route("r", HostMatch::Any, path.clone())]).is_ok(),
                "{path:?}"
            );
        }
        let mut r = route("r", HostMatch::Any, prefix("/"));
        r.methods = Some(Vec::new());
        assert!(matches!(
            RouteTable::new(vec![r]),
            Err(RouteError::EmptyMethods { .. })
        ));
    }

    #[test]
    fn duplicates_are_refused_even_when_spelled_differently() {
        let mut a = route("a", exact_host("X.example"), prefix("/api"));
        a.methods = Some(vec![Method::GET, Method::POST]);
        a.headers = vec![
            HeaderMatch::Present(HeaderName::from_static("x-a")),
            HeaderMatch::Present(HeaderName::from_static("x-b")),
        ];
        let mut b = a.clone();
        b.name = "b".into();
        b.host = exact_host("x.EXAMPLE");
        b.methods = Some(vec![Method::POST, Method::GET]);
        b.headers.reverse();
        let other = route("c", exact_host("x.example"), prefix("/api"));
        let err = RouteTable::new(vec![a, other, b]).unwrap_err();
        assert_eq!(
            err,
            RouteError::Duplicate {
                index: 2,
                name: "b".into(),
                earlier: 0
            }
        );
        assert!(err.to_string().contains("can never match"));
    }
}
