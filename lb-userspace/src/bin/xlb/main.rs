//! `xlb`: the agent and its command-line interface, one binary.

mod agent;
mod check;
mod decap;
mod facts;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// xlb: an eBPF/XDP load balancer.
#[derive(Debug, Parser)]
#[command(name = "xlb", version, about, propagate_version = true)]
struct Cli {
    /// Log format on stderr: text (one line per event) or json (one object per line).
    #[arg(long, global = true, value_enum, default_value_t = LogFormatArg::Text)]
    log_format: LogFormatArg,
    #[command(subcommand)]
    command: Commands,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormatArg {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Commands {
    /// Load the XDP balancer, attach it to an interface and run until SIGTERM or SIGINT.
    Agent(agent::AgentArgs),
    /// The backend-side decapsulator: strips the balancer's IPIP / IPv6-in-IP headers addressed
    /// to this host and hands the inner packet to the stack (`attach`, `detach`, or `run` in the
    /// foreground).
    Decap(decap::DecapArgs),
    /// Validate a configuration file without touching the system: prints every error (exit 2)
    /// or a one-line summary (exit 0); exit 1 if the file cannot be read.
    Check(check::CheckArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    lb_userspace::logging::init_tracing(match cli.log_format {
        LogFormatArg::Text => lb_userspace::logging::LogFormat::Text,
        LogFormatArg::Json => lb_userspace::logging::LogFormat::Json,
    });
    let result = match cli.command {
        Commands::Agent(args) => agent::run(args),
        Commands::Decap(args) => decap::run(args),
        Commands::Check(args) => check::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            ExitCode::FAILURE
        }
    }
}
