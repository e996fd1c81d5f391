//! A userspace model of the XDP balancer's decision: "which backend gets this flow?" and "what
//! does the balancer do with this frame?", over the same data the maps hold.
//!
//! Pure: no aya, no I/O, no kernel. It is written independently of the eBPF code (its own
//! parser over byte slices with explicit bounds checks) and shares only the documented contract
//! with it: the map types, the flow hash and [`EMPTY_SLOT`](crate::maglev::EMPTY_SLOT)-style
//! table semantics. The differential test (`tests/tests/differential.rs`) runs thousands of
//! frames through both and requires them to agree, so each is a check on the other; an
//! operator tool can call [`SimState::backend_for`] to answer "where does this flow go?".
//!
//! The behaviour modelled, in the order the balancer applies it:
//!
//! 1. **Layer 2.** A frame must hold the Ethernet header (else [`Reason::L2Truncated`], drop);
//!    up to two VLAN tags (802.1Q `0x8100` / 802.1ad `0x88a8`) are skipped, a truncated tag is
//!    dropped the same way, a third tag is passed ([`Reason::VlanTooMany`]), and an EtherType
//!    other than IPv4 / IPv6 is passed ([`Reason::NonIp`]).
//! 2. **Layer 3** ([`Reason::Malformed`], drop). IPv4: 20 header bytes in the frame, version 4,
//!    IHL >= 5, total length >= IHL * 4 and within the frame. IPv6: 40 header bytes, version 6,
//!    payload within the frame; hop-by-hop, routing and destination-options headers
//!    (`(len + 1) * 8` bytes), AH (`(len + 2) * 4`) and fragment headers (8) are walked, at
//!    most [`MAX_IPV6_EXT`] of them, each must end inside the payload. Fragment fields: IPv4
//!    offset != 0 (or an IPv6 fragment header with offset != 0) makes a *later fragment*;
//!    MF or a non-zero offset (or any IPv6 fragment header) makes the packet *fragmented*.
//!    The walk goes on past a fragment header, also in later fragments (as the XDP program's
//!    does), and the last next-header is the packet's protocol.
//! 3. **Layer 4** ([`Reason::L4Truncated`], drop), except for later fragments, which are never
//!    read past the IP header: TCP needs 20 bytes, UDP 8, ICMP (in IPv4) / ICMPv6 (in IPv6) 8,
//!    inside both the frame and the IP packet. ICMP is protocol 1 in IPv4 and 58 in IPv6 only:
//!    the other family's number is an ordinary protocol without a VIP.
//! 4. **Later fragments** follow the fragment-table record of their datagram (source,
//!    destination, identification, protocol, family) to its backend ([`Reason::FragFollow`];
//!    dropped as [`Reason::NoBackend`] if that backend is no longer usable); without a record
//!    they are dropped if their destination address has an L4 VIP ([`Reason::FragUnknown`]) and
//!    passed otherwise.
//! 5. **ICMP** (unfragmented, to an address that has any VIP; otherwise passed): echo requests
//!    (v4 type 8 / v6 type 128, code 0) are answered ([`Reason::EchoReply`], Tx); errors (v4
//!    types 3, 11; v6 types 1, 2, 3) whose quote is shorter than an IP header + 8 bytes (v4) or
//!    48 bytes (v6) are dropped ([`Reason::IcmpQuoteShort`]); errors quoting a TCP or UDP packet
//!    are handled as a packet of the quoted flow, reversed (client -> VIP), without creating
//!    connection-table state ([`Reason::IcmpErrorForwarded`]); everything else is passed.
//! 6. **VIP lookup** by (address, port, protocol), then (address, 0, protocol): none is
//!    [`Reason::NotVip`] (pass), an L7 VIP is [`Reason::L7`] (pass).
//! 7. **Selection.** Unless the packet is a TCP SYN without ACK, a connection-table entry whose
//!    backend exists and is up decides (even if the backend is no longer in the VIP's table:
//!    drained backends keep their flows). Otherwise the backend is the VIP's Maglev slot
//!    `flow_hash(flow) % table_size`; a missing table is [`Reason::NoTable`], an empty or down
//!    slot [`Reason::NoBackend`] (both drop). A selection from the table is remembered in the
//!    connection table (data packets only). A first fragment's choice is recorded in the
//!    fragment table.
//! 8. **Sending.** An L2-DSR VIP's packets go to the backend's MAC. Otherwise, if
//!    `egress_mtu != 0` and the IP length plus the outer header (20 bytes for an IPv4 backend,
//!    40 for IPv6) exceeds it, IPv4 without DF is dropped ([`Reason::TooBigDrop`]) and anything
//!    else is answered with an ICMP too-big ([`Reason::TooBigIcmp`], Tx, no backend); else the
//!    packet is encapsulated to the backend ([`Reason::Forwarded`] and the other forwarding
//!    reasons, Tx).

use std::collections::HashMap;

use lb_common::{
    flow::flow_hash,
    types::{
        BACKEND_F_UP, Backend, FAMILY_V4, FAMILY_V6, Family, FlowKey, FragKey, FragValue, LbConfig,
        LocalAddr, VIP_ADDR_F_L4, VIP_ADDR_F_L7, VIP_F_DSR_L2, VIP_F_L7, VipKey, VipMeta, proto,
    },
};

/// Largest offset in the frame the balancer reads at: a header starting beyond it counts as
/// absent, whatever the frame length (the XDP reader bounds offsets this way for the verifier).
pub const MAX_READ_OFFSET: usize = 2048;

/// Most IPv6 extension headers walked; a longer chain is malformed.
pub const MAX_IPV6_EXT: usize = 8;

/// Longest quote of an ICMPv6 packet-too-big reply (1280 - 40 - 8 bytes): the balancer quotes
/// this much of the packet at most.
pub const MAX_V6_TOO_BIG_QUOTE: usize = 1232;

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const ETHERTYPE_VLAN: u16 = 0x8100;
const ETHERTYPE_QINQ: u16 = 0x88a8;

const EXT_HOP_BY_HOP: u8 = 0;
const EXT_ROUTING: u8 = 43;
const EXT_FRAGMENT: u8 = 44;
const EXT_AH: u8 = 51;
const EXT_DEST_OPTS: u8 = 60;

const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_ACK: u8 = 0x10;

/// What the balancer does with a frame: the XDP action.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Handed to the host stack unchanged (`XDP_PASS`).
    Pass,
    /// Dropped (`XDP_DROP`).
    Drop,
    /// Sent back out of the interface (`XDP_TX`): forwarded to a backend, or a reply the balancer
    /// wrote itself (echo reply, ICMP too-big).
    Tx,
}

/// Which path of the balancer decided: one per pass/drop reason and per kind of transmission.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// The frame ends inside the Ethernet header or a VLAN tag (drop).
    L2Truncated,
    /// More than two VLAN tags (pass).
    VlanTooMany,
    /// EtherType neither IPv4 nor IPv6 (pass).
    NonIp,
    /// A malformed or truncated IP header or IPv6 extension chain (drop).
    Malformed,
    /// A TCP, UDP or ICMP header cut short by the frame or the IP length (drop).
    L4Truncated,
    /// No VIP matches (pass). Also ICMP that is neither an echo request nor an error about a VIP
    /// flow, and later fragments to addresses without an L4 VIP.
    NotVip,
    /// The VIP is in L7 mode (pass).
    L7,
    /// The VIP has no usable backend for the packet, or a later fragment's recorded backend is
    /// gone or down (drop).
    NoBackend,
    /// The VIP's Maglev table is missing (drop).
    NoTable,
    /// Too big for the egress MTU once encapsulated: answered with ICMP frag-needed / ICMPv6
    /// packet-too-big (Tx, no backend).
    TooBigIcmp,
    /// Too big for the egress MTU, IPv4 without DF (or no room for the quote): dropped.
    TooBigDrop,
    /// An ICMP / ICMPv6 echo request to a VIP address, answered by the balancer (Tx).
    EchoReply,
    /// An ICMP error about a VIP flow, forwarded to that flow's backend (Tx).
    IcmpErrorForwarded,
    /// An ICMP error whose quote is too short to name a flow (drop).
    IcmpQuoteShort,
    /// A later fragment that followed its datagram's first fragment (Tx).
    FragFollow,
    /// A later fragment to an L4 VIP address whose first fragment is unknown (drop).
    FragUnknown,
    /// A packet forwarded to its flow's backend (Tx).
    Forwarded,
}

/// The balancer's decision about one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// The XDP action.
    pub action: Action,
    /// The backend id the frame is sent to, for forwarded frames (encapsulated or L2 DSR);
    /// `None` for everything else, including replies the balancer writes itself.
    pub backend: Option<u32>,
    /// The path that decided.
    pub reason: Reason,
    /// The packet's own flow as parsed (ports zero for protocols without ports and for later
    /// fragments); `None` if parsing stopped before the IP header was accepted.
    pub key: Option<FlowKey>,
}

impl Verdict {
    fn stop(action: Action, reason: Reason) -> Verdict {
        Verdict {
            action,
            backend: None,
            reason,
            key: None,
        }
    }
}

/// The data the balancer's maps hold, plus models of its two learned tables (connection and
/// fragment tracking). Mutate it only through its methods, as the agent mutates maps only
/// through the typed map layer, so the derived VIP-address flags stay consistent.
#[derive(Debug, Clone, Default)]
pub struct SimState {
    config: LbConfig,
    vips: HashMap<VipKey, VipMeta>,
    tables: HashMap<u32, Vec<u32>>,
    backends: HashMap<u32, Backend>,
    vip_addrs: HashMap<LocalAddr, u32>,
    flows: HashMap<FlowKey, u32>,
    frags: HashMap<FragKey, FragValue>,
}

impl SimState {
    /// An empty balancer with `config`: no VIPs, backends, tables, flows or fragments.
    pub fn new(config: LbConfig) -> SimState {
        SimState {
            config,
            ..SimState::default()
        }
    }

    /// The balancer-wide settings.
    pub fn config(&self) -> &LbConfig {
        &self.config
    }

    /// Replaces the balancer-wide settings.
    pub fn set_config(&mut self, config: LbConfig) {
        self.config = config;
    }

    /// Writes backend `id` (as `set_backend` of the map layer; `family == 0` frees the id).
    pub fn set_backend(&mut self, id: u32, backend: Backend) {
        self.backends.insert(id, backend);
    }

    /// Backend `id` as written, if any.
    pub fn backend(&self, id: u32) -> Option<&Backend> {
        self.backends.get(&id)
    }

    /// Writes the Maglev table at outer-map index `index`.
    pub fn set_table(&mut self, index: u32, table: Vec<u32>) {
        self.tables.insert(index, table);
    }

    /// The Maglev table at outer-map index `index`, if any.
    pub fn table(&self, index: u32) -> Option<&[u32]> {
        self.tables.get(&index).map(Vec::as_slice)
    }

    /// Removes the Maglev table at `index` (a VIP still pointing at it drops its new flows).
    pub fn remove_table(&mut self, index: u32) {
        self.tables.remove(&index);
    }

    /// Writes a VIP entry and refreshes its address's flags, without touching tables.
    pub fn set_vip_meta(&mut self, key: VipKey, meta: VipMeta) {
        self.vips.insert(key, meta);
        self.refresh_vip_addr(&key);
    }

    /// Publishes a VIP: `table` at `meta.table_index`, then the VIP entry `meta` (as the map
    /// layer's `publish_vip` leaves them; pass the meta it returned so table indexes match).
    pub fn set_vip(&mut self, key: VipKey, meta: VipMeta, table: Vec<u32>) {
        self.set_table(meta.table_index, table);
        self.set_vip_meta(key, meta);
    }

    /// Removes a VIP (its table stays, as in the outer map) and refreshes its address's flags.
    pub fn remove_vip(&mut self, key: &VipKey) {
        self.vips.remove(key);
        self.refresh_vip_addr(key);
    }

    /// The live entry of a VIP.
    pub fn vip(&self, key: &VipKey) -> Option<VipMeta> {
        self.vips.get(key).copied()
    }

    /// The `VIP_ADDR_F_*` flags of an address (0: no VIP there).
    pub fn vip_addr_flags(&self, addr: &[u8; 16], family: Family) -> u32 {
        let key = LocalAddr {
            addr: *addr,
            family,
            _pad: [0; 3],
        };
        self.vip_addrs.get(&key).copied().unwrap_or(0)
    }

    /// The modelled connection table: flow -> backend id.
    pub fn flows(&self) -> &HashMap<FlowKey, u32> {
        &self.flows
    }

    /// The modelled fragment table: datagram -> where its first fragment went.
    pub fn fragments(&self) -> &HashMap<FragKey, FragValue> {
        &self.frags
    }

    /// Empties the modelled connection table.
    pub fn clear_flows(&mut self) {
        self.flows.clear();
    }

    /// Empties the modelled fragment table.
    pub fn clear_fragments(&mut self) {
        self.frags.clear();
    }

    /// Recomputes the flags of `key`'s address from every VIP on it, as the map layer does
    /// after each VIP change: L7 if any VIP there is L7, L4 if any is not.
    fn refresh_vip_addr(&mut self, key: &VipKey) {
        let flags = self
            .vips
            .iter()
            .filter(|(k, _)| k.addr == key.addr && k.family == key.family)
            .fold(0, |acc, (_, meta)| {
                acc | if meta.flags & VIP_F_L7 != 0 {
                    VIP_ADDR_F_L7
                } else {
                    VIP_ADDR_F_L4
                }
            });
        let addr = LocalAddr {
            addr: key.addr,
            family: key.family,
            _pad: [0; 3],
        };
        if flags == 0 {
            self.vip_addrs.remove(&addr);
        } else {
            self.vip_addrs.insert(addr, flags);
        }
    }

    /// The VIP a flow is addressed to: exact port first, then the VIP taking every port.
    fn lookup_vip(&self, flow: &FlowKey) -> Option<VipMeta> {
        let mut key = VipKey {
            addr: flow.dst,
            port_be: flow.dport_be,
            proto: flow.proto,
            family: flow.family,
        };
        if let Some(meta) = self.vips.get(&key) {
            return Some(*meta);
        }
        key.port_be = 0;
        self.vips.get(&key).copied()
    }

    /// Backend `id` if it exists (non-zero family) and is up.
    fn usable(&self, id: u32) -> Option<&Backend> {
        self.backends
            .get(&id)
            .filter(|b| b.family != 0 && b.flags & BACKEND_F_UP != 0)
    }

    /// Which backend the VIP's Maglev table gives `flow`, if it is usable.
    fn maglev_choice(&self, flow: &FlowKey, vip: &VipMeta) -> Result<u32, Reason> {
        if vip.table_size == 0 {
            return Err(Reason::NoBackend);
        }
        let slot = (flow_hash(flow) % vip.table_size) as usize;
        let table = self.tables.get(&vip.table_index).ok_or(Reason::NoTable)?;
        let id = *table.get(slot).ok_or(Reason::NoTable)?;
        self.usable(id).map(|_| id).ok_or(Reason::NoBackend)
    }

    /// "Which backend gets this flow?" — for a packet of `flow` that does not open a TCP
    /// connection (no bare SYN): its connection-table backend if that is usable, else the VIP's
    /// Maglev choice. `None` if no VIP takes the flow, the VIP is L7, or no backend can take it.
    /// No side effects: nothing is remembered.
    pub fn backend_for(&self, flow: &FlowKey) -> Option<u32> {
        let vip = self.lookup_vip(flow)?;
        if vip.flags & VIP_F_L7 != 0 {
            return None;
        }
        if let Some(&id) = self.flows.get(flow)
            && self.usable(id).is_some()
        {
            return Some(id);
        }
        self.maglev_choice(flow, &vip).ok()
    }

    /// Picks the backend for `flow` as the data path does, remembering a table choice when
    /// `remember`.
    fn select(
        &mut self,
        flow: &FlowKey,
        vip: &VipMeta,
        syn: bool,
        remember: bool,
    ) -> Result<u32, Reason> {
        if !syn
            && let Some(&id) = self.flows.get(flow)
            && self.usable(id).is_some()
        {
            return Ok(id);
        }
        let id = self.maglev_choice(flow, vip)?;
        if remember {
            self.flows.insert(*flow, id);
        }
        Ok(id)
    }

    /// What the balancer does with `frame` (from the Ethernet header on), updating the modelled
    /// connection and fragment tables exactly as the XDP program updates its maps.
    pub fn decide(&mut self, frame: &[u8]) -> Verdict {
        let pkt = match parse(Bytes(frame)) {
            Ok(p) => p,
            Err(v) => return v,
        };
        let mut v = self.decide_parsed(Bytes(frame), &pkt);
        v.key = Some(pkt.key);
        v
    }

    fn decide_parsed(&mut self, frame: Bytes<'_>, pkt: &Parsed) -> Verdict {
        if pkt.later_fragment {
            return self.later_fragment(frame, pkt);
        }
        let mut icmp_error = None;
        if pkt.is_icmp() && !pkt.fragmented {
            match self.classify_icmp(frame, pkt) {
                Icmp::Echo => return Verdict::stop(Action::Tx, Reason::EchoReply),
                Icmp::Pass => return Verdict::stop(Action::Pass, Reason::NotVip),
                Icmp::QuoteShort => return Verdict::stop(Action::Drop, Reason::IcmpQuoteShort),
                Icmp::Error(flow) => icmp_error = Some(flow),
            }
        }
        let (flow, syn) = match &icmp_error {
            Some(quoted) => (*quoted, false),
            None => (pkt.key, pkt.opens_connection()),
        };
        let Some(vip) = self.lookup_vip(&flow) else {
            return Verdict::stop(Action::Pass, Reason::NotVip);
        };
        if vip.flags & VIP_F_L7 != 0 {
            return Verdict::stop(Action::Pass, Reason::L7);
        }
        let id = match self.select(&flow, &vip, syn, icmp_error.is_none()) {
            Ok(id) => id,
            Err(reason) => return Verdict::stop(Action::Drop, reason),
        };
        if pkt.fragmented {
            self.frags.insert(
                pkt.frag_key(),
                FragValue {
                    backend_id: id,
                    vip_id: vip.vip_id,
                    vip_flags: vip.flags,
                    _pad: 0,
                },
            );
        }
        let reason = if icmp_error.is_some() {
            Reason::IcmpErrorForwarded
        } else {
            Reason::Forwarded
        };
        self.send(frame, pkt, vip.flags, id, reason)
    }

    fn later_fragment(&mut self, frame: Bytes<'_>, pkt: &Parsed) -> Verdict {
        match self.frags.get(&pkt.frag_key()).copied() {
            Some(rec) => {
                if self.usable(rec.backend_id).is_none() {
                    return Verdict::stop(Action::Drop, Reason::NoBackend);
                }
                self.send(
                    frame,
                    pkt,
                    rec.vip_flags,
                    rec.backend_id,
                    Reason::FragFollow,
                )
            }
            None if self.vip_addr_flags(&pkt.key.dst, pkt.key.family) & VIP_ADDR_F_L4 != 0 => {
                Verdict::stop(Action::Drop, Reason::FragUnknown)
            }
            None => Verdict::stop(Action::Pass, Reason::NotVip),
        }
    }

    /// Sends to usable backend `id` the VIP's way (L2 DSR, or encapsulation with the MTU rule).
    fn send(
        &self,
        frame: Bytes<'_>,
        pkt: &Parsed,
        vip_flags: u32,
        id: u32,
        reason: Reason,
    ) -> Verdict {
        let forwarded = Verdict {
            action: Action::Tx,
            backend: Some(id),
            reason,
            key: None,
        };
        if vip_flags & VIP_F_DSR_L2 != 0 {
            return forwarded;
        }
        let Some(backend) = self.usable(id) else {
            // Callers pass usable backends only.
            return Verdict::stop(Action::Drop, Reason::NoBackend);
        };
        let overhead = if backend.family == FAMILY_V6 { 40 } else { 20 };
        let mtu = self.config.egress_mtu as usize;
        if mtu == 0 || pkt.ip_len + overhead <= mtu {
            return forwarded;
        }
        if pkt.key.family == FAMILY_V4 && !pkt.dont_fragment {
            return Verdict::stop(Action::Drop, Reason::TooBigDrop);
        }
        // The reply quotes the IPv4 header + 8 bytes, or as much of the IPv6 packet (an even
        // count) as keeps the reply within the IPv6 minimum MTU; it must be in the frame.
        let avail = frame.len() - pkt.l3;
        let quote = if pkt.key.family == FAMILY_V4 {
            pkt.l4 - pkt.l3 + 8
        } else {
            (avail & !1).min(MAX_V6_TOO_BIG_QUOTE)
        };
        if quote > avail {
            return Verdict::stop(Action::Drop, Reason::TooBigDrop);
        }
        Verdict::stop(Action::Tx, Reason::TooBigIcmp)
    }

    fn classify_icmp(&self, frame: Bytes<'_>, pkt: &Parsed) -> Icmp {
        if self.vip_addr_flags(&pkt.key.dst, pkt.key.family) == 0 {
            return Icmp::Pass;
        }
        let (ty, code) = (pkt.icmp_type, pkt.icmp_code);
        if pkt.key.family == FAMILY_V4 {
            match ty {
                8 if code == 0 => Icmp::Echo,
                3 | 11 => quoted_v4(frame, pkt),
                _ => Icmp::Pass,
            }
        } else {
            match ty {
                128 if code == 0 => Icmp::Echo,
                1..=3 => quoted_v6(frame, pkt),
                _ => Icmp::Pass,
            }
        }
    }
}

/// How an ICMP packet to a VIP address is handled.
enum Icmp {
    Echo,
    Pass,
    QuoteShort,
    /// An error about this flow (client -> VIP).
    Error(FlowKey),
}

/// The quoted packet of an ICMPv4 error was sent by the VIP side (VIP -> client): its header
/// (any IHL) and the first 8 bytes after it must lie inside the ICMP packet.
fn quoted_v4(frame: Bytes<'_>, pkt: &Parsed) -> Icmp {
    let q = pkt.l4 + 8;
    let end = pkt.l3 + pkt.ip_len;
    let Some(h) = frame.get(q, 20) else {
        return Icmp::QuoteShort;
    };
    let qihl = usize::from(h[0] & 0x0f) * 4;
    if qihl < 20 || q + 20 > end || q + qihl + 8 > end {
        return Icmp::QuoteShort;
    }
    let Some(ports) = frame.get(q + qihl, 4) else {
        return Icmp::QuoteShort;
    };
    let p = h[9];
    if p != proto::TCP && p != proto::UDP {
        return Icmp::Pass;
    }
    let mut flow = FlowKey {
        sport_be: u16::from_ne_bytes([ports[2], ports[3]]),
        dport_be: u16::from_ne_bytes([ports[0], ports[1]]),
        proto: p,
        family: FAMILY_V4,
        ..FlowKey::default()
    };
    flow.src[..4].copy_from_slice(&h[16..20]);
    flow.dst[..4].copy_from_slice(&h[12..16]);
    Icmp::Error(flow)
}

/// As [`quoted_v4`] for ICMPv6: a 40-byte IPv6 header (no extension headers) and 8 bytes.
fn quoted_v6(frame: Bytes<'_>, pkt: &Parsed) -> Icmp {
    let q = pkt.l4 + 8;
    let end = pkt.l3 + pkt.ip_len;
    let Some(h) = frame.get(q, 48) else {
        return Icmp::QuoteShort;
    };
    if q + 48 > end {
        return Icmp::QuoteShort;
    }
    let p = h[6];
    if p != proto::TCP && p != proto::UDP {
        return Icmp::Pass;
    }
    let mut flow = FlowKey {
        sport_be: u16::from_ne_bytes([h[42], h[43]]),
        dport_be: u16::from_ne_bytes([h[40], h[41]]),
        proto: p,
        family: FAMILY_V6,
        ..FlowKey::default()
    };
    flow.src.copy_from_slice(&h[24..40]);
    flow.dst.copy_from_slice(&h[8..24]);
    Icmp::Error(flow)
}

/// A frame as the balancer may read it: whole byte ranges, each inside the frame and starting
/// at most [`MAX_READ_OFFSET`] bytes in.
#[derive(Clone, Copy)]
struct Bytes<'a>(&'a [u8]);

impl<'a> Bytes<'a> {
    fn len(&self) -> usize {
        self.0.len()
    }

    fn get(&self, off: usize, n: usize) -> Option<&'a [u8]> {
        if off > MAX_READ_OFFSET {
            return None;
        }
        self.0.get(off..off.checked_add(n)?)
    }

    fn be16(&self, off: usize) -> Option<u16> {
        self.get(off, 2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
}

/// The headers of one accepted IP packet.
#[derive(Debug, Clone, Copy)]
struct Parsed {
    l3: usize,
    l4: usize,
    ip_len: usize,
    dont_fragment: bool,
    later_fragment: bool,
    fragmented: bool,
    frag_id: u32,
    tcp_flags: u8,
    icmp_type: u8,
    icmp_code: u8,
    key: FlowKey,
}

impl Parsed {
    fn is_icmp(&self) -> bool {
        (self.key.family == FAMILY_V4 && self.key.proto == proto::ICMP)
            || (self.key.family == FAMILY_V6 && self.key.proto == proto::ICMPV6)
    }

    fn opens_connection(&self) -> bool {
        self.key.proto == proto::TCP
            && self.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN
    }

    fn frag_key(&self) -> FragKey {
        FragKey {
            src: self.key.src,
            dst: self.key.dst,
            id: self.frag_id,
            proto: self.key.proto,
            family: self.key.family,
            _pad: [0; 2],
        }
    }
}

fn parse(frame: Bytes<'_>) -> Result<Parsed, Verdict> {
    let truncated = || Verdict::stop(Action::Drop, Reason::L2Truncated);
    let is_tag = |t: u16| t == ETHERTYPE_VLAN || t == ETHERTYPE_QINQ;
    let mut l3 = 14;
    let mut ether_type = frame.be16(12).ok_or_else(truncated)?;
    for _ in 0..2 {
        if !is_tag(ether_type) {
            break;
        }
        ether_type = frame.be16(l3 + 2).ok_or_else(truncated)?;
        l3 += 4;
    }
    if is_tag(ether_type) {
        return Err(Verdict::stop(Action::Pass, Reason::VlanTooMany));
    }
    let mut pkt = match ether_type {
        ETHERTYPE_IPV4 => parse_ipv4(frame, l3),
        ETHERTYPE_IPV6 => parse_ipv6(frame, l3),
        _ => return Err(Verdict::stop(Action::Pass, Reason::NonIp)),
    }
    .ok_or_else(|| Verdict::stop(Action::Drop, Reason::Malformed))?;
    if !pkt.later_fragment {
        parse_l4(frame, &mut pkt)
            .ok_or_else(|| Verdict::stop(Action::Drop, Reason::L4Truncated))?;
    }
    Ok(pkt)
}

fn parse_ipv4(frame: Bytes<'_>, l3: usize) -> Option<Parsed> {
    let h = frame.get(l3, 20)?;
    let header_len = usize::from(h[0] & 0x0f) * 4;
    let total_len = usize::from(u16::from_be_bytes([h[2], h[3]]));
    if h[0] >> 4 != 4 || header_len < 20 || total_len < header_len || l3 + total_len > frame.len() {
        return None;
    }
    let frag_field = u16::from_be_bytes([h[6], h[7]]);
    let more_fragments = frag_field & 0x2000 != 0;
    let offset = frag_field & 0x1fff;
    let mut key = FlowKey {
        proto: h[9],
        family: FAMILY_V4,
        ..FlowKey::default()
    };
    key.src[..4].copy_from_slice(&h[12..16]);
    key.dst[..4].copy_from_slice(&h[16..20]);
    Some(Parsed {
        l3,
        l4: l3 + header_len,
        ip_len: total_len,
        dont_fragment: frag_field & 0x4000 != 0,
        later_fragment: offset != 0,
        fragmented: more_fragments || offset != 0,
        frag_id: u32::from(u16::from_be_bytes([h[4], h[5]])),
        tcp_flags: 0,
        icmp_type: 0,
        icmp_code: 0,
        key,
    })
}

fn parse_ipv6(frame: Bytes<'_>, l3: usize) -> Option<Parsed> {
    let h = frame.get(l3, 40)?;
    let payload_len = usize::from(u16::from_be_bytes([h[4], h[5]]));
    let end = l3 + 40 + payload_len;
    if h[0] >> 4 != 6 || end > frame.len() {
        return None;
    }
    let mut next = h[6];
    let mut off = l3 + 40;
    let mut walked = 0;
    let (mut later_fragment, mut fragmented, mut frag_id) = (false, false, 0u32);
    loop {
        let len = match next {
            EXT_HOP_BY_HOP | EXT_ROUTING | EXT_DEST_OPTS => {
                let e = frame.get(off, 2)?;
                next = e[0];
                (usize::from(e[1]) + 1) * 8
            }
            EXT_AH => {
                let e = frame.get(off, 2)?;
                next = e[0];
                (usize::from(e[1]) + 2) * 4
            }
            EXT_FRAGMENT => {
                let e = frame.get(off, 8)?;
                next = e[0];
                later_fragment |= u16::from_be_bytes([e[2], e[3]]) >> 3 != 0;
                fragmented = true;
                frag_id = u32::from_be_bytes([e[4], e[5], e[6], e[7]]);
                8
            }
            _ => break,
        };
        walked += 1;
        off += len;
        if off > end || walked > MAX_IPV6_EXT {
            return None;
        }
    }
    let mut key = FlowKey {
        proto: next,
        family: FAMILY_V6,
        ..FlowKey::default()
    };
    key.src.copy_from_slice(&h[8..24]);
    key.dst.copy_from_slice(&h[24..40]);
    Some(Parsed {
        l3,
        l4: off,
        ip_len: 40 + payload_len,
        dont_fragment: true,
        later_fragment,
        fragmented,
        frag_id,
        tcp_flags: 0,
        icmp_type: 0,
        icmp_code: 0,
        key,
    })
}

/// Reads the L4 header of a packet that is not a later fragment; `None` if it is cut short.
fn parse_l4(frame: Bytes<'_>, pkt: &mut Parsed) -> Option<()> {
    let ip_end = pkt.l3 + pkt.ip_len;
    let need = match pkt.key.proto {
        proto::TCP => 20,
        proto::UDP => 8,
        _ if pkt.is_icmp() => 8,
        _ => return Some(()),
    };
    if pkt.l4 + need > ip_end {
        return None;
    }
    let h = frame.get(pkt.l4, need)?;
    match pkt.key.proto {
        proto::TCP | proto::UDP => {
            pkt.key.sport_be = u16::from_ne_bytes([h[0], h[1]]);
            pkt.key.dport_be = u16::from_ne_bytes([h[2], h[3]]);
            if pkt.key.proto == proto::TCP {
                pkt.tcp_flags = h[13];
            }
        }
        _ => {
            pkt.icmp_type = h[0];
            pkt.icmp_code = h[1];
        }
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLIENT: [u8; 4] = [198, 51, 100, 7];
    const VIP: [u8; 4] = [203, 0, 113, 10];
    const VIP_L2: [u8; 4] = [203, 0, 113, 12];
    const VIP_L7: [u8; 4] = [203, 0, 113, 13];
    const VIP_EMPTY: [u8; 4] = [203, 0, 113, 14];
    const VIP_PAIR: [u8; 4] = [203, 0, 113, 15];
    const OTHER: [u8; 4] = [198, 51, 100, 99];
    const CLIENT6: [u8; 16] = [0x20, 1, 0xd, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7];
    const VIP6: [u8; 16] = [0x20, 1, 0xd, 0xb8, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10];
    const SIZE: u32 = 7;

    fn a16(a: [u8; 4]) -> [u8; 16] {
        let mut o = [0; 16];
        o[..4].copy_from_slice(&a);
        o
    }

    fn vkey(a: [u8; 4], port: u16, p: u8) -> VipKey {
        VipKey {
            addr: a16(a),
            port_be: port.to_be(),
            proto: p,
            family: FAMILY_V4,
        }
    }

    fn backend(addr: [u8; 16], family: Family, up: bool) -> Backend {
        Backend {
            addr,
            family,
            flags: if up { BACKEND_F_UP } else { 0 },
            mac: [2, 0, 0, 0, 1, addr[15] | addr[3]],
            ..Default::default()
        }
    }

    fn meta(vip_id: u32, flags: u32) -> VipMeta {
        VipMeta {
            vip_id,
            flags,
            table_index: 2 * vip_id,
            table_size: SIZE,
            ..VipMeta::default()
        }
    }

    /// Backends 1, 2 (IPv4) and 3 (IPv6); VIPs: VIP:80/tcp -> 1, VIP:53/udp -> 3 (IPv6 outer),
    /// VIP_L2:80 -> 2 by DSR, VIP_L7:443 L7, VIP_EMPTY:80 empty, VIP_PAIR:80 -> 1 and 2
    /// alternating, VIP6:80/tcp -> 1.
    fn world() -> SimState {
        let mut s = SimState::new(LbConfig {
            egress_mtu: 1500,
            ..LbConfig::default()
        });
        s.set_backend(1, backend(a16([10, 0, 0, 1]), FAMILY_V4, true));
        s.set_backend(2, backend(a16([10, 0, 0, 2]), FAMILY_V4, true));
        let mut b3 = [0u8; 16];
        b3[0] = 0xfd;
        b3[15] = 3;
        s.set_backend(3, backend(b3, FAMILY_V6, true));
        let n = SIZE as usize;
        s.set_vip(vkey(VIP, 80, proto::TCP), meta(1, 0), vec![1; n]);
        s.set_vip(vkey(VIP, 53, proto::UDP), meta(2, 0), vec![3; n]);
        s.set_vip(
            vkey(VIP_L2, 80, proto::TCP),
            meta(3, VIP_F_DSR_L2),
            vec![2; n],
        );
        s.set_vip(vkey(VIP_L7, 443, proto::TCP), meta(4, VIP_F_L7), vec![1; n]);
        s.set_vip(
            vkey(VIP_EMPTY, 80, proto::TCP),
            meta(5, 0),
            vec![u32::MAX; n],
        );
        let pair = (0..n).map(|i| 1 + (i % 2) as u32).collect();
        s.set_vip(vkey(VIP_PAIR, 80, proto::TCP), meta(6, 0), pair);
        let k6 = VipKey {
            addr: VIP6,
            port_be: 80u16.to_be(),
            proto: proto::TCP,
            family: FAMILY_V6,
        };
        s.set_vip(k6, meta(7, 0), vec![1; n]);
        s
    }

    fn eth(ether_type: u16, l3: &[u8]) -> Vec<u8> {
        let mut f = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1];
        f.extend_from_slice(&ether_type.to_be_bytes());
        f.extend_from_slice(l3);
        f
    }

    fn tagged(frame: &[u8], tpids: &[u16]) -> Vec<u8> {
        let mut f = frame[..12].to_vec();
        for t in tpids {
            f.extend_from_slice(&t.to_be_bytes());
            f.extend_from_slice(&[0, 7]);
        }
        f.extend_from_slice(&frame[12..]);
        f
    }

    /// An IPv4 header (IHL 5) with `frag` as the flags/offset field, then `l4`.
    fn ipv4(src: [u8; 4], dst: [u8; 4], p: u8, frag: u16, id: u16, l4: &[u8]) -> Vec<u8> {
        let total = (20 + l4.len()) as u16;
        let mut h = vec![0x45, 0];
        h.extend_from_slice(&total.to_be_bytes());
        h.extend_from_slice(&id.to_be_bytes());
        h.extend_from_slice(&frag.to_be_bytes());
        h.extend_from_slice(&[64, p, 0, 0]);
        h.extend_from_slice(&src);
        h.extend_from_slice(&dst);
        h.extend_from_slice(l4);
        h
    }

    fn ipv6(src: [u8; 16], dst: [u8; 16], next: u8, payload: &[u8]) -> Vec<u8> {
        let mut h = vec![0x60, 0, 0, 0];
        h.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        h.extend_from_slice(&[next, 64]);
        h.extend_from_slice(&src);
        h.extend_from_slice(&dst);
        h.extend_from_slice(payload);
        h
    }

    fn tcp(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
        let mut t = vec![0u8; 20];
        t[..2].copy_from_slice(&sport.to_be_bytes());
        t[2..4].copy_from_slice(&dport.to_be_bytes());
        t[12] = 0x50;
        t[13] = flags;
        t
    }

    fn udp(sport: u16, dport: u16) -> Vec<u8> {
        let mut u = vec![0u8; 8];
        u[..2].copy_from_slice(&sport.to_be_bytes());
        u[2..4].copy_from_slice(&dport.to_be_bytes());
        u[4..6].copy_from_slice(&8u16.to_be_bytes());
        u
    }

    const SYN: u8 = TCP_FLAG_SYN;
    const ACK: u8 = TCP_FLAG_ACK;
    const DF: u16 = 0x4000;
    const MF: u16 = 0x2000;

    fn tcp4(dst: [u8; 4], sport: u16, dport: u16, flags: u8) -> Vec<u8> {
        eth(
            0x0800,
            &ipv4(CLIENT, dst, proto::TCP, DF, 1, &tcp(sport, dport, flags)),
        )
    }

    fn key4(dst: [u8; 4], sport: u16, dport: u16, p: u8) -> FlowKey {
        FlowKey {
            src: a16(CLIENT),
            dst: a16(dst),
            sport_be: sport.to_be(),
            dport_be: dport.to_be(),
            proto: p,
            family: FAMILY_V4,
            _pad: [0; 2],
        }
    }

    fn verdict(
        action: Action,
        backend: Option<u32>,
        reason: Reason,
    ) -> (Action, Option<u32>, Reason) {
        (action, backend, reason)
    }

    fn run(s: &mut SimState, frame: &[u8]) -> (Action, Option<u32>, Reason) {
        let v = s.decide(frame);
        (v.action, v.backend, v.reason)
    }

    #[test]
    fn layer_two_paths() {
        let mut s = world();
        let f = tcp4(VIP, 40000, 80, SYN);
        assert_eq!(run(&mut s, &f[..13]).2, Reason::L2Truncated);
        assert_eq!(run(&mut s, &f[..14]).2, Reason::Malformed);
        let one = tagged(&f, &[0x8100]);
        assert_eq!(run(&mut s, &one[..17]).2, Reason::L2Truncated);
        assert_eq!(
            run(&mut s, &one),
            verdict(Action::Tx, Some(1), Reason::Forwarded)
        );
        let two = tagged(&f, &[0x88a8, 0x8100]);
        assert_eq!(run(&mut s, &two[..21]).2, Reason::L2Truncated);
        assert_eq!(run(&mut s, &two).1, Some(1));
        let three = tagged(&f, &[0x88a8, 0x8100, 0x8100]);
        assert_eq!(
            run(&mut s, &three),
            verdict(Action::Pass, None, Reason::VlanTooMany)
        );
        let arp = eth(0x0806, &[0; 28]);
        assert_eq!(
            run(&mut s, &arp),
            verdict(Action::Pass, None, Reason::NonIp)
        );
    }

    #[test]
    fn malformed_ip_headers_are_dropped() {
        let mut s = world();
        let good = tcp4(VIP, 40000, 80, SYN);
        let mut ihl4 = good.clone();
        ihl4[14] = 0x44;
        let mut version = good.clone();
        version[14] = 0x65;
        let mut long = good.clone();
        long[16..18].copy_from_slice(&100u16.to_be_bytes());
        let mut short_total = good.clone();
        short_total[16..18].copy_from_slice(&19u16.to_be_bytes());
        for f in [ihl4, version, long, short_total] {
            assert_eq!(
                run(&mut s, &f),
                verdict(Action::Drop, None, Reason::Malformed)
            );
        }
        // IPv6: payload past the frame; a chain of 9 hop-by-hop headers; an extension header
        // reaching past the payload.
        let mut p6 = ipv6(CLIENT6, VIP6, proto::TCP, &tcp(1, 80, SYN));
        p6[4..6].copy_from_slice(&21u16.to_be_bytes());
        assert_eq!(run(&mut s, &eth(0x86dd, &p6)).2, Reason::Malformed);
        let chain = |n: usize, last_len: u8| {
            let mut payload = Vec::new();
            for i in 0..n {
                let next = if i + 1 == n {
                    proto::TCP
                } else {
                    EXT_HOP_BY_HOP
                };
                let len = if i + 1 == n { last_len } else { 0 };
                payload.extend_from_slice(&[next, len, 1, 4, 0, 0, 0, 0]);
            }
            payload.extend_from_slice(&tcp(1, 80, SYN));
            eth(0x86dd, &ipv6(CLIENT6, VIP6, EXT_HOP_BY_HOP, &payload))
        };
        assert_eq!(run(&mut s, &chain(8, 0)).2, Reason::Forwarded);
        assert_eq!(run(&mut s, &chain(9, 0)).2, Reason::Malformed);
        // One 8-byte header claiming 24 bytes still ends inside the 28-byte payload (the TCP
        // header it overlaps is then cut short); claiming 32 bytes runs past it.
        assert_eq!(run(&mut s, &chain(1, 2)).2, Reason::L4Truncated);
        assert_eq!(run(&mut s, &chain(1, 3)).2, Reason::Malformed);
    }

    #[test]
    fn truncated_l4_headers_are_dropped() {
        let mut s = world();
        // TCP cut by the IP total length (frame still long enough).
        let mut f = tcp4(VIP, 40000, 80, SYN);
        f[16..18].copy_from_slice(&39u16.to_be_bytes());
        assert_eq!(
            run(&mut s, &f),
            verdict(Action::Drop, None, Reason::L4Truncated)
        );
        let u = eth(0x0800, &ipv4(CLIENT, VIP, proto::UDP, 0, 1, &[0; 7]));
        assert_eq!(run(&mut s, &u).2, Reason::L4Truncated);
        let i = eth(0x0800, &ipv4(CLIENT, VIP, proto::ICMP, 0, 1, &[8, 0, 0]));
        assert_eq!(run(&mut s, &i).2, Reason::L4Truncated);
        // Protocols without a parsed header are never truncated: GRE to a VIP passes.
        let g = eth(0x0800, &ipv4(CLIENT, VIP, 47, 0, 1, &[]));
        assert_eq!(run(&mut s, &g), verdict(Action::Pass, None, Reason::NotVip));
    }

    #[test]
    fn vip_lookup_pass_paths() {
        let mut s = world();
        assert_eq!(run(&mut s, &tcp4(OTHER, 1, 80, SYN)).2, Reason::NotVip);
        assert_eq!(run(&mut s, &tcp4(VIP, 1, 81, SYN)).2, Reason::NotVip);
        assert_eq!(
            run(&mut s, &tcp4(VIP_L7, 1, 443, SYN)),
            verdict(Action::Pass, None, Reason::L7)
        );
        assert!(s.flows().is_empty());
    }

    #[test]
    fn connection_table_keeps_reselects_and_syn_reselects() {
        let mut s = world();
        let k = key4(VIP_PAIR, 40000, 80, proto::TCP);
        let first = run(&mut s, &tcp4(VIP_PAIR, 40000, 80, SYN)).1.unwrap();
        let other = 3 - first;
        assert_eq!(s.flows().get(&k), Some(&first));
        // The table now names only the other backend: the flow stays (drained), a SYN moves.
        let m = s.vip(&vkey(VIP_PAIR, 80, proto::TCP)).unwrap();
        s.set_vip(
            vkey(VIP_PAIR, 80, proto::TCP),
            VipMeta {
                table_index: m.table_index + 1,
                ..m
            },
            vec![other; SIZE as usize],
        );
        assert_eq!(s.backend_for(&k), Some(first));
        assert_eq!(run(&mut s, &tcp4(VIP_PAIR, 40000, 80, ACK)).1, Some(first));
        assert_eq!(
            run(&mut s, &tcp4(VIP_PAIR, 40000, 80, SYN | ACK)).1,
            Some(first)
        );
        assert_eq!(run(&mut s, &tcp4(VIP_PAIR, 40000, 80, SYN)).1, Some(other));
        assert_eq!(s.flows().get(&k), Some(&other));
        // Its backend goes down: re-selected on the next packet (and remembered).
        let mut b = *s.backend(other).unwrap();
        b.flags = 0;
        s.set_backend(other, b);
        s.set_vip(
            vkey(VIP_PAIR, 80, proto::TCP),
            VipMeta {
                table_index: m.table_index,
                ..m
            },
            vec![first; SIZE as usize],
        );
        assert_eq!(s.backend_for(&k), Some(first));
        assert_eq!(run(&mut s, &tcp4(VIP_PAIR, 40000, 80, ACK)).1, Some(first));
        assert_eq!(s.flows().get(&k), Some(&first));
        // A missing backend id is as good as down.
        s.set_backend(first, Backend::default());
        assert_eq!(s.backend_for(&k), None);
        assert_eq!(
            run(&mut s, &tcp4(VIP_PAIR, 40000, 80, ACK)),
            verdict(Action::Drop, None, Reason::NoBackend)
        );
        assert_eq!(
            s.flows().get(&k),
            Some(&first),
            "a failed selection writes nothing"
        );
    }

    #[test]
    fn no_backend_and_no_table() {
        let mut s = world();
        assert_eq!(
            run(&mut s, &tcp4(VIP_EMPTY, 1, 80, SYN)),
            verdict(Action::Drop, None, Reason::NoBackend)
        );
        s.remove_table(2);
        assert_eq!(
            run(&mut s, &tcp4(VIP, 1, 80, SYN)),
            verdict(Action::Drop, None, Reason::NoTable)
        );
        assert!(s.flows().is_empty());
    }

    #[test]
    fn l2_dsr_and_backend_for_agree_with_decide() {
        let mut s = world();
        let k = key4(VIP_L2, 5, 80, proto::TCP);
        assert_eq!(s.backend_for(&k), Some(2));
        assert!(s.flows().is_empty(), "backend_for has no side effects");
        assert_eq!(
            run(&mut s, &tcp4(VIP_L2, 5, 80, SYN)),
            verdict(Action::Tx, Some(2), Reason::Forwarded)
        );
        assert_eq!(s.backend_for(&key4(VIP_L7, 5, 443, proto::TCP)), None);
        assert_eq!(s.backend_for(&key4(OTHER, 5, 80, proto::TCP)), None);
    }

    #[test]
    fn ipv6_and_ipv6_outer() {
        let mut s = world();
        let f = eth(0x86dd, &ipv6(CLIENT6, VIP6, proto::TCP, &tcp(1, 80, SYN)));
        assert_eq!(
            run(&mut s, &f),
            verdict(Action::Tx, Some(1), Reason::Forwarded)
        );
        let u = eth(0x0800, &ipv4(CLIENT, VIP, proto::UDP, 0, 1, &udp(9, 53)));
        assert_eq!(
            run(&mut s, &u),
            verdict(Action::Tx, Some(3), Reason::Forwarded)
        );
    }

    #[test]
    fn mtu_rule() {
        let mut s = world();
        let sized = |ip_len: usize, frag: u16, dst: [u8; 4]| {
            let mut l4 = tcp(1, 80, ACK);
            l4.resize(ip_len - 20, 0);
            eth(0x0800, &ipv4(CLIENT, dst, proto::TCP, frag, 1, &l4))
        };
        assert_eq!(run(&mut s, &sized(1480, DF, VIP)).2, Reason::Forwarded);
        assert_eq!(
            run(&mut s, &sized(1481, DF, VIP)),
            verdict(Action::Tx, None, Reason::TooBigIcmp)
        );
        assert_eq!(
            run(&mut s, &sized(1481, 0, VIP)),
            verdict(Action::Drop, None, Reason::TooBigDrop)
        );
        // L2 DSR adds no header: no MTU check.
        assert_eq!(run(&mut s, &sized(1481, 0, VIP_L2)).2, Reason::Forwarded);
        // An IPv6 backend adds 40 bytes: UDP to VIP:53 goes to backend 3.
        let udp_sized = |ip_len: usize| {
            let mut l4 = udp(9, 53);
            l4.resize(ip_len - 20, 0);
            eth(0x0800, &ipv4(CLIENT, VIP, proto::UDP, DF, 1, &l4))
        };
        assert_eq!(run(&mut s, &udp_sized(1460)).2, Reason::Forwarded);
        assert_eq!(run(&mut s, &udp_sized(1461)).2, Reason::TooBigIcmp);
        // IPv6 is never fragmented by routers: always a too-big reply.
        let mut l4 = tcp(1, 80, ACK);
        l4.resize(1441, 0);
        let big6 = eth(0x86dd, &ipv6(CLIENT6, VIP6, proto::TCP, &l4));
        assert_eq!(run(&mut s, &big6).2, Reason::TooBigIcmp);
        // The too-big packet's flow was still remembered.
        assert_eq!(s.flows().len(), 4);
        // MTU 0 disables the check.
        let mut cfg = *s.config();
        cfg.egress_mtu = 0;
        s.set_config(cfg);
        assert_eq!(run(&mut s, &sized(1481, 0, VIP)).2, Reason::Forwarded);
    }

    fn icmp4(dst: [u8; 4], ty: u8, code: u8, body: &[u8]) -> Vec<u8> {
        let mut i = vec![ty, code, 0, 0, 0, 0, 0, 0];
        i.extend_from_slice(body);
        eth(0x0800, &ipv4([192, 0, 2, 1], dst, proto::ICMP, 0, 1, &i))
    }

    /// The packet the VIP side sent to the client (VIP:vport -> client:cport), `len` bytes.
    fn reply4(vip: [u8; 4], vport: u16, cport: u16, p: u8, len: usize) -> Vec<u8> {
        let l4 = if p == proto::UDP {
            udp(vport, cport)
        } else {
            tcp(vport, cport, ACK)
        };
        let mut r = ipv4(vip, CLIENT, p, DF, 9, &l4);
        r.resize(len, 0x42);
        r
    }

    #[test]
    fn icmp_echo_and_errors() {
        let mut s = world();
        assert_eq!(
            run(&mut s, &icmp4(VIP, 8, 0, b"ping")),
            verdict(Action::Tx, None, Reason::EchoReply)
        );
        // Any VIP address, L7 ones included; other codes, types and addresses pass.
        assert_eq!(run(&mut s, &icmp4(VIP_L7, 8, 0, b"")).2, Reason::EchoReply);
        assert_eq!(run(&mut s, &icmp4(VIP, 8, 1, b"")).2, Reason::NotVip);
        assert_eq!(run(&mut s, &icmp4(VIP, 0, 0, b"")).2, Reason::NotVip);
        assert_eq!(run(&mut s, &icmp4(OTHER, 8, 0, b"")).2, Reason::NotVip);
        // Errors quoting a VIP flow go to its backend and create no flow.
        for ty in [3, 11] {
            let f = icmp4(VIP, ty, 4, &reply4(VIP, 80, 40000, proto::TCP, 28));
            assert_eq!(
                run(&mut s, &f),
                verdict(Action::Tx, Some(1), Reason::IcmpErrorForwarded)
            );
        }
        let f = icmp4(VIP, 3, 3, &reply4(VIP, 53, 5353, proto::UDP, 60));
        assert_eq!(run(&mut s, &f).1, Some(3));
        assert!(s.flows().is_empty());
        for len in [0, 19, 20, 27] {
            let f = icmp4(VIP, 3, 4, &reply4(VIP, 80, 40000, proto::TCP, len));
            assert_eq!(
                run(&mut s, &f),
                verdict(Action::Drop, None, Reason::IcmpQuoteShort),
                "quote of {len} bytes"
            );
        }
        // A quote of a non-VIP port, or of a protocol without ports, passes.
        let f = icmp4(VIP, 3, 3, &reply4(VIP, 9999, 40000, proto::TCP, 28));
        assert_eq!(run(&mut s, &f).2, Reason::NotVip);
        let mut q = reply4(VIP, 80, 40000, proto::TCP, 28);
        q[9] = proto::ICMP;
        assert_eq!(run(&mut s, &icmp4(VIP, 3, 3, &q)).2, Reason::NotVip);
        // The connection table decides for errors too.
        let k = key4(VIP_PAIR, 41000, 80, proto::TCP);
        let first = run(&mut s, &tcp4(VIP_PAIR, 41000, 80, SYN)).1.unwrap();
        s.set_vip(
            vkey(VIP_PAIR, 80, proto::TCP),
            meta(6, 0),
            vec![3 - first; SIZE as usize],
        );
        let f = icmp4(VIP_PAIR, 3, 4, &reply4(VIP_PAIR, 80, 41000, proto::TCP, 28));
        assert_eq!(run(&mut s, &f).1, Some(first));
        assert_eq!(s.backend_for(&k), Some(first));
    }

    #[test]
    fn icmpv6_echo_and_errors() {
        let mut s = world();
        let echo = eth(
            0x86dd,
            &ipv6(CLIENT6, VIP6, proto::ICMPV6, &[128, 0, 0, 0, 0, 7, 0, 1]),
        );
        assert_eq!(
            run(&mut s, &echo),
            verdict(Action::Tx, None, Reason::EchoReply)
        );
        let quote = |len: usize| {
            let mut q = ipv6(VIP6, CLIENT6, proto::TCP, &tcp(80, 40000, ACK));
            q.resize(len, 0);
            q
        };
        for ty in [1, 2, 3] {
            let mut i = vec![ty, 0, 0, 0, 0, 0, 5, 0];
            i.extend_from_slice(&quote(48));
            let f = eth(0x86dd, &ipv6(CLIENT6, VIP6, proto::ICMPV6, &i));
            assert_eq!(
                run(&mut s, &f),
                verdict(Action::Tx, Some(1), Reason::IcmpErrorForwarded)
            );
            let mut i = vec![ty, 0, 0, 0, 0, 0, 5, 0];
            i.extend_from_slice(&quote(47));
            let f = eth(0x86dd, &ipv6(CLIENT6, VIP6, proto::ICMPV6, &i));
            assert_eq!(run(&mut s, &f).2, Reason::IcmpQuoteShort);
        }
        // ICMPv4's protocol number inside IPv6 is not ICMP: no echo reply.
        let wrong = eth(0x86dd, &ipv6(CLIENT6, VIP6, proto::ICMP, &[128, 0, 0, 0]));
        assert_eq!(run(&mut s, &wrong).2, Reason::NotVip);
        let wrong4 = eth(
            0x0800,
            &ipv4(CLIENT, VIP, proto::ICMPV6, 0, 1, &[8, 0, 0, 0]),
        );
        assert_eq!(run(&mut s, &wrong4).2, Reason::NotVip);
        assert!(s.flows().is_empty());
    }

    #[test]
    fn fragments_follow_their_first() {
        let mut s = world();
        let frag = |id: u16, field: u16, l4: &[u8], dst: [u8; 4]| {
            eth(0x0800, &ipv4(CLIENT, dst, proto::UDP, field, id, l4))
        };
        // A later fragment before its first, to an L4 VIP address: dropped, not guessed.
        assert_eq!(
            run(&mut s, &frag(7, 9, &[0; 16], VIP)),
            verdict(Action::Drop, None, Reason::FragUnknown)
        );
        let first = frag(7, MF, &udp(5353, 53), VIP);
        assert_eq!(
            run(&mut s, &first),
            verdict(Action::Tx, Some(3), Reason::Forwarded)
        );
        assert_eq!(s.fragments().len(), 1);
        assert_eq!(
            run(&mut s, &frag(7, MF | 9, &[0; 16], VIP)),
            verdict(Action::Tx, Some(3), Reason::FragFollow)
        );
        // Another id does not follow; a non-VIP or L7-only address passes.
        assert_eq!(
            run(&mut s, &frag(8, 9, &[0; 16], VIP)).2,
            Reason::FragUnknown
        );
        assert_eq!(run(&mut s, &frag(7, 9, &[0; 16], OTHER)).2, Reason::NotVip);
        assert_eq!(run(&mut s, &frag(7, 9, &[0; 16], VIP_L7)).2, Reason::NotVip);
        // The recorded backend goes down: later fragments are dropped.
        let mut b = *s.backend(3).unwrap();
        b.flags = 0;
        s.set_backend(3, b);
        assert_eq!(
            run(&mut s, &frag(7, 18, &[0; 16], VIP)),
            verdict(Action::Drop, None, Reason::NoBackend)
        );
        // A first fragment of a flow that is not a VIP's is not recorded.
        assert_eq!(run(&mut s, &frag(9, MF, &udp(1, 2), VIP)).2, Reason::NotVip);
        assert_eq!(s.fragments().len(), 1);
    }

    #[test]
    fn ipv6_fragments() {
        let mut s = world();
        let with_frag = |offset: u16, more: bool, id: u32, l4: &[u8]| {
            let mut p = vec![proto::TCP, 0];
            p.extend_from_slice(&((offset << 3) | u16::from(more)).to_be_bytes());
            p.extend_from_slice(&id.to_be_bytes());
            p.extend_from_slice(l4);
            eth(0x86dd, &ipv6(CLIENT6, VIP6, EXT_FRAGMENT, &p))
        };
        assert_eq!(
            run(&mut s, &with_frag(3, false, 5, &[0; 8])).2,
            Reason::FragUnknown
        );
        assert_eq!(
            run(&mut s, &with_frag(0, true, 5, &tcp(1, 80, SYN))).1,
            Some(1)
        );
        assert_eq!(
            run(&mut s, &with_frag(3, false, 5, &[0; 8])),
            verdict(Action::Tx, Some(1), Reason::FragFollow)
        );
        // A later fragment is never read as ports, however short.
        assert_eq!(
            run(&mut s, &with_frag(3, false, 5, &[])).2,
            Reason::FragFollow
        );
    }

    #[test]
    fn vip_address_flags_follow_the_vips() {
        let mut s = world();
        assert_eq!(s.vip_addr_flags(&a16(VIP), FAMILY_V4), VIP_ADDR_F_L4);
        assert_eq!(s.vip_addr_flags(&a16(VIP_L7), FAMILY_V4), VIP_ADDR_F_L7);
        s.set_vip(
            vkey(VIP_L7, 80, proto::TCP),
            meta(8, 0),
            vec![1; SIZE as usize],
        );
        assert_eq!(
            s.vip_addr_flags(&a16(VIP_L7), FAMILY_V4),
            VIP_ADDR_F_L4 | VIP_ADDR_F_L7
        );
        s.remove_vip(&vkey(VIP_L7, 80, proto::TCP));
        s.remove_vip(&vkey(VIP_L7, 443, proto::TCP));
        assert_eq!(s.vip_addr_flags(&a16(VIP_L7), FAMILY_V4), 0);
        assert_eq!(run(&mut s, &icmp4(VIP_L7, 8, 0, b"")).2, Reason::NotVip);
    }

    #[test]
    fn reads_past_the_offset_limit_count_as_absent() {
        let mut s = world();
        // An IPv6 packet whose TCP header starts past MAX_READ_OFFSET (a long destination
        // options header) is truncated, even though the frame holds it.
        let ext_units = 255u8; // (255 + 1) * 8 = 2048 bytes
        let mut p = vec![proto::TCP, ext_units];
        p.resize(2048, 0);
        p.extend_from_slice(&tcp(1, 80, SYN));
        let f = eth(0x86dd, &ipv6(CLIENT6, VIP6, EXT_DEST_OPTS, &p));
        const { assert!(14 + 40 + 2048 > MAX_READ_OFFSET) };
        assert_eq!(run(&mut s, &f).2, Reason::L4Truncated);
    }
}
