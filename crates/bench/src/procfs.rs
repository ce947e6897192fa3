//! What `/proc` says about a process: CPU time and resident memory.
//!
//! CPU time comes two ways. `/proc/<pid>/stat` `utime + stime` covers every thread the
//! process ever had, but in clock ticks (10 ms on most kernels), too coarse for a few
//! seconds of a light load. The sum of `/proc/<pid>/task/*/schedstat` is in nanoseconds but
//! misses threads that have exited. The benchmark measures windows with the second and checks
//! the totals against the first.

use std::{path::PathBuf, process::Command, sync::OnceLock, time::Duration};

use crate::BenchError;

fn read(path: PathBuf) -> Result<String, BenchError> {
    std::fs::read_to_string(&path).map_err(|source| BenchError::Io {
        what: path.display().to_string(),
        source,
    })
}

/// `utime` and `stime` (fields 14 and 15, in clock ticks) of a `/proc/<pid>/stat` line. The
/// command name (field 2) is in parentheses and may itself hold spaces and parentheses, so
/// fields are counted from the last `)`.
pub fn parse_stat_times(stat: &str) -> Option<(u64, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // After the name: state (3), ppid (4), ... utime is field 14, i.e. the 12th from here.
    let utime = fields.nth(11)?.parse().ok()?;
    let stime = fields.next()?.parse().ok()?;
    Some((utime, stime))
}

/// The first number of a `schedstat` line: nanoseconds spent on a CPU.
pub fn parse_schedstat(line: &str) -> Option<u64> {
    line.split_whitespace().next()?.parse().ok()
}

/// `VmRSS` of a `/proc/<pid>/status` file, in bytes.
pub fn parse_vmrss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut parts = line["VmRSS:".len()..].split_whitespace();
    let value: u64 = parts.next()?.parse().ok()?;
    match parts.next() {
        Some("kB") | None => Some(value * 1024),
        Some(_) => None,
    }
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 if that cannot be asked).
pub fn clock_ticks() -> u64 {
    static TICKS: OnceLock<u64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .filter(|t| *t > 0)
            .unwrap_or(100)
    })
}

/// CPU time of the whole process from `/proc/<pid>/stat` (tick resolution).
pub fn stat_cpu(pid: u32) -> Result<Duration, BenchError> {
    let stat = read(PathBuf::from(format!("/proc/{pid}/stat")))?;
    let (utime, stime) = parse_stat_times(&stat).ok_or_else(|| BenchError::Proc {
        pid,
        what: "stat".into(),
    })?;
    let ticks = utime + stime;
    Ok(Duration::from_nanos(
        ticks.saturating_mul(1_000_000_000) / clock_ticks(),
    ))
}

/// CPU time of the process's live threads from their `schedstat` (nanosecond resolution).
pub fn sched_cpu(pid: u32) -> Result<Duration, BenchError> {
    let dir = PathBuf::from(format!("/proc/{pid}/task"));
    let entries = std::fs::read_dir(&dir).map_err(|source| BenchError::Io {
        what: dir.display().to_string(),
        source,
    })?;
    let mut total = 0u64;
    for entry in entries.flatten() {
        // A thread may exit between listing and reading: skip it.
        if let Ok(line) = std::fs::read_to_string(entry.path().join("schedstat"))
            && let Some(ns) = parse_schedstat(&line)
        {
            total += ns;
        }
    }
    Ok(Duration::from_nanos(total))
}

/// Resident memory of the process, in bytes.
pub fn rss(pid: u32) -> Result<u64, BenchError> {
    let status = read(PathBuf::from(format!("/proc/{pid}/status")))?;
    parse_vmrss(&status).ok_or_else(|| BenchError::Proc {
        pid,
        what: "VmRSS".into(),
    })
}

/// CPU used by a set of processes, read both ways at once.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuSample {
    /// Sum of live threads' `schedstat` (precise).
    pub sched: Duration,
    /// `utime + stime` (complete, coarse).
    pub stat: Duration,
}

impl CpuSample {
    /// The CPU `pids` have used so far, summed; fails if one of them has exited.
    pub fn of(pids: &[u32]) -> Result<Self, BenchError> {
        let mut sample = Self::default();
        for pid in pids {
            sample.sched += sched_cpu(*pid)?;
            sample.stat += stat_cpu(*pid)?;
        }
        Ok(sample)
    }

    /// CPU used since `earlier`.
    pub fn since(&self, earlier: &CpuSample) -> CpuSample {
        CpuSample {
            sched: self.sched.saturating_sub(earlier.sched),
            stat: self.stat.saturating_sub(earlier.stat),
        }
    }
}

impl std::ops::AddAssign for CpuSample {
    fn add_assign(&mut self, other: Self) {
        self.sched += other.sched;
        self.stat += other.stat;
    }
}

/// The whole machine's CPU time from the first line of `/proc/stat`, to tell how much else
/// was running (other processes, or the hypervisor stealing time) during a measurement.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MachineCpu {
    /// Every state but idle and iowait, steal excluded.
    pub busy: Duration,
    /// Time the hypervisor ran something else while this machine wanted to run.
    pub steal: Duration,
    /// All of it, over all CPUs.
    pub total: Duration,
}

/// Parses the aggregate `cpu` line of `/proc/stat` (in clock ticks).
pub fn parse_proc_stat(stat: &str) -> Option<[u64; 3]> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal
    let [user, nice, system, idle, iowait, irq, softirq, steal] = v.as_slice().try_into().ok()?;
    let busy = user + nice + system + irq + softirq;
    Some([busy, steal, busy + steal + idle + iowait])
}

impl MachineCpu {
    /// The machine's CPU time since boot; subtract an earlier reading with [`Self::since`].
    pub fn now() -> Result<Self, BenchError> {
        let stat = read(PathBuf::from("/proc/stat"))?;
        let [busy, steal, total] = parse_proc_stat(&stat).ok_or_else(|| BenchError::Proc {
            pid: 0,
            what: "the cpu line of /proc/stat".into(),
        })?;
        let d =
            |ticks: u64| Duration::from_nanos(ticks.saturating_mul(1_000_000_000) / clock_ticks());
        Ok(Self {
            busy: d(busy),
            steal: d(steal),
            total: d(total),
        })
    }

    /// CPU time spent since `earlier`.
    pub fn since(&self, earlier: &MachineCpu) -> MachineCpu {
        MachineCpu {
            busy: self.busy.saturating_sub(earlier.busy),
            steal: self.steal.saturating_sub(earlier.steal),
            total: self.total.saturating_sub(earlier.total),
        }
    }

    /// "other processes used 3.1% of the machine's CPU time, steal 0.4%", given how much of
    /// `busy` was the benchmark's own (`ours`).
    pub fn describe(&self, ours: Duration) -> String {
        let total = self.total.as_secs_f64().max(1e-9);
        let other = self.busy.saturating_sub(ours).as_secs_f64();
        format!(
            "other processes used {:.1}% of the machine's CPU time, hypervisor steal {:.1}%",
            100.0 * other / total,
            100.0 * self.steal.as_secs_f64() / total
        )
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn stat_fields_are_counted_from_the_last_parenthesis() {
        // A command name with a space and a parenthesis must not shift the fields.
        let line = "4242 (tokio (rt) w) S 1 4242 4242 0 -1 4194560 1515 0 0 0 \
                    731 269 0 0 20 0 3 0 12345 1000000 500 18446744073709551615";
        assert_eq!(parse_stat_times(line), Some((731, 269)));
        assert_eq!(parse_stat_times("4242 (x) S 1 2"), None);
    }

    #[test]
    fn proc_stat_splits_busy_steal_and_idle() {
        let stat = "cpu  100 5 20 1000 7 1 2 30 0 0\ncpu0 50 2 10 500 3 0 1 15 0 0\n";
        // busy = user + nice + system + irq + softirq; total adds steal, idle, iowait.
        assert_eq!(parse_proc_stat(stat), Some([128, 30, 1165]));
        assert_eq!(parse_proc_stat("cpu0 1 2 3\n"), None);
    }

    #[test]
    fn vmrss_is_read_in_bytes() {
        let status = "Name:\ttessera\nVmPeak:\t  99999 kB\nVmRSS:\t   12345 kB\nThreads:\t4\n";
        assert_eq!(parse_vmrss(status), Some(12345 * 1024));
        assert_eq!(parse_vmrss("Name:\tx\n"), None);
    }

    #[test]
    fn own_process_is_readable() {
        let pid = std::process::id();
        // Burn a little CPU so both counters are non-zero.
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert_ne!(x, 1);
        let sample = CpuSample::of(&[pid]).unwrap();
        assert!(sample.sched > Duration::ZERO);
        assert!(rss(pid).unwrap() > 1024 * 1024);
        assert_eq!(parse_schedstat("123 456 7\n"), Some(123));
    }
}
