//! Password hashing under a bound: `concurrency` dedicated threads compute argon2 hashes,
//! at most `queue` more calls wait for one, and past that a call fails at once with
//! [`Error::HashingBusy`] (RESOURCE_EXHAUSTED).
//!
//! Login and CreateUser are reachable without credentials, and each hash holds its memory
//! cost (19 MiB at the default parameters) while it runs, so without this bound a burst of
//! logins grows the process by 19 MiB per concurrent call until the kernel kills it. The
//! queue keeps the wait of an admitted call short (`queue / concurrency` hash times).
//!
//! Why dedicated threads, each keeping its argon2 memory from one hash to the next, rather
//! than `spawn_blocking` under a semaphore: measured, the latter still grew the users
//! process past 256 MiB with one hash at a time. Each hash may land on another thread of the
//! blocking pool, glibc gives threads their own malloc arenas, and allocating and freeing
//! 19 MiB per hash fragments them. Here the hashing memory is at most `concurrency` × the
//! memory cost: a thread keeps it while more hashes wait, and gives it back to the system
//! once none does (see [`MEMORY`]), so an idle process does not hold it.
//!
//! A call's admission moves into its job: a caller that gives up (its deadline passed, the
//! client went away) does not free a place while its hash is still running or queued.

use std::{
    cell::RefCell,
    panic::AssertUnwindSafe,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
        mpsc,
    },
};

use argon2::{
    Algorithm, Argon2, Block, PasswordHash, Version,
    password_hash::{Output, ParamsString, SaltString},
};
use tokio::sync::{Semaphore, oneshot};

use crate::Error;

type Job = Box<dyn FnOnce() + Send>;

/// The hashing threads of one process, shared by its handlers. Dropping it ends them once
/// their queued work is done.
pub(crate) struct Hashing {
    params: argon2::Params,
    /// One permit per call running or waiting; failing to take one is how a full queue shows.
    admitted: Arc<Semaphore>,
    jobs: mpsc::Sender<Job>,
    /// What the threads hold; the tests read it.
    #[cfg_attr(not(test), allow(dead_code))]
    memory: Arc<MemoryStats>,
}

/// What the hashing threads hold of argon2 memory, and how often they allocated it.
#[derive(Default)]
struct MemoryStats {
    /// Bytes kept by all hashing threads between hashes.
    kept: AtomicUsize,
    /// Times a hashing thread allocated its memory.
    allocations: AtomicUsize,
}

/// What a hashing thread works with.
struct Worker {
    jobs: Arc<Mutex<mpsc::Receiver<Job>>>,
    memory: Arc<MemoryStats>,
}

fn argon2id(params: argon2::Params) -> Argon2<'static> {
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

/// One hashing thread: runs jobs until the sender is gone. Its argon2 memory is kept while
/// jobs follow one another and given back to the system before it waits for one: when no job
/// is queued, or another thread already waits for the next.
fn worker(w: &Worker) {
    let mut kept = 0;
    loop {
        // The lock is held only while taking or waiting for the next job, not while running it.
        let jobs = match w.jobs.try_lock() {
            Ok(jobs) => jobs,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {
                give_back(&w.memory, &mut kept);
                w.jobs.lock().unwrap_or_else(|p| p.into_inner())
            }
        };
        let job = match jobs.try_recv() {
            Ok(job) => job,
            Err(mpsc::TryRecvError::Disconnected) => return,
            Err(mpsc::TryRecvError::Empty) => {
                give_back(&w.memory, &mut kept);
                let Ok(job) = jobs.recv() else {
                    return;
                };
                job
            }
        };
        drop(jobs);
        // A panicking job must not take the thread with it; its caller sees the reply
        // channel closed, and its admission is dropped while unwinding.
        let _ = std::panic::catch_unwind(AssertUnwindSafe(job));
        account(&w.memory, &mut kept);
    }
}

/// Drops this thread's argon2 memory, and says so in `stats`.
fn give_back(stats: &MemoryStats, kept: &mut usize) {
    MEMORY.with_borrow_mut(|memory| memory.blocks = Vec::new());
    account(stats, kept);
}

/// Brings `stats` up to date with this thread's memory; `kept` is what it last said.
fn account(stats: &MemoryStats, kept: &mut usize) {
    let (now, allocated) =
        MEMORY.with_borrow_mut(|memory| (memory.bytes(), std::mem::take(&mut memory.allocated)));
    stats.allocations.fetch_add(allocated, Ordering::Relaxed);
    if now >= *kept {
        stats.kept.fetch_add(now - *kept, Ordering::Relaxed);
    } else {
        stats.kept.fetch_sub(*kept - now, Ordering::Relaxed);
    }
    *kept = now;
}

impl Hashing {
    /// Starts `concurrency` (at least one) hashing threads.
    pub(crate) fn new(
        params: argon2::Params,
        concurrency: usize,
        queue: usize,
    ) -> Result<Self, Error> {
        let concurrency = concurrency.max(1);
        let (sender, receiver) = mpsc::channel();
        let receiver = Arc::new(Mutex::new(receiver));
        let memory = Arc::new(MemoryStats::default());
        for i in 0..concurrency {
            let w = Worker {
                jobs: Arc::clone(&receiver),
                memory: Arc::clone(&memory),
            };
            std::thread::Builder::new()
                .name(format!("password-hash-{i}"))
                .spawn(move || worker(&w))
                .map_err(|e| Error::Password(format!("cannot start a hashing thread: {e}")))?;
        }
        Ok(Self {
            params,
            admitted: Arc::new(Semaphore::new(concurrency.saturating_add(queue))),
            jobs: sender,
            memory,
        })
    }

    /// Runs `work` on a hashing thread once one is free, or fails at once when the queue is
    /// full.
    async fn run<T, F>(&self, work: F) -> Result<T, Error>
    where
        T: Send + 'static,
        F: FnOnce() -> Result<T, Error> + Send + 'static,
    {
        let admitted = Arc::clone(&self.admitted)
            .try_acquire_owned()
            .map_err(|_| Error::HashingBusy)?;
        let (reply, result) = oneshot::channel();
        let job: Job = Box::new(move || {
            let result = work();
            // Free the place before the caller hears of the result, so the caller's next
            // call finds it free.
            drop(admitted);
            // The caller may have gone; nobody to tell then.
            let _ = reply.send(result);
        });
        self.jobs
            .send(job)
            .map_err(|_| Error::Password("the hashing threads are gone".into()))?;
        result
            .await
            .map_err(|_| Error::Password("a hashing job panicked".into()))?
    }

    /// A PHC string of `password` with a fresh salt, at this service's parameters.
    pub(crate) async fn hash(&self, password: String) -> Result<String, Error> {
        let params = self.params.clone();
        self.run(move || hash_phc(params, password.as_bytes()))
            .await
    }

    /// Whether `password` matches the PHC string `hash` (at the parameters recorded in it).
    pub(crate) async fn verify(&self, hash: String, password: String) -> Result<bool, Error> {
        self.run(move || verify_phc(&hash, password.as_bytes()))
            .await
    }
}

/// argon2 memory is reserved at least this large (in 1 KiB blocks): past glibc's largest
/// mmap threshold (32 MiB on 64-bit), so it is always a mapping of its own, given back to the
/// system whole when dropped. At the default cost of 19 MiB, freeing a smaller block would
/// raise glibc's threshold to its size, the next one would come from the thread's heap, and
/// freeing that keeps it resident. Only the blocks a hash uses are ever touched.
const RESERVE_BLOCKS: usize = 33 << 10;

/// A thread's argon2 memory.
#[derive(Default)]
struct Memory {
    blocks: Vec<Block>,
    /// Times it was allocated since the worker last looked.
    allocated: usize,
}

impl Memory {
    fn bytes(&self) -> usize {
        self.blocks.len() * std::mem::size_of::<Block>()
    }
}

thread_local! {
    /// This thread's argon2 memory, kept from one hash to the next while more wait:
    /// allocating and freeing 19 MiB per hash fragments the heap, and the process grows well
    /// past the memory the hashes in flight need. Grows to the largest cost seen (stored
    /// hashes keep their own); a hashing thread drops it when no hash waits ([`worker`]).
    static MEMORY: RefCell<Memory> = RefCell::new(Memory::default());
}

/// argon2 of `password` and `salt` into `out`, over this thread's kept memory. argon2 writes
/// every block before it reads it, so what the memory held before does not matter.
fn compute(
    argon2: &Argon2<'_>,
    password: &[u8],
    salt: &[u8],
    out: &mut [u8],
) -> Result<(), argon2::Error> {
    MEMORY.with_borrow_mut(|memory| {
        let needed = argon2.params().block_count();
        if memory.blocks.len() < needed {
            if memory.blocks.capacity() < needed {
                // Reserved anew, not grown: growing a Vec copies what it held.
                memory.blocks = Vec::with_capacity(needed.max(RESERVE_BLOCKS));
                memory.allocated += 1;
            }
            memory.blocks.resize(needed, Block::default());
        }
        let blocks = &mut memory.blocks[..needed];
        argon2.hash_password_into_with_memory(password, salt, out, blocks)
    })
}

fn password_err(e: impl std::fmt::Display) -> Error {
    Error::Password(e.to_string())
}

fn corrupt(e: impl std::fmt::Display) -> Error {
    Error::Corrupt(e.to_string())
}

/// What `Argon2::hash_password` produces (argon2id, v19, a 16-byte random salt).
fn hash_phc(params: argon2::Params, password: &[u8]) -> Result<String, Error> {
    let mut salt = [0_u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut salt)
        .map_err(|_| Error::Password("no randomness for the salt".into()))?;
    let salt_string = SaltString::encode_b64(&salt).map_err(password_err)?;
    let mut out = vec![
        0_u8;
        params
            .output_len()
            .unwrap_or(argon2::Params::DEFAULT_OUTPUT_LEN)
    ];
    let param_string = ParamsString::try_from(&params).map_err(password_err)?;
    compute(&argon2id(params), password, &salt, &mut out).map_err(password_err)?;
    let phc = PasswordHash {
        algorithm: Algorithm::Argon2id.ident(),
        version: Some(Version::V0x13.into()),
        params: param_string,
        salt: Some(salt_string.as_salt()),
        hash: Some(Output::new(&out).map_err(password_err)?),
    };
    Ok(phc.to_string())
}

/// What `Argon2::verify_password` decides, at the algorithm, version and parameters the PHC
/// string records; the comparison is constant-time (`Output`'s equality).
fn verify_phc(phc: &str, password: &[u8]) -> Result<bool, Error> {
    let parsed = PasswordHash::new(phc).map_err(corrupt)?;
    let algorithm = Algorithm::try_from(parsed.algorithm).map_err(corrupt)?;
    let version = match parsed.version {
        Some(v) => Version::try_from(v).map_err(corrupt)?,
        None => Version::default(),
    };
    let params = argon2::Params::try_from(&parsed).map_err(corrupt)?;
    let (Some(salt), Some(expected)) = (parsed.salt, parsed.hash) else {
        return Err(Error::Corrupt("the hash has no salt or no output".into()));
    };
    let mut salt_buf = [0_u8; 64];
    let salt = salt.decode_b64(&mut salt_buf).map_err(corrupt)?;
    let mut out = vec![0_u8; expected.len()];
    compute(
        &Argon2::new(algorithm, version, params),
        password,
        salt,
        &mut out,
    )
    .map_err(corrupt)?;
    Ok(Output::new(&out).map_err(corrupt)? == expected)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::{
        sync::atomic::{AtomicUsize, Ordering},
        time::{Duration, Instant},
    };

    use tonic::{Code, Status};

    use super::*;

    fn cheap() -> argon2::Params {
        argon2::Params::new(256, 1, 1, None).unwrap()
    }

    /// Waits (bounded) until `cond` holds.
    async fn until(what: &str, cond: impl Fn() -> bool) {
        let start = Instant::now();
        while !cond() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "timed out: {what}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// A job that blocks its blocking-pool thread until the returned sender is dropped.
    fn blocker() -> (
        std::sync::mpsc::Sender<()>,
        impl FnOnce() -> Result<(), Error> + Send + 'static,
    ) {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        (tx, move || {
            let _ = rx.recv();
            Ok(())
        })
    }

    /// 8 MiB of argon2 memory, one pass: a few milliseconds a hash.
    fn roomy() -> argon2::Params {
        argon2::Params::new(8 << 10, 1, 1, None).unwrap()
    }

    /// Hashes waiting behind one another share one allocation of the thread's memory, and
    /// once none waits the memory is given back: an idle service keeps none of it.
    #[tokio::test]
    async fn memory_is_kept_while_hashes_wait_and_given_back_after() {
        let h = Arc::new(Hashing::new(roomy(), 1, 8).unwrap());
        // The thread is held until all six hashes wait behind it.
        let (release, job) = blocker();
        let held = tokio::spawn({
            let h = Arc::clone(&h);
            async move { h.run(job).await }
        });
        until("the blocker runs", || h.admitted.available_permits() == 8).await;
        let hashes = tokio::spawn({
            let h = Arc::clone(&h);
            async move {
                let hashes = (0..6).map(|i| h.hash(format!("password {i}")));
                futures::future::join_all(hashes).await
            }
        });
        until("six hashes wait", || h.admitted.available_permits() == 2).await;
        drop(release);
        held.await.unwrap().unwrap();
        for phc in hashes.await.unwrap() {
            assert!(phc.unwrap().starts_with("$argon2id$v=19$m=8192,t=1,p=1$"));
        }
        until("the memory is given back", || {
            h.memory.allocations.load(Ordering::Relaxed) == 1
                && h.memory.kept.load(Ordering::Relaxed) == 0
        })
        .await;

        // Alone, a hash allocates again and gives it back again. (Nothing else is sent
        // until then: a call sent right after the reply may find the memory still kept.)
        h.hash("alone".into()).await.unwrap();
        until("the memory is given back again", || {
            h.memory.allocations.load(Ordering::Relaxed) == 2
                && h.memory.kept.load(Ordering::Relaxed) == 0
        })
        .await;
    }

    /// While a job waits, the thread that ended the hash before it keeps its memory.
    #[tokio::test]
    async fn memory_is_kept_for_a_waiting_job() {
        let h = Arc::new(Hashing::new(roomy(), 1, 2).unwrap());
        let run = |job: Box<dyn FnOnce() -> Result<(), Error> + Send>| {
            let h = Arc::clone(&h);
            tokio::spawn(async move { h.run(job).await })
        };
        // A blocker, a hash and a second blocker, queued in that order.
        let (release_first, first) = blocker();
        let first = run(Box::new(first));
        until("the first blocker runs", || {
            h.admitted.available_permits() == 2
        })
        .await;
        let hash = tokio::spawn({
            let h = Arc::clone(&h);
            async move { h.hash("between".into()).await }
        });
        until("the hash waits", || h.admitted.available_permits() == 1).await;
        let (release_second, second) = blocker();
        let second = run(Box::new(second));
        until("the second blocker waits", || {
            h.admitted.available_permits() == 0
        })
        .await;

        drop(release_first);
        first.await.unwrap().unwrap();
        hash.await.unwrap().unwrap();
        until("the thread kept its memory for the job behind", || {
            h.memory.kept.load(Ordering::Relaxed) >= 8 << 20
        })
        .await;
        drop(release_second);
        second.await.unwrap().unwrap();
        until("the memory is given back", || {
            h.memory.kept.load(Ordering::Relaxed) == 0
        })
        .await;
    }

    #[tokio::test]
    async fn hashes_and_verifies() {
        let h = Hashing::new(cheap(), 1, 0).unwrap();
        let phc = h.hash("correct horse".into()).await.unwrap();
        assert!(h.verify(phc.clone(), "correct horse".into()).await.unwrap());
        assert!(!h.verify(phc, "wrong horse".into()).await.unwrap());
        let err = h.verify("not a hash".into(), "x".into()).await.unwrap_err();
        assert!(matches!(err, Error::Corrupt(_)), "{err:?}");
    }

    /// The kept-memory hashing agrees with the argon2 crate's own, both ways, also for a
    /// stored hash at other parameters than the service's (argon2i, more memory).
    #[test]
    fn compatible_with_the_argon2_crate() {
        use argon2::{PasswordHasher, PasswordVerifier};
        let params = argon2::Params::new(1024, 2, 1, None).unwrap();
        let ours = hash_phc(params.clone(), b"correct horse").unwrap();
        let parsed = PasswordHash::new(&ours).unwrap();
        assert!(ours.starts_with("$argon2id$v=19$m=1024,t=2,p=1$"), "{ours}");
        assert!(
            Argon2::default()
                .verify_password(b"correct horse", &parsed)
                .is_ok()
        );
        assert!(
            Argon2::default()
                .verify_password(b"wrong horse", &parsed)
                .is_err()
        );
        for (algorithm, m) in [(Algorithm::Argon2id, 512), (Algorithm::Argon2i, 4096)] {
            let theirs = Argon2::new(
                algorithm,
                Version::V0x13,
                argon2::Params::new(m, 1, 2, Some(24)).unwrap(),
            )
            .hash_password(
                b"correct horse",
                &SaltString::encode_b64(b"sixteen byte sal").unwrap(),
            )
            .unwrap()
            .to_string();
            assert!(verify_phc(&theirs, b"correct horse").unwrap(), "{theirs}");
            assert!(!verify_phc(&theirs, b"correct horsE").unwrap(), "{theirs}");
        }
        // The same thread's memory now holds the largest cost; smaller ones still verify.
        assert!(verify_phc(&ours, b"correct horse").unwrap());
        assert!(matches!(
            verify_phc("$argon2id$v=19$m=1024,t=2,p=1$c2FsdHNhbHQ", b"x"),
            Err(Error::Corrupt(_))
        ));
    }

    #[tokio::test]
    async fn a_full_queue_is_resource_exhausted() {
        let h = Arc::new(Hashing::new(cheap(), 1, 1).unwrap());
        let (release_running, job) = blocker();
        let running = tokio::spawn({
            let h = Arc::clone(&h);
            async move { h.run(job).await }
        });
        until("the first job is admitted", || {
            h.admitted.available_permits() == 1
        })
        .await;
        let queued = tokio::spawn({
            let h = Arc::clone(&h);
            async move { h.hash("queued password".into()).await }
        });
        until("the second waits", || h.admitted.available_permits() == 0).await;

        let err = h.hash("one too many".into()).await.unwrap_err();
        assert!(matches!(err, Error::HashingBusy), "{err:?}");
        let status = Status::from(err);
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert!(
            h.verify("x".into(), "y".into()).await.is_err(),
            "verify shares the bound"
        );

        drop(release_running);
        running.await.unwrap().unwrap();
        assert!(queued.await.unwrap().unwrap().starts_with("$argon2id$"));
        // Everything drained: the slots are free again.
        h.hash("after".into()).await.unwrap();
        assert_eq!(h.admitted.available_permits(), 2);
    }

    #[tokio::test]
    async fn a_caller_that_gives_up_keeps_its_slot_until_the_hash_ends() {
        let h = Arc::new(Hashing::new(cheap(), 1, 0).unwrap());
        let (release, job) = blocker();
        let caller = tokio::spawn({
            let h = Arc::clone(&h);
            async move { h.run(job).await }
        });
        until("the job is admitted", || {
            h.admitted.available_permits() == 0
        })
        .await;
        caller.abort();
        assert!(caller.await.unwrap_err().is_cancelled());
        // The work is still running, so its memory is still in use: still full.
        assert!(matches!(
            h.hash("x".into()).await.unwrap_err(),
            Error::HashingBusy
        ));
        drop(release);
        until("the slot comes back", || {
            h.admitted.available_permits() == 1
        })
        .await;
        h.hash("x".into()).await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn never_more_than_the_concurrency_at_once() {
        let h = Arc::new(Hashing::new(cheap(), 2, 100).unwrap());
        let now = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let mut jobs = Vec::new();
        for _ in 0..24 {
            let (h, now, peak) = (Arc::clone(&h), Arc::clone(&now), Arc::clone(&peak));
            jobs.push(tokio::spawn(async move {
                h.run(move || {
                    let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(n, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(5));
                    now.fetch_sub(1, Ordering::SeqCst);
                    Ok(())
                })
                .await
            }));
        }
        for job in jobs {
            job.await.unwrap().unwrap();
        }
        let peak = peak.load(Ordering::SeqCst);
        assert!((1..=2).contains(&peak), "peak {peak}");
    }
}
