//! `xlb agent`: load and attach the balancer, reconcile the configuration into its maps, reload
//! on SIGHUP, serve the admin API, report counters, detach on exit.

mod control;
mod regions;

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, bail};
use clap::{Args, ValueEnum};
use std::collections::{HashMap, HashSet};

use crate::facts::{HostFacts, Resolver};
use lb_userspace::{
    admin,
    config::{self, Config, NextHopMac, XdpMode},
    desired,
    gateway::server::Gateways,
    health::{Checker, CheckerHandle, HealthEvent, HealthState, Target, TargetHistory, TargetId},
    host,
    loader::{AttachMode, Attached, Balancer, LoadOptions},
    logging, metrics, netlink,
    pins::PinDir,
    reconcile::{self, Reconciler},
    runtime,
};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};

/// Arguments of `xlb agent`.
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Configuration file (see examples/xlb.toml; validate it with `xlb check`).
    #[arg(
        long,
        short = 'c',
        value_name = "FILE",
        conflicts_with = "interface",
        required_unless_present = "interface"
    )]
    config: Option<PathBuf>,
    /// Without a configuration: attach to this interface with no VIPs, so every frame is
    /// passed (and counted); a smoke test of the attachment.
    #[arg(long, short = 'i')]
    interface: Option<String>,
    /// XDP attach mode, overriding the configuration's `agent.xdp_mode`: native (driver),
    /// generic (skb), or auto (native, else generic).
    #[arg(long, value_enum)]
    xdp_mode: Option<ModeArg>,
    /// Log the counters that moved every this many seconds (0: only at exit).
    #[arg(long, default_value_t = 0)]
    stats_interval_secs: u64,
    /// On SIGTERM/SIGINT, detach the balancer and remove its pinned maps and link (the
    /// connection table is lost). Without it the program stays attached with its pinned state,
    /// so the next agent adopts it without dropping a flow.
    #[arg(long)]
    detach_on_exit: bool,
}

/// The `--xdp-mode` values.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ModeArg {
    Auto,
    Native,
    Generic,
}

impl From<ModeArg> for AttachMode {
    fn from(m: ModeArg) -> Self {
        match m {
            ModeArg::Auto => AttachMode::Auto,
            ModeArg::Native => AttachMode::Native,
            ModeArg::Generic => AttachMode::Generic,
        }
    }
}

fn attach_mode(m: XdpMode) -> AttachMode {
    match m {
        XdpMode::Auto => AttachMode::Auto,
        XdpMode::Native => AttachMode::Native,
        XdpMode::Generic => AttachMode::Generic,
    }
}

/// Runs the agent until a termination signal arrives.
pub fn run(args: AgentArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(args))
}

/// Reads and validates the configuration, logging every error (file, line, key) on failure.
fn load_config(path: &Path) -> anyhow::Result<Config> {
    match config::load(path) {
        Ok(cfg) => Ok(cfg),
        Err(errors) => {
            for e in errors.errors() {
                tracing::error!("{e}");
            }
            let n = errors.len();
            bail!(
                "{}: invalid configuration ({n} error{}); nothing was changed",
                path.display(),
                if n == 1 { "" } else { "s" }
            )
        }
    }
}

/// The agent's live state: the balancer, what the reconciler applied to it, the configuration
/// it runs, and the health of the checked backends.
struct Running {
    balancer: Balancer,
    reconciler: Reconciler,
    config: Option<Config>,
    /// Backends whose checks failed `fall` times in a row (all others count as healthy).
    down: HashSet<TargetId>,
    checker: Option<CheckerHandle>,
    last_reconcile: Option<Duration>,
    reconciles: u64,
    reloads_refused: u64,
    /// Health to start the first checks from: backends a previous agent left marked down in
    /// the adopted maps start down.
    seed: HashMap<TargetId, HealthState>,
    /// The host facts the maps were last built from (MACs of the interface, the next hop and
    /// dsr-l2 backends).
    facts: HostFacts,
    /// Reads the route and neighbour tables (with a configuration only).
    resolver: Option<Resolver>,
    /// Names of the VIPs in panic (see [`reconcile::in_panic`]).
    panicking: HashSet<String>,
    /// The admin API's state: the file as loaded, the run-time overlay, facts for `status`.
    control: control::Control,
    /// Where the maps and the link are pinned, and the attach mode for a new link (with a
    /// configuration only).
    pins: Option<(PinDir, AttachMode)>,
    /// Why the balancer is not attached right now, as last logged (logged once per change).
    attachment_problem: Option<String>,
    /// Multi-region failover: capacity endpoint, remote regions' probers, per-VIP state.
    regions: regions::Regions,
    /// Where the remote regions' probers report.
    region_tx: mpsc::Sender<lb_userspace::capacity::RegionReport>,
    /// The l7 VIPs' HTTP gateways (listeners, routes, upstream pools).
    gateways: Gateways,
}

/// The backends of `cfg` that have a health check (the VIP's, with the backend's overrides).
fn targets(cfg: &Config) -> Vec<Target> {
    let mut out = Vec::new();
    for (vi, v) in cfg.vips.iter().enumerate() {
        for (bi, b) in v.backends.iter().enumerate() {
            // Another region's backends are that region's xlb host's to check.
            if !desired::serves_here(cfg, v, &b.region) {
                continue;
            }
            if let Some(check) = &b.health_check {
                out.push(Target {
                    id: TargetId {
                        vip: vi,
                        backend: bi,
                    },
                    address: b.address,
                    check: check.clone(),
                });
            }
        }
    }
    out
}

/// A backend's identity across reloads: (VIP name, backend address, upstream port of an l7
/// backend), since indices move when the file changes.
type StableId = (String, std::net::IpAddr, Option<u16>);

/// Every backend of `cfg` by [`StableId`].
fn stable_ids(cfg: &Config) -> HashMap<StableId, TargetId> {
    let mut out = HashMap::new();
    for (vi, v) in cfg.vips.iter().enumerate() {
        for (bi, b) in v.backends.iter().enumerate() {
            out.insert(
                (v.name.clone(), b.address, b.port),
                TargetId {
                    vip: vi,
                    backend: bi,
                },
            );
        }
    }
    out
}

impl Running {
    /// Brings the maps to what `cfg` describes. On any error the previous state stays in
    /// place (a failed plan writes nothing; a failed apply is re-planned next time).
    fn reconcile(&mut self, cfg: &Config) -> anyhow::Result<usize> {
        let started = std::time::Instant::now();
        let down = self.down.clone();
        let healthy = |vip, backend| !down.contains(&TargetId { vip, backend });
        self.regions.configure(cfg, &self.region_tx);
        let transitions = self.regions.evaluate(cfg, healthy, started);
        let lb = desired::lb_config(cfg, self.facts.lb_mac, self.facts.nexthop(cfg)?);
        let neighbours = &self.facts.neighbours;
        let regions = &self.regions;
        let want = desired::desired(
            cfg,
            lb,
            healthy,
            |addr| neighbours.get(&addr).copied(),
            |v| regions.desired(cfg, v),
        );
        for (dv, cv) in want.vips.iter().zip(&cfg.vips) {
            if cv.mode != config::VipMode::DsrL2 {
                continue;
            }
            for db in dv.backends.iter().filter(|b| b.mac.is_none()) {
                if let Some(r) = self.resolver.as_mut() {
                    r.prompt(db.address);
                }
                tracing::warn!(
                    vip = %cv.name,
                    backend = %db.address,
                    "dsr-l2 backend has no MAC (not in the neighbour table): treated as down; \
                     set its mac in the file"
                );
            }
        }
        if let Some(addrs) = self.regions.addrs_to_write(cfg)
            && let Err(e) = self.balancer.set_region_addrs(&addrs)
        {
            self.regions.forget_addrs();
            return Err(e).context("writing the region tunnel addresses (agent.tunnel_addresses)");
        }
        let plan = self
            .reconciler
            .plan(&want)
            .context("planning the map changes")?;
        let writes = plan.ops.len();
        reconcile::apply(&mut self.balancer, &plan).context("writing the maps")?;
        self.reconciler.commit(plan);
        self.log_panic_changes(cfg, &want);
        // Logged once the maps carry the new split.
        for t in transitions {
            if t.last_resort {
                tracing::error!(
                    vip = %t.vip,
                    active = %t.active,
                    loads = %t.loads,
                    reason = %t.reason,
                    "VIP in LAST RESORT: every region is down; new flows go to this region's \
                     backends, all of them, healthy or not"
                );
            } else if t.initial {
                tracing::info!(
                    vip = %t.vip,
                    active = %t.active,
                    loads = %t.loads,
                    reason = %t.reason,
                    "region split"
                );
            } else {
                tracing::warn!(
                    vip = %t.vip,
                    active = %t.active,
                    loads = %t.loads,
                    reason = %t.reason,
                    "region split changed"
                );
            }
        }
        self.last_reconcile = Some(started.elapsed());
        self.reconciles += 1;
        Ok(writes)
    }

    /// A remote region's probe report: reconciles when it changes what the failover decides.
    fn on_region_report(&mut self, report: lb_userspace::capacity::RegionReport) {
        if !self.regions.on_report(report) {
            return;
        }
        self.reconcile_now("applying a remote region's change");
    }

    /// Builds the l7 VIPs' gateways of `cfg` (files read, listeners bound) and switches to
    /// them; on an error nothing changed and the error has every problem, one per line. Called
    /// after [`Running::restart_checks`], so health indices are `cfg`'s.
    fn apply_gateways(&mut self, cfg: &Config) -> Result<(), String> {
        let down = &self.down;
        let healthy = |vip, backend| !down.contains(&TargetId { vip, backend });
        self.gateways
            .apply(cfg, &healthy)
            .map_err(|e| e.lines.join("\n"))
    }

    /// Hands the current health verdicts to the gateways' upstream pools.
    fn gateway_health(&self) {
        if let Some(cfg) = &self.config {
            let down = &self.down;
            self.gateways.set_health(cfg, &|vip, backend| {
                !down.contains(&TargetId { vip, backend })
            });
        }
    }

    /// Reconciles the configuration in force, logging a failure with `what`.
    fn reconcile_now(&mut self, what: &str) {
        let Some(cfg) = self.config.clone() else {
            return;
        };
        if let Err(e) = self.reconcile(&cfg) {
            tracing::error!("{what}: {e:#}");
        }
    }

    /// Logs VIPs entering or leaving panic (fewer healthy backends than their
    /// `panic_threshold`, so every weighted backend takes traffic), once per transition.
    fn log_panic_changes(&mut self, cfg: &Config, want: &reconcile::Desired) {
        let mut now = HashSet::new();
        for (dv, cv) in want.vips.iter().zip(&cfg.vips) {
            // The last resort is logged as such.
            if !reconcile::panics(dv) || dv.regions.last_resort {
                continue;
            }
            now.insert(cv.name.clone());
            if !self.panicking.contains(&cv.name) {
                let weighted = dv.backends.iter().filter(|b| b.weight > 0).count();
                let healthy = dv
                    .backends
                    .iter()
                    .filter(|b| b.weight > 0 && b.healthy)
                    .count();
                tracing::error!(
                    vip = %cv.name,
                    healthy,
                    weighted,
                    panic_threshold = cv.panic_threshold,
                    "VIP in PANIC: too few healthy backends; sending new flows to all of its \
                     weighted backends, healthy or not, rather than overloading the survivors"
                );
            }
        }
        for name in self.panicking.difference(&now) {
            tracing::warn!(vip = %name, "VIP out of panic: only healthy backends take traffic again");
        }
        self.panicking = now;
    }

    /// Makes sure the balancer is attached to its interface through the pinned link. The
    /// kernel detaches a link whose interface is deleted; when an interface of that name comes
    /// back (a driver reload, a re-created bond or veth), the balancer is attached to it again
    /// instead of leaving every VIP unserved until a restart. Problems are logged once each.
    fn check_attachment(&mut self) {
        let Some((pins, mode)) = self.pins.clone() else {
            return;
        };
        let interface = self.control.interface.clone();
        let problem = match lb_userspace::pins::ifindex(&interface) {
            None => Some(format!(
                "interface {interface} is gone: xlb_balancer is attached nowhere and no VIP is \
                 served; it is attached again when {interface} is back"
            )),
            Some(index) => {
                let here = lb_userspace::pins::link_facts(&pins.link_path())
                    .ok()
                    .flatten()
                    .and_then(|f| f.place().ok())
                    == Some(lb_userspace::pins::LinkPlace::Here(index));
                if here {
                    None
                } else {
                    match self.balancer.attach_pinned(&interface, mode, &pins) {
                        Ok(attached) => {
                            tracing::warn!(
                                %interface,
                                mode = %attached,
                                "xlb_balancer was not attached to {interface} (the interface was \
                                 re-created or the pinned link removed); attached it again"
                            );
                            self.control.attach_mode = attached.to_string();
                            None
                        }
                        Err(e) => Some(format!(
                            "xlb_balancer is not attached to {interface} and attaching it again \
                             failed: {e}"
                        )),
                    }
                }
            }
        };
        if problem != self.attachment_problem {
            if let Some(p) = &problem {
                tracing::error!("{p}");
                self.control.attach_mode = "not attached".to_owned();
            }
            self.attachment_problem = problem;
        }
    }

    /// Re-reads the route and neighbour tables; when something the maps depend on changed (the
    /// next hop's MAC, a dsr-l2 backend's), logs it once and reconciles.
    async fn refresh_facts(&mut self) {
        self.check_attachment();
        let (Some(cfg), Some(resolver)) = (self.config.clone(), self.resolver.as_mut()) else {
            return;
        };
        let mut new = match resolver.resolve().await {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!("re-reading the route and neighbour tables: {e:#}");
                return;
            }
        };
        if new.gateway_mac.is_none() && self.facts.gateway_mac.is_some() {
            // Forwarding to the last confirmed router beats forwarding to nobody; the kernel
            // is re-resolving it meanwhile.
            if cfg.agent.next_hop_mac == NextHopMac::Auto {
                tracing::warn!(
                    gateways = ?new.gateways,
                    "the next hop has no neighbour entry right now; keeping its last known MAC"
                );
            }
            new.gateway_mac = self.facts.gateway_mac;
        }
        let old = self.facts.relevant(&cfg);
        let now = new.relevant(&cfg);
        self.facts = new;
        if old == now {
            return;
        }
        if old.nexthop != now.nexthop {
            tracing::info!(old = %mac_text(old.nexthop), new = %mac_text(now.nexthop), "next hop MAC changed");
        }
        if old.lb_mac != now.lb_mac {
            tracing::info!(old = %mac_text(Some(old.lb_mac)), new = %mac_text(Some(now.lb_mac)), "interface MAC changed");
        }
        for ((addr, old), (_, new)) in old.dsr_l2.iter().zip(&now.dsr_l2) {
            if old != new {
                tracing::info!(backend = %addr, old = %mac_text(*old), new = %mac_text(*new), "dsr-l2 backend MAC changed");
            }
        }
        if let Err(e) = self.reconcile(&cfg) {
            tracing::error!("applying the changed host facts: {e:#}");
        }
    }

    /// What a metrics scrape shows, read from the maps now.
    fn snapshot(&self) -> metrics::Snapshot {
        let latencies = self
            .checker
            .as_ref()
            .map(|c| c.latencies())
            .unwrap_or_default();
        let durations = self
            .checker
            .as_ref()
            .map(|c| c.durations())
            .unwrap_or_default();
        let traffic = |s: Result<lb_common::types::Stats, _>| {
            s.map(|s| metrics::Traffic {
                packets: s.packets,
                bytes: s.bytes,
                new_flows: s.new_flows,
            })
            .unwrap_or_default()
        };
        let vips = self
            .config
            .iter()
            .flat_map(|c| c.vips.iter().enumerate())
            .map(|(vi, v)| {
                let key = desired::vip_key(v.address, v.port, v.protocol.number());
                metrics::VipMetrics {
                    name: v.name.clone(),
                    traffic: self
                        .reconciler
                        .vip_id(&key)
                        .map(|id| traffic(self.balancer.vip_stats(id)))
                        .unwrap_or_default(),
                    backends: v
                        .backends
                        .iter()
                        .enumerate()
                        .map(|(bi, b)| {
                            let id = TargetId {
                                vip: vi,
                                backend: bi,
                            };
                            metrics::BackendMetrics {
                                // An l7 VIP's servers may share an address: address:port.
                                address: match b.port {
                                    Some(p) => std::net::SocketAddr::new(b.address, p).to_string(),
                                    None => b.address.to_string(),
                                },
                                up: !self.down.contains(&id),
                                traffic: self
                                    .reconciler
                                    .backend_id(&key, &b.address)
                                    .map(|bid| traffic(self.balancer.backend_stats(bid)))
                                    .unwrap_or_default(),
                                check_latency: latencies.get(&id).copied(),
                                check_durations: durations.get(&id).cloned(),
                            }
                        })
                        .collect(),
                    regions: self
                        .config
                        .as_ref()
                        .and_then(|c| self.regions.metrics(c, v)),
                }
            })
            .collect();
        metrics::Snapshot {
            remote_regions: self.regions.remote_metrics(),
            counters: self.balancer.counters().unwrap_or_default(),
            vips,
            last_reconcile: self.last_reconcile,
            reconciles: self.reconciles,
            reloads_refused: self.reloads_refused,
        }
    }

    /// (Re)starts the health checks for `cfg`, keeping the state and check-duration histograms
    /// of backends that were checked before (matched by VIP name and address).
    fn restart_checks(&mut self, cfg: &Config, tx: &mpsc::Sender<HealthEvent>) {
        let previous: HashMap<TargetId, TargetHistory> = match (self.checker.take(), &self.config) {
            (Some(handle), Some(old)) => {
                let old_ids: HashMap<TargetId, StableId> =
                    stable_ids(old).into_iter().map(|(k, id)| (id, k)).collect();
                let new_ids = stable_ids(cfg);
                handle
                    .stop()
                    .into_iter()
                    .filter_map(|(id, history)| Some((*new_ids.get(old_ids.get(&id)?)?, history)))
                    .collect()
            }
            _ => std::mem::take(&mut self.seed)
                .into_iter()
                .map(|(id, state)| (id, state.into()))
                .collect(),
        };
        self.down = previous
            .iter()
            .filter(|(_, h)| !h.state.is_up())
            .map(|(id, _)| *id)
            .collect();
        let targets = targets(cfg);
        if !targets.is_empty() {
            tracing::info!(checks = targets.len(), "health checks running");
            self.checker = Some(Checker::spawn_with_states(targets, previous, tx.clone()));
        }
    }

    /// A backend changed state: log it once and reconcile.
    fn on_health(&mut self, ev: HealthEvent) {
        let Some(cfg) = self.config.clone() else {
            return;
        };
        let Some(vip) = cfg.vips.get(ev.id.vip) else {
            return;
        };
        let Some(backend) = vip.backends.get(ev.id.backend) else {
            return;
        };
        if ev.up {
            self.down.remove(&ev.id);
        } else {
            self.down.insert(ev.id);
        }
        // The line is written once the maps reflect the change, so "backend down" means no new
        // flow goes there any more.
        let applied = self.reconcile(&cfg);
        self.gateway_health();
        // An l7 server is named with its port: servers of one host differ only by it.
        let addr = match backend.port.or(vip.gateway.as_ref().map(|_| vip.port)) {
            Some(port) => std::net::SocketAddr::new(backend.address, port).to_string(),
            None => backend.address.to_string(),
        };
        let (name, detail) = (&vip.name, &ev.detail);
        match (ev.up, applied) {
            (true, Ok(_)) => tracing::info!(vip = %name, backend = %addr, %detail, "backend up"),
            (false, Ok(_)) => tracing::warn!(vip = %name, backend = %addr, %detail, "backend down"),
            (up, Err(e)) => tracing::error!(
                vip = %name,
                backend = %addr,
                up,
                "health change could not be applied: {e:#}"
            ),
        }
    }
}

async fn serve(args: AgentArgs) -> anyhow::Result<()> {
    // Handlers before anything else: a start with many VIPs writes the maps for seconds, and a
    // signal's default action (SIGHUP's too: a `systemctl reload` during the start) would kill
    // the agent in the middle of those writes. A signal that arrives meanwhile is acted on
    // once the main loop runs: SIGTERM stops the agent cleanly right after it attached, SIGHUP
    // reloads.
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let file = match &args.config {
        Some(path) => Some(load_config(path)?),
        None => None,
    };
    // Bound before anything else is touched (the run-time state file, the maps), so a second
    // agent is refused first; removed again when `_admin_socket` drops at exit.
    let (admin_tx, mut admin_rx) = mpsc::channel::<admin::Pending>(16);
    let _admin_socket = match &file {
        Some(c) => {
            let path = &c.agent.admin_socket;
            let bound = admin::bind(path).context("serving the admin API (agent.admin_socket)")?;
            tracing::info!(socket = %path.display(), "admin API listening");
            tokio::spawn(admin::serve(bound.listener, admin_tx));
            Some(bound.file)
        }
        None => None,
    };
    // From here on `cfg` is the effective configuration: the file with the run-time changes
    // kept in state_dir that still apply to it.
    let (mut control, cfg) = control::Control::load(args.config.as_deref(), file)?;
    // Before any gateway is built: its per-worker state is sized from this.
    if let Some(c) = &cfg {
        lb_userspace::gateway::set_worker_count(c.agent.gateway_workers);
    }
    let (interface, mode, flow_entries) = match (&cfg, &args.interface) {
        (Some(c), _) => (
            c.agent.interface.clone(),
            args.xdp_mode
                .map(AttachMode::from)
                .unwrap_or(attach_mode(c.agent.xdp_mode)),
            c.agent.flow_table_entries,
        ),
        (None, Some(i)) => (
            i.clone(),
            args.xdp_mode.map(AttachMode::from).unwrap_or_default(),
            LoadOptions::default().flow_entries,
        ),
        (None, None) => bail!("give --config FILE (or --interface IF to attach with no VIPs)"),
    };

    anyhow::ensure!(
        host::interface_exists(&interface),
        "no network interface {interface:?} here (see `ip link`)"
    );
    control.interface = interface.clone();
    if interface == "lo" {
        tracing::warn!(
            "attaching to the loopback interface: locally originated VIP traffic would be \
             encapsulated back onto lo; the balancer belongs on the NIC that receives VIP traffic"
        );
    }
    // With a configuration the state maps and the link are pinned, so a restart (or kill -9)
    // loses nothing; the bare `--interface` mode is a throw-away attachment.
    let pins = cfg.as_ref().map(|c| PinDir::new(&c.agent.bpffs_dir));
    let options = LoadOptions { flow_entries };
    let mut adopted_regions = regions::Regions::default();
    let (balancer, reconciler, seed) = match (&pins, &cfg) {
        (Some(pins), Some(c)) => {
            let (balancer, prepared) = Balancer::load_pinned(options, pins)
                .context("loading the XDP balancer (are you root?)")?;
            if let Some(reason) = &prepared.reset_reason {
                tracing::warn!(
                    pins = %pins.root().display(),
                    %reason,
                    "pinned maps do not fit this build: starting with empty maps (established \
                     flows are re-hashed; Maglev keeps most on their backend)"
                );
            }
            if prepared.maps_adopted {
                // A previous agent killed in the middle of a publish or removal leaves the
                // entries derived from the VIPs (active ids, address entries, the bloom filter)
                // behind the VIP entries; the plan compares only the latter.
                let mut balancer = balancer;
                let repaired = balancer
                    .repair_derived()
                    .context("checking the adopted maps")?;
                if repaired > 0 {
                    tracing::warn!(
                        pins = %pins.root().display(),
                        entries = repaired,
                        "the adopted maps were left half-updated (a previous agent was stopped \
                         mid-change); repaired the VIP address and state entries"
                    );
                }
                let contents = balancer
                    .read_contents()
                    .context("reading the adopted maps")?;
                let reconciler = Reconciler::adopt(&contents);
                let seed = adopted_health(c, &contents);
                adopted_regions.adopt(&contents);
                tracing::info!(
                    pins = %pins.root().display(),
                    vips = contents.vips.len(),
                    backends = contents.backends.len(),
                    down = seed.len(),
                    "adopted the pinned maps; the connection table is kept"
                );
                (balancer, reconciler, seed)
            } else {
                (balancer, Reconciler::new(), HashMap::new())
            }
        }
        _ => (
            Balancer::load_with(options).context("loading the XDP balancer (are you root?)")?,
            Reconciler::new(),
            HashMap::new(),
        ),
    };
    let (region_tx, mut region_rx) = mpsc::channel::<lb_userspace::capacity::RegionReport>(64);
    let mut running = Running {
        balancer,
        reconciler,
        config: None,
        down: HashSet::new(),
        checker: None,
        last_reconcile: None,
        reconciles: 0,
        reloads_refused: 0,
        seed,
        facts: HostFacts::default(),
        resolver: None,
        panicking: HashSet::new(),
        control,
        pins: None,
        attachment_problem: None,
        regions: adopted_regions,
        region_tx,
        gateways: Gateways::new(),
    };
    let (scrape_tx, mut scrape_rx) = mpsc::channel::<metrics::ScrapeRequest>(16);
    if let Some(c) = &cfg {
        let listen = c.agent.metrics_listen;
        let listener = metrics::bind(listen)
            .await
            .with_context(|| format!("listening for metrics on {listen} (agent.metrics_listen)"))?;
        tracing::info!(%listen, "metrics on http://{listen}/metrics");
        tokio::spawn(metrics::serve(listener, scrape_tx));
    }
    let (health_tx, mut health_rx) = mpsc::channel::<HealthEvent>(256);
    let logger = running
        .balancer
        .take_logger(log::logger())
        .context("opening the eBPF log buffer")?;
    logging::spawn_ebpf_log_forwarder(logger).context("watching the eBPF log buffer")?;

    // The maps are filled before the program is attached, so its first packet already sees
    // every VIP.
    if let Some(c) = &cfg {
        let mut resolver = Resolver::new(&interface)?;
        running.facts = resolver
            .resolve_for_start(c, Duration::from_secs(3))
            .await
            .context("reading the route and neighbour tables")?;
        running.resolver = Some(resolver);
        // Backends start healthy (no check has failed yet), so a restart never empties a pool.
        running.restart_checks(c, &health_tx);
        running.config = Some(c.clone());
        if let Err(lines) = running.apply_gateways(c) {
            for line in lines.lines() {
                tracing::error!("{line}");
            }
            bail!("the l7 gateway could not start (see above); nothing was changed");
        }
        let writes = running.reconcile(c)?;
        tracing::info!(
            vips = c.vips.len(),
            backends = c.backend_count(),
            writes,
            "configuration applied"
        );
    }
    let (_link, attached_mode) = match &pins {
        Some(pins) => {
            let attached = running.balancer.attach_pinned(&interface, mode, pins)?;
            for old in pins.remove_other_layouts()? {
                tracing::info!(path = %old.display(), "removed maps of an older layout");
            }
            tracing::info!(%interface, mode = %attached, pins = %pins.root().display(), "xlb_balancer attached");
            if attached == Attached::Adopted {
                tracing::info!(
                    "took over the pinned XDP link: the new program replaced the old one atomically"
                );
            }
            (None, attached.to_string())
        }
        None => {
            let (mode, link) = running.balancer.attach(&interface, mode)?;
            tracing::info!(%interface, %mode, "xlb_balancer attached");
            (Some(link), mode.to_string())
        }
    };

    // Route, neighbour and link changes re-resolve the next hop and dsr-l2 MACs; a slow timer
    // catches anything a lost notification missed.
    let mut changes = match &cfg {
        Some(_) => Some(netlink::Changes::subscribe().context("subscribing to route changes")?),
        None => None,
    };
    let mut facts_timer = tokio::time::interval(Duration::from_secs(30));
    running.control.attach_mode = attached_mode;
    running.pins = pins.clone().map(|p| (p, mode));
    running.sample_traffic();
    let mut samples = tokio::time::interval(control::SAMPLE_PERIOD);
    let period = Duration::from_secs(args.stats_interval_secs.max(1));
    let mut ticker = tokio::time::interval(period);
    let mut last = running.balancer.counters()?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                // Logged inside; only the admin API's caller needs the result.
                let _ = reload(&mut running, args.config.as_ref(), &interface, &health_tx);
            }
            Some(pending) = admin_rx.recv() => {
                running.on_admin(pending, args.config.as_ref(), &health_tx);
            }
            _ = samples.tick() => running.sample_traffic(),
            Some(ev) = health_rx.recv() => running.on_health(ev),
            Some(report) = region_rx.recv() => running.on_region_report(report),
            () = until(running.regions.next_deadline()) => {
                running.reconcile_now("applying a region failback after its hold-down");
            }
            Some(()) = next_change(&mut changes) => running.refresh_facts().await,
            _ = facts_timer.tick(), if cfg.is_some() => running.refresh_facts().await,
            Some(reply) = scrape_rx.recv() => {
                let mut text = metrics::render(&running.snapshot());
                running.gateways.render_metrics(&mut text);
                let _ = reply.send(text);
            }
            _ = ticker.tick(), if args.stats_interval_secs > 0 => {
                let now = running.balancer.counters()?;
                tracing::info!(counters = %now.since(&last), "counters since last report");
                last = now;
            }
        }
    }
    let totals = running.balancer.counters()?;
    match &pins {
        Some(pins) if args.detach_on_exit => {
            pins.remove_all()
                .context("removing the pinned maps and link")?;
            tracing::info!(counters = %totals, "stopping; detaching xlb_balancer and removing its pins");
        }
        Some(pins) => tracing::info!(
            counters = %totals,
            pins = %pins.root().display(),
            "stopping; xlb_balancer stays attached with its pinned state (the next agent adopts \
             it; --detach-on-exit removes it)"
        ),
        None => tracing::info!(counters = %totals, "stopping; detaching xlb_balancer"),
    }
    Ok(())
}

/// Sleeps until `deadline`; never, without one.
async fn until(deadline: Option<std::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

/// The next burst of route/neighbour changes; never, without a subscription.
async fn next_change(changes: &mut Option<netlink::Changes>) -> Option<()> {
    match changes {
        Some(c) => c.next_burst(Duration::from_millis(100)).await,
        None => std::future::pending().await,
    }
}

/// `aa:bb:cc:dd:ee:ff`, or `none`.
fn mac_text(mac: Option<[u8; 6]>) -> String {
    match mac {
        Some(m) => m
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":"),
        None => "none".into(),
    }
}

/// The backends of `cfg` a previous agent left marked down in the adopted maps (matched by VIP
/// and address); their checks start from down.
fn adopted_health(
    cfg: &Config,
    contents: &lb_userspace::maps::MapContents,
) -> HashMap<TargetId, HealthState> {
    let mut out = HashMap::new();
    for (vi, v) in cfg.vips.iter().enumerate() {
        let key = desired::vip_key(v.address, v.port, v.protocol.number());
        let Some((_, meta)) = contents.vips.iter().find(|(k, _)| *k == key) else {
            continue;
        };
        for (bi, b) in v.backends.iter().enumerate() {
            let Some(check) = &b.health_check else {
                continue;
            };
            let entry = desired::vip_key(b.address, 0, 0);
            let down = contents.backends.iter().any(|(_, e)| {
                e.owner == meta.vip_id
                    && e.family == entry.family
                    && e.addr == entry.addr
                    && e.flags & lb_common::types::BACKEND_F_UP == 0
            });
            if down {
                out.insert(
                    TargetId {
                        vip: vi,
                        backend: bi,
                    },
                    HealthState::down(check.rise, check.fall),
                );
            }
        }
    }
    out
}

/// The changes between two configurations that a reload does not apply, one line each: the
/// agent's sockets, directories and connection-table size are set up once at start, and the
/// attach mode belongs to the attached link.
fn restart_only_changes(old: &Config, new: &Config) -> Vec<String> {
    let (old, new) = (&old.agent, &new.agent);
    let mut out: Vec<String> = [
        ("metrics_listen", old.metrics_listen != new.metrics_listen),
        ("admin_socket", old.admin_socket != new.admin_socket),
        ("state_dir", old.state_dir != new.state_dir),
        ("bpffs_dir", old.bpffs_dir != new.bpffs_dir),
        (
            "flow_table_entries",
            old.flow_table_entries != new.flow_table_entries,
        ),
    ]
    .into_iter()
    .filter(|(_, moved)| *moved)
    .map(|(key, _)| format!("agent.{key} changed: it applies only on restart"))
    .collect();
    if old.xdp_mode != new.xdp_mode {
        out.push(
            "agent.xdp_mode changed: the attached link keeps its mode, across restarts too; it \
             applies when the balancer is attached anew (after `xlb agent --detach-on-exit` \
             stops)"
                .to_owned(),
        );
    }
    out
}

/// Why a reload was refused; the running state stays either way.
enum ReloadError {
    /// The file is invalid: every error, one per line, then a summary.
    Invalid(String),
    /// Anything else (no file, the interface changed, the maps refused the result).
    Failed(String),
}

/// SIGHUP and `xlb reload`: re-read the configuration and apply it with the run-time changes
/// that still apply to it; an invalid one is refused and the running state stays.
fn reload(
    running: &mut Running,
    path: Option<&PathBuf>,
    interface: &str,
    health_tx: &mpsc::Sender<HealthEvent>,
) -> Result<admin::ReloadResult, ReloadError> {
    let Some(path) = path else {
        tracing::warn!("SIGHUP ignored: the agent runs without a configuration file");
        return Err(ReloadError::Failed(
            "the agent runs without a configuration file (--interface); there is nothing to \
             reload"
                .to_owned(),
        ));
    };
    let file = match config::load(path) {
        Ok(c) => c,
        Err(errors) => {
            for e in errors.errors() {
                tracing::error!("{e}");
            }
            let n = errors.len();
            let summary = format!(
                "{}: invalid configuration ({n} error{}); nothing was changed",
                path.display(),
                if n == 1 { "" } else { "s" }
            );
            tracing::error!("reload refused: {summary}; still running the previous configuration");
            running.reloads_refused += 1;
            return Err(ReloadError::Invalid(format!("{errors}\n{summary}")));
        }
    };
    if let Some(old) = &running.config {
        for line in restart_only_changes(old, &file) {
            tracing::warn!("{line}");
        }
    }
    if file.agent.interface != interface {
        let message = format!(
            "reload refused: agent.interface changed ({interface:?} -> {:?}); restart the agent \
             to move it",
            file.agent.interface
        );
        tracing::error!("{message}");
        running.reloads_refused += 1;
        return Err(ReloadError::Failed(message));
    }
    let rebased = runtime::rebase(&file, &running.control.overlay);
    for line in &rebased.dropped {
        tracing::warn!("{line}");
    }
    let cfg = rebased.effective;
    let previous = (running.down.clone(), running.config.clone());
    running.restart_checks(&cfg, health_tx);
    running.config = Some(cfg.clone());
    // The gateway first: its files (certificates, keys, JWKS) are part of the configuration,
    // and a listener that cannot be bound refuses the reload before any map changes.
    if let Err(lines) = running.apply_gateways(&cfg) {
        for line in lines.lines() {
            tracing::error!("{line}");
        }
        let summary = format!(
            "{}: the l7 gateway refused the configuration; nothing was changed",
            path.display()
        );
        tracing::error!("reload refused: {summary}; still running the previous configuration");
        running.reloads_refused += 1;
        let (down, old) = previous;
        if let Some(old) = old {
            running.restart_checks(&old, health_tx);
            running.config = Some(old);
            running.down = down;
        }
        return Err(ReloadError::Invalid(format!("{lines}\n{summary}")));
    }
    match running.reconcile(&cfg) {
        Ok(writes) => {
            tracing::info!(
                vips = cfg.vips.len(),
                backends = cfg.backend_count(),
                writes,
                "configuration reloaded"
            );
            running.control.file = Some(file);
            if rebased.overlay != running.control.overlay {
                running.control.overlay = rebased.overlay;
                if let Some(state) = &running.control.state_path
                    && let Err(e) = runtime::save(state, &running.control.overlay)
                {
                    // The entries dropped here are dropped again at the next start.
                    tracing::warn!("{e}");
                }
            }
            Ok(control::reloaded(&cfg, rebased.dropped))
        }
        Err(e) => {
            // The maps keep the previous state; so does the agent (checks restart for it).
            tracing::error!("reload failed: {e:#}; the previous state stays in place");
            running.reloads_refused += 1;
            let (down, old) = previous;
            if let Some(old) = old {
                running.restart_checks(&old, health_tx);
                running.down = down;
                if let Err(lines) = running.apply_gateways(&old) {
                    tracing::error!("restoring the previous gateway failed: {lines}");
                }
                running.config = Some(old);
            }
            Err(ReloadError::Failed(format!(
                "reload failed: {e:#}; the previous state stays in place"
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reload_names_every_agent_key_it_does_not_apply() {
        let base = "[agent]\ninterface = \"eth0\"\n";
        let old = config::parse("a.toml", base).expect("valid");
        let same = config::parse("b.toml", base).expect("valid");
        assert!(restart_only_changes(&old, &same).is_empty());
        let changed = config::parse(
            "b.toml",
            "[agent]\ninterface = \"eth0\"\nflow_table_entries = 4096\n\
             bpffs_dir = \"/sys/fs/bpf/other\"\nxdp_mode = \"generic\"\n\
             metrics_listen = \"127.0.0.1:9999\"\n",
        )
        .expect("valid");
        let lines = restart_only_changes(&old, &changed).join("\n");
        // flow_table_entries and bpffs_dir were silently ignored by a reload.
        for key in [
            "metrics_listen",
            "bpffs_dir",
            "flow_table_entries",
            "xdp_mode",
        ] {
            assert!(
                lines.contains(&format!("agent.{key} changed")),
                "{key}: {lines}"
            );
        }
        assert!(!lines.contains("admin_socket"), "{lines}");
    }
}
