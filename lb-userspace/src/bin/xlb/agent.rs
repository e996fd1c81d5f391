//! `xlb agent`: load and attach the balancer, reconcile the configuration into its maps, reload
//! on SIGHUP, report counters, detach on exit.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, bail};
use clap::{Args, ValueEnum};
use lb_userspace::{
    config::{self, Config, NextHopMac, XdpMode},
    desired, host,
    loader::{AttachMode, Balancer, LoadOptions},
    logging,
    reconcile::{self, Reconciler},
};
use tokio::signal::unix::{SignalKind, signal};

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
            bail!(
                "{}: invalid configuration ({} errors); nothing was changed",
                path.display(),
                errors.len()
            )
        }
    }
}

/// The agent's live state: the balancer and what the reconciler applied to it.
struct Running {
    balancer: Balancer,
    reconciler: Reconciler,
}

impl Running {
    /// Brings the maps to what `cfg` describes. On any error the previous state stays in
    /// place (a failed plan writes nothing; a failed apply is re-planned next time).
    fn reconcile(&mut self, cfg: &Config) -> anyhow::Result<usize> {
        let interface = &cfg.agent.interface;
        let lb_mac = host::interface_mac(interface)?;
        let nexthop = match cfg.agent.next_hop_mac {
            NextHopMac::Fixed(mac) => mac.0,
            NextHopMac::Auto => host::gateway_mac(interface)?,
        };
        let lb = desired::lb_config(cfg, lb_mac, nexthop);
        // Health checks arrive with their own module; until then every backend counts as
        // healthy, and weight 0 drains.
        let want = desired::desired(
            cfg,
            lb,
            |_, _| true,
            |addr| host::neighbour_mac(addr, interface).ok(),
        );
        let plan = self
            .reconciler
            .plan(&want)
            .context("planning the map changes")?;
        let writes = plan.ops.len();
        reconcile::apply(&mut self.balancer, &plan).context("writing the maps")?;
        self.reconciler.commit(plan);
        Ok(writes)
    }
}

async fn serve(args: AgentArgs) -> anyhow::Result<()> {
    let cfg = match &args.config {
        Some(path) => Some(load_config(path)?),
        None => None,
    };
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
    if cfg.as_ref().is_some_and(|c| {
        c.vips.iter().any(|v| {
            v.health_check.is_some() || v.backends.iter().any(|b| b.health_check.is_some())
        })
    }) {
        tracing::warn!(
            "health_check blocks are validated but not run yet: every backend counts as healthy \
             (weight 0 still drains)"
        );
    }
    let balancer = Balancer::load_with(LoadOptions { flow_entries })
        .context("loading the XDP balancer (are you root?)")?;
    let mut running = Running {
        balancer,
        reconciler: Reconciler::new(),
    };
    let logger = running
        .balancer
        .take_logger(log::logger())
        .context("opening the eBPF log buffer")?;
    logging::spawn_ebpf_log_forwarder(logger).context("watching the eBPF log buffer")?;

    // The maps are filled before the program is attached, so its first packet already sees
    // every VIP.
    if let Some(c) = &cfg {
        let writes = running.reconcile(c)?;
        tracing::info!(
            vips = c.vips.len(),
            backends = c.backend_count(),
            writes,
            "configuration applied"
        );
    }
    let (mode, _link) = running.balancer.attach(&interface, mode)?;
    tracing::info!(%interface, %mode, "xlb_balancer attached");

    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let period = Duration::from_secs(args.stats_interval_secs.max(1));
    let mut ticker = tokio::time::interval(period);
    let mut last = running.balancer.counters()?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => reload(&mut running, args.config.as_ref(), &interface),
            _ = ticker.tick(), if args.stats_interval_secs > 0 => {
                let now = running.balancer.counters()?;
                tracing::info!(counters = %now.since(&last), "counters since last report");
                last = now;
            }
        }
    }
    let totals = running.balancer.counters()?;
    tracing::info!(counters = %totals, "stopping; detaching xlb_balancer");
    Ok(())
}

/// SIGHUP: re-read the configuration and apply it; an invalid one is refused and the running
/// state stays.
fn reload(running: &mut Running, path: Option<&PathBuf>, interface: &str) {
    let Some(path) = path else {
        tracing::warn!("SIGHUP ignored: the agent runs without a configuration file");
        return;
    };
    let cfg = match load_config(path) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("reload refused: {e:#}; still running the previous configuration");
            return;
        }
    };
    if cfg.agent.interface != interface {
        tracing::error!(
            old = interface,
            new = %cfg.agent.interface,
            "reload refused: agent.interface changed; restart the agent to move it"
        );
        return;
    }
    match running.reconcile(&cfg) {
        Ok(writes) => tracing::info!(
            vips = cfg.vips.len(),
            backends = cfg.backend_count(),
            writes,
            "configuration reloaded"
        ),
        Err(e) => tracing::error!("reload failed: {e:#}; the previous state stays in place"),
    }
}
