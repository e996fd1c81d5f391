//! Counter indices of the balancer's per-CPU counter array.
//!
//! The kernel increments one slot per event on the CPU that saw it; the agent sums the CPUs.
//! The array is sized [`MAX_COUNTERS`], larger than today's set, so that adding a counter does not
//! change the map's shape (a pinned map from an older agent stays compatible).

/// Slots reserved in the counter map.
pub const MAX_COUNTERS: u32 = 64;

macro_rules! counters {
    ($( $(#[doc = $doc:literal])* $variant:ident = $idx:literal, $name:literal; )*) => {
        /// One event the XDP program counts. The discriminant is the slot in the counter map.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Counter {
            $( $(#[doc = $doc])* $variant = $idx, )*
        }

        impl Counter {
            /// Every counter, in slot order.
            pub const ALL: &'static [Counter] = &[$(Counter::$variant),*];

            /// The counter's stable name, used in logs, metrics and test fixtures.
            pub const fn name(self) -> &'static str {
                match self {
                    $( Counter::$variant => $name, )*
                }
            }

            /// Looks a counter up by its stable name.
            pub fn from_name(name: &str) -> Option<Counter> {
                match name {
                    $( $name => Some(Counter::$variant), )*
                    _ => None,
                }
            }

            /// The counter's slot in the counter map.
            pub const fn index(self) -> u32 {
                self as u32
            }
        }
    };
}

counters! {
    /// Frames the program ran on.
    RxPackets = 0, "rx_packets";
    /// Bytes of those frames (Ethernet header included).
    RxBytes = 1, "rx_bytes";
    /// Frames shorter than an Ethernet header.
    L2Truncated = 2, "l2_truncated";
    /// Frames whose EtherType (after any VLAN tags) is neither IPv4 nor IPv6 (ARP, LLDP, ...).
    L3Other = 3, "l3_other";
    /// IPv4 packets with a well-formed header.
    L3Ipv4 = 4, "l3_ipv4";
    /// IPv6 packets with a well-formed fixed header and extension-header chain.
    L3Ipv6 = 5, "l3_ipv6";
    /// IP headers that are truncated or inconsistent (IHL < 5, header or total length past the
    /// frame, IPv6 payload length past the frame, an extension header past the payload or a
    /// chain longer than the walk allows). Dropped.
    L3Malformed = 6, "l3_malformed";
    /// TCP segments with a complete fixed header.
    L4Tcp = 7, "l4_tcp";
    /// UDP datagrams with a complete header.
    L4Udp = 8, "l4_udp";
    /// IP packets carrying another protocol (ICMP, ICMPv6, ...).
    L4Other = 9, "l4_other";
    /// TCP, UDP or ICMP headers cut short by the end of the packet. Dropped.
    L4Truncated = 10, "l4_truncated";
    /// Non-first fragments: they carry no L4 header, so none is read.
    L4Fragment = 11, "l4_fragment";
    /// Frames passed to the host stack.
    ActionPass = 12, "action_pass";
    /// Frames dropped.
    ActionDrop = 13, "action_drop";
    /// Frames sent back out (XDP_TX).
    ActionTx = 14, "action_tx";
    /// Frames with one VLAN tag.
    Vlan1 = 15, "vlan_1";
    /// Frames with two VLAN tags (QinQ).
    Vlan2 = 16, "vlan_2";
    /// Frames with more than two VLAN tags: passed untouched.
    VlanTooMany = 17, "vlan_too_many";
    /// IP packets to no VIP: passed untouched.
    PassNotVip = 18, "pass_not_vip";
    /// Packets to L7-mode VIPs: passed to the host stack for the gateway.
    PassL7 = 19, "pass_l7";
    /// Forwarded in an outer IPv4 header (IPIP, or IPv6-in-IPv4).
    FwdEncapV4 = 20, "fwd_encap_v4";
    /// Forwarded in an outer IPv6 header (IP6IP6, or IPv4-in-IPv6).
    FwdEncapV6 = 21, "fwd_encap_v6";
    /// Forwarded by L2 DSR (destination MAC rewritten).
    FwdL2 = 22, "fwd_l2";
    /// VIP packets with no backend to send to (empty table, missing or down backend). Dropped.
    DropNoBackend = 23, "drop_no_backend";
    /// Connection-table hits that kept the flow on its backend.
    CtHit = 24, "ct_hit";
    /// Connection-table misses (a new backend was selected).
    CtMiss = 25, "ct_miss";
    /// Connection-table hits whose backend was down, so the flow was re-selected.
    CtReselect = 26, "ct_reselect";
    /// VIP packets that would exceed the egress MTU once encapsulated and may not get a
    /// too-big reply: IPv4 without DF (the sender allowed fragmentation, which the balancer
    /// does not do). Dropped.
    DropTooBig = 27, "drop_too_big";
    /// Later fragments to a VIP address whose first fragment was not seen (or was forgotten).
    /// Dropped, never sent to a guessed backend.
    DropFragUnknown = 28, "drop_frag_unknown";
    /// A VIP whose Maglev table is missing from the outer map (agent mid-install). Dropped.
    DropNoTable = 29, "drop_no_table";
    /// Frame growth for encapsulation failed (driver headroom). Dropped.
    DropAdjustFailed = 30, "drop_adjust_failed";
    /// ICMP "fragmentation needed" / ICMPv6 "packet too big" replies sent to clients whose
    /// packet would exceed the egress MTU once encapsulated.
    IcmpTooBigSent = 31, "icmp_too_big_sent";
    /// Decapsulator: IPv4-outer tunnel packets stripped and passed on.
    DecapV4 = 32, "decap_v4";
    /// Decapsulator: IPv6-outer tunnel packets stripped and passed on.
    DecapV6 = 33, "decap_v6";
    /// Decapsulator: tunnel packets not addressed to a local tunnel address: passed untouched.
    DecapNotLocal = 34, "decap_not_local";
    /// Decapsulator: tunnel packets whose inner header is missing or of the wrong version.
    /// Dropped.
    DecapMalformed = 35, "decap_malformed";
    /// Decapsulator: frames that are not tunnel packets: passed untouched.
    DecapPassthrough = 36, "decap_passthrough";
    /// ICMP / ICMPv6 echo requests to a VIP address answered by the balancer.
    IcmpEchoReplied = 37, "icmp_echo_replied";
    /// ICMP errors quoting a VIP flow, forwarded to the flow's backend.
    IcmpErrorForwarded = 38, "icmp_error_forwarded";
    /// ICMP errors to a VIP address whose quote is shorter than an IP header + 8 bytes.
    /// Dropped.
    DropIcmpQuoteShort = 39, "drop_icmp_quote_short";
    /// First fragments recorded so later fragments follow them.
    FragTracked = 40, "frag_tracked";
    /// Later fragments forwarded to the backend of their first fragment.
    FragForwarded = 41, "frag_forwarded";
    /// Cross-region: tunnel packets to one of this balancer's region tunnel addresses stripped
    /// to be balanced to this region's backends as if they had arrived directly (an inner
    /// packet for no VIP is then dropped and also counted in `drop_region_not_vip`).
    RegionDecap = 42, "region_decap";
    /// Cross-region: capacity probes from another region's agent (inner destination: this
    /// tunnel address), stripped and passed to the agent.
    RegionProbePassed = 43, "region_probe_passed";
    /// Cross-region: tunnel packets to a region tunnel address whose inner packet is neither
    /// for a VIP nor a probe, or is malformed. Dropped.
    DropRegionNotVip = 44, "drop_region_not_vip";
    /// New flows of a VIP sent to another region's xlb host.
    RegionForwarded = 45, "region_forwarded";
    /// New flows of a VIP whose every region is down, sent to the last resort (this host's
    /// backends, all of them, as in panic).
    RegionLastResort = 46, "region_last_resort";
}

const _: () = assert!(Counter::ALL.len() as u32 <= MAX_COUNTERS);
