//! The gateway's serving threads, one runtime each, as nginx runs one process per worker: every
//! listener has a socket per worker (`SO_REUSEPORT`, so the kernel spreads connections), and a
//! connection, its requests and the upstream connections it opens stay on the thread that
//! accepted it. Nothing wakes a task on another thread on the request path; on the agent's
//! multi-thread runtime the client connection, the upstream connection's task and the pool
//! lived on different threads, and each request cost futex wake-ups between them.

use std::cell::Cell;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// Serving threads of the gateway until [`set_count`] says otherwise (the in-process tests).
const DEFAULT_WORKERS: usize = 2;

/// How many serving threads the gateway starts (`agent.gateway_workers`, resolved).
static COUNT: AtomicUsize = AtomicUsize::new(DEFAULT_WORKERS);

/// Sets the number of gateway serving threads from `agent.gateway_workers` (0: one per CPU
/// this process may run on, as nginx's `worker_processes auto`). Called once at agent start,
/// before the first gateway is built: per-worker state is sized from it.
pub fn set_count(configured: u16) {
    let n = match configured {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => usize::from(n),
    };
    COUNT.store(n, Ordering::Relaxed);
}

/// How many serving threads the gateway runs.
pub fn count() -> usize {
    COUNT.load(Ordering::Relaxed)
}

thread_local! {
    /// This thread's worker index; 0 on threads that are not gateway workers.
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// The index of the gateway worker running the caller (0 elsewhere): keys per-worker state
/// such as idle upstream connections, whose tasks run on that worker.
pub(crate) fn current() -> usize {
    WORKER.with(Cell::get)
}

/// Running worker threads. Shared (`Arc`) by the gateway and every listener's accept loops, so
/// that the threads outlive a removed listener's drain; the last owner stops them.
pub(crate) struct Workers {
    workers: Vec<Worker>,
}

struct Worker {
    handle: Handle,
    /// Dropping it ends the thread's runtime (and every task on it).
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Workers {
    /// Starts `n` threads, each with a current-thread runtime (I/O and timers).
    pub(crate) fn start(n: usize) -> io::Result<Arc<Self>> {
        let mut workers = Vec::with_capacity(n);
        for index in 0..n {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let handle = runtime.handle().clone();
            let (stop, stopped) = oneshot::channel::<()>();
            let thread = std::thread::Builder::new()
                .name(format!("xlb-gateway-{index}"))
                .spawn(move || {
                    WORKER.with(|w| w.set(index));
                    runtime.block_on(async {
                        let _ = stopped.await;
                    });
                    // Connections still open are cut, as the agent's runtime does on exit.
                    runtime.shutdown_background();
                })?;
            workers.push(Worker {
                handle,
                stop: Some(stop),
                thread: Some(thread),
            });
        }
        Ok(Arc::new(Self { workers }))
    }

    /// Each worker's runtime, by index.
    pub(crate) fn handles(&self) -> impl Iterator<Item = &Handle> {
        self.workers.iter().map(|w| &w.handle)
    }

    /// How many workers run.
    pub(crate) fn len(&self) -> usize {
        self.workers.len()
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for worker in &mut self.workers {
            drop(worker.stop.take());
        }
        let me = std::thread::current().id();
        for worker in &mut self.workers {
            if let Some(thread) = worker.thread.take()
                && thread.thread().id() != me
            {
                let _ = thread.join();
            }
        }
    }
}
