//! Log set-up: `tracing` for the agent, with the XDP programs' aya-log records forwarded into it.

use std::os::fd::AsRawFd;

use aya_log::EbpfLogger;
use tokio::io::{Interest, unix::AsyncFd};
use tracing_subscriber::EnvFilter;

/// A warning about a condition that persists (accepts failing, ...) is repeated at most this
/// often, with the number of occurrences since, so a lasting fault does not flood the log.
pub const REPEAT_WARNING_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Installs the global tracing subscriber on stderr (level from `RUST_LOG`, default `info`).
/// It also captures `log` records, which is how aya-log's records from the kernel arrive.
pub fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder
            // Colour only for a person at a terminal, never in files, pipes or journals.
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => builder.json().with_ansi(false).init(),
    }
}

/// Forwards the programs' log records to `log` (and so to tracing) as they arrive. The ring
/// buffer's fd becomes readable when a record is written; the task then drains it.
pub fn spawn_ebpf_log_forwarder<T>(logger: EbpfLogger<T>) -> std::io::Result<()>
where
    T: log::Log + Send + 'static,
{
    debug_assert!(logger.as_raw_fd() >= 0);
    // SAFETY: the fd is the ring buffer map's, owned by `logger`, which the AsyncFd owns for its
    // whole life; it is neither closed nor replaced while registered.
    let mut fd = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) }
        .map_err(std::io::Error::from)?;
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                tracing::warn!("eBPF log buffer closed; kernel-side log records will be lost");
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
    Ok(())
}
