//! The rules a configuration must satisfy, as functions over typed values. The file parser
//! ([`super::parse`]) reports each violation with file, line and key; run-time changes
//! ([`crate::runtime`]) check a whole effective configuration with [`check`]. One set of rules,
//! so a change made through the admin API is held to exactly what the file is held to.
//!
//! Health checks are not re-checked here: run-time changes never write one (a backend added at
//! run time inherits its VIP's check, which the file already validated).

use std::{collections::HashMap, hash::Hash, net::IpAddr, ops::RangeInclusive};

use super::{
    Bad, Config, ConfigErrorKind, DEFAULT_REGION, DEFAULT_TABLE_SIZE, MAX_TABLE_SIZE, MacAddr,
    Protocol, VipMode,
};
use crate::maglev;

/// Valid `vip.table_size`, in slots (a prime within it, see [`table_size`]).
pub const TABLE_SIZE_RANGE: RangeInclusive<u32> = 2..=MAX_TABLE_SIZE;
/// Valid `vip.backend.weight`.
pub const WEIGHT_RANGE: RangeInclusive<u32> = 0..=65535;
/// Valid `vip.port` (0: every port).
pub const PORT_RANGE: RangeInclusive<u32> = 0..=65535;
/// Valid `health_check.panic_threshold`, a share of the pool.
pub const SHARE_RANGE: RangeInclusive<f64> = 0.0..=1.0;

/// One broken rule: the kind of mistake and a message saying what is wrong and what would be
/// valid. The caller adds where (file, line and key; or the VIP and backend).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// What kind of mistake this is.
    pub kind: ConfigErrorKind,
    /// What is wrong and what would be valid.
    pub message: String,
}

impl Violation {
    fn new(kind: ConfigErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

impl From<Bad> for Violation {
    fn from(bad: Bad) -> Self {
        Self {
            kind: bad.kind,
            message: bad.message,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Values
// ---------------------------------------------------------------------------------------------

/// A VIP or region name: `[a-z0-9_-]+`.
pub fn name(s: &str) -> Result<String, Violation> {
    super::parse_name(s).map_err(Violation::from)
}

/// A Linux interface name (at most 15 bytes, no '/', ':' or whitespace, not "." or ".."): also
/// what makes it safe to use as a path component.
pub fn interface(s: &str) -> Result<String, Violation> {
    super::parse_interface(s).map_err(Violation::from)
}

/// A VIP's protocol: `"tcp"` or `"udp"`.
pub fn protocol(s: &str) -> Result<Protocol, Violation> {
    super::parse_protocol(s).map_err(Violation::from)
}

/// A VIP's mode: `"dsr-ipip"`, `"dsr-l2"` or `"l7"`.
pub fn mode(s: &str) -> Result<VipMode, Violation> {
    super::parse_mode(s).map_err(Violation::from)
}

/// A backend's MAC: six hex pairs, unicast, not all zero.
pub fn mac(s: &str) -> Result<MacAddr, Violation> {
    super::parse_mac(s).map_err(Violation::from)
}

/// An address usable as a VIP or backend (not unspecified, multicast or broadcast).
pub fn address(ip: IpAddr) -> Option<Violation> {
    super::parse_ip(&ip.to_string()).err().map(Violation::from)
}

/// An integer within `range`, worded as the file's integer keys are.
pub fn in_range(value: i128, range: RangeInclusive<u32>) -> Option<Violation> {
    let (start, end) = (i128::from(*range.start()), i128::from(*range.end()));
    (!(start..=end).contains(&value)).then(|| {
        Violation::new(
            ConfigErrorKind::OutOfRange,
            format!("{value} is out of range; expected {start}..={end}"),
        )
    })
}

/// A share of the pool (`panic_threshold`), 0.0..=1.0.
pub fn share(value: f64) -> Option<Violation> {
    (!SHARE_RANGE.contains(&value)).then(|| {
        Violation::new(
            ConfigErrorKind::OutOfRange,
            format!("{value} is out of range; expected 0.0..=1.0"),
        )
    })
}

// ---------------------------------------------------------------------------------------------
// One VIP
// ---------------------------------------------------------------------------------------------

/// An l7 VIP is served by the gateway, which speaks TCP only.
pub fn l7_protocol(mode: VipMode, protocol: Protocol) -> Option<Violation> {
    (mode == VipMode::L7 && protocol == Protocol::Udp).then(|| {
        Violation::new(
            ConfigErrorKind::Conflict,
            "an l7 VIP is served by the HTTP gateway, which speaks TCP; expected \
             protocol = \"tcp\", or an L4 mode (\"dsr-ipip\", \"dsr-l2\") for UDP",
        )
    })
}

/// An l7 VIP needs one port for the gateway to listen on.
pub fn l7_port(mode: VipMode, port: u16) -> Option<Violation> {
    (mode == VipMode::L7 && port == 0).then(|| {
        Violation::new(
            ConfigErrorKind::Conflict,
            "an l7 VIP needs a specific port for the gateway to listen on; expected \
             1..=65535 (port 0, every port, is for L4 modes)",
        )
    })
}

/// A VIP on a loopback or link-local address: routers never forward traffic for it to the
/// balancer, so it would never match a packet.
pub fn vip_scope(vip: IpAddr) -> Option<Violation> {
    let what = match vip {
        IpAddr::V4(a) if a.is_loopback() => "a loopback address",
        IpAddr::V4(a) if a.is_link_local() => "a link-local address",
        IpAddr::V6(a) if a.is_loopback() => "the loopback address",
        IpAddr::V6(a) if a.segments()[0] & 0xffc0 == 0xfe80 => "a link-local address",
        _ => return None,
    };
    Some(Violation::new(
        ConfigErrorKind::InvalidValue,
        format!(
            "{vip} is {what}, which never reaches the balancer from the network; expected a \
             routable address for the service"
        ),
    ))
}

/// A backend cannot be the VIP itself: its packets would come straight back to the balancer
/// (or, for l7, the gateway would proxy to itself).
pub fn backend_is_vip(vip: IpAddr, backend: IpAddr) -> Option<Violation> {
    (vip == backend).then(|| {
        Violation::new(
            ConfigErrorKind::Conflict,
            format!(
                "{backend} is the VIP's own address, so traffic would loop back to the \
                 balancer; expected the address of a real server"
            ),
        )
    })
}

/// The balancer cannot forward an L4 VIP's packets to a loopback address.
pub fn backend_loopback(mode: VipMode, backend: IpAddr) -> Option<Violation> {
    let is_l4 = matches!(mode, VipMode::DsrIpip | VipMode::DsrL2);
    (is_l4 && backend.is_loopback()).then(|| {
        Violation::new(
            ConfigErrorKind::InvalidValue,
            format!(
                "{backend} is a loopback address, which the balancer cannot forward to; expected \
                 the backend's address on the network"
            ),
        )
    })
}

/// dsr-l2 rewrites only the MAC, so its backends have the VIP's family.
pub fn backend_family(mode: VipMode, vip: IpAddr, backend: IpAddr) -> Option<Violation> {
    if mode != VipMode::DsrL2 || backend.is_ipv6() == vip.is_ipv6() {
        return None;
    }
    let (have, want) = if vip.is_ipv6() {
        ("IPv4", "IPv6")
    } else {
        ("IPv6", "IPv4")
    };
    Some(Violation::new(
        ConfigErrorKind::Conflict,
        format!(
            "an {have} backend on an {want} dsr-l2 VIP; dsr-l2 rewrites only the \
                 MAC, so backends must be {want} on the balancer's L2 segment; expected \
                 an {want} address, or mode = \"dsr-ipip\" to reach {have} backends"
        ),
    ))
}

/// A backend MAC is set: it only applies to dsr-l2 VIPs.
pub fn backend_mac(mode: VipMode) -> Option<Violation> {
    (mode != VipMode::DsrL2).then(|| {
        Violation::new(
            ConfigErrorKind::Conflict,
            format!(
                "a backend MAC only applies to dsr-l2 VIPs, and this VIP's mode is \
                     \"{mode}\"; remove `mac`, or set mode = \"dsr-l2\" on the VIP"
            ),
        )
    })
}

/// A backend listed twice in one VIP; `first` says where the first one is.
pub fn duplicate_backend(address: IpAddr, first: &str) -> Violation {
    Violation::new(
        ConfigErrorKind::Duplicate,
        format!("{address} is already a backend of this VIP ({first}); list each backend once"),
    )
}

/// A Maglev table of `size` slots for `weighted` backends with weight > 0: a prime (so every
/// backend's permutation visits every slot) of at least one slot per weighted backend.
pub fn table_size(size: u32, weighted: usize) -> Option<Violation> {
    if !maglev::is_prime(size) {
        let below = (2..size).rev().find(|&n| maglev::is_prime(n));
        let above = (size + 1..=MAX_TABLE_SIZE).find(|&n| maglev::is_prime(n));
        let hint = match (below, above) {
            (Some(b), Some(a)) => format!("the nearest primes are {b} and {a}"),
            (Some(b), None) => format!("the nearest prime is {b}"),
            (None, Some(a)) => format!("the nearest prime is {a}"),
            (None, None) => "no prime fits".to_owned(),
        };
        return Some(Violation::new(
            ConfigErrorKind::InvalidValue,
            format!(
                "{size} is not prime (Maglev needs a prime size so every backend's permutation \
                 visits every slot); {hint}"
            ),
        ));
    }
    ((size as usize) < weighted).then(|| {
        Violation::new(
            ConfigErrorKind::OutOfRange,
            format!(
                "{size} slots are too few for {weighted} backends with weight > 0; expected a \
                 prime of at least {weighted} (about 100 times that for even shares; the default \
                 is {DEFAULT_TABLE_SIZE})"
            ),
        )
    })
}

/// A backend's region must be one the VIP lists (when it lists any). `region` is `None` when
/// the backend names none (it is then in [`DEFAULT_REGION`]); `regions_key` names the list.
pub fn region(names: &[&str], regions_key: &str, region: Option<&str>) -> Option<Violation> {
    if names.is_empty() || names.contains(&region.unwrap_or(DEFAULT_REGION)) {
        return None;
    }
    let listed = super::quoted_list(names);
    Some(match region {
        Some(region) => Violation::new(
            ConfigErrorKind::Conflict,
            format!(
                "region {region:?} is not in {regions_key}; expected one of {listed}, or add it \
                 to the VIP's regions"
            ),
        ),
        None => Violation::new(
            ConfigErrorKind::MissingKey,
            format!(
                "the backend has no region, so it is in {DEFAULT_REGION:?}, which is not in \
                 {regions_key}; expected `region = ` one of {listed}"
            ),
        ),
    })
}

/// A VIP lists at most [`super::MAX_VIP_REGIONS`] regions (the data path's region levels).
pub fn region_count(count: usize) -> Option<Violation> {
    let limit = super::MAX_VIP_REGIONS;
    (count > limit).then(|| {
        Violation::new(
            ConfigErrorKind::OutOfRange,
            format!("{count} regions; expected at most {limit} per VIP"),
        )
    })
}

/// A `[vip.failover]` table on a VIP (at `vip`) with fewer than two regions has nothing to
/// fail over between.
pub fn failover_regions(count: usize, vip: &str) -> Option<Violation> {
    (count < 2).then(|| {
        Violation::new(
            ConfigErrorKind::Conflict,
            format!(
                "failover needs at least two regions, and {vip}.regions lists {count}; expected \
                 regions = [\"primary\", \"fallback\", ...] in priority order, or no \
                 failover table"
            ),
        )
    })
}

/// An l7 VIP is served by this host's gateway: it cannot list a region other than this
/// host's own (`local`).
pub fn l7_regions(region: &str, local: &str) -> Violation {
    Violation::new(
        ConfigErrorKind::Conflict,
        format!(
            "an l7 VIP is served by this host's HTTP gateway and cannot fail over to region \
             {region:?}; expected only this host's region ({local:?}, agent.region), or an L4 \
             mode (\"dsr-ipip\", \"dsr-l2\") for multi-region failover"
        ),
    )
}

/// A region a VIP lists is neither this host's (`local`) nor described by a `[[region]]`
/// table, so there is no host to send its flows to.
pub fn region_undefined(region: &str, local: &str) -> Violation {
    Violation::new(
        ConfigErrorKind::MissingKey,
        format!(
            "region {region:?} has no [[region]] table and is not this host's region ({local:?}, \
             agent.region); expected a [[region]] with name = {region:?} and the tunnel address \
             of its xlb host"
        ),
    )
}

/// A `[[region]]` table for this host's own region (`agent.region`).
pub fn region_is_local(local: &str) -> Violation {
    Violation::new(
        ConfigErrorKind::Conflict,
        format!(
            "{local:?} is this host's own region (agent.region), which is balanced here and has \
             no [[region]] table; expected the name of another region"
        ),
    )
}

/// Two `[[region]]` tables of one name; `first` says where the first is.
pub fn duplicate_region(name: &str, first: &str) -> Violation {
    Violation::new(
        ConfigErrorKind::Duplicate,
        format!("region {name:?} is already described by {first}; expected each region once"),
    )
}

/// Two regions with one tunnel address (one xlb host serves one region); `first` says which.
pub fn duplicate_tunnel(tunnel: IpAddr, first: &str) -> Violation {
    Violation::new(
        ConfigErrorKind::Duplicate,
        format!("{tunnel} is already the tunnel of {first}; expected each region's own xlb host"),
    )
}

/// A tunnel address must be reachable from other hosts: not loopback or link-local (the
/// unspecified, multicast and broadcast addresses are refused as for any address).
pub fn tunnel_scope(tunnel: IpAddr) -> Option<Violation> {
    let what = match tunnel {
        IpAddr::V4(a) if a.is_loopback() => "a loopback address",
        IpAddr::V4(a) if a.is_link_local() => "a link-local address",
        IpAddr::V6(a) if a.is_loopback() => "the loopback address",
        IpAddr::V6(a) if a.segments()[0] & 0xffc0 == 0xfe80 => "a link-local address",
        _ => return None,
    };
    Some(Violation::new(
        ConfigErrorKind::InvalidValue,
        format!(
            "{tunnel} is {what}, which other regions' hosts cannot reach; expected a unicast \
             address routed between the regions"
        ),
    ))
}

/// A tunnel address that is also a VIP's (`vip` names it): packets to it would be balanced
/// as the VIP's, not taken as tunnelled or capacity traffic.
pub fn tunnel_is_vip(tunnel: IpAddr, vip: &str) -> Violation {
    Violation::new(
        ConfigErrorKind::Conflict,
        format!(
            "{tunnel} is the address of {vip}; expected a tunnel address that is no VIP's \
             (the balancer takes packets to a VIP address as the VIP's traffic)"
        ),
    )
}

/// A region's tunnel that is one of this host's own (`own` names the key): flows sent there
/// would come straight back.
pub fn tunnel_is_own(tunnel: IpAddr, own: &str) -> Violation {
    Violation::new(
        ConfigErrorKind::Conflict,
        format!(
            "{tunnel} is this host's own tunnel address ({own}), so flows failed over to the \
             region would come back here; expected the address of that region's xlb host"
        ),
    )
}

/// A backend at a region tunnel address (this host's own, or another region's xlb host; `what`
/// names which): the balancer would encapsulate the VIP's flows to a host that strips the
/// tunnel and balances them again as flows failed over to it. To this host's own address that
/// is a loop through the router; to another region's host it is a region hop the failover
/// state never chose, and a loop if that host lists this one's address the same way. The
/// outer header is new at every round and the inner TTL is never decremented, so nothing
/// would end such a loop.
pub fn backend_is_tunnel(backend: IpAddr, what: &str) -> Violation {
    Violation::new(
        ConfigErrorKind::Conflict,
        format!(
            "{backend} is {what}, so the flows sent to it would be balanced again there (a loop \
             or a region hop the failover never chose); expected the address of a real server, \
             and the region in the VIP's regions to send flows to another region"
        ),
    )
}

// ---------------------------------------------------------------------------------------------
// Across VIPs
// ---------------------------------------------------------------------------------------------

/// Every repeated key as `(index, index of its first occurrence)`, in one pass (a file may
/// list tens of thousands of backends or thousands of VIPs). `None` keys (invalid, already
/// reported) take no part.
pub fn first_duplicates<K: Hash + Eq>(
    keys: impl IntoIterator<Item = Option<K>>,
) -> Vec<(usize, usize)> {
    let mut first: HashMap<K, usize> = HashMap::new();
    let mut out = Vec::new();
    for (i, key) in keys.into_iter().enumerate() {
        let Some(key) = key else { continue };
        let first_index = *first.entry(key).or_insert(i);
        if first_index != i {
            out.push((i, first_index));
        }
    }
    out
}

/// A VIP name used twice; `first` says which VIP has it.
pub fn duplicate_vip_name(name: &str, first: &str) -> Violation {
    Violation::new(
        ConfigErrorKind::Duplicate,
        format!("VIP name {name:?} is already used by {first}; expected a unique name"),
    )
}

/// An (address, port, protocol) served twice; `first` says which VIP serves it.
pub fn duplicate_vip_key(address: IpAddr, port: u16, protocol: Protocol, first: &str) -> Violation {
    Violation::new(
        ConfigErrorKind::Duplicate,
        format!(
            "{protocol} {address} port {port} is already served by {first}; expected each \
             (address, port, protocol) once"
        ),
    )
}

/// The maps hold at most [`lb_common::types::MAX_VIPS`] VIPs.
pub fn vip_limit(count: usize) -> Option<Violation> {
    let limit = lb_common::types::MAX_VIPS as usize;
    (count > limit).then(|| {
        Violation::new(
            ConfigErrorKind::OutOfRange,
            format!("too many VIPs; expected at most {limit}"),
        )
    })
}

/// The maps hold at most [`lb_common::types::MAX_BACKENDS`] backends over all VIPs.
pub fn backend_limit(total: usize) -> Option<Violation> {
    let limit = lb_common::types::MAX_BACKENDS as usize;
    (total > limit).then(|| {
        Violation::new(
            ConfigErrorKind::OutOfRange,
            format!("{total} backends in all; expected at most {limit} over all VIPs"),
        )
    })
}

/// Whether a backend of a VIP in `mode` needs the tunnel source of its family (`v6`): the
/// outer header has the backend's family, whatever the VIP's.
pub fn needs_encap_source(mode: VipMode, backend: IpAddr, v6: bool) -> bool {
    mode.encapsulates() && backend.is_ipv6() == v6
}

/// Whether a VIP in `mode` that lists a remote region whose xlb host is at `tunnel` needs the
/// tunnel source of family `v6`: flows to another region are always encapsulated (dsr-l2
/// VIPs too), with the tunnel's family.
pub fn needs_region_encap_source(mode: VipMode, tunnel: IpAddr, v6: bool) -> bool {
    mode != VipMode::L7 && tunnel.is_ipv6() == v6
}

/// The tunnel source of family `v6` is missing although `vip` fails over to `region`, whose
/// xlb host is at `tunnel`. Returns the `[agent]` key that is missing, and the violation.
pub fn region_encap_source_missing(
    v6: bool,
    vip: &str,
    region: &str,
    tunnel: IpAddr,
) -> (&'static str, Violation) {
    let (family, key, example, how) = if v6 {
        ("IPv6", "encap_source_v6", "\"fd00:ff::/96\"", "IPv6-in-IP")
    } else {
        ("IPv4", "encap_source_v4", "\"10.255.0.0/16\"", "IPIP")
    };
    let message = format!(
        "required key is missing: {vip} lists region {region:?}, whose xlb host {tunnel} is \
         reached by {how}, which needs an outer {family} source; expected an {family} address \
         or prefix such as {example}"
    );
    (key, Violation::new(ConfigErrorKind::MissingKey, message))
}

/// The tunnel source of family `v6` is missing although `vip` forwards to `backend` by
/// encapsulation. Returns the `[agent]` key that is missing, and the violation.
pub fn encap_source_missing(v6: bool, vip: &str, backend: &str) -> (&'static str, Violation) {
    let (family, key, example, how) = if v6 {
        ("IPv6", "encap_source_v6", "\"fd00:ff::/96\"", "IPv6-in-IP")
    } else {
        ("IPv4", "encap_source_v4", "\"10.255.0.0/16\"", "IPIP")
    };
    let message = format!(
        "required key is missing: {vip} forwards to {family} backends such as {backend} by \
         {how} (dsr-ipip), which needs an outer {family} source; expected an {family} \
         address or prefix such as {example}"
    );
    (key, Violation::new(ConfigErrorKind::MissingKey, message))
}

// ---------------------------------------------------------------------------------------------
// A whole typed configuration
// ---------------------------------------------------------------------------------------------

/// Checks a typed configuration (the file's VIPs with run-time changes over them) against
/// every rule above. Each message says where: `vip "web": backend 10.0.0.3: ...`, or the
/// `[agent]` key. Empty when the configuration is valid.
pub fn check(cfg: &Config) -> Vec<String> {
    let mut out = Vec::new();
    for vip in &cfg.vips {
        let at = format!("vip {:?}", vip.name);
        let mut say = |where_: &str, v: Option<Violation>| {
            if let Some(v) = v {
                out.push(format!(
                    "{where_}: {}",
                    super::abbreviate_quotes(&v.message)
                ));
            }
        };
        say(&at, name(&vip.name).err());
        say(&at, address(vip.address));
        say(&at, vip_scope(vip.address));
        let size_ok = TABLE_SIZE_RANGE.contains(&vip.table_size);
        say(
            &format!("{at}: table_size"),
            in_range(i128::from(vip.table_size), TABLE_SIZE_RANGE),
        );
        say(
            &format!("{at}: panic_threshold"),
            share(vip.panic_threshold),
        );
        say(&at, l7_protocol(vip.mode, vip.protocol));
        say(&at, l7_port(vip.mode, vip.port));
        // An l7 VIP's servers are told apart by port too (`port` is `None` on other VIPs).
        for (i, first) in first_duplicates(vip.backends.iter().map(|b| Some((b.address, b.port)))) {
            let address = vip.backends[i].address;
            say(
                &at,
                Some(duplicate_backend(
                    address,
                    &format!("listed as backend {first}"),
                )),
            );
        }
        let regions: Vec<&str> = vip.regions.iter().map(String::as_str).collect();
        let regions_key = format!("the regions of VIP {:?}", vip.name);
        for b in &vip.backends {
            let at = format!("{at}: backend {}", b.address);
            say(&at, address(b.address));
            say(&at, backend_loopback(vip.mode, b.address));
            say(&at, backend_family(vip.mode, vip.address, b.address));
            say(&at, backend_is_vip(vip.address, b.address));
            if let Some(m) = b.mac {
                say(&at, backend_mac(vip.mode));
                say(&at, mac(&m.to_string()).err());
            }
            say(&at, region(&regions, &regions_key, Some(&b.region)));
            say(&at, name(&b.region).err());
        }
        if size_ok {
            let weighted = vip.backends.iter().filter(|b| b.weight > 0).count();
            say(
                &format!("{at}: table_size"),
                table_size(vip.table_size, weighted),
            );
        }
        let local = cfg.agent.region.as_str();
        let at_regions = format!("{at}: regions");
        say(&at_regions, region_count(vip.regions.len()));
        for region in vip.regions.iter().filter(|r| *r != local) {
            if vip.mode == VipMode::L7 {
                say(&at_regions, Some(l7_regions(region, local)));
            } else if cfg.region(region).is_none() {
                say(&at_regions, Some(region_undefined(region, local)));
            }
        }
    }
    for region in &cfg.regions {
        let at = format!("region {:?}", region.name);
        if region.name == cfg.agent.region {
            out.push(format!("{at}: {}", region_is_local(&region.name).message));
        }
        for vip in cfg.vips.iter().filter(|v| v.address == region.tunnel) {
            let v = tunnel_is_vip(region.tunnel, &format!("VIP {:?}", vip.name));
            out.push(format!("{at}: {}", v.message));
        }
    }
    for vip in &cfg.vips {
        for b in &vip.backends {
            let what = if cfg.agent.tunnel_addresses.contains(&b.address) {
                Some("this host's own tunnel address (agent.tunnel_addresses)".to_owned())
            } else {
                cfg.regions
                    .iter()
                    .find(|r| r.tunnel == b.address)
                    .map(|r| format!("the tunnel of region {:?}", r.name))
            };
            if let Some(what) = what {
                let v = backend_is_tunnel(b.address, &what);
                out.push(format!(
                    "vip {:?}: backend {}: {}",
                    vip.name, b.address, v.message
                ));
            }
        }
    }
    for tunnel in &cfg.agent.tunnel_addresses {
        for vip in cfg.vips.iter().filter(|v| v.address == *tunnel) {
            let v = tunnel_is_vip(*tunnel, &format!("VIP {:?}", vip.name));
            out.push(format!("agent.tunnel_addresses: {}", v.message));
        }
    }

    for (i, _) in first_duplicates(cfg.vips.iter().map(|v| Some(v.name.as_str()))) {
        let v = duplicate_vip_name(&cfg.vips[i].name, "another VIP");
        out.push(format!("vip {:?}: {}", cfg.vips[i].name, v.message));
    }
    let keys = cfg
        .vips
        .iter()
        .map(|v| Some((v.address, v.port, v.protocol)));
    for (i, first) in first_duplicates(keys) {
        let vip = &cfg.vips[i];
        let v = duplicate_vip_key(
            vip.address,
            vip.port,
            vip.protocol,
            &format!("VIP {:?}", cfg.vips[first].name),
        );
        out.push(format!("vip {:?}: {}", vip.name, v.message));
    }
    if let Some(v) = vip_limit(cfg.vips.len()) {
        out.push(v.message);
    }
    if let Some(v) = backend_limit(cfg.backend_count()) {
        out.push(v.message);
    }
    for (v6, present) in [
        (false, cfg.agent.encap_source_v4.is_some()),
        (true, cfg.agent.encap_source_v6.is_some()),
    ] {
        if present {
            continue;
        }
        let needing = cfg.vips.iter().find_map(|vip| {
            vip.backends
                .iter()
                .find(|b| needs_encap_source(vip.mode, b.address, v6))
                .map(|b| (vip, b))
        });
        if let Some((vip, backend)) = needing {
            let (key, v) = encap_source_missing(
                v6,
                &format!("VIP {:?}", vip.name),
                &backend.address.to_string(),
            );
            out.push(format!("agent.{key}: {}", v.message));
            continue;
        }
        let needing = cfg.vips.iter().find_map(|vip| {
            vip.regions
                .iter()
                .filter(|r| **r != cfg.agent.region)
                .filter_map(|r| cfg.region(r))
                .find(|r| needs_region_encap_source(vip.mode, r.tunnel, v6))
                .map(|r| (vip, r))
        });
        if let Some((vip, region)) = needing {
            let (key, v) = region_encap_source_missing(
                v6,
                &format!("VIP {:?}", vip.name),
                &region.name,
                region.tunnel,
            );
            out.push(format!("agent.{key}: {}", v.message));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;

    fn base() -> Config {
        parse(
            "xlb.toml",
            r#"
[agent]
interface = "eth0"
encap_source_v4 = "10.255.0.0/16"

[[vip]]
name = "web"
address = "192.0.2.10"
port = 80
protocol = "tcp"
table_size = 7

[[vip.backend]]
address = "10.0.0.1"

[[vip.backend]]
address = "10.0.0.2"
"#,
        )
        .expect("valid")
    }

    #[test]
    fn a_valid_file_passes_the_typed_check() {
        assert!(check(&base()).is_empty());
        let example = parse("xlb.toml", include_str!("../../../examples/xlb.toml")).unwrap();
        assert_eq!(check(&example), Vec::<String>::new());
    }

    #[test]
    fn the_typed_check_finds_what_the_file_check_finds() {
        let mut cfg = base();
        let mut b = cfg.vips[0].backends[0].clone();
        cfg.vips[0].backends.push(b.clone());
        b.address = "2001:db8::1".parse().unwrap();
        cfg.vips[0].backends.push(b);
        let mut other = cfg.vips[0].clone();
        other.backends.clear();
        cfg.vips.push(other);
        cfg.vips[0].table_size = 3;
        let errors = check(&cfg);
        let has = |needle: &str| errors.iter().any(|e| e.contains(needle));
        assert!(
            has("10.0.0.1 is already a backend of this VIP"),
            "{errors:#?}"
        );
        assert!(has("3 slots are too few for 4 backends"), "{errors:#?}");
        assert!(has("VIP name \"web\" is already used"), "{errors:#?}");
        assert!(
            has("tcp 192.0.2.10 port 80 is already served by VIP \"web\""),
            "{errors:#?}"
        );
        assert!(
            has("agent.encap_source_v6: required key is missing: VIP \"web\" forwards to IPv6"),
            "{errors:#?}"
        );
    }

    #[test]
    fn duplicates_are_found_in_one_pass() {
        assert_eq!(
            first_duplicates([Some(1), None, Some(2), Some(1), None, Some(1)]),
            [(3, 0), (5, 0)]
        );
    }

    #[test]
    fn values_are_checked_as_the_file_checks_them() {
        assert!(name("Web").is_err());
        assert!(address("0.0.0.0".parse().unwrap()).is_some());
        assert!(
            in_range(70000, WEIGHT_RANGE)
                .unwrap()
                .message
                .contains("expected 0..=65535")
        );
        assert!(share(1.5).is_some() && share(f64::NAN).is_some() && share(0.3).is_none());
        assert!(mac("ff:ff:ff:ff:ff:ff").is_err());
    }
}
