//! `cargo xtask bench dataplane`: the per-packet cost of `xlb_balancer`, per packet class, next
//! to a trivial XDP program measured the same way in the same run.
//!
//! How a measurement runs (root only):
//! - A namespace the bench creates holds a veth pair `xb0`/`xb1`; `xb1` runs `xlb_bench_drop`, so
//!   frames sent out of `xb0` are really delivered (a veth transmits XDP frames only when its
//!   peer has an XDP program) and then dropped. The root namespace is never involved.
//! - `BPF_PROG_TEST_RUN` in live-frames mode (`BPF_F_TEST_XDP_LIVE_FRAMES`, batches of 64) with
//!   `xdp_md.ingress_ifindex` = `xb0`: every repetition gets its own page-pool frame and the
//!   verdict is acted on (XDP_TX goes out of `xb0`, XDP_PASS into the stack), as on a NIC. The
//!   kernel resolves that ifindex in the calling thread's namespace, so the measuring thread
//!   `setns`es into it first.
//! - Live mode recycles pages without rewriting their bytes, so every measured program is
//!   reached through `xlb_bench_restore`, which writes the input frame back and tail-calls it
//!   (see `lb-ebpf/src/bin/xlb_bench_tx.rs`). The baseline pays for the same entry point.
//! - The thread is pinned to one CPU: test runs execute on the calling CPU, so the connection
//!   table pre-fill and the measurement touch the same CPU's values.
//! - Before timing a class, one plain test run must return the expected verdict; after each
//!   timed run the balancer's counters (and the peer's) must show that every repetition took the
//!   intended path. Either failure aborts the bench.

use std::{
    ffi::CString,
    fs::File,
    os::fd::AsRawFd,
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use aya::{TestRun, TestRunAttrs, TestRunOptions, programs::Xdp};
use clap::Parser;
use lb_common::{
    counters::Counter,
    types::{
        BACKEND_F_REGION, BACKEND_F_UP, Backend, FAMILY_V4, FAMILY_V6, LbConfig, REGION_LOCAL,
        REGION_SCALE, VipKey, proto,
    },
};
use lb_userspace::{
    bench::{BenchPrograms, PROG_PASS, PROG_RESTORE, PROG_TX},
    counters::CounterSnapshot,
    loader::{Balancer, LoadOptions},
    maglev,
    maps::RegionSplit,
};
use serde_json::json;
use xlb_tests::{
    frames::{self, L3},
    netns::{self, Netns},
    world,
};

/// Measures the balancer's per-packet cost with live-frames `BPF_PROG_TEST_RUN`.
#[derive(Debug, Parser)]
#[command(name = "dataplane-bench")]
struct Args {
    /// Where to write the JSON results.
    #[arg(long, default_value = "target/xlb-bench/dataplane.json")]
    out: PathBuf,
    /// Repetitions per timed run (live frames, in batches of `--batch`).
    #[arg(long, default_value_t = 1_000_000)]
    repeat: u32,
    /// Live-frames batch size (the kernel allows 1..=256; 64 is a NAPI poll's worth).
    #[arg(long, default_value_t = 64)]
    batch: u32,
    /// Timed rounds per class and program; the median is reported.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Backend counts behind every VIP (comma separated).
    #[arg(long, value_delimiter = ',', default_value = "10,1000")]
    backends: Vec<u32>,
    /// Connection-table fills (comma separated, ascending: each fill adds to the previous one).
    #[arg(long, value_delimiter = ',', default_value = "1000,1000000")]
    flows: Vec<u32>,
}

/// The Maglev table size of every VIP (prime; Katran's default), the same for every backend
/// count so that only the number of backends changes between configurations.
const TABLE_SIZE: u32 = 65_537;
/// Connection-table capacity: room for the largest fill without LRU evictions.
const FLOW_ENTRIES: u32 = 1 << 21;
/// Egress MTU of the bench: small enough that the 1200-byte too-big frame does not fit once
/// encapsulated, far above every other class's frames.
const EGRESS_MTU: u16 = 1000;
/// The veth the frames "arrive" on, and its peer that drops what is sent out.
const IF_IN: &str = "xb0";
const IF_PEER: &str = "xb1";

const VIP_V4: [u8; 4] = frames::VIP_V4;
const VIP_V6: [u8; 16] = frames::VIP_V6;
/// An address no VIP uses.
const NOT_A_VIP: [u8; 4] = [203, 0, 113, 99];
/// A VIP failed over wholly to a remote region.
const VIP_REMOTE: [u8; 4] = [203, 0, 113, 20];
/// This balancer's region tunnel address (another region's xlb host sends flows here).
const TUNNEL: world::WorldBackend = world::WorldBackend {
    id: 0,
    addr: [192, 0, 2, 100, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    family: FAMILY_V4,
    mac: [0; 6],
};
/// The backend id standing for the remote region's xlb host.
const REMOTE_ID: u32 = 60_000;

/// `inner` as it arrives from another region's xlb host: in IPIP to [`TUNNEL`].
fn from_region(inner: &[u8]) -> Vec<u8> {
    let any = world::key_v4(VIP_V4, 1, 1, proto::TCP);
    let mut f = world::encapsulated(inner, 0, &any, &TUNNEL);
    f[..6].copy_from_slice(&frames::LB_MAC);
    f[6..12].copy_from_slice(&frames::ROUTER_MAC);
    f
}

/// Which trivial program a class is compared with: the one returning the same verdict, so both
/// sides pay for the same kernel work after the program (sending out of the veth, or building
/// an skb for the stack) and the difference is the balancer's own work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Tx,
    Pass,
}

impl Verdict {
    fn action(self) -> u32 {
        match self {
            Verdict::Tx => 3,   // XDP_TX
            Verdict::Pass => 2, // XDP_PASS
        }
    }

    fn counter(self) -> Counter {
        match self {
            Verdict::Tx => Counter::ActionTx,
            Verdict::Pass => Counter::ActionPass,
        }
    }

    fn baseline(self) -> &'static str {
        match self {
            Verdict::Tx => "xdp_tx",
            Verdict::Pass => "xdp_pass",
        }
    }

    fn baseline_program(self) -> &'static str {
        match self {
            Verdict::Tx => PROG_TX,
            Verdict::Pass => PROG_PASS,
        }
    }
}

/// One packet class: the frame repeated, what must happen to it, and how to prime the table.
struct Class {
    name: &'static str,
    frame: Vec<u8>,
    /// Sent once (plain test run) before the class is measured, so the flow is in the table.
    prime: Option<Vec<u8>>,
    verdict: Verdict,
    /// The counter that must grow by exactly one per repetition: proves the path taken.
    path: Counter,
    /// Rewrite the client's IPv4 source address on every repetition, so each one is a new
    /// flow (a connection-table insert, as for real new connections) rather than the same
    /// tuple again.
    new_flow_each_time: bool,
}

fn classes() -> Vec<Class> {
    let syn4 = |sport| frames::tcp4(VIP_V4, sport, 80, true, b"");
    let ack4 = |sport| frames::tcp4(VIP_V4, sport, 80, false, b"");
    let mut too_big = frames::tcp4(VIP_V4, 41_004, 80, false, &[0x5a; 1200 - 54]);
    // Don't-fragment, so the balancer must answer with ICMP rather than let it be fragmented.
    too_big[L3 + 6] |= 0x40;
    frames::fix_ipv4_checksum(&mut too_big);
    vec![
        Class {
            name: "new TCP flow (SYN)",
            frame: syn4(41_000),
            prime: None,
            verdict: Verdict::Tx,
            path: Counter::CtMiss,
            new_flow_each_time: true,
        },
        Class {
            name: "established TCP (ACK)",
            frame: ack4(41_001),
            prime: Some(syn4(41_001)),
            verdict: Verdict::Tx,
            path: Counter::CtHit,
            new_flow_each_time: false,
        },
        Class {
            name: "UDP",
            frame: frames::udp4(VIP_V4, 41_002, 53, b"bench payload"),
            prime: Some(frames::udp4(VIP_V4, 41_002, 53, b"bench payload")),
            verdict: Verdict::Tx,
            path: Counter::CtHit,
            new_flow_each_time: false,
        },
        Class {
            name: "IPv6 TCP (ACK)",
            frame: frames::tcp6(VIP_V6, 41_003, 80, false, b""),
            prime: Some(frames::tcp6(VIP_V6, 41_003, 80, true, b"")),
            verdict: Verdict::Tx,
            path: Counter::CtHit,
            new_flow_each_time: false,
        },
        Class {
            name: "ICMP too-big",
            frame: too_big,
            prime: Some(syn4(41_004)),
            verdict: Verdict::Tx,
            path: Counter::IcmpTooBigSent,
            new_flow_each_time: false,
        },
        Class {
            name: "from a region (IPIP ACK)",
            frame: from_region(&ack4(41_006)),
            prime: Some(from_region(&syn4(41_006))),
            verdict: Verdict::Tx,
            path: Counter::RegionDecap,
            new_flow_each_time: false,
        },
        Class {
            name: "new flow, remote region",
            frame: frames::tcp4(VIP_REMOTE, 41_007, 80, true, b""),
            prime: None,
            verdict: Verdict::Tx,
            path: Counter::RegionForwarded,
            new_flow_each_time: true,
        },
        Class {
            name: "non-VIP pass",
            frame: frames::tcp4(NOT_A_VIP, 41_005, 80, false, b""),
            prime: None,
            verdict: Verdict::Pass,
            path: Counter::PassNotVip,
            new_flow_each_time: false,
        },
    ]
}

/// One row of the results.
struct Row {
    class: &'static str,
    backends: u32,
    flows: u32,
    baseline: &'static str,
    xlb: Vec<f64>,
    base: Vec<f64>,
}

impl Row {
    fn xlb_ns(&self) -> f64 {
        median(&self.xlb)
    }
    fn base_ns(&self) -> f64 {
        median(&self.base)
    }
    fn ratio(&self) -> f64 {
        self.xlb_ns() / self.base_ns()
    }
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.rounds == 0 || args.repeat == 0 || args.flows.windows(2).any(|w| w[0] >= w[1]) {
        eprintln!("dataplane-bench: --rounds and --repeat must be positive, --flows ascending");
        return ExitCode::FAILURE;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("dataplane-bench: needs root (BPF programs and a network namespace)");
        return ExitCode::FAILURE;
    }
    let started = Instant::now();
    netns::sweep_stale();
    let ns = Netns::create("bench");
    // No IPv6 on the veths: link-up router solicitations and MLD reports would reach the peer's
    // drop program and spoil the exact count of forwarded frames checked after every run.
    for knob in ["all", "default"] {
        ns.run(&[
            "sysctl",
            "-qw",
            &format!("net.ipv6.conf.{knob}.disable_ipv6=1"),
        ]);
    }
    netns::veth_pair(&ns, IF_IN, &ns, IF_PEER);
    let ns_path = format!("/var/run/netns/{}", ns.name());

    // setns and CPU affinity are per thread: a dedicated thread takes both, the main thread
    // keeps the root namespace and drops the namespace guard whatever happens.
    let worker = std::thread::spawn(move || measure(&args, &ns_path).map(|done| (args, done)));
    let outcome = worker.join();
    drop(ns);
    let (args, (cpu, rows)) = match outcome {
        Ok(Ok(done)) => done,
        Ok(Err(e)) => {
            eprintln!("dataplane-bench: {e:#}");
            return ExitCode::FAILURE;
        }
        Err(_) => {
            eprintln!("dataplane-bench: the measuring thread panicked");
            return ExitCode::FAILURE;
        }
    };
    let took = started.elapsed();
    print_table(&rows);
    match write_json(&args, cpu, &rows, took) {
        Ok(()) => {
            println!(
                "\nwrote {} ({:.1} s in all)",
                args.out.display(),
                took.as_secs_f64()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("dataplane-bench: writing {}: {e}", args.out.display());
            ExitCode::FAILURE
        }
    }
}

/// Everything that runs inside the namespace, on one CPU. Returns that CPU and the rows.
fn measure(args: &Args, ns_path: &str) -> Result<(usize, Vec<Row>)> {
    enter_namespace(ns_path)?;
    let cpu = pin_to_one_cpu()?;
    eprintln!("dataplane-bench: measuring on CPU {cpu}");
    let ifindex = ifindex(IF_IN)?;

    let mut bench = BenchPrograms::load().context("loading the bench programs")?;
    // Stays attached as long as `bench` lives, i.e. for the whole run.
    bench
        .attach_drop(IF_PEER)
        .context("attaching the drop program to the peer veth")?;

    let classes = classes();
    let mut rows = Vec::new();
    for &backends in &args.backends {
        let t = Instant::now();
        let mut balancer = Balancer::load_with(LoadOptions {
            flow_entries: FLOW_ENTRIES,
        })
        .context("loading the balancer")?;
        install(&mut balancer, backends)?;
        eprintln!(
            "dataplane-bench: {backends} backends installed ({:.1} s)",
            t.elapsed().as_secs_f64()
        );
        let mut filled = 0u32;
        for &flows in &args.flows {
            let t = Instant::now();
            prefill(&balancer, filled, flows)?;
            eprintln!(
                "dataplane-bench: connection table filled to {flows} flows ({:.1} s)",
                t.elapsed().as_secs_f64()
            );
            filled = filled.max(flows);
            for class in &classes {
                rows.push(measure_class(
                    args, &mut bench, &balancer, class, ifindex, backends, flows,
                )?);
                let row = rows.last().expect("just pushed");
                eprintln!(
                    "  {:<24} xlb {:>7.1} ns  {} {:>7.1} ns  ratio {:.2}",
                    row.class,
                    row.xlb_ns(),
                    row.baseline,
                    row.base_ns(),
                    row.ratio()
                );
            }
        }
    }
    Ok((cpu, rows))
}

fn enter_namespace(path: &str) -> Result<()> {
    let ns = File::open(path).with_context(|| format!("opening {path}"))?;
    // SAFETY: setns on an fd we own; affects only this thread.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns {path}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Pins the calling thread to the highest CPU it may run on (CPU 0 tends to take more
/// interrupts) and returns it.
fn pin_to_one_cpu() -> Result<usize> {
    // SAFETY: cpu_set_t is plain data; the calls get valid pointers and sizes, results checked.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            bail!("sched_getaffinity: {}", std::io::Error::last_os_error());
        }
        let Some(cpu) = (0..libc::CPU_SETSIZE as usize)
            .rev()
            .find(|&c| libc::CPU_ISSET(c, &set))
        else {
            bail!("no CPU in this thread's affinity mask");
        };
        let mut one: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut one);
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &one) != 0 {
            bail!("sched_setaffinity: {}", std::io::Error::last_os_error());
        }
        Ok(cpu)
    }
}

fn ifindex(name: &str) -> Result<u32> {
    let c = CString::new(name).expect("interface names have no NUL");
    // SAFETY: a valid C string.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if index == 0 {
        bail!("no interface {name} in the bench namespace");
    }
    Ok(index)
}

fn v4(a: [u8; 4]) -> [u8; 16] {
    let mut out = [0; 16];
    out[..4].copy_from_slice(&a);
    out
}

/// Installs `n` IPv4 backends behind the two IPv4 VIPs and `n` IPv6 backends behind the IPv6
/// VIP, each VIP with its own full-size Maglev table.
fn install(b: &mut Balancer, n: u32) -> Result<()> {
    let cfg = LbConfig {
        egress_mtu: EGRESS_MTU,
        ..world::config()
    };
    b.set_config(&cfg).context("config")?;
    let mut v4_backends = Vec::new();
    let mut v6_backends = Vec::new();
    for i in 0..n {
        let id4 = 1 + i;
        let addr4 = v4([10, 1, (i >> 8) as u8, i as u8]);
        let id6 = 1 + n + i;
        let mut addr6 = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0];
        addr6[14..].copy_from_slice(&(i as u16).to_be_bytes());
        for (id, addr, family, list) in [
            (id4, addr4, FAMILY_V4, &mut v4_backends),
            (id6, addr6, FAMILY_V6, &mut v6_backends),
        ] {
            let entry = Backend {
                addr,
                family,
                flags: BACKEND_F_UP,
                mac: [0x02, 0, 0, 0, (id >> 8) as u8, id as u8],
                ..Default::default()
            };
            b.set_backend(id, &entry).context("backend")?;
            list.push(maglev::MaglevBackend {
                id,
                key: addr[..if family == FAMILY_V4 { 4 } else { 16 }].to_vec(),
                weight: 1,
            });
        }
    }
    let table4 = maglev::build(&v4_backends, TABLE_SIZE).context("maglev (IPv4)")?;
    let table6 = maglev::build(&v6_backends, TABLE_SIZE).context("maglev (IPv6)")?;
    let vips = [
        (1, vip_key(v4(VIP_V4), 80, proto::TCP, FAMILY_V4), &table4),
        (2, vip_key(v4(VIP_V4), 53, proto::UDP, FAMILY_V4), &table4),
        (3, vip_key(VIP_V6, 80, proto::TCP, FAMILY_V6), &table6),
    ];
    for (id, key, table) in vips {
        b.publish_vip(&key, id, 0, table).context("publish VIP")?;
    }
    // Multi-region: flows from another region arrive at TUNNEL; VIP_REMOTE sends every new
    // flow to the remote region's xlb host.
    b.set_region_addrs(&[std::net::IpAddr::from([192, 0, 2, 100])])
        .context("region addresses")?;
    let remote = Backend {
        addr: v4([198, 18, 0, 2]),
        family: FAMILY_V4,
        flags: BACKEND_F_UP | BACKEND_F_REGION,
        ..Default::default()
    };
    b.set_backend(REMOTE_ID, &remote).context("remote region")?;
    let split = RegionSplit {
        count: 2,
        upto: [0, REGION_SCALE, 0, 0],
        backend: [REGION_LOCAL, REMOTE_ID, 0, 0],
    };
    b.publish_vip_split(
        &vip_key(v4(VIP_REMOTE), 80, proto::TCP, FAMILY_V4),
        4,
        0,
        &table4,
        &split,
    )
    .context("publish the remote-region VIP")?;
    Ok(())
}

fn vip_key(addr: [u8; 16], port: u16, proto: u8, family: u8) -> VipKey {
    VipKey {
        addr,
        port_be: port.to_be(),
        proto,
        family,
    }
}

/// Runs distinct SYNs `from..to` through plain test runs until the connection table holds `to`
/// pre-fill flows. Sources are 100.64.0.0/10 addresses (never a class's client), one per flow.
fn prefill(balancer: &Balancer, from: u32, to: u32) -> Result<()> {
    if to <= from {
        return Ok(());
    }
    let program = balancer.program();
    let mut frame = frames::tcp4(VIP_V4, 40_000, 80, true, b"");
    let before = counters(balancer)?;
    for i in from..to {
        let src = (100u32 << 24 | 64 << 16) + i;
        frame[L3 + 12..L3 + 16].copy_from_slice(&src.to_be_bytes());
        frames::fix_ipv4_checksum(&mut frame);
        let r = program
            .test_run(TestRunOptions {
                data_in: Some(&frame),
                ..Default::default()
            })
            .context("pre-fill test run")?;
        if r.return_value != Verdict::Tx.action() {
            bail!(
                "pre-fill SYN {i} returned verdict {} instead of XDP_TX",
                r.return_value
            );
        }
    }
    let delta = counters(balancer)?.since(&before);
    let n = u64::from(to - from);
    if delta.get(Counter::CtMiss) != n || delta.get(Counter::ActionTx) != n {
        bail!("pre-fill of {n} SYNs did not insert {n} flows (counters: {delta})");
    }
    Ok(())
}

fn counters(balancer: &Balancer) -> Result<CounterSnapshot> {
    balancer.counters().context("reading counters")
}

fn measure_class(
    args: &Args,
    bench: &mut BenchPrograms,
    balancer: &Balancer,
    class: &Class,
    ifindex: u32,
    backends: u32,
    flows: u32,
) -> Result<Row> {
    let program = balancer.program();
    if let Some(prime) = &class.prime {
        plain_run(program, prime).with_context(|| format!("{}: priming the flow", class.name))?;
    }
    let verdict = plain_run(program, &class.frame).context(class.name)?;
    if verdict != class.verdict.action() {
        bail!(
            "{}: a plain test run returned verdict {verdict}, expected {} ({:?}); the balancer \
             does not take the path this class is meant to measure",
            class.name,
            class.verdict.action(),
            class.verdict
        );
    }
    // The IPv4 source address of an untagged frame.
    let vary = if class.new_flow_each_time {
        (L3 + 12) as u32
    } else {
        0
    };
    bench.set_frame(&class.frame, vary).context("bench frame")?;
    let xlb_fd = program
        .fd()
        .context("balancer program fd")?
        .try_clone()
        .context("duplicating the balancer program fd")?;
    let base_fd = bench
        .fd(class.verdict.baseline_program())?
        .try_clone()
        .context("duplicating the baseline program fd")?;

    // xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
    let xdp_md: Vec<u8> = [0, class.frame.len() as u32, 0, ifindex, 0, 0]
        .iter()
        .flat_map(|w| w.to_ne_bytes())
        .collect();

    let mut xlb = Vec::new();
    let mut base = Vec::new();
    for round in 0..args.rounds {
        // Alternate which side goes first, so drift within a round hits both equally.
        for side in if round % 2 == 0 { [0, 1] } else { [1, 0] } {
            let (fd, is_xlb) = if side == 0 {
                (&xlb_fd, true)
            } else {
                (&base_fd, false)
            };
            bench
                .set_target(fd)
                .context("setting the tail-call target")?;
            let c0 = counters(balancer)?;
            let seen0 = bench.seen()?;
            let ns = live_run(bench, &class.frame, &xdp_md, args)
                .with_context(|| format!("{}: live test run", class.name))?;
            let seen = bench.seen()? - seen0;
            let delta = counters(balancer)?.since(&c0);
            let n = u64::from(args.repeat);
            if class.verdict == Verdict::Tx && seen != n {
                bail!(
                    "{}: the peer received {seen} of {n} forwarded frames ({}); the \
                     measurement would not include sending them",
                    class.name,
                    if is_xlb { "xlb" } else { "baseline" }
                );
            }
            if is_xlb {
                let got = (delta.get(class.verdict.counter()), delta.get(class.path));
                if got != (n, n) {
                    bail!(
                        "{}: in live mode only {}/{n} repetitions took the intended path \
                         ({} {}, {} {}); counters: {delta}",
                        class.name,
                        got.0.min(got.1),
                        class.verdict.counter().name(),
                        got.0,
                        class.path.name(),
                        got.1
                    );
                }
                xlb.push(ns);
            } else {
                if delta.get(Counter::RxPackets) != 0 {
                    bail!("{}: the baseline run reached the balancer", class.name);
                }
                base.push(ns);
            }
        }
    }
    Ok(Row {
        class: class.name,
        backends,
        flows,
        baseline: class.verdict.baseline(),
        xlb,
        base,
    })
}

/// One plain (not live) test run of the balancer itself; returns its verdict.
fn plain_run(program: &Xdp, frame: &[u8]) -> Result<u32> {
    let r = program
        .test_run(TestRunOptions {
            data_in: Some(frame),
            ..Default::default()
        })
        .context("plain test run")?;
    Ok(r.return_value)
}

/// One timed live-frames run through the restoring entry point; returns the kernel's average
/// nanoseconds per repetition.
fn live_run(bench: &BenchPrograms, frame: &[u8], xdp_md: &[u8], args: &Args) -> Result<f64> {
    let entry = bench.program(PROG_RESTORE)?;
    let r = entry
        .test_run(TestRunOptions {
            data_in: Some(frame),
            ctx_in: Some(xdp_md),
            repeat: args.repeat,
            attrs: TestRunAttrs::new().xdp_live_frames(args.batch),
            ..Default::default()
        })
        .context("BPF_PROG_TEST_RUN (live frames)")?;
    Ok(duration_ns(r.duration))
}

/// The kernel reports whole nanoseconds; keep them exact (no float rounding through seconds).
fn duration_ns(d: Duration) -> f64 {
    d.as_nanos() as f64
}

fn flows_label(n: u32) -> String {
    match n {
        n if n >= 1_000_000 && n % 1_000_000 == 0 => format!("{}M", n / 1_000_000),
        n if n >= 1_000 && n % 1_000 == 0 => format!("{}k", n / 1_000),
        n => n.to_string(),
    }
}

fn print_table(rows: &[Row]) {
    println!(
        "\n{:<24} {:>8} {:>6} {:>12} {:>9} {:>13} {:>6}",
        "class", "backends", "flows", "xlb ns/pkt", "baseline", "trivial ns/pkt", "ratio"
    );
    for r in rows {
        println!(
            "{:<24} {:>8} {:>6} {:>12.1} {:>9} {:>13.1} {:>6.2}",
            r.class,
            r.backends,
            flows_label(r.flows),
            r.xlb_ns(),
            r.baseline,
            r.base_ns(),
            r.ratio()
        );
    }
}

fn write_json(args: &Args, cpu: usize, rows: &[Row], took: Duration) -> std::io::Result<()> {
    let results: Vec<_> = rows
        .iter()
        .map(|r| {
            json!({
                "class": r.class,
                "backends": r.backends,
                "flows": r.flows,
                "xlb_ns_per_pkt": r.xlb_ns(),
                "baseline": r.baseline,
                "baseline_ns_per_pkt": r.base_ns(),
                "ratio": r.ratio(),
                "xlb_rounds_ns": r.xlb,
                "baseline_rounds_ns": r.base,
            })
        })
        .collect();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let doc = json!({
        "bench": "dataplane",
        "method": "BPF_PROG_TEST_RUN, BPF_F_TEST_XDP_LIVE_FRAMES, ingress on a veth whose peer \
                   drops with XDP; every program reached through xlb_bench_restore (frame \
                   rewritten, then tail call); kernel-measured average per repetition; median \
                   of rounds, xlb and baseline alternating; baseline = trivial program returning \
                   the class's verdict (xdp_tx or xdp_pass)",
        "kernel": kernel,
        "cpu": cpu,
        "repeat": args.repeat,
        "batch": args.batch,
        "rounds": args.rounds,
        "table_size": TABLE_SIZE,
        "flow_entries": FLOW_ENTRIES,
        "egress_mtu": EGRESS_MTU,
        "seconds": took.as_secs_f64(),
        "results": results,
    });
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut text = serde_json::to_string_pretty(&doc).map_err(std::io::Error::other)?;
    text.push('\n');
    std::fs::write(&args.out, text)
}
