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
    /// Frames whose EtherType is neither IPv4 nor IPv6 (ARP, LLDP, VLAN-tagged for now, ...).
    L3Other = 3, "l3_other";
    /// IPv4 packets with a well-formed header.
    L3Ipv4 = 4, "l3_ipv4";
    /// IPv6 packets with a well-formed fixed header.
    L3Ipv6 = 5, "l3_ipv6";
    /// IP headers that are truncated or inconsistent (IHL < 5, header or total length past the
    /// frame, IPv6 payload length past the frame).
    L3Malformed = 6, "l3_malformed";
    /// TCP segments with a complete fixed header.
    L4Tcp = 7, "l4_tcp";
    /// UDP datagrams with a complete header.
    L4Udp = 8, "l4_udp";
    /// IP packets carrying another protocol (ICMP, ICMPv6, extension headers, ...).
    L4Other = 9, "l4_other";
    /// TCP or UDP headers cut short by the end of the packet.
    L4Truncated = 10, "l4_truncated";
    /// Non-first IPv4 fragments: they carry no L4 header, so none is read.
    L4Fragment = 11, "l4_fragment";
    /// Frames passed to the host stack.
    ActionPass = 12, "action_pass";
}

const _: () = assert!(Counter::ALL.len() as u32 <= MAX_COUNTERS);
