//! The agent's side of multi-region failover: the capacity endpoint other regions probe, the
//! probers of the remote regions this host's VIPs list, and per VIP the failover state machine
//! ([`VipFailover`]) fed with the local region's health and the remote regions' reports. The
//! reconciler gets each VIP's region levels and split from here ([`Regions::desired`]).

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use lb_common::types::VipKey;
use lb_userspace::{
    admin::{RegionLevelStatus, RegionStatus},
    capacity::{self, RegionProbeConfig, RegionReport, ServerStats},
    config::{Config, Vip},
    desired,
    metrics::{RemoteRegionMetrics, VipRegionMetrics},
    reconcile::{DesiredLevel, DesiredRegions},
    region::{self, VipFailover},
};
use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
};

/// What the probes of one remote region last said.
#[derive(Debug, Clone, Default)]
struct Remote {
    /// Probes pass (rise/fall applied).
    up: bool,
    /// Healthy share per VIP, as its agent reports it.
    shares: HashMap<VipKey, f64>,
    /// "ok" or why the last probe failed.
    detail: String,
    /// Round-trip time of the latest successful probe.
    rtt: Option<Duration>,
    /// The region has been up since this prober started.
    was_up: bool,
    /// Failed probes in a row.
    fails: u32,
    /// The prober's `fall`.
    fall: u32,
}

impl Remote {
    /// Whether the region's backend entry is written up, so that the flows already pinned to
    /// it (in the connection table a previous agent left pinned) keep going there. A region
    /// not judged yet counts as up here, as a local backend does when the agent starts: a
    /// restarted agent would otherwise write the entry down before its first probe and move
    /// every established failed-over flow to this region's backends (reset connections). New
    /// flows are another matter: the split gives the region none until its probes pass.
    fn entry_up(&self) -> bool {
        self.up || (!self.was_up && self.fails < self.fall)
    }
}

/// A running prober of one remote region.
struct Prober {
    config: RegionProbeConfig,
    vips: watch::Sender<Vec<VipKey>>,
    task: JoinHandle<()>,
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One VIP's failover state.
struct VipRegions {
    failover: VipFailover,
    transitions: u64,
}

/// A change of a VIP's split, to be logged once the maps carry it.
pub struct RegionTransition {
    /// The VIP.
    pub vip: String,
    /// The region taking new flows first now.
    pub active: String,
    /// Region names and their shares of new flows, e.g. "a 71.4%, b 28.6%".
    pub loads: String,
    /// Why.
    pub reason: String,
    /// Every region is down.
    pub last_resort: bool,
    /// The VIP's first split (agent start, or the VIP is new), not a change.
    pub initial: bool,
}

/// Multi-region state of the agent.
#[derive(Default)]
pub struct Regions {
    vips: HashMap<String, VipRegions>,
    remote: HashMap<String, Remote>,
    probers: HashMap<String, Prober>,
    /// This region's healthy share per VIP, as the capacity endpoint answers it.
    local_shares: Arc<RwLock<HashMap<VipKey, f64>>>,
    /// The capacity endpoint's port and task.
    server: Option<(u16, JoinHandle<()>)>,
    /// The endpoint's counters.
    server_stats: Arc<ServerStats>,
    /// The region tunnel addresses last written to the data path.
    written_addrs: Option<Vec<IpAddr>>,
    /// Remote regions' xlb hosts (tunnel addresses) whose entries a previous agent left up in
    /// the adopted maps: they start up, assumed healthy until their first probe answers, as
    /// local backends do; else a restart of a failed-over agent would send new flows to the
    /// last resort until `rise` probes passed.
    adopted_up: HashSet<IpAddr>,
    /// Per VIP, the loads of the region split the adopted maps hold: a restarted agent resumes
    /// from it, so a region that took no new flows before the restart gets them back only after
    /// a full hold-down, never early because the agent restarted.
    adopted_loads: HashMap<VipKey, Vec<f64>>,
}

impl Drop for Regions {
    fn drop(&mut self) {
        if let Some((_, task)) = self.server.take() {
            task.abort();
        }
    }
}

/// The region levels of a VIP and the index of this host's own region among them, when it
/// lists a remote region (a VIP of this region only needs no split).
pub fn levels(cfg: &Config, v: &Vip) -> Option<(Vec<String>, Option<usize>)> {
    let own = &cfg.agent.region;
    if !v.regions.iter().any(|r| r != own) {
        return None;
    }
    let local = v.regions.iter().position(|r| r == own);
    Some((v.regions.clone(), local))
}

fn loads_text(levels: &[String], loads: &[f64]) -> String {
    levels
        .iter()
        .zip(loads)
        .map(|(name, load)| format!("{name} {:.1}%", load * 100.0))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Regions {
    /// Remembers which remote regions' entries the adopted maps hold up (see `adopted_up`) and
    /// each VIP's split (see `adopted_loads`).
    pub fn adopt(&mut self, contents: &lb_userspace::maps::MapContents) {
        use lb_common::types::{BACKEND_F_REGION, BACKEND_F_UP, REGION_SCALE};
        self.adopted_loads = contents
            .vips
            .iter()
            .filter(|(_, m)| m.region_count > 0)
            .map(|(k, m)| {
                let n = (m.region_count as usize).min(m.region_upto.len());
                let mut below = 0;
                let loads = m.region_upto[..n]
                    .iter()
                    .map(|&upto| {
                        let load = f64::from(upto.saturating_sub(below)) / f64::from(REGION_SCALE);
                        below = upto.max(below);
                        load
                    })
                    .collect();
                (*k, loads)
            })
            .collect();
        self.adopted_up = contents
            .backends
            .iter()
            .filter(|(_, b)| {
                b.flags & (BACKEND_F_REGION | BACKEND_F_UP) == BACKEND_F_REGION | BACKEND_F_UP
            })
            .filter_map(|(_, b)| lb_userspace::loader::ip_of(&b.addr, b.family))
            .collect();
    }

    /// Starts (or keeps, or stops) the capacity endpoint and the probers for `cfg`; reports go
    /// to `tx`. Problems are logged: a region that cannot be probed counts as down, which is
    /// the safe side.
    pub fn configure(&mut self, cfg: &Config, tx: &mpsc::Sender<RegionReport>) {
        // The endpoint answers for every VIP; it runs when other regions may send flows here.
        let port = cfg.agent.capacity_port;
        let want_server = !cfg.agent.tunnel_addresses.is_empty();
        match (&self.server, want_server) {
            (Some((p, _)), true) if *p == port => {}
            (_, true) => {
                if let Some((_, task)) = self.server.take() {
                    task.abort();
                }
                match capacity::bind_server(port) {
                    Ok(socket) => {
                        let shares = self.local_shares.clone();
                        let answer =
                            move |k: &VipKey| shares.read().ok().and_then(|m| m.get(k).copied());
                        let task = tokio::spawn(capacity::serve(
                            socket,
                            answer,
                            self.server_stats.clone(),
                        ));
                        tracing::info!(port, "capacity endpoint listening (UDP)");
                        self.server = Some((port, task));
                    }
                    Err(e) => tracing::error!(
                        port,
                        "cannot serve the capacity endpoint (agent.capacity_port): {e}; other \
                         regions will count this one as down"
                    ),
                }
            }
            (Some(_), false) => {
                if let Some((_, task)) = self.server.take() {
                    task.abort();
                }
            }
            (None, false) => {}
        }

        // One prober per remote region some VIP lists, asking for those VIPs.
        let mut wanted: HashMap<String, Vec<VipKey>> = HashMap::new();
        for v in &cfg.vips {
            if levels(cfg, v).is_none() {
                continue;
            }
            let key = desired::vip_key(v.address, v.port, v.protocol.number());
            for r in v.regions.iter().filter(|r| **r != cfg.agent.region) {
                wanted.entry(r.clone()).or_default().push(key);
            }
        }
        self.probers.retain(|name, _| wanted.contains_key(name));
        self.remote.retain(|name, _| wanted.contains_key(name));
        for (name, vips) in wanted {
            let Some(region) = cfg.region(&name) else {
                continue;
            };
            let config = RegionProbeConfig {
                region: name.clone(),
                tunnel: region.tunnel,
                port: region.capacity_port,
                interval: region.check_interval,
                timeout: region.timeout,
                rise: region.rise,
                fall: region.fall,
                // A region must prove it can take flows before any are sent to it.
                start_up: false,
            };
            match self.probers.get(&name) {
                Some(p)
                    if RegionProbeConfig {
                        start_up: config.start_up,
                        ..p.config.clone()
                    } == config =>
                {
                    p.vips.send_if_modified(|have| {
                        let changed = *have != vips;
                        *have = vips.clone();
                        changed
                    });
                }
                _ => {
                    // A changed probe configuration (a reload) keeps what the region's probes
                    // said: starting it down again would take its flows away until `rise`
                    // probes passed.
                    let kept = self.remote.get(&name).cloned();
                    let adopted = kept.is_none() && self.adopted_up.remove(&region.tunnel);
                    let config = RegionProbeConfig {
                        start_up: adopted || kept.as_ref().is_some_and(|r| r.up),
                        ..config
                    };
                    let (vips_tx, vips_rx) = watch::channel(vips.clone());
                    let task = capacity::spawn_region_prober(config.clone(), vips_rx, tx.clone());
                    tracing::info!(
                        region = %name,
                        tunnel = %config.tunnel,
                        port = config.port,
                        "probing the region's capacity through the tunnel"
                    );
                    let remote = match kept {
                        Some(r) => Remote {
                            fall: u32::from(config.fall.max(1)),
                            ..r
                        },
                        None if adopted => Remote {
                            up: true,
                            was_up: true,
                            // Full shares until the first probe (sent at once) answers.
                            shares: vips.iter().map(|k| (*k, 1.0)).collect(),
                            detail: "up in the adopted maps; not probed yet".to_owned(),
                            fall: u32::from(config.fall.max(1)),
                            ..Remote::default()
                        },
                        None => Remote {
                            detail: "not probed yet".to_owned(),
                            fall: u32::from(config.fall.max(1)),
                            ..Remote::default()
                        },
                    };
                    self.remote.insert(name.clone(), remote);
                    self.probers.insert(
                        name,
                        Prober {
                            config,
                            vips: vips_tx,
                            task,
                        },
                    );
                }
            }
        }
    }

    /// Takes a probe report; true when what the failover decides from changed (the region's
    /// state or a share).
    pub fn on_report(&mut self, report: RegionReport) -> bool {
        let Some(remote) = self.remote.get_mut(&report.region) else {
            return false;
        };
        let shares: HashMap<VipKey, f64> = report.shares.iter().map(|s| (s.vip, s.share)).collect();
        let entry_up = remote.entry_up();
        remote.fails = if report.probe_ok { 0 } else { remote.fails + 1 };
        remote.was_up |= report.up;
        let changed = remote.up != report.up || remote.shares != shares;
        if report.transition.is_some() {
            if report.up {
                tracing::info!(region = %report.region, detail = %report.detail, "remote region up (capacity probes through the tunnel pass)");
            } else {
                tracing::warn!(region = %report.region, detail = %report.detail, "remote region down (capacity probes through the tunnel fail)");
            }
        }
        remote.up = report.up;
        remote.shares = shares;
        remote.detail = report.detail;
        if report.rtt.is_some() {
            remote.rtt = report.rtt;
        }
        changed || entry_up != remote.entry_up()
    }

    /// Re-evaluates every VIP's failover from the current health (`healthy(vip, backend)` by
    /// index into `cfg`) and the remote regions' reports, at `now`. Returns the transitions.
    pub fn evaluate(
        &mut self,
        cfg: &Config,
        healthy: impl Fn(usize, usize) -> bool,
        now: Instant,
    ) -> Vec<RegionTransition> {
        let mut shares_here = HashMap::new();
        let mut transitions = Vec::new();
        let mut seen = HashSet::new();
        for (vi, v) in cfg.vips.iter().enumerate() {
            let key = desired::vip_key(v.address, v.port, v.protocol.number());
            // Drained backends carry weight 0 in the effective configuration.
            let local = region::local_share(
                v.backends
                    .iter()
                    .enumerate()
                    .filter(|(_, b)| desired::serves_here(cfg, v, &b.region))
                    .map(|(bi, b)| (u32::from(b.weight), b.weight == 0, healthy(vi, bi))),
            );
            shares_here.insert(key, local);
            let Some((names, local_level)) = levels(cfg, v) else {
                continue;
            };
            seen.insert(v.name.clone());
            let shares: Vec<f64> = names
                .iter()
                .enumerate()
                .map(|(i, name)| {
                    if Some(i) == local_level {
                        return local;
                    }
                    match self.remote.get(name) {
                        Some(r) if r.up => r.shares.get(&key).copied().unwrap_or(0.0),
                        _ => 0.0,
                    }
                })
                .collect();
            let transition = match self.vips.get_mut(&v.name) {
                Some(state) => {
                    // The same levels keep their history (a reload cannot cut a hold-down short).
                    let t = state.failover.reconfigure(
                        names.clone(),
                        local_level,
                        v.failover,
                        now,
                        &shares,
                    );
                    if t.is_some() {
                        state.transitions += 1;
                    }
                    t
                }
                None => {
                    // After a restart: start from the adopted split (a level that took no new
                    // flows counts as unproven), then take the shares as they are now, so a
                    // failback waits the hold-down as if the agent had never stopped.
                    let start: Vec<f64> = match self.adopted_loads.remove(&key) {
                        Some(loads) if loads.len() == shares.len() => shares
                            .iter()
                            .zip(&loads)
                            .map(|(&s, &l)| if l > 0.0 { s } else { 0.0 })
                            .collect(),
                        _ => shares.clone(),
                    };
                    let mut failover =
                        VipFailover::new(names.clone(), local_level, v.failover, now, &start);
                    failover.update(now, &shares);
                    transitions.push(RegionTransition {
                        vip: v.name.clone(),
                        active: failover.active().to_owned(),
                        loads: loads_text(&names, &failover.loads()),
                        reason: failover.reason().to_owned(),
                        last_resort: failover.last_resort(),
                        initial: true,
                    });
                    self.vips.insert(
                        v.name.clone(),
                        VipRegions {
                            failover,
                            transitions: 0,
                        },
                    );
                    None
                }
            };
            if let Some(t) = transition {
                transitions.push(RegionTransition {
                    vip: v.name.clone(),
                    active: self.vips[&v.name].failover.active().to_owned(),
                    loads: loads_text(&names, &t.loads),
                    reason: t.reason,
                    last_resort: t.last_resort,
                    initial: false,
                });
            }
        }
        self.vips.retain(|name, _| seen.contains(name));
        if let Ok(mut m) = self.local_shares.write() {
            *m = shares_here;
        }
        transitions
    }

    /// The region levels and split of VIP `v` for the reconciler (none for a VIP of this region
    /// only, or before [`Self::evaluate`] saw it).
    pub fn desired(&self, cfg: &Config, v: &Vip) -> DesiredRegions {
        let (Some(state), Some((names, local))) = (self.vips.get(&v.name), levels(cfg, v)) else {
            return DesiredRegions::default();
        };
        let f = &state.failover;
        let upto = f.upto();
        DesiredRegions {
            levels: names
                .iter()
                .enumerate()
                .map(|(i, name)| match (Some(i) == local, cfg.region(name)) {
                    (false, Some(r)) => DesiredLevel::Remote {
                        address: r.tunnel,
                        up: self.remote.get(name).is_some_and(Remote::entry_up),
                    },
                    _ => DesiredLevel::Local,
                })
                .collect(),
            upto: upto[..f.count() as usize].to_vec(),
            last_resort: f.last_resort(),
        }
    }

    /// The region tunnel addresses to write to the data path, when they differ from the ones
    /// written last (then remembered as written).
    pub fn addrs_to_write(&mut self, cfg: &Config) -> Option<Vec<IpAddr>> {
        let want = cfg.agent.tunnel_addresses.clone();
        if self.written_addrs.as_ref() == Some(&want) {
            return None;
        }
        self.written_addrs = Some(want.clone());
        Some(want)
    }

    /// Forgets what was written, so the next [`Self::addrs_to_write`] writes again (after a
    /// failed write).
    pub fn forget_addrs(&mut self) {
        self.written_addrs = None;
    }

    /// The earliest time a held-back failback could apply.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.vips
            .values()
            .filter_map(|s| s.failover.next_deadline())
            .min()
    }

    /// VIP `v`'s regions for `xlb status`; `new_flows(address)` gives the flows sent to a
    /// remote region's xlb host.
    pub fn status(
        &self,
        cfg: &Config,
        v: &Vip,
        new_flows: impl Fn(IpAddr) -> u64,
    ) -> Option<RegionStatus> {
        let state = self.vips.get(&v.name)?;
        let (names, local) = levels(cfg, v)?;
        let f = &state.failover;
        let loads = f.loads();
        let shares = f.shares();
        Some(RegionStatus {
            active: f.active().to_owned(),
            since_secs: f.since().elapsed().as_secs_f64(),
            reason: f.reason().to_owned(),
            last_resort: f.last_resort(),
            mode: v.failover.mode.to_string(),
            transitions: state.transitions,
            levels: names
                .iter()
                .enumerate()
                .map(|(i, name)| {
                    let tunnel = if Some(i) == local {
                        None
                    } else {
                        cfg.region(name).map(|r| r.tunnel)
                    };
                    let remote = self.remote.get(name);
                    RegionLevelStatus {
                        name: name.clone(),
                        tunnel,
                        healthy_share: shares.get(i).copied().unwrap_or(0.0),
                        load: loads.get(i).copied().unwrap_or(0.0),
                        reachable: tunnel.is_none() || remote.is_some_and(|r| r.up),
                        detail: match (tunnel, remote) {
                            (None, _) => "-".to_owned(),
                            (Some(_), Some(r)) if r.up => format!("up ({})", r.detail),
                            (Some(_), Some(r)) => format!("down ({})", r.detail),
                            (Some(_), None) => "not probed".to_owned(),
                        },
                        new_flows: tunnel.map_or(0, &new_flows),
                    }
                })
                .collect(),
        })
    }

    /// VIP `v`'s regions for a metrics scrape.
    pub fn metrics(&self, cfg: &Config, v: &Vip) -> Option<VipRegionMetrics> {
        let state = self.vips.get(&v.name)?;
        let f = &state.failover;
        let loads = f.loads();
        let shares = f.shares();
        Some(VipRegionMetrics {
            levels: f
                .levels()
                .iter()
                .enumerate()
                .map(|(i, name)| {
                    (
                        name.clone(),
                        shares.get(i).copied().unwrap_or(0.0),
                        loads.get(i).copied().unwrap_or(0.0),
                    )
                })
                .collect(),
            active: f.active().to_owned(),
            last_resort: f.last_resort(),
            transitions: state.transitions,
        })
        .filter(|_| levels(cfg, v).is_some())
    }

    /// The remote regions' probe state, for a metrics scrape.
    pub fn remote_metrics(&self) -> Vec<RemoteRegionMetrics> {
        let mut out: Vec<RemoteRegionMetrics> = self
            .remote
            .iter()
            .map(|(name, r)| RemoteRegionMetrics {
                name: name.clone(),
                up: r.up,
                rtt: r.rtt,
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }
}
