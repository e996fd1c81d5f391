//! A remote region's capacity, asked of its xlb host through the tunnel the traffic would take.
//!
//! Multi-region failover sends a VIP's new flows to a remote region's xlb host, encapsulated
//! (IPIP / IP6IP6) to that host's *tunnel address*. Whether that is a good idea depends on two
//! things this module measures in one exchange: whether the remote region has healthy capacity
//! for the VIP, and whether the tunnel works at all. So the question is itself sent through the
//! tunnel: a broken tunnel (a filter dropping protocol 4/41, a missing route, a remote balancer
//! that no longer decapsulates) makes the probe time out and the region count as down, exactly
//! as the traffic would fail.
//!
//! Three parts:
//! - the wire format ([`Request`], [`Reply`]): pure, versioned, small, binary;
//! - the endpoint ([`serve`], bound by [`bind_server`]): a UDP socket on the agent answering each
//!   valid request, with the shares the agent's `answer` function gives;
//! - the prober ([`probe`], and [`spawn_region_prober`] around it): builds a complete inner
//!   IPv4/IPv6 + UDP packet holding the request ([`build_inner_udp`]) and sends it through a raw
//!   socket of protocol IPIP (4) or IPv6 (41), so the kernel adds only the outer header: no
//!   kernel tunnel device is needed (the ipip module is often not there). The remote balancer's
//!   XDP program recognises a tunnel packet whose inner destination is its own tunnel address as
//!   a capacity probe, strips the outer header and passes the inner packet to its host stack,
//!   where [`serve`] receives it. The reply comes back as plain UDP to the prober's socket.
//!
//! # Wire format (version 1)
//! Every integer is big-endian (network order). A datagram is a 16-byte header and entries:
//!
//! | offset | size | field                                                        |
//! |--------|------|--------------------------------------------------------------|
//! | 0      | 4    | magic `"XLBC"`                                               |
//! | 4      | 1    | version, 1                                                   |
//! | 5      | 1    | kind: 1 request, 2 reply                                     |
//! | 6      | 2    | count of entries, at most [`MAX_VIPS_PER_REQUEST`] (64)      |
//! | 8      | 8    | nonce: random per request, echoed by the reply               |
//!
//! A request entry (20 bytes) is one [`VipKey`], field by field: the 16-byte address (IPv4 in
//! the first 4 bytes, the rest zero), the port (2 bytes, network order; 0 = every port), the
//! protocol (1 byte: 6 TCP, 17 UDP) and the family (1 byte: 4 or 6).
//!
//! A reply entry (4 bytes), one per request entry in the same order: flags (1 byte; bit 0 set
//! when the VIP is known to the remote host, other bits zero), a reserved zero byte, and the
//! healthy share of the VIP's capacity as a `u16` in basis points, `0..=10000` (0 when unknown).
//!
//! A datagram's length must be exactly the header plus `count` entries, and at most
//! [`MAX_DATAGRAM`] (1400) bytes: 64 request entries are 1296 bytes, which with the inner
//! IPv6 + UDP headers and the outer IPv6 header stays under a 1500-byte MTU. Anything else
//! (wrong magic, version or kind, a count beyond the payload, trailing bytes, unknown flags, a
//! share above 10000, a family other than 4 or 6) is malformed: ignored and counted, never a
//! panic. A future version 2 changes the version byte; a version-1 peer ignores it.

use std::collections::HashMap;
use std::io;
use std::mem;
use std::net::{IpAddr, SocketAddr, UdpSocket as StdUdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use lb_common::types::{FAMILY_V4, FAMILY_V6, VipKey, proto};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;

use crate::health::{HealthState, Transition};

/// The first four bytes of every datagram.
pub const MAGIC: [u8; 4] = *b"XLBC";
/// The wire format's version.
pub const VERSION: u8 = 1;
/// Most VIPs in one request; the prober splits longer lists into several requests.
pub const MAX_VIPS_PER_REQUEST: usize = 64;
/// Longest datagram (UDP payload) either side sends or accepts.
pub const MAX_DATAGRAM: usize = 1400;
/// The endpoint's default UDP port (`[agent] capacity_port`).
pub const DEFAULT_PORT: u16 = 9301;
/// Basis points of a full share (1.0).
pub const FULL_SHARE_BP: u16 = 10_000;

const HEADER_LEN: usize = 16;
const REQUEST_ENTRY_LEN: usize = 20;
const REPLY_ENTRY_LEN: usize = 4;
const KIND_REQUEST: u8 = 1;
const KIND_REPLY: u8 = 2;
const FLAG_KNOWN: u8 = 1;

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// Why a datagram is not a valid request or reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Shorter than the header.
    #[error("datagram of {0} bytes is shorter than the 16-byte header")]
    Short(usize),
    /// Longer than [`MAX_DATAGRAM`].
    #[error("datagram of {0} bytes is longer than {MAX_DATAGRAM}")]
    Long(usize),
    /// The first four bytes are not [`MAGIC`].
    #[error("wrong magic")]
    Magic,
    /// A version this code does not speak.
    #[error("unsupported version {0}")]
    Version(u8),
    /// A request where a reply was expected, or the other way round, or an unknown kind.
    #[error("unexpected kind {0}")]
    Kind(u8),
    /// More entries than [`MAX_VIPS_PER_REQUEST`].
    #[error("count {0} exceeds {MAX_VIPS_PER_REQUEST}")]
    Count(usize),
    /// The length does not match the count.
    #[error("{len} bytes do not hold exactly {count} entries")]
    Length {
        /// The datagram's length.
        len: usize,
        /// The count in its header.
        count: usize,
    },
    /// A VIP key's family is neither 4 nor 6.
    #[error("entry {0}: family must be 4 or 6")]
    Family(usize),
    /// A reply entry with flags other than "known", a nonzero reserved byte, or a share above
    /// 10000 basis points.
    #[error("entry {0}: bad flags or share")]
    Entry(usize),
}

/// Why a probe failed.
#[derive(Debug, thiserror::Error)]
pub enum CapacityError {
    /// A socket operation failed.
    #[error("{what}: {source}")]
    Io {
        /// Which operation.
        what: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Not every reply arrived in time.
    #[error("timeout after {0:?}")]
    Timeout(Duration),
    /// The two ends of a packet are of different address families.
    #[error("source {src} and destination {dst} are of different families")]
    Family {
        /// The source.
        src: IpAddr,
        /// The destination.
        dst: IpAddr,
    },
    /// A request with more than [`MAX_VIPS_PER_REQUEST`] VIPs, or a payload that makes the
    /// datagram longer than [`MAX_DATAGRAM`].
    #[error("{0} entries or bytes exceed the datagram limits")]
    TooLarge(usize),
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> CapacityError {
    move |source| CapacityError::Io { what, source }
}

// ---------------------------------------------------------------------------------------------
// Wire format
// ---------------------------------------------------------------------------------------------

/// A capacity request: "what share of these VIPs' capacity is healthy?".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Random; the reply carries it back.
    pub nonce: u64,
    /// At most [`MAX_VIPS_PER_REQUEST`].
    pub vips: Vec<VipKey>,
}

/// The answer to a [`Request`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The request's nonce.
    pub nonce: u64,
    /// Per requested VIP, in the request's order: `None` when the VIP is unknown to the
    /// remote host, else its healthy share in basis points (`0..=10000`).
    pub shares: Vec<Option<u16>>,
}

fn header(kind: u8, count: usize, nonce: u64, entry_len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + count * entry_len);
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(kind);
    out.extend_from_slice(&(count as u16).to_be_bytes());
    out.extend_from_slice(&nonce.to_be_bytes());
    out
}

/// Checks the header and length; returns (nonce, count).
fn parse_header(buf: &[u8], kind: u8, entry_len: usize) -> Result<(u64, usize), DecodeError> {
    if buf.len() < HEADER_LEN {
        return Err(DecodeError::Short(buf.len()));
    }
    if buf.len() > MAX_DATAGRAM {
        return Err(DecodeError::Long(buf.len()));
    }
    if buf[0..4] != MAGIC {
        return Err(DecodeError::Magic);
    }
    if buf[4] != VERSION {
        return Err(DecodeError::Version(buf[4]));
    }
    if buf[5] != kind {
        return Err(DecodeError::Kind(buf[5]));
    }
    let count = usize::from(u16::from_be_bytes([buf[6], buf[7]]));
    if count > MAX_VIPS_PER_REQUEST {
        return Err(DecodeError::Count(count));
    }
    if buf.len() != HEADER_LEN + count * entry_len {
        return Err(DecodeError::Length {
            len: buf.len(),
            count,
        });
    }
    let mut nonce = [0u8; 8];
    nonce.copy_from_slice(&buf[8..16]);
    Ok((u64::from_be_bytes(nonce), count))
}

impl Request {
    /// The datagram; [`CapacityError::TooLarge`] beyond [`MAX_VIPS_PER_REQUEST`] VIPs.
    pub fn encode(&self) -> Result<Vec<u8>, CapacityError> {
        if self.vips.len() > MAX_VIPS_PER_REQUEST {
            return Err(CapacityError::TooLarge(self.vips.len()));
        }
        let mut out = header(KIND_REQUEST, self.vips.len(), self.nonce, REQUEST_ENTRY_LEN);
        for vip in &self.vips {
            out.extend_from_slice(&vip.addr);
            out.extend_from_slice(&u16::from_be(vip.port_be).to_be_bytes());
            out.push(vip.proto);
            out.push(vip.family);
        }
        Ok(out)
    }

    /// Parses a request datagram.
    pub fn decode(buf: &[u8]) -> Result<Request, DecodeError> {
        let (nonce, count) = parse_header(buf, KIND_REQUEST, REQUEST_ENTRY_LEN)?;
        let vips = buf[HEADER_LEN..]
            .chunks_exact(REQUEST_ENTRY_LEN)
            .enumerate()
            .map(|(i, e)| {
                let mut addr = [0u8; 16];
                addr.copy_from_slice(&e[..16]);
                let family = e[19];
                if family != FAMILY_V4 && family != FAMILY_V6 {
                    return Err(DecodeError::Family(i));
                }
                Ok(VipKey {
                    addr,
                    port_be: u16::from_be_bytes([e[16], e[17]]).to_be(),
                    proto: e[18],
                    family,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        debug_assert_eq!(vips.len(), count);
        Ok(Request { nonce, vips })
    }
}

impl Reply {
    /// The datagram; [`CapacityError::TooLarge`] beyond [`MAX_VIPS_PER_REQUEST`] entries.
    /// Shares above 10000 are sent as 10000.
    pub fn encode(&self) -> Result<Vec<u8>, CapacityError> {
        if self.shares.len() > MAX_VIPS_PER_REQUEST {
            return Err(CapacityError::TooLarge(self.shares.len()));
        }
        let mut out = header(KIND_REPLY, self.shares.len(), self.nonce, REPLY_ENTRY_LEN);
        for share in &self.shares {
            let (flags, bp) = match share {
                Some(bp) => (FLAG_KNOWN, (*bp).min(FULL_SHARE_BP)),
                None => (0, 0),
            };
            out.extend_from_slice(&[flags, 0]);
            out.extend_from_slice(&bp.to_be_bytes());
        }
        Ok(out)
    }

    /// Parses a reply datagram.
    pub fn decode(buf: &[u8]) -> Result<Reply, DecodeError> {
        let (nonce, _count) = parse_header(buf, KIND_REPLY, REPLY_ENTRY_LEN)?;
        let shares = buf[HEADER_LEN..]
            .chunks_exact(REPLY_ENTRY_LEN)
            .enumerate()
            .map(|(i, e)| {
                let bp = u16::from_be_bytes([e[2], e[3]]);
                match (e[0], e[1]) {
                    (FLAG_KNOWN, 0) if bp <= FULL_SHARE_BP => Ok(Some(bp)),
                    (0, 0) if bp == 0 => Ok(None),
                    _ => Err(DecodeError::Entry(i)),
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Reply { nonce, shares })
    }
}

/// A share (0.0..=1.0) in basis points, clamped; NaN counts as 0.
pub fn share_to_bp(share: f64) -> u16 {
    if share.is_nan() {
        return 0;
    }
    (share.clamp(0.0, 1.0) * f64::from(FULL_SHARE_BP)).round() as u16
}

/// Basis points as a share (0.0..=1.0).
pub fn bp_to_share(bp: u16) -> f64 {
    f64::from(bp.min(FULL_SHARE_BP)) / f64::from(FULL_SHARE_BP)
}

/// A random nonce from the kernel (falls back to the clock if `getrandom` fails).
pub fn random_nonce() -> u64 {
    let mut buf = [0u8; 8];
    // SAFETY: getrandom writes at most `buf.len()` bytes into a buffer we own.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n == buf.len() as isize {
        return u64::from_ne_bytes(buf);
    }
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (t.as_nanos() as u64) ^ (u64::from(std::process::id()) << 32)
}

// ---------------------------------------------------------------------------------------------
// Inner packets
// ---------------------------------------------------------------------------------------------

/// The ones'-complement sum of `data` as big-endian 16-bit words, added to `sum`.
fn sum16(mut sum: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    sum
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A complete IPv4 or IPv6 packet holding one UDP datagram from `src` to `dst` with `payload`:
/// IPv4 header (20 bytes, DF set, TTL 64, header checksum) or IPv6 header (hop limit 64), then a
/// UDP header with its checksum over the pseudo-header (0 is sent as 0xffff, as RFC 768 and
/// RFC 8200 require). The prober sends it as the payload of a raw IPIP / IPv6 socket.
pub fn build_inner_udp(
    src: SocketAddr,
    dst: SocketAddr,
    payload: &[u8],
) -> Result<Vec<u8>, CapacityError> {
    if payload.len() > MAX_DATAGRAM {
        return Err(CapacityError::TooLarge(payload.len()));
    }
    let udp_len = 8 + payload.len();
    let mut udp = Vec::with_capacity(udp_len);
    udp.extend_from_slice(&src.port().to_be_bytes());
    udp.extend_from_slice(&dst.port().to_be_bytes());
    udp.extend_from_slice(&(udp_len as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    let mut out;
    let pseudo = match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let total = 20 + udp_len;
            out = Vec::with_capacity(total);
            out.extend_from_slice(&[0x45, 0]);
            out.extend_from_slice(&(total as u16).to_be_bytes());
            out.extend_from_slice(&[0, 0, 0x40, 0, 64, proto::UDP, 0, 0]);
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
            let csum = fold(sum16(0, &out));
            out[10..12].copy_from_slice(&csum.to_be_bytes());
            let mut p = sum16(0, &s.octets());
            p = sum16(p, &d.octets());
            p + u32::from(proto::UDP) + udp_len as u32
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            out = Vec::with_capacity(40 + udp_len);
            out.extend_from_slice(&[0x60, 0, 0, 0]);
            out.extend_from_slice(&(udp_len as u16).to_be_bytes());
            out.extend_from_slice(&[proto::UDP, 64]);
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
            let mut p = sum16(0, &s.octets());
            p = sum16(p, &d.octets());
            p + u32::from(proto::UDP) + udp_len as u32
        }
        (s, d) => return Err(CapacityError::Family { src: s, dst: d }),
    };
    let mut csum = fold(sum16(pseudo, &udp));
    if csum == 0 {
        csum = 0xffff;
    }
    udp[6..8].copy_from_slice(&csum.to_be_bytes());
    out.extend_from_slice(&udp);
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// The endpoint
// ---------------------------------------------------------------------------------------------

/// What the endpoint did, for metrics and tests. Counters only grow.
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Valid requests received.
    pub requests: AtomicU64,
    /// Replies sent.
    pub replies: AtomicU64,
    /// Datagrams ignored as malformed (see the module documentation).
    pub malformed: AtomicU64,
    /// Replies that could not be sent, and receive errors.
    pub errors: AtomicU64,
}

/// A UDP socket on `port` of every address, IPv4 and IPv6: one `[::]` socket with
/// `IPV6_V6ONLY` off (IPv4 peers appear as `::ffff:a.b.c.d`), or `0.0.0.0` when the host (or
/// namespace) has IPv6 disabled. Must be called inside a tokio runtime.
pub fn bind_server(port: u16) -> io::Result<UdpSocket> {
    let std = match bind_dual_stack(port) {
        Ok(s) => s,
        Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
            StdUdpSocket::bind((std::net::Ipv4Addr::UNSPECIFIED, port))?
        }
        Err(e) => return Err(e),
    };
    std.set_nonblocking(true)?;
    UdpSocket::from_std(std)
}

fn bind_dual_stack(port: u16) -> io::Result<StdUdpSocket> {
    // SAFETY: plain socket call; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET6, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let off: libc::c_int = 0;
    // SAFETY: setsockopt with a pointer to a c_int that outlives the call and its size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_V6ONLY,
            (&raw const off).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: an all-zero sockaddr_in6 is valid (the unspecified address).
    let mut sa: libc::sockaddr_in6 = unsafe { mem::zeroed() };
    sa.sin6_family = libc::AF_INET6 as libc::sa_family_t;
    sa.sin6_port = port.to_be();
    // SAFETY: bind with a sockaddr_in6 we own and its exact size.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const sa).cast(),
            mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(StdUdpSocket::from(fd))
}

/// The reply to one datagram, or `None` when it is not a valid request (counted as malformed).
/// The pure core of [`serve`].
pub fn answer_datagram(
    buf: &[u8],
    answer: &impl Fn(&VipKey) -> Option<f64>,
    stats: &ServerStats,
) -> Option<Vec<u8>> {
    let Ok(request) = Request::decode(buf) else {
        stats.malformed.fetch_add(1, Ordering::Relaxed);
        return None;
    };
    stats.requests.fetch_add(1, Ordering::Relaxed);
    let reply = Reply {
        nonce: request.nonce,
        shares: request
            .vips
            .iter()
            .map(|k| answer(k).map(share_to_bp))
            .collect(),
    };
    reply.encode().ok()
}

/// Answers capacity requests on `socket` forever (abort the task to stop): each valid request
/// gets a reply to its source address holding, per VIP, `answer(vip)` (`None`: the VIP is
/// unknown here; `Some(share)`: the healthy share of its capacity, 0.0..=1.0). Malformed
/// datagrams are counted in `stats` and ignored.
pub async fn serve(
    socket: UdpSocket,
    answer: impl Fn(&VipKey) -> Option<f64> + Send + Sync + 'static,
    stats: Arc<ServerStats>,
) {
    // One byte more than the limit, so an oversized datagram is seen as such, not truncated.
    let mut buf = vec![0u8; MAX_DATAGRAM + 1];
    loop {
        let (len, peer) = match socket.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                tracing::debug!("capacity endpoint: receive failed: {e}");
                // Never spin on a persistent error.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let Some(reply) = answer_datagram(&buf[..len], &answer, &stats) else {
            continue;
        };
        match socket.send_to(&reply, peer).await {
            Ok(_) => stats.replies.fetch_add(1, Ordering::Relaxed),
            Err(e) => {
                tracing::debug!("capacity endpoint: reply to {peer} failed: {e}");
                stats.errors.fetch_add(1, Ordering::Relaxed)
            }
        };
    }
}

// ---------------------------------------------------------------------------------------------
// The prober
// ---------------------------------------------------------------------------------------------

/// The result of one successful probe.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeOutcome {
    /// Per VIP asked, in order: `None` when the remote host does not know it, else its healthy
    /// share (0.0..=1.0).
    pub shares: Vec<Option<f64>>,
    /// From sending the first request to receiving the last reply.
    pub rtt: Duration,
    /// Datagrams received on the reply socket that were not a reply to this probe (malformed,
    /// or a stale nonce), ignored.
    pub ignored: u64,
}

/// This host's source address toward `dst` (the kernel's route choice), found with a
/// connected UDP socket; nothing is sent.
pub fn source_address(dst: IpAddr) -> Result<IpAddr, CapacityError> {
    let any: IpAddr = match dst {
        IpAddr::V4(_) => std::net::Ipv4Addr::UNSPECIFIED.into(),
        IpAddr::V6(_) => std::net::Ipv6Addr::UNSPECIFIED.into(),
    };
    let sock = StdUdpSocket::bind((any, 0)).map_err(io_err("source address: bind"))?;
    sock.connect((dst, 9))
        .map_err(io_err("source address: no route"))?;
    Ok(sock
        .local_addr()
        .map_err(io_err("source address: getsockname"))?
        .ip())
}

/// Sends `inner` (a complete IP packet) to `tunnel` inside an outer IPv4 (protocol 4) or IPv6
/// (next header 41) header that the kernel adds: a raw socket, no tunnel device. Needs
/// CAP_NET_RAW.
pub fn send_tunnelled(tunnel: IpAddr, inner: &[u8]) -> Result<(), CapacityError> {
    let (domain, protocol) = match tunnel {
        IpAddr::V4(_) => (libc::AF_INET, libc::IPPROTO_IPIP),
        IpAddr::V6(_) => (libc::AF_INET6, libc::IPPROTO_IPV6),
    };
    // SAFETY: plain socket call; the result is checked before use.
    let fd = unsafe { libc::socket(domain, libc::SOCK_RAW | libc::SOCK_CLOEXEC, protocol) };
    if fd < 0 {
        return Err(CapacityError::Io {
            what: "raw tunnel socket",
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: `fd` is a fresh socket nobody else owns; closed when dropped.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // The socket would also queue every tunnel packet this host receives; it lives for one
    // send, but a zero receive buffer keeps even that short life cheap.
    let zero: libc::c_int = 0;
    // SAFETY: setsockopt with a pointer to a c_int that outlives the call and its size.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&raw const zero).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    let sent = match tunnel {
        IpAddr::V4(a) => {
            // SAFETY: an all-zero sockaddr_in is valid.
            let mut sa: libc::sockaddr_in = unsafe { mem::zeroed() };
            sa.sin_family = libc::AF_INET as libc::sa_family_t;
            sa.sin_addr.s_addr = u32::from_ne_bytes(a.octets());
            // SAFETY: sendto with a buffer and a sockaddr we own, and their exact sizes.
            unsafe {
                libc::sendto(
                    fd.as_raw_fd(),
                    inner.as_ptr().cast(),
                    inner.len(),
                    libc::MSG_DONTWAIT,
                    (&raw const sa).cast(),
                    mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            }
        }
        IpAddr::V6(a) => {
            // SAFETY: an all-zero sockaddr_in6 is valid.
            let mut sa: libc::sockaddr_in6 = unsafe { mem::zeroed() };
            sa.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            // Port 0: a raw IPv6 socket takes a nonzero port as the protocol and checks it.
            sa.sin6_addr.s6_addr = a.octets();
            // SAFETY: sendto with a buffer and a sockaddr we own, and their exact sizes.
            unsafe {
                libc::sendto(
                    fd.as_raw_fd(),
                    inner.as_ptr().cast(),
                    inner.len(),
                    libc::MSG_DONTWAIT,
                    (&raw const sa).cast(),
                    mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
                )
            }
        }
    };
    if sent != inner.len() as isize {
        return Err(CapacityError::Io {
            what: "tunnel send",
            source: if sent < 0 {
                io::Error::last_os_error()
            } else {
                io::Error::other(format!("sent {sent} of {} bytes", inner.len()))
            },
        });
    }
    Ok(())
}

/// How a probe's requests travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    Tunnel,
    Plain,
}

/// Asks the xlb host at `tunnel` (its capacity endpoint on `port`) for the healthy share of
/// each of `vips`, **through the tunnel**: each request (up to [`MAX_VIPS_PER_REQUEST`] VIPs;
/// longer lists are split) is an inner UDP packet from this host's source address toward
/// `tunnel` to `tunnel:port`, sent inside IPIP (IPv4 tunnel address) or IP6IP6 (IPv6) with
/// [`send_tunnelled`]. Replies come back as plain UDP to a socket bound to that source address,
/// matched by nonce. Fails with [`CapacityError::Timeout`] unless every reply arrives within
/// `timeout`. Needs CAP_NET_RAW.
pub async fn probe(
    tunnel: IpAddr,
    port: u16,
    vips: &[VipKey],
    timeout: Duration,
) -> Result<ProbeOutcome, CapacityError> {
    exchange(Path::Tunnel, tunnel, port, vips, timeout).await
}

/// The same exchange as [`probe`] as plain UDP to `server:port`, without the tunnel: for
/// diagnostics (`is the endpoint up, or the tunnel broken?`) and tests. Needs no privileges.
pub async fn query_plain(
    server: IpAddr,
    port: u16,
    vips: &[VipKey],
    timeout: Duration,
) -> Result<ProbeOutcome, CapacityError> {
    exchange(Path::Plain, server, port, vips, timeout).await
}

async fn exchange(
    path: Path,
    server: IpAddr,
    port: u16,
    vips: &[VipKey],
    timeout: Duration,
) -> Result<ProbeOutcome, CapacityError> {
    let src = source_address(server)?;
    let socket = UdpSocket::bind((src, 0))
        .await
        .map_err(io_err("reply socket: bind"))?;
    let local = socket
        .local_addr()
        .map_err(io_err("reply socket: getsockname"))?;
    let dst = SocketAddr::new(server, port);
    let start = Instant::now();
    let deadline = tokio::time::Instant::from_std(start) + timeout;

    // nonce -> (index of the chunk's first VIP, VIPs in the chunk)
    let mut pending: HashMap<u64, (usize, usize)> = HashMap::new();
    let chunks: Vec<&[VipKey]> = if vips.is_empty() {
        // An empty list still asks: the answer proves the tunnel and the endpoint work.
        vec![&[]]
    } else {
        vips.chunks(MAX_VIPS_PER_REQUEST).collect()
    };
    let mut first = 0;
    for chunk in chunks {
        let mut nonce = random_nonce();
        while pending.contains_key(&nonce) {
            nonce = nonce.wrapping_add(1);
        }
        let payload = Request {
            nonce,
            vips: chunk.to_vec(),
        }
        .encode()?;
        match path {
            Path::Tunnel => send_tunnelled(server, &build_inner_udp(local, dst, &payload)?)?,
            Path::Plain => {
                socket
                    .send_to(&payload, dst)
                    .await
                    .map_err(io_err("request send"))?;
            }
        }
        pending.insert(nonce, (first, chunk.len()));
        first += chunk.len();
    }

    let mut shares = vec![None; vips.len()];
    let mut ignored = 0;
    let mut buf = vec![0u8; MAX_DATAGRAM + 1];
    while !pending.is_empty() {
        let (len, _peer) = match tokio::time::timeout_at(deadline, socket.recv_from(&mut buf)).await
        {
            Err(_elapsed) => return Err(CapacityError::Timeout(timeout)),
            Ok(Err(e)) => {
                return Err(CapacityError::Io {
                    what: "reply receive",
                    source: e,
                });
            }
            Ok(Ok(r)) => r,
        };
        let Ok(reply) = Reply::decode(&buf[..len]) else {
            ignored += 1;
            continue;
        };
        match pending.get(&reply.nonce) {
            Some(&(at, n)) if reply.shares.len() == n => {
                pending.remove(&reply.nonce);
                for (slot, bp) in shares[at..at + n].iter_mut().zip(reply.shares) {
                    *slot = bp.map(bp_to_share);
                }
            }
            _ => ignored += 1,
        }
    }
    Ok(ProbeOutcome {
        shares,
        rtt: start.elapsed(),
        ignored,
    })
}

// ---------------------------------------------------------------------------------------------
// The per-region task
// ---------------------------------------------------------------------------------------------

/// What [`spawn_region_prober`] probes, and how often.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionProbeConfig {
    /// The region's name, copied into every report.
    pub region: String,
    /// The remote region's xlb host: where the traffic is encapsulated to.
    pub tunnel: IpAddr,
    /// Its capacity endpoint's port ([`DEFAULT_PORT`] by default).
    pub port: u16,
    /// Time between the starts of two probes.
    pub interval: Duration,
    /// How long one probe waits for its replies.
    pub timeout: Duration,
    /// Passed probes in a row that bring a down region up.
    pub rise: u8,
    /// Failed probes in a row that take an up region down.
    pub fall: u8,
    /// Whether the region starts up (as backends do, see [`HealthState`]) or down (it must
    /// pass `rise` probes before it takes traffic).
    pub start_up: bool,
}

/// One VIP's healthy share in a remote region, as a [`RegionReport`] gives it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VipShare {
    /// The VIP.
    pub vip: VipKey,
    /// Whether the remote host knows the VIP (as of the latest reply that included it).
    pub known: bool,
    /// Healthy share, 0.0..=1.0; 0.0 when the VIP is unknown or the region is down.
    pub share: f64,
}

/// The result of one probe of a region, sent after every probe.
#[derive(Debug, Clone, PartialEq)]
pub struct RegionReport {
    /// [`RegionProbeConfig::region`].
    pub region: String,
    /// The region's state after this probe, rise/fall applied.
    pub up: bool,
    /// Set when this probe changed the state.
    pub transition: Option<Transition>,
    /// Whether this one probe succeeded.
    pub probe_ok: bool,
    /// Per VIP of the current list, in its order. While the region is up but a probe failed
    /// (fewer than `fall` in a row) the last successful probe's shares stand.
    pub shares: Vec<VipShare>,
    /// `"ok"`, or why the probe failed, e.g. `"timeout after 500ms"`.
    pub detail: String,
    /// The probe's round-trip time when it succeeded.
    pub rtt: Option<Duration>,
}

/// Probes one remote region every `config.interval` through the tunnel ([`probe`]) for the VIPs
/// currently in `vips` (the agent sends a new list on reload), applies rise/fall with
/// [`HealthState`], and sends a [`RegionReport`] on `tx` after every probe. Runs until the
/// returned handle is aborted or `tx`'s receiver is dropped. Must be called inside a tokio
/// runtime; needs CAP_NET_RAW (as [`probe`]).
pub fn spawn_region_prober(
    config: RegionProbeConfig,
    vips: watch::Receiver<Vec<VipKey>>,
    tx: mpsc::Sender<RegionReport>,
) -> JoinHandle<()> {
    tokio::spawn(run_region_prober(config, vips, tx, Path::Tunnel))
}

async fn run_region_prober(
    config: RegionProbeConfig,
    vips: watch::Receiver<Vec<VipKey>>,
    tx: mpsc::Sender<RegionReport>,
    path: Path,
) {
    let mut state = if config.start_up {
        HealthState::new(config.rise, config.fall)
    } else {
        HealthState::down(config.rise, config.fall)
    };
    // The last successful probe's answer per VIP: (known, share).
    let mut last: HashMap<VipKey, (bool, f64)> = HashMap::new();
    let mut ticker = tokio::time::interval(config.interval.max(Duration::from_millis(1)));
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let list = vips.borrow().clone();
        let result = exchange(path, config.tunnel, config.port, &list, config.timeout).await;
        let probe_ok = result.is_ok();
        let transition = state.record(probe_ok, Instant::now());
        let (detail, rtt) = match result {
            Ok(outcome) => {
                last = list
                    .iter()
                    .zip(&outcome.shares)
                    .map(|(k, s)| (*k, (s.is_some(), s.unwrap_or(0.0))))
                    .collect();
                ("ok".to_owned(), Some(outcome.rtt))
            }
            Err(e) => (e.to_string(), None),
        };
        let up = state.is_up();
        let shares = list
            .iter()
            .map(|k| {
                let (known, share) = last.get(k).copied().unwrap_or((false, 0.0));
                VipShare {
                    vip: *k,
                    known,
                    share: if up { share } else { 0.0 },
                }
            })
            .collect();
        let report = RegionReport {
            region: config.region.clone(),
            up,
            transition,
            probe_ok,
            shares,
            detail,
            rtt,
        };
        if tx.send(report).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use etherparse::{NetSlice, SlicedPacket, TransportSlice};

    use super::*;

    fn key4(a: [u8; 4], port: u16, proto: u8) -> VipKey {
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&a);
        VipKey {
            addr,
            port_be: port.to_be(),
            proto,
            family: FAMILY_V4,
        }
    }

    fn key6(a: Ipv6Addr, port: u16, proto: u8) -> VipKey {
        VipKey {
            addr: a.octets(),
            port_be: port.to_be(),
            proto,
            family: FAMILY_V6,
        }
    }

    fn sample_vips(n: usize) -> Vec<VipKey> {
        (0..n)
            .map(|i| {
                if i % 2 == 0 {
                    key4([203, 0, 113, i as u8], 80 + i as u16, proto::TCP)
                } else {
                    key6(
                        Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, i as u16),
                        443,
                        proto::UDP,
                    )
                }
            })
            .collect()
    }

    /// A small deterministic generator (xorshift), so "random" tests are reproducible.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    #[test]
    fn request_round_trips_and_the_port_is_in_network_order() {
        for n in [0, 1, 2, 63, 64] {
            let req = Request {
                nonce: 0x0102_0304_0506_0708,
                vips: sample_vips(n),
            };
            let bytes = req.encode().unwrap();
            assert_eq!(bytes.len(), 16 + 20 * n);
            assert!(bytes.len() <= MAX_DATAGRAM);
            assert_eq!(Request::decode(&bytes).unwrap(), req);
        }
        let bytes = Request {
            nonce: 1,
            vips: vec![key4([10, 0, 0, 1], 8080, proto::TCP)],
        }
        .encode()
        .unwrap();
        assert_eq!(&bytes[..8], b"XLBC\x01\x01\x00\x01");
        assert_eq!(&bytes[8..16], &1u64.to_be_bytes());
        assert_eq!(&bytes[16..20], &[10, 0, 0, 1]);
        assert_eq!(&bytes[32..34], &8080u16.to_be_bytes());
        assert_eq!(&bytes[34..36], &[proto::TCP, FAMILY_V4]);
    }

    #[test]
    fn reply_round_trips() {
        for n in [0, 1, 3, 64] {
            let reply = Reply {
                nonce: u64::MAX,
                shares: (0..n)
                    .map(|i| (i % 3 != 0).then_some((i * 157 % 10_001) as u16))
                    .collect(),
            };
            let bytes = reply.encode().unwrap();
            assert_eq!(bytes.len(), 16 + 4 * n);
            assert_eq!(Reply::decode(&bytes).unwrap(), reply);
        }
    }

    #[test]
    fn too_many_vips_are_refused_when_encoding() {
        let req = Request {
            nonce: 0,
            vips: sample_vips(65),
        };
        assert!(matches!(req.encode(), Err(CapacityError::TooLarge(65))));
    }

    #[test]
    fn every_truncation_is_rejected() {
        let req = Request {
            nonce: 7,
            vips: sample_vips(5),
        }
        .encode()
        .unwrap();
        for len in 0..req.len() {
            assert!(
                Request::decode(&req[..len]).is_err(),
                "request cut at {len}"
            );
        }
        let rep = Reply {
            nonce: 7,
            shares: vec![Some(1), None, Some(10_000)],
        }
        .encode()
        .unwrap();
        for len in 0..rep.len() {
            assert!(Reply::decode(&rep[..len]).is_err(), "reply cut at {len}");
        }
        // Trailing bytes too.
        let mut long = req.clone();
        long.push(0);
        assert!(Request::decode(&long).is_err());
    }

    #[test]
    fn wrong_magic_version_kind_and_counts_are_rejected() {
        let req = Request {
            nonce: 7,
            vips: sample_vips(2),
        }
        .encode()
        .unwrap();
        let mut bad = req.clone();
        bad[0] = b'Y';
        assert_eq!(Request::decode(&bad), Err(DecodeError::Magic));
        let mut bad = req.clone();
        bad[4] = 2;
        assert_eq!(Request::decode(&bad), Err(DecodeError::Version(2)));
        // A request is not a reply and the other way round.
        assert_eq!(Reply::decode(&req), Err(DecodeError::Kind(1)));
        let mut bad = req.clone();
        bad[6..8].copy_from_slice(&3u16.to_be_bytes());
        assert!(matches!(
            Request::decode(&bad),
            Err(DecodeError::Length { count: 3, .. })
        ));
        let mut bad = req.clone();
        bad[6..8].copy_from_slice(&u16::MAX.to_be_bytes());
        assert_eq!(Request::decode(&bad), Err(DecodeError::Count(65535)));
        let mut bad = req.clone();
        bad[16 + 19] = 5;
        assert_eq!(Request::decode(&bad), Err(DecodeError::Family(0)));
        let big = vec![0u8; MAX_DATAGRAM + 1];
        assert_eq!(
            Request::decode(&big),
            Err(DecodeError::Long(MAX_DATAGRAM + 1))
        );

        let rep = Reply {
            nonce: 1,
            shares: vec![Some(5)],
        }
        .encode()
        .unwrap();
        for (at, value) in [(16, 3u8), (17, 1), (18, 0x28)] {
            // Unknown flag, nonzero reserved byte, share 0x2805 = 10245 > 10000.
            let mut bad = rep.clone();
            bad[at] = value;
            assert_eq!(Reply::decode(&bad), Err(DecodeError::Entry(0)), "{at}");
        }
        let mut unknown_with_share = rep.clone();
        unknown_with_share[16] = 0;
        assert_eq!(
            Reply::decode(&unknown_with_share),
            Err(DecodeError::Entry(0))
        );
    }

    #[test]
    fn random_bytes_never_panic_and_are_counted() {
        let stats = ServerStats::default();
        let answer = |_: &VipKey| Some(0.5);
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let valid = Request {
            nonce: 3,
            vips: sample_vips(4),
        }
        .encode()
        .unwrap();
        let mut malformed = 0;
        for round in 0..20_000 {
            let buf: Vec<u8> = if round % 2 == 0 {
                let len = (rng.next() % 1500) as usize;
                (0..len).map(|_| rng.next() as u8).collect()
            } else {
                // Mutations of a valid request: a few random bytes flipped, sometimes cut.
                let mut b = valid.clone();
                for _ in 0..(1 + rng.next() % 3) {
                    let i = (rng.next() as usize) % b.len();
                    b[i] = rng.next() as u8;
                }
                if rng.next().is_multiple_of(4) {
                    b.truncate((rng.next() as usize) % (b.len() + 1));
                }
                b
            };
            let _ = Reply::decode(&buf);
            if answer_datagram(&buf, &answer, &stats).is_none() {
                malformed += 1;
            }
        }
        assert_eq!(stats.malformed.load(Ordering::Relaxed), malformed);
        assert!(malformed > 10_000, "{malformed}");
    }

    #[test]
    fn answers_carry_the_nonce_and_each_vips_share() {
        let vips = sample_vips(3);
        let known = vips[0];
        let answer = move |k: &VipKey| (*k == known).then_some(0.25);
        let stats = ServerStats::default();
        let req = Request {
            nonce: 99,
            vips: vips.clone(),
        }
        .encode()
        .unwrap();
        let reply = Reply::decode(&answer_datagram(&req, &answer, &stats).unwrap()).unwrap();
        assert_eq!(reply.nonce, 99);
        assert_eq!(reply.shares, vec![Some(2500), None, None]);
        assert_eq!(stats.requests.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn shares_convert_to_basis_points_and_back() {
        assert_eq!(share_to_bp(0.0), 0);
        assert_eq!(share_to_bp(1.0), 10_000);
        assert_eq!(share_to_bp(0.12345), 1235);
        assert_eq!(share_to_bp(-1.0), 0);
        assert_eq!(share_to_bp(7.0), 10_000);
        assert_eq!(share_to_bp(f64::NAN), 0);
        assert_eq!(share_to_bp(f64::INFINITY), 10_000);
        assert_eq!(bp_to_share(5000), 0.5);
        assert_eq!(bp_to_share(60_000), 1.0);
    }

    fn check_udp(packet: &[u8], src: SocketAddr, dst: SocketAddr, payload: &[u8]) {
        let sliced = SlicedPacket::from_ip(packet).expect("etherparse parses the packet");
        match (&sliced.net, src.ip(), dst.ip()) {
            (Some(NetSlice::Ipv4(ip)), IpAddr::V4(s), IpAddr::V4(d)) => {
                let h = ip.header();
                assert_eq!(h.source_addr(), s);
                assert_eq!(h.destination_addr(), d);
                assert_eq!(usize::from(h.total_len()), packet.len());
                assert!(h.dont_fragment());
                // The header checksum: recomputed by etherparse, compared with ours.
                let header = h.to_header();
                assert_eq!(header.calc_header_checksum(), header.header_checksum);
            }
            (Some(NetSlice::Ipv6(ip)), IpAddr::V6(s), IpAddr::V6(d)) => {
                let h = ip.header();
                assert_eq!(h.source_addr(), s);
                assert_eq!(h.destination_addr(), d);
                assert_eq!(usize::from(h.payload_length()) + 40, packet.len());
            }
            other => panic!("unexpected network layer {other:?}"),
        }
        let Some(TransportSlice::Udp(udp)) = &sliced.transport else {
            panic!("no udp");
        };
        assert_eq!(udp.source_port(), src.port());
        assert_eq!(udp.destination_port(), dst.port());
        assert_eq!(udp.payload(), payload);
        let header = udp.to_header();
        let expected = match (src.ip(), dst.ip()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => header
                .calc_checksum_ipv4_raw(s.octets(), d.octets(), payload)
                .unwrap(),
            (IpAddr::V6(s), IpAddr::V6(d)) => header
                .calc_checksum_ipv6_raw(s.octets(), d.octets(), payload)
                .unwrap(),
            _ => unreachable!(),
        };
        assert_ne!(header.checksum, 0, "a checksum is always sent");
        assert_eq!(header.checksum, expected, "udp checksum");
    }

    #[test]
    fn inner_packets_have_correct_headers_and_checksums() {
        let mut rng = Rng(12345);
        for n in [0, 1, 17, 64] {
            let payload = Request {
                nonce: rng.next(),
                vips: sample_vips(n),
            }
            .encode()
            .unwrap();
            for odd in [false, true] {
                // An odd-length payload exercises the checksum's last-byte padding.
                let payload = if odd {
                    &payload[..payload.len() - 1]
                } else {
                    &payload[..]
                };
                let src4 = SocketAddr::new(Ipv4Addr::new(10, 1, 2, 3).into(), 40000 + n as u16);
                let dst4 = SocketAddr::new(Ipv4Addr::new(192, 0, 2, 200).into(), DEFAULT_PORT);
                let p = build_inner_udp(src4, dst4, payload).unwrap();
                assert_eq!(p.len(), 20 + 8 + payload.len());
                check_udp(&p, src4, dst4, payload);

                let src6 = SocketAddr::new("fd00:1::1".parse().unwrap(), 51234);
                let dst6 = SocketAddr::new("2001:db8:ffff::9".parse().unwrap(), DEFAULT_PORT);
                let p = build_inner_udp(src6, dst6, payload).unwrap();
                assert_eq!(p.len(), 40 + 8 + payload.len());
                check_udp(&p, src6, dst6, payload);
                // The largest request, in IPv6, in IPv6: under a 1500-byte MTU.
                assert!(p.len() + 40 <= 1500);
            }
        }
        let err = build_inner_udp(
            "10.0.0.1:1".parse().unwrap(),
            "[::1]:2".parse().unwrap(),
            b"",
        );
        assert!(matches!(err, Err(CapacityError::Family { .. })));
    }

    #[test]
    fn a_checksum_of_zero_is_sent_as_all_ones() {
        // Search a payload whose checksum folds to zero: the sender must send 0xffff.
        let src: SocketAddr = "10.0.0.1:1000".parse().unwrap();
        let dst: SocketAddr = "10.0.0.2:2000".parse().unwrap();
        let found = (0..=u16::MAX).find_map(|w| {
            let payload = w.to_be_bytes();
            let p = build_inner_udp(src, dst, &payload).unwrap();
            (p[26..28] == [0xff, 0xff]).then_some(payload)
        });
        let payload = found.expect("some two-byte payload sums to zero");
        let p = build_inner_udp(src, dst, &payload).unwrap();
        check_udp(&p, src, dst, &payload);
    }

    #[tokio::test]
    async fn plain_queries_are_answered_over_loopback_in_order_and_in_chunks() {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let port = socket.local_addr().unwrap().port();
        let vips = sample_vips(150);
        let odd: Vec<VipKey> = vips.iter().copied().step_by(2).collect();
        let stats = Arc::new(ServerStats::default());
        let server = tokio::spawn(serve(
            socket,
            move |k| {
                odd.contains(k)
                    .then(|| f64::from(u16::from_be(k.port_be)) / 1000.0)
            },
            stats.clone(),
        ));
        let out = query_plain(
            Ipv4Addr::LOCALHOST.into(),
            port,
            &vips,
            Duration::from_secs(2),
        )
        .await
        .unwrap();
        assert_eq!(out.shares.len(), 150);
        for (i, (k, s)) in vips.iter().zip(&out.shares).enumerate() {
            if i % 2 == 0 {
                let expected = f64::from(u16::from_be(k.port_be)) / 1000.0;
                assert!((s.unwrap() - expected.min(1.0)).abs() < 1e-4, "{i}: {s:?}");
            } else {
                assert_eq!(*s, None, "{i}");
            }
        }
        // 150 VIPs: three requests of at most 64.
        assert_eq!(stats.requests.load(Ordering::Relaxed), 3);
        // An empty list is still one request.
        let out = query_plain(
            Ipv4Addr::LOCALHOST.into(),
            port,
            &[],
            Duration::from_secs(2),
        )
        .await
        .unwrap();
        assert!(out.shares.is_empty());
        assert_eq!(stats.requests.load(Ordering::Relaxed), 4);
        server.abort();
    }

    #[tokio::test]
    async fn a_silent_endpoint_times_out() {
        // A bound socket that never answers.
        let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let port = silent.local_addr().unwrap().port();
        let err = query_plain(
            Ipv4Addr::LOCALHOST.into(),
            port,
            &sample_vips(1),
            Duration::from_millis(100),
        )
        .await
        .unwrap_err();
        assert_eq!(err.to_string(), "timeout after 100ms");
    }

    #[tokio::test]
    async fn the_dual_stack_endpoint_answers_ipv4_and_ipv6() {
        // Port 0: any free port, the same for both families on one socket.
        let socket = bind_server(0).unwrap();
        let port = socket.local_addr().unwrap().port();
        let stats = Arc::new(ServerStats::default());
        let server = tokio::spawn(serve(socket, |_| Some(1.0), stats.clone()));
        for addr in [
            IpAddr::from(Ipv4Addr::LOCALHOST),
            Ipv6Addr::LOCALHOST.into(),
        ] {
            match query_plain(addr, port, &sample_vips(1), Duration::from_secs(2)).await {
                Ok(out) => assert_eq!(out.shares, vec![Some(1.0)]),
                // A sandbox without IPv6 on loopback: only IPv4 is required.
                Err(e) if addr.is_ipv6() => eprintln!("no IPv6 loopback here: {e}"),
                Err(e) => panic!("{addr}: {e}"),
            }
        }
        server.abort();
    }

    async fn next_report(rx: &mut mpsc::Receiver<RegionReport>) -> RegionReport {
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("a report within 5 s")
            .expect("the prober is running")
    }

    #[tokio::test]
    async fn the_region_task_applies_rise_and_fall_follows_the_vip_list_and_stops() {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let port = socket.local_addr().unwrap().port();
        let vips = sample_vips(2);
        let known = vips[0];
        let server = tokio::spawn(serve(
            socket,
            move |k| (*k == known).then_some(0.5),
            Arc::new(ServerStats::default()),
        ));
        let config = RegionProbeConfig {
            region: "eu".to_owned(),
            tunnel: Ipv4Addr::LOCALHOST.into(),
            port,
            interval: Duration::from_millis(30),
            timeout: Duration::from_millis(100),
            rise: 2,
            fall: 2,
            start_up: false,
        };
        let (vips_tx, vips_rx) = watch::channel(vips.clone());
        let (tx, mut rx) = mpsc::channel(8);
        let task = tokio::spawn(run_region_prober(config, vips_rx, tx, Path::Plain));

        // Starts down: the first passed probe is not enough (rise 2), shares 0 while down.
        let r = next_report(&mut rx).await;
        assert_eq!((r.region.as_str(), r.up, r.probe_ok), ("eu", false, true));
        assert_eq!(r.detail, "ok");
        assert!(r.rtt.is_some());
        assert_eq!(r.shares[0].share, 0.0);
        let r = next_report(&mut rx).await;
        assert_eq!((r.up, r.transition), (true, Some(Transition::Up)));
        let shares: Vec<_> = r.shares.iter().map(|s| (s.vip, s.known, s.share)).collect();
        assert_eq!(shares, vec![(vips[0], true, 0.5), (vips[1], false, 0.0)]);

        // A new VIP list (a reload) is used from the next probe on, in its order.
        vips_tx.send(vec![vips[1], vips[0]]).unwrap();
        let r = loop {
            let r = next_report(&mut rx).await;
            if r.shares.first().map(|s| s.vip) == Some(vips[1]) {
                break r;
            }
        };
        let shares: Vec<_> = r.shares.iter().map(|s| (s.vip, s.known, s.share)).collect();
        assert_eq!(shares, vec![(vips[1], false, 0.0), (vips[0], true, 0.5)]);

        // The endpoint goes away: one failure keeps the region up with the last shares, the
        // second (fall 2) takes it down with every share 0.
        server.abort();
        let _ = server.await;
        let r = loop {
            let r = next_report(&mut rx).await;
            if !r.probe_ok {
                break r;
            }
        };
        assert!(r.up);
        assert_eq!(r.detail, "timeout after 100ms");
        assert_eq!(r.shares[1].share, 0.5, "last good shares stand while up");
        let r = next_report(&mut rx).await;
        assert_eq!((r.up, r.transition), (false, Some(Transition::Down)));
        assert!(r.shares.iter().all(|s| s.share == 0.0));

        // Dropping the receiver stops the task.
        drop(rx);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the task ends once nobody listens")
            .unwrap();
    }
}
