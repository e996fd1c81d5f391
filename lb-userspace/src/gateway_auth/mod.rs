//! The gateway's per-route policy phases that need no network: authentication (API keys, JWT)
//! and rate limiting. Kept pure so each phase is testable on its own with injected clocks.

pub mod auth;
pub mod ratelimit;
