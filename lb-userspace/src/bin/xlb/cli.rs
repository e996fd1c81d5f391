//! The run-time CLI (`xlb vip|backend|reload|status|stats`): thin shells over the admin API.
//! Each command sends one request to the running agent and prints its answer; the agent checks
//! and applies everything.
//!
//! Exit codes: 0 ok; 1 the agent answered with an error (unknown VIP, a rule the change would
//! break, ...); 2 a usage error, or `reload` found the file invalid; 3 the agent is not running.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::IpAddr,
    path::Path,
    process::ExitCode,
    time::{Duration, Instant},
};

use clap::{Args, Subcommand, ValueEnum};
use lb_userspace::admin::{
    self, BackendInfo, ChangeResult, ClientError, ErrorKind, ReloadResult, Request, Response,
    VipInfo,
};
use serde::Serialize;

/// Exit status: the request succeeded.
pub const EXIT_OK: u8 = 0;
/// Exit status: the agent answered with an error.
pub const EXIT_FAILED: u8 = 1;
/// Exit status: a usage error (clap's), or `reload` found the configuration file invalid.
pub const EXIT_INVALID: u8 = 2;
/// Exit status: no agent answers on the socket.
pub const EXIT_NOT_RUNNING: u8 = 3;

/// How long to wait for an answer: a status walks the whole connection table, a reload may
/// rebuild many Maglev tables.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// `xlb vip ...`.
#[derive(Debug, Subcommand)]
pub enum VipCommand {
    /// Add a VIP (a run-time change: kept in state_dir across restarts and reloads). It has no
    /// health check, so its backends count as up.
    Add(VipAddArgs),
    /// Remove a VIP. A VIP of the configuration file is hidden until added again.
    Remove {
        /// The VIP's name.
        name: String,
    },
    /// List the VIPs in force (the file's and those added at run time).
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// Arguments of `xlb vip add`.
#[derive(Debug, Args)]
pub struct VipAddArgs {
    /// Unique name: lowercase letters, digits, '_' and '-'.
    name: String,
    /// The virtual IP address (IPv4 or IPv6).
    #[arg(long)]
    address: IpAddr,
    /// Destination port; 0 means every port.
    #[arg(long)]
    port: u16,
    /// Transport protocol.
    #[arg(long, value_enum)]
    protocol: ProtocolArg,
    /// How traffic reaches the backends [default: dsr-ipip].
    #[arg(long, value_enum)]
    mode: Option<ModeArg>,
    /// Maglev table slots: a prime, at least the number of weighted backends, at most 1048573
    /// [default: 65537].
    #[arg(long, value_name = "N")]
    table_size: Option<u32>,
    /// Healthy share of the pool (0.0..=1.0) below which every weighted backend takes traffic
    /// [default: 0.5].
    #[arg(long, value_name = "F", value_parser = share_arg)]
    panic_threshold: Option<f64>,
}

/// `--panic-threshold`: a share 0.0..=1.0, checked here because JSON has no NaN or infinity
/// (serde writes them as `null`, which the agent would read as "the default").
fn share_arg(s: &str) -> Result<f64, String> {
    let value: f64 = s.parse().map_err(|e| format!("{e}"))?;
    match lb_userspace::config::rules::share(value) {
        Some(v) => Err(v.message),
        None => Ok(value),
    }
}

/// `--protocol` values.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum ProtocolArg {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

/// `--mode` values.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum ModeArg {
    /// Encapsulated (IPIP / IPv6-in-IP) to the backend, which replies directly.
    DsrIpip,
    /// MAC rewrite; backends on the balancer's L2 segment, of the VIP's family.
    DsrL2,
    /// Passed to the host stack (the HTTP gateway).
    L7,
}

/// `xlb backend ...`.
#[derive(Debug, Subcommand)]
pub enum BackendCommand {
    /// Add a backend to a VIP (a run-time change, kept across restarts and reloads). It gets
    /// the VIP's health check.
    Add(BackendAddArgs),
    /// Remove a backend from a VIP. A backend of the configuration file is hidden until added
    /// again.
    Remove(BackendArgs),
    /// Drain a backend: weight 0, so established flows stay and no new ones come.
    Drain(BackendArgs),
    /// Undrain a backend: back to its weight.
    Undrain(BackendArgs),
    /// Set a backend's weight (while drained it applies on undrain).
    SetWeight(SetWeightArgs),
    /// List a VIP's backends with weight, drain, region and health.
    List {
        /// The VIP's name.
        vip: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// Arguments of `xlb backend add`.
#[derive(Debug, Args)]
pub struct BackendAddArgs {
    /// The VIP's name.
    vip: String,
    /// The backend's address.
    address: IpAddr,
    /// Relative share of new flows, 0..=65535 [default: 100].
    #[arg(long, value_name = "W")]
    weight: Option<u16>,
    /// The backend's region (one of the VIP's regions, if it lists any) [default: local].
    #[arg(long, value_name = "R")]
    region: Option<String>,
    /// The backend's MAC, for dsr-l2 VIPs (default: from the neighbour table).
    #[arg(long, value_name = "M")]
    mac: Option<String>,
    /// The upstream server's port, for l7 VIPs [default: the VIP's port].
    #[arg(long, value_name = "PORT")]
    port: Option<u16>,
    /// The upstream pool, for l7 VIPs [default: default].
    #[arg(long, value_name = "POOL")]
    pool: Option<String>,
}

/// A backend of a VIP.
#[derive(Debug, Args)]
pub struct BackendArgs {
    /// The VIP's name.
    vip: String,
    /// The backend's address.
    address: IpAddr,
    /// The upstream server's port, for an l7 VIP with several servers at the address.
    #[arg(long, value_name = "PORT")]
    port: Option<u16>,
}

/// Arguments of `xlb backend set-weight`.
#[derive(Debug, Args)]
pub struct SetWeightArgs {
    /// The VIP's name.
    vip: String,
    /// The backend's address.
    address: IpAddr,
    /// The new weight, 0..=65535.
    weight: u16,
    /// The upstream server's port, for an l7 VIP with several servers at the address.
    #[arg(long, value_name = "PORT")]
    port: Option<u16>,
}

/// Arguments of `xlb status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
}

/// Arguments of `xlb stats`.
#[derive(Debug, Args)]
pub struct StatsArgs {
    /// Print JSON (with --watch: one object per interval).
    #[arg(long)]
    json: bool,
    /// Print per-second rates of the counters that moved, every SECS seconds (default 1),
    /// until Ctrl-C.
    #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = "1")]
    watch: Option<u64>,
}

/// A failed command: what to print and the exit status.
struct Failure {
    code: u8,
    message: String,
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        let code = match e {
            ClientError::NotRunning(_) => EXIT_NOT_RUNNING,
            _ => EXIT_FAILED,
        };
        Failure {
            code,
            message: e.to_string(),
        }
    }
}

/// Sends `request` and returns the agent's result, or the failure with its exit status.
fn ask(socket: &Path, request: &Request) -> Result<Response, Failure> {
    let response = admin::call(socket, request, CALL_TIMEOUT)?;
    if response.ok {
        return Ok(response);
    }
    let code = match response.kind {
        Some(ErrorKind::InvalidConfig) => EXIT_INVALID,
        _ => EXIT_FAILED,
    };
    Err(Failure {
        code,
        message: response
            .error
            .unwrap_or_else(|| "the agent refused the request without a reason".into()),
    })
}

fn result<T: for<'de> serde::Deserialize<'de>>(response: &Response) -> Result<T, Failure> {
    response.result_as().map_err(Failure::from)
}

fn print_json(value: &impl Serialize) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).expect("results serialize")
    );
}

/// Runs a command and prints its failure, if any, on stderr; returns the exit status.
fn finish(outcome: Result<(), Failure>) -> ExitCode {
    match outcome {
        Ok(()) => ExitCode::from(EXIT_OK),
        Err(f) => {
            eprintln!("{}", f.message);
            ExitCode::from(f.code)
        }
    }
}

/// Sends a change and prints its one-line outcome.
fn change(socket: &Path, request: Request) -> Result<(), Failure> {
    let response = ask(socket, &request)?;
    let done: ChangeResult = result(&response)?;
    println!("{}", done.message);
    Ok(())
}

/// `xlb vip ...`.
pub fn vip(socket: &Path, command: VipCommand) -> ExitCode {
    finish(match command {
        VipCommand::Add(a) => change(
            socket,
            Request::VipAdd {
                name: a.name,
                address: a.address,
                port: u32::from(a.port),
                protocol: a.protocol.to_possible_value_name(),
                mode: a.mode.map(|m| m.to_possible_value_name()),
                table_size: a.table_size,
                panic_threshold: a.panic_threshold,
            },
        ),
        VipCommand::Remove { name } => change(socket, Request::VipRemove { name }),
        VipCommand::List { json } => (|| {
            let response = ask(socket, &Request::VipList)?;
            let vips: Vec<VipInfo> = result(&response)?;
            if json {
                print_json(&vips);
                return Ok(());
            }
            let mut t = Table::new(&[
                "NAME", "ADDRESS", "PORT", "PROTO", "MODE", "TABLE", "BACKENDS", "ORIGIN",
            ]);
            for v in &vips {
                t.row(vec![
                    v.name.clone(),
                    v.address.to_string(),
                    v.port.to_string(),
                    v.protocol.clone(),
                    v.mode.clone(),
                    v.table_size.to_string(),
                    v.backends.to_string(),
                    v.origin.to_string(),
                ]);
            }
            print!("{t}");
            Ok(())
        })(),
    })
}

/// `xlb backend ...`.
pub fn backend(socket: &Path, command: BackendCommand) -> ExitCode {
    finish(match command {
        BackendCommand::Add(a) => change(
            socket,
            Request::BackendAdd {
                vip: a.vip,
                address: a.address,
                weight: a.weight.map(u32::from),
                region: a.region,
                mac: a.mac,
                port: a.port.map(u32::from),
                pool: a.pool,
            },
        ),
        BackendCommand::Remove(b) => change(
            socket,
            Request::BackendRemove {
                vip: b.vip,
                address: b.address,
                port: b.port.map(u32::from),
            },
        ),
        BackendCommand::Drain(b) => change(
            socket,
            Request::BackendDrain {
                vip: b.vip,
                address: b.address,
                port: b.port.map(u32::from),
            },
        ),
        BackendCommand::Undrain(b) => change(
            socket,
            Request::BackendUndrain {
                vip: b.vip,
                address: b.address,
                port: b.port.map(u32::from),
            },
        ),
        BackendCommand::SetWeight(a) => change(
            socket,
            Request::BackendSetWeight {
                vip: a.vip,
                address: a.address,
                port: a.port.map(u32::from),
                weight: u32::from(a.weight),
            },
        ),
        BackendCommand::List { vip, json } => (|| {
            let response = ask(socket, &Request::BackendList { vip })?;
            let backends: Vec<BackendInfo> = result(&response)?;
            if json {
                print_json(&backends);
                return Ok(());
            }
            let mut t = Table::new(&[
                "ADDRESS", "WEIGHT", "DRAINED", "REGION", "MAC", "HEALTH", "ORIGIN",
            ]);
            for b in &backends {
                let weight = if b.drained {
                    format!("0 ({})", b.configured_weight)
                } else {
                    b.weight.to_string()
                };
                t.row(vec![
                    match b.port {
                        Some(port) => std::net::SocketAddr::new(b.address, port).to_string(),
                        None => b.address.to_string(),
                    },
                    weight,
                    yes_no(b.drained),
                    b.region.clone(),
                    b.mac.clone().unwrap_or_else(|| "-".into()),
                    b.health.to_string(),
                    b.origin.to_string(),
                ]);
            }
            print!("{t}");
            Ok(())
        })(),
    })
}

/// `xlb reload`.
pub fn reload(socket: &Path) -> ExitCode {
    finish((|| {
        let response = ask(socket, &Request::Reload)?;
        let done: ReloadResult = result(&response)?;
        println!("{}", done.message);
        for line in &done.dropped {
            println!("{line}");
        }
        Ok(())
    })())
}

/// `xlb status`.
pub fn status(socket: &Path, args: StatusArgs) -> ExitCode {
    finish((|| {
        let response = ask(socket, &Request::Status)?;
        let s: admin::Status = result(&response)?;
        if args.json {
            print_json(&s);
        } else {
            print!("{}", render_status(&s));
        }
        Ok(())
    })())
}

/// The human form of `xlb status`: the agent, a table of VIPs, a table of each VIP's backends.
fn render_status(s: &admin::Status) -> String {
    let a = &s.agent;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "agent      xlb {} on {} ({}), up {}",
        a.version,
        a.interface,
        a.attach_mode,
        duration(a.uptime_secs)
    );
    if let Some(config) = &a.config_path {
        let _ = writeln!(out, "config     {}", config.display());
    }
    if let Some(state) = &a.state_path {
        let _ = writeln!(out, "state      {}", state.display());
    }
    let last = a
        .last_reconcile_ms
        .map_or_else(|| "-".to_owned(), |ms| format!("{ms:.1} ms"));
    let _ = writeln!(
        out,
        "reconcile  last took {last}, {} since start; {} reload{} refused",
        a.reconciles,
        a.reloads_refused,
        if a.reloads_refused == 1 { "" } else { "s" }
    );
    if let Some(w) = a.rate_window_secs {
        let _ = writeln!(out, "rates      per second, over the last {w:.1} s");
    }
    if s.vips.is_empty() {
        let _ = writeln!(out, "\nno VIPs");
        return out;
    }
    let mut t = Table::new(&[
        "VIP",
        "ADDRESS",
        "PORT",
        "PROTO",
        "MODE",
        "PKT/S",
        "BYTES/S",
        "NEW/S",
        "NEW FLOWS",
        "ORIGIN",
    ]);
    for v in &s.vips {
        t.row(vec![
            v.name.clone(),
            v.address.to_string(),
            v.port.to_string(),
            v.protocol.clone(),
            v.mode.clone(),
            rate(v.packets_per_sec),
            rate(v.bytes_per_sec),
            rate(v.new_flows_per_sec),
            v.new_flows.to_string(),
            v.origin.to_string(),
        ]);
    }
    let _ = write!(out, "\n{t}");
    for v in &s.vips {
        // An l7 VIP's backends are its gateway's upstream servers, shown with the gateway.
        if let Some(g) = &v.gateway {
            let _ = write!(out, "{}", gateway_text(&v.name, g));
            continue;
        }
        let _ = writeln!(out, "\n{} backends:", v.name);
        if v.backends.is_empty() {
            let _ = writeln!(out, "  (none)");
            continue;
        }
        let mut t = Table::new(&[
            "  ADDRESS",
            "WEIGHT",
            "DRAINED",
            "REGION",
            "HEALTH",
            "FLOWS",
            "PKT/S",
            "BYTES/S",
            "NEW FLOWS",
            "ORIGIN",
        ]);
        for b in &v.backends {
            t.row(vec![
                format!("  {}", b.address),
                b.weight.to_string(),
                yes_no(b.drained),
                b.region.clone(),
                b.health.to_string(),
                b.active_flows.to_string(),
                rate(b.packets_per_sec),
                rate(b.bytes_per_sec),
                b.new_flows.to_string(),
                b.origin.to_string(),
            ]);
        }
        let _ = write!(out, "{t}");
        if let Some(r) = &v.regions {
            let _ = write!(out, "{}", regions_text(&v.name, r));
        }
    }
    out
}

/// The gateway part of an l7 VIP in `xlb status`: its listener, routes and upstream servers.
fn gateway_text(vip: &str, g: &lb_userspace::gateway::server::GatewayStatus) -> String {
    let mut out = String::new();
    let mut protocols = vec!["http/1.1"];
    if g.http2 {
        protocols.push(if g.tls { "h2" } else { "h2c" });
    }
    let _ = writeln!(
        out,
        "\n{vip} gateway: listening on {}{} ({})",
        g.listen,
        if g.tls { " with TLS" } else { "" },
        protocols.join(", ")
    );
    let mut t = Table::new(&["  ROUTE", "MATCHES", "POOL", "AUTH", "RATE LIMIT"]);
    for r in &g.routes {
        t.row(vec![
            format!("  {}", r.name),
            r.matches.clone(),
            r.pool.clone(),
            r.auth.clone(),
            r.limit.clone().unwrap_or_else(|| "none".to_owned()),
        ]);
    }
    let _ = write!(out, "{t}");
    let mut t = Table::new(&[
        "  POOL",
        "SERVER",
        "WEIGHT",
        "HEALTH",
        "EJECTED",
        "IN FLIGHT",
        "REQUESTS",
        "5XX",
        "CONNECT FAIL",
        "TIMEOUTS",
    ]);
    for p in &g.pools {
        if p.servers.is_empty() {
            t.row(vec![
                format!("  {}", p.name),
                "(no servers)".to_owned(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
            ]);
        }
        for srv in &p.servers {
            t.row(vec![
                format!("  {}", p.name),
                std::net::SocketAddr::new(srv.address, srv.port).to_string(),
                srv.weight.to_string(),
                if srv.healthy { "up" } else { "down" }.to_owned(),
                if srv.ejected {
                    format!("{:.0} s left", srv.ejection_seconds_left.ceil())
                } else {
                    "no".to_owned()
                },
                srv.in_flight.to_string(),
                srv.requests_total.to_string(),
                srv.responses_5xx_total.to_string(),
                srv.connect_failures_total.to_string(),
                srv.timeouts_total.to_string(),
            ]);
        }
    }
    let _ = write!(out, "{t}");
    out
}

/// The regions part of one VIP in `xlb status`.
fn regions_text(vip: &str, r: &admin::RegionStatus) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n{vip} regions ({}): active {}{} for {:.1} s: {}",
        r.mode,
        r.active,
        if r.last_resort { " (LAST RESORT)" } else { "" },
        r.since_secs,
        r.reason
    );
    let mut t = Table::new(&[
        "  REGION",
        "TUNNEL",
        "HEALTHY",
        "LOAD",
        "PROBE",
        "NEW FLOWS",
    ]);
    for l in &r.levels {
        t.row(vec![
            format!("  {}", l.name),
            l.tunnel.map_or("(this host)".to_owned(), |a| a.to_string()),
            format!("{:.0}%", l.healthy_share * 100.0),
            format!("{:.1}%", l.load * 100.0),
            l.detail.clone(),
            l.new_flows.to_string(),
        ]);
    }
    let _ = write!(out, "{t}");
    out
}

/// `xlb stats`.
pub fn stats(socket: &Path, args: StatsArgs) -> ExitCode {
    finish((|| {
        let fetch = || -> Result<admin::Stats, Failure> {
            let response = ask(socket, &Request::Stats)?;
            result(&response)
        };
        let Some(secs) = args.watch else {
            let stats = fetch()?;
            if args.json {
                let map: BTreeMap<&str, u64> = stats
                    .counters
                    .iter()
                    .map(|c| (c.name.as_str(), c.value))
                    .collect();
                print_json(&map);
            } else {
                let mut t = Table::new(&["COUNTER", "VALUE"]);
                for c in stats.counters.iter().filter(|c| c.value != 0) {
                    t.row(vec![c.name.clone(), c.value.to_string()]);
                }
                if t.rows.is_empty() {
                    println!("every counter is zero");
                } else {
                    print!("{t}");
                }
            }
            return Ok(());
        };
        let period = Duration::from_secs(secs.max(1));
        let mut before = fetch()?;
        let mut at = Instant::now();
        loop {
            std::thread::sleep(period);
            let now = fetch()?;
            let elapsed = at.elapsed().as_secs_f64();
            at = Instant::now();
            let rates: Vec<(String, f64)> = now
                .counters
                .iter()
                .zip(&before.counters)
                .filter(|(n, b)| n.value > b.value)
                .map(|(n, b)| (n.name.clone(), (n.value - b.value) as f64 / elapsed))
                .collect();
            if args.json {
                let map: BTreeMap<&str, f64> =
                    rates.iter().map(|(n, r)| (n.as_str(), *r)).collect();
                println!(
                    "{}",
                    serde_json::json!({ "interval_secs": elapsed, "per_sec": map })
                );
            } else {
                println!("-- per second over {elapsed:.1} s --");
                let mut t = Table::new(&["COUNTER", "PER SEC"]);
                for (name, r) in &rates {
                    t.row(vec![name.clone(), rate(*r)]);
                }
                if rates.is_empty() {
                    println!("(nothing moved)");
                } else {
                    print!("{t}");
                }
            }
            before = now;
        }
    })())
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.to_owned()
}

/// A rate with one decimal below 1000, else with a k/M/G suffix.
fn rate(x: f64) -> String {
    match x {
        x if x < 1e3 => format!("{x:.1}"),
        x if x < 1e6 => format!("{:.1}k", x / 1e3),
        x if x < 1e9 => format!("{:.1}M", x / 1e6),
        x => format!("{:.1}G", x / 1e9),
    }
}

/// `3d 4h`, `2h 5m`, `4m 2s`, `12s`.
fn duration(secs: f64) -> String {
    let s = secs as u64;
    let (d, h, m, s) = (s / 86400, s / 3600 % 24, s / 60 % 60, s % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}

/// A table with columns aligned to their widest cell; numbers right-aligned.
struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(headers: &[&str]) -> Self {
        Table {
            headers: headers.iter().map(|h| (*h).to_owned()).collect(),
            rows: Vec::new(),
        }
    }

    fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }
}

impl std::fmt::Display for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let columns = self.headers.len();
        let widths: Vec<usize> = (0..columns)
            .map(|c| {
                std::iter::once(&self.headers[c])
                    .chain(self.rows.iter().map(|r| &r[c]))
                    .map(|s| s.chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let numeric: Vec<bool> = (0..columns)
            .map(|c| {
                !self.rows.is_empty()
                    && self.rows.iter().all(|r| {
                        r[c].trim()
                            .trim_end_matches(['k', 'M', 'G'])
                            .parse::<f64>()
                            .is_ok()
                    })
            })
            .collect();
        for line in std::iter::once(&self.headers).chain(&self.rows) {
            let mut text = String::new();
            for (c, cell) in line.iter().enumerate() {
                if c > 0 {
                    text.push_str("  ");
                }
                if numeric[c] {
                    let _ = write!(text, "{cell:>w$}", w = widths[c]);
                } else {
                    let _ = write!(text, "{cell:<w$}", w = widths[c]);
                }
            }
            writeln!(f, "{}", text.trim_end())?;
        }
        Ok(())
    }
}

/// The name clap knows a value by (`dsr-ipip`), which is also the file's and the API's.
trait ValueName {
    fn to_possible_value_name(&self) -> String;
}

impl<T: ValueEnum> ValueName for T {
    fn to_possible_value_name(&self) -> String {
        self.to_possible_value()
            .map(|v| v.get_name().to_owned())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_threshold_that_json_cannot_carry_is_a_usage_error() {
        assert_eq!(share_arg("0.25"), Ok(0.25));
        for bad in ["NaN", "inf", "-inf", "1.5", "-0.1"] {
            assert!(share_arg(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn tables_align_and_right_align_numbers() {
        let mut t = Table::new(&["NAME", "PKT/S"]);
        t.row(vec!["web".into(), "1.5k".into()]);
        t.row(vec!["a-longer-name".into(), "12.0".into()]);
        assert_eq!(
            t.to_string(),
            "NAME           PKT/S\nweb             1.5k\na-longer-name   12.0\n"
        );
    }

    #[test]
    fn values_are_named_as_the_file_names_them() {
        assert_eq!(ModeArg::DsrIpip.to_possible_value_name(), "dsr-ipip");
        assert_eq!(ProtocolArg::Udp.to_possible_value_name(), "udp");
        assert_eq!(rate(1234.0), "1.2k");
        assert_eq!(duration(3725.0), "1h 2m");
    }
}
