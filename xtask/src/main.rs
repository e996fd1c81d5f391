//! `cargo xtask`: what cargo alone does not do for xlb (tool set-up, the demo, the full test
//! run and the benchmarks).

mod bench;
mod demo;
mod setup;
mod test;
mod toolchain;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Developer automation for xlb.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Install what building and testing need: Debian packages, the nightly's rust-src, and a
    /// bpf-linker built against the nightly's LLVM (under ~/.cache/xlb). Idempotent.
    Setup,
    /// Run set-up, then the main job shown and checked (as root): a namespace topology with
    /// three nginx backends behind the real agent, narrated traffic (distribution, failover,
    /// drain, status). Exits non-zero if any step's expectation fails.
    Demo(demo::DemoArgs),
    /// Run set-up, then every check and test suite, stopping at the first failure.
    Test(test::TestArgs),
    /// Run set-up, then a benchmark in release mode (as root): `cargo xtask bench dataplane`
    /// prints the balancer's per-packet cost and writes target/xlb-bench/dataplane.json.
    Bench(bench::BenchArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Setup => setup::run(),
        Command::Demo(args) => demo::run(args),
        Command::Test(args) => test::run(args),
        Command::Bench(args) => bench::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
