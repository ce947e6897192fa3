//! Files that hold secrets are owner-only from their creation: after `tessera up` (the data
//! directory: CA key, workload keys, databases, the key-encryption key) and after `tessera
//! certs`, every private file is 0600 and every directory holding one is 0700. Both run as
//! the real binary in a child process.
#![allow(clippy::unwrap_used)]
#![cfg(unix)]

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use tessera_tests::{BOUND, eventually};

const TESSERA: &str = env!("CARGO_BIN_EXE_tessera-under-test");

fn mode(path: &Path) -> u32 {
    fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// Every file under `dir`, recursively.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// Is `path` secret: a private key, a database (and its WAL files), the key-encryption key?
fn secret(path: &Path) -> bool {
    let name = path.file_name().unwrap().to_string_lossy();
    name.ends_with(".key")
        || name.ends_with(".db")
        || name.ends_with(".db-wal")
        || name.ends_with(".db-shm")
}

/// Asserts the modes under a certificate directory as `tessera certs` leaves it.
fn check_certs(certs: &Path, workloads: &[&str]) {
    assert_eq!(mode(certs), 0o700, "{}", certs.display());
    assert_eq!(mode(&certs.join("ca.key")), 0o600, "the CA key");
    for w in workloads {
        let dir = certs.join(w);
        assert_eq!(mode(&dir), 0o700, "{}", dir.display());
        assert_eq!(mode(&dir.join("tls.key")), 0o600, "{w}'s key");
    }
}

/// Kills the child it holds when dropped (a failing assertion must not leave it running).
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn tessera_certs_writes_owner_only_keys() {
    let root = tempfile::tempdir().unwrap();
    // Not yet existing, two levels deep: created by the command itself.
    let certs = root.path().join("fresh/certs");
    let status = Command::new(TESSERA)
        .args(["certs", "--dir"])
        .arg(&certs)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(mode(&root.path().join("fresh")), 0o700);
    check_certs(
        &certs,
        &[
            "users",
            "posts",
            "comments",
            "notifications",
            "gateway",
            "operator",
        ],
    );
    // Public material stays readable (clients need the CA certificate).
    assert_eq!(mode(&certs.join("ca.crt")) & 0o600, 0o600);
    // No temporary file is left behind.
    assert!(
        files(&certs)
            .iter()
            .all(|f| f.extension().is_none_or(|e| e != "tmp"))
    );
}

#[tokio::test]
async fn tessera_up_keeps_its_data_dir_owner_only() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    // A data dir left world-readable by an older version is tightened, not trusted.
    fs::create_dir(&data).unwrap();
    fs::set_permissions(&data, fs::Permissions::from_mode(0o755)).unwrap();
    let child = Command::new(TESSERA)
        .args(["up", "--port-base", "0", "--data-dir"])
        .arg(&data)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut up = Running(child);
    let endpoints = data.join("endpoints.json");
    eventually(BOUND, async || {
        if let Some(status) = up.0.try_wait()? {
            panic!("tessera up exited early: {status}");
        }
        anyhow::ensure!(endpoints.exists(), "no endpoints.json yet");
        Ok(())
    })
    .await;

    assert_eq!(mode(&data), 0o700, "the data dir");
    assert_eq!(
        mode(&data.join("key-encryption.key")),
        0o600,
        "the generated key-encryption key"
    );
    check_certs(
        &data.join("certs"),
        &[
            "users",
            "posts",
            "comments",
            "notifications",
            "gateway",
            "operator",
        ],
    );
    let all = files(&data);
    let dbs: Vec<_> = all
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "db"))
        .collect();
    assert_eq!(
        dbs.len(),
        4,
        "one database per service but the gateway: {all:?}"
    );
    for f in all.iter().filter(|f| secret(f)) {
        assert_eq!(mode(f), 0o600, "{}", f.display());
    }
    drop(up);
}
