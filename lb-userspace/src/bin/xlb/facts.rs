//! The host facts the maps depend on (the balancer interface's MAC, the next hop's MAC, the
//! MACs of `dsr-l2` backends), resolved from the kernel's route and neighbour tables over
//! netlink and re-resolved when those tables change.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use lb_userspace::{
    config::{Config, NextHopMac, VipMode},
    host,
    netlink::{self, Tables},
    pins,
};

/// How often one address may be prompted for resolution: a dead neighbour would otherwise be
/// prompted at the pace of the kernel's own failure notifications.
const PROMPT_EVERY: Duration = Duration::from_secs(10);

/// What the kernel's tables said at the last resolution.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostFacts {
    /// The balancer interface's MAC.
    pub lb_mac: [u8; 6],
    /// The default routes' gateways through the interface, best first.
    pub gateways: Vec<IpAddr>,
    /// The MAC of the best gateway that has one.
    pub gateway_mac: Option<[u8; 6]>,
    /// Usable neighbour MACs on the interface.
    pub neighbours: BTreeMap<IpAddr, [u8; 6]>,
}

impl HostFacts {
    /// The next-hop MAC for `cfg`: the configured one, or the resolved gateway's.
    pub fn nexthop(&self, cfg: &Config) -> anyhow::Result<[u8; 6]> {
        // A host whose VIPs are all l7 forwards nothing in XDP (every VIP packet goes to the
        // stack): it needs no router MAC, and a gateway-only host may have no default route.
        let forwards = cfg
            .vips
            .iter()
            .any(|v| v.mode != lb_userspace::config::VipMode::L7);
        if !forwards && self.gateway_mac.is_none() {
            return Ok(match cfg.agent.next_hop_mac {
                NextHopMac::Fixed(mac) => mac.0,
                NextHopMac::Auto => [0; 6],
            });
        }
        match cfg.agent.next_hop_mac {
            NextHopMac::Fixed(mac) => Ok(mac.0),
            NextHopMac::Auto => self.gateway_mac.ok_or_else(|| match self.gateways.first() {
                None => anyhow::anyhow!(
                    "agent.next_hop_mac = \"auto\": no default route via {}; add one or set \
                     the router's MAC",
                    cfg.agent.interface
                ),
                Some(gw) => anyhow::anyhow!(
                    "agent.next_hop_mac = \"auto\": the gateway {gw} has no neighbour entry on \
                     {} (asked the kernel to resolve it); set the router's MAC to start anyway",
                    cfg.agent.interface
                ),
            }),
        }
    }

    /// The part of the facts `cfg`'s maps depend on: a change elsewhere (an unrelated
    /// neighbour) needs no reconcile.
    pub fn relevant(&self, cfg: &Config) -> Relevant {
        Relevant {
            nexthop: match cfg.agent.next_hop_mac {
                NextHopMac::Fixed(m) => Some(m.0),
                NextHopMac::Auto => self.gateway_mac,
            },
            lb_mac: self.lb_mac,
            dsr_l2: dsr_l2_macs(cfg, self),
        }
    }
}

/// The facts one configuration's maps depend on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relevant {
    /// The next hop's MAC.
    pub nexthop: Option<[u8; 6]>,
    /// The interface's MAC.
    pub lb_mac: [u8; 6],
    /// dsr-l2 backends without a configured MAC, with their resolved one.
    pub dsr_l2: Vec<(IpAddr, Option<[u8; 6]>)>,
}

/// The resolved MACs of `cfg`'s dsr-l2 backends that have none configured.
fn dsr_l2_macs(cfg: &Config, facts: &HostFacts) -> Vec<(IpAddr, Option<[u8; 6]>)> {
    let mut out: Vec<(IpAddr, Option<[u8; 6]>)> = cfg
        .vips
        .iter()
        .filter(|v| v.mode == VipMode::DsrL2)
        .flat_map(|v| v.backends.iter())
        .filter(|b| b.mac.is_none())
        .map(|b| (b.address, facts.neighbours.get(&b.address).copied()))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Resolves the facts of one interface and prompts the kernel for missing neighbours.
#[derive(Debug)]
pub struct Resolver {
    tables: Tables,
    interface: String,
    prompted: HashMap<IpAddr, Instant>,
}

impl Resolver {
    /// A resolver for `interface` (opens a netlink connection).
    pub fn new(interface: &str) -> anyhow::Result<Self> {
        Ok(Self {
            tables: Tables::open().context("opening netlink to read the route tables")?,
            interface: interface.to_string(),
            prompted: HashMap::new(),
        })
    }

    /// Asks the kernel to resolve `address` unless it was asked recently.
    pub fn prompt(&mut self, address: IpAddr) {
        let now = Instant::now();
        if self
            .prompted
            .get(&address)
            .is_some_and(|t| now.duration_since(*t) < PROMPT_EVERY)
        {
            return;
        }
        self.prompted.insert(address, now);
        netlink::prompt_resolution(address, &self.interface);
    }

    /// Reads the tables now. A gateway without a neighbour entry is prompted.
    pub async fn resolve(&mut self) -> anyhow::Result<HostFacts> {
        let lb_mac = host::interface_mac(&self.interface)?;
        let ifindex = pins::ifindex(&self.interface)
            .with_context(|| format!("interface {} is gone", self.interface))?;
        let routes = self.tables.routes().await?;
        let gateways = netlink::default_gateways(&routes, ifindex);
        let neighbours = netlink::neighbour_macs(&self.tables.neighbours().await?, ifindex);
        let gateway_mac = gateways.iter().find_map(|g| neighbours.get(g).copied());
        if gateway_mac.is_none()
            && let Some(gw) = gateways.first()
        {
            self.prompt(*gw);
        }
        Ok(HostFacts {
            lb_mac,
            gateways,
            gateway_mac,
            neighbours,
        })
    }

    /// Resolves at start: when the configuration needs the gateway's MAC and the kernel does
    /// not have it yet, prompts and waits for it (bounded by `patience`).
    pub async fn resolve_for_start(
        &mut self,
        cfg: &Config,
        patience: Duration,
    ) -> anyhow::Result<HostFacts> {
        let deadline = Instant::now() + patience;
        loop {
            let facts = self.resolve().await?;
            if facts.nexthop(cfg).is_ok() || Instant::now() >= deadline {
                return Ok(facts);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
