//! What `/proc` says about a process and its children: CPU time and memory, for benchmarks
//! that charge a server's cost to its own processes (an nginx master and its workers, a
//! threaded HAProxy, the xlb agent).

/// The pids whose parent is `pid`.
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&p| {
            stat_fields(p).and_then(|f| f.get(1).and_then(|s| s.parse().ok())) == Some(pid)
        })
        .collect()
}

/// `pid` and its descendants.
pub fn tree(pid: u32) -> Vec<u32> {
    let mut all = vec![pid];
    let mut i = 0;
    while i < all.len() {
        let kids = children(all[i]);
        all.extend(kids);
        i += 1;
    }
    all
}

/// The fields of `/proc/<pid>/stat` after the command name: `[0]` is the state, `[1]` the
/// parent, `[11]` utime and `[12]` stime (fields 14 and 15 of proc(5)).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces or parentheses itself.
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// User plus system CPU time of `pid` and its descendants (every thread), in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let ticks: u64 = tree(pid)
        .into_iter()
        .filter_map(stat_fields)
        .map(|f| {
            let field = |i: usize| f.get(i).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
            field(11) + field(12)
        })
        .sum();
    ticks as f64 / hz
}

/// Resident memory of `pid` and its descendants, summed: (VmRSS, VmHWM) in KiB. Pages shared
/// between processes (an nginx master's and its workers') count once per process.
pub fn memory_kib(pid: u32) -> (u64, u64) {
    tree(pid).into_iter().fold((0, 0), |(rss, hwm), p| {
        let status = std::fs::read_to_string(format!("/proc/{p}/status")).unwrap_or_default();
        let kib = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
                .unwrap_or(0)
        };
        (rss + kib("VmRSS:"), hwm + kib("VmHWM:"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_cpu_time_and_memory() {
        let me = std::process::id();
        // Spin (at most 2 s) until the kernel has charged a tick to this process.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        let mut x = 0u64;
        while cpu_seconds(me) == 0.0 && std::time::Instant::now() < deadline {
            for i in 0..1_000_000u64 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
            }
        }
        assert!(cpu_seconds(me) > 0.0);
        let (rss, hwm) = memory_kib(me);
        assert!(rss > 0 && hwm >= rss, "rss {rss} hwm {hwm}");
        assert_eq!(tree(me)[0], me);
    }
}
