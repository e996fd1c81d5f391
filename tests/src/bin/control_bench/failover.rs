//! Failover time with the real agent: from a backend's listener closing to the maps no longer
//! selecting it (its entry's up flag cleared and its VIP's new Maglev table published), read
//! from the maps the agent pins, over repeated trials.
//!
//! Topology: two namespaces joined by one veth, `lb` (10.99.9.1, the agent) and `backends`
//! (10.99.9.2 and 10.99.9.3, one TCP listener on port 8080 each). Only health checks cross the
//! link; no VIP traffic is sent.

use std::{
    ffi::CString,
    io::{BufRead as _, BufReader},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener},
    os::{
        fd::{FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
    process::{Child, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use aya::maps::{Array, HashMap, Map, MapData};
use lb_common::{
    maps as names,
    types::{BACKEND_F_UP, Backend, FAMILY_V4, VipKey, VipMeta, proto},
};
use lb_userspace::{desired, pins::PinDir};
use xlb_tests::netns::{AgentDirs, Netns, in_netns, sweep_stale, veth_pair};

/// Trials per run: enough for a stable median; the 99th percentile of 20 is their maximum.
pub const TRIALS: usize = 20;
/// The health check under test; [`Settings::bound`] follows from it.
pub const SETTINGS: Settings = Settings {
    interval: Duration::from_millis(200),
    timeout: Duration::from_millis(100),
    fall: 2,
    rise: 1,
};
/// Longest wait for any one state (up, down, the agent attached): far above the expected
/// hundreds of milliseconds, so only a broken agent or topology hits it.
const WAIT: Duration = Duration::from_secs(10);
/// How often the maps are read while waiting.
const POLL: Duration = Duration::from_millis(1);

const VIP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const CHECK_PORT: u16 = 8080;
/// The backend that fails in every trial, and the one that stays up.
const FAILING: Ipv4Addr = Ipv4Addr::new(10, 99, 9, 2);
const STEADY: Ipv4Addr = Ipv4Addr::new(10, 99, 9, 3);

/// The health-check settings of the bench's VIP.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Time between checks.
    pub interval: Duration,
    /// Time one check may take.
    pub timeout: Duration,
    /// Failed checks in a row that take a backend down.
    pub fall: u32,
    /// Passed checks in a row that bring it back.
    pub rise: u32,
}

impl Settings {
    /// The worst case by design: up to one interval until the first failing check, then
    /// `fall - 1` more intervals, the last check taking at most the timeout (a refused connect
    /// takes far less), with the reconcile after it taking milliseconds. `fall x interval + one
    /// interval` covers that with the timeout and reconcile inside the spare interval.
    pub fn bound(&self) -> Duration {
        self.interval * (self.fall + 1)
    }
}

/// The measured failover times, sorted.
#[derive(Debug, Clone)]
pub struct Failover {
    /// Until the maps stop selecting the backend (flag cleared and table published): one per
    /// trial, ascending.
    pub sorted: Vec<Duration>,
    /// Until its up flag alone was cleared, one per trial, ascending: the rest of
    /// [`Failover::sorted`] is the agent building and writing the VIP's new table.
    pub flag_cleared: Vec<Duration>,
}

impl Failover {
    /// Nearest-rank percentile: the smallest sample with at least `p` percent of the samples
    /// at or below it (so p99 of 20 samples is the largest).
    pub fn percentile(&self, p: f64) -> Duration {
        nearest_rank(&self.sorted, p)
    }

    /// [`Failover::percentile`] of the time until the up flag alone was cleared.
    pub fn flag_cleared_percentile(&self, p: f64) -> Duration {
        nearest_rank(&self.flag_cleared, p)
    }

    /// The fastest trial.
    pub fn min(&self) -> Duration {
        self.sorted[0]
    }

    /// The slowest trial.
    pub fn max(&self) -> Duration {
        self.sorted[self.sorted.len() - 1]
    }
}

fn nearest_rank(sorted: &[Duration], p: f64) -> Duration {
    let n = sorted.len();
    let rank = ((p / 100.0) * n as f64).ceil() as usize;
    sorted[rank.clamp(1, n) - 1]
}

/// A TCP listener in a namespace, accepting (and dropping) connections on a thread until it is
/// closed, so health checks never fill its accept queue. Closed on drop too.
struct Listener {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Instant>>,
}

impl Listener {
    fn open(ns: &Netns, addr: SocketAddr) -> anyhow::Result<Listener> {
        // The socket belongs to the namespace it was created in, whichever thread uses it.
        let listener = in_netns(ns, move || TcpListener::bind(addr))
            .with_context(|| format!("listening on {addr} in {}", ns.name()))?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => drop(conn),
                    Err(_) => std::thread::sleep(Duration::from_micros(200)),
                }
            }
            drop(listener);
            // The moment the port started refusing connections.
            Instant::now()
        });
        Ok(Listener {
            stop,
            thread: Some(thread),
        })
    }

    /// Closes the listener and returns when it was closed.
    fn close(mut self) -> Instant {
        self.stop.store(true, Ordering::Relaxed);
        let thread = self.thread.take().expect("joined only here or in drop");
        thread.join().unwrap_or_else(|_| Instant::now())
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The agent process, its stderr kept (last lines) for error messages; killed on drop.
struct Agent {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Agent {
    fn start(ns: &Netns, xlb: &Path, config: &Path) -> anyhow::Result<Agent> {
        let mut child = ns
            .command(xlb.to_str().context("xlb path is not UTF-8")?)
            .args(["agent", "--detach-on-exit", "--config"])
            .arg(config)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting the agent")?;
        let stderr = child.stderr.take().context("agent stderr")?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        // Drained all the time: a full pipe would block the agent's logging, and with it the
        // agent.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut lines = sink.lock().unwrap_or_else(|e| e.into_inner());
                if lines.len() >= 200 {
                    lines.remove(0);
                }
                lines.push(line);
            }
        });
        Ok(Agent { child, lines })
    }

    fn saw(&self, needle: &str) -> bool {
        self.log().iter().any(|l| l.contains(needle))
    }

    fn log(&self) -> Vec<String> {
        self.lines.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The agent's last lines, for an error's context.
    fn tail(&self) -> String {
        let log = self.log();
        log[log.len().saturating_sub(20)..].join("\n")
    }

    fn wait_for(&mut self, needle: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + WAIT;
        while !self.saw(needle) {
            if let Some(status) = self.child.try_wait()? {
                bail!("the agent exited ({status}); it printed:\n{}", self.tail());
            }
            ensure!(
                Instant::now() < deadline,
                "the agent did not print {needle:?} within {WAIT:?}; it printed:\n{}",
                self.tail()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// SIGTERM, so it detaches and unpins (`--detach-on-exit`); killed if it lingers.
    fn stop(mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A file removed on drop.
struct TempFile(std::path::PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Opens a pinned map read-only (`BPF_F_RDONLY`): the bench watches the agent's maps and must
/// not be able to change them. aya's `MapData::from_pin` opens read-write.
fn open_read_only(path: &Path) -> anyhow::Result<MapData> {
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_F_RDONLY: u64 = 1 << 3;
    let c = CString::new(path.as_os_str().as_bytes())?;
    // union bpf_attr for BPF_OBJ_GET: pathname (u64), bpf_fd (u32), file_flags (u32).
    let mut attr = [0u64; 8];
    attr[0] = c.as_ptr() as u64;
    attr[1] = BPF_F_RDONLY << 32;
    // SAFETY: the attr buffer outlives the call and is larger than what the kernel reads.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr) as u32,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("opening the pinned map {}", path.display()));
    }
    // SAFETY: a descriptor the kernel just returned to us, owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    MapData::from_fd(fd).with_context(|| format!("reading map info of {}", path.display()))
}

/// The two maps that decide selection, as the agent pinned them.
struct Watch {
    vips: HashMap<MapData, VipKey, VipMeta>,
    backends: Array<MapData, Backend>,
    vip: VipKey,
    failing_id: u32,
    steady_id: u32,
}

/// What the data path would do with the backends right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    /// The failing backend's up flag.
    up: bool,
    /// The other backend's up flag (it must stay up throughout).
    steady_up: bool,
    /// The VIP's table digest: a new value means a new table was published.
    digest: u64,
}

impl Watch {
    fn open(pins: &PinDir) -> anyhow::Result<Watch> {
        let vips: HashMap<MapData, VipKey, VipMeta> =
            HashMap::try_from(Map::HashMap(open_read_only(&pins.map_path(names::VIPS))?))?;
        let backends: Array<MapData, Backend> =
            Array::try_from(Map::Array(open_read_only(&pins.map_path(names::BACKENDS))?))?;
        let vip = desired::vip_key(IpAddr::V4(VIP), 80, proto::TCP);
        let meta = vips
            .get(&vip, 0)
            .context("the bench VIP is not in XLB_VIPS")?;
        // A backend's id: the entry owned by the VIP with its address. Ids stay put while the
        // backend is in the configuration; health only flips its flag.
        let id_of = |address: Ipv4Addr| {
            (0..backends.len())
                .find(|&id| {
                    backends.get(&id, 0).is_ok_and(|b| {
                        b.owner == meta.vip_id
                            && b.family == FAMILY_V4
                            && b.addr[..4] == address.octets()
                    })
                })
                .with_context(|| format!("backend {address} is not in XLB_BACKENDS"))
        };
        let failing_id = id_of(FAILING)?;
        let steady_id = id_of(STEADY)?;
        Ok(Watch {
            vips,
            backends,
            vip,
            failing_id,
            steady_id,
        })
    }

    /// The up flag of backend `id`, after checking it still holds `address`.
    fn backend_up(&self, id: u32, address: Ipv4Addr) -> anyhow::Result<bool> {
        let entry = self.backends.get(&id, 0)?;
        ensure!(
            entry.family == FAMILY_V4 && entry.addr[..4] == address.octets(),
            "backend id {id} no longer holds {address}"
        );
        Ok(entry.flags & BACKEND_F_UP != 0)
    }

    fn read(&self) -> anyhow::Result<Seen> {
        Ok(Seen {
            up: self.backend_up(self.failing_id, FAILING)?,
            steady_up: self.backend_up(self.steady_id, STEADY)?,
            digest: self.vips.get(&self.vip, 0)?.table_digest,
        })
    }

    /// Polls until `done` (given each reading and its time) holds, at most [`WAIT`]; returns
    /// when it first held.
    fn until(
        &self,
        what: &str,
        mut done: impl FnMut(Instant, Seen) -> bool,
    ) -> anyhow::Result<(Instant, Seen)> {
        let deadline = Instant::now() + WAIT;
        loop {
            let seen = self.read()?;
            let now = Instant::now();
            if done(now, seen) {
                return Ok((now, seen));
            }
            ensure!(
                seen.steady_up,
                "{what}: the backend that stays up ({STEADY}) went down"
            );
            ensure!(
                now < deadline,
                "{what}: not within {WAIT:?} (last seen {seen:?})"
            );
            std::thread::sleep(POLL);
        }
    }
}

fn config(dirs: &AgentDirs, s: &Settings) -> String {
    format!(
        r#"[agent]
interface = "eth0"
xdp_mode = "native"
next_hop_mac = "02:00:00:00:00:01"
encap_source_v4 = "10.99.9.1/32"
flow_table_entries = 65536
{keys}
[[vip]]
name = "bench"
address = "{VIP}"
port = 80
protocol = "tcp"

[vip.health_check]
type = "tcp"
port = {CHECK_PORT}
interval_ms = {interval}
timeout_ms = {timeout}
fall = {fall}
rise = {rise}

[[vip.backend]]
address = "{FAILING}"

[[vip.backend]]
address = "{STEADY}"
"#,
        keys = dirs.agent_keys(),
        interval = s.interval.as_millis(),
        timeout = s.timeout.as_millis(),
        fall = s.fall,
        rise = s.rise,
    )
}

/// Runs the agent in namespaces of its own and measures [`TRIALS`] failovers of one backend.
pub fn measure(xlb: &Path) -> anyhow::Result<Failover> {
    sweep_stale();
    // Declared first, dropped last: the agent and listeners go before the directories and the
    // namespaces they live in.
    let dirs = AgentDirs::create("failover");
    let lb = Netns::create("fo-lb");
    let hosts = Netns::create("fo-backends");
    veth_pair(&lb, "eth0", &hosts, "eth0");
    lb.run(&["ip", "addr", "add", "10.99.9.1/24", "dev", "eth0"]);
    for b in [FAILING, STEADY] {
        hosts.run(&["ip", "addr", "add", &format!("{b}/24"), "dev", "eth0"]);
    }
    let path = std::env::temp_dir().join(format!(
        "{}{}-failover.toml",
        xlb_tests::netns::PREFIX,
        std::process::id()
    ));
    std::fs::write(&path, config(&dirs, &SETTINGS)).context("writing the agent's config")?;
    let config_file = TempFile(path);

    let failing_addr = SocketAddr::from((FAILING, CHECK_PORT));
    let mut failing = Some(Listener::open(&hosts, failing_addr)?);
    let _steady = Listener::open(&hosts, SocketAddr::from((STEADY, CHECK_PORT)))?;
    let mut agent = Agent::start(&lb, xlb, &config_file.0)?;
    agent.wait_for("xlb_balancer attached")?;
    let watch = Watch::open(&PinDir::new(&dirs.bpffs))?;

    let mut samples = Vec::with_capacity(TRIALS);
    let mut flag_cleared = Vec::with_capacity(TRIALS);
    for trial in 0..TRIALS {
        let context = || {
            format!(
                "trial {} of {TRIALS}; the agent's last lines:\n{}",
                trial + 1,
                agent.tail()
            )
        };
        watch
            .until("both backends up before the trial", |_, s| {
                s.up && s.steady_up
            })
            .with_context(context)?;
        // Start each trial at a different point of the check cycle (a low-discrepancy spread
        // over one interval): right after the backend came back a check has just run, and
        // every trial would otherwise fail at the same phase.
        let phase = (trial as f64 * 0.618_034).fract();
        std::thread::sleep(SETTINGS.interval.mul_f64(phase));
        let before = watch.read()?;
        ensure!(
            before.up && before.steady_up,
            "{}: a backend went down by itself",
            context()
        );
        let t0 = failing.take().expect("reopened every trial").close();
        let mut flag_at = None;
        let (gone, down) = watch
            .until("the maps stop selecting the failed backend", |at, s| {
                if !s.up {
                    flag_at.get_or_insert(at);
                }
                !s.up && s.digest != before.digest
            })
            .with_context(context)?;
        samples.push(gone.saturating_duration_since(t0));
        flag_cleared.push(flag_at.unwrap_or(gone).saturating_duration_since(t0));
        failing = Some(Listener::open(&hosts, failing_addr).with_context(context)?);
        watch
            .until("the maps select the backend again", |_, s| {
                s.up && s.digest != down.digest
            })
            .with_context(context)?;
    }
    ensure!(
        agent.saw("backend down") && agent.saw("backend up"),
        "the agent never logged the transitions the maps showed:\n{}",
        agent.tail()
    );
    agent.stop();
    samples.sort();
    flag_cleared.sort();
    Ok(Failover {
        sorted: samples,
        flag_cleared,
    })
}
