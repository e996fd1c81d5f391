//! `cargo xtask test`: the whole suite, in order, failing fast, with a summary of what ran.

use std::{
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::bail;
use clap::Args;

use crate::setup;

/// Arguments of `cargo xtask test`.
#[derive(Debug, Args)]
pub struct TestArgs {
    /// Skip the set-up step (Debian packages, rust-src, bpf-linker).
    #[arg(long)]
    skip_setup: bool,
    /// Run only the named steps (repeatable): fmt, clippy-host, clippy-bpf, build, unit,
    /// fixtures, netns.
    #[arg(long = "step", value_name = "NAME")]
    steps: Vec<String>,
}

struct Step {
    name: &'static str,
    what: &'static str,
    needs_root: bool,
    command: fn() -> Command,
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

/// The workspace's root directory (where `cargo xtask` runs cargo).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

const STEPS: &[Step] = &[
    Step {
        name: "fmt",
        what: "cargo fmt --check (all crates, BPF included)",
        needs_root: false,
        command: || {
            let mut c = cargo();
            c.args(["fmt", "--all", "--", "--check"]);
            c
        },
    },
    Step {
        name: "clippy-host",
        what: "clippy -D warnings on the host crates",
        needs_root: false,
        command: || {
            let mut c = cargo();
            c.args(["clippy", "--all-targets", "--", "-D", "warnings"]);
            c
        },
    },
    Step {
        name: "clippy-bpf",
        what: "clippy -D warnings on lb-ebpf for bpfel-unknown-none",
        needs_root: false,
        command: || {
            // `rustup run` rather than `cargo +nightly`: the proxy must not inherit the
            // stable toolchain that is running xtask.
            let mut c = Command::new("rustup");
            c.current_dir(workspace_root())
                .args(["run", crate::toolchain::NIGHTLY, "cargo", "clippy"])
                .args([
                    "--package",
                    "lb-ebpf",
                    "--bins",
                    "--target",
                    "bpfel-unknown-none",
                ])
                .args(["-Z", "build-std=core", "--release"])
                .args(["--target-dir", "target/bpf-clippy"])
                .args(["--", "-D", "warnings"])
                .env_remove("RUSTUP_TOOLCHAIN")
                .env_remove("RUSTC")
                .env_remove("CARGO");
            c
        },
    },
    Step {
        name: "build",
        what: "build the xlb binary (embeds the XDP object)",
        needs_root: false,
        command: || {
            let mut c = cargo();
            c.args(["build", "--package", "lb-userspace", "--bin", "xlb"]);
            c
        },
    },
    Step {
        name: "unit",
        what: "unit tests of pure logic",
        needs_root: false,
        command: || {
            let mut c = cargo();
            c.args(["test", "--lib", "--bins"]).args([
                "-p",
                "lb-common",
                "-p",
                "lb-userspace",
                "-p",
                "xtask",
                "-p",
                "xlb-tests",
            ]);
            c
        },
    },
    Step {
        name: "fixtures",
        what: "fixtures, differential test and reconciler plans through BPF_PROG_TEST_RUN",
        needs_root: true,
        command: || {
            let mut c = cargo();
            c.args([
                "test",
                "-p",
                "xlb-tests",
                "--test",
                "fixtures",
                "--test",
                "decap",
                "--test",
                "differential",
                "--test",
                "reconcile",
                "--test",
                "region_fixtures",
            ]);
            c
        },
    },
    Step {
        name: "netns",
        what: "network-namespace, end-to-end, two-region, L7 gateway and together (L4 + gateway) tests: the real xlb, nginx, curl, wrk (serial)",
        needs_root: true,
        command: || {
            let mut c = cargo();
            c.args([
                "test",
                "-p",
                "xlb-tests",
                "--test",
                "netns",
                "--test",
                "e2e",
                "--test",
                "regions",
                "--test",
                "capacity",
                "--test",
                "failover",
                "--test",
                "l7",
                "--test",
                "together",
                "--test",
                "gateway",
                "--",
            ])
            .args(["--test-threads=1"]);
            c
        },
    },
];

enum Outcome {
    Passed(Duration),
    Failed(Duration),
    Skipped,
}

/// Runs set-up and then each selected step; stops at the first failure.
pub fn run(args: TestArgs) -> anyhow::Result<()> {
    for wanted in &args.steps {
        if !STEPS.iter().any(|s| s.name == wanted) {
            let names: Vec<_> = STEPS.iter().map(|s| s.name).collect();
            bail!("unknown step {wanted:?}; steps are: {}", names.join(", "));
        }
    }
    let started = Instant::now();
    let setup_time = if args.skip_setup {
        None
    } else {
        let t = Instant::now();
        setup::run()?;
        Some(t.elapsed())
    };

    let selected: Vec<&Step> = STEPS
        .iter()
        .filter(|s| args.steps.is_empty() || args.steps.iter().any(|w| w == s.name))
        .collect();
    let mut outcomes: Vec<(&Step, Outcome)> = Vec::new();
    let mut failed = false;
    for step in &selected {
        if failed {
            outcomes.push((step, Outcome::Skipped));
            continue;
        }
        eprintln!("\n==> [{}] {}", step.name, step.what);
        let t = Instant::now();
        let ok = if step.needs_root && !setup::is_root() {
            eprintln!("    this step needs root (BPF and network namespaces); run as root");
            false
        } else {
            let mut cmd = (step.command)();
            match cmd.status() {
                Ok(status) => status.success(),
                Err(e) => {
                    eprintln!("    cannot start {cmd:?}: {e}");
                    false
                }
            }
        };
        let took = t.elapsed();
        if ok {
            outcomes.push((step, Outcome::Passed(took)));
        } else {
            failed = true;
            outcomes.push((step, Outcome::Failed(took)));
        }
    }

    eprintln!("\n==> summary");
    if let Some(t) = setup_time {
        eprintln!("    {:<12} {:>8}  {:>7.1}s", "setup", "ok", t.as_secs_f64());
    }
    for (step, outcome) in &outcomes {
        let (status, secs) = match outcome {
            Outcome::Passed(d) => ("ok", format!("{:>7.1}s", d.as_secs_f64())),
            Outcome::Failed(d) => ("FAILED", format!("{:>7.1}s", d.as_secs_f64())),
            Outcome::Skipped => ("skipped", "       -".to_string()),
        };
        eprintln!(
            "    {:<12} {:>8}  {}  {}",
            step.name, status, secs, step.what
        );
    }
    eprintln!("    total {:.1}s", started.elapsed().as_secs_f64());
    if failed {
        bail!("test run failed (see the first FAILED step above)");
    }
    Ok(())
}
