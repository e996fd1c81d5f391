//! Test support for xlb: the fixture-packet harness (cases as data, replayed through
//! BPF_PROG_TEST_RUN against the real object and loader), frame builders, mismatch rendering,
//! and network-namespace guards for the end-to-end tests.

pub mod failover;
pub mod fixture;
pub mod frames;
pub mod r#gen;
pub mod netns;
pub mod procs;
pub mod regions;
pub mod render;
pub mod servers;
pub mod topology;
pub mod world;
pub mod wrk;
