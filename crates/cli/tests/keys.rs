//! The users service's token and key settings as the binary meets them: bad values exit 64
//! naming the setting, before any port is bound; `tessera keys rotate` refuses a data dir
//! without a users database.

#![allow(clippy::unwrap_used)]

use std::process::{Command, Output, Stdio};

const TESSERA: &str = env!("CARGO_BIN_EXE_tessera");

/// `tessera serve users` with `env`, ports and data dir of its own; it must exit by itself
/// (configuration is checked before anything is bound or served).
fn serve_users(env: &[(&str, &str)]) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(TESSERA);
    cmd.args([
        "serve",
        "users",
        "--grpc-addr",
        "127.0.0.1:0",
        "--admin-addr",
        "127.0.0.1:0",
        "--tls-dir",
    ])
    .arg(dir.path().join("no-certs"))
    .arg("--data-dir")
    .arg(dir.path().join("data"))
    .env_remove("DATABASE_URL")
    .env_remove("TESSERA_KEY_ENCRYPTION_KEY_FILE")
    .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bad_token_settings_exit_64_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let short = dir.path().join("short.key");
    std::fs::write(&short, "too short").unwrap();
    let short = short.to_str().unwrap();
    let missing = dir.path().join("missing.key");
    let missing = missing.to_str().unwrap();
    let pg = "postgres://tessera:tessera@127.0.0.1:1/none";
    for (env, named) in [
        (
            vec![("TESSERA_ACCESS_TOKEN_TTL_S", "0")],
            "TESSERA_ACCESS_TOKEN_TTL_S",
        ),
        (
            vec![("TESSERA_REFRESH_TOKEN_TTL_S", "-1")],
            "TESSERA_REFRESH_TOKEN_TTL_S",
        ),
        (
            vec![("TESSERA_SIGNING_KEY_ROTATION_S", "1d")],
            "TESSERA_SIGNING_KEY_ROTATION_S",
        ),
        // PostgreSQL replicas must share one key-encryption key: it cannot be generated.
        (
            vec![("DATABASE_URL", pg)],
            "TESSERA_KEY_ENCRYPTION_KEY_FILE",
        ),
        (
            vec![("TESSERA_KEY_ENCRYPTION_KEY_FILE", short)],
            "TESSERA_KEY_ENCRYPTION_KEY_FILE",
        ),
        (
            vec![("TESSERA_KEY_ENCRYPTION_KEY_FILE", missing)],
            "TESSERA_KEY_ENCRYPTION_KEY_FILE",
        ),
    ] {
        let out = serve_users(&env);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(64), "{env:?}: {err}");
        assert!(err.contains(named), "{env:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    }
}

#[test]
fn keys_rotate_needs_a_users_database() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(TESSERA)
        .args(["keys", "rotate", "--data-dir"])
        .arg(dir.path())
        .env_remove("DATABASE_URL")
        .env_remove("TESSERA_KEY_ENCRYPTION_KEY_FILE")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("users database"), "{err}");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "nothing created"
    );
}
