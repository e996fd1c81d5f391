//! The gateway's own HTTP/1.1 upstream connections: the request is written and the response
//! read by the task serving the client's request, on the socket itself, with no connection
//! task in between.
//!
//! hyper's client runs every connection as a task of its own: a request crosses a channel to
//! it, the response head comes back through another and the body through a third, so each
//! request wakes two tasks several times. Measured on the `l7` bench that hand-off cost as much
//! CPU as the whole client-facing half of the gateway. nginx, HAProxy and Envoy all drive the
//! upstream socket from the request's own context, and so does this module: an idle connection
//! is a socket and a read buffer; [`exchange`] writes the request (streaming its body while it
//! watches for an early response), reads the head, and returns a [`ResponseBody`] that reads
//! the body from the socket as the client side polls it and gives the connection back to its
//! pool the moment the body has ended.
//!
//! Framing follows RFC 9112 and refuses what a proxy must not guess at (nginx does the same):
//! a response with both `Content-Length` and `Transfer-Encoding`, differing `Content-Length`
//! values, a `Transfer-Encoding` that is not `chunked` (read to the close instead, when
//! `chunked` is absent), `Transfer-Encoding` in an HTTP/1.0 response, invalid chunk sizes or
//! missing chunk CRLFs are errors, never a body the gateway and its client could frame
//! differently. HTTP/2 upstreams and WebSocket upgrades stay on hyper (see
//! [`super::upstream`]).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, EXPECT, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Version};
use hyper::body::{Body as _, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::gateway::upstream::is_idempotent;
use crate::gateway::{Body, BoxError};

/// Largest response head accepted from an upstream (status line and fields); a larger one is a
/// broken exchange (502). nginx's `proxy_buffer_size` default is 4-8 KiB; upstreams setting
/// many cookies need more, and this still bounds memory per connection.
pub const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// Most fields in a response head (nginx has no count limit, only its buffer; hyper's is 100).
const MAX_RESPONSE_FIELDS: usize = 128;

/// Longest chunk-size line (size, extensions, CRLF) accepted in a chunked response body.
const MAX_CHUNK_LINE: usize = 4096;

/// Most bytes of trailer fields after a chunked body.
const MAX_TRAILERS: usize = 16 * 1024;

/// How much the read buffer grows by per read of the body (and its initial capacity).
const READ_CHUNK: usize = 16 * 1024;

/// Request bodies smaller than this are copied into the write of the head (one system call
/// instead of two; larger ones are written as they come).
pub(crate) const COALESCE_BODY: usize = 4096;

/// An open HTTP/1.1 connection to an upstream server, idle between exchanges.
#[derive(Debug)]
pub(crate) struct Connection {
    /// The socket.
    stream: TcpStream,
    /// Bytes read but not consumed (empty on an idle connection).
    buf: BytesMut,
}

/// A TCP connection to `addr` with Nagle off (request heads and bodies are small writes that
/// must not wait for an ACK): every upstream connection, this client's and hyper's.
pub(crate) async fn connect_nodelay(addr: SocketAddr) -> Result<TcpStream, String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect to {addr}: {e}"))?;
    stream
        .set_nodelay(true)
        .map_err(|e| format!("TCP_NODELAY on {addr}: {e}"))?;
    Ok(stream)
}

/// The error of a connect to `addr` that did not finish within `timeout`.
pub(crate) fn connect_timed_out(addr: SocketAddr, timeout: Duration) -> String {
    format!(
        "connect to {addr}: timed out after {} ms",
        timeout.as_millis()
    )
}

impl Connection {
    /// Connects to `addr` within `timeout` (see [`connect_nodelay`]).
    pub(crate) async fn connect(addr: SocketAddr, timeout: Duration) -> Result<Self, String> {
        let stream = tokio::time::timeout(timeout, connect_nodelay(addr))
            .await
            .map_err(|_| connect_timed_out(addr, timeout))??;
        Ok(Self {
            stream,
            buf: BytesMut::with_capacity(READ_CHUNK),
        })
    }

    /// Whether an idle connection can take a request: the server has neither closed it nor
    /// sent anything unasked (either way it is dropped). Costs no system call while the socket
    /// has not become readable: tokio answers from the readiness the event loop recorded.
    pub(crate) fn is_reusable(&self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut probe = [0u8; 1];
        matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }
}

/// How a failed exchange failed: what the pool needs to decide on retries and outlier counts.
#[derive(Debug)]
pub(crate) enum ExchangeError {
    /// Nothing of the request reached the server (the first write failed, or a reused
    /// connection turned out closed before any byte of a response, for a request that is safe
    /// to send again): the request is handed back untouched.
    NotSent(Box<Request<Body>>, String),
    /// The server broke the exchange: reset, closed early, malformed or ambiguous response.
    Upstream(String),
    /// The client's request body failed (not the server's fault).
    Client(String),
}

/// Sends `req` on `conn` and reads the response head; the response's body reads the rest
/// from the connection. `reused` tells a pooled connection from a fresh one: a pooled
/// connection that the server closed just as the request went out (EOF before any byte of a
/// response) hands an idempotent request without a body back as not sent, since the server
/// closed it for idleness, not because of it. The caller bounds the whole with the request
/// timeout (dropping the future closes the connection); each later wait for body bytes is
/// bounded by `read_timeout`.
pub(crate) async fn exchange(
    mut conn: Connection,
    req: Request<Body>,
    reused: bool,
    read_timeout: Duration,
) -> Result<Response<ResponseBody>, ExchangeError> {
    let (parts, mut body) = req.into_parts();
    let declared = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let framing = request_framing(&parts.method, declared, &body);
    let mut head = Vec::with_capacity(512);
    encode_head(
        &mut head,
        &parts.method,
        &parts.uri,
        &parts.headers,
        framing,
    );
    let is_head = parts.method == Method::HEAD;
    let mut body_done = body.is_end_stream();
    let mut sent = 0u64;
    // A small body whose first frame is already here goes out with the head.
    if !body_done
        && let RequestFraming::Length(len) = framing
        && len <= COALESCE_BODY as u64
        && let Some(data) = poll_ready_data(&mut body)
    {
        match data {
            Ok(Some(data)) => {
                sent = data.len() as u64;
                if sent > len {
                    return Err(ExchangeError::Client(format!(
                        "request body longer than its Content-Length {len}"
                    )));
                }
                head.extend_from_slice(&data);
            }
            Ok(None) => {}
            Err(e) => return Err(ExchangeError::Client(e.to_string())),
        }
        body_done = body.is_end_stream();
    }
    // A body that has ended (at the start, or with the coalesced frame) must have filled its
    // declared length: sent short, the server would take the next request's first bytes on
    // the connection as the rest of this body (the connection would be pooled, as the
    // request counts as complete). Nothing has been written yet.
    if body_done
        && let RequestFraming::Length(len) = framing
        && sent != len
    {
        return Err(ExchangeError::Client(format!(
            "request body shorter than its Content-Length {len}"
        )));
    }
    if let Err(e) = conn.stream.write_all(&head).await {
        // Nothing of a connection's first write reached a server that failed it; a coalesced
        // body is gone with it, though, so only a request whose body is untouched goes back.
        let message = format!("writing the request: {e}");
        return Err(if sent == 0 {
            ExchangeError::NotSent(Box::new(Request::from_parts(parts, body)), message)
        } else {
            ExchangeError::Upstream(message)
        });
    }
    // What a stale pooled connection needs to send the request again.
    let resend =
        (reused && body_done && sent == 0 && is_idempotent(&parts.method)).then_some(parts);
    let (response_head, request_complete) = if body_done {
        (read_head(&mut conn, is_head).await, true)
    } else {
        // The server may answer before it has read the whole body (a 413, a redirect): the
        // body is written while the head is awaited, and writing stops when the head arrives
        // (the connection is then not reused: how much of the body the server read is unknown).
        let Connection { stream, buf } = &mut conn;
        let (mut reader, mut writer) = stream.split();
        let write = write_body(&mut writer, &mut body, framing, sent);
        let read = read_head_from(&mut reader, buf, is_head);
        tokio::pin!(write, read);
        // `None` while writing; then whether the whole body went out.
        let mut written: Option<bool> = None;
        loop {
            tokio::select! {
                biased;
                head = &mut read => break (head, written == Some(true)),
                result = &mut write, if written.is_none() => match result {
                    Ok(()) => written = Some(true),
                    Err(BodyError::Client(e)) => return Err(ExchangeError::Client(e)),
                    // The server stopped reading: its answer, if any, says why.
                    Err(BodyError::Io) => written = Some(false),
                },
            }
        }
    };
    let head = match response_head {
        Ok(head) => head,
        Err(HeadError::ClosedBeforeResponse(e)) => {
            return Err(match resend {
                Some(parts) => {
                    ExchangeError::NotSent(Box::new(Request::from_parts(parts, Body::default())), e)
                }
                None => ExchangeError::Upstream(e),
            });
        }
        Err(HeadError::Invalid(e)) => return Err(ExchangeError::Upstream(e)),
    };
    let mut body = ResponseBody {
        conn: Some(conn),
        read_timeout,
        stall: None,
        stall_armed: false,
        framing: head.framing,
        keep_alive: head.keep_alive && request_complete,
        give_back: None,
    };
    if body.framing.is_done() {
        body.finish();
    }
    let mut response = Response::new(body);
    *response.status_mut() = head.status;
    *response.version_mut() = Version::HTTP_11;
    *response.headers_mut() = head.headers;
    Ok(response)
}

/// Takes the body's next frame if it is ready now, without waiting: `Some(Ok(Some(data)))` for
/// data, `Some(Ok(None))` for a frame without data (trailers, dropped), `None` when it is not
/// ready.
fn poll_ready_data(body: &mut Body) -> Option<Result<Option<Bytes>, BoxError>> {
    let waker = std::task::Waker::noop();
    let mut cx = Context::from_waker(waker);
    match Pin::new(body).poll_frame(&mut cx) {
        Poll::Pending => None,
        Poll::Ready(None) => Some(Ok(None)),
        Poll::Ready(Some(Ok(frame))) => Some(Ok(frame.into_data().ok())),
        Poll::Ready(Some(Err(e))) => Some(Err(e)),
    }
}

/// How the request body is framed upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RequestFraming {
    /// No body and no `Content-Length` (GET, HEAD, ...).
    None,
    /// `Content-Length: n`.
    Length(u64),
    /// `Transfer-Encoding: chunked`: a body of unknown length.
    Chunked,
}

/// The framing of the request to send: the client's declared length when it gave one (the
/// gateway checked it), else an exact body length, else chunked. An empty body is sent with
/// `Content-Length: 0` only for methods that carry one (as hyper and curl do).
pub(crate) fn request_framing(
    method: &Method,
    declared: Option<u64>,
    body: &Body,
) -> RequestFraming {
    if let Some(len) = declared {
        return RequestFraming::Length(len);
    }
    if body.is_end_stream() {
        return if matches!(*method, Method::POST | Method::PUT | Method::PATCH) {
            RequestFraming::Length(0)
        } else {
            RequestFraming::None
        };
    }
    match body.size_hint().exact() {
        Some(len) => RequestFraming::Length(len),
        None => RequestFraming::Chunked,
    }
}

/// Writes the request head: the request line in origin form, every field except the framing
/// ones (which `framing` replaces) and `Expect`, and the blank line. Names are lowercase, as
/// hyper writes them; values were validated when the `HeaderValue`s were made (no CR, LF or
/// NUL).
///
/// `Expect` is dropped (as nginx does) because the body goes out without waiting for a `100`
/// (the client had its `100` from the gateway): an upstream that refuses the expectation with
/// a final status may then skip reading the body and parse it as a request of its own, one the
/// gateway never routed or authenticated, whose answer would wait on a pooled connection.
pub(crate) fn encode_head(
    out: &mut Vec<u8>,
    method: &Method,
    uri: &http::Uri,
    headers: &HeaderMap,
    framing: RequestFraming,
) {
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    let target = uri.path_and_query().map_or("/", |pq| pq.as_str());
    out.extend_from_slice(if target.is_empty() { "/" } else { target }.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in headers {
        if name == CONTENT_LENGTH || name == TRANSFER_ENCODING || name == EXPECT {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    match framing {
        RequestFraming::None => {}
        RequestFraming::Length(len) => {
            use std::io::Write as _;
            let _ = write!(out, "content-length: {len}\r\n");
        }
        RequestFraming::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    out.extend_from_slice(b"\r\n");
}

/// Why the request body could not be written.
enum BodyError {
    /// The client's body failed.
    Client(String),
    /// The socket failed (the server closed or reset it).
    Io,
}

/// Writes the rest of the request body in `framing` (`sent` bytes of it went with the head),
/// then its end.
async fn write_body<W: tokio::io::AsyncWrite + Unpin>(
    writer: &mut W,
    body: &mut Body,
    framing: RequestFraming,
    mut sent: u64,
) -> Result<(), BodyError> {
    while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await {
        let frame = frame.map_err(|e| BodyError::Client(e.to_string()))?;
        // Trailers are dropped (see the gateway's client body).
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if data.is_empty() {
            continue;
        }
        sent += data.len() as u64;
        match framing {
            RequestFraming::Length(len) if sent > len => {
                return Err(BodyError::Client(format!(
                    "request body longer than its Content-Length {len}"
                )));
            }
            RequestFraming::Chunked => {
                let size = format!("{:x}\r\n", data.len());
                writer
                    .write_all(size.as_bytes())
                    .await
                    .map_err(|_| BodyError::Io)?;
                writer.write_all(&data).await.map_err(|_| BodyError::Io)?;
                writer.write_all(b"\r\n").await.map_err(|_| BodyError::Io)?;
            }
            _ => writer.write_all(&data).await.map_err(|_| BodyError::Io)?,
        }
    }
    match framing {
        RequestFraming::Chunked => writer
            .write_all(b"0\r\n\r\n")
            .await
            .map_err(|_| BodyError::Io),
        RequestFraming::Length(len) if sent < len => Err(BodyError::Client(format!(
            "request body shorter than its Content-Length {len}"
        ))),
        _ => Ok(()),
    }
}

/// A response head as read.
#[derive(Debug)]
pub(crate) struct Head {
    /// The final status (interim 1xx responses are skipped).
    pub(crate) status: StatusCode,
    /// Its fields, framing ones included (the gateway strips hop-by-hop fields itself).
    pub(crate) headers: HeaderMap,
    /// How the body is delimited.
    pub(crate) framing: Framing,
    /// Whether the connection may carry another request after this response.
    pub(crate) keep_alive: bool,
}

/// Why no usable response head was read.
#[derive(Debug)]
enum HeadError {
    /// The connection ended (or failed) before any byte of a response.
    ClosedBeforeResponse(String),
    /// A broken or refused response.
    Invalid(String),
}

/// Reads the response head on `conn`.
async fn read_head(conn: &mut Connection, is_head: bool) -> Result<Head, HeadError> {
    let Connection { stream, buf } = conn;
    read_head_from(stream, buf, is_head).await
}

/// Reads from `reader` into `buf` until a final response head is complete, and parses it.
async fn read_head_from<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
    is_head: bool,
) -> Result<Head, HeadError> {
    let mut received = false;
    loop {
        if !buf.is_empty() {
            match parse_head(buf, is_head).map_err(HeadError::Invalid)? {
                Parsed::Final(head) => return Ok(head),
                Parsed::Interim => continue,
                Parsed::Partial => {}
            }
        }
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(READ_CHUNK);
        }
        let read = std::future::poll_fn(|cx| poll_read_buf(reader, buf, cx)).await;
        match read {
            Ok(0) if !received && buf.is_empty() => {
                return Err(HeadError::ClosedBeforeResponse(
                    "upstream closed the connection before responding".into(),
                ));
            }
            Ok(0) => {
                return Err(HeadError::Invalid(
                    "upstream closed the connection in the response head".into(),
                ));
            }
            Ok(_) => received = true,
            Err(e) if !received && buf.is_empty() => {
                return Err(HeadError::ClosedBeforeResponse(format!(
                    "reading the response: {e}"
                )));
            }
            Err(e) => return Err(HeadError::Invalid(format!("reading the response: {e}"))),
        }
    }
}

/// Reads once from `reader` into the spare capacity of `buf`.
fn poll_read_buf<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    let spare = buf.spare_capacity_mut();
    let mut read_buf = ReadBuf::uninit(spare);
    ready!(Pin::new(reader).poll_read(cx, &mut read_buf))?;
    let n = read_buf.filled().len();
    // SAFETY: `poll_read` initialised the first `n` bytes of the spare capacity.
    unsafe { buf.set_len(buf.len() + n) };
    Poll::Ready(Ok(n))
}

/// The outcome of parsing the start of `buf` as a response head.
#[derive(Debug)]
pub(crate) enum Parsed {
    /// A final response; its head was removed from `buf`.
    Final(Head),
    /// An interim (1xx other than 101) response, removed from `buf`: read on.
    Interim,
    /// More bytes are needed.
    Partial,
}

/// Parses a response head at the start of `buf` (for a request that was `HEAD` when
/// `is_head`), removing it when complete. Errors are refused responses (502).
pub(crate) fn parse_head(buf: &mut BytesMut, is_head: bool) -> Result<Parsed, String> {
    // Most responses have a few fields: room for them on the stack (initialising room for the
    // maximum on every response cost more than parsing), the maximum only when needed.
    match parse_head_in::<FEW_FIELDS>(buf, is_head) {
        Err(Refused::TooManyFields) => {
            parse_head_in::<MAX_RESPONSE_FIELDS>(buf, is_head).map_err(|e| match e {
                Refused::TooManyFields => {
                    format!("response head with more than {MAX_RESPONSE_FIELDS} fields")
                }
                Refused::Other(e) => e,
            })
        }
        Err(Refused::Other(e)) => Err(e),
        Ok(parsed) => Ok(parsed),
    }
}

/// Fields parsed without a heap allocation (see [`parse_head`]).
const FEW_FIELDS: usize = 32;

/// Where a field's name and value are in the head: offsets and lengths.
#[derive(Debug, Clone, Copy, Default)]
struct Span {
    name: u32,
    name_len: u32,
    value: u32,
    value_len: u32,
}

/// Why [`parse_head_in`] refused a head.
enum Refused {
    /// More fields than it had room for.
    TooManyFields,
    /// Anything else: the message.
    Other(String),
}

impl From<String> for Refused {
    fn from(e: String) -> Self {
        Refused::Other(e)
    }
}

/// [`parse_head`] with room for `N` fields.
fn parse_head_in<const N: usize>(buf: &mut BytesMut, is_head: bool) -> Result<Parsed, Refused> {
    let mut fields = [httparse::EMPTY_HEADER; N];
    let mut spans = [Span::default(); N];
    let mut response = httparse::Response::new(&mut fields);
    let len = match response.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > MAX_RESPONSE_HEAD => {
            return Err(format!("response head larger than {MAX_RESPONSE_HEAD} bytes").into());
        }
        Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
        Err(httparse::Error::TooManyHeaders) => return Err(Refused::TooManyFields),
        Err(e) => return Err(format!("malformed response head: {e}").into()),
    };
    if len > MAX_RESPONSE_HEAD {
        return Err(format!("response head larger than {MAX_RESPONSE_HEAD} bytes").into());
    }
    let code = response.code.unwrap_or(0);
    let status = StatusCode::from_u16(code)
        .map_err(|_| Refused::Other(format!("invalid response status {code}")))?;
    let http10 = response.version == Some(0);
    if status.is_informational() {
        if status == StatusCode::SWITCHING_PROTOCOLS {
            return Err(Refused::Other(
                "101 Switching Protocols to a request that asked for no upgrade".into(),
            ));
        }
        buf.advance(len);
        return Ok(Parsed::Interim);
    }
    // The field values become slices of the head's bytes: no copy per field. Offsets first,
    // while httparse borrows the buffer (the head is at most 64 KiB: u32 offsets).
    let count = response.headers.len();
    let base = buf.as_ptr() as usize;
    for (span, h) in spans.iter_mut().zip(response.headers.iter()) {
        *span = Span {
            name: (h.name.as_ptr() as usize - base) as u32,
            name_len: h.name.len() as u32,
            value: (h.value.as_ptr() as usize - base) as u32,
            value_len: h.value.len() as u32,
        };
    }
    let raw = buf.split_to(len).freeze();
    let mut headers = HeaderMap::with_capacity(count);
    for span in &spans[..count] {
        let (name_at, value_at) = (span.name as usize, span.value as usize);
        let name = HeaderName::from_bytes(&raw[name_at..name_at + span.name_len as usize])
            .map_err(|_| "invalid response field name".to_owned())?;
        let value =
            HeaderValue::from_maybe_shared(raw.slice(value_at..value_at + span.value_len as usize))
                .map_err(|_| format!("invalid value of response field {name}"))?;
        headers.append(name, value);
    }
    let (framing, keep_alive) = response_framing(status, &headers, is_head, http10)?;
    Ok(Parsed::Final(Head {
        status,
        headers,
        framing,
        keep_alive,
    }))
}

/// The body's framing (RFC 9112 section 6.3) and whether the connection stays open after it.
fn response_framing(
    status: StatusCode,
    headers: &HeaderMap,
    is_head: bool,
    http10: bool,
) -> Result<(Framing, bool), String> {
    let keep_alive = if http10 {
        has_token(headers, &CONNECTION, b"keep-alive")
    } else {
        !has_token(headers, &CONNECTION, b"close")
    };
    let has_te = headers.contains_key(TRANSFER_ENCODING);
    // RFC 9112 6.1: Transfer-Encoding in an HTTP/1.0 message is faulty framing. HTTP/1.0 has
    // no transfer codings: an HTTP/1.0 hop that passed the field on frames by the close or
    // by its own length, so reading it as chunked (and keeping the connection) could take
    // the rest of the stream as the next response.
    if has_te && http10 {
        return Err("HTTP/1.0 response with Transfer-Encoding".into());
    }
    let lengths: Vec<&HeaderValue> = headers.get_all(CONTENT_LENGTH).iter().collect();
    if has_te && !lengths.is_empty() {
        return Err("response with both Content-Length and Transfer-Encoding".into());
    }
    let length = match lengths.as_slice() {
        [] => None,
        [first, rest @ ..] => {
            let parse = |v: &HeaderValue| -> Result<u64, String> {
                let s = v
                    .to_str()
                    .map_err(|_| "invalid Content-Length".to_owned())?;
                if s.is_empty() || s.len() > 19 || !s.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(format!("invalid Content-Length {s:?}"));
                }
                s.parse()
                    .map_err(|_| format!("invalid Content-Length {s:?}"))
            };
            let n = parse(first)?;
            for other in rest {
                if parse(other)? != n {
                    return Err("response with differing Content-Length values".into());
                }
            }
            Some(n)
        }
    };
    // These never have a body, whatever their fields say.
    if is_head
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
        || status.is_informational()
    {
        return Ok((Framing::Length(0), keep_alive));
    }
    if has_te {
        // `chunked` must be the final coding, once; any other coding alone runs to the close.
        let (mut chunked, mut last_chunked) = (0, false);
        for token in tokens(headers, &TRANSFER_ENCODING) {
            last_chunked = token.eq_ignore_ascii_case(b"chunked");
            chunked += usize::from(last_chunked);
        }
        return match (last_chunked, chunked) {
            (true, 1) => Ok((Framing::Chunked(Chunked::Size), keep_alive)),
            (_, 0) => Ok((Framing::Close, false)),
            _ => Err("response with chunked not once and last of its transfer codings".into()),
        };
    }
    match length {
        Some(n) => Ok((Framing::Length(n), keep_alive)),
        None => Ok((Framing::Close, false)),
    }
}

/// The comma-separated tokens of every `name` field, trimmed of whitespace, empty ones left
/// out; without allocating (this runs on every response's `Connection`).
fn tokens<'h>(headers: &'h HeaderMap, name: &HeaderName) -> impl Iterator<Item = &'h [u8]> {
    headers
        .get_all(name)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

/// Whether a `name` field lists `token` (case-insensitive).
fn has_token(headers: &HeaderMap, name: &HeaderName, token: &[u8]) -> bool {
    tokens(headers, name).any(|t| t.eq_ignore_ascii_case(token))
}

/// How a response body is delimited, and how far it has been read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// This many bytes remain.
    Length(u64),
    /// Chunked, in this state.
    Chunked(Chunked),
    /// Until the server closes the connection.
    Close,
    /// Ended.
    Done,
}

impl Framing {
    /// Whether nothing more is to be read.
    fn is_done(&self) -> bool {
        matches!(self, Framing::Length(0) | Framing::Done)
    }
}

/// Where a chunked body's reader is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Chunked {
    /// At a chunk-size line.
    Size,
    /// In a chunk's data, with this many bytes left.
    Data(u64),
    /// At the CRLF after a chunk's data.
    DataEnd,
    /// In the trailer section after the last chunk.
    Trailers,
}

/// What the chunked decoder got from the buffered bytes.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Decoded {
    /// Body data.
    Data(Bytes),
    /// The trailer section, when it has fields.
    Trailers(Vec<(HeaderName, HeaderValue)>),
    /// The body has ended.
    End,
    /// More bytes are needed.
    NeedMore,
}

/// Fields a trailer section must not carry (RFC 9110 section 6.5.1: framing, routing,
/// authentication, response control, how to process the content; hyper's list plus the
/// connection-specific fields): dropped, so that a client, or a client-side parser that merges
/// trailers into the head, never sees them from an upstream's trailers.
const NOT_IN_TRAILERS: [&str; 21] = [
    "authorization",
    "cache-control",
    "connection",
    "content-encoding",
    "content-length",
    "content-range",
    "content-type",
    "expect",
    "host",
    "keep-alive",
    "max-forwards",
    "pragma",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "range",
    "set-cookie",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Decodes the next piece of a chunked body from `buf` in `state`.
pub(crate) fn decode_chunked(state: &mut Chunked, buf: &mut BytesMut) -> Result<Decoded, String> {
    loop {
        match *state {
            Chunked::Size => {
                let Some(eol) = buf.iter().position(|&b| b == b'\n') else {
                    if buf.len() > MAX_CHUNK_LINE {
                        return Err("chunk-size line too long".into());
                    }
                    return Ok(Decoded::NeedMore);
                };
                if eol > MAX_CHUNK_LINE {
                    return Err("chunk-size line too long".into());
                }
                if eol == 0 || buf[eol - 1] != b'\r' {
                    return Err("chunk-size line without CRLF".into());
                }
                let line = &buf[..eol - 1];
                let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
                let rest = &line[digits..];
                // After the size: nothing, or extensions (`;name[=value]`, ignored), with
                // optional whitespace before the `;` (RFC 9112's BWS).
                let ext_ok = {
                    let trimmed = rest
                        .iter()
                        .position(|&b| b != b' ' && b != b'\t')
                        .map_or(&[][..], |i| &rest[i..]);
                    trimmed.is_empty()
                        || (trimmed[0] == b';'
                            && trimmed
                                .iter()
                                .all(|&b| b == b'\t' || (b' '..=b'~').contains(&b)))
                };
                if digits == 0 || digits > 15 || !ext_ok {
                    return Err("invalid chunk size".into());
                }
                let size = u64::from_str_radix(
                    std::str::from_utf8(&line[..digits]).map_err(|_| "invalid chunk size")?,
                    16,
                )
                .map_err(|_| "invalid chunk size".to_owned())?;
                buf.advance(eol + 1);
                *state = if size == 0 {
                    Chunked::Trailers
                } else {
                    Chunked::Data(size)
                };
            }
            Chunked::Data(left) => {
                if buf.is_empty() {
                    return Ok(Decoded::NeedMore);
                }
                let take = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                let data = buf.split_to(take).freeze();
                let left = left - take as u64;
                *state = if left == 0 {
                    Chunked::DataEnd
                } else {
                    Chunked::Data(left)
                };
                return Ok(Decoded::Data(data));
            }
            Chunked::DataEnd => {
                if buf.len() < 2 {
                    return Ok(Decoded::NeedMore);
                }
                if &buf[..2] != b"\r\n" {
                    return Err("chunk data not followed by CRLF".into());
                }
                buf.advance(2);
                *state = Chunked::Size;
            }
            Chunked::Trailers => {
                if buf.starts_with(b"\r\n") {
                    buf.advance(2);
                    return Ok(Decoded::End);
                }
                let mut fields = [httparse::EMPTY_HEADER; 32];
                match httparse::parse_headers(buf, &mut fields) {
                    // The limit holds for the section's own length, not only for the bytes
                    // waiting when it is incomplete: one large read may bring it whole.
                    Ok(httparse::Status::Complete((len, _))) if len > MAX_TRAILERS => {
                        return Err("trailer section too large".into());
                    }
                    Ok(httparse::Status::Complete((len, fields))) => {
                        let mut trailers = Vec::with_capacity(fields.len());
                        for field in fields {
                            let name = HeaderName::from_bytes(field.name.as_bytes())
                                .map_err(|_| "invalid trailer field name".to_owned())?;
                            let value = HeaderValue::from_bytes(field.value)
                                .map_err(|_| "invalid trailer field value".to_owned())?;
                            if NOT_IN_TRAILERS.contains(&name.as_str()) {
                                continue;
                            }
                            trailers.push((name, value));
                        }
                        buf.advance(len);
                        return Ok(if trailers.is_empty() {
                            Decoded::End
                        } else {
                            Decoded::Trailers(trailers)
                        });
                    }
                    Ok(httparse::Status::Partial) if buf.len() > MAX_TRAILERS => {
                        return Err("trailer section too large".into());
                    }
                    Ok(httparse::Status::Partial) => return Ok(Decoded::NeedMore),
                    Err(e) => return Err(format!("malformed trailer section: {e}")),
                }
            }
        }
    }
}

/// Called once when a response body has ended cleanly with its connection, which the pool
/// keeps when it is `Some` (the connection is reusable).
pub(crate) type GiveBack = Box<dyn FnOnce(Option<Connection>) + Send + Sync>;

/// A response body read from its connection as it is polled. When it ends cleanly on a
/// keep-alive connection, the connection goes to [`ResponseBody::on_end`]'s callback; a body
/// dropped midway, failed, or delimited by the close, closes the connection.
pub(crate) struct ResponseBody {
    /// The connection, until the body ends.
    conn: Option<Connection>,
    /// How long a read of the body may wait for bytes (the pool's request timeout, as nginx's
    /// `proxy_read_timeout` bounds every wait): a stalled upstream must not hold its socket and
    /// its in-flight count, which least request balances on, for as long as the client waits.
    read_timeout: Duration,
    /// Armed while a read waits (made at the first wait: most bodies arrive with their head).
    stall: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Whether `stall` counts down for the current wait.
    stall_armed: bool,
    /// Where the reader is.
    framing: Framing,
    /// Whether the connection may be reused after the body.
    keep_alive: bool,
    /// Receives the connection (or `None`) when the body ends or is dropped.
    give_back: Option<GiveBack>,
}

impl ResponseBody {
    /// Sets what happens at the end: `f` gets the connection when it can be reused, else
    /// `None`. Runs at once when the body has already ended (an empty body).
    pub(crate) fn on_end(&mut self, f: GiveBack) {
        self.give_back = Some(f);
        if self.framing == Framing::Done {
            self.finish();
        }
    }

    /// Ends the body cleanly: the connection goes back when it can carry another request (to
    /// the callback, or held for it until [`ResponseBody::on_end`] sets it).
    fn finish(&mut self) {
        self.framing = Framing::Done;
        let conn = self
            .conn
            .take()
            .filter(|c| self.keep_alive && c.buf.is_empty());
        match self.give_back.take() {
            Some(f) => f(conn),
            None => self.conn = conn,
        }
    }

    /// Ends the body on an error: the connection is closed.
    fn fail(&mut self) {
        self.framing = Framing::Done;
        self.conn = None;
        self.keep_alive = false;
        if let Some(f) = self.give_back.take() {
            f(None);
        }
    }
}

impl hyper::body::Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            if this.framing == Framing::Done {
                return Poll::Ready(None);
            }
            if this.framing.is_done() {
                this.finish();
                return Poll::Ready(None);
            }
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            // Decode what is buffered first.
            let decoded = match &mut this.framing {
                Framing::Length(left) if !conn.buf.is_empty() => {
                    let take = usize::try_from(*left)
                        .unwrap_or(usize::MAX)
                        .min(conn.buf.len());
                    *left -= take as u64;
                    Some(Decoded::Data(conn.buf.split_to(take).freeze()))
                }
                Framing::Close if !conn.buf.is_empty() => {
                    Some(Decoded::Data(conn.buf.split().freeze()))
                }
                Framing::Chunked(state) => match decode_chunked(state, &mut conn.buf) {
                    Ok(Decoded::NeedMore) => None,
                    Ok(decoded) => Some(decoded),
                    Err(e) => {
                        this.fail();
                        return Poll::Ready(Some(Err(format!("upstream body: {e}").into())));
                    }
                },
                _ => None,
            };
            match decoded {
                Some(Decoded::Data(data)) => {
                    if this.framing.is_done() {
                        // The last bytes: the connection is free before the client has them.
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Decoded::Trailers(fields)) => {
                    this.finish();
                    let mut trailers = HeaderMap::with_capacity(fields.len());
                    for (name, value) in fields {
                        trailers.append(name, value);
                    }
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                }
                Some(Decoded::End) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Some(Decoded::NeedMore) | None => {}
            }
            // Read more.
            if conn.buf.capacity() - conn.buf.len() < 1024 {
                conn.buf.reserve(READ_CHUNK);
            }
            let Connection { stream, buf } = conn;
            let read = match poll_read_buf(stream, buf, cx) {
                Poll::Ready(read) => read,
                Poll::Pending => {
                    let timeout = this.read_timeout;
                    let stall = this
                        .stall
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                    if !this.stall_armed {
                        this.stall_armed = true;
                        stall.as_mut().reset(tokio::time::Instant::now() + timeout);
                    }
                    ready!(stall.as_mut().poll(cx));
                    this.fail();
                    return Poll::Ready(Some(Err(format!(
                        "upstream sent no body bytes for {} ms",
                        timeout.as_millis()
                    )
                    .into())));
                }
            };
            this.stall_armed = false;
            match read {
                Ok(0) if this.framing == Framing::Close => {
                    this.keep_alive = false;
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    this.fail();
                    return Poll::Ready(Some(Err(
                        "upstream closed the connection before the body ended".into(),
                    )));
                }
                Ok(_) => {}
                Err(e) => {
                    this.fail();
                    return Poll::Ready(Some(
                        Err(format!("reading the upstream body: {e}").into()),
                    ));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.framing.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Length(n) => SizeHint::with_exact(n),
            Framing::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // A body dropped at its known end (a HEAD, a 204, an exact length read to the end) has
        // already given its connection back; one dropped midway closes it.
        if self.framing.is_done() {
            self.finish();
        } else {
            self.fail();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buf(bytes: &[u8]) -> BytesMut {
        BytesMut::from(bytes)
    }

    fn head(bytes: &[u8], is_head: bool) -> Result<Head, String> {
        let mut b = buf(bytes);
        match parse_head(&mut b, is_head)? {
            Parsed::Final(h) => Ok(h),
            other => panic!("not a final head: {other:?}"),
        }
    }

    #[test]
    fn heads_are_framed_as_rfc_9112_says() {
        let h = head(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello", false).unwrap();
        assert_eq!((h.framing, h.keep_alive), (Framing::Length(5), true));
        let h = head(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            false,
        )
        .unwrap();
        assert_eq!(h.framing, Framing::Chunked(Chunked::Size));
        let h = head(b"HTTP/1.1 200 OK\r\n\r\n", false).unwrap();
        assert_eq!((h.framing, h.keep_alive), (Framing::Close, false));
        let h = head(
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\n",
            false,
        )
        .unwrap();
        assert_eq!((h.framing, h.keep_alive), (Framing::Length(5), false));
        let h = head(b"HTTP/1.0 200 OK\r\ncontent-length: 5\r\n\r\n", false).unwrap();
        assert!(!h.keep_alive);
        let h = head(
            b"HTTP/1.0 200 OK\r\ncontent-length: 5\r\nConnection: Keep-Alive\r\n\r\n",
            false,
        )
        .unwrap();
        assert!(h.keep_alive);
        // Bodyless whatever the fields say.
        for status in ["204 No Content", "304 Not Modified"] {
            let raw = format!("HTTP/1.1 {status}\r\ncontent-length: 9\r\n\r\n");
            assert_eq!(
                head(raw.as_bytes(), false).unwrap().framing,
                Framing::Length(0)
            );
        }
        let h = head(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n", true).unwrap();
        assert_eq!(h.framing, Framing::Length(0));
        assert_eq!(h.headers[CONTENT_LENGTH], "9");
        // Another coding without chunked: to the close.
        let h = head(b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n", false).unwrap();
        assert_eq!((h.framing, h.keep_alive), (Framing::Close, false));
        let h = head(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n",
            false,
        )
        .unwrap();
        assert_eq!(h.framing, Framing::Chunked(Chunked::Size));
        // Equal repeated lengths are one length.
        let h = head(
            b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ncontent-length: 3\r\n\r\n",
            false,
        )
        .unwrap();
        assert_eq!(h.framing, Framing::Length(3));
    }

    #[test]
    fn ambiguous_or_broken_heads_are_refused() {
        for raw in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 5, 6\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: +5\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 0x5\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 99999999999999999999\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, gzip\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nbad field\r\n\r\n",
            b"HTTP/1.1 200 OK\r\n folded: value\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nx: a\0b\r\n\r\n",
            b"HTTX/1.1 200 OK\r\n\r\n",
        ] {
            let mut b = buf(raw);
            assert!(
                parse_head(&mut b, false).is_err(),
                "accepted {:?}",
                String::from_utf8_lossy(raw)
            );
        }
    }

    #[test]
    fn http_1_0_responses_with_transfer_encoding_are_refused() {
        // RFC 9112 6.1: an HTTP/1.0 message with Transfer-Encoding has faulty framing (an
        // HTTP/1.0 hop may have passed the field on while framing by the close). Whatever the
        // codings, lengths or keep-alive say, and in any spelling of the version's response.
        for te in ["chunked", "gzip, chunked", "gzip", "identity"] {
            for extra in ["", "connection: keep-alive\r\n", "content-length: 5\r\n"] {
                let raw = format!("HTTP/1.0 200 OK\r\ntransfer-encoding: {te}\r\n{extra}\r\n");
                assert!(
                    parse_head(&mut buf(raw.as_bytes()), false).is_err(),
                    "accepted {raw:?}"
                );
            }
        }
        // Not even a bodyless one may keep its connection: refused all the same.
        for status in ["204 No Content", "304 Not Modified"] {
            let raw = format!(
                "HTTP/1.0 {status}\r\ntransfer-encoding: chunked\r\nconnection: keep-alive\r\n\r\n"
            );
            assert!(
                parse_head(&mut buf(raw.as_bytes()), false).is_err(),
                "accepted {raw:?}"
            );
        }
        let raw =
            b"HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\nconnection: keep-alive\r\n\r\n";
        assert!(parse_head(&mut buf(raw), true).is_err());
        // HTTP/1.1 with the same fields is still chunked.
        let h = head(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
            false,
        )
        .unwrap();
        assert_eq!(
            (h.framing, h.keep_alive),
            (Framing::Chunked(Chunked::Size), true)
        );
    }

    #[test]
    fn interim_responses_are_skipped_and_partial_heads_wait() {
        let mut b =
            buf(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
        assert!(matches!(parse_head(&mut b, false), Ok(Parsed::Interim)));
        assert!(matches!(parse_head(&mut b, false), Ok(Parsed::Final(_))));
        assert!(b.is_empty());
        let full = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-a: b\r\n\r\nok";
        for cut in 0..full.len() - 2 {
            let mut b = buf(&full[..cut]);
            assert!(
                matches!(parse_head(&mut b, false), Ok(Parsed::Partial)),
                "cut {cut}"
            );
        }
        let mut b = buf(full);
        let Ok(Parsed::Final(h)) = parse_head(&mut b, false) else {
            panic!("not parsed");
        };
        assert_eq!(h.headers["x-a"], "b");
        assert_eq!(&b[..], b"ok");
    }

    #[test]
    fn oversized_heads_are_refused() {
        let mut raw = b"HTTP/1.1 200 OK\r\n".to_vec();
        while raw.len() <= MAX_RESPONSE_HEAD {
            raw.extend_from_slice(b"x-filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        }
        assert!(parse_head(&mut buf(&raw), false).is_err());
        let mut many = b"HTTP/1.1 200 OK\r\n".to_vec();
        for i in 0..=MAX_RESPONSE_FIELDS {
            many.extend_from_slice(format!("x-{i}: v\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert!(parse_head(&mut buf(&many), false).is_err());
        // Up to the maximum they are parsed, past the few kept on the stack too.
        for count in [
            FEW_FIELDS - 1,
            FEW_FIELDS,
            FEW_FIELDS + 1,
            MAX_RESPONSE_FIELDS,
        ] {
            let mut raw = b"HTTP/1.1 200 OK\r\n".to_vec();
            for i in 0..count - 1 {
                raw.extend_from_slice(format!("x-{i}: v{i}\r\n").as_bytes());
            }
            raw.extend_from_slice(b"content-length: 0\r\n\r\n");
            let Ok(Parsed::Final(h)) = parse_head(&mut buf(&raw), false) else {
                panic!("{count} fields refused");
            };
            assert_eq!(h.headers.len(), count);
            assert_eq!(
                h.headers[format!("x-{}", count - 2)],
                format!("v{}", count - 2)
            );
        }
    }

    type Trailers = Vec<(HeaderName, HeaderValue)>;

    /// Decodes `raw` fed `step` bytes at a time; the data, the trailers and whether it ended.
    fn decode(raw: &[u8], step: usize) -> Result<(Vec<u8>, Trailers, bool), String> {
        let mut state = Chunked::Size;
        let mut b = BytesMut::new();
        let (mut data, mut trailers) = (Vec::new(), Vec::new());
        let mut fed = 0;
        loop {
            match decode_chunked(&mut state, &mut b)? {
                Decoded::Data(d) => data.extend_from_slice(&d),
                Decoded::Trailers(t) => {
                    trailers = t;
                    return Ok((data, trailers, true));
                }
                Decoded::End => return Ok((data, trailers, true)),
                Decoded::NeedMore if fed >= raw.len() => return Ok((data, trailers, false)),
                Decoded::NeedMore => {
                    let end = (fed + step).min(raw.len());
                    b.extend_from_slice(&raw[fed..end]);
                    fed = end;
                }
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_at_every_split() {
        let raw = b"5\r\nhello\r\n6;ext=1\r\n world\r\nA \r\n0123456789\r\n0\r\nx-t: v\r\n\r\n";
        for step in 1..=raw.len() {
            let (data, trailers, ended) = decode(raw, step).unwrap();
            assert_eq!(data, b"hello world0123456789", "step {step}");
            assert!(ended);
            assert_eq!(trailers.len(), 1);
            assert_eq!(trailers[0].0, "x-t");
        }
        let (data, trailers, ended) = decode(b"0\r\n\r\n", 1).unwrap();
        assert!(data.is_empty() && trailers.is_empty() && ended);
        // Not ended: more is needed.
        let (_, _, ended) = decode(b"5\r\nhel", 2).unwrap();
        assert!(!ended);
    }

    #[test]
    fn framing_and_control_fields_are_dropped_from_trailers() {
        for name in NOT_IN_TRAILERS {
            assert_eq!(HeaderName::from_static(name).as_str(), name);
            let raw = format!("0\r\n{name}: 5\r\ngrpc-status: 0\r\n\r\n");
            let (_, trailers, ended) = decode(raw.as_bytes(), 1).unwrap();
            assert!(ended);
            let names: Vec<&str> = trailers.iter().map(|(n, _)| n.as_str()).collect();
            assert_eq!(names, ["grpc-status"], "{name}");
        }
        // Only forbidden fields: the section ends with nothing to pass on.
        let (_, trailers, ended) = decode(b"0\r\nContent-Length: 5\r\n\r\n", 3).unwrap();
        assert!(ended && trailers.is_empty());
    }

    #[test]
    fn invalid_chunking_is_refused() {
        for raw in [
            &b"\r\n"[..],
            b"g\r\n",
            b"5\nhello\r\n0\r\n\r\n",
            b"5\r\nhelloXX0\r\n\r\n",
            b"-5\r\n",
            b"0x5\r\n",
            b"5 5\r\n",
            b"1000000000000000\r\n",
            b"5;\x01\r\n",
            b"0\r\nbad trailer\r\n\r\n",
        ] {
            assert!(
                decode(raw, raw.len()).is_err(),
                "accepted {:?}",
                String::from_utf8_lossy(raw)
            );
        }
        let mut long = vec![b'1'; 1];
        long.extend(std::iter::repeat_n(b';', MAX_CHUNK_LINE + 10));
        assert!(decode(&long, long.len()).is_err());
    }

    #[test]
    fn trailer_sections_over_the_limit_are_refused_however_they_arrive() {
        /// A chunked body ending in a trailer section of about `size` bytes (in fields of about
        /// 1 KiB, as few as httparse's 32 allow), and the section's exact length.
        fn body(size: usize) -> (Vec<u8>, usize) {
            let mut trailers = Vec::new();
            let mut i = 0;
            while trailers.len() + 2 < size {
                let room = (size - 2 - trailers.len()).min(1024);
                let field = format!("x-{i:02}: ");
                let value = "a".repeat(room.saturating_sub(field.len() + 2).max(1));
                trailers.extend_from_slice(format!("{field}{value}\r\n").as_bytes());
                i += 1;
            }
            trailers.extend_from_slice(b"\r\n");
            let len = trailers.len();
            let mut raw = b"3\r\nabc\r\n0\r\n".to_vec();
            raw.extend_from_slice(&trailers);
            (raw, len)
        }
        let (within, len) = body(MAX_TRAILERS);
        assert!(len <= MAX_TRAILERS);
        let (over, len) = body(MAX_TRAILERS + 2);
        assert!(len > MAX_TRAILERS);
        // Fed in one piece (one large read), in reads of a few KiB, or byte by byte.
        for step in [1, 1000, 4096, READ_CHUNK, over.len()] {
            let (_, trailers, ended) = decode(&within, step).unwrap();
            assert!(ended && !trailers.is_empty(), "step {step}");
            assert!(decode(&over, step).is_err(), "step {step}: accepted");
        }
    }

    #[test]
    fn request_heads_carry_one_framing_of_our_choosing() {
        let uri: http::Uri = "/a/b?c=d".parse().unwrap();
        let mut headers = HeaderMap::new();
        headers.insert("host", HeaderValue::from_static("example.com"));
        headers.insert(CONTENT_LENGTH, HeaderValue::from_static("99"));
        headers.insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        let mut out = Vec::new();
        encode_head(
            &mut out,
            &Method::POST,
            &uri,
            &headers,
            RequestFraming::Length(3),
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "POST /a/b?c=d HTTP/1.1\r\nhost: example.com\r\ncontent-length: 3\r\n\r\n"
        );
        let mut out = Vec::new();
        encode_head(
            &mut out,
            &Method::GET,
            &"/".parse().unwrap(),
            &HeaderMap::new(),
            RequestFraming::None,
        );
        assert_eq!(out, b"GET / HTTP/1.1\r\n\r\n");
        let mut out = Vec::new();
        encode_head(
            &mut out,
            &Method::PUT,
            &"/x".parse().unwrap(),
            &HeaderMap::new(),
            RequestFraming::Chunked,
        );
        assert_eq!(
            out,
            b"PUT /x HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n"
        );
    }

    #[test]
    fn request_framing_follows_the_body() {
        use http_body_util::{BodyExt, Full};
        let empty = Body::default();
        assert_eq!(
            request_framing(&Method::GET, None, &empty),
            RequestFraming::None
        );
        assert_eq!(
            request_framing(&Method::POST, None, &empty),
            RequestFraming::Length(0)
        );
        assert_eq!(
            request_framing(&Method::POST, Some(7), &empty),
            RequestFraming::Length(7)
        );
        let full = Full::new(Bytes::from_static(b"abc"))
            .map_err(|e| match e {})
            .boxed();
        assert_eq!(
            request_framing(&Method::PUT, None, &full),
            RequestFraming::Length(3)
        );
        let stream =
            http_body_util::StreamBody::new(futures_util::stream::iter(vec![Ok::<_, BoxError>(
                Frame::data(Bytes::from_static(b"x")),
            )]))
            .boxed();
        assert_eq!(
            request_framing(&Method::POST, None, &stream),
            RequestFraming::Chunked
        );
    }
}
