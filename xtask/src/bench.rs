//! `cargo xtask bench <what>`: benchmarks that need set-up, root and a release build.
//!
//! `e2e` runs `e2e-bench`: wrk through xlb, nftables DNAT and HAProxy to the same nginx
//! backends in the namespace topology, alternating, medians of several rounds.
//! `control` runs `control-bench` (Maglev build time, planning time, agent memory, and the
//! time from a backend failing to the real agent's maps no longer selecting it).
//! `dataplane` runs the `dataplane-bench` binary of the `xlb-tests` crate: the balancer's
//! per-packet cost per packet class with live-frames `BPF_PROG_TEST_RUN`, next to a trivial XDP
//! program, printed as a table and written to `target/xlb-bench/dataplane.json`.
//! `region` runs `region-bench`: multi-region failover and failback times (p50, p99) over 10
//! trials on the two-region topology, and the new flows lost during each transition.
//! `l7` runs `l7-bench`: the agent's L7 gateway against nginx and HAProxy as reverse proxies
//! (wrk keep-alive, one nginx upstream, two workers each, alternating rounds, medians).

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, bail};
use clap::{Args, ValueEnum};

use crate::setup;

/// Arguments of `cargo xtask bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Which benchmark to run.
    what: Bench,
    /// Skip the set-up step (Debian packages, rust-src, bpf-linker).
    #[arg(long)]
    skip_setup: bool,
    /// Passed to the benchmark binary (see `-- --help`), e.g. `-- --repeat 200000`.
    #[arg(last = true)]
    extra: Vec<String>,
}

/// The benchmarks there are.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum Bench {
    /// Per-packet cost of the XDP balancer per packet class, against a trivial XDP program.
    Dataplane,
    /// Control-plane costs: Maglev build time, planning time, the agent's memory with 100 VIPs
    /// x 100 backends, and failover time (backend fails -> maps drop it) over 20 trials.
    Control,
    /// End to end in the namespace topology: wrk requests/s and new connections/s through xlb,
    /// nftables DNAT and HAProxy (TCP) to the same nginx backends, with CPU per 1,000 requests.
    E2e,
    /// Multi-region failover: every backend of region A dies -> first new connection via B,
    /// and back after the hold-down, over 10 trials, with new flows lost per transition.
    Region,
    /// The L7 gateway vs nginx vs HAProxy as HTTP reverse proxies: wrk keep-alive requests/s,
    /// p50/p99 latency, each proxy's CPU per 1,000 requests and RSS, ratios against nginx.
    L7,
}

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

/// Runs set-up (unless skipped), then the chosen benchmark in release mode.
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    if !args.skip_setup {
        setup::run()?;
    }
    if !setup::is_root() {
        bail!("the benchmark loads BPF programs and creates a network namespace; run it as root");
    }
    let root = workspace_root();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let (bin, out) = match args.what {
        Bench::Dataplane => ("dataplane-bench", "target/xlb-bench/dataplane.json"),
        Bench::Control | Bench::E2e | Bench::Region | Bench::L7 => {
            // These benches start the real agent: build the release binary first.
            let status = Command::new(&cargo)
                .current_dir(&root)
                .args(["build", "--release", "-p", "lb-userspace", "--bin", "xlb"])
                .status()
                .context("building the xlb binary")?;
            if !status.success() {
                bail!("building the xlb binary failed ({status})");
            }
            match args.what {
                Bench::E2e => ("e2e-bench", "target/xlb-bench/e2e.json"),
                Bench::Region => ("region-bench", "target/xlb-bench/region.json"),
                Bench::L7 => ("l7-bench", "target/xlb-bench/l7.json"),
                _ => ("control-bench", "target/xlb-bench/control.json"),
            }
        }
    };
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(&root)
        .args(["run", "--release", "-p", "xlb-tests", "--bin", bin])
        .env("XLB_BIN", root.join("target/release/xlb"))
        .arg("--")
        .arg("--out")
        .arg(root.join(out))
        .args(&args.extra);
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("the {bin} benchmark failed ({status})");
    }
    Ok(())
}
