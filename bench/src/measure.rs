//! Clock, payloads, latency statistics and /proc readings (memory, CPU time, file
//! limits).

use std::{sync::OnceLock, time::Duration};

use anyhow::{anyhow, Context as _, Result};
use serde::Serialize;

/// The origin of the timestamps carried in message texts (publishers and subscribers
/// live in this process, so a monotonic clock is enough).
static CLOCK_ORIGIN: OnceLock<std::time::Instant> = OnceLock::new();

pub(crate) fn now_ns() -> u64 {
    CLOCK_ORIGIN
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_nanos() as u64
}

/// `<send ns>|<tag>|` padded with `x` to `size` bytes.
pub(crate) fn payload(sent_ns: u64, tag: &str, size: usize) -> String {
    let mut text = format!("{sent_ns}|{tag}|");
    if text.len() < size {
        text.extend(std::iter::repeat_n('x', size - text.len()));
    }
    text
}

/// The send time a [`payload`] carries.
pub(crate) fn payload_sent_ns(text: &str) -> Option<u64> {
    text.split('|').next()?.parse().ok()
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Default, Clone, Copy, Serialize, PartialEq)]
pub(crate) struct Latency {
    pub(crate) samples: usize,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) max_ms: f64,
}

impl Latency {
    /// From samples in microseconds (sorted in place).
    pub(crate) fn from_us(samples: &mut [u32]) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        samples.sort_unstable();
        let ms = |us: u32| f64::from(us) / 1000.0;
        Self {
            samples: samples.len(),
            p50_ms: ms(percentile(samples, 0.50)),
            p99_ms: ms(percentile(samples, 0.99)),
            max_ms: ms(samples[samples.len() - 1]),
        }
    }
}

impl std::fmt::Display for Latency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} samples)",
            self.p50_ms, self.p99_ms, self.max_ms, self.samples
        )
    }
}

/// Nearest-rank percentile of sorted, non-empty `samples`.
pub(crate) fn percentile(sorted: &[u32], p: f64) -> u32 {
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub(crate) fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

pub(crate) fn micros_ns(ns: u64) -> u32 {
    u32::try_from(ns / 1000).unwrap_or(u32::MAX)
}

/// `VmRSS` of `pid` in KiB.
pub(crate) fn rss_kib(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow!("no VmRSS in {path}"))
}

/// User + system CPU time of `pid` so far, in seconds.
pub(crate) fn cpu_seconds(pid: u32) -> Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    // Fields after the command name (which may hold spaces) start at field 3;
    // utime and stime are fields 14 and 15.
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| anyhow!("malformed {path}"))?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| anyhow!("malformed {path}"))
    };
    // SAFETY: sysconf only reads a configuration value.
    let per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let per_sec = if per_sec > 0 { per_sec as f64 } else { 100.0 };
    Ok((ticks(11)? + ticks(12)?) as f64 / per_sec)
}

/// The soft open-files limit of `pid`, from /proc/<pid>/limits.
pub(crate) fn open_files_limit(pid: u32) -> Option<u64> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Raises this process's soft RLIMIT_NOFILE to its hard limit; answers the soft
/// limit in force.
pub(crate) fn raise_fd_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    limit.rlim_cur
}

/// CPU seconds the server (when its PID is known; all of them added up for the
/// nodes of a cluster) and this process used between two readings: on one machine
/// they compete for the same cores.
pub(crate) struct CpuMeter {
    pub(crate) server_pids: Vec<u32>,
    pub(crate) server_start: Option<f64>,
    pub(crate) bench_start: Option<f64>,
}

/// The CPU seconds of every process in `pids` together (`None` when there is none
/// or one cannot be read).
fn total_cpu_seconds(pids: &[u32]) -> Option<f64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|p| cpu_seconds(*p).ok()).sum()
}

impl CpuMeter {
    pub(crate) fn start(server_pids: &[u32]) -> Self {
        Self {
            server_pids: server_pids.to_vec(),
            server_start: total_cpu_seconds(server_pids),
            bench_start: cpu_seconds(std::process::id()).ok(),
        }
    }

    /// The server's (servers') CPU seconds since [`CpuMeter::start`].
    pub(crate) fn server(&self) -> Option<f64> {
        let now = total_cpu_seconds(&self.server_pids)?;
        Some(now - self.server_start?)
    }

    /// This process's CPU seconds since [`CpuMeter::start`].
    pub(crate) fn bench(&self) -> Option<f64> {
        let now = cpu_seconds(std::process::id()).ok()?;
        Some(now - self.bench_start?)
    }
}

/// Rounds to 2 decimals for the report.
pub(crate) fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_carries_its_send_time_and_size() {
        let text = payload(1_234_567, "p0-1", 64);
        assert_eq!(text.len(), 64);
        assert_eq!(payload_sent_ns(&text), Some(1_234_567));
        assert_eq!(payload_sent_ns("hello"), None);
        // Never truncated below the prefix.
        assert_eq!(payload(5, "t", 1), "5|t|");
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut samples: Vec<u32> = (1..=100).rev().map(|v| v * 1000).collect();
        let l = Latency::from_us(&mut samples);
        assert_eq!(l.samples, 100);
        assert_eq!(l.p50_ms, 50.0);
        assert_eq!(l.p99_ms, 99.0);
        assert_eq!(l.max_ms, 100.0);
        assert_eq!(Latency::from_us(&mut []), Latency::default());
        assert_eq!(percentile(&[7], 0.99), 7);
    }

    #[test]
    fn proc_readings_work_on_this_process() {
        let pid = std::process::id();
        assert!(rss_kib(pid).expect("VmRSS") > 0);
        assert!(cpu_seconds(pid).expect("CPU time") >= 0.0);
        assert!(open_files_limit(pid).expect("limits") > 0);
    }
}
