//! `xlb`: the agent and its command-line interface, one binary.

mod agent;
mod check;
mod cli;
mod decap;
mod facts;

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

/// mimalloc rather than glibc's malloc: the L7 gateway allocates and frees per request on its
/// worker threads, and glibc's arenas spent a fifth of the gateway's user time there.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc 3's `mi_option_arena_eager_commit` (the fifth entry of `mi_option_e` in the
/// `mimalloc.h` of the pinned libmimalloc-sys 0.1.49). Eager commit made every thread's arena
/// resident at once: 35 MiB RSS on the l7 bench instead of 24, for no measurable speed.
const MI_OPTION_ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;

/// Sets the allocator's options before anything allocates: an `.init_array` entry of a low
/// priority number runs before other constructors and before `main` (whose runtime set-up
/// already allocates, reserving the first arena).
#[used]
#[unsafe(link_section = ".init_array.00100")]
static CONFIGURE_ALLOCATOR: extern "C" fn() = configure_allocator;

extern "C" fn configure_allocator() {
    // SAFETY: sets a plain integer option; no thread exists yet.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_ARENA_EAGER_COMMIT, 0) };
}

/// xlb: an eBPF/XDP load balancer.
#[derive(Debug, Parser)]
#[command(name = "xlb", version, about, propagate_version = true)]
struct Cli {
    /// Log format on stderr: text (one line per event) or json (one object per line).
    #[arg(long, global = true, value_enum, default_value_t = LogFormatArg::Text)]
    log_format: LogFormatArg,
    /// The running agent's admin socket (its `agent.admin_socket`), for the run-time commands
    /// (vip, backend, reload, status, stats).
    #[arg(
        long,
        global = true,
        env = "XLB_SOCKET",
        value_name = "PATH",
        default_value = lb_userspace::config::DEFAULT_ADMIN_SOCKET
    )]
    socket: PathBuf,
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
    /// Add, remove and list the running agent's VIPs (run-time changes, kept in state_dir).
    #[command(subcommand)]
    Vip(cli::VipCommand),
    /// Add, remove, drain, undrain, re-weight and list a VIP's backends in the running agent.
    #[command(subcommand)]
    Backend(cli::BackendCommand),
    /// Make the running agent re-read its configuration file (as SIGHUP does); an invalid file
    /// is refused with every error (exit 2) and the running state stays.
    Reload,
    /// The running agent, its VIPs and backends: rates, health, active flows, weights; each
    /// VIP's regions: the active one, why and since when, shares and loads.
    Status(cli::StatusArgs),
    /// The data path's counters by name (the non-zero ones), or with --watch their rates.
    Stats(cli::StatsArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    lb_userspace::logging::init_tracing(match cli.log_format {
        LogFormatArg::Text => lb_userspace::logging::LogFormat::Text,
        LogFormatArg::Json => lb_userspace::logging::LogFormat::Json,
    });
    let socket = cli.socket.as_path();
    if matches!(
        cli.command,
        Commands::Check(_)
            | Commands::Vip(_)
            | Commands::Backend(_)
            | Commands::Reload
            | Commands::Status(_)
            | Commands::Stats(_)
    ) {
        // Printing commands end quietly when their reader goes away (`xlb status | head`), as
        // other command-line tools do, instead of panicking on the broken pipe. Not for the
        // agent and the decapsulator: a client that hangs up must never stop them.
        // SAFETY: restores the default disposition of one signal, before any thread exists.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let result = match cli.command {
        Commands::Agent(args) => agent::run(args),
        Commands::Decap(args) => decap::run(args),
        Commands::Check(args) => check::run(args),
        // The run-time commands print their own one-line errors and choose their exit codes
        // (see cli.rs).
        Commands::Vip(command) => return cli::vip(socket, command),
        Commands::Backend(command) => return cli::backend(socket, command),
        Commands::Reload => return cli::reload(socket),
        Commands::Status(args) => return cli::status(socket, args),
        Commands::Stats(args) => return cli::stats(socket, args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            ExitCode::FAILURE
        }
    }
}
