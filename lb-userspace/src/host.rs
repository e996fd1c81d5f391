//! Facts about the host the agent reads from the kernel: an interface's MAC, the default
//! gateway's MAC, a neighbour's MAC. Read from /sys and /proc of the agent's network namespace.

use std::{
    fs,
    net::{IpAddr, Ipv4Addr},
};

use thiserror::Error;

/// What could not be found out.
#[derive(Debug, Error)]
pub enum HostError {
    /// The interface does not exist (or has no MAC).
    #[error("interface {interface}: cannot read its MAC address ({reason})")]
    InterfaceMac {
        /// The interface.
        interface: String,
        /// Why.
        reason: String,
    },
    /// No IPv4 default route leaves through the interface.
    #[error("no IPv4 default route via {interface}; set agent.next_hop_mac to the router's MAC")]
    NoDefaultRoute {
        /// The interface.
        interface: String,
    },
    /// The neighbour table has no complete entry for the address.
    #[error(
        "no neighbour entry for {address} on {interface} (the host has not talked to it yet); \
         set the MAC explicitly"
    )]
    NoNeighbour {
        /// The address.
        address: IpAddr,
        /// The interface.
        interface: String,
    },
}

/// Whether a network interface of that name exists in this network namespace.
pub fn interface_exists(interface: &str) -> bool {
    !interface.is_empty()
        && !interface.contains('/')
        && std::path::Path::new("/sys/class/net")
            .join(interface)
            .exists()
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.trim().split(':');
    for byte in &mut mac {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// The MAC address of `interface`.
pub fn interface_mac(interface: &str) -> Result<[u8; 6], HostError> {
    let path = format!("/sys/class/net/{interface}/address");
    let text = fs::read_to_string(&path).map_err(|e| HostError::InterfaceMac {
        interface: interface.to_string(),
        reason: e.to_string(),
    })?;
    parse_mac(&text).ok_or_else(|| HostError::InterfaceMac {
        interface: interface.to_string(),
        reason: format!("unexpected contents {text:?}"),
    })
}

/// The IPv4 default gateway through `interface`, from the kernel's route table text
/// (`/proc/net/route`: hex, little-endian addresses).
pub fn default_gateway_v4(route_table: &str, interface: &str) -> Option<Ipv4Addr> {
    route_table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 || f[0] != interface || f[1] != "00000000" || f[7] != "00000000" {
            return None;
        }
        let gw = u32::from_str_radix(f[2], 16).ok()?;
        (gw != 0).then(|| Ipv4Addr::from(gw.to_le_bytes()))
    })
}

/// The MAC of `address` on `interface` from the kernel's ARP table text (`/proc/net/arp`),
/// if the entry is complete.
pub fn arp_mac(arp_table: &str, address: Ipv4Addr, interface: &str) -> Option<[u8; 6]> {
    arp_table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        // IP, HW type, flags (0x2 = complete), HW address, mask, device
        if f.len() < 6 || f[5] != interface || f[0].parse::<Ipv4Addr>().ok()? != address {
            return None;
        }
        let flags = u32::from_str_radix(f[2].trim_start_matches("0x"), 16).ok()?;
        if flags & 0x2 == 0 {
            return None;
        }
        parse_mac(f[3])
    })
}

/// The MAC of the IPv4 default gateway through `interface`.
pub fn gateway_mac(interface: &str) -> Result<[u8; 6], HostError> {
    let routes = fs::read_to_string("/proc/net/route").unwrap_or_default();
    let gw = default_gateway_v4(&routes, interface).ok_or_else(|| HostError::NoDefaultRoute {
        interface: interface.to_string(),
    })?;
    neighbour_mac(IpAddr::V4(gw), interface)
}

/// The MAC of a neighbour (IPv4) on `interface`.
pub fn neighbour_mac(address: IpAddr, interface: &str) -> Result<[u8; 6], HostError> {
    let IpAddr::V4(v4) = address else {
        return Err(HostError::NoNeighbour {
            address,
            interface: interface.to_string(),
        });
    };
    let arp = fs::read_to_string("/proc/net/arp").unwrap_or_default();
    arp_mac(&arp, v4, interface).ok_or_else(|| HostError::NoNeighbour {
        address,
        interface: interface.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_strictly() {
        assert_eq!(
            parse_mac("02:00:0a:ff:00:01\n"),
            Some([2, 0, 10, 255, 0, 1])
        );
        assert_eq!(parse_mac("02:00:0a:ff:00"), None);
        assert_eq!(parse_mac("02:00:0a:ff:00:01:02"), None);
        assert_eq!(parse_mac("zz:00:0a:ff:00:01"), None);
    }

    #[test]
    fn the_default_gateway_is_read_from_the_route_table() {
        let table = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                     eth0\t0002630A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                     eth0\t00000000\t0102630A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n";
        assert_eq!(
            default_gateway_v4(table, "eth0"),
            Some(Ipv4Addr::new(10, 99, 2, 1))
        );
        assert_eq!(default_gateway_v4(table, "eth1"), None);
    }

    #[test]
    fn only_complete_arp_entries_count() {
        let arp = "IP address       HW type     Flags       HW address            Mask     Device\n\
                   10.99.2.1        0x1         0x2         02:aa:bb:cc:dd:01     *        eth0\n\
                   10.99.2.9        0x1         0x0         00:00:00:00:00:00     *        eth0\n";
        assert_eq!(
            arp_mac(arp, Ipv4Addr::new(10, 99, 2, 1), "eth0"),
            Some([2, 0xaa, 0xbb, 0xcc, 0xdd, 1])
        );
        assert_eq!(arp_mac(arp, Ipv4Addr::new(10, 99, 2, 9), "eth0"), None);
        assert_eq!(arp_mac(arp, Ipv4Addr::new(10, 99, 2, 1), "eth1"), None);
    }
}
