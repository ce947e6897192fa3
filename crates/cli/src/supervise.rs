//! `tessera up --replicas`: every replica is a `tessera serve` process of its own, as in
//! production, so one can be killed (`kill -9 PID`) or stopped (`kill PID`) while the others
//! keep serving, and you can watch the callers fail over. `up` looks after them as a
//! Deployment's controller would: a replica that exits is started again on the same ports
//! (after a pause that doubles while it keeps dying young), and Ctrl-C or SIGTERM stops
//! them all, each draining as it would in a pod.

use std::{
    collections::BTreeMap,
    fs::File,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::Context;

use crate::{
    probe,
    up::{
        MeshOptions, Prepared, ReplicaAddrs, UpArgs, addrs_of, bind_all, env_for, prepare,
        print_table, write_endpoints,
    },
};

/// How long a replica may take to report ready.
const READY_BOUND: Duration = Duration::from_secs(60);

/// How long a replica may take to stop after SIGTERM (`up` gives replicas a 5 s drain
/// timeout) before it is killed.
const STOP_BOUND: Duration = Duration::from_secs(15);

/// The first pause before a replica that exited is started again, and the longest.
const RESTART_PAUSE: Duration = Duration::from_millis(500);
const RESTART_PAUSE_CAP: Duration = Duration::from_secs(10);

/// A replica that ran at least this long before it exited is restarted after the first
/// pause again; one that dies sooner waits twice as long as last time.
const HEALTHY_RUN: Duration = Duration::from_secs(10);

/// How often exits are looked for.
const POLL: Duration = Duration::from_millis(200);

/// One replica process.
struct Replica {
    name: &'static str,
    label: String,
    admin: String,
    env: BTreeMap<String, String>,
    log: PathBuf,
    child: Option<Child>,
    started: Instant,
    pause: Duration,
}

impl Replica {
    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Starts the process (output appended to its log) and waits until it is ready.
    async fn start(&mut self, exe: &Path) -> anyhow::Result<()> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        let err = log.try_clone()?;
        let child = Command::new(exe)
            .args(["serve", self.name])
            .envs(&self.env)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {} serve {}", exe.display(), self.name))?;
        self.child = Some(child);
        self.started = Instant::now();
        loop {
            if let Some(status) = self.exited() {
                anyhow::bail!(
                    "{} exited ({status}) before it was ready; see {}",
                    self.label,
                    self.log.display()
                );
            }
            match probe::probe(&self.admin, "readiness", Duration::from_secs(1)).await {
                Ok(status) if status == "SERVING" => return Ok(()),
                _ if self.started.elapsed() < READY_BOUND => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                other => anyhow::bail!(
                    "{} not ready within {READY_BOUND:?} ({other:?}); see {}",
                    self.label,
                    self.log.display()
                ),
            }
        }
    }

    /// The exit status, once the process has exited (and is reaped).
    fn exited(&mut self) -> Option<ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok().flatten()?;
        self.child = None;
        Some(status)
    }

    /// The pause before starting again: doubled while the replica keeps dying young.
    fn next_pause(&mut self) -> Duration {
        self.pause = if self.started.elapsed() >= HEALTHY_RUN {
            RESTART_PAUSE
        } else {
            (self.pause * 2).clamp(RESTART_PAUSE, RESTART_PAUSE_CAP)
        };
        self.pause
    }
}

impl Drop for Replica {
    /// A replica is stopped (and reaped) by `stop_all`; one still running here means `up` is
    /// failing or unwinding, and must not leave it behind.
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `tessera up` with `--replicas`: start every replica as a process, print the table, keep
/// them running until SIGTERM or Ctrl-C, then stop them all.
pub async fn run(args: &UpArgs, options: &MeshOptions) -> anyhow::Result<()> {
    let started = Instant::now();
    let prepared = prepare(&args.data_dir, options).await?;
    // Bound here to pick the ports (and to fail fast when one is taken), then released for
    // the replicas to bind; a replica keeps its ports across restarts.
    let bound = bind_all(args.port_base, options).await?;
    let addrs = addrs_of(&bound)?;
    let plan: Vec<(&'static str, usize, String)> = bound
        .iter()
        .map(|b| (b.name, b.replica, b.label.clone()))
        .collect();
    drop(bound);
    let logs = prepared.data_dir.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let exe = std::env::current_exe().context("finding the tessera binary")?;

    let mut replicas = Vec::new();
    for (name, replica, label) in plan {
        print!("starting {label:<14}");
        let _ = std::io::stdout().flush();
        let mut env = env_for(
            name,
            replica,
            &prepared.data_dir,
            &prepared.certs_dir,
            &addrs,
            options.database.as_ref(),
        );
        env.insert("TESSERA_LOG".into(), args.log.clone());
        // Read by the runtime `tessera serve` builds.
        if let Some(n) = options.worker_threads.get(name) {
            env.insert("TOKIO_WORKER_THREADS".into(), n.to_string());
        }
        let mut r = Replica {
            name,
            admin: addrs[name][replica].1.to_string(),
            log: logs.join(format!("{label}.log")),
            label,
            env,
            child: None,
            started: Instant::now(),
            pause: Duration::ZERO,
        };
        let result = r.start(&exe).await;
        replicas.push(r);
        if let Err(err) = result {
            println!();
            stop_all(&mut replicas).await;
            return Err(err);
        }
        println!(" ready (pid {})", replicas.last().map_or(0, Replica::pid));
    }
    let written = write_endpoints(
        &prepared.endpoints_path,
        &prepared.certs_dir,
        &prepared.identities,
        &addrs,
        Some(&pids(&replicas)),
    );
    if let Err(err) = written {
        stop_all(&mut replicas).await;
        return Err(err);
    }
    print_table(
        &addrs,
        &prepared.certs_dir,
        options.database.as_ref(),
        started.elapsed(),
        Some(&pids(&replicas)),
    );
    println!("endpoints: {}", prepared.endpoints_path.display());
    println!(
        "Each replica is a process (logs in {}): kill one (kill -9 PID) and its callers go to \
         the other replicas while up starts it again.",
        logs.display()
    );
    println!("Ctrl-C stops the mesh.");
    supervise(&mut replicas, &exe, &prepared, &addrs).await;
    println!("shutting down...");
    stop_all(&mut replicas).await;
    println!("stopped.");
    Ok(())
}

fn pids(replicas: &[Replica]) -> BTreeMap<String, Vec<u32>> {
    let mut out: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for r in replicas {
        out.entry(r.name.to_owned()).or_default().push(r.pid());
    }
    out
}

/// Restarts replicas that exit, until SIGTERM or Ctrl-C.
async fn supervise(
    replicas: &mut [Replica],
    exe: &Path,
    prepared: &Prepared,
    addrs: &BTreeMap<String, Vec<ReplicaAddrs>>,
) {
    let signal = tessera_mesh::shutdown::signal();
    tokio::pin!(signal);
    loop {
        tokio::select! {
            biased;
            () = &mut signal => return,
            () = tokio::time::sleep(POLL) => {}
        }
        for i in 0..replicas.len() {
            let r = &mut replicas[i];
            let Some(status) = r.exited() else {
                continue;
            };
            let pause = r.next_pause();
            println!("{} exited ({status})", r.label);
            // Ctrl-C reaches the replicas too (one process group): the pause also lets it
            // reach up before anything is restarted.
            tokio::select! {
                biased;
                () = &mut signal => return,
                () = tokio::time::sleep(pause) => {}
            }
            println!(
                "starting {} again ({:.1}s after it exited)",
                r.label,
                pause.as_secs_f64()
            );
            tokio::select! {
                biased;
                // The replica being started is stopped with the others.
                () = &mut signal => return,
                started = r.start(exe) => match started {
                    Ok(()) => println!("{} ready again (pid {})", r.label, r.pid()),
                    // Seen as exited (or still starting) on the next round.
                    Err(err) => println!("{err:#}"),
                },
            }
            let written = write_endpoints(
                &prepared.endpoints_path,
                &prepared.certs_dir,
                &prepared.identities,
                addrs,
                Some(&pids(replicas)),
            );
            if let Err(err) = written {
                println!("{err:#}");
            }
        }
    }
}

/// SIGTERM to every replica still running, then waits for each (bounded), killing one that
/// does not stop in time.
async fn stop_all(replicas: &mut [Replica]) {
    for r in replicas.iter() {
        if let Some(child) = &r.child {
            // Signalled by the PID of a child this process started and has not reaped.
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
    let deadline = Instant::now() + STOP_BOUND;
    for r in replicas.iter_mut() {
        while r.child.is_some() && r.exited().is_none() {
            if Instant::now() >= deadline {
                if let Some(mut child) = r.child.take() {
                    println!("{} did not stop within {STOP_BOUND:?}; killing it", r.label);
                    let _ = child.kill();
                    let _ = child.wait();
                }
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
