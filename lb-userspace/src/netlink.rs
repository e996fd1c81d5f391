//! The host's route and neighbour tables over rtnetlink: the next hop the balancer sends to (the
//! default route's gateway and its MAC), the MACs of `dsr-l2` backends, and a stream of change
//! notifications so the agent re-resolves them when the kernel's view changes (a new router, a
//! moved backend) instead of forwarding to a stale MAC.
//!
//! The selection rules are pure functions over small fact structs, tested without a kernel.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use futures_util::{StreamExt as _, TryStreamExt as _};
use netlink_packet_route::{
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState},
    route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteType},
};
use rtnetlink::{Handle, IpVersion, MulticastGroup, RouteMessageBuilder};
use thiserror::Error;

/// What went wrong talking to the kernel.
#[derive(Debug, Error)]
pub enum NetlinkError {
    /// The netlink socket could not be opened.
    #[error("opening a netlink socket: {0}")]
    Socket(#[from] std::io::Error),
    /// A dump request failed.
    #[error("netlink {what} dump: {source}")]
    Dump {
        /// "route" or "neighbour".
        what: &'static str,
        /// The error.
        #[source]
        source: rtnetlink::Error,
    },
}

/// One route, reduced to what next-hop selection needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteFacts {
    /// Destination prefix length (0 for a default route).
    pub prefix_len: u8,
    /// Routing table id.
    pub table: u32,
    /// Output interface index, when the route names one.
    pub oif: Option<u32>,
    /// Gateway, when the route has one.
    pub gateway: Option<IpAddr>,
    /// Route priority (metric); lower wins.
    pub priority: u32,
    /// A unicast route (not blackhole, unreachable, ...).
    pub unicast: bool,
}

/// The main routing table's id.
const MAIN_TABLE: u32 = 254;

/// The gateways of the default routes of the main table that leave through `ifindex`, best
/// (lowest metric) first; IPv4 before IPv6 at equal metric.
pub fn default_gateways(routes: &[RouteFacts], ifindex: u32) -> Vec<IpAddr> {
    let mut out: Vec<(u32, bool, IpAddr)> = routes
        .iter()
        .filter(|r| r.prefix_len == 0 && r.table == MAIN_TABLE && r.unicast)
        .filter(|r| r.oif == Some(ifindex))
        .filter_map(|r| Some((r.priority, r.gateway?.is_ipv6(), r.gateway?)))
        .collect();
    out.sort();
    out.dedup();
    out.into_iter().map(|(_, _, gw)| gw).collect()
}

/// One neighbour entry, reduced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NeighbourFacts {
    /// The neighbour's address.
    pub address: IpAddr,
    /// Interface index.
    pub ifindex: u32,
    /// Its state.
    pub state: NeighbourState,
    /// Its link-layer address, when known.
    pub mac: Option<[u8; 6]>,
}

/// Whether an entry's MAC can be used: the kernel has (or had recently) confirmed it. Stale,
/// delay and probe entries still carry the last confirmed MAC, which is what the kernel itself
/// would send to; incomplete and failed ones carry none.
pub fn usable(n: &NeighbourFacts) -> Option<[u8; 6]> {
    match n.state {
        NeighbourState::Reachable
        | NeighbourState::Stale
        | NeighbourState::Delay
        | NeighbourState::Probe
        | NeighbourState::Permanent
        | NeighbourState::Noarp => n.mac.filter(|m| *m != [0; 6]),
        _ => None,
    }
}

/// The usable MACs of the neighbours on `ifindex`.
pub fn neighbour_macs(entries: &[NeighbourFacts], ifindex: u32) -> BTreeMap<IpAddr, [u8; 6]> {
    entries
        .iter()
        .filter(|n| n.ifindex == ifindex)
        .filter_map(|n| Some((n.address, usable(n)?)))
        .collect()
}

/// A netlink connection for route and neighbour dumps.
#[derive(Debug, Clone)]
pub struct Tables {
    handle: Handle,
}

impl Tables {
    /// Opens the connection (its I/O runs as a task on the current tokio runtime).
    pub fn open() -> Result<Self, NetlinkError> {
        let (connection, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(connection);
        Ok(Self { handle })
    }

    /// Every IPv4 and IPv6 route of every table.
    pub async fn routes(&self) -> Result<Vec<RouteFacts>, NetlinkError> {
        let mut out = Vec::new();
        for request in [
            RouteMessageBuilder::<Ipv4Addr>::new().build(),
            RouteMessageBuilder::<Ipv6Addr>::new().build(),
        ] {
            let mut stream = self.handle.route().get(request).execute();
            while let Some(msg) = stream
                .try_next()
                .await
                .map_err(|source| NetlinkError::Dump {
                    what: "route",
                    source,
                })?
            {
                out.push(route_facts(&msg));
            }
        }
        Ok(out)
    }

    /// Every IPv4 and IPv6 neighbour entry.
    pub async fn neighbours(&self) -> Result<Vec<NeighbourFacts>, NetlinkError> {
        let mut out = Vec::new();
        for family in [IpVersion::V4, IpVersion::V6] {
            let mut stream = self.handle.neighbours().get().set_family(family).execute();
            while let Some(msg) = stream
                .try_next()
                .await
                .map_err(|source| NetlinkError::Dump {
                    what: "neighbour",
                    source,
                })?
            {
                let mut address = None;
                let mut mac = None;
                for attr in &msg.attributes {
                    match attr {
                        NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => {
                            address = Some(IpAddr::V4(*a))
                        }
                        NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => {
                            address = Some(IpAddr::V6(*a))
                        }
                        NeighbourAttribute::LinkLayerAddress(bytes) => {
                            mac = <[u8; 6]>::try_from(bytes.as_slice()).ok()
                        }
                        _ => {}
                    }
                }
                if let Some(address) = address {
                    out.push(NeighbourFacts {
                        address,
                        ifindex: msg.header.ifindex,
                        state: msg.header.state,
                        mac,
                    });
                }
            }
        }
        Ok(out)
    }
}

fn route_facts(msg: &RouteMessage) -> RouteFacts {
    let mut facts = RouteFacts {
        prefix_len: msg.header.destination_prefix_length,
        table: u32::from(msg.header.table),
        oif: None,
        gateway: None,
        priority: 0,
        unicast: msg.header.kind == RouteType::Unicast,
    };
    for attr in &msg.attributes {
        match attr {
            RouteAttribute::Oif(i) => facts.oif = Some(*i),
            RouteAttribute::Table(t) => facts.table = *t,
            RouteAttribute::Priority(p) => facts.priority = *p,
            RouteAttribute::Gateway(RouteAddress::Inet(a)) => facts.gateway = Some(IpAddr::V4(*a)),
            RouteAttribute::Gateway(RouteAddress::Inet6(a)) => facts.gateway = Some(IpAddr::V6(*a)),
            _ => {}
        }
    }
    if facts.table == u32::from(RouteHeader::RT_TABLE_UNSPEC) {
        facts.table = MAIN_TABLE;
    }
    facts
}

/// Notifications of route, neighbour and link changes (what `ip monitor` shows).
pub struct Changes {
    messages: futures_util::stream::BoxStream<'static, ()>,
}

impl std::fmt::Debug for Changes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Changes")
    }
}

impl Changes {
    /// Subscribes (its I/O runs as a task on the current tokio runtime).
    pub fn subscribe() -> Result<Self, NetlinkError> {
        let (connection, _handle, messages) = rtnetlink::new_multicast_connection(&[
            MulticastGroup::Neigh,
            MulticastGroup::Ipv4Route,
            MulticastGroup::Ipv6Route,
            MulticastGroup::Link,
        ])?;
        tokio::spawn(connection);
        Ok(Self {
            messages: messages.map(|_| ()).boxed(),
        })
    }

    /// Waits for the next change, then for the burst it belongs to to settle (a route change
    /// comes with several messages): returns once `quiet` passes without another. `None` when
    /// the subscription ended.
    pub async fn next_burst(&mut self, quiet: std::time::Duration) -> Option<()> {
        self.messages.next().await?;
        loop {
            match tokio::time::timeout(quiet, self.messages.next()).await {
                Ok(Some(())) => continue,
                Ok(None) => return None,
                Err(_) => return Some(()),
            }
        }
    }
}

/// Asks the kernel to resolve `address` on `interface` (ARP or neighbour discovery) by sending
/// one empty UDP datagram to its discard port: the balancer's own frames bypass the kernel's
/// neighbour machinery, so an entry nobody else uses may never be created or may expire.
pub fn prompt_resolution(address: IpAddr, interface: &str) {
    let bind: std::net::SocketAddr = match address {
        IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let Ok(socket) = std::net::UdpSocket::bind(bind) else {
        return;
    };
    let name = interface.as_bytes();
    // SAFETY: setsockopt on a socket we own with a buffer of the given length.
    unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            libc::SOL_SOCKET,
            libc::SO_BINDTODEVICE,
            name.as_ptr().cast(),
            name.len() as libc::socklen_t,
        );
    }
    let _ = socket.send_to(&[], (address, 9));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(prefix_len: u8, oif: u32, gw: &str, priority: u32) -> RouteFacts {
        RouteFacts {
            prefix_len,
            table: MAIN_TABLE,
            oif: Some(oif),
            gateway: Some(gw.parse().unwrap()),
            priority,
            unicast: true,
        }
    }

    #[test]
    fn the_default_gateway_is_the_lowest_metric_default_route_through_the_interface() {
        let routes = vec![
            route(24, 2, "10.0.0.9", 0),
            route(0, 3, "10.9.9.1", 0),
            route(0, 2, "10.0.0.2", 200),
            route(0, 2, "10.0.0.1", 100),
            route(0, 2, "fe80::1", 100),
            RouteFacts {
                table: 100,
                ..route(0, 2, "10.0.0.7", 0)
            },
            RouteFacts {
                unicast: false,
                ..route(0, 2, "10.0.0.8", 0)
            },
        ];
        let got = default_gateways(&routes, 2);
        let want: Vec<IpAddr> = ["10.0.0.1", "fe80::1", "10.0.0.2"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(got, want);
        assert!(default_gateways(&routes, 9).is_empty());
    }

    #[test]
    fn only_confirmed_neighbour_entries_give_a_mac() {
        let mac = Some([2, 0, 0, 0, 0, 1]);
        let entry = |state, mac| NeighbourFacts {
            address: "10.0.0.1".parse().unwrap(),
            ifindex: 2,
            state,
            mac,
        };
        for state in [
            NeighbourState::Reachable,
            NeighbourState::Stale,
            NeighbourState::Delay,
            NeighbourState::Probe,
            NeighbourState::Permanent,
        ] {
            assert_eq!(usable(&entry(state, mac)), mac, "{state:?}");
        }
        for state in [
            NeighbourState::Incomplete,
            NeighbourState::Failed,
            NeighbourState::None,
        ] {
            assert_eq!(usable(&entry(state, mac)), None, "{state:?}");
        }
        assert_eq!(
            usable(&entry(NeighbourState::Reachable, Some([0; 6]))),
            None
        );
        assert_eq!(usable(&entry(NeighbourState::Reachable, None)), None);
        let macs = neighbour_macs(&[entry(NeighbourState::Reachable, mac)], 3);
        assert!(macs.is_empty(), "other interfaces do not count");
    }
}
