//! CPU quotas for scenario C's replicas: a child cgroup per process with a CFS bandwidth
//! limit (`cpu.max` on cgroup v2, `cpu.cfs_quota_us`/`cpu.cfs_period_us` on v1), so each
//! replica gets the same slice of a core whatever else the machine runs.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

/// The CFS period; quotas are fractions of it.
const PERIOD_US: u64 = 100_000;

/// Where CPU cgroups are made, and which interface they speak.
#[derive(Clone, Debug)]
pub enum Root {
    /// The unified hierarchy's mount; quotas go in `cpu.max`.
    V2(PathBuf),
    /// The v1 `cpu` hierarchy's mount; quotas go in `cpu.cfs_quota_us`.
    V1(PathBuf),
}

/// The mount of the `cpu` controller: `cgroup2` if it carries cpu, else the v1 `cpu`
/// hierarchy. The error says why none is usable.
fn find_root(mounts: &str) -> Result<Root, String> {
    let mut v1 = None;
    for line in mounts.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [_, mount, fstype, options, ..] = fields[..] else {
            continue;
        };
        let mount = PathBuf::from(mount);
        if fstype == "cgroup2" {
            let controllers =
                std::fs::read_to_string(mount.join("cgroup.controllers")).unwrap_or_default();
            if controllers.split_whitespace().any(|c| c == "cpu") {
                return Ok(Root::V2(mount));
            }
        } else if fstype == "cgroup" && options.split(',').any(|o| o == "cpu") {
            v1 = Some(Root::V1(mount));
        }
    }
    v1.ok_or_else(|| "no cgroup hierarchy with the cpu controller is mounted".into())
}

impl Root {
    /// Finds the cpu controller and checks that a child cgroup can be made there.
    pub fn detect() -> Result<Root, String> {
        let mounts = std::fs::read_to_string("/proc/mounts")
            .map_err(|e| format!("cannot read /proc/mounts: {e}"))?;
        let root = find_root(&mounts)?;
        if let Root::V2(dir) = &root {
            // Children get the cpu controller only if the parent hands it down.
            std::fs::write(dir.join("cgroup.subtree_control"), "+cpu").map_err(|e| {
                format!(
                    "cannot enable cpu in {}/cgroup.subtree_control: {e}",
                    dir.display()
                )
            })?;
        }
        let probe = root
            .dir()
            .join(format!("tessera-bench-probe-{}", std::process::id()));
        std::fs::create_dir(&probe)
            .map_err(|e| format!("cannot create a cgroup in {}: {e}", root.dir().display()))?;
        let _ = std::fs::remove_dir(&probe);
        Ok(root)
    }

    /// The directory cages are made in.
    pub fn dir(&self) -> &Path {
        match self {
            Root::V2(dir) | Root::V1(dir) => dir,
        }
    }

    /// Which interface and where, for the report.
    pub fn describe(&self) -> String {
        match self {
            Root::V2(dir) => format!("cgroup v2 cpu.max under {}", dir.display()),
            Root::V1(dir) => format!("cgroup v1 cpu.cfs_quota_us under {}", dir.display()),
        }
    }
}

/// One child cgroup with a CPU quota; removed (its processes moved back) when dropped.
pub struct Cage {
    root: Root,
    dir: PathBuf,
}

/// Throttling counters of a cage (`cpu.stat`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Throttling {
    /// CFS periods in which the cage had runnable threads.
    pub periods: u64,
    /// Those of them in which it ran out of quota.
    pub throttled: u64,
    /// How long its threads waited for the next period, in all.
    pub throttled_time: Duration,
}

impl Throttling {
    /// The counts since `earlier`.
    pub fn since(&self, earlier: &Throttling) -> Throttling {
        Throttling {
            periods: self.periods.saturating_sub(earlier.periods),
            throttled: self.throttled.saturating_sub(earlier.throttled),
            throttled_time: self.throttled_time.saturating_sub(earlier.throttled_time),
        }
    }

    /// Adds another cage's counts, for a total over replicas.
    pub fn add(&mut self, other: &Throttling) {
        self.periods += other.periods;
        self.throttled += other.throttled;
        self.throttled_time += other.throttled_time;
    }
}

/// Reads `cpu.stat` (v1: `throttled_time` in ns; v2: `throttled_usec`).
pub fn parse_cpu_stat(text: &str) -> Throttling {
    let mut t = Throttling::default();
    for line in text.lines() {
        let mut parts = line.split_whitespace();
        let (Some(key), Some(value)) = (parts.next(), parts.next()) else {
            continue;
        };
        let value: u64 = value.parse().unwrap_or(0);
        match key {
            "nr_periods" => t.periods = value,
            "nr_throttled" => t.throttled = value,
            "throttled_time" => t.throttled_time = Duration::from_nanos(value),
            "throttled_usec" => t.throttled_time = Duration::from_micros(value),
            _ => {}
        }
    }
    t
}

impl Cage {
    /// Makes `root/name` limited to `cores` of CPU (0.4 = 40 ms per 100 ms).
    pub fn create(root: &Root, name: &str, cores: f64) -> Result<Cage, String> {
        let dir = root.dir().join(name);
        std::fs::create_dir(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let cage = Cage {
            root: root.clone(),
            dir,
        };
        let quota = ((cores * PERIOD_US as f64).round() as u64).max(1000);
        match root {
            Root::V2(_) => cage.write("cpu.max", &format!("{quota} {PERIOD_US}"))?,
            Root::V1(_) => {
                cage.write("cpu.cfs_period_us", &PERIOD_US.to_string())?;
                cage.write("cpu.cfs_quota_us", &quota.to_string())?;
            }
        }
        Ok(cage)
    }

    fn write(&self, file: &str, value: &str) -> Result<(), String> {
        let path = self.dir.join(file);
        std::fs::write(&path, value).map_err(|e| format!("writing {}: {e}", path.display()))
    }

    /// Moves process `pid` (every thread of it) into the cage.
    pub fn add(&self, pid: u32) -> Result<(), String> {
        self.write("cgroup.procs", &pid.to_string())
    }

    /// The cage's counters now (all zero if `cpu.stat` cannot be read).
    pub fn throttling(&self) -> Throttling {
        parse_cpu_stat(&std::fs::read_to_string(self.dir.join("cpu.stat")).unwrap_or_default())
    }
}

impl Drop for Cage {
    fn drop(&mut self) {
        // A cgroup with processes cannot be removed: hand any left back to the root first.
        let procs = std::fs::read_to_string(self.dir.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.split_whitespace() {
            let _ = std::fs::write(self.root.dir().join("cgroup.procs"), pid);
        }
        for _ in 0..20 {
            if std::fs::remove_dir(&self.dir).is_ok() || !self.dir.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("could not remove cgroup {}", self.dir.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_both_cpu_stat_formats() {
        let v1 = "nr_periods 40\nnr_throttled 10\nthrottled_time 2500000\n";
        assert_eq!(
            parse_cpu_stat(v1),
            Throttling {
                periods: 40,
                throttled: 10,
                throttled_time: Duration::from_micros(2500),
            }
        );
        let v2 = "usage_usec 100\nnr_periods 7\nnr_throttled 3\nthrottled_usec 900\n";
        assert_eq!(
            parse_cpu_stat(v2).throttled_time,
            Duration::from_micros(900)
        );
        assert_eq!(parse_cpu_stat(v2).throttled, 3);
    }

    #[test]
    fn prefers_cgroup_v1_cpu_when_v2_lacks_it() {
        let mounts = "cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0\n\
                      cgroup /sys/fs/cgroup/cpuacct cgroup rw,relatime,cpuacct 0 0\n\
                      cgroup2 /nonexistent/unified cgroup2 rw,relatime 0 0\n";
        match find_root(mounts) {
            Ok(Root::V1(dir)) => assert_eq!(dir, PathBuf::from("/sys/fs/cgroup/cpu")),
            other => panic!("{other:?}"),
        }
        assert!(find_root("proc /proc proc rw 0 0\n").is_err());
    }
}
