//! The agent's configuration file, `xlb.toml`: its schema as typed data, and [`parse`], which
//! validates a whole file and reports every mistake in it at once, each with file, line and key.
//!
//! Pure logic: [`parse`] reads no file and touches nothing on the system; [`load`] is the one
//! function here that does I/O. A [`Config`] holds validated, typed values (addresses, ports,
//! enums, durations), so nothing downstream parses a string again.
//!
//! The file is walked over `toml`'s spanned document tree rather than deserialized with serde
//! derive, because serde stops at the first error and an operator fixing a file wants all of
//! them. The schema keeps serde's `default, deny_unknown_fields` discipline by hand: each table
//! lists its allowed keys once (`*_KEYS`), and every default is a `DEFAULT_*` constant below.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::{Range, RangeInclusive};
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use crate::maglev;

pub mod l7;
pub mod rules;

use rules::Violation;

// ---------------------------------------------------------------------------------------------
// Defaults and limits
// ---------------------------------------------------------------------------------------------

/// Default of `agent.egress_mtu`, in bytes.
pub const DEFAULT_EGRESS_MTU: u16 = 1500;
/// Valid `agent.egress_mtu`, in bytes: IPv6's minimum link MTU up to common jumbo frames.
pub const EGRESS_MTU_RANGE: RangeInclusive<u16> = 1280..=9216;
/// Default of `agent.admin_socket`.
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/xlb/admin.sock";
/// Default of `agent.metrics_listen`.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9641";
/// Default of `agent.state_dir`.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/xlb";
/// Default of `agent.bpffs_dir`.
pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/xlb";
/// Default of `agent.flow_table_entries`: the connection table the loader creates by default.
pub const DEFAULT_FLOW_TABLE_ENTRIES: u32 = lb_common::types::DEFAULT_FLOW_ENTRIES;
/// Valid `agent.flow_table_entries`.
pub const FLOW_TABLE_ENTRIES_RANGE: RangeInclusive<u32> = 1024..=16_777_216;
/// Default of `vip.table_size`, in slots.
pub const DEFAULT_TABLE_SIZE: u32 = maglev::DEFAULT_TABLE_SIZE;
/// Largest valid `vip.table_size`: the largest prime below 2^20 (4 MiB of map memory per table).
pub const MAX_TABLE_SIZE: u32 = 1_048_573;
/// Default of `vip.backend.weight`.
pub const DEFAULT_WEIGHT: u16 = 100;
/// Default of `vip.backend.region`.
pub const DEFAULT_REGION: &str = "local";
/// Default of `health_check.interval_ms`, in milliseconds.
pub const DEFAULT_CHECK_INTERVAL_MS: u32 = 2000;
/// Valid `health_check.interval_ms`, in milliseconds (100 ms to one hour).
pub const CHECK_INTERVAL_MS_RANGE: RangeInclusive<u32> = 100..=3_600_000;
/// Default of `health_check.timeout_ms`, in milliseconds.
pub const DEFAULT_CHECK_TIMEOUT_MS: u32 = 1000;
/// Default of `health_check.rise`, in consecutive passed checks.
pub const DEFAULT_RISE: u8 = 2;
/// Default of `health_check.fall`, in consecutive failed checks.
pub const DEFAULT_FALL: u8 = 3;
/// Valid `health_check.rise` and `health_check.fall`.
pub const RISE_FALL_RANGE: RangeInclusive<u8> = 1..=100;
/// Default of `health_check.path`.
pub const DEFAULT_HTTP_PATH: &str = "/";
/// Default of `health_check.expected_status`.
pub const DEFAULT_EXPECTED_STATUS: u16 = 200;
/// Default of `health_check.panic_threshold`, as a share of the pool.
pub const DEFAULT_PANIC_THRESHOLD: f64 = 0.5;
/// Default of `agent.capacity_port` (and of `region.capacity_port`): the UDP port of an agent's
/// capacity endpoint, which other regions' agents probe.
pub const DEFAULT_CAPACITY_PORT: u16 = 9301;
/// Default of `region.check_interval_ms`, in milliseconds (valid as `health_check.interval_ms`).
pub const DEFAULT_REGION_INTERVAL_MS: u32 = 1000;
/// Default of `region.timeout_ms`, in milliseconds; must be below the interval.
pub const DEFAULT_REGION_TIMEOUT_MS: u32 = 500;
/// Default of `region.rise`, in consecutive answered probes (valid as `health_check.rise`).
pub const DEFAULT_REGION_RISE: u8 = 2;
/// Default of `region.fall`, in consecutive failed probes (valid as `health_check.fall`).
pub const DEFAULT_REGION_FALL: u8 = 2;
/// Default of `vip.failover.min_healthy`: the healthy share of a region's backend weight below
/// which it sheds load (its overprovisioning factor, as Envoy calls it, is 1 / 0.7, about 1.4).
pub const DEFAULT_MIN_HEALTHY: f64 = 0.7;
/// Default of `vip.failover.hold_down_ms`, in milliseconds: how long a higher-priority region
/// must have been healthy before traffic returns to it.
pub const DEFAULT_HOLD_DOWN_MS: u32 = 30_000;
/// Valid `vip.failover.hold_down_ms`, in milliseconds (up to one day).
pub const HOLD_DOWN_MS_RANGE: RangeInclusive<u32> = 0..=86_400_000;
/// Most regions one VIP lists (the data path's region levels).
pub const MAX_VIP_REGIONS: usize = lb_common::types::MAX_VIP_REGIONS;

/// Longest unix socket path the kernel accepts (`sun_path` holds 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;
/// Longest Linux interface name (`IFNAMSIZ` less the NUL).
const MAX_INTERFACE_NAME: usize = 15;

const ROOT_KEYS: &[&str] = &["agent", "vip", "region"];
const AGENT_KEYS: &[&str] = &[
    "interface",
    "xdp_mode",
    "next_hop_mac",
    "encap_source_v4",
    "encap_source_v6",
    "egress_mtu",
    "admin_socket",
    "metrics_listen",
    "state_dir",
    "bpffs_dir",
    "flow_table_entries",
    "region",
    "tunnel_addresses",
    "capacity_port",
    "gateway_workers",
];
const REGION_KEYS: &[&str] = &[
    "name",
    "tunnel",
    "capacity_port",
    "check_interval_ms",
    "timeout_ms",
    "rise",
    "fall",
];
const FAILOVER_KEYS: &[&str] = &["mode", "min_healthy", "hold_down_ms"];
const VIP_KEYS: &[&str] = &[
    "name",
    "address",
    "port",
    "protocol",
    "mode",
    "table_size",
    "health_check",
    "regions",
    "failover",
    "backend",
    "gateway",
    "pool",
    "route",
];
const BACKEND_KEYS: &[&str] = &[
    "address",
    "weight",
    "region",
    "mac",
    "port",
    "pool",
    "health_check",
];
const CHECK_KEYS: &[&str] = &[
    "type",
    "port",
    "interval_ms",
    "timeout_ms",
    "rise",
    "fall",
    "path",
    "expected_status",
    "send",
    "expect",
    "panic_threshold",
];

// ---------------------------------------------------------------------------------------------
// The validated configuration
// ---------------------------------------------------------------------------------------------

/// A validated `xlb.toml`.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The `[agent]` table: host-wide settings.
    pub agent: Agent,
    /// The `[[vip]]` tables, in file order. Default: none.
    pub vips: Vec<Vip>,
    /// The `[[region]]` tables: the other regions' xlb hosts, in file order. Default: none.
    pub regions: Vec<Region>,
}

impl Config {
    /// Number of backends over all VIPs.
    pub fn backend_count(&self) -> usize {
        self.vips.iter().map(|vip| vip.backends.len()).sum()
    }

    /// The `[[region]]` named `name` (never this host's own region, which has none).
    pub fn region(&self, name: &str) -> Option<&Region> {
        self.regions.iter().find(|r| r.name == name)
    }
}

/// The `[agent]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agent {
    /// `interface`: the network interface the balancer attaches to, e.g. `"eth0"`. Required.
    pub interface: String,
    /// `xdp_mode`: how the XDP program is attached. Default `"auto"`.
    pub xdp_mode: XdpMode,
    /// `next_hop_mac`: the MAC address forwarded frames are sent to (the router), or `"auto"` to
    /// resolve it from the host's default route. Default `"auto"`.
    pub next_hop_mac: NextHopMac,
    /// `encap_source_v4`: the outer IPv4 source of IPIP packets; with a prefix the host bits
    /// vary per flow so backend NICs can spread the load. Default: none; required when a
    /// `dsr-ipip` VIP has an IPv4 backend.
    pub encap_source_v4: Option<Ipv4Prefix>,
    /// `encap_source_v6`: the outer IPv6 source of IPv6-in-IP packets (prefix length at least
    /// /96: only the low 32 bits vary per flow). Default: none; required when a `dsr-ipip` VIP
    /// has an IPv6 backend.
    pub encap_source_v6: Option<Ipv6Prefix>,
    /// `egress_mtu`: the largest IP packet, in bytes and outer header included, that the egress
    /// link carries; bigger ones get an ICMP too-big reply. Default 1500; valid 1280..=9216.
    pub egress_mtu: u16,
    /// `admin_socket`: the unix socket of the admin API (absolute path, at most 107 bytes).
    /// Default `"/run/xlb/admin.sock"`.
    pub admin_socket: PathBuf,
    /// `metrics_listen`: the address and port the Prometheus endpoint listens on.
    /// Default `"127.0.0.1:9641"`.
    pub metrics_listen: SocketAddr,
    /// `state_dir`: where run-time changes are kept across restarts (absolute path).
    /// Default `"/var/lib/xlb"`.
    pub state_dir: PathBuf,
    /// `bpffs_dir`: where maps and the XDP link are pinned for hitless restarts (absolute path
    /// on a bpffs mount). Default `"/sys/fs/bpf/xlb"`.
    pub bpffs_dir: PathBuf,
    /// `flow_table_entries`: connection-table entries over all CPUs (about 100 bytes of kernel
    /// memory each). Default 1048576; valid 1024..=16777216.
    pub flow_table_entries: u32,
    /// `region`: the region this host is in (a name as VIP names are); a VIP's level of this
    /// region is balanced here, from the VIP's own backends. Default `"local"`.
    pub region: String,
    /// `tunnel_addresses`: this host's addresses on which other regions' xlb hosts send
    /// failed-over flows and capacity probes (unicast, not loopback or link-local, none a VIP
    /// address, each once). Default: none.
    pub tunnel_addresses: Vec<IpAddr>,
    /// `capacity_port`: the UDP port of this agent's capacity endpoint, 1..=65535.
    /// Default 9301.
    pub capacity_port: u16,
    /// `gateway_workers`: threads serving the L7 gateway (each runs its own event loop and
    /// accepts on its own `SO_REUSEPORT` socket per listener, as nginx's worker processes do);
    /// 0 means one per CPU the agent may run on. Read at start. Default 0; valid 0..=1024.
    pub gateway_workers: u16,
}

/// One `[[region]]` table: another region's xlb host, to which a VIP's new flows are
/// encapsulated when that region's level of the VIP takes load, and whose capacity endpoint
/// this agent probes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Region {
    /// `name`: the region's name, unique among `[[region]]` tables and not `agent.region`
    /// (this host's own region has no table). Required.
    pub name: String,
    /// `tunnel`: the address of that region's xlb host (unicast, not loopback or link-local,
    /// not a VIP address nor one of `agent.tunnel_addresses`). Required.
    pub tunnel: IpAddr,
    /// `capacity_port`: the UDP port of that host's capacity endpoint, 1..=65535.
    /// Default: `agent.capacity_port`.
    pub capacity_port: u16,
    /// `check_interval_ms`: time between capacity probes. Default 1000 ms; valid
    /// 100..=3600000 ms.
    pub check_interval: Duration,
    /// `timeout_ms`: how long one probe may take; must be below the interval. Default 500 ms.
    pub timeout: Duration,
    /// `rise`: consecutive answered probes that make the region reachable. Default 2; valid
    /// 1..=100.
    pub rise: u8,
    /// `fall`: consecutive failed probes that make the region unreachable (its healthy share
    /// is then 0). Default 2; valid 1..=100.
    pub fall: u8,
}

/// How a VIP's new flows are spread over its regions (`vip.failover.mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FailoverMode {
    /// `"whole"`: every new flow goes to the first region whose healthy share is at least
    /// `min_healthy`.
    #[default]
    Whole,
    /// `"proportional"`: each region in priority order takes as much of the rest as its
    /// healthy share carries (share / `min_healthy`), the next region the remainder.
    Proportional,
}

impl fmt::Display for FailoverMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FailoverMode::Whole => "whole",
            FailoverMode::Proportional => "proportional",
        })
    }
}

/// A VIP's `[vip.failover]` table, with every default filled in: when its regions shed load
/// to lower-priority ones, and when it comes back.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Failover {
    /// `mode`: `"whole"` or `"proportional"`. Default `"whole"`.
    pub mode: FailoverMode,
    /// `min_healthy`: the healthy share of a region's backend weight (above 0.0, at most 1.0)
    /// below which it sheds load. Default 0.7.
    pub min_healthy: f64,
    /// `hold_down_ms`: how long a higher-priority region must have been continuously healthy
    /// before traffic returns to it (failover itself is immediate). Default 30000 ms; valid
    /// 0..=86400000 ms.
    pub hold_down: Duration,
}

impl Default for Failover {
    fn default() -> Self {
        Self {
            mode: FailoverMode::default(),
            min_healthy: DEFAULT_MIN_HEALTHY,
            hold_down: Duration::from_millis(u64::from(DEFAULT_HOLD_DOWN_MS)),
        }
    }
}

/// How the XDP program is attached (`agent.xdp_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum XdpMode {
    /// `"auto"`: native, falling back to generic with a warning when the driver refuses.
    #[default]
    Auto,
    /// `"native"`: driver mode only.
    Native,
    /// `"generic"`: skb mode, which works on every device at a fraction of native speed.
    Generic,
}

impl fmt::Display for XdpMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            XdpMode::Auto => "auto",
            XdpMode::Native => "native",
            XdpMode::Generic => "generic",
        })
    }
}

/// Where forwarded frames go (`agent.next_hop_mac`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NextHopMac {
    /// `"auto"`: the MAC of the default route's gateway, resolved at start.
    #[default]
    Auto,
    /// A fixed MAC address.
    Fixed(MacAddr),
}

/// An Ethernet (EUI-48) unicast address, written `aa:bb:cc:dd:ee:ff` in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// An IPv4 address with a prefix length (32 for a single address).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ipv4Prefix {
    /// The network address (host bits zero).
    pub addr: Ipv4Addr,
    /// Prefix length, 0..=32.
    pub len: u8,
}

impl fmt::Display for Ipv4Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// An IPv6 address with a prefix length (128 for a single address).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ipv6Prefix {
    /// The network address (host bits zero).
    pub addr: Ipv6Addr,
    /// Prefix length, 96..=128.
    pub len: u8,
}

impl fmt::Display for Ipv6Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// One `[[vip]]` table: a virtual IP service and its backends.
#[derive(Debug, Clone, PartialEq)]
pub struct Vip {
    /// `name`: unique among VIPs, lowercase letters, digits, `_` and `-`. Required.
    pub name: String,
    /// `address`: the virtual IP, IPv4 or IPv6. Required.
    pub address: IpAddr,
    /// `port`: destination port, 0..=65535; 0 means every port. Required.
    pub port: u16,
    /// `protocol`: `"tcp"` or `"udp"`. Required.
    pub protocol: Protocol,
    /// `mode`: how traffic reaches the backends. Default `"dsr-ipip"`.
    pub mode: VipMode,
    /// `table_size`: slots of the VIP's Maglev table; a prime, at most 1048573 and at least the
    /// number of backends with weight > 0. Default 65537.
    pub table_size: u32,
    /// `health_check`: how backends are checked. Default: none (every backend counts as up).
    pub health_check: Option<HealthCheck>,
    /// `health_check.panic_threshold`: the share of the pool (0.0..=1.0) that must be healthy;
    /// below it the VIP keeps sending to every backend rather than overloading the few that
    /// pass. Default 0.5.
    pub panic_threshold: f64,
    /// `regions`: region names in priority order (the first is the primary), each once, at
    /// most 4; each is `agent.region` or has a `[[region]]` table. Default: none, and then
    /// backends' regions are not checked.
    pub regions: Vec<String>,
    /// `failover`: how new flows move between `regions`. Always present: the table's defaults
    /// when it is left out (it may only be written on a VIP with at least two regions).
    pub failover: Failover,
    /// The `[[vip.backend]]` tables, in file order. Default: none.
    pub backends: Vec<Backend>,
    /// The gateway of an `l7` VIP (`[vip.gateway]`, `[[vip.pool]]`, `[[vip.route]]`): always
    /// present on an `l7` VIP (defaults when the tables are left out), never on others.
    pub gateway: Option<l7::Gateway>,
}

/// A VIP's transport protocol (`vip.protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// `"tcp"`.
    Tcp,
    /// `"udp"`.
    Udp,
}

impl Protocol {
    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => lb_common::types::proto::TCP,
            Protocol::Udp => lb_common::types::proto::UDP,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// How a VIP's traffic reaches its backends (`vip.mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VipMode {
    /// `"dsr-ipip"`: encapsulated (IPIP / IPv6-in-IP) to the backend, which replies directly.
    #[default]
    DsrIpip,
    /// `"dsr-l2"`: only the destination MAC is rewritten; backends share the balancer's L2
    /// segment and the VIP's address family.
    DsrL2,
    /// `"l7"`: passed to the host stack, where the agent's HTTP gateway serves it.
    L7,
}

impl VipMode {
    /// Whether packets are encapsulated, so an outer source address is needed.
    pub fn encapsulates(self) -> bool {
        self == VipMode::DsrIpip
    }
}

impl fmt::Display for VipMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            VipMode::DsrIpip => "dsr-ipip",
            VipMode::DsrL2 => "dsr-l2",
            VipMode::L7 => "l7",
        })
    }
}

/// One `[[vip.backend]]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    /// `address`: the backend's IP address. Required; unique within its VIP.
    pub address: IpAddr,
    /// `weight`: relative share of new flows, 0..=65535; 0 drains the backend (no new flows,
    /// established ones continue). Default 100.
    pub weight: u16,
    /// `region`: the region the backend belongs to. Default `"local"`.
    pub region: String,
    /// `mac`: the backend's MAC, for `dsr-l2` VIPs only. Default: none (resolved from the
    /// neighbour table).
    pub mac: Option<MacAddr>,
    /// `port`: the port the upstream server listens on, for `l7` VIPs only (an L4 VIP's
    /// backends receive the client's packets unchanged, port included). `Some` on every `l7`
    /// VIP's backend: default the VIP's port. `None` on others.
    pub port: Option<u16>,
    /// `pool`: the upstream pool of an `l7` VIP the backend serves in. Default `"default"`
    /// (also on other VIPs, where it means nothing).
    pub pool: String,
    /// The check that applies to this backend: the backend's `health_check` table merged over
    /// the VIP's (its keys replace the VIP's), or the VIP's check as is. `None` when neither
    /// exists.
    pub health_check: Option<HealthCheck>,
}

/// A resolved health check (`health_check` table), with every default filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    /// `type` and its type-specific keys. Required.
    pub probe: Probe,
    /// `port`: the port checked, 1..=65535. Default: the VIP's port; required when that is 0.
    pub port: u16,
    /// `interval_ms`: time between checks. Default 2000 ms; valid 100..=3600000 ms.
    pub interval: Duration,
    /// `timeout_ms`: how long one check may take; must be below the interval. Default 1000 ms.
    pub timeout: Duration,
    /// `rise`: consecutive passed checks that bring a backend up. Default 2; valid 1..=100.
    pub rise: u8,
    /// `fall`: consecutive failed checks that take a backend down. Default 3; valid 1..=100.
    pub fall: u8,
}

/// What a health check does (`health_check.type`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// `"tcp"`: a TCP connect succeeds.
    Tcp,
    /// `"http"`: an HTTP GET returns the expected status.
    Http(HttpProbe),
    /// `"https"`: as `http`, over TLS.
    Https(HttpProbe),
    /// `"udp"`: a datagram is answered with the expected reply.
    Udp(UdpProbe),
}

/// The keys of an `http` or `https` check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpProbe {
    /// `path`: the request path. Default `"/"`.
    pub path: String,
    /// `expected_status`: the status that counts as healthy, 100..=599. Default 200.
    pub expected_status: u16,
}

/// The keys of a `udp` check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpProbe {
    /// `send`: the payload of the request datagram (non-empty). Required.
    pub send: String,
    /// `expect`: text the reply must contain (empty: any reply). Required.
    pub expect: String,
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// What kind of mistake a [`ConfigError`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConfigErrorKind {
    /// The file could not be read (the only kind without a line).
    Io,
    /// Not valid TOML, or not UTF-8.
    Syntax,
    /// A key the table does not have.
    UnknownKey,
    /// A required key or table is absent.
    MissingKey,
    /// A value of the wrong TOML type (a string where a number belongs, ...).
    WrongType,
    /// A number outside its valid range.
    OutOfRange,
    /// A malformed or unusable value: an address, MAC, name, path or choice.
    InvalidValue,
    /// Something that must be unique is not.
    Duplicate,
    /// Values that are valid alone but not together.
    Conflict,
}

/// One mistake in a configuration file.
///
/// Displays as `FILE:LINE: KEY: MESSAGE` (syntax errors add the column, and the key is left
/// out where there is none), e.g.
/// `xlb.toml:14: vip[1].backend[0].weight: 70000 is out of range; expected 0..=65535`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file name, as given to [`parse`] or [`load`].
    pub file: String,
    /// 1-based line of the offending key, value or table header; `None` when the file could
    /// not be read.
    pub line: Option<usize>,
    /// 1-based column (in characters), for syntax errors only.
    pub column: Option<usize>,
    /// The key path, e.g. `vip[1].backend[0].weight` (0-based indices); empty for syntax and
    /// read errors.
    pub key: String,
    /// What kind of mistake this is.
    pub kind: ConfigErrorKind,
    /// What is wrong and what would be valid.
    pub message: String,
}

/// A value as error messages quote it: short ones whole, long ones cut (a megabyte-long name
/// must not become a megabyte-long error line).
pub(crate) fn shown(s: &str) -> String {
    const KEEP: usize = 48;
    let count = s.chars().count();
    if count <= KEEP + 16 {
        format!("{s:?}")
    } else {
        let head: String = s.chars().take(KEEP).collect();
        format!("{head:?}... ({count} characters)")
    }
}

/// Shortens every quoted string longer than [`shown`] keeps in a message built with `{:?}`.
pub(crate) fn abbreviate_quotes(message: &str) -> std::borrow::Cow<'_, str> {
    if message.len() < 80 {
        return message.into();
    }
    let mut out = String::with_capacity(message.len().min(1024));
    let mut rest = message;
    while let Some(start) = rest.find('"') {
        out.push_str(&rest[..start]);
        let body = &rest[start + 1..];
        // The closing quote: the first one not escaped by a backslash.
        let mut end = None;
        let mut escaped = false;
        for (i, c) in body.char_indices() {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => {
                    end = Some(i);
                    break;
                }
                _ => {}
            }
        }
        let Some(end) = end else {
            out.push_str(&rest[start..]);
            return out.into();
        };
        let inner = &body[..end];
        let count = inner.chars().count();
        if count > 64 {
            let head: String = inner.chars().take(48).collect();
            // Never end inside an escape (a lone backslash would escape the closing quote).
            let head = head.trim_end_matches('\\');
            out.push_str(&format!("\"{head}\"... ({count} characters)"));
        } else {
            out.push('"');
            out.push_str(inner);
            out.push('"');
        }
        rest = &body[end + 1..];
    }
    out.push_str(rest);
    out.into()
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(column) = self.column {
                write!(f, ":{column}")?;
            }
        }
        f.write_str(": ")?;
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        f.write_str(&abbreviate_quotes(&self.message))
    }
}

impl std::error::Error for ConfigError {}

/// Every mistake found in one file, in file order; never empty. Displays one per line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors {
    errors: Vec<ConfigError>,
}

impl ConfigErrors {
    /// The errors, in file order.
    pub fn errors(&self) -> &[ConfigError] {
        &self.errors
    }

    /// Number of errors (at least one).
    pub fn len(&self) -> usize {
        self.errors.len()
    }

    /// Always false: there is at least one error. (Here for clippy's `len_without_is_empty`.)
    pub fn is_empty(&self) -> bool {
        self.errors.is_empty()
    }

    /// Whether the file could not be read at all (as opposed to read and found invalid).
    pub fn is_unreadable(&self) -> bool {
        self.errors.iter().any(|e| e.kind == ConfigErrorKind::Io)
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.errors.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl IntoIterator for ConfigErrors {
    type Item = ConfigError;
    type IntoIter = std::vec::IntoIter<ConfigError>;
    fn into_iter(self) -> Self::IntoIter {
        self.errors.into_iter()
    }
}

impl<'a> IntoIterator for &'a ConfigErrors {
    type Item = &'a ConfigError;
    type IntoIter = std::slice::Iter<'a, ConfigError>;
    fn into_iter(self) -> Self::IntoIter {
        self.errors.iter()
    }
}

// ---------------------------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------------------------

/// Parses and validates the text of a configuration file. `file_name` is only used in messages.
///
/// Pure: reads no file, resolves no name, touches nothing on the system.
///
/// # Errors
///
/// [`ConfigErrors`] with every mistake found: syntax errors alone if the text is not valid
/// TOML (the rest cannot be read reliably then), otherwise every schema and consistency error.
pub fn parse(file_name: &str, text: &str) -> Result<Config, ConfigErrors> {
    let mut cx = Ctx::new(file_name, text);
    let (root, syntax_errors) = DeTable::parse_recoverable(text);
    if !syntax_errors.is_empty() {
        for error in syntax_errors {
            let offset = error.span().map_or(0, |span| span.start);
            // The parser says "duplicate key" without naming it; its span covers the key.
            let named = error
                .span()
                .and_then(|span| text.get(span))
                .map(str::trim)
                .filter(|k| !k.is_empty() && error.message() == "duplicate key");
            // A duplicated [table] header: name the whole dotted header, not its last part.
            let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
            let line = text[line_start..].lines().next().unwrap_or_default();
            let header = line
                .trim_start()
                .strip_prefix('[')
                .filter(|h| !h.starts_with('[') && !text[line_start..offset].contains('='))
                .and_then(|h| h.split_once(']'))
                .map(|(h, _)| h.trim());
            let message = match (named, header) {
                (Some(_), Some(k)) => format!(
                    "invalid TOML: table [{k}] appears twice; each table may appear once ([[...]] \
                     is for lists of tables, such as [[vip]] and [[vip.backend]])"
                ),
                (Some(k), None) => format!(
                    "invalid TOML: duplicate key {}: a key may appear once per table",
                    shown(k)
                ),
                (None, _) => format!("invalid TOML: {}", error.message()),
            };
            cx.push(ConfigError {
                file: file_name.to_owned(),
                line: Some(cx.line_of(offset)),
                column: Some(cx.column_of(offset)),
                key: String::new(),
                kind: ConfigErrorKind::Syntax,
                message,
            });
        }
        return Err(cx.finish());
    }
    let root = TableRef {
        path: String::new(),
        span: 0..0,
        entries: root.get_ref(),
    };
    let config = read_config(&mut cx, &root);
    match config {
        Some(config) if cx.errors.is_empty() => Ok(config),
        _ => {
            if cx.errors.is_empty() {
                // Unreachable by construction: every `None` above follows a reported error.
                cx.report(
                    ConfigErrorKind::InvalidValue,
                    &(0..0),
                    "",
                    "internal error: the configuration was rejected without a reason; please \
                     report this",
                );
            }
            Err(cx.finish())
        }
    }
}

/// Reads and validates a configuration file. Messages name the file as `path` displays.
///
/// # Errors
///
/// [`ConfigErrors`]: one [`ConfigErrorKind::Io`] error if the file cannot be read (then
/// [`ConfigErrors::is_unreadable`] is true), otherwise as [`parse`].
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let file_name = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|err| ConfigErrors {
        errors: vec![ConfigError {
            file: file_name.clone(),
            line: None,
            column: None,
            key: String::new(),
            kind: ConfigErrorKind::Io,
            message: format!("cannot be read: {err}"),
        }],
    })?;
    let text = match String::from_utf8(bytes) {
        Ok(text) => text,
        Err(err) => {
            let valid = &err.as_bytes()[..err.utf8_error().valid_up_to()];
            // The prefix before the bad byte is valid UTF-8, so it gives the line and column.
            let prefix = String::from_utf8_lossy(valid);
            let cx = Ctx::new(&file_name, &prefix);
            return Err(ConfigErrors {
                errors: vec![ConfigError {
                    file: file_name.clone(),
                    line: Some(cx.line_of(prefix.len())),
                    column: Some(cx.column_of(prefix.len())),
                    key: String::new(),
                    kind: ConfigErrorKind::Syntax,
                    message: "the file is not UTF-8 text; TOML files must be UTF-8".to_owned(),
                }],
            });
        }
    };
    parse(&file_name, &text)
}

// ---------------------------------------------------------------------------------------------
// The walker: spans, key paths and error collection
// ---------------------------------------------------------------------------------------------

/// The state of one parse: the text (for line numbers) and the errors found so far.
struct Ctx<'a> {
    file: &'a str,
    text: &'a str,
    line_starts: Vec<usize>,
    errors: Vec<ConfigError>,
}

/// A value that passed its own checks, with where it was written.
#[derive(Debug, Clone)]
struct Loc<T> {
    value: T,
    span: Range<usize>,
    key: String,
}

/// An optional key as read: absent, present but invalid (already reported), or valid.
#[derive(Debug, Clone)]
enum Field<T> {
    Absent,
    Invalid,
    Valid(Loc<T>),
}

impl<T> Field<T> {
    fn loc(&self) -> Option<&Loc<T>> {
        match self {
            Field::Valid(loc) => Some(loc),
            _ => None,
        }
    }

    fn value(&self) -> Option<&T> {
        self.loc().map(|loc| &loc.value)
    }

    fn is_absent(&self) -> bool {
        matches!(self, Field::Absent)
    }
}

impl<T: Clone> Field<T> {
    /// The value, or `default` when the key is absent; `None` when it was invalid.
    fn or(&self, default: T) -> Option<T> {
        match self {
            Field::Absent => Some(default),
            Field::Invalid => None,
            Field::Valid(loc) => Some(loc.value.clone()),
        }
    }
}

/// Whether a key must be present.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Presence {
    Optional,
    Required,
}

/// Why a string value was rejected.
struct Bad {
    kind: ConfigErrorKind,
    message: String,
}

impl Bad {
    fn value(message: impl Into<String>) -> Self {
        Self {
            kind: ConfigErrorKind::InvalidValue,
            message: message.into(),
        }
    }

    fn range(message: impl Into<String>) -> Self {
        Self {
            kind: ConfigErrorKind::OutOfRange,
            message: message.into(),
        }
    }
}

/// One TOML table with its key path and where it starts.
struct TableRef<'t, 'i> {
    path: String,
    span: Range<usize>,
    entries: &'t DeTable<'i>,
}

impl<'t, 'i> TableRef<'t, 'i> {
    fn key(&self, name: &str) -> String {
        if self.path.is_empty() {
            name.to_owned()
        } else {
            format!("{}.{name}", self.path)
        }
    }

    fn get(&self, name: &str) -> Option<&'t Spanned<DeValue<'i>>> {
        self.entries
            .iter()
            .find(|(key, _)| key.get_ref().as_ref() == name)
            .map(|(_, value)| value)
    }
}

impl<'a> Ctx<'a> {
    fn new(file: &'a str, text: &'a str) -> Self {
        let line_starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Self {
            file,
            text,
            line_starts,
            errors: Vec::new(),
        }
    }

    /// 1-based line of a byte offset.
    fn line_of(&self, offset: usize) -> usize {
        self.line_starts.partition_point(|&start| start <= offset)
    }

    /// 1-based column, in characters, of a byte offset.
    fn column_of(&self, offset: usize) -> usize {
        let start = self.line_starts[self.line_of(offset) - 1];
        self.text
            .get(start..offset)
            .map_or(1, |before| before.chars().count() + 1)
    }

    fn push(&mut self, error: ConfigError) {
        self.errors.push(error);
    }

    fn report(
        &mut self,
        kind: ConfigErrorKind,
        span: &Range<usize>,
        key: &str,
        message: impl Into<String>,
    ) {
        let error = ConfigError {
            file: self.file.to_owned(),
            line: Some(self.line_of(span.start)),
            column: None,
            key: key.to_owned(),
            kind,
            message: message.into(),
        };
        self.errors.push(error);
    }

    /// Reports a broken rule at `span`, under `key`.
    fn violation(&mut self, v: Violation, span: &Range<usize>, key: &str) {
        self.report(v.kind, span, key, v.message);
    }

    /// The errors sorted by position (stable, so one line's errors keep their order).
    fn finish(mut self) -> ConfigErrors {
        self.errors.sort_by_key(|e| (e.line, e.column));
        ConfigErrors {
            errors: self.errors,
        }
    }

    /// Checks that `value` is a table and that it has only `allowed` keys.
    fn table<'t, 'i>(
        &mut self,
        value: &'t Spanned<DeValue<'i>>,
        path: String,
        allowed: &[&str],
        expected: &str,
    ) -> Option<TableRef<'t, 'i>> {
        let DeValue::Table(entries) = value.get_ref() else {
            let message = format!("expected {expected}, found {}", describe(value.get_ref()));
            self.report(ConfigErrorKind::WrongType, &value.span(), &path, message);
            return None;
        };
        let table = TableRef {
            path,
            span: value.span(),
            entries,
        };
        for (key, _) in table.entries.iter() {
            let name = key.get_ref().as_ref();
            if !allowed.contains(&name) {
                let message = format!(
                    "unknown key; {}allowed keys here: {}",
                    suggestion(name, allowed),
                    allowed.join(", ")
                );
                self.report(
                    ConfigErrorKind::UnknownKey,
                    &key.span(),
                    &table.key(name),
                    message,
                );
            }
        }
        Some(table)
    }

    /// Reports a missing required key at the table's header.
    fn missing(&mut self, table: &TableRef<'_, '_>, name: &str, expected: &str) {
        self.missing_in(&table.path, &table.span.clone(), name, expected);
    }

    /// Reports a missing required key of the table at `path`, whose header is at `span`.
    fn missing_in(&mut self, path: &str, span: &Range<usize>, name: &str, expected: &str) {
        let key = if path.is_empty() {
            name.to_owned()
        } else {
            format!("{path}.{name}")
        };
        let message = format!("required key is missing; expected {expected}");
        self.report(ConfigErrorKind::MissingKey, span, &key, message);
    }

    fn string(
        &mut self,
        table: &TableRef<'_, '_>,
        name: &str,
        presence: Presence,
        expected: &str,
    ) -> Field<String> {
        let Some(value) = table.get(name) else {
            if presence == Presence::Required {
                self.missing(table, name, expected);
            }
            return Field::Absent;
        };
        let key = table.key(name);
        match value.get_ref() {
            DeValue::String(s) => Field::Valid(Loc {
                value: s.to_string(),
                span: value.span(),
                key,
            }),
            other => {
                let message = format!("expected {expected}, found {}", describe(other));
                self.report(ConfigErrorKind::WrongType, &value.span(), &key, message);
                Field::Invalid
            }
        }
    }

    /// A string key turned into a `T` by `convert`, whose error message is reported as is.
    fn parsed<T>(
        &mut self,
        table: &TableRef<'_, '_>,
        name: &str,
        presence: Presence,
        expected: &str,
        convert: impl FnOnce(&str) -> Result<T, Bad>,
    ) -> Field<T> {
        match self.string(table, name, presence, expected) {
            Field::Absent => Field::Absent,
            Field::Invalid => Field::Invalid,
            Field::Valid(loc) => match convert(&loc.value) {
                Ok(value) => Field::Valid(Loc {
                    value,
                    span: loc.span,
                    key: loc.key,
                }),
                Err(bad) => {
                    self.report(bad.kind, &loc.span, &loc.key, bad.message);
                    Field::Invalid
                }
            },
        }
    }

    /// An integer key within `range`.
    fn int<T: TryFrom<i128> + Copy>(
        &mut self,
        table: &TableRef<'_, '_>,
        name: &str,
        presence: Presence,
        range: RangeInclusive<i128>,
    ) -> Field<T> {
        let bounds = format!("{}..={}", range.start(), range.end());
        let expected = format!("an integer in {bounds}");
        let Some(value) = table.get(name) else {
            if presence == Presence::Required {
                self.missing(table, name, &expected);
            }
            return Field::Absent;
        };
        let key = table.key(name);
        let span = value.span();
        let DeValue::Integer(int) = value.get_ref() else {
            let message = format!("expected {expected}, found {}", describe(value.get_ref()));
            self.report(ConfigErrorKind::WrongType, &span, &key, message);
            return Field::Invalid;
        };
        let parsed = i128::from_str_radix(int.as_str(), int.radix()).ok();
        match parsed
            .filter(|n| range.contains(n))
            .and_then(|n| T::try_from(n).ok())
        {
            Some(value) => Field::Valid(Loc { value, span, key }),
            None => {
                let shown = parsed.map_or_else(|| int.to_string(), |n| n.to_string());
                let message = format!("{shown} is out of range; expected {bounds}");
                self.report(ConfigErrorKind::OutOfRange, &span, &key, message);
                Field::Invalid
            }
        }
    }

    /// A share in 0.0..=1.0 (integers 0 and 1 accepted too).
    fn fraction(&mut self, table: &TableRef<'_, '_>, name: &str) -> Field<f64> {
        self.number(
            table,
            name,
            |n| rules::SHARE_RANGE.contains(&n),
            "a number in 0.0..=1.0 (a share of the pool)",
            "0.0..=1.0",
        )
    }

    /// A number (float, or integer written as one) that `accept`s; `expected` describes the
    /// number for a wrong type, `bounds` the valid values for one out of range.
    fn number(
        &mut self,
        table: &TableRef<'_, '_>,
        name: &str,
        accept: impl Fn(f64) -> bool,
        expected: &str,
        bounds: &str,
    ) -> Field<f64> {
        let Some(value) = table.get(name) else {
            return Field::Absent;
        };
        let key = table.key(name);
        let span = value.span();
        let number = match value.get_ref() {
            DeValue::Float(float) => float.as_str().parse::<f64>().ok(),
            DeValue::Integer(int) => i64::from_str_radix(int.as_str(), int.radix())
                .ok()
                .and_then(|n| i32::try_from(n).ok())
                .map(f64::from),
            other => {
                let message = format!("expected {expected}, found {}", describe(other));
                self.report(ConfigErrorKind::WrongType, &span, &key, message);
                return Field::Invalid;
            }
        };
        match number.filter(|n| accept(*n)) {
            Some(value) => Field::Valid(Loc { value, span, key }),
            None => {
                let shown = &self.text[span.clone()];
                let message = format!("{shown} is out of range; expected {bounds}");
                self.report(ConfigErrorKind::OutOfRange, &span, &key, message);
                Field::Invalid
            }
        }
    }

    /// An array of tables, written with `header` (e.g. `[[vip.backend]]`), each checked against
    /// `allowed`. Absent: empty.
    fn tables<'t, 'i>(
        &mut self,
        table: &TableRef<'t, 'i>,
        name: &str,
        allowed: &[&str],
        header: &str,
    ) -> Vec<Option<TableRef<'t, 'i>>> {
        let Some(value) = table.get(name) else {
            return Vec::new();
        };
        let key = table.key(name);
        let expected = format!("a {header} table");
        let DeValue::Array(items) = value.get_ref() else {
            let message = format!(
                "expected an array of tables ({header}), found {}",
                describe(value.get_ref())
            );
            self.report(ConfigErrorKind::WrongType, &value.span(), &key, message);
            return Vec::new();
        };
        items
            .iter()
            .enumerate()
            .map(|(i, item)| self.table(item, format!("{key}[{i}]"), allowed, &expected))
            .collect()
    }
}

/// A `u32` range as the integer walker takes it.
fn range_of(range: RangeInclusive<u32>) -> RangeInclusive<i128> {
    i128::from(*range.start())..=i128::from(*range.end())
}

/// A value's type and, for scalars, the value itself, for "found ..." messages.
fn describe(value: &DeValue<'_>) -> String {
    match value {
        DeValue::String(s) => format!("the string {s:?}"),
        DeValue::Integer(i) => format!("the integer {i}"),
        DeValue::Float(f) => format!("the float {f}"),
        DeValue::Boolean(b) => format!("the boolean {b}"),
        DeValue::Datetime(d) => format!("the date-time {d}"),
        DeValue::Array(_) => "an array".to_owned(),
        DeValue::Table(_) => "a table".to_owned(),
    }
}

/// "did you mean `key`? " for a close allowed key, else nothing.
fn suggestion(name: &str, allowed: &[&str]) -> String {
    closest(name, allowed).map_or_else(String::new, |close| format!("did you mean `{close}`? "))
}

/// The allowed key nearest to a misspelt one, if it is close enough to be the likely intent.
fn closest<'k>(name: &str, allowed: &[&'k str]) -> Option<&'k str> {
    let name = name.to_ascii_lowercase();
    allowed
        .iter()
        .map(|candidate| (edit_distance(&name, candidate), *candidate))
        .filter(|(distance, candidate)| *distance <= 2.max(candidate.len() / 4))
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, candidate)| candidate)
}

/// Levenshtein distance, in characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitution = diagonal + usize::from(ca != *cb);
            diagonal = row[j + 1];
            row[j + 1] = substitution.min(row[j] + 1).min(row[j + 1] + 1);
        }
    }
    row[b.len()]
}

// ---------------------------------------------------------------------------------------------
// Value parsers (string -> typed value)
// ---------------------------------------------------------------------------------------------

const IP_EXPECTED: &str = "an IP address such as \"192.0.2.10\" or \"2001:db8::10\"";
const NAME_EXPECTED: &str = "a name of lowercase letters, digits, '_' and '-', e.g. \"web\"";
/// Longest VIP or region name: names are metric labels, log fields and table cells, and a
/// run-time request naming one must fit the admin API's request limit.
pub const MAX_NAME_LEN: usize = 64;
const MAC_EXPECTED: &str = "a MAC address such as \"02:00:5e:10:00:01\"";

fn parse_choice<T: Copy>(what: &str, s: &str, choices: &[(&str, T)]) -> Result<T, Bad> {
    choices
        .iter()
        .find(|(name, _)| *name == s)
        .map(|(_, value)| *value)
        .ok_or_else(|| {
            let names: Vec<String> = choices.iter().map(|(n, _)| format!("\"{n}\"")).collect();
            Bad::value(format!(
                "{s:?} is not a valid {what}; expected one of {}",
                names.join(", ")
            ))
        })
}

fn parse_xdp_mode(s: &str) -> Result<XdpMode, Bad> {
    parse_choice(
        "XDP mode",
        s,
        &[
            ("auto", XdpMode::Auto),
            ("native", XdpMode::Native),
            ("generic", XdpMode::Generic),
        ],
    )
}

fn parse_protocol(s: &str) -> Result<Protocol, Bad> {
    parse_choice(
        "protocol",
        s,
        &[("tcp", Protocol::Tcp), ("udp", Protocol::Udp)],
    )
}

fn parse_mode(s: &str) -> Result<VipMode, Bad> {
    parse_choice(
        "VIP mode",
        s,
        &[
            ("dsr-ipip", VipMode::DsrIpip),
            ("dsr-l2", VipMode::DsrL2),
            ("l7", VipMode::L7),
        ],
    )
}

fn parse_failover_mode(s: &str) -> Result<FailoverMode, Bad> {
    parse_choice(
        "failover mode",
        s,
        &[
            ("whole", FailoverMode::Whole),
            ("proportional", FailoverMode::Proportional),
        ],
    )
}

/// The `type` of a health check, before its type-specific keys are attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CheckType {
    Tcp,
    Http,
    Https,
    Udp,
}

impl CheckType {
    fn name(self) -> &'static str {
        match self {
            CheckType::Tcp => "tcp",
            CheckType::Http => "http",
            CheckType::Https => "https",
            CheckType::Udp => "udp",
        }
    }

    fn is_http(self) -> bool {
        matches!(self, CheckType::Http | CheckType::Https)
    }
}

fn parse_check_type(s: &str) -> Result<CheckType, Bad> {
    parse_choice(
        "health-check type",
        s,
        &[
            ("tcp", CheckType::Tcp),
            ("http", CheckType::Http),
            ("https", CheckType::Https),
            ("udp", CheckType::Udp),
        ],
    )
}

/// VIP, backend and region names: `[a-z0-9_-]+`.
fn parse_name(s: &str) -> Result<String, Bad> {
    if s.is_empty() {
        return Err(Bad::value(format!(
            "an empty name; expected {NAME_EXPECTED}"
        )));
    }
    if s.len() > MAX_NAME_LEN {
        return Err(Bad::value(format!(
            "{} is {} characters long; expected at most {MAX_NAME_LEN} ({NAME_EXPECTED})",
            shown(s),
            s.chars().count()
        )));
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_' || *c == '-'))
    {
        return Err(Bad::value(format!(
            "{s:?} contains {c:?}; expected {NAME_EXPECTED}"
        )));
    }
    Ok(s.to_owned())
}

fn parse_interface(s: &str) -> Result<String, Bad> {
    const VALID: &str = "expected a Linux interface name such as \"eth0\"";
    if s.is_empty() {
        return Err(Bad::value(format!("an empty interface name; {VALID}")));
    }
    if s.len() > MAX_INTERFACE_NAME {
        return Err(Bad::value(format!(
            "{s:?} is {} bytes long; Linux interface names have at most {MAX_INTERFACE_NAME}",
            s.len()
        )));
    }
    if s == "." || s == ".." || s.chars().any(|c| c == '/' || c == ':' || c.is_whitespace()) {
        return Err(Bad::value(format!(
            "{s:?} is not a valid interface name (no '/', ':' or spaces, not \".\" or \"..\"); \
             {VALID}"
        )));
    }
    Ok(s.to_owned())
}

fn parse_mac(s: &str) -> Result<MacAddr, Bad> {
    let mut octets = [0u8; 6];
    let mut parts = s.split(':');
    let well_formed = octets.iter_mut().all(|octet| {
        parts
            .next()
            .filter(|p| p.len() == 2)
            .and_then(|p| u8::from_str_radix(p, 16).ok())
            .map(|value| *octet = value)
            .is_some()
    }) && parts.next().is_none();
    if !well_formed {
        return Err(Bad::value(format!(
            "{s:?} is not a MAC address; expected six hex pairs separated by ':', e.g. \
             \"02:00:5e:10:00:01\""
        )));
    }
    if octets == [0; 6] {
        return Err(Bad::value(format!(
            "{s:?} is the all-zero MAC; expected a unicast MAC address"
        )));
    }
    if octets[0] & 1 != 0 {
        return Err(Bad::value(format!(
            "{s:?} is a multicast or broadcast MAC; expected a unicast MAC address (first octet \
             even)"
        )));
    }
    Ok(MacAddr(octets))
}

fn parse_next_hop(s: &str) -> Result<NextHopMac, Bad> {
    if s == "auto" {
        return Ok(NextHopMac::Auto);
    }
    parse_mac(s).map(NextHopMac::Fixed).map_err(|bad| {
        Bad::value(format!(
            "{}; or \"auto\" to use the default route's gateway",
            bad.message
        ))
    })
}

/// Addresses that can never be a VIP, backend or tunnel source.
fn unusable(ip: IpAddr) -> Option<&'static str> {
    if let IpAddr::V6(v6) = ip
        && v6.to_ipv4_mapped().is_some()
    {
        // The data path matches packets by their own family: an IPv4 packet never carries a
        // mapped address, so such a VIP would never match and such a backend never be reached.
        Some("an IPv4-mapped IPv6 address")
    } else if ip.is_unspecified() {
        Some("the unspecified address")
    } else if ip.is_multicast() {
        Some("a multicast address")
    } else if ip == IpAddr::V4(Ipv4Addr::BROADCAST) {
        Some("the broadcast address")
    } else {
        None
    }
}

fn parse_ip(s: &str) -> Result<IpAddr, Bad> {
    let ip: IpAddr = s.parse().map_err(|_| {
        Bad::value(format!(
            "{s:?} is not an IP address; expected {IP_EXPECTED}"
        ))
    })?;
    match (unusable(ip), ip) {
        (Some(what), IpAddr::V6(v6)) if v6.to_ipv4_mapped().is_some() => Err(Bad::value(format!(
            "{s:?} is {what}, which no packet carries; expected the IPv4 address itself, {}",
            v6.to_ipv4_mapped().expect("checked")
        ))),
        (Some(what), _) => Err(Bad::value(format!(
            "{s:?} is {what}; expected a unicast address"
        ))),
        (None, _) => Ok(ip),
    }
}

/// An address or `address/len` for a tunnel source, of the family `v6` says.
fn parse_prefix(s: &str, v6: bool) -> Result<(IpAddr, u8), Bad> {
    let (family, example, min_len, max_len) = if v6 {
        ("IPv6", "\"fd00:ff::/96\"", 96u8, 128u8)
    } else {
        ("IPv4", "\"10.255.0.0/16\"", 0, 32)
    };
    let valid = format!("expected an {family} address or prefix such as {example}");
    let (addr_text, len_text) = match s.split_once('/') {
        Some((addr, len)) => (addr, Some(len)),
        None => (s, None),
    };
    let addr: IpAddr = addr_text
        .parse()
        .map_err(|_| Bad::value(format!("{s:?} is not an address or prefix; {valid}")))?;
    if addr.is_ipv6() != v6 {
        let other = if v6 { "IPv4" } else { "IPv6" };
        return Err(Bad::value(format!("{s:?} is an {other} address; {valid}")));
    }
    if let Some(what) = unusable(addr) {
        return Err(Bad::value(format!(
            "{s:?} is {what}; expected a unicast {family} address or prefix"
        )));
    }
    let len = match len_text {
        None => max_len,
        Some(text) => {
            let len = text.parse::<u8>().ok().filter(|len| *len <= max_len);
            match len {
                Some(len) if len >= min_len => len,
                Some(len) => {
                    return Err(Bad::range(format!(
                        "prefix length /{len} is too short; expected /{min_len}../{max_len} (the \
                         balancer varies only the low 32 bits of the outer source per flow)"
                    )));
                }
                None => {
                    return Err(Bad::range(format!(
                        "prefix length /{text} is out of range; expected /{min_len}../{max_len}"
                    )));
                }
            }
        }
    };
    let network = match addr {
        IpAddr::V4(a) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
        }
        IpAddr::V6(a) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
        }
    };
    if network != addr {
        return Err(Bad::value(format!(
            "{s:?} has host bits set; expected the network address, \"{network}/{len}\" (the \
             balancer fills the host bits per flow)"
        )));
    }
    Ok((addr, len))
}

fn parse_prefix_v4(s: &str) -> Result<Ipv4Prefix, Bad> {
    match parse_prefix(s, false)? {
        (IpAddr::V4(addr), len) => Ok(Ipv4Prefix { addr, len }),
        (IpAddr::V6(_), _) => Err(Bad::value(format!("{s:?} is not an IPv4 prefix"))),
    }
}

fn parse_prefix_v6(s: &str) -> Result<Ipv6Prefix, Bad> {
    match parse_prefix(s, true)? {
        (IpAddr::V6(addr), len) => Ok(Ipv6Prefix { addr, len }),
        (IpAddr::V4(_), _) => Err(Bad::value(format!("{s:?} is not an IPv6 prefix"))),
    }
}

fn parse_socket_addr(s: &str) -> Result<SocketAddr, Bad> {
    s.parse().map_err(|_| {
        Bad::value(format!(
            "{s:?} is not an address and port; expected e.g. \"127.0.0.1:9641\" or \
             \"[::1]:9641\""
        ))
    })
}

fn parse_absolute_path(s: &str) -> Result<PathBuf, Bad> {
    if !s.starts_with('/') {
        return Err(Bad::value(format!(
            "{s:?} is not an absolute path; expected a path starting with '/'"
        )));
    }
    if s.contains('\0') {
        return Err(Bad::value("the path contains a NUL byte"));
    }
    Ok(PathBuf::from(s))
}

fn parse_socket_path(s: &str) -> Result<PathBuf, Bad> {
    let path = parse_absolute_path(s)?;
    if s.len() > MAX_SOCKET_PATH {
        return Err(Bad::value(format!(
            "the path is {} bytes long; a unix socket path holds at most {MAX_SOCKET_PATH}",
            s.len()
        )));
    }
    Ok(path)
}

fn parse_http_path(s: &str) -> Result<String, Bad> {
    if !s.starts_with('/') {
        return Err(Bad::value(format!(
            "{s:?} is not an absolute request path; expected a path starting with '/', e.g. \
             \"/healthz\""
        )));
    }
    if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(Bad::value(format!(
            "{s:?} contains spaces or control characters; percent-encode them (e.g. %20)"
        )));
    }
    Ok(s.to_owned())
}

// ---------------------------------------------------------------------------------------------
// Reading the sections
// ---------------------------------------------------------------------------------------------

struct AgentDraft {
    path: String,
    span: Range<usize>,
    interface: Field<String>,
    xdp_mode: Field<XdpMode>,
    next_hop_mac: Field<NextHopMac>,
    encap_source_v4: Field<Ipv4Prefix>,
    encap_source_v6: Field<Ipv6Prefix>,
    egress_mtu: Field<u16>,
    admin_socket: Field<PathBuf>,
    metrics_listen: Field<SocketAddr>,
    state_dir: Field<PathBuf>,
    bpffs_dir: Field<PathBuf>,
    flow_table_entries: Field<u32>,
    region: Field<String>,
    tunnel_addresses: Field<Vec<Loc<IpAddr>>>,
    capacity_port: Field<u16>,
    gateway_workers: Field<u16>,
}

struct RegionDraft {
    path: String,
    span: Range<usize>,
    name: Field<String>,
    tunnel: Field<IpAddr>,
    capacity_port: Field<u16>,
    interval_ms: Field<u32>,
    timeout_ms: Field<u32>,
    rise: Field<u8>,
    fall: Field<u8>,
}

struct FailoverDraft {
    path: String,
    span: Range<usize>,
    mode: Field<FailoverMode>,
    min_healthy: Field<f64>,
    hold_down_ms: Field<u32>,
}

struct VipDraft {
    path: String,
    span: Range<usize>,
    name: Field<String>,
    address: Field<IpAddr>,
    port: Field<u16>,
    protocol: Field<Protocol>,
    mode: Field<VipMode>,
    table_size: Field<u32>,
    check: Option<PartialCheck>,
    regions: Field<Vec<Loc<String>>>,
    failover: Option<FailoverDraft>,
    backends: Vec<BackendDraft>,
    /// `[vip.gateway]`, `[[vip.pool]]`, `[[vip.route]]`.
    l7: l7::GatewayDraft,
    /// Filled in by validation.
    resolved_check: Option<HealthCheck>,
}

struct BackendDraft {
    path: String,
    address: Field<IpAddr>,
    weight: Field<u16>,
    region: Field<String>,
    mac: Field<MacAddr>,
    port: Field<u16>,
    pool: Field<String>,
    check: Option<PartialCheck>,
    /// Filled in by validation.
    resolved_check: Option<HealthCheck>,
}

/// A `health_check` table as written: every key optional, so a backend's table can be merged
/// over its VIP's before the result is checked as a whole.
#[derive(Debug, Clone)]
struct PartialCheck {
    path: String,
    span: Range<usize>,
    kind: Field<CheckType>,
    port: Field<u16>,
    interval_ms: Field<u32>,
    timeout_ms: Field<u32>,
    rise: Field<u8>,
    fall: Field<u8>,
    http_path: Field<String>,
    expected_status: Field<u16>,
    send: Field<String>,
    expect: Field<String>,
    panic_threshold: Field<f64>,
}

fn read_config(cx: &mut Ctx<'_>, root: &TableRef<'_, '_>) -> Option<Config> {
    // Unknown top-level keys are reported by opening the root like any other table.
    let root_value_keys: Vec<_> = root
        .entries
        .iter()
        .filter(|(key, _)| !ROOT_KEYS.contains(&key.get_ref().as_ref()))
        .map(|(key, _)| (key.get_ref().to_string(), key.span()))
        .collect();
    for (name, span) in root_value_keys {
        let message = format!(
            "unknown key; {}allowed at the top level: [agent], [[vip]], [[region]]",
            suggestion(&name, ROOT_KEYS)
        );
        cx.report(ConfigErrorKind::UnknownKey, &span, &name, message);
    }

    let agent = read_agent(cx, root);
    let mut vips: Vec<VipDraft> = cx
        .tables(root, "vip", VIP_KEYS, "[[vip]]")
        .into_iter()
        .flatten()
        .map(|table| read_vip(cx, &table))
        .collect();
    let region_tables = cx.tables(root, "region", REGION_KEYS, "[[region]]");
    // Whether every [[region]] could be read: if not (already reported), a VIP's region
    // without a table may be the unreadable one.
    let regions_read = match root.get("region").map(Spanned::get_ref) {
        None => true,
        Some(DeValue::Array(_)) => region_tables.iter().all(Option::is_some),
        Some(_) => false,
    };
    let regions: Vec<RegionDraft> = region_tables
        .into_iter()
        .flatten()
        .map(|table| read_region(cx, &table))
        .collect();

    for vip in &mut vips {
        validate_vip(cx, vip);
    }
    validate_across_vips(cx, agent.as_ref(), &vips);
    validate_region_tables(cx, agent.as_ref(), &regions, regions_read, &vips);

    build(agent?, vips, regions)
}

fn read_agent(cx: &mut Ctx<'_>, root: &TableRef<'_, '_>) -> Option<AgentDraft> {
    let Some(value) = root.get("agent") else {
        cx.missing(
            root,
            "agent",
            "an [agent] table, with at least `interface = \"eth0\"`",
        );
        return None;
    };
    let t = cx.table(value, "agent".to_owned(), AGENT_KEYS, "an [agent] table")?;
    use Presence::{Optional, Required};
    Some(AgentDraft {
        interface: cx.parsed(
            &t,
            "interface",
            Required,
            "the network interface to attach to, e.g. \"eth0\"",
            parse_interface,
        ),
        xdp_mode: cx.parsed(
            &t,
            "xdp_mode",
            Optional,
            "\"auto\", \"native\" or \"generic\"",
            parse_xdp_mode,
        ),
        next_hop_mac: cx.parsed(
            &t,
            "next_hop_mac",
            Optional,
            "\"auto\" or a MAC address such as \"02:00:5e:10:00:01\"",
            parse_next_hop,
        ),
        encap_source_v4: cx.parsed(
            &t,
            "encap_source_v4",
            Optional,
            "an IPv4 address or prefix such as \"10.255.0.0/16\"",
            parse_prefix_v4,
        ),
        encap_source_v6: cx.parsed(
            &t,
            "encap_source_v6",
            Optional,
            "an IPv6 address or prefix such as \"fd00:ff::/96\"",
            parse_prefix_v6,
        ),
        egress_mtu: cx.int(
            &t,
            "egress_mtu",
            Optional,
            i128::from(*EGRESS_MTU_RANGE.start())..=i128::from(*EGRESS_MTU_RANGE.end()),
        ),
        admin_socket: cx.parsed(
            &t,
            "admin_socket",
            Optional,
            "an absolute path",
            parse_socket_path,
        ),
        metrics_listen: cx.parsed(
            &t,
            "metrics_listen",
            Optional,
            "an address and port such as \"127.0.0.1:9641\"",
            parse_socket_addr,
        ),
        state_dir: cx.parsed(
            &t,
            "state_dir",
            Optional,
            "an absolute path",
            parse_absolute_path,
        ),
        bpffs_dir: cx.parsed(
            &t,
            "bpffs_dir",
            Optional,
            "an absolute path",
            parse_absolute_path,
        ),
        flow_table_entries: cx.int(
            &t,
            "flow_table_entries",
            Optional,
            i128::from(*FLOW_TABLE_ENTRIES_RANGE.start())
                ..=i128::from(*FLOW_TABLE_ENTRIES_RANGE.end()),
        ),
        region: cx.parsed(&t, "region", Optional, NAME_EXPECTED, parse_name),
        tunnel_addresses: read_tunnel_addresses(cx, &t),
        capacity_port: cx.int(&t, "capacity_port", Optional, 1..=65535),
        gateway_workers: cx.int(&t, "gateway_workers", Optional, 0..=1024),
        path: t.path,
        span: t.span,
    })
}

fn read_vip(cx: &mut Ctx<'_>, t: &TableRef<'_, '_>) -> VipDraft {
    use Presence::{Optional, Required};
    let name = cx.parsed(t, "name", Required, NAME_EXPECTED, parse_name);
    let address = cx.parsed(t, "address", Required, IP_EXPECTED, parse_ip);
    let port = cx.int(t, "port", Required, range_of(rules::PORT_RANGE));
    let protocol = cx.parsed(
        t,
        "protocol",
        Required,
        "\"tcp\" or \"udp\"",
        parse_protocol,
    );
    let mode = cx.parsed(
        t,
        "mode",
        Optional,
        "\"dsr-ipip\", \"dsr-l2\" or \"l7\"",
        parse_mode,
    );
    let table_size = cx.int(t, "table_size", Optional, range_of(rules::TABLE_SIZE_RANGE));
    let check = t
        .get("health_check")
        .and_then(|value| read_check(cx, value, t.key("health_check")));
    let regions = read_regions(cx, t);
    let failover = t
        .get("failover")
        .and_then(|value| read_failover(cx, value, t.key("failover")));
    let backends = cx
        .tables(t, "backend", BACKEND_KEYS, "[[vip.backend]]")
        .into_iter()
        .flatten()
        .map(|table| read_backend(cx, &table))
        .collect();
    let l7 = l7::read(cx, t);
    VipDraft {
        path: t.path.clone(),
        span: t.span.clone(),
        name,
        address,
        port,
        protocol,
        mode,
        table_size,
        check,
        regions,
        failover,
        backends,
        l7,
        resolved_check: None,
    }
}

fn read_failover(
    cx: &mut Ctx<'_>,
    value: &Spanned<DeValue<'_>>,
    path: String,
) -> Option<FailoverDraft> {
    use Presence::Optional;
    let t = cx.table(value, path, FAILOVER_KEYS, "a table of failover settings")?;
    Some(FailoverDraft {
        mode: cx.parsed(
            &t,
            "mode",
            Optional,
            "\"whole\" or \"proportional\"",
            parse_failover_mode,
        ),
        min_healthy: cx.number(
            &t,
            "min_healthy",
            |n| n > 0.0 && n <= 1.0,
            "a number above 0.0 and at most 1.0 (a share of a region's backend weight)",
            "a number above 0.0 and at most 1.0",
        ),
        hold_down_ms: cx.int(&t, "hold_down_ms", Optional, range_of(HOLD_DOWN_MS_RANGE)),
        path: t.path,
        span: t.span,
    })
}

fn read_region(cx: &mut Ctx<'_>, t: &TableRef<'_, '_>) -> RegionDraft {
    use Presence::{Optional, Required};
    let interval = range_of(CHECK_INTERVAL_MS_RANGE);
    let rise_fall = i128::from(*RISE_FALL_RANGE.start())..=i128::from(*RISE_FALL_RANGE.end());
    RegionDraft {
        name: cx.parsed(t, "name", Required, NAME_EXPECTED, parse_name),
        tunnel: cx.parsed(
            t,
            "tunnel",
            Required,
            "the IP address of that region's xlb host",
            parse_tunnel,
        ),
        capacity_port: cx.int(t, "capacity_port", Optional, 1..=65535),
        interval_ms: cx.int(t, "check_interval_ms", Optional, interval.clone()),
        timeout_ms: cx.int(t, "timeout_ms", Optional, 1..=*interval.end()),
        rise: cx.int(t, "rise", Optional, rise_fall.clone()),
        fall: cx.int(t, "fall", Optional, rise_fall),
        path: t.path.clone(),
        span: t.span.clone(),
    }
}

/// A tunnel address (`agent.tunnel_addresses`, `region.tunnel`): an address as a backend's,
/// and reachable across the network (not loopback or link-local).
fn parse_tunnel(s: &str) -> Result<IpAddr, Bad> {
    let ip = parse_ip(s)?;
    match rules::tunnel_scope(ip) {
        Some(v) => Err(Bad {
            kind: v.kind,
            message: v.message,
        }),
        None => Ok(ip),
    }
}

fn read_tunnel_addresses(cx: &mut Ctx<'_>, t: &TableRef<'_, '_>) -> Field<Vec<Loc<IpAddr>>> {
    let Some(value) = t.get("tunnel_addresses") else {
        return Field::Absent;
    };
    let key = t.key("tunnel_addresses");
    let DeValue::Array(items) = value.get_ref() else {
        let message = format!(
            "expected an array of this host's IP addresses, e.g. [\"198.51.100.1\"], found {}",
            describe(value.get_ref())
        );
        cx.report(ConfigErrorKind::WrongType, &value.span(), &key, message);
        return Field::Invalid;
    };
    let mut addresses: Vec<Loc<IpAddr>> = Vec::new();
    let mut valid = true;
    for (i, item) in items.iter().enumerate() {
        let item_key = format!("{key}[{i}]");
        let DeValue::String(s) = item.get_ref() else {
            let message = format!("expected {IP_EXPECTED}, found {}", describe(item.get_ref()));
            cx.report(ConfigErrorKind::WrongType, &item.span(), &item_key, message);
            valid = false;
            continue;
        };
        match parse_tunnel(s) {
            Err(bad) => {
                cx.report(bad.kind, &item.span(), &item_key, bad.message);
                valid = false;
            }
            Ok(ip) => {
                if let Some(first) = addresses.iter().find(|a| a.value == ip) {
                    let message = format!(
                        "{ip} is listed twice (first as {}); list each address once",
                        first.key
                    );
                    cx.report(ConfigErrorKind::Duplicate, &item.span(), &item_key, message);
                    valid = false;
                } else {
                    addresses.push(Loc {
                        value: ip,
                        span: item.span(),
                        key: item_key,
                    });
                }
            }
        }
    }
    if valid {
        Field::Valid(Loc {
            value: addresses,
            span: value.span(),
            key,
        })
    } else {
        Field::Invalid
    }
}

fn read_regions(cx: &mut Ctx<'_>, t: &TableRef<'_, '_>) -> Field<Vec<Loc<String>>> {
    let Some(value) = t.get("regions") else {
        return Field::Absent;
    };
    let key = t.key("regions");
    let DeValue::Array(items) = value.get_ref() else {
        let message = format!(
            "expected an array of region names in priority order, e.g. [\"eu-west\", \
             \"eu-north\"], found {}",
            describe(value.get_ref())
        );
        cx.report(ConfigErrorKind::WrongType, &value.span(), &key, message);
        return Field::Invalid;
    };
    if items.iter().next().is_none() {
        cx.report(
            ConfigErrorKind::InvalidValue,
            &value.span(),
            &key,
            "an empty list; expected at least one region name, or leave `regions` out",
        );
        return Field::Invalid;
    }
    let mut regions: Vec<Loc<String>> = Vec::new();
    let mut valid = true;
    for (i, item) in items.iter().enumerate() {
        let item_key = format!("{key}[{i}]");
        let DeValue::String(s) = item.get_ref() else {
            let message = format!("expected a region name, found {}", describe(item.get_ref()));
            cx.report(ConfigErrorKind::WrongType, &item.span(), &item_key, message);
            valid = false;
            continue;
        };
        match parse_name(s) {
            Err(bad) => {
                cx.report(bad.kind, &item.span(), &item_key, bad.message);
                valid = false;
            }
            Ok(name) => {
                if let Some(first) = regions.iter().find(|r| r.value == name) {
                    let message = format!(
                        "region {name:?} is listed twice (first as {}); list each region once",
                        first.key
                    );
                    cx.report(ConfigErrorKind::Duplicate, &item.span(), &item_key, message);
                    valid = false;
                } else {
                    regions.push(Loc {
                        value: name,
                        span: item.span(),
                        key: item_key,
                    });
                }
            }
        }
    }
    if valid {
        Field::Valid(Loc {
            value: regions,
            span: value.span(),
            key,
        })
    } else {
        Field::Invalid
    }
}

fn read_backend(cx: &mut Ctx<'_>, t: &TableRef<'_, '_>) -> BackendDraft {
    use Presence::{Optional, Required};
    let address = cx.parsed(t, "address", Required, IP_EXPECTED, parse_ip);
    let weight = cx.int(t, "weight", Optional, range_of(rules::WEIGHT_RANGE));
    let region = cx.parsed(t, "region", Optional, NAME_EXPECTED, parse_name);
    let mac = cx.parsed(t, "mac", Optional, MAC_EXPECTED, parse_mac);
    let port = cx.int(t, "port", Optional, 1..=65535);
    let pool = cx.parsed(t, "pool", Optional, NAME_EXPECTED, parse_name);
    let check = t
        .get("health_check")
        .and_then(|value| read_check(cx, value, t.key("health_check")));
    BackendDraft {
        path: t.path.clone(),
        address,
        weight,
        region,
        mac,
        port,
        pool,
        check,
        resolved_check: None,
    }
}

fn read_check(
    cx: &mut Ctx<'_>,
    value: &Spanned<DeValue<'_>>,
    path: String,
) -> Option<PartialCheck> {
    use Presence::Optional;
    let t = cx.table(value, path, CHECK_KEYS, "a table of health-check settings")?;
    let interval = CHECK_INTERVAL_MS_RANGE;
    let rise_fall = i128::from(*RISE_FALL_RANGE.start())..=i128::from(*RISE_FALL_RANGE.end());
    Some(PartialCheck {
        kind: cx.parsed(
            &t,
            "type",
            Optional,
            "\"tcp\", \"http\", \"https\" or \"udp\"",
            parse_check_type,
        ),
        port: cx.int(&t, "port", Optional, 1..=65535),
        interval_ms: cx.int(
            &t,
            "interval_ms",
            Optional,
            i128::from(*interval.start())..=i128::from(*interval.end()),
        ),
        timeout_ms: cx.int(&t, "timeout_ms", Optional, 1..=i128::from(*interval.end())),
        rise: cx.int(&t, "rise", Optional, rise_fall.clone()),
        fall: cx.int(&t, "fall", Optional, rise_fall),
        http_path: cx.parsed(
            &t,
            "path",
            Optional,
            "a request path such as \"/healthz\"",
            parse_http_path,
        ),
        expected_status: cx.int(&t, "expected_status", Optional, 100..=599),
        send: cx.string(&t, "send", Optional, "the request payload, a string"),
        expect: cx.string(&t, "expect", Optional, "the expected reply, a string"),
        panic_threshold: cx.fraction(&t, "panic_threshold"),
        path: t.path,
        span: t.span,
    })
}

// ---------------------------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------------------------

/// The checks within one VIP: its backends, table size, regions and health checks.
fn validate_vip(cx: &mut Ctx<'_>, vip: &mut VipDraft) {
    let mode = vip.mode.or(VipMode::default());
    let vip_address = vip.address.value().copied();

    if let Some(mode) = mode {
        if let Some(protocol) = vip.protocol.loc()
            && let Some(v) = rules::l7_protocol(mode, protocol.value)
        {
            cx.violation(v, &protocol.span, &protocol.key);
        }
        if let Some(port) = vip.port.loc()
            && let Some(v) = rules::l7_port(mode, port.value)
        {
            cx.violation(v, &port.span, &port.key);
        }
    }

    if let Some(address) = vip.address.loc()
        && let Some(v) = rules::vip_scope(address.value)
    {
        cx.violation(v, &address.span, &address.key);
    }

    // An l7 VIP's upstream servers are addresses and ports (several may share a host).
    let vip_port = vip.port.value().copied();
    let addresses = vip.backends.iter().map(|b| {
        let address = b.address.value().copied()?;
        let port = match mode {
            Some(VipMode::L7) => Some(b.port.or(vip_port?)?),
            _ => None,
        };
        Some((address, port))
    });
    for (i, first_index) in rules::first_duplicates(addresses) {
        if let Some(address) = vip.backends[i].address.loc() {
            let first = &vip.backends[first_index].path;
            let v = rules::duplicate_backend(address.value, first);
            cx.violation(v, &address.span, &address.key);
        }
    }
    for backend in &vip.backends {
        if let (Some(address), Some(mode)) = (backend.address.loc(), mode) {
            if let Some(v) = rules::backend_loopback(mode, address.value) {
                cx.violation(v, &address.span, &address.key);
            }
            if let Some(vip_address) = vip_address
                && let Some(v) = rules::backend_family(mode, vip_address, address.value)
            {
                cx.violation(v, &address.span, &address.key);
            }
            if let Some(vip_address) = vip_address
                && let Some(v) = rules::backend_is_vip(vip_address, address.value)
            {
                cx.violation(v, &address.span, &address.key);
            }
        }
        if let (Some(mac), Some(mode)) = (backend.mac.loc(), mode)
            && let Some(v) = rules::backend_mac(mode)
        {
            cx.violation(v, &mac.span, &mac.key);
        }
    }

    validate_gateway(cx, vip, mode);
    validate_table_size(cx, vip);
    validate_regions(cx, vip);
    validate_checks(cx, vip);
    l7_check_ports(vip);
}

/// The gateway's tables and the backends' `port` and `pool` belong to `l7` VIPs only; an l7
/// backend's pool must exist.
fn validate_gateway(cx: &mut Ctx<'_>, vip: &VipDraft, mode: Option<VipMode>) {
    let Some(mode) = mode else {
        return;
    };
    if mode != VipMode::L7 {
        if let Some((span, key)) = &vip.l7.written {
            let message = format!(
                "only an l7 VIP has a gateway (this VIP's mode is {mode}); set mode = \"l7\" or \
                 remove the table"
            );
            cx.report(ConfigErrorKind::Conflict, span, key, message);
        }
        for b in &vip.backends {
            for (span, key) in [span_key(&b.port), span_key(&b.pool)].into_iter().flatten() {
                let message = format!(
                    "only an l7 VIP's backends have a port and a pool (this VIP's mode is \
                     {mode}: backends receive the client's packets unchanged, port included)"
                );
                cx.report(ConfigErrorKind::Conflict, span, key, message);
            }
        }
        return;
    }
    for b in &vip.backends {
        if let Some(pool) = b.pool.loc()
            && !vip.l7.pool_names.contains(&pool.value)
        {
            let names: Vec<&str> = vip.l7.pool_names.iter().map(String::as_str).collect();
            let message = format!(
                "no pool {:?} in this VIP; pools here: {} (add a [[vip.pool]] table to define \
                 one)",
                pool.value,
                quoted_list(&names)
            );
            cx.report(
                ConfigErrorKind::InvalidValue,
                &pool.span,
                &pool.key,
                message,
            );
        }
    }
}

fn validate_table_size(cx: &mut Ctx<'_>, vip: &VipDraft) {
    let Some(size) = vip.table_size.or(DEFAULT_TABLE_SIZE) else {
        return;
    };
    let (span, key) = match vip.table_size.loc() {
        Some(loc) => (loc.span.clone(), loc.key.clone()),
        None => (vip.span.clone(), format!("{}.table_size", vip.path)),
    };
    // Invalid weights are already reported; count them as weighted so this check stays quiet.
    let weighted = vip
        .backends
        .iter()
        .filter(|b| b.weight.or(DEFAULT_WEIGHT) != Some(0))
        .count();
    if let Some(v) = rules::table_size(size, weighted) {
        cx.violation(v, &span, &key);
    }
}

fn validate_regions(cx: &mut Ctx<'_>, vip: &VipDraft) {
    if let Some(failover) = &vip.failover {
        let count = match &vip.regions {
            Field::Valid(list) => Some(list.value.len()),
            Field::Absent => Some(0),
            Field::Invalid => None,
        };
        if let Some(v) = count.and_then(|n| rules::failover_regions(n, &vip.path)) {
            cx.violation(v, &failover.span, &failover.path);
        }
    }
    let Some(regions) = vip.regions.loc() else {
        return;
    };
    if let Some(v) = rules::region_count(regions.value.len()) {
        let extra = &regions.value[MAX_VIP_REGIONS];
        cx.violation(v, &extra.span, &extra.key);
    }
    let names: Vec<&str> = regions.value.iter().map(|r| r.value.as_str()).collect();
    for backend in &vip.backends {
        match &backend.region {
            Field::Valid(region) => {
                if let Some(v) = rules::region(&names, &regions.key, Some(&region.value)) {
                    cx.violation(v, &region.span, &region.key);
                }
            }
            Field::Absent => {
                if let Some(v) = rules::region(&names, &regions.key, None) {
                    let key = format!("{}.region", backend.path);
                    let span = backend
                        .address
                        .loc()
                        .map_or(regions.span.clone(), |a| a.span.clone());
                    cx.violation(v, &span, &key);
                }
            }
            Field::Invalid => {}
        }
    }
}

fn quoted_list(names: &[&str]) -> String {
    let quoted: Vec<String> = names.iter().map(|n| format!("{n:?}")).collect();
    quoted.join(", ")
}

/// Resolves the VIP's check and each backend's effective check, reporting each mistake once:
/// a key inherited from the VIP's table is judged there, not again for every backend.
fn validate_checks(cx: &mut Ctx<'_>, vip: &mut VipDraft) {
    let vip_port = vip.port.value().copied();
    let mut vip_missing = Vec::new();
    if let Some(check) = &vip.check {
        vip.resolved_check = resolve_check(cx, check, vip_port, &mut vip_missing);
    }
    for backend in &mut vip.backends {
        let Some(own) = &backend.check else {
            backend.resolved_check = vip.resolved_check.clone();
            continue;
        };
        if let Some(threshold) = own.panic_threshold.loc() {
            let message = format!(
                "panic_threshold applies to the VIP's whole pool, not one backend; set it in \
                 {}.health_check",
                vip.path
            );
            cx.report(
                ConfigErrorKind::Conflict,
                &threshold.span,
                &threshold.key,
                message,
            );
        }
        let merged = match &vip.check {
            Some(base) => merge_checks(own, base),
            None => own.clone(),
        };
        let mark = cx.errors.len();
        let mut missing = Vec::new();
        backend.resolved_check = resolve_check(cx, &merged, vip_port, &mut missing);
        let own_prefix = format!("{}.", own.path);
        let new_errors = cx.errors.split_off(mark);
        cx.errors.extend(new_errors.into_iter().filter(|e| {
            let here = e.key.starts_with(&own_prefix);
            let already = e.kind == ConfigErrorKind::MissingKey
                && vip_missing
                    .iter()
                    .any(|name| e.key == format!("{}{name}", own_prefix));
            here && !already
        }));
    }
}

/// An l7 VIP's backends are upstream servers on their own ports: their checks go to that port
/// unless the VIP's or the backend's check names one.
fn l7_check_ports(vip: &mut VipDraft) {
    if vip.mode.value() != Some(&VipMode::L7) {
        return;
    }
    let written = |check: Option<&PartialCheck>| check.is_some_and(|c| !c.port.is_absent());
    let vip_written = written(vip.check.as_ref());
    for backend in &mut vip.backends {
        if vip_written || written(backend.check.as_ref()) {
            continue;
        }
        if let (Some(check), Some(port)) = (&mut backend.resolved_check, backend.port.value()) {
            check.port = *port;
        }
    }
}

/// The backend's keys over the VIP's. Type-specific keys are inherited only when the backend
/// keeps a compatible type (http and https share theirs).
fn merge_checks(own: &PartialCheck, base: &PartialCheck) -> PartialCheck {
    fn pick<T: Clone>(own: &Field<T>, base: &Field<T>, inherit: bool) -> Field<T> {
        if own.is_absent() && inherit {
            base.clone()
        } else {
            own.clone()
        }
    }
    let compatible = match (&own.kind, &base.kind) {
        (Field::Absent, _) => true,
        (Field::Valid(a), Field::Valid(b)) => {
            a.value == b.value || (a.value.is_http() && b.value.is_http())
        }
        _ => false,
    };
    PartialCheck {
        path: own.path.clone(),
        span: own.span.clone(),
        kind: pick(&own.kind, &base.kind, true),
        port: pick(&own.port, &base.port, true),
        interval_ms: pick(&own.interval_ms, &base.interval_ms, true),
        timeout_ms: pick(&own.timeout_ms, &base.timeout_ms, true),
        rise: pick(&own.rise, &base.rise, true),
        fall: pick(&own.fall, &base.fall, true),
        http_path: pick(&own.http_path, &base.http_path, compatible),
        expected_status: pick(&own.expected_status, &base.expected_status, compatible),
        send: pick(&own.send, &base.send, compatible),
        expect: pick(&own.expect, &base.expect, compatible),
        panic_threshold: Field::Absent,
    }
}

/// Where a key was written, if it was.
fn span_key<T>(field: &Field<T>) -> Option<(&Range<usize>, &str)> {
    field.loc().map(|loc| (&loc.span, loc.key.as_str()))
}

/// Checks one (possibly merged) health check as a whole and fills in its defaults. Names of
/// required keys found missing are pushed to `missing`.
fn resolve_check(
    cx: &mut Ctx<'_>,
    check: &PartialCheck,
    vip_port: Option<u16>,
    missing: &mut Vec<&'static str>,
) -> Option<HealthCheck> {
    let mut require = |cx: &mut Ctx<'_>, name: &'static str, expected: &str| {
        missing.push(name);
        cx.missing_in(&check.path, &check.span, name, expected);
    };

    let kind = match &check.kind {
        Field::Valid(loc) => Some(loc.value),
        Field::Invalid => None,
        Field::Absent => {
            require(cx, "type", "\"tcp\", \"http\", \"https\" or \"udp\"");
            None
        }
    };

    let port = match (&check.port, vip_port) {
        (Field::Valid(loc), _) => Some(loc.value),
        (Field::Absent, Some(0)) => {
            require(
                cx,
                "port",
                "a port in 1..=65535 to check, because the VIP's port is 0 (every port)",
            );
            None
        }
        (Field::Absent, Some(port)) => Some(port),
        (Field::Absent | Field::Invalid, _) => None,
    };

    let interval = check.interval_ms.or(DEFAULT_CHECK_INTERVAL_MS);
    let timeout = check.timeout_ms.or(DEFAULT_CHECK_TIMEOUT_MS);
    if let (Some(interval), Some(timeout)) = (interval, timeout)
        && timeout >= interval
    {
        // Blame the key written in this table, so a backend's override is blamed for its
        // own value and not for the one it inherited.
        let own = format!("{}.", check.path);
        let candidates = [check.timeout_ms.loc(), check.interval_ms.loc()];
        let blamed = candidates
            .iter()
            .flatten()
            .find(|loc| loc.key.starts_with(&own))
            .or(candidates.iter().flatten().next());
        let message = format!(
            "timeout_ms {timeout} is not below interval_ms {interval}; expected timeout_ms < \
                 interval_ms (a check must end before the next one starts)"
        );
        match blamed {
            Some(loc) => cx.report(ConfigErrorKind::Conflict, &loc.span, &loc.key, message),
            None => cx.report(
                ConfigErrorKind::Conflict,
                &check.span,
                &format!("{}.timeout_ms", check.path),
                message,
            ),
        }
    }

    let probe = kind.and_then(|kind| {
        let http = kind.is_http();
        let udp = kind == CheckType::Udp;
        let misplaced = [
            ("path", span_key(&check.http_path), http),
            ("expected_status", span_key(&check.expected_status), http),
            ("send", span_key(&check.send), udp),
            ("expect", span_key(&check.expect), udp),
        ];
        let mut ok = true;
        for (name, written, applies) in misplaced {
            let Some((span, key)) = written.filter(|_| !applies) else {
                continue;
            };
            let for_types = if name == "send" || name == "expect" {
                "udp checks"
            } else {
                "http and https checks"
            };
            let message = format!(
                "`{name}` only applies to {for_types}, and this check's type is \"{}\"; \
                 remove it or change `type`",
                kind.name()
            );
            cx.report(ConfigErrorKind::Conflict, span, key, message);
            ok = false;
        }
        let probe = match kind {
            CheckType::Tcp => Some(Probe::Tcp),
            CheckType::Http | CheckType::Https => {
                let http = HttpProbe {
                    path: check.http_path.or(DEFAULT_HTTP_PATH.to_owned())?,
                    expected_status: check.expected_status.or(DEFAULT_EXPECTED_STATUS)?,
                };
                Some(if kind == CheckType::Http {
                    Probe::Http(http)
                } else {
                    Probe::Https(http)
                })
            }
            CheckType::Udp => {
                if check.send.is_absent() {
                    require(
                        cx,
                        "send",
                        "the request payload for a udp check, e.g. send = \"ping\"",
                    );
                }
                if check.expect.is_absent() {
                    require(
                        cx,
                        "expect",
                        "the text a udp check's reply must contain, e.g. expect = \"pong\"",
                    );
                }
                if let Some(send) = check.send.loc().filter(|s| s.value.is_empty()) {
                    cx.report(
                        ConfigErrorKind::InvalidValue,
                        &send.span,
                        &send.key,
                        "an empty payload; expected a non-empty string to send",
                    );
                    ok = false;
                }
                Some(Probe::Udp(UdpProbe {
                    send: check.send.value()?.clone(),
                    expect: check.expect.value()?.clone(),
                }))
            }
        };
        probe.filter(|_| ok)
    });

    Some(HealthCheck {
        probe: probe?,
        port: port?,
        interval: Duration::from_millis(u64::from(interval?)),
        timeout: Duration::from_millis(u64::from(timeout?)),
        rise: check.rise.or(DEFAULT_RISE)?,
        fall: check.fall.or(DEFAULT_FALL)?,
    })
    .filter(|c| c.timeout < c.interval)
}

/// The checks that span VIPs: unique names and keys, tunnel sources, limits.
fn validate_across_vips(cx: &mut Ctx<'_>, agent: Option<&AgentDraft>, vips: &[VipDraft]) {
    let names = vips.iter().map(|v| v.name.value().map(String::as_str));
    for (i, first_index) in rules::first_duplicates(names) {
        let Some(name) = vips[i].name.loc() else {
            continue;
        };
        let first = &vips[first_index];
        let first = format!("{} (line {})", first.path, cx.line_of(first.span.start));
        let v = rules::duplicate_vip_name(&name.value, &first);
        cx.violation(v, &name.span, &name.key);
    }
    let keys = vips
        .iter()
        .map(|v| Some((*v.address.value()?, *v.port.value()?, *v.protocol.value()?)));
    for (i, first_index) in rules::first_duplicates(keys) {
        let vip = &vips[i];
        let (Some(address), Some(port), Some(protocol)) =
            (vip.address.loc(), vip.port.value(), vip.protocol.value())
        else {
            continue;
        };
        let first = &vips[first_index];
        let first = format!(
            "{} ({:?}, line {})",
            first.path,
            first.name.value().map_or("", String::as_str),
            cx.line_of(first.span.start)
        );
        let v = rules::duplicate_vip_key(address.value, *port, *protocol, &first);
        cx.violation(v, &address.span, &address.key);
    }

    if let Some(v) = rules::vip_limit(vips.len()) {
        let vip = &vips[lb_common::types::MAX_VIPS as usize];
        cx.violation(v, &vip.span, &vip.path);
    }
    let total: usize = vips.iter().map(|v| v.backends.len()).sum();
    if let Some(v) = rules::backend_limit(total) {
        let (span, key) = vips
            .iter()
            .flat_map(|v| v.backends.iter().map(move |b| (v, b)))
            .nth(lb_common::types::MAX_BACKENDS as usize)
            .map_or((0..0, String::new()), |(v, b)| {
                // The first backend over the limit, at its own line (its address).
                let span = b.address.loc().map_or(v.span.clone(), |a| a.span.clone());
                (span, b.path.clone())
            });
        cx.violation(v, &span, &key);
    }

    let Some(agent) = agent else { return };
    let needs = |v6: bool| {
        vips.iter().find_map(|vip| {
            let mode = vip.mode.or(VipMode::default())?;
            let backend = vip
                .backends
                .iter()
                .find(|b| b.address.value().is_some_and(|a| a.is_ipv6() == v6))?;
            let address = *backend.address.value()?;
            rules::needs_encap_source(mode, address, v6).then_some((vip, backend))
        })
    };
    for (v6, absent) in [
        (false, agent.encap_source_v4.is_absent()),
        (true, agent.encap_source_v6.is_absent()),
    ] {
        let Some((vip, backend)) = needs(v6).filter(|_| absent) else {
            continue;
        };
        let vip_name = format!(
            "{} ({:?})",
            vip.path,
            vip.name.value().map_or("", String::as_str)
        );
        let (key, v) = rules::encap_source_missing(v6, &vip_name, &backend.path);
        cx.violation(v, &agent.span, &format!("{}.{key}", agent.path));
    }
}

/// The checks of `[[region]]` tables and of what VIPs' region lists need from them and from
/// `[agent]`: unique names and tunnels, no table for this host's own region, a table for every
/// remote region a VIP lists, tunnel addresses apart from VIP addresses, and the outer sources
/// that encapsulating to remote regions needs.
fn validate_region_tables(
    cx: &mut Ctx<'_>,
    agent: Option<&AgentDraft>,
    regions: &[RegionDraft],
    regions_read: bool,
    vips: &[VipDraft],
) {
    let names = regions.iter().map(|r| r.name.value().map(String::as_str));
    for (i, first_index) in rules::first_duplicates(names) {
        let Some(name) = regions[i].name.loc() else {
            continue;
        };
        let first = &regions[first_index];
        let first = format!("{} (line {})", first.path, cx.line_of(first.span.start));
        cx.violation(
            rules::duplicate_region(&name.value, &first),
            &name.span,
            &name.key,
        );
    }
    let tunnels = regions.iter().map(|r| r.tunnel.value().copied());
    for (i, first_index) in rules::first_duplicates(tunnels) {
        let Some(tunnel) = regions[i].tunnel.loc() else {
            continue;
        };
        let first = &regions[first_index];
        let first = format!(
            "{} ({:?}, line {})",
            first.path,
            first.name.value().map_or("", String::as_str),
            cx.line_of(first.span.start)
        );
        cx.violation(
            rules::duplicate_tunnel(tunnel.value, &first),
            &tunnel.span,
            &tunnel.key,
        );
    }

    // The first VIP of each address, for "is a VIP address" conflicts.
    let mut vip_addresses: std::collections::HashMap<IpAddr, String> = Default::default();
    for vip in vips {
        if let Some(address) = vip.address.value() {
            vip_addresses.entry(*address).or_insert_with(|| {
                format!(
                    "{} ({:?})",
                    vip.path,
                    vip.name.value().map_or("", String::as_str)
                )
            });
        }
    }
    let own_tunnels: &[Loc<IpAddr>] = agent
        .and_then(|a| a.tunnel_addresses.value())
        .map_or(&[], Vec::as_slice);
    for address in own_tunnels {
        if let Some(vip) = vip_addresses.get(&address.value) {
            let v = rules::tunnel_is_vip(address.value, vip);
            cx.violation(v, &address.span, &address.key);
        }
    }

    // No backend at a tunnel address: this host's own (a loop through the router) or another
    // region's xlb host (a region hop behind the failover's back, a loop if mirrored).
    for vip in vips {
        for backend in &vip.backends {
            let Some(address) = backend.address.loc() else {
                continue;
            };
            let what = if let Some(own) = own_tunnels.iter().find(|a| a.value == address.value) {
                Some(format!("this host's own tunnel address ({})", own.key))
            } else {
                regions
                    .iter()
                    .find(|r| r.tunnel.value() == Some(&address.value))
                    .map(|r| {
                        format!(
                            "the tunnel of {} ({:?})",
                            r.path,
                            r.name.value().map_or("", String::as_str)
                        )
                    })
            };
            if let Some(what) = what {
                let v = rules::backend_is_tunnel(address.value, &what);
                cx.violation(v, &address.span, &address.key);
            }
        }
    }

    let local = agent.and_then(|a| a.region.or(DEFAULT_REGION.to_owned()));
    for region in regions {
        if let (Some(name), Some(local)) = (region.name.loc(), &local)
            && name.value == *local
        {
            cx.violation(rules::region_is_local(local), &name.span, &name.key);
        }
        if let Some(tunnel) = region.tunnel.loc() {
            if let Some(vip) = vip_addresses.get(&tunnel.value) {
                let v = rules::tunnel_is_vip(tunnel.value, vip);
                cx.violation(v, &tunnel.span, &tunnel.key);
            }
            if let Some(own) = own_tunnels.iter().find(|a| a.value == tunnel.value) {
                let v = rules::tunnel_is_own(tunnel.value, &own.key);
                cx.violation(v, &tunnel.span, &tunnel.key);
            }
        }
        let interval = region.interval_ms.or(DEFAULT_REGION_INTERVAL_MS);
        let timeout = region.timeout_ms.or(DEFAULT_REGION_TIMEOUT_MS);
        if let (Some(interval), Some(timeout)) = (interval, timeout)
            && timeout >= interval
        {
            let message = format!(
                "timeout_ms {timeout} is not below check_interval_ms {interval}; expected \
                 timeout_ms < check_interval_ms (a probe must end before the next one starts)"
            );
            let (span, key) = span_key(&region.timeout_ms)
                .or(span_key(&region.interval_ms))
                .map_or_else(
                    || (region.span.clone(), format!("{}.timeout_ms", region.path)),
                    |(span, key)| (span.clone(), key.to_owned()),
                );
            cx.report(ConfigErrorKind::Conflict, &span, &key, message);
        }
    }

    // What VIPs' region lists need: only judged when this host's region is known.
    let Some(local) = local else { return };
    // A table whose name is missing or invalid (already reported) may be the one a VIP means.
    let every_name_valid = regions_read && regions.iter().all(|r| r.name.value().is_some());
    let tunnel_of = |name: &str| {
        regions
            .iter()
            .find(|r| r.name.value().is_some_and(|n| n == name))
    };
    for vip in vips {
        let Some(list) = vip.regions.loc() else {
            continue;
        };
        if vip.mode.value() == Some(&VipMode::L7) {
            if let Some(remote) = list.value.iter().find(|r| r.value != local) {
                let v = rules::l7_regions(&remote.value, &local);
                cx.violation(v, &remote.span, &remote.key);
            }
            continue;
        }
        for region in &list.value {
            if region.value != local && every_name_valid && tunnel_of(&region.value).is_none() {
                let v = rules::region_undefined(&region.value, &local);
                cx.violation(v, &region.span, &region.key);
            }
        }
    }

    let Some(agent) = agent else { return };
    for (v6, absent) in [
        (false, agent.encap_source_v4.is_absent()),
        (true, agent.encap_source_v6.is_absent()),
    ] {
        // One error per missing key: the backends' rule already named it.
        let backends_need = vips.iter().any(|vip| {
            vip.mode.or(VipMode::default()).is_some_and(|mode| {
                vip.backends.iter().any(|b| {
                    b.address
                        .value()
                        .is_some_and(|a| rules::needs_encap_source(mode, *a, v6))
                })
            })
        });
        if !absent || backends_need {
            continue;
        }
        let needing = vips.iter().find_map(|vip| {
            let mode = vip.mode.or(VipMode::default())?;
            vip.regions.value()?.iter().find_map(|name| {
                let tunnel = *tunnel_of(&name.value)?.tunnel.value()?;
                (name.value != local && rules::needs_region_encap_source(mode, tunnel, v6))
                    .then_some((vip, &name.value, tunnel))
            })
        });
        let Some((vip, region, tunnel)) = needing else {
            continue;
        };
        let vip_name = format!(
            "{} ({:?})",
            vip.path,
            vip.name.value().map_or("", String::as_str)
        );
        let (key, v) = rules::region_encap_source_missing(v6, &vip_name, region, tunnel);
        cx.violation(v, &agent.span, &format!("{}.{key}", agent.path));
    }
}

// ---------------------------------------------------------------------------------------------
// Building the typed configuration (only reached when nothing was reported)
// ---------------------------------------------------------------------------------------------

fn build(agent: AgentDraft, vips: Vec<VipDraft>, regions: Vec<RegionDraft>) -> Option<Config> {
    let agent = Agent {
        interface: agent.interface.value()?.clone(),
        xdp_mode: agent.xdp_mode.or(XdpMode::default())?,
        next_hop_mac: agent.next_hop_mac.or(NextHopMac::default())?,
        encap_source_v4: agent.encap_source_v4.value().copied(),
        encap_source_v6: agent.encap_source_v6.value().copied(),
        egress_mtu: agent.egress_mtu.or(DEFAULT_EGRESS_MTU)?,
        admin_socket: agent.admin_socket.or(DEFAULT_ADMIN_SOCKET.into())?,
        metrics_listen: agent
            .metrics_listen
            .or(parse_socket_addr(DEFAULT_METRICS_LISTEN).ok()?)?,
        state_dir: agent.state_dir.or(DEFAULT_STATE_DIR.into())?,
        bpffs_dir: agent.bpffs_dir.or(DEFAULT_BPFFS_DIR.into())?,
        flow_table_entries: agent.flow_table_entries.or(DEFAULT_FLOW_TABLE_ENTRIES)?,
        region: agent.region.or(DEFAULT_REGION.to_owned())?,
        tunnel_addresses: agent
            .tunnel_addresses
            .or(Vec::new())?
            .into_iter()
            .map(|a| a.value)
            .collect(),
        capacity_port: agent.capacity_port.or(DEFAULT_CAPACITY_PORT)?,
        gateway_workers: agent.gateway_workers.or(0)?,
    };
    let regions = regions
        .into_iter()
        .map(|r| {
            Some(Region {
                name: r.name.value()?.clone(),
                tunnel: *r.tunnel.value()?,
                capacity_port: r.capacity_port.or(agent.capacity_port)?,
                check_interval: Duration::from_millis(u64::from(
                    r.interval_ms.or(DEFAULT_REGION_INTERVAL_MS)?,
                )),
                timeout: Duration::from_millis(u64::from(
                    r.timeout_ms.or(DEFAULT_REGION_TIMEOUT_MS)?,
                )),
                rise: r.rise.or(DEFAULT_REGION_RISE)?,
                fall: r.fall.or(DEFAULT_REGION_FALL)?,
            })
        })
        .collect::<Option<Vec<_>>>()?;
    let vips = vips
        .into_iter()
        .map(|vip| {
            let backends = vip
                .backends
                .into_iter()
                .map(|b| {
                    let l7 = vip.mode.value() == Some(&VipMode::L7);
                    let port = match l7 {
                        true => Some(b.port.or(*vip.port.value()?)?),
                        false => None,
                    };
                    Some(Backend {
                        address: *b.address.value()?,
                        weight: b.weight.or(DEFAULT_WEIGHT)?,
                        region: b.region.or(DEFAULT_REGION.to_owned())?,
                        mac: b.mac.value().copied(),
                        port,
                        pool: b.pool.or(l7::DEFAULT_POOL.to_owned())?,
                        health_check: b.resolved_check,
                    })
                })
                .collect::<Option<Vec<_>>>()?;
            let failover = match &vip.failover {
                Some(f) => Failover {
                    mode: f.mode.or(FailoverMode::default())?,
                    min_healthy: f.min_healthy.or(DEFAULT_MIN_HEALTHY)?,
                    hold_down: Duration::from_millis(u64::from(
                        f.hold_down_ms.or(DEFAULT_HOLD_DOWN_MS)?,
                    )),
                },
                None => Failover::default(),
            };
            let panic_threshold = match &vip.check {
                Some(check) => check.panic_threshold.or(DEFAULT_PANIC_THRESHOLD)?,
                None => DEFAULT_PANIC_THRESHOLD,
            };
            Some(Vip {
                name: vip.name.value()?.clone(),
                address: *vip.address.value()?,
                port: *vip.port.value()?,
                protocol: *vip.protocol.value()?,
                mode: vip.mode.or(VipMode::default())?,
                table_size: vip.table_size.or(DEFAULT_TABLE_SIZE)?,
                health_check: vip.resolved_check,
                panic_threshold,
                regions: vip
                    .regions
                    .or(Vec::new())?
                    .into_iter()
                    .map(|r| r.value)
                    .collect(),
                failover,
                backends,
                gateway: match vip.mode.or(VipMode::default())? {
                    VipMode::L7 => Some(vip.l7.gateway?),
                    _ => None,
                },
            })
        })
        .collect::<Option<Vec<_>>>()?;
    Some(Config {
        agent,
        vips,
        regions,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A valid `[agent]` table, lines 1 to 4; test documents append VIPs from line 5.
    const AGENT: &str = r#"[agent]
interface = "eth0"
encap_source_v4 = "10.255.0.0/16"
encap_source_v6 = "fd00:ff::/96"
"#;

    /// Parses `text` as `xlb.toml`, panicking with every error if it is invalid.
    pub(super) fn ok(text: &str) -> Config {
        match parse("xlb.toml", text) {
            Ok(config) => config,
            Err(errors) => panic!("expected a valid config, got:\n{errors}"),
        }
    }

    /// Every error of `text` as `xlb.toml`, panicking if it is valid.
    pub(super) fn errors(text: &str) -> Vec<String> {
        match parse("xlb.toml", text) {
            Ok(config) => panic!("expected errors, got {config:#?}"),
            Err(errors) => errors.errors().iter().map(ToString::to_string).collect(),
        }
    }

    /// Asserts that there is exactly one error and that it starts with `expected` (file, line,
    /// key and the start of the message).
    #[track_caller]
    pub(super) fn assert_only_error(text: &str, expected: &str) {
        let all = errors(text);
        assert_eq!(
            all.len(),
            1,
            "expected one error, got:\n  {}",
            all.join("\n  ")
        );
        assert!(
            all[0].starts_with(expected),
            "expected\n  {expected}\ngot\n  {}",
            all[0]
        );
    }

    fn with_agent(vips: &str) -> String {
        format!("{AGENT}{vips}")
    }

    #[test]
    fn the_example_file_parses() {
        let config = ok(include_str!("../../examples/xlb.toml"));
        assert_eq!(config.vips.len(), 3);
        assert_eq!(config.backend_count(), 7);
        let web = &config.vips[0];
        assert_eq!(web.backends.len(), 3);
        assert_eq!(web.backends[2].weight, 0, "the third backend is drained");
        assert_eq!(web.regions, ["eu-west", "eu-north"]);
        let override_check = web.backends[1].health_check.as_ref().expect("merged check");
        assert_eq!(
            override_check.probe,
            Probe::Http(HttpProbe {
                path: "/status".into(),
                expected_status: 200
            })
        );
        assert_eq!(override_check.timeout, Duration::from_millis(500));
        assert_eq!(override_check.port, 8080, "inherited from the VIP's check");
        let echo = &config.vips[1];
        assert_eq!(echo.protocol, Protocol::Udp);
        assert!(echo.address.is_ipv6());
        assert_eq!(echo.backends[0].health_check, echo.health_check);
        let api = config.vips[2]
            .gateway
            .as_ref()
            .expect("an l7 VIP has a gateway");
        assert_eq!((api.pools.len(), api.routes.len()), (2, 3));
    }

    #[test]
    fn defaults_fill_every_optional_key() {
        let config = ok(r#"
[agent]
interface = "eth0"

[[vip]]
name = "web"
address = "192.0.2.10"
port = 80
protocol = "tcp"
mode = "l7"

[vip.health_check]
type = "http"

[[vip.backend]]
address = "10.0.0.1"
"#);
        let agent = &config.agent;
        assert_eq!(agent.interface, "eth0");
        assert_eq!(agent.xdp_mode, XdpMode::Auto);
        assert_eq!(agent.next_hop_mac, NextHopMac::Auto);
        assert_eq!(agent.encap_source_v4, None);
        assert_eq!(agent.encap_source_v6, None);
        assert_eq!(agent.egress_mtu, 1500);
        assert_eq!(agent.admin_socket, Path::new("/run/xlb/admin.sock"));
        assert_eq!(agent.metrics_listen, "127.0.0.1:9641".parse().unwrap());
        assert_eq!(agent.state_dir, Path::new("/var/lib/xlb"));
        assert_eq!(agent.bpffs_dir, Path::new("/sys/fs/bpf/xlb"));
        assert_eq!(agent.flow_table_entries, 1_048_576);

        let vip = &config.vips[0];
        assert_eq!(vip.mode, VipMode::L7);
        assert_eq!(vip.table_size, 65537);
        assert_eq!(vip.panic_threshold, 0.5);
        assert!(vip.regions.is_empty());
        let check = HealthCheck {
            probe: Probe::Http(HttpProbe {
                path: "/".into(),
                expected_status: 200,
            }),
            port: 80,
            interval: Duration::from_millis(2000),
            timeout: Duration::from_millis(1000),
            rise: 2,
            fall: 3,
        };
        assert_eq!(vip.health_check.as_ref(), Some(&check));
        let backend = &vip.backends[0];
        assert_eq!(backend.weight, 100);
        assert_eq!(backend.region, "local");
        assert_eq!(backend.mac, None);
        assert_eq!(backend.health_check.as_ref(), Some(&check));
    }

    #[test]
    fn typed_values_are_parsed() {
        let config = ok(r#"
[agent]
interface = "ens1f0"
xdp_mode = "native"
next_hop_mac = "02:00:5E:10:00:01"
encap_source_v4 = "10.255.0.1"
encap_source_v6 = "fd00:ff::1:0/112"
egress_mtu = 9000
metrics_listen = "[::1]:9100"
flow_table_entries = 0x10000

[[vip]]
name = "l2"
address = "192.0.2.20"
port = 0
protocol = "udp"
mode = "dsr-l2"
table_size = 251
health_check = { type = "tcp", port = 53 }

[[vip.backend]]
address = "192.0.2.21"
mac = "02:00:00:00:00:21"
weight = 65535
"#);
        let agent = &config.agent;
        assert_eq!(agent.xdp_mode, XdpMode::Native);
        assert_eq!(
            agent.next_hop_mac,
            NextHopMac::Fixed(MacAddr([2, 0, 0x5e, 0x10, 0, 1]))
        );
        assert_eq!(
            agent.encap_source_v4,
            Some(Ipv4Prefix {
                addr: Ipv4Addr::new(10, 255, 0, 1),
                len: 32
            })
        );
        assert_eq!(agent.encap_source_v6.map(|p| p.len), Some(112));
        assert_eq!(agent.egress_mtu, 9000);
        assert_eq!(agent.flow_table_entries, 65536);
        let vip = &config.vips[0];
        assert_eq!(
            (vip.port, vip.protocol, vip.mode),
            (0, Protocol::Udp, VipMode::DsrL2)
        );
        assert_eq!(vip.table_size, 251);
        assert_eq!(vip.health_check.as_ref().map(|c| c.port), Some(53));
        assert_eq!(
            vip.backends[0].mac.map(|m| m.to_string()).as_deref(),
            Some("02:00:00:00:00:21")
        );
        assert_eq!(vip.backends[0].weight, 65535);
    }

    #[test]
    fn display_names_file_line_key_and_what_is_valid() {
        let text = with_agent(
            r#"
[[vip]]
name = "web"
address = "192.0.2.10"
port = 80
protocol = "tcp"

[[vip.backend]]
address = "10.0.0.1"
weight = 70000
"#,
        );
        assert_eq!(
            errors(&text),
            ["xlb.toml:14: vip[0].backend[0].weight: 70000 is out of range; expected 0..=65535"]
        );
    }

    #[test]
    fn syntax_errors_give_line_and_column() {
        let all = errors("[agent]\ninterface = eth0\n");
        assert_eq!(all.len(), 1, "{all:?}");
        assert!(
            all[0].starts_with("xlb.toml:2:13: invalid TOML: "),
            "{}",
            all[0]
        );
        let all = errors("[agent]\ninterface = \"eth0\"\ninterface = \"eth1\"\n[[vip]\n");
        assert!(
            all[0].starts_with("xlb.toml:3:1: invalid TOML: duplicate key"),
            "{all:?}"
        );
        assert!(all[1].starts_with("xlb.toml:4:"), "{all:?}");
    }

    #[test]
    fn unknown_keys_are_named_with_the_allowed_ones() {
        let text = with_agent(
            r#"intervall = 3
[[vips]]
name = "x"

[[vip]]
name = "web"
address = "192.0.2.10"
port = 80
protocol = "tcp"
health_check = { type = "tcp", intervall_ms = 5 }

[[vip.backend]]
address = "10.0.0.1"
wieght = 1
"#,
        );
        let all = errors(&text);
        assert_eq!(all.len(), 4, "{all:#?}");
        assert!(all[0].starts_with(
            "xlb.toml:5: agent.intervall: unknown key; allowed keys here: interface, xdp_mode,"
        ));
        assert_eq!(
            all[1],
            "xlb.toml:6: vips: unknown key; did you mean `vip`? allowed at the top level: \
             [agent], [[vip]], [[region]]"
        );
        assert!(all[2].starts_with(
            "xlb.toml:14: vip[0].health_check.intervall_ms: unknown key; did you mean \
             `interval_ms`? allowed keys here: type, port, interval_ms,"
        ));
        assert!(all[3].starts_with(
            "xlb.toml:18: vip[0].backend[0].wieght: unknown key; did you mean `weight`? allowed \
             keys here: address, weight, region, mac, port, pool, health_check"
        ));
    }

    #[test]
    fn missing_required_keys_are_reported_at_their_table() {
        assert_only_error(
            "",
            "xlb.toml:1: agent: required key is missing; expected an [agent] table",
        );
        let all = errors(
            r#"[agent]
xdp_mode = "auto"

[[vip]]
port = 80

[[vip.backend]]
weight = 1
"#,
        );
        assert_eq!(
            all,
            [
                "xlb.toml:1: agent.interface: required key is missing; expected the network \
                 interface to attach to, e.g. \"eth0\"",
                "xlb.toml:4: vip[0].name: required key is missing; expected a name of lowercase \
                 letters, digits, '_' and '-', e.g. \"web\"",
                "xlb.toml:4: vip[0].address: required key is missing; expected an IP address \
                 such as \"192.0.2.10\" or \"2001:db8::10\"",
                "xlb.toml:4: vip[0].protocol: required key is missing; expected \"tcp\" or \
                 \"udp\"",
                "xlb.toml:7: vip[0].backend[0].address: required key is missing; expected an IP \
                 address such as \"192.0.2.10\" or \"2001:db8::10\"",
            ]
        );
    }

    #[test]
    fn wrong_types_say_what_was_expected_and_found() {
        let text = r#"[agent]
interface = "eth0"
egress_mtu = "1500"
vip = 3
"#;
        let all = errors(text);
        assert_eq!(
            all,
            [
                "xlb.toml:3: agent.egress_mtu: expected an integer in 1280..=9216, found the \
                 string \"1500\"",
                "xlb.toml:4: agent.vip: unknown key; allowed keys here: interface, xdp_mode, \
                 next_hop_mac, encap_source_v4, encap_source_v6, egress_mtu, admin_socket, \
                 metrics_listen, state_dir, bpffs_dir, flow_table_entries, region, \
                 tunnel_addresses, capacity_port, gateway_workers",
            ]
        );
        assert_only_error(
            "vip = 3\n[agent]\ninterface = \"eth0\"\n",
            "xlb.toml:1: vip: expected an array of tables ([[vip]]), found the integer 3",
        );
        assert_only_error(
            &with_agent("[vip]\nname = \"web\"\n"),
            "xlb.toml:5: vip: expected an array of tables ([[vip]]), found a table",
        );
        assert_only_error(
            &with_agent(
                "[[vip]]\nname = \"web\"\naddress = \"192.0.2.1\"\nport = 1\nprotocol = \"tcp\"\n\
                 backend = [\"10.0.0.1\"]\n",
            ),
            "xlb.toml:10: vip[0].backend[0]: expected a [[vip.backend]] table, found the string \
             \"10.0.0.1\"",
        );
    }

    #[test]
    fn all_errors_are_collected() {
        let text = with_agent(
            r#"
[[vip]]
name = "Web"
address = "192.0.2.300"
port = 80
protocol = "sctp"
table_size = 65536

[[vip.backend]]
address = "10.0.0.1"
weight = -1
"#,
        );
        let all = errors(&text);
        assert_eq!(all.len(), 5, "{all:#?}");
        assert!(all[0].starts_with("xlb.toml:7: vip[0].name: \"Web\" contains 'W'"));
        assert!(all[1].starts_with("xlb.toml:8: vip[0].address: \"192.0.2.300\" is not an IP"));
        assert!(all[2].starts_with(
            "xlb.toml:10: vip[0].protocol: \"sctp\" is not a valid protocol; expected one of \
             \"tcp\", \"udp\""
        ));
        assert!(all[3].starts_with("xlb.toml:11: vip[0].table_size: 65536 is not prime"));
        assert_eq!(
            all[4],
            "xlb.toml:15: vip[0].backend[0].weight: -1 is out of range; expected 0..=65535"
        );
    }

    const TWO_VIPS: &str = r#"
[[vip]]
name = "web"
address = "192.0.2.10"
port = 80
protocol = "tcp"

[[vip]]
name = "NAME"
address = "ADDRESS"
port = PORT
protocol = "tcp"
"#;

    fn two_vips(name: &str, address: &str, port: u16) -> String {
        with_agent(
            &TWO_VIPS
                .replace("NAME", name)
                .replace("ADDRESS", address)
                .replace("PORT", &port.to_string()),
        )
    }

    #[test]
    fn names_are_at_most_64_characters_in_the_file_and_at_run_time() {
        let longest = "a".repeat(MAX_NAME_LEN);
        ok(&two_vips(&longest, "192.0.2.11", 80));
        let too_long = "a".repeat(MAX_NAME_LEN + 1);
        assert_only_error(
            &two_vips(&too_long, "192.0.2.11", 80),
            "xlb.toml:13: vip[1].name: \"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\"... \
             (65 characters) is 65 characters long; expected at most 64",
        );
        // The run-time API checks names with the same rule (a 60 KB name was accepted, and
        // then labelled every metric of the VIP).
        assert!(rules::name(&longest).is_ok());
        let refused = rules::name(&"b".repeat(60_000)).unwrap_err();
        assert!(
            refused.message.contains("expected at most 64"),
            "{}",
            refused.message
        );
    }

    #[test]
    fn vip_names_must_be_unique() {
        assert_only_error(
            &two_vips("web", "192.0.2.11", 80),
            "xlb.toml:13: vip[1].name: VIP name \"web\" is already used by vip[0] (line 6); \
             expected a unique name",
        );
    }

    #[test]
    fn vips_must_differ_in_address_port_or_protocol() {
        assert_only_error(
            &two_vips("web2", "192.0.2.10", 80),
            "xlb.toml:14: vip[1].address: tcp 192.0.2.10 port 80 is already served by vip[0] \
             (\"web\", line 6); expected each (address, port, protocol) once",
        );
        // Port 0 (every port) beside a specific port of the same address is fine: the specific
        // VIP wins for its port.
        ok(&two_vips("web2", "192.0.2.10", 0));
        ok(&two_vips("web2", "192.0.2.10", 81));
        ok(&two_vips("web2", "192.0.2.11", 80));
        ok(&with_agent(
            &TWO_VIPS
                .replace("NAME", "dns")
                .replace("ADDRESS", "192.0.2.10")
                .replace("PORT\nprotocol = \"tcp\"", "80\nprotocol = \"udp\""),
        ));
    }

    #[test]
    fn backend_addresses_must_be_unique_within_a_vip() {
        let text = with_agent(
            r#"
[[vip]]
name = "web"
address = "192.0.2.10"
port = 80
protocol = "tcp"

[[vip.backend]]
address = "2001:db8::1"

[[vip.backend]]
address = "2001:db8:0::1"
"#,
        );
        assert_only_error(
            &text,
            "xlb.toml:16: vip[0].backend[1].address: 2001:db8::1 is already a backend of this \
             VIP (vip[0].backend[0]); list each backend once",
        );
    }

    #[test]
    fn dsr_l2_backends_need_the_vips_family() {
        let text = with_agent(
            r#"
[[vip]]
name = "l2"
address = "192.0.2.10"
port = 80
protocol = "tcp"
mode = "dsr-l2"

[[vip.backend]]
address = "192.0.2.11"

[[vip.backend]]
address = "2001:db8::11"
"#,
        );
        assert_only_error(
            &text,
            "xlb.toml:17: vip[0].backend[1].address: an IPv6 backend on an IPv4 dsr-l2 VIP; \
             dsr-l2 rewrites only the MAC",
        );
    }

    #[test]
    fn encapsulation_needs_a_source_of_the_backends_family() {
        let vip = r#"
[[vip]]
name = "web"
address = "2001:db8::10"
port = 80
protocol = "tcp"

[[vip.backend]]
address = "10.0.0.1"

[[vip.backend]]
address = "2001:db8::1"
"#;
        let text = format!("[agent]\ninterface = \"eth0\"\n{vip}");
        let all = errors(&text);
        assert_eq!(all.len(), 2, "{all:#?}");
        assert!(all[0].starts_with(
            "xlb.toml:1: agent.encap_source_v4: required key is missing: vip[0] (\"web\") \
             forwards to IPv4 backends such as vip[0].backend[0] by IPIP (dsr-ipip), which needs \
             an outer IPv4 source; expected an IPv4 address or prefix such as \"10.255.0.0/16\""
        ));
        assert!(all[1].starts_with("xlb.toml:1: agent.encap_source_v6: required key is missing"));
        // Not encapsulating: no source needed.
        ok(&format!(
            "[agent]\ninterface = \"eth0\"\n{}",
            vip.replace("protocol = \"tcp\"", "protocol = \"tcp\"\nmode = \"l7\"")
        ));
    }

    #[test]
    fn table_size_must_be_a_prime_large_enough() {
        let vip = |size: &str| {
            with_agent(&format!(
                r#"
[[vip]]
name = "web"
address = "192.0.2.10"
port = 80
protocol = "tcp"
table_size = {size}

[[vip.backend]]
address = "10.0.0.1"

[[vip.backend]]
address = "10.0.0.2"

[[vip.backend]]
address = "10.0.0.3"

[[vip.backend]]
address = "10.0.0.4"
weight = 0
"#
            ))
        };
        assert_only_error(
            &vip("65536"),
            "xlb.toml:11: vip[0].table_size: 65536 is not prime (Maglev needs a prime size so \
             every backend's permutation visits every slot); the nearest primes are 65521 and \
             65537",
        );
        assert_only_error(
            &vip("2"),
            "xlb.toml:11: vip[0].table_size: 2 slots are too few for 3 backends with weight > 0; \
             expected a prime of at least 3",
        );
        ok(&vip("3")); // the drained backend needs no slot
        assert_only_error(
            &vip("1048576"),
            "xlb.toml:11: vip[0].table_size: 1048576 is out of range; expected 2..=1048573",
        );
        assert_only_error(
            &vip("1048572"),
            "xlb.toml:11: vip[0].table_size: 1048572 is not prime (Maglev needs a prime size so \
             every backend's permutation visits every slot); the nearest primes are 1048571 and \
             1048573",
        );
    }

    #[test]
    fn agent_numbers_are_range_checked() {
        assert_only_error(
            &AGENT.replace("interface", "egress_mtu = 1279\ninterface"),
            "xlb.toml:2: agent.egress_mtu: 1279 is out of range; expected 1280..=9216",
        );
        assert_only_error(
            &AGENT.replace("interface", "flow_table_entries = 16777217\ninterface"),
            "xlb.toml:2: agent.flow_table_entries: 16777217 is out of range; expected \
             1024..=16777216",
        );
    }

    const CHECKED_VIP: &str = r#"
[[vip]]
name = "web"
address = "192.0.2.10"
port = PORT
protocol = "tcp"

[vip.health_check]
CHECK

[[vip.backend]]
address = "10.0.0.1"
BACKEND
"#;

    /// A VIP (port on line 9) whose check table starts on line 12 with `check` from line 13;
    /// `backend` keys start on line 16 + the number of lines of `check`.
    fn checked(port: u16, check: &str, backend: &str) -> String {
        with_agent(
            &CHECKED_VIP
                .replace("PORT", &port.to_string())
                .replace("CHECK", check)
                .replace("BACKEND", backend),
        )
    }

    #[test]
    fn timeout_must_be_below_interval() {
        assert_only_error(
            &checked(
                80,
                "type = \"tcp\"\ninterval_ms = 1000\ntimeout_ms = 1000",
                "",
            ),
            "xlb.toml:15: vip[0].health_check.timeout_ms: timeout_ms 1000 is not below \
             interval_ms 1000; expected timeout_ms < interval_ms",
        );
        // The VIP's check alone is fine (default interval 2000); the backend's override is not,
        // and is blamed for its own key.
        assert_only_error(
            &checked(80, "type = \"tcp\"", "health_check = { timeout_ms = 2500 }"),
            "xlb.toml:17: vip[0].backend[0].health_check.timeout_ms: timeout_ms 2500 is not \
             below interval_ms 2000",
        );
        // A mistake in the VIP's check is reported once, not again for each backend.
        assert_only_error(
            &checked(
                80,
                "type = \"tcp\"\ntimeout_ms = 3000",
                "health_check = { rise = 5 }",
            ),
            "xlb.toml:14: vip[0].health_check.timeout_ms: timeout_ms 3000 is not below",
        );
    }

    #[test]
    fn health_check_keys_are_validated() {
        assert_only_error(
            &checked(80, "rise = 2", ""),
            "xlb.toml:12: vip[0].health_check.type: required key is missing; expected \"tcp\", \
             \"http\", \"https\" or \"udp\"",
        );
        let all = errors(&checked(
            80,
            "type = \"tcp\"\ninterval_ms = 50\nrise = 0\npath = \"/x\"\npanic_threshold = 1.5",
            "",
        ));
        assert_eq!(
            all,
            [
                "xlb.toml:14: vip[0].health_check.interval_ms: 50 is out of range; expected \
                 100..=3600000",
                "xlb.toml:15: vip[0].health_check.rise: 0 is out of range; expected 1..=100",
                "xlb.toml:16: vip[0].health_check.path: `path` only applies to http and https \
                 checks, and this check's type is \"tcp\"; remove it or change `type`",
                "xlb.toml:17: vip[0].health_check.panic_threshold: 1.5 is out of range; \
                 expected 0.0..=1.0",
            ]
        );
        assert_only_error(
            &checked(
                80,
                "type = \"http\"\nexpected_status = 600\npath = \"/\"",
                "",
            ),
            "xlb.toml:14: vip[0].health_check.expected_status: 600 is out of range; expected \
             100..=599",
        );
        assert_only_error(
            &checked(80, "type = \"http\"\npath = \"healthz\"", ""),
            "xlb.toml:14: vip[0].health_check.path: \"healthz\" is not an absolute request path",
        );
    }

    #[test]
    fn udp_checks_need_send_and_expect() {
        let all = errors(&checked(80, "type = \"udp\"\nsend = \"ping\"", ""));
        assert_eq!(
            all,
            [
                "xlb.toml:12: vip[0].health_check.expect: required key is missing; expected the \
              text a udp check's reply must contain, e.g. expect = \"pong\""
            ]
        );
        ok(&checked(
            80,
            "type = \"udp\"\nsend = \"ping\"\nexpect = \"\"",
            "",
        ));
    }

    #[test]
    fn a_port_0_vip_needs_a_check_port() {
        assert_only_error(
            &checked(0, "type = \"tcp\"", ""),
            "xlb.toml:12: vip[0].health_check.port: required key is missing; expected a port in \
             1..=65535 to check, because the VIP's port is 0 (every port)",
        );
        ok(&checked(0, "type = \"tcp\"\nport = 22", ""));
        // Only a backend's own check (the VIP has none) is checked on its own.
        let text = with_agent(
            r#"
[[vip]]
name = "any"
address = "192.0.2.10"
port = 0
protocol = "tcp"

[[vip.backend]]
address = "10.0.0.1"
health_check = { type = "tcp" }
"#,
        );
        assert_only_error(
            &text,
            "xlb.toml:14: vip[0].backend[0].health_check.port: required key is missing",
        );
    }

    #[test]
    fn backend_checks_merge_over_the_vips() {
        let config = ok(&checked(
            80,
            "type = \"http\"\npath = \"/healthz\"\nrise = 4\nport = 8080",
            "health_check = { type = \"https\", expected_status = 204 }",
        ));
        let vip = &config.vips[0];
        let merged = vip.backends[0].health_check.as_ref().unwrap();
        assert_eq!(
            merged.probe,
            Probe::Https(HttpProbe {
                path: "/healthz".into(),
                expected_status: 204
            })
        );
        assert_eq!((merged.rise, merged.port), (4, 8080));

        // A change of type to one with other keys inherits none of the VIP's type-specific
        // keys, and needs its own.
        let all = errors(&checked(
            80,
            "type = \"http\"\npath = \"/healthz\"",
            "health_check = { type = \"udp\" }",
        ));
        assert_eq!(all.len(), 2, "{all:#?}");
        assert!(all[0].starts_with(
            "xlb.toml:18: vip[0].backend[0].health_check.send: required key is missing"
        ));
        assert!(all[1].starts_with(
            "xlb.toml:18: vip[0].backend[0].health_check.expect: required key is missing"
        ));
        assert_only_error(
            &checked(
                80,
                "type = \"tcp\"",
                "health_check = { panic_threshold = 0.2 }",
            ),
            "xlb.toml:17: vip[0].backend[0].health_check.panic_threshold: panic_threshold \
             applies to the VIP's whole pool, not one backend; set it in vip[0].health_check",
        );
    }

    #[test]
    fn mac_only_on_dsr_l2_backends() {
        assert_only_error(
            &checked(80, "type = \"tcp\"", "mac = \"02:00:00:00:00:01\""),
            "xlb.toml:17: vip[0].backend[0].mac: a backend MAC only applies to dsr-l2 VIPs, and \
             this VIP's mode is \"dsr-ipip\"; remove `mac`, or set mode = \"dsr-l2\" on the VIP",
        );
    }

    #[test]
    fn invalid_addresses_and_macs() {
        let cases = [
            (
                "address = \"10.0.0.256\"",
                "xlb.toml:14: vip[0].backend[0].address: \"10.0.0.256\" is not an IP address; \
                 expected an IP address such as",
            ),
            (
                "address = \"224.0.0.1\"",
                "xlb.toml:14: vip[0].backend[0].address: \"224.0.0.1\" is a multicast address",
            ),
            (
                "address = \"0.0.0.0\"",
                "xlb.toml:14: vip[0].backend[0].address: \"0.0.0.0\" is the unspecified address",
            ),
            (
                "address = \"127.0.0.1\"",
                "xlb.toml:14: vip[0].backend[0].address: 127.0.0.1 is a loopback address",
            ),
        ];
        let vip = r#"
[[vip]]
name = "web"
address = "192.0.2.10"
port = 80
protocol = "tcp"
mode = "dsr-l2"

[[vip.backend]]
"#;
        for (backend, expected) in cases {
            assert_only_error(&with_agent(&format!("{vip}{backend}\n")), expected);
        }
        for (mac, why) in [
            (
                "02:00:00:00:00",
                "is not a MAC address; expected six hex pairs",
            ),
            ("02:00:00:00:00:0g", "is not a MAC address"),
            ("02-00-00-00-00-01", "is not a MAC address"),
            ("ff:ff:ff:ff:ff:ff", "is a multicast or broadcast MAC"),
            ("00:00:00:00:00:00", "is the all-zero MAC"),
        ] {
            let text = with_agent(&format!("{vip}address = \"192.0.2.11\"\nmac = \"{mac}\"\n"));
            assert_only_error(
                &text,
                &format!("xlb.toml:15: vip[0].backend[0].mac: \"{mac}\" {why}"),
            );
        }
        assert_only_error(
            &AGENT.replace("interface", "next_hop_mac = \"router\"\ninterface"),
            "xlb.toml:2: agent.next_hop_mac: \"router\" is not a MAC address; expected six hex \
             pairs separated by ':', e.g. \"02:00:5e:10:00:01\"; or \"auto\"",
        );
        assert_only_error(
            &AGENT.replace(
                "interface",
                "metrics_listen = \"localhost:9641\"\ninterface",
            ),
            "xlb.toml:2: agent.metrics_listen: \"localhost:9641\" is not an address and port",
        );
        assert_only_error(
            &AGENT.replace("\"eth0\"", "\"a-very-long-interface\""),
            "xlb.toml:2: agent.interface: \"a-very-long-interface\" is 21 bytes long; Linux \
             interface names have at most 15",
        );
        assert_only_error(
            &AGENT.replace("interface", "state_dir = \"var/lib/xlb\"\ninterface"),
            "xlb.toml:2: agent.state_dir: \"var/lib/xlb\" is not an absolute path",
        );
    }

    #[test]
    fn encap_sources_and_prefix_lengths() {
        let v4 = |value: &str| AGENT.replace("\"10.255.0.0/16\"", &format!("\"{value}\""));
        let v6 = |value: &str| AGENT.replace("\"fd00:ff::/96\"", &format!("\"{value}\""));
        assert_only_error(
            &v4("10.255.0.0/33"),
            "xlb.toml:3: agent.encap_source_v4: prefix length /33 is out of range; expected \
             /0../32",
        );
        assert_only_error(
            &v4("10.255.0.1/16"),
            "xlb.toml:3: agent.encap_source_v4: \"10.255.0.1/16\" has host bits set; expected \
             the network address, \"10.255.0.0/16\"",
        );
        assert_only_error(
            &v4("fd00::1"),
            "xlb.toml:3: agent.encap_source_v4: \"fd00::1\" is an IPv6 address; expected an IPv4 \
             address or prefix",
        );
        assert_only_error(
            &v6("fd00:ff::/64"),
            "xlb.toml:4: agent.encap_source_v6: prefix length /64 is too short; expected \
             /96../128",
        );
        assert_only_error(
            &v6("fd00:ff::/129"),
            "xlb.toml:4: agent.encap_source_v6: prefix length /129 is out of range; expected \
             /96../128",
        );
        assert_only_error(
            &v6("fd00:ff::/x"),
            "xlb.toml:4: agent.encap_source_v6: prefix length /x is out of range",
        );
        ok(&v6("fd00:ff::7"));
    }

    #[test]
    fn regions_list_every_backend_region() {
        let text = with_agent(
            r#"
[[vip]]
name = "web"
address = "192.0.2.10"
port = 80
protocol = "tcp"
regions = ["eu-west", "eu-north", "eu-west"]

[[vip.backend]]
address = "10.0.0.1"
region = "us-east"

[[vip.backend]]
address = "10.0.0.2"

[[region]]
name = "eu-west"
tunnel = "198.51.100.1"

[[region]]
name = "eu-north"
tunnel = "198.51.100.2"
"#,
        );
        let all = errors(&text);
        assert_eq!(
            all,
            [
                "xlb.toml:11: vip[0].regions[2]: region \"eu-west\" is listed twice (first as \
                 vip[0].regions[0]); list each region once",
            ],
            "backends are not checked against an invalid list"
        );
        let all = errors(&text.replace(", \"eu-west\"]", "]"));
        assert_eq!(
            all,
            [
                "xlb.toml:15: vip[0].backend[0].region: region \"us-east\" is not in \
                 vip[0].regions; expected one of \"eu-west\", \"eu-north\", or add it to the \
                 VIP's regions",
                "xlb.toml:18: vip[0].backend[1].region: the backend has no region, so it is in \
                 \"local\", which is not in vip[0].regions; expected `region = ` one of \
                 \"eu-west\", \"eu-north\"",
            ]
        );
    }

    #[test]
    fn l7_vips_need_tcp_and_a_port() {
        let text = with_agent(
            r#"
[[vip]]
name = "api"
address = "192.0.2.10"
port = 0
protocol = "udp"
mode = "l7"
"#,
        );
        let all = errors(&text);
        assert_eq!(all.len(), 2, "{all:#?}");
        assert!(all[0].starts_with("xlb.toml:9: vip[0].port: an l7 VIP needs a specific port"));
        assert!(all[1].starts_with("xlb.toml:10: vip[0].protocol: an l7 VIP is served by"));
    }

    #[test]
    fn load_reads_the_file_and_names_it() {
        let dir = std::env::temp_dir().join(format!("xlb-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("xlb.toml");
        std::fs::write(&path, "[agent]\ninterface = \"eth0\"\nbogus = 1\n").unwrap();
        let err = load(&path).unwrap_err();
        assert!(!err.is_unreadable());
        assert!(
            err.to_string()
                .starts_with(&format!("{}:3: agent.bogus: unknown key", path.display())),
            "{err}"
        );
        std::fs::write(&path, b"[agent]\ninterface = \"eth\xff\"\n").unwrap();
        let err = load(&path).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{}:2:17: the file is not UTF-8 text; TOML files must be UTF-8",
                path.display()
            )
        );
        std::fs::remove_file(&path).unwrap();
        let err = load(&path).unwrap_err();
        assert!(err.is_unreadable());
        assert!(
            err.to_string()
                .starts_with(&format!("{}: cannot be read: ", path.display())),
            "{err}"
        );
        std::fs::remove_dir(&dir).unwrap();
    }

    #[test]
    fn edit_distance_suggests_close_keys_only() {
        assert_eq!(closest("intervall_ms", CHECK_KEYS), Some("interval_ms"));
        assert_eq!(closest("healthcheck", VIP_KEYS), Some("health_check"));
        assert_eq!(closest("colour", VIP_KEYS), None);
    }

    fn one_vip(name: &str, address: &str, backend: &str) -> String {
        with_agent(&format!(
            "[[vip]]\nname = \"{name}\"\naddress = \"{address}\"\nport = 80\nprotocol = \"tcp\"\n\
             [[vip.backend]]\naddress = \"{backend}\"\n"
        ))
    }

    #[test]
    fn names_longer_than_a_dns_label_are_refused_and_quoted_short() {
        ok(&one_vip(
            &"a".repeat(MAX_NAME_LEN),
            "192.0.2.10",
            "10.0.0.1",
        ));
        for len in [MAX_NAME_LEN + 1, 1000, 1_000_000] {
            let all = errors(&one_vip(&"a".repeat(len), "192.0.2.10", "10.0.0.1"));
            assert_eq!(all.len(), 1, "{len}");
            assert!(
                all[0].starts_with("xlb.toml:6: vip[0].name: "),
                "{}",
                all[0]
            );
            assert!(
                all[0].contains(&format!("expected at most {MAX_NAME_LEN}")),
                "{}",
                all[0]
            );
            assert!(all[0].len() < 300, "a {len}-character name echoed whole");
        }
    }

    #[test]
    fn every_quoted_value_in_an_error_is_bounded() {
        for bad in [
            format!("10.0.0.{}", "9".repeat(5000)),
            "x".repeat(100_000),
            format!("fd00::{}", ":1".repeat(3000)),
        ] {
            let all = errors(&one_vip("web", "192.0.2.10", &bad));
            assert!(
                all.iter().all(|e| e.len() < 400),
                "an error echoes the whole value: {} bytes",
                all.iter().map(String::len).max().unwrap_or(0)
            );
            assert!(all[0].contains("characters)"), "{}", all[0]);
        }
        // Short values stay whole.
        assert_eq!(abbreviate_quotes("\"abc\" is bad"), "\"abc\" is bad");
        let long = format!("{:?} is bad; expected \"x\"", "é\"".repeat(100));
        let cut = abbreviate_quotes(&long);
        assert!(
            cut.ends_with("(300 characters) is bad; expected \"x\""),
            "{cut}"
        );
        assert!(!cut.contains("\\\"..."), "cut inside an escape: {cut}");
    }

    #[test]
    fn ipv4_mapped_addresses_are_refused_with_the_ipv4_form() {
        for (vip, backend, line, key) in [
            ("::ffff:192.0.2.10", "10.0.0.1", 7, "vip[0].address"),
            ("::FFFF:c000:20a", "10.0.0.1", 7, "vip[0].address"),
            (
                "192.0.2.10",
                "::ffff:10.0.0.1",
                11,
                "vip[0].backend[0].address",
            ),
        ] {
            let all = errors(&one_vip("web", vip, backend));
            let first = all
                .iter()
                .find(|e| e.contains("IPv4-mapped"))
                .unwrap_or_else(|| panic!("{vip} {backend}: {all:?}"));
            assert!(
                first.starts_with(&format!("xlb.toml:{line}: {key}: ")),
                "{first}"
            );
            assert!(
                first.contains("expected the IPv4 address itself"),
                "{first}"
            );
        }
        // Ordinary IPv6, including the IPv4-compatible and NAT64 forms, stays valid.
        ok(&one_vip("web", "2001:db8::10", "2001:db8::1"));
        ok(&one_vip("web", "64:ff9b::c000:20a", "2001:db8::1"));
    }

    #[test]
    fn a_backend_cannot_be_its_own_vip() {
        for (vip, mode) in [
            ("192.0.2.10", "dsr-ipip"),
            ("192.0.2.10", "dsr-l2"),
            ("192.0.2.10", "l7"),
            ("2001:db8::10", "dsr-ipip"),
        ] {
            let text = one_vip("web", vip, vip).replace(
                "protocol = \"tcp\"\n",
                &format!("protocol = \"tcp\"\nmode = \"{mode}\"\n"),
            );
            let all = errors(&text);
            assert!(
                all.iter().any(
                    |e| e.starts_with("xlb.toml:12: vip[0].backend[0].address: ")
                        && e.contains("the VIP's own address")
                ),
                "{mode} {vip}: {all:?}"
            );
        }
        let mut cfg = ok(&one_vip("web", "192.0.2.10", "10.0.0.1"));
        cfg.vips[0].backends[0].address = "192.0.2.10".parse().unwrap();
        let found = rules::check(&cfg);
        assert!(
            found.iter().any(|e| e.contains("the VIP's own address")),
            "{found:?}"
        );
    }

    #[test]
    fn a_repeated_table_or_key_is_named() {
        let all = errors("[agent]\ninterface = \"eth0\"\n[agent]\ninterface = \"eth1\"\n");
        assert!(
            all[0].starts_with("xlb.toml:3:2: invalid TOML: table [agent] appears twice"),
            "{all:?}"
        );
        let all = errors(&with_agent(
            "[[vip]]\nname = \"web\"\nname = \"api\"\naddress = \"192.0.2.10\"\nport = 80\n\
             protocol = \"tcp\"\n[vip.health_check]\ntype = \"tcp\"\n[vip.health_check]\n\
             type = \"tcp\"\n",
        ));
        assert!(
            all.iter()
                .any(|e| e.contains("duplicate key \"name\": a key may appear once per table")),
            "{all:?}"
        );
        assert!(
            all.iter()
                .any(|e| e.contains("table [vip.health_check] appears twice")),
            "{all:?}"
        );
    }

    #[test]
    fn the_backend_limit_points_at_the_first_backend_over_it() {
        let limit = lb_common::types::MAX_BACKENDS as usize;
        let mut text = with_agent(
            "[[vip]]\nname = \"web\"\naddress = \"192.0.2.10\"\nport = 80\nprotocol = \"tcp\"\n\
             table_size = 1048573\n",
        );
        for i in 0..=limit {
            text.push_str(&format!(
                "[[vip.backend]]\naddress = \"10.{}.{}.{}\"\nweight = 0\n",
                i >> 16,
                (i >> 8) & 255,
                i & 255
            ));
        }
        let all = errors(&text);
        let over = all
            .iter()
            .find(|e| e.contains("backends in all"))
            .unwrap_or_else(|| panic!("{all:?}"));
        // Lines 5..=10 are the VIP; backend i's address is on line 12 + 3 i.
        let line = 12 + 3 * limit;
        assert!(
            over.starts_with(&format!("xlb.toml:{line}: vip[0].backend[{limit}]")),
            "{over}"
        );
    }

    #[test]
    fn vips_on_loopback_or_link_local_addresses_are_refused() {
        for (vip, backend) in [
            ("127.0.0.1", "10.0.0.1"),
            ("127.9.9.9", "10.0.0.1"),
            ("169.254.1.1", "10.0.0.1"),
            ("::1", "2001:db8::1"),
            ("fe80::1", "2001:db8::1"),
            ("febf::1", "2001:db8::1"),
        ] {
            let all = errors(&one_vip("web", vip, backend));
            assert!(
                all.iter()
                    .any(|e| e.starts_with("xlb.toml:7: vip[0].address: ")
                        && e.contains("never reaches the balancer")),
                "{vip}: {all:?}"
            );
        }
        ok(&one_vip("web", "fec0::10", "2001:db8::1"));
        let mut cfg = ok(&one_vip("web", "192.0.2.10", "10.0.0.1"));
        cfg.vips[0].address = "127.0.0.1".parse().unwrap();
        assert!(
            rules::check(&cfg)
                .iter()
                .any(|e| e.contains("never reaches the balancer")),
            "run-time changes are held to the same rule"
        );
    }

    /// A valid multi-region file: the agent (lines 1-6), one [[region]] (8-10) and a VIP
    /// (12-17) with a failover table (19-20) and one backend (22-24).
    const REGIONS: &str = r#"[agent]
interface = "eth0"
encap_source_v4 = "10.255.0.0/16"
encap_source_v6 = "fd00:ff::/96"
region = "eu-west"
tunnel_addresses = ["198.51.100.1"]

[[region]]
name = "eu-north"
tunnel = "198.51.100.2"

[[vip]]
name = "web"
address = "192.0.2.10"
port = 80
protocol = "tcp"
regions = ["eu-west", "eu-north"]

[vip.failover]
mode = "proportional"

[[vip.backend]]
address = "10.0.0.1"
region = "eu-west"
"#;

    /// `REGIONS` with `from` replaced by `to` (exactly once).
    fn regions_with(from: &str, to: &str) -> String {
        assert_eq!(REGIONS.matches(from).count(), 1, "{from:?}");
        REGIONS.replace(from, to)
    }

    #[test]
    fn region_settings_have_defaults() {
        let config = ok(&with_agent(
            "[[vip]]\nname = \"web\"\naddress = \"192.0.2.10\"\nport = 80\nprotocol = \"tcp\"\n",
        ));
        assert_eq!(config.agent.region, "local");
        assert!(config.agent.tunnel_addresses.is_empty());
        assert_eq!(config.agent.capacity_port, 9301);
        assert_eq!(config.agent.gateway_workers, 0, "one per CPU by default");
        assert!(config.regions.is_empty());
        let failover = config.vips[0].failover;
        assert_eq!(failover, Failover::default());
        assert_eq!(failover.mode, FailoverMode::Whole);
        assert_eq!(failover.min_healthy, 0.7);
        assert_eq!(failover.hold_down, Duration::from_secs(30));

        let config = ok(REGIONS);
        assert_eq!(config.agent.region, "eu-west");
        assert_eq!(
            config.agent.tunnel_addresses,
            ["198.51.100.1".parse::<IpAddr>().unwrap()]
        );
        let region = config.region("eu-north").expect("the [[region]]");
        assert_eq!(
            region,
            &Region {
                name: "eu-north".into(),
                tunnel: "198.51.100.2".parse().unwrap(),
                capacity_port: 9301,
                check_interval: Duration::from_millis(1000),
                timeout: Duration::from_millis(500),
                rise: 2,
                fall: 2,
            }
        );
        assert_eq!(
            config.region("eu-west"),
            None,
            "this host's region has no table"
        );
        let vip = &config.vips[0];
        assert_eq!(vip.regions, ["eu-west", "eu-north"]);
        assert_eq!(vip.failover.mode, FailoverMode::Proportional);
        assert_eq!(vip.failover.min_healthy, 0.7);
        assert_eq!(vip.failover.hold_down, Duration::from_secs(30));
        assert_eq!(rules::check(&config), Vec::<String>::new());
    }

    #[test]
    fn gateway_workers_are_parsed_and_bounded() {
        let with = |line: &str| format!("[agent]\ninterface = \"eth0\"\n{line}\n");
        assert_eq!(ok(&with("gateway_workers = 4")).agent.gateway_workers, 4);
        assert_only_error(
            &with("gateway_workers = 2000"),
            "xlb.toml:3: agent.gateway_workers: 2000 is out of range; expected 0..=1024",
        );
    }

    #[test]
    fn region_settings_are_parsed() {
        let text = regions_with(
            "tunnel_addresses = [\"198.51.100.1\"]\n",
            "tunnel_addresses = [\"198.51.100.1\", \"2001:db8:ff::1\"]\ncapacity_port = 9400\n",
        )
        .replace(
            "tunnel = \"198.51.100.2\"\n",
            "tunnel = \"2001:db8:ff::2\"\ncheck_interval_ms = 250\ntimeout_ms = 100\nrise = 3\n\
             fall = 5\n",
        )
        .replace(
            "mode = \"proportional\"\n",
            "mode = \"whole\"\nmin_healthy = 1\nhold_down_ms = 0\n",
        );
        let config = ok(&text);
        assert_eq!(config.agent.capacity_port, 9400);
        assert_eq!(config.agent.tunnel_addresses.len(), 2);
        let region = &config.regions[0];
        assert_eq!(region.tunnel, "2001:db8:ff::2".parse::<IpAddr>().unwrap());
        assert_eq!(region.capacity_port, 9400, "the agent's port by default");
        assert_eq!(region.check_interval, Duration::from_millis(250));
        assert_eq!(region.timeout, Duration::from_millis(100));
        assert_eq!((region.rise, region.fall), (3, 5));
        let failover = config.vips[0].failover;
        assert_eq!(failover.mode, FailoverMode::Whole);
        assert_eq!(failover.min_healthy, 1.0);
        assert_eq!(failover.hold_down, Duration::ZERO);
        let config = ok(&regions_with(
            "tunnel = \"198.51.100.2\"\n",
            "tunnel = \"198.51.100.2\"\ncapacity_port = 1\n",
        ));
        assert_eq!(config.regions[0].capacity_port, 1);
        // A VIP may list only other regions: this host is then an ingress.
        let config = ok(&regions_with("\"eu-west\", \"eu-north\"", "\"eu-north\"")
            .replace("[vip.failover]\nmode = \"proportional\"\n", "")
            .replace(
                "address = \"10.0.0.1\"\nregion = \"eu-west\"",
                "address = \"10.0.0.1\"\nregion = \"eu-north\"",
            ));
        assert_eq!(config.vips[0].regions, ["eu-north"]);
    }

    #[test]
    fn agent_region_keys_are_validated() {
        assert_only_error(
            &regions_with("region = \"eu-west\"\ntunnel", "region = \"EU\"\ntunnel"),
            "xlb.toml:5: agent.region: \"EU\" contains 'E'",
        );
        for (tunnel, what) in [
            ("127.0.0.1", "is a loopback address"),
            ("::1", "is the loopback address"),
            ("169.254.0.1", "is a link-local address"),
            ("fe80::1", "is a link-local address"),
            ("0.0.0.0", "is the unspecified address"),
            ("224.0.0.1", "is a multicast address"),
            ("198.51.100", "is not an IP address"),
        ] {
            assert_only_error(
                &regions_with(
                    "[\"198.51.100.1\"]",
                    &format!("[\"198.51.100.1\", \"{tunnel}\"]"),
                ),
                &format!("xlb.toml:6: agent.tunnel_addresses[1]: \"{tunnel}\" {what}")
                    .replace("\"::1\" is the loopback", "::1 is the loopback")
                    .replace("\"127.0.0.1\" is a loopback", "127.0.0.1 is a loopback")
                    .replace("\"169.254.0.1\" is a link", "169.254.0.1 is a link")
                    .replace("\"fe80::1\" is a link", "fe80::1 is a link"),
            );
        }
        assert_only_error(
            &regions_with("[\"198.51.100.1\"]", "[\"198.51.100.1\", \"198.51.100.1\"]"),
            "xlb.toml:6: agent.tunnel_addresses[1]: 198.51.100.1 is listed twice (first as \
             agent.tunnel_addresses[0]); list each address once",
        );
        assert_only_error(
            &regions_with("[\"198.51.100.1\"]", "\"198.51.100.1\""),
            "xlb.toml:6: agent.tunnel_addresses: expected an array of this host's IP addresses",
        );
        assert_only_error(
            &regions_with("[\"198.51.100.1\"]", "[\"192.0.2.10\"]"),
            "xlb.toml:6: agent.tunnel_addresses[0]: 192.0.2.10 is the address of vip[0] \
             (\"web\"); expected a tunnel address that is no VIP's",
        );
        assert_only_error(
            &regions_with(
                "region = \"eu-west\"\ntunnel",
                "capacity_port = 0\nregion = \"eu-west\"\ntunnel",
            ),
            "xlb.toml:5: agent.capacity_port: 0 is out of range; expected 1..=65535",
        );
        // Empty: none.
        ok(&regions_with("[\"198.51.100.1\"]", "[]"));
    }

    /// A backend at a tunnel address would have its flows balanced again by the host that
    /// strips the tunnel: to this host's own address a loop through the router (the outer
    /// header is new at every round, the inner TTL never decremented), to another region's
    /// host a region hop the failover never chose.
    #[test]
    fn a_backend_at_a_tunnel_address_is_refused() {
        assert_only_error(
            &regions_with("address = \"10.0.0.1\"", "address = \"198.51.100.1\""),
            "xlb.toml:23: vip[0].backend[0].address: 198.51.100.1 is this host's own tunnel \
             address (agent.tunnel_addresses[0]), so the flows sent to it would be balanced \
             again there",
        );
        assert_only_error(
            &regions_with("address = \"10.0.0.1\"", "address = \"198.51.100.2\""),
            "xlb.toml:23: vip[0].backend[0].address: 198.51.100.2 is the tunnel of region[0] \
             (\"eu-north\"), so the flows sent to it would be balanced again there",
        );
        // Run-time changes are held to the same rule.
        let mut cfg = ok(REGIONS);
        cfg.vips[0].backends[0].address = "198.51.100.2".parse().unwrap();
        assert!(
            rules::check(&cfg)
                .iter()
                .any(|e| e.contains("the tunnel of region \"eu-north\"")),
            "{:?}",
            rules::check(&cfg)
        );
        cfg.vips[0].backends[0].address = "198.51.100.1".parse().unwrap();
        assert!(
            rules::check(&cfg)
                .iter()
                .any(|e| e.contains("this host's own tunnel address")),
            "{:?}",
            rules::check(&cfg)
        );
    }

    #[test]
    fn region_tables_are_validated() {
        assert_only_error(
            &regions_with("name = \"eu-north\"\n", ""),
            "xlb.toml:8: region[0].name: required key is missing",
        );
        assert_only_error(
            &regions_with("tunnel = \"198.51.100.2\"\n", ""),
            "xlb.toml:8: region[0].tunnel: required key is missing; expected the IP address of \
             that region's xlb host",
        );
        assert_only_error(
            &regions_with(
                "tunnel = \"198.51.100.2\"\n",
                "tunnel = \"198.51.100.2\"\nweight = 1\n",
            ),
            "xlb.toml:11: region[0].weight: unknown key; allowed keys here: name, tunnel, \
             capacity_port, check_interval_ms, timeout_ms, rise, fall",
        );
        let all = errors(&regions_with("name = \"eu-north\"", "name = \"eu-west\""));
        assert!(
            all[0].starts_with(
                "xlb.toml:9: region[0].name: \"eu-west\" is this host's own region \
                 (agent.region)"
            ),
            "{all:#?}"
        );
        assert_eq!(all.len(), 2, "and eu-north has no table: {all:#?}");
        let second = "[[region]]\nname = \"eu-north\"\ntunnel = \"198.51.100.3\"\n\n[[vip]]";
        assert_only_error(
            &regions_with("[[vip]]", second),
            "xlb.toml:13: region[1].name: region \"eu-north\" is already described by region[0] \
             (line 8); expected each region once",
        );
        let second = "[[region]]\nname = \"us-east\"\ntunnel = \"198.51.100.2\"\n\n[[vip]]";
        assert_only_error(
            &regions_with("[[vip]]", second),
            "xlb.toml:14: region[1].tunnel: 198.51.100.2 is already the tunnel of region[0] \
             (\"eu-north\", line 8)",
        );
        assert_only_error(
            &regions_with("tunnel = \"198.51.100.2\"", "tunnel = \"127.0.0.2\""),
            "xlb.toml:10: region[0].tunnel: 127.0.0.2 is a loopback address, which other \
             regions' hosts cannot reach",
        );
        assert_only_error(
            &regions_with("tunnel = \"198.51.100.2\"", "tunnel = \"192.0.2.10\""),
            "xlb.toml:10: region[0].tunnel: 192.0.2.10 is the address of vip[0] (\"web\")",
        );
        assert_only_error(
            &regions_with("tunnel = \"198.51.100.2\"", "tunnel = \"198.51.100.1\""),
            "xlb.toml:10: region[0].tunnel: 198.51.100.1 is this host's own tunnel address \
             (agent.tunnel_addresses[0])",
        );
        let probe = |keys: &str| {
            regions_with(
                "tunnel = \"198.51.100.2\"\n",
                &format!("tunnel = \"198.51.100.2\"\n{keys}"),
            )
        };
        assert_only_error(
            &probe("check_interval_ms = 50\n"),
            "xlb.toml:11: region[0].check_interval_ms: 50 is out of range; expected \
             100..=3600000",
        );
        assert_only_error(
            &probe("timeout_ms = 1000\n"),
            "xlb.toml:11: region[0].timeout_ms: timeout_ms 1000 is not below check_interval_ms \
             1000; expected timeout_ms < check_interval_ms",
        );
        assert_only_error(
            &probe("check_interval_ms = 400\n"),
            "xlb.toml:11: region[0].check_interval_ms: timeout_ms 500 is not below \
             check_interval_ms 400",
        );
        assert_only_error(
            &probe("rise = 0\n"),
            "xlb.toml:11: region[0].rise: 0 is out of range; expected 1..=100",
        );
        assert_only_error(
            &probe("fall = 101\n"),
            "xlb.toml:11: region[0].fall: 101 is out of range; expected 1..=100",
        );
        assert_only_error(
            &probe("capacity_port = 65536\n"),
            "xlb.toml:11: region[0].capacity_port: 65536 is out of range; expected 1..=65535",
        );
        assert_only_error(
            &regions_with("[[region]]\n", "[region]\n"),
            "xlb.toml:8: region: expected an array of tables ([[region]]), found a table",
        );
    }

    #[test]
    fn vip_regions_are_validated_against_the_region_tables() {
        assert_only_error(
            &regions_with("\"eu-west\", \"eu-north\"", "\"eu-west\", \"us-east\""),
            "xlb.toml:17: vip[0].regions[1]: region \"us-east\" has no [[region]] table and is \
             not this host's region (\"eu-west\", agent.region); expected a [[region]] with \
             name = \"us-east\"",
        );
        let all = errors(&regions_with(
            "\"eu-west\", \"eu-north\"",
            "\"eu-west\", \"eu-north\", \"a\", \"b\", \"c\"",
        ));
        assert!(
            all.iter().any(|e| e.starts_with(
                "xlb.toml:17: vip[0].regions[4]: 5 regions; expected at most 4 per VIP"
            )),
            "{all:#?}"
        );
        assert_only_error(
            &regions_with("\"eu-west\", \"eu-north\"", "\"eu-west\", \"eu-west\""),
            "xlb.toml:17: vip[0].regions[1]: region \"eu-west\" is listed twice",
        );
        assert_only_error(
            &regions_with("\"eu-west\", \"eu-north\"", "\"eu-west\""),
            "xlb.toml:19: vip[0].failover: failover needs at least two regions, and \
             vip[0].regions lists 1",
        );
        assert_only_error(
            &regions_with("regions = [\"eu-west\", \"eu-north\"]\n", ""),
            "xlb.toml:18: vip[0].failover: failover needs at least two regions, and \
             vip[0].regions lists 0",
        );
        // Backends' regions are still held to the list.
        assert_only_error(
            &regions_with(
                "address = \"10.0.0.1\"\nregion = \"eu-west\"",
                "address = \"10.0.0.1\"\nregion = \"us-east\"",
            ),
            "xlb.toml:24: vip[0].backend[0].region: region \"us-east\" is not in vip[0].regions",
        );
    }

    #[test]
    fn failover_tables_are_validated() {
        let failover = |keys: &str| regions_with("mode = \"proportional\"\n", keys);
        assert_only_error(
            &failover("mode = \"active\"\n"),
            "xlb.toml:20: vip[0].failover.mode: \"active\" is not a valid failover mode; \
             expected one of \"whole\", \"proportional\"",
        );
        for value in ["0", "0.0", "1.5", "-0.1", "nan"] {
            assert_only_error(
                &failover(&format!("min_healthy = {value}\n")),
                &format!(
                    "xlb.toml:20: vip[0].failover.min_healthy: {value} is out of range; expected \
                     a number above 0.0 and at most 1.0"
                ),
            );
        }
        assert_only_error(
            &failover("min_healthy = \"70%\"\n"),
            "xlb.toml:20: vip[0].failover.min_healthy: expected a number above 0.0 and at most \
             1.0 (a share of a region's backend weight), found the string \"70%\"",
        );
        assert_only_error(
            &failover("hold_down_ms = 86400001\n"),
            "xlb.toml:20: vip[0].failover.hold_down_ms: 86400001 is out of range; expected \
             0..=86400000",
        );
        assert_only_error(
            &failover("hold = 1\n"),
            "xlb.toml:20: vip[0].failover.hold: unknown key; allowed keys here: mode, \
             min_healthy, hold_down_ms",
        );
        assert_only_error(
            &regions_with(
                "[vip.failover]\nmode = \"proportional\"\n",
                "failover = 3\n",
            ),
            "xlb.toml:19: vip[0].failover: expected a table of failover settings, found the \
             integer 3",
        );
        ok(&regions_with(
            "[vip.failover]\nmode = \"proportional\"\n",
            "failover = { min_healthy = 0.5, hold_down_ms = 86400000 }\n",
        ));
    }

    #[test]
    fn l7_vips_list_only_this_hosts_region() {
        let l7 = regions_with(
            "protocol = \"tcp\"\n",
            "protocol = \"tcp\"\nmode = \"l7\"\n",
        );
        assert_only_error(
            &l7,
            "xlb.toml:18: vip[0].regions[1]: an l7 VIP is served by this host's HTTP gateway \
             and cannot fail over to region \"eu-north\"",
        );
        ok(&l7
            .replace("\"eu-west\", \"eu-north\"", "\"eu-west\"")
            .replace("[vip.failover]\nmode = \"proportional\"\n", ""));
    }

    #[test]
    fn remote_regions_need_an_encap_source_of_the_tunnels_family() {
        // dsr-l2 to a same-family backend needs no source; its remote region still does.
        let l2 = regions_with("encap_source_v4 = \"10.255.0.0/16\"\n", "")
            .replace(
                "protocol = \"tcp\"\n",
                "protocol = \"tcp\"\nmode = \"dsr-l2\"\n",
            )
            .replace("address = \"10.0.0.1\"", "address = \"192.0.2.11\"");
        assert_only_error(
            &l2,
            "xlb.toml:1: agent.encap_source_v4: required key is missing: vip[0] (\"web\") lists \
             region \"eu-north\", whose xlb host 198.51.100.2 is reached by IPIP, which needs an \
             outer IPv4 source; expected an IPv4 address or prefix such as \"10.255.0.0/16\"",
        );
        let v6 = regions_with("encap_source_v6 = \"fd00:ff::/96\"\n", "")
            .replace("tunnel = \"198.51.100.2\"", "tunnel = \"2001:db8:ff::2\"");
        assert_only_error(
            &v6,
            "xlb.toml:1: agent.encap_source_v6: required key is missing: vip[0] (\"web\") lists \
             region \"eu-north\", whose xlb host 2001:db8:ff::2 is reached by IPv6-in-IP",
        );
        // The backends' rule names the key first; one error per key.
        let all = errors(&regions_with("encap_source_v4 = \"10.255.0.0/16\"\n", ""));
        assert_eq!(all.len(), 1, "{all:#?}");
        assert!(all[0].contains("forwards to IPv4 backends"), "{all:#?}");
    }

    #[test]
    fn run_time_changes_are_held_to_the_region_rules() {
        let mut cfg = ok(REGIONS);
        let mut backend = cfg.vips[0].backends[0].clone();
        backend.address = "10.0.0.2".parse().unwrap();
        backend.region = "us-east".into();
        cfg.vips[0].backends.push(backend);
        let found = rules::check(&cfg);
        assert!(
            found.iter().any(|e| e.contains(
                "region \"us-east\" is not in the regions of VIP \"web\"; expected one of \
                 \"eu-west\", \"eu-north\""
            )),
            "{found:#?}"
        );
        let mut cfg = ok(REGIONS);
        cfg.vips[0].regions.push("us-east".into());
        cfg.regions[0].tunnel = "192.0.2.10".parse().unwrap();
        cfg.agent.encap_source_v4 = None;
        let found = rules::check(&cfg).join("\n");
        for needle in [
            "vip \"web\": regions: region \"us-east\" has no [[region]] table",
            "region \"eu-north\": 192.0.2.10 is the address of VIP \"web\"",
            "agent.encap_source_v4: required key is missing",
        ] {
            assert!(found.contains(needle), "{needle}: {found}");
        }
    }

    #[test]
    fn xlb_check_reports_region_errors_with_file_and_line() {
        // `xlb check` is `load` plus printing; `load` is `parse` of the file's text.
        let dir = std::env::temp_dir().join(format!("xlb-regions-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("xlb.toml");
        std::fs::write(
            &path,
            regions_with("name = \"eu-north\"", "name = \"eu-west\""),
        )
        .unwrap();
        let errors = load(&path).expect_err("invalid");
        std::fs::remove_dir_all(&dir).ok();
        let all: Vec<String> = errors.errors().iter().map(ToString::to_string).collect();
        assert_eq!(all.len(), 2, "{all:#?}");
        let file = path.display().to_string();
        assert!(
            all[0].starts_with(&format!(
                "{file}:9: region[0].name: \"eu-west\" is this host's own region"
            )),
            "{all:#?}"
        );
        assert!(
            all[1].starts_with(&format!(
                "{file}:17: vip[0].regions[1]: region \"eu-north\" has no [[region]] table"
            )),
            "{all:#?}"
        );
    }
}
