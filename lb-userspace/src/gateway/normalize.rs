//! Request safety checks that run before routing (issue 7, item 6): refuse ambiguous message
//! framing, bring the path into one canonical spelling, and strip hop-by-hop headers.
//!
//! Routing and per-route auth compare the path the gateway *sees*; the upstream acts on the path
//! it *receives*. Any difference between the two (`/public/../admin`, `/public/%2e%2e/admin`) is a
//! way past a route's auth, so the gateway routes on the normalised path and must forward that same
//! normalised path upstream. Likewise two readings of where a body ends (Content-Length against
//! Transfer-Encoding) let a client smuggle a second request past the gateway, so such requests are
//! refused with 400 rather than repaired.

use http::HeaderMap;
use http::header::{CONNECTION, CONTENT_LENGTH, HOST, HeaderName, TRANSFER_ENCODING};

/// What to do with an encoded slash (`%2F`) or backslash (`%5C`) in the path.
///
/// Backends disagree about them: some decode `%2F` to `/` after routing (so `/public%2F..%2Fadmin`
/// becomes `/admin` behind the gateway's back), others keep it as data inside one segment (object
/// stores, some REST APIs use it in keys). The gateway cannot know which, so the operator chooses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EncodedSlash {
    /// Refuse the request (400). The safe default: nothing can hide a separator from routing.
    #[default]
    Reject,
    /// Keep `%2F` / `%5C` encoded (uppercased) as data within a segment; it never splits a
    /// segment and never takes part in dot-segment removal. Only safe if every upstream behind
    /// such routes also treats it as data.
    Keep,
}

/// Why a request path was refused; each maps to a 400 response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// Origin-form targets start with `/` (RFC 9112 3.2.1); anything else (`admin`, `*`, an
    /// absolute URI) must be handled before path normalisation or refused.
    #[error("the path does not start with '/'")]
    NotAbsolute,
    /// `%` not followed by two hex digits: backends would each guess differently what it means.
    #[error("invalid percent-encoding at byte {0}")]
    InvalidPercentEncoding(usize),
    /// A NUL byte, raw or as `%00`: C-string backends truncate at it (`/admin%00.png`).
    #[error("NUL byte in the path")]
    Nul,
    /// `%2F` or `%5C` with [`EncodedSlash::Reject`].
    #[error("encoded slash or backslash in the path (rejected by configuration)")]
    EncodedSlash,
    /// A byte that may not appear raw in a path: controls, space, non-ASCII, `#` (a fragment is
    /// never sent in a request) and `\` (some servers treat it as `/`).
    #[error("byte 0x{0:02x} is not allowed in a path")]
    InvalidByte(u8),
    /// A `.` or `..` segment with parameters (`..;x`, `.;`): Tomcat, Jetty and Spring drop the
    /// parameters and resolve it as a dot segment, other servers keep it as a name; either
    /// reading can reach a path the other would not, so it is refused.
    #[error("a dot segment with ';' parameters")]
    DotSegmentWithParameters,
}

/// Characters RFC 3986 2.3 calls unreserved: percent-encoding them changes nothing, so they are
/// decoded to give each path one spelling.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Raw bytes refused anywhere in the path (see [`PathError::InvalidByte`]).
fn is_forbidden_raw(b: u8) -> bool {
    b <= b' ' || b >= 0x7f || b == b'#' || b == b'\\'
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Normalises a request target in origin form (`/path?query`) so that routing sees exactly one
/// spelling of each path, and returns the path to route on *and* to forward upstream.
///
/// In order:
/// 1. Split on the first `?`; the query is returned unchanged (its meaning belongs to the
///    upstream, and nothing routes on it).
/// 2. Refuse a path that does not start with `/`, raw bytes listed in [`PathError::InvalidByte`],
///    a NUL, and `%` not followed by two hex digits.
/// 3. Decode percent-encoded unreserved characters (`%41` -> `A`, `%2e` -> `.`); uppercase every
///    other percent-encoding (`%2f` -> `%2F`) so the two spellings compare equal. Decoding is done
///    once: `%252e` stays `%252e` (it is `%25` followed by `2e`), because decoding twice is
///    exactly the mistake double-encoding attacks rely on.
/// 4. `%2F` / `%5C` are refused or kept encoded per `encoded_slash`.
/// 5. Remove dot segments (RFC 3986 5.2.4) *after* step 3, so `/%2e%2e/` counts as `/../`. A `..`
///    above the root stays at the root (`/../admin` -> `/admin`).
///
/// 6. Merge consecutive slashes (`//admin` -> `/admin`, `/a//b` -> `/a/b`), as nginx does by
///    default (`merge_slashes`) and Envoy recommends (`merge_slashes`): RFC 3986 makes `//admin`
///    a different path, but upstreams that merge slashes would serve `/admin` for it, and the
///    request must then have met `/admin`'s route and authentication, not a catch-all's. An
///    empty segment is merged before dot segments are resolved, so `/a//../b` is `/b`.
///
/// See the module's tests for each attack case.
pub fn normalize_path(raw: &str, encoded_slash: EncodedSlash) -> Result<String, PathError> {
    let (path, query) = match raw.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (raw, None),
    };
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    let decoded = decode_unreserved(path.as_bytes(), encoded_slash)?;
    if decoded
        .split('/')
        .any(|segment| matches!(segment.split_once(';'), Some(("." | "..", _))))
    {
        return Err(PathError::DotSegmentWithParameters);
    }
    let mut out = remove_dot_segments(&decoded);
    if let Some(query) = query {
        out.push('?');
        out.push_str(query);
    }
    Ok(out)
}

/// The path routes are matched against: `normalized` (from [`normalize_path`]) without its query
/// and without `;parameters` in each segment, empty segments merged again (`/admin;x/y` ->
/// `/admin/y`, `/;x/admin` -> `/admin`). Servers that strip parameters (Tomcat, Jetty, Spring)
/// serve `/admin;jsessionid=1` as `/admin`, so it must meet `/admin`'s route and auth; for
/// servers that keep them it is a different name under the same prefix, which the same route
/// covers. The upstream still receives the normalised path with its parameters.
pub fn routing_path(normalized: &str) -> std::borrow::Cow<'_, str> {
    let path = normalized.split_once('?').map_or(normalized, |(p, _)| p);
    if !path.contains(';') {
        return std::borrow::Cow::Borrowed(path);
    }
    let stripped: Vec<&str> = path
        .split('/')
        .map(|segment| segment.split_once(';').map_or(segment, |(name, _)| name))
        .collect();
    std::borrow::Cow::Owned(remove_dot_segments(&stripped.join("/")))
}

/// Step 2-4 of [`normalize_path`] over the path bytes.
fn decode_unreserved(path: &[u8], encoded_slash: EncodedSlash) -> Result<String, PathError> {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < path.len() {
        let b = path[i];
        if b == 0 {
            return Err(PathError::Nul);
        }
        if is_forbidden_raw(b) {
            return Err(PathError::InvalidByte(b));
        }
        if b != b'%' {
            out.push(char::from(b));
            i += 1;
            continue;
        }
        let (Some(hi), Some(lo)) = (
            path.get(i + 1).copied().and_then(hex_value),
            path.get(i + 2).copied().and_then(hex_value),
        ) else {
            return Err(PathError::InvalidPercentEncoding(i));
        };
        let value = hi << 4 | lo;
        if value == 0 {
            return Err(PathError::Nul);
        }
        if (value == b'/' || value == b'\\') && encoded_slash == EncodedSlash::Reject {
            return Err(PathError::EncodedSlash);
        }
        if is_unreserved(value) {
            out.push(char::from(value));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(hi)]));
            out.push(char::from(HEX[usize::from(lo)]));
        }
        i += 3;
    }
    Ok(out)
}

/// RFC 3986 5.2.4 for an absolute path (starts with `/`): `.` segments vanish, `..` removes the
/// previous segment (never above the root), and a trailing `.` or `..` leaves a trailing `/`
/// (`/a/b/..` -> `/a/`), as the RFC's algorithm does.
fn remove_dot_segments(path: &str) -> String {
    let mut segments: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    // The leading '/' was checked; every segment follows a '/'.
    for segment in path[1..].split('/') {
        trailing_slash = false;
        match segment {
            // An empty segment (`//`) is merged away; at the end it is the trailing slash.
            "" | "." => trailing_slash = true,
            ".." => {
                segments.pop();
                trailing_slash = true;
            }
            other => segments.push(other),
        }
    }
    let mut out = String::with_capacity(path.len());
    for segment in &segments {
        out.push('/');
        out.push_str(segment);
    }
    if trailing_slash || segments.is_empty() {
        out.push('/');
    }
    out
}

/// Why a request's framing headers were refused; each maps to a 400 response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    /// Both headers: a front end and a back end could each honour a different one (CL.TE / TE.CL
    /// smuggling). RFC 9112 6.1 lets a server reject this; a proxy should.
    #[error("Content-Length together with Transfer-Encoding")]
    ContentLengthWithTransferEncoding,
    /// More than one Content-Length value (repeated fields or a comma list), even if equal:
    /// refusing all of them is simpler to reason about than deciding which duplicates are benign.
    #[error("more than one Content-Length value")]
    DuplicateContentLength,
    /// A Content-Length value that is not a plain decimal number fitting in u64 (`+5`, `5 5`,
    /// `0x10`, empty): parsers disagree on these.
    #[error("invalid Content-Length value")]
    InvalidContentLength,
    /// Transfer-Encoding whose final coding is not `chunked` (the body length would then be
    /// "until close", which a proxy must not guess), `chunked` applied twice, an empty list
    /// element, or a coding that is not a token (`chunked;x`, `\x0bchunked`).
    #[error("Transfer-Encoding other than a list ending in exactly one 'chunked'")]
    InvalidTransferEncoding,
}

/// Optional whitespace around list elements (RFC 9110 5.6.3): space and horizontal tab only, so
/// that `\x0bchunked` or `chunked\r` is not trimmed into something valid.
fn trim_ows(s: &str) -> &str {
    s.trim_matches(|c| c == ' ' || c == '\t')
}

/// RFC 9110 5.6.2 token characters.
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Refuses requests whose body length could be read two ways (issue 7, item 6), before anything
/// else looks at the request. Returns the checks' first failure.
///
/// Accepted: no framing headers; exactly one Content-Length with one decimal value; or
/// Transfer-Encoding (possibly over several fields) whose codings are tokens and whose final
/// coding, compared case-insensitively as RFC 9112 7 requires, is `chunked`, appearing once.
/// Invalid chunked *bodies* are the HTTP/1 codec's job (hyper refuses them), not this check's.
pub fn check_framing(headers: &HeaderMap) -> Result<(), FramingError> {
    let mut lengths = 0usize;
    for value in headers.get_all(CONTENT_LENGTH) {
        let value = value
            .to_str()
            .map_err(|_| FramingError::InvalidContentLength)?;
        for element in value.split(',') {
            let element = trim_ows(element);
            if element.is_empty() || !element.bytes().all(|b| b.is_ascii_digit()) {
                return Err(FramingError::InvalidContentLength);
            }
            element
                .parse::<u64>()
                .map_err(|_| FramingError::InvalidContentLength)?;
            lengths += 1;
        }
    }
    let has_te = headers.contains_key(TRANSFER_ENCODING);
    if lengths > 0 && has_te {
        return Err(FramingError::ContentLengthWithTransferEncoding);
    }
    if lengths > 1 {
        return Err(FramingError::DuplicateContentLength);
    }
    if has_te {
        let mut chunked_seen = false;
        let mut last_is_chunked = false;
        for value in headers.get_all(TRANSFER_ENCODING) {
            let value = value
                .to_str()
                .map_err(|_| FramingError::InvalidTransferEncoding)?;
            for coding in value.split(',') {
                let coding = trim_ows(coding);
                if !is_token(coding) {
                    return Err(FramingError::InvalidTransferEncoding);
                }
                last_is_chunked = coding.eq_ignore_ascii_case("chunked");
                if last_is_chunked {
                    if chunked_seen {
                        return Err(FramingError::InvalidTransferEncoding);
                    }
                    chunked_seen = true;
                }
            }
        }
        if !last_is_chunked {
            return Err(FramingError::InvalidTransferEncoding);
        }
    }
    Ok(())
}

/// Headers that describe one connection, not the message (RFC 9110 7.6.1, plus the common
/// non-standard `proxy-connection` and `keep-alive`): a proxy must not forward them, or a client
/// could steer the gateway-to-upstream connection (keep it open, switch its protocol, announce a
/// body framing the gateway did not produce). `upgrade` is among them: WebSocket pass-through
/// must handle the upgrade explicitly rather than by forwarding the header blindly.
pub const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Headers that a `Connection` header may name but that are never removed: without `Host` the
/// upstream cannot route by name and without `Content-Length` a body's framing is lost, so naming
/// them in `Connection` is either an attack or a mistake.
const NEVER_STRIPPED: &[HeaderName] = &[HOST, CONTENT_LENGTH];

/// Removes [`HOP_BY_HOP`] headers and every header named in `Connection` (RFC 9110 7.6.1) before
/// a request or response is forwarded. Names in `Connection` that are not valid header names are
/// ignored; `Host` and `Content-Length` are never removed this way.
///
/// Run it before the gateway adds its own headers (X-Forwarded-For, the identity header, the
/// request id): a client can name any header in `Connection`, and must not be able to remove
/// the gateway's.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names present (few, on most requests) instead of a hashed lookup of
    // every hop-by-hop name: this runs twice per request.
    let mut found: Vec<HeaderName> = Vec::new();
    for name in headers.keys() {
        if HOP_BY_HOP.contains(&name.as_str()) {
            found.push(name.clone());
        }
    }
    if found.is_empty() {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| HeaderName::from_bytes(trim_ows(name).as_bytes()).ok())
        .collect();
    for name in named {
        if !NEVER_STRIPPED.contains(&name) {
            headers.remove(name);
        }
    }
    for name in found {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn norm(raw: &str) -> Result<String, PathError> {
        normalize_path(raw, EncodedSlash::Reject)
    }

    fn norm_keep(raw: &str) -> Result<String, PathError> {
        normalize_path(raw, EncodedSlash::Keep)
    }

    #[test]
    fn plain_paths_are_unchanged() {
        for p in [
            "/",
            "/admin",
            "/a/b/c",
            "/a/b/",
            "/api/v1/users;v=1",
            "/x:y@z!$&'()*+,;=",
        ] {
            assert_eq!(norm(p).unwrap(), p, "{p}");
        }
    }

    // Attack cases from item 6: each must end at the path the upstream will really serve.
    #[test]
    fn dot_dot_is_resolved_before_routing() {
        assert_eq!(norm("/public/../admin").unwrap(), "/admin");
        assert_eq!(norm("/public/x/../../admin").unwrap(), "/admin");
    }

    #[test]
    fn encoded_dot_dot_is_resolved_in_either_case() {
        assert_eq!(norm("/public/%2e%2e/admin").unwrap(), "/admin");
        assert_eq!(norm("/%2E%2E/admin").unwrap(), "/admin");
        assert_eq!(norm("/public/.%2e/admin").unwrap(), "/admin");
        assert_eq!(norm("/public/%2E./admin").unwrap(), "/admin");
        assert_eq!(norm("/public/%2e/admin").unwrap(), "/public/admin");
    }

    #[test]
    fn single_dot_segments_vanish() {
        assert_eq!(norm("/a/./b").unwrap(), "/a/b");
        assert_eq!(norm("/./admin").unwrap(), "/admin");
        assert_eq!(norm("/a/.").unwrap(), "/a/");
        assert_eq!(norm("/.").unwrap(), "/");
    }

    #[test]
    fn dot_dot_above_the_root_stays_at_the_root() {
        assert_eq!(norm("/..").unwrap(), "/");
        assert_eq!(norm("/../admin").unwrap(), "/admin");
        assert_eq!(norm("/../../../etc/passwd").unwrap(), "/etc/passwd");
        assert_eq!(norm("/a/b/../../..").unwrap(), "/");
        assert_eq!(norm("/a/b/..").unwrap(), "/a/");
    }

    #[test]
    fn dots_inside_a_segment_are_data() {
        assert_eq!(norm("/a/..b/c").unwrap(), "/a/..b/c");
        assert_eq!(norm("/a/b../c").unwrap(), "/a/b../c");
        assert_eq!(norm("/a/.../c").unwrap(), "/a/.../c");
        assert_eq!(norm("/file.tar.gz").unwrap(), "/file.tar.gz");
    }

    #[test]
    fn consecutive_slashes_are_merged_so_they_cannot_dodge_a_route() {
        // nginx (merge_slashes, on by default) serves /admin for //admin: routing must see
        // /admin too.
        for (raw, want) in [
            ("//admin", "/admin"),
            ("///admin//", "/admin/"),
            ("/a//b", "/a/b"),
            ("/a//../b", "/b"),
            ("//", "/"),
            ("/%2e//admin", "/admin"),
            ("/public//..//admin", "/admin"),
            ("/a/?x=//y", "/a/?x=//y"),
        ] {
            assert_eq!(norm(raw).unwrap(), want, "{raw}");
        }
    }

    #[test]
    fn dot_segments_with_parameters_are_refused_in_every_spelling() {
        for raw in [
            "/public/..;/admin",
            "/public/..;x=1/admin",
            "/public/.;/admin",
            "/public/.;x",
            "/..;",
            "/public/%2e%2e;/admin",
            "/public/%2E.;a=b/admin",
            "/public/.%2e;/admin?x",
        ] {
            assert_eq!(norm(raw), Err(PathError::DotSegmentWithParameters), "{raw}");
        }
        // Parameters on other segments, and dots that are data, stay.
        assert_eq!(norm("/a;v=1/b").unwrap(), "/a;v=1/b");
        assert_eq!(norm("/a/...;x").unwrap(), "/a/...;x");
        assert_eq!(norm("/a/.x;y").unwrap(), "/a/.x;y");
        assert_eq!(norm("/a?q=..;").unwrap(), "/a?q=..;");
    }

    #[test]
    fn routes_see_the_path_without_parameters_or_query() {
        for (normalized, routed) in [
            ("/admin", "/admin"),
            ("/admin?x=;y", "/admin"),
            ("/admin;jsessionid=1", "/admin"),
            ("/admin;x/y", "/admin/y"),
            ("/;x/admin", "/admin"),
            ("/a;/b;c/", "/a/b/"),
            ("/public/a;v=1/b?q", "/public/a/b"),
        ] {
            assert_eq!(routing_path(normalized), routed, "{normalized}");
        }
    }

    #[test]
    fn encoded_slash_rejected_by_default() {
        for p in ["/public%2F..%2Fadmin", "/a%2fb", "/a%5Cb", "/a%5cb"] {
            assert_eq!(norm(p), Err(PathError::EncodedSlash), "{p}");
        }
        assert_eq!(EncodedSlash::default(), EncodedSlash::Reject);
    }

    #[test]
    fn encoded_slash_kept_is_data_not_a_separator() {
        assert_eq!(norm_keep("/a%2fb").unwrap(), "/a%2Fb");
        assert_eq!(norm_keep("/a%5cb").unwrap(), "/a%5Cb");
        // Does not split segments, so no dot segment appears and nothing climbs out of /public:
        // `x%2F..` is one segment, not `x` followed by `..`.
        assert_eq!(
            norm_keep("/public%2F..%2Fadmin").unwrap(),
            "/public%2F..%2Fadmin"
        );
        assert_eq!(
            norm_keep("/public/x%2F../admin").unwrap(),
            "/public/x%2F../admin"
        );
    }

    #[test]
    fn double_encoding_stays_encoded() {
        assert_eq!(norm("/%252e%252e/admin").unwrap(), "/%252e%252e/admin");
        assert_eq!(norm("/a%252fb").unwrap(), "/a%252fb");
        assert_eq!(norm("/a%25").unwrap(), "/a%25");
    }

    #[test]
    fn unreserved_encodings_are_decoded_others_uppercased() {
        assert_eq!(norm("/%61dmin").unwrap(), "/admin");
        assert_eq!(norm("/%41%5a%30%2D%5F%7E").unwrap(), "/AZ0-_~");
        assert_eq!(norm("/a%20b").unwrap(), "/a%20b");
        assert_eq!(norm("/a%3fb").unwrap(), "/a%3Fb");
        assert_eq!(norm("/caf%c3%a9").unwrap(), "/caf%C3%A9");
        // Both spellings end the same.
        assert_eq!(norm("/%7eu").unwrap(), norm("/~u").unwrap());
    }

    #[test]
    fn invalid_percent_encodings_are_refused() {
        for (p, at) in [
            ("/a%", 2),
            ("/a%2", 2),
            ("/a%zz", 2),
            ("/%g0", 1),
            ("/a%2%41", 2),
        ] {
            assert_eq!(norm(p), Err(PathError::InvalidPercentEncoding(at)), "{p}");
        }
    }

    #[test]
    fn nul_is_refused_raw_and_encoded() {
        assert_eq!(norm("/admin%00.png"), Err(PathError::Nul));
        assert_eq!(norm("/admin\0"), Err(PathError::Nul));
        assert_eq!(norm_keep("/admin%00"), Err(PathError::Nul));
    }

    #[test]
    fn forbidden_raw_bytes_are_refused() {
        for (p, b) in [
            ("/a b", b' '),
            ("/a\tb", b'\t'),
            ("/a\rb", b'\r'),
            ("/a#frag", b'#'),
            ("/a\\..\\admin", b'\\'),
            ("/a\x7f", 0x7f),
        ] {
            assert_eq!(norm(p), Err(PathError::InvalidByte(b)), "{p:?}");
        }
        assert_eq!(norm("/caf\u{e9}"), Err(PathError::InvalidByte(0xc3)));
    }

    #[test]
    fn relative_and_other_forms_are_refused() {
        for p in ["", "admin", "*", "http://x/admin", "?q=1", "%2Fadmin"] {
            assert_eq!(norm(p), Err(PathError::NotAbsolute), "{p}");
        }
    }

    #[test]
    fn query_is_kept_untouched() {
        assert_eq!(
            norm("/public/../admin?next=/../x&p=%2f%2e").unwrap(),
            "/admin?next=/../x&p=%2f%2e"
        );
        assert_eq!(norm("/a?").unwrap(), "/a?");
        assert_eq!(norm("/a?b?c").unwrap(), "/a?b?c");
        // Only the first '?' splits: the path part is still checked.
        assert_eq!(norm("/a%2f?x"), Err(PathError::EncodedSlash));
    }

    #[test]
    fn normalisation_is_idempotent() {
        for p in [
            "/public/%2e%2e/admin",
            "/a/./b/../c/",
            "/%7e/%2f",
            "//x/../y",
            "/%252e",
            "/a?b=../c",
        ] {
            let once = norm_keep(p).unwrap();
            assert_eq!(norm_keep(&once).unwrap(), once, "{p}");
        }
    }

    fn headers(pairs: &[(&'static str, &[u8])]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_bytes(value).unwrap());
        }
        map
    }

    #[test]
    fn framing_accepts_the_ordinary_cases() {
        for h in [
            headers(&[]),
            headers(&[("content-length", b"0")]),
            headers(&[("content-length", b"12345")]),
            headers(&[("transfer-encoding", b"chunked")]),
            headers(&[("transfer-encoding", b"Chunked")]),
            headers(&[("transfer-encoding", b"gzip, chunked")]),
            headers(&[
                ("transfer-encoding", b"gzip"),
                ("transfer-encoding", b"chunked"),
            ]),
        ] {
            assert_eq!(check_framing(&h), Ok(()), "{h:?}");
        }
    }

    #[test]
    fn framing_refuses_content_length_with_transfer_encoding() {
        for h in [
            headers(&[("content-length", b"5"), ("transfer-encoding", b"chunked")]),
            headers(&[("transfer-encoding", b"chunked"), ("content-length", b"0")]),
        ] {
            assert_eq!(
                check_framing(&h),
                Err(FramingError::ContentLengthWithTransferEncoding)
            );
        }
    }

    #[test]
    fn framing_refuses_duplicate_content_length() {
        for h in [
            headers(&[("content-length", b"5"), ("content-length", b"5")]),
            headers(&[("content-length", b"5"), ("content-length", b"6")]),
            headers(&[("content-length", b"5, 5")]),
            headers(&[("content-length", b"5,6")]),
        ] {
            assert_eq!(
                check_framing(&h),
                Err(FramingError::DuplicateContentLength),
                "{h:?}"
            );
        }
    }

    #[test]
    fn framing_refuses_invalid_content_length() {
        for v in [
            &b""[..],
            b" ",
            b"+5",
            b"-1",
            b"5 5",
            b"0x10",
            b"5,",
            b"1e3",
            b"99999999999999999999999",
            b"\xff",
        ] {
            let h = headers(&[("content-length", v)]);
            assert_eq!(
                check_framing(&h),
                Err(FramingError::InvalidContentLength),
                "{v:?}"
            );
        }
    }

    #[test]
    fn framing_refuses_transfer_encoding_not_ending_in_chunked() {
        for v in [
            &b"identity"[..],
            b"gzip",
            b"chunked, gzip",
            b"chunked, chunked",
            b"chunked,",
            b",chunked",
            b"xchunked",
            b"chunked;q=1",
            b"chunked\xff",
            b"chunk ed",
            b"",
        ] {
            let h = headers(&[("transfer-encoding", v)]);
            assert_eq!(
                check_framing(&h),
                Err(FramingError::InvalidTransferEncoding),
                "{v:?}"
            );
        }
        let split = headers(&[
            ("transfer-encoding", b"chunked"),
            ("transfer-encoding", b"gzip"),
        ]);
        assert_eq!(
            check_framing(&split),
            Err(FramingError::InvalidTransferEncoding)
        );
        let twice = headers(&[
            ("transfer-encoding", b"chunked"),
            ("transfer-encoding", b"chunked"),
        ]);
        assert_eq!(
            check_framing(&twice),
            Err(FramingError::InvalidTransferEncoding)
        );
    }

    #[test]
    fn strip_removes_hop_by_hop_and_connection_named_headers() {
        let mut h = headers(&[
            ("connection", b"keep-alive, X-Secret , bad name"),
            ("connection", b"x-other"),
            ("keep-alive", b"timeout=5"),
            ("proxy-connection", b"keep-alive"),
            ("te", b"trailers"),
            ("transfer-encoding", b"chunked"),
            ("upgrade", b"h2c"),
            ("trailer", b"x"),
            ("proxy-authorization", b"Basic x"),
            ("x-secret", b"1"),
            ("x-other", b"2"),
            ("x-kept", b"3"),
            ("host", b"example.com"),
        ]);
        strip_hop_by_hop(&mut h);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["x-kept", "host"]);
    }

    #[test]
    fn strip_never_removes_host_or_content_length() {
        let mut h = headers(&[
            ("connection", b"host, content-length"),
            ("host", b"example.com"),
            ("content-length", b"3"),
        ]);
        strip_hop_by_hop(&mut h);
        assert!(h.contains_key(HOST));
        assert!(h.contains_key(CONTENT_LENGTH));
        assert!(!h.contains_key(CONNECTION));
    }

    #[test]
    fn hop_by_hop_names_are_valid_lowercase_header_names() {
        for name in HOP_BY_HOP {
            assert_eq!(HeaderName::from_static(name).as_str(), *name);
        }
    }
}
