//! `cargo xtask bench region`: multi-region failover and failback times, and what is lost
//! during each transition, on the two-region topology (`xlb_tests::regions`: two backends in
//! A, two in B, the real agents) with the scenario of `xlb_tests::failover`: whole failover,
//! min_healthy 0.75, a short hold-down.
//!
//! Each trial kills every backend of region A (nginx and the UDP responder on both), then
//! brings them back. During each transition two streams of new flows run from A's client:
//! a new TCP connection (connect + `GET /`) every 20 ms and a UDP datagram from a new source
//! port every 5 ms, each with a 500 ms deadline. The failover time is from the kill to the
//! first answer from a `b-` backend, the failback time from the restart to the first answer
//! from an `a-` backend; a stream stops 1 s after its transition completed, and every probe it
//! sent that got no answer is lost. Prints a table and writes JSON with every raw sample.

use std::{
    hash::{BuildHasher as _, Hasher as _},
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream, UdpSocket},
    path::PathBuf,
    process::ExitCode,
    sync::{
        atomic::{AtomicU16, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use xlb_tests::{
    failover::{CHECK, ECHO, Policy, REGION_PROBE, WEB, build, region_states, start_for, udp_echo},
    netns::{Netns, spawn_in_netns},
    regions::{Region, RegionTopology},
    servers::UdpEcho,
    topology::VIP_V4,
};

/// A new TCP connection every this often.
const TCP_EVERY: Duration = Duration::from_millis(20);
/// A UDP datagram (new flow) every this often.
const UDP_EVERY: Duration = Duration::from_millis(5);
/// A probe without an answer within this is lost.
const DEADLINE: Duration = Duration::from_millis(500);
/// A stream goes on this long after its transition completed.
const TAIL: Duration = Duration::from_secs(1);
/// A transition that takes longer than this (beyond the hold-down) fails the bench.
const LIMIT: Duration = Duration::from_secs(10);

struct Args {
    out: PathBuf,
    trials: usize,
    hold_down_ms: u32,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        out: PathBuf::from("target/xlb-bench/region.json"),
        trials: 10,
        hold_down_ms: 2000,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--out" => args.out = PathBuf::from(value()?),
            "--trials" => args.trials = value()?.parse().map_err(|e| format!("--trials: {e}"))?,
            "--hold-down-ms" => {
                args.hold_down_ms = value()?
                    .parse()
                    .map_err(|e| format!("--hold-down-ms: {e}"))?
            }
            "--help" | "-h" => {
                return Err("options: --out FILE --trials N (10) --hold-down-ms MS (2000)".into());
            }
            other => return Err(format!("unknown option {other}")),
        }
    }
    if args.trials == 0 {
        return Err("--trials must be at least 1".into());
    }
    Ok(args)
}

/// One new flow of a stream: when it was sent and, if it was answered, when and by whom (both
/// since the event).
#[derive(Debug, Clone)]
struct Probe {
    sent: Duration,
    answer: Option<(Duration, String)>,
}

/// What one stream saw of one transition.
#[derive(Debug, Clone, Copy)]
struct Outcome {
    /// From the event to the first answer from the target region.
    time: Duration,
    sent: usize,
    lost: usize,
}

/// The transition a stream watches for: the event's time and whose answer completes it.
#[derive(Clone)]
struct Watch {
    event: Instant,
    /// `"a-"` or `"b-"`.
    target: &'static str,
    limit: Duration,
}

impl Watch {
    /// Whether to send another probe: not past the limit, and not past [`TAIL`] after the
    /// first answer from the target (`done`, since the event).
    fn more(&self, done: Option<Duration>) -> bool {
        let now = self.event.elapsed();
        now < self.limit && done.is_none_or(|d| now < d + TAIL)
    }

    fn completes(&self, answer: &(Duration, String), done: &mut Option<Duration>) {
        if answer.1.starts_with(self.target) {
            *done = Some(done.map_or(answer.0, |d| d.min(answer.0)));
        }
    }
}

/// The UDP streams' source ports: each datagram gets the next one, below the ephemeral range
/// (32768 up) and never reused within a run (about 800 per trial), so no datagram meets a
/// connection-table entry of an earlier flow (a kernel-chosen port would: an entry pinned to
/// region B from an earlier failover answers from B at once and fakes the transition).
const UDP_PORTS: std::ops::Range<u16> = 10_000..32_768;

/// The next unused UDP source port (wrapping, with a note, after [`UDP_PORTS`]).
fn next_udp_port() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(UDP_PORTS.start);
    let port = NEXT.fetch_add(1, Ordering::Relaxed);
    if port >= UDP_PORTS.end {
        NEXT.store(UDP_PORTS.start + 1, Ordering::Relaxed);
        eprintln!("region-bench: UDP source ports wrapped; later datagrams may reuse flows");
        return UDP_PORTS.start;
    }
    port
}

/// A random pause of up to one check interval (200 ms) before each event, so that events fall
/// at every phase of the agents' 200 ms check and probe ticks rather than at the one a
/// periodic bench would lock onto.
fn jitter() {
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    std::thread::sleep(Duration::from_millis(random % 200));
}

/// Sleeps until `at` (no-op when past).
fn sleep_until(at: Instant) {
    let now = Instant::now();
    if at > now {
        std::thread::sleep(at - now);
    }
}

/// One new TCP connection from the calling thread's namespace: `GET /` with `Connection:
/// close`, the body (a backend's name) of a 200 answer, all within [`DEADLINE`].
fn tcp_probe(vip: SocketAddr) -> Option<String> {
    let start = Instant::now();
    let mut s = TcpStream::connect_timeout(&vip, DEADLINE).ok()?;
    let left = DEADLINE.checked_sub(start.elapsed())?;
    s.set_read_timeout(Some(left)).ok()?;
    s.set_write_timeout(Some(left)).ok()?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: vip\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut reply = Vec::new();
    s.read_to_end(&mut reply).ok()?;
    let reply = String::from_utf8_lossy(&reply);
    let (head, body) = reply.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200")
        .then(|| body.trim().to_string())
}

/// New TCP connections every [`TCP_EVERY`] from `ns` until the watch ends. Each connection
/// runs on its own thread, which inherits the namespace of the stream's thread (threads are
/// created with the creating thread's namespaces).
fn tcp_stream(ns: &Netns, w: Watch) -> JoinHandle<Vec<Probe>> {
    let vip = SocketAddr::new(IpAddr::V4(VIP_V4), WEB.port);
    spawn_in_netns(ns, move || {
        let (tx, rx) = mpsc::channel();
        let mut probes = Vec::new();
        let mut threads = Vec::new();
        let mut done = None;
        let mut next = w.event;
        while w.more(done) {
            let (i, tx) = (probes.len(), tx.clone());
            probes.push(Probe {
                sent: w.event.elapsed(),
                answer: None,
            });
            let event = w.event;
            threads.push(std::thread::spawn(move || {
                let answer = tcp_probe(vip).map(|who| (event.elapsed(), who));
                let _ = tx.send((i, answer));
            }));
            next += TCP_EVERY;
            sleep_until(next);
            for (i, answer) in rx.try_iter() {
                if let Some(a) = &answer {
                    w.completes(a, &mut done);
                }
                probes[i].answer = answer;
            }
        }
        drop(tx);
        for t in threads {
            let _ = t.join();
        }
        for (i, answer) in rx.try_iter() {
            probes[i].answer = answer;
        }
        probes
    })
}

/// A UDP datagram from a new socket (a new source port: a new flow) every [`UDP_EVERY`] from
/// `ns` until the watch ends; answers are collected until each datagram's [`DEADLINE`].
fn udp_stream(ns: &Netns, w: Watch) -> JoinHandle<Vec<Probe>> {
    let vip = SocketAddr::new(IpAddr::V4(VIP_V4), ECHO.port);
    spawn_in_netns(ns, move || {
        let mut probes: Vec<Probe> = Vec::new();
        let mut pending: Vec<(usize, UdpSocket)> = Vec::new();
        let mut done = None;
        let mut next = w.event;
        let mut buf = [0u8; 512];
        while w.more(done) || !pending.is_empty() {
            if w.more(done) && Instant::now() >= next {
                let socket = UdpSocket::bind(("0.0.0.0", next_udp_port())).expect("bind");
                socket.connect(vip).expect("connect");
                socket.set_nonblocking(true).expect("non-blocking");
                let n = probes.len();
                // A failed send is a lost datagram like any other.
                let _ = socket.send(format!("probe {n}").as_bytes());
                probes.push(Probe {
                    sent: w.event.elapsed(),
                    answer: None,
                });
                pending.push((n, socket));
                next += UDP_EVERY;
            }
            pending.retain(|(n, socket)| {
                if let Ok(len) = socket.recv(&mut buf) {
                    let text = String::from_utf8_lossy(&buf[..len]);
                    let who = text.split(' ').next().unwrap_or_default().to_string();
                    let answer = (w.event.elapsed(), who);
                    w.completes(&answer, &mut done);
                    probes[*n].answer = Some(answer);
                    return false;
                }
                w.event.elapsed() < probes[*n].sent + DEADLINE
            });
            std::thread::sleep(Duration::from_millis(1));
        }
        probes
    })
}

/// The transition as `probes` saw it: the first answer from `target`, and the probes sent
/// and lost; `None` when the target never answered.
fn outcome(probes: &[Probe], target: &str) -> Option<Outcome> {
    let time = probes
        .iter()
        .filter_map(|p| p.answer.as_ref())
        .filter(|(_, who)| who.starts_with(target))
        .map(|(at, _)| *at)
        .min()?;
    Some(Outcome {
        time,
        sent: probes.len(),
        lost: probes.iter().filter(|p| p.answer.is_none()).count(),
    })
}

/// Both streams of one transition: (TCP, UDP).
type Pair = [Outcome; 2];

/// Runs both streams from A's client while `event` (the kill or the restart) happens, and
/// returns what they saw, with how long `event` itself took.
fn transition(
    t: &mut RegionTopology,
    target: &'static str,
    limit: Duration,
    event: impl FnOnce(&mut RegionTopology),
) -> Result<(Pair, Duration), String> {
    jitter();
    let w = Watch {
        event: Instant::now(),
        target,
        limit,
    };
    let client = &t.region(Region::A).clients[0].ns;
    let tcp = tcp_stream(client, w.clone());
    let udp = udp_stream(client, w.clone());
    event(t);
    let took = w.event.elapsed();
    let mut pair = Vec::new();
    for (name, stream) in [("TCP", tcp), ("UDP", udp)] {
        let probes = stream
            .join()
            .map_err(|_| format!("the {name} stream panicked"))?;
        pair.push(outcome(&probes, target).ok_or_else(|| {
            format!(
                "{name}: no answer from a {target} backend within {limit:?} ({} probes)",
                probes.len()
            )
        })?);
    }
    Ok(([pair[0], pair[1]], took))
}

/// One trial: failover (every A backend killed) and failback (restarted).
struct Trial {
    failover: Pair,
    failback: Pair,
    kill: Duration,
    restart: Duration,
}

fn trial(
    t: &mut RegionTopology,
    echo: &mut [Option<UdpEcho>],
    hold_down: Duration,
) -> Result<Trial, String> {
    let (failover, kill) = transition(t, "b-", LIMIT, |t| {
        for (i, e) in echo.iter_mut().enumerate() {
            t.stop_backend(Region::A, i);
            *e = None;
        }
    })?;
    expect_active(t, "b")?;
    let (failback, restart) = transition(t, "a-", hold_down + LIMIT, |t| {
        for (i, e) in echo.iter_mut().enumerate() {
            t.start_backend(Region::A, i);
            *e = Some(udp_echo(t, Region::A, i));
        }
    })?;
    expect_active(t, "a")?;
    Ok(Trial {
        failover,
        failback,
        kill,
        restart,
    })
}

/// Checks A's status: both VIPs' active region is `region`.
fn expect_active(t: &RegionTopology, region: &str) -> Result<(), String> {
    let names = [WEB.name, ECHO.name];
    for (name, (active, _, r)) in names.iter().zip(region_states(t, &names)) {
        if active != region {
            return Err(format!(
                "{name}: active region {active}, expected {region}: {r}"
            ));
        }
    }
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Nearest-rank percentile `q` (0..=1) of `v`.
fn percentile(v: &[f64], q: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

fn stats(v: &[f64]) -> [f64; 4] {
    [
        percentile(v, 0.5),
        percentile(v, 0.99),
        percentile(v, 0.0),
        percentile(v, 1.0),
    ]
}

fn settings_text(hold_down_ms: u32) -> String {
    let one = |s: &str| {
        s.trim_start_matches("[vip.health_check]")
            .trim()
            .replace('\n', ", ")
            .replace('"', "")
    };
    format!(
        "policy: whole, min_healthy 0.75, hold_down_ms {hold_down_ms}; every backend of A (2 of \
         2) killed, then restarted\nhealth checks of web4: {}\nhealth checks of echo4: {}\n\
         region B probed through the tunnel: {}\nprobes from A's client: a new TCP connection \
         (connect + GET /) every {} ms, a UDP datagram from a new source port every {} ms, each \
         answered within {} ms or lost",
        one(CHECK),
        one(ECHO.check),
        one(REGION_PROBE),
        TCP_EVERY.as_millis(),
        UDP_EVERY.as_millis(),
        DEADLINE.as_millis()
    )
}

/// The streams, in the order of [`Pair`]: name, JSON key, what answers, what is lost.
const STREAMS: [(&str, &str, &str, &str); 2] = [
    ("TCP", "tcp", "conn", "connections"),
    ("UDP", "udp", "echo", "datagrams"),
];

/// Milliseconds rounded to 0.1 for the JSON.
fn rounded(v: &[f64]) -> serde_json::Value {
    serde_json::json!(
        v.iter()
            .map(|x| (x * 10.0).round() / 10.0)
            .collect::<Vec<_>>()
    )
}

fn report(args: &Args, trials: &[Trial], elapsed: Duration) -> Result<(), String> {
    let hold = f64::from(args.hold_down_ms);
    // Rows (label, JSON key, one value per trial) of times, then of losses.
    let mut times: Vec<(String, String, Vec<f64>)> = Vec::new();
    let mut losses: Vec<(String, String, Vec<Outcome>)> = Vec::new();
    for (s, (name, key, answer, probe)) in STREAMS.iter().enumerate() {
        for (phase, event, target, minus) in [
            ("failover", "kill", "b-", None),
            ("failback", "restart", "a-", Some(hold)),
        ] {
            let o: Vec<Outcome> = trials
                .iter()
                .map(|t| {
                    if minus.is_none() {
                        t.failover[s]
                    } else {
                        t.failback[s]
                    }
                })
                .collect();
            let ms_of = |minus: f64| o.iter().map(|o| ms(o.time) - minus).collect();
            times.push((
                format!("{phase} {name}: {event} -> first {target} {answer}"),
                format!("{phase}_{key}_ms"),
                ms_of(0.0),
            ));
            if let Some(hold) = minus {
                times.push((
                    "  minus the hold-down".into(),
                    format!("{phase}_{key}_minus_hold_down_ms"),
                    ms_of(hold),
                ));
            }
            losses.push((
                format!("{phase} {name} {probe}"),
                format!("{phase}_{key}"),
                o,
            ));
        }
    }
    times.push((
        "the kill itself (stopping 2 nginx + 2 UDP)".into(),
        "kill_ms".into(),
        trials.iter().map(|t| ms(t.kill)).collect(),
    ));
    times.push((
        "the restart itself (until both serve)".into(),
        "restart_ms".into(),
        trials.iter().map(|t| ms(t.restart)).collect(),
    ));
    let n = trials.len();
    println!(
        "\nregion failover, {n} trials\n{}",
        settings_text(args.hold_down_ms)
    );
    println!(
        "\n{:<42} {:>9} {:>9} {:>9} {:>9}",
        "time (ms)", "p50", "p99*", "min", "max"
    );
    let mut json = serde_json::Map::new();
    for (label, key, v) in &times {
        let [p50, p99, min, max] = stats(v);
        println!("{label:<42} {p50:>9.1} {p99:>9.1} {min:>9.1} {max:>9.1}");
        json.insert(key.clone(), rounded(v));
    }
    println!(
        "\n{:<42} {:>14} {:>14} {:>14}",
        "lost / sent per transition", "p50", "max", "total"
    );
    for (label, key, o) in &losses {
        let lost: Vec<f64> = o.iter().map(|o| o.lost as f64).collect();
        let sent: Vec<f64> = o.iter().map(|o| o.sent as f64).collect();
        let (tl, ts) = (lost.iter().sum::<f64>(), sent.iter().sum::<f64>());
        let pair = |q| format!("{:.0} / {:.0}", percentile(&lost, q), percentile(&sent, q));
        println!(
            "{label:<42} {:>14} {:>14} {:>14}",
            pair(0.5),
            pair(1.0),
            format!("{tl:.0} / {ts:.0}")
        );
        json.insert(
            format!("{key}_lost"),
            serde_json::json!(o.iter().map(|o| o.lost).collect::<Vec<_>>()),
        );
        json.insert(
            format!("{key}_sent"),
            serde_json::json!(o.iter().map(|o| o.sent).collect::<Vec<_>>()),
        );
    }
    println!(
        "\n* nearest-rank p99: of {n} samples, the maximum.\n\
         lost: a probe sent from the event until 1 s after its stream's transition completed \
         (the first answer from the target region) that got no answer within {} ms (refused, \
         reset or timed out). A failover loses what is sent while A is dead and not yet \
         failed over; its time is bounded by detection (fall x interval, plus the check \
         timeout) and the agent's next evaluation and map update.",
        DEADLINE.as_millis()
    );
    let doc = serde_json::json!({
        "trials": n,
        "mode": "whole",
        "min_healthy": 0.75,
        "hold_down_ms": args.hold_down_ms,
        "settings": settings_text(args.hold_down_ms),
        "tcp_every_ms": TCP_EVERY.as_millis() as u64,
        "udp_every_ms": UDP_EVERY.as_millis() as u64,
        "deadline_ms": DEADLINE.as_millis() as u64,
        "tail_ms": TAIL.as_millis() as u64,
        "samples": json,
    });
    if let Some(dir) = args.out.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    std::fs::write(&args.out, format!("{doc:#}\n"))
        .map_err(|e| format!("writing {}: {e}", args.out.display()))?;
    println!(
        "\nwrote {} ({:.0} s)",
        args.out.display(),
        elapsed.as_secs_f64()
    );
    Ok(())
}

fn run(args: &Args) -> Result<(), String> {
    let started = Instant::now();
    let mut t = build(2);
    // Region B's responders live as long as the bench; A's are the trials' to kill.
    let _echo_b: Vec<UdpEcho> = (0..t.b.backends.len())
        .map(|i| udp_echo(&t, Region::B, i))
        .collect();
    let mut echo: Vec<Option<UdpEcho>> = (0..t.a.backends.len())
        .map(|i| Some(udp_echo(&t, Region::A, i)))
        .collect();
    let p = Policy {
        mode: "whole",
        min_healthy: 0.75,
        hold_down_ms: args.hold_down_ms,
    };
    start_for(&mut t, &p, &[WEB, ECHO]);
    expect_active(&t, "a")?;
    let hold_down = Duration::from_millis(u64::from(args.hold_down_ms));
    let mut trials = Vec::new();
    for i in 0..args.trials {
        let tr =
            trial(&mut t, &mut echo, hold_down).map_err(|e| format!("trial {}: {e}", i + 1))?;
        let line: Vec<String> = [("failover", &tr.failover), ("failback", &tr.failback)]
            .into_iter()
            .flat_map(|(phase, pair)| {
                STREAMS.iter().zip(pair).map(move |((name, ..), o)| {
                    let (at, lost, sent) = (ms(o.time), o.lost, o.sent);
                    format!("{phase} {name} {at:>5.0} ms ({lost}/{sent} lost)")
                })
            })
            .collect();
        eprintln!("trial {:>2}: {}", i + 1, line.join("; "));
        trials.push(tr);
    }
    report(args, &trials, started.elapsed())
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("region-bench: {e}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("region-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
