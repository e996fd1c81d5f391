//! `xlb agent`: load, attach, forward kernel logs, report counters, detach on exit.

use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, ValueEnum};
use lb_userspace::{
    loader::{AttachMode, Balancer},
    logging,
};
use tokio::signal::unix::{SignalKind, signal};

/// Arguments of `xlb agent`.
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Network interface to attach the balancer to.
    #[arg(long, short = 'i')]
    interface: String,
    /// XDP attach mode: native (driver), generic (skb), or auto (native, else generic).
    #[arg(long, value_enum, default_value_t = ModeArg::Auto)]
    xdp_mode: ModeArg,
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

/// Runs the agent until a termination signal arrives.
pub fn run(args: AgentArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(args))
}

async fn serve(args: AgentArgs) -> anyhow::Result<()> {
    let mut balancer = Balancer::load().context("loading the XDP balancer (are you root?)")?;
    let logger = balancer
        .take_logger(log::logger())
        .context("opening the eBPF log buffer")?;
    logging::spawn_ebpf_log_forwarder(logger).context("watching the eBPF log buffer")?;

    let (mode, _link) = balancer.attach(&args.interface, args.xdp_mode.into())?;
    tracing::info!(interface = %args.interface, %mode, "xlb_balancer attached");

    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let period = Duration::from_secs(args.stats_interval_secs.max(1));
    let mut ticker = tokio::time::interval(period);
    let mut last = balancer.counters()?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = ticker.tick(), if args.stats_interval_secs > 0 => {
                let now = balancer.counters()?;
                tracing::info!(counters = %now.since(&last), "counters since last report");
                last = now;
            }
        }
    }
    let totals = balancer.counters()?;
    tracing::info!(counters = %totals, "stopping; detaching xlb_balancer");
    drop(balancer);
    Ok(())
}
