//! Child processes of the benchmark: started pinned to a core, stopped for sure.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncBufReadExt, BufReader, Lines},
    process::{Child, ChildStdin, ChildStdout, Command},
};

use crate::BenchError;

/// Whether `taskset` (util-linux) is on the PATH.
pub fn have_taskset() -> bool {
    std::process::Command::new("taskset")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A command that runs `program`, pinned to `cpus` (a taskset list such as `0`) if given.
/// taskset execs the program, so the child's pid is the program's.
pub fn command(program: &Path, cpus: Option<&str>) -> Command {
    match cpus {
        Some(cpus) => {
            let mut cmd = Command::new("taskset");
            cmd.arg("-c").arg(cpus).arg(program);
            cmd
        }
        None => Command::new(program),
    }
}

/// Moves every thread of this process onto `cpus`. taskset walks the threads one by one and
/// fails if one exits meanwhile (a blocking-pool thread retiring), so it is tried again.
pub fn pin_self(cpus: &str) -> Result<(), BenchError> {
    for _ in 0..5 {
        let status = std::process::Command::new("taskset")
            .args(["-a", "-p", "-c", cpus, &std::process::id().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(|source| BenchError::Io {
                what: "running taskset".into(),
                source,
            })?;
        if status.success() {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    Err(BenchError::Setup(format!("taskset -a -p -c {cpus} failed")))
}

/// A free loopback port (bound and released; fine for a benchmark, not for tests).
pub fn free_port() -> Result<u16, BenchError> {
    let listener = std::net::TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .map_err(|source| BenchError::Io {
            what: "finding a free port".into(),
            source,
        })?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|source| BenchError::Io {
            what: "finding a free port".into(),
            source,
        })
}

/// A running child; killed when dropped if it has not been stopped.
pub struct Proc {
    /// What the report and error messages call it, e.g. `tessera serve posts`.
    pub name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Option<Lines<BufReader<ChildStdout>>>,
    /// Where its stderr (and stdout unless piped) goes, to read when it fails.
    pub log: PathBuf,
}

impl Proc {
    /// Starts `cmd` with its stderr (and stdout, unless `pipe_stdout`) going to `log`.
    pub fn spawn(
        name: &str,
        mut cmd: Command,
        log: PathBuf,
        pipe_stdout: bool,
    ) -> Result<Self, BenchError> {
        let io = |source| BenchError::Io {
            what: format!("starting {name}"),
            source,
        };
        let err_file = std::fs::File::create(&log).map_err(io)?;
        let out = if pipe_stdout {
            Stdio::piped()
        } else {
            Stdio::from(err_file.try_clone().map_err(io)?)
        };
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(out)
            .stderr(Stdio::from(err_file))
            .kill_on_drop(true)
            .spawn()
            .map_err(io)?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().map(|s| BufReader::new(s).lines());
        Ok(Self {
            name: name.to_owned(),
            child,
            stdin,
            stdout,
            log,
        })
    }

    /// Its process id, for `/proc` and cgroups; an error once it has exited.
    pub fn pid(&self) -> Result<u32, BenchError> {
        self.child
            .id()
            .ok_or_else(|| BenchError::Setup(format!("{} has exited", self.name)))
    }

    /// The next stdout line starting with `prefix`, within `bound`; the rest of the line.
    pub async fn expect_line(
        &mut self,
        prefix: &str,
        bound: Duration,
    ) -> Result<String, BenchError> {
        let name = self.name.clone();
        let log = self.log.clone();
        let failed = move |why: &str| {
            BenchError::Setup(format!(
                "{name} {why} before printing {prefix:?} (see {})",
                log.display()
            ))
        };
        let Some(lines) = self.stdout.as_mut() else {
            return Err(failed("has no stdout"));
        };
        let deadline = Instant::now() + bound;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, lines.next_line()).await {
                Err(_) => return Err(failed("timed out")),
                Ok(Ok(Some(line))) => {
                    if let Some(rest) = line.strip_prefix(prefix) {
                        return Ok(rest.trim().to_owned());
                    }
                }
                Ok(Ok(None)) | Ok(Err(_)) => return Err(failed("exited")),
            }
        }
    }

    /// Closes stdin: our servers exit on that.
    pub fn close_stdin(&mut self) {
        self.stdin.take();
    }

    /// Closes stdin and waits up to `bound`, then kills.
    pub async fn close_stdin_and_wait(&mut self, bound: Duration) {
        self.stdin.take();
        if tokio::time::timeout(bound, self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }

    /// SIGTERM (graceful shutdown), then SIGKILL after `bound`.
    pub async fn terminate(&mut self, bound: Duration) {
        if let Some(pid) = self.child.id() {
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await;
        }
        if tokio::time::timeout(bound, self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}
