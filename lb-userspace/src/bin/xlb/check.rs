//! `xlb check`: validates a configuration file without touching the system, so a change can be
//! checked before the agent (or a deploy) applies it.

use std::path::PathBuf;

use clap::Args;
use lb_userspace::config;

/// Arguments of `xlb check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The configuration file to validate.
    #[arg(long, short = 'c', value_name = "FILE")]
    config: PathBuf,
}

/// Exit status: the file is valid.
const EXIT_OK: i32 = 0;
/// Exit status: the file could not be read.
const EXIT_UNREADABLE: i32 = 1;
/// Exit status: the file was read and is invalid.
const EXIT_INVALID: i32 = 2;

/// Validates the file and exits: 0 when valid (a one-line summary on stdout), 2 when invalid
/// (every error on stderr, one per line), 1 when the file cannot be read.
pub fn run(args: CheckArgs) -> ! {
    let file = args.config.display().to_string();
    match config::load(&args.config) {
        Ok(config) => {
            // The files an l7 VIP's gateway reads (certificates, keys, API keys, JWKS) are
            // part of the configuration: loaded and checked as the agent would.
            if let Err(lines) = lb_userspace::gateway::server::check(&config) {
                for line in &lines {
                    eprintln!("{line}");
                }
                std::process::exit(EXIT_INVALID)
            }
            let vips = config.vips.len();
            let backends = config.backend_count();
            // With regions, say which region this host is and what its VIPs fail over to, so a
            // file meant for another host is noticed before it is deployed.
            let failing_over = config
                .vips
                .iter()
                .filter(|v| v.regions.iter().any(|r| *r != config.agent.region))
                .count();
            let regions = if failing_over == 0 {
                String::new()
            } else {
                // The regions VIPs list, in order of first mention ([[region]] tables no VIP
                // lists are not failed over to).
                let mut names: Vec<&str> = Vec::new();
                for r in config.vips.iter().flat_map(|v| &v.regions) {
                    if *r != config.agent.region && !names.contains(&r.as_str()) {
                        names.push(r);
                    }
                }
                format!(
                    "; this host is region {:?}, {failing_over} {} with other regions ({})",
                    config.agent.region,
                    plural(failing_over, "VIP", "VIPs"),
                    names.join(", ")
                )
            };
            println!(
                "{file}: ok: {vips} {}, {backends} {}{regions}",
                plural(vips, "VIP", "VIPs"),
                plural(backends, "backend", "backends")
            );
            std::process::exit(EXIT_OK)
        }
        Err(errors) => {
            for error in &errors {
                eprintln!("{error}");
            }
            let code = if errors.is_unreadable() {
                EXIT_UNREADABLE
            } else {
                EXIT_INVALID
            };
            std::process::exit(code)
        }
    }
}

fn plural<'a>(n: usize, one: &'a str, many: &'a str) -> &'a str {
    if n == 1 { one } else { many }
}
