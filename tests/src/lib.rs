//! Test support for xlb: the fixture-packet harness (cases as data, replayed through
//! BPF_PROG_TEST_RUN against the real object and loader), frame builders, mismatch rendering,
//! network-namespace guards and topologies for the end-to-end tests (the L7 gateway's in
//! [`l7`]), and what the benchmarks measure with ([`wrk`], [`procs`]).

pub mod failover;
pub mod fixture;
pub mod frames;
pub mod r#gen;
pub mod l7;
pub mod netns;
pub mod procs;
pub mod regions;
pub mod render;
pub mod servers;
pub mod together;
pub mod topology;
pub mod world;
pub mod wrk;
