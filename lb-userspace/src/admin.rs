//! The admin API: one JSON request per connection on a unix stream socket, newline-terminated,
//! answered by one JSON response (`{"ok":true,"result":...}` or `{"ok":false,"error":"..."}`).
//!
//! The server only does I/O: it checks the peer, reads and parses the request, and hands it
//! with a reply channel to the agent's main loop, which owns all state (one writer of the
//! maps), as the metrics endpoint does. [`call`] is the client the CLI uses.

use std::{
    io::{BufRead as _, BufReader, ErrorKind as IoKind, Write as _},
    net::IpAddr,
    os::unix::{
        fs::{DirBuilderExt as _, FileTypeExt as _, MetadataExt as _, PermissionsExt as _},
        net::UnixStream as StdUnixStream,
    },
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};

use crate::{
    config::{self, rules},
    runtime::{BackendRef, BackendSpec, Change, Origin, VipSpec},
};

/// Largest request accepted, in bytes (a request is a few hundred bytes; this bounds what a
/// confused client can make the agent buffer).
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// How long a client may take to send its request, and to take its response.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; more wait in the socket's backlog.
pub const MAX_CONNECTIONS: usize = 64;
/// Pause after a failed accept before the next one.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

// ---------------------------------------------------------------------------------------------
// The protocol
// ---------------------------------------------------------------------------------------------

/// A request, tagged by `command` (e.g. `{"command":"backend-drain","vip":"web",
/// "address":"10.0.0.3"}`). Strings for protocol, mode and MAC are parsed by the agent with
/// the configuration file's own parsers, so the messages are the file's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Add a VIP.
    VipAdd {
        /// Unique name.
        name: String,
        /// The virtual IP.
        address: IpAddr,
        /// Port, 0..=65535 (0: every port).
        port: u32,
        /// `tcp` or `udp`.
        protocol: String,
        /// `dsr-ipip` (default), `dsr-l2` or `l7`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mode: Option<String>,
        /// Maglev table size, a prime (default 65537).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        table_size: Option<u32>,
        /// Healthy share below which every weighted backend takes traffic (default 0.5).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        panic_threshold: Option<f64>,
    },
    /// Remove a VIP (a file VIP is hidden until re-added).
    VipRemove {
        /// The VIP's name.
        name: String,
    },
    /// List the VIPs.
    VipList,
    /// Add a backend to a VIP.
    BackendAdd {
        /// The VIP's name.
        vip: String,
        /// The backend's address.
        address: IpAddr,
        /// Weight, 0..=65535 (default 100).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        weight: Option<u32>,
        /// Region (default `local`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        region: Option<String>,
        /// MAC, dsr-l2 VIPs only.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mac: Option<String>,
        /// The server's port, `l7` VIPs only (default: the VIP's port).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        port: Option<u32>,
        /// The upstream pool, `l7` VIPs only (default `default`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pool: Option<String>,
    },
    /// Remove a backend.
    BackendRemove {
        /// The VIP's name.
        vip: String,
        /// The backend's address.
        address: IpAddr,
        /// The server's port, `l7` VIPs only: needed when several of the VIP's servers share
        /// the address.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        port: Option<u32>,
    },
    /// Drain a backend: weight 0, established flows stay.
    BackendDrain {
        /// The VIP's name.
        vip: String,
        /// The backend's address.
        address: IpAddr,
        /// The server's port, `l7` VIPs only: needed when several of the VIP's servers share
        /// the address.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        port: Option<u32>,
    },
    /// Undrain a backend: back to its weight.
    BackendUndrain {
        /// The VIP's name.
        vip: String,
        /// The backend's address.
        address: IpAddr,
        /// The server's port, `l7` VIPs only: needed when several of the VIP's servers share
        /// the address.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        port: Option<u32>,
    },
    /// Set a backend's weight.
    BackendSetWeight {
        /// The VIP's name.
        vip: String,
        /// The backend's address.
        address: IpAddr,
        /// The server's port, `l7` VIPs only: needed when several of the VIP's servers share
        /// the address.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        port: Option<u32>,
        /// 0..=65535.
        weight: u32,
    },
    /// List a VIP's backends.
    BackendList {
        /// The VIP's name.
        vip: String,
    },
    /// Re-read the configuration file (as SIGHUP does).
    Reload,
    /// The agent, every VIP and backend, with rates and health.
    Status,
    /// The data path's counters.
    Stats,
}

fn in_range(what: &str, value: u32, range: std::ops::RangeInclusive<u32>) -> Result<(), String> {
    match rules::in_range(i128::from(value), range) {
        Some(v) => Err(format!("{what}: {}", v.message)),
        None => Ok(()),
    }
}

/// A value parsed by one of the file's parsers, its violation prefixed with the field.
fn field<T>(what: &str, parsed: Result<T, rules::Violation>) -> Result<T, String> {
    parsed.map_err(|v| format!("{what}: {}", v.message))
}

impl Request {
    /// The run-time change this request asks for, with its values checked as the file checks
    /// them; `Ok(None)` for requests that change nothing (lists, status, stats) and reload.
    ///
    /// # Errors
    ///
    /// The reason, in the file's words (e.g. `port: 70000 is out of range; expected
    /// 0..=65535`).
    pub fn change(&self) -> Result<Option<Change>, String> {
        let port = |port: &Option<u32>| -> Result<Option<u16>, String> {
            port.map(|p| {
                in_range("port", p, 1..=65535)?;
                Ok(p as u16)
            })
            .transpose()
        };
        let backend =
            |vip: &str, address: &IpAddr, p: &Option<u32>| -> Result<BackendRef, String> {
                Ok(BackendRef {
                    vip: vip.to_owned(),
                    address: *address,
                    port: port(p)?,
                })
            };
        let change = match self {
            Request::VipAdd {
                name,
                address,
                port,
                protocol,
                mode,
                table_size,
                panic_threshold,
            } => {
                in_range("port", *port, rules::PORT_RANGE)?;
                let table_size = table_size.unwrap_or(config::DEFAULT_TABLE_SIZE);
                in_range("table_size", table_size, rules::TABLE_SIZE_RANGE)?;
                Change::AddVip(VipSpec {
                    name: field("name", rules::name(name))?,
                    address: *address,
                    port: *port as u16,
                    protocol: field("protocol", rules::protocol(protocol))?,
                    mode: match mode {
                        Some(m) => field("mode", rules::mode(m))?,
                        None => config::VipMode::default(),
                    },
                    table_size,
                    panic_threshold: panic_threshold.unwrap_or(config::DEFAULT_PANIC_THRESHOLD),
                })
            }
            Request::VipRemove { name } => Change::RemoveVip(name.clone()),
            Request::BackendAdd {
                vip,
                address,
                weight,
                region,
                mac,
                port: server_port,
                pool,
            } => {
                let weight = weight.unwrap_or(u32::from(config::DEFAULT_WEIGHT));
                in_range("weight", weight, rules::WEIGHT_RANGE)?;
                let region = match region {
                    Some(r) => field("region", rules::name(r))?,
                    None => config::DEFAULT_REGION.to_owned(),
                };
                let mac = match mac {
                    Some(m) => Some(field("mac", rules::mac(m))?),
                    None => None,
                };
                Change::AddBackend(BackendSpec {
                    vip: vip.clone(),
                    address: *address,
                    weight: weight as u16,
                    region,
                    mac,
                    port: port(server_port)?,
                    pool: match pool {
                        Some(p) => Some(field("pool", rules::name(p))?),
                        None => None,
                    },
                })
            }
            Request::BackendRemove { vip, address, port } => {
                Change::RemoveBackend(backend(vip, address, port)?)
            }
            Request::BackendDrain { vip, address, port } => {
                Change::Drain(backend(vip, address, port)?)
            }
            Request::BackendUndrain { vip, address, port } => {
                Change::Undrain(backend(vip, address, port)?)
            }
            Request::BackendSetWeight {
                vip,
                address,
                port,
                weight,
            } => {
                in_range("weight", *weight, rules::WEIGHT_RANGE)?;
                Change::SetWeight(backend(vip, address, port)?, *weight as u16)
            }
            Request::VipList
            | Request::BackendList { .. }
            | Request::Reload
            | Request::Status
            | Request::Stats => return Ok(None),
        };
        Ok(Some(change))
    }
}

/// Why a request failed, so the CLI can choose its exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorKind {
    /// The request was understood and refused (unknown VIP, a rule it would break, ...).
    Refused,
    /// A reload found the configuration file invalid.
    InvalidConfig,
    /// The request could not be read or parsed.
    BadRequest,
    /// The client may not use the admin API.
    Denied,
    /// The agent failed to carry out a valid request (a map write, the state file, ...).
    Failed,
}

/// The answer to one request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// Whether the request succeeded.
    pub ok: bool,
    /// What it returned, when it succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    /// Why it failed, when it failed (one or more lines).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The kind of failure, when it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<ErrorKind>,
}

impl Response {
    /// A success carrying `result`.
    pub fn success(result: impl Serialize) -> Self {
        Response {
            ok: true,
            result: Some(serde_json::to_value(result).expect("results serialize")),
            error: None,
            kind: None,
        }
    }

    /// A failure.
    pub fn failure(kind: ErrorKind, error: impl Into<String>) -> Self {
        Response {
            ok: false,
            result: None,
            error: Some(error.into()),
            kind: Some(kind),
        }
    }

    /// The result as `T`.
    ///
    /// # Errors
    ///
    /// When the response is a failure or its result is not a `T`.
    pub fn result_as<T: for<'de> Deserialize<'de>>(&self) -> Result<T, ClientError> {
        let value = self
            .result
            .clone()
            .ok_or_else(|| ClientError::Protocol("the response has no result".into()))?;
        serde_json::from_value(value).map_err(|e| ClientError::Protocol(e.to_string()))
    }
}

/// The result of a change: what happened, in one line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeResult {
    /// E.g. `backend 10.0.0.3 of VIP "web" drained`.
    pub message: String,
    /// False when the change was already in force (nothing was written).
    pub changed: bool,
}

/// The result of a reload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadResult {
    /// One line.
    pub message: String,
    /// VIPs in force.
    pub vips: usize,
    /// Backends in force.
    pub backends: usize,
    /// Run-time changes that no longer applied to the new file and were dropped.
    pub dropped: Vec<String>,
}

/// One VIP, as `vip list` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VipInfo {
    /// Name.
    pub name: String,
    /// Address.
    pub address: IpAddr,
    /// Port (0: every port).
    pub port: u16,
    /// `tcp` or `udp`.
    pub protocol: String,
    /// `dsr-ipip`, `dsr-l2` or `l7`.
    pub mode: String,
    /// Maglev table size.
    pub table_size: u32,
    /// Panic threshold.
    pub panic_threshold: f64,
    /// Number of backends.
    pub backends: usize,
    /// The file, or a run-time change.
    pub origin: Origin,
}

/// Health of a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Health {
    /// Passing its checks.
    Up,
    /// Failing its checks (or a dsr-l2 backend without a MAC).
    Down,
    /// No health check (counts as up).
    Unchecked,
}

impl std::fmt::Display for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Health::Up => "up",
            Health::Down => "down",
            Health::Unchecked => "unchecked",
        })
    }
}

/// One backend, as `backend list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendInfo {
    /// Address.
    pub address: IpAddr,
    /// The upstream server's port (`l7` VIPs only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Weight in force (0 when drained).
    pub weight: u16,
    /// Weight when not drained.
    pub configured_weight: u16,
    /// Drained at run time.
    pub drained: bool,
    /// Region.
    pub region: String,
    /// MAC (dsr-l2).
    pub mac: Option<String>,
    /// Health.
    pub health: Health,
    /// The file, or a run-time change.
    pub origin: Origin,
}

/// The agent itself, in `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentInfo {
    /// The agent's version.
    pub version: String,
    /// The interface the balancer is attached to.
    pub interface: String,
    /// How it is attached (`native` or `generic`).
    pub attach_mode: String,
    /// Seconds since start.
    pub uptime_secs: f64,
    /// The configuration file.
    pub config_path: Option<PathBuf>,
    /// The run-time state file.
    pub state_path: Option<PathBuf>,
    /// Duration of the latest reconcile, in milliseconds.
    pub last_reconcile_ms: Option<f64>,
    /// Reconciles since start.
    pub reconciles: u64,
    /// Reloads refused since start.
    pub reloads_refused: u64,
    /// Seconds over which the rates are measured (between the two samples they come from).
    pub rate_window_secs: Option<f64>,
}

/// One backend in `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackendStatus {
    /// Address.
    pub address: IpAddr,
    /// Weight in force (0 when drained).
    pub weight: u16,
    /// Drained at run time.
    pub drained: bool,
    /// Region.
    pub region: String,
    /// Health.
    pub health: Health,
    /// Connection-table entries pinned to it.
    pub active_flows: u64,
    /// Packets per second forwarded to it.
    pub packets_per_sec: f64,
    /// Bytes per second forwarded to it.
    pub bytes_per_sec: f64,
    /// Flows assigned to it since start.
    pub new_flows: u64,
    /// The file, or a run-time change.
    pub origin: Origin,
}

/// One VIP in `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VipStatus {
    /// Name.
    pub name: String,
    /// Address.
    pub address: IpAddr,
    /// Port (0: every port).
    pub port: u16,
    /// `tcp` or `udp`.
    pub protocol: String,
    /// `dsr-ipip`, `dsr-l2` or `l7`.
    pub mode: String,
    /// Packets per second.
    pub packets_per_sec: f64,
    /// Bytes per second.
    pub bytes_per_sec: f64,
    /// New flows per second.
    pub new_flows_per_sec: f64,
    /// Flows assigned a backend since start.
    pub new_flows: u64,
    /// The file, or a run-time change.
    pub origin: Origin,
    /// Its backends.
    pub backends: Vec<BackendStatus>,
    /// Its regions, when it lists more than this host's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regions: Option<RegionStatus>,
    /// An l7 VIP's gateway: listener, routes, upstream pools and their servers' health.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<crate::gateway::server::GatewayStatus>,
}

/// A VIP's regions in `status`: where its new flows go, why, since when.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegionStatus {
    /// The highest-priority region that takes new flows now (the active region).
    pub active: String,
    /// Seconds since the split of new flows last changed.
    pub since_secs: f64,
    /// Why it is what it is (the reason of the last transition).
    pub reason: String,
    /// Every region is down: new flows go to this region's backends, all of them (last
    /// resort).
    pub last_resort: bool,
    /// `whole` or `proportional`.
    pub mode: String,
    /// Transitions since the agent started.
    pub transitions: u64,
    /// The regions in priority order.
    pub levels: Vec<RegionLevelStatus>,
}

/// One region of a VIP in `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegionLevelStatus {
    /// Region name.
    pub name: String,
    /// The tunnel address of its xlb host (`None`: this host's own region).
    pub tunnel: Option<IpAddr>,
    /// Healthy share of its backend weight now (a remote region's as its agent reports it; 0
    /// while its probes fail).
    pub healthy_share: f64,
    /// Share of new flows it takes.
    pub load: f64,
    /// Remote regions: whether its capacity probes pass (through the tunnel).
    pub reachable: bool,
    /// Remote regions: why the last probe failed or "ok".
    pub detail: String,
    /// Flows sent to it since start (remote regions; this region's are its backends').
    pub new_flows: u64,
}

/// The result of `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// The agent.
    pub agent: AgentInfo,
    /// Every VIP in force.
    pub vips: Vec<VipStatus>,
}

/// One data-path counter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterValue {
    /// Its stable name (the README's counter table).
    pub name: String,
    /// Its value, summed over CPUs.
    pub value: u64,
}

/// The result of `stats`: every counter, in slot order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// The counters.
    pub counters: Vec<CounterValue>,
}

// ---------------------------------------------------------------------------------------------
// The server
// ---------------------------------------------------------------------------------------------

/// Why the admin socket could not be set up.
#[derive(Debug, Error)]
pub enum AdminError {
    /// Something answers on the socket: another agent.
    #[error("another xlb agent is serving {}", .0.display())]
    AlreadyServing(PathBuf),
    /// The path exists and is not a socket: not ours to remove.
    #[error(
        "{} exists and is not a socket; remove it or set another agent.admin_socket",
        .0.display()
    )]
    NotASocket(PathBuf),
    /// A system call failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// A request waiting for the main loop's answer.
#[derive(Debug)]
pub struct Pending {
    /// The request.
    pub request: Request,
    /// Where the answer goes.
    pub reply: oneshot::Sender<Response>,
}

/// The socket file, removed when dropped if it is still the one this agent bound (a second
/// agent that replaced a stale one must not lose its socket to the first one's exit).
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    inode: u64,
}

impl SocketFile {
    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.ino() == self.inode) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// A bound admin socket: the listener (for [`serve`]) and the file guard (for the agent).
#[derive(Debug)]
pub struct Bound {
    /// Accepts connections.
    pub listener: UnixListener,
    /// Removes the socket file on drop.
    pub file: SocketFile,
}

/// Binds the admin socket at `path`: creates the parent directory (0755) if missing, refuses
/// when another agent answers there, replaces a stale socket, and makes the socket 0600 so
/// only root can connect. Needs a tokio runtime.
///
/// # Errors
///
/// [`AdminError::AlreadyServing`] when another agent answers, [`AdminError::NotASocket`] when
/// the path is something else, [`AdminError::Io`] when a system call fails.
pub fn bind(path: &Path) -> Result<Bound, AdminError> {
    let io = |what: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source| AdminError::Io { what, path, source }
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(io("creating the directory", dir))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => match StdUnixStream::connect(path) {
            Ok(_) => return Err(AdminError::AlreadyServing(path.to_owned())),
            // Nobody listens: a socket left by an agent that was killed.
            Err(_) => std::fs::remove_file(path).map_err(io("removing the stale socket", path))?,
        },
        Ok(_) => return Err(AdminError::NotASocket(path.to_owned())),
        Err(e) if e.kind() == IoKind::NotFound => {}
        Err(e) => return Err(io("inspecting", path)(e)),
    }
    let listener = std::os::unix::net::UnixListener::bind(path).map_err(io("binding", path))?;
    // Until the chmod the socket has the umask's mode; the peer check below covers that gap.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(io("setting the mode of", path))?;
    let inode = std::fs::symlink_metadata(path)
        .map_err(io("inspecting", path))?
        .ino();
    listener
        .set_nonblocking(true)
        .map_err(io("configuring", path))?;
    let listener = UnixListener::from_std(listener).map_err(io("registering", path))?;
    Ok(Bound {
        listener,
        file: SocketFile {
            path: path.to_owned(),
            inode,
        },
    })
}

/// Whether a peer may use the API: root, or the agent's own user (an agent run with
/// capabilities rather than as root).
pub fn root_or_self(uid: u32) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    uid == 0 || uid == unsafe { libc::geteuid() }
}

/// Serves the admin API on `listener` to root (see [`root_or_self`]), handing each request to
/// `requests`. Runs until the listener fails or the main loop is gone.
pub async fn serve(listener: UnixListener, requests: mpsc::Sender<Pending>) {
    serve_with(listener, requests, root_or_self).await;
}

/// As [`serve`], with `allowed` deciding which peer uids may use the API.
///
/// At most [`MAX_CONNECTIONS`] connections are served at once (the rest wait in the listen
/// backlog), so a flood of clients cannot take every descriptor the agent has. A failed accept
/// (the descriptor limit reached anyway, a client that vanished from the backlog) is logged
/// at most every 10 seconds and retried: the API must outlive a bad moment, or the agent
/// would be left running with no way to reach it (and its socket would look stale, inviting a
/// second agent).
pub async fn serve_with(
    listener: UnixListener,
    requests: mpsc::Sender<Pending>,
    allowed: fn(u32) -> bool,
) {
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut warned: Option<std::time::Instant> = None;
    let mut failures = 0u64;
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                if requests.is_closed() {
                    return;
                }
                failures += 1;
                if warned.is_none_or(|t| t.elapsed() >= crate::logging::REPEAT_WARNING_EVERY) {
                    tracing::warn!(
                        failures,
                        "admin API: accepting connections fails ({e}); retrying"
                    );
                    warned = Some(std::time::Instant::now());
                    failures = 0;
                }
                tokio::time::sleep(ACCEPT_RETRY).await;
                continue;
            }
        };
        if requests.is_closed() {
            return;
        }
        let requests = requests.clone();
        tokio::spawn(async move {
            connection(stream, requests, allowed).await;
            drop(slot);
        });
    }
}

/// One connection: peer check, one request, one response. Reading and writing are bounded in
/// size and time here, so a stuck or hostile client costs a task, never the main loop.
async fn connection(stream: UnixStream, requests: mpsc::Sender<Pending>, allowed: fn(u32) -> bool) {
    let cred = stream.peer_cred();
    let (read, mut write) = stream.into_split();
    let response = match cred {
        Ok(cred) if allowed(cred.uid()) => match read_request(read).await {
            Ok(request) => forward(request, &requests).await,
            Err(response) => response,
        },
        Ok(cred) => {
            tracing::warn!(uid = cred.uid(), pid = ?cred.pid(), "admin request refused: not root");
            Response::failure(
                ErrorKind::Denied,
                format!(
                    "permission denied: the admin API is for root, and this client runs as uid \
                     {}; try sudo",
                    cred.uid()
                ),
            )
        }
        Err(e) => Response::failure(
            ErrorKind::Denied,
            format!("cannot identify the client: {e}"),
        ),
    };
    let mut text = serde_json::to_string(&response).expect("responses serialize");
    text.push('\n');
    let _ = tokio::time::timeout(IO_TIMEOUT, write.write_all(text.as_bytes())).await;
}

async fn read_request(read: tokio::net::unix::OwnedReadHalf) -> Result<Request, Response> {
    let bad = |m: String| Response::failure(ErrorKind::BadRequest, m);
    let mut reader = tokio::io::BufReader::new(read.take(MAX_REQUEST_BYTES as u64 + 1));
    let mut line = Vec::new();
    match tokio::time::timeout(IO_TIMEOUT, reader.read_until(b'\n', &mut line)).await {
        Err(_) => {
            return Err(bad(format!(
                "no complete request within {} s; send one JSON object and a newline",
                IO_TIMEOUT.as_secs()
            )));
        }
        Ok(Err(e)) => return Err(bad(format!("reading the request: {e}"))),
        Ok(Ok(_)) => {}
    }
    if line.len() > MAX_REQUEST_BYTES {
        return Err(bad(format!(
            "the request is larger than {} KiB",
            MAX_REQUEST_BYTES / 1024
        )));
    }
    serde_json::from_slice(&line).map_err(|e| bad(format!("not a valid request: {e}")))
}

async fn forward(request: Request, requests: &mpsc::Sender<Pending>) -> Response {
    let (reply, answer) = oneshot::channel();
    let gone = || Response::failure(ErrorKind::Failed, "the agent is shutting down");
    if requests.send(Pending { request, reply }).await.is_err() {
        return gone();
    }
    answer.await.unwrap_or_else(|_| gone())
}

// ---------------------------------------------------------------------------------------------
// The client
// ---------------------------------------------------------------------------------------------

/// Why the CLI got no answer.
#[derive(Debug, Error)]
pub enum ClientError {
    /// No socket, or nobody listening on it.
    #[error(
        "xlb agent is not running (no admin socket at {}; an agent with another \
         agent.admin_socket is reached with --socket PATH or XLB_SOCKET)",
        .0.display()
    )]
    NotRunning(PathBuf),
    /// The socket refuses this user.
    #[error("permission denied on {}: the admin API is for root; try sudo", .0.display())]
    Denied(PathBuf),
    /// The agent did not answer in time.
    #[error("no answer from the agent at {} within {} s", path.display(), timeout.as_secs())]
    Timeout {
        /// The socket.
        path: PathBuf,
        /// How long we waited.
        timeout: Duration,
    },
    /// Another I/O error.
    #[error("talking to the agent at {}: {source}", path.display())]
    Io {
        /// The socket.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The answer is not a response.
    #[error("the agent's answer is not understood: {0}")]
    Protocol(String),
}

/// Sends one request to the agent at `socket` and waits up to `timeout` for the response.
///
/// # Errors
///
/// [`ClientError::NotRunning`] when there is no socket or nobody listens on it (a one-line
/// message for the CLI), and the other [`ClientError`]s.
pub fn call(socket: &Path, request: &Request, timeout: Duration) -> Result<Response, ClientError> {
    let io = |source: std::io::Error| {
        if matches!(source.kind(), IoKind::WouldBlock | IoKind::TimedOut) {
            ClientError::Timeout {
                path: socket.to_owned(),
                timeout,
            }
        } else {
            ClientError::Io {
                path: socket.to_owned(),
                source,
            }
        }
    };
    let mut stream = match StdUnixStream::connect(socket) {
        Ok(s) => s,
        Err(e) => {
            return Err(match e.kind() {
                IoKind::NotFound | IoKind::ConnectionRefused | IoKind::NotADirectory => {
                    ClientError::NotRunning(socket.to_owned())
                }
                IoKind::PermissionDenied => ClientError::Denied(socket.to_owned()),
                _ => io(e),
            });
        }
    };
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let mut text = serde_json::to_string(request).expect("requests serialize");
    text.push('\n');
    stream.write_all(text.as_bytes()).map_err(io)?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).map_err(io)?;
    if line.is_empty() {
        return Err(ClientError::Protocol(
            "the agent closed the connection without answering".into(),
        ));
    }
    serde_json::from_str(&line).map_err(|e| ClientError::Protocol(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("xlb-admin-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    /// A main loop that answers every request with its command echoed back.
    async fn echo_loop(mut rx: mpsc::Receiver<Pending>) {
        while let Some(p) = rx.recv().await {
            let _ = p.reply.send(Response::success(&p.request));
        }
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn a_request_round_trips_over_a_real_socket() {
        let dir = temp_dir("roundtrip");
        let path = dir.join("sub/admin.sock");
        let rt = runtime();
        let bound = rt.block_on(async { bind(&path) }).expect("bind");
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let dir_mode = std::fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(dir_mode & 0o777, 0o755);
        let (tx, rx) = mpsc::channel(4);
        rt.spawn(serve(bound.listener, tx));
        rt.spawn(echo_loop(rx));

        let request = Request::BackendAdd {
            vip: "web".into(),
            address: "10.0.0.3".parse().unwrap(),
            weight: Some(7),
            region: None,
            mac: None,
            port: None,
            pool: None,
        };
        let response = call(&path, &request, Duration::from_secs(5)).expect("call");
        assert!(response.ok, "{response:?}");
        assert_eq!(response.result_as::<Request>().unwrap(), request);

        // A second agent is refused while this one serves.
        let e = rt.block_on(async { bind(&path) }).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("another xlb agent is serving {}", path.display())
        );

        // The wire format is the documented one.
        let mut s = StdUnixStream::connect(&path).unwrap();
        s.write_all(b"{\"command\":\"backend-drain\",\"vip\":\"web\",\"address\":\"10.0.0.3\"}\n")
            .unwrap();
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["ok"], true, "{line}");
        assert_eq!(v["result"]["command"], "backend-drain", "{line}");
        assert!(line.ends_with("}\n"), "one line: {line:?}");

        // A malformed request gets a reason, not a hang.
        let mut s = StdUnixStream::connect(&path).unwrap();
        s.write_all(b"{\"command\":\"backend-dran\"}\n").unwrap();
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).unwrap();
        let r: Response = serde_json::from_str(&line).unwrap();
        assert_eq!(r.kind, Some(ErrorKind::BadRequest));
        assert!(r.error.unwrap().contains("unknown variant `backend-dran`"));

        // An oversized one is cut off at the limit.
        let mut s = StdUnixStream::connect(&path).unwrap();
        let _ = s.write_all(&vec![b' '; MAX_REQUEST_BYTES + 10]);
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).unwrap();
        assert!(line.contains("larger than 64 KiB"), "{line}");

        // Dropping the guard removes the socket; the client then says the agent is gone.
        drop(bound.file);
        assert!(!path.exists());
        let e = call(&path, &Request::Status, Duration::from_secs(1)).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "xlb agent is not running (no admin socket at {}; an agent with another \
                 agent.admin_socket is reached with --socket PATH or XLB_SOCKET)",
                path.display()
            )
        );
        drop(rt);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_stale_socket_is_replaced_and_a_silent_client_times_out() {
        let dir = temp_dir("stale");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("admin.sock");
        // A socket nobody listens on any more (its agent was killed).
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let e = call(&path, &Request::Status, Duration::from_secs(1)).unwrap_err();
        assert!(matches!(e, ClientError::NotRunning(_)), "{e}");
        let rt = runtime();
        let bound = rt
            .block_on(async { bind(&path) })
            .expect("stale socket replaced");
        let (tx, rx) = mpsc::channel(4);
        rt.spawn(serve(bound.listener, tx));
        rt.spawn(echo_loop(rx));
        // A client that connects and says nothing is answered and dropped after the timeout,
        // while others are served meanwhile.
        let silent = StdUnixStream::connect(&path).unwrap();
        let r = call(&path, &Request::Stats, Duration::from_secs(2)).unwrap();
        assert!(r.ok);
        let started = std::time::Instant::now();
        let mut line = String::new();
        BufReader::new(silent).read_line(&mut line).unwrap();
        assert!(line.contains("no complete request within 5 s"), "{line}");
        assert!(started.elapsed() < IO_TIMEOUT + Duration::from_secs(2));
        drop(rt);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn peers_other_than_allowed_uids_are_refused() {
        let dir = temp_dir("denied");
        let path = dir.join("admin.sock");
        let rt = runtime();
        let bound = rt.block_on(async { bind(&path) }).unwrap();
        let (tx, rx) = mpsc::channel(4);
        // Nobody is allowed: the test runs as some uid, which this policy refuses.
        rt.spawn(serve_with(bound.listener, tx, |_| false));
        rt.spawn(echo_loop(rx));
        let r = call(&path, &Request::Status, Duration::from_secs(5)).unwrap();
        assert!(!r.ok);
        assert_eq!(r.kind, Some(ErrorKind::Denied));
        assert!(
            r.error
                .unwrap()
                .starts_with("permission denied: the admin API is for root")
        );
        drop(rt);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn requests_become_changes_with_the_files_checks() {
        let add = Request::VipAdd {
            name: "api".into(),
            address: "192.0.2.20".parse().unwrap(),
            port: 443,
            protocol: "tcp".into(),
            mode: None,
            table_size: None,
            panic_threshold: None,
        };
        let Ok(Some(Change::AddVip(spec))) = add.change() else {
            panic!("{:?}", add.change());
        };
        assert_eq!(spec.table_size, 65537);
        assert_eq!(spec.mode, config::VipMode::DsrIpip);
        let with = |f: &dyn Fn(&mut Request)| {
            let mut r = add.clone();
            f(&mut r);
            r.change().unwrap_err()
        };
        let e = with(&|r| {
            if let Request::VipAdd { port, .. } = r {
                *port = 70000;
            }
        });
        assert_eq!(e, "port: 70000 is out of range; expected 0..=65535");
        let e = with(&|r| {
            if let Request::VipAdd { protocol, .. } = r {
                *protocol = "sctp".into();
            }
        });
        assert!(
            e.starts_with("protocol: \"sctp\" is not a valid protocol"),
            "{e}"
        );
        let weight = Request::BackendSetWeight {
            vip: "web".into(),
            address: "10.0.0.1".parse().unwrap(),
            port: None,
            weight: 65536,
        };
        assert_eq!(
            weight.change().unwrap_err(),
            "weight: 65536 is out of range; expected 0..=65535"
        );
        let mac = Request::BackendAdd {
            vip: "web".into(),
            address: "10.0.0.1".parse().unwrap(),
            weight: None,
            region: None,
            mac: Some("01:00:00:00:00:01".into()),
            port: None,
            pool: None,
        };
        let port = Request::BackendDrain {
            vip: "web".into(),
            address: "10.0.0.1".parse().unwrap(),
            port: Some(0),
        };
        assert_eq!(
            port.change().unwrap_err(),
            "port: 0 is out of range; expected 1..=65535"
        );
        assert!(
            mac.change()
                .unwrap_err()
                .starts_with("mac: \"01:00:00:00:00:01\" is a multicast")
        );
        assert_eq!(Request::Status.change(), Ok(None));
        // Unknown fields are refused rather than ignored (a typo must not pass silently).
        let typo =
            r#"{"command":"backend-set-weight","vip":"web","address":"10.0.0.1","wieght":5}"#;
        let e = serde_json::from_str::<Request>(typo)
            .unwrap_err()
            .to_string();
        assert!(e.contains("wieght"), "{e}");
    }
}
