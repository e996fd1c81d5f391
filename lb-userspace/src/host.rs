//! Facts about the host the agent reads from /sys of its network namespace: whether an
//! interface exists and its MAC. Routes and neighbours come over netlink (`crate::netlink`).

use std::fs;

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
}
