//! `cargo xtask demo`: the main job, shown. Runs set-up, builds the `xlb` binary and the
//! `demo` program of the tests crate, and runs the demo as root: a namespace topology with
//! nginx backends, the real agent with `examples/demo.toml`, and narrated traffic
//! (distribution, failover, drain, status). It doubles as a smoke test: any failed
//! expectation makes it exit non-zero.

use std::process::Command;

use anyhow::{Context as _, bail};
use clap::Args;

use crate::{setup, test::workspace_root};

/// Arguments of `cargo xtask demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Skip the set-up step (Debian packages, rust-src, bpf-linker).
    #[arg(long)]
    skip_setup: bool,
    /// Also echo the agent's, decapsulators' and router's log lines as they arrive (they are
    /// always written to the run directory under target/xlb-demo).
    #[arg(long)]
    verbose: bool,
}

/// Checks for root, runs set-up (unless skipped), builds, and runs the demo.
pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    // Checked first: without root nothing of the demo can run, so set-up and the build would
    // be wasted time.
    if !setup::is_root() {
        bail!(
            "the demo needs root: it loads XDP programs and creates network namespaces; run \
             `sudo -E cargo xtask demo` (or as root)"
        );
    }
    if !args.skip_setup {
        setup::run()?;
    }
    let root = workspace_root();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!("demo: building the xlb binary and the demo program");
    let status = Command::new(&cargo)
        .current_dir(&root)
        .args(["build", "-p", "lb-userspace", "-p", "xlb-tests"])
        .args(["--bin", "xlb", "--bin", "demo"])
        .status()
        .context("starting cargo build")?;
    if !status.success() {
        bail!("building xlb and the demo failed ({status})");
    }
    let mut cmd = Command::new(root.join("target/debug/demo"));
    cmd.current_dir(&root)
        .arg("--xlb")
        .arg(root.join("target/debug/xlb"))
        .arg("--config")
        .arg(root.join("examples/demo.toml"))
        .arg("--out-dir")
        .arg(root.join("target/xlb-demo"));
    if args.verbose {
        cmd.arg("--verbose");
    }
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("the demo failed ({status}); the reason is printed above");
    }
    Ok(())
}
