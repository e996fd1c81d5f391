//! The xlb agent's library: loading the XDP programs, reading their counters, and (as the
//! product grows) the typed map layer, configuration, reconciler, health checks, region
//! failover and gateway.
//!
//! The `xlb` binary is a thin shell over this crate; tests use the same loader the agent uses.

pub mod admin;
pub mod bench;
pub mod capacity;
pub mod config;
pub mod counters;
pub mod desired;
pub mod gateway_auth;
pub mod health;
pub mod host;
pub mod loader;
pub mod logging;
pub mod maglev;
pub mod maps;
pub mod metrics;
pub mod netlink;
pub mod pins;
pub mod reconcile;
pub mod region;
pub mod runtime;
pub mod sim;
