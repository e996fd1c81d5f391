//! wrk, the HTTP load generator the benchmarks drive: one bounded run from a namespace and
//! its report parsed into figures.

use std::time::Duration;

use crate::netns::Netns;

/// One wrk run's figures.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct WrkReport {
    /// Requests completed.
    pub requests: u64,
    /// Requests per second over the run.
    pub rps: f64,
    /// Median latency, milliseconds.
    pub p50_ms: f64,
    /// 99th percentile latency, milliseconds.
    pub p99_ms: f64,
    /// Socket errors (connect, read, write, timeout) plus non-2xx/3xx responses.
    pub errors: u64,
}

/// A load: `threads` threads holding `connections` keep-alive connections for `duration`.
#[derive(Debug, Clone)]
pub struct WrkLoad {
    /// `-t`.
    pub threads: usize,
    /// `-c`.
    pub connections: usize,
    /// `-d` (whole seconds).
    pub duration: Duration,
    /// Extra request headers (`-H`), e.g. `Connection: close`.
    pub headers: Vec<String>,
}

/// Runs `wrk --latency` in `ns` against `url`. Bounded: wrk's own duration plus 10 s, after
/// which `timeout` kills it. An error carries wrk's output.
pub fn run(ns: &Netns, load: &WrkLoad, url: &str) -> Result<WrkReport, String> {
    let secs = load.duration.as_secs().max(1);
    let (t, c, d, limit) = (
        load.threads.to_string(),
        load.connections.to_string(),
        format!("{secs}s"),
        (secs + 10).to_string(),
    );
    let mut cmd = ns.command("timeout");
    cmd.args([
        "-k",
        "2",
        &limit,
        "wrk",
        "--latency",
        "-t",
        &t,
        "-c",
        &c,
        "-d",
        &d,
    ]);
    cmd.args(["--timeout", "2s"]);
    for h in &load.headers {
        cmd.args(["-H", h]);
    }
    cmd.arg(url);
    let out = cmd.output().map_err(|e| format!("running wrk: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(format!(
            "wrk failed ({}): {text}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let report = parse(&text);
    if report.requests == 0 {
        return Err(format!("wrk made no requests:\n{text}"));
    }
    Ok(report)
}

/// The figures in wrk's report (`--latency` for the percentiles).
pub fn parse(text: &str) -> WrkReport {
    let mut report = WrkReport {
        p50_ms: f64::NAN,
        p99_ms: f64::NAN,
        ..WrkReport::default()
    };
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Requests/sec:", v] => report.rps = v.parse().unwrap_or(0.0),
            ["50%", v] => report.p50_ms = duration_ms(v).unwrap_or(f64::NAN),
            ["99%", v] => report.p99_ms = duration_ms(v).unwrap_or(f64::NAN),
            [n, "requests", "in", ..] => report.requests = n.parse().unwrap_or(0),
            ["Socket", "errors:", rest @ ..] => {
                report.errors += rest
                    .iter()
                    .filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok())
                    .sum::<u64>()
            }
            ["Non-2xx", "or", "3xx", "responses:", n] => report.errors += n.parse().unwrap_or(0),
            _ => {}
        }
    }
    report
}

/// A duration as wrk prints it (`812.00us`, `1.23ms`, `2.00s`, `1.00m`), in milliseconds.
pub fn duration_ms(text: &str) -> Option<f64> {
    let (num, unit) = text
        .find(|c: char| c.is_ascii_alphabetic())
        .map(|i| text.split_at(i))?;
    let n: f64 = num.parse().ok()?;
    Some(match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        "m" => n * 60_000.0,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const REPORT: &str = "\
Running 5s test @ http://198.51.100.80/fixed
  2 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.05ms  420.11us  12.40ms   90.12%
    Req/Sec    15.40k     1.02k   17.80k    71.00%
  Latency Distribution
     50%  812.00us
     75%    1.10ms
     90%    1.50ms
     99%    2.31ms
  153211 requests in 5.00s, 40.12MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:  30640.21
Transfer/sec:      8.02MB
";

    #[test]
    fn a_report_parses() {
        let r = parse(REPORT);
        assert_eq!(r.requests, 153_211);
        assert!((r.rps - 30_640.21).abs() < 1e-6);
        assert!((r.p50_ms - 0.812).abs() < 1e-9);
        assert!((r.p99_ms - 2.31).abs() < 1e-9);
        assert_eq!(r.errors, 7);
    }

    #[test]
    fn durations_in_every_unit() {
        assert_eq!(duration_ms("2.00s"), Some(2000.0));
        assert_eq!(duration_ms("1.00m"), Some(60_000.0));
        assert_eq!(duration_ms("5.5ms"), Some(5.5));
        assert_eq!(duration_ms("7"), None);
        assert_eq!(duration_ms("3.0h"), None);
    }
}
