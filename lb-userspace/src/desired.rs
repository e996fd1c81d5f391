//! From a validated configuration to the desired state the reconciler plans from. Pure: the
//! host facts it needs (MACs) are passed in.

use std::net::IpAddr;

use lb_common::types::{FAMILY_V4, FAMILY_V6, LbConfig, VIP_F_DSR_L2, VIP_F_L7, VipKey};

use crate::{
    config::{Config, Vip, VipMode},
    reconcile::{Desired, DesiredBackend, DesiredRegions, DesiredVip},
};

/// The balancer-wide settings of a configuration, given the LB interface's MAC and the next
/// hop's.
pub fn lb_config(cfg: &Config, lb_mac: [u8; 6], nexthop_mac: [u8; 6]) -> LbConfig {
    let mut out = LbConfig {
        lb_mac,
        nexthop_mac,
        egress_mtu: cfg.agent.egress_mtu,
        ..LbConfig::default()
    };
    if let Some(p) = cfg.agent.encap_source_v4 {
        out.encap_src_v4 = p.addr.octets();
        out.encap_src_v4_prefix = p.len;
    }
    if let Some(p) = cfg.agent.encap_source_v6 {
        out.encap_src_v6 = p.addr.octets();
        out.encap_src_v6_prefix = p.len;
    }
    out
}

/// The data-path key of a VIP.
pub fn vip_key(address: IpAddr, port: u16, proto: u8) -> VipKey {
    let mut key = VipKey {
        port_be: port.to_be(),
        proto,
        ..VipKey::default()
    };
    match address {
        IpAddr::V4(a) => {
            key.addr[..4].copy_from_slice(&a.octets());
            key.family = FAMILY_V4;
        }
        IpAddr::V6(a) => {
            key.addr = a.octets();
            key.family = FAMILY_V6;
        }
    }
    key
}

/// Whether this host serves a backend of `v` itself: a VIP that lists regions is served here
/// only by the backends of this host's region (`agent.region`); the others belong to their
/// own region's xlb host. A VIP without regions is served by all of its backends.
pub fn serves_here(cfg: &Config, v: &Vip, backend_region: &str) -> bool {
    v.regions.is_empty() || backend_region == cfg.agent.region
}

/// The desired state of a configuration. `healthy(vip_index, backend_index)` says whether a
/// backend currently passes its checks; `mac_of` resolves dsr-l2 backends without a configured
/// MAC (a dsr-l2 backend whose MAC is unknown counts as down); `regions(vip)` gives a VIP's
/// region levels and split. Only the backends this host serves ([`serves_here`]) are included.
pub fn desired(
    cfg: &Config,
    lb: LbConfig,
    healthy: impl Fn(usize, usize) -> bool,
    mac_of: impl Fn(IpAddr) -> Option<[u8; 6]>,
    regions: impl Fn(&Vip) -> DesiredRegions,
) -> Desired {
    let vips = cfg
        .vips
        .iter()
        .enumerate()
        .map(|(vi, v)| DesiredVip {
            key: vip_key(v.address, v.port, v.protocol.number()),
            flags: match v.mode {
                VipMode::DsrIpip => 0,
                VipMode::DsrL2 => VIP_F_DSR_L2,
                VipMode::L7 => VIP_F_L7,
            },
            table_size: v.table_size,
            panic_threshold: v.panic_threshold,
            backends: v
                .backends
                .iter()
                .enumerate()
                // An l7 VIP's packets are passed to the host stack before any backend is
                // chosen; its backends are the gateway's upstream servers, not map entries.
                .filter(|(_, b)| v.mode != VipMode::L7 && serves_here(cfg, v, &b.region))
                .map(|(bi, b)| {
                    let mac = match v.mode {
                        VipMode::DsrL2 => b.mac.map(|m| m.0).or_else(|| mac_of(b.address)),
                        _ => None,
                    };
                    DesiredBackend {
                        address: b.address,
                        weight: b.weight as u32,
                        // A dsr-l2 backend without a MAC cannot be reached: it counts as down
                        // rather than being sent frames for 00:00:00:00:00:00.
                        healthy: healthy(vi, bi) && (v.mode != VipMode::DsrL2 || mac.is_some()),
                        mac,
                    }
                })
                .collect(),
            regions: regions(v),
        })
        .collect();
    Desired { config: lb, vips }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_configuration_maps_to_vips_and_backends() {
        let cfg = crate::config::parse("xlb.toml", include_str!("../../examples/xlb.toml"))
            .expect("example parses");
        let lb = lb_config(&cfg, [2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
        assert_eq!(lb.egress_mtu, cfg.agent.egress_mtu);
        let d = desired(
            &cfg,
            lb,
            |_, _| true,
            |_| None,
            |_| DesiredRegions::default(),
        );
        assert_eq!(d.vips.len(), cfg.vips.len());
        for (dv, cv) in d.vips.iter().zip(&cfg.vips) {
            assert_eq!(dv.key, vip_key(cv.address, cv.port, cv.protocol.number()));
            // Only this host's region's backends (the example's VIP with regions also lists
            // another region's, served by that region's xlb host), and none of an l7 VIP (its
            // gateway's upstream servers).
            let here: Vec<IpAddr> = cv
                .backends
                .iter()
                .filter(|b| cv.mode != VipMode::L7 && serves_here(&cfg, cv, &b.region))
                .map(|b| b.address)
                .collect();
            let got: Vec<IpAddr> = dv.backends.iter().map(|b| b.address).collect();
            assert_eq!(got, here);
            assert_eq!(dv.table_size, cv.table_size);
        }
        assert!(
            cfg.vips.iter().any(|v| v.mode == VipMode::L7),
            "the example has an l7 VIP"
        );
        // The plan for it is valid.
        crate::reconcile::Reconciler::new().plan(&d).expect("plan");
    }

    #[test]
    fn a_dsr_l2_backend_without_a_mac_counts_as_down() {
        let text = r#"
[agent]
interface = "eth0"

[[vip]]
name = "l2"
address = "192.0.2.11"
port = 80
protocol = "tcp"
mode = "dsr-l2"

[[vip.backend]]
address = "192.0.2.21"

[[vip.backend]]
address = "192.0.2.22"
mac = "02:00:00:00:00:22"
"#;
        let cfg = crate::config::parse("xlb.toml", text).expect("parses");
        let lb = lb_config(&cfg, [2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
        let d = desired(
            &cfg,
            lb,
            |_, _| true,
            |_| None,
            |_| DesiredRegions::default(),
        );
        let b = &d.vips[0].backends;
        assert!(
            !b[0].healthy && b[0].mac.is_none(),
            "unresolvable MAC: down"
        );
        assert!(b[1].healthy && b[1].mac == Some([2, 0, 0, 0, 0, 0x22]));
        let resolved = desired(
            &cfg,
            lb,
            |_, _| true,
            |_| Some([2, 0, 0, 0, 0, 0x21]),
            |_| DesiredRegions::default(),
        );
        assert!(resolved.vips[0].backends[0].healthy);
    }
}
