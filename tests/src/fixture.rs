//! The fixture-packet harness, in the spirit of Katran's tester: each case is data (input frame,
//! map set-up, expected verdict, expected output frame, expected counter deltas) and one runner
//! replays them through BPF_PROG_TEST_RUN on the real object loaded by the real loader.

use std::{
    fmt::{self, Write as _},
    rc::Rc,
};

use aya::programs::{TestRun as _, TestRunOptions};
use lb_common::counters::Counter;
use lb_userspace::{
    counters::CounterSnapshot,
    loader::{Balancer, Decapsulator, LoadOptions},
};

use crate::render;

/// XDP verdicts, as the kernel numbers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XdpAction {
    /// The program hit an error path.
    Aborted,
    /// Dropped.
    Drop,
    /// Handed to the host stack.
    Pass,
    /// Sent back out of the receiving interface.
    Tx,
    /// Redirected to another interface or CPU.
    Redirect,
    /// A value the kernel does not define (a bug in the program).
    Unknown(u32),
}

impl From<u32> for XdpAction {
    fn from(v: u32) -> Self {
        match v {
            0 => XdpAction::Aborted,
            1 => XdpAction::Drop,
            2 => XdpAction::Pass,
            3 => XdpAction::Tx,
            4 => XdpAction::Redirect,
            other => XdpAction::Unknown(other),
        }
    }
}

/// What the frame should look like after the program ran.
#[derive(Debug, Clone)]
pub enum Output {
    /// Byte-for-byte the input frame.
    Unchanged,
    /// Exactly these bytes.
    Frame(Vec<u8>),
}

/// Map set-up applied before the case runs (VIPs, backends, earlier packets of the flow, ...).
/// Receives the loaded balancer, whose typed map layer is the only way tests (like the agent)
/// write maps.
pub type Setup<T = Balancer> = Rc<dyn Fn(&mut T)>;

/// A loaded XDP object the harness can run cases against.
pub trait Target {
    /// The program under test.
    fn program(&self) -> &aya::programs::Xdp;
    /// Its counters, summed over CPUs (panics with context if they cannot be read: a test
    /// cannot go on without them).
    fn counters(&self) -> CounterSnapshot;
}

impl Target for Balancer {
    fn program(&self) -> &aya::programs::Xdp {
        Balancer::program(self)
    }
    fn counters(&self) -> CounterSnapshot {
        Balancer::counters(self).expect("reading the balancer's counters")
    }
}

impl Target for Decapsulator {
    fn program(&self) -> &aya::programs::Xdp {
        Decapsulator::program(self)
    }
    fn counters(&self) -> CounterSnapshot {
        Decapsulator::counters(self).expect("reading the decapsulator's counters")
    }
}

/// One fixture: a frame in, a verdict, a frame out, and exactly which counters moved.
#[derive(Clone)]
pub struct Case<T = Balancer> {
    /// Short unique description, printed on failure.
    pub name: String,
    /// The frame handed to the program (starting at the Ethernet header).
    pub input: Vec<u8>,
    /// Map set-up run before the packet; `None` runs against the maps as loaded.
    pub setup: Option<Setup<T>>,
    /// The verdict the program must return.
    pub action: XdpAction,
    /// The frame the program must leave behind.
    pub output: Output,
    /// Counter deltas this packet must cause. Every counter not listed must stay unchanged.
    pub counters: Vec<(Counter, u64)>,
}

impl<T> Case<T> {
    /// A case expecting XDP_PASS with the frame untouched, counting `rx_packets`, `rx_bytes` and
    /// `action_pass` plus the per-layer counters in `layers`.
    pub fn passes(name: impl Into<String>, input: Vec<u8>, layers: &[Counter]) -> Case<T> {
        let mut counters = vec![
            (Counter::RxPackets, 1),
            (Counter::RxBytes, input.len() as u64),
            (Counter::ActionPass, 1),
        ];
        counters.extend(layers.iter().map(|&c| (c, 1)));
        Case {
            name: name.into(),
            input,
            setup: None,
            action: XdpAction::Pass,
            output: Output::Unchanged,
            counters,
        }
    }
}

impl<T> Case<T> {
    /// A case expecting XDP_DROP, counting `rx_packets`, `rx_bytes`, `action_drop` and `layers`.
    pub fn drops(name: impl Into<String>, input: Vec<u8>, layers: &[Counter]) -> Case<T> {
        let mut case = Case::passes(name, input, &[]);
        case.action = XdpAction::Drop;
        case.counters[2] = (Counter::ActionDrop, 1);
        case.counters.extend(layers.iter().map(|&c| (c, 1)));
        case
    }

    /// A case expecting XDP_TX with exactly `output`, counting `rx_packets`, `rx_bytes`,
    /// `action_tx` and `layers`.
    pub fn forwards(
        name: impl Into<String>,
        input: Vec<u8>,
        output: Vec<u8>,
        layers: &[Counter],
    ) -> Case<T> {
        let mut case = Case::passes(name, input, &[]);
        case.action = XdpAction::Tx;
        case.output = Output::Frame(output);
        case.counters[2] = (Counter::ActionTx, 1);
        case.counters.extend(layers.iter().map(|&c| (c, 1)));
        case
    }

    /// Adds a set-up step run (after the world) before this case's packet.
    pub fn with_setup(mut self, setup: impl Fn(&mut T) + 'static) -> Case<T> {
        self.setup = Some(Rc::new(setup));
        self
    }
}

impl<T> fmt::Debug for Case<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Case")
            .field("name", &self.name)
            .field("action", &self.action)
            .finish_non_exhaustive()
    }
}

/// Why a case failed, rendered for a human.
#[derive(Debug)]
pub struct Failure {
    /// The case's name.
    pub name: String,
    /// What differed: verdict, frame (decoded and hex-diffed), counters.
    pub report: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "--- case {:?} ---", self.name)?;
        f.write_str(&self.report)
    }
}

/// Room left after the input for programs that grow the frame (encapsulation).
const OUTPUT_HEADROOM: usize = 512;

/// Runs one case against `balancer`. Returns `Err` with a full report on any mismatch.
pub fn run_case<T: Target>(balancer: &mut T, case: &Case<T>) -> Result<(), Failure> {
    let fail = |report: String| Failure {
        name: case.name.clone(),
        report,
    };
    if let Some(setup) = &case.setup {
        setup(balancer);
    }
    let before = balancer.counters();
    let mut out = vec![0u8; case.input.len() + OUTPUT_HEADROOM];
    let result = balancer
        .program()
        .test_run(TestRunOptions {
            data_in: Some(&case.input),
            data_out: Some(&mut out),
            repeat: 1,
            ..Default::default()
        })
        .map_err(|e| fail(format!("BPF_PROG_TEST_RUN failed: {e}\n")))?;
    let after = balancer.counters();
    out.truncate(result.data_size_out as usize);

    let mut report = String::new();
    let action = XdpAction::from(result.return_value);
    if action != case.action {
        let _ = writeln!(
            report,
            "verdict: expected {:?}, got {:?}",
            case.action, action
        );
    }
    let expected_frame = match &case.output {
        Output::Unchanged => &case.input,
        Output::Frame(f) => f,
    };
    if out != *expected_frame {
        let _ = writeln!(report, "output frame differs");
        let _ = writeln!(report, "  expected:\n{}", render::decode(expected_frame));
        let _ = writeln!(report, "  actual:\n{}", render::decode(&out));
        let _ = writeln!(report, "  hex diff (- expected, + actual):");
        report.push_str(&render::hex_diff(expected_frame, &out));
    }
    let counter_report = counter_mismatches(&case.counters, &after.since(&before));
    if !counter_report.is_empty() {
        let _ = writeln!(report, "counters differ:\n{counter_report}");
    }
    if report.is_empty() {
        Ok(())
    } else {
        let _ = writeln!(report, "  input:\n{}", render::decode(&case.input));
        Err(fail(report))
    }
}

/// Lists every counter whose delta is not what `expected` says (unlisted counters expect 0).
pub fn counter_mismatches(expected: &[(Counter, u64)], delta: &CounterSnapshot) -> String {
    let mut out = String::new();
    for &counter in Counter::ALL {
        let want: u64 = expected
            .iter()
            .filter(|(c, _)| *c == counter)
            .map(|(_, n)| n)
            .sum();
        let got = delta.get(counter);
        if want != got {
            let _ = writeln!(
                out,
                "    {:<16} expected +{want}, got +{got}",
                counter.name()
            );
        }
    }
    out
}

/// Connection-table entries per CPU in fixture runs: small, so each case loads quickly.
pub const FIXTURE_FLOW_ENTRIES: u32 = 4096;

/// Runs every case (all of them, even after a failure), each starting from empty connection and
/// fragment tables with `world` freshly applied, so no case sees another's flows or map changes (counter
/// deltas are per case by construction). Panics with
/// every failure's report, so one run shows the whole picture.
pub fn run_all<W>(
    install: impl Fn(&mut Balancer) -> W,
    reset: impl Fn(&mut Balancer, &mut W),
    cases: &[Case],
) {
    let mut names = std::collections::HashSet::new();
    for case in cases {
        assert!(
            names.insert(&case.name),
            "duplicate case name {:?}",
            case.name
        );
    }
    // BPF_PROG_TEST_RUN runs on the caller's CPU; staying on one keeps per-CPU state (LRU
    // lists, scratch, counters) in one place, so cases behave the same run after run.
    pin_to_current_cpu();
    let mut balancer = Balancer::load_with(LoadOptions {
        flow_entries: FIXTURE_FLOW_ENTRIES,
    })
    .expect("loading the balancer object (run as root)");
    let mut world = install(&mut balancer);
    let failures: Vec<Failure> = cases
        .iter()
        .filter_map(|case| {
            // Each case starts from the same state: the world as installed, no flows, no
            // fragments in flight.
            balancer
                .clear_flows()
                .expect("clearing the connection table");
            balancer
                .clear_fragments()
                .expect("clearing the fragment table");
            reset(&mut balancer, &mut world);
            run_case(&mut balancer, case).err()
        })
        .collect();
    report(cases.len(), failures);
}

/// Runs decapsulator cases, each on the same loaded object with `setup` applied first.
pub fn run_all_decap(setup: impl Fn(&mut Decapsulator), cases: &[Case<Decapsulator>]) {
    let mut decap = Decapsulator::load().expect("loading the decap object (run as root)");
    setup(&mut decap);
    let failures: Vec<Failure> = cases
        .iter()
        .filter_map(|case| run_case(&mut decap, case).err())
        .collect();
    report(cases.len(), failures);
}

/// Pins the calling thread to the CPU it is running on, so every BPF_PROG_TEST_RUN it makes
/// sees the same per-CPU maps.
pub fn pin_to_current_cpu() {
    // SAFETY: plain syscalls on a zeroed, correctly sized cpu_set_t for the calling thread.
    unsafe {
        let cpu = libc::sched_getcpu();
        assert!(
            cpu >= 0,
            "sched_getcpu: {}",
            std::io::Error::last_os_error()
        );
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu as usize, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
            0,
            "sched_setaffinity: {}",
            std::io::Error::last_os_error()
        );
    }
}

fn report(total: usize, failures: Vec<Failure>) {
    if !failures.is_empty() {
        let mut msg = format!("{} of {} fixture cases failed\n", failures.len(), total);
        for f in &failures {
            let _ = write!(msg, "\n{f}");
        }
        panic!("{msg}");
    }
    eprintln!("{total} fixture cases passed");
}

/// Runs one frame through the program outside any case (for set-up steps such as "the SYN
/// of this flow came first"). Returns the verdict and the output frame.
pub fn send<T: Target>(balancer: &T, frame: &[u8]) -> (XdpAction, Vec<u8>) {
    let mut out = vec![0u8; frame.len() + OUTPUT_HEADROOM];
    let result = balancer
        .program()
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat: 1,
            ..Default::default()
        })
        .expect("BPF_PROG_TEST_RUN");
    out.truncate(result.data_size_out as usize);
    (XdpAction::from(result.return_value), out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_mismatches_flags_missing_and_unexpected_moves() {
        let delta = CounterSnapshot::from_pairs([(Counter::RxPackets, 1), (Counter::L4Udp, 1)]);
        let text = counter_mismatches(&[(Counter::RxPackets, 1), (Counter::L4Tcp, 1)], &delta);
        assert!(
            text.contains("l4_tcp           expected +1, got +0"),
            "{text}"
        );
        assert!(
            text.contains("l4_udp           expected +0, got +1"),
            "{text}"
        );
        assert!(!text.contains("rx_packets"), "{text}");
    }

    #[test]
    fn xdp_action_numbers_match_the_kernel() {
        assert_eq!(XdpAction::from(2), XdpAction::Pass);
        assert_eq!(XdpAction::from(3), XdpAction::Tx);
        assert_eq!(XdpAction::from(9), XdpAction::Unknown(9));
    }
}
